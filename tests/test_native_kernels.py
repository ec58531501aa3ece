"""The C++ CPU kernels kd_loss_fwd and ensemble_kd_loss_fwd called directly with the arguments of the
kernel contract (coefficients computed on the host: inv_student_temp, inv_teacher_temp, kd_coef, ce_coef,
divergence, beta), against ued_fast.reference in float64: every divergence, teacher kind, target mode and
ensemble mix; odd class counts, strided rows, +-1e4 logits, -inf teacher entries, all-ignored rows,
separate student/teacher temperatures; the Meta kernels' shapes; bad arguments."""
from __future__ import annotations

import math

import pytest
import torch

from ued_fast import _backend
from ued_fast.reference import ensemble_kd_loss_reference, kd_loss_reference

pytestmark = pytest.mark.skipif(not _backend.extension_loaded(), reason="ued_fast._C is not built")

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd"]
KINDS = ["logits", "log_probs", "probs"]
IGNORE = -100


def coefficients(temperature, alpha, t2_scale, has_target, teacher_temperature=None):
    """The contract's host-side coefficients (what ued_fast/ops/_spine.py:kd_coefficients returns)."""
    s2 = temperature * temperature if t2_scale else 1.0
    tt = temperature if teacher_temperature is None else teacher_temperature
    kd_coef = alpha * s2 if has_target else s2
    ce_coef = 1.0 - alpha if has_target else 0.0
    return 1.0 / temperature, 1.0 / tt, kd_coef, ce_coef


def teacher_of(kind, logits):
    if kind == "logits":
        return logits
    log_p = torch.log_softmax(logits.double(), -1)
    return (log_p if kind == "log_probs" else log_p.exp()).to(logits.dtype)


def reference_rows_and_grad(fn, student, *args, **kwargs):
    s = student.detach().double().requires_grad_(True)
    rows = fn(s, *args, reduction="none", **kwargs)
    (grad,) = torch.autograd.grad(rows.sum(), s)
    return rows.detach(), grad


def kd_native(student, teacher, target, *, temperature, alpha, t2_scale=True, teacher_temperature=None,
              divergence="forward_kl", beta=0.5, teacher_kind="logits", compute_grad=True):
    inv_s, inv_t, kd_coef, ce_coef = coefficients(temperature, alpha, t2_scale, target is not None, teacher_temperature)
    return torch.ops.ued_fast.kd_loss_fwd(student, teacher, target, inv_s, inv_t, kd_coef, ce_coef,
                                          DIVERGENCES.index(divergence), beta, IGNORE, KINDS.index(teacher_kind),
                                          compute_grad)


def kd_reference(student, teacher, target, *, temperature, alpha, t2_scale=True, teacher_temperature=None,
                 divergence="forward_kl", beta=0.5, teacher_kind="logits"):
    return reference_rows_and_grad(
        kd_loss_reference, student, teacher.double(), target, temperature=temperature, alpha=alpha,
        t2_scale=t2_scale, ignore_index=IGNORE, teacher_kind=teacher_kind, divergence=divergence, beta=beta,
        teacher_temperature=teacher_temperature)


def kd_native_and_reference(student, teacher, target, **kw):
    """((rows, grad) of the C++ kernel, (rows, grad) of the float64 reference) for the same arguments."""
    return kd_native(student, teacher, target, **kw), kd_reference(student, teacher, target, **kw)


def assert_rows_and_grad_close(native, reference, rows_tol, grad_tol=None):
    """The kernel's loss rows and gradient against the reference's (grad_tol defaults to rows_tol)."""
    (rows, grad), (ref_rows, ref_grad) = native, reference
    torch.testing.assert_close(rows.double(), ref_rows, **rows_tol)
    torch.testing.assert_close(grad.double(), ref_grad, **(rows_tol if grad_tol is None else grad_tol))


EXACT = dict(rtol=1e-9, atol=1e-9)  # float64 in, float64 reference: only the summation order differs


def tolerances(dtype, scale=1.0):
    return dict(rtol=1e-9, atol=1e-9 * scale) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-5 * scale)


