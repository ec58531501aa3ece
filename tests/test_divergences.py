"""The divergences (forward_kl, reverse_kl, jsd with beta) and the separate teacher temperature, on every
KD op and every backend here, against the float64 reference (loss and gradient); the kernel contract's
closed-form gradients against the reference's autograd; kd_coefficients; gradcheck; extreme logits;
torch.compile; bad input. Triton runs on CPU tensors only under TRITON_INTERPRET=1."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import ued_fast
from ued_fast.ops import _spine
from ued_fast.reference import (DIVERGENCES, REDUCTIONS, TEACHER_KINDS, divergence_rows, ensemble_kd_loss_reference,
                                ensemble_log_probs, kd_loss_reference)

from conftest import assert_close, backend_cases, teacher_as_kind

KD_CASES = backend_cases("kd_loss")
FP64_BACKENDS = [b for b in ued_fast.available_backends("cpu") if b in ("reference", "cpp")]
BETAS = (0.0, 1.0, 0.3)


def _case(n=7, c=11, seed=0, ignored=True):
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(n, c, generator=gen, dtype=torch.float64) * 2
    t = torch.randn(n, c, generator=gen, dtype=torch.float64) * 2
    y = torch.randint(0, c, (n,), generator=gen)
    if ignored:
        y[1] = -100
    return s, t, y


def _dtype(backend: str) -> torch.dtype:
    return torch.float64 if backend in ("cpp", "reference") else torch.float32


def _tol(dtype):
    return (1e-9, 1e-10) if dtype == torch.float64 else (2e-4, 2e-5)


def _assert_loss_and_grad_close(got, grad, want, want_grad, dtype, what):
    rtol, atol = _tol(dtype)
    assert_close(got, want, rtol=rtol, atol=atol, what=what + " loss")
    assert_close(grad, want_grad, rtol=rtol, atol=atol, what=what + " grad")


def _loss_and_grad(fn, s):
    x = s.clone().requires_grad_()
    loss = fn(x)
    (g,) = torch.autograd.grad(loss, x, torch.ones_like(loss))
    return loss.detach(), g


# --- the kernel contract in PyTorch, with its closed-form gradients --------------------------------------

def contract_rows(student, log_p, target, inv_student_temp, kd_coef, ce_coef, divergence, beta, ignore_index):
    """(row_loss, grad) of the contract from the teacher's log-distribution, with the contract's formulas for
    dD/dz (no autograd)."""
    log_q = F.log_softmax(student * inv_student_temp, -1)
    q, p = log_q.exp(), log_p.exp()
    if divergence == 0:
        d = (p * torch.where(p > 0, log_p - log_q, torch.zeros_like(p))).sum(-1)
        dd = q - p
    elif divergence == 1:
        d = (q * torch.where(q > 0, log_q - log_p, torch.zeros_like(q))).sum(-1)
        dd = q * (log_q - log_p - d[:, None])
    else:
        d = divergence_rows(log_p, log_q, "jsd", beta)
        log_m = log_q if beta == 0 else log_p if beta == 1 else torch.logaddexp(
            log_p + math.log(beta), log_q + math.log1p(-beta))
        # beta = 1: D = KL(p || p) = 0 for every q, so g = 0 (also where p = 0 < q, not 0 * inf).
        g = torch.zeros_like(q) if beta == 1 else (1 - beta) * (log_q - log_m)
        dd = q * (g - (q * g).sum(-1, keepdim=True))
    rows, grad = kd_coef * d, kd_coef * inv_student_temp * dd
    if target is not None:
        valid = target != ignore_index
        safe = torch.where(valid, target, torch.zeros_like(target))
        rows = rows + ce_coef * (torch.logsumexp(student, -1) - student.gather(-1, safe[:, None]).squeeze(-1))
        grad = grad + ce_coef * (F.softmax(student, -1) - F.one_hot(safe, student.shape[-1]).to(student.dtype))
        rows = torch.where(valid, rows, torch.zeros_like(rows))
        grad = torch.where(valid[:, None], grad, torch.zeros_like(grad))
    return rows, grad


def contract_kd_loss_fwd(student, teacher, target, inv_student_temp, inv_teacher_temp, kd_coef, ce_coef,
                         divergence, beta, ignore_index, teacher_kind, compute_grad):
    """kd_loss_fwd of the contract, in PyTorch (float64 for float64, else float32)."""
    cd = torch.float64 if student.dtype == torch.float64 else torch.float32
    scores = teacher.to(cd).log() if teacher_kind == 2 else teacher.to(cd)
    log_p = F.log_softmax(scores * inv_teacher_temp, -1)
    rows, grad = contract_rows(student.to(cd), log_p, target, inv_student_temp, kd_coef, ce_coef, divergence,
                               beta, ignore_index)
    return rows, grad.to(student.dtype) if compute_grad else student.new_empty(0)


def contract_ensemble_kd_loss_fwd(student, teachers, weights, target, inv_student_temp, inv_teacher_temp, kd_coef,
                                  ce_coef, divergence, beta, ignore_index, mix, compute_grad):
    """ensemble_kd_loss_fwd of the contract, in PyTorch."""
    cd = torch.float64 if student.dtype == torch.float64 else torch.float32
    stack = teachers if isinstance(teachers, torch.Tensor) else torch.stack(list(teachers))
    log_p = ensemble_log_probs(stack.to(cd) * inv_teacher_temp, weights.to(cd), 1.0, ("prob", "logit")[mix])
    rows, grad = contract_rows(student.to(cd), log_p, target, inv_student_temp, kd_coef, ce_coef, divergence,
                               beta, ignore_index)
    return rows, grad.to(student.dtype) if compute_grad else student.new_empty(0)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("kind", TEACHER_KINDS)
@pytest.mark.parametrize("has_target", [True, False])
def test_contract_gradients_are_the_references(divergence, beta, kind, has_target):
    """The contract's closed-form dD/dz (what every kernel writes) is the reference's autograd gradient."""
    s, t, y = _case(seed=1)
    y = y if has_target else None
    teacher = teacher_as_kind(t, kind, 2.5)
    kw = dict(temperature=1.7, alpha=0.6, t2_scale=True, teacher_kind=kind, teacher_temperature=2.5,
              divergence=divergence, beta=beta)
    want, want_grad = _loss_and_grad(lambda x: kd_loss_reference(x, teacher, y, reduction="none", **kw), s)
    coef = _spine.kd_coefficients(1.7, 0.6, True, has_target, kind, 2.5, divergence, beta)
    rows, grad = contract_kd_loss_fwd(s, teacher, y, *coef, -100, _spine.KERNEL_TEACHER_KIND[kind], True)
    assert_close(rows, want, rtol=1e-10, atol=1e-12, what="contract rows")
    assert_close(grad, want_grad, rtol=1e-9, atol=1e-12, what="contract grad")


# --- kd_coefficients ---------------------------------------------------------------------------------------

def test_kd_coefficients_follow_the_contract():
    c = _spine.kd_coefficients(2.0, 0.25, True, True, "logits", None, "jsd", 0.3)
    assert c == (0.5, 0.5, 0.25 * 4.0, 0.75, 2, 0.3)
    assert c._fields == ("inv_student_temp", "inv_teacher_temp", "kd_coef", "ce_coef", "divergence", "beta")
    assert _spine.kd_coefficients(2.0, 0.25, True, False) == (0.5, 0.5, 4.0, 0.0, 0, 0.5)
    assert _spine.kd_coefficients(2.0, 0.25, False, True, "probs", 5.0, "reverse_kl")[:5] == (0.5, 0.2, 0.25, 0.75, 1)
    for kind, code in (("tempered_probs", 2), ("tempered_log_probs", 1)):
        assert _spine.kd_coefficients(3.0, 0.5, True, True, kind, 7.0).inv_teacher_temp == 1.0
        assert _spine.KERNEL_TEACHER_KIND[kind] == code


# --- every op and backend against the float64 reference ----------------------------------------------------

@pytest.mark.parametrize("backend,device", KD_CASES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("kind", TEACHER_KINDS)
def test_kd_loss_divergences(backend, device, divergence, kind):
    dtype = _dtype(backend)
    s, t, y = _case(seed=2)
    teacher = teacher_as_kind(t, kind, 3.0)
    for target in (y, None):
        for reduction in REDUCTIONS:
            for beta in ((0.0, 1.0, 0.3) if divergence == "jsd" else (0.5,)):
                kw = dict(temperature=2.0, alpha=0.7, reduction=reduction, teacher_kind=kind, divergence=divergence,
                          beta=beta, teacher_temperature=3.0)
                want, want_grad = _loss_and_grad(lambda x: kd_loss_reference(x, teacher, target, **kw), s)
                got, grad = _loss_and_grad(
                    lambda x: ued_fast.kd_loss(x.to(dtype).to(device), teacher.to(dtype).to(device), target
                                               if target is None else target.to(device), backend=backend, **kw), s)
                _assert_loss_and_grad_close(
                    got, grad, want, want_grad, dtype,
                    f"{backend} {divergence} {kind} beta={beta} {reduction} target={target is not None}")


@pytest.mark.parametrize("backend,device", backend_cases("ensemble_kd_loss"))
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("mix", ["prob", "logit"])
@pytest.mark.parametrize("kind", ["logits", "probs", "tempered_log_probs"])
def test_ensemble_kd_loss_divergences(backend, device, divergence, mix, kind):
    dtype = _dtype(backend)
    s, _, y = _case(seed=3)
    gen = torch.Generator().manual_seed(4)
    teachers = teacher_as_kind(torch.randn(3, *s.shape, generator=gen, dtype=torch.float64) * 2, kind, 1.5)
    weights = torch.rand(3, s.shape[0], generator=gen, dtype=torch.float64)
    weights[0, 2] = 0.0  # a left-out teacher
    for target, reduction in ((y, "batchmean"), (None, "none"), (y, "mean")):
        kw = dict(mix=mix, temperature=2.5, alpha=0.4, reduction=reduction, teacher_kind=kind,
                  divergence=divergence, beta=0.3, teacher_temperature=1.5)
        want, want_grad = _loss_and_grad(lambda x: ensemble_kd_loss_reference(x, teachers, weights, target, **kw), s)
        got, grad = _loss_and_grad(lambda x: ued_fast.ensemble_kd_loss(
            x.to(dtype).to(device), teachers.to(dtype).to(device), None if target is None else target.to(device),
            weights=weights.to(device), backend=backend, **kw), s)
        _assert_loss_and_grad_close(got, grad, want, want_grad, dtype,
                                    f"{backend} {divergence} {mix} {kind} {reduction}")


@pytest.mark.parametrize("backend", FP64_BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_gradcheck(backend, divergence):
    s, t, y = _case(n=4, c=6, seed=5)
    teachers = torch.stack([t, -t.flip(0)])
    for kind, target in (("logits", y), ("probs", None), ("tempered_log_probs", y)):
        teacher = teacher_as_kind(t, kind, 0.8)
        assert torch.autograd.gradcheck(
            lambda x: ued_fast.kd_loss(x, teacher, target, temperature=1.3, alpha=0.6, teacher_kind=kind,
                                       divergence=divergence, beta=0.3, teacher_temperature=0.8, backend=backend),
            (s.clone().requires_grad_(),))
    assert torch.autograd.gradcheck(
        lambda x: ued_fast.ensemble_kd_loss(x, teachers, y, mix="logit", temperature=1.3, divergence=divergence,
                                            beta=0.7, teacher_temperature=2.0, reduction="sum", backend=backend),
        (s.clone().requires_grad_(),))


def test_teacher_temperature_defaults_to_temperature_and_matters():
    s, t, y = _case(seed=6)
    base = ued_fast.kd_loss(s, t, y, temperature=2.0, backend="reference")
    assert torch.equal(base, ued_fast.kd_loss(s, t, y, temperature=2.0, teacher_temperature=2.0, backend="reference"))
    other = ued_fast.kd_loss(s, t, y, temperature=2.0, teacher_temperature=1.0, backend="reference")
    assert not torch.allclose(base, other)
    # The teacher's temperature is its softmax's: teacher_temperature=1 against logits t is softmax(t).
    same = ued_fast.kd_loss(s, F.softmax(t, -1), y, temperature=2.0, teacher_kind="tempered_probs",
                            backend="reference")
    torch.testing.assert_close(other, same)


@pytest.mark.parametrize("backend,device", KD_CASES)
def test_extreme_logits(backend, device):
    """Logits of +-1e4 and -inf teacher entries: forward_kl and jsd (beta 0, 0.3 and 1) stay finite with
    finite gradients; reverse_kl where the teacher gives 0 and the student not is +inf."""
    dtype = _dtype(backend)
    s = torch.tensor([[1e4, -1e4, 0.0, 3.0], [-1e4, 1e4, 2.0, 1.0], [0.5, 0.0, -0.5, 1.0]], dtype=torch.float64)
    t = torch.tensor([[1e4, -math.inf, 0.0, -1e4], [2.0, 1e4, -math.inf, 0.0], [1.0, 2.0, 3.0, -math.inf]],
                     dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    for divergence, beta in (("forward_kl", 0.5), ("jsd", 0.3), ("jsd", 0.0), ("jsd", 1.0), ("reverse_kl", 0.5)):
        kw = dict(temperature=1.5, alpha=0.5, reduction="none", divergence=divergence, beta=beta)
        want, want_grad = _loss_and_grad(lambda x: kd_loss_reference(x, t, y, **kw), s)
        got = ued_fast.kd_loss(s.to(dtype).to(device), t.to(dtype).to(device), y.to(device), backend=backend, **kw)
        rtol, atol = _tol(dtype)
        if divergence == "reverse_kl":
            assert bool(torch.isinf(want[2])) and want[2] > 0  # q > 0 = p on class 3
            assert bool(torch.isinf(got[2].cpu())) and got[2] > 0
            continue
        assert bool(torch.isfinite(want).all()) and bool(torch.isfinite(want_grad).all())
        _, grad = _loss_and_grad(lambda x: ued_fast.kd_loss(x.to(dtype).to(device), t.to(dtype).to(device),
                                                            y.to(device), backend=backend, **kw), s)
        assert_close(got, want, rtol=rtol, atol=atol * 1e4, what=f"{backend} {divergence} extreme loss")
        assert_close(grad, want_grad, rtol=rtol, atol=atol, what=f"{backend} {divergence} extreme grad")


@pytest.mark.parametrize("backend", [b for b in ued_fast.available_backends("cpu")])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("ensemble", [False, True])
def test_fused_linear_divergences(backend, divergence, ensemble):
    dtype = _dtype(backend)
    gen = torch.Generator().manual_seed(7)
    n, h, v = 13, 5, 17
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64)
    teachers = torch.randn(2, n, v, generator=gen, dtype=torch.float64) * 2
    y = torch.randint(0, v, (n,), generator=gen)
    y[4] = -100
    kw = dict(temperature=2.0, alpha=0.3, divergence=divergence, beta=0.3, teacher_temperature=1.5)
    for reduction in ("batchmean", "none"):
        h_, w_ = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        if ensemble:
            want = ensemble_kd_loss_reference(h_ @ w_.T, teachers, None, y, reduction=reduction, **kw)
        else:
            want = kd_loss_reference(h_ @ w_.T, teachers[0], y, reduction=reduction, **kw)
        want_grads = torch.autograd.grad(want, (h_, w_), torch.ones_like(want))
        h2, w2 = hidden.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_()
        if ensemble:
            got = ued_fast.fused_linear_ensemble_kd_loss(h2, w2, teachers.to(dtype), y, reduction=reduction,
                                                         chunk_size=4, backend=backend, **kw)
        else:
            got = ued_fast.fused_linear_kd_loss(h2, w2, teachers[0].to(dtype), y, reduction=reduction, chunk_size=4,
                                                backend=backend, **kw)
        grads = torch.autograd.grad(got, (h2, w2), torch.ones_like(got))
        rtol, atol = _tol(dtype)
        assert_close(got, want, rtol=rtol, atol=atol, what=f"{backend} {divergence} {reduction} loss")
        for a, b, name in zip(grads, want_grads, ("hidden", "weight")):
            assert_close(a, b, rtol=rtol * 10, atol=atol * 10, what=f"{backend} {divergence} {reduction} {name}")


@pytest.mark.parametrize("backend", FP64_BACKENDS)
def test_torch_compile_fullgraph_with_a_divergence(backend):
    torch._dynamo.reset()
    s, t, y = _case(seed=8)
    kw = dict(temperature=2.0, alpha=0.8, divergence="jsd", beta=0.3, teacher_temperature=3.0)

    def step(x, t, y):
        return ued_fast.kd_loss(x, t, y, backend=backend, **kw) * 2.0

    x = s.clone().requires_grad_()
    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(x, t, y)
    (g,) = torch.autograd.grad(loss, x)
    want, want_grad = _loss_and_grad(lambda z: kd_loss_reference(z, t, y, **kw) * 2.0, s)
    torch.testing.assert_close(loss.detach(), want)
    torch.testing.assert_close(g, want_grad)


def test_double_backward_through_a_divergence():
    """create_graph=True on a native backend recomputes through the reference, with the divergence."""
    backend = ued_fast.available_backends("cpu")[0]
    s, t, y = _case(seed=9)
    s = s.to(_dtype(backend))
    kw = dict(temperature=1.5, divergence="reverse_kl", teacher_temperature=2.0)
    x = s.clone().requires_grad_()
    (g,) = torch.autograd.grad(ued_fast.kd_loss(x, t.to(s.dtype), y, backend=backend, **kw), x, create_graph=True)
    x64 = s.double().clone().requires_grad_()
    (g64,) = torch.autograd.grad(kd_loss_reference(x64, t, y, **kw), x64, create_graph=True)
    (gg,) = torch.autograd.grad(g.pow(2).sum(), x)
    (gg64,) = torch.autograd.grad(g64.pow(2).sum(), x64)
    rtol, atol = _tol(s.dtype)
    assert_close(gg, gg64, rtol=rtol * 10, atol=atol * 10, what="second derivative")


def test_modules_take_the_divergence():
    s, t, y = _case(seed=10)
    mod = ued_fast.KDLoss(divergence="jsd", beta=0.2, teacher_temperature=2.0, backend="reference")
    assert "divergence='jsd'" in repr(mod) and "beta=0.2" in repr(mod)
    torch.testing.assert_close(mod(s, t, y), kd_loss_reference(s, t, y, divergence="jsd", beta=0.2,
                                                               teacher_temperature=2.0))
    ens = ued_fast.EnsembleKDLoss(divergence="reverse_kl", backend="reference")
    torch.testing.assert_close(ens(s, torch.stack([t, -t])),
                               ensemble_kd_loss_reference(s, torch.stack([t, -t]), divergence="reverse_kl"))
    assert "reverse_kl" in repr(ued_fast.FusedLinearKDLoss(divergence="reverse_kl"))
    assert "beta=0.9" in repr(ued_fast.FusedLinearEnsembleKDLoss(divergence="jsd", beta=0.9))


# --- bad input -------------------------------------------------------------------------------------------

_BAD = [
    (dict(divergence="kl"), ValueError, "divergence"),
    (dict(divergence=None), ValueError, "divergence"),
    (dict(beta=1.5), ValueError, "beta"),
    (dict(beta=-0.1), ValueError, "beta"),
    (dict(beta=math.nan), ValueError, "beta"),
    (dict(beta="0.5"), TypeError, "beta"),
    (dict(teacher_temperature=0.0), ValueError, "teacher_temperature"),
    (dict(teacher_temperature=-2.0), ValueError, "teacher_temperature"),
    (dict(teacher_temperature=math.inf), ValueError, "teacher_temperature"),
    (dict(teacher_temperature=math.nan), ValueError, "teacher_temperature"),
    (dict(teacher_temperature=True), TypeError, "teacher_temperature"),
]


@pytest.mark.parametrize("kwargs,error,name", _BAD)
def test_bad_divergence_arguments_name_the_argument(kwargs, error, name):
    s, t, y = _case(seed=11)
    head, logits = torch.randn(5, s.shape[1], dtype=s.dtype), t[:, :5]
    y_head = y.clamp(max=4)
    calls = [
        lambda: ued_fast.kd_loss(s, t, y, **kwargs),
        lambda: ued_fast.ensemble_kd_loss(s, torch.stack([t, t]), y, **kwargs),
        lambda: ued_fast.KDLoss(**kwargs),
        lambda: ued_fast.EnsembleKDLoss(**kwargs),
        lambda: ued_fast.fused_linear_kd_loss(s, head, logits, y_head, **kwargs),
        lambda: ued_fast.fused_linear_ensemble_kd_loss(s, head, torch.stack([logits, logits]), y_head, **kwargs),
        lambda: ued_fast.FusedLinearKDLoss(**kwargs),
        lambda: ued_fast.FusedLinearEnsembleKDLoss(**kwargs),
    ]
    for call in calls:
        with pytest.raises(error, match=name):
            call()
