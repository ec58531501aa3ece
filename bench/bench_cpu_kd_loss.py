"""kd_loss forward+backward on CPU, float32: the C++ kernel ('cpp') against the eager reference and
torch.compile of the reference (DESIGN 4: 'cpp' >= 4x eager at [4096, 1000] on 2 cores), for every
divergence (reverse_kl and jsd on the two large shapes).

Run (and turn the JSON into the Markdown table):
    PYTHONPATH=$PWD python -m pytest bench/bench_cpu_kd_loss.py --benchmark-only \
        --benchmark-json bench/results/cpu_kd_loss.json
    python bench/report.py bench/results/cpu_kd_loss.json --baseline eager \
        --title "kd_loss fwd+bwd, CPU, float32" > bench/results/cpu_kd_loss.md
Bytes floor per call: N*C*(4 + 4 + 4) (read student and teacher, write the gradient).
"""
from __future__ import annotations

import os

import pytest
import torch

import ued_fast
from ued_fast.reference import kd_loss_reference

SHAPES = [(512, 10), (512, 100), (4096, 1000), (1024, 32000)]
IMPLS = ["cpp", "eager", "compiled"]
DIVERGENCES = ["forward_kl", "reverse_kl", "jsd"]
LARGE_SHAPES = SHAPES[2:]  # the other divergences are timed on these only
KW = dict(temperature=4.0, alpha=0.9)
_compiled = {}


def _loss_fn(impl, divergence):
    kw = dict(KW, divergence=divergence)
    if impl == "cpp":
        return lambda s, t, y: ued_fast.kd_loss(s, t, y, backend="cpp", **kw)
    if impl == "eager":
        return lambda s, t, y: kd_loss_reference(s, t, y, **kw)
    if divergence not in _compiled:
        _compiled[divergence] = torch.compile(lambda s, t, y: kd_loss_reference(s, t, y, **kw), dynamic=False)
    return _compiled[divergence]


def _rounds(n, c):
    # The eager reference at [1024, 32000] takes seconds: fewer rounds for the big shapes.
    return max(3, min(50, int(2e8 // (n * c * 12))))


@pytest.fixture(params=[2, 1], ids=lambda k: f"{k}thr")
def threads(request):
    """2 threads (the target: 2 cores) and 1 thread, which a busy shared machine disturbs less."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n,c", SHAPES, ids=[f"{n}x{c}" for n, c in SHAPES])
def test_kd_loss_fwd_bwd(benchmark, impl, n, c, divergence, threads):
    if impl == "cpp" and "cpp" not in ued_fast.available_backends("cpu"):
        pytest.skip("ued_fast._C not built")
    if divergence != "forward_kl" and (n, c) not in LARGE_SHAPES:
        pytest.skip("the other divergences are timed on the large shapes only")
    g = torch.Generator().manual_seed(0)
    student = torch.randn(n, c, generator=g).requires_grad_()
    teacher = torch.randn(n, c, generator=g)
    target = torch.randint(0, c, (n,), generator=g)
    loss_fn = _loss_fn(impl, divergence)

    def step():
        student.grad = None
        loss_fn(student, teacher, target).backward()

    for _ in range(2):  # warm-up (compilation for 'compiled')
        step()
    label = "" if divergence == "forward_kl" else f" {divergence}"
    benchmark.group = f"kd_loss{label} fwd+bwd {n}x{c}, {threads} thread(s)"
    benchmark.extra_info.update(
        case=f"{n}x{c}{label}, {threads} thr", impl=impl, divergence=divergence, dtype="float32", bytes=n * c * 12,
        load_average=os.getloadavg(), threads=threads,
    )
    benchmark.pedantic(step, rounds=_rounds(n, c), warmup_rounds=1, iterations=1)
