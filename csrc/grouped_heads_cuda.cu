// grouped_heads CUDA kernels (DESIGN 2.3; contract and cover tables as in csrc/grouped_heads.cpp).
// Not yet run on a GPU; compile check without one: .ci/check_cuda.sh csrc/grouped_heads_cuda.cu
//
// - logit_mean forward: ONE kernel. A block computes a 64 x 32 tile of z; for each head covering a
//   class of the tile it stages the gathered weight columns of those classes in shared memory, so a
//   tile reads only its covering heads' columns; bias and 1/count(c) are fused.
// - prob_mean forward: the K head GEMMs as one cuBLAS batched GEMM in float32, then one warp per row
//   does the log-space assembly.
// - backward: one warp per row turns grad_out into gu [K, N, W] (gradient of every head output,
//   0 on padding); grad_features and grad_weight are two float32 batched GEMMs on gu, grad_bias a sum.
// No host synchronization; everything runs on the current stream. Launch limits: logit_mean loops over
// row tiles (grid.y <= 65535); the row kernels keep the K head logsumexps in shared memory, or in an
// [N, K] global scratch when K heads do not fit in 48 KB.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include "cuda_reduce.cuh"
#include "utils.h"

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace ued_fast {
namespace {

constexpr int64_t kProbMean = 1;
constexpr int kTileN = 64, kTileC = 32, kTileD = 32, kTileThreads = 256;
constexpr int kRowsPerWarp = kTileN / (kTileThreads / kTileC);  // 8 rows per thread
constexpr int kWarpsPerBlock = 4;

template <typename scalar_t>
__global__ void logit_mean_fwd_kernel(const scalar_t* __restrict__ h, const scalar_t* __restrict__ w,
                                      const scalar_t* __restrict__ b, const int64_t* __restrict__ class_ptr,
                                      const int64_t* __restrict__ class_entries, scalar_t* __restrict__ out,
                                      int64_t N, int64_t D, int64_t C, int64_t K, int64_t W,
                                      int64_t s_hk, int64_t s_hn, int64_t s_hd, int64_t s_wk, int64_t s_wd,
                                      int64_t s_ww, int64_t s_bk, int64_t s_bw, int64_t s_on, int64_t s_oc) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t hs[kTileN][kTileD + 1];
  __shared__ acc_t ws[kTileD][kTileC];
  __shared__ int64_t slot[kTileC];
  const int tid = threadIdx.x, tx = tid % kTileC, ty = tid / kTileC;
  const int64_t c0 = int64_t(blockIdx.x) * kTileC;
  const int64_t c = c0 + tx;
  // Row tiles in a grid-stride loop: grid.y is capped at 65535 (N up to any size).
  for (int64_t n0 = int64_t(blockIdx.y) * kTileN; n0 < N; n0 += int64_t(gridDim.y) * kTileN) {
    acc_t acc[kRowsPerWarp];
    for (int i = 0; i < kRowsPerWarp; ++i) acc[i] = 0;
    acc_t bias_sum = 0;
    for (int64_t k = 0; k < K; ++k) {
      if (tid < kTileC) {  // slot of class c0 + tid in head k: scan that class's CSR entries
        int64_t s = -1;
        const int64_t cc = c0 + tid;
        if (cc < C) {
          for (int64_t e = class_ptr[cc]; e < class_ptr[cc + 1]; ++e) {
            const int64_t kj = class_entries[e];
            if (kj / W == k) s = kj - k * W;
          }
        }
        slot[tid] = s;
      }
      const bool covered = __syncthreads_or(tid < kTileC && slot[tid] >= 0);
      if (!covered) continue;  // block-uniform: no class of this tile in head k
      for (int64_t d0 = 0; d0 < D; d0 += kTileD) {
        for (int idx = tid; idx < kTileN * kTileD; idx += kTileThreads) {
          const int r = idx / kTileD, dd = idx % kTileD;
          const int64_t n = n0 + r, d = d0 + dd;
          hs[r][dd] = (n < N && d < D) ? acc_t(h[k * s_hk + n * s_hn + d * s_hd]) : acc_t(0);
        }
        for (int idx = tid; idx < kTileD * kTileC; idx += kTileThreads) {
          const int dd = idx / kTileC, cc = idx % kTileC;
          const int64_t d = d0 + dd, s = slot[cc];
          ws[dd][cc] = (s >= 0 && d < D) ? acc_t(w[k * s_wk + d * s_wd + s * s_ww]) : acc_t(0);
        }
        __syncthreads();
#pragma unroll 8
        for (int dd = 0; dd < kTileD; ++dd) {
          const acc_t wv = ws[dd][tx];
          for (int i = 0; i < kRowsPerWarp; ++i) acc[i] += hs[ty + i * (kTileThreads / kTileC)][dd] * wv;
        }
        __syncthreads();
      }
      if (slot[tx] >= 0) bias_sum += acc_t(b[k * s_bk + slot[tx] * s_bw]);
      __syncthreads();  // slot[] is rewritten for the next head
    }
    if (c < C) {  // no early return: the next row tile has block barriers
      const acc_t inv_count = acc_t(1) / acc_t(class_ptr[c + 1] - class_ptr[c]);
      for (int i = 0; i < kRowsPerWarp; ++i) {
        const int64_t n = n0 + ty + i * (kTileThreads / kTileC);
        if (n < N) out[n * s_on + c * s_oc] = scalar_t((acc[i] + bias_sum) * inv_count);
      }
    }
  }
}

// log of the sum over the head outputs holding class c of q = exp(u - lse_k) (row n).
template <typename acc_t>
__device__ acc_t class_total(const acc_t* u, const acc_t* lse, const int64_t* class_ptr,
                             const int64_t* class_entries, int64_t n, int64_t N, int64_t W, int64_t c) {
  const int64_t e0 = class_ptr[c], e1 = class_ptr[c + 1];
  acc_t m = -INFINITY;
  for (int64_t e = e0; e < e1; ++e) {
    const int64_t kj = class_entries[e], k = kj / W;
    m = max(m, u[(k * N + n) * W + (kj - k * W)] - lse[k]);
  }
  acc_t s = 0;
  for (int64_t e = e0; e < e1; ++e) {
    const int64_t kj = class_entries[e], k = kj / W;
    s += exp(u[(k * N + n) * W + (kj - k * W)] - lse[k] - m);
  }
  return m + log(s);
}

// Row n: every head's logsumexp over its real outputs (j <= |S_k|) into lse[K] (shared, this warp's).
template <typename acc_t>
__device__ void head_lse(const acc_t* u, const int64_t* sizes, acc_t* lse, int64_t n, int64_t N, int64_t W,
                         int64_t K, int lane) {
  for (int64_t k = 0; k < K; ++k) {
    const acc_t* uk = u + (k * N + n) * W;
    const int64_t real = sizes[k] + 1;
    acc_t m = -INFINITY;
    for (int64_t j = lane; j < real; j += 32) m = max(m, uk[j]);
    m = cuda::warp_allreduce(m, cuda::MaxOp{});
    acc_t s = 0;
    for (int64_t j = lane; j < real; j += 32) s += exp(uk[j] - m);
    s = cuda::warp_allreduce(s, cuda::SumOp{});
    if (lane == 0) lse[k] = m + log(s);
  }
  __syncwarp();
}

// Row n: Z = logsumexp over classes of log r_c (log r_c = class_total - log count(c)).
template <typename acc_t>
__device__ acc_t row_normalizer(const acc_t* u, const acc_t* lse, const int64_t* class_ptr,
                                const int64_t* class_entries, int64_t n, int64_t N, int64_t W, int64_t C,
                                int lane) {
  acc_t m = -INFINITY, s = 0;  // online logsumexp per lane
  for (int64_t c = lane; c < C; c += 32) {
    const acc_t lr = class_total(u, lse, class_ptr, class_entries, n, N, W, c) -
                     log(acc_t(class_ptr[c + 1] - class_ptr[c]));
    if (lr > m) {
      s = s * exp(m - lr) + 1;
      m = lr;
    } else {
      s += exp(lr - m);
    }
  }
  const acc_t gm = cuda::warp_allreduce(m, cuda::MaxOp{});
  s = (m == -INFINITY) ? acc_t(0) : s * exp(m - gm);
  return gm + log(cuda::warp_allreduce(s, cuda::SumOp{}));
}

// Row n's K head logsumexps: in this warp's slice of shared memory, or (lse_global, when K heads do
// not fit in the default 48 KB of dynamic shared memory) in its row of an [N, K] scratch tensor.
template <typename acc_t>
__device__ __forceinline__ acc_t* row_lse_scratch(unsigned char* smem_raw, acc_t* lse_global, int warp, int64_t n,
                                                  int64_t K) {
  return lse_global != nullptr ? lse_global + n * K : reinterpret_cast<acc_t*>(smem_raw) + warp * K;
}

template <typename scalar_t, typename acc_t>
__global__ void prob_mean_fwd_kernel(const acc_t* __restrict__ u, const int64_t* __restrict__ sizes,
                                     const int64_t* __restrict__ class_ptr,
                                     const int64_t* __restrict__ class_entries, scalar_t* __restrict__ out,
                                     acc_t* __restrict__ lse_global, int64_t N, int64_t W, int64_t K, int64_t C,
                                     int64_t s_on, int64_t s_oc) {
  extern __shared__ unsigned char smem_raw[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t n = int64_t(blockIdx.x) * kWarpsPerBlock + warp;
  if (n >= N) return;  // whole warp leaves together
  acc_t* lse = row_lse_scratch(smem_raw, lse_global, warp, n, K);
  head_lse(u, sizes, lse, n, N, W, K, lane);
  const acc_t z = row_normalizer(u, lse, class_ptr, class_entries, n, N, W, C, lane);
  for (int64_t c = lane; c < C; c += 32) {
    const acc_t lr = class_total(u, lse, class_ptr, class_entries, n, N, W, c) -
                     log(acc_t(class_ptr[c + 1] - class_ptr[c]));
    out[n * s_on + c * s_oc] = scalar_t(lr - z);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void grad_heads_kernel(const scalar_t* __restrict__ g, const acc_t* __restrict__ u,
                                  const int64_t* __restrict__ sizes, const int64_t* __restrict__ cover_index,
                                  const int64_t* __restrict__ class_ptr, const int64_t* __restrict__ class_entries,
                                  acc_t* __restrict__ gu, acc_t* __restrict__ lse_global, int64_t N, int64_t W,
                                  int64_t K, int64_t C, int64_t s_gn, int64_t s_gc, int64_t mode) {
  extern __shared__ unsigned char smem_raw[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t n = int64_t(blockIdx.x) * kWarpsPerBlock + warp;
  if (n >= N) return;
  if (mode != kProbMean) {
    for (int64_t kj = lane; kj < K * W; kj += 32) {
      const int64_t c = cover_index[kj], k = kj / W;
      gu[(k * N + n) * W + (kj - k * W)] =
          c < 0 ? acc_t(0) : acc_t(g[n * s_gn + c * s_gc]) / acc_t(class_ptr[c + 1] - class_ptr[c]);
    }
    return;
  }
  acc_t* lse = row_lse_scratch(smem_raw, lse_global, warp, n, K);
  head_lse(u, sizes, lse, n, N, W, K, lane);
  const acc_t z = row_normalizer(u, lse, class_ptr, class_entries, n, N, W, C, lane);
  acc_t g_sum = 0;
  for (int64_t c = lane; c < C; c += 32) g_sum += acc_t(g[n * s_gn + c * s_gc]);
  g_sum = cuda::warp_allreduce(g_sum, cuda::SumOp{});
  // d out / d lq_kj = (g_c - P_c * sum g) * q_kj / (sum of the covering q's), P = exp(out);
  // lq = u - lse_k, so gu = glq - q * sum_j glq over the head's real outputs.
  for (int64_t k = 0; k < K; ++k) {
    const int64_t real = sizes[k] + 1;
    const acc_t* uk = u + (k * N + n) * W;
    acc_t* guk = gu + (k * N + n) * W;
    acc_t s = 0;
    for (int64_t j = lane; j < W; j += 32) {
      acc_t glq = 0;
      if (j < real - 1) {
        const int64_t c = cover_index[k * W + j];
        const acc_t total = class_total(u, lse, class_ptr, class_entries, n, N, W, c);
        const acc_t lr = total - log(acc_t(class_ptr[c + 1] - class_ptr[c]));
        glq = (acc_t(g[n * s_gn + c * s_gc]) - exp(lr - z) * g_sum) * exp(uk[j] - lse[k] - total);
      }
      guk[j] = glq;  // provisional; the softmax correction below needs the head's sum
      s += glq;
    }
    s = cuda::warp_allreduce(s, cuda::SumOp{});
    for (int64_t j = lane; j < W; j += 32) {
      guk[j] = j < real ? guk[j] - exp(uk[j] - lse[k]) * s : acc_t(0);
    }
  }
}

// The sizes of a checked call: K heads of D features and W outputs, C classes, N rows, and the
// features as a [K, N, D] view.
struct HeadsShape {
  int64_t K, D, W, C, N;
  at::Tensor hv;
};

HeadsShape check_cuda_inputs(const at::Tensor& features, const at::Tensor& weight, const at::Tensor& bias,
                             const at::Tensor& cover_index, const at::Tensor& class_ptr,
                             const at::Tensor& class_entries) {
  for (const auto* t : {&features, &weight, &bias, &cover_index, &class_ptr, &class_entries}) {
    TORCH_CHECK(t->is_cuda() && t->device() == features.device(),
                "grouped_heads: every tensor must be on the features' CUDA device");
  }
  for (const auto* t : {&cover_index, &class_ptr, &class_entries}) {
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous(), "grouped_heads: cover tables must be contiguous int64");
  }
  TORCH_CHECK(weight.dim() == 3 && cover_index.dim() == 2 && weight.size(0) == cover_index.size(0) &&
                  weight.size(2) == cover_index.size(1),
              "grouped_heads: weight must be [K, D, W] matching cover_index [K, W]");
  const int64_t K = weight.size(0), D = weight.size(1);
  TORCH_CHECK((features.dim() == 2 && features.size(1) == K * D) ||
                  (features.dim() == 3 && features.size(0) == K && features.size(2) == D),
              "grouped_heads: features must be [N, K*D] or [K, N, D]");
  at::Tensor hv = heads_view(features, K, D);
  const int64_t N = hv.size(1);
  return {K, D, weight.size(2), class_ptr.size(0) - 1, N, std::move(hv)};
}

constexpr int64_t kGridYMax = 65535;
constexpr size_t kDefaultDynamicSmem = 48 * 1024;  // usable without cudaFuncSetAttribute

// Launch shape of the warp-per-row kernels: blocks, dynamic shared memory for the head logsumexps,
// and the [N, K] global scratch used instead when K heads do not fit in shared memory.
struct RowLaunch {
  unsigned blocks;
  size_t smem;
  at::Tensor lse_global;
};

RowLaunch row_launch(int64_t N, int64_t K, const at::Tensor& like, at::ScalarType acc) {
  const int64_t blocks = (N + kWarpsPerBlock - 1) / kWarpsPerBlock;
  TORCH_CHECK(blocks <= INT32_MAX, "grouped_heads (cuda): N = ", N, " rows exceed the launch grid");
  const size_t smem = c10::elementSize(acc) * kWarpsPerBlock * size_t(K);
  if (smem <= kDefaultDynamicSmem) return {unsigned(blocks), smem, at::Tensor()};
  return {unsigned(blocks), 0, at::empty({N, K}, like.options().dtype(acc))};
}

template <typename acc_t>
acc_t* lse_ptr(const RowLaunch& launch) {
  return launch.lse_global.defined() ? launch.lse_global.data_ptr<acc_t>() : nullptr;
}

std::tuple<at::Tensor, at::Tensor> grouped_heads_fwd_cuda(
    const at::Tensor& features, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& cover_index, const at::Tensor& class_ptr, const at::Tensor& class_entries,
    int64_t mode) {
  const HeadsShape shape = check_cuda_inputs(features, weight, bias, cover_index, class_ptr, class_entries);
  const int64_t K = shape.K, D = shape.D, W = shape.W, C = shape.C, N = shape.N;
  const at::Tensor& hv = shape.hv;
  const c10::cuda::CUDAGuard guard(features.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor out = at::empty({N, C}, features.options());
  if (mode != kProbMean) {
    const int64_t class_tiles = (C + kTileC - 1) / kTileC, row_tiles = (N + kTileN - 1) / kTileN;
    TORCH_CHECK(class_tiles <= INT32_MAX, "grouped_heads (cuda): C = ", C, " classes exceed the launch grid");
    const dim3 grid(unsigned(class_tiles), unsigned(std::min(row_tiles, kGridYMax)));  // rows: grid-stride
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "grouped_heads_logit_mean_fwd", [&] {
      logit_mean_fwd_kernel<scalar_t><<<grid, kTileThreads, 0, stream>>>(
          hv.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), bias.data_ptr<scalar_t>(),
          class_ptr.data_ptr<int64_t>(), class_entries.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), N, D, C, K,
          W, hv.stride(0), hv.stride(1), hv.stride(2), weight.stride(0), weight.stride(1), weight.stride(2),
          bias.stride(0), bias.stride(1), out.stride(0), out.stride(1));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return {out, at::empty({0}, features.options().dtype(acc_dtype(features.scalar_type())))};
  }
  const auto acc = acc_dtype(features.scalar_type());
  const at::Tensor u = at::baddbmm(bias.to(acc).unsqueeze(1), hv.to(acc), weight.to(acc));  // [K, N, W]
  const at::Tensor sizes = cover_index.ge(0).sum(1);  // |S_k| on the device: no host sync
  const RowLaunch rl = row_launch(N, K, features, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "grouped_heads_prob_mean_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    prob_mean_fwd_kernel<scalar_t, acc_t><<<rl.blocks, kWarpsPerBlock * 32, rl.smem, stream>>>(
        u.data_ptr<acc_t>(), sizes.data_ptr<int64_t>(), class_ptr.data_ptr<int64_t>(),
        class_entries.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), lse_ptr<acc_t>(rl), N, W, K, C,
        out.stride(0), out.stride(1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, u};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_heads_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& features, const at::Tensor& weight, const at::Tensor& saved,
    const at::Tensor& cover_index, const at::Tensor& class_ptr, const at::Tensor& class_entries, int64_t mode,
    bool need_features, bool need_params) {
  const HeadsShape shape = check_cuda_inputs(features, weight, weight, cover_index, class_ptr, class_entries);
  TORCH_CHECK(grad_out.is_cuda() && grad_out.dim() == 2, "grouped_heads: grad_out must be a [N, C] CUDA tensor");
  const int64_t K = shape.K, D = shape.D, W = shape.W, C = shape.C, N = shape.N;
  const c10::cuda::CUDAGuard guard(features.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto acc = acc_dtype(features.scalar_type());
  const at::Tensor g = grad_out.to(features.scalar_type());
  at::Tensor gu = at::empty({K, N, W}, features.options().dtype(acc));
  const at::Tensor sizes = cover_index.ge(0).sum(1);
  const at::Tensor u = mode == kProbMean ? saved : gu;  // logit_mean never reads u
  if (mode == kProbMean) {
    TORCH_CHECK(saved.dim() == 3 && saved.size(0) == K && saved.size(1) == N && saved.size(2) == W &&
                    saved.scalar_type() == acc && saved.is_contiguous(),
                "grouped_heads: prob_mean backward needs the forward's head outputs [K, N, W]");
  }
  const RowLaunch rl = row_launch(N, mode == kProbMean ? K : 0, features, acc);  // logit_mean: no lse
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "grouped_heads_grad_heads", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    grad_heads_kernel<scalar_t, acc_t><<<rl.blocks, kWarpsPerBlock * 32, rl.smem, stream>>>(
        g.data_ptr<scalar_t>(), u.data_ptr<acc_t>(), sizes.data_ptr<int64_t>(), cover_index.data_ptr<int64_t>(),
        class_ptr.data_ptr<int64_t>(), class_entries.data_ptr<int64_t>(), gu.data_ptr<acc_t>(), lse_ptr<acc_t>(rl),
        N, W, K, C, g.stride(0), g.stride(1), mode);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  auto [grad_features, grad_weight, grad_bias] = empty_head_grads(features, weight);
  if (need_features) {
    // Padding columns may hold anything (even NaN): zero them so that 0 * garbage cannot leak.
    const at::Tensor real = sizes + (mode == kProbMean ? 1 : 0);
    const at::Tensor pad = at::arange(W, cover_index.options()).view({1, 1, W}) >= real.view({K, 1, 1});
    const at::Tensor gh = at::bmm(gu, weight.to(acc).masked_fill(pad, 0).transpose(1, 2));  // [K, N, D]
    grad_features = features.dim() == 3 ? gh.to(features.scalar_type())
                                        : gh.transpose(0, 1).reshape({N, K * D}).to(features.scalar_type());
  }
  if (need_params) {
    grad_weight = at::bmm(shape.hv.to(acc).transpose(1, 2), gu).to(weight.scalar_type());
    grad_bias = gu.sum(1).to(weight.scalar_type());
  }
  return {grad_features, grad_weight, grad_bias};
}

}  // namespace
}  // namespace ued_fast

TORCH_LIBRARY_IMPL(ued_fast, CUDA, m) {
  m.impl("grouped_heads_fwd", &ued_fast::grouped_heads_fwd_cuda);
  m.impl("grouped_heads_bwd", &ued_fast::grouped_heads_bwd_cuda);
}
