// CUDA kernel of ensemble_kd_loss_fwd (schema and CPU kernel: csrc/ensemble_kd_loss.cpp; contract:
// ued_fast/ops/ensemble_kd_loss.py). Not yet run on a GPU; compile check without one:
// .ci/check_cuda.sh csrc/ensemble_kd_loss_cuda.cu
//
// One group of threads per row: a warp (4 rows per block) when C <= 1024, a whole block otherwise.
// Sweep 1 (per group): online max / sum-exp of s/T, of s (for CE), and of each teacher t_k/T
// ('prob') or of the logit mixture u = sum_k w_k t_k / T ('logit'). Sweep 2: the mixture p formed in
// registers column by column, KL(p || q) and the gradient written once. No [N, C] or [K, N, C]
// target tensor, no host synchronization (an out-of-range target gives a NaN row loss).
// UED_FAST_ENS_MATH_ONLY: keep only the reduction math (host+device), for a host-side check of it
// against float64 (.ci/ensemble_math_check.cu).
#if defined(UED_FAST_WITH_CUDA) || defined(UED_FAST_ENS_MATH_ONLY)
#ifndef UED_FAST_ENS_MATH_ONLY
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include <climits>
#include <cmath>
#include <cstdint>

namespace ued_fast {
namespace ens_kd_cuda {

constexpr int kMaxTeachers = 32;  // keep in sync with CUDA_MAX_TEACHERS in ued_fast/ops/ensemble_kd_loss.py

// exp and log of the kernel: the fast intrinsics on the device, libm on the host (the host check).
__host__ __device__ __forceinline__ float fast_exp(float x) {
#ifdef __CUDA_ARCH__
  return __expf(x);
#else
  return std::exp(x);
#endif
}

__host__ __device__ __forceinline__ float fast_log(float x) {
#ifdef __CUDA_ARCH__
  return __logf(x);
#else
  return std::log(x);
#endif
}

// Running (max, sum of exp(x - max)) pair; -inf maxima are handled without NaN.
struct MaxSum {
  float m, z;
};

__host__ __device__ __forceinline__ MaxSum combine(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return {m, 0.f};
  return {m, a.z * fast_exp(a.m - m) + b.z * fast_exp(b.m - m)};
}

__host__ __device__ __forceinline__ MaxSum push(MaxSum a, float x) {
  // -inf adds nothing; tested first because while the max is still -inf, x - max would be NaN.
  if (x == -INFINITY) return a;
  if (x <= a.m) return {a.m, a.z + fast_exp(x - a.m)};
  return {x, a.z * fast_exp(a.m - x) + 1.f};  // a.m = -inf: a.z = 0 and exp(-inf) = 0
}

#ifndef UED_FAST_ENS_MATH_ONLY
template <typename scalar_t>
struct TeacherPtrs {
  const scalar_t* ptr[kMaxTeachers];
  int64_t row_stride[kMaxTeachers];
};

struct Scalars {
  int64_t n, c;
  int k;
  float inv_t, kl_w, ce_w;
  int64_t ignore_index;
  bool has_target, prob_mix, do_kl, do_ce, compute_grad;
};

template <int TPR>
__device__ __forceinline__ float group_sum(float v, float* scratch) {
#pragma unroll
  for (int off = (TPR < 32 ? TPR : 32) / 2; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  if constexpr (TPR > 32) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();  // scratch may still be read from the previous reduction
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < TPR / 32 ? scratch[lane] : 0.f;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  }
  return v;
}

template <int TPR>
__device__ __forceinline__ MaxSum group_maxsum(MaxSum v, float* scratch) {
#pragma unroll
  for (int off = (TPR < 32 ? TPR : 32) / 2; off > 0; off >>= 1) {
    MaxSum o{__shfl_xor_sync(0xffffffffu, v.m, off), __shfl_xor_sync(0xffffffffu, v.z, off)};
    v = combine(v, o);
  }
  if constexpr (TPR > 32) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) {
      scratch[2 * warp] = v.m;
      scratch[2 * warp + 1] = v.z;
    }
    __syncthreads();
    v = lane < TPR / 32 ? MaxSum{scratch[2 * lane], scratch[2 * lane + 1]} : MaxSum{-INFINITY, 0.f};
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      MaxSum o{__shfl_xor_sync(0xffffffffu, v.m, off), __shfl_xor_sync(0xffffffffu, v.z, off)};
      v = combine(v, o);
    }
  }
  return v;
}

