"""CPU benchmark of grouped_heads forward+backward at USTE shapes (pytest-benchmark).

N=512, K=5 (the authors' contiguous covers), D in {64, 256}, C in {10, 100}, both modes, float32.
Compared: 'cpp' (ued_fast._C), the eager reference, the reference under torch.compile, and ONE
addmm on the equivalent block-structured [K*D, C] matrix (the GEMM floor DESIGN 2.3 names; for
prob_mean it is only the linear part, a lower bound, not an equivalent).

    python bench/bench_cpu_grouped_heads.py        # runs, writes bench/results/cpu_grouped_heads.{json,md}
                                                    # (the table by bench/report.py)
    python -m pytest bench/bench_cpu_grouped_heads.py --benchmark-only   # just run

Threads: UED_BENCH_THREADS (default 1: the 2-core benchmark machine is shared with other jobs, and
2 OpenMP threads there give outliers of 100x; one thread gives reproducible numbers).
"""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

import ued_fast
from ued_fast.ops.grouped_heads import grouped_heads
from ued_fast.reference import grouped_heads_reference

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import to_markdown  # noqa: E402  (bench/ is not a package)

torch.set_num_threads(int(os.environ.get("UED_BENCH_THREADS", "1")))

N, K = 512, 5
COVERS = {  # DESIGN 1.1 'contiguous' (the authors' pattern)
    10: [[0, 1], [1, 2, 3], [3, 4, 5], [6, 7], [8, 9]],
    100: [list(range(0, 20)), list(range(10, 40)), list(range(30, 60)), list(range(60, 80)), list(range(80, 100))],
}
SHAPES = [(64, 10), (64, 100), (256, 10), (256, 100)]
MODES = ["logit_mean", "prob_mean"]
IMPLS = ["cpp", "reference_eager", "reference_compiled", "block_addmm"]
HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


def _inputs(d, c, mode):
    cover = COVERS[c]
    width = max(len(s) for s in cover) + (1 if mode == "prob_mean" else 0)
    g = torch.Generator().manual_seed(0)
    f = torch.randn(N, K * d, generator=g)
    w = torch.randn(K, d, width, generator=g) / d ** 0.5
    b = torch.randn(K, width, generator=g)
    return cover, [t.requires_grad_() for t in (f, w, b)], torch.randn(N, c, generator=g)


def _block_leaves(d, c):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(N, K * d, generator=g).requires_grad_(),
            torch.randn(K * d, c, generator=g).requires_grad_(),
            torch.randn(c, generator=g).requires_grad_()]


_COMPILED = {}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("d,c", SHAPES, ids=[f"D{d}-C{c}" for d, c in SHAPES])
def test_grouped_heads_fwd_bwd(benchmark, impl, mode, d, c):
    if impl == "cpp" and "cpp" not in ued_fast.available_backends("cpu"):
        pytest.skip("ued_fast._C not built")
    cover, leaves, grad = _inputs(d, c, mode)
    if impl == "cpp":
        fn = lambda f, w, b: grouped_heads(f, w, b, cover, mode=mode, backend="cpp")  # noqa: E731
    elif impl == "reference_eager":
        fn = lambda f, w, b: grouped_heads_reference(f, w, b, cover, mode=mode)  # noqa: E731
    elif impl == "reference_compiled":
        key = (d, c, mode)
        if key not in _COMPILED:
            _COMPILED[key] = torch.compile(lambda f, w, b: grouped_heads_reference(f, w, b, cover, mode=mode))
        fn = _COMPILED[key]
    else:
        leaves = _block_leaves(d, c)
        fn = lambda f, m, b: torch.addmm(b, f, m)  # noqa: E731

    def step():
        for t in leaves:
            t.grad = None
        fn(*leaves).backward(grad)

    for _ in range(3):  # warm-up (and compilation)
        step()
    width = max(len(s) for s in COVERS[c]) + (mode == "prob_mean")
    benchmark.extra_info.update(case=f"{mode} D={d} C={c}", N=N, K=K, D=d, C=c, mode=mode, impl=impl,
                                threads=torch.get_num_threads(), load_average=os.getloadavg(),
                                bytes=4 * 2 * (N * K * d + K * d * width + N * c))  # read+write each tensor
    benchmark.pedantic(step, rounds=60, iterations=1, warmup_rounds=2)


if __name__ == "__main__":
    os.makedirs(RESULTS, exist_ok=True)
    json_path = os.path.join(RESULTS, "cpu_grouped_heads.json")
    rc = pytest.main([os.path.abspath(__file__), "-q", "-p", "no:cacheprovider", "--benchmark-only",
                      f"--benchmark-json={json_path}", "--benchmark-columns=min,median,mean,stddev,rounds"])
    if rc != 0:
        sys.exit(rc)
    with open(json_path) as fh:
        report = to_markdown(json.load(fh), baseline="reference_eager",
                             title="grouped_heads, CPU, forward + backward (float32)")
    with open(os.path.join(RESULTS, "cpu_grouped_heads.md"), "w") as fh:
        fh.write(report)
    print(report)
