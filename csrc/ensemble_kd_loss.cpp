// ensemble_kd_loss_fwd: the fused ensemble KD loss forward (+ student gradient), CPU kernel and op schema.
//
// Arguments and semantics: the kernel contract, docs/DESIGN.md 2 (coefficients computed on the host). student [N, C]; teachers: K
// tensors [N, C] in the student's dtype (views of one [K, N, C] tensor or separate tensors, unit stride
// along classes) of log-space scores; weights [K, N] normalized over K (any float dtype, any strides);
// target [N] int64 or None; mix 0 = 'prob' (p = sum_k w_k softmax(t_k * inv_teacher_temp)), 1 = 'logit'
// (p = softmax(sum_k w_k t_k * inv_teacher_temp)). Returns row_loss [N] (fp32, fp64 for fp64) and the
// gradient of each row's loss w.r.t. the student row, [N, C] in the student's dtype (empty unless
// compute_grad).
//
// Per row: sweep 1 the maxima; sweep 2 exponentials and their sums (the exponentials of the row go to a
// per-thread scratch of (K+2) x C values that stays in L1/L2); sweep 3 the mixture p, the divergence and
// (forward_kl) the gradient, with one log and no exp per column. p is formed a vector at a time in
// registers: no [N, C] or [K, N, C] tensor is ever written. reverse_kl and jsd keep h (see
// cpu::divergence_terms) in the scratch in sweep 3 and write the gradient in a fourth sweep.
// Math in fp32 (fp64 for fp64 inputs).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_vec.h"
#include "utils.h"

namespace ued_fast {
namespace {

using cpu::Vectorized;

template <typename acc_t>
struct Params {
  int64_t n, c, k;
  acc_t inv_student_temp, inv_teacher_temp, kd_coef, ce_coef, beta;
  int64_t divergence, ignore_index;
  bool prob_mix;
};

template <typename scalar_t, typename acc_t>
void run_rows(const Params<acc_t>& P, const scalar_t* student, int64_t s_stride,
              const std::vector<const scalar_t*>& teachers, const std::vector<int64_t>& t_stride,
              const acc_t* weights, int64_t w_stride_k, int64_t w_stride_n, const int64_t* target,
              acc_t* row_loss, scalar_t* grad, int64_t begin, int64_t end) {
  using V = Vectorized<acc_t>;
  constexpr int L = V::size();
  const int64_t C = P.c;
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  const bool prob_mix = P.prob_mix;
  const bool log_ratio = P.divergence != kForwardKl, jsd = P.divergence == kJsd;

  std::vector<const scalar_t*> trow(P.k);
  std::vector<acc_t> tw(P.k), tshift(P.k), log_tshift(P.k), tmax(P.k), logs(P.k + 2);
  // Row scratch: exponentials of the student (2 streams) and of each teacher (or x_u, e_u), padded
  // to whole vectors. Per thread, reused for every row; never an [N, C] tensor.
  const int64_t Cp = cpu::padded_size<acc_t>(C);
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
    const acc_t kd_coef = P.kd_coef;
    const acc_t ce_coef = has_target ? P.ce_coef : acc_t(0);
    const bool do_kl = kd_coef != acc_t(0);
    const bool do_ce = ce_coef != acc_t(0);
    const bool four_sweeps = log_ratio && do_kl;  // reverse_kl, jsd: the gradient needs S first

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
      ms = at::vec::maximum(ms, cpu::load_padded<acc_t>(s + c0, n));
      if (prob_mix) {
        for (int64_t j = 0; j < kk; ++j)
          at::vec::maximum(V::loadu(vmax + j * L), cpu::load_padded<acc_t>(trow[j] + c0, n)).store(vmax + j * L);
      } else if (kk > 0) {
        V u = cpu::load_padded<acc_t>(trow[0] + c0, n) * V(tw[0]);
        for (int64_t j = 1; j < kk; ++j) u = at::vec::fmadd(cpu::load_padded<acc_t>(trow[j] + c0, n), V(tw[j]), u);
        at::vec::maximum(V::loadu(vmax), u).store(vmax);
      }
    }
    const acc_t s_max = cpu::hmax(ms);
    const int64_t n_streams = prob_mix ? kk : (kk > 0 ? 1 : 0);
    for (int64_t j = 0; j < n_streams; ++j) tmax[j] = cpu::hmax(V::loadu(vmax + j * L));

