"""Triton kernels of kd_loss (DESIGN 2.1); the contract is in ued_fast/ops/kd_loss.py.

kd_loss_fwd(student, teacher, target, temperature, alpha, t2_scale, ignore_index, teacher_kind,
            compute_grad) -> (row_loss [N] float32, grad [N, C] in the student's dtype, or empty)

Per row, with b = s/T, a = t/T (logits, log_probs) or log(t)/T (probs), p = softmax(a),
q = softmax(b), s2 = T^2 if t2_scale else 1:
    loss = alpha*s2*KL(p || q) + (1-alpha)*(logsumexp(s) - s[y])     (s2*KL when target is None)
    grad = alpha*(s2/T)*(q - p) + (1-alpha)*(softmax(s) - onehot(y))  ((s2/T)*(q - p) when None)
KL = sum p*(log p - log q) over p > 0 (0*log 0 = 0, so -inf teacher logits and zero probs are
fine). Ignored rows (target == ignore_index) read nothing and write loss 0, grad 0. A target
outside [0, C) that is not ignore_index gives a NaN loss and a NaN grad row, never a stray read.
Student: fp32, bf16 or fp16; teacher: any of those or fp64. Math is fp32 in registers whatever
the input dtypes.

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
  accumulates the KL sum and writes the gradient.
  DRAM bytes when the re-read hits L2: N*C*(es + et) + N*C*es + 12N, the same floor as above;
  L2 traffic is N*C*(es+et) more. Pass-1 loads ask L2 to keep the lines (evict_last), pass-2
  loads and the grad store are marked streaming (evict_first).

Exponentials per element: small kernel 3 (a, b, s; 2 without a target); chunked kernel 3 in pass 1
(2 without a target) and in pass 2 1 (a, for the KL) plus 2 more when the grad is written (b, and
s with a target). Logs: one per element per read of t for 'probs' teachers only.

On CPU tensors (the interpreter, for tests) two launch details differ, not the math: a launch
uses as few programs as possible (min_programs), and bf16 grads are rounded to nearest on the
bits (SOFT_BF16_ROUNDING), because the interpreter's own fp32 -> bf16 cast truncates.

Launch knobs (for tuning on the GPU) are the module constants below: SMALL_TILE_ELEMS,
SMALL_ELEMS_PER_THREAD, SMALL_MIN_PROGRAMS, SMALL_C_LIMIT_2BYTE/_4BYTE, CHUNK_2BYTE/_4BYTE and
CHUNK_NUM_WARPS_2BYTE/_4BYTE. kd_loss_fwd also takes kernel= ('auto', 'small', 'chunked') and
chunk= overrides, used by the tests to force either path.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

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
# Running-max start: finite, so that max - start never makes inf - inf = NaN; a lane that only ever
# saw -inf (padding, zero probabilities) keeps it and a sum of 0, and drops out of the merge.
_MAX_START = -1.0e30


@triton.jit
def _load_tempered_teacher(ptrs, mask, inv_t, TEACHER_KIND: tl.constexpr, EVICT: tl.constexpr):
    """a = t/T for logits (0) and log-probs (1), log(t)/T for probs (2), in fp32; -inf where masked.

    A zero probability becomes -inf, so masked probs load as 0 (log(-inf) would be NaN)."""
    if TEACHER_KIND == 2:
        t = tl.load(ptrs, mask=mask, other=0.0, eviction_policy=EVICT).to(tl.float32)
        return tl.log(t) * inv_t
    t = tl.load(ptrs, mask=mask, other=float("-inf"), eviction_policy=EVICT).to(tl.float32)
    return t * inv_t


@triton.jit
def _to_grad_dtype(g, grad_ptr, SOFT_BF16_ROUNDING: tl.constexpr):
    """fp32 -> the grad's dtype, rounding to nearest even.

    The interpreter truncates fp32 -> bf16 (a GPU rounds to nearest), so on CPU tensors the
    rounding is done on the bits here: add 0x7FFF plus the lowest kept bit, keep the top 16 bits
    (NaN and inf keep their class)."""
    if SOFT_BF16_ROUNDING:
        bits = g.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return g.to(grad_ptr.dtype.element_ty)


@triton.jit
def _kd_small_c_kernel(
    s_ptr, t_ptr, y_ptr, loss_ptr, grad_ptr,
    n_rows, n_cols, s_row_stride, t_row_stride, y_stride,
    inv_t, kl_loss_coef, ce_coef, kl_grad_coef, ignore_index,
    HAS_TARGET: tl.constexpr, TEACHER_KIND: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    SOFT_BF16_ROUNDING: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
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
    a = _load_tempered_teacher(t_ptr + rows[:, None] * t_row_stride + cols[None, :], mask, inv_t,
                               TEACHER_KIND, "")
    b = s * inv_t

    # Rows that are not live hold only -inf: give them max 0 so that no inf - inf NaN is made.
    max_s = tl.where(live, tl.max(s, axis=1), 0.0)
    max_a = tl.where(live, tl.max(a, axis=1), 0.0)
    max_b = max_s * inv_t  # fl(s*c) is monotone in s for c > 0: max(b) == max(s)*inv_t
    exp_a = tl.exp(a - max_a[:, None])
    exp_b = tl.exp(b - max_b[:, None])
    sum_a = tl.sum(exp_a, axis=1)
    sum_b = tl.sum(exp_b, axis=1)
    log_sum_a = tl.log(sum_a)
    log_sum_b = tl.log(sum_b)
    p = exp_a * (1.0 / sum_a)[:, None]
    log_p = a - (max_a + log_sum_a)[:, None]
    log_q = b - (max_b + log_sum_b)[:, None]
    kl = tl.sum(tl.where(p != 0.0, p * (log_p - log_q), 0.0), axis=1)
    loss = kl_loss_coef * kl
    if HAS_TARGET:
        exp_s = tl.exp(s - max_s[:, None])
        sum_s = tl.sum(exp_s, axis=1)
        s_y = tl.sum(tl.where(cols[None, :] == y[:, None], s, 0.0), axis=1)
        ce = max_s + tl.log(sum_s) - s_y
        loss = tl.where(y_ok, loss + ce_coef * ce, float("nan"))
    loss = tl.where(live, loss, 0.0)
    tl.store(loss_ptr + rows, loss, mask=row_in)

    if COMPUTE_GRAD:
        q = exp_b * (1.0 / sum_b)[:, None]
        g = kl_grad_coef * (q - p)
        if HAS_TARGET:
            softmax_s = exp_s * (1.0 / sum_s)[:, None]
            onehot = (cols[None, :] == y[:, None]).to(tl.float32)
            g += ce_coef * (softmax_s - onehot)
            g = tl.where(y_ok[:, None], g, float("nan"))
        g = tl.where(live[:, None], g, 0.0)
        tl.store(grad_ptr + rows[:, None] * n_cols + cols[None, :],
                 _to_grad_dtype(g, grad_ptr, SOFT_BF16_ROUNDING), mask=row_in[:, None] & col_in[None, :])


@triton.jit
def _online_update(run_max, run_sum, x):
    """Per-lane online softmax step: (max, sum of exp(. - max)) after seeing x; one exp per element.

    exp(-|x - max|) is exp(x - max) when x <= max, and the rescale factor exp(max - x) when x is
    the new max. x = -inf leaves the state unchanged (run_max is finite, see _MAX_START)."""
    d = tl.exp(-tl.abs(x - run_max))
    bigger = x > run_max
    new_sum = tl.where(bigger, run_sum * d + 1.0, run_sum + d)
    return tl.where(bigger, x, run_max), new_sum


@triton.jit
def _merge_lanes(run_max, run_sum):
    """Merges per-lane (max, sum) into the row's max and sum of exp(. - max)."""
    row_max = tl.max(run_max, axis=0)
    return row_max, tl.sum(run_sum * tl.exp(run_max - row_max), axis=0)


