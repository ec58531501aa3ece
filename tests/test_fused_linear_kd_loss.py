"""fused_linear_kd_loss and fused_linear_ensemble_kd_loss against the fp64 spec: materialized logits
(hidden @ weight.T + bias) fed to kd_loss_reference / ensemble_kd_loss_reference.

Every backend available here runs ('cpp', 'reference', and 'triton' under TRITON_INTERPRET=1 on small
shapes), over shapes whose N and V are not multiples of the chunk, every reduction, ignored rows (the
LM padding case, all ignored too), both teacher forms, K in {1, 3}, both mixes, 16-bit inputs,
gradcheck, opcheck, torch.compile, the O(chunk x V) memory bound and bad input.
"""
from __future__ import annotations

import pytest
import torch

import ued_fast
from ued_fast import (FusedLinearEnsembleKDLoss, FusedLinearKDLoss, ensemble_kd_loss_reference,
                      fused_linear_ensemble_kd_loss, fused_linear_kd_loss, kd_loss_reference)
from ued_fast.ops import fused_linear_kd_loss as flk

from conftest import TensorSizeWatch

BACKENDS = ued_fast.available_backends("cpu")
HAS_CPP = "cpp" in BACKENDS
REDUCTIONS = ("none", "sum", "batchmean", "mean")
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="ued_fast._C not built")


# ---------------------------------------------------------------------------------------------
# Inputs, the spec, and running an op with a grad_output that is not 1
# ---------------------------------------------------------------------------------------------

