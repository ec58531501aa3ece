"""GPU benchmark of the ued_fast ops (DESIGN section 4).

On a CUDA machine:  python bench/gpu_bench.py [--out bench/results] [--sections kd,divergences,ensemble,heads,sparse]
On a CPU (a check of the script itself, tiny shapes, wall-clock timer):  python bench/gpu_bench.py --dry-run

Measures, in one run: the device-to-device copy bandwidth (the ceiling); kd_loss forward+backward
for ours ('cuda', 'triton'), the eager reference, torch.compile(reference) and Liger-Kernel's
LigerKLDIVLoss fed by torch.log_softmax; kd_loss with reverse KL and JSD; ensemble_kd_loss and
grouped_heads through the public API; sparse_kd_loss (a top-k teacher) against its reference.
Each case: median time, GB/s over the byte floor, % of the copy bandwidth, peak memory above the
inputs, and the error against the eager fp32 reference (a fast wrong kernel is not a result).
Writes gpu_bench.json (environment + raw timings), gpu_bench.md and gpu_bench.png to --out.
A missing backend or package is recorded in the results with the reason, never fatal.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import ued_fast  # noqa: E402
from ued_fast.reference import (  # noqa: E402
    ensemble_kd_loss_reference, grouped_heads_reference, kd_loss_reference,
)

KD_SHAPES = [(512, 10), (512, 100), (4096, 1000), (8192, 32000), (8192, 128256)]
KD_DTYPES = ["bfloat16", "float32"]
ENSEMBLE_KS = [2, 5, 8]
ENSEMBLE_SHAPES = [(4096, 1000), (8192, 32000)]
HEADS_CASES = [(512, 5, d, c) for d in (64, 256) for c in (10, 100)]  # (N, K, D, C)
HEAD_MODES = ["logit_mean", "prob_mean"]

DIVERGENCE_SHAPES = [(4096, 1000), (8192, 32000)]
SPARSE_CASES = [(8192, 32000, 64), (4096, 128256, 64)]  # (N, C, k)

DRY_KD_SHAPES = [(8, 10), (16, 1000)]
DRY_DIVERGENCE_SHAPES = [(16, 1000)]
DRY_SPARSE_CASES = [(16, 1000, 8)]
DRY_ENSEMBLE_SHAPES = [(8, 100)]
DRY_HEADS_CASES = [(16, 5, 8, 10)]

KD_KW = dict(temperature=4.0, alpha=0.9)
# The sections of the report, in order (the names results rows carry).
REPORT_SECTIONS = ("kd_loss", "divergences", "ensemble_kd_loss", "grouped_heads", "sparse_teacher")


# ----------------------------------------------------------------------------------------------
# environment
def _run(cmd: list[str]) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=REPO).stdout.strip() or None
    except Exception:
        return None


def environment(device: torch.device) -> dict:
    env = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "commit": os.environ.get("UED_FAST_COMMIT") or _run(["git", "rev-parse", "HEAD"]) or "unknown",
        "git_dirty": bool(_run(["git", "status", "--porcelain", "--untracked-files=no"])),
        "ued_fast_backends": ued_fast.available_backends(device),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            device=torch.cuda.get_device_name(device),
            sm_count=props.multi_processor_count,
            capability=f"{props.major}.{props.minor}",
            total_memory_gib=round(props.total_memory / 2**30, 1),
            l2_cache_mib=round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
            driver=_run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
            nvcc=(_run(["nvcc", "--version"]) or "").splitlines()[-1:] or None,
            clocks=_run(["nvidia-smi", "--query-gpu=clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu",
                         "--format=csv"]),
        )
    else:
        env.update(device=f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
                   driver=None)
    try:
        import liger_kernel  # noqa: F401
        from importlib.metadata import version

        env["liger_kernel"] = version("liger-kernel")
    except Exception as exc:  # noqa: BLE001
        env["liger_kernel"] = f"missing ({type(exc).__name__})"
    return env


# ----------------------------------------------------------------------------------------------
# timing
class Timer:
    """Median milliseconds of fn(): triton.testing.do_bench on CUDA, CUDA events if Triton is
    missing, a wall clock on the CPU (dry run)."""

    def __init__(self, device: torch.device, dry_run: bool, warmup_ms: int = 25, rep_ms: int = 100):
        self.device, self.dry_run, self.warmup_ms, self.rep_ms = device, dry_run, warmup_ms, rep_ms
        self.last_samples: dict | None = None  # the spread of the last measurement, for the JSON

    def __call__(self, fn) -> float:
        times = self._samples(fn)
        t = sorted(times)
        q = lambda f: t[min(len(t) - 1, int(f * len(t)))]  # noqa: E731
        self.last_samples = {"n": len(t), "min": t[0], "p10": q(0.1), "p50": q(0.5), "p90": q(0.9), "max": t[-1]}
        return q(0.5)

    def _samples(self, fn) -> list[float]:
        if self.device.type != "cuda":
            fn()
            times = []
            for _ in range(3 if self.dry_run else 10):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            return times
        try:
            from triton.testing import do_bench
        except ImportError:
            return self._events(fn)
        try:
            return [float(x) for x in do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="all")]
        except (TypeError, ValueError):  # an older Triton without return_mode="all"
            return [float(do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="median"))]

    def _events(self, fn) -> float:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(50):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return times


def peak_memory(fn, device: torch.device) -> int | None:
    """Bytes allocated at the peak of one fn() call above what was allocated before it."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated(device) - base)