def make_target(n, c, mode, gen):
    if mode == "none":
        return None
    target = torch.randint(0, c, (n,), generator=gen)
    if mode == "ignored":
        target[::2] = IGNORE
    elif mode == "all_ignored":
        target[:] = IGNORE
    return target


def kd_inputs(seed, n, c, dtype=torch.float64, target_mode="none", scale=1.0):
    """Seeded student and teacher logits [n, c] (drawn in float32, then cast to dtype) and a target."""
    gen = torch.Generator().manual_seed(seed)
    student = (scale * torch.randn(n, c, generator=gen)).to(dtype)
    teacher = (scale * torch.randn(n, c, generator=gen)).to(dtype)
    return student, teacher, make_target(n, c, target_mode, gen)


def ensemble_inputs(seed, k, n, c, target_mode="none"):
    """Seeded float64 student [n, c], k stacked teachers [k, n, c], equal weights [k, n] and a target."""
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(n, c, generator=gen, dtype=torch.float64)
    stacked = torch.randn(k, n, c, generator=gen, dtype=torch.float64)
    return student, stacked, torch.full((k, n), 1.0 / k, dtype=torch.float64), make_target(n, c, target_mode, gen)


def check_kd(student, teacher, target, dtype_tol, scale=1.0, **kw):
    (rows, grad), reference = kd_native_and_reference(student, teacher, target, **kw)
    expected_loss_dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    assert rows.dtype == expected_loss_dtype and rows.shape == (student.shape[0],)
    assert grad.dtype == student.dtype and grad.shape == student.shape and grad.is_contiguous()
    assert_rows_and_grad_close((rows, grad), reference, tolerances(dtype_tol, scale), tolerances(dtype_tol))
    return rows, grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("target_mode", ["none", "ignored"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("C", [1, 3, 17, 1000, 4099])
def test_kd_loss_fwd_matches_reference(divergence, kind, target_mode, dtype, C):
    student, logits, target = kd_inputs(C * 7 + KINDS.index(kind), 6, C, dtype, target_mode, scale=3.0)
    teacher = teacher_of(kind, logits)
    check_kd(student, teacher, target, dtype, temperature=2.0, alpha=0.7, teacher_temperature=3.0,
             divergence=divergence, beta=0.3, teacher_kind=kind)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kd_loss_fwd_jsd_beta(beta, dtype):
    student, teacher, target = kd_inputs(5, 9, 33, dtype, "ignored")
    rows, grad = check_kd(student, teacher, target, dtype, temperature=1.5, alpha=0.6, divergence="jsd", beta=beta)
    if beta in (0.0, 1.0):  # m is one of p, q: the divergence is 0, the loss is the CE alone
        rows_ce, _ = kd_native(student, teacher, target, temperature=1.5, alpha=0.6, divergence="forward_kl")
        assert not torch.equal(rows, rows_ce)  # the forward KL does not vanish: the jsd path was taken
        kd_only, kd_grad = kd_native(student, teacher, None, temperature=1.5, alpha=0.6, divergence="jsd", beta=beta)
        assert kd_only.abs().max() < 1e-6 and kd_grad.abs().max() < 1e-6


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_kd_loss_fwd_divergences_differ(divergence):
    # Each code reaches its own math: the three divergences give three different losses.
    student, teacher, _ = kd_inputs(1, 4, 10)
    losses = {d: kd_native(student, teacher, None, temperature=2.0, alpha=0.5, divergence=d)[0] for d in DIVERGENCES}
    others = [d for d in DIVERGENCES if d != divergence]
    assert all(not torch.allclose(losses[divergence], losses[o]) for o in others)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_kd_loss_fwd_strided_rows(divergence, dtype):
    gen = torch.Generator().manual_seed(2)
    big_s = torch.randn(7, 2 * 19 + 3, generator=gen).to(dtype)
    big_t = torch.randn(7, 3 * 19, generator=gen).to(dtype)
    student, teacher = big_s[:, 3:22], big_t[:, ::3]  # row strides 41 and 57; the teacher's class stride is 3
    assert student.stride() == (41, 1) and teacher.stride(1) == 3
    target = make_target(7, 19, "ignored", gen)
    check_kd(student, teacher, target, dtype, temperature=3.0, alpha=0.4, divergence=divergence)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kd_loss_fwd_extreme_logits(divergence, dtype):
    student, teacher, target = kd_inputs(3, 5, 50, dtype, "ignored", scale=1e4)
    (rows, grad), reference = kd_native_and_reference(student, teacher, target, temperature=4.0, alpha=0.8,
                                                      divergence=divergence, beta=0.3)
    assert torch.isfinite(rows).all() and torch.isfinite(grad).all()
    # float32: q (h - S) cancels terms of the size of D (~1e4 here), so the gradient keeps ~1e-7 * D absolute.
    grad_atol = 1e-9 if dtype == torch.float64 else 1e-7 * float(reference[0].abs().max())
    assert_rows_and_grad_close((rows, grad), reference,
                               dict(rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=1e-6),
                               dict(rtol=1e-4, atol=grad_atol + 1e-5))


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("kind", ["logits", "probs"])
def test_kd_loss_fwd_zero_probability_teacher(divergence, kind):
    # -inf teacher logits / zero teacher probabilities: 0 * log 0 = 0; reverse_kl where p = 0 < q is +inf.
    student, logits, _ = kd_inputs(4, 6, 12)
    logits[:, ::3] = -math.inf
    teacher = teacher_of(kind, logits)
    kw = dict(temperature=2.0, alpha=1.0, divergence=divergence, beta=0.3, teacher_kind=kind)
    (rows, grad), reference = kd_native_and_reference(student, teacher, None, **kw)
    if divergence == "reverse_kl":
        assert torch.isposinf(rows).all() and torch.isposinf(reference[0]).all()
        return
    assert torch.isfinite(rows).all() and torch.isfinite(grad).all()
    assert_rows_and_grad_close((rows, grad), reference, EXACT)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_kd_and_ensemble_with_one_term_only(divergence, alpha):
    # alpha 0: kd_coef = 0, the CE alone; alpha 1: ce_coef = 0, the divergence alone.
    student, stacked, weights, target = ensemble_inputs(8, 2, 5, 11, "ignored")
    check_kd(student, stacked[0], target, torch.float64, temperature=2.0, alpha=alpha, divergence=divergence)
    for mix in ("prob", "logit"):
        assert_rows_and_grad_close(*ensemble_native_and_reference(
            student, stacked.unbind(0), weights, target, mix=mix, temperature=2.0, alpha=alpha,
            divergence=divergence), EXACT)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_kd_loss_fwd_all_ignored_rows(divergence):
    student, teacher, target = kd_inputs(6, 4, 9, target_mode="all_ignored")
    rows, grad = kd_native(student, teacher, target, temperature=2.0, alpha=0.5, divergence=divergence)
    assert torch.equal(rows, torch.zeros(4, dtype=torch.float64)) and torch.equal(grad, torch.zeros_like(student))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_kd_loss_fwd_half_inputs(divergence, dtype):
    student, teacher, target = kd_inputs(7, 5, 40, dtype, "ignored")
    (rows, grad), reference = kd_native_and_reference(student, teacher, target, temperature=2.0, alpha=0.7,
                                                      divergence=divergence)
    assert rows.dtype == torch.float32 and grad.dtype == dtype
    assert_rows_and_grad_close((rows, grad), reference, dict(rtol=1e-4, atol=1e-5), dict(rtol=1e-2, atol=1e-3))


def test_kd_loss_fwd_without_grad_returns_an_empty_grad():
    student = torch.randn(3, 5, dtype=torch.float64)
    rows, grad = kd_native(student, student.flip(1), None, temperature=2.0, alpha=0.5, divergence="jsd",
                           compute_grad=False)
    assert rows.shape == (3,) and grad.numel() == 0
    ref_rows, _ = kd_reference(student, student.flip(1), None, temperature=2.0, alpha=0.5, divergence="jsd")
    torch.testing.assert_close(rows, ref_rows)


# ---- ensemble_kd_loss_fwd ----

def ensemble_native(student, teachers, weights, target, *, mix, temperature, alpha, t2_scale=True,
                    teacher_temperature=None, divergence="forward_kl", beta=0.5, compute_grad=True):
    inv_s, inv_t, kd_coef, ce_coef = coefficients(temperature, alpha, t2_scale, target is not None, teacher_temperature)
    return torch.ops.ued_fast.ensemble_kd_loss_fwd(student, list(teachers), weights, target, inv_s, inv_t, kd_coef,
                                                   ce_coef, DIVERGENCES.index(divergence), beta, IGNORE,
                                                   ["prob", "logit"].index(mix), compute_grad)


def ensemble_native_and_reference(student, teachers, weights, target, **kw):
    """((rows, grad) of the C++ kernel, (rows, grad) of the float64 reference) for the same arguments."""
    native = ensemble_native(student, teachers, weights, target, **kw)
    reference = reference_rows_and_grad(ensemble_kd_loss_reference, student, torch.stack(list(teachers)).double(),
                                        weights.double(), target, ignore_index=IGNORE, **kw)
    return native, reference


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("target_mode", ["none", "ignored"])
@pytest.mark.parametrize("mix", ["prob", "logit"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("C", [1, 3, 17, 1000, 4099])
def test_ensemble_kd_loss_fwd_matches_reference(divergence, mix, target_mode, dtype, C):
    gen = torch.Generator().manual_seed(C + 11)
    k, n = 3, 5
    student = (3 * torch.randn(n, C, generator=gen)).to(dtype)
    stacked = (3 * torch.randn(k, n, C, generator=gen)).to(dtype)  # the teachers are views of one tensor
    weights = torch.rand(k, n, generator=gen, dtype=torch.float64) + 0.1
    weights[1, 0] = 0.0  # a teacher left out of one row
    weights = (weights / weights.sum(0)).to(torch.float64 if dtype == torch.float64 else torch.float32)
    target = make_target(n, C, target_mode, gen)
    (rows, grad), reference = ensemble_native_and_reference(
        student, stacked.unbind(0), weights, target, mix=mix, temperature=2.0, alpha=0.7, teacher_temperature=1.5,
        divergence=divergence, beta=0.3)
    assert grad.dtype == dtype and grad.shape == student.shape
    assert_rows_and_grad_close((rows, grad), reference, tolerances(dtype))


@pytest.mark.parametrize("beta", [0.0, 1.0])
@pytest.mark.parametrize("mix", ["prob", "logit"])
def test_ensemble_kd_loss_fwd_jsd_beta_edges(mix, beta):
    student, stacked, weights, _ = ensemble_inputs(12, 2, 4, 21)
    assert_rows_and_grad_close(*ensemble_native_and_reference(
        student, stacked.unbind(0), weights, None, mix=mix, temperature=2.0, alpha=0.5, divergence="jsd", beta=beta),
        EXACT)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("mix", ["prob", "logit"])
def test_ensemble_kd_loss_fwd_extreme_logits_and_separate_teachers(mix, divergence):
    gen = torch.Generator().manual_seed(13)
    student = 1e4 * torch.randn(4, 30, generator=gen, dtype=torch.float64)
    # Separate tensors with their own row strides (not one stacked tensor).
    teachers = [(1e4 * torch.randn(4, 45, generator=gen, dtype=torch.float64))[:, :30] for _ in range(2)]
    weights = torch.tensor([[0.25], [0.75]], dtype=torch.float64).expand(2, 4)  # stride 0 along N
    target = make_target(4, 30, "ignored", gen)
    (rows, grad), reference = ensemble_native_and_reference(student, teachers, weights, target, mix=mix,
                                                            temperature=4.0, alpha=0.8, divergence=divergence, beta=0.3)
    assert torch.isfinite(rows).all() and torch.isfinite(grad).all()
    assert_rows_and_grad_close((rows, grad), reference, dict(rtol=1e-9, atol=1e-6), dict(rtol=1e-7, atol=1e-9))


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_ensemble_kd_loss_fwd_all_ignored_rows(divergence):
    student, stacked, weights, target = ensemble_inputs(14, 2, 3, 8, "all_ignored")
    rows, grad = ensemble_native(student, stacked.unbind(0), weights, target, mix="prob", temperature=2.0, alpha=0.5,
                                 divergence=divergence)
    assert torch.equal(rows, torch.zeros(3, dtype=torch.float64)) and torch.equal(grad, torch.zeros_like(student))


# ---- Meta kernels and bad arguments ----

@pytest.mark.parametrize("compute_grad", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_meta_kernels_give_the_output_shapes(dtype, compute_grad):
    student = torch.empty(7, 13, device="meta", dtype=dtype)
    target = torch.empty(7, device="meta", dtype=torch.long)
    loss_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    rows, grad = torch.ops.ued_fast.kd_loss_fwd(student, student, target, 0.5, 0.25, 3.0, 0.2, 2, 0.3, IGNORE, 0,
                                                compute_grad)
    assert rows.device.type == "meta" and rows.shape == (7,) and rows.dtype == loss_dtype
    assert grad.shape == ((7, 13) if compute_grad else (0,)) and grad.dtype == dtype
    weights = torch.empty(3, 7, device="meta", dtype=loss_dtype)
    rows, grad = torch.ops.ued_fast.ensemble_kd_loss_fwd(student, [student] * 3, weights, target, 0.5, 0.25, 3.0, 0.2,
                                                         1, 0.3, IGNORE, 1, compute_grad)
    assert rows.device.type == "meta" and rows.shape == (7,) and rows.dtype == loss_dtype
    assert grad.shape == ((7, 13) if compute_grad else (0,)) and grad.dtype == dtype


BAD_SCALARS = [
    (dict(divergence=3), "divergence"),
    (dict(divergence=-1), "divergence"),
    (dict(beta=-0.1), "beta"),
    (dict(beta=1.5), "beta"),
    (dict(beta=math.nan), "beta"),
    (dict(inv_student_temp=0.0), "inv_student_temp"),
    (dict(inv_teacher_temp=math.inf), "inv_teacher_temp"),
    (dict(kd_coef=-1.0), "kd_coef"),
    (dict(ce_coef=math.nan), "ce_coef"),
]


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("bad,name", BAD_SCALARS)
def test_bad_scalar_arguments_are_named(bad, name, device):
    args = dict(inv_student_temp=0.5, inv_teacher_temp=0.5, kd_coef=1.0, ce_coef=0.5, divergence=0, beta=0.5)
    args.update(bad)
    student = torch.randn(2, 4, device=device)
    target = torch.zeros(2, dtype=torch.long, device=device)
    scalars = [args[k] for k in ("inv_student_temp", "inv_teacher_temp", "kd_coef", "ce_coef", "divergence", "beta")]
    with pytest.raises(ValueError, match=f"kd_loss_fwd: {name}"):
        torch.ops.ued_fast.kd_loss_fwd(student, student, target, *scalars, IGNORE, 0, True)
    weights = torch.full((1, 2), 1.0, device=device)
    with pytest.raises(ValueError, match=f"ensemble_kd_loss_fwd: {name}"):
        torch.ops.ued_fast.ensemble_kd_loss_fwd(student, [student], weights, target, *scalars, IGNORE, 0, True)


def test_bad_codes_and_shapes_are_named():
    student = torch.randn(2, 4)
    with pytest.raises(ValueError, match="teacher_kind"):
        torch.ops.ued_fast.kd_loss_fwd(student, student, None, 1.0, 1.0, 1.0, 0.0, 0, 0.5, IGNORE, 3, True)
    with pytest.raises(ValueError, match="teacher has shape"):
        torch.ops.ued_fast.kd_loss_fwd(student, student[:, :3], None, 1.0, 1.0, 1.0, 0.0, 0, 0.5, IGNORE, 0, True)
    with pytest.raises(ValueError, match="mix"):
        torch.ops.ued_fast.ensemble_kd_loss_fwd(student, [student], torch.ones(1, 2), None, 1.0, 1.0, 1.0, 0.0, 0,
                                                0.5, IGNORE, 2, True)
    with pytest.raises(ValueError, match="weights must be"):
        torch.ops.ued_fast.ensemble_kd_loss_fwd(student, [student], torch.ones(2, 2), None, 1.0, 1.0, 1.0, 0.0, 0,
                                                0.5, IGNORE, 0, True)
    with pytest.raises(TypeError, match="target must be int64"):
        torch.ops.ued_fast.kd_loss_fwd(student, student, torch.zeros(2), 1.0, 1.0, 1.0, 0.0, 0, 0.5, IGNORE, 0, True)
