"""Second derivatives and torch.func transforms through every fused op, on every backend here.

The kernels make the first gradient in the forward pass; a backward with create_graph=True must still
give a gradient that is differentiable again (the ops recompute it through the reference). Expected
values: the reference's own double backward in float64.
"""
from __future__ import annotations

import pytest
import torch

import ued_fast
from ued_fast.reference import TEACHER_KINDS

from conftest import backend_cases, teacher_as_kind

# The Triton interpreter evaluates masked-out lanes too: numpy warns.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

N, C, K = 6, 7, 3
COVER = [[0, 1, 2], [2, 3], [3, 4, 5, 6], [6, 0]]


def _dtype(backend):
    return torch.float64 if backend in ("cpp", "reference") else torch.float32


def _tol(dtype):
    return dict(rtol=1e-9, atol=1e-11) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-5)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _second_order(fn, inputs, out_shape, seed=0):
    """(first gradients, d/d(inputs, grad_output) of <first gradients, v>): the Hessian-vector products
    of fn at `inputs` with a non-trivial grad_output that itself requires grad."""
    g = _gen(seed)
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    grad_out = (torch.rand(out_shape, generator=g, dtype=torch.float64) + 0.5).to(inputs[0])
    grad_out.requires_grad_()
    out = fn(*inputs)
    firsts = torch.autograd.grad(out, inputs, grad_out.to(out.dtype), create_graph=True)
    vs = [torch.randn(x.shape, generator=g, dtype=torch.float64).to(x) for x in inputs]
    inner = sum((f * v).sum() for f, v in zip(firsts, vs))
    seconds = torch.autograd.grad(inner, inputs + [grad_out], allow_unused=True)
    return [f.detach().double().cpu() for f in firsts], [
        torch.zeros(x.shape, dtype=torch.float64) if s is None else s.double().cpu()
        for s, x in zip(seconds, inputs + [grad_out])]


def _assert_same(got, want, dtype, what):
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, **_tol(dtype), msg=lambda m: f"{what} [{i}]: {m}")


def _kd_inputs(dtype, seed=1):
    g = _gen(seed)
    s = torch.randn(N, C, generator=g, dtype=torch.float64) * 2
    t = torch.randn(N, C, generator=g, dtype=torch.float64) * 2
    y = torch.tensor([0, 3, -100, 6, 2, 1])
    return s.to(dtype), t.to(dtype), y


@pytest.mark.parametrize("reduction", ["batchmean", "none", "mean"])
@pytest.mark.parametrize("with_target", [True, False], ids=["target", "no-target"])
@pytest.mark.parametrize("backend,device", backend_cases("kd_loss"))
def test_kd_loss_double_backward_matches_reference(backend, device, with_target, reduction):
    dtype = _dtype(backend)
    s, t, y = _kd_inputs(dtype)
    y = y if with_target else None
    kw = dict(temperature=2.0, alpha=0.7, reduction=reduction)
    shape = (N,) if reduction == "none" else ()
    t_dev, y_dev = t.to(device), None if y is None else y.to(device)
    got = _second_order(lambda x: ued_fast.kd_loss(x, t_dev, y_dev, backend=backend, **kw), [s.to(device)], shape)
    want = _second_order(lambda x: ued_fast.kd_loss_reference(x, t.double(), y, **kw), [s.double()], shape)
    assert want[1][0].abs().max() > 1e-3  # the check has something to compare: the Hessian is not 0
    _assert_same(got[0] + got[1], want[0] + want[1], dtype, f"kd_loss {backend}")


@pytest.mark.parametrize("teacher_kind", TEACHER_KINDS)
@pytest.mark.parametrize("mix", ["prob", "logit"])
@pytest.mark.parametrize("backend,device", backend_cases("ensemble_kd_loss"))
def test_ensemble_kd_loss_double_backward_matches_reference(backend, device, mix, teacher_kind):
    dtype = _dtype(backend)
    g = _gen(2)
    s = (torch.randn(N, C, generator=g, dtype=torch.float64) * 2).to(dtype)
    logits = torch.randn(K, N, C, generator=g, dtype=torch.float64) * 2
    teachers = teacher_as_kind(logits, teacher_kind, 1.5).to(dtype)
    w = torch.rand(K, N, generator=g, dtype=torch.float64) + 0.1
    y = torch.tensor([0, 3, -100, 6, 2, 1])
    kw = dict(mix=mix, temperature=1.5, alpha=0.6, teacher_kind=teacher_kind)
    t_dev, y_dev, w_dev = teachers.to(device), y.to(device), w.to(dtype).to(device)
    got = _second_order(lambda x: ued_fast.ensemble_kd_loss(x, t_dev, y_dev, weights=w_dev, backend=backend, **kw),
                        [s.to(device)], ())
    want = _second_order(lambda x: ued_fast.ensemble_kd_loss_reference(x, teachers.double(), w, y, **kw),
                         [s.double()], ())
    assert want[1][0].abs().max() > 1e-3
    _assert_same(got[0] + got[1], want[0] + want[1], dtype, f"ensemble_kd_loss {backend}")