def copy_bandwidth(device: torch.device, timer: Timer, dry_run: bool) -> dict:
    """Device-to-device copy of a large buffer: bytes read + bytes written over the median time."""
    nbytes = (4 << 20) if dry_run else (2 << 30)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    gbps = 2 * nbytes / (ms * 1e-3) / 1e9
    del src, dst
    return {"bytes": nbytes, "ms": ms, "gbps": gbps, "samples_ms": timer.last_samples}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    if not torch.isfinite(x).all():
        return math.inf
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


def empty_cache(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# benchmark bookkeeping
class Results:
    def __init__(self, out: Path, env: dict, args: argparse.Namespace, deadline: float):
        self.out, self.env, self.rows, self.deadline = out, env, [], deadline
        self.copy = None
        self.args = vars(args)

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline

    def add(self, **row):
        self.rows.append(row)
        status = row.get("status", "ok")
        if status == "ok":
            msg = (f"{row['ms']:9.4f} ms  {row.get('gbps') or 0:8.1f} GB/s  {row.get('pct_copy') or 0:5.1f}% copy"
                   f"  err {row.get('err', float('nan')):.1e}")
        else:
            msg = status
        print(f"[{row['section']}] {row['case']:<34} {row['impl']:<14} {msg}", flush=True)

    def save(self):
        self.out.mkdir(parents=True, exist_ok=True)
        data = {"environment": self.env, "copy_bandwidth": self.copy, "args": self.args, "results": self.rows}
        (self.out / "gpu_bench.json").write_text(json.dumps(data, indent=1, default=str))
        (self.out / "gpu_bench.md").write_text(markdown(data))


def measure(res: Results, timer: Timer, device, *, section: str, case: str, impl: str, fn, floor_bytes: int | None,
            check=None, extra: dict | None = None):
    """Time fn (forward+backward); record ms, GB/s over the floor, % of copy, peak memory, error."""
    row = dict(section=section, case=case, impl=impl, floor_bytes=floor_bytes, **(extra or {}))
    if res.out_of_time():
        res.add(**row, status="skipped: time budget spent")
        return
    try:
        if check is not None:
            row["err"] = check()
        mem = peak_memory(fn, device)
        ms = timer(fn)
        row.update(ms=ms, samples_ms=timer.last_samples, peak_mem_bytes=mem, status="ok")
        if floor_bytes:
            row["gbps"] = floor_bytes / (ms * 1e-3) / 1e9
            if res.copy:
                row["pct_copy"] = 100.0 * row["gbps"] / res.copy["gbps"]
    except NotImplementedError as exc:
        row["status"] = f"missing: {exc}"
    except torch.cuda.OutOfMemoryError:
        row["status"] = "out of memory"
    except Exception as exc:  # noqa: BLE001 - any failure is a result to record, not a crash
        row["status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        if os.environ.get("UED_FAST_BENCH_TRACEBACK"):
            traceback.print_exc()
    empty_cache(device)
    res.add(**row)


def backend_status(backend: str, device) -> str | None:
    """None if `backend` can run on `device` here, else why not."""
    avail = ued_fast.available_backends(device)
    return None if backend in avail else f"missing: backend {backend!r} not available on {device.type} here ({avail})"


def compile_fn(fn):
    try:
        import torch._dynamo as dynamo

        for name in ("cache_size_limit", "recompile_limit"):  # one entry per shape and dtype
            if hasattr(dynamo.config, name):
                setattr(dynamo.config, name, 256)
    except Exception:  # noqa: BLE001
        pass
    return torch.compile(fn, dynamic=False)


def grad_of(loss_fn, x):
    """Forward + backward as training runs it; returns d loss / d x (no .grad accumulation)."""
    def run():
        loss = loss_fn()
        (g,) = torch.autograd.grad(loss, x)
        return loss, g
    return run


# ----------------------------------------------------------------------------------------------
# shared by the KD sections
def liger_kd_loss_factory():
    from liger_kernel.transformers.kl_div import LigerKLDIVLoss

    kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)

    def liger_kd(student, teacher, target, temperature, alpha):
        # The same loss as ours: alpha*T^2*KL(p || q) + (1-alpha)*CE, KL by Liger, log_softmax by PyTorch.
        log_q = F.log_softmax(student / temperature, dim=-1, dtype=torch.float32)
        log_p = F.log_softmax(teacher / temperature, dim=-1, dtype=torch.float32)
        loss = alpha * temperature**2 * kl(log_q, log_p)
        return loss + (1 - alpha) * F.cross_entropy(student, target)

    return liger_kd


def kernel_only(backend, student, teacher, target):
    """(timed fn, error check) for the forward kernel alone: loss rows + gradient in one launch."""
    from ued_fast.ops import _spine

    coefficients = _spine.kd_coefficients(KD_KW["temperature"], KD_KW["alpha"], True, target is not None)

    def run():
        return _spine.native_forward("kd_loss", backend, student.detach(), teacher, target, *coefficients,
                                     -100, 0, True)

    def scaled():  # the op's batchmean scaling (no ignored rows here), for the check only
        rows, grad = run()
        return rows.sum() / student.shape[0], grad / student.shape[0]
    return run, scaled


def kd_inputs(device, n: int, c: int, dtype, seed: int, k: int | None = None):
    """(student [N, C] requiring grad, teacher [N, C] or teachers [K, N, C], target [N]), logits of scale 3."""
    gen = torch.Generator(device=device).manual_seed(seed)
    student = (torch.randn(n, c, device=device, generator=gen) * 3).to(dtype).requires_grad_(True)
    teacher = (torch.randn((n, c) if k is None else (k, n, c), device=device, generator=gen) * 3).to(dtype)
    return student, teacher, torch.randint(0, c, (n,), device=device, generator=gen)


def start_case(res: Results, section: str, case: str, make_inputs):
    """The case's inputs, or None (recorded as skipped) when the time budget is spent or they do not fit."""
    if res.out_of_time():
        res.add(section=section, case=case, impl="*", status="skipped: time budget spent")
        return None
    try:
        return make_inputs()
    except torch.cuda.OutOfMemoryError:
        res.add(section=section, case=case, impl="*", status="out of memory (inputs)")
        return None


def ours(device, dry_run: bool, loss_of, student) -> dict:
    """{'ours-<backend>': (why not, run)} for the GPU backends (and 'cpp' in a dry run on the CPU)."""
    backends = ("cuda", "triton") if not dry_run else ("cuda", "triton", "cpp")
    return {f"ours-{b}": (backend_status(b, device), grad_of(lambda b=b: loss_of(b), student)) for b in backends}


def run_cases(res: Results, timer: Timer, device, section: str, case: str, impls: dict, ref_run, floor: int, extra):
    """Measure every impl of one case against the eager reference's loss and gradient. An impl is
    (why it cannot run or None, run) or (why, run, what to check instead of run)."""
    ref_loss, ref_grad = (x.detach().float() for x in ref_run())

    def check_of(run):
        def check():
            loss, g = run()
            return max(rel_err(loss.detach(), ref_loss), rel_err(g, ref_grad))
        return check

    for impl, (why, run, *check_with) in impls.items():
        if why:
            res.add(section=section, case=case, impl=impl, status=why)
            continue
        measure(res, timer, device, section=section, case=case, impl=impl, fn=run, floor_bytes=floor,
                check=check_of(check_with[0] if check_with else run), extra=extra)
    empty_cache(device)
    res.save()


# ----------------------------------------------------------------------------------------------
# kd_loss: ours, the kernel alone, eager and compiled reference, Liger-Kernel
def bench_kd(res: Results, timer: Timer, device, dry_run: bool):
    compiled_ref = compile_fn(kd_loss_reference)
    try:
        liger, liger_missing = liger_kd_loss_factory(), None
    except Exception as exc:  # noqa: BLE001
        liger, liger_missing = None, f"missing: liger_kernel not importable ({type(exc).__name__}: {exc})"
    T, a = KD_KW["temperature"], KD_KW["alpha"]
    for n, c in DRY_KD_SHAPES if dry_run else KD_SHAPES:
        for dtype_name in KD_DTYPES:
            dtype = getattr(torch, dtype_name)
            case = f"[{n},{c}] {dtype_name}"
            inputs = start_case(res, "kd_loss", case, lambda: kd_inputs(device, n, c, dtype, seed=n * 7 + c))
            if inputs is None:
                continue
            student, teacher, target = inputs
            impls = ours(device, dry_run, lambda b: ued_fast.kd_loss(*inputs, backend=b, **KD_KW), student)
            for backend in ("cuda", "triton") if not dry_run else ("cuda", "triton", "cpp"):
                # The kernel alone (forward with the gradient, no op layer, no backward multiply): how
                # close the kernel is to the floor, apart from what the autograd contract adds.
                impls[f"kernel-{backend}"] = (backend_status(backend, device),
                                              *kernel_only(backend, student, teacher, target))
            impls["eager"] = (None, grad_of(lambda: kd_loss_reference(*inputs, **KD_KW), student))
            impls["compiled"] = (None, grad_of(lambda: compiled_ref(*inputs, **KD_KW), student))
            impls["liger"] = (liger_missing, None if liger is None else grad_of(
                lambda: liger(student, teacher, target, T, a), student))
            esize = torch.finfo(dtype).bits // 8  # floor: read s, read t, write grad
            run_cases(res, timer, device, "kd_loss", case, impls, impls["eager"][1], n * c * 3 * esize,
                      dict(n=n, c=c, dtype=dtype_name))
            del student, teacher, target, inputs, impls


# ----------------------------------------------------------------------------------------------
# kd_loss with the other divergences (reverse KL, JSD), bfloat16
def bench_divergences(res: Results, timer: Timer, device, dry_run: bool):
    compiled_ref = compile_fn(kd_loss_reference)
    for n, c in DRY_DIVERGENCE_SHAPES if dry_run else DIVERGENCE_SHAPES:
        for divergence in ("reverse_kl", "jsd"):
            case = f"{divergence} [{n},{c}] bfloat16"
            inputs = start_case(res, "divergences", case, lambda: kd_inputs(device, n, c, torch.bfloat16, n + c))
            if inputs is None:
                continue
            student = inputs[0]
            kw = dict(KD_KW, divergence=divergence)
            impls = ours(device, dry_run, lambda b: ued_fast.kd_loss(*inputs, backend=b, **kw), student)
            impls["eager"] = (None, grad_of(lambda: kd_loss_reference(*inputs, **kw), student))
            impls["compiled"] = (None, grad_of(lambda: compiled_ref(*inputs, **kw), student))
            run_cases(res, timer, device, "divergences", case, impls, impls["eager"][1], n * c * 6,
                      dict(n=n, c=c, divergence=divergence))
            del student, inputs, impls


# ----------------------------------------------------------------------------------------------
# a sparse (top-k) teacher: no dense teacher tensor
def bench_sparse(res: Results, timer: Timer, device, dry_run: bool):
    from ued_fast.ops.sparse_kd_loss import sparse_kd_loss, sparse_kd_loss_reference

    compiled_ref = compile_fn(sparse_kd_loss_reference)
    for n, c, k in DRY_SPARSE_CASES if dry_run else SPARSE_CASES:
        case = f"[{n},{c}] k={k} bfloat16"
        inputs = start_case(res, "sparse_teacher", case, lambda: kd_inputs(device, n, c, torch.bfloat16, n + c + k))
        if inputs is None:
            continue
        student, teacher, target = inputs
        values, indices = torch.log_softmax(teacher.float(), dim=-1).topk(k, dim=-1)
        args = (student, indices, values, target)
        del teacher, inputs
        impls = ours(device, dry_run, lambda b: sparse_kd_loss(*args, backend=b, **KD_KW), student)
        impls["eager"] = (None, grad_of(lambda: sparse_kd_loss_reference(*args, **KD_KW), student))
        impls["compiled"] = (None, grad_of(lambda: compiled_ref(*args, **KD_KW), student))
        # Floor: read the student, write its gradient, read the top-k pairs.
        run_cases(res, timer, device, "sparse_teacher", case, impls, impls["eager"][1], n * c * 4 + n * k * 12,
                  dict(n=n, c=c, k=k))
        del student, target, values, indices, args, impls


# ----------------------------------------------------------------------------------------------
# ensemble_kd_loss
def bench_ensemble(res: Results, timer: Timer, device, dry_run: bool):
    compiled_ref = compile_fn(ensemble_kd_loss_reference)
    for n, c in DRY_ENSEMBLE_SHAPES if dry_run else ENSEMBLE_SHAPES:
        for k in ENSEMBLE_KS:
            case = f"K={k} [{n},{c}] bfloat16"
            inputs = start_case(res, "ensemble_kd_loss", case,
                                lambda: kd_inputs(device, n, c, torch.bfloat16, n + 31 * c + k, k=k))
            if inputs is None:
                continue
            student, teachers, target = inputs
            impls = ours(device, dry_run, lambda b: ued_fast.ensemble_kd_loss(*inputs, backend=b, **KD_KW), student)
            impls["eager"] = (None, grad_of(
                lambda: ensemble_kd_loss_reference(student, teachers, None, target, **KD_KW), student))
            impls["compiled"] = (None, grad_of(
                lambda: compiled_ref(student, teachers, None, target, **KD_KW), student))
            run_cases(res, timer, device, "ensemble_kd_loss", case, impls, impls["eager"][1], n * c * (2 + k * 2 + 2),
                      dict(n=n, c=c, k=k, dtype="bfloat16"))
            del student, teachers, target, inputs, impls


# ----------------------------------------------------------------------------------------------
# grouped_heads
def make_cover(k: int, c: int) -> list[list[int]]:
    """K heads over C classes: classes split into K groups; head k covers groups k and k+1 (mod K),
    so every class has two covering heads (a USTE-like overlapping cover)."""
    groups = [list(range(c))[i::k] for i in range(k)]
    return [sorted(groups[i] + groups[(i + 1) % k]) for i in range(k)]


def dense_head_matrix(weight, bias, cover, c: int):
    """The block-structured [K*D, C] matrix and [C] bias equal to logit_mean (for the cuBLAS baseline)."""
    k, d, _ = weight.shape
    counts = torch.zeros(c, device=weight.device)
    for s in cover:
        counts[s] += 1
    m = torch.zeros(k * d, c, device=weight.device, dtype=weight.dtype)
    b = torch.zeros(c, device=weight.device, dtype=torch.float32)
    for i, s in enumerate(cover):
        idx = torch.as_tensor(s, device=weight.device)
        m[i * d:(i + 1) * d, idx] = (weight[i, :, : len(s)].float() / counts[idx]).to(weight.dtype)
        b[idx] += bias[i, : len(s)].float() / counts[idx]
    return m, b.to(weight.dtype)


def bench_heads(res: Results, timer: Timer, device, dry_run: bool):
    cases = DRY_HEADS_CASES if dry_run else HEADS_CASES
    dtype = torch.float32
    compiled_ref = compile_fn(grouped_heads_reference)
    for n, k, d, c in cases:
        cover = make_cover(k, c)
        smax = max(len(s) for s in cover)
        for mode in HEAD_MODES:
            case = f"{mode} N={n} K={k} D={d} C={c}"
            if res.out_of_time():
                res.add(section="grouped_heads", case=case, impl="*", status="skipped: time budget spent")
                continue
            w_out = smax + (1 if mode == "prob_mean" else 0)
            gen = torch.Generator(device=device).manual_seed(n + d + c + w_out)
            feats = torch.randn(n, k * d, device=device, generator=gen, dtype=dtype).requires_grad_(True)
            weight = (torch.randn(k, d, w_out, device=device, generator=gen, dtype=dtype) / d**0.5).requires_grad_(True)
            bias = torch.randn(k, w_out, device=device, generator=gen, dtype=dtype).requires_grad_(True)
            grad_out = torch.randn(n, c, device=device, generator=gen, dtype=dtype)
            params = (feats, weight, bias)
            esize = 4
            # floor: read features, weight, bias, grad_out; write out, d features, d weight, d bias
            floor = esize * (2 * n * k * d + 2 * weight.numel() + 2 * bias.numel() + 2 * n * c)

            def fwd_bwd(f):
                def run():
                    out = f()
                    grads = torch.autograd.grad(out, params, grad_out)
                    return out, grads
                return run

            ref_out, ref_grads = fwd_bwd(lambda: grouped_heads_reference(feats, weight, bias, cover, mode=mode))()

            def checker(run):
                def check():
                    out, grads = run()
                    errs = [rel_err(out.detach(), ref_out.detach())] + [rel_err(g, r) for g, r in zip(grads, ref_grads)]
                    return max(errs)
                return check

            impls = {}
            for backend in ("cuda", "triton") if not dry_run else ("cuda", "triton", "cpp"):
                impls[f"ours-{backend}"] = (backend_status(backend, device), fwd_bwd(
                    lambda b=backend: ued_fast.grouped_heads(feats, weight, bias, cover, mode=mode, backend=b)))
            impls["eager"] = (None, fwd_bwd(lambda: grouped_heads_reference(feats, weight, bias, cover, mode=mode)))
            impls["compiled"] = (None, fwd_bwd(lambda: compiled_ref(feats, weight, bias, cover, mode=mode)))
            for impl, (why, run) in impls.items():
                if why:
                    res.add(section="grouped_heads", case=case, impl=impl, status=why)
                    continue
                measure(res, timer, device, section="grouped_heads", case=case, impl=impl, fn=run,
                        floor_bytes=floor, check=checker(run), extra=dict(n=n, k=k, d=d, c=c, mode=mode))
            if mode == "logit_mean":
                # Baseline: one addmm on the block-structured matrix (forward + backward to features and matrix).
                m, b = dense_head_matrix(weight.detach(), bias.detach(), cover, c)
                m.requires_grad_(True)
                b.requires_grad_(True)

                def addmm_run():
                    out = torch.addmm(b, feats, m)
                    return out, torch.autograd.grad(out, (feats, m, b), grad_out)

                def addmm_check():
                    out, _ = addmm_run()
                    return rel_err(out.detach(), ref_out.detach())

                measure(res, timer, device, section="grouped_heads", case=case, impl="cublas-addmm", fn=addmm_run,
                        floor_bytes=floor, check=addmm_check, extra=dict(n=n, k=k, d=d, c=c, mode=mode))
            res.save()


# ----------------------------------------------------------------------------------------------
# reports
def markdown(data: dict) -> str:
    env = data["environment"]
    lines = [
        "# ued_fast GPU benchmark",
        "",
        f"- device: {env.get('device')}; driver {env.get('driver')}; CUDA runtime {env.get('cuda_runtime')}",
        f"- torch {env.get('torch')}, Triton {env.get('triton')}, Liger-Kernel {env.get('liger_kernel')}, "
        f"Python {env.get('python')}",
        f"- commit {env.get('commit')}{' (dirty)' if env.get('git_dirty') else ''}; {env.get('date_utc')}",
    ]
    if data.get("copy_bandwidth"):
        cb = data["copy_bandwidth"]
        lines.append(f"- device-to-device copy: {cb['gbps']:.0f} GB/s (read+write of {cb['bytes'] / 2**30:.2f} GiB "
                     f"in {cb['ms']:.3f} ms)")
    if data.get("args", {}).get("dry_run"):
        lines.append("- DRY RUN on the CPU: tiny shapes and a wall clock; the numbers mean nothing")
    lines += ["", "Times are the median of forward+backward; GB/s is the op's byte floor over that time; "
              "err is the relative L2 error of loss and gradients against the eager fp32 reference.", ""]
    for section in REPORT_SECTIONS:
        rows = [r for r in data["results"] if r["section"] == section]
        if not rows:
            continue
        lines += [f"## {section}", "", "| case | impl | ms | GB/s | % copy | x eager | peak MiB | err | status |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---|"]
        eager = {r["case"]: r["ms"] for r in rows if r["impl"] == "eager" and r.get("status") == "ok"}
        for r in rows:
            ok = r.get("status") == "ok"
            speed = eager.get(r["case"], math.nan) / r["ms"] if ok else math.nan

            def f(v, fmt):
                return format(v, fmt) if isinstance(v, (int, float)) and math.isfinite(v) else ""

            mem = r.get("peak_mem_bytes")
            lines.append(
                f"| {r['case']} | {r['impl']} | {f(r.get('ms'), '.4f')} | {f(r.get('gbps'), '.0f')} | "
                f"{f(r.get('pct_copy'), '.1f')} | {f(speed, '.2f')} | {f(mem / 2**20 if mem is not None else None, '.1f')} | "
                f"{f(r.get('err'), '.1e')} | {'' if ok else r.get('status', '')} |")
        lines.append("")
    return "\n".join(lines)


def chart(data: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sections = [s for s in REPORT_SECTIONS
                if any(r["section"] == s and r.get("status") == "ok" for r in data["results"])]
    if not sections:
        return
    fig, axes = plt.subplots(len(sections), 1, figsize=(13, 4.2 * len(sections)), squeeze=False)
    for ax, section in zip(axes[:, 0], sections):
        rows = [r for r in data["results"] if r["section"] == section and r.get("status") == "ok"]
        cases = list(dict.fromkeys(r["case"] for r in rows))
        impls = list(dict.fromkeys(r["impl"] for r in rows))
        width = 0.8 / max(len(impls), 1)
        use_bw = section != "grouped_heads"  # heads are launch/latency bound: plot speed-up vs eager instead
        eager = {r["case"]: r["ms"] for r in rows if r["impl"] == "eager"}
        for i, impl in enumerate(impls):
            vals = []
            for case in cases:
                r = next((r for r in rows if r["case"] == case and r["impl"] == impl), None)
                if r is None:
                    vals.append(0)
                elif use_bw:
                    vals.append(r.get("gbps") or 0)
                else:
                    vals.append(eager.get(case, math.nan) / r["ms"])
            ax.bar([j + i * width for j in range(len(cases))], vals, width, label=impl)
        if use_bw and data.get("copy_bandwidth"):
            ax.axhline(data["copy_bandwidth"]["gbps"], color="k", ls="--", lw=1, label="copy bandwidth")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
        ax.set_xticklabels(cases, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("GB/s over byte floor" if use_bw else "speed-up vs eager")
        ax.set_title(f"{section} forward+backward")
        ax.legend(fontsize=7, ncol=3)
    env = data["environment"]
    fig.suptitle(f"ued_fast on {env.get('device')} (torch {env.get('torch')}, Triton {env.get('triton')}, "
                 f"commit {str(env.get('commit'))[:10]})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
SECTIONS = {"kd": bench_kd, "divergences": bench_divergences, "ensemble": bench_ensemble, "heads": bench_heads,
            "sparse": bench_sparse}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default bench/results; with --dry-run a temp folder)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, wall-clock timer")
    parser.add_argument("--time-budget", type=float, default=float(os.environ.get("UED_FAST_BENCH_BUDGET", 1e9)),
                        help="seconds; cases after it are recorded as skipped (keeps a device call in its limit)")
    parser.add_argument("--warmup-ms", type=int, default=25)
    parser.add_argument("--rep-ms", type=int, default=100)
    args = parser.parse_args(argv)

    if args.dry_run:
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            print("gpu_bench: no CUDA device (use --dry-run to check the script on a CPU)", file=sys.stderr)
            return 2
        device = torch.device("cuda")
    # A dry run writes outside the tree by default: its numbers are no results.
    out = args.out or (Path(tempfile.gettempdir()) / "ued_fast_gpu_bench_dry_run" if args.dry_run
                       else REPO / "bench" / "results")
    if args.dry_run:
        torch.set_num_threads(1)  # the CPU is shared; one thread keeps the wall clock steadier
    deadline = time.monotonic() + args.time_budget
    env = environment(device)
    print(json.dumps(env, indent=1, default=str), flush=True)
    res = Results(out, env, args, deadline)
    timer = Timer(device, args.dry_run, args.warmup_ms, args.rep_ms)
    res.copy = copy_bandwidth(device, timer, args.dry_run)
    print(f"copy bandwidth: {res.copy['gbps']:.1f} GB/s", flush=True)
    res.save()
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    unknown = sections - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections: {sorted(unknown)}")
    for name, fn in SECTIONS.items():
        if name in sections:
            try:
                fn(res, timer, device, args.dry_run)
            except Exception as exc:  # noqa: BLE001 - keep what was measured
                traceback.print_exc()
                res.add(section=name, case="*", impl="*", status=f"section failed: {type(exc).__name__}: {exc}")
            res.save()
    res.save()
    try:
        chart({"environment": env, "copy_bandwidth": res.copy, "results": res.rows}, out / "gpu_bench.png")
    except Exception as exc:  # noqa: BLE001
        print(f"gpu_bench: chart failed: {exc}", file=sys.stderr)
    print()
    print((out / "gpu_bench.md").read_text())
    print(f"gpu_bench: wrote {out}/gpu_bench.json, gpu_bench.md, gpu_bench.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
