"""Compile every Triton kernel for sm_90 (Hopper) without a GPU, at every configuration the launch
code in kernels/*.py chooses, and report registers, spills and shared memory per compiled kernel.

How: a stand-in driver reports a CUDA sm_90 target, the real launch wrappers run on 'meta' tensors
(shapes, dtypes and strides without memory, so LLM-size C costs nothing), and JITFunction.run is
made to compile instead of launch (warmup). ptxas (shipped with triton) prints each kernel's
register / spill / stack line, which is read back. Configurations that map to the same compiled
kernel (same specialization key) are compiled once: pass 1 only collects the keys of all dispatches,
pass 2 compiles each unique key once, spread over worker processes.

Exit status: 0 when every kernel compiles without spilling; 1 on a compile error, a dispatch error
or any spill. Usage:
    python .ci/check_triton.py [--jobs 2] [--markdown bench/results/static_sm90.md] [--only kd_loss]
                               [--cuda-table]
--cuda-table also compiles csrc/*.cu through .ci/check_cuda.sh (its exact nvcc flags, sm_90) with
ptxas -v added, and appends the CUDA kernels' registers / spills / shared memory to the markdown.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
TARGET_ARCH = 90  # Hopper: H100 / H200
F32, BF16, F16, F64 = "float32", "bfloat16", "float16", "float64"
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")  # the contract's divergence codes 0, 1, 2


# ---- the dispatches: (label, family, thunk building meta inputs and calling the real wrapper) ----

def _meta(torch, shape, dtype, stride=None):
    t = torch.empty(shape, dtype=getattr(torch, dtype), device="meta")
    return t if stride is None else t.as_strided(shape, stride)


def _label(op, **fields):
    """'op name=value ...', the line that names a dispatch (flags as 0 / 1)."""
    return " ".join([op] + [f"{name}={int(v) if isinstance(v, bool) else v}" for name, v in fields.items()])


def _meta_target(torch, n, target):
    return _meta(torch, (n,), "int64") if target else None


def kd_loss_cases(torch):
    from kernels import kd_loss as kd

    def case(s_dt, t_dt, n, c, target=True, grad=True, kind=0, divergence=0):
        label = _label("kd_loss", s=s_dt, t=t_dt, N=n, C=c, target=target, grad=grad, kind=kind,
                       divergence=DIVERGENCES[divergence])

        def run():
            s = _meta(torch, (n, c), s_dt)
            t = _meta(torch, (n, c), t_dt)
            y = _meta_target(torch, n, target)
            # temperature 2, alpha 0.5, t2_scale: the contract's host coefficients
            kd.kd_loss_fwd(s, t, y, 0.5, 0.5, 2.0 if target else 4.0, 0.5 if target else 0.0, divergence, 0.5,
                           -100, kind, grad)
        return label, "kd_loss", run

    # Pass 1 is cheap and dedups, so dispatches may repeat a compiled kernel; what costs is the number
    # of distinct kernels, so dtype pairs and modes are crossed with every C but not with each other.
    cols = (10, 1000, 4096, 8192, 32000, 128256)
    pairs = ((F32, F32), (BF16, BF16), (F16, F16), (BF16, F32), (F16, F32), (F32, BF16), (BF16, F64), (F32, F64))
    for s_dt, t_dt in pairs:
        for c in cols:
            yield case(s_dt, t_dt, 1 << 20, c)  # the largest tiles of the small-C kernel
    for c in cols:
        for n in (1, 8192):  # fewer rows per program (BLOCK_N halves down to 1 for small batches)
            yield case(BF16, BF16, n, c)
    # Every mode (target, grad, teacher kind), for 2-byte inputs, on both kernels.
    for c in (1000, 32000):
        for target in (True, False):
            for grad in (True, False):
                for kind in (0, 1, 2):
                    yield case(BF16, BF16, 1 << 20, c, target, grad, kind)
    # reverse_kl and jsd are separate specializations (the chunked kernel takes one more pass): the dtype
    # pairs, the largest tiles and every mode, on both kernels.
    for divergence in (1, 2):
        for c in (1000, 32000):
            for s_dt, t_dt in ((F32, F32), (BF16, BF16), (F16, F32), (BF16, F64)):
                yield case(s_dt, t_dt, 1 << 20, c, divergence=divergence)
            for target, grad, kind in ((False, True, 0), (True, False, 0), (True, True, 1), (True, True, 2)):
                yield case(BF16, BF16, 1 << 20, c, target, grad, kind, divergence)
        for c in (4096, 8192, 128256):
            for dt in (F32, BF16):
                yield case(dt, dt, 1 << 20, c, divergence=divergence)


def ensemble_cases(torch):
    from kernels import ensemble_kd_loss as ens

    def case(dt, n, c, k, mix=0, target=True, grad=True, alpha=0.5, divergence=0):
        label = _label("ensemble", s=dt, N=n, C=c, K=k, mix="prob" if mix == 0 else "logit", target=target,
                       grad=grad, alpha=alpha, divergence=DIVERGENCES[divergence])

        def run():
            s = _meta(torch, (n, c), dt)
            t = _meta(torch, (n, k, c), dt).permute(1, 0, 2)  # [K, N, C] view of [N, K, C], as the ops pass
            w = _meta(torch, (k, 1), F32).expand(k, n)
            y = _meta_target(torch, n, target)
            # temperature 2, t2_scale: the contract's host coefficients
            kd_coef, ce_coef = (4.0 * alpha, 1.0 - alpha) if target else (4.0, 0.0)
            ens.ensemble_kd_loss_fwd(s, t, w, y, 0.5, 0.5, kd_coef, ce_coef, divergence, 0.5, -100, mix, grad)
        return label, "ensemble_kd_loss", run

    cols = (10, 100, 1000, 2048, 32000, 128256)
    for dt in (F32, BF16, F16):
        for c in cols:
            yield case(dt, 1 << 20, c, 4)
    for c in cols:
        yield case(BF16, 1 << 20, c, 1)  # K = 1 is a specialized constant
        yield case(BF16, 1, c, 4)  # one row per program
    for k in (3, 8, 32, 64):  # the chunked kernel's BLOCK_K and chunk follow K
        yield case(BF16, 1 << 20, 32000, k)
    for c in (10, 32000):  # every mode, on both kernels
        for mix in (0, 1):
            for target, alpha, grad in ((True, 0.5, True), (True, 0.5, False), (True, 0.0, True), (True, 1.0, True),
                                        (False, 0.5, True), (False, 0.5, False)):
                yield case(BF16, 1 << 20, c, 4, mix, target, grad, alpha)
    for divergence in (1, 2):  # separate specializations (the chunked body takes one more sweep)
        for c in (10, 1000, 2048, 32000):
            for mix in (0, 1):
                yield case(BF16, 1 << 20, c, 4, mix, divergence=divergence)
        for c in (10, 2048, 32000):
            yield case(F32, 1 << 20, c, 4, divergence=divergence)
        for c in (10, 32000):
            yield case(BF16, 1 << 20, c, 4, target=False, divergence=divergence)
            yield case(BF16, 1 << 20, c, 4, grad=False, divergence=divergence)


def _cover_tables(torch, k, c, width, max_count):
    """Meta cover tables of the shapes kernels/grouped_heads.py reads (values do not matter here)."""
    i64 = "int64"
    return SimpleNamespace(
        cover_index=_meta(torch, (k, width), i64), class_ptr=_meta(torch, (c + 1,), i64),
        class_entries=_meta(torch, (c * max_count,), i64), slot_of=_meta(torch, (k, c), i64),
        sizes=_meta(torch, (k,), i64), max_count=max_count, num_classes=c)


def grouped_heads_cases(torch):
    from kernels import grouped_heads as gh

    # (K heads, D features per head, C classes, classes per head, max holders of a class)
    shapes = ((3, 7, 10, 6, 3), (10, 64, 1000, 150, 2), (8, 256, 32000, 4500, 2), (16, 128, 128256, 8100, 2),
              (64, 32, 1000, 100, 64))

    def case(dt, n, shape, mode, layout):
        k, d, c, per_head, max_count = shape
        label = _label("grouped_heads", x=dt, N=n, K=k, D=d, C=c, mode=mode, layout=layout)
        width = per_head + mode  # prob_mean has the 'other' output

        def run():
            if layout == "NKD":
                f = _meta(torch, (n, k * d), dt)
            else:
                f = _meta(torch, (k, n, d), dt)
            w = _meta(torch, (k, d, width), dt)
            b = _meta(torch, (k, width), dt)
            tables = _cover_tables(torch, k, c, width, max_count)
            _, saved = gh.grouped_heads_fwd(f, w, b, tables, mode)
            g = _meta(torch, (n, c), dt)
            gh.grouped_heads_bwd(g, f, w, saved, tables, mode, True, True)
        return label, "grouped_heads", run

    for shape in shapes:
        for mode in (gh.LOGIT_MEAN, gh.PROB_MEAN):
            for dt in (F32, BF16):
                yield case(dt, 4096, shape, mode, "NKD")
    for mode in (gh.LOGIT_MEAN, gh.PROB_MEAN):
        yield case(BF16, 4096, shapes[1], mode, "KND")
        yield case(F16, 4096, shapes[1], mode, "NKD")
        yield case(BF16, 1, shapes[1], mode, "NKD")


def sparse_kd_loss_cases(torch):
    from kernels import sparse_kd_loss as sk

    def case(dt, n, c, k, target=True, grad=True, divergence=0, temperature=2.0):
        label = _label("sparse_kd_loss", s=dt, N=n, C=c, k=k, target=target, grad=grad,
                       divergence=DIVERGENCES[divergence], T=temperature)

        def run():
            s = _meta(torch, (n, c), dt)
            indices = _meta(torch, (n, k), "int64")
            log_p = _meta(torch, (n, k + 1), F32)
            y = _meta_target(torch, n, target)
            # alpha 0.5, t2_scale: the contract's host coefficients
            t2 = temperature * temperature
            kd_coef, ce_coef = (0.5 * t2, 0.5) if target else (t2, 0.0)
            sk.sparse_kd_loss_fwd(s, indices, log_p, y, 1.0 / temperature, kd_coef, ce_coef, divergence, 0.5,
                                  -100, grad)
        return label, "sparse_kd_loss", run

    # The compiled kernel follows the dtype (BLOCK by element size), C (narrow rows take a smaller BLOCK;
    # C's divisibility by 16), k (K_BLOCK; k = 1 is a specialized constant) and the flags: dtypes and C are
    # crossed, the rest varied one at a time around bf16, C = 32000, k = 64.
    for dt in (F32, BF16, F16):
        for c in (1000, 32000, 128256):
            yield case(dt, 1 << 16, c, 64)
    for k in (1, 512):
        for c in (1000, 128256):
            yield case(BF16, 1 << 16, c, k)
    for divergence in (0, 1, 2):
        if divergence:
            for dt in (F32, BF16):
                yield case(dt, 1 << 16, 32000, 64, divergence=divergence)
            yield case(BF16, 1 << 16, 32000, 512, divergence=divergence)
        for target, grad in ((False, True), (True, False), (False, False)):
            yield case(BF16, 1 << 16, 32000, 64, target, grad, divergence)
        # temperature 1: the CE shares z's softmax (no SEPARATE_CE state)
        yield case(BF16, 1 << 16, 32000, 64, divergence=divergence, temperature=1.0)
    yield case(BF16, 1, 32000, 64)  # one row


FAMILIES = {"kd_loss": kd_loss_cases, "ensemble_kd_loss": ensemble_cases, "grouped_heads": grouped_heads_cases,
            "sparse_kd_loss": sparse_kd_loss_cases}


# ---- the stand-in driver and the compile-only launch ----

def install_stand_in(triton, torch):
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.driver import CudaDriver
    from triton.runtime import driver

    class StandInDriver(CudaDriver):
        """Reports a Hopper GPU; never touches libcuda (nothing is launched)."""

        def __init__(self):  # CudaDriver's would load libcuda
            self.target = GPUTarget("cuda", TARGET_ARCH, 32)

        def get_current_target(self):
            return self.target

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("meta")

    driver.set_active(StandInDriver())
    triton.knobs.nvidia.dump_ptxas_log = True


@dataclass
class Compiled:
    kernel: str
    config: str
    regs: int = -1
    spill_stores: int = -1
    spill_loads: int = -1
    stack: int = -1
    smem: int = -1
    seconds: float = 0.0
    error: str = ""
    labels: list = field(default_factory=list)


_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _config_of(fn, compile_kwargs) -> str:
    """Readable key: constexprs, pointer dtypes, integer specializations, num_warps."""
    names = fn.arg_names
    parts = []
    for path, value in sorted(compile_kwargs["constants"].items()):
        name = names[path[0]] if isinstance(path, tuple) else str(path)
        value = getattr(value, "value", value)
        if isinstance(value, bool):
            value = int(value)
        parts.append(f"{name}={value}")
    pointee = [t[1:] for t in compile_kwargs["signature"].values() if isinstance(t, str) and t.startswith("*")]
    dtypes = sorted({t for t in pointee if not t.startswith("i")})  # float inputs and outputs
    # Integer arguments specialized as multiples of 16 (pointers are 16-byte aligned here, as on a GPU).
    signature = compile_kwargs["signature"]
    div16 = [names[path[0]] for path, attr in sorted(compile_kwargs["configs"][0].items())
             if isinstance(path, tuple) and not str(signature.get(names[path[0]], "*")).startswith("*")
             and any("divisibility" in str(a) for a in attr)]
    return (f"warps={compile_kwargs['num_warps']} " + " ".join(parts) + f"; {'/'.join(dtypes)}"
            + (f"; div16: {','.join(div16)}" if div16 else ""))


def run_dispatches(families, compile_keys=None, match=None):
    """Runs every dispatch of the families. Returns ({key: Compiled}, [dispatch errors]).

    compile_keys None: collect keys only (nothing compiled). Otherwise compile exactly those keys."""
    import torch
    import triton
    from triton.runtime.jit import JITFunction

    install_stand_in(triton, torch)
    seen: dict[str, Compiled] = {}
    current = {"key": None}

    def hook(*, key, repr, fn, compile, is_manual_warmup, already_compiled):
        skey = str(key)
        entry = seen.get(skey)
        if entry is None:
            entry = seen[skey] = Compiled(fn.name, _config_of(fn.jit_function, compile))
        entry.labels.append(current["label"])
        current["key"] = skey
        # True = skip compiling: in pass 1, for keys other workers own, and once a key is done.
        return compile_keys is None or skey not in compile_keys or entry.regs >= 0 or bool(entry.error)

    original_run = JITFunction.run

    def compile_only_run(self, *args, grid, warmup, **kwargs):
        current["key"] = None
        log = io.StringIO()
        start = time.perf_counter()
        with contextlib.redirect_stdout(log):
            kernel = original_run(self, *args, grid=grid, warmup=True, **kwargs)
        if kernel is not None and current["key"] is not None:
            entry = seen[current["key"]]
            if entry.regs < 0:
                text = log.getvalue()
                used, spill = _PTXAS_USED.search(text), _PTXAS_SPILL.search(text)
                entry.seconds = time.perf_counter() - start
                entry.regs = int(used.group(1)) if used else -1
                if spill:
                    entry.stack, entry.spill_stores, entry.spill_loads = map(int, spill.groups())
                entry.smem = int(kernel.metadata.shared)
                if not used:
                    entry.error = "no ptxas report (cached compile?)"
        return kernel

    triton.knobs.runtime.jit_cache_hook = hook
    JITFunction.run = compile_only_run
    errors = []
    try:
        for family in families:
            for label, _, thunk in FAMILIES[family](torch):
                if match and match not in label:
                    continue
                current["label"] = label
                try:
                    thunk()
                except Exception as exc:  # noqa: BLE001 - every failure is reported, none stops the run
                    message = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                    if current["key"] is not None and compile_keys is not None and current["key"] in compile_keys:
                        seen[current["key"]].error = message
                    else:
                        errors.append(f"{label}: {message}")
    finally:
        JITFunction.run = original_run
        triton.knobs.runtime.jit_cache_hook = None
    return seen, errors


def _worker(families, keys, cache_dir, match):
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    sys.path.insert(0, str(ROOT))
    seen, errors = run_dispatches(families, set(keys), match)
    return {k: v for k, v in seen.items() if k in keys}, errors


def _cost(key: str) -> int:
    """Rough compile cost, for balancing the workers (larger blocks take longer)."""
    return sum(int(x) for x in re.findall(r"\('constexpr', (\d+)\)", key)) + 1


def markdown(results: list[Compiled], n_dispatch: int, seconds: float, jobs: int) -> str:
    import triton
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "kernels"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    lines = [
        "# Triton kernels compiled for sm_90 (not yet run on a GPU)",
        "",
        f"Generated by `.ci/check_triton.py`: Triton {triton.__version__}, target "
        f"`GPUTarget('cuda', {TARGET_ARCH}, 32)`, kernels at commit {commit}{' (+ local changes)' if dirty else ''}. "
        f"{n_dispatch} dispatches of the launch code in kernels/*.py map to {len(results)} distinct compiled "
        f"kernels; compiled in {seconds:.0f} s with {jobs} worker processes on a 2-core AMD EPYC CPU (no GPU) "
        "shared with other jobs. Registers, spills and stack from ptxas -v; shared memory is Triton's "
        "(bytes per program). One row per compiled kernel; 'dispatches' counts the configurations that map "
        "to it, and one of them is shown.",
        "",
        "| kernel | config (constexprs, warps, dtypes) | regs | spill st/ld B | stack B | smem B | compile s "
        "| dispatches | e.g. |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: (r.kernel, r.config)):
        status = f"ERROR: {r.error}" if r.error else f"{r.spill_stores}/{r.spill_loads}"
        lines.append(f"| {r.kernel} | {r.config} | {r.regs} | {status} | {r.stack} | {r.smem} | {r.seconds:.1f} "
                     f"| {len(r.labels)} | {r.labels[0] if r.labels else ''} |")
    return "\n".join(lines) + "\n"


_NVCC_VERBOSE = """#!/usr/bin/env bash
# nvcc with ptxas -v on compiles; the ptxas report is appended to $PTXAS_LOG.
if [[ " $* " == *" -c "* ]]; then
  "$REAL_NVCC" "$@" -Xptxas -v 2>>"$PTXAS_LOG.$$" || { cat "$PTXAS_LOG.$$" >&2; exit 1; }
  { echo "### $(printf '%s' "${@: -1}")"; cat "$PTXAS_LOG.$$"; } >>"$PTXAS_LOG"