def _heads_inputs(backend, mode, seed=3):
    """The dtype `backend` is tested in, and grouped_heads inputs [features, weight, bias] in that dtype."""
    dtype = _dtype(backend)
    g = _gen(seed)
    k, d = len(COVER), 5
    width = max(len(c) for c in COVER) + (1 if mode == "prob_mean" else 0)
    features = torch.randn(N, k * d, generator=g, dtype=torch.float64)
    weight = torch.randn(k, d, width, generator=g, dtype=torch.float64) * 0.5
    bias = torch.randn(k, width, generator=g, dtype=torch.float64) * 0.5
    return dtype, [x.to(dtype) for x in (features, weight, bias)]


@pytest.mark.parametrize("mode", ["logit_mean", "prob_mean"])
@pytest.mark.parametrize("backend,device", backend_cases("grouped_heads"))
def test_grouped_heads_double_backward_matches_reference(backend, device, mode):
    dtype, inputs = _heads_inputs(backend, mode)
    got = _second_order(lambda *a: ued_fast.grouped_heads(*a, COVER, mode=mode, backend=backend),
                        [x.to(device) for x in inputs], (N, C))
    want = _second_order(lambda *a: ued_fast.grouped_heads_reference(*a, COVER, mode=mode),
                         [x.double() for x in inputs], (N, C))
    assert want[1][1].abs().max() > 1e-3  # d/dweight of <d out/d features, v>: a cross term
    _assert_same(got[0] + got[1], want[0] + want[1], dtype, f"grouped_heads {backend}")


@pytest.mark.parametrize("backend,device", backend_cases("grouped_heads"))
def test_grouped_heads_double_backward_for_some_inputs_only(backend, device):
    """Only the weight needs a gradient: the others get None, the weight's is still differentiable."""
    dtype, (features, weight, bias) = _heads_inputs(backend, "prob_mean")
    weight_dev = weight.to(device).requires_grad_()
    out = ued_fast.grouped_heads(features.to(device), weight_dev, bias.to(device), COVER, mode="prob_mean",
                                 backend=backend)
    (gw,) = torch.autograd.grad((out * out).sum(), weight_dev, create_graph=True)
    (hw,) = torch.autograd.grad(gw.sum(), weight_dev)
    w64 = weight.double().requires_grad_()
    ref = ued_fast.grouped_heads_reference(features.double(), w64, bias.double(), COVER, mode="prob_mean")
    (gw_ref,) = torch.autograd.grad((ref * ref).sum(), w64, create_graph=True)
    (hw_ref,) = torch.autograd.grad(gw_ref.sum(), w64)
    torch.testing.assert_close(hw.double().cpu(), hw_ref, **_tol(dtype))


# --- torch.func -----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", backend_cases("ensemble_kd_loss"))
def test_func_grad_and_vmap_kd_ops(backend, device):
    dtype = _dtype(backend)
    s, t, y = _kd_inputs(dtype, seed=4)
    teachers = torch.stack([t, t.flip(0), -t])
    t_dev, y_dev, teachers_dev = t.to(device), y.to(device), teachers.to(device)
    kd = lambda x: ued_fast.kd_loss(x.to(device), t_dev, y_dev, temperature=2.0, backend=backend).cpu()
    ens = lambda x: ued_fast.ensemble_kd_loss(x.to(device), teachers_dev, y_dev, temperature=2.0,
                                              backend=backend).cpu()
    kd_ref = lambda x: ued_fast.kd_loss_reference(x, t.double(), y, temperature=2.0)
    ens_ref = lambda x: ued_fast.ensemble_kd_loss_reference(x, teachers.double(), None, y, temperature=2.0)
    for fn, ref in ((kd, kd_ref), (ens, ens_ref)):
        torch.testing.assert_close(torch.func.grad(fn)(s).double(), torch.func.grad(ref)(s.double()), **_tol(dtype))
        hess = torch.func.hessian(fn)(s)
        torch.testing.assert_close(hess.double(), torch.func.hessian(ref)(s.double()), **_tol(dtype))
        batch = torch.stack([s, 2 * s, s.flip(1)])
        torch.testing.assert_close(torch.func.vmap(fn)(batch).double(),
                                   torch.stack([ref(b) for b in batch.double()]), **_tol(dtype))


@pytest.mark.parametrize("backend,device", backend_cases("grouped_heads"))
def test_func_jacrev_and_vmap_grouped_heads(backend, device):
    dtype, (features, weight, bias) = _heads_inputs(backend, "prob_mean")
    weight_dev, bias_dev = weight.to(device), bias.to(device)
    fn = lambda f: ued_fast.grouped_heads(f.to(device), weight_dev, bias_dev, COVER, mode="prob_mean",
                                          backend=backend).cpu()
    ref = lambda f: ued_fast.grouped_heads_reference(f, weight.double(), bias.double(), COVER, mode="prob_mean")
    torch.testing.assert_close(torch.func.jacrev(fn)(features).double(), torch.func.jacrev(ref)(features.double()),
                               **_tol(dtype))
    batch = torch.stack([features, -features])
    torch.testing.assert_close(torch.func.vmap(fn)(batch).double(), torch.func.vmap(ref)(batch.double()),
                               **_tol(dtype))
