"""The Triton kernel of the sparse (top-k teacher) KD forward (kernels/sparse_kd_loss.py) against the spec,
ued_fast.sparse_kd_loss_reference in float64 (its gradient by autograd, row losses by reduction='none').

The kernel's inputs are made exactly as the op makes them: ued_fast.ops._sparse_teacher._prepare (checks, teacher
log-probs with 'rest', coefficients) and kernel_inputs (sorted indices, padding -1 first). Small blocks force
several chunks and several k-math steps on rows the interpreter can run (TRITON_INTERPRET=1 on a machine without
a GPU).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import ued_fast.ops._sparse_teacher as st
from conftest import IGNORE_INTERPRETER_WARNINGS, triton_device_or_skip_module
from ued_fast import sparse_kd_loss_reference

DEVICE = triton_device_or_skip_module()

from ued_fast.kernels import sparse_kd_loss as tk  # noqa: E402  (imported only when Triton can run)

pytestmark = IGNORE_INTERPRETER_WARNINGS

IGNORE = -100
DIVERGENCE_CODES = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
# (convention, divergence, beta): every divergence, jsd's beta at both ends and inside; reverse_kl is +inf
# under 'zero' (rejected by the op).
CASES = [("zero", "forward_kl", 0.5), ("zero", "jsd", 0.0), ("zero", "jsd", 0.3), ("zero", "jsd", 1.0),
         ("symmetric_uniform", "forward_kl", 0.5), ("symmetric_uniform", "reverse_kl", 0.5),
         ("symmetric_uniform", "jsd", 0.0), ("symmetric_uniform", "jsd", 0.3), ("symmetric_uniform", "jsd", 1.0)]


def make_case(n=5, c=70, k=6, *, dtype=torch.float32, seed=0, pad=0, values_kind="log_probs", scale=3.0,
              ignored=(2,), support=None):
    """Student logits, the top-k of a random float64 teacher (or the given support columns), a target with
    ignored rows; the last `pad` entries of every other row are padding (value -inf, an index of the row)."""
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(n, c, generator=g) * scale).to(dtype)
    teacher = torch.randn(n, c, generator=g, dtype=torch.float64) * 3
    scores = F.log_softmax(teacher, -1) if values_kind == "log_probs" else teacher
    if support is None:
        values, indices = scores.topk(k, dim=-1)
    else:
        indices = torch.as_tensor(support, dtype=torch.int64).expand(n, -1).clone()
        values = scores.gather(-1, indices)
    if pad:
        values[::2, -pad:] = -math.inf
        indices[::2, -pad:] = indices[::2, :1]
    target = torch.randint(0, c, (n,), generator=g)
    target[list(ignored)] = IGNORE
    return student.to(DEVICE), indices.to(DEVICE), values.to(DEVICE), target.to(DEVICE)


def settings(temperature=2.0, alpha=0.7, convention="zero", values_kind="log_probs", divergence="forward_kl",
             beta=0.5, teacher_temperature=None, ignore_index=IGNORE):
    return dict(temperature=temperature, alpha=alpha, t2_scale=True, ignore_index=ignore_index,
                convention=convention, values_kind=values_kind, divergence=divergence, beta=beta,
                teacher_temperature=teacher_temperature)


def kernel_args(student, indices, values, target, kw):
    """The kernel's (indices, log_p, inv_student_temp, kd_coef, ce_coef, divergence, beta, ignore_index), made
    by the op's own host code."""
    _, live, log_p, kd_coef, ce_coef = st._prepare(
        student, indices, values, target, kw["temperature"], kw["alpha"], kw["t2_scale"], "none",
        kw["ignore_index"], kw["convention"], kw["values_kind"], kw["divergence"], kw["beta"],
        kw["teacher_temperature"])
    keys, log_p = st.kernel_inputs(indices, live, log_p)
    return (keys, log_p, 1.0 / kw["temperature"], kd_coef, ce_coef, DIVERGENCE_CODES[kw["divergence"]],
            kw["beta"], kw["ignore_index"])


def run_kernel(student, indices, values, target, kw, *, compute_grad=True, block=None, k_block=None):
    keys, log_p, *scalars = kernel_args(student, indices, values, target, kw)
    return tk.sparse_kd_loss_fwd(student, keys, log_p, target, *scalars, compute_grad, block=block, k_block=k_block)


def reference(student, indices, values, target, kw):
    """Row losses [N] and d(sum of rows)/d student [N, C], float64."""
    s64 = student.detach().double().requires_grad_()
    rows = sparse_kd_loss_reference(s64, indices, values.double(), target, reduction="none", **kw)
    (grad,) = torch.autograd.grad(rows.sum(), s64)
    return rows.detach(), grad


