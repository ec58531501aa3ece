"""CPU benchmark of fused_linear_kd_loss: time and measured peak memory of one forward+backward.

Distillation at LM-head scale: student hidden [N, H] and head [V, H] (both trained), teacher hidden
[N, H] and head [V, H] (frozen), targets with ~10% padding (ignore_index), T=1, alpha=0.5, batchmean.
Methods:
  fused     ued_fast.fused_linear_kd_loss (C++ row kernel per chunk, automatic chunk size)
  eager     materialize both [N, V] logits, ued_fast.reference.kd_loss_reference, autograd
  compiled  torch.compile of `eager` (inductor, CPU)
  liger     Liger-Kernel's chunked LigerFusedLinearJSDLoss with beta=0 (forward KL(teacher || student),
            the same loss at T=1: 0.5 * CE + 0.5 * KL over non-ignored rows), its torch.compile'd chunk
            step and its default chunk_size=1024, on CPU tensors

With a sparse teacher (`--methods sparse-fused,sparse-eager,sparse-compiled --out
bench/results/cpu_fused_linear_sparse`): the teacher is stored as the top-K_SPARSE log-probs of its logits
(made once with the inputs, as offline distillation stores them), 'zero' convention, forward KL.
  sparse-fused     ued_fast.fused_linear_sparse_kd_loss (the C++ sparse row kernel per chunk)
  sparse-eager     materialize the student's [N, V] logits, sparse_kd_loss_reference, autograd
  sparse-compiled  torch.compile of `sparse-eager`

Memory: each (case, method) runs in a fresh subprocess: inputs are made, one warm-up step runs
(compilation happens there), the peak-RSS counter is reset (/proc/self/clear_refs), one step runs, and
the peak RSS minus the RSS before that step is the memory the step needed (inputs excluded; the
gradients of hidden and weight included, for every method alike).
Time: one more subprocess per case builds every method on the same inputs, warms each up, then runs
`--reps` rounds that alternate the methods, so that a change of the machine's load hits all of them
alike; the median per method is reported.

    PYTHONPATH=. python bench/bench_cpu_fused_linear_kd_loss.py            # writes bench/results/cpu_fused_linear_kd_loss.{md,json}
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("fused", "eager", "compiled", "liger")
SPARSE_METHODS = ("sparse-fused", "sparse-eager", "sparse-compiled")
K_SPARSE = 64
# (N, H, V): the 128k-vocabulary case is sized down to N=1024 rows so that every process, eager
# included, stays under ~6 GiB on the shared 24 GiB build machine.
CASES = ((4096, 1024, 32000), (1024, 1024, 128256))
MIB = 2**20


# ------------------------------------------------------------------------------------------------
# Worker: one (case, method) in this process
# ------------------------------------------------------------------------------------------------

def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _inputs(n, h, v):
    import torch

    gen = torch.Generator().manual_seed(0)
    hidden = (torch.randn(n, h, generator=gen)).requires_grad_()
    weight = (torch.randn(v, h, generator=gen) * h ** -0.5).requires_grad_()
    t_hidden = torch.randn(n, h, generator=gen)
    t_weight = torch.randn(v, h, generator=gen) * 2 * h ** -0.5
    target = torch.randint(0, v, (n,), generator=gen)
    target[torch.rand(n, generator=gen) < 0.1] = -100
    return hidden, weight, t_hidden, t_weight, target


def _sparse_teacher(t_hidden, t_weight):
    """The teacher's top-K_SPARSE (log-probs, indices), made row block by row block."""
    import torch

    with torch.no_grad():
        parts = [torch.log_softmax(t @ t_weight.T, -1).topk(K_SPARSE, dim=-1) for t in t_hidden.split(256)]
    return torch.cat([p.values for p in parts]), torch.cat([p.indices for p in parts])