    // Sweep 2: sums of exponentials (all shifted by the maxima). The exponentials are kept in the
    // row scratch (L1/L2-resident), so sweep 3 needs no exp at all and one log per column.
    acc_t* e_sT = cache;
    acc_t* e_s = cache + Cp;
    acc_t* e_t = cache + 2 * Cp;  // prob: e_k at e_t + j*Cp; logit: x_u at e_t, e_u at e_t + Cp
    V zsT(0), zs(0);
    for (int64_t j = 0; j < n_streams; ++j) V(0).store(vsum + j * L);
    const V v_inv_s(P.inv_student_temp), v_inv_t(P.inv_teacher_temp), v_smax(s_max);
    for (int64_t c0 = 0; c0 < C; c0 += L) {
      const int64_t n = std::min<int64_t>(L, C - c0);
      const V d = cpu::load_padded<acc_t>(s + c0, n) - v_smax;
      if (do_kl) {
        const V e = cpu::vexp(d * v_inv_s);
        e.store(e_sT + c0);
        zsT = zsT + e;
      }
      if (do_ce) {
        const V e = cpu::vexp(d);
        e.store(e_s + c0);
        zs = zs + e;
      }
      if (prob_mix) {
        for (int64_t j = 0; j < kk; ++j) {
          const V e = cpu::vexp((cpu::load_padded<acc_t>(trow[j] + c0, n) - V(tmax[j])) * v_inv_t);
          e.store(e_t + j * Cp + c0);
          (V::loadu(vsum + j * L) + e).store(vsum + j * L);
        }
      } else if (kk > 0) {
        V u = cpu::load_padded<acc_t>(trow[0] + c0, n) * V(tw[0]);
        for (int64_t j = 1; j < kk; ++j) u = at::vec::fmadd(cpu::load_padded<acc_t>(trow[j] + c0, n), V(tw[j]), u);
        const V x = (u - V(tmax[0])) * v_inv_t;
        const V e = cpu::vexp(x);
        x.store(e_t + c0);
        e.store(e_t + Cp + c0);
        (V::loadu(vsum) + e).store(vsum);
      }
    }
    // All the row's logs at once: [z_sT, z_s, z_k or z_u ...].
    const acc_t z_sT = do_kl ? cpu::hsum(zsT) : acc_t(1);
    const acc_t z_s = do_ce ? cpu::hsum(zs) : acc_t(1);
    logs[0] = z_sT;
    logs[1] = z_s;
    for (int64_t j = 0; j < n_streams; ++j) {
      tshift[j] = cpu::hsum(V::loadu(vsum + j * L));  // z_k (prob) or z_u (logit)
      logs[2 + j] = tshift[j];
    }
    cpu::log_inplace(logs.data(), 2 + n_streams);
    const acc_t log_zsT = logs[0];
    const acc_t log_zs = logs[1];
    // prob: p_c = sum_k e_k,c * w_k / z_k. logit: p_c = e_u,c / z_u, log p_c = x_u,c - log z_u.
    for (int64_t j = 0; j < n_streams; ++j) tshift[j] = prob_mix ? tw[j] / tshift[j] : acc_t(1) / tshift[j];
    if (prob_mix && log_ratio)
      for (int64_t j = 0; j < kk; ++j) log_tshift[j] = std::log(tshift[j]);
    // log p of column c whose p underflowed to 0 ('prob'), in log space: log sum_k w_k/z_k e^{x_k,c}.
    // reverse_kl and jsd need it finite where the mixture is tiny but not 0.
    auto log_mixture = [&](int64_t c) {
      acc_t m = -inf, z = 0;
      for (int64_t j = 0; j < kk; ++j)
        m = std::max(m, (static_cast<acc_t>(trow[j][c]) - tmax[j]) * P.inv_teacher_temp + log_tshift[j]);
      if (m == -inf) return m;
      for (int64_t j = 0; j < kk; ++j)
        z += std::exp((static_cast<acc_t>(trow[j][c]) - tmax[j]) * P.inv_teacher_temp + log_tshift[j] - m);
      return m + std::log(z);
    };