def check(student, indices, values, target, kw, *, block=None, k_block=None, loss_rtol=2e-5):
    loss, grad = run_kernel(student, indices, values, target, kw, block=block, k_block=k_block)
    ref_loss, ref_grad = reference(student, indices, values, target, kw)
    assert loss.dtype == torch.float32 and loss.shape == (student.shape[0],)
    assert grad.dtype == student.dtype and grad.shape == student.shape and grad.is_contiguous()
    scale = ref_loss.abs().max().item() + 1.0
    torch.testing.assert_close(loss.double().cpu(), ref_loss.cpu(), rtol=loss_rtol, atol=loss_rtol * scale)
    # The gradient is stored in the student's dtype: its rounding sets the tolerance.
    rtol = GRAD_RTOL[student.dtype]
    g_scale = ref_grad.abs().max().item() + 1e-6
    torch.testing.assert_close(grad.double().cpu(), ref_grad.cpu(), rtol=rtol, atol=rtol * g_scale)
    return loss, grad


# --- every divergence and convention ------------------------------------------------------------

@pytest.mark.parametrize("with_target", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("convention,divergence,beta", CASES)
def test_matches_reference(convention, divergence, beta, temperature, with_target):
    # C = 70 over chunks of 16 (the last one ragged), padding on every other row, an ignored row;
    # temperature 1 shares z's softmax with the CE, 2 keeps the CE's own.
    student, indices, values, target = make_case(pad=2, seed=len(convention) + int(10 * beta))
    kw = settings(temperature=temperature, convention=convention, divergence=divergence, beta=beta,
                  teacher_temperature=1.5)
    loss, grad = check(student, indices, values, target if with_target else None, kw, block=16)
    if with_target:
        assert loss[2] == 0 and (grad[2] == 0).all()


@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("jsd", 0.3)])
def test_logit_values(divergence, beta):
    student, indices, values, target = make_case(values_kind="logits", pad=1, seed=1)
    check(student, indices, values, target, settings(values_kind="logits", divergence=divergence, beta=beta),
          block=32)


# --- k: one entry, many entries, every class ----------------------------------------------------

@pytest.mark.parametrize("convention,divergence,beta", [("zero", "forward_kl", 0.5),
                                                        ("symmetric_uniform", "reverse_kl", 0.5),
                                                        ("symmetric_uniform", "jsd", 0.3)])
def test_one_entry(convention, divergence, beta):
    student, indices, values, target = make_case(k=1, seed=2)
    check(student, indices, values, target, settings(convention=convention, divergence=divergence, beta=beta),
          block=16)


@pytest.mark.parametrize("k_block", [None, 16])
def test_k_math_in_several_steps(k_block):
    # k = 40 entries (5 of them padding on every other row): one step of K_BLOCK = 64, or three of 16.
    student, indices, values, target = make_case(c=90, k=40, pad=5, seed=3)
    for convention, divergence in (("zero", "jsd"), ("symmetric_uniform", "reverse_kl")):
        check(student, indices, values, target, settings(convention=convention, divergence=divergence),
              block=32, k_block=k_block)


@pytest.mark.parametrize("convention,divergence", [("zero", "forward_kl"), ("zero", "jsd"),
                                                   ("symmetric_uniform", "forward_kl"),
                                                   ("symmetric_uniform", "reverse_kl")])
def test_support_covers_every_class(convention, divergence):
    # k = C: no column is off the support, log q_rest = -inf (and the teacher's rest is 0).
    student, indices, values, target = make_case(c=20, k=20, seed=4)
    loss, grad = check(student, indices, values, target, settings(convention=convention, divergence=divergence),
                       block=16)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_row_of_padding_only(divergence):
    # Row 1 stores no entry: the support is empty, every column is off it and 'rest' is the whole row.
    student, indices, values, target = make_case(c=40, k=4, seed=15)
    values[1] = -math.inf
    kw = settings(convention="symmetric_uniform", divergence=divergence)
    loss, _ = check(student, indices, values, target, kw, block=16)
    # Teacher and student both put all their mass on 'rest': D = 0, the row's loss is its CE alone.
    s1 = student[1].double()
    ce = torch.logsumexp(s1, 0) - s1[target[1]]
    torch.testing.assert_close(loss[1].double(), (1.0 - kw["alpha"]) * ce, rtol=2e-5, atol=2e-5)


# --- chunk layout -------------------------------------------------------------------------------

@pytest.mark.parametrize("c,block", [(1, None), (5, None), (16, 16), (17, 16), (100, None), (100, 32)])
def test_row_widths(c, block):
    # C below, at and just past the block; the default block (next_pow2(C) for narrow rows) and a forced one.
    k = min(3, c)
    student, indices, values, target = make_case(c=c, k=k, seed=c)
    for convention, divergence in (("zero", "forward_kl"), ("symmetric_uniform", "jsd")):
        check(student, indices, values, target, settings(convention=convention, divergence=divergence),
              block=block)


