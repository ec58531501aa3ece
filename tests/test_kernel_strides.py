"""Every Triton kernel honours every input's strides: strided targets, row-strided logits, strided
weights and grad_out, checked against the reference backend on the same values made contiguous.
Runs the Triton kernels on CPU tensors, so only under TRITON_INTERPRET=1 (set before Python starts)."""
from __future__ import annotations

import pytest
import torch

import ued_fast
from conftest import assert_close

pytestmark = pytest.mark.skipif("triton" not in ued_fast.available_backends("cpu"),
                                reason="Triton runs on CPU tensors only under TRITON_INTERPRET=1")

IGNORE = -100


def _strided_target(n: int, c: int, gen: torch.Generator, step: int = 3) -> torch.Tensor:
    """int64 [n] with stride `step`, one ignored row."""
    y = torch.randint(0, c, (n * step,), generator=gen)[::step]
    y[1] = IGNORE
    assert y.stride(0) == step
    return y


def _row_strided(n: int, c: int, gen: torch.Generator, pad: int = 5) -> torch.Tensor:
    return torch.randn(n, c + pad, generator=gen, dtype=torch.float32)[:, pad // 2: pad // 2 + c] * 3


@pytest.mark.parametrize("c", [10, 300, 3000])  # small-C and chunked kernels
@pytest.mark.parametrize("mix", ["prob", "logit"])
def test_ensemble_kd_loss_strided_target_and_weights(c, mix):
    gen = torch.Generator().manual_seed(c)
    n, k = 9, 3
    student = _row_strided(n, c, gen).requires_grad_()
    teachers = torch.randn(n, k, c, generator=gen).permute(1, 0, 2) * 3  # [K, N, C] view, row stride K*C
    weights = torch.rand(n, k, generator=gen).t()  # [K, N], column-major
    target = _strided_target(n, c, gen)
    kwargs = dict(mix=mix, temperature=2.0, alpha=0.7, reduction="sum")
    loss = ued_fast.ensemble_kd_loss(student, teachers, target, weights=weights, backend="triton", **kwargs)
    (grad,) = torch.autograd.grad(loss, student)
    ref_student = student.detach().double().contiguous().requires_grad_()
    ref = ued_fast.ensemble_kd_loss(ref_student, teachers.double().contiguous(), target.contiguous(),
                                    weights=weights.double().contiguous(), backend="reference", **kwargs)
    (ref_grad,) = torch.autograd.grad(ref, ref_student)
    assert_close(loss, ref, rtol=1e-5, atol=1e-5, what="loss")
    assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6, what="grad")


@pytest.mark.parametrize("c", [10, 3000])
def test_kd_loss_strided_target(c):
    gen = torch.Generator().manual_seed(c)
    n = 9
    student = _row_strided(n, c, gen).requires_grad_()
    teacher = _row_strided(n, c, gen)
    target = _strided_target(n, c, gen)
    kwargs = dict(temperature=2.0, alpha=0.7, reduction="sum")
    loss = ued_fast.kd_loss(student, teacher, target, backend="triton", **kwargs)
    (grad,) = torch.autograd.grad(loss, student)
    ref_student = student.detach().double().contiguous().requires_grad_()
    ref = ued_fast.kd_loss(ref_student, teacher.double().contiguous(), target.contiguous(), backend="reference",
                           **kwargs)
    (ref_grad,) = torch.autograd.grad(ref, ref_student)
    assert_close(loss, ref, rtol=1e-5, atol=1e-5, what="loss")
    assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6, what="grad")


@pytest.mark.parametrize("mode", ["logit_mean", "prob_mean"])
def test_grouped_heads_strided_everything(mode):
    """Features [N, K*D] with a row pad, weight and bias as transposed views, grad_out column-major."""
    gen = torch.Generator().manual_seed(3)
    cover = [[0, 1, 2, 9], [2, 3, 4, 5, 9], [5, 6, 7, 8, 9, 2]]
    k, d, n, c = 3, 5, 7, 10
    width = 6 + (1 if mode == "prob_mean" else 0)
    features = torch.randn(n, k * d + 4, generator=gen)[:, 2:2 + k * d]
    weight = torch.randn(width, d, k, generator=gen).permute(2, 1, 0)  # [K, D, W], no unit stride
    bias = torch.randn(width, k, generator=gen).t()
    grad_out = torch.randn(c, n, generator=gen, dtype=torch.float64).t()
    for j, s in enumerate(cover):  # padding columns hold garbage that must not leak
        real = len(s) + (1 if mode == "prob_mean" else 0)
        weight.data[j, :, real:] = 1e3
        bias.data[j, real:] = 1e3

    def run(backend, dtype, contiguous):
        leaves = [t.to(dtype) for t in (features, weight, bias)]
        if contiguous:
            leaves = [t.contiguous() for t in leaves]
        leaves = [t.detach().requires_grad_() for t in leaves]
        out = ued_fast.grouped_heads(*leaves, cover, mode=mode, backend=backend)
        out.backward(grad_out.to(dtype))
        return [out] + [t.grad for t in leaves]

    got = run("triton", torch.float32, contiguous=False)
    want = run("reference", torch.float64, contiguous=True)
    for name, a, b in zip(("out", "grad_features", "grad_weight", "grad_bias"), got, want):
        assert_close(a, b, rtol=1e-4, atol=1e-5, what=name)