    // Sweep 3: the mixture p and the divergence; the gradient too for forward_kl, else h kept in e_t.
    V div(0), sqh(0);
    const acc_t g_kd = kd_coef * P.inv_student_temp;
    const V v_gkd(g_kd), v_ce(ce_coef), v_log_zsT(log_zsT), zero(0);
    const V v_inv_zsT(acc_t(1) / z_sT), v_inv_zs(acc_t(1) / z_s);
    const V v_log_zu(n_streams && !prob_mix ? logs[2] : acc_t(0));
    const V vbeta(P.beta), vobeta(acc_t(1) - P.beta);
    for (int64_t c0 = 0; c0 < C; c0 += L) {
      const int64_t n = std::min<int64_t>(L, C - c0);
      V gv(0);
      if (do_kl) {
        const V log_q = (cpu::load_padded<acc_t>(s + c0, n) - v_smax) * v_inv_s - v_log_zsT;
        V p, log_p;
        if (prob_mix) {
          p = V(0);
          for (int64_t j = 0; j < kk; ++j) p = at::vec::fmadd(V::loadu(e_t + j * Cp + c0), V(tshift[j]), p);
          log_p = p.log();
          if (log_ratio && (p.zero_mask() & ((1 << n) - 1))) {  // rare: an underflowed mixture
            alignas(64) acc_t lanes_p[L], lanes_log_p[L];
            p.store(lanes_p);
            log_p.store(lanes_log_p);
            for (int64_t l = 0; l < n; ++l)
              if (lanes_p[l] == acc_t(0)) lanes_log_p[l] = log_mixture(c0 + l);
            log_p = V::loadu(lanes_log_p);
          }
        } else if (kk > 0) {
          log_p = V::loadu(e_t + c0) - v_log_zu;
          p = V::loadu(e_t + Cp + c0) * V(tshift[0]);
        } else {
          p = V(0);
          log_p = V(-inf);
        }
        const V q = V::loadu(e_sT + c0) * v_inv_zsT;
        if (!log_ratio) {
          div = div + V::blendv(zero, p * (log_p - log_q), p != zero);  // != keeps a NaN p visible
          if (g) gv = v_gkd * (q - p);
        } else {
          V h;
          // Padding lanes (n < L): p = q = 0 there, so they add nothing.
          div = div + cpu::divergence_terms(jsd, vbeta, vobeta, p, log_p, q, log_q, h);
          sqh = sqh + V::blendv(q * h, zero, q == zero);
          if (g) h.store(e_t + c0);  // e_t's column c0 is read above and never again
        }
      }
      if (g && !four_sweeps) {
        if (do_ce) gv = at::vec::fmadd(v_ce, V::loadu(e_s + c0) * v_inv_zs, gv);
        cpu::store_partial<acc_t>(gv, g + c0, n);
      }
    }
    // Sweep 4 (reverse_kl, jsd): grad = g_kd * q (h - S) + ce_coef * softmax(s).
    if (g && four_sweeps) {
      const V v_s(cpu::hsum(sqh));
      for (int64_t c0 = 0; c0 < C; c0 += L) {
        const V q = V::loadu(e_sT + c0) * v_inv_zsT;
        V gv = v_gkd * V::blendv(q * (V::loadu(e_t + c0) - v_s), zero, q == zero);
        const int64_t n = std::min<int64_t>(L, C - c0);
        if (do_ce) gv = at::vec::fmadd(v_ce, V::loadu(e_s + c0) * v_inv_zs, gv);
        cpu::store_partial<acc_t>(gv, g + c0, n);
      }
    }
    acc_t loss = do_kl ? kd_coef * cpu::hsum(div) : acc_t(0);
    if (do_ce) {
      const acc_t lse = s_max + log_zs;
      loss += ce_coef * (lse - static_cast<acc_t>(s[y]));
      if (g) g[y] = static_cast<scalar_t>(static_cast<acc_t>(g[y]) - ce_coef);
    }
    row_loss[i] = loss;
  }
}

