"""kd_loss on every backend this machine has, against the spec ued_fast.reference.kd_loss_reference.

Every value is compared with the reference evaluated in float64 on the same (already rounded) inputs,
its gradient taken by autograd. Error bounds are derived from the dtypes: the arithmetic's unit
roundoff times the size of the terms a row adds up (tempered logits, log C), plus the rounding of the
gradient to the student's dtype. Backends: ued_fast.available_backends('cpu') ('cpp', 'reference',
'triton' under TRITON_INTERPRET=1) and, with a GPU, those of 'cuda'.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import ued_fast
from ued_fast.ops import _spine
from ued_fast.ops import kd_loss as kd_ops
from ued_fast.reference import REDUCTIONS, TEACHER_KINDS, kd_loss_reference

from conftest import (assert_close, assert_compiled_kd_step_matches_eager, backend_cases, compute_eps, float_dtypes,
                      sized_for)

CASES = backend_cases("kd_loss")
# The Triton interpreter evaluates masked-out lanes too (exp(-inf - -inf)): numpy warns.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

# Error bound constant: measured worst cases (cpp, reference; fp32, fp64) sit near 1/8 of it.
SLACK = 8.0


def make_inputs(n, c, dtype, device, *, seed=0, scale=3.0, teacher_kind="logits", ignored=0.1, temperature=1.0):
    """Student and teacher logits (correlated, so the KL is neither 0 nor huge) and targets; the teacher
    given as teacher_kind (the tempered kinds at `temperature`)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, c, generator=g, dtype=torch.float64) * scale
    t = s + torch.randn(n, c, generator=g, dtype=torch.float64) * scale
    teacher = to_kind(t, teacher_kind, temperature)
    y = torch.randint(0, c, (n,), generator=g)
    y[torch.rand(n, generator=g) < ignored] = -100
    return s.to(dtype).to(device), teacher.to(dtype).to(device), y.to(device)


def to_kind(teacher_logits, kind, temperature=1.0):
    """The teacher as `kind`: the tempered kinds are the soft targets at `temperature`, the others untempered."""
    t = teacher_logits / temperature if kind.startswith("tempered_") else teacher_logits
    if kind.endswith("log_probs"):
        return F.log_softmax(t, dim=-1)
    if kind.endswith("probs"):
        return F.softmax(t, dim=-1)
    return t


def reductions_for(backend, device):
    """Every reduction; the Triton interpreter gets two: reductions are made by the op layer, shared
    by all native backends, from the same row losses and row gradients."""
    return ("none", "batchmean") if backend == "triton" and device == "cpu" else REDUCTIONS


def run(backend, student, teacher, target=None, grad_output=None, **kw):
    """(loss, d loss/d student) from ued_fast.kd_loss on `backend`, backward with grad_output (default 1)."""
    s = student.detach().clone().requires_grad_()
    loss = ued_fast.kd_loss(s, teacher, target, backend=backend, **kw)
    loss.backward(torch.ones_like(loss) if grad_output is None else grad_output)
    return loss.detach(), s.grad


def reference(student, teacher, target=None, grad_output=None, **kw):
    """The spec in float64 on the same rounded inputs: (loss, gradient)."""
    s = student.detach().double().requires_grad_()
    loss = kd_loss_reference(s, teacher.detach().double(), target, **kw)
    go = torch.ones_like(loss) if grad_output is None else grad_output.double()
    loss.backward(go)
    return loss.detach(), s.grad


