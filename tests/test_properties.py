"""Property-based tests (hypothesis) of every public op on every backend this machine has.

Each example draws shapes, dtypes, temperatures, weights, covers, masks and extreme values, runs the
op on one backend and compares loss/output and gradients with the op's reference evaluated in
float64 on the same (already rounded) inputs.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ued_fast
from ued_fast.reference import (
    ensemble_kd_loss_reference,
    grouped_heads_reference,
    kd_loss_reference,
)

BACKENDS = ued_fast.available_backends("cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# The Triton interpreter runs kernels in numpy: fewer, smaller examples keep the suite fast.
EXAMPLES = {"triton": 12, "reference": 25, "cpp": 40, "cuda": 40}
MAX_C = {"triton": 40}


def _settings(backend):
    return settings(max_examples=EXAMPLES.get(backend, 25), deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _close(actual, expected, rtol, atol, what):
    actual, expected = actual.double(), expected.double()
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(actual), finite), f"{what}: non-finite entries differ"
    err = (actual[finite] - expected[finite]).abs()
    bound = atol + rtol * expected[finite].abs()
    assert bool((err <= bound).all()), f"{what}: max error {float(err.max()):.3g} (bound {float(bound.max()):.3g})"


def _close_loss(loss, ref, kwargs, scale, c):
    # Logits of size `scale` carry absolute rounding of about eps*scale into every log-probability; T^2 scales it.
    tol = 1e-5 * (1 + scale / kwargs["temperature"]) * (1 + math.log(c + 1)) * (kwargs["temperature"] ** 2)
    _close(loss.detach(), ref.detach(), 1e-4, tol, "loss")


def _close_student_grad(grad, grad64, dtype):
    # The gradient is stored in the input dtype: its rounding dominates for 16-bit types.
    gtol = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    _close(grad, grad64, gtol, gtol * (1 + float(grad64.abs().max())), "grad")


def _check_kd_op(op, reference, student, constants, kwargs, scale, backend):
    """op(student, *constants) on `backend` against reference(student in float64, *constants): the loss,
    and where the reference is finite, the student's gradient under a random upstream gradient."""
    s = student.detach().requires_grad_(True)
    loss = op(s, *constants, backend=backend, **kwargs)
    s64 = student.detach().double().requires_grad_(True)
    ref = reference(s64, *[c.double() if torch.is_tensor(c) and c.is_floating_point() else c for c in constants],
                    **kwargs)
    _close_loss(loss, ref, kwargs, scale, student.shape[1])
    if not bool(torch.isfinite(ref).all()):  # reverse_kl: +inf where the student has mass the teacher lacks
        return
    g = torch.randn(ref.shape, dtype=torch.float64) if ref.dim() else torch.tensor(0.7, dtype=torch.float64)
    (loss * g.to(loss.dtype)).sum().backward()
    (ref * g).sum().backward()
    _close_student_grad(s.grad, s64.grad, student.dtype)
    assert s.grad.dtype == student.dtype


def _draw_dtype_scale_generator(draw, scales):
    """An input dtype, a logit scale and a seeded torch generator, all drawn."""
    dtype = draw(st.sampled_from(DTYPES))
    scale = draw(st.sampled_from(scales))
    return dtype, scale, torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))


def _draw_target(draw, g, n, c):
    """No target, or one with about a quarter of its rows ignored (-100)."""
    if not draw(st.booleans()):
        return None
    target = torch.randint(0, c, (n,), generator=g)
    target[torch.rand(n, generator=g) < 0.25] = -100
    return target


@st.composite
def kd_cases(draw, max_c):
    n = draw(st.integers(1, 9))
    c = draw(st.integers(1, max_c))
    dtype, scale, g = _draw_dtype_scale_generator(draw, [1.0, 30.0, 1e4])
    student = (torch.randn(n, c, generator=g) * scale).to(dtype)
    teacher = (torch.randn(n, c, generator=g) * scale).to(dtype)
    if draw(st.booleans()) and c > 1:  # -inf teacher entries (probability 0), never a whole row
        mask = torch.rand(n, c, generator=g) < 0.3
        mask[:, 0] = False
        teacher = teacher.masked_fill(mask, -math.inf)
    target = _draw_target(draw, g, n, c)
    if draw(st.booleans()):  # non-contiguous rows: a view into a wider buffer
        wide = torch.zeros(n, c + 3, dtype=dtype)
        wide[:, 1 : c + 1] = student
        student = wide[:, 1 : c + 1]
    kwargs = dict(
        temperature=draw(st.sampled_from([0.5, 1.0, 2.0, 4.0, 20.0])),
        alpha=draw(st.sampled_from([0.0, 0.3, 1.0])),
        t2_scale=draw(st.booleans()),
        reduction=draw(st.sampled_from(["none", "sum", "batchmean", "mean"])),
    )
    return student, teacher, target, kwargs, scale


