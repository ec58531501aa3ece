// ensemble_kd_loss_fwd: the fused ensemble KD loss forward (+ student gradient), CPU kernel and op schema.
//
// Contract (see ued_fast/ops/ensemble_kd_loss.py): student [N, C]; teachers: K tensors [N, C] in the
// student's dtype (views of one [K, N, C] tensor or separate tensors, unit stride along classes);
// weights [K, N] normalized over K (float32, or float64 for a float64 student; any strides);
// target [N] int64 or None; mix 0 = 'prob' (p = sum_k w_k softmax(t_k/T)), 1 = 'logit'
// (p = softmax(sum_k w_k t_k / T)). Returns row_loss [N] (fp32, fp64 for fp64) and the gradient of
// each row's loss w.r.t. the student row, [N, C] in the student's dtype (empty unless compute_grad).
//
// Per row, three sweeps: maxima; exponentials and their sums (the exponentials of the row go to a
// per-thread scratch of (K+2) x C values that stays in L1/L2); then the mixture p, KL and the
// gradient, with one log and no exp per column. p is formed a vector at a time in registers: no
// [N, C] or [K, N, C] tensor is ever written. Math in fp32 (fp64 for fp64 inputs).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

// The vector kernels are compiled for AVX2+FMA whatever the build flags (torch's own kernels are
// dispatched by CPU capability; ours would otherwise fall back to scalar std::exp loops). Only the
// at::vec headers and the kernels below are inside this region; the op entry checks the CPU.
#if defined(__x86_64__) && !defined(CPU_CAPABILITY) && (defined(__GNUC__) || defined(__clang__))
#define UED_FAST_ENS_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
// sleef.h declares its 8-lane functions only when it sees these macros (set by -mavx2 normally).
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#endif
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

namespace ued_fast {
namespace ens_kd_cpu {

using at::vec::Vectorized;

template <typename acc_t>
inline acc_t reduce_max(const Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>([](Vectorized<acc_t>& a, Vectorized<acc_t>& b) { return at::vec::maximum(a, b); }, v);
}

template <typename acc_t>
inline acc_t reduce_sum(const Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>([](Vectorized<acc_t>& a, Vectorized<acc_t>& b) { return a + b; }, v);
}

// In-place log of n values, a vector at a time (one vector log instead of n scalar calls per row).
template <typename acc_t>
inline void log_inplace(acc_t* x, int64_t n) {
  using V = Vectorized<acc_t>;
  for (int64_t i = 0; i < n; i += V::size()) {
    const int64_t m = std::min<int64_t>(V::size(), n - i);
    V::loadu(x + i, m).log().store(x + i, m);
  }
}

// n <= lanes values from p, padded with -inf (probability 0 for every stream that reads them).
template <typename acc_t, typename scalar_t>
inline Vectorized<acc_t> load(const scalar_t* p, int64_t n) {
  using V = Vectorized<acc_t>;
  constexpr int L = V::size();
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    if (n == L) return V::loadu(p);
    return V::set(V(-std::numeric_limits<acc_t>::infinity()), V::loadu(p, n), n);
  }
  alignas(64) acc_t buf[L];
  if (n == L) {
    for (int j = 0; j < L; ++j) buf[j] = static_cast<acc_t>(p[j]);
  } else {
    for (int j = 0; j < L; ++j) buf[j] = j < n ? static_cast<acc_t>(p[j]) : -std::numeric_limits<acc_t>::infinity();
  }
  return V::loadu(buf);
}

template <typename acc_t, typename scalar_t>
inline void store(const Vectorized<acc_t>& v, scalar_t* p, int64_t n) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    v.store(p, n);
  } else {
    alignas(64) acc_t buf[Vectorized<acc_t>::size()];
    v.store(buf);
    for (int64_t j = 0; j < n; ++j) p[j] = static_cast<scalar_t>(buf[j]);
  }
}

