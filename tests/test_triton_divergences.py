"""The Triton KD kernels called directly with the kernel contract's arguments (coefficients from the host):
every divergence (forward_kl, reverse_kl, jsd(beta)) on both kd_loss kernels and both ensemble bodies,
against ued_fast.reference in float64 (loss rows and the gradient by autograd), with odd C, strided rows,
separate student and teacher temperatures, extreme logits, -inf / zero teacher entries, ignored rows,
16-bit inputs and bad arguments. Runs on CPU tensors under TRITON_INTERPRET=1 (sizes kept small).
"""
from __future__ import annotations

import math

import pytest
import torch

import ued_fast
from conftest import IGNORE_INTERPRETER_WARNINGS, triton_device_or_skip_module
from ued_fast.reference import DIVERGENCES, ensemble_kd_loss_reference, kd_loss_reference

DEVICE = triton_device_or_skip_module()

from ued_fast.kernels.ensemble_kd_loss import ensemble_kd_loss_fwd  # noqa: E402
from ued_fast.kernels.kd_loss import kd_loss_fwd  # noqa: E402

pytestmark = IGNORE_INTERPRETER_WARNINGS

KIND_NAMES = ("logits", "log_probs", "probs")
IGNORE = -100
# Forced paths: the whole-row kernel, and the chunked one with small chunks (several, a ragged last one).
PATHS = {"small": dict(kernel="small"), "chunked": dict(kernel="chunked", chunk=16)}
ENSEMBLE_PATHS = {"small": dict(), "chunked": dict(block_c=16)}
GRAD_RTOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _mixed_reference(reference, s, y, kd_coef, ce_coef, **kw):
    """kd_coef * D + ce_coef * CE per row (0 on ignored rows) and its gradient, float64, from the reference
    run twice (alpha 1: D alone, alpha 0: CE alone; t2_scale off), so any host coefficients can be checked."""
    s64 = s.detach().double().requires_grad_()
    kd_rows = reference(s64, target=None if y is None else y, alpha=1.0, t2_scale=False, reduction="none", **kw)
    rows = kd_coef * kd_rows
    if y is not None:
        rows = rows + ce_coef * reference(s64, target=y, alpha=0.0, t2_scale=False, reduction="none", **kw)
    (grad,) = torch.autograd.grad(rows.sum(), s64)
    return rows.detach(), grad


def _assert_matches(rows, grad, ref_rows, ref_grad, dtype, loss_rtol=2e-5):
    assert rows.dtype == torch.float32 and grad.dtype == dtype
    scale = ref_rows.abs().max().item() + 1.0
    torch.testing.assert_close(rows.double().cpu(), ref_rows, rtol=loss_rtol, atol=loss_rtol * scale)
    g_scale = ref_grad.abs().max().item() + 1e-6
    rtol = GRAD_RTOL[dtype]
    torch.testing.assert_close(grad.double().cpu(), ref_grad, rtol=rtol, atol=rtol * g_scale)


def _teacher(n, c, kind, gen, scale=3.0):
    logits = torch.randn(n, c, generator=gen) * scale
    if kind == 0:
        return logits
    if kind == 1:
        return torch.log_softmax(logits, -1)
    return torch.softmax(logits, -1)


def _strided_rows(n, c, gen, dtype=torch.float32, scale=3.0, pad=5):
    """[n, c] with row stride c + pad (a column slice of a wider tensor)."""
    wide = (torch.randn(n, c + pad, generator=gen) * scale).to(dtype)
    return wide[:, 2:2 + c]