def _make_step(method, inputs):
    import torch

    import ued_fast

    hidden, weight, t_hidden, t_weight, target = inputs
    params = (hidden, weight)

    if method.startswith("sparse-"):
        values, indices = _sparse_teacher(t_hidden, t_weight)
        if method == "sparse-fused":
            def loss_fn():
                return ued_fast.fused_linear_sparse_kd_loss(hidden, weight, indices, values, target, temperature=1.0,
                                                            alpha=0.5)
        else:
            def eager(hidden, weight, indices, values, target):
                return ued_fast.sparse_kd_loss_reference(hidden @ weight.T, indices, values, target, temperature=1.0,
                                                         alpha=0.5)

            fn = torch.compile(eager) if method == "sparse-compiled" else eager

            def loss_fn():
                return fn(hidden, weight, indices, values, target)
    elif method == "fused":
        def loss_fn():
            return ued_fast.fused_linear_kd_loss(hidden, weight, t_hidden, target, teacher_weight=t_weight,
                                                 temperature=1.0, alpha=0.5)
    elif method in ("eager", "compiled"):
        def eager(hidden, weight, t_hidden, t_weight, target):
            with torch.no_grad():
                teacher_logits = t_hidden @ t_weight.T
            return ued_fast.kd_loss_reference(hidden @ weight.T, teacher_logits, target, temperature=1.0, alpha=0.5)

        fn = torch.compile(eager) if method == "compiled" else eager

        def loss_fn():
            return fn(hidden, weight, t_hidden, t_weight, target)
    elif method == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        liger = LigerFusedLinearJSDLoss(weight_hard_loss=0.5, weight_soft_loss=0.5, beta=0.0, temperature=1.0)

        def loss_fn():
            return liger(hidden, weight, t_hidden, t_weight, target)
    else:
        raise ValueError(method)

    def step():
        loss = loss_fn()
        grads = torch.autograd.grad(loss, params)
        return loss.detach(), grads

    return step


def memory_worker(method, n, h, v):
    import torch

    step = _make_step(method, _inputs(n, h, v))
    loss, grads = step()  # warm-up (and compilation)
    grad_norms = [float(g.norm()) for g in grads]
    del grads
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS counter (VmHWM) to the current RSS
    rss_before = _status_kib("VmRSS")
    out = step()
    peak = _status_kib("VmHWM")
    return {"method": method, "n": n, "h": h, "v": v, "loss": float(loss), "grad_norms": grad_norms,
            "peak_mib": (peak - rss_before) / 1024, "threads": torch.get_num_threads()}


def time_worker(methods, n, h, v, reps):
    """Median seconds of one step per method, the methods alternating round by round."""
    inputs = _inputs(n, h, v)
    steps = {m: _make_step(m, inputs) for m in methods}
    for step in steps.values():
        step()  # warm-up (and compilation)
        gc.collect()
    times = {m: [] for m in methods}
    for _ in range(reps):
        for m, step in steps.items():
            start = time.perf_counter()
            out = step()
            times[m].append(time.perf_counter() - start)
            del out
            gc.collect()
    return {m: {"times_s": t, "median_s": statistics.median(t)} for m, t in times.items()}


# ------------------------------------------------------------------------------------------------
# Driver: every case and method in a fresh subprocess, results with machine info
# ------------------------------------------------------------------------------------------------

def machine_info():
    import torch

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        import liger_kernel  # noqa: F401
        from importlib.metadata import version
        liger = version("liger-kernel")
    except ImportError:
        liger = None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "liger_kernel": liger, "gpu": "none (CPU run)",
            "load_avg_start": os.getloadavg()}


