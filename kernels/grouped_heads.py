"""Triton kernels of grouped_heads (DESIGN 2.3; contract in ued_fast/ops/grouped_heads.py).

Features are read through their [K, N, D] view (for [N, K*D] that is a strided view, no copy).
- logit_mean forward: ONE kernel, tl.dot tiles over N x C; for each head k covering a class of the
  tile, the weight columns of those classes are gathered (slot_of) and accumulated, so a tile reads
  only its covering heads' columns; bias and the 1/count(c) scale are fused.
- prob_mean forward: the K head GEMMs (tl.dot tiles, u [K, N, W] in float32, kept for backward),
  then one program per row does the log-space assembly.
- backward: one program per row turns grad_out into gu [K, N, W] (the gradient of every head
  output, 0 on padding), then tl.dot kernels give grad_features (gu @ W^T) and grad_weight
  (h^T @ gu) with grad_bias (sum of gu) fused into the latter.
Accumulation in float32 everywhere; tl.dot runs with input_precision="ieee" (no tf32).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOGIT_MEAN, PROB_MEAN = 0, 1


def _pow2(x: int, lo: int = 16, hi: int | None = None) -> int:
    p = max(lo, triton.next_power_of_2(max(int(x), 1)))
    return min(p, hi) if hi is not None else p


@triton.jit
def _logit_mean_fwd_kernel(
    h_ptr, w_ptr, b_ptr, slot_ptr, cptr_ptr, out_ptr,
    N, D, C, K,
    s_hk, s_hn, s_hd, s_wk, s_wd, s_ww, s_bk, s_bw, s_on, s_oc,
    DOT_DTYPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    mask_c = offs_c < C
    acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    for k in range(0, K):
        slots = tl.load(slot_ptr + k * C + offs_c, mask=mask_c, other=-1)
        covered = slots >= 0
        if tl.max(covered.to(tl.int32), axis=0) > 0:  # head k holds a class of this tile
            safe_slots = tl.where(covered, slots, 0)
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + offs_d
                mask_d = dd < D
                h = tl.load(h_ptr + k * s_hk + offs_n[:, None] * s_hn + dd[None, :] * s_hd,
                            mask=mask_n[:, None] & mask_d[None, :], other=0.0)
                w = tl.load(w_ptr + k * s_wk + dd[:, None] * s_wd + safe_slots[None, :] * s_ww,
                            mask=mask_d[:, None] & covered[None, :], other=0.0)
                acc = tl.dot(h.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision="ieee")
            b = tl.load(b_ptr + k * s_bk + safe_slots * s_bw, mask=covered, other=0.0)
            acc += b.to(tl.float32)[None, :]
    count = tl.load(cptr_ptr + offs_c + 1, mask=mask_c, other=1) - tl.load(cptr_ptr + offs_c, mask=mask_c, other=0)
    z = acc / count.to(tl.float32)[None, :]
    tl.store(out_ptr + offs_n[:, None] * s_on + offs_c[None, :] * s_oc, z.to(out_ptr.dtype.element_ty),
             mask=mask_n[:, None] & mask_c[None, :])


@triton.jit
def _head_gemm_kernel(
    h_ptr, w_ptr, b_ptr, u_ptr,
    N, D, W,
    s_hk, s_hn, s_hd, s_wk, s_wd, s_ww, s_bk, s_bw,
    DOT_DTYPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """u[k, n, w] = h_k[n] . W_k[:, w] + b_k[w], float32 [K, N, W] contiguous."""
    pid_n = tl.program_id(0)
    pid_w = tl.program_id(1)
    k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    mask_w = offs_w < W
    acc = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        mask_d = dd < D
        h = tl.load(h_ptr + k * s_hk + offs_n[:, None] * s_hn + dd[None, :] * s_hd,
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        w = tl.load(w_ptr + k * s_wk + dd[:, None] * s_wd + offs_w[None, :] * s_ww,
                    mask=mask_d[:, None] & mask_w[None, :], other=0.0)
        acc = tl.dot(h.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision="ieee")
    b = tl.load(b_ptr + k * s_bk + offs_w * s_bw, mask=mask_w, other=0.0)
    acc += b.to(tl.float32)[None, :]
    tl.store(u_ptr + (k * N + offs_n[:, None]) * W + offs_w[None, :], acc,
             mask=mask_n[:, None] & mask_w[None, :])


@triton.jit
def _head_lse(u_ptr, size_ptr, lse_ptr, n, N, W, K, BLOCK_K: tl.constexpr, BLOCK_W: tl.constexpr):
    """Row n: u tile [BLOCK_K, BLOCK_W] (-inf off the real outputs j <= |S_k|), log q tile and
    each head's logsumexp, which is also written to lse_ptr[n, k] for the class gathers."""
    offs_k = tl.arange(0, BLOCK_K)
    offs_w = tl.arange(0, BLOCK_W)
    mask_k = offs_k < K
    size = tl.load(size_ptr + offs_k, mask=mask_k, other=0)
    real = mask_k[:, None] & (offs_w[None, :] <= size[:, None]) & (offs_w[None, :] < W)
    u = tl.load(u_ptr + (offs_k[:, None] * N + n) * W + offs_w[None, :], mask=real, other=float("-inf"))
    mx = tl.max(u, axis=1)
    mx = tl.where(mask_k, mx, 0.0)
    lse = mx + tl.log(tl.sum(tl.exp(u - mx[:, None]), axis=1))
    lse = tl.where(mask_k, lse, 0.0)
    tl.store(lse_ptr + n * K + offs_k, lse, mask=mask_k)
    return u - lse[:, None], real, size


