"""Triton-specific tests of kd_loss (kernels/kd_loss.py): both kernels forced, chunk boundaries,
the large-C path, launch-config helpers, and the public path with backend='triton'.

Every value is checked against ued_fast.reference.kd_loss_reference in float64 on the same
(already rounded) inputs, its gradient taken by autograd. On a machine without a GPU the kernels
run in the Triton interpreter (TRITON_INTERPRET=1, as `make test` sets): sizes are kept small.
"""
from __future__ import annotations

import math

import pytest
import torch

import ued_fast
from conftest import IGNORE_INTERPRETER_WARNINGS, assert_compiled_kd_step_matches_eager, triton_device_or_skip_module
from ued_fast.reference import kd_loss_reference

DEVICE = triton_device_or_skip_module()

from ued_fast.kernels import kd_loss as tk  # noqa: E402  (imported only when Triton can run)

pytestmark = IGNORE_INTERPRETER_WARNINGS

KINDS = {"logits": 0, "log_probs": 1, "probs": 2}
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _reference(s, t, y, *, temperature=4.0, alpha=0.9, t2_scale=True, ignore_index=-100,
               teacher_kind="logits"):
    """Row losses [N] and d(sum of rows)/d student [N, C], float64."""
    s64 = s.detach().double().requires_grad_()
    rows = kd_loss_reference(s64, t.double(), y, temperature=temperature, alpha=alpha,
                             t2_scale=t2_scale, reduction="none", ignore_index=ignore_index,
                             teacher_kind=teacher_kind)
    (grad,) = torch.autograd.grad(rows.sum(), s64)
    return rows.detach(), grad


def contract_coefficients(temperature, alpha, t2_scale, has_target, teacher_temperature=None):
    """(inv_student_temp, inv_teacher_temp, kd_coef, ce_coef) as the kernel contract's host side makes them."""
    s2 = temperature * temperature if t2_scale else 1.0
    inv_teacher_temp = 1.0 / (temperature if teacher_temperature is None else teacher_temperature)
    kd_coef, ce_coef = (alpha * s2, 1.0 - alpha) if has_target else (s2, 0.0)
    return 1.0 / temperature, inv_teacher_temp, kd_coef, ce_coef


def _run(s, t, y, *, kernel="auto", chunk=None, temperature=4.0, alpha=0.9, t2_scale=True,
         ignore_index=-100, teacher_kind="logits", compute_grad=True):
    coefs = contract_coefficients(temperature, alpha, t2_scale, y is not None)
    return tk.kd_loss_fwd(s, t, y, *coefs, 0, 0.5, ignore_index, KINDS[teacher_kind], compute_grad,
                          kernel=kernel, chunk=chunk)


def _check(s, t, y, *, kernel="auto", chunk=None, loss_rtol=2e-5, **kw):
    loss, grad = _run(s, t, y, kernel=kernel, chunk=chunk, **kw)
    ref_loss, ref_grad = _reference(s, t, y, **kw)
    assert loss.dtype == torch.float32 and loss.shape == (s.shape[0],)
    assert grad.dtype == s.dtype and grad.shape == s.shape and grad.is_contiguous()
    scale = ref_loss.abs().max().item() + 1.0
    torch.testing.assert_close(loss.double().cpu(), ref_loss.cpu(), rtol=loss_rtol, atol=loss_rtol * scale)
    # The gradient is stored in the student's dtype: its rounding sets the tolerance.
    g_scale = ref_grad.abs().max().item() + 1e-6
    rtol = GRAD_RTOL[s.dtype]
    torch.testing.assert_close(grad.double().cpu(), ref_grad.cpu(), rtol=rtol, atol=rtol * g_scale)
    return loss, grad