template <typename acc_t>
inline Vectorized<acc_t> vexp(const Vectorized<acc_t>& x) {
  if constexpr (std::is_same_v<acc_t, float>) {
    return x.exp_u20();  // ~20 ulp polynomial: far below the tolerance of fp32 softmax sums, 3x faster
  } else {
    return x.exp();
  }
}

struct Params {
  int64_t n, c, k;
  double temperature, alpha;
  bool t2_scale;
  int64_t ignore_index;
  int64_t mix;  // 0 prob, 1 logit
};

template <typename scalar_t, typename acc_t>
void run_rows(const Params& P, const scalar_t* student, int64_t s_stride,
              const std::vector<const scalar_t*>& teachers, const std::vector<int64_t>& t_stride,
              const acc_t* weights, int64_t w_stride_k, int64_t w_stride_n, const int64_t* target,
              acc_t* row_loss, scalar_t* grad, int64_t begin, int64_t end) {
  using V = Vectorized<acc_t>;
  constexpr int L = V::size();
  const int64_t C = P.c;
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  const acc_t inv_t = acc_t(1.0 / P.temperature);
  const acc_t s2 = P.t2_scale ? acc_t(P.temperature * P.temperature) : acc_t(1);
  const bool prob_mix = P.mix == 0;

  std::vector<const scalar_t*> trow(P.k);
  std::vector<acc_t> tw(P.k), tshift(P.k), tmax(P.k), logs(P.k + 2);
  // Row scratch: exponentials of the student (2 streams) and of each teacher (or x_u, e_u), padded
  // to whole vectors. Per thread, reused for every row; never an [N, C] tensor.
  const int64_t Cp = (C + L - 1) / L * L;
  std::vector<acc_t> cache_buf((2 + std::max<int64_t>(P.k, 2)) * Cp);
  acc_t* cache = cache_buf.data();
  // Per-stream lane accumulators, kept in memory (std::vector of over-aligned AVX types is unsafe).
  std::vector<acc_t> vmax_buf(P.k * L), vsum_buf(P.k * L);
  acc_t* vmax = vmax_buf.data();
  acc_t* vsum = vsum_buf.data();

  for (int64_t i = begin; i < end; ++i) {
    const scalar_t* s = student + i * s_stride;
    scalar_t* g = grad ? grad + i * C : nullptr;
    const bool has_target = target != nullptr;
    const int64_t y = has_target ? target[i] : -1;
    if (has_target && y == P.ignore_index) {
      row_loss[i] = 0;
      if (g) std::fill(g, g + C, scalar_t(0));
      continue;
    }
    // Row loss = kl_w * KL + ce_w * CE; the gradient's KL factor is kl_w / T.
    const acc_t kl_w = has_target ? acc_t(P.alpha) * s2 : s2;
    const acc_t ce_w = has_target ? acc_t(1.0 - P.alpha) : acc_t(0);
    const bool do_kl = kl_w != acc_t(0);
    const bool do_ce = ce_w != acc_t(0);

    // Teachers with weight 0 contribute nothing: skip them (no read, no log(0)).
    int64_t kk = 0;
    if (do_kl) {
      for (int64_t k = 0; k < P.k; ++k) {
        const acc_t w = weights[k * w_stride_k + i * w_stride_n];
        if (w > acc_t(0)) {
          trow[kk] = teachers[k] + i * t_stride[k];
          tw[kk] = w;
          ++kk;
        }
      }
    }

    // Sweep 1: maxima of s, of each t_k (prob) or of u = sum_k w_k t_k (logit).
    V ms(-inf);
    if (prob_mix) {
      for (int64_t j = 0; j < kk; ++j) V(-inf).store(vmax + j * L);
    } else {
      V(-inf).store(vmax);
    }
    for (int64_t c0 = 0; c0 < C; c0 += L) {
      const int64_t n = std::min<int64_t>(L, C - c0);
      ms = at::vec::maximum(ms, load<acc_t>(s + c0, n));
      if (prob_mix) {
        for (int64_t j = 0; j < kk; ++j)
          at::vec::maximum(V::loadu(vmax + j * L), load<acc_t>(trow[j] + c0, n)).store(vmax + j * L);
      } else if (kk > 0) {
        V u = load<acc_t>(trow[0] + c0, n) * V(tw[0]);
        for (int64_t j = 1; j < kk; ++j) u = at::vec::fmadd(load<acc_t>(trow[j] + c0, n), V(tw[j]), u);
        at::vec::maximum(V::loadu(vmax), u).store(vmax);
      }
    }
    const acc_t s_max = reduce_max(ms);
    const int64_t n_streams = prob_mix ? kk : (kk > 0 ? 1 : 0);
    for (int64_t j = 0; j < n_streams; ++j) tmax[j] = reduce_max(V::loadu(vmax + j * L));

    // Sweep 2: sums of exponentials (all shifted by the maxima). The exponentials are kept in the
    // row scratch (L1/L2-resident), so sweep 3 needs no exp at all and one log per column.
    acc_t* e_sT = cache;
    acc_t* e_s = cache + Cp;
    acc_t* e_t = cache + 2 * Cp;  // prob: e_k at e_t + j*Cp; logit: x_u at e_t, e_u at e_t + Cp
    V zsT(0), zs(0);
    for (int64_t j = 0; j < n_streams; ++j) V(0).store(vsum + j * L);
    const V v_inv_t(inv_t), v_smax(s_max);
    for (int64_t c0 = 0; c0 < C; c0 += L) {
      const int64_t n = std::min<int64_t>(L, C - c0);
      const V d = load<acc_t>(s + c0, n) - v_smax;
      if (do_kl) {
        const V e = vexp(d * v_inv_t);
        e.store(e_sT + c0);
        zsT = zsT + e;
      }
      if (do_ce) {
        const V e = vexp(d);
        e.store(e_s + c0);
        zs = zs + e;
      }
      if (prob_mix) {
        for (int64_t j = 0; j < kk; ++j) {
          const V e = vexp((load<acc_t>(trow[j] + c0, n) - V(tmax[j])) * v_inv_t);
          e.store(e_t + j * Cp + c0);
          (V::loadu(vsum + j * L) + e).store(vsum + j * L);
        }
      } else if (kk > 0) {
        V u = load<acc_t>(trow[0] + c0, n) * V(tw[0]);
        for (int64_t j = 1; j < kk; ++j) u = at::vec::fmadd(load<acc_t>(trow[j] + c0, n), V(tw[j]), u);
        const V x = (u - V(tmax[0])) * v_inv_t;
        const V e = vexp(x);
        x.store(e_t + c0);
        e.store(e_t + Cp + c0);
        (V::loadu(vsum) + e).store(vsum);
      }
    }
    // All the row's logs at once: [z_sT, z_s, z_k or z_u ...].
    const acc_t z_sT = do_kl ? reduce_sum(zsT) : acc_t(1);
    const acc_t z_s = do_ce ? reduce_sum(zs) : acc_t(1);
    logs[0] = z_sT;
    logs[1] = z_s;
    for (int64_t j = 0; j < n_streams; ++j) {
      tshift[j] = reduce_sum(V::loadu(vsum + j * L));  // z_k (prob) or z_u (logit)
      logs[2 + j] = tshift[j];
    }
    log_inplace(logs.data(), 2 + n_streams);
    const acc_t log_zsT = logs[0];
    const acc_t log_zs = logs[1];
    // prob: p_c = sum_k e_k,c * w_k / z_k. logit: p_c = e_u,c / z_u, log p_c = x_u,c - log z_u.
    for (int64_t j = 0; j < n_streams; ++j) tshift[j] = prob_mix ? tw[j] / tshift[j] : acc_t(1) / tshift[j];

    // Sweep 3: the mixture p, KL(p || q) with 0 log 0 = 0, and the gradient.
    V kl(0);
    const acc_t g_kl = kl_w * inv_t;
    const V v_gkl(g_kl), v_ce(ce_w), v_log_zsT(log_zsT), zero(0);
    const V v_inv_zsT(acc_t(1) / z_sT), v_inv_zs(acc_t(1) / z_s);
    const V v_log_zu(n_streams && !prob_mix ? logs[2] : acc_t(0));
    for (int64_t c0 = 0; c0 < C; c0 += L) {
      const int64_t n = std::min<int64_t>(L, C - c0);
      V gv(0);
      if (do_kl) {
        const V log_q = (load<acc_t>(s + c0, n) - v_smax) * v_inv_t - v_log_zsT;
        V p, log_p;
        if (prob_mix) {
          p = V(0);
          for (int64_t j = 0; j < kk; ++j) p = at::vec::fmadd(V::loadu(e_t + j * Cp + c0), V(tshift[j]), p);
          log_p = p.log();
        } else if (kk > 0) {
          log_p = V::loadu(e_t + c0) - v_log_zu;
          p = V::loadu(e_t + Cp + c0) * V(tshift[0]);
        } else {
          p = V(0);
          log_p = V(-inf);
        }
        kl = kl + V::blendv(zero, p * (log_p - log_q), p != zero);  // != keeps a NaN p visible
        if (g) gv = v_gkl * (V::loadu(e_sT + c0) * v_inv_zsT - p);
      }
      if (g) {
        if (do_ce) gv = at::vec::fmadd(v_ce, V::loadu(e_s + c0) * v_inv_zs, gv);
        store<acc_t>(gv, g + c0, n);
      }
    }
    acc_t loss = do_kl ? kl_w * reduce_sum(kl) : acc_t(0);
    if (do_ce) {
      const acc_t lse = s_max + log_zs;
      loss += ce_w * (lse - static_cast<acc_t>(s[y]));
      if (g) g[y] = static_cast<scalar_t>(static_cast<acc_t>(g[y]) - ce_w);
    }
    row_loss[i] = loss;
  }
}

}  // namespace ens_kd_cpu
}  // namespace ued_fast