// TPR threads per row, ROWS rows per block (ROWS == 1 when TPR > 32).
template <typename scalar_t, int TPR, int ROWS>
__global__ void __launch_bounds__(TPR * ROWS) ens_kd_fwd_kernel(
    const scalar_t* __restrict__ student, int64_t s_stride, const TeacherPtrs<scalar_t> teachers,
    const float* __restrict__ weights, int64_t w_stride_k, int64_t w_stride_n, const int64_t* __restrict__ target,
    float* __restrict__ row_loss, scalar_t* __restrict__ grad, const Scalars P) {
  __shared__ float t_max[ROWS][kMaxTeachers];
  __shared__ float t_shift[ROWS][kMaxTeachers];  // log z_k - log w_k; +inf for teachers left out
  __shared__ float scratch[64];
  const int group = threadIdx.x / TPR;
  const int tid = threadIdx.x % TPR;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * ROWS + group;
  // A warp past the last row leaves as a whole (its reductions involve only itself); with one row
  // per block every block has a row, so block reductions always see all threads.
  if (row >= P.n) return;
  const int64_t r = row;
  const scalar_t* s = student + r * s_stride;
  const int64_t C = P.c;

  bool valid = true;
  int64_t y = 0;
  if (P.has_target) {
    y = target[r];
    valid = valid && y != P.ignore_index;
  }

  // Sweep 1.
  MaxSum sq{-INFINITY, 0.f}, ss{-INFINITY, 0.f};
  for (int64_t c = tid; c < C; c += TPR) {
    const float x = static_cast<float>(s[c]);
    if (P.do_kl) sq = push(sq, x * P.inv_t);
    if (P.do_ce) ss = push(ss, x);
  }
  if (P.do_kl) sq = group_maxsum<TPR>(sq, scratch);
  if (P.do_ce) ss = group_maxsum<TPR>(ss, scratch);

  MaxSum su{-INFINITY, 0.f};
  if (P.do_kl) {
    if (P.prob_mix) {
      for (int k = 0; k < P.k; ++k) {
        const float w = weights[k * w_stride_k + r * w_stride_n];
        MaxSum st{-INFINITY, 0.f};
        if (w > 0.f) {
          const scalar_t* t = teachers.ptr[k] + r * teachers.row_stride[k];
          for (int64_t c = tid; c < C; c += TPR) st = push(st, static_cast<float>(t[c]) * P.inv_t);
        }
        st = group_maxsum<TPR>(st, scratch);  // uniform over the group: w is per row
        if (tid == 0) {
          t_max[group][k] = w > 0.f ? st.m : 0.f;
          t_shift[group][k] = w > 0.f ? fast_log(st.z) - fast_log(w) : INFINITY;
        }
      }
      if constexpr (TPR > 32) __syncthreads(); else __syncwarp();
    } else {
      for (int64_t c = tid; c < C; c += TPR) {
        float u = 0.f;
        for (int k = 0; k < P.k; ++k) {
          const float w = weights[k * w_stride_k + r * w_stride_n];
          if (w > 0.f) u += w * static_cast<float>(teachers.ptr[k][r * teachers.row_stride[k] + c]);
        }
        su = push(su, u * P.inv_t);
      }
      su = group_maxsum<TPR>(su, scratch);
    }
  }
  const float log_zq = fast_log(sq.z), log_zs = fast_log(ss.z), log_zu = fast_log(su.z);

  // Sweep 2.
  float kl = 0.f;
  const float g_kl = P.kl_w * P.inv_t;
  scalar_t* g = grad + r * C;
  for (int64_t c = tid; c < C; c += TPR) {
    const float x = static_cast<float>(s[c]);
    float gv = 0.f;
    if (P.do_kl) {
      const float log_q = (x * P.inv_t - sq.m) - log_zq;
      float p, log_p;
      if (P.prob_mix) {
        p = 0.f;
        for (int k = 0; k < P.k; ++k) {
          const float sh = t_shift[group][k];
          if (sh != INFINITY) {
            const float t = static_cast<float>(teachers.ptr[k][r * teachers.row_stride[k] + c]);
            p += fast_exp((t * P.inv_t - t_max[group][k]) - sh);
          }
        }
        log_p = fast_log(p);
      } else {
        float u = 0.f;
        for (int k = 0; k < P.k; ++k) {
          const float w = weights[k * w_stride_k + r * w_stride_n];
          if (w > 0.f) u += w * static_cast<float>(teachers.ptr[k][r * teachers.row_stride[k] + c]);
        }
        log_p = (u * P.inv_t - su.m) - log_zu;
        p = fast_exp(log_p);
      }
      if (p != 0.f) kl += p * (log_p - log_q);  // != keeps a NaN p visible
      gv = g_kl * (fast_exp(log_q) - p);
    }
    if (P.do_ce) gv += P.ce_w * (fast_exp((x - ss.m) - log_zs) - (c == y ? 1.f : 0.f));
    if (P.compute_grad) g[c] = static_cast<scalar_t>(valid ? gv : 0.f);
  }
  if (P.do_kl) kl = group_sum<TPR>(kl, scratch);
  if (tid == 0) {
    float loss = P.do_kl ? P.kl_w * kl : 0.f;
    const bool in_range = y >= 0 && y < C;
    if (P.do_ce && in_range) loss += P.ce_w * (log_zs + (ss.m - static_cast<float>(s[y])));
    if (P.has_target && !in_range) loss = NAN;  // checked here, not on the host: no synchronization
    row_loss[r] = valid ? loss : 0.f;
  }
}