@pytest.mark.parametrize("backend", BACKENDS)
def test_kd_loss_matches_reference(backend):
    @_settings(backend)
    @given(kd_cases(MAX_C.get(backend, 300)))
    def check(case):
        student, teacher, target, kwargs, scale = case
        _check_kd_op(ued_fast.kd_loss, kd_loss_reference, student, (teacher, target), kwargs, scale, backend)

    check()


@st.composite
def ensemble_cases(draw, max_c):
    n = draw(st.integers(1, 7))
    c = draw(st.integers(1, max_c))
    k = draw(st.integers(1, 6))
    dtype, scale, g = _draw_dtype_scale_generator(draw, [1.0, 30.0, 1e4])
    student = (torch.randn(n, c, generator=g) * scale).to(dtype)
    teachers = (torch.randn(k, n, c, generator=g) * scale).to(dtype)
    weights = None
    kind = draw(st.sampled_from(["none", "k", "kn"]))
    if kind != "none":
        shape = (k,) if kind == "k" else (k, n)
        weights = torch.rand(shape, generator=g)
        weights[0] += 0.1  # no column sums to zero
    target = _draw_target(draw, g, n, c)
    kwargs = dict(
        mix=draw(st.sampled_from(["prob", "logit"])),
        temperature=draw(st.sampled_from([0.5, 1.0, 4.0, 20.0])),
        alpha=draw(st.sampled_from([0.0, 0.5, 1.0])),
        t2_scale=draw(st.booleans()),
        reduction=draw(st.sampled_from(["none", "sum", "batchmean", "mean"])),
    )
    as_list = draw(st.booleans())
    return student, teachers, weights, target, kwargs, scale, as_list


@pytest.mark.parametrize("backend", BACKENDS)
def test_ensemble_kd_loss_matches_reference(backend):
    @_settings(backend)
    @given(ensemble_cases(MAX_C.get(backend, 200)))
    def check(case):
        student, teachers, weights, target, kwargs, scale, as_list = case
        s = student.detach().requires_grad_(True)
        given_teachers = list(teachers.unbind(0)) if as_list else teachers
        loss = ued_fast.ensemble_kd_loss(s, given_teachers, target, weights=weights, backend=backend, **kwargs)
        s64 = student.detach().double().requires_grad_(True)
        w64 = None if weights is None else weights.double()
        ref = ensemble_kd_loss_reference(s64, teachers.double(), w64, target, **kwargs)
        _close_loss(loss, ref, kwargs, scale, student.shape[1])
        loss.sum().backward()
        ref.sum().backward()
        _close_student_grad(s.grad, s64.grad, student.dtype)

    check()


@st.composite
def covers(draw, max_k=6, max_c=20):
    c = draw(st.integers(2, max_c))
    k = draw(st.integers(1, max_k))
    subsets = [set() for _ in range(k)]
    for cls in range(c):  # every class in at least one subset, some in several
        holders = draw(st.sets(st.integers(0, k - 1), min_size=1, max_size=k))
        for h in holders:
            subsets[h].add(cls)
    for h in range(k):
        if not subsets[h]:
            subsets[h].add(draw(st.integers(0, c - 1)))
    # Order inside a subset is arbitrary: head output j is class cover[k][j] in the given order.
    return [draw(st.permutations(sorted(s))) for s in subsets]


