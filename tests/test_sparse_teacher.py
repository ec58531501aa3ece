"""sparse_kd_loss (top-k teacher, no dense teacher) against its reference in float64, the reference
against the project's dense kd_loss_reference and against DistillKit's sparse losses (transcribed),
gradcheck, odd k, padding and duplicates, extreme logits, bad input, torch.compile, and memory."""
from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

import ued_fast.ops._sparse_teacher as st
import ued_fast.ops.sparse_kd_loss as sparse_op
from ued_fast.ops import _spine
from ued_fast.reference import kd_loss_reference
from ued_fast.ops.sparse_kd_loss import SparseKDLoss, sparse_kd_loss, sparse_kd_loss_reference

from conftest import TensorSizeWatch

IGNORE = -100
CASES = [("zero", "forward_kl"), ("zero", "jsd"), ("symmetric_uniform", "forward_kl"),
         ("symmetric_uniform", "reverse_kl"), ("symmetric_uniform", "jsd")]


def make_case(n=9, c=13, k=4, seed=0, dtype=torch.float64, ignored=(2, 5), pad=0, values_kind="log_probs"):
    """Student logits, the top-k of a random teacher (distinct indices, log-probs or logits), targets with
    ignored rows; the last `pad` entries of every other row are padding (index 0, value -inf)."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(n, c, generator=g, dtype=torch.float64) * 3
    teacher = torch.randn(n, c, generator=g, dtype=torch.float64) * 3
    scores = F.log_softmax(teacher, -1) if values_kind == "log_probs" else teacher
    values, indices = scores.topk(k, dim=-1)
    if pad:
        values[::2, k - pad:] = -math.inf
        indices[::2, k - pad:] = 0
    target = torch.randint(0, c, (n,), generator=g)
    target[list(ignored)] = IGNORE
    return student.to(dtype), indices, values.to(dtype), target


# The native backends on CPU tensors: 'cpp' (float64 here, so compared at 1e-12) and the Triton kernel
# under the interpreter (float32 only, compared at float32's tolerance).
NATIVE = ["cpp", "triton"]
PRECISION = {"cpp": (torch.float64, dict(rtol=1e-12, atol=1e-12), dict(rtol=1e-10, atol=1e-12)),
             "triton": (torch.float32, dict(rtol=2e-5, atol=2e-6), dict(rtol=1e-4, atol=2e-6))}


def both(student, indices, values, target, weights=None, backend="cpp", **kw):
    """(loss, grad) of a native backend (in its PRECISION dtype) and of the float64 reference, for
    sum(loss * weights)."""
    out = []
    for fn, dtype in ((functools.partial(sparse_kd_loss, backend=backend), PRECISION[backend][0]),
                      (sparse_kd_loss_reference, torch.float64)):
        s = student.detach().to(dtype, copy=True).requires_grad_()  # its own leaf: no gradient shared between the two
        loss = fn(s, indices, values, target, **kw)
        w = weights if weights is not None and loss.dim() else torch.ones_like(loss, dtype=torch.float64)
        (loss * w.to(loss.dtype)).sum().backward()
        out.append((loss.detach().double(), s.grad.double().clone()))
    return out


def assert_close_to_reference(backend, got, expected, equal_nan=False):
    (loss, grad), (ref_loss, ref_grad) = got, expected
    _, loss_tol, grad_tol = PRECISION[backend]
    torch.testing.assert_close(loss, ref_loss, equal_nan=equal_nan, **loss_tol)
    torch.testing.assert_close(grad, ref_grad, equal_nan=equal_nan, **grad_tol)


# ---------------------------------------------------------------------------------------------
# Fast path == reference (float64)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("convention,divergence", CASES)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("with_target", [True, False])
def test_matches_reference(backend, convention, divergence, reduction, with_target):
    student, indices, values, target = make_case(pad=1)
    weights = torch.rand(student.shape[0], dtype=torch.float64)
    assert_close_to_reference(backend, *both(
        student, indices, values, target if with_target else None, weights, backend=backend, temperature=2.0,
        alpha=0.7, reduction=reduction, convention=convention, divergence=divergence, beta=0.3))


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("temperature", [1.0, 3.0])
@pytest.mark.parametrize("convention,divergence", CASES)
def test_wide_rows_many_threads(backend, temperature, convention, divergence):
    """C = 1000 (many vectors, a ragged tail), k = 64 clustered and spread, rows split across threads,
    a student sliced out of a wider tensor (row stride > C); temperature 1 shares softmax(s) with the CE."""
    n, c, k = 70, 1000, 64
    student, indices, values, target = make_case(n=n, c=c, k=k, seed=11, pad=3)
    indices[1::3] = torch.arange(100, 100 + k)  # a run of adjacent classes: the support in one chunk
    wide = torch.randn(n, c + 7, dtype=torch.float64)
    wide[:, 3:3 + c] = student
    assert_close_to_reference(backend, *both(wide[:, 3:3 + c], indices, values, target, backend=backend,
                                             temperature=temperature, alpha=0.6, convention=convention,
                                             divergence=divergence, beta=0.3))


@pytest.mark.parametrize("backend", NATIVE)
def test_kernel_rows_with_bad_indices_are_nan_and_the_others_intact(backend):
    """The kernel contract on device tensors, where the host does not read the indices: an index >= C or
    < -1 makes that row's loss and gradient NaN, never an out-of-bounds access; the other rows are exact."""
    dtype = PRECISION[backend][0]
    student, indices, values, target = make_case(n=6, c=13, k=4, dtype=dtype, pad=1)
    _, live, log_p, kd_coef, ce_coef = st._prepare(student, indices, values, target, 2.0, 0.5, True, "none",
                                                   IGNORE, "zero", "log_probs", "forward_kl", 0.5, None)
    keys, lp = st.kernel_inputs(indices, live, log_p)
    forward = _spine.native_op(backend, "sparse_kd_loss", "sparse_kd_loss_fwd")
    good_rows, good_grad = forward(student, keys, lp, target, 0.5, kd_coef, ce_coef, 0, 0.5, IGNORE, True)
    bad = keys.clone()
    bad[0, -1] = 13  # past the last class
    bad[3, 0] = -2  # below the padding marker
    rows, grad = forward(student, bad, lp, target, 0.5, kd_coef, ce_coef, 0, 0.5, IGNORE, True)
    assert torch.isnan(rows[[0, 3]]).all() and torch.isnan(grad[[0, 3]]).all()
    keep = [1, 2, 4, 5]
    torch.testing.assert_close(rows[keep], good_rows[keep], rtol=0, atol=0)
    torch.testing.assert_close(grad[keep], good_grad[keep], rtol=0, atol=0)
    expected = sparse_kd_loss_reference(student.double(), indices, values, target, temperature=2.0, alpha=0.5,
                                        reduction="none")
    torch.testing.assert_close(good_rows.double(), expected, **PRECISION[backend][1])