#ifdef UED_FAST_ENS_AVX2
#pragma GCC pop_options
#endif

namespace ued_fast {

namespace {

bool cpu_has_avx2() {
#ifdef UED_FAST_ENS_AVX2
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
#else
  return true;
#endif
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> ensemble_kd_loss_fwd_cpu(
    const at::Tensor& student, at::TensorList teachers, const at::Tensor& weights,
    const std::optional<at::Tensor>& target, double temperature, double alpha, bool t2_scale,
    int64_t ignore_index, int64_t mix, bool compute_grad) {
  TORCH_CHECK(cpu_has_avx2(), "ensemble_kd_loss_fwd (cpp): this CPU lacks AVX2/FMA; use backend='reference'");
  TORCH_CHECK(student.dim() == 2, "ensemble_kd_loss_fwd: student must be [N, C]");
  TORCH_CHECK(student.device().is_cpu(), "ensemble_kd_loss_fwd: student must be a CPU tensor");
  const int64_t N = student.size(0), C = student.size(1), K = static_cast<int64_t>(teachers.size());
  TORCH_CHECK(K >= 1, "ensemble_kd_loss_fwd: teachers must hold at least one tensor");
  TORCH_CHECK(C == 0 || N == 0 || student.stride(1) == 1, "ensemble_kd_loss_fwd: student needs unit stride along classes");
  for (int64_t k = 0; k < K; ++k) {
    const auto& t = teachers[k];
    TORCH_CHECK(t.device().is_cpu(), "ensemble_kd_loss_fwd: teachers[", k, "] must be a CPU tensor");
    TORCH_CHECK(t.sizes() == student.sizes(), "ensemble_kd_loss_fwd: teachers[", k, "] has shape ", t.sizes(),
                " but student has ", student.sizes());
    TORCH_CHECK(t.scalar_type() == student.scalar_type(), "ensemble_kd_loss_fwd: teachers[", k,
                "] must have the student's dtype");
    TORCH_CHECK(C <= 1 || t.stride(1) == 1, "ensemble_kd_loss_fwd: teachers[", k, "] needs unit stride along classes");
  }
  TORCH_CHECK(weights.dim() == 2 && weights.size(0) == K && weights.size(1) == N,
              "ensemble_kd_loss_fwd: weights must be [K, N] = [", K, ", ", N, "], got ", weights.sizes());
  TORCH_CHECK(mix == 0 || mix == 1, "ensemble_kd_loss_fwd: mix must be 0 (prob) or 1 (logit)");
  TORCH_CHECK(temperature > 0, "ensemble_kd_loss_fwd: temperature must be > 0");
  const at::Tensor* tgt = nullptr;
  if (target.has_value() && target->defined()) {
    TORCH_CHECK(target->dim() == 1 && target->size(0) == N && target->scalar_type() == at::kLong,
                "ensemble_kd_loss_fwd: target must be int64 [N]");
    tgt = &*target;
  }
  const bool is_double = student.scalar_type() == at::kDouble;
  const auto acc_type = is_double ? at::kDouble : at::kFloat;
  const at::Tensor w = weights.to(acc_type);
  const at::Tensor tgt_c = tgt ? tgt->contiguous() : at::Tensor();
  at::Tensor row_loss = at::empty({N}, student.options().dtype(acc_type));
  at::Tensor grad = compute_grad ? at::empty({N, C}, student.options()) : at::empty({0}, student.options());
  if (N == 0) return {row_loss, grad};

  ens_kd_cpu::Params P{N, C, K, temperature, alpha, t2_scale, ignore_index, mix};
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, C * (K + 1)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), "ensemble_kd_loss_fwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    std::vector<const scalar_t*> tptr(K);
    std::vector<int64_t> tstride(K);
    for (int64_t k = 0; k < K; ++k) {
      tptr[k] = teachers[k].const_data_ptr<scalar_t>();
      tstride[k] = teachers[k].stride(0);
    }
    const int64_t* tp = tgt ? tgt_c.const_data_ptr<int64_t>() : nullptr;
    if (tp) {  // an out-of-range target would read outside the row
      for (int64_t i = 0; i < N; ++i)
        TORCH_CHECK(tp[i] == ignore_index || (tp[i] >= 0 && tp[i] < C), "ensemble_kd_loss_fwd: target[", i,
                    "] = ", tp[i], " is outside [0, ", C, ") and not ignore_index");
    }
    const scalar_t* sp = student.const_data_ptr<scalar_t>();
    const int64_t s_stride = student.stride(0);
    const acc_t* wp = w.const_data_ptr<acc_t>();
    const int64_t wsk = w.stride(0), wsn = w.stride(1);
    acc_t* lp = row_loss.mutable_data_ptr<acc_t>();
    scalar_t* gp = compute_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
      ens_kd_cpu::run_rows<scalar_t, acc_t>(P, sp, s_stride, tptr, tstride, wp, wsk, wsn, tp, lp, gp, begin, end);
    });
  });
  return {row_loss, grad};
}

}  // namespace ued_fast

TORCH_LIBRARY_FRAGMENT(ued_fast, m) {
  m.def(
      "ensemble_kd_loss_fwd(Tensor student, Tensor[] teachers, Tensor weights, Tensor? target, float temperature, "
      "float alpha, bool t2_scale, int ignore_index, int mix, bool compute_grad) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ued_fast, CPU, m) {
  m.impl("ensemble_kd_loss_fwd", &ued_fast::ensemble_kd_loss_fwd_cpu);
}
