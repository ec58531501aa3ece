"""Triton kernels of kd_loss (DESIGN 2.1); the kernel contract (docs/DESIGN.md 2) is shared with the C++ and
CUDA backends: the KD coefficients arrive computed on the host.

kd_loss_fwd(student, teacher, target, inv_student_temp, inv_teacher_temp, kd_coef, ce_coef, divergence,
            beta, ignore_index, teacher_kind, compute_grad)
    -> (row_loss [N] float32, grad [N, C] in the student's dtype, or empty)

Per row, with b = s*inv_student_temp, a = t*inv_teacher_temp (logits, log_probs) or
log(t)*inv_teacher_temp (probs), p = softmax(a), q = softmax(b), D the divergence (0 forward_kl
KL(p || q), 1 reverse_kl KL(q || p), 2 jsd(beta); kernels/_common.py has the per-element terms):
    loss = kd_coef*D + ce_coef*(logsumexp(s) - s[y])                 (kd_coef*D when target is None)
    grad = kd_coef*inv_student_temp*dD/db + ce_coef*(softmax(s) - onehot(y))
0*log 0 = 0 on every side, so -inf teacher logits and zero probs are fine (reverse_kl is +inf where
p = 0 < q). Ignored rows (target == ignore_index) read nothing and write loss 0, grad 0. A target
outside [0, C) that is not ignore_index gives a NaN loss and a NaN grad row, never a stray read.
Student: fp32, bf16 or fp16; teacher: any of those or fp64. Math is fp32 in registers whatever
the input dtypes. DIVERGENCE is a constexpr: each divergence is its own compiled specialization,
and forward_kl's code is the same as before the others existed.

Two kernels, chosen on the host from C and the element sizes (no host sync, no allocation beyond
the two outputs, so the call is CUDA-graph safe):

_kd_small_c_kernel (C <= small_c_limit(): 8192 if student and teacher are 2-byte, else 4096):
  one program owns BLOCK_N rows x BLOCK_C = next_pow2(C) columns, the whole rows in registers.
  Bytes: reads N*C*(es + et) + 8N (target) once, writes N*C*es (grad) + 4N (loss).
  For bf16/bf16: N*C*(2+2+2) + 12N = the byte floor.

_kd_chunked_kernel (larger C, LLM vocabularies): one program per row, CHUNK columns at a time.
  Pass 1 streams s and t once and keeps per-lane online-softmax state (running max and rescaled
  sum) for a, s and b = s/T (b's max is s's max / T, so it needs no max of its own). The lanes
  are merged once per row. Pass 2 re-reads s and t (a row is C*(es+et) bytes, 128 KB for bf16
  C=32000; the rows in flight fit in an H100's 50 MB L2, so the re-read is meant to hit L2),
  accumulates the divergence sum and writes forward_kl's gradient. reverse_kl and jsd need the row's
  sums before their gradient (dD/db = h - q*sum(h)), so with a gradient they read the row a third time.
  DRAM bytes when the re-read hits L2: N*C*(es + et) + N*C*es + 12N, the same floor as above;
  L2 traffic is N*C*(es+et) more. Pass-1 loads ask L2 to keep the lines (evict_last), pass-2
  loads and the grad store are marked streaming (evict_first).

Exponentials per element: small kernel 3 (a, b, s; 2 without a target); chunked kernel 3 in pass 1
(2 without a target) and in pass 2 1 (a, for the KL) plus 2 more when the grad is written (b, and
s with a target); reverse_kl and jsd repeat pass 2's a and b in pass 3, and jsd adds an exp and a log
per element for log m. Logs: one per element per read of t for 'probs' teachers only.

On CPU tensors (the interpreter, for tests) two launch details differ, not the math: a launch
uses as few programs as possible (min_programs), and bf16 grads are rounded to nearest on the
bits (SOFT_BF16_ROUNDING), because the interpreter's own fp32 -> bf16 cast truncates.

Launch knobs (for tuning on the GPU) are the module constants below: SMALL_TILE_ELEMS,
SMALL_ELEMS_PER_THREAD, SMALL_MIN_PROGRAMS, SMALL_C_LIMIT_2BYTE/_4BYTE, CHUNK_2BYTE/_4BYTE and
CHUNK_NUM_WARPS_2BYTE/_4BYTE. kd_loss_fwd also takes kernel= ('auto', 'small', 'chunked') and
chunk= overrides, used by the tests to force either path.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (MAX_START, check_kd_scalars, check_same_device, divergence_grad, divergence_sums,
                      divergence_terms, kd_outputs, load_row_target, load_tempered_teacher, merge_lanes, on_device,
                      online_update, to_grad_dtype)

# --- launch knobs -------------------------------------------------------------------------------
# Small-C kernel: elements (rows x padded columns) per program, fp32 elements per thread per
# array (sets num_warps), and the fewest programs a launch should have before rows per program
# are halved (small batches should still spread over the SMs).
SMALL_TILE_ELEMS = 4096
SMALL_ELEMS_PER_THREAD = 16
SMALL_MIN_PROGRAMS = 128
SMALL_MAX_NUM_WARPS = 16
# Largest C handled by the whole-row-in-registers kernel, by the larger element size of s and t.
SMALL_C_LIMIT_2BYTE = 8192
SMALL_C_LIMIT_4BYTE = 4096
# Chunked kernel: columns per chunk and warps, by the larger element size of s and t. 2048 bf16
# columns over 8 warps = 8 elements (one 16-byte load) per thread per tensor; 1024 fp32 columns over
# 8 warps = 4 (one 16-byte load). Set by ptxas for sm_90 (.ci/check_triton.py): 4096 over 16 warps
# caps a thread at 128 registers and spilled for 'probs' teachers; 2048 fp32 over 8 warps spilled
# for an fp16 student with an fp32 teacher. Not yet tuned on a GPU.
CHUNK_2BYTE = 2048
CHUNK_4BYTE = 1024
CHUNK_NUM_WARPS_2BYTE = 8
CHUNK_NUM_WARPS_4BYTE = 8

KERNELS = ("auto", "small", "chunked")
_STUDENT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# A float64 teacher is read as is and rounded to fp32 in registers, like the others.
_TEACHER_DTYPES = _STUDENT_DTYPES + (torch.float64,)


@triton.jit
def _kd_small_c_kernel(
    s_ptr, t_ptr, y_ptr, loss_ptr, grad_ptr,
    n_rows, n_cols, s_row_stride, t_row_stride, y_stride,
    inv_student_temp, inv_teacher_temp, kd_coef, ce_coef, beta, ignore_index,
    DIVERGENCE: tl.constexpr, HAS_TARGET: tl.constexpr, TEACHER_KIND: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr, SOFT_BF16_ROUNDING: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    row_in = rows < n_rows
    col_in = cols < n_cols
    if HAS_TARGET:
        y = tl.load(y_ptr + rows * y_stride, mask=row_in, other=ignore_index)
        live = row_in & (y != ignore_index)
        y_ok = (y >= 0) & (y < n_cols)
    else:
        live = row_in
    mask = live[:, None] & col_in[None, :]

    s = tl.load(s_ptr + rows[:, None] * s_row_stride + cols[None, :], mask=mask,
                other=float("-inf")).to(tl.float32)
    a = load_tempered_teacher(t_ptr + rows[:, None] * t_row_stride + cols[None, :], mask, inv_teacher_temp,
                              TEACHER_KIND, "")
    b = s * inv_student_temp

    # Rows that are not live hold only -inf: give them max 0 so that no inf - inf NaN is made.
    max_s = tl.where(live, tl.max(s, axis=1), 0.0)
    max_a = tl.where(live, tl.max(a, axis=1), 0.0)
    max_b = max_s * inv_student_temp  # fl(s*c) is monotone in s for c > 0: max(b) == max(s)*c
    exp_a = tl.exp(a - max_a[:, None])
    exp_b = tl.exp(b - max_b[:, None])
    sum_a = tl.sum(exp_a, axis=1)
    sum_b = tl.sum(exp_b, axis=1)
    p = exp_a * (1.0 / sum_a)[:, None]
    q = exp_b * (1.0 / sum_b)[:, None]
    log_p = a - (max_a + tl.log(sum_a))[:, None]
    log_q = b - (max_b + tl.log(sum_b))[:, None]
    d, h = divergence_terms(log_p, log_q, p, q, beta, DIVERGENCE)
    div, h_sum = divergence_sums(d, h, 1, DIVERGENCE)
    loss = kd_coef * div
    if HAS_TARGET:
        exp_s = tl.exp(s - max_s[:, None])
        sum_s = tl.sum(exp_s, axis=1)
        s_y = tl.sum(tl.where(cols[None, :] == y[:, None], s, 0.0), axis=1)
        ce = max_s + tl.log(sum_s) - s_y
        loss = tl.where(y_ok, loss + ce_coef * ce, float("nan"))
    loss = tl.where(live, loss, 0.0)
    tl.store(loss_ptr + rows, loss, mask=row_in)

    if COMPUTE_GRAD:
        g = (kd_coef * inv_student_temp) * divergence_grad(p, q, h, h_sum[:, None], DIVERGENCE)
        if HAS_TARGET:
            softmax_s = exp_s * (1.0 / sum_s)[:, None]
            onehot = (cols[None, :] == y[:, None]).to(tl.float32)
            g += ce_coef * (softmax_s - onehot)
            g = tl.where(y_ok[:, None], g, float("nan"))
        g = tl.where(live[:, None], g, 0.0)
        tl.store(grad_ptr + rows[:, None] * n_cols + cols[None, :],
                 to_grad_dtype(g, grad_ptr, SOFT_BF16_ROUNDING), mask=row_in[:, None] & col_in[None, :])


@triton.jit
def _kd_chunk_terms(s_row, t_row, cols, read_cols, inv_student_temp, inv_teacher_temp,
                    row_max_a, inv_sum_a, log_norm_a, row_max_b, inv_sum_b, log_norm_b, beta,
                    TEACHER_KIND: tl.constexpr, DIVERGENCE: tl.constexpr):
    """One chunk of a row after pass 1: (s, p, q) and the divergence's (d, h); the loads are streaming."""
    mask = cols < read_cols
    s = tl.load(s_row + cols, mask=mask, other=float("-inf"), eviction_policy="evict_first").to(tl.float32)
    a = load_tempered_teacher(t_row + cols, mask, inv_teacher_temp, TEACHER_KIND, "evict_first")
    b = s * inv_student_temp
    p = tl.exp(a - row_max_a) * inv_sum_a
    q = tl.exp(b - row_max_b) * inv_sum_b
    d, h = divergence_terms(a - log_norm_a, b - log_norm_b, p, q, beta, DIVERGENCE)
    return s, p, q, d, h