@st.composite
def heads_cases(draw):
    cover = draw(covers())
    k = len(cover)
    mode = draw(st.sampled_from(["logit_mean", "prob_mean"]))
    width = max(len(s) for s in cover) + (1 if mode == "prob_mean" else 0) + draw(st.integers(0, 2))
    d = draw(st.integers(1, 9))
    n = draw(st.integers(1, 8))
    dtype, scale, g = _draw_dtype_scale_generator(draw, [1.0, 10.0, 300.0])
    layout_nkd = draw(st.booleans())
    features = torch.randn(n, k * d, generator=g).to(dtype)
    weight = (torch.randn(k, d, width, generator=g) * scale / math.sqrt(d)).to(dtype)
    bias = torch.randn(k, width, generator=g).to(dtype)
    if not layout_nkd:
        features = features.view(n, k, d).permute(1, 0, 2).contiguous()
    return features, weight, bias, cover, mode, scale


@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_heads_matches_reference(backend):
    @_settings(backend)
    @given(heads_cases())
    def check(case):
        features, weight, bias, cover, mode, scale = case
        leaves = [t.detach().requires_grad_(True) for t in (features, weight, bias)]
        out = ued_fast.grouped_heads(*leaves, cover, mode=mode, backend=backend)
        leaves64 = [t.detach().double().requires_grad_(True) for t in (features, weight, bias)]
        ref = grouped_heads_reference(*leaves64, cover, mode=mode)
        assert out.shape == ref.shape and out.dtype == features.dtype
        otol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[features.dtype]
        _close(out.detach(), ref.detach(), otol, otol * (1 + scale), "output")
        g = torch.randn(ref.shape, dtype=torch.float64)
        (out * g.to(out.dtype)).sum().backward()
        (ref * g).sum().backward()
        for name, a, b in zip(("features", "weight", "bias"), leaves, leaves64):
            _close(a.grad, b.grad, otol * 2, otol * 2 * (1 + float(b.grad.abs().max())), f"grad {name}")

    check()


@st.composite
def sparse_cases(draw, max_c):
    """A student, a teacher's top-k (unsorted entries, some padding), a target, and valid settings."""
    n = draw(st.integers(1, 7))
    c = draw(st.integers(1, max_c))
    k = draw(st.integers(1, c))
    dtype, scale, g = _draw_dtype_scale_generator(draw, [1.0, 30.0, 1e4])
    student = (torch.randn(n, c, generator=g) * scale).to(dtype)
    convention = draw(st.sampled_from(["zero", "symmetric_uniform"]))
    values_kind = "log_probs" if convention == "symmetric_uniform" else draw(st.sampled_from(["log_probs", "logits"]))
    divergence = draw(st.sampled_from(["forward_kl", "jsd"] + (["reverse_kl"] if convention != "zero" else [])))
    teacher = torch.randn(n, c, generator=g, dtype=torch.float64) * draw(st.sampled_from([1.0, 5.0]))
    scores = torch.log_softmax(teacher, -1) if values_kind == "log_probs" else teacher
    order = torch.rand(n, c, generator=g).argsort(-1)[:, :k]  # any k distinct classes, in any order
    values = scores.gather(-1, order)
    values[torch.rand(n, k, generator=g) < 0.2] = -math.inf  # padding
    if convention == "zero":  # a row of padding only has no teacher there (an error)
        values[:, 0] = scores.gather(-1, order[:, :1])[:, 0]
    target = None
    if draw(st.booleans()):
        target = torch.randint(0, c, (n,), generator=g)
        target[torch.rand(n, generator=g) < 0.3] = -100
    kwargs = dict(
        temperature=draw(st.sampled_from([0.5, 1.0, 2.0, 4.0])),
        teacher_temperature=draw(st.sampled_from([None, 1.0, 3.0])),
        alpha=draw(st.sampled_from([0.0, 0.3, 1.0])),
        t2_scale=draw(st.booleans()),
        reduction=draw(st.sampled_from(["none", "sum", "batchmean", "mean"])),
        convention=convention, values_kind=values_kind, divergence=divergence,
        beta=draw(st.sampled_from([0.0, 0.3, 1.0])),
    )
    return student, order, values, target, kwargs, scale


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_kd_loss_matches_reference(backend):
    @_settings(backend)
    @given(sparse_cases(MAX_C.get(backend, 300)))
    def check(case):
        student, indices, values, target, kwargs, scale = case
        _check_kd_op(ued_fast.sparse_kd_loss, ued_fast.sparse_kd_loss_reference, student, (indices, values, target),
                     kwargs, scale, backend)

    check()
