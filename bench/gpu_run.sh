#!/usr/bin/env bash
# The one command for a CUDA machine: build the extension with its CUDA kernels, run the GPU tests
# (the 'cuda' and 'triton' backends on CUDA tensors) with a JUnit report, the self-check
# (python -m ued_fast.selftest), then the benchmark. Logs and results go to $OUT.
#
# Uses the machine's python3 with its torch (no venv), from the repo root:
#   UED_FAST_COMMIT=<sha> bash bench/gpu_run.sh        (write the sha literally where the copy has no .git)
# With bench/wheels.sh run beforehand, .whl/ (Liger-Kernel for the comparison) is installed to /tmp/site.
# The stages share TOTAL_BUDGET seconds (default 450, so the whole run ends within 8 minutes) and each
# has its own timeout (BUILD_TIMEOUT, TEST_TIMEOUT, SELFTEST_TIMEOUT, capped by the time left); the
# JUnit report is written even when the tests are cut off (they get SIGINT, on which pytest reports).
# STAGES (default build,test,selftest,bench; also sanitize: compute-sanitizer memcheck of kd_loss,
# ncu: hardware counters of the kd_loss kernel) picks a subset, e.g. on a second call to a warm machine:
#   STAGES=sanitize,ncu bash bench/gpu_run.sh
# DRY_RUN=1: the plumbing on a CPU machine: no nvidia-smi and no compile (the extension already built
# here is used), the build and self-check tests under TRITON_INTERPRET=1, the self-check on cpu, the
# benchmark's --dry-run.
# Files in $OUT: build.log, test.log, junit-gpu.xml, selftest.log, bench.log, gpu_bench.{json,md,png}.
# Then copy gpu_bench.* into bench/results/ and commit them.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/bench/results}
mkdir -p "$OUT"
DRY_RUN=${DRY_RUN:-0}
STAGES=${STAGES:-build,test,selftest,bench}
TOTAL_BUDGET=${TOTAL_BUDGET:-450}
BUILD_TIMEOUT=${BUILD_TIMEOUT:-240}
TEST_TIMEOUT=${TEST_TIMEOUT:-150}
SELFTEST_TIMEOUT=${SELFTEST_TIMEOUT:-120}
BENCH_ARGS=${BENCH_ARGS:-}
PY=${PY:-python3}
start=$SECONDS
left() { echo $(( TOTAL_BUDGET - (SECONDS - start) )); }
has_stage() { [[ ",$STAGES," == *",$1,"* ]]; }
stage_timeout() {  # min(wanted, time left - margin)
  local want=$1 l
  l=$(( $(left) - 10 ))
  (( l < want )) && want=$l
  (( want < 1 )) && want=1
  echo "$want"
}
log() { echo "[gpu_run $(( SECONDS - start ))s] $*"; }