else
  exec "$REAL_NVCC" "$@"
fi
"""
_PTXAS_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\d+)'")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")


def cuda_table() -> tuple[str, int]:
    """Compiles csrc/*.cu via .ci/check_cuda.sh with ptxas -v; (markdown table, number of spilling kernels)."""
    real_nvcc = os.environ.get("NVCC") or shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    with tempfile.TemporaryDirectory(prefix="cuda_ptxas_") as tmp:
        wrapper, log = Path(tmp) / "nvcc", Path(tmp) / "ptxas.log"
        wrapper.write_text(_NVCC_VERBOSE)
        wrapper.chmod(0o755)
        env = dict(os.environ, NVCC=str(wrapper), REAL_NVCC=real_nvcc, PTXAS_LOG=str(log), JOBS="1",
                   PYTHON=sys.executable)
        proc = subprocess.run(["bash", ".ci/check_cuda.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f".ci/check_cuda.sh failed:\n{proc.stdout}\n{proc.stderr}")
        text = log.read_text()
    rows, spilling, source, entry = [], 0, "", None
    for line in text.splitlines():
        if line.startswith("### "):
            source = line[4:]
        elif m := _PTXAS_ENTRY.search(line):
            entry = {"name": m.group(1), "src": source}
        elif entry is not None and (m := _PTXAS_SPILL.search(line)):
            entry["stack"], entry["st"], entry["ld"] = map(int, m.groups())
        elif entry is not None and (m := _PTXAS_USED.search(line)):
            smem = _PTXAS_SMEM.search(line)
            entry["regs"], entry["smem"] = int(m.group(1)), int(smem.group(1)) if smem else 0
            rows.append(entry)
            spilling += entry.get("st", 0) > 0 or entry.get("ld", 0) > 0
            entry = None
    names = subprocess.run(["c++filt"], input="\n".join(r["name"] for r in rows), capture_output=True,
                           text=True).stdout.splitlines() if shutil.which("c++filt") else [r["name"] for r in rows]
    nvcc_version = subprocess.run([real_nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    lines = ["", "# CUDA kernels (csrc/*.cu) compiled for sm_90 (not yet run on a GPU)", "",
             f"ptxas -v through `.ci/check_cuda.sh` (its flags: -O3 --use_fast_math, sm_90; "
             f"{nvcc_version[-1] if nvcc_version else 'nvcc'}). Static shared memory only (the grouped_heads row "
             "kernels add 4 * 4 * K bytes of dynamic shared memory, or use a global scratch past 48 KB).", "",
             "| source | kernel | regs | spill st/ld B | stack B | static smem B |", "|---|---|---|---|---|---|"]
    for row, name in sorted(zip(rows, names), key=lambda x: (x[0]["src"], x[1])):
        short = re.sub(r"\(.*\)$", "", name.replace("ued_fast::", "").replace("(anonymous namespace)::", ""))
        lines.append(f"| {row['src']} | `{short}` | {row['regs']} | {row.get('st', 0)}/{row.get('ld', 0)} | "
                     f"{row.get('stack', 0)} | {row['smem']} |")
    return "\n".join(lines) + "\n", spilling


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--only", choices=sorted(FAMILIES), action="append")
    parser.add_argument("--match", help="only the dispatches whose label contains this text (development)")
    parser.add_argument("--markdown", type=Path, help="write the table to this file too")
    parser.add_argument("--cuda-table", action="store_true", help="append the CUDA kernels' ptxas table")
    args = parser.parse_args()
    families = args.only or list(FAMILIES)
    sys.path.insert(0, str(ROOT))
    os.environ.pop("TRITON_INTERPRET", None)
    start = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="check_triton_") as cache_dir:  # fresh: every compile is real
        os.environ["TRITON_CACHE_DIR"] = cache_dir
        collected, errors = run_dispatches(families, None, args.match)
        n_dispatch = sum(len(c.labels) for c in collected.values())
        keys = sorted(collected, key=_cost, reverse=True)
        shards = [keys[i::args.jobs] for i in range(args.jobs)]
        print(f"check_triton: {n_dispatch} dispatches -> {len(keys)} distinct kernels; compiling for sm_{TARGET_ARCH} "
              f"with {args.jobs} processes", flush=True)
        results: dict[str, Compiled] = {}
        if args.jobs == 1:
            done, _ = _worker(families, shards[0], cache_dir, args.match)  # dispatch errors: pass 1 has them
            results.update(done)
        else:
            import multiprocessing
            with concurrent.futures.ProcessPoolExecutor(
                    args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = [pool.submit(_worker, families, shard, cache_dir, args.match) for shard in shards if shard]
                for fut in futures:
                    done, _ = fut.result()
                    results.update(done)
    seconds = time.perf_counter() - start
    for key, entry in collected.items():  # labels come from the full pass
        if key in results:
            results[key].labels = entry.labels
        else:
            results[key] = entry
            entry.error = entry.error or "not compiled"

    table = markdown(list(results.values()), n_dispatch, seconds, args.jobs)
    cuda_spilling = 0
    if args.cuda_table:
        cuda_md, cuda_spilling = cuda_table()
        table += cuda_md
    print(table)
    if args.markdown:
        args.markdown.write_text(table)
    bad = [r for r in results.values() if r.error or r.regs < 0]
    spills = [r for r in results.values() if not r.error and (r.spill_stores > 0 or r.spill_loads > 0)]
    for message in errors:
        print(f"check_triton: DISPATCH ERROR {message}")
    for r in bad:
        print(f"check_triton: COMPILE ERROR {r.kernel} [{r.config}] ({r.labels[0] if r.labels else ''}): {r.error}")
    for r in spills:
        print(f"check_triton: SPILL {r.kernel} [{r.config}]: {r.spill_stores} B stores / {r.spill_loads} B loads "
              f"({r.labels[0]})")
    print(f"check_triton: {len(results)} kernels, {len(bad)} compile errors, {len(errors)} dispatch errors, "
          f"{len(spills)} spilling; {seconds:.0f} s")
    if cuda_spilling:
        print(f"check_triton: {cuda_spilling} CUDA kernels spill (see the CUDA table)")
    return 1 if bad or errors or spills or cuda_spilling else 0


if __name__ == "__main__":
    sys.exit(main())