@triton.jit
def _class_log_r(u_ptr, lse_ptr, cptr_ptr, entries_ptr, n, N, W, K, c, mask_c, BLOCK_E: tl.constexpr):
    """log sum over the head outputs holding class c of q (any shape of c); -inf where not mask_c."""
    p0 = tl.load(cptr_ptr + c, mask=mask_c, other=0)
    count = tl.load(cptr_ptr + c + 1, mask=mask_c, other=0) - p0
    offs_e = tl.arange(0, BLOCK_E)
    e_mask = offs_e < tl.expand_dims(count, -1)
    kj = tl.load(entries_ptr + tl.expand_dims(p0, -1) + offs_e, mask=e_mask, other=0)
    kh = kj // W
    uv = tl.load(u_ptr + (kh * N + n) * W + (kj - kh * W), mask=e_mask, other=float("-inf"))
    lv = tl.load(lse_ptr + n * K + kh, mask=e_mask, other=0.0)
    lq = uv - lv
    mx = tl.max(lq, axis=-1)
    mx = tl.where(mask_c, mx, 0.0)
    total = mx + tl.log(tl.sum(tl.exp(lq - tl.expand_dims(mx, -1)), axis=-1))
    return tl.where(mask_c, total, float("-inf")), count


@triton.jit
def _prob_mean_fwd_kernel(
    u_ptr, size_ptr, cptr_ptr, entries_ptr, lse_ptr, out_ptr,
    N, W, K, C, s_on, s_oc,
    BLOCK_K: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr,
):
    n = tl.program_id(0)
    _head_lse(u_ptr, size_ptr, lse_ptr, n, N, W, K, BLOCK_K, BLOCK_W)
    tl.debug_barrier()  # the class gathers read lse_ptr[n, :] written by other threads
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    total, count = _class_log_r(u_ptr, lse_ptr, cptr_ptr, entries_ptr, n, N, W, K, offs_c, mask_c, BLOCK_E)
    log_r = tl.where(mask_c, total - tl.log(tl.maximum(count, 1).to(tl.float32)), float("-inf"))
    mx = tl.max(log_r, axis=0)
    z = mx + tl.log(tl.sum(tl.exp(log_r - mx), axis=0))
    tl.store(out_ptr + n * s_on + offs_c * s_oc, (log_r - z).to(out_ptr.dtype.element_ty), mask=mask_c)