export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export UED_FAST_COMMIT=${UED_FAST_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
if [[ $DRY_RUN == 1 ]]; then
  export TRITON_INTERPRET=1  # the Triton kernels on CPU tensors
  device=cpu
  test_select="test_build.py or test_selftest.py"  # the plumbing only: the op suites run in make test
  bench_mode=--dry-run
else
  unset TRITON_INTERPRET    # the real kernels on the GPU
  export FORCE_CUDA=1 UED_FAST_EXPECT_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
  device=cuda
  test_select="cuda-cuda or triton-cuda or test_build.py or test_selftest.py"
  bench_mode=""
fi

log "commit $UED_FAST_COMMIT; stages $STAGES; budget ${TOTAL_BUDGET}s; dry run $DRY_RUN"
[[ $DRY_RUN == 1 ]] || nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1 | head -3
$PY -c "import torch, setuptools; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'setuptools', setuptools.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
$PY -c "import triton; print('triton', triton.__version__)" || log "no triton: the 'triton' backend is skipped"
for module in pytest hypothesis; do
  $PY -c "import $module" 2>/dev/null || log "python module $module is missing: the tests that need it are not run"
done

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site" && log "wheels installed: $(ls .whl)"
else
  log "no .whl/: Liger-Kernel will be recorded as missing (run bench/wheels.sh and carry .whl)"
fi

status=0
if has_stage build; then
  if [[ $DRY_RUN == 1 ]]; then
    log "build: dry run, using the extension already built here"
    $PY -c "import ued_fast._C" >"$OUT/build.log" 2>&1 || { log "BUILD: ued_fast._C does not import"; exit 1; }
  else
    log "build (setup.py build_ext --inplace, CUDA kernels included, MAX_JOBS=$MAX_JOBS)"
    # setuptools < 77 cannot read pyproject.toml's SPDX license field; build_ext needs none of the metadata.
    aside=""
    if ! $PY -c "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 77)"; then
      aside=$(mktemp) && mv pyproject.toml "$aside" && log "setuptools < 77: pyproject.toml set aside for the build"
    fi
    timeout "$(stage_timeout "$BUILD_TIMEOUT")" $PY setup.py build_ext --inplace >"$OUT/build.log" 2>&1
    rc=$?
    [[ -n $aside ]] && mv "$aside" pyproject.toml
    if (( rc != 0 )); then log "BUILD FAILED or timed out (rc=$rc)"; tail -40 "$OUT/build.log"; exit 1; fi
    grep -iE "warning|spill" "$OUT/build.log" | head -20
  fi
  $PY -c "import ued_fast; b = ued_fast.available_backends('$device'); print('$device backends:', b); assert '$device' == 'cpu' or 'cuda' in b, 'CUDA kernels not built'" \
    || { log "the CUDA backend is not available after the build"; exit 1; }
  log "build done"
fi

if has_stage test; then
  log "tests: -k '$test_select'"
  # SIGINT (not SIGTERM) on timeout: pytest then stops and still writes the JUnit report.
  timeout -s INT -k 20 "$(stage_timeout "$TEST_TIMEOUT")" $PY -m pytest tests -q -m "not slow" -k "$test_select" \
    -p no:cacheprovider -rfE --continue-on-collection-errors --durations=10 \
    --junitxml="$OUT/junit-gpu.xml" -o junit_suite_name="ued_fast-$device" >"$OUT/test.log" 2>&1
  rc=$?
  tail -25 "$OUT/test.log"
  if [[ ! -s $OUT/junit-gpu.xml ]]; then  # cut off before pytest could report (e.g. while collecting)
    log "pytest wrote no JUnit report (rc=$rc): writing one that records the failed run"
    $PY - "$OUT/junit-gpu.xml" "$rc" "$OUT/test.log" "$device" <<'PYEOF'
import sys
from xml.etree import ElementTree as ET
path, rc, log, device = sys.argv[1:]
suites = ET.Element("testsuites")
suite = ET.SubElement(suites, "testsuite", name=f"ued_fast-{device}", tests="1", errors="1", failures="0", skipped="0")
case = ET.SubElement(suite, "testcase", classname="bench.gpu_run", name="pytest_run")
error = ET.SubElement(case, "error", message=f"pytest exited with code {rc} before writing its report (124: timed out)")
error.text = "".join(open(log, errors="replace").readlines()[-60:])
ET.ElementTree(suites).write(path, encoding="utf-8", xml_declaration=True)
PYEOF
  fi
  (( rc != 0 )) && { log "TESTS FAILED or timed out (rc=$rc)"; status=1; }
fi

if has_stage selftest; then
  log "self-check on $device"
  timeout -k 10 "$(stage_timeout "$SELFTEST_TIMEOUT")" $PY -m ued_fast.selftest --device "$device" >"$OUT/selftest.log" 2>&1
  rc=$?
  cat "$OUT/selftest.log"
  (( rc != 0 )) && { log "SELF-CHECK FAILED or timed out (rc=$rc)"; status=1; }
fi

if has_stage sanitize; then
  log "compute-sanitizer memcheck on the CUDA kd_loss kernels"
  timeout "$(stage_timeout 150)" compute-sanitizer --tool memcheck --error-exitcode 9 $PY - >"$OUT/sanitize.log" 2>&1 <<'PYEOF'
import torch, ued_fast
torch.manual_seed(0)
for c in (1, 10, 33, 1000, 1025, 4097, 32000, 100000):  # 32000/100000: row split over a cluster on sm_90
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        for off in (0, 1):  # off=1: rows not 16-byte aligned -> scalar path
            base = torch.randn(37, c + 8, device="cuda").to(dt)
            s = base[:, off:off + c].detach().requires_grad_(True)  # row stride c+8, maybe misaligned
            t = torch.randn(37, c + 8, device="cuda").to(dt)[:, off:off + c]
            y = torch.randint(0, c, (37,), device="cuda"); y[3] = -100
            for kind in ("logits", "probs"):
                tt = t.float().softmax(-1).to(dt) if kind == "probs" else t
                loss = ued_fast.kd_loss(s, tt, y, teacher_kind=kind, backend="cuda")
                g, = torch.autograd.grad(loss, s)
                ref = ued_fast.kd_loss_reference(s, tt, y, teacher_kind=kind)
                assert torch.isfinite(g).all() and torch.allclose(loss.float(), ref, rtol=2e-2, atol=1e-3), (c, dt, off, kind, loss, ref)
torch.cuda.synchronize()
print("sanitize: ok")
PYEOF
  rc=$?
  tail -15 "$OUT/sanitize.log"
  (( rc != 0 )) && { log "SANITIZER/SMOKE FAILED (rc=$rc)"; status=1; }
fi

if has_stage ncu; then  # hardware counters of the CUDA kd_loss kernel (not in the default stages)
  log "ncu on the CUDA kd_loss kernel"
  timeout "$(stage_timeout 180)" ncu --target-processes all -k regex:kd_loss --launch-count 3 \
    --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,lts__t_sector_hit_rate.pct,sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active,sm__warps_active.avg.pct_of_peak_sustained_active,launch__registers_per_thread \
    $PY - >"$OUT/ncu.log" 2>&1 <<'PYEOF'
import torch, ued_fast
from ued_fast.ops import _spine
for n, c in ((4096, 1000), (8192, 32000), (8192, 128256)):
    s = torch.randn(n, c, device="cuda", dtype=torch.bfloat16); t = torch.randn_like(s)
    y = torch.randint(0, c, (n,), device="cuda")
    coefficients = _spine.kd_coefficients(4.0, 0.9, True, True)
    _spine.native_forward("kd_loss", "cuda", s, t, y, *coefficients, -100, 0, True)  # ncu replays it cold
    torch.cuda.synchronize()
PYEOF
  rc=$?
  grep -E "kd_loss|duration|bytes|throughput|hit_rate|pipe_xu|warps_active|registers|x\(" "$OUT/ncu.log" | head -60
  (( rc != 0 )) && { log "NCU FAILED (rc=$rc)"; status=1; }
fi

if has_stage bench; then
  budget=$(( $(left) - 40 ))
  if (( budget < 30 )); then log "BENCH SKIPPED: ${budget}s left of the budget"; status=1; fi
fi
if has_stage bench && (( budget >= 30 )); then
  log "benchmark (time budget ${budget}s) $bench_mode $BENCH_ARGS"
  timeout -k 10 "$(stage_timeout $(( budget + 30 )))" $PY bench/gpu_bench.py --out "$OUT" --time-budget "$budget" $bench_mode $BENCH_ARGS \
    >"$OUT/bench.log" 2>&1
  rc=$?
  tail -80 "$OUT/bench.log"
  (( rc != 0 )) && { log "BENCH FAILED or timed out (rc=$rc); partial results are in gpu_bench.json"; status=1; }
fi
log "done (status $status)"
exit $status
