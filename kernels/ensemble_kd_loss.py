"""Triton kernels of ensemble_kd_loss (contract: ued_fast/ops/ensemble_kd_loss.py).

Two kernels, math in fp32 registers, no [N, C] or [K, N, C] target tensor written:
- small C (the whole row fits one tile): several rows per program; a loop over the K teachers
  reads each teacher tile once and accumulates the mixture in registers.
- large C: one row per program; teachers are read as [BLOCK_K, BLOCK_C] tiles (all K teachers of a
  column chunk at once). Sweep 1: online max / sum-exp per teacher (or of the logit mixture) and of
  the student; sweep 2: the mixture, KL and gradient chunk by chunk.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

# Largest power-of-two row held in one tile by the multi-row kernel; longer rows are chunked.
SMALL_C_MAX = 2048
# Elements per multi-row tile of the small-C kernel (a single row may be up to SMALL_C_MAX).
SMALL_TILE_ELEMS = 1024
# Elements per [BLOCK_K, BLOCK_C] tile of the chunked kernel.
TILE_ELEMS = 4096


@triton.jit
def _ens_kd_small_c_kernel(
    s_ptr, stride_sn, t_ptr, stride_tk, stride_tn, w_ptr, stride_wk, stride_wn, y_ptr, stride_y,
    loss_ptr, g_ptr, N, C, K, inv_t, kl_w, ce_w, ignore_index,
    HAS_TARGET: tl.constexpr, PROB_MIX: tl.constexpr, DO_KL: tl.constexpr, DO_CE: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < N
    col_ok = cols < C
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)

    s = tl.load(s_ptr + rows64[:, None] * stride_sn + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
    s_max = tl.max(s, axis=1)
    s_max = tl.where(s_max == float("-inf"), 0.0, s_max)  # padding rows
    d = s - s_max[:, None]
    if HAS_TARGET:
        y = tl.load(y_ptr + rows64 * stride_y, mask=row_ok, other=ignore_index)
        valid = (y != ignore_index) & row_ok
    else:
        valid = row_ok
    loss = tl.zeros([BLOCK_N], dtype=tl.float32)
    g = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    if DO_KL:
        log_q = d * inv_t
        log_q = log_q - tl.log(tl.sum(tl.exp(log_q), axis=1))[:, None]
        if PROB_MIX:
            p = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
        else:
            u = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
        for k in range(K):
            k64 = tl.full([], k, tl.int64)  # k * stride_tk passes 2^31 once K*N*C does
            w = tl.load(w_ptr + k64 * stride_wk + rows64 * stride_wn, mask=row_ok, other=0.0).to(tl.float32)
            t = tl.load(t_ptr + k64 * stride_tk + rows64[:, None] * stride_tn + cols[None, :], mask=mask,
                        other=float("-inf")).to(tl.float32)
            if PROB_MIX:
                t_max = tl.max(t, axis=1)
                t_max = tl.where(t_max == float("-inf"), 0.0, t_max)
                e = tl.exp((t - t_max[:, None]) * inv_t)
                coef = tl.where(w > 0, w / tl.sum(e, axis=1), 0.0)
                p += coef[:, None] * e
            else:
                u += tl.where(w[:, None] > 0, w[:, None] * t, 0.0)
        if PROB_MIX:
            log_p = tl.log(p)
        else:
            u = tl.where(col_ok[None, :], u, float("-inf"))
            u_max = tl.max(u, axis=1)
            u_max = tl.where(u_max == float("-inf"), 0.0, u_max)
            log_p = (u - u_max[:, None]) * inv_t
            log_p = log_p - tl.log(tl.sum(tl.exp(log_p), axis=1))[:, None]
            p = tl.exp(log_p)
        kl = tl.sum(tl.where(p != 0, p * (log_p - log_q), 0.0), axis=1)
        loss += kl_w * kl
        if COMPUTE_GRAD:
            g += (kl_w * inv_t) * (tl.exp(log_q) - p)
    if DO_CE:
        lse = tl.log(tl.sum(tl.exp(d), axis=1))
        y_safe = tl.where(valid, y, 0)
        s_y = tl.sum(tl.where(cols[None, :] == y_safe[:, None], d, 0.0), axis=1)
        loss += ce_w * (lse - s_y)
        if COMPUTE_GRAD:
            onehot = tl.where(cols[None, :] == y_safe[:, None], 1.0, 0.0)
            g += ce_w * (tl.exp(d - lse[:, None]) - onehot)
    tl.store(loss_ptr + rows, tl.where(valid, loss, 0.0), mask=row_ok)
    if COMPUTE_GRAD:
        g = tl.where(valid[:, None], g, 0.0)
        tl.store(g_ptr + rows64[:, None] * C + cols[None, :], g.to(g_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ens_kd_chunked_kernel(
    s_ptr, stride_sn, t_ptr, stride_tk, stride_tn, w_ptr, stride_wk, stride_wn, y_ptr, stride_y,
    loss_ptr, g_ptr, N, C, K, inv_t, kl_w, ce_w, ignore_index,
    HAS_TARGET: tl.constexpr, PROB_MIX: tl.constexpr, DO_KL: tl.constexpr, DO_CE: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    k_ok = ks < K
    offs = tl.arange(0, BLOCK_C)
    s_row = s_ptr + row * stride_sn
    t_rows = t_ptr + ks[:, None].to(tl.int64) * stride_tk + row * stride_tn
    w = tl.load(w_ptr + ks.to(tl.int64) * stride_wk + row * stride_wn, mask=k_ok, other=0.0).to(tl.float32)
    w_on = k_ok & (w > 0)
    if HAS_TARGET:
        y = tl.load(y_ptr + row * stride_y)
        valid = y != ignore_index
    neg_inf = float("-inf")

    # Sweep 1: online max and sum-exp of s/T, of s, and of each teacher (prob) or the logit mixture.
    mq = neg_inf
    zq = 0.0
    ms = neg_inf
    zs = 0.0
    mt = tl.full([BLOCK_K], neg_inf, tl.float32)
    zt = tl.zeros([BLOCK_K], dtype=tl.float32)
    mu = neg_inf
    zu = 0.0
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + offs
        col_ok = cols < C
        s = tl.load(s_row + cols, mask=col_ok, other=neg_inf).to(tl.float32)
        if DO_KL:
            x = s * inv_t
            m_new = tl.maximum(mq, tl.max(x, axis=0))
            m_safe = tl.where(m_new == neg_inf, 0.0, m_new)
            zq = zq * tl.exp(mq - m_safe) + tl.sum(tl.exp(x - m_safe), axis=0)
            mq = m_new
            t = tl.load(t_rows + cols[None, :], mask=k_ok[:, None] & col_ok[None, :], other=neg_inf).to(tl.float32)
            if PROB_MIX:
                x = t * inv_t
                m_new = tl.maximum(mt, tl.max(x, axis=1))
                m_safe = tl.where(m_new == neg_inf, 0.0, m_new)
                zt = zt * tl.exp(mt - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), axis=1)
                mt = m_new
            else:
                x = tl.sum(tl.where(w_on[:, None], w[:, None] * t, 0.0), axis=0) * inv_t
                x = tl.where(col_ok, x, neg_inf)
                m_new = tl.maximum(mu, tl.max(x, axis=0))
                m_safe = tl.where(m_new == neg_inf, 0.0, m_new)
                zu = zu * tl.exp(mu - m_safe) + tl.sum(tl.exp(x - m_safe), axis=0)
                mu = m_new
        if DO_CE:
            m_new = tl.maximum(ms, tl.max(s, axis=0))
            m_safe = tl.where(m_new == neg_inf, 0.0, m_new)
            zs = zs * tl.exp(ms - m_safe) + tl.sum(tl.exp(s - m_safe), axis=0)
            ms = m_new
    # Maxima are subtracted before the small log-sums so that 1e4-sized logits keep their precision.
    log_zq = tl.log(zq)
    log_zs = tl.log(zs)
    # log(w_k p_k,c) = (t_k,c / T - max_k) - shift_k; zero-weight and padding teachers get -inf.
    mt = tl.where(w_on, mt, 0.0)
    shift_t = tl.where(w_on, tl.log(zt) - tl.log(tl.where(w_on, w, 1.0)), float("inf"))
    log_zu = tl.log(zu)

    # Sweep 2: mixture, KL(p || q) with 0 log 0 = 0, gradient.
    kl_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    s_y = 0.0
    if HAS_TARGET:
        y_safe = tl.where(valid, y, 0)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + offs
        col_ok = cols < C
        s = tl.load(s_row + cols, mask=col_ok, other=neg_inf).to(tl.float32)
        g = tl.zeros([BLOCK_C], dtype=tl.float32)
        if DO_KL:
            log_q = (s * inv_t - mq) - log_zq
            t = tl.load(t_rows + cols[None, :], mask=k_ok[:, None] & col_ok[None, :], other=neg_inf).to(tl.float32)
            if PROB_MIX:
                p = tl.sum(tl.exp((t * inv_t - mt[:, None]) - shift_t[:, None]), axis=0)
                log_p = tl.log(p)
            else:
                log_p = (tl.sum(tl.where(w_on[:, None], w[:, None] * t, 0.0), axis=0) * inv_t - mu) - log_zu
                log_p = tl.where(col_ok, log_p, neg_inf)
                p = tl.exp(log_p)
            kl_acc += tl.where(p != 0, p * (log_p - log_q), 0.0)
            if COMPUTE_GRAD:
                g += (kl_w * inv_t) * (tl.exp(log_q) - p)
        if DO_CE:
            onehot = cols == y_safe
            s_y += tl.sum(tl.where(onehot, s, 0.0), axis=0)
            if COMPUTE_GRAD:
                g += ce_w * (tl.exp((s - ms) - log_zs) - tl.where(onehot, 1.0, 0.0))
        if COMPUTE_GRAD:
            if HAS_TARGET:
                g = tl.where(valid, g, 0.0)
            tl.store(g_ptr + row * C + cols, g.to(g_ptr.dtype.element_ty), mask=col_ok)
    loss = 0.0
    if DO_KL:
        loss += kl_w * tl.sum(kl_acc, axis=0)
    if DO_CE:
        loss += ce_w * (log_zs + (ms - s_y))
    if HAS_TARGET:
        loss = tl.where(valid, loss, 0.0)
    tl.store(loss_ptr + row, loss)


def ensemble_kd_loss_fwd(student: torch.Tensor, teachers: torch.Tensor, weights: torch.Tensor,
                         target: torch.Tensor | None, temperature: float, alpha: float, t2_scale: bool,
                         ignore_index: int, mix: int, compute_grad: bool, *, block_c: int | None = None):
    """teachers [K, N, C] (any strides with unit class stride), weights [K, N] normalized, target [N]
    (any stride).

    block_c forces the chunked kernel with that chunk width (tests use it to cover several chunks).
    """
    n, c = student.shape
    k = teachers.shape[0]
    if c > 1 and (student.stride(1) != 1 or teachers.stride(2) != 1):
        raise ValueError(f"ensemble_kd_loss_fwd: student and teachers need unit stride along classes, got "
                         f"strides {tuple(student.stride())} and {tuple(teachers.stride())}")
    row_loss = torch.empty(n, dtype=torch.float32, device=student.device)
    grad = torch.empty((n, c) if compute_grad else (0,), dtype=student.dtype, device=student.device)
    if n == 0:
        return row_loss, grad
    s2 = temperature * temperature if t2_scale else 1.0
    has_target = target is not None
    kl_w = alpha * s2 if has_target else s2
    ce_w = (1.0 - alpha) if has_target else 0.0
    y = target if has_target else row_loss  # dummy pointer, never read
    stride_y = target.stride(0) if has_target else 0
    common = dict(HAS_TARGET=has_target, PROB_MIX=mix == 0, DO_KL=kl_w != 0.0, DO_CE=ce_w != 0.0,
                  COMPUTE_GRAD=compute_grad)
    args = (student, student.stride(0), teachers, teachers.stride(0), teachers.stride(1), weights,
            weights.stride(0), weights.stride(1), y, stride_y, row_loss, grad, n, c, k, 1.0 / temperature, kl_w, ce_w,
            ignore_index)
    block_full = triton.next_power_of_2(c)
    # Launch on the inputs' GPU (not the current one): a tensor on cuda:1 runs on cuda:1.
    with torch.cuda.device(student.device) if student.device.type == "cuda" else contextlib.nullcontext():
        _launch(args, common, n, k, block_full, block_c)
    return row_loss, grad


def _launch(args, common, n, k, block_full, block_c):
    if block_c is None and block_full <= SMALL_C_MAX:
        # Multi-row tiles of at most SMALL_TILE_ELEMS on 8 warps (4 elements per thread and array):
        # 64 x 16 on 4 warps and 16 x 128 on 8 warps spilled on sm_90 (.ci/check_triton.py).
        block_n = max(1, min(64, SMALL_TILE_ELEMS // block_full, triton.next_power_of_2(n)))
        num_warps = 4 if block_n * block_full < 1024 else 8
        _ens_kd_small_c_kernel[(triton.cdiv(n, block_n),)](
            *args, **common, BLOCK_N=block_n, BLOCK_C=block_full, num_warps=num_warps)
    else:
        block_k = triton.next_power_of_2(k)
        chunk = block_c or max(128, min(2048, TILE_ELEMS // block_k))
        _ens_kd_chunked_kernel[(n,)](*args, **common, BLOCK_K=block_k, BLOCK_C=chunk, num_warps=8)
