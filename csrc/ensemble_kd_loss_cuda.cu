// CUDA kernel of ensemble_kd_loss_fwd (schema and CPU kernel: csrc/ensemble_kd_loss.cpp; arguments and
// semantics: docs/DESIGN.md 2 (the kernel contract)). Not yet run on a GPU; compile check without one:
// .ci/check_cuda.sh csrc/ensemble_kd_loss_cuda.cu
//
// One group of threads per row: a warp (4 rows per block) when C <= 1024, a whole block otherwise.
// Sweep 1 (per group): online max / sum-exp of s * inv_student_temp, of s (for CE), and of each teacher
// t_k * inv_teacher_temp ('prob') or of the logit mixture u = sum_k w_k t_k * inv_teacher_temp ('logit').
// Sweep 2: the mixture p formed in registers column by column, the divergence and the gradient written
// once. reverse_kl and jsd first take D and S = sum q h over the row (one more sweep, see
// cuda::log_ratio_terms), then write q (h - S). No [N, C] or [K, N, C] tensor, no host synchronization
// (an out-of-range target gives a NaN row loss).
// UED_FAST_ENS_MATH_ONLY: keep only the reduction math (host+device), for a host-side check of it
// against float64 (.ci/ensemble_math_check.cu).
#if defined(UED_FAST_WITH_CUDA) || defined(UED_FAST_ENS_MATH_ONLY)
#ifndef UED_FAST_ENS_MATH_ONLY
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda_reduce.cuh"
#include "utils.h"
#endif
#include "cuda_utils.cuh"

#include <climits>
#include <cmath>
#include <cstdint>