constexpr const char* kOp = "ensemble_kd_loss_fwd";

// The CPU kernel; on meta tensors (torch.compile tracing, opcheck) the output shapes and dtypes only.
std::tuple<at::Tensor, at::Tensor> ensemble_kd_loss_fwd_cpu(
    const at::Tensor& student, at::TensorList teachers, const at::Tensor& weights,
    const std::optional<at::Tensor>& target, double inv_student_temp, double inv_teacher_temp, double kd_coef,
    double ce_coef, int64_t divergence, double beta, int64_t ignore_index, int64_t mix, bool compute_grad) {
  check_ensemble_kd_loss_args(kOp, student, teachers, weights, target, inv_student_temp, inv_teacher_temp, kd_coef,
                              ce_coef, divergence, beta, mix);
  if (student.is_meta()) return kd_outputs(student, compute_grad, acc_dtype(student.scalar_type()));
  TORCH_CHECK_VALUE(student.device().is_cpu(), kOp, ": the CPU kernel takes CPU tensors only");
  cpu::check_cpu_supports_build();
  const int64_t N = student.size(0), C = student.size(1), K = static_cast<int64_t>(teachers.size());
  const bool has_target = target.has_value() && target->defined();
  const at::Tensor w = weights.to(acc_dtype(student.scalar_type()));
  const at::Tensor tgt = has_target ? target->contiguous() : at::Tensor();
  auto [row_loss, grad] = kd_outputs(student, compute_grad, acc_dtype(student.scalar_type()));
  if (N == 0) return {row_loss, grad};

  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, C * (K + 1)));
  dispatch_float<true>(student.scalar_type(), kOp, "student", [&](auto s_tag) {
    using scalar_t = typename decltype(s_tag)::type;
    using acc_t = cpu::acc_type<scalar_t>;
    const Params<acc_t> P{N, C, K, acc_t(inv_student_temp), acc_t(inv_teacher_temp), acc_t(kd_coef),
                          acc_t(ce_coef), acc_t(beta), divergence, ignore_index, mix == kMixProb};
    std::vector<const scalar_t*> tptr(K);
    std::vector<int64_t> tstride(K);
    for (int64_t k = 0; k < K; ++k) {
      tptr[k] = teachers[k].const_data_ptr<scalar_t>();
      tstride[k] = teachers[k].stride(0);
    }
    const int64_t* tp = has_target ? tgt.const_data_ptr<int64_t>() : nullptr;
    if (tp) {  // an out-of-range target would read outside the row
      for (int64_t i = 0; i < N; ++i)
        TORCH_CHECK_INDEX(tp[i] == ignore_index || (tp[i] >= 0 && tp[i] < C), kOp, ": target[", i, "] = ", tp[i],
                          " is outside [0, ", C, ") and not ignore_index");
    }
    const scalar_t* sp = student.const_data_ptr<scalar_t>();
    const int64_t s_stride = student.stride(0);
    const acc_t* wp = w.const_data_ptr<acc_t>();
    acc_t* lp = row_loss.mutable_data_ptr<acc_t>();
    scalar_t* gp = compute_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
      run_rows<scalar_t, acc_t>(P, sp, s_stride, tptr, tstride, wp, w.stride(0), w.stride(1), tp, lp, gp, begin, end);
    });
  });
  return {row_loss, grad};
}

}  // namespace
}  // namespace ued_fast

TORCH_LIBRARY_FRAGMENT(ued_fast, m) {
  m.def(
      "ensemble_kd_loss_fwd(Tensor student, Tensor[] teachers, Tensor weights, Tensor? target, "
      "float inv_student_temp, float inv_teacher_temp, float kd_coef, float ce_coef, int divergence, float beta, "
      "int ignore_index, int mix, bool compute_grad) -> (Tensor, Tensor)");
  m.impl("ensemble_kd_loss_fwd", torch::dispatch(c10::DispatchKey::Meta, TORCH_FN(ued_fast::ensemble_kd_loss_fwd_cpu)));
}

TORCH_LIBRARY_IMPL(ued_fast, CPU, m) {
  m.impl("ensemble_kd_loss_fwd", &ued_fast::ensemble_kd_loss_fwd_cpu);
}
