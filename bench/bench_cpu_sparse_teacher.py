"""sparse_kd_loss forward+backward on CPU, float32: the fused C++ kernel ('cpp': no dense teacher, one
streaming kernel that makes the gradient in the forward pass) against the eager reference ('eager': sparse_kd_loss_reference, which
densifies the student's side) and torch.compile of the reference ('compiled'). Teacher: the top-k
log-probs of random logits, DistillKit's 'zero' convention, forward KL, with targets.

Run (and turn the JSON into the Markdown table):
    PYTHONPATH=$PWD python -m pytest bench/bench_cpu_sparse_teacher.py --benchmark-only \
        --benchmark-json bench/results/cpu_sparse_teacher.json
    python bench/report.py bench/results/cpu_sparse_teacher.json --baseline eager \
        --title "sparse_kd_loss fwd+bwd, CPU, float32" > bench/results/cpu_sparse_teacher.md
Bytes floor per call: N*C*(4 + 4) + N*k*(8 + 4) (read the student, write its gradient, read the top-k).
Both 'cpp' and 'eager' include the CPU-only index checks (a sort of the [N, k] indices); 'cpp' also the
host's preparation of the teacher side ([N, k+1] log-probs, indices sorted per row).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from ued_fast.ops.sparse_kd_loss import sparse_kd_loss, sparse_kd_loss_reference

SHAPES = [(512, 100, 8), (4096, 1000, 32), (1024, 32000, 64)]
IMPLS = ["cpp", "eager", "compiled"]
KW = dict(temperature=2.0, alpha=0.9)
_compiled = {}


def _loss_fn(impl):
    if impl == "cpp":
        return lambda s, i, v, y: sparse_kd_loss(s, i, v, y, backend="cpp", **KW)
    if impl == "eager":
        return lambda s, i, v, y: sparse_kd_loss_reference(s, i, v, y, **KW)
    if "fn" not in _compiled:
        _compiled["fn"] = torch.compile(lambda s, i, v, y: sparse_kd_loss_reference(s, i, v, y, **KW), dynamic=False)
    return _compiled["fn"]


def _rounds(n, c):
    # The eager reference at [1024, 32000] takes about a second: fewer rounds for the big shapes.
    return max(3, min(50, int(2e8 // (n * c * 8))))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n,c,k", SHAPES, ids=[f"{n}x{c}_k{k}" for n, c, k in SHAPES])
def test_sparse_kd_loss_fwd_bwd(benchmark, impl, n, c, k):
    threads = torch.get_num_threads()
    g = torch.Generator().manual_seed(0)
    student = torch.randn(n, c, generator=g).requires_grad_()
    values, indices = F.log_softmax(torch.randn(n, c, generator=g) * 3, dim=-1).topk(k, dim=-1)
    target = torch.randint(0, c, (n,), generator=g)
    loss_fn = _loss_fn(impl)

    def step():
        student.grad = None
        loss_fn(student, indices, values, target).backward()

    for _ in range(2):  # warm-up (compilation for 'compiled')
        step()
    benchmark.group = f"sparse_kd_loss fwd+bwd {n}x{c} k={k}, {threads} thread(s)"
    benchmark.extra_info.update(
        case=f"{n}x{c} k={k}, {threads} thr", impl=impl, dtype="float32", bytes=n * c * 8 + n * k * 12,
        load_average=os.getloadavg(), threads=threads,
    )
    benchmark.pedantic(step, rounds=_rounds(n, c), warmup_rounds=1, iterations=1)