@pytest.mark.parametrize("backend", NATIVE + ["reference"])
def test_int32_indices_are_int64_indices(backend):
    """A compact int32 store of the top-k indices gives the same loss and gradient as int64."""
    dtype = PRECISION.get(backend, (torch.float64,))[0]
    student, indices, values, target = make_case(k=5, seed=14, pad=1, dtype=dtype)
    kw = dict(temperature=2.0, convention="symmetric_uniform", divergence="jsd", backend=backend)
    results = []
    for idx in (indices, indices.int()):
        s = student.detach().clone().requires_grad_()
        loss = sparse_kd_loss(s, idx, values, target, **kw)
        loss.backward()
        results.append((loss.detach(), s.grad))
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=0)


BETA_CASES = [(conv, div, 0.5) for conv, div in CASES] + [
    (conv, "jsd", beta) for conv in ("zero", "symmetric_uniform") for beta in (0.0, 0.8, 1.0)]


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("k", [1, 3, 13])
@pytest.mark.parametrize("convention,divergence,beta", BETA_CASES)
def test_odd_k_and_beta(backend, k, convention, divergence, beta):
    student, indices, values, target = make_case(k=k, seed=k)
    got, expected = both(student, indices, values, target, backend=backend, temperature=1.5, teacher_temperature=0.8,
                         convention=convention, divergence=divergence, beta=beta)
    assert torch.isfinite(got[0]) or (divergence == "reverse_kl" and k == 13)
    assert_close_to_reference(backend, got, expected, equal_nan=True)