def error_bounds(student, teacher, target, *, temperature=4.0, alpha=0.9, t2_scale=True,
                 reduction="batchmean", ignore_index=-100, teacher_kind="logits", grad_output=None):
    """Absolute error bounds (loss, grad) for a backend computing in the student's compute dtype.

    A row's terms are computed from shifted, tempered logits: each probability carries a relative
    error of about u*(|logit|/T + max|logit|/T) (u the unit roundoff), the logs and sums about
    u*log C. The gradient entry j is a combination of p_j, q_j, softmax(s)_j with weights alpha*s2/T
    and 1 - alpha; it is then rounded to the student's dtype.
    """
    u = compute_eps(student.dtype)
    s = student.detach().double().cpu()
    t = teacher.detach().double().cpu()
    n, c = s.shape
    T = temperature
    s2 = T * T if t2_scale else 1.0
    log_p = ued_fast.reference.teacher_log_probs(t, T, teacher_kind)
    scores, applied = ued_fast.reference.teacher_scores(t, T, teacher_kind)
    a = scores / applied
    a_mag = torch.where(torch.isfinite(a), a.abs(), torch.zeros_like(a)).amax(-1)
    s_mag = s.abs().amax(-1)
    log_c = math.log(c) + 1.0
    m_kl = 1.0 + 2.0 * a_mag + 2.0 * s_mag / T + log_c
    m_ce = 1.0 + 2.0 * s_mag + log_c
    kl_w = (alpha if target is not None else 1.0) * s2
    ce_w = (1.0 - alpha) if target is not None else 0.0
    row = SLACK * u * (kl_w * m_kl + ce_w * m_ce)
    p, q, sm = log_p.exp(), F.softmax(s / T, -1), F.softmax(s, -1)
    grad = SLACK * u * ((kl_w / T) * (p + q) * m_kl[:, None] + ce_w * (sm * m_ce[:, None]))
    if target is not None:
        valid = (target != ignore_index).cpu()
        row, grad = row * valid, grad * valid[:, None]
        n_valid = max(int(valid.sum()), 1)
    else:
        n_valid = n
    scale = {"none": 1.0, "sum": 1.0, "batchmean": 1.0 / n_valid, "mean": 1.0 / (n_valid * c)}[reduction]
    loss_bound = row if reduction == "none" else row.sum() * scale
    go = torch.ones(()) if grad_output is None else grad_output.detach().double().cpu()
    go = go[:, None] if reduction == "none" and go.dim() == 1 else go
    grad = grad * scale * go.abs()
    return loss_bound, grad


def check(backend, student, teacher, target=None, grad_output=None, what="", **kw):
    """Loss and gradient of `backend` match the float64 spec within the dtype-derived bounds."""
    loss, grad = run(backend, student, teacher, target, grad_output, **kw)
    ref_loss, ref_grad = reference(student, teacher, target, grad_output, **kw)
    loss_atol, grad_atol = error_bounds(student, teacher, target, grad_output=grad_output, **kw)
    expected_dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    assert loss.dtype == expected_dtype, f"{what}: loss dtype {loss.dtype}"
    assert grad.dtype == student.dtype and grad.shape == student.shape
    u = compute_eps(student.dtype)
    assert_close(loss, ref_loss, rtol=SLACK * u, atol=loss_atol.cpu() + 1e-300, what=f"{what} loss")
    # The row gradient is rounded to the student's dtype, then scaled by the reduction's factor and
    # rounded again: up to one unit in the last place (eps); flush-to-zero near the smallest normal.
    # The Triton interpreter casts float32 to bfloat16 by truncation: twice that for bfloat16.
    rounding = torch.finfo(student.dtype)
    ulps = 2.0 if backend == "triton" and "cpu" in str(student.device) and student.dtype == torch.bfloat16 else 1.0
    grad_tol = grad_atol + rounding.tiny * 2
    assert_close(grad, ref_grad, rtol=ulps * rounding.eps + SLACK * u, atol=grad_tol, what=f"{what} grad")
    return loss, grad


# ---------------------------------------------------------------------------------------------
# Values and gradients against the spec


SHAPES = [(1, 1), (1, 2), (3, 10), (37, 100), (2048, 10), (300, 1000), (4, 4097), (3, 32000), (1, 32000)]