def run_worker(role, methods, n, h, v, reps, timeout):
    cmd = [sys.executable, __file__, "--worker", role, "--methods", methods, "--shape", f"{n},{h},{v}",
           "--reps", str(reps)]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail)}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_results(results, info, out: Path):
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"machine": info, "results": results}, indent=2) + "\n")
    sparse = all(r["method"].startswith("sparse-") for r in results)
    title = ("# fused_linear_sparse_kd_loss on CPU (a top-k teacher): one forward+backward, time and measured "
             "peak memory" if sparse else "# fused_linear_kd_loss on CPU: one forward+backward, time and measured peak memory")
    teacher_line = (f"Student hidden [N, H] and head [V, H] trained; the teacher stored as its top-{K_SPARSE} log-probs "
                    "per row (made with the inputs), 'zero' convention, forward KL; the eager/compiled spec "
                    "materializes the student's [N, V] logits" if sparse else
                    "Student hidden [N, H] and head [V, H] trained, teacher hidden [N, H] and head [V, H] frozen (teacher "
                    "logits made per chunk by the fused op and by Liger, materialized by eager/compiled)")
    command = ("`PYTHONPATH=. python bench/bench_cpu_fused_linear_kd_loss.py --methods "
               "sparse-fused,sparse-eager,sparse-compiled --out bench/results/cpu_fused_linear_sparse`" if sparse else
               "`PYTHONPATH=. python bench/bench_cpu_fused_linear_kd_loss.py`")
    lines = [
        title,
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['torch_threads']} torch threads, no GPU; "
        f"torch {info['torch']}, Python {info['python']}, liger-kernel {info['liger_kernel']}. "
        f"Load average at start {info['load_avg_start'][0]:.2f}, at end {info['load_avg_end'][0]:.2f} "
        "(a shared machine: compare ratios within this one run, not absolute times).",
        "",
        f"{teacher_line}, fp32, T=1, alpha=0.5, batchmean, ~10% ignored rows. Peak = peak RSS during one step minus RSS before it, in a "
        "fresh process per row (inputs excluded; the [N, H] and [V, H] gradients included for every method). "
        f"Time: {info['reps']} rounds in one process per case that alternate the methods on the same inputs, after "
        "a warm-up step each; the fastest round per method is reported and compared (load spikes on this shared "
        "machine hit single rounds: every round's times are in the .json). "
        + ("Every method does the same three N x V x H matrix products (student logits, the two gradients). "
           if sparse else "Every method does the same four N x V x H matrix products (student and teacher logits, "
           "the two gradients), which dominate the time at these shapes. ")
        + f"Command: {command}.",
        "",
        "| N, H, V | method | peak MiB | best s | median s | peak vs eager | time vs eager | loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n, h, v in sorted({(r["n"], r["h"], r["v"]) for r in results}, key=lambda s: s[2]):
        rows = [r for r in results if (r["n"], r["h"], r["v"]) == (n, h, v)]
        eager = next((r for r in rows if r["method"] in ("eager", "sparse-eager") and "error" not in r), None)
        for r in rows:
            if "error" in r:
                lines.append(f"| {n}, {h}, {v} | {r['method']} | - | - | - | - | - | failed: {r['error']} |")
                continue
            mem_ratio = f"{eager['peak_mib'] / r['peak_mib']:.1f}x lower" if eager and r["peak_mib"] > 0 else "-"
            time_ratio = f"{min(eager['times_s']) / min(r['times_s']):.2f}x faster" if eager else "-"
            if r is eager:
                mem_ratio = time_ratio = "1"
            lines.append(f"| {n}, {h}, {v} | {r['method']} | {r['peak_mib']:.0f} | {min(r['times_s']):.2f} | "
                         f"{r['median_s']:.2f} | "
                         f"{mem_ratio} | {time_ratio} | {r['loss']:.6f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", choices=("memory", "time"), help=argparse.SUPPRESS)
    parser.add_argument("--shape", help="N,H,V of one case (default: the committed cases)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per (case, method) subprocess")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "cpu_fused_linear_kd_loss"))
    parser.add_argument("--render", action="store_true", help="only rewrite OUT.md from the results in OUT.json")
    args = parser.parse_args(argv)
    if args.render:
        saved = json.loads(Path(args.out).with_suffix(".json").read_text())
        write_results(saved["results"], saved["machine"], Path(args.out))
        return
    if args.worker:
        n, h, v = map(int, args.shape.split(","))
        if args.worker == "memory":
            print(json.dumps(memory_worker(args.methods, n, h, v)))
        else:
            print(json.dumps(time_worker(args.methods.split(","), n, h, v, args.reps)))
        return
    cases = [tuple(map(int, args.shape.split(",")))] if args.shape else CASES
    info = machine_info()
    info["reps"] = args.reps
    results = []
    for n, h, v in cases:
        case = {"n": n, "h": h, "v": v}
        rows = []
        for method in args.methods.split(","):
            rows.append({"method": method, **case, **run_worker("memory", method, n, h, v, 0, args.timeout)})
            print(json.dumps(rows[-1]), flush=True)
        timing = run_worker("time", args.methods, n, h, v, args.reps, 2 * args.timeout)
        print(json.dumps(timing), flush=True)
        for row in rows:
            row.update(timing.get(row["method"], {"error": timing.get("error", "not timed")}))
        results.extend(rows)
    info["load_avg_end"] = os.getloadavg()
    write_results(results, info, Path(args.out))


if __name__ == "__main__":
    main()
