"""Triton kernel of the sparse (top-k teacher) KD forward; the kernel contract (docs/DESIGN.md 2.5)
is shared with the C++ and CUDA backends: the host (ued_fast/ops/_sparse_teacher.py, kernel_inputs) hands over
the teacher side as sorted indices and (k+1)-category log-probabilities, and the KD coefficients.

sparse_kd_loss_fwd(student, indices, log_p, target, inv_student_temp, kd_coef, ce_coef, divergence, beta,
                   ignore_index, compute_grad)
    -> (row_loss [N] float32, grad [N, C] in the student's dtype, or empty)

Per row, with z = s*inv_student_temp, S the row's live indices (indices >= 0; padding entries are -1 and come
first, the row being sorted), lse = logsumexp(z), lse_off = logsumexp of z off S (-inf when S covers the row):
    log q_a = z[indices[a]] - lse for a live entry, -inf for padding;  log q_rest = lse_off - lse
    D = sum over the k+1 categories (k entries + 'rest') of d(log p_a, log q_a)   (kernels/_common.py's terms)
    h_a = dD/d(log q_a): forward_kl -p_a; reverse_kl q_a (log q_a - log p_a + 1); jsd (1-beta) q_a (log q_a - log m_a)
    H = sum of h_a
    loss = kd_coef*D + ce_coef*(logsumexp(s) - s[y])                 (kd_coef*D when target is None)
    grad_j = kd_coef*inv_student_temp*G_j + ce_coef*(softmax(s)_j - [j == y])
        G_j = h_a - q_j H                          for j = indices[a], a live
        G_j = h_rest exp(z_j - lse_off) - q_j H    for j off S (q_j / q_rest, never divided by a tiny q_rest)
lse_off is summed over the off-S exponentials themselves (a masked online softmax with its own running max), never
as the total minus the mass on S, so that a student with almost all its mass on S keeps an accurate log q_rest.
Log-probabilities are taken as (z - row max) - log(row sum), never z - lse: lse's rounding grows with |z|.
Ignored rows (target == ignore_index) read nothing and write loss 0, grad 0. A target outside [0, C) that is not
ignore_index, or an index < -1 or >= C, gives a NaN loss and a NaN grad row; every gather is masked, so no bad
value is ever used as an address. Unsorted or repeated indices give undefined values, never a stray access.

One kernel, one program per row, BLOCK columns at a time:
  Pass 1 streams the row once and keeps per-lane online-softmax state for z (all columns) and for z off S; with
  a target and inv_student_temp != 1 (SEPARATE_CE) it keeps s's state too (the CE's softmax is at temperature 1),
  and z's sum then shares s's comparison (z's lane max is s's lane max * inv_student_temp). The off-S mask of a
  chunk: the live indices in [c0, c0 + BLOCK) are a contiguous run of the sorted row, walked by a pointer that
  carries over from chunk to chunk, so a row costs k*BLOCK compares in all (not C*k).
  Then the (k+1)-category math on K_BLOCK entries at a time: gather z at the indices, load log p, sum d and h.
  Pass 2 (COMPUTE_GRAD) re-reads the row (meant to hit L2) and writes grad chunk by chunk: the whole chunk is
  made in registers (the same pointer walk recomputes h_a of each index in the chunk as a scalar and places it
  at its column) and stored once, so no column is written twice.
  Bytes: reads N*C*es (pass 1) + N*C*es (pass 2, from L2 when the rows in flight fit) + N*k*(8 + 4)*2 (indices,
  log p, and the gathers of z, from L2) + 8N (target); writes N*C*es (grad) + 4N (loss).
  Exponentials per element: pass 1 2 (z, z off S), 3 with SEPARATE_CE; pass 2 2 (q, z off S), 3 with a target
  and SEPARATE_CE. Per index: a few scalar loads, 2 exps (and for jsd 2 logs) in the k-math and again in pass 2.

On CPU tensors (the interpreter, for tests) bf16 grads are rounded to nearest on the bits (SOFT_BF16_ROUNDING),
because the interpreter's own fp32 -> bf16 cast truncates.

Launch knobs (for tuning on the GPU) are the module constants below: BLOCK_2BYTE / BLOCK_4BYTE (columns per chunk
by the student's element size), MIN_BLOCK, NUM_WARPS, ELEMS_PER_THREAD, K_BLOCK_MIN / K_BLOCK_MAX (entries per
step of the k-math). sparse_kd_loss_fwd also takes block= and k_block= overrides (tests: several chunks and
several k steps on small rows). Not yet run on a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (MAX_START, check_kd_scalars, check_same_device, divergence_terms, kd_outputs,
                      load_row_target, merge_lanes, on_device, online_update, to_grad_dtype)

# --- launch knobs -------------------------------------------------------------------------------
# Columns per chunk by the student's element size; narrower rows take next_pow2(C), not less than MIN_BLOCK.
# 1024 columns over 8 warps for both: the kernel keeps six per-lane state arrays (z, z off the support, s), and
# ptxas for sm_90 (.ci/check_triton.py) gives 2048 bf16 columns over 8 warps 101-109 registers per thread (two
# programs per SM), 1024 columns at most 48 with no spill. Every index in a chunk also costs a compare over the
# chunk, so a narrower BLOCK means fewer compares at large k. Not yet tuned on a GPU.
BLOCK_2BYTE = 1024
BLOCK_4BYTE = 1024
MIN_BLOCK = 16
NUM_WARPS = 8
# Fewest elements per thread of a chunk (sets the warps of narrow chunks).
ELEMS_PER_THREAD = 4
# Entries of the k-math per step: next_pow2(k) within these bounds.
K_BLOCK_MIN = 16
K_BLOCK_MAX = 1024
# The index walk's value past a row's last entry: above any chunk end, so the walk stops there.
PAST_END = tl.constexpr(1 << 62)

_STUDENT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _index_at(idx_row, entry, n_entries):
    """The row's index at `entry`, or PAST_END from n_entries on."""
    return tl.load(idx_row + entry, mask=entry < n_entries, other=PAST_END)