def _inputs(n, c, dtype=torch.float32, teacher_dtype=None, scale=3.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    s = (torch.randn(n, c, generator=gen) * scale).to(dtype)
    t = (torch.randn(n, c, generator=gen) * scale).to(teacher_dtype or dtype)
    y = torch.randint(0, c, (n,), generator=gen)
    return s.to(DEVICE), t.to(DEVICE), y.to(DEVICE)


# --- both kernels against the reference --------------------------------------------------------

@pytest.mark.parametrize("kernel", ["small", "chunked"])
@pytest.mark.parametrize("c", [1, 2, 10, 100, 1000, 4097])
def test_kernels_match_reference(kernel, c):
    s, t, y = _inputs(5, c, seed=c)
    y[1] = -100
    # chunk 256 makes C = 1000 and 4097 take several chunks with a ragged last one.
    _check(s, t, y, kernel=kernel, chunk=256 if kernel == "chunked" else None, temperature=2.0,
           alpha=0.7)


@pytest.mark.parametrize("kernel", ["small", "chunked"])
def test_vocabulary_sized_rows(kernel):
    # C = 32000: the chunked kernel with its default chunk (auto picks it for fp32 and bf16), and
    # the small kernel forced past its limit (BLOCK_C = 32768), which must still be right.
    s, t, y = _inputs(2, 32000, dtype=torch.bfloat16, seed=1)
    assert tk.choose_kernel(s, t) == "chunked"
    _check(s, t, y, kernel=kernel)
    _check(s, t, None, kernel=kernel, temperature=1.0)


@pytest.mark.parametrize("c", [63, 64, 65, 127, 128, 129, 192])
def test_chunk_boundaries(c):
    s, t, y = _inputs(3, c, seed=c)
    _check(s, t, y, kernel="chunked", chunk=64, temperature=3.0, alpha=0.5)


def test_max_sits_in_a_later_chunk():
    # The running max must be rescaled when a later chunk holds a bigger value, and per-lane states
    # that only ever saw -inf must drop out of the merge.
    s, t, y = _inputs(3, 200, seed=5)
    s[0, 190] = 40.0   # student max in the last chunk
    t[1, 150] = 60.0   # teacher max in the third chunk
    t[2, :64] = float("-inf")  # a whole chunk of zero-probability classes
    s[2, 5] = -30.0
    _check(s, t, y, kernel="chunked", chunk=64)


@pytest.mark.parametrize("programs", [1, 8, 128])
def test_rows_per_program(monkeypatch, programs):
    # 1: one program takes 64 rows (37 real), masked rows must not leak; 8: 8 rows per program;
    # 128 (the GPU default): one row per program.
    monkeypatch.setattr(tk, "min_programs", lambda device: programs)
    block_n = tk.small_c_config(37, 10, programs)[0]
    assert block_n == {1: 64, 8: 4, 128: 1}[programs]
    s, t, y = _inputs(37, 10, seed=3)
    y[::4] = -100
    _check(s, t, y, kernel="small")


# --- dtypes, hyper-parameters, teacher kinds ----------------------------------------------------

@pytest.mark.parametrize("kernel", ["small", "chunked"])
@pytest.mark.parametrize("dtype,teacher_dtype", [
    (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
    (torch.bfloat16, torch.float32), (torch.float32, torch.float16), (torch.float32, torch.float64),
])
def test_dtypes(kernel, dtype, teacher_dtype):
    s, t, y = _inputs(4, 300, dtype=dtype, teacher_dtype=teacher_dtype, seed=2)
    _check(s, t, y, kernel=kernel, chunk=128 if kernel == "chunked" else None, temperature=2.0)


@pytest.mark.parametrize("kernel", ["small", "chunked"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_grad_is_the_fp32_grad_rounded_to_nearest(kernel, dtype):
    # The same inputs as fp32 and as 16-bit students: the stored gradient must be the fp32 one
    # rounded to nearest even (the interpreter's own fp32 -> bf16 cast truncates).
    s, t, y = _inputs(6, 150, dtype=dtype, seed=17)
    chunk = 64 if kernel == "chunked" else None
    _, grad16 = _run(s, t, y, kernel=kernel, chunk=chunk)
    _, grad32 = _run(s.float(), t, y, kernel=kernel, chunk=chunk)
    assert torch.equal(grad16, grad32.to(dtype))


@pytest.mark.parametrize("kernel", ["small", "chunked"])
@pytest.mark.parametrize("temperature,alpha,t2_scale", [
    (0.5, 0.0, True), (1.0, 1.0, True), (4.0, 0.3, False), (20.0, 0.9, True),
])
def test_temperature_alpha_t2(kernel, temperature, alpha, t2_scale):
    s, t, y = _inputs(4, 100, seed=4)
    _check(s, t, y, kernel=kernel, chunk=32 if kernel == "chunked" else None,
           temperature=temperature, alpha=alpha, t2_scale=t2_scale)


@pytest.mark.parametrize("kernel", ["small", "chunked"])
def test_teacher_kinds_agree(kernel):
    s, t, y = _inputs(4, 90, seed=6)
    chunk = 32 if kernel == "chunked" else None
    log_probs = torch.log_softmax(t, dim=-1)
    losses = [
        _check(s, t, y, kernel=kernel, chunk=chunk, teacher_kind="logits")[0],
        _check(s, log_probs, y, kernel=kernel, chunk=chunk, teacher_kind="log_probs")[0],
        _check(s, log_probs.exp(), y, kernel=kernel, chunk=chunk, teacher_kind="probs")[0],
    ]
    # The temperature softens all three the same way: the same teacher gives the same loss.
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(losses[2], losses[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", ["small", "chunked"])
def test_probs_with_exact_zeros(kernel):
    s, t, y = _inputs(3, 70, seed=7)
    probs = torch.softmax(t, dim=-1)
    probs[0, :40] = 0.0
    probs[1, 3] = 0.0
    probs = probs / probs.sum(-1, keepdim=True)
    loss, grad = _check(s, probs, y, kernel=kernel, chunk=32 if kernel == "chunked" else None,
                        teacher_kind="probs")
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


# --- extreme values, ignore_index, targets ------------------------------------------------------

@pytest.mark.parametrize("kernel", ["small", "chunked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_extreme_logits_stay_finite(kernel, dtype):
    s, t, y = _inputs(4, 130, seed=8)
    s[0] *= 3000.0        # |s| ~ 1e4
    t[1] *= 3000.0
    s[2, 7], t[2, 9] = 1.0e4, -1.0e4
    t[3, ::3] = float("-inf")  # -inf teacher logits: probability 0
    s, t = s.to(dtype), t.to(dtype)
    loss, grad = _run(s, t, y, kernel=kernel, chunk=64 if kernel == "chunked" else None)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    _check(s, t, y, kernel=kernel, chunk=64 if kernel == "chunked" else None, loss_rtol=1e-4)


@pytest.mark.parametrize("kernel", ["small", "chunked"])
def test_ignored_rows_and_custom_ignore_index(kernel):
    s, t, y = _inputs(6, 50, seed=9)
    y[0], y[3] = 7, 7
    loss, grad = _check(s, t, y, kernel=kernel, chunk=16 if kernel == "chunked" else None,
                        ignore_index=7)
    assert (loss[[0, 3]] == 0).all() and (grad[[0, 3]] == 0).all()
    # All rows ignored: zeros everywhere, no NaN.
    loss, grad = _run(s, t, torch.full_like(y, -100), kernel=kernel)
    assert (loss == 0).all() and (grad == 0).all()


@pytest.mark.parametrize("kernel", ["small", "chunked"])
def test_target_none(kernel):
    s, t, _ = _inputs(4, 77, seed=10)
    loss, _ = _check(s, t, None, kernel=kernel, chunk=32 if kernel == "chunked" else None, alpha=0.25)
    # alpha is unused without a target.
    other, _ = _run(s, t, None, kernel=kernel, alpha=1.0)
    torch.testing.assert_close(loss, other)


@pytest.mark.parametrize("kernel", ["small", "chunked"])
def test_out_of_range_target_gives_nan_row(kernel):
    s, t, y = _inputs(4, 20, seed=11)
    y[1], y[2] = 20, -3
    y[3] = 1 << 40  # far outside the row: must not be read
    loss, grad = _run(s, t, y, kernel=kernel, chunk=16 if kernel == "chunked" else None)
    assert torch.isnan(loss[1:]).all() and torch.isnan(grad[1:]).all()
    ref_loss, ref_grad = _reference(s[:1], t[:1], y[:1])
    torch.testing.assert_close(loss[:1].double().cpu(), ref_loss.cpu(), rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(grad[:1].double().cpu(), ref_grad.cpu(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernel", ["small", "chunked"])
def test_strided_rows(kernel):
    gen = torch.Generator().manual_seed(12)
    s_big = torch.randn(10, 90, generator=gen).to(DEVICE)
    t_big = torch.randn(5, 150, generator=gen, dtype=torch.float64).to(DEVICE).to(torch.bfloat16)
    s = s_big[::2, 5:75]   # row stride 180
    t = t_big[:, 10:80]    # row stride 150, another dtype
    y = torch.tensor([0, 1, 69, 1, -100, 1, 3, 1, 40, 1], device=DEVICE)[::2]  # strided target too
    assert s.stride() == (180, 1) and t.stride() == (150, 1) and y.stride() == (2,)
    _check(s, t, y, kernel=kernel, chunk=32 if kernel == "chunked" else None)


@pytest.mark.parametrize("kernel", ["small", "chunked"])
def test_no_grad_gives_empty_grad_and_same_loss(kernel):
    s, t, y = _inputs(3, 40, seed=13)
    loss, grad = _run(s, t, y, kernel=kernel, compute_grad=True)
    loss_only, empty = _run(s, t, y, kernel=kernel, compute_grad=False)
    assert empty.numel() == 0 and empty.dtype == s.dtype
    torch.testing.assert_close(loss_only, loss, rtol=0, atol=0)


# --- launch configuration and argument checks ---------------------------------------------------

@pytest.mark.parametrize("n,c", [(1, 1), (512, 10), (512, 100), (8192, 1000), (3, 5000), (100000, 7)])
def test_small_c_config(n, c):
    block_n, block_c, num_warps = tk.small_c_config(n, c, tk.SMALL_MIN_PROGRAMS)
    assert block_c >= c and block_c & (block_c - 1) == 0
    assert block_n >= 1 and block_n & (block_n - 1) == 0
    assert block_n == 1 or block_n * block_c <= tk.SMALL_TILE_ELEMS
    # enough programs to spread a batch over the SMs, unless rows are already one per program
    assert block_n == 1 or math.ceil(n / block_n) >= tk.SMALL_MIN_PROGRAMS
    assert num_warps in (1, 2, 4, 8, 16)
    if c <= 16 and n >= 16 * tk.SMALL_MIN_PROGRAMS:
        assert block_n > 1  # tiny C shares programs between rows


def test_kernel_choice_by_class_count_and_dtype():
    def pick(c, dtype, teacher_dtype=None):
        s = torch.empty(1, c, dtype=dtype)
        return tk.choose_kernel(s, torch.empty(1, c, dtype=teacher_dtype or dtype))

    assert pick(tk.SMALL_C_LIMIT_4BYTE, torch.float32) == "small"
    assert pick(tk.SMALL_C_LIMIT_4BYTE + 1, torch.float32) == "chunked"
    assert pick(tk.SMALL_C_LIMIT_2BYTE, torch.bfloat16) == "small"
    assert pick(tk.SMALL_C_LIMIT_2BYTE + 1, torch.bfloat16) == "chunked"
    assert pick(tk.SMALL_C_LIMIT_2BYTE, torch.bfloat16, torch.float32) == "chunked"
    bf16, fp16 = torch.empty(1, 1, dtype=torch.bfloat16), torch.empty(1, 1, dtype=torch.float16)
    chunk, warps = tk.chunked_config(bf16, fp16)
    assert (chunk, warps) == (tk.CHUNK_2BYTE, tk.CHUNK_NUM_WARPS_2BYTE)


def test_auto_uses_chunked_kernel_above_the_limit():
    c = tk.SMALL_C_LIMIT_4BYTE + 3
    s, t, y = _inputs(2, c, seed=14)
    auto = _run(s, t, y)
    forced = _run(s, t, y, kernel="chunked")
    torch.testing.assert_close(auto[0], forced[0], rtol=0, atol=0)
    torch.testing.assert_close(auto[1], forced[1], rtol=0, atol=0)


def test_bad_arguments():
    s, t, y = _inputs(2, 8)
    with pytest.raises(TypeError, match="student"):
        _run(s.double(), t, y)
    with pytest.raises(ValueError, match="stride"):
        _run(s, torch.randn(8, 2, device=DEVICE).t(), y)
    with pytest.raises(ValueError, match="teacher"):
        _run(s, t[:, :4], y)
    with pytest.raises(ValueError, match="target"):
        _run(s, t, y.int())
    with pytest.raises(ValueError, match="kernel"):
        _run(s, t, y, kernel="fast")
    with pytest.raises(ValueError, match="chunk"):
        _run(s, t, y, kernel="chunked", chunk=100)


# --- the public path ----------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_public_kd_loss_forward_backward(reduction):
    s, t, y = _inputs(6, 33, dtype=torch.float32, seed=15)
    y[2] = -100
    s_tr = s.clone().requires_grad_()
    loss = ued_fast.kd_loss(s_tr, t, y, temperature=3.0, alpha=0.6, reduction=reduction, backend="triton")
    s64 = s.double().requires_grad_()
    ref = kd_loss_reference(s64, t.double(), y, temperature=3.0, alpha=0.6, reduction=reduction)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=2e-5, atol=2e-6)
    upstream = torch.rand_like(ref) + 0.5
    loss.backward(upstream.to(loss.dtype))
    ref.backward(upstream)
    torch.testing.assert_close(s_tr.grad.double(), s64.grad, rtol=1e-5, atol=1e-6)


def test_public_kd_loss_module_bf16_chunked_path():
    s, t, _ = _inputs(2, tk.SMALL_C_LIMIT_2BYTE + 100, dtype=torch.bfloat16, seed=16)
    s.requires_grad_()
    module = ued_fast.KDLoss(temperature=2.0, teacher_kind="logits", backend="triton")
    loss = module(s, t)
    loss.backward()
    s64 = s.detach().double().requires_grad_()
    ref = kd_loss_reference(s64, t.double(), None, temperature=2.0)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=2e-5, atol=2e-5)
    assert s.grad.dtype == torch.bfloat16
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-2, atol=1e-2 * s64.grad.abs().max().item())


def test_opcheck_and_compile_with_triton_backend():
    s, t, y = _inputs(6, 11, seed=18)
    y[0] = -100
    for reduction, target in (("batchmean", y), ("none", None)):
        args = (s.clone().requires_grad_(), t, target, 2.0, 0.5, True, reduction, -100, "logits",
                "triton", True)
        torch.library.opcheck(torch.ops.ued_fast.kd_loss.default, args)

    assert_compiled_kd_step_matches_eager("triton", s, t, y)
