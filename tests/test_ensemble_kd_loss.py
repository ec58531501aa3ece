"""ensemble_kd_loss on every backend available here, against the fp64 reference (the spec).

CPU: 'cpp', 'reference', and 'triton' when TRITON_INTERPRET=1; plus the CUDA backends when a GPU is
present. The Triton interpreter is slow, so it gets the small shapes of each case list.
"""
from __future__ import annotations

import itertools

import pytest
import torch

import ued_fast
from ued_fast import EnsembleKDLoss, ensemble_kd_loss, ensemble_kd_loss_reference
from ued_fast.ops import _spine
from ued_fast.ops.ensemble_kd_loss import _ensemble_kd_loss_op, stacked_view

DEVICE_BACKENDS = [("cpu", b) for b in ued_fast.available_backends("cpu")]
if torch.cuda.is_available():
    DEVICE_BACKENDS += [("cuda", b) for b in ued_fast.available_backends("cuda")]
IDS = [f"{d}-{b}" for d, b in DEVICE_BACKENDS]
HAS_CPP = "cpp" in ued_fast.available_backends("cpu")
REDUCTIONS = ("none", "sum", "batchmean", "mean")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TEMPERATURES = (0.5, 1.0, 2.0, 4.0, 20.0)
ALPHAS = (0.0, 0.5, 1.0)


def _slow(device, backend):
    return device == "cpu" and backend == "triton"  # the interpreter


def _weights(kind, k, n, gen):
    if kind == "none":
        return None
    if kind == "k":
        return torch.rand(k, generator=gen) * 3 + 0.1
    w = torch.rand(k, n, generator=gen) ** 3  # uneven, some near 0
    if k > 1:
        w[0, ::2] = 0.0  # teacher 0 left out of every other row
    return w


def _target(kind, n, c, gen):
    if kind == "none":
        return None
    y = torch.randint(0, c, (n,), generator=gen)
    y[1::3] = -100  # ignored rows
    return y


def _tolerances(dtype):
    # (loss rtol, grad tolerance relative to the largest gradient entry)
    return {torch.float32: (2e-5, 2e-5), torch.bfloat16: (1e-4, 1e-2), torch.float16: (1e-4, 2e-3),
            torch.float64: (1e-10, 1e-10)}[dtype]


def _run(device, backend, student, teachers, weights, target, grad_out_seed=0, **kw):
    """Loss and student gradient (fp64) of the backend, with a grad_output that is not 1."""
    s = student.detach().to(device).requires_grad_()
    t = teachers.to(device) if isinstance(teachers, torch.Tensor) else [x.to(device) for x in teachers]
    w = None if weights is None else weights.to(device)
    y = None if target is None else target.to(device)
    loss = ensemble_kd_loss(s, t, y, weights=w, backend=backend, **kw)
    gen = torch.Generator().manual_seed(grad_out_seed)
    grad_out = (torch.rand(loss.shape, generator=gen, dtype=torch.float64) + 0.5).to(loss.dtype).to(device)
    (g,) = torch.autograd.grad(loss, s, grad_out)
    return loss.detach().double().cpu(), g.double().cpu()


def _expected(student, teachers, weights, target, grad_out_seed=0, **kw):
    """The spec in fp64 on the same (already rounded) inputs."""
    s = student.detach().double().requires_grad_()
    t = teachers.double() if isinstance(teachers, torch.Tensor) else [x.double() for x in teachers]
    w = None if weights is None else weights.double()
    loss = ensemble_kd_loss_reference(s, t, w, target, **kw)
    gen = torch.Generator().manual_seed(grad_out_seed)
    grad_out = torch.rand(loss.shape, generator=gen, dtype=torch.float64) + 0.5
    (g,) = torch.autograd.grad(loss, s, grad_out)
    return loss.detach(), g


def _assert_matches(got, want, dtype, what):
    (loss, grad), (loss_ref, grad_ref) = got, want
    rtol, gtol = _tolerances(dtype)
    assert torch.isfinite(loss).all(), f"{what}: non-finite loss {loss}"
    torch.testing.assert_close(loss, loss_ref, rtol=rtol, atol=rtol * (1 + loss_ref.abs().max().item()),
                               msg=lambda m: f"{what}: loss\n{m}")
    # Floor for gradients that are 0 in exact arithmetic (C = 1): fp32 rounding of (s2/T) * (q - p).
    scale = grad_ref.abs().max().item()
    torch.testing.assert_close(grad, grad_ref, rtol=gtol, atol=gtol * scale + 1e-5, msg=lambda m: f"{what}: grad\n{m}")