@triton.jit
def _kd_store_grad_chunk(g_row, grad_ptr, cols, n_cols, kd_part, s, row_max_s, inv_sum_s, y, y_ok, live,
                         ce_coef, HAS_TARGET: tl.constexpr, SOFT_BF16_ROUNDING: tl.constexpr):
    """Adds the CE gradient to the KD part of a chunk, masks bad and ignored rows, stores it."""
    g = kd_part
    if HAS_TARGET:
        softmax_s = tl.exp(s - row_max_s) * inv_sum_s
        g += ce_coef * (softmax_s - (cols == y).to(tl.float32))
        g = tl.where(y_ok, g, float("nan"))
    g = tl.where(live, g, 0.0)
    tl.store(g_row + cols, to_grad_dtype(g, grad_ptr, SOFT_BF16_ROUNDING), mask=cols < n_cols,
             eviction_policy="evict_first")


@triton.jit
def _kd_chunked_kernel(
    s_ptr, t_ptr, y_ptr, loss_ptr, grad_ptr,
    n_cols, s_row_stride, t_row_stride, y_stride,
    inv_student_temp, inv_teacher_temp, kd_coef, ce_coef, beta, ignore_index,
    DIVERGENCE: tl.constexpr, HAS_TARGET: tl.constexpr, TEACHER_KIND: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr, SOFT_BF16_ROUNDING: tl.constexpr, CHUNK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_row_stride
    t_row = t_ptr + row * t_row_stride
    g_row = grad_ptr + row * n_cols
    offs = tl.arange(0, CHUNK)
    y, live, y_ok = load_row_target(y_ptr, row, y_stride, ignore_index, n_cols, HAS_TARGET)
    # Columns to read: none on an ignored row (a scalar-and-vector mask '&' trips the interpreter).
    read_cols = tl.where(live, n_cols, 0)
    kd_grad_coef = kd_coef * inv_student_temp

    # Pass 1: per-lane running (max, sum) of a, s and b = s * inv_student_temp; ignored rows read nothing.
    max_a = tl.full([CHUNK], MAX_START, tl.float32)
    sum_a = tl.zeros([CHUNK], tl.float32)
    max_s = tl.full([CHUNK], MAX_START, tl.float32)
    sum_s = tl.zeros([CHUNK], tl.float32)
    sum_b = tl.zeros([CHUNK], tl.float32)
    for start in range(0, n_cols, CHUNK):
        cols = start + offs
        mask = cols < read_cols
        s = tl.load(s_row + cols, mask=mask, other=float("-inf"),
                    eviction_policy="evict_last").to(tl.float32)
        a = load_tempered_teacher(t_row + cols, mask, inv_teacher_temp, TEACHER_KIND, "evict_last")
        max_a, sum_a = online_update(max_a, sum_a, a)
        # b's lane max is s's lane max * inv_student_temp, so b's update shares s's comparison.
        b_dist = tl.exp(-tl.abs(s - max_s) * inv_student_temp)
        s_bigger = s > max_s
        sum_b = tl.where(s_bigger, sum_b * b_dist + 1.0, sum_b + b_dist)
        if HAS_TARGET:
            max_s, sum_s = online_update(max_s, sum_s, s)
        else:
            max_s = tl.where(s_bigger, s, max_s)

    row_max_a, row_sum_a = merge_lanes(max_a, sum_a)
    row_max_s = tl.max(max_s, axis=0)
    row_max_b = row_max_s * inv_student_temp
    row_sum_b = tl.sum(sum_b * tl.exp(max_s * inv_student_temp - row_max_b), axis=0)
    log_norm_a = row_max_a + tl.log(row_sum_a)  # log p = a - log_norm_a
    log_norm_b = row_max_b + tl.log(row_sum_b)
    inv_sum_a = 1.0 / row_sum_a
    inv_sum_b = 1.0 / row_sum_b
    inv_sum_s = 0.0
    if HAS_TARGET:
        row_sum_s = tl.sum(sum_s * tl.exp(max_s - row_max_s), axis=0)
        inv_sum_s = 1.0 / row_sum_s
        s_y = tl.load(s_row + y, mask=live & y_ok, other=float("nan")).to(tl.float32)
        ce = row_max_s + tl.log(row_sum_s) - s_y

    # Pass 2: the divergence sums, and forward_kl's gradient (the re-read is meant to hit L2). Pass 3
    # (reverse_kl and jsd with a gradient): their gradient needs the row's sums first.
    div_acc = tl.zeros([CHUNK], tl.float32)
    h_acc = tl.zeros([CHUNK], tl.float32)
    h_sum = 0.0
    for sweep in tl.static_range(2):
        if sweep == 0 or (COMPUTE_GRAD and DIVERGENCE != 0):
            for start in range(0, n_cols, CHUNK):
                cols = start + offs
                s, p, q, d, h = _kd_chunk_terms(s_row, t_row, cols, read_cols, inv_student_temp, inv_teacher_temp,
                                                row_max_a, inv_sum_a, log_norm_a, row_max_b, inv_sum_b, log_norm_b,
                                                beta, TEACHER_KIND, DIVERGENCE)
                if sweep == 0:
                    div_acc += d
                    if DIVERGENCE == 2:
                        h_acc += h
                if COMPUTE_GRAD and (sweep == 1 or DIVERGENCE == 0):
                    kd_part = kd_grad_coef * divergence_grad(p, q, h, h_sum, DIVERGENCE)
                    _kd_store_grad_chunk(g_row, grad_ptr, cols, n_cols, kd_part, s, row_max_s, inv_sum_s,
                                         y, y_ok, live, ce_coef, HAS_TARGET, SOFT_BF16_ROUNDING)
            if sweep == 0:
                div, h_sum = divergence_sums(div_acc, h_acc, 0, DIVERGENCE)

    loss = kd_coef * div
    if HAS_TARGET:
        loss = tl.where(y_ok, loss + ce_coef * ce, float("nan"))
        loss = tl.where(live, loss, 0.0)
    tl.store(loss_ptr + row, loss)


def small_c_limit(student: torch.Tensor, teacher: torch.Tensor) -> int:
    """Largest C that the whole-row-in-registers kernel takes for these dtypes."""
    widest = max(student.element_size(), teacher.element_size())
    return SMALL_C_LIMIT_2BYTE if widest <= 2 else SMALL_C_LIMIT_4BYTE


def min_programs(device: torch.device) -> int:
    """Fewest programs a small-C launch aims for: SMALL_MIN_PROGRAMS on a GPU; 1 in the interpreter
    (CPU tensors), where each program costs about 10 ms of Python and there are no SMs to fill."""
    return 1 if device.type == "cpu" else SMALL_MIN_PROGRAMS


def small_c_config(n_rows: int, n_cols: int, min_programs: int | None = None) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_C, num_warps) of the small-C kernel: several rows per program for small C,
    halved until the launch has min_programs (default SMALL_MIN_PROGRAMS) programs or one row each."""
    if min_programs is None:
        min_programs = SMALL_MIN_PROGRAMS
    block_c = triton.next_power_of_2(n_cols)
    block_n = max(1, SMALL_TILE_ELEMS // block_c)
    block_n = min(block_n, triton.next_power_of_2(n_rows))
    while block_n > 1 and triton.cdiv(n_rows, block_n) < min_programs:
        block_n //= 2
    threads = max(1, (block_n * block_c) // SMALL_ELEMS_PER_THREAD)
    num_warps = min(SMALL_MAX_NUM_WARPS, max(1, triton.next_power_of_2(triton.cdiv(threads, 32))))
    return block_n, block_c, num_warps


def chunked_config(student: torch.Tensor, teacher: torch.Tensor) -> tuple[int, int]:
    """(CHUNK, num_warps) of the chunked kernel for these dtypes."""
    if max(student.element_size(), teacher.element_size()) <= 2:
        return CHUNK_2BYTE, CHUNK_NUM_WARPS_2BYTE
    return CHUNK_4BYTE, CHUNK_NUM_WARPS_4BYTE


def choose_kernel(student: torch.Tensor, teacher: torch.Tensor) -> str:
    return "small" if student.shape[1] <= small_c_limit(student, teacher) else "chunked"


def _check(student, teacher, target, inv_student_temp, inv_teacher_temp, divergence, beta, teacher_kind,
           kernel, chunk):
    if student.dtype not in _STUDENT_DTYPES:
        raise TypeError(f"kd_loss_fwd: student must be float32, bfloat16 or float16 for the Triton "
                        f"backend, got {student.dtype}")
    if teacher.dtype not in _TEACHER_DTYPES:
        raise TypeError(f"kd_loss_fwd: teacher must be a float tensor, got {teacher.dtype}")
    for name, x in (("student", student), ("teacher", teacher)):
        if x.dim() != 2:
            raise ValueError(f"kd_loss_fwd: {name} must be 2-D, got shape {tuple(x.shape)}")
        if x.shape[1] > 1 and x.stride(1) != 1:
            raise ValueError(f"kd_loss_fwd: {name} needs unit stride along classes, got strides "
                             f"{tuple(x.stride())}")
    if teacher.shape != student.shape:
        raise ValueError(f"kd_loss_fwd: teacher has shape {tuple(teacher.shape)} but student has "
                         f"{tuple(student.shape)}")
    if target is not None and (target.dtype != torch.int64 or target.shape != (student.shape[0],)):
        raise ValueError(f"kd_loss_fwd: target must be int64 [{student.shape[0]}], got "
                         f"{target.dtype} {tuple(target.shape)}")
    check_same_device("kd_loss_fwd", student, teacher=teacher, target=target)
    check_kd_scalars("kd_loss_fwd", inv_student_temp, inv_teacher_temp, divergence, beta)
    if teacher_kind not in (0, 1, 2):
        raise ValueError(f"kd_loss_fwd: teacher_kind must be 0, 1 or 2, got {teacher_kind!r}")
    if kernel not in KERNELS:
        raise ValueError(f"kd_loss_fwd: kernel must be one of {KERNELS}, got {kernel!r}")
    if chunk is not None and (chunk < 16 or chunk & (chunk - 1)):
        raise ValueError(f"kd_loss_fwd: chunk must be a power of two >= 16, got {chunk}")


def kd_loss_fwd(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor | None,
    inv_student_temp: float,
    inv_teacher_temp: float,
    kd_coef: float,
    ce_coef: float,
    divergence: int,
    beta: float,
    ignore_index: int,
    teacher_kind: int,
    compute_grad: bool,
    *,
    kernel: str = "auto",
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton kd_loss forward (the kernel contract, coefficients from the host): (row_loss, grad or empty).

    kernel: 'auto' picks by C (see small_c_limit); 'small' and 'chunked' force one (tests).
    chunk: the chunked kernel's CHUNK instead of chunked_config's (tests, tuning).
    """
    _check(student, teacher, target, inv_student_temp, inv_teacher_temp, divergence, beta, teacher_kind,
           kernel, chunk)
    row_loss, grad = kd_outputs(student, compute_grad)
    if student.shape[0] == 0:
        return row_loss, grad

    has_target = target is not None
    # Unused pointer arguments get a real tensor: the kernels never read them (constexpr flags).
    y = target if has_target else row_loss
    y_stride = target.stride(0) if has_target else 0
    g = grad if compute_grad else row_loss
    scalars = (float(inv_student_temp), float(inv_teacher_temp), float(kd_coef),
               float(ce_coef) if has_target else 0.0, float(beta), int(ignore_index))
    flags = dict(DIVERGENCE=int(divergence), HAS_TARGET=has_target, TEACHER_KIND=int(teacher_kind),
                 COMPUTE_GRAD=bool(compute_grad),
                 SOFT_BF16_ROUNDING=student.dtype == torch.bfloat16 and student.device.type == "cpu")

    if kernel == "auto":
        kernel = choose_kernel(student, teacher)
    with on_device(student):
        _launch(kernel, chunk, student, teacher, y, row_loss, g, y_stride, scalars, flags)
    return row_loss, grad


def _launch(kernel, chunk, student, teacher, y, row_loss, g, y_stride, scalars, flags):
    n_rows, n_cols = student.shape
    if kernel == "small":
        block_n, block_c, num_warps = small_c_config(n_rows, n_cols, min_programs(student.device))
        grid = (triton.cdiv(n_rows, block_n),)
        _kd_small_c_kernel[grid](
            student, teacher, y, row_loss, g, n_rows, n_cols,
            student.stride(0), teacher.stride(0), y_stride, *scalars, **flags,
            BLOCK_N=block_n, BLOCK_C=block_c, num_warps=num_warps,
        )
    else:
        default_chunk, num_warps = chunked_config(student, teacher)
        block = chunk or default_chunk
        _kd_chunked_kernel[(n_rows,)](
            student, teacher, y, row_loss, g, n_cols,
            student.stride(0), teacher.stride(0), y_stride, *scalars, **flags,
            CHUNK=block, num_warps=num_warps,
        )