template <typename scalar_t, int TPR, int ROWS>
void launch(const at::Tensor& student, const TeacherPtrs<scalar_t>& tp, const at::Tensor& w, const int64_t* tgt,
            at::Tensor& row_loss, scalar_t* gp, const Scalars& P, cudaStream_t stream) {
  const int64_t blocks = (P.n + ROWS - 1) / ROWS;
  TORCH_CHECK(blocks <= INT_MAX, "ensemble_kd_loss_fwd (cuda): N = ", P.n, " rows exceed the launch grid (at most ",
              int64_t(INT_MAX) * ROWS, ")");
  ens_kd_fwd_kernel<scalar_t, TPR, ROWS><<<blocks, TPR * ROWS, 0, stream>>>(
      student.const_data_ptr<scalar_t>(), student.stride(0), tp, w.const_data_ptr<float>(), w.stride(0), w.stride(1),
      tgt, row_loss.mutable_data_ptr<float>(), gp, P);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#endif  // UED_FAST_ENS_MATH_ONLY
}  // namespace ens_kd_cuda

#ifndef UED_FAST_ENS_MATH_ONLY
std::tuple<at::Tensor, at::Tensor> ensemble_kd_loss_fwd_cuda(
    const at::Tensor& student, at::TensorList teachers, const at::Tensor& weights,
    const std::optional<at::Tensor>& target, double temperature, double alpha, bool t2_scale,
    int64_t ignore_index, int64_t mix, bool compute_grad) {
  using namespace ens_kd_cuda;
  TORCH_CHECK(student.is_cuda() && student.dim() == 2, "ensemble_kd_loss_fwd: student must be a CUDA [N, C] tensor");
  TORCH_CHECK(student.scalar_type() != at::kDouble, "ensemble_kd_loss_fwd (cuda): float64 is not supported");
  const int64_t N = student.size(0), C = student.size(1);
  const int64_t K = static_cast<int64_t>(teachers.size());
  TORCH_CHECK(K >= 1 && K <= kMaxTeachers, "ensemble_kd_loss_fwd (cuda): 1 to ", kMaxTeachers, " teachers, got ", K);
  TORCH_CHECK(C <= 1 || student.stride(1) == 1, "ensemble_kd_loss_fwd: student needs unit stride along classes");
  for (int64_t k = 0; k < K; ++k) {
    TORCH_CHECK(teachers[k].device() == student.device() && teachers[k].sizes() == student.sizes() &&
                    teachers[k].scalar_type() == student.scalar_type() && (C <= 1 || teachers[k].stride(1) == 1),
                "ensemble_kd_loss_fwd: teachers[", k, "] must match the student's device, shape and dtype, "
                "with unit stride along classes");
  }
  TORCH_CHECK(weights.dim() == 2 && weights.size(0) == K && weights.size(1) == N,
              "ensemble_kd_loss_fwd: weights must be [K, N]");
  TORCH_CHECK(mix == 0 || mix == 1, "ensemble_kd_loss_fwd: mix must be 0 (prob) or 1 (logit)");
  c10::cuda::CUDAGuard guard(student.device());
  const at::Tensor w = weights.to(at::kFloat);
  const bool has_target = target.has_value() && target->defined();
  at::Tensor tgt;
  if (has_target) {
    TORCH_CHECK(target->dim() == 1 && target->size(0) == N && target->scalar_type() == at::kLong,
                "ensemble_kd_loss_fwd: target must be int64 [N]");
    tgt = target->contiguous();
  }
  at::Tensor row_loss = at::empty({N}, student.options().dtype(at::kFloat));
  at::Tensor grad = compute_grad ? at::empty({N, C}, student.options()) : at::empty({0}, student.options());
  if (N == 0) return {row_loss, grad};

  const float s2 = t2_scale ? static_cast<float>(temperature * temperature) : 1.f;
  Scalars P;
  P.n = N;
  P.c = C;
  P.k = static_cast<int>(K);
  P.inv_t = static_cast<float>(1.0 / temperature);
  P.kl_w = has_target ? static_cast<float>(alpha) * s2 : s2;
  P.ce_w = has_target ? static_cast<float>(1.0 - alpha) : 0.f;
  P.ignore_index = ignore_index;
  P.has_target = has_target;
  P.prob_mix = mix == 0;
  P.do_kl = P.kl_w != 0.f;
  P.do_ce = P.ce_w != 0.f;
  P.compute_grad = compute_grad;
  const int64_t* tgt_ptr = has_target ? tgt.const_data_ptr<int64_t>() : nullptr;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(student.device().index()).stream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), "ensemble_kd_loss_fwd_cuda", [&] {
    TeacherPtrs<scalar_t> tp{};
    for (int64_t k = 0; k < K; ++k) {
      tp.ptr[k] = teachers[k].const_data_ptr<scalar_t>();
      tp.row_stride[k] = teachers[k].stride(0);
    }
    scalar_t* gp = compute_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr;
    if (C <= 1024) {
      launch<scalar_t, 32, 4>(student, tp, w, tgt_ptr, row_loss, gp, P, stream);
    } else if (C <= 8192) {
      launch<scalar_t, 256, 1>(student, tp, w, tgt_ptr, row_loss, gp, P, stream);
    } else {
      launch<scalar_t, 1024, 1>(student, tp, w, tgt_ptr, row_loss, gp, P, stream);
    }
  });
  return {row_loss, grad};
}

#endif  // UED_FAST_ENS_MATH_ONLY
}  // namespace ued_fast

#ifndef UED_FAST_ENS_MATH_ONLY
TORCH_LIBRARY_IMPL(ued_fast, CUDA, m) {
  m.impl("ensemble_kd_loss_fwd", &ued_fast::ensemble_kd_loss_fwd_cuda);
}
#endif
#endif  // UED_FAST_WITH_CUDA || UED_FAST_ENS_MATH_ONLY
