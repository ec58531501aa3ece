#!/usr/bin/env bash
# The one command for the device tool (GitHub issue 5): build the extension with CUDA, run the test
# suite on the GPU, check the CUDA kernels with compute-sanitizer, benchmark; logs and results under $OUT.
#
# From the repo root, after bench/wheels.sh (Liger-Kernel travels as a wheel):
#   run(command="UED_FAST_COMMIT=$(git rev-parse HEAD) bash bench/gpu_run.sh", carry=[".whl"], timeout_s=600)
#   (write the sha literally: the device copy has no .git)
# One call has 10 minutes; the stages share TOTAL_BUDGET seconds (default 560) and each has its own
# `timeout`. If everything does not fit, split it over two calls of one warm machine (the build stays):
#   STAGES=build,test,sanitize bash bench/gpu_run.sh
#   STAGES=build,bench BENCH_ARGS="--sections kd" bash bench/gpu_run.sh
# Stages: build, test, sanitize (compute-sanitizer memcheck + a smoke check), ncu (hardware counters
# of the kd_loss kernel at three shapes), bench. Default: build,test,bench.
# Files back (at most 8): build.log, test.log, sanitize.log, ncu.log, bench.log, gpu_bench.{json,md,png}.
# Then copy gpu_bench.* from the tool's files_at folder into bench/results/ and commit them.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/bench/results}
mkdir -p "$OUT"
STAGES=${STAGES:-build,test,bench}
TOTAL_BUDGET=${TOTAL_BUDGET:-560}
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

unset TRITON_INTERPRET  # the tests must run the real kernels on the GPU
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export UED_FAST_COMMIT=${UED_FAST_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}

log "commit $UED_FAST_COMMIT; stages $STAGES; budget ${TOTAL_BUDGET}s"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1 | head -3
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site" && log "wheels installed: $(ls .whl)"
else
  log "no .whl/: Liger-Kernel will be recorded as missing (run bench/wheels.sh here and carry .whl)"
fi

status=0
if has_stage build; then
  log "build (setup.py build_ext --inplace, CUDA sources included)"
  if ! timeout "$(stage_timeout 300)" env MAX_JOBS=16 $PY setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
    log "BUILD FAILED"; tail -40 "$OUT/build.log"; exit 1
  fi
  grep -iE "warning|spill" "$OUT/build.log" | grep -v "^\s*$" | head -20
  $PY -c "import torch, ued_fast; b = ued_fast.available_backends('cuda'); print('cuda backends:', b); assert 'cuda' in b, 'CUDA kernels not built'" \
    || { log "the CUDA backend is not available after the build"; exit 1; }
fi

if has_stage test; then
  log "tests on CUDA"
  xdist=""
  $PY -c "import xdist" 2>/dev/null && xdist="-n 4"
  timeout "$(stage_timeout 240)" $PY -m pytest tests -q -m "not slow" $xdist -p no:cacheprovider -rfE \
    >"$OUT/test.log" 2>&1
  rc=$?
  tail -25 "$OUT/test.log"
  (( rc != 0 )) && { log "TESTS FAILED or timed out (rc=$rc)"; status=1; }
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
from ued_fast.ops.kd_loss import _native_forward
for n, c in ((4096, 1000), (8192, 32000), (8192, 128256)):
    s = torch.randn(n, c, device="cuda", dtype=torch.bfloat16); t = torch.randn_like(s)
    y = torch.randint(0, c, (n,), device="cuda")
    _native_forward("cuda", s, t, y, 4.0, 0.9, True, -100, "logits", True)  # ncu replays it with cold caches
    torch.cuda.synchronize()
PYEOF
  rc=$?
  grep -E "kd_loss|duration|bytes|throughput|hit_rate|pipe_xu|warps_active|registers|x\(" "$OUT/ncu.log" | head -60
  (( rc != 0 )) && { log "NCU FAILED (rc=$rc)"; status=1; }
fi

if has_stage bench; then
  budget=$(( $(left) - 40 ))
  log "benchmark (time budget ${budget}s) $BENCH_ARGS"
  timeout "$(stage_timeout $(( budget + 30 )))" $PY bench/gpu_bench.py --out "$OUT" --time-budget "$budget" $BENCH_ARGS \
    >"$OUT/bench.log" 2>&1
  rc=$?
  tail -80 "$OUT/bench.log"
  (( rc != 0 )) && { log "BENCH FAILED or timed out (rc=$rc); partial results are in gpu_bench.json"; status=1; }
fi
log "done (status $status)"
exit $status