@pytest.mark.parametrize("n,c", SHAPES, ids=[f"{n}x{c}" for n, c in SHAPES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("backend,device", CASES)
def test_matches_reference_over_shapes_and_dtypes(backend, device, dtype, n, c):
    if dtype not in float_dtypes(backend):
        pytest.skip(f"{backend} takes no {dtype}")
    n = sized_for(backend, device, n, c)
    s, t, y = make_inputs(n, c, dtype, device, seed=n * 7919 + c)
    check(backend, s, t, y, temperature=2.0, alpha=0.5, what=f"{n}x{c}")
    check(backend, s, t, None, temperature=2.0, reduction="sum", what=f"{n}x{c} no target")


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0, 20.0])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("backend,device", CASES)
def test_temperature_alpha_grid(backend, device, temperature, alpha):
    s, t, y = make_inputs(33, 100, torch.float32, device, seed=11)
    for reduction in reductions_for(backend, device):
        check(backend, s, t, y, temperature=temperature, alpha=alpha, reduction=reduction,
              t2_scale=alpha != 0.5, what=f"T={temperature} alpha={alpha} {reduction}")
    # Without a target the loss is s2*KL whatever alpha is.
    loss, _ = check(backend, s, t, None, temperature=temperature, alpha=alpha, what="no target")
    assert_close(loss, run(backend, s, t, None, temperature=temperature, alpha=0.3)[0], rtol=0, atol=0,
                 what="alpha unused without target")