@pytest.mark.parametrize("support", [[33, 34, 36, 37, 38, 47], [0, 15, 16, 40, 64, 99], [96, 97, 98, 99]])
def test_support_clustered_and_spread(support):
    # In one chunk of 16; spread over chunks, at chunk edges and the row's ends; in the ragged last chunk.
    student, indices, values, target = make_case(c=100, support=support, seed=5)
    for convention, divergence in (("zero", "forward_kl"), ("symmetric_uniform", "reverse_kl"),
                                   ("symmetric_uniform", "jsd")):
        check(student, indices, values, target, settings(convention=convention, divergence=divergence), block=16)


def test_vocabulary_sized_rows_with_default_blocks():
    # C = 32000 in bf16: the default BLOCK (BLOCK_2BYTE) and K_BLOCK, 64 entries over the row, some padded.
    student, indices, values, target = make_case(n=2, c=32000, k=64, dtype=torch.bfloat16, pad=8, seed=14,
                                                 ignored=())
    assert tk.block_config(student)[0] == tk.BLOCK_2BYTE
    for convention, divergence in (("zero", "forward_kl"), ("symmetric_uniform", "jsd")):
        check(student, indices, values, target, settings(convention=convention, divergence=divergence))


# --- extreme students ---------------------------------------------------------------------------

@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_tiny_student_mass_off_the_support(divergence, temperature):
    # The student puts ~1e-30 of its tempered mass off the support and the teacher puts 0.4 there: log q_rest
    # (~ -69) must come from the off-support exponentials themselves (1 - sum(q on S) is 0 in float32).
    n, c, support = 3, 64, [3, 20, 21, 40, 63]
    student = torch.full((n, c), -69.0 * temperature)
    student[:, support] = 0.0
    student[1, 7] = -60.0 * temperature  # one off-support class larger than the others
    values = torch.log(torch.tensor([0.2, 0.1, 0.1, 0.1, 0.1], dtype=torch.float64)).expand(n, -1)
    indices = torch.tensor(support).expand(n, -1)
    target = torch.tensor([0, 21, IGNORE])
    kw = settings(temperature=temperature, convention="symmetric_uniform", divergence=divergence,
                  teacher_temperature=1.0)
    args = [x.to(DEVICE) for x in (student, indices, values, target)]
    loss, _ = check(*args, kw, block=16, loss_rtol=1e-5)
    if divergence == "forward_kl":
        assert loss[0] > 0.4 * 60 * kw["alpha"] * temperature**2  # 0.4 * (log 0.4 - log q_rest) dominates


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_extreme_logits(dtype):
    student, indices, values, target = make_case(c=80, k=5, seed=6)
    student[0] *= 3000.0  # |s| ~ 1e4
    student[1, indices[1, 0]] = 1.0e4  # all the mass on one support class
    student[3, 50] = 1.0e4 if 50 not in indices[3] else -1.0e4  # all of it off the support
    student[4, :] = -1.0e4
    student = student.to(dtype)
    for convention, divergence in (("zero", "forward_kl"), ("symmetric_uniform", "reverse_kl"),
                                   ("symmetric_uniform", "jsd")):
        kw = settings(temperature=1.0, convention=convention, divergence=divergence)
        loss, grad = run_kernel(student, indices, values, target, kw, block=32)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
        check(student, indices, values, target, kw, block=32, loss_rtol=1e-4)


# --- dtypes, strides, outputs -------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_student_dtypes(dtype):
    student, indices, values, target = make_case(c=150, k=7, dtype=dtype, pad=2, seed=7)
    kw = settings(convention="symmetric_uniform", divergence="jsd", beta=0.3)
    check(student, indices, values, target, kw, block=64)
    # The stored 16-bit gradient is the float32 one rounded to nearest even.
    _, grad = run_kernel(student, indices, values, target, kw, block=64)
    _, grad32 = run_kernel(student.float(), indices, values, target, kw, block=64)
    assert torch.equal(grad, grad32.to(dtype))


def test_row_strided_student():
    _, indices, values, target = make_case(n=4, c=60, k=5, seed=8)
    wide = torch.randn(8, 100, generator=torch.Generator().manual_seed(8)).to(DEVICE) * 3
    student = wide[::2, 20:80]  # row stride 200, a column slice
    assert student.stride() == (200, 1)
    check(student, indices, values, target, settings(convention="symmetric_uniform", divergence="reverse_kl"),
          block=16)


def test_no_grad_gives_empty_grad_and_same_loss():
    student, indices, values, target = make_case(seed=9, pad=1)
    kw = settings(convention="symmetric_uniform", divergence="jsd")
    loss, _ = run_kernel(student, indices, values, target, kw, block=16)
    loss_only, empty = run_kernel(student, indices, values, target, kw, compute_grad=False, block=16)
    assert empty.numel() == 0 and empty.dtype == student.dtype
    torch.testing.assert_close(loss_only, loss, rtol=0, atol=0)