def test_k_equal_to_c_is_the_dense_loss():
    """With every class stored the sparse teacher is the dense one: 'zero' and 'symmetric_uniform'
    both give kd_loss_reference (no mass is missing)."""
    student, indices, values, target = make_case(k=13)
    dense = torch.empty_like(student).scatter_(-1, indices, values)
    for divergence in ("forward_kl", "jsd"):
        expected = kd_loss_reference(student, dense, target, teacher_kind="log_probs", divergence=divergence)
        for convention in ("zero", "symmetric_uniform"):
            torch.testing.assert_close(sparse_kd_loss(student, indices, values, target, convention=convention,
                                                      divergence=divergence), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
@pytest.mark.parametrize("values_kind", ["log_probs", "logits"])
def test_zero_convention_is_kd_loss_of_the_renormalized_top_k(divergence, values_kind):
    """'zero' = the project's dense kd_loss_reference with the teacher -inf outside its top-k (softmax
    over the stored entries), tempered by teacher_temperature."""
    student, indices, values, target = make_case(k=5, values_kind=values_kind, seed=3)
    dense = torch.full_like(student, -math.inf).scatter_(-1, indices, values)
    kw = dict(temperature=3.0, alpha=0.6, divergence=divergence, beta=0.4, teacher_temperature=1.7)
    expected = kd_loss_reference(student, dense, target, teacher_kind="log_probs", **kw)
    got = sparse_kd_loss(student, indices, values, target, values_kind=values_kind, **kw)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", NATIVE)
def test_padding_entries_count_nowhere(backend):
    student, indices, values, target = make_case(k=3, seed=4)
    padded_i = torch.cat([indices, indices[:, :1], torch.zeros_like(indices[:, :1])], dim=-1)
    padded_v = torch.cat([values, torch.full_like(values[:, :2], -math.inf)], dim=-1)
    for convention, divergence in CASES:
        kw = dict(convention=convention, divergence=divergence, backend=backend)
        (loss, grad), _ = both(student, indices, values, target, **kw)
        (padded_loss, padded_grad), _ = both(student, padded_i, padded_v, target, **kw)
        torch.testing.assert_close(padded_loss, loss, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(padded_grad, grad, rtol=1e-12, atol=1e-12)


def test_gradcheck():
    student, indices, values, target = make_case(n=5, c=7, k=3, pad=1, ignored=(2,))
    for convention, divergence in CASES:
        for tgt in (target, None):
            def fn(s):
                return sparse_kd_loss(s, indices, values, tgt, temperature=1.7, alpha=0.4, reduction="none",
                                      convention=convention, divergence=divergence, beta=0.35)
            assert torch.autograd.gradcheck(fn, (student.clone().requires_grad_(),))


@pytest.mark.parametrize("backend", NATIVE)
def test_all_rows_ignored_give_zero(backend):
    student, indices, values, target = make_case()
    target[:] = IGNORE
    (loss, grad), _ = both(student, indices, values, target, backend=backend)
    assert loss == 0 and torch.all(grad == 0)


# ---------------------------------------------------------------------------------------------
# Against DistillKit's sparse losses (transcribed)
# ---------------------------------------------------------------------------------------------

def _distillkit_log1mexp(x):
    return torch.where(x > -1, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def distillkit_sparse_logprobs(logits, ids, values, *, temperature, generation_temperature, symmetric, log_target):
    """distillkit/lossfuncs/common.py, get_logprobs: the student's full log-softmax of logits / T gathered
    at the ids; get_target_logprobs: log-probs scaled by a = T_gen / T and normalized over the k entries
    ('zero'), or over the k entries plus the leftover mass (1 - sum p)^a ('symmetric_uniform'; with no
    temperature change the values as they are); logits scaled by a and log-softmaxed over the k entries."""
    student = (logits / temperature).gather(-1, ids) - torch.logsumexp(logits / temperature, -1, keepdim=True)
    a = generation_temperature / temperature
    if not log_target:
        return student, F.log_softmax(values * a, -1)
    if symmetric and a == 1.0:
        return student, values
    lse_alpha = torch.logsumexp(a * values, -1, keepdim=True)
    if symmetric:
        leftover = (1.0 - torch.logsumexp(values, -1, keepdim=True).exp()).clamp(0, 1)
        lse_alpha = (lse_alpha.exp() + leftover.pow(a)).log()
    return student, a * values - lse_alpha


def distillkit_sparse_kl(logits, ids, values, labels, *, temperature, generation_temperature=1.0, symmetric=False,
                         log_target=True, eps=1e-6):
    """distillkit/lossfuncs/kl.py, sparse_kl_div_inner: sum_k p (log p - log q) over the stored entries;
    'symmetric_uniform' adds p_miss (log p_miss - log q_miss), each missing mass log1mexp of the
    logsumexp of the k log-probs (clamped to <= -eps), where p_miss > eps; masked and summed.
    KLDLoss.__call__: times T^2 / number of tokens with labels >= 0."""
    log_q, log_p = distillkit_sparse_logprobs(logits, ids, values, temperature=temperature,
                                              generation_temperature=generation_temperature, symmetric=symmetric,
                                              log_target=log_target)
    rows = (log_p.exp() * (log_p - log_q)).sum(-1)
    if symmetric:
        log_p_miss = _distillkit_log1mexp(torch.logsumexp(log_p, -1).clamp(max=-eps))
        log_q_miss = _distillkit_log1mexp(torch.logsumexp(log_q, -1).clamp(max=-eps))
        p_miss = log_p_miss.exp()
        rows = rows + torch.where(p_miss > eps, p_miss * (log_p_miss - log_q_miss), torch.zeros_like(p_miss))
    mask = labels >= 0
    return (rows * mask).sum() * temperature**2 / mask.sum()


def distillkit_sparse_jsd(logits, ids, values, labels, *, temperature, eps=1e-8):
    """distillkit/lossfuncs/jsd.py, sparse_jsd_inner with MissingProbabilityHandling.ZERO:
    m = (p + q) / 2 on the stored entries; KL(p || m) over them; KL(q || m) over them plus
    (1 - sum_k q) * log 2 for the student's mass elsewhere; 0.5 * (the two), masked and summed;
    JSDLoss.__call__: times T^2 / number of tokens with labels >= 0."""
    log_q, log_p = distillkit_sparse_logprobs(logits, ids, values, temperature=temperature, generation_temperature=1.0,
                                              symmetric=False, log_target=True)
    p, q = log_p.exp(), log_q.exp()
    log_m = torch.log((0.5 * (p + q)).clamp(min=eps))
    kl_pm = torch.where(p > eps, p * (log_p - log_m), torch.zeros_like(p)).sum(-1)
    kl_qm = torch.where(q > eps, q * (log_q - log_m), torch.zeros_like(q)).sum(-1)
    kl_qm = kl_qm + (1.0 - q.sum(-1)).clamp(min=0.0) * math.log(2.0)
    mask = labels >= 0
    return (0.5 * (kl_pm + kl_qm) * mask).sum() * temperature**2 / mask.sum()


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("temperature,generation_temperature", [(1.0, 1.0), (2.0, 1.0), (1.5, 0.7)])
def test_distillkit_sparse_kl(symmetric, temperature, generation_temperature):
    student, indices, values, target = make_case(k=4, seed=6, c=29)
    # DistillKit stores log-probs of the teacher at its generation temperature.
    values = values / generation_temperature
    values = values - torch.logsumexp(values, -1, keepdim=True) + torch.log(torch.rand_like(values[:, :1]) * 0.5 + 0.4)
    expected = distillkit_sparse_kl(student, indices, values, target, temperature=temperature,
                                    generation_temperature=generation_temperature, symmetric=symmetric)
    got = sparse_kd_loss_reference(student, indices, values, target, temperature=temperature, alpha=1.0,
                                   teacher_temperature=temperature / generation_temperature,
                                   convention="symmetric_uniform" if symmetric else "zero")
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_distillkit_sparse_kl_of_logits_and_sparse_jsd():
    student, indices, values, target = make_case(k=5, seed=7, c=23, values_kind="logits")
    expected = distillkit_sparse_kl(student, indices, values, target, temperature=2.0, log_target=False)
    got = sparse_kd_loss_reference(student, indices, values, target, temperature=2.0, alpha=1.0, values_kind="logits")
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    student, indices, values, target = make_case(k=5, seed=8, c=23)
    expected = distillkit_sparse_jsd(student, indices, values, target, temperature=2.0)
    got = sparse_kd_loss_reference(student, indices, values, target, temperature=2.0, alpha=1.0, divergence="jsd",
                                   beta=0.5)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# Extreme logits, low precision
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,dtype", [("cpp", torch.float32), ("cpp", torch.float64), ("triton", torch.float32)])
@pytest.mark.parametrize("convention,divergence", CASES)
def test_extreme_logits(backend, dtype, convention, divergence):
    """Logits 1e4 apart: the student's mass off the support is ~exp(-1e3) of the row's, which float32 keeps
    only as a log (the off-support sum is taken relative to its own max)."""
    student, indices, values, target = make_case(k=4, seed=9)
    student = student * 3e3
    student[0, 3] = -math.inf  # a class the student rules out, not stored by the teacher
    student[0, indices[0]] = torch.tensor([50.0, 20.0, 10.0, 5.0], dtype=torch.float64)
    values = values * 40.0  # a very peaked teacher: stored log-probs down to ~ -1e3
    values = values - torch.logsumexp(values, -1, keepdim=True) - 1e-3
    kw = dict(convention=convention, divergence=divergence, temperature=2.0)
    s = student.detach().to(dtype, copy=True).requires_grad_()
    loss = sparse_kd_loss(s, indices, values.to(dtype), target, backend=backend, **kw)
    loss.backward()
    (_, _), (ref_loss, ref_grad) = both(student, indices, values, target, **kw)
    if divergence == "reverse_kl":
        # Rows whose student puts all its mass where the teacher has none are +inf; the others are finite.
        assert not torch.isnan(loss)
    else:
        assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
        tol = 1e-9 if dtype == torch.float64 else 1e-4
        torch.testing.assert_close(loss.double(), ref_loss, rtol=tol, atol=tol)
        torch.testing.assert_close(s.grad.double(), ref_grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_student(backend, dtype):
    student, indices, values, target = make_case(k=4, seed=10)
    s16 = student.to(dtype).requires_grad_()
    loss = sparse_kd_loss(s16, indices, values.float(), target, backend=backend)
    loss.backward()
    assert loss.dtype == torch.float32 and s16.grad.dtype == dtype
    s32 = s16.detach().float().requires_grad_()
    ref = sparse_kd_loss_reference(s32, indices, values.float(), target)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s16.grad.float(), s32.grad, rtol=2e-2, atol=2e-3)


# ---------------------------------------------------------------------------------------------
# Bad input: errors name the argument
# ---------------------------------------------------------------------------------------------

def _bad_cases():
    student, indices, values, target = make_case(k=3)
    dup = indices.clone()
    dup[4, 1] = dup[4, 0]
    return [
        (dict(student=student[0]), ValueError, "student must be 2-D"),
        (dict(student=student.long()), TypeError, "student must be float32"),
        (dict(indices=indices.float()), TypeError, "indices must be int64 or int32, got torch.float32"),
        (dict(indices=indices[:4]), ValueError, r"indices must be \[N, k\]"),
        (dict(values=values[:, :2]), ValueError, "values must have the shape of indices"),
        (dict(indices=indices + 13), ValueError, r"indices holds 1[3-9].*outside \[0, 13\)"),
        (dict(indices=dup), ValueError, "indices repeats a class in row 4"),
        (dict(values=values.clone().index_fill_(0, torch.tensor([3]), -math.inf)), ValueError,
         "values has no finite entry in row 3"),
        (dict(target=target.float()), TypeError, "target must be int64"),
        (dict(target=target.clone().fill_(13)), ValueError, "target holds class 13"),
        (dict(temperature=0.0), ValueError, "temperature must be finite and > 0"),
        (dict(alpha=1.5), ValueError, "alpha must be in"),
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
        (dict(convention="uniform"), ValueError, "convention must be one of"),
        (dict(values_kind="probs"), ValueError, "values_kind must be one of"),
        (dict(divergence="kl"), ValueError, "divergence must be one of"),
        (dict(beta=1.5), ValueError, r"beta must be finite and in \[0, 1\]"),
        (dict(teacher_temperature=-1.0), ValueError, "teacher_temperature must be"),
        (dict(divergence="reverse_kl"), ValueError, "reverse_kl.*convention='zero'"),
        (dict(convention="symmetric_uniform", values_kind="logits"), ValueError, "needs values_kind='log_probs'"),
    ], (student, indices, values, target)


@pytest.mark.parametrize("fn", [sparse_kd_loss, sparse_kd_loss_reference])
def test_bad_input_names_the_argument(fn):
    cases, (student, indices, values, target) = _bad_cases()
    for change, exc, match in cases:
        args = dict(student=student, indices=indices, values=values, target=target)
        kwargs = {key: change.pop(key) for key in list(change) if key not in args}
        args.update(change)
        with pytest.raises(exc, match=match):
            fn(args["student"], args["indices"], args["values"], args["target"], **kwargs)


# ---------------------------------------------------------------------------------------------
# torch.compile and memory
# ---------------------------------------------------------------------------------------------

def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    student, indices, values, target = make_case(n=6, c=10, k=3, dtype=torch.float32, pad=1)
    kw = dict(temperature=2.0, convention="symmetric_uniform", divergence="jsd", beta=0.3)
    compiled = torch.compile(lambda s, i, v, y: sparse_kd_loss(s, i, v, y, **kw), fullgraph=True)
    s1, s2 = student.clone().requires_grad_(), student.clone().requires_grad_()
    loss = compiled(s1, indices, values, target)
    loss.backward()
    ref = sparse_kd_loss(s2, indices, values, target, **kw)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-5, atol=1e-6)


# 'cpp' only: Triton's interpreter copies every tensor argument (a second N x C storage it makes, not the kernel).
@pytest.mark.parametrize("backend", ["cpp"])
@pytest.mark.parametrize("convention,divergence", CASES)
def test_no_dense_teacher_only_the_gradient_is_n_by_c(backend, convention, divergence):
    """Forward makes one tensor of N x C elements (the gradient it keeps), backward one (the student's
    gradient it returns); everything else is at most N x (k+1)."""
    n, c, k = 64, 50, 5
    student, indices, values, target = make_case(n=n, c=c, k=k, dtype=torch.float32, pad=1, ignored=(3,))
    student.requires_grad_()
    with TensorSizeWatch(n * c) as forward:
        loss = sparse_kd_loss(student, indices, values, target, convention=convention, divergence=divergence,
                              temperature=2.0, backend=backend)
    with TensorSizeWatch(n * c) as backward:
        loss.backward()
    assert len(forward.storages) == 1 and len(backward.storages) == 1
    assert forward.largest_other <= n * (k + 1) < n * c
    # The reference, by contrast, makes several (it is the spec, not the fast path): the count can fail.
    with TensorSizeWatch(n * c) as dense:
        sparse_kd_loss_reference(student, indices, values, target, convention=convention, divergence=divergence)
    assert len(dense.storages) > 1


def test_opcheck():
    """The custom op's schema, fake kernel and autograd registration (torch.library.opcheck)."""
    student, indices, values, target = make_case(n=6, c=10, k=3, dtype=torch.float32, pad=1)
    student.requires_grad_()
    for reduction, tgt, convention in [("batchmean", target, "zero"), ("none", None, "symmetric_uniform"),
                                       ("mean", target, "symmetric_uniform")]:
        args = (student, indices, values, tgt, 2.0, 0.5, True, reduction, IGNORE, convention, "log_probs", "jsd", 0.3,
                None, "cpp", True)
        torch.library.opcheck(sparse_op._sparse_kd_loss_op, args)


def test_module_form_keeps_its_settings():
    student, indices, values, target = make_case(n=6, c=10, k=3, pad=1)
    kw = dict(temperature=2.0, alpha=0.3, convention="symmetric_uniform", divergence="reverse_kl", beta=0.2,
              teacher_temperature=1.5, reduction="sum")
    module = SparseKDLoss(**kw)
    torch.testing.assert_close(module(student, indices, values, target),
                               sparse_kd_loss(student, indices, values, target, **kw), rtol=0, atol=0)
    assert "convention='symmetric_uniform'" in repr(module)
    module.divergence = "jsd"  # a later assignment counts
    torch.testing.assert_close(module(student, indices, values, target),
                               sparse_kd_loss(student, indices, values, target, **dict(kw, divergence="jsd")))
    with pytest.raises(ValueError, match="SparseKDLoss: convention must be one of"):
        SparseKDLoss(convention="uniform")
