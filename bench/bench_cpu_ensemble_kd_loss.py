"""CPU benchmark of ensemble_kd_loss fwd+bwd: 'cpp' vs the eager reference vs torch.compile(reference).

fp32, K=5 teachers, mix='prob', targets given (alpha=0.9, T=4), shapes [512, 10], [512, 100],
[4096, 1000]. Run (results in bench/results/):
    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python -m pytest bench/bench_cpu_ensemble_kd_loss.py --benchmark-only \
        --benchmark-json bench/results/cpu_ensemble_kd_loss.json --benchmark-min-rounds=10 --benchmark-max-time=2
    python bench/bench_cpu_ensemble_kd_loss.py bench/results/cpu_ensemble_kd_loss.json \
        bench/results/cpu_ensemble_kd_loss.md
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest
import torch

K = 5
SHAPES = [(512, 10), (512, 100), (4096, 1000)]
IMPLS = ["cpp", "eager", "compiled"]
KW = dict(mix="prob", temperature=4.0, alpha=0.9)


def _inputs(n, c):
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(n, c, generator=gen).requires_grad_()
    t = torch.randn(K, n, c, generator=gen) * 3
    y = torch.randint(0, c, (n,), generator=gen)
    return s, t, y


def _loss_fn(impl):
    import ued_fast

    if impl == "cpp":
        return lambda s, t, y: ued_fast.ensemble_kd_loss(s, t, y, backend="cpp", **KW)
    ref = lambda s, t, y: ued_fast.ensemble_kd_loss_reference(s, t, None, y, **KW)
    return ref if impl == "eager" else torch.compile(ref, dynamic=False)


@pytest.mark.parametrize("shape", SHAPES, ids=[f"{n}x{c}" for n, c in SHAPES])
@pytest.mark.parametrize("impl", IMPLS)
def test_ensemble_kd_loss_fwd_bwd(benchmark, impl, shape):
    import ued_fast

    if impl == "cpp" and "cpp" not in ued_fast.available_backends("cpu"):
        pytest.skip("ued_fast._C not built")
    n, c = shape
    s, t, y = _inputs(n, c)
    fn = _loss_fn(impl)

    def step():
        loss = fn(s, t, y)
        (g,) = torch.autograd.grad(loss, s)
        return g

    for _ in range(3):  # warm-up (and compilation for 'compiled')
        step()
    benchmark.group = f"ensemble_kd_loss fwd+bwd fp32 K={K} [{n}, {c}]"
    benchmark.extra_info.update(impl=impl, n=n, c=c, k=K, threads=torch.get_num_threads())
    benchmark(step)


def _machine_info() -> dict:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        commit = "unknown"
    return dict(cpu=model, cores=os.cpu_count(), torch_threads=torch.get_num_threads(), torch=torch.__version__,
                python=platform.python_version(), commit=commit)


def to_markdown(json_path: str, md_path: str) -> None:
    """The pytest-benchmark JSON as a Markdown table: median times and speed-up of 'cpp'."""
    with open(json_path) as f:
        data = json.load(f)
    rows = {}
    for b in data["benchmarks"]:
        info = b["extra_info"]
        rows.setdefault((info["n"], info["c"]), {})[info["impl"]] = b["stats"]["median"]
    info = _machine_info()
    threads = sorted({b["extra_info"].get("threads") for b in data["benchmarks"]})
    commit = data.get("commit_info", {})
    commit_id = (commit.get("id") or info["commit"])[:7] + (" (dirty tree)" if commit.get("dirty") else "")
    lines = [
        "# CPU benchmark: ensemble_kd_loss fwd+bwd (fp32, K=5, mix='prob', with targets)",
        "",
        f"- CPU: {info['cpu']}, {info['cores']} cores visible; torch threads during the run: {threads}",
        f"- torch {info['torch']}, Python {info['python']}, commit {commit_id} "
        f"(JSON: {os.path.basename(json_path)}, recorded {data.get('datetime', '?')})",
        "- Median of pytest-benchmark rounds. The machine's 2 cores were shared with other jobs (load average",
        "  6-9), so the run used one thread (OMP_NUM_THREADS=1): with 2 OpenMP threads on a loaded machine every",
        "  implementation stalls at thread barriers and the numbers are meaningless.",
        "",
        "| shape [N, C] | cpp (ms) | eager reference (ms) | torch.compile(reference) (ms) | cpp vs eager | cpp vs compiled |",
        "|---|---|---|---|---|---|",
    ]
    for (n, c), t in sorted(rows.items(), key=lambda kv: kv[0][0] * kv[0][1]):
        cpp, eager, comp = t.get("cpp"), t.get("eager"), t.get("compiled")
        fmt = lambda x: f"{x * 1e3:.3f}" if x else "-"
        ratio = lambda a, b: f"{b / a:.2f}x" if a and b else "-"
        lines.append(f"| [{n}, {c}] | {fmt(cpp)} | {fmt(eager)} | {fmt(comp)} | {ratio(cpp, eager)} | {ratio(cpp, comp)} |")
    with open(md_path, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    to_markdown(sys.argv[1], sys.argv[2])
