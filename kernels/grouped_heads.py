"""Triton kernels of grouped_heads (DESIGN 2.3; contract in ued_fast/ops/grouped_heads.py).

Features are read through their [K, N, D] view (for [N, K*D] that is a strided view, no copy).
- logit_mean forward: ONE kernel, tl.dot tiles over N x C; for each head k covering a class of the
  tile, the weight columns of those classes are gathered (slot_of) and accumulated, so a tile reads
  only its covering heads' columns; bias and the 1/count(c) scale are fused.
- prob_mean forward: the K head GEMMs (tl.dot tiles, u [K, N, W] in float32, kept for backward),
  then one program per row does the log-space assembly, tiled over heads, outputs and classes with
  online log-sum-exps (registers stay bounded at any C; the classes are swept twice).
- backward: one program per row turns grad_out into gu [K, N, W] (the gradient of every head
  output, 0 on padding; tiled the same way), then tl.dot kernels give grad_features (gu @ W^T) and grad_weight
  (h^T @ gu) with grad_bias (sum of gu) fused into the latter.
Accumulation in float32 everywhere; tl.dot runs with input_precision="ieee" (no tf32). Offsets that
can pass 2^31 (N*K*D, K*N*W, K*C) are int64.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._common import on_device, online_lse

LOGIT_MEAN, PROB_MEAN = 0, 1


def _pow2(x: int, lo: int = 16, hi: int | None = None) -> int:
    p = max(lo, triton.next_power_of_2(max(int(x), 1)))
    return min(p, hi) if hi is not None else p


@triton.jit
def _head_dot(acc, h_ptr, w_ptr, offs_n, mask_n, w_cols, mask_cols, D, s_hn, s_hd, s_wd, s_ww,
              DOT_DTYPE: tl.constexpr, BLOCK_D: tl.constexpr):
    """acc + h[offs_n, :D] @ W[:D, w_cols] over BLOCK_D slices of D (h_ptr, w_ptr: head k's bases)."""
    offs_d = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        mask_d = dd < D
        h = tl.load(h_ptr + offs_n[:, None] * s_hn + dd[None, :] * s_hd,
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        w = tl.load(w_ptr + dd[:, None] * s_wd + w_cols[None, :] * s_ww,
                    mask=mask_d[:, None] & mask_cols[None, :], other=0.0)
        acc = tl.dot(h.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision="ieee")
    return acc


@triton.jit
def _logit_mean_fwd_kernel(
    h_ptr, w_ptr, b_ptr, slot_ptr, cptr_ptr, out_ptr,
    N, D, C, K,
    s_hk, s_hn, s_hd, s_wk, s_wd, s_ww, s_bk, s_bw, s_on, s_oc,
    DOT_DTYPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_c = tl.program_id(1)
    # int64 offsets: N*K*D, K*C and N*C may pass 2^31.
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = pid_c.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_n = offs_n < N
    mask_c = offs_c < C
    acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    for k32 in range(0, K):
        k = tl.full([], k32, tl.int64)  # k * C and k * s_hk may pass 2^31
        slots = tl.load(slot_ptr + k * C + offs_c, mask=mask_c, other=-1)
        covered = slots >= 0
        if tl.max(covered.to(tl.int32), axis=0) > 0:  # head k holds a class of this tile
            safe_slots = tl.where(covered, slots, 0)
            acc = _head_dot(acc, h_ptr + k * s_hk, w_ptr + k * s_wk, offs_n, mask_n, safe_slots, covered, D,
                            s_hn, s_hd, s_wd, s_ww, DOT_DTYPE, BLOCK_D)
            b = tl.load(b_ptr + k * s_bk + safe_slots * s_bw, mask=covered, other=0.0)
            acc += b.to(tl.float32)[None, :]
    count = tl.load(cptr_ptr + offs_c + 1, mask=mask_c, other=1) - tl.load(cptr_ptr + offs_c, mask=mask_c, other=0)
    z = acc / count.to(tl.float32)[None, :]
    tl.store(out_ptr + offs_n[:, None] * s_on + offs_c[None, :] * s_oc, z.to(out_ptr.dtype.element_ty),
             mask=mask_n[:, None] & mask_c[None, :])


@triton.jit
def _row_head_tile(N, BLOCK_N: tl.constexpr, BLOCK_X: tl.constexpr):
    """This program's tile on the grid (row tiles, column tiles, K heads): its head k, its rows (int64:
    row * stride can pass 2**31) with their mask, and its columns."""
    k = tl.program_id(2).to(tl.int64)
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_x = tl.program_id(1) * BLOCK_X + tl.arange(0, BLOCK_X)
    return k, offs_n, offs_n < N, offs_x


@triton.jit
def _head_gemm_kernel(
    h_ptr, w_ptr, b_ptr, u_ptr,
    N, D, W,
    s_hk, s_hn, s_hd, s_wk, s_wd, s_ww, s_bk, s_bw,
    DOT_DTYPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """u[k, n, w] = h_k[n] . W_k[:, w] + b_k[w], float32 [K, N, W] contiguous."""
    k, offs_n, mask_n, offs_w = _row_head_tile(N, BLOCK_N, BLOCK_W)
    mask_w = offs_w < W
    acc = _head_dot(tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32), h_ptr + k * s_hk, w_ptr + k * s_wk, offs_n,
                    mask_n, offs_w, mask_w, D, s_hn, s_hd, s_wd, s_ww, DOT_DTYPE, BLOCK_D)
    b = tl.load(b_ptr + k * s_bk + offs_w * s_bw, mask=mask_w, other=0.0)
    acc += b.to(tl.float32)[None, :]
    tl.store(u_ptr + (k * N + offs_n[:, None]) * W + offs_w[None, :], acc,
             mask=mask_n[:, None] & mask_w[None, :])


# The row kernels below (one program per row n) walk the K x W head outputs in [BLOCK_K, BLOCK_W]
# tiles, the C classes in BLOCK_C tiles and a class's holders in BLOCK_E tiles, with online
# (running max, rescaled sum) log-sum-exps across tiles: registers stay bounded at any K, W, C.

@triton.jit
def _head_lse(u_ptr, size_ptr, lse_ptr, n, N, W, K, BLOCK_K: tl.constexpr, BLOCK_W: tl.constexpr):
    """Row n: each head's logsumexp over its real outputs j <= |S_k|, written to lse_ptr[n, k]."""
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        size = tl.load(size_ptr + offs_k, mask=mask_k, other=0)
        run_max = tl.full([BLOCK_K], float("-inf"), tl.float32)
        run_sum = tl.zeros([BLOCK_K], dtype=tl.float32)
        for w0 in range(0, W, BLOCK_W):
            offs_w = w0 + tl.arange(0, BLOCK_W)
            real = mask_k[:, None] & (offs_w[None, :] <= size[:, None]) & (offs_w[None, :] < W)
            u = tl.load(u_ptr + (offs_k[:, None].to(tl.int64) * N + n) * W + offs_w[None, :], mask=real,
                        other=float("-inf"))
            run_max, run_sum = online_lse(run_max, run_sum, u, 1)
        lse = tl.where(mask_k, run_max + tl.log(run_sum), 0.0)
        tl.store(lse_ptr + n * K + offs_k, lse, mask=mask_k)


@triton.jit
def _class_log_r(u_ptr, lse_ptr, cptr_ptr, entries_ptr, n, N, W, K, c, mask_c, max_count,
                 BLOCK_E: tl.constexpr):
    """log of the sum, over the head outputs holding class c, of q = exp(u - lse_k) (c of any shape),
    -inf where not mask_c; and count(c). The holders are read BLOCK_E at a time."""
    p0 = tl.load(cptr_ptr + c, mask=mask_c, other=0)
    count = tl.load(cptr_ptr + c + 1, mask=mask_c, other=0) - p0
    run_max = tl.full(c.shape, float("-inf"), tl.float32)
    run_sum = tl.zeros(c.shape, dtype=tl.float32)
    for e0 in range(0, max_count, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        e_mask = offs_e < tl.expand_dims(count, -1)
        kj = tl.load(entries_ptr + tl.expand_dims(p0, -1) + offs_e, mask=e_mask, other=0)
        kh = kj // W
        uv = tl.load(u_ptr + (kh * N + n) * W + (kj - kh * W), mask=e_mask, other=float("-inf"))
        lv = tl.load(lse_ptr + n * K + kh, mask=e_mask, other=0.0)
        run_max, run_sum = online_lse(run_max, run_sum, uv - lv, -1)
    total = run_max + tl.log(run_sum)
    return tl.where(mask_c, total, float("-inf")), count


@triton.jit
def _class_tile_log_r(u_ptr, lse_ptr, cptr_ptr, entries_ptr, n, N, W, K, C, c0, max_count,
                      BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr):
    """Classes c0 .. c0 + BLOCK_C of row n: log r_c (log of the mean of the covering q's), -inf past C."""
    offs_c = c0 + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    total, count = _class_log_r(u_ptr, lse_ptr, cptr_ptr, entries_ptr, n, N, W, K, offs_c, mask_c, max_count,
                                BLOCK_E)
    return tl.where(mask_c, total - tl.log(tl.maximum(count, 1).to(tl.float32)), float("-inf")), offs_c, mask_c


@triton.jit
def _row_normalizer(u_ptr, lse_ptr, cptr_ptr, entries_ptr, g_ptr, s_gn, s_gc, n, N, W, K, C, max_count,
                    SUM_G: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr):
    """Row n: Z = logsumexp over classes of log r_c, and (SUM_G) the sum over classes of g[n, c]."""
    run_max = tl.full([BLOCK_C], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_C], dtype=tl.float32)
    g_sum = tl.zeros([BLOCK_C], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        log_r, offs_c, mask_c = _class_tile_log_r(u_ptr, lse_ptr, cptr_ptr, entries_ptr, n, N, W, K, C, c0,
                                                  max_count, BLOCK_C, BLOCK_E)
        # per-lane online state; merged once after the loop
        new_max = tl.maximum(run_max, log_r)
        safe = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp(run_max - safe) + tl.exp(log_r - safe)
        run_max = new_max
        if SUM_G:
            g_sum += tl.load(g_ptr + n * s_gn + offs_c * s_gc, mask=mask_c, other=0.0).to(tl.float32)
    row_max = tl.max(run_max, axis=0)
    z = row_max + tl.log(tl.sum(run_sum * tl.exp(run_max - row_max), axis=0))
    return z, tl.sum(g_sum, axis=0)


@triton.jit
def _prob_mean_fwd_kernel(
    u_ptr, size_ptr, cptr_ptr, entries_ptr, lse_ptr, out_ptr,
    N, W, K, C, s_on, s_oc, max_count,
    BLOCK_K: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    _head_lse(u_ptr, size_ptr, lse_ptr, n, N, W, K, BLOCK_K, BLOCK_W)
    tl.debug_barrier()  # the class gathers read lse_ptr[n, :] written by other threads
    z, _ = _row_normalizer(u_ptr, lse_ptr, cptr_ptr, entries_ptr, out_ptr, 0, 0, n, N, W, K, C, max_count,
                           False, BLOCK_C, BLOCK_E)
    # Second sweep: log r again (cheaper than a float32 scratch row), normalized and stored.
    for c0 in range(0, C, BLOCK_C):
        log_r, offs_c, mask_c = _class_tile_log_r(u_ptr, lse_ptr, cptr_ptr, entries_ptr, n, N, W, K, C, c0,
                                                  max_count, BLOCK_C, BLOCK_E)
        tl.store(out_ptr + n * s_on + offs_c * s_oc, (log_r - z).to(out_ptr.dtype.element_ty), mask=mask_c)


@triton.jit
def _grad_heads_kernel(
    g_ptr, u_ptr, size_ptr, index_ptr, cptr_ptr, entries_ptr, lse_ptr, gu_ptr,
    N, W, K, C, s_gn, s_gc, max_count,
    MODE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """Row n: gu[k, n, j] = d(sum_c g[n, c] out[n, c]) / d u[k, n, j], 0 on padding."""
    n = tl.program_id(0).to(tl.int64)
    if MODE == 1:
        _head_lse(u_ptr, size_ptr, lse_ptr, n, N, W, K, BLOCK_K, BLOCK_W)
        tl.debug_barrier()
        z, g_sum = _row_normalizer(u_ptr, lse_ptr, cptr_ptr, entries_ptr, g_ptr, s_gn, s_gc, n, N, W, K, C,
                                   max_count, True, BLOCK_C, BLOCK_E)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        head_sum = tl.zeros([BLOCK_K], dtype=tl.float32)
        for w0 in range(0, W, BLOCK_W):
            offs_w = w0 + tl.arange(0, BLOCK_W)
            in_tile = mask_k[:, None] & (offs_w[None, :] < W)
            cls = tl.load(index_ptr + offs_k[:, None].to(tl.int64) * W + offs_w[None, :], mask=in_tile, other=-1)
            holds = cls >= 0
            safe_cls = tl.where(holds, cls, 0)
            g_cls = tl.load(g_ptr + n * s_gn + safe_cls * s_gc, mask=holds, other=0.0).to(tl.float32)
            count_cls = (tl.load(cptr_ptr + safe_cls + 1, mask=holds, other=1)
                         - tl.load(cptr_ptr + safe_cls, mask=holds, other=0)).to(tl.float32)
            gu_offs = (offs_k[:, None].to(tl.int64) * N + n) * W + offs_w[None, :]
            if MODE == 0:
                tl.store(gu_ptr + gu_offs, tl.where(holds, g_cls / count_cls, 0.0), mask=in_tile)
            else:
                # Per head output (k, j) of class c: d out / d lq_kj = (g_c - P_c * sum g) * q_kj / (sum
                # of the covering q's), P = exp(out); lq = u - lse_k. Stored provisionally; the head's
                # softmax correction (gu = glq - q * sum_j glq) needs the whole head's sum.
                lse_k = tl.load(lse_ptr + n * K + offs_k, mask=mask_k, other=0.0)
                u = tl.load(u_ptr + gu_offs, mask=holds, other=float("-inf"))
                total_cls, _ = _class_log_r(u_ptr, lse_ptr, cptr_ptr, entries_ptr, n, N, W, K, safe_cls, holds,
                                            max_count, BLOCK_E)
                g_lr = g_cls - tl.exp(total_cls - tl.log(count_cls) - z) * g_sum
                glq = tl.where(holds, g_lr * tl.exp((u - lse_k[:, None]) - total_cls), 0.0)
                head_sum += tl.sum(glq, axis=1)
                tl.store(gu_ptr + gu_offs, glq, mask=in_tile)
        if MODE == 1:
            tl.debug_barrier()  # the provisional gu tiles are re-read by other threads
            size = tl.load(size_ptr + offs_k, mask=mask_k, other=0)
            lse_k = tl.load(lse_ptr + n * K + offs_k, mask=mask_k, other=0.0)
            for w0 in range(0, W, BLOCK_W):
                offs_w = w0 + tl.arange(0, BLOCK_W)
                in_tile = mask_k[:, None] & (offs_w[None, :] < W)
                real = in_tile & (offs_w[None, :] <= size[:, None])
                gu_offs = (offs_k[:, None].to(tl.int64) * N + n) * W + offs_w[None, :]
                glq = tl.load(gu_ptr + gu_offs, mask=real, other=0.0)
                u = tl.load(u_ptr + gu_offs, mask=real, other=float("-inf"))
                gu = tl.where(real, glq - tl.exp(u - lse_k[:, None]) * head_sum[:, None], 0.0)
                tl.store(gu_ptr + gu_offs, gu, mask=in_tile)


@triton.jit
def _grad_features_kernel(
    gu_ptr, w_ptr, size_ptr, gh_ptr,
    N, D, W,
    s_wk, s_wd, s_ww, s_gk, s_gn, s_gd,
    EXTRA: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """grad_h[k, n, d] = sum over real outputs j of gu[k, n, j] * W[k, d, j] (padding never read)."""
    k, offs_n, mask_n, offs_d = _row_head_tile(N, BLOCK_N, BLOCK_D)
    offs_w = tl.arange(0, BLOCK_W)
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
    k = tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_w = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < D
    mask_w = offs_w < W
    acc = tl.zeros((BLOCK_D, BLOCK_W), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_W,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        nn_ = n0 + offs_n.to(tl.int64)
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


def _reduce_block(x: int, dtype: torch.dtype) -> int:
    """Block along a tl.dot's reduction dimension: 32 for float32 operands (64 x 64 x 64 float32
    tiles spilled on sm_90, .ci/check_triton.py), 64 for 16-bit ones."""
    return _pow2(x, hi=32 if dtype == torch.float32 else 64)


def _dot_dtype(dtype: torch.dtype):
    # 16-bit inputs: tensor-core dots on 16-bit operands, float32 accumulation; float32 stays exact.
    # The CPU interpreter (triton 3.9) computes bfloat16 tl.dot wrongly: upcast there.
    if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        return tl.float32
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}.get(dtype, tl.float32)


# CUDA grid limits: x up to 2^31 - 1 programs, y and z up to 65535.
_GRID_YZ_MAX = 65535
# Row kernels: elements of a [BLOCK_K, BLOCK_W, BLOCK_E] or [BLOCK_C, BLOCK_E] gather tile, and
# elements per thread (sets num_warps). 2048 on 4 warps spilled up to 1.1 KB on sm_90 in the prob_mean
# backward (.ci/check_triton.py).
ROW_TILE_ELEMS = 1024
ROW_ELEMS_PER_THREAD = 4
# Holders of a class read per step (a class held by more heads takes several steps).
MAX_BLOCK_E = 8


def _launch_grid(*dims: int) -> tuple[int, ...]:
    """dims as a launch grid; a clear error where a dimension passes the CUDA limit."""
    names = ("rows", "second", "heads")
    for axis, (name, size) in enumerate(zip(names, dims)):
        limit = 2**31 - 1 if axis == 0 else _GRID_YZ_MAX
        if size > limit:
            raise ValueError(f"grouped_heads (triton): the {name} grid dimension needs {size} programs, over the "
                             f"CUDA limit of {limit} (for heads: at most {_GRID_YZ_MAX} heads K)")
    return dims


def _head_gemm(hv, weight, bias):
    k, d, w = weight.shape
    n = hv.shape[1]
    u = torch.empty((k, n, w), device=hv.device, dtype=torch.float32)
    bn, bw, bd = 64, _pow2(w, hi=64), _reduce_block(d, hv.dtype)
    _head_gemm_kernel[_launch_grid(triton.cdiv(n, bn), triton.cdiv(w, bw), k)](
        hv, weight, bias, u, n, d, w, *hv.stride(), *weight.stride(), *bias.stride(),
        DOT_DTYPE=_dot_dtype(hv.dtype), BLOCK_N=bn, BLOCK_W=bw, BLOCK_D=bd)
    return u


def row_blocks(k: int, w: int, c: int, max_count: int) -> dict:
    """Tile sizes and warps of the row kernels (one program per row): bounded whatever K, W, C and
    max_count."""
    block_e = _pow2(max_count, lo=2, hi=MAX_BLOCK_E)
    tile = max(32, ROW_TILE_ELEMS // block_e)
    block_w = _pow2(w, lo=2, hi=tile)
    block_k = _pow2(k, lo=2, hi=max(2, tile // block_w))
    block_c = _pow2(c, lo=2, hi=tile)
    biggest = max(block_k * block_w, block_c) * block_e
    num_warps = min(8, max(1, triton.next_power_of_2(biggest // (32 * ROW_ELEMS_PER_THREAD))))
    return dict(BLOCK_K=block_k, BLOCK_W=block_w, BLOCK_C=block_c, BLOCK_E=block_e, num_warps=num_warps)


def grouped_heads_fwd(features, weight, bias, tables, mode: int):
    with on_device(features):
        return _fwd(features, weight, bias, tables, mode)


def _fwd(features, weight, bias, tables, mode: int):
    k, d, w = weight.shape
    hv = _heads_view(features, k, d)
    n, c = hv.shape[1], tables.num_classes
    out = torch.empty((n, c), device=features.device, dtype=features.dtype)
    if mode == LOGIT_MEAN:
        # float32: 32 x 32 tiles (64 x 64 and 32 x 64 spilled on sm_90, on 4 or 8 warps).
        edge = 32 if features.dtype == torch.float32 else 64
        bn, bc, bd = edge, _pow2(c, hi=edge), _reduce_block(d, features.dtype)
        _logit_mean_fwd_kernel[_launch_grid(triton.cdiv(n, bn), triton.cdiv(c, bc))](
            hv, weight, bias, tables.slot_of, tables.class_ptr, out, n, d, c, k,
            *hv.stride(), *weight.stride(), *bias.stride(), *out.stride(),
            DOT_DTYPE=_dot_dtype(features.dtype), BLOCK_N=bn, BLOCK_C=bc, BLOCK_D=bd)
        return out, torch.empty((0,), device=features.device, dtype=torch.float32)
    u = _head_gemm(hv, weight, bias)
    lse = torch.empty((n, k), device=features.device, dtype=torch.float32)
    _prob_mean_fwd_kernel[_launch_grid(n)](
        u, tables.sizes, tables.class_ptr, tables.class_entries, lse, out, n, w, k, c, *out.stride(),
        tables.max_count, **row_blocks(k, w, c, tables.max_count))
    return out, u


def grouped_heads_bwd(grad_out, features, weight, saved, tables, mode: int, need_features: bool,
                      need_params: bool):
    with on_device(features):
        return _bwd(grad_out, features, weight, saved, tables, mode, need_features, need_params)


def _bwd(grad_out, features, weight, saved, tables, mode, need_features, need_params):
    k, d, w = weight.shape
    hv = _heads_view(features, k, d)
    n, c = hv.shape[1], tables.num_classes
    dev = features.device
    gu = torch.empty((k, n, w), device=dev, dtype=torch.float32)
    lse = torch.empty((n, k), device=dev, dtype=torch.float32)
    u = saved if mode == PROB_MEAN else gu  # logit_mean never reads u
    _grad_heads_kernel[_launch_grid(n)](
        grad_out, u, tables.sizes, tables.cover_index, tables.class_ptr, tables.class_entries, lse, gu,
        n, w, k, c, *grad_out.stride(), tables.max_count, MODE=mode, **row_blocks(k, w, c, tables.max_count))
    dot_dtype = _dot_dtype(features.dtype)
    grad_features = torch.empty((0,), device=dev, dtype=features.dtype)
    grad_weight = torch.empty((0,), device=dev, dtype=weight.dtype)
    grad_bias = torch.empty((0,), device=dev, dtype=weight.dtype)
    if need_features:
        grad_features = torch.empty_like(features, memory_format=torch.contiguous_format)
        gv = _heads_view(grad_features, k, d)
        bn, bd, bw = 64, _pow2(d, hi=64), _reduce_block(w, features.dtype)
        _grad_features_kernel[_launch_grid(triton.cdiv(n, bn), triton.cdiv(d, bd), k)](
            gu, weight, tables.sizes, gv, n, d, w, *weight.stride(), *gv.stride(),
            EXTRA=1 if mode == PROB_MEAN else 0, DOT_DTYPE=dot_dtype, BLOCK_N=bn, BLOCK_D=bd, BLOCK_W=bw)
    if need_params:
        grad_weight = torch.empty((k, d, w), device=dev, dtype=weight.dtype)
        grad_bias = torch.empty((k, w), device=dev, dtype=weight.dtype)
        bd, bw, bn = _pow2(d, hi=64), _pow2(w, hi=64), _reduce_block(n, features.dtype)
        _grad_params_kernel[_launch_grid(triton.cdiv(d, bd), triton.cdiv(w, bw), k)](
            hv, gu, grad_weight, grad_bias, n, d, w, *hv.stride(), DOT_DTYPE=dot_dtype,
            BLOCK_D=bd, BLOCK_W=bw, BLOCK_N=bn)
    return grad_features, grad_weight, grad_bias