def _cases(slow):
    """A covering design over K, C, mixes, weights, targets, reductions, dtypes, T and alpha."""
    ks = (1, 2, 3, 5, 8)
    cs = (1, 2, 10, 100, 1000, 4097)
    for i, (c, k) in enumerate(itertools.product(cs, ks)):
        for j, mix in enumerate(("prob", "logit")):
            m = 2 * i + j
            yield dict(
                n=(3, 5, 7, 11)[m % 4] if c <= 1000 else 3, c=c, k=k, mix=mix,
                weights=("none", "k", "kn")[m % 3], target=("none", "ignore")[(m // 3) % 2],
                reduction=REDUCTIONS[m % 4], dtype=DTYPES[(m // 2) % 3],
                temperature=TEMPERATURES[m % 5], alpha=ALPHAS[(m // 4) % 3],
            )


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS, ids=IDS)
def test_matches_reference(device, backend):
    for case_id, case in enumerate(_cases(_slow(device, backend))):
        gen = torch.Generator().manual_seed(case_id)
        n, c, k, dtype = case["n"], case["c"], case["k"], case["dtype"]
        student = (torch.randn(n, c, generator=gen) * 3).to(dtype)
        teachers = (torch.randn(k, n, c, generator=gen) * 4).to(dtype)
        weights = _weights(case["weights"], k, n, gen)
        target = _target(case["target"], n, c, gen)
        kw = dict(mix=case["mix"], temperature=case["temperature"], alpha=case["alpha"],
                  reduction=case["reduction"])
        got = _run(device, backend, student, teachers, weights, target, case_id, **kw)
        want = _expected(student, teachers, weights, target, case_id, **kw)
        _assert_matches(got, want, dtype, f"case {case_id} {case}")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS, ids=IDS)
@pytest.mark.parametrize("mix", ["prob", "logit"])
def test_large_vocab(device, backend, mix):
    n, k, c = (2, 3, 32000)
    gen = torch.Generator().manual_seed(7)
    student = torch.randn(n, c, generator=gen) * 2
    teachers = torch.randn(k, n, c, generator=gen) * 5
    target = torch.tensor([5, 31999])
    kw = dict(mix=mix, temperature=2.0, alpha=0.5, reduction="sum")
    got = _run(device, backend, student, teachers, torch.tensor([0.2, 0.5, 0.3]), target, **kw)
    want = _expected(student, teachers, torch.tensor([0.2, 0.5, 0.3]), target, **kw)
    _assert_matches(got, want, torch.float32, f"C=32000 {mix}")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS, ids=IDS)
@pytest.mark.parametrize("mix", ["prob", "logit"])
@pytest.mark.parametrize("temperature", [0.5, 20.0])
def test_extreme_logits_and_neg_inf(device, backend, mix, temperature):
    """1e4-sized logits and -inf teacher entries (probability 0), fp32, C across the kernel paths."""
    for c in (10, 300) if _slow(device, backend) else (10, 300, 5000):
        gen = torch.Generator().manual_seed(c)
        n, k = 5, 3
        student = torch.randn(n, c, generator=gen) * 1e4
        teachers = torch.randn(k, n, c, generator=gen) * 1e4
        teachers[0, :, : c // 2] = -float("inf")
        teachers[1, 2, : c - 2] = -float("inf")  # teacher 1 is one-hot (column c-2) on row 2
        teachers[1, 2, c - 1] = -float("inf")
        teachers[2, :, c - 1] = -float("inf")
        weights = torch.tensor([0.5, 0.3, 0.2])
        target = torch.randint(0, c, (n,), generator=gen)
        kw = dict(mix=mix, temperature=temperature, alpha=0.5, reduction="none")
        loss, grad = _run(device, backend, student, teachers, weights, target, **kw)
        loss_ref, grad_ref = _expected(student, teachers, weights, target, **kw)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
        # fp32 arithmetic on 1e4 / T logits: relative 1e-4 of the row loss is the floor here.
        torch.testing.assert_close(loss, loss_ref, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(grad, grad_ref, rtol=1e-3, atol=1e-4 * grad_ref.abs().max().item())


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS, ids=IDS)
def test_noncontiguous_inputs(device, backend):
    gen = torch.Generator().manual_seed(3)
    n, k, c = 7, 3, 37
    big = torch.randn(n, c + 5, generator=gen)
    student = big[:, 2 : c + 2]  # row stride c + 5
    t_nkc = torch.randn(n, k, c, generator=gen) * 3
    teachers = t_nkc.permute(1, 0, 2)  # [K, N, C] view with unusual strides
    class_strided = torch.randn(k, n, 2 * c, generator=gen)[..., ::2]  # needs a copy
    weights = torch.rand(k, n, generator=gen).t().contiguous().t()  # [K, N] with column-major strides
    target = torch.randint(0, c, (n,), generator=gen)
    for t in (teachers, class_strided):
        kw = dict(mix="prob", temperature=3.0, alpha=0.3, reduction="batchmean")
        got = _run(device, backend, student, t, weights, target, **kw)
        want = _expected(student, t, weights, target, **kw)
        _assert_matches(got, want, torch.float32, "non-contiguous")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS, ids=IDS)
@pytest.mark.parametrize("mix", ["prob", "logit"])
def test_list_and_stacked_teachers_identical(device, backend, mix):
    gen = torch.Generator().manual_seed(11)
    n, k, c = 5, 4, 50
    student = torch.randn(n, c, generator=gen)
    stacked = torch.randn(k, n, c, generator=gen) * 2
    separate = [stacked[i].clone() for i in range(k)]  # separate allocations
    target = torch.randint(0, c, (n,), generator=gen)
    kw = dict(mix=mix, temperature=2.0, alpha=0.7, reduction="none")
    a = _run(device, backend, student, stacked, None, target, **kw)
    b = _run(device, backend, student, separate, None, target, **kw)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_stacked_view_does_not_copy():
    stack = torch.randn(3, 4, 5)
    view = stacked_view(list(stack.unbind(0)))
    assert view.data_ptr() == stack.data_ptr() and torch.equal(view, stack)
    separate = [torch.randn(4, 5) for _ in range(3)]
    assert torch.equal(stacked_view(separate), torch.stack(separate))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS, ids=IDS)
def test_all_rows_ignored_and_no_grad(device, backend):
    student = torch.randn(4, 6)
    teachers = torch.randn(2, 4, 6)
    target = torch.full((4,), -100)
    loss, grad = _run(device, backend, student, teachers, None, target)
    assert loss.item() == 0.0 and torch.count_nonzero(grad) == 0
    with torch.no_grad():  # the forward-only path (no gradient written) gives the same loss
        plain = ensemble_kd_loss(student.to(device), teachers.to(device), backend=backend)
    ref = ensemble_kd_loss_reference(student.double(), teachers.double())
    torch.testing.assert_close(plain.double().cpu(), ref, rtol=2e-5, atol=1e-6)


@pytest.mark.skipif(not HAS_CPP, reason="ued_fast._C not built")
@pytest.mark.parametrize("mix", ["prob", "logit"])
def test_gradcheck_cpp_fp64(mix):
    gen = torch.Generator().manual_seed(5)
    n, k, c = 4, 3, 9
    s = torch.randn(n, c, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randn(k, n, c, generator=gen, dtype=torch.float64) * 2
    w = torch.rand(k, n, generator=gen, dtype=torch.float64)
    y = torch.tensor([1, -100, 8, 0])
    for reduction in ("none", "batchmean"):
        f = lambda x: ensemble_kd_loss(x, t, y, weights=w, mix=mix, temperature=1.7, alpha=0.6, reduction=reduction,
                                       backend="cpp")
        assert torch.autograd.gradcheck(f, (s,), eps=1e-6, atol=1e-7)
        # fp64 path agrees with the spec to rounding
        torch.testing.assert_close(f(s), ensemble_kd_loss_reference(s, t, w, y, mix=mix, temperature=1.7,
                                                                     alpha=0.6, reduction=reduction))


@pytest.mark.skipif(not HAS_CPP, reason="ued_fast._C not built")
def test_opcheck():
    n, k, c = 5, 3, 11
    s = torch.randn(n, c, requires_grad=True)
    teachers = list(torch.randn(k, n, c).unbind(0))
    w = torch.softmax(torch.randn(k, n), 0)
    y = torch.tensor([0, 3, -100, 10, 2])
    for reduction, mix, target in [("batchmean", "prob", y), ("none", "logit", None), ("mean", "prob", None)]:
        args = (s, teachers, w, target, 2.0, 0.5, True, reduction, -100, mix, "cpp", True)
        torch.library.opcheck(_ensemble_kd_loss_op, args)


@pytest.mark.skipif(not HAS_CPP, reason="ued_fast._C not built")
def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(9)
    s = torch.randn(6, 10, generator=gen, requires_grad=True)
    t = torch.randn(5, 6, 10, generator=gen)
    w = torch.rand(5, generator=gen)
    y = torch.tensor([1, 2, -100, 4, 5, 9])

    def step(s, t, w, y):
        return ensemble_kd_loss(s, t, y, weights=w, mix="prob", temperature=3.0, alpha=0.8) * 2.0

    compiled = torch.compile(step, fullgraph=True)  # inductor
    loss = compiled(s, t, w, y)
    (g,) = torch.autograd.grad(loss, s)
    s64 = s.detach().double().requires_grad_()
    ref = ensemble_kd_loss_reference(s64, t.double(), w.double(), y, temperature=3.0, alpha=0.8) * 2.0
    (g_ref,) = torch.autograd.grad(ref, s64)
    torch.testing.assert_close(loss.double(), ref, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(g.double(), g_ref, rtol=2e-5, atol=1e-7)


def test_default_backend_is_the_fastest_available():
    s = torch.randn(3, 4, requires_grad=True)
    t = torch.randn(2, 3, 4)
    loss = ensemble_kd_loss(s, t)
    native = ued_fast.available_backends("cpu")[0] != "reference"
    assert ("EagerEnsembleKDLoss" in type(loss.grad_fn).__name__) == native


@pytest.mark.skipif(not HAS_CPP, reason="ued_fast._C not built")
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_eager_path_equals_custom_op(reduction):
    """Eager calls skip the custom-op wrapper (autograd.Function); torch.compile uses the op: same numbers."""
    s = torch.randn(6, 9, requires_grad=True)
    t = torch.randn(2, 6, 9)
    w = torch.softmax(torch.randn(2, 6), 0)
    y = torch.tensor([1, -100, 3, 4, 8, 0])
    a = ensemble_kd_loss(s, t, y, weights=w, mix="logit", temperature=1.5, reduction=reduction, backend="cpp")
    w_normalized = w / w.sum(0, keepdim=True)  # what the public function hands the op
    b, _, _ = _ensemble_kd_loss_op(s, list(t.unbind(0)), w_normalized, y, 1.5, 0.9, True, reduction, -100, "logit", "cpp", True)
    go = torch.rand(a.shape) + 0.5
    (ga,) = torch.autograd.grad(a, s, go)
    (gb,) = torch.autograd.grad(b, s, go)
    assert torch.equal(a, b) and torch.equal(ga, gb)


def test_module_matches_function():
    s = torch.randn(5, 7, requires_grad=True)
    t = torch.randn(3, 5, 7)
    y = torch.tensor([0, 6, -100, 2, 3])
    mod = EnsembleKDLoss(mix="logit", temperature=2.5, alpha=0.4, reduction="sum")
    assert "logit" in repr(mod) or isinstance(mod, torch.nn.Module)
    a = mod(s, t, y)
    b = ensemble_kd_loss(s, t, y, mix="logit", temperature=2.5, alpha=0.4, reduction="sum")
    assert torch.equal(a, b)


def test_bad_input_names_the_argument():
    s = torch.randn(4, 5)
    t = torch.randn(3, 4, 5)
    cases = [
        (dict(teachers=torch.randn(3, 4, 6)), ValueError, "teachers"),
        (dict(teachers=torch.randn(4, 5)), ValueError, "teachers"),
        (dict(teachers=[torch.randn(4, 5), torch.randn(4, 6)]), ValueError, "teachers[1]"),
        (dict(teachers=[]), TypeError, "teachers"),
        (dict(teachers=[torch.randn(4, 5).long()]), TypeError, "teachers[0]"),
        (dict(weights=torch.rand(2)), ValueError, "weights"),
        (dict(weights=torch.rand(3, 5)), ValueError, "weights"),
        (dict(weights=torch.tensor([0.5, -0.1, 0.6])), ValueError, "weights"),
        (dict(weights=torch.zeros(3)), ValueError, "weights"),
        (dict(weights=torch.tensor([1.0, float("nan"), 1.0])), ValueError, "weights"),
        (dict(mix="geometric"), ValueError, "mix"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(alpha=1.5), ValueError, "alpha"),
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(target=torch.tensor([0, 1, 2, 5])), ValueError, "target"),
        (dict(target=torch.tensor([0, 1, 2])), ValueError, "target"),
        (dict(student=torch.randn(4, 5, 1)), ValueError, "student"),
        (dict(teachers=torch.randn(3, 4, 5, device="meta")), ValueError, "teachers"),
        (dict(weights=torch.rand(3, device="meta")), ValueError, "weights"),
        (dict(backend="tpu"), ValueError, "backend"),
    ]
    for kwargs, exc, name in cases:
        args = dict(student=s, teachers=t, weights=None, target=None)
        args.update(kwargs)
        student, teachers = args.pop("student"), args.pop("teachers")
        with pytest.raises(exc, match=f"ensemble_kd_loss: {name}".replace("[", r"\[").replace("]", r"\]")):
            ensemble_kd_loss(student, teachers, **args)


@pytest.mark.skipif(not HAS_CPP, reason="ued_fast._C not built")
def test_torch_compile_explicit_backend_and_module():
    torch._dynamo.reset()
    s = torch.randn(4, 12, requires_grad=True)
    t = [torch.randn(4, 12) for _ in range(3)]
    mod = EnsembleKDLoss(mix="logit", temperature=2.0, reduction="sum", backend="cpp")
    loss = torch.compile(mod, fullgraph=True, backend="aot_eager")(s, t)
    torch.testing.assert_close(loss, ensemble_kd_loss(s, t, mix="logit", temperature=2.0, reduction="sum"))


@pytest.mark.skipif(not ued_fast._backend.triton_available() or not (
    ued_fast._backend.triton_interpreted() or torch.cuda.is_available()), reason="Triton cannot run here")
@pytest.mark.parametrize("mix", [0, 1])
def test_triton_chunked_kernel_on_small_rows(mix):
    """The column-chunked kernel (large C) on short rows with tiny chunks: several chunks, ragged tail."""
    from ued_fast.kernels.ensemble_kd_loss import ensemble_kd_loss_fwd

    device = "cuda" if torch.cuda.is_available() else "cpu"
    for case_id, (c, k, has_target, dtype) in enumerate(
            [(1, 1, True, torch.float32), (37, 3, True, torch.bfloat16), (64, 5, False, torch.float16),
             (50, 8, True, torch.float32)]):
        gen = torch.Generator().manual_seed(case_id)
        n = 5
        s = (torch.randn(n, c, generator=gen) * 3).to(dtype)
        t = (torch.randn(k, n, c, generator=gen) * 3).to(dtype)
        w = torch.rand(k, n, generator=gen)
        if k > 1:
            w[0, 1] = 0.0  # a left-out teacher
        w = w / w.sum(0)
        y = torch.randint(0, c, (n,), generator=gen) if has_target else None
        if has_target:
            y[3] = -100
        rows, grad = ensemble_kd_loss_fwd(s.to(device), t.to(device), w.to(device),
                                          None if y is None else y.to(device),
                                          *_spine.kd_coefficients(1.5, 0.25, True, y is not None), -100, mix, True,
                                          block_c=16)
        s64 = s.double().requires_grad_()
        ref = ensemble_kd_loss_reference(s64, t.double(), w.double(), y, mix=("prob", "logit")[mix],
                                         temperature=1.5, alpha=0.25, reduction="none")
        (g_ref,) = torch.autograd.grad(ref.sum(), s64)
        rtol, gtol = _tolerances(dtype)
        torch.testing.assert_close(rows.double().cpu(), ref.detach(), rtol=rtol, atol=1e-5)
        torch.testing.assert_close(grad.double().cpu(), g_ref, rtol=gtol, atol=gtol * g_ref.abs().max().item() + 1e-5)