@triton.jit
def _kd_chunked_kernel(
    s_ptr, t_ptr, y_ptr, loss_ptr, grad_ptr,
    n_cols, s_row_stride, t_row_stride, y_stride,
    inv_t, kl_loss_coef, ce_coef, kl_grad_coef, ignore_index,
    HAS_TARGET: tl.constexpr, TEACHER_KIND: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    SOFT_BF16_ROUNDING: tl.constexpr, CHUNK: tl.constexpr, MAX_START: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_row_stride
    t_row = t_ptr + row * t_row_stride
    g_row = grad_ptr + row * n_cols
    offs = tl.arange(0, CHUNK)
    live = row >= 0  # a true scalar tensor: rows are live unless their target is ignore_index
    y_ok = live
    if HAS_TARGET:
        y = tl.load(y_ptr + row * y_stride)
        live = y != ignore_index
        y_ok = (y >= 0) & (y < n_cols)
    # Columns to read: none on an ignored row (a scalar-and-vector mask '&' trips the interpreter).
    read_cols = tl.where(live, n_cols, 0)

    # Pass 1: per-lane running (max, sum) of a, s and b = s/T; ignored rows read nothing.
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
        a = _load_tempered_teacher(t_row + cols, mask, inv_t, TEACHER_KIND, "evict_last")
        max_a, sum_a = _online_update(max_a, sum_a, a)
        # b's lane max is s's lane max * inv_t, so b's update shares s's comparison.
        b_dist = tl.exp(-tl.abs(s - max_s) * inv_t)
        s_bigger = s > max_s
        sum_b = tl.where(s_bigger, sum_b * b_dist + 1.0, sum_b + b_dist)
        if HAS_TARGET:
            max_s, sum_s = _online_update(max_s, sum_s, s)
        else:
            max_s = tl.where(s_bigger, s, max_s)

    row_max_a, row_sum_a = _merge_lanes(max_a, sum_a)
    row_max_s = tl.max(max_s, axis=0)
    row_max_b = row_max_s * inv_t
    row_sum_b = tl.sum(sum_b * tl.exp(max_s * inv_t - row_max_b), axis=0)
    log_norm_a = row_max_a + tl.log(row_sum_a)  # log p = a - log_norm_a
    log_norm_b = row_max_b + tl.log(row_sum_b)
    inv_sum_a = 1.0 / row_sum_a
    inv_sum_b = 1.0 / row_sum_b
    if HAS_TARGET:
        row_sum_s = tl.sum(sum_s * tl.exp(max_s - row_max_s), axis=0)
        inv_sum_s = 1.0 / row_sum_s
        s_y = tl.load(s_row + y, mask=live & y_ok, other=float("nan")).to(tl.float32)
        ce = row_max_s + tl.log(row_sum_s) - s_y

    # Pass 2: the KL sum and the gradient (the re-read is meant to hit L2).
    kl_acc = tl.zeros([CHUNK], tl.float32)
    for start in range(0, n_cols, CHUNK):
        cols = start + offs
        col_in = cols < n_cols
        mask = cols < read_cols
        s = tl.load(s_row + cols, mask=mask, other=float("-inf"),
                    eviction_policy="evict_first").to(tl.float32)
        a = _load_tempered_teacher(t_row + cols, mask, inv_t, TEACHER_KIND, "evict_first")
        b = s * inv_t
        p = tl.exp(a - row_max_a) * inv_sum_a
        log_ratio = (a - log_norm_a) - (b - log_norm_b)
        kl_acc += tl.where(p != 0.0, p * log_ratio, 0.0)
        if COMPUTE_GRAD:
            q = tl.exp(b - row_max_b) * inv_sum_b
            g = kl_grad_coef * (q - p)
            if HAS_TARGET:
                softmax_s = tl.exp(s - row_max_s) * inv_sum_s
                g += ce_coef * (softmax_s - (cols == y).to(tl.float32))
                g = tl.where(y_ok, g, float("nan"))
            g = tl.where(live, g, 0.0)
            tl.store(g_row + cols, _to_grad_dtype(g, grad_ptr, SOFT_BF16_ROUNDING), mask=col_in,
                     eviction_policy="evict_first")

    loss = kl_loss_coef * tl.sum(kl_acc, axis=0)
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


def _check(student, teacher, target, teacher_kind, kernel, chunk):
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
    if teacher.device != student.device:
        raise ValueError(f"kd_loss_fwd: teacher is on {teacher.device} but student is on {student.device}")
    if target is not None:
        if target.dtype != torch.int64 or target.shape != (student.shape[0],):
            raise ValueError(f"kd_loss_fwd: target must be int64 [{student.shape[0]}], got "
                             f"{target.dtype} {tuple(target.shape)}")
        if target.device != student.device:
            raise ValueError(f"kd_loss_fwd: target is on {target.device} but student is on {student.device}")
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
    temperature: float,
    alpha: float,
    t2_scale: bool,
    ignore_index: int,
    teacher_kind: int,
    compute_grad: bool,
    *,
    kernel: str = "auto",
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton kd_loss forward (contract in ued_fast/ops/kd_loss.py): (row_loss, grad or empty).

    kernel: 'auto' picks by C (see small_c_limit); 'small' and 'chunked' force one (tests).
    chunk: the chunked kernel's CHUNK instead of chunked_config's (tests, tuning).
    """
    _check(student, teacher, target, teacher_kind, kernel, chunk)
    n_rows, n_cols = student.shape
    device = student.device
    row_loss = torch.empty(n_rows, dtype=torch.float32, device=device)
    grad = torch.empty((n_rows, n_cols) if compute_grad else (0,), dtype=student.dtype, device=device)
    if n_rows == 0:
        return row_loss, grad

    temperature = float(temperature)
    alpha = float(alpha)
    inv_t = 1.0 / temperature
    s2 = temperature * temperature if t2_scale else 1.0
    has_target = target is not None
    kl_weight = alpha * s2 if has_target else s2
    ce_coef = (1.0 - alpha) if has_target else 0.0
    # Unused pointer arguments get a real tensor: the kernels never read them (constexpr flags).
    y = target if has_target else row_loss
    y_stride = target.stride(0) if has_target else 0
    g = grad if compute_grad else row_loss
    scalars = (inv_t, kl_weight, ce_coef, kl_weight * inv_t, int(ignore_index))
    flags = dict(HAS_TARGET=has_target, TEACHER_KIND=int(teacher_kind), COMPUTE_GRAD=bool(compute_grad),
                 SOFT_BF16_ROUNDING=student.dtype == torch.bfloat16 and device.type == "cpu")

    if kernel == "auto":
        kernel = choose_kernel(student, teacher)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
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
            CHUNK=block, MAX_START=_MAX_START, num_warps=num_warps,
        )