@pytest.mark.parametrize("teacher_kind", TEACHER_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("backend,device", CASES)
def test_teacher_kinds_match_reference(backend, device, dtype, teacher_kind):
    s, t, y = make_inputs(40, 257, dtype, device, seed=3, teacher_kind=teacher_kind, temperature=3.0)
    check(backend, s, t, y, temperature=3.0, alpha=0.7, teacher_kind=teacher_kind, what=teacher_kind)


@pytest.mark.parametrize("backend,device", CASES)
def test_teacher_kinds_of_one_teacher_agree(backend, device):
    """Cached probabilities, log-probs, soft targets at T and logits of one teacher give the same loss
    and gradient."""
    s, logits, y = make_inputs(24, 50, torch.float64 if backend in ("cpp", "reference") else torch.float32,
                               device, seed=5)
    logits[0, :10] = -math.inf  # probability exactly 0: log_probs -inf, probs 0
    results = {kind: run(backend, s, to_kind(logits, kind, 2.5), y, temperature=2.5, teacher_kind=kind)
               for kind in TEACHER_KINDS}
    u = compute_eps(s.dtype)
    for kind in TEACHER_KINDS[1:]:
        assert_close(results[kind][0], results["logits"][0], rtol=100 * u, atol=100 * u, what=f"{kind} loss")
        assert_close(results[kind][1], results["logits"][1], rtol=100 * u, atol=100 * u, what=f"{kind} grad")


@pytest.mark.parametrize("backend,device", CASES)
def test_ignore_index(backend, device):
    s, t, y = make_inputs(50, 30, torch.float32, device, seed=8, ignored=0.3)
    for reduction in reductions_for(backend, device):
        loss, grad = check(backend, s, t, y, reduction=reduction, what=reduction)
        ignored = (y == -100).cpu()
        assert bool((grad.cpu()[ignored] == 0).all()), "ignored rows get a gradient"
        if reduction == "none":
            assert bool((loss.cpu()[ignored] == 0).all()), "ignored rows have a loss"
    # Another ignore_index, inside the class range: rows with that class count nowhere.
    y5 = y.clone()
    y5[y5 == -100] = 5
    check(backend, s, t, y5, ignore_index=5, what="ignore_index=5")
    # Every row ignored: loss 0 and gradient 0 (not NaN) for every reduction.
    all_ignored = torch.full_like(y, -100)
    for reduction in reductions_for(backend, device):
        loss, grad = run(backend, s, t, all_ignored, reduction=reduction)
        assert bool((loss == 0).all()) and bool((grad == 0).all()), reduction


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("backend,device", CASES)
def test_logits_of_magnitude_1e4_stay_finite(backend, device, dtype):
    s, t, y = make_inputs(16, 300, torch.float64, device, seed=9, scale=1e4)
    s, t = s.to(dtype), t.to(dtype)
    for T in (1.0, 4.0):
        loss, grad = check(backend, s, t, y, temperature=T, alpha=0.5, what=f"1e4 logits T={T}")
        assert bool(torch.isfinite(loss).all()) and bool(torch.isfinite(grad).all())


@pytest.mark.parametrize("backend,device", CASES)
def test_minus_inf_teacher_logits(backend, device):
    s, t, y = make_inputs(20, 64, torch.float32, device, seed=12)
    t[::2, 1::3] = -math.inf  # probability 0 in half the rows
    t[1, :-1] = -math.inf  # a one-hot teacher
    for kind in ("logits", "log_probs"):
        loss, grad = check(backend, s, t, y, temperature=2.0, teacher_kind=kind, reduction="none", what=kind)
        assert bool(torch.isfinite(loss).all()) and bool(torch.isfinite(grad).all())


@pytest.mark.parametrize("backend,device", CASES)
def test_non_contiguous_inputs(backend, device):
    n, c = 24, 70
    s, t, y = make_inputs(n, c, torch.float32, device, seed=13)
    ref_loss, ref_grad = reference(s, t, y)
    atol = error_bounds(s, t, y)
    views = {
        "transposed": lambda x: x.t().contiguous().t(),  # class stride N
        "row slice": lambda x: torch.cat([x, x], 1)[:, :c],  # row stride 2C
        "every other row": lambda x: torch.stack([x, x], 1).reshape(2 * n, c)[::2],
        "column slice": lambda x: torch.cat([x[:, :1], x], 1)[:, 1:],  # offset storage
    }
    for name, view in views.items():
        student = view(s.clone()).detach().requires_grad_()  # a non-contiguous leaf
        teacher = view(t.clone())
        assert not student.is_contiguous() and not teacher.is_contiguous(), name
        loss = ued_fast.kd_loss(student, teacher, y, backend=backend)
        loss.backward()
        assert_close(loss, ref_loss, rtol=SLACK * 1.2e-7, atol=atol[0], what=f"{name} loss")
        assert_close(student.grad, ref_grad, rtol=1e-5, atol=atol[1] + 1e-30, what=f"{name} grad")


@pytest.mark.parametrize("backend,device", CASES)
def test_grad_output_not_one(backend, device):
    s, t, y = make_inputs(19, 33, torch.float32, device, seed=14)
    for reduction in ("sum", "batchmean", "mean"):
        check(backend, s, t, y, grad_output=torch.tensor(-3.5, device=device), reduction=reduction,
              what=reduction)
    go = torch.linspace(-2.0, 3.0, 19, device=device)
    check(backend, s, t, y, grad_output=go, reduction="none", what="none [N] grad_output")


@pytest.mark.parametrize("backend,device", CASES)
def test_student_logits_shared_with_cross_entropy(backend, device):
    """One student output feeding F.cross_entropy and kd_loss: the gradients add up."""
    g = torch.Generator().manual_seed(15)
    x = torch.randn(32, 16, generator=g).to(device)
    w0 = torch.randn(16, 10, generator=g).to(device)
    t = torch.randn(32, 10, generator=g).to(device)
    y = torch.randint(0, 10, (32,), generator=g).to(device)

    def grads(kd):
        w = w0.clone().requires_grad_()
        logits = x @ w
        loss = F.cross_entropy(logits, y) + 0.5 * kd(logits)
        loss.backward()
        return loss.detach(), w.grad

    loss, grad_w = grads(lambda z: ued_fast.kd_loss(z, t, y, alpha=0.8, backend=backend))
    ref_loss, ref_grad_w = grads(lambda z: kd_loss_reference(z, t, y, alpha=0.8))
    assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5, what="loss")
    assert_close(grad_w, ref_grad_w, rtol=1e-4, atol=1e-5, what="weight grad")