@triton.jit
def _first_live_entry(idx_row, n_entries):
    """(entry, index) of the row's first index >= 0: the padding entries (-1) come first in a sorted row."""
    entry = tl.full([], 0, tl.int32)
    index = _index_at(idx_row, entry, n_entries)
    while index < 0:
        entry += 1
        index = _index_at(idx_row, entry, n_entries)
    return entry, index


@triton.jit
def _load_chunk(s_row, start, offs, read_cols, inv_student_temp, EVICT: tl.constexpr):
    """(cols, in-row mask, s, z = s*inv_student_temp) of the chunk at `start`; -inf where masked."""
    cols = start + offs
    mask = cols < read_cols
    s = tl.load(s_row + cols, mask=mask, other=float("-inf"), eviction_policy=EVICT).to(tl.float32)
    return cols, mask, s, s * inv_student_temp


@triton.jit
def _category_terms(index, log_p, s_row, n_cols, inv_student_temp, row_max_z, log_sum_z, beta,
                    DIVERGENCE: tl.constexpr):
    """(d, h) of the categories at `index` (scalar or vector): D's term and h = dD/d(log q); a padding or
    out-of-range index is read as log q = -inf (a bad index makes its row NaN elsewhere). log q is
    (z - max) - log(sum): z - lse would round to lse's ulp, large for |z| ~ 1e4."""
    in_row = (index >= 0) & (index < n_cols)
    z = tl.load(s_row + index, mask=in_row, other=float("-inf")).to(tl.float32) * inv_student_temp
    log_q = tl.where(in_row, (z - row_max_z) - log_sum_z, float("-inf"))
    p = tl.exp(log_p)
    q = tl.exp(log_q)
    d, h = divergence_terms(log_p, log_q, p, q, beta, DIVERGENCE)
    return d, _log_q_grad(p, q, h, DIVERGENCE)


@triton.jit
def _log_q_grad(p, q, h, DIVERGENCE: tl.constexpr):
    """dD/d(log q) of one category from divergence_terms' h: forward_kl -p; reverse_kl q (log q - log p + 1)
    (h + q, 0 where q = 0); jsd h itself."""
    if DIVERGENCE == 0:
        return -p
    elif DIVERGENCE == 1:
        return h + q
    return h