def _strided_target(n, c, gen):
    """int64 [n] with stride 2; row n // 2 ignored."""
    y = torch.randint(0, c, (2 * n,), generator=gen)[::2]
    y[n // 2] = IGNORE
    return y


def _student_and_teacher(seed, n, c, kind):
    """A float32 student with strided rows and a teacher of `kind`, [n, c] each, from one seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    return _strided_rows(n, c, gen), _teacher(n, c, kind, gen)


def _kd_case(n, c, kind, divergence, beta, *, target=True, path="small", dtype=torch.float32, seed=0,
             temperature=2.0, teacher_temperature=3.0, alpha=0.7, s=None, t=None, edit_teacher=None, loss_rtol=2e-5,
             chunk=None):
    """kd_loss_fwd on one case against the float64 reference; edit_teacher(t) alters the drawn teacher."""
    gen = torch.Generator().manual_seed(seed)
    s = _strided_rows(n, c, gen, dtype) if s is None else s
    t = _teacher(n, c, kind, gen) if t is None else t
    t = t if edit_teacher is None else edit_teacher(t)
    y = _strided_target(n, c, gen) if target else None
    kd_coef, ce_coef = (alpha * temperature**2, 1.0 - alpha) if target else (temperature**2, 0.0)
    launch = dict(PATHS[path])
    if chunk is not None and path == "chunked":
        launch["chunk"] = chunk
    rows, grad = kd_loss_fwd(s.to(DEVICE), t.to(DEVICE), None if y is None else y.to(DEVICE),
                             1.0 / temperature, 1.0 / teacher_temperature, kd_coef, ce_coef, divergence, beta,
                             IGNORE, kind, True, **launch)
    ref_rows, ref_grad = _mixed_reference(
        lambda s64, **kw: kd_loss_reference(s64, t.double(), **kw), s, y, kd_coef, ce_coef,
        temperature=temperature, teacher_temperature=teacher_temperature, teacher_kind=KIND_NAMES[kind],
        divergence=DIVERGENCES[divergence], beta=beta, ignore_index=IGNORE)
    _assert_matches(rows, grad, ref_rows, ref_grad, dtype, loss_rtol)
    if target:
        assert rows[n // 2].item() == 0.0 and not grad[n // 2].any()
    return rows, grad


# --- kd_loss ------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("target", [True, False])
@pytest.mark.parametrize("kind", [0, 1, 2])
@pytest.mark.parametrize("divergence", [0, 1, 2])
def test_kd_every_divergence_kind_and_path(divergence, kind, target, path):
    _kd_case(5, 17, kind, divergence, 0.3, target=target, path=path, seed=10 * divergence + kind)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("c", [1, 3, 1000, 4099])
@pytest.mark.parametrize("divergence", [1, 2])
def test_kd_odd_class_counts(divergence, c, path):
    # Long rows take 1024-column chunks on the chunked kernel: several of them, fewer interpreter steps.
    _kd_case(3, c, 0, divergence, 0.5, path=path, seed=c, chunk=1024 if c > 1000 else None)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_kd_jsd_beta(beta, path):
    rows, grad = _kd_case(4, 17, 0, 2, beta, target=False, path=path, seed=3)
    if beta in (0.0, 1.0):  # m is q or p: both KL terms vanish
        assert rows.abs().max().item() < 1e-5 and grad.abs().max().item() < 1e-5


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("divergence", [0, 1, 2])
def test_kd_16bit_inputs(divergence, dtype, path):
    _kd_case(4, 33, 0, divergence, 0.3, path=path, dtype=dtype, edit_teacher=lambda t: t.to(dtype), seed=divergence,
             loss_rtol=1e-4)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("divergence", [0, 1, 2])
def test_kd_extreme_logits(divergence, path):
    """+-1e4 logits: probabilities underflow to 0 in fp32 while their logs stay finite."""
    gen = torch.Generator().manual_seed(7)
    s = torch.randn(4, 19, generator=gen).sign() * 1e4
    t = torch.randn(4, 19, generator=gen) * 1e4
    rows, grad = _kd_case(4, 19, 0, divergence, 0.3, path=path, s=s, t=t, temperature=1.0, teacher_temperature=1.5)
    assert torch.isfinite(rows).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("divergence", [0, 2])
@pytest.mark.parametrize("kind", [0, 2])
def test_kd_zero_teacher_entries(kind, divergence, path):
    """-inf teacher logits / zero teacher probabilities: 0 * log 0 = 0 for forward_kl and jsd."""
    zero = -math.inf if kind == 0 else 0.0
    rows, grad = _kd_case(4, 17, kind, divergence, 0.4, path=path, seed=kind,
                          edit_teacher=lambda t: t.index_fill(1, torch.arange(0, 17, 3), zero))
    assert torch.isfinite(rows).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("path", PATHS)
def test_kd_reverse_kl_is_inf_where_the_teacher_is_zero(path):
    s, t = _student_and_teacher(1, 3, 17, kind=2)
    t[0, 4] = 0.0  # row 0: p = 0 < q
    rows, _ = kd_loss_fwd(s, t, None, 0.5, 0.5, 1.0, 0.0, 1, 0.5, IGNORE, 2, True, **PATHS[path])
    assert rows[0].item() == math.inf
    ref = kd_loss_reference(s.double(), t.double(), None, temperature=2.0, t2_scale=False, reduction="none",
                            teacher_kind="probs", divergence="reverse_kl")
    torch.testing.assert_close(rows[1:].double(), ref[1:], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("divergence", [0, 1, 2])
def test_kd_all_rows_ignored(divergence, path):
    s, t = _student_and_teacher(2, 3, 17, kind=0)
    y = torch.full((3,), IGNORE)
    rows, grad = kd_loss_fwd(s, t, y, 0.5, 0.5, 2.8, 0.3, divergence, 0.5, IGNORE, 0, True, **PATHS[path])
    assert not rows.any() and not grad.any()


def test_kd_divergences_differ():
    """The divergence code reaches the kernel: three different losses on the same inputs."""
    s, t = _student_and_teacher(5, 2, 9, kind=0)
    losses = [kd_loss_fwd(s, t, None, 1.0, 1.0, 1.0, 0.0, d, 0.5, IGNORE, 0, False)[0] for d in (0, 1, 2)]
    assert not torch.allclose(losses[0], losses[1]) and not torch.allclose(losses[1], losses[2])


# --- ensemble_kd_loss ---------------------------------------------------------------------------

def _ensemble_case(divergence, mix, path, *, target=True, n=5, c=17, k=3, dtype=torch.float32, beta=0.3, seed=0,
                   scale=3.0, loss_rtol=2e-5):
    gen = torch.Generator().manual_seed(seed)
    s = _strided_rows(n, c, gen, dtype, scale)
    teachers = (torch.randn(n, k, c, generator=gen) * scale).to(dtype).permute(1, 0, 2)  # [K, N, C] view
    w = torch.rand(k, n, generator=gen)
    w[0, 1] = 0.0  # a left-out teacher
    w = (w / w.sum(0)).t().contiguous().t()  # [K, N], column-major
    y = _strided_target(n, c, gen) if target else None
    temperature, teacher_temperature, alpha = 2.0, 1.5, 0.6
    kd_coef, ce_coef = (alpha * temperature**2, 1.0 - alpha) if target else (temperature**2, 0.0)
    rows, grad = ensemble_kd_loss_fwd(s, teachers, w, y, 1.0 / temperature, 1.0 / teacher_temperature, kd_coef,
                                      ce_coef, divergence, beta, IGNORE, mix, True, **ENSEMBLE_PATHS[path])
    ref_rows, ref_grad = _mixed_reference(
        lambda s64, **kw: ensemble_kd_loss_reference(s64, teachers.double(), w.double(), **kw), s, y, kd_coef,
        ce_coef, mix=("prob", "logit")[mix], temperature=temperature, teacher_temperature=teacher_temperature,
        divergence=DIVERGENCES[divergence], beta=beta, ignore_index=IGNORE)
    _assert_matches(rows, grad, ref_rows, ref_grad, dtype, loss_rtol)
    return rows, grad


@pytest.mark.parametrize("path", ENSEMBLE_PATHS)
@pytest.mark.parametrize("target", [True, False])
@pytest.mark.parametrize("mix", [0, 1])
@pytest.mark.parametrize("divergence", [0, 1, 2])
def test_ensemble_every_divergence_mix_and_path(divergence, mix, target, path):
    _ensemble_case(divergence, mix, path, target=target, seed=10 * divergence + mix)


@pytest.mark.parametrize("path", ENSEMBLE_PATHS)
@pytest.mark.parametrize("c", [1, 1000])
@pytest.mark.parametrize("divergence", [1, 2])
def test_ensemble_odd_class_counts(divergence, c, path):
    _ensemble_case(divergence, 0, path, c=c, n=3, seed=c)


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_ensemble_jsd_beta_edges(beta):
    _ensemble_case(2, 1, "chunked", beta=beta, seed=4)


@pytest.mark.parametrize("path", ENSEMBLE_PATHS)
@pytest.mark.parametrize("divergence", [1, 2])
def test_ensemble_bf16(divergence, path):
    _ensemble_case(divergence, 0, path, dtype=torch.bfloat16, seed=divergence, loss_rtol=1e-4)


@pytest.mark.parametrize("path", ENSEMBLE_PATHS)
@pytest.mark.parametrize("mix", [0, 1])
@pytest.mark.parametrize("divergence", [0, 1, 2])
def test_ensemble_extreme_logits(divergence, mix, path):
    """1e4-scale logits: the mixture's logs stay finite where its probabilities underflow fp32 (reverse_kl
    weighs log p by q, so a log of 0 there would be an infinite loss)."""
    rows, grad = _ensemble_case(divergence, mix, path, scale=1e4, seed=9, loss_rtol=1e-5)
    assert torch.isfinite(rows).all() and torch.isfinite(grad).all()


# --- bad arguments ------------------------------------------------------------------------------

@pytest.mark.parametrize("name,change", [
    ("inv_student_temp", dict(inv_student_temp=0.0)),
    ("inv_student_temp", dict(inv_student_temp=float("nan"))),
    ("inv_teacher_temp", dict(inv_teacher_temp=float("inf"))),
    ("divergence", dict(divergence=3)),
    ("beta", dict(beta=-0.1)),
    ("beta", dict(beta=1.5)),
])
def test_bad_scalar_arguments(name, change):
    s = torch.randn(2, 5)
    args = dict(inv_student_temp=0.5, inv_teacher_temp=0.5, divergence=0, beta=0.5)
    args.update(change)
    with pytest.raises(ValueError, match=name):
        kd_loss_fwd(s, s.clone(), None, args["inv_student_temp"], args["inv_teacher_temp"], 1.0, 0.0,
                    args["divergence"], args["beta"], IGNORE, 0, True)
    with pytest.raises(ValueError, match=name):
        ensemble_kd_loss_fwd(s, s[None].clone(), torch.ones(1, 2), None, args["inv_student_temp"],
                             args["inv_teacher_temp"], 1.0, 0.0, args["divergence"], args["beta"], IGNORE, 0, True)


def test_bad_ensemble_arguments():
    s = torch.randn(2, 5)
    t = torch.randn(3, 2, 5)
    w = torch.full((3, 2), 1 / 3)
    with pytest.raises(ValueError, match="mix"):
        ensemble_kd_loss_fwd(s, t, w, None, 1.0, 1.0, 1.0, 0.0, 0, 0.5, IGNORE, 2, True)
    with pytest.raises(ValueError, match="weights"):
        ensemble_kd_loss_fwd(s, t, w[:2], None, 1.0, 1.0, 1.0, 0.0, 0, 0.5, IGNORE, 0, True)
    with pytest.raises(ValueError, match="teachers"):
        ensemble_kd_loss_fwd(s, t[0], w, None, 1.0, 1.0, 1.0, 0.0, 0, 0.5, IGNORE, 0, True)
    with pytest.raises(ValueError, match="target"):
        ensemble_kd_loss_fwd(s, t, w, torch.zeros(2, dtype=torch.int32), 1.0, 1.0, 1.0, 0.0, 0, 0.5, IGNORE, 0, True)
    with pytest.raises(TypeError):  # the old schema's argument count
        ensemble_kd_loss_fwd(s, t, w, None, 2.0, 0.5, True, IGNORE, 0, True)
