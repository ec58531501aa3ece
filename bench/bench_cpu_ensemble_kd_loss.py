"""CPU benchmark of ensemble_kd_loss fwd+bwd: 'cpp' vs the eager reference vs torch.compile(reference).

fp32, K=5 teachers, mix='prob', targets given (alpha=0.9, T=4), shapes [512, 10], [512, 100],
[4096, 1000]; reverse_kl and jsd on [4096, 1000]. Run (results in bench/results/):
    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python -m pytest bench/bench_cpu_ensemble_kd_loss.py --benchmark-only \
        --benchmark-json bench/results/cpu_ensemble_kd_loss.json --benchmark-min-rounds=10 --benchmark-max-time=2
    python bench/report.py bench/results/cpu_ensemble_kd_loss.json --baseline eager \
        --title "ensemble_kd_loss fwd+bwd, CPU, float32, K=5, mix='prob'" > bench/results/cpu_ensemble_kd_loss.md
Bytes floor per call: N*C*(4 + K*4 + 4) (read student and K teachers, write the gradient).
"""
from __future__ import annotations

import os

import pytest
import torch

import ued_fast

K = 5
SHAPES = [(512, 10), (512, 100), (4096, 1000)]
DIVERGENCES = ["forward_kl", "reverse_kl", "jsd"]
IMPLS = ["cpp", "eager", "compiled"]
KW = dict(mix="prob", temperature=4.0, alpha=0.9)


def _inputs(n, c):
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(n, c, generator=gen).requires_grad_()
    t = torch.randn(K, n, c, generator=gen) * 3
    y = torch.randint(0, c, (n,), generator=gen)
    return s, t, y


def _loss_fn(impl, divergence):
    kw = dict(KW, divergence=divergence)
    if impl == "cpp":
        return lambda s, t, y: ued_fast.ensemble_kd_loss(s, t, y, backend="cpp", **kw)
    ref = lambda s, t, y: ued_fast.ensemble_kd_loss_reference(s, t, None, y, **kw)  # noqa: E731
    return ref if impl == "eager" else torch.compile(ref, dynamic=False)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{n}x{c}" for n, c in SHAPES])
@pytest.mark.parametrize("impl", IMPLS)
def test_ensemble_kd_loss_fwd_bwd(benchmark, impl, shape, divergence):
    if impl == "cpp" and "cpp" not in ued_fast.available_backends("cpu"):
        pytest.skip("ued_fast._C not built")
    if divergence != "forward_kl" and shape != SHAPES[-1]:
        pytest.skip("the other divergences are timed on the largest shape only")
    n, c = shape
    s, t, y = _inputs(n, c)
    fn = _loss_fn(impl, divergence)

    def step():
        loss = fn(s, t, y)
        (g,) = torch.autograd.grad(loss, s)
        return g

    for _ in range(3):  # warm-up (and compilation for 'compiled')
        step()
    label = "" if divergence == "forward_kl" else f" {divergence}"
    benchmark.group = f"ensemble_kd_loss{label} fwd+bwd fp32 K={K} [{n}, {c}]"
    benchmark.extra_info.update(case=f"[{n}, {c}]{label}", impl=impl, divergence=divergence, n=n, c=c, k=K,
                                bytes=n * c * (4 + 4 * K + 4), threads=torch.get_num_threads(),
                                load_average=os.getloadavg())
    benchmark(step)