@triton.jit
def _sparse_kd_kernel(
    s_ptr, idx_ptr, lp_ptr, y_ptr, loss_ptr, grad_ptr,
    n_cols, n_entries, s_row_stride, y_stride,
    inv_student_temp, kd_coef, ce_coef, beta, ignore_index,
    DIVERGENCE: tl.constexpr, HAS_TARGET: tl.constexpr, SEPARATE_CE: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    SOFT_BF16_ROUNDING: tl.constexpr, BLOCK: tl.constexpr, K_BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_row_stride
    idx_row = idx_ptr + row * n_entries
    lp_row = lp_ptr + row * (n_entries + 1)
    g_row = grad_ptr + row * n_cols
    offs = tl.arange(0, BLOCK)
    y, live, y_ok = load_row_target(y_ptr, row, y_stride, ignore_index, n_cols, HAS_TARGET)
    # Columns and entries to read: none on an ignored row (a scalar-and-vector mask '&' trips the interpreter).
    read_cols = tl.where(live, n_cols, 0)
    read_entries = tl.where(live, n_entries, 0)

    # Pass 1: per-lane running (max, sum) of z, of z off the support, and (SEPARATE_CE) of s.
    max_z = tl.full([BLOCK], MAX_START, tl.float32)
    sum_z = tl.zeros([BLOCK], tl.float32)
    max_off = tl.full([BLOCK], MAX_START, tl.float32)
    sum_off = tl.zeros([BLOCK], tl.float32)
    max_s = tl.full([BLOCK], MAX_START, tl.float32)
    sum_s = tl.zeros([BLOCK], tl.float32)
    entry, index = _first_live_entry(idx_row, read_entries)
    for start in range(0, n_cols, BLOCK):
        cols, mask, s, z = _load_chunk(s_row, start, offs, read_cols, inv_student_temp, "evict_last")
        off = mask
        while index < start + BLOCK:  # the run of sorted indices in this chunk
            off = off & (cols != index)
            entry += 1
            index = _index_at(idx_row, entry, read_entries)
        max_off, sum_off = online_update(max_off, sum_off, tl.where(off, z, float("-inf")))
        if SEPARATE_CE:
            # z's lane max is s's lane max * inv_student_temp: z's update shares s's comparison.
            z_dist = tl.exp(-tl.abs(s - max_s) * inv_student_temp)
            sum_z = tl.where(s > max_s, sum_z * z_dist + 1.0, sum_z + z_dist)
            max_s, sum_s = online_update(max_s, sum_s, s)
        else:
            max_z, sum_z = online_update(max_z, sum_z, z)

    if SEPARATE_CE:
        row_max_s, row_sum_s = merge_lanes(max_s, sum_s)
        row_max_z = row_max_s * inv_student_temp
        row_sum_z = tl.sum(sum_z * tl.exp(max_s * inv_student_temp - row_max_z), axis=0)
    else:
        row_max_z, row_sum_z = merge_lanes(max_z, sum_z)
        row_max_s = row_max_z  # z = s when the CE shares z's softmax (inv_student_temp == 1)
        row_sum_s = row_sum_z
    log_sum_z = tl.log(row_sum_z)
    row_max_off, row_sum_off = merge_lanes(max_off, sum_off)  # sum 0 when the support covers the row

    # The (k+1)-category math: K_BLOCK entries at a time, then 'rest'.
    ks = tl.arange(0, K_BLOCK)
    d_acc = tl.zeros([K_BLOCK], tl.float32)
    h_acc = tl.zeros([K_BLOCK], tl.float32)
    bad_acc = tl.zeros([K_BLOCK], tl.int32)
    for k0 in range(0, n_entries, K_BLOCK):
        entries = k0 + ks
        in_k = entries < read_entries
        idx = tl.load(idx_row + entries, mask=in_k, other=-1)
        log_p = tl.load(lp_row + entries, mask=in_k, other=float("-inf"))
        d, h = _category_terms(idx, log_p, s_row, n_cols, inv_student_temp, row_max_z, log_sum_z, beta,
                               DIVERGENCE)
        d_acc += d
        h_acc += h
        bad_acc += ((idx < -1) | (idx >= n_cols)).to(tl.int32)
    log_p_rest = tl.load(lp_row + n_entries, mask=live, other=float("-inf"))
    log_q_rest = (row_max_off - row_max_z) + (tl.log(row_sum_off) - log_sum_z)  # lse_off - lse
    p_rest = tl.exp(log_p_rest)
    q_rest = tl.exp(log_q_rest)
    d_rest, h_rest = divergence_terms(log_p_rest, log_q_rest, p_rest, q_rest, beta, DIVERGENCE)
    h_rest = _log_q_grad(p_rest, q_rest, h_rest, DIVERGENCE)
    div = tl.sum(d_acc, axis=0) + d_rest
    h_sum = tl.sum(h_acc, axis=0) + h_rest
    row_ok = y_ok & (tl.sum(bad_acc, axis=0) == 0)

    loss = kd_coef * div
    inv_sum_s = 1.0 / row_sum_s
    if HAS_TARGET:
        s_y = tl.load(s_row + y, mask=live & y_ok, other=float("nan")).to(tl.float32)
        loss += ce_coef * ((row_max_s - s_y) + tl.log(row_sum_s))
    loss = tl.where(row_ok, loss, float("nan"))
    loss = tl.where(live, loss, 0.0)
    tl.store(loss_ptr + row, loss)

    if COMPUTE_GRAD:
        # Pass 2: grad = kd_grad_coef * G + CE, each chunk made whole in registers and stored once.
        kd_grad_coef = kd_coef * inv_student_temp
        kd_h_sum = kd_grad_coef * h_sum
        inv_sum_z = 1.0 / row_sum_z
        # exp(z - lse_off) = exp(z - row_max_off) / row_sum_off; no off-support mass: no term (not 0 * inf).
        kd_h_rest = tl.where(row_sum_off > 0.0, kd_grad_coef * h_rest / row_sum_off, 0.0)
        entry, index = _first_live_entry(idx_row, read_entries)
        for start in range(0, n_cols, BLOCK):
            cols, mask, s, z = _load_chunk(s_row, start, offs, read_cols, inv_student_temp, "evict_first")
            off = mask
            on_support = tl.zeros([BLOCK], tl.float32)
            while index < start + BLOCK:
                log_p = tl.load(lp_row + entry, mask=entry < read_entries, other=float("-inf"))
                _, h = _category_terms(index, log_p, s_row, n_cols, inv_student_temp, row_max_z, log_sum_z, beta,
                                       DIVERGENCE)
                hit = cols == index
                on_support = tl.where(hit, kd_grad_coef * h, on_support)
                off = off & (cols != index)
                entry += 1
                index = _index_at(idx_row, entry, read_entries)
            q = tl.exp(z - row_max_z) * inv_sum_z
            g = on_support - kd_h_sum * q + tl.where(off, kd_h_rest * tl.exp(z - row_max_off), 0.0)
            if HAS_TARGET:
                if SEPARATE_CE:
                    softmax_s = tl.exp(s - row_max_s) * inv_sum_s
                else:
                    softmax_s = q
                g += ce_coef * (softmax_s - (cols == y).to(tl.float32))
            g = tl.where(row_ok, g, float("nan"))
            g = tl.where(live, g, 0.0)
            tl.store(g_row + cols, to_grad_dtype(g, grad_ptr, SOFT_BF16_ROUNDING), mask=cols < n_cols,
                     eviction_policy="evict_first")


def block_config(student: torch.Tensor, block: int | None = None) -> tuple[int, int]:
    """(BLOCK, num_warps) for this student: BLOCK_2BYTE / BLOCK_4BYTE by element size, next_pow2(C) for
    narrower rows (not below MIN_BLOCK), or `block`; warps give each thread >= ELEMS_PER_THREAD columns."""
    if block is None:
        widest = BLOCK_2BYTE if student.element_size() <= 2 else BLOCK_4BYTE
        block = min(widest, max(MIN_BLOCK, triton.next_power_of_2(student.shape[1])))
    num_warps = min(NUM_WARPS, max(1, block // (32 * ELEMS_PER_THREAD)))
    return block, num_warps


def k_block_size(k: int, k_block: int | None = None) -> int:
    """Entries per step of the k-math: next_pow2(k) within [K_BLOCK_MIN, K_BLOCK_MAX], or `k_block`."""
    if k_block is not None:
        return k_block
    return min(K_BLOCK_MAX, max(K_BLOCK_MIN, triton.next_power_of_2(k)))


def _check(student, indices, log_p, target, inv_student_temp, kd_coef, ce_coef, divergence, beta, block, k_block):
    op = "sparse_kd_loss_fwd"
    if student.dtype not in _STUDENT_DTYPES:
        raise TypeError(f"{op}: student must be float32, bfloat16 or float16 for the Triton backend, got "
                        f"{student.dtype}")
    if student.dim() != 2 or student.shape[1] == 0:
        raise ValueError(f"{op}: student must be 2-D [N, C] with C >= 1, got shape {tuple(student.shape)}")
    n = student.shape[0]
    if student.shape[1] > 1 and n > 0 and student.stride(1) != 1:
        raise ValueError(f"{op}: student needs unit stride along classes, got strides {tuple(student.stride())}")
    if indices.dtype != torch.int64:
        raise TypeError(f"{op}: indices must be int64, got {indices.dtype}")
    if indices.dim() != 2 or indices.shape[0] != n or indices.shape[1] < 1 or not indices.is_contiguous():
        raise ValueError(f"{op}: indices must be a contiguous [N, k] with N = {n} and k >= 1, got shape "
                         f"{tuple(indices.shape)}, strides {tuple(indices.stride())}")
    k = indices.shape[1]
    if log_p.dtype != torch.float32:
        raise TypeError(f"{op}: log_p must be float32, got {log_p.dtype}")
    if tuple(log_p.shape) != (n, k + 1) or not log_p.is_contiguous():
        raise ValueError(f"{op}: log_p must be a contiguous [N, k + 1] = [{n}, {k + 1}], got shape "
                         f"{tuple(log_p.shape)}, strides {tuple(log_p.stride())}")
    if target is not None and (target.dtype != torch.int64 or tuple(target.shape) != (n,)):
        raise ValueError(f"{op}: target must be int64 [{n}], got {target.dtype} {tuple(target.shape)}")
    check_same_device(op, student, indices=indices, log_p=log_p, target=target)
    check_kd_scalars(op, inv_student_temp, 1.0, divergence, beta)
    for name, value in (("kd_coef", kd_coef), ("ce_coef", ce_coef)):
        if not (float(value) >= 0.0 and float(value) < float("inf")):
            raise ValueError(f"{op}: {name} must be finite and >= 0, got {value!r}")
    for name, value, least in (("block", block, MIN_BLOCK), ("k_block", k_block, K_BLOCK_MIN)):
        if value is not None and (value < least or value & (value - 1)):
            raise ValueError(f"{op}: {name} must be a power of two >= {least}, got {value}")


def sparse_kd_loss_fwd(
    student: torch.Tensor,
    indices: torch.Tensor,
    log_p: torch.Tensor,
    target: torch.Tensor | None,
    inv_student_temp: float,
    kd_coef: float,
    ce_coef: float,
    divergence: int,
    beta: float,
    ignore_index: int,
    compute_grad: bool,
    *,
    block: int | None = None,
    k_block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton sparse_kd_loss forward (the kernel contract; teacher side and coefficients from the host):
    (row_loss, grad or empty). block / k_block: the chunk width and k-math step instead of block_config's and
    k_block_size's (tests, tuning)."""
    _check(student, indices, log_p, target, inv_student_temp, kd_coef, ce_coef, divergence, beta, block, k_block)
    row_loss, grad = kd_outputs(student, compute_grad)
    n_rows, n_cols = student.shape
    if n_rows == 0:
        return row_loss, grad

    has_target = target is not None
    # Unused pointer arguments get a real tensor: the kernel never reads them (constexpr flags).
    y = target if has_target else row_loss
    y_stride = target.stride(0) if has_target else 0
    g = grad if compute_grad else row_loss
    block, num_warps = block_config(student, block)
    k = indices.shape[1]
    with on_device(student):
        _sparse_kd_kernel[(n_rows,)](
            student, indices, log_p, y, row_loss, g,
            n_cols, k, student.stride(0), y_stride,
            float(inv_student_temp), float(kd_coef), float(ce_coef) if has_target else 0.0, float(beta),
            int(ignore_index),
            DIVERGENCE=int(divergence), HAS_TARGET=has_target,
            SEPARATE_CE=has_target and float(inv_student_temp) != 1.0, COMPUTE_GRAD=bool(compute_grad),
            SOFT_BF16_ROUNDING=student.dtype == torch.bfloat16 and student.device.type == "cpu",
            BLOCK=block, K_BLOCK=k_block_size(k, k_block), num_warps=num_warps,
        )
    return row_loss, grad