def make_case(n, h, v, *, dtype=torch.float64, seed=0, bias=True, teacher_form="logits", k=1, ht=6,
              ignored=0.25, scale=1.0):
    """hidden, weight, bias, teachers (list of K), teacher weights/biases (lists or None), target."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, s=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * s).to(dtype)

    hidden = randn(n, h, s=scale)
    weight = randn(v, h, s=h ** -0.5)
    b = randn(v) if bias else None
    if teacher_form == "logits":
        teachers, t_weights, t_biases = [randn(n, v, s=2.0) for _ in range(k)], None, None
    else:
        teachers = [randn(n, ht + i) for i in range(k)]  # teachers of different widths
        t_weights = [randn(v, ht + i, s=(ht + i) ** -0.5 * 2) for i in range(k)]
        t_biases = [randn(v) if (bias and i != 1) else None for i in range(k)]  # teacher 1 has no bias
    target = torch.randint(0, v, (n,), generator=gen)
    if ignored:
        target[torch.rand(n, generator=gen) < ignored] = -100
    return hidden, weight, b, teachers, t_weights, t_biases, target


def _teacher_logits64(teachers, t_weights, t_biases):
    if t_weights is None:
        return [t.double() for t in teachers]
    return [t.double() @ w.double().T + (0 if b is None else b.double())
            for t, w, b in zip(teachers, t_weights, t_biases)]


def expected(hidden, weight, bias, teachers, t_weights, t_biases, target, *, ensemble, grad_seed=0, weights=None,
             mix="prob", **kw):
    """The spec in fp64 on the same (already rounded) inputs: loss and grads of hidden, weight, bias."""
    kw = {"temperature": 1.0, "alpha": 0.5, **kw}  # the fused ops' defaults (kd_loss's are 4.0 and 0.9)
    params = [hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()]
    if bias is not None:
        params.append(bias.detach().double().requires_grad_())
    logits = params[0] @ params[1].T + (params[2] if bias is not None else 0)
    t = _teacher_logits64(teachers, t_weights, t_biases)
    if ensemble:
        w = None if weights is None else weights.double()
        loss = ensemble_kd_loss_reference(logits, torch.stack(t), w, target, mix=mix, **kw)
    else:
        loss = kd_loss_reference(logits, t[0], target, **kw)
    grads = torch.autograd.grad(loss, params, _grad_out(loss, grad_seed))
    return loss.detach(), list(grads)


def _grad_out(loss, seed):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(loss.shape, generator=gen, dtype=torch.float64) + 0.5).to(loss.dtype)


def run(hidden, weight, bias, teachers, t_weights, t_biases, target, *, ensemble, grad_seed=0, weights=None,
        mix="prob", **kw):
    """The op under test: loss and grads (fp64 copies), grads checked to come back in the input dtypes."""
    params = [hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()]
    if bias is not None:
        params.append(bias.detach().clone().requires_grad_())
    b = params[2] if bias is not None else None
    if ensemble:
        loss = fused_linear_ensemble_kd_loss(params[0], params[1], teachers, target, weights=weights, bias=b,
                                             teacher_weights=t_weights, teacher_biases=t_biases, mix=mix, **kw)
    else:
        loss = fused_linear_kd_loss(params[0], params[1], teachers[0], target, bias=b,
                                    teacher_weight=None if t_weights is None else t_weights[0],
                                    teacher_bias=None if t_biases is None else t_biases[0], **kw)
    grads = torch.autograd.grad(loss, params, _grad_out(loss, grad_seed).to(loss.dtype))
    for g, p in zip(grads, params):
        assert g.dtype == p.dtype and g.shape == p.shape
    return loss.detach().double(), [g.double() for g in grads]


def assert_matches(got, want, rtol, grad_tol, what=""):
    (loss, grads), (loss_ref, grads_ref) = got, want
    torch.testing.assert_close(loss, loss_ref, rtol=rtol, atol=rtol, msg=lambda m: f"{what} loss: {m}")
    for name, g, r in zip(("hidden", "weight", "bias"), grads, grads_ref):
        err = (g - r).abs().max().item()
        bound = grad_tol * max(r.abs().max().item(), 1e-12)
        assert err <= bound, f"{what} grad {name}: max error {err:.3g} > {bound:.3g}"


def _sized(backend, n, v):
    """The Triton interpreter runs every program in numpy: small problems only."""
    if backend == "triton":
        if v > 600:
            pytest.skip("too wide for the Triton interpreter")
        return min(n, 24)
    return n


FP64_OK = ("cpp", "reference")


def _dtype_for(backend):
    return torch.float64 if backend in FP64_OK else torch.float32


def _tol(dtype):
    return {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 5e-5)}[dtype]


# ---------------------------------------------------------------------------------------------
# Single teacher
# ---------------------------------------------------------------------------------------------

# (N, H, V, chunk_size): N and V not multiples of the chunk, one chunk, one row per chunk, automatic.
SHAPES = [(1, 3, 2, None), (13, 5, 7, 4), (37, 16, 53, 8), (50, 24, 301, 16), (64, 9, 1000, 1), (70, 32, 2049, None)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("teacher_form", ["logits", "hidden"])
def test_matches_reference_every_reduction(backend, shape, teacher_form):
    n, h, v, chunk = shape
    n = _sized(backend, n, v)
    dtype = _dtype_for(backend)
    case = make_case(n, h, v, dtype=dtype, seed=n + v, teacher_form=teacher_form, bias=(v % 2 == 1))
    for i, reduction in enumerate(REDUCTIONS):
        kw = dict(temperature=(0.7, 1.0, 2.0, 4.0)[i], alpha=(0.0, 0.3, 0.5, 1.0)[i], reduction=reduction)
        got = run(*case, ensemble=False, chunk_size=chunk, backend=backend, **kw)
        want = expected(*case, ensemble=False, **kw)
        assert_matches(got, want, *_tol(dtype), what=f"{backend} {reduction}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("teacher_kind", ["log_probs", "probs"])
def test_teacher_kinds(backend, teacher_kind):
    dtype = _dtype_for(backend)
    hidden, weight, bias, (t,), _, _, target = make_case(_sized(backend, 29, 41), 8, 41, dtype=dtype, seed=3)
    t = torch.log_softmax(t.double() / 1.3, -1)
    t = (t if teacher_kind == "log_probs" else t.exp()).to(dtype)
    for reduction in ("batchmean", "none"):
        kw = dict(temperature=2.5, alpha=0.7, reduction=reduction, teacher_kind=teacher_kind)
        got = run(hidden, weight, bias, [t], None, None, target, ensemble=False, chunk_size=6, backend=backend, **kw)
        want = expected(hidden, weight, bias, [t], None, None, target, ensemble=False, **kw)
        assert_matches(got, want, *_tol(dtype), what=teacher_kind)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t2_scale", [True, False])
def test_no_target_and_t2_scale(backend, t2_scale):
    dtype = _dtype_for(backend)
    hidden, weight, bias, teachers, *_ = make_case(_sized(backend, 21, 30), 7, 30, dtype=dtype, seed=4)
    kw = dict(temperature=3.0, t2_scale=t2_scale, reduction="batchmean")
    got = run(hidden, weight, bias, teachers, None, None, None, ensemble=False, chunk_size=5, backend=backend, **kw)
    want = expected(hidden, weight, bias, teachers, None, None, None, ensemble=False, **kw)
    assert_matches(got, want, *_tol(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ensemble", [False, True])
def test_all_rows_ignored_give_zero(backend, ensemble):
    hidden, weight, bias, teachers, _, _, target = make_case(12, 5, 9, dtype=_dtype_for(backend), seed=5)
    target[:] = -100
    for reduction in REDUCTIONS:
        loss, grads = run(hidden, weight, bias, teachers, None, None, target, ensemble=ensemble, chunk_size=5,
                          backend=backend, reduction=reduction)
        assert torch.all(loss == 0), reduction
        assert all(torch.all(g == 0) for g in grads), reduction


@needs_cpp
def test_batchmean_counts_valid_rows_of_the_whole_batch():
    """Padding concentrated in one chunk: the divisor is the batch's non-ignored rows, not a chunk's."""
    hidden, weight, bias, teachers, _, _, target = make_case(40, 6, 17, seed=6, ignored=0)
    target[:13] = -100  # the first chunk (and part of the second) is all padding
    got = run(hidden, weight, bias, teachers, None, None, target, ensemble=False, chunk_size=10, backend="cpp")
    want = expected(hidden, weight, bias, teachers, None, None, target, ensemble=False)
    assert_matches(got, want, 1e-12, 1e-10)


@needs_cpp
def test_chunk_size_does_not_change_the_result():
    case = make_case(45, 12, 77, seed=7)
    results = [run(*case, ensemble=False, chunk_size=c, backend="cpp", reduction=r)
               for r in ("sum", "none") for c in (1, 7, 45, 1000, None)]
    for got in results[1:5]:
        assert_matches(got, results[0], 1e-12, 1e-12)
    for got in results[6:]:
        assert_matches(got, results[5], 1e-12, 1e-12)


@needs_cpp
def test_strided_inputs_and_frozen_parameters():
    hidden, weight, bias, teachers, _, _, target = make_case(31, 10, 23, seed=8)
    wide_hidden = torch.zeros(31, 30, dtype=torch.float64)
    wide_hidden[:, ::3] = hidden  # column stride 3
    wide_teacher = torch.zeros(31, 2 * 23, dtype=torch.float64)
    wide_teacher[:, :23] = teachers[0]  # row stride 46
    h = wide_hidden[:, ::3].requires_grad_()
    loss = fused_linear_kd_loss(h, weight.T.contiguous().T, wide_teacher[:, :23], target, bias=bias, chunk_size=4)
    (g,) = torch.autograd.grad(loss, h)  # weight and bias frozen: only hidden gets a gradient
    h_ref = hidden.clone().requires_grad_()
    loss_ref = kd_loss_reference(h_ref @ weight.T + bias, teachers[0], target, temperature=1.0, alpha=0.5)
    (g_ref,) = torch.autograd.grad(loss_ref, h_ref)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


@needs_cpp
def test_extreme_logits_stay_finite():
    hidden, weight, bias, teachers, _, _, target = make_case(16, 4, 33, seed=9, scale=300.0)
    teachers = [teachers[0] * 100]
    loss, grads = run(hidden, weight, bias, teachers, None, None, target, ensemble=False, chunk_size=5,
                      backend="cpp", temperature=0.5)
    assert torch.isfinite(loss).all() and all(torch.isfinite(g).all() for g in grads)
    assert_matches((loss, grads), expected(hidden, weight, bias, teachers, None, None, target, ensemble=False,
                                           temperature=0.5), 1e-9, 1e-9)


# ---------------------------------------------------------------------------------------------
# Ensemble of K teachers
# ---------------------------------------------------------------------------------------------

def _mix_weights(kind, k, n, seed):
    gen = torch.Generator().manual_seed(seed)
    if kind == "none":
        return None
    if kind == "k":
        return torch.rand(k, generator=gen, dtype=torch.float64) + 0.1
    w = torch.rand(k, n, generator=gen, dtype=torch.float64) ** 2
    if k > 1:
        w[0, ::2] = 0.0  # teacher 0 left out of every other row
    return w


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("mix", ["prob", "logit"])
@pytest.mark.parametrize("teacher_form", ["logits", "stacked", "hidden"])
def test_ensemble_matches_reference(backend, k, mix, teacher_form):
    n = _sized(backend, 43, 67)
    dtype = _dtype_for(backend)
    form = "logits" if teacher_form == "stacked" else teacher_form
    hidden, weight, bias, teachers, tw, tb, target = make_case(n, 11, 67, dtype=dtype, seed=10 + k, k=k,
                                                               teacher_form=form)
    if teacher_form == "stacked":
        teachers = torch.stack(teachers)  # a [K, N, V] input is read through views
    for i, (reduction, wkind) in enumerate(zip(REDUCTIONS, ("none", "k", "kn", "kn"))):
        weights = _mix_weights(wkind, k, n, seed=i)
        kw = dict(temperature=(1.0, 2.0, 0.8, 3.0)[i], alpha=(0.5, 0.0, 1.0, 0.25)[i], reduction=reduction,
                  mix=mix, weights=None if weights is None else weights.to(dtype))
        t_list = list(teachers) if isinstance(teachers, torch.Tensor) else teachers
        got = run(hidden, weight, bias, teachers, tw, tb, target, ensemble=True, chunk_size=9, backend=backend, **kw)
        want = expected(hidden, weight, bias, t_list, tw, tb, target, ensemble=True, **kw)
        assert_matches(got, want, *_tol(dtype), what=f"{backend} {reduction} {wkind}")


@needs_cpp
def test_ensemble_of_one_equals_single_teacher():
    hidden, weight, bias, teachers, tw, tb, target = make_case(26, 8, 19, seed=12, teacher_form="hidden")
    single = run(hidden, weight, bias, teachers, tw, tb, target, ensemble=False, chunk_size=7, temperature=2.0)
    for mix in ("prob", "logit"):
        ens = run(hidden, weight, bias, teachers, tw, tb, target, ensemble=True, chunk_size=7, temperature=2.0,
                  mix=mix)
        assert_matches(ens, single, 1e-12, 1e-12)


# ---------------------------------------------------------------------------------------------
# 16-bit inputs: float32 loss, gradients in the input dtype accumulated in float32
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ensemble", [False, True])
def test_16bit_inputs(backend, dtype, ensemble):
    n = _sized(backend, 96, 130)
    case = make_case(n, 32, 130, dtype=dtype, seed=13, k=2 if ensemble else 1, teacher_form="hidden")
    loss, grads = run(*case, ensemble=ensemble, chunk_size=5, backend=backend, temperature=2.0)
    params = [case[0].requires_grad_(), case[1].requires_grad_(), case[2].requires_grad_()]
    f = fused_linear_ensemble_kd_loss if ensemble else fused_linear_kd_loss
    assert f(params[0], params[1], case[3] if ensemble else case[3][0], case[6], bias=params[2],
             **({"teacher_weights": case[4], "teacher_biases": case[5]} if ensemble else
                {"teacher_weight": case[4][0], "teacher_bias": case[5][0]}),
             backend=backend).dtype == torch.float32
    # The spec on the same rounded inputs, in fp64. Logits are rounded to the input dtype in the op (as
    # in eager 16-bit code), so the tolerance is that rounding's, relative to the largest gradient.
    want = expected(*case, ensemble=ensemble, temperature=2.0)
    assert_matches((loss, grads), want, 2e-2, 3e-2, what=str(dtype))


@needs_cpp
def test_16bit_weight_gradient_accumulates_in_float32():
    """One row per chunk over many rows: a weight gradient summed in bfloat16 would drift from the spec
    by far more than one bfloat16 rounding; accumulated in float32 it stays within ~2 of them."""
    hidden, weight, bias, teachers, _, _, target = make_case(512, 8, 24, dtype=torch.bfloat16, seed=14,
                                                             ignored=0)
    _, (_, g_w, _) = run(hidden, weight, bias, teachers, None, None, target, ensemble=False, chunk_size=1,
                         reduction="sum")
    _, (_, g_ref, _) = expected(hidden, weight, bias, teachers, None, None, target, ensemble=False,
                                reduction="sum")
    rounding = (g_ref.bfloat16().double() - g_ref).abs().max().item()
    summed_in_bf16 = torch.zeros_like(weight)
    logits = hidden.double() @ weight.double().T + bias.double()
    for i in range(512):  # what bfloat16 accumulation across chunks would give
        row = logits[i:i + 1].requires_grad_()
        (g_row,) = torch.autograd.grad(kd_loss_reference(row, teachers[0][i:i + 1].double(), target[i:i + 1],
                                                         temperature=1.0, alpha=0.5, reduction="sum"), row)
        summed_in_bf16 += (g_row.T @ hidden[i:i + 1].double()).bfloat16()
    bf16_err = (summed_in_bf16.double() - g_ref).abs().max().item()
    err = (g_w - g_ref).abs().max().item()
    assert err < 0.5 * bf16_err, (err, bf16_err)
    assert err < 6 * rounding + 1e-3 * g_ref.abs().max().item(), (err, rounding)


# ---------------------------------------------------------------------------------------------
# Autograd, torch.library and torch.compile
# ---------------------------------------------------------------------------------------------

@needs_cpp
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("ensemble", [False, True])
def test_gradcheck_cpp(reduction, ensemble):
    hidden, weight, bias, teachers, tw, tb, target = make_case(7, 4, 9, seed=15, k=3 if ensemble else 1,
                                                               teacher_form="hidden")
    params = tuple(x.clone().requires_grad_() for x in (hidden, weight, bias))

    def f(h, w, b):
        if ensemble:
            return fused_linear_ensemble_kd_loss(h, w, teachers, target, bias=b, teacher_weights=tw,
                                                 teacher_biases=tb, temperature=1.7, alpha=0.6, reduction=reduction,
                                                 chunk_size=3, backend="cpp", mix="logit")
        return fused_linear_kd_loss(h, w, teachers[0], target, bias=b, teacher_weight=tw[0], teacher_bias=tb[0],
                                    temperature=1.7, alpha=0.6, reduction=reduction, chunk_size=3, backend="cpp")

    assert torch.autograd.gradcheck(f, params)


@needs_cpp
def test_opcheck():
    hidden, weight, bias, teachers, tw, tb, target = make_case(9, 5, 13, dtype=torch.float32, seed=16, k=2,
                                                               teacher_form="hidden")
    h, w, b = (x.clone().requires_grad_() for x in (hidden, weight, bias))
    mix_w = torch.full((2, 9), 0.5)
    for reduction in ("batchmean", "none"):
        args = (h, w, b, teachers, tw, [tb[0], torch.zeros(13)], mix_w, target, 2.0, 0.5, True, reduction, -100,
                "logits", "prob", True, "cpp", 4, True, True, True)
        torch.library.opcheck(torch.ops.ued_fast.fused_linear_kd_loss.default, args)
    # The pass runs inside backward, on tensors that need no gradient of their own.
    args = (hidden, weight, None, [teachers[0] @ tw[0].T], [], [], None, None, torch.rand(9), 1.0, 0.5, True, -100,
            "logits", "prob", False, "cpp", 4, True, True, False)
    torch.library.opcheck(torch.ops.ued_fast.fused_linear_kd_pass.default, args)


@needs_cpp
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
@pytest.mark.parametrize("ensemble", [False, True])
def test_torch_compile_fullgraph(reduction, ensemble):
    torch._dynamo.reset()
    hidden, weight, bias, teachers, tw, tb, target = make_case(20, 8, 33, dtype=torch.float32, seed=17,
                                                               k=3 if ensemble else 1, teacher_form="hidden")

    def step(h, w, b):
        if ensemble:
            loss = fused_linear_ensemble_kd_loss(h, w, teachers, target, bias=b, teacher_weights=tw,
                                                 teacher_biases=tb, reduction=reduction, chunk_size=6)
        else:
            loss = fused_linear_kd_loss(h, w, teachers[0], target, bias=b, teacher_weight=tw[0],
                                        teacher_bias=tb[0], reduction=reduction, chunk_size=6)
        return (loss * torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape)).sum()

    compiled = torch.compile(step, fullgraph=True)
    a = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    e = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    loss_c, loss_e = compiled(*a), step(*e)
    loss_c.backward()
    loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=1e-6)
    for x, y in zip(a, e):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-6, atol=1e-7)


@needs_cpp
def test_modules():
    hidden, weight, bias, teachers, tw, tb, target = make_case(15, 6, 21, seed=18, k=2, teacher_form="hidden")
    kw = dict(temperature=2.0, alpha=0.3, reduction="sum", chunk_size=4)
    single = FusedLinearKDLoss(**kw)(hidden, weight, teachers[0], target, bias=bias, teacher_weight=tw[0],
                                     teacher_bias=tb[0])
    torch.testing.assert_close(single, fused_linear_kd_loss(hidden, weight, teachers[0], target, bias=bias,
                                                            teacher_weight=tw[0], teacher_bias=tb[0], **kw))
    ens = FusedLinearEnsembleKDLoss(mix="logit", **kw)(hidden, weight, teachers, target, bias=bias,
                                                        teacher_weights=tw, teacher_biases=tb)
    torch.testing.assert_close(ens, fused_linear_ensemble_kd_loss(hidden, weight, teachers, target, bias=bias,
                                                                  teacher_weights=tw, teacher_biases=tb, mix="logit",
                                                                  **kw))
    assert "chunk_size=4" in repr(FusedLinearKDLoss(**kw))


# ---------------------------------------------------------------------------------------------
# Memory: nothing of size N x V (or K x N x V) is ever made
# ---------------------------------------------------------------------------------------------

@needs_cpp
@pytest.mark.parametrize("ensemble", [False, True])
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_no_tensor_of_n_by_v_is_made(ensemble, reduction):
    """Forward and backward of the chunked pass (the custom ops' body, traced op by op) make tensors of
    at most max(chunk x V, V x H, N x H) elements; the row kernels' outputs are counted too."""
    n, h, v, chunk, k = 96, 8, 200, 8, 3
    hidden, weight, bias, teachers, tw, tb, target = make_case(n, h, v, dtype=torch.float32, seed=19,
                                                               k=k if ensemble else 1, teacher_form="hidden")
    mix_w = torch.full((len(teachers), n), 1.0 / len(teachers)) if ensemble else None
    tb_list = [x if x is not None else torch.zeros(v) for x in tb]
    scale = torch.rand(n) if reduction == "none" else torch.tensor(0.1)
    with TensorSizeWatch() as mode:
        flk._chunked_pass(hidden, weight, bias, teachers, tw, tb_list, mix_w, target, scale, 1.0, 0.5, True, -100,
                          "logits", "prob", ensemble, "cpp", chunk, True, True, True)
    assert mode.largest <= max(chunk * v, v * h, n * h), mode.largest
    assert mode.largest < n * v


def test_auto_chunk_size():
    mib = 2**20
    # 128k vocabulary in float32, teacher logits made per chunk: 3 x 4 bytes x 128k per row.
    rows = flk.auto_chunk_size(8192, 128256, torch.float32, 1)
    assert 64 <= rows < 8192 and rows % 64 == 0
    assert rows * 128256 * 12 <= flk.CHUNK_BYTES
    assert flk.auto_chunk_size(10, 50, torch.float32, 0) == 10  # a small problem is one chunk
    assert flk.auto_chunk_size(100, 10**9, torch.bfloat16, 3, budget_bytes=mib) == 1  # never 0 rows


# ---------------------------------------------------------------------------------------------
# Bad input: an error naming the argument
# ---------------------------------------------------------------------------------------------

def _good():
    hidden, weight, bias, teachers, tw, tb, target = make_case(6, 4, 10, dtype=torch.float32, seed=20,
                                                               teacher_form="hidden")
    return dict(hidden=hidden, weight=weight, teacher=teachers[0], target=target, bias=bias, teacher_weight=tw[0],
                teacher_bias=tb[0])


BAD_SINGLE = [
    ({"hidden": torch.zeros(6, 4, 1)}, ValueError, "hidden must be 2-D"),
    ({"hidden": torch.zeros(0, 4)}, ValueError, "hidden must be a non-empty"),
    ({"hidden": torch.zeros(6, 4, dtype=torch.int64)}, TypeError, "hidden must be float32"),
    ({"weight": torch.zeros(10, 5)}, ValueError, r"weight must be \[V, H\] = \[V, 4\]"),
    ({"weight": torch.zeros(10, 4, dtype=torch.float64)}, TypeError, "weight is torch.float64 but hidden"),
    ({"weight": torch.zeros(10, 4, device="meta")}, ValueError, "weight is on meta"),
    ({"bias": torch.zeros(11)}, ValueError, r"bias must be \[V\] = \[10\]"),
    ({"bias": torch.zeros(10, dtype=torch.float16)}, TypeError, "bias is torch.float16"),
    ({"teacher": torch.zeros(5, 6)}, ValueError, r"teacher \(hidden states\) must be \[N, Ht\]"),
    ({"teacher_weight": torch.zeros(10, 7)}, ValueError, r"teacher_weight must be \[V, Ht\] = \[10, 6\]"),
    ({"teacher_weight": torch.zeros(10, 6, dtype=torch.float64)}, TypeError, "teacher_weight is torch.float64"),
    ({"teacher_bias": torch.zeros(3)}, ValueError, r"teacher_bias must be \[V\]"),
    ({"teacher_weight": None, "teacher_bias": None, "teacher": torch.zeros(6, 9)}, ValueError,
     r"teacher \(logits\) must be \[N, V\] = \[6, 10\]"),
    ({"teacher_weight": None}, ValueError, "teacher_bias is given without teacher_weight"),
    ({"teacher": torch.zeros(6, 6, device="meta")}, ValueError, "teacher is on meta"),
    ({"target": torch.zeros(6, dtype=torch.int32)}, TypeError, "target must be int64"),
    ({"target": torch.zeros(5, dtype=torch.int64)}, ValueError, "target has 5 rows but hidden has 6"),
    ({"target": torch.full((6,), 10)}, ValueError, r"target holds class 10, outside \[0, 10\)"),
    ({"chunk_size": 0}, ValueError, "chunk_size must be >= 1"),
    ({"chunk_size": 2.5}, TypeError, "chunk_size must be a positive int"),
    ({"chunk_size": True}, TypeError, "chunk_size must be a positive int"),
    ({"temperature": 0.0}, ValueError, "temperature must be finite and > 0"),
    ({"alpha": 1.5}, ValueError, r"alpha must be in \[0, 1\]"),
    ({"reduction": "avg"}, ValueError, "reduction must be one of"),
    ({"teacher_kind": "probs"}, ValueError, "teacher_kind must be 'logits' when teacher_weight is given"),
    ({"teacher_kind": "logprobs", "teacher_weight": None, "teacher_bias": None, "teacher": torch.zeros(6, 10)},
     ValueError, "teacher_kind must be one of"),
    ({"backend": "fast"}, ValueError, "backend must be one of"),
]


@pytest.mark.parametrize("change,exc,match", BAD_SINGLE, ids=[m for _, _, m in BAD_SINGLE])
def test_bad_input_single(change, exc, match):
    args = {**_good(), **change}
    positional = [args.pop(k) for k in ("hidden", "weight", "teacher", "target")]
    with pytest.raises(exc, match=f"fused_linear_kd_loss: {match}"):
        fused_linear_kd_loss(*positional, **args)


def test_bad_input_ensemble():
    g = _good()
    hidden, weight = g["hidden"], g["weight"]
    logits = [torch.zeros(6, 10), torch.zeros(6, 10)]
    op = "fused_linear_ensemble_kd_loss"
    cases = [
        (dict(teachers=[]), TypeError, "teachers must be a"),
        (dict(teachers=torch.zeros(2, 6)), ValueError, "teachers must be 3-D"),
        (dict(teachers=[torch.zeros(6, 10), torch.zeros(6, 11)]), ValueError, r"teachers\[1\] \(logits\) must be"),
        (dict(teachers=logits, teacher_biases=[torch.zeros(10)] * 2), ValueError,
         "teacher_biases is given without teacher_weights"),
        (dict(teachers=[torch.zeros(6, 3)] * 2, teacher_weights=[torch.zeros(10, 3)]), ValueError,
         "teacher_weights holds 1 heads but teachers holds 2"),
        (dict(teachers=[torch.zeros(6, 3)] * 2, teacher_weights=[torch.zeros(10, 3), torch.zeros(10, 4)]),
         ValueError, r"teacher_weights\[1\] must be \[V, Ht\] = \[10, 3\]"),
        (dict(teachers=[torch.zeros(6, 3)] * 2, teacher_weights=[torch.zeros(10, 3)] * 2,
              teacher_biases=[torch.zeros(10)]), ValueError, "teacher_biases holds 1 biases"),
        (dict(teachers=logits, weights=torch.ones(3)), ValueError, r"weights must have shape \[2\] or \[2, 6\]"),
        (dict(teachers=logits, weights=torch.tensor([1.0, -1.0])), ValueError, "weights must be finite and >= 0"),
        (dict(teachers=logits, weights=torch.zeros(2)), ValueError, "weights must not sum to 0"),
        (dict(teachers=logits, mix="geometric"), ValueError, "mix must be one of"),
        (dict(teachers=logits, chunk_size=-3), ValueError, "chunk_size must be >= 1"),
    ]
    for kwargs, exc, match in cases:
        with pytest.raises(exc, match=f"{op}: {match}"):
            fused_linear_ensemble_kd_loss(hidden, weight, **kwargs)


def test_bad_module_arguments():
    with pytest.raises(ValueError, match="FusedLinearKDLoss: chunk_size must be >= 1"):
        FusedLinearKDLoss(chunk_size=0)
    with pytest.raises(ValueError, match="FusedLinearEnsembleKDLoss: mix must be one of"):
        FusedLinearEnsembleKDLoss(mix="max")


def test_float64_on_a_gpu_backend_is_refused():
    if "triton" not in BACKENDS:
        pytest.skip("no Triton backend for CPU tensors here (TRITON_INTERPRET is not set)")
    g = _good()
    with pytest.raises(TypeError, match="fused_linear_kd_loss: backend='triton' takes float32"):
        fused_linear_kd_loss(g["hidden"].double(), g["weight"].double(), torch.zeros(6, 10, dtype=torch.float64),
                             backend="triton")


@needs_cpp
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_second_backward_through_the_same_graph(reduction):
    """The first backward scales the saved gradients in place; a second one (retain_graph) runs the pass
    again and must give the same gradients, and must not alter the first ones."""
    hidden, weight, bias, teachers, _, _, target = make_case(19, 6, 25, seed=21)
    params = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    loss = fused_linear_kd_loss(params[0], params[1], teachers[0], target, bias=params[2], chunk_size=4,
                                reduction=reduction)
    go = _grad_out(loss, 1)
    first = torch.autograd.grad(loss, params, go, retain_graph=True)
    first_copy = [g.clone() for g in first]
    second = torch.autograd.grad(loss, params, 2 * go)
    want = expected(hidden, weight, bias, teachers, None, None, target, ensemble=False, grad_seed=1,
                    reduction=reduction)[1]
    for a, b, c, w in zip(first, first_copy, second, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, w, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(c, 2 * w, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Teacher kinds already at the temperature, double backward, torch.func
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("teacher_kind", ["tempered_probs", "tempered_log_probs"])
def test_tempered_teacher_kinds_match_the_reference(teacher_kind):
    gen = torch.Generator().manual_seed(7)
    n, h, v, temperature = 37, 8, 29, 2.5
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64, requires_grad=True)
    soft = (torch.randn(n, v, generator=gen, dtype=torch.float64) * 3 / temperature).softmax(-1)
    teacher = soft if teacher_kind == "tempered_probs" else soft.log()
    target = torch.randint(0, v, (n,), generator=gen)
    kw = dict(temperature=temperature, alpha=0.7, teacher_kind=teacher_kind, chunk_size=8)
    got = ued_fast.fused_linear_kd_loss(hidden, weight, teacher, target, backend="cpp", **kw)
    want = ued_fast.kd_loss_reference(hidden @ weight.t(), teacher, target, temperature=temperature, alpha=0.7,
                                      teacher_kind=teacher_kind)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    g_got = torch.autograd.grad(got, (hidden, weight))
    g_want = torch.autograd.grad(want, (hidden, weight))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_double_backward_is_a_clear_error():
    hidden = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    loss = ued_fast.fused_linear_kd_loss(hidden, weight, torch.randn(6, 9, dtype=torch.float64), backend="cpp")
    with pytest.raises(RuntimeError, match="fused_linear_kd_loss: double backward"):
        torch.autograd.grad(loss, hidden, create_graph=True)


def test_torch_func_grad_runs_the_reference():
    hidden = torch.randn(6, 4, dtype=torch.float64)
    weight = torch.randn(9, 4, dtype=torch.float64)
    teacher = torch.randn(6, 9, dtype=torch.float64)
    got = torch.func.grad(lambda x: ued_fast.fused_linear_kd_loss(x, weight, teacher, temperature=2.0))(hidden)
    x = hidden.clone().requires_grad_()
    want, = torch.autograd.grad(ued_fast.kd_loss_reference(x @ weight.t(), teacher, temperature=2.0), x)
    torch.testing.assert_close(got, want)