def test_ignored_rows_and_custom_ignore_index():
    student, indices, values, target = make_case(n=6, seed=10, ignored=())
    target[[0, 3]] = 7
    loss, grad = check(student, indices, values, target, settings(ignore_index=7), block=16)
    assert (loss[[0, 3]] == 0).all() and (grad[[0, 3]] == 0).all()
    loss, grad = run_kernel(student, indices, values, torch.full_like(target, IGNORE), settings(), block=16)
    assert (loss == 0).all() and (grad == 0).all()


def test_empty_batch():
    student, indices, values, target = make_case(seed=11)
    keys, log_p, *scalars = kernel_args(student, indices, values, target, settings())
    loss, grad = tk.sparse_kd_loss_fwd(student[:0], keys[:0], log_p[:0], target[:0], *scalars, True)
    assert loss.shape == (0,) and grad.shape == (0, student.shape[1])


# --- bad values on the device: NaN rows, no stray access -----------------------------------------

def test_bad_index_or_target_gives_nan_row():
    student, indices, values, target = make_case(n=6, c=40, k=4, seed=12, ignored=())
    kw = settings(convention="symmetric_uniform", divergence="jsd")
    keys, log_p, *scalars = kernel_args(student, indices, values, target, kw)
    keys[1, -1] = 40  # == C (the row stays sorted)
    keys[2, 0] = -5  # below the padding value
    keys[3, -1] = 1 << 40  # far outside the row: must not be read
    bad_target = target.clone()
    bad_target[4] = 40
    loss, grad = tk.sparse_kd_loss_fwd(student, keys, log_p, bad_target, *scalars, True, block=16)
    assert torch.isnan(loss[1:5]).all() and torch.isnan(grad[1:5]).all()
    ref_loss, ref_grad = reference(student, indices, values, target, kw)
    for row in (0, 5):
        torch.testing.assert_close(loss[row].double().cpu(), ref_loss[row].cpu(), rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(grad[row].double().cpu(), ref_grad[row].cpu(), rtol=1e-5, atol=1e-6)
    # Without a target the bad indices alone make their rows NaN.
    keys_nt, log_p_nt, *scalars_nt = kernel_args(student, indices, values, None, kw)
    keys_nt[1:4] = keys[1:4]
    loss, grad = tk.sparse_kd_loss_fwd(student, keys_nt, log_p_nt, None, *scalars_nt, True, block=16)
    assert torch.isnan(loss[1:4]).all() and torch.isnan(grad[1:4]).all()
    assert torch.isfinite(loss[[0, 4, 5]]).all() and torch.isfinite(grad[[0, 4, 5]]).all()


def test_bad_arguments():
    student, indices, values, target = make_case(seed=13)
    keys, log_p, *scalars = kernel_args(student, indices, values, target, settings())

    def call(s=student, i=keys, lp=log_p, y=target, **kw):
        return tk.sparse_kd_loss_fwd(s, i, lp, y, *scalars, True, **kw)

    with pytest.raises(TypeError, match="student"):
        call(s=student.double())
    with pytest.raises(ValueError, match="stride"):
        call(s=student.t().contiguous().t())
    with pytest.raises(TypeError, match="indices"):
        call(i=keys.int())
    with pytest.raises(ValueError, match="indices"):
        call(i=keys[:, :0])
    with pytest.raises(TypeError, match="log_p"):
        call(lp=log_p.double())
    with pytest.raises(ValueError, match="log_p"):
        call(lp=log_p[:, 1:])
    with pytest.raises(ValueError, match="target"):
        call(y=target.int())
    with pytest.raises(ValueError, match="block"):
        call(block=24)
    with pytest.raises(ValueError, match="divergence"):
        tk.sparse_kd_loss_fwd(student, keys, log_p, target, 0.5, 1.0, 0.0, 3, 0.5, IGNORE, True)
    with pytest.raises(ValueError, match="kd_coef"):
        tk.sparse_kd_loss_fwd(student, keys, log_p, target, 0.5, -1.0, 0.0, 0, 0.5, IGNORE, True)


def test_launch_config():
    wide16 = torch.empty(1, 128256, dtype=torch.bfloat16)
    assert tk.block_config(wide16) == (tk.BLOCK_2BYTE, tk.NUM_WARPS)
    assert tk.block_config(wide16.float())[0] == tk.BLOCK_4BYTE
    assert tk.block_config(torch.empty(1, 100)) == (128, 1)
    assert tk.block_config(torch.empty(1, 3))[0] == tk.MIN_BLOCK
    assert [tk.k_block_size(k) for k in (1, 64, 65, 5000)] == [tk.K_BLOCK_MIN, 64, 128, tk.K_BLOCK_MAX]
