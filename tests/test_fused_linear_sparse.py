"""fused_linear_sparse_kd_loss: an LM head distilled from a top-k teacher without the [N, V] logits. Every
backend of this machine against the materialized reference (sparse_kd_loss_reference of hidden @ W.T + b)
in float64 on the same inputs: loss and the gradients of hidden, weight and bias, every reduction, chunks
that split the rows unevenly, both conventions and the three divergences, 16-bit inputs, the module form,
opcheck, torch.compile, the O(chunk x V) memory bound and bad input."""
from __future__ import annotations

import math

import pytest
import torch

import ued_fast
import ued_fast.ops.fused_linear_kd_loss as flk
from ued_fast.ops._sparse_teacher import native_inputs, sparse_kd_loss_reference

from conftest import TensorSizeWatch

BACKENDS = ued_fast.available_backends("cpu")
NATIVE = [b for b in BACKENDS if b != "reference"]
IGNORE = -100
CASES = [("zero", "forward_kl"), ("zero", "jsd"), ("symmetric_uniform", "reverse_kl"),
         ("symmetric_uniform", "jsd")]


def make_case(n=23, h=8, v=61, k=6, *, seed=0, bias=True, pad=True):
    """hidden, weight, bias (float64), the top-k of a random teacher (padding on every third row) and targets
    with ignored rows."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) / math.sqrt(h) * 3
    b = torch.randn(v, generator=g, dtype=torch.float64) if bias else None
    values, indices = torch.log_softmax(torch.randn(n, v, generator=g, dtype=torch.float64) * 3, -1).topk(k, -1)
    if pad:
        values[::3, -2:] = -math.inf
    target = torch.randint(0, v, (n,), generator=g)
    target[1::6] = IGNORE
    return hidden, weight, b, indices, values, target


def loss_and_grads(fn, hidden, weight, bias, indices, values, target, dtype, **kw):
    """The loss and the gradients of hidden, weight, bias under a fixed upstream gradient, inputs in dtype."""
    params = [x.detach().to(dtype, copy=True).requires_grad_() if x is not None else None
              for x in (hidden, weight, bias)]
    loss = fn(params[0], params[1], indices, values, target, bias=params[2], **kw)
    upstream = torch.linspace(0.5, 1.5, loss.numel(), dtype=torch.float64).reshape(loss.shape)
    (loss.double() * upstream).sum().backward()
    return [loss.detach().double()] + [p.grad.double() for p in params if p is not None]


def reference(hidden, weight, indices, values, target, *, bias=None, **kw):
    """The spec with the fused op's defaults (an LM head's: T = 1, alpha = 0.5, not sparse_kd_loss's)."""
    kw.pop("chunk_size", None)
    kw.pop("backend", None)
    kw = dict(dict(temperature=flk.DEFAULT_TEMPERATURE, alpha=flk.DEFAULT_ALPHA), **kw)
    return sparse_kd_loss_reference(torch.nn.functional.linear(hidden, weight, bias), indices, values, target, **kw)


def tolerance(backend):
    return (torch.float64, 1e-10) if backend in ("cpp", "reference") else (torch.float32, 2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("convention,divergence", CASES)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_matches_the_materialized_reference(backend, convention, divergence, reduction):
    case = make_case(seed=1)
    dtype, tol = tolerance(backend)
    kw = dict(temperature=2.0, alpha=0.6, reduction=reduction, convention=convention, divergence=divergence,
              beta=0.3, teacher_temperature=1.5)
    got = loss_and_grads(ued_fast.fused_linear_sparse_kd_loss, *case, dtype, chunk_size=5, backend=backend, **kw)
    want = loss_and_grads(reference, *case, torch.float64, **kw)
    for what, a, b in zip(("loss", "grad hidden", "grad weight", "grad bias"), got, want):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=what)


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("chunk_size", [1, 4, 23, None])
def test_chunks_no_target_no_bias_logit_values(backend, chunk_size):
    hidden, weight, _, indices, values, _ = make_case(seed=2, bias=False)
    logits = values + 0.7  # values as teacher logits of the top-k ('zero' renormalizes them)
    dtype, tol = tolerance(backend)
    kw = dict(temperature=1.0, values_kind="logits")
    got = loss_and_grads(ued_fast.fused_linear_sparse_kd_loss, hidden, weight, None, indices, logits, None, dtype,
                         chunk_size=chunk_size, backend=backend, **kw)
    want = loss_and_grads(reference, hidden, weight, None, indices, logits, None, torch.float64, **kw)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_inputs(backend, dtype):
    """16-bit hidden/weight/bias: the reference on the same rounded inputs in float64; the weight gradient is
    accumulated in float32 across chunks, so only the inputs' and the stored gradients' rounding remain."""
    hidden, weight, bias, indices, values, target = make_case(seed=3)
    rounded = [x.to(dtype).double() for x in (hidden, weight, bias)]
    got = loss_and_grads(ued_fast.fused_linear_sparse_kd_loss, hidden, weight, bias, indices, values, target, dtype,
                         chunk_size=7, backend=backend, temperature=2.0)
    want = loss_and_grads(reference, *rounded, indices, values, target, torch.float64, temperature=2.0)
    torch.testing.assert_close(got[0], want[0], rtol=1e-3, atol=1e-3)
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-2 * float(b.abs().max()))