@triton.jit
def _grad_heads_kernel(
    g_ptr, u_ptr, size_ptr, index_ptr, cptr_ptr, entries_ptr, lse_ptr, gu_ptr,
    N, W, K, C, s_gn, s_gc,
    MODE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """Row n: gu[k, n, j] = d(sum_c g[n, c] out[n, c]) / d u[k, n, j], 0 on padding."""
    n = tl.program_id(0)
    offs_k = tl.arange(0, BLOCK_K)
    offs_w = tl.arange(0, BLOCK_W)
    mask_k = offs_k < K
    in_tile = mask_k[:, None] & (offs_w[None, :] < W)
    cls = tl.load(index_ptr + offs_k[:, None] * W + offs_w[None, :], mask=in_tile, other=-1)
    holds = cls >= 0
    safe_cls = tl.where(holds, cls, 0)
    g_cls = tl.load(g_ptr + n * s_gn + safe_cls * s_gc, mask=holds, other=0.0).to(tl.float32)
    count_cls = (tl.load(cptr_ptr + safe_cls + 1, mask=holds, other=1)
                 - tl.load(cptr_ptr + safe_cls, mask=holds, other=0)).to(tl.float32)
    if MODE == 0:
        gu = tl.where(holds, g_cls / count_cls, 0.0)
    else:
        lq, real, size = _head_lse(u_ptr, size_ptr, lse_ptr, n, N, W, K, BLOCK_K, BLOCK_W)
        tl.debug_barrier()
        offs_c = tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        total, count = _class_log_r(u_ptr, lse_ptr, cptr_ptr, entries_ptr, n, N, W, K, offs_c, mask_c, BLOCK_E)
        log_r = tl.where(mask_c, total - tl.log(tl.maximum(count, 1).to(tl.float32)), float("-inf"))
        mx = tl.max(log_r, axis=0)
        z = mx + tl.log(tl.sum(tl.exp(log_r - mx), axis=0))
        g_sum = tl.sum(tl.load(g_ptr + n * s_gn + offs_c * s_gc, mask=mask_c, other=0.0).to(tl.float32), axis=0)
        # Per head output (k, j) of class c: d out / d lq_kj = (g_c - P_c * sum g) * q_kj / sum of
        # the covering q's, where P = exp(out); lq = u - lse_k gives gu = glq - q * sum_j glq.
        total_cls, _ = _class_log_r(u_ptr, lse_ptr, cptr_ptr, entries_ptr, n, N, W, K, safe_cls, holds, BLOCK_E)
        log_r_cls = total_cls - tl.log(count_cls)
        g_lr = g_cls - tl.exp(log_r_cls - z) * g_sum
        glq = tl.where(holds, g_lr * tl.exp(lq - total_cls), 0.0)
        s = tl.sum(glq, axis=1)
        gu = tl.where(real, glq - tl.exp(lq) * s[:, None], 0.0)
    tl.store(gu_ptr + (offs_k[:, None] * N + n) * W + offs_w[None, :], gu, mask=in_tile)


@triton.jit
def _grad_features_kernel(
    gu_ptr, w_ptr, size_ptr, gh_ptr,
    N, D, W,
    s_wk, s_wd, s_ww, s_gk, s_gn, s_gd,
    EXTRA: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """grad_h[k, n, d] = sum over real outputs j of gu[k, n, j] * W[k, d, j] (padding never read)."""
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_w = tl.arange(0, BLOCK_W)
    mask_n = offs_n < N
    mask_d = offs_d < D
    real_width = tl.load(size_ptr + k) + EXTRA
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for w0 in range(0, W, BLOCK_W):
        ww = w0 + offs_w
        mask_w = ww < real_width
        gu = tl.load(gu_ptr + (k * N + offs_n[:, None]) * W + ww[None, :],
                     mask=mask_n[:, None] & mask_w[None, :], other=0.0)
        wt = tl.load(w_ptr + k * s_wk + offs_d[None, :] * s_wd + ww[:, None] * s_ww,
                     mask=mask_w[:, None] & mask_d[None, :], other=0.0)
        acc = tl.dot(gu.to(DOT_DTYPE), wt.to(DOT_DTYPE), acc, input_precision="ieee")
    tl.store(gh_ptr + k * s_gk + offs_n[:, None] * s_gn + offs_d[None, :] * s_gd,
             acc.to(gh_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_d[None, :])


@triton.jit
def _grad_params_kernel(
    h_ptr, gu_ptr, gw_ptr, gb_ptr,
    N, D, W,
    s_hk, s_hn, s_hd,
    DOT_DTYPE: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """grad_W[k, d, j] = sum_n h[k, n, d] gu[k, n, j]; the pid_d == 0 programs also write
    grad_b[k, j] = sum_n gu[k, n, j]. Both contiguous."""
    pid_d = tl.program_id(0)
    pid_w = tl.program_id(1)
    k = tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_w = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < D
    mask_w = offs_w < W
    acc = tl.zeros((BLOCK_D, BLOCK_W), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_W,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        nn_ = n0 + offs_n
        mask_n = nn_ < N
        ht = tl.load(h_ptr + k * s_hk + offs_d[:, None] * s_hd + nn_[None, :] * s_hn,
                     mask=mask_d[:, None] & mask_n[None, :], other=0.0)
        gu = tl.load(gu_ptr + (k * N + nn_[:, None]) * W + offs_w[None, :],
                     mask=mask_n[:, None] & mask_w[None, :], other=0.0)
        acc = tl.dot(ht.to(DOT_DTYPE), gu.to(DOT_DTYPE), acc, input_precision="ieee")
        acc_b += tl.sum(gu, axis=0)
    tl.store(gw_ptr + (k * D + offs_d[:, None]) * W + offs_w[None, :], acc.to(gw_ptr.dtype.element_ty),
             mask=mask_d[:, None] & mask_w[None, :])
    if pid_d == 0:
        tl.store(gb_ptr + k * W + offs_w, acc_b.to(gb_ptr.dtype.element_ty), mask=mask_w)


def _heads_view(features: torch.Tensor, k: int, d: int) -> torch.Tensor:
    return features if features.dim() == 3 else features.unflatten(1, (k, d)).transpose(0, 1)


def _dot_dtype(dtype: torch.dtype):
    # 16-bit inputs: tensor-core dots on 16-bit operands, float32 accumulation; float32 stays exact.
    # The CPU interpreter (triton 3.9) computes bfloat16 tl.dot wrongly: upcast there.
    if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        return tl.float32
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}.get(dtype, tl.float32)


def _head_gemm(hv, weight, bias):
    k, d, w = weight.shape
    n = hv.shape[1]
    u = torch.empty((k, n, w), device=hv.device, dtype=torch.float32)
    bn, bw, bd = 64, _pow2(w, hi=64), _pow2(d, hi=64)
    _head_gemm_kernel[(triton.cdiv(n, bn), triton.cdiv(w, bw), k)](
        hv, weight, bias, u, n, d, w, *hv.stride(), *weight.stride(), *bias.stride(),
        DOT_DTYPE=_dot_dtype(hv.dtype), BLOCK_N=bn, BLOCK_W=bw, BLOCK_D=bd)
    return u


def _row_blocks(k: int, w: int, c: int, max_count: int):
    return dict(BLOCK_K=_pow2(k, lo=2), BLOCK_W=_pow2(w, lo=2), BLOCK_C=_pow2(c, lo=2),
                BLOCK_E=_pow2(max_count, lo=2))


def grouped_heads_fwd(features, weight, bias, tables, mode: int):
    k, d, w = weight.shape
    hv = _heads_view(features, k, d)
    n, c = hv.shape[1], tables.num_classes
    out = torch.empty((n, c), device=features.device, dtype=features.dtype)
    if mode == LOGIT_MEAN:
        bn, bc, bd = 64, _pow2(c, hi=64), _pow2(d, hi=64)
        _logit_mean_fwd_kernel[(triton.cdiv(n, bn), triton.cdiv(c, bc))](
            hv, weight, bias, tables.slot_of, tables.class_ptr, out, n, d, c, k,
            *hv.stride(), *weight.stride(), *bias.stride(), *out.stride(),
            DOT_DTYPE=_dot_dtype(features.dtype), BLOCK_N=bn, BLOCK_C=bc, BLOCK_D=bd)
        return out, torch.empty((0,), device=features.device, dtype=torch.float32)
    u = _head_gemm(hv, weight, bias)
    lse = torch.empty((n, k), device=features.device, dtype=torch.float32)
    _prob_mean_fwd_kernel[(n,)](
        u, tables.sizes, tables.class_ptr, tables.class_entries, lse, out, n, w, k, c, *out.stride(),
        **_row_blocks(k, w, c, tables.max_count))
    return out, u


def grouped_heads_bwd(grad_out, features, weight, saved, tables, mode: int, need_features: bool,
                      need_params: bool):
    k, d, w = weight.shape
    hv = _heads_view(features, k, d)
    n, c = hv.shape[1], tables.num_classes
    dev = features.device
    gu = torch.empty((k, n, w), device=dev, dtype=torch.float32)
    lse = torch.empty((n, k), device=dev, dtype=torch.float32)
    u = saved if mode == PROB_MEAN else gu  # logit_mean never reads u
    _grad_heads_kernel[(n,)](
        grad_out, u, tables.sizes, tables.cover_index, tables.class_ptr, tables.class_entries, lse, gu,
        n, w, k, c, *grad_out.stride(), MODE=mode, **_row_blocks(k, w, c, tables.max_count))
    dot_dtype = _dot_dtype(features.dtype)
    grad_features = torch.empty((0,), device=dev, dtype=features.dtype)
    grad_weight = torch.empty((0,), device=dev, dtype=weight.dtype)
    grad_bias = torch.empty((0,), device=dev, dtype=weight.dtype)
    if need_features:
        grad_features = torch.empty_like(features, memory_format=torch.contiguous_format)
        gv = _heads_view(grad_features, k, d)
        bn, bd, bw = 64, _pow2(d, hi=64), _pow2(w, hi=64)
        _grad_features_kernel[(triton.cdiv(n, bn), triton.cdiv(d, bd), k)](
            gu, weight, tables.sizes, gv, n, d, w, *weight.stride(), *gv.stride(),
            EXTRA=1 if mode == PROB_MEAN else 0, DOT_DTYPE=dot_dtype, BLOCK_N=bn, BLOCK_D=bd, BLOCK_W=bw)
    if need_params:
        grad_weight = torch.empty((k, d, w), device=dev, dtype=weight.dtype)
        grad_bias = torch.empty((k, w), device=dev, dtype=weight.dtype)
        bd, bw, bn = _pow2(d, hi=64), _pow2(w, hi=64), 64
        _grad_params_kernel[(triton.cdiv(d, bd), triton.cdiv(w, bw), k)](
            hv, gu, grad_weight, grad_bias, n, d, w, *hv.stride(), DOT_DTYPE=dot_dtype,
            BLOCK_D=bd, BLOCK_W=bw, BLOCK_N=bn)
    return grad_features, grad_weight, grad_bias