namespace ued_fast {
namespace ens_kd_cuda {

using cuda::fast_exp;
using cuda::fast_log;

constexpr int kMaxTeachers = 32;  // keep in sync with CUDA_MAX_TEACHERS in ued_fast/ops/ensemble_kd_loss.py

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
struct CombineMaxSum {
  __device__ __forceinline__ MaxSum operator()(MaxSum a, MaxSum b) const { return combine(a, b); }
};

using cuda::DivSums;

template <typename scalar_t>
struct TeacherPtrs {
  const scalar_t* ptr[kMaxTeachers];
  int64_t row_stride[kMaxTeachers];
};

struct Scalars {
  int64_t n, c;
  int k;
  float inv_student_temp, inv_teacher_temp, kd_coef, ce_coef, beta, g_kd;  // g_kd = kd_coef * inv_student_temp
  int64_t ignore_index;
  bool has_target, prob_mix, log_ratio, jsd, do_kl, do_ce, compute_grad;
};

// Shared scratch of one group reduction: 32 values of the widest reduced type.
union ReduceScratch {
  float f[32];
  MaxSum ms[32];
  DivSums ds[32];
};

// TPR threads per row, ROWS rows per block (ROWS == 1 when TPR > 32).
template <typename scalar_t, int TPR, int ROWS>
__global__ void __launch_bounds__(TPR * ROWS) ens_kd_fwd_kernel(
    const scalar_t* __restrict__ student, int64_t s_stride, const TeacherPtrs<scalar_t> teachers,
    const float* __restrict__ weights, int64_t w_stride_k, int64_t w_stride_n, const int64_t* __restrict__ target,
    float* __restrict__ row_loss, scalar_t* __restrict__ grad, const Scalars P) {
  using cuda::to_float;
  __shared__ float t_max[ROWS][kMaxTeachers];
  __shared__ float t_shift[ROWS][kMaxTeachers];  // log z_k - log w_k; +inf for teachers left out
  __shared__ ReduceScratch scratch;
  const int group = threadIdx.x / TPR;
  const int tid = threadIdx.x % TPR;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * ROWS + group;
  // A warp past the last row leaves as a whole (its reductions involve only itself); with one row
  // per block every block has a row, so block reductions always see all threads.
  if (row >= P.n) return;
  const int64_t r = row;
  const scalar_t* s = student + r * s_stride;
  const int64_t C = P.c;
  const MaxSum no_sum{-INFINITY, 0.f};

  bool valid = true;
  int64_t y = 0;
  if (P.has_target) {
    y = target[r];
    valid = valid && y != P.ignore_index;
  }

  // Sweep 1.
  MaxSum sq = no_sum, ss = no_sum;
  for (int64_t c = tid; c < C; c += TPR) {
    const float x = to_float(s[c]);
    if (P.do_kl) sq = push(sq, x * P.inv_student_temp);
    if (P.do_ce) ss = push(ss, x);
  }
  if (P.do_kl) sq = cuda::group_allreduce<TPR>(sq, CombineMaxSum{}, no_sum, scratch.ms);
  if (P.do_ce) ss = cuda::group_allreduce<TPR>(ss, CombineMaxSum{}, no_sum, scratch.ms);

  // u = sum_k w_k t_k of column c ('logit'), teachers of weight 0 left out.
  auto logit_mixture = [&](int64_t c) {
    float u = 0.f;
    for (int k = 0; k < P.k; ++k) {
      const float w = weights[k * w_stride_k + r * w_stride_n];
      if (w > 0.f) u += w * to_float(teachers.ptr[k][r * teachers.row_stride[k] + c]);
    }
    return u;
  };
  MaxSum su = no_sum;
  if (P.do_kl) {
    if (P.prob_mix) {
      for (int k = 0; k < P.k; ++k) {
        const float w = weights[k * w_stride_k + r * w_stride_n];
        MaxSum st = no_sum;
        if (w > 0.f) {
          const scalar_t* t = teachers.ptr[k] + r * teachers.row_stride[k];
          for (int64_t c = tid; c < C; c += TPR) st = push(st, to_float(t[c]) * P.inv_teacher_temp);
        }
        st = cuda::group_allreduce<TPR>(st, CombineMaxSum{}, no_sum, scratch.ms);  // uniform: w is per row
        if (tid == 0) {
          t_max[group][k] = w > 0.f ? st.m : 0.f;
          t_shift[group][k] = w > 0.f ? fast_log(st.z) - fast_log(w) : INFINITY;
        }
      }
      if constexpr (TPR > 32) __syncthreads(); else __syncwarp();
    } else {
      for (int64_t c = tid; c < C; c += TPR) su = push(su, logit_mixture(c) * P.inv_teacher_temp);
      su = cuda::group_allreduce<TPR>(su, CombineMaxSum{}, no_sum, scratch.ms);
    }
  }
  const float log_zq = fast_log(sq.z), log_zs = fast_log(ss.z), log_zu = fast_log(su.z);

  // log p of column c whose p underflowed to 0 ('prob'), in log space: reverse_kl and jsd need it finite
  // where the mixture is tiny but not 0.
  auto log_mixture = [&](int64_t c) {
    float m = -INFINITY, z = 0.f;
    for (int k = 0; k < P.k; ++k)
      if (t_shift[group][k] != INFINITY)
        m = fmaxf(m, (to_float(teachers.ptr[k][r * teachers.row_stride[k] + c]) * P.inv_teacher_temp -
                      t_max[group][k]) - t_shift[group][k]);
    if (m == -INFINITY) return m;
    for (int k = 0; k < P.k; ++k)
      if (t_shift[group][k] != INFINITY)
        z += fast_exp((to_float(teachers.ptr[k][r * teachers.row_stride[k] + c]) * P.inv_teacher_temp -
                       t_max[group][k]) - t_shift[group][k] - m);
    return m + fast_log(z);
  };

  // p, log p (teacher mixture) and log q (student) of column c.
  auto column = [&](int64_t c, float x, float& p, float& log_p) {
    if (P.prob_mix) {
      p = 0.f;
      for (int k = 0; k < P.k; ++k) {
        const float sh = t_shift[group][k];
        if (sh != INFINITY) {
          const float t = to_float(teachers.ptr[k][r * teachers.row_stride[k] + c]);
          p += fast_exp((t * P.inv_teacher_temp - t_max[group][k]) - sh);
        }
      }
      log_p = fast_log(p);
      if (P.log_ratio && p == 0.f) log_p = log_mixture(c);  // rare: an underflowed mixture
    } else {
      log_p = (logit_mixture(c) * P.inv_teacher_temp - su.m) - log_zu;
      p = fast_exp(log_p);
    }
    return (x * P.inv_student_temp - sq.m) - log_zq;
  };

  // reverse_kl, jsd: D and S = sum_c q_c h_c first (the gradient needs S).
  DivSums sums{0.f, 0.f};
  if (P.do_kl && P.log_ratio) {
    for (int64_t c = tid; c < C; c += TPR) {
      float p, log_p, h;
      const float log_q = column(c, to_float(s[c]), p, log_p);
      const float q = fast_exp(log_q);
      sums.d += cuda::log_ratio_terms(P.jsd, P.beta, p, log_p, q, log_q, h);
      sums.s += q * h;
    }
    sums = cuda::group_allreduce<TPR>(sums, cuda::SumOp{}, DivSums{0.f, 0.f}, scratch.ds);
  }

  // Sweep 2: forward_kl's divergence, and the gradient.
  float kl = 0.f;
  scalar_t* g = grad + r * C;
  for (int64_t c = tid; c < C; c += TPR) {
    const float x = to_float(s[c]);
    float gv = 0.f;
    if (P.do_kl && (P.compute_grad || !P.log_ratio)) {
      float p, log_p;
      const float log_q = column(c, x, p, log_p);
      const float q = fast_exp(log_q);
      if (!P.log_ratio) {
        if (p != 0.f) kl += p * (log_p - log_q);  // != keeps a NaN p visible
        gv = P.g_kd * (q - p);
      } else {
        float h;
        cuda::log_ratio_terms(P.jsd, P.beta, p, log_p, q, log_q, h);
        gv = q == 0.f ? 0.f : P.g_kd * q * (h - sums.s);
      }
    }
    if (P.do_ce) gv += P.ce_coef * (fast_exp((x - ss.m) - log_zs) - (c == y ? 1.f : 0.f));
    if (P.compute_grad) g[c] = cuda::from_float<scalar_t>(valid ? gv : 0.f);
  }
  if (P.do_kl && !P.log_ratio) kl = cuda::group_allreduce<TPR>(kl, cuda::SumOp{}, 0.f, scratch.f);
  if (tid == 0) {
    float loss = P.do_kl ? P.kd_coef * (P.log_ratio ? sums.d : kl) : 0.f;
    const bool in_range = y >= 0 && y < C;
    if (P.do_ce && in_range) loss += P.ce_coef * (log_zs + (ss.m - to_float(s[y])));
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
      reinterpret_cast<const scalar_t*>(student.const_data_ptr()), student.stride(0), tp, w.const_data_ptr<float>(),
      w.stride(0), w.stride(1), tgt, row_loss.mutable_data_ptr<float>(), gp, P);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#endif  // UED_FAST_ENS_MATH_ONLY
}  // namespace ens_kd_cuda

#ifndef UED_FAST_ENS_MATH_ONLY
std::tuple<at::Tensor, at::Tensor> ensemble_kd_loss_fwd_cuda(
    const at::Tensor& student, at::TensorList teachers, const at::Tensor& weights,
    const std::optional<at::Tensor>& target, double inv_student_temp, double inv_teacher_temp, double kd_coef,
    double ce_coef, int64_t divergence, double beta, int64_t ignore_index, int64_t mix, bool compute_grad) {
  using namespace ens_kd_cuda;
  constexpr const char* kOp = "ensemble_kd_loss_fwd (cuda)";
  check_ensemble_kd_loss_args(kOp, student, teachers, weights, target, inv_student_temp, inv_teacher_temp, kd_coef,
                              ce_coef, divergence, beta, mix);
  TORCH_CHECK_VALUE(student.is_cuda(), kOp, ": student must be a CUDA tensor");
  const int64_t N = student.size(0), C = student.size(1);
  const int64_t K = static_cast<int64_t>(teachers.size());
  TORCH_CHECK_VALUE(K <= kMaxTeachers, kOp, ": 1 to ", kMaxTeachers, " teachers, got ", K);
  c10::cuda::CUDAGuard guard(student.device());
  const at::Tensor w = weights.to(at::kFloat);
  const bool has_target = target.has_value() && target->defined();
  const at::Tensor tgt = has_target ? target->contiguous() : at::Tensor();
  auto [row_loss, grad] = kd_outputs(student, compute_grad, at::kFloat);
  if (N == 0) return {row_loss, grad};

  Scalars P;
  P.n = N;
  P.c = C;
  P.k = static_cast<int>(K);
  P.inv_student_temp = static_cast<float>(inv_student_temp);
  P.inv_teacher_temp = static_cast<float>(inv_teacher_temp);
  P.kd_coef = static_cast<float>(kd_coef);
  P.ce_coef = has_target ? static_cast<float>(ce_coef) : 0.f;
  P.beta = static_cast<float>(beta);
  P.g_kd = static_cast<float>(kd_coef * inv_student_temp);
  P.ignore_index = ignore_index;
  P.has_target = has_target;
  P.prob_mix = mix == kMixProb;
  P.log_ratio = divergence != kForwardKl;
  P.jsd = divergence == kJsd;
  P.do_kl = P.kd_coef != 0.f;
  P.do_ce = P.ce_coef != 0.f;
  P.compute_grad = compute_grad;
  const int64_t* tgt_ptr = has_target ? tgt.const_data_ptr<int64_t>() : nullptr;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(student.device().index()).stream();

  dispatch_float<false>(student.scalar_type(), kOp, "student", [&](auto tag) {
    using scalar_t = typename cuda::device_type<typename decltype(tag)::type>::type;
    TeacherPtrs<scalar_t> tp{};
    for (int64_t k = 0; k < K; ++k) {
      tp.ptr[k] = reinterpret_cast<const scalar_t*>(teachers[k].const_data_ptr());
      tp.row_stride[k] = teachers[k].stride(0);
    }
    scalar_t* gp = compute_grad ? reinterpret_cast<scalar_t*>(grad.mutable_data_ptr()) : nullptr;
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