def test_int32_indices():
    hidden, weight, bias, indices, values, target = make_case(seed=9)
    losses = [ued_fast.fused_linear_sparse_kd_loss(hidden, weight, idx, values, target, bias=bias, chunk_size=5)
              for idx in (indices, indices.int())]
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=0)


def test_module_form_and_its_settings():
    hidden, weight, bias, indices, values, target = make_case(seed=4)
    kw = dict(temperature=2.0, alpha=0.3, convention="symmetric_uniform", divergence="jsd", beta=0.2,
              reduction="sum", chunk_size=6)
    module = ued_fast.FusedLinearSparseKDLoss(**kw)
    torch.testing.assert_close(module(hidden, weight, indices, values, target, bias=bias),
                               ued_fast.fused_linear_sparse_kd_loss(hidden, weight, indices, values, target,
                                                                    bias=bias, **kw), rtol=0, atol=0)
    assert "convention='symmetric_uniform'" in repr(module)
    with pytest.raises(ValueError, match="FusedLinearSparseKDLoss: values_kind must be one of"):
        ued_fast.FusedLinearSparseKDLoss(values_kind="probs")


@pytest.mark.skipif("cpp" not in BACKENDS, reason="ued_fast._C not built")
def test_opcheck():
    hidden, weight, bias, indices, values, target = make_case(n=9, h=5, v=13, k=3, seed=5)
    h, w, b = (x.float().requires_grad_() for x in (hidden, weight, bias))
    teacher = list(native_inputs(indices, values, h, 2.0, "zero", None))
    for reduction in ("batchmean", "none"):
        args = (h, w, b, teacher, [], [], None, target, 2.0, 0.5, True, reduction, IGNORE, flk.SPARSE_TEACHER,
                "prob", False, "cpp", 4, True, True, True)
        torch.library.opcheck(torch.ops.ued_fast.fused_linear_kd_loss.default, args)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="ued_fast._C not built")
def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    hidden, weight, bias, indices, values, target = make_case(n=12, seed=6)
    kw = dict(temperature=2.0, convention="symmetric_uniform", divergence="jsd", chunk_size=5, backend="cpp")

    def step(h, w, b):
        return ued_fast.fused_linear_sparse_kd_loss(h, w, indices, values, target, bias=b, **kw)

    compiled = torch.compile(step, fullgraph=True)
    params_c = [x.float().requires_grad_() for x in (hidden, weight, bias)]
    params_e = [x.float().requires_grad_() for x in (hidden, weight, bias)]
    loss_c, loss_e = compiled(*params_c), step(*params_e)
    loss_c.backward()
    loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e)
    for a, b in zip(params_c, params_e):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="ued_fast._C not built")
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_no_tensor_of_n_by_v_is_made(reduction):
    """Forward and backward make tensors of at most max(chunk x V, V x H, N x H) elements: no dense teacher,
    no whole logits."""
    n, h, v, k, chunk = 96, 8, 200, 5, 8
    hidden, weight, bias, indices, values, target = make_case(n=n, h=h, v=v, k=k, seed=7)
    params = [x.float().requires_grad_() for x in (hidden, weight, bias)]
    with TensorSizeWatch() as mode:
        loss = ued_fast.fused_linear_sparse_kd_loss(params[0], params[1], indices, values, target, bias=params[2],
                                                    reduction=reduction, chunk_size=chunk, backend="cpp")
        loss.sum().backward()
    assert mode.largest <= max(chunk * v, v * h, n * h), mode.largest
    assert mode.largest < n * v


def test_bad_input_names_the_argument():
    hidden, weight, bias, indices, values, target = make_case(n=6, v=13, k=3, seed=8)
    op = "fused_linear_sparse_kd_loss"
    cases = [
        (dict(indices=indices + 13), ValueError, rf"{op}: indices holds 1[3-9].*outside \[0, 13\)"),
        (dict(indices=indices[:4]), ValueError, rf"{op}: indices must be \[N, k\] = \[6"),
        (dict(values=values[:, :2]), ValueError, f"{op}: values must have the shape of indices"),
        (dict(indices=indices.short()), TypeError, f"{op}: indices must be int64 or int32, got torch.int16"),
        (dict(target=target.clone().fill_(13)), ValueError, f"{op}: target holds class 13"),
        (dict(weight=weight[:, :3]), ValueError, rf"{op}: weight must be \[V, H\]"),
        (dict(convention="uniform"), ValueError, f"{op}: convention must be one of"),
        (dict(divergence="reverse_kl"), ValueError, f"{op}: divergence='reverse_kl' is \\+inf under convention='zero'"),
        (dict(chunk_size=0), ValueError, f"{op}: chunk_size must be >= 1"),
        (dict(temperature=-1.0), ValueError, f"{op}: temperature must be finite and > 0"),
    ]
    for change, exc, match in cases:
        args = dict(hidden=hidden, weight=weight, indices=indices, values=values, target=target)
        kwargs = {key: change.pop(key) for key in list(change) if key not in args}
        args.update(change)
        with pytest.raises(exc, match=match):
            ued_fast.fused_linear_sparse_kd_loss(args["hidden"], args["weight"], args["indices"], args["values"],
                                                 args["target"], bias=bias, **kwargs)
