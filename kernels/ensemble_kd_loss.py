"""Triton kernels of ensemble_kd_loss (the kernel contract: coefficients computed on the host).

ensemble_kd_loss_fwd(student [N, C], teachers [K, N, C], weights [K, N] normalized, target [N] or None,
                     inv_student_temp, inv_teacher_temp, kd_coef, ce_coef, divergence, beta,
                     ignore_index, mix, compute_grad) -> (row_loss [N] float32, grad [N, C] or empty)

One kernel, _ens_kd_kernel, with two bodies chosen by the CHUNKED constexpr; math in fp32 registers,
no [N, C] or [K, N, C] temporary written:
- CHUNKED 0 (the whole row fits one tile): BLOCK_N rows per program; a loop over the K teachers
  reads each teacher tile once and accumulates the mixture in registers.
- CHUNKED 1 (large C): one row per program; teachers are read as [BLOCK_K, BLOCK_C] tiles (all K
  teachers of a column chunk at once). Sweep 1: online max / sum-exp per teacher (or of the logit
  mixture) and of the student; sweep 2: the mixture and the divergence chunk by chunk, with
  forward_kl's gradient; sweep 3 (reverse_kl, jsd, whose gradient needs the row's sums): the gradient.
The divergences and their gradients are kernels/_common.py's.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (MAX_START, check_kd_scalars, check_same_device, divergence_grad, divergence_sums,
                      divergence_terms, kd_outputs, load_row_target, on_device, online_lse, online_update,
                      to_grad_dtype)

# Largest power-of-two row held in one tile by the multi-row body; longer rows are chunked.
SMALL_C_MAX = 2048
# Elements per multi-row tile of the small-C body (a single row may be up to SMALL_C_MAX).
SMALL_TILE_ELEMS = 1024
# Elements per [BLOCK_K, BLOCK_C] tile of the chunked body.
TILE_ELEMS = 4096
MIXES = (0, 1)  # 0 'prob', 1 'logit'


@triton.jit
def _ens_chunk_terms(s_row, t_rows, cols, C, k_ok, w, w_on, max_q, log_z_q, max_t, shift_t, max_u, log_z_u,
                     inv_student_temp, inv_teacher_temp, beta, PROB_MIX: tl.constexpr, DIVERGENCE: tl.constexpr):
    """One chunk of a row after sweep 1: (s, p, q) and the divergence's (d, h), p the teachers' mixture."""
    col_ok = cols < C
    s = tl.load(s_row + cols, mask=col_ok, other=float("-inf")).to(tl.float32)
    log_q = (s * inv_student_temp - max_q) - log_z_q
    t = tl.load(t_rows + cols[None, :], mask=k_ok[:, None] & col_ok[None, :], other=float("-inf")).to(tl.float32)
    if PROB_MIX:
        # log(w_k p_k) per teacher; forward_kl takes the log of the summed mixture, the others (whose loss
        # weighs log p by q) a log-space sum, so that mixture probabilities that underflow keep their logs.
        log_wp = (t * inv_teacher_temp - max_t[:, None]) - shift_t[:, None]
        if DIVERGENCE == 0:
            p = tl.sum(tl.exp(log_wp), axis=0)
            log_p = tl.log(p)
        else:
            top = tl.max(log_wp, axis=0)
            top = tl.where(top == float("-inf"), 0.0, top)
            log_p = top + tl.log(tl.sum(tl.exp(log_wp - top[None, :]), axis=0))
            p = tl.exp(log_p)
    else:
        log_p = (tl.sum(tl.where(w_on[:, None], w[:, None] * t, 0.0), axis=0) * inv_teacher_temp - max_u) - log_z_u
        log_p = tl.where(col_ok, log_p, float("-inf"))
        p = tl.exp(log_p)
    q = tl.exp(log_q)
    d, h = divergence_terms(log_p, log_q, p, q, beta, DIVERGENCE)
    return s, p, q, d, h


@triton.jit
def _ens_store_grad_chunk(g_ptr, row, C, cols, kd_part, s, max_s, log_z_s, y_safe, valid, ce_coef,
                          HAS_TARGET: tl.constexpr, DO_CE: tl.constexpr, SOFT_BF16_ROUNDING: tl.constexpr):
    """Adds the CE gradient to a chunk's KD part, zeroes ignored rows, stores it in the grad's dtype."""
    g = kd_part
    if DO_CE:
        g += ce_coef * (tl.exp((s - max_s) - log_z_s) - tl.where(cols == y_safe, 1.0, 0.0))
    if HAS_TARGET:
        g = tl.where(valid, g, 0.0)
    tl.store(g_ptr + row * C + cols, to_grad_dtype(g, g_ptr, SOFT_BF16_ROUNDING), mask=cols < C)


@triton.jit
def _ens_kd_kernel(
    s_ptr, stride_sn, t_ptr, stride_tk, stride_tn, w_ptr, stride_wk, stride_wn, y_ptr, stride_y,
    loss_ptr, g_ptr, N, C, K, inv_student_temp, inv_teacher_temp, kd_coef, ce_coef, beta, ignore_index,
    DIVERGENCE: tl.constexpr, HAS_TARGET: tl.constexpr, PROB_MIX: tl.constexpr, DO_KL: tl.constexpr,
    DO_CE: tl.constexpr, COMPUTE_GRAD: tl.constexpr, SOFT_BF16_ROUNDING: tl.constexpr, CHUNKED: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
):
    neg_inf = float("-inf")
    kd_grad_coef = kd_coef * inv_student_temp
    if not CHUNKED:
        # BLOCK_N whole rows (BLOCK_C >= C) per program.
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_C)
        row_ok = rows < N
        col_ok = cols < C
        mask = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)
        s = tl.load(s_ptr + rows64[:, None] * stride_sn + cols[None, :], mask=mask, other=neg_inf).to(tl.float32)
        s_max = tl.max(s, axis=1)
        s_max = tl.where(s_max == neg_inf, 0.0, s_max)  # padding rows
        s_shifted = s - s_max[:, None]
        if HAS_TARGET:
            y = tl.load(y_ptr + rows64 * stride_y, mask=row_ok, other=ignore_index)
            valid = (y != ignore_index) & row_ok
        else:
            valid = row_ok
        loss = tl.zeros([BLOCK_N], dtype=tl.float32)
        g = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
        if DO_KL:
            log_q = s_shifted * inv_student_temp
            log_q = log_q - tl.log(tl.sum(tl.exp(log_q), axis=1))[:, None]
            if PROB_MIX:
                p = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
                # reverse_kl and jsd: per-element online log-sum-exp of log(w_k p_k) (see _ens_chunk_terms)
                log_p_max = tl.full([BLOCK_N, BLOCK_C], MAX_START, tl.float32)
                log_p_sum = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
            else:
                u = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
            for k in range(K):
                k64 = tl.full([], k, tl.int64)  # k * stride_tk passes 2^31 once K*N*C does
                w = tl.load(w_ptr + k64 * stride_wk + rows64 * stride_wn, mask=row_ok, other=0.0).to(tl.float32)
                t = tl.load(t_ptr + k64 * stride_tk + rows64[:, None] * stride_tn + cols[None, :], mask=mask,
                            other=neg_inf).to(tl.float32)
                if PROB_MIX:
                    t_max = tl.max(t, axis=1)
                    t_max = tl.where(t_max == neg_inf, 0.0, t_max)
                    e = tl.exp((t - t_max[:, None]) * inv_teacher_temp)
                    if DIVERGENCE == 0:
                        p += tl.where(w > 0, w / tl.sum(e, axis=1), 0.0)[:, None] * e
                    else:
                        log_coef = tl.where(w > 0, tl.log(w) - tl.log(tl.sum(e, axis=1)), neg_inf)
                        log_wp = (t - t_max[:, None]) * inv_teacher_temp + log_coef[:, None]
                        log_p_max, log_p_sum = online_update(log_p_max, log_p_sum, log_wp)
                else:
                    u += tl.where(w[:, None] > 0, w[:, None] * t, 0.0)
            if PROB_MIX:
                if DIVERGENCE == 0:
                    log_p = tl.log(p)
                else:
                    log_p = log_p_max + tl.log(log_p_sum)
                    p = tl.exp(log_p)
            else:
                u = tl.where(col_ok[None, :], u, neg_inf)
                u_max = tl.max(u, axis=1)
                u_max = tl.where(u_max == neg_inf, 0.0, u_max)
                log_p = (u - u_max[:, None]) * inv_teacher_temp
                log_p = log_p - tl.log(tl.sum(tl.exp(log_p), axis=1))[:, None]
                p = tl.exp(log_p)
            q = tl.exp(log_q)
            terms, h = divergence_terms(log_p, log_q, p, q, beta, DIVERGENCE)
            div, h_sum = divergence_sums(terms, h, 1, DIVERGENCE)
            loss += kd_coef * div
            if COMPUTE_GRAD:
                g += kd_grad_coef * divergence_grad(p, q, h, h_sum[:, None], DIVERGENCE)
        if DO_CE:
            lse = tl.log(tl.sum(tl.exp(s_shifted), axis=1))
            y_safe = tl.where(valid, y, 0)
            s_y = tl.sum(tl.where(cols[None, :] == y_safe[:, None], s_shifted, 0.0), axis=1)
            loss += ce_coef * (lse - s_y)
            if COMPUTE_GRAD:
                onehot = tl.where(cols[None, :] == y_safe[:, None], 1.0, 0.0)
                g += ce_coef * (tl.exp(s_shifted - lse[:, None]) - onehot)
        tl.store(loss_ptr + rows, tl.where(valid, loss, 0.0), mask=row_ok)
        if COMPUTE_GRAD:
            g = tl.where(valid[:, None], g, 0.0)
            tl.store(g_ptr + rows64[:, None] * C + cols[None, :], to_grad_dtype(g, g_ptr, SOFT_BF16_ROUNDING),
                     mask=mask)
    else:
        # One row per program, BLOCK_C columns at a time.
        row = tl.program_id(0).to(tl.int64)
        ks = tl.arange(0, BLOCK_K)
        k_ok = ks < K
        offs = tl.arange(0, BLOCK_C)
        s_row = s_ptr + row * stride_sn
        t_rows = t_ptr + ks[:, None].to(tl.int64) * stride_tk + row * stride_tn
        w = tl.load(w_ptr + ks.to(tl.int64) * stride_wk + row * stride_wn, mask=k_ok, other=0.0).to(tl.float32)
        w_on = k_ok & (w > 0)
        y, valid, _ = load_row_target(y_ptr, row, stride_y, ignore_index, C, HAS_TARGET)
        y_safe = tl.where(valid, y, 0)

        # Sweep 1: online max and sum-exp of s * inv_student_temp, of s, and of each tempered teacher
        # (prob) or of the tempered logit mixture.
        max_q = tl.full([], neg_inf, tl.float32)
        z_q = tl.zeros([], tl.float32)
        max_s = tl.full([], neg_inf, tl.float32)
        z_s = tl.zeros([], tl.float32)
        max_t = tl.full([BLOCK_K], neg_inf, tl.float32)
        z_t = tl.zeros([BLOCK_K], dtype=tl.float32)
        max_u = tl.full([], neg_inf, tl.float32)
        z_u = tl.zeros([], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + offs
            col_ok = cols < C
            s = tl.load(s_row + cols, mask=col_ok, other=neg_inf).to(tl.float32)
            if DO_KL:
                max_q, z_q = online_lse(max_q, z_q, s * inv_student_temp, 0)
                t = tl.load(t_rows + cols[None, :], mask=k_ok[:, None] & col_ok[None, :],
                            other=neg_inf).to(tl.float32)
                if PROB_MIX:
                    max_t, z_t = online_lse(max_t, z_t, t * inv_teacher_temp, 1)
                else:
                    x = tl.sum(tl.where(w_on[:, None], w[:, None] * t, 0.0), axis=0) * inv_teacher_temp
                    max_u, z_u = online_lse(max_u, z_u, tl.where(col_ok, x, neg_inf), 0)
            if DO_CE:
                max_s, z_s = online_lse(max_s, z_s, s, 0)
        # Maxima are subtracted before the small log-sums so that 1e4-sized logits keep their precision.
        log_z_q = tl.log(z_q)
        log_z_s = tl.log(z_s)
        # log(w_k p_k,c) = (t_k,c * inv_teacher_temp - max_k) - shift_k; zero-weight and padding teachers: -inf.
        max_t = tl.where(w_on, max_t, 0.0)
        shift_t = tl.where(w_on, tl.log(z_t) - tl.log(tl.where(w_on, w, 1.0)), float("inf"))
        log_z_u = tl.log(z_u)

        # Sweep 2: the divergence sums (and forward_kl's gradient), the target's logit. Sweep 3 (reverse_kl
        # and jsd with a gradient): their gradient needs the row's sums first.
        div_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        h_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        h_sum = 0.0
        s_y = 0.0
        for sweep in tl.static_range(2):
            if sweep == 0 or (COMPUTE_GRAD and DIVERGENCE != 0 and DO_KL):
                for c0 in range(0, C, BLOCK_C):
                    cols = c0 + offs
                    if DO_KL:
                        s, p, q, terms, h = _ens_chunk_terms(s_row, t_rows, cols, C, k_ok, w, w_on, max_q, log_z_q,
                                                             max_t, shift_t, max_u, log_z_u, inv_student_temp,
                                                             inv_teacher_temp, beta, PROB_MIX, DIVERGENCE)
                        kd_part = kd_grad_coef * divergence_grad(p, q, h, h_sum, DIVERGENCE)
                    else:
                        s = tl.load(s_row + cols, mask=cols < C, other=neg_inf).to(tl.float32)
                        kd_part = tl.zeros([BLOCK_C], dtype=tl.float32)
                    if sweep == 0:
                        if DO_KL:
                            div_acc += terms
                            if DIVERGENCE == 2:
                                h_acc += h
                        if DO_CE:
                            s_y += tl.sum(tl.where(cols == y_safe, s, 0.0), axis=0)
                    if COMPUTE_GRAD and (sweep == 1 or DIVERGENCE == 0 or not DO_KL):
                        _ens_store_grad_chunk(g_ptr, row, C, cols, kd_part, s, max_s, log_z_s, y_safe, valid,
                                              ce_coef, HAS_TARGET, DO_CE, SOFT_BF16_ROUNDING)
                if sweep == 0:
                    div, h_sum = divergence_sums(div_acc, h_acc, 0, DIVERGENCE)
        loss = 0.0
        if DO_KL:
            loss += kd_coef * div
        if DO_CE:
            loss += ce_coef * (log_z_s + (max_s - s_y))
        if HAS_TARGET:
            loss = tl.where(valid, loss, 0.0)
        tl.store(loss_ptr + row, loss)


def _check(student, teachers, weights, target, inv_student_temp, inv_teacher_temp, divergence, beta, mix):
    op = "ensemble_kd_loss_fwd"
    if student.dim() != 2 or teachers.dim() != 3 or teachers.shape[1:] != student.shape:
        raise ValueError(f"{op}: student must be [N, C] and teachers [K, N, C], got shapes {tuple(student.shape)} "
                         f"and {tuple(teachers.shape)}")
    if weights.shape != teachers.shape[:2]:
        raise ValueError(f"{op}: weights must be [K, N] = {tuple(teachers.shape[:2])}, got {tuple(weights.shape)}")
    c = student.shape[1]
    if c > 1 and (student.stride(1) != 1 or teachers.stride(2) != 1):
        raise ValueError(f"{op}: student and teachers need unit stride along classes, got "
                         f"strides {tuple(student.stride())} and {tuple(teachers.stride())}")
    if target is not None and (target.dtype != torch.int64 or target.shape != (student.shape[0],)):
        raise ValueError(f"{op}: target must be int64 [{student.shape[0]}], got {target.dtype} {tuple(target.shape)}")
    check_same_device(op, student, teachers=teachers, weights=weights, target=target)
    check_kd_scalars(op, inv_student_temp, inv_teacher_temp, divergence, beta)
    if mix not in MIXES:
        raise ValueError(f"{op}: mix must be 0 (prob) or 1 (logit), got {mix!r}")


def ensemble_kd_loss_fwd(student: torch.Tensor, teachers: torch.Tensor, weights: torch.Tensor,
                         target: torch.Tensor | None, inv_student_temp: float, inv_teacher_temp: float,
                         kd_coef: float, ce_coef: float, divergence: int, beta: float, ignore_index: int,
                         mix: int, compute_grad: bool, *, block_c: int | None = None):
    """The kernel contract's ensemble_kd_loss_fwd; teachers [K, N, C] (any strides with unit class stride),
    weights [K, N] normalized, target [N] (any stride) or None.

    block_c forces the chunked body with that chunk width (tests use it to cover several chunks).
    """
    _check(student, teachers, weights, target, inv_student_temp, inv_teacher_temp, divergence, beta, mix)
    n, c = student.shape
    k = teachers.shape[0]
    row_loss, grad = kd_outputs(student, compute_grad)
    if n == 0:
        return row_loss, grad
    has_target = target is not None
    kd_coef = float(kd_coef)
    ce_coef = float(ce_coef) if has_target else 0.0
    y = target if has_target else row_loss  # dummy pointer, never read
    stride_y = target.stride(0) if has_target else 0
    common = dict(DIVERGENCE=int(divergence), HAS_TARGET=has_target, PROB_MIX=mix == 0, DO_KL=kd_coef != 0.0,
                  DO_CE=ce_coef != 0.0, COMPUTE_GRAD=bool(compute_grad),
                  SOFT_BF16_ROUNDING=student.dtype == torch.bfloat16 and student.device.type == "cpu")
    args = (student, student.stride(0), teachers, teachers.stride(0), teachers.stride(1), weights,
            weights.stride(0), weights.stride(1), y, stride_y, row_loss, grad, n, c, k, float(inv_student_temp),
            float(inv_teacher_temp), kd_coef, ce_coef, float(beta), int(ignore_index))
    with on_device(student):
        _launch(args, common, n, k, triton.next_power_of_2(c), block_c)
    return row_loss, grad


def _launch(args, common, n, k, block_full, block_c):
    if block_c is None and block_full <= SMALL_C_MAX:
        # Multi-row tiles of at most SMALL_TILE_ELEMS on 8 warps (4 elements per thread and array):
        # 64 x 16 on 4 warps and 16 x 128 on 8 warps spilled on sm_90 (.ci/check_triton.py).
        block_n = max(1, min(64, SMALL_TILE_ELEMS // block_full, triton.next_power_of_2(n)))
        num_warps = 4 if block_n * block_full < 1024 else 8
        _ens_kd_kernel[(triton.cdiv(n, block_n),)](
            *args, **common, CHUNKED=False, BLOCK_N=block_n, BLOCK_K=1, BLOCK_C=block_full, num_warps=num_warps)
    else:
        block_k = triton.next_power_of_2(k)
        chunk = block_c or max(128, min(2048, TILE_ELEMS // block_k))
        _ens_kd_kernel[(n,)](*args, **common, CHUNKED=True, BLOCK_N=1, BLOCK_K=block_k, BLOCK_C=chunk, num_warps=8)