@pytest.mark.parametrize("backend,device", CASES)
def test_student_without_requires_grad(backend, device):
    s, t, y = make_inputs(10, 20, torch.float32, device, seed=16)
    loss = ued_fast.kd_loss(s, t, y, backend=backend)
    assert not loss.requires_grad
    ref_loss, _ = reference(s, t, y)
    assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5, what="loss")
    with torch.no_grad():
        loss_ng = ued_fast.kd_loss(s.clone().requires_grad_(), t, y, backend=backend)
    assert not loss_ng.requires_grad
    assert_close(loss_ng, loss, rtol=0, atol=0, what="no_grad loss")
    if backend != "reference":  # the kernel skipped the gradient: no [N, C] output was made
        _, grad, _ = kd_ops._kd_loss_op(s, t, y, 4.0, 0.9, True, "batchmean", -100, "logits", backend, False)
        assert grad.numel() == 0


@pytest.mark.parametrize("backend,device", CASES)
def test_large_vocabulary(backend, device):
    """The one 32000-column case every backend runs (the Triton interpreter included)."""
    s, t, y = make_inputs(2, 32000, torch.float32, device, seed=17, ignored=0.0)
    check(backend, s, t, y, temperature=1.5, alpha=0.5, reduction="none", what="2x32000")
    check(backend, s.bfloat16(), t.bfloat16(), y, temperature=1.5, alpha=0.5, what="2x32000 bf16")


@pytest.mark.parametrize(
    "student_dtype,teacher_dtype",
    [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16), (torch.float16, torch.bfloat16),
     (torch.float32, torch.float64)],
    ids=["bf16-f32", "f32-bf16", "f16-bf16", "f32-f64"],
)
@pytest.mark.parametrize("backend,device", CASES)
def test_teacher_dtype_differs(backend, device, student_dtype, teacher_dtype):
    s, t, y = make_inputs(12, 130, torch.float64, device, seed=18)
    if teacher_dtype == torch.float64 and torch.float64 not in float_dtypes(backend):
        # The GPU kernels may refuse a float64 teacher, but only with a TypeError that names it.
        try:
            run(backend, s.to(student_dtype), t.to(teacher_dtype), y)
        except TypeError as err:
            assert "teacher" in str(err)
            return
    check(backend, s.to(student_dtype), t.to(teacher_dtype), y, what=f"{student_dtype}/{teacher_dtype}")


@pytest.mark.parametrize("backend,device", CASES)
def test_nan_student_gives_nan_loss(backend, device):
    s, t, y = make_inputs(4, 20, torch.float32, device, seed=19, ignored=0.0)
    s[2, 7] = math.nan
    rows = ued_fast.kd_loss(s, t, y, reduction="none", backend=backend)
    assert bool(torch.isnan(rows[2])) and bool(torch.isfinite(rows[[0, 1, 3]]).all())


@pytest.mark.parametrize("backend,device", CASES)
def test_kdloss_module(backend, device):
    s, t, y = make_inputs(9, 21, torch.float32, device, seed=20)
    module = ued_fast.KDLoss(temperature=3.0, alpha=0.25, reduction="sum", teacher_kind="logits", backend=backend)
    assert "temperature=3.0" in repr(module)
    student = s.clone().requires_grad_()
    loss = module(student, t, y)
    loss.backward()
    ref_loss, ref_grad = reference(s, t, y, temperature=3.0, alpha=0.25, reduction="sum")
    assert_close(loss, ref_loss, rtol=1e-5, atol=1e-4, what="module loss")
    assert_close(student.grad, ref_grad, rtol=1e-5, atol=1e-5, what="module grad")


def test_native_kernel_out_of_range_target_is_nan_row():
    """Past the Python checks (GPU tensors are not read): an out-of-range target gives a NaN row."""
    for backend, device in [(p.values[0], p.values[1]) for p in CASES]:
        if backend == "reference":
            continue
        s, t, _ = make_inputs(4, 10, torch.float32, device, seed=21)
        y = torch.tensor([1, 10, -3, -100], device=device)
        rows, grad = _spine.native_forward("kd_loss", backend, s, t, y, *_spine.kd_coefficients(2.0, 0.5, True, True),
                                           -100, 0, True)
        rows, grad = rows.cpu(), grad.cpu()
        assert bool(torch.isfinite(rows[0])) and bool(torch.isnan(rows[1:3]).all()) and rows[3] == 0, backend
        assert bool(torch.isfinite(grad[0]).all()) and bool((grad[3] == 0).all()), backend


def test_cpp_is_deterministic_and_threads_agree():
    if "cpp" not in ued_fast.available_backends("cpu"):
        pytest.skip("ued_fast._C not built")
    s, t, y = make_inputs(3000, 100, torch.float32, "cpu", seed=22)
    first = run("cpp", s, t, y)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run("cpp", s, t, y)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(first, single):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# torch.library integration: gradcheck, opcheck, torch.compile


def _needs_cpp():
    if "cpp" not in ued_fast.available_backends("cpu"):
        pytest.skip("ued_fast._C not built")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_cpp(reduction):
    _needs_cpp()
    s, t, y = make_inputs(5, 7, torch.float64, "cpu", seed=23, ignored=0.3)
    for kind, target in (("logits", y), ("probs", None), ("log_probs", y), ("tempered_probs", y),
                         ("tempered_log_probs", None)):
        teacher = to_kind(t, kind, 1.7)
        student = s.clone().requires_grad_()
        assert torch.autograd.gradcheck(
            lambda x: ued_fast.kd_loss(x, teacher, target, temperature=1.7, alpha=0.6, reduction=reduction,
                                       teacher_kind=kind, backend="cpp"),
            (student,),
        )


def test_opcheck_cpp():
    _needs_cpp()
    s, t, y = make_inputs(6, 11, torch.float32, "cpu", seed=24, ignored=0.3)
    for reduction in ("batchmean", "none"):
        for target in (y, None):
            args = (s.clone().requires_grad_(), t, target, 2.0, 0.5, True, reduction, -100, "logits", "cpp", True)
            torch.library.opcheck(torch.ops.ued_fast.kd_loss.default, args)
    # The C++ forward itself (CPU and Meta kernels), without autograd.
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        args = (s.to(dtype), t.to(dtype), y, *_spine.kd_coefficients(2.0, 0.5, True, True), -100, 0, True)
        torch.library.opcheck(torch.ops.ued_fast.kd_loss_fwd.default, args,
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_torch_compile_fullgraph_cpu():
    _needs_cpp()
    s, t, y = make_inputs(16, 40, torch.float32, "cpu", seed=25)
    assert_compiled_kd_step_matches_eager("cpp", s, t, y)


# ---------------------------------------------------------------------------------------------
# Bad input: ValueError / TypeError naming the argument


def _bad_cases():
    s = torch.randn(4, 5)
    t = torch.randn(4, 5)
    y = torch.tensor([0, 1, 2, -100])
    ok = dict(student=s, teacher=t, target=y)
    return [
        ("student 1-D", dict(ok, student=torch.randn(5)), {}, ValueError, "student"),
        ("student int", dict(ok, student=torch.ones(4, 5, dtype=torch.int64)), {}, TypeError, "student"),
        ("student list", dict(ok, student=[[0.0]]), {}, TypeError, "student"),
        ("empty batch", dict(ok, student=torch.randn(0, 5), teacher=torch.randn(0, 5), target=None), {},
         ValueError, "student"),
        ("no classes", dict(ok, student=torch.randn(4, 0), teacher=torch.randn(4, 0), target=None), {},
         ValueError, "student"),
        ("teacher shape", dict(ok, teacher=torch.randn(4, 6)), {}, ValueError, "teacher"),
        ("teacher int", dict(ok, teacher=torch.ones(4, 5, dtype=torch.int32)), {}, TypeError, "teacher"),
        ("teacher device", dict(ok, teacher=torch.randn(4, 5, device="meta")), {}, ValueError, "teacher"),
        ("target device", dict(ok, target=torch.zeros(4, dtype=torch.int64, device="meta")), {}, ValueError,
         "target"),
        ("target int32", dict(ok, target=y.int()), {}, TypeError, "target"),
        ("target float", dict(ok, target=y.float()), {}, TypeError, "target"),
        ("target 2-D", dict(ok, target=y[:, None]), {}, ValueError, "target"),
        ("target length", dict(ok, target=y[:3]), {}, ValueError, "target"),
        ("target too large", dict(ok, target=torch.tensor([0, 1, 5, 2])), {}, ValueError, "target"),
        ("target negative", dict(ok, target=torch.tensor([0, -1, 2, 2])), {}, ValueError, "target"),
        ("T = 0", ok, dict(temperature=0.0), ValueError, "temperature"),
        ("T < 0", ok, dict(temperature=-1.0), ValueError, "temperature"),
        ("T = inf", ok, dict(temperature=math.inf), ValueError, "temperature"),
        ("T = nan", ok, dict(temperature=math.nan), ValueError, "temperature"),
        ("T str", ok, dict(temperature="4"), TypeError, "temperature"),
        ("alpha < 0", ok, dict(alpha=-0.1), ValueError, "alpha"),
        ("alpha > 1", ok, dict(alpha=1.5), ValueError, "alpha"),
        ("alpha nan", ok, dict(alpha=math.nan), ValueError, "alpha"),
        ("t2_scale int", ok, dict(t2_scale=1), TypeError, "t2_scale"),
        ("ignore_index float", ok, dict(ignore_index=-100.0), TypeError, "ignore_index"),
        ("reduction", ok, dict(reduction="avg"), ValueError, "reduction"),
        ("teacher_kind", ok, dict(teacher_kind="softmax"), ValueError, "teacher_kind"),
        ("backend unknown", ok, dict(backend="fast"), ValueError, "backend"),
        ("backend wrong device", ok, dict(backend="cuda"), ValueError, "backend"),
    ]


@pytest.mark.parametrize("name,args,kwargs,exc,argname", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_bad_input_raises_naming_the_argument(name, args, kwargs, exc, argname):
    with pytest.raises(exc, match=argname):
        ued_fast.kd_loss(args["student"], args["teacher"], args["target"], **kwargs)


def test_bad_module_arguments():
    with pytest.raises(ValueError, match="temperature"):
        ued_fast.KDLoss(temperature=0.0)
    with pytest.raises(ValueError, match="reduction"):
        ued_fast.KDLoss(reduction="avg")
    with pytest.raises(ValueError, match="teacher_kind"):
        ued_fast.KDLoss(teacher_kind="probabilities")


def test_float64_on_gpu_only_backends_is_a_type_error():
    if "triton" not in ued_fast.available_backends("cpu"):
        pytest.skip("no CPU triton backend here")
    s = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        ued_fast.kd_loss(s, s, backend="triton")


def test_cpp_kernel_rejects_bad_arguments_itself():
    """The C++ op checks its own arguments (it is public as torch.ops.ued_fast.kd_loss_fwd)."""
    _needs_cpp()
    s, t = torch.randn(3, 4), torch.randn(3, 4)
    fwd = torch.ops.ued_fast.kd_loss_fwd
    with pytest.raises(ValueError, match="teacher"):
        fwd(s, torch.randn(3, 5), None, 1.0, 1.0, 1.0, 0.0, 0, 0.5, -100, 0, True)
    with pytest.raises(ValueError, match="temperature"):
        fwd(s, t, None, 0.0, 1.0, 1.0, 0.0, 0, 0.5, -100, 0, True)
    with pytest.raises(ValueError, match="teacher_kind"):
        fwd(s, t, None, 1.0, 1.0, 1.0, 0.0, 0, 0.5, -100, 3, True)
    with pytest.raises(TypeError, match="target"):
        fwd(s, t, torch.zeros(3, dtype=torch.int32), 1.0, 1.0, 1.0, 0.0, 0, 0.5, -100, 0, True)
    with pytest.raises(TypeError, match="student"):
        fwd(s.int(), t, None, 1.0, 1.0, 1.0, 0.0, 0, 0.5, -100, 0, True)
