// sparse_kd_loss_fwd: the C++ CPU kernel of KD from a sparse (top-k) teacher, and the op's schema. Arguments
// and semantics: the kernel contract (docs/DESIGN.md 2.5); the spec is ued_fast.sparse_kd_loss_reference.
//
// The host hands over the teacher side already tempered and normalized over k+1 categories (the row's k
// stored entries, then 'rest'): log_p [N, k+1], and the indices sorted with padding (-1) first. Per row,
// with z = s * inv_student_temp and S the live indices:
//   log q_a = z_{i_a} - logsumexp(z),   log q_rest = logsumexp_{j not in S}(z) - logsumexp(z)
//   D = sum over the k+1 categories of the divergence's terms; h_a = dD / dlog q_a, H = sum_a h_a
//   grad_j = kd_coef*inv_student_temp*(h_a - q_j H) on S, kd_coef*inv_student_temp*(h_rest q_j/q_rest - q_j H)
//            off S, + ce_coef*(softmax(s)_j - [j == y])
// Three sweeps over a row held in a per-thread buffer: load (converted), with the k support logits set aside
// and the maxima on and off S; the exponentials off S relative to their own max, kept, and their sum (the
// student's mass off S is a sum of its own terms, never total - support, which cancels when the support
// holds nearly all of it); the gradient, then the k support columns written whole.
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
  int64_t n_rows, n_cols, k, student_row_stride;
  const int64_t* target;  // nullptr: no target (KD term only)
  acc_t inv_student_temp, kd_coef, ce_coef, beta;
  int64_t divergence, ignore_index;
};

// Per-thread scratch: the row's off-support exponentials (and s's, when the CE has its own temperature), the
// support's student logits and gradient factors.
template <typename acc_t>
struct RowBuffers {
  int64_t padded;
  std::vector<acc_t> b, c, s_support, h;
  RowBuffers(int64_t n_cols, int64_t k, bool own_ce)
      : padded(cpu::padded_size<acc_t>(n_cols)), b(padded), c(own_ce ? padded : 0), s_support(k), h(k) {}
};

// One category's share of D and its gradient factor h = dD / dlog q (the contract's terms, 0 * log 0 = 0).
template <typename acc_t>
acc_t category_terms(int64_t divergence, acc_t beta, acc_t log_p, acc_t log_q, acc_t& h) {
  const acc_t p = std::exp(log_p), q = std::exp(log_q);
  if (divergence == kForwardKl) {
    h = -p;
    return p > 0 ? p * (log_p - log_q) : acc_t(0);
  }
  if (divergence == kReverseKl) {
    h = q > 0 ? q * (log_q - log_p + 1) : acc_t(0);
    return q > 0 ? q * (log_q - log_p) : acc_t(0);
  }
  const acc_t bp = beta * p, oq = (1 - beta) * q, log_m = std::log(bp + oq);
  h = oq > 0 ? oq * (log_q - log_m) : acc_t(0);
  return (bp > 0 ? bp * (log_p - log_m) : acc_t(0)) + (oq > 0 ? oq * (log_q - log_m) : acc_t(0));
}

// One row: its loss, and (kGrad) its gradient written to grad_row in the student's dtype. idx: the row's
// sorted indices from its first live entry (n_live of them); lp: their log-probabilities, lp[n_live] 'rest'.
// kOwnCE: the CE term needs softmax(s) at temperature 1 with its own exponentials (inv_student_temp != 1).
// The mass off S is summed relative to ITS max m_off, so it stays exact when it is far below the row's
// (logits 1e3 apart: float32's exp(z - max) would be 0 there).
template <bool kGrad, bool kOwnCE, typename student_t, typename acc_t>
acc_t sparse_row(const student_t* s_row, const int64_t* idx, const acc_t* lp, int64_t n_live, int64_t y,
                 const Params<acc_t>& p, RowBuffers<acc_t>& buf, student_t* grad_row) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const int64_t C = p.n_cols, Cp = buf.padded;
  const bool has_ce = p.target != nullptr;
  acc_t* B = buf.b.data();
  acc_t* E = buf.c.data();
  acc_t* s_sup = buf.s_support.data();
  acc_t* h = buf.h.data();
  const acc_t inv_t = p.inv_student_temp;

  // Sweep 1: the row converted into B, -inf padded; the support's logits set aside and -inf in B; maxima.
  cpu::load_row(s_row, B, C);
  for (int64_t j = C; j < Cp; ++j) B[j] = kNegInf;
  const acc_t s_y = has_ce ? B[y] : acc_t(0);
  acc_t m_sup = kNegInf;
  for (int64_t a = 0; a < n_live; ++a) {
    s_sup[a] = B[idx[a]];
    m_sup = cpu::max_nan(s_sup[a], m_sup);
    B[idx[a]] = kNegInf;
  }
  const acc_t m_off = cpu::row_max(B, Cp);
  const acc_t ms = cpu::max_nan(m_off, m_sup);
  const bool has_off = m_off != kNegInf;  // false when S covers the row (or the student rules the rest out)
  const acc_t shift_off = has_off ? m_off : acc_t(0);

  // Sweep 2: exp((s - m_off) * inv_t) off S into B (0 on S), summed; own CE: exp(s - ms), summed.
  const Vec v_off(shift_off), vms(ms), vinv_t(inv_t);
  Vec z_off_v(0), zc_v(0);
  for (int64_t j = 0; j < Cp; j += V) {
    const Vec x = Vec::loadu(B + j);
    if constexpr (kOwnCE) {
      const Vec ec = cpu::vexp(x - vms);
      zc_v += ec;
      ec.store(E + j);
    }
    const Vec e = cpu::vexp((x - v_off) * vinv_t);
    z_off_v += e;
    e.store(B + j);
  }
  // The k+1 categories: log Z = log(sum over all j of exp((s_j - ms) * inv_t)), exact on both sides of S.
  const acc_t z_off = cpu::hsum(z_off_v);
  acc_t z_all = has_off ? z_off * std::exp((m_off - ms) * inv_t) : acc_t(0), zc = cpu::hsum(zc_v);
  for (int64_t a = 0; a < n_live; ++a) {
    z_all += std::exp((s_sup[a] - ms) * inv_t);
    if constexpr (kOwnCE) zc += std::exp(s_sup[a] - ms);
  }
  const acc_t log_z = std::log(z_all);
  const acc_t log_q_rest = has_off ? (m_off - ms) * inv_t + std::log(z_off) - log_z : kNegInf;
  acc_t d = 0, h_sum = 0, h_rest = 0;
  for (int64_t a = 0; a < n_live; ++a) {
    d += category_terms(p.divergence, p.beta, lp[a], (s_sup[a] - ms) * inv_t - log_z, h[a]);
    h_sum += h[a];
  }
  d += category_terms(p.divergence, p.beta, lp[n_live], log_q_rest, h_rest);
  h_sum += h_rest;
  acc_t loss = p.kd_coef * d;
  if (!kOwnCE) zc = z_all;  // inv_t == 1: softmax(s) is q
  if (has_ce) loss += p.ce_coef * (std::log(zc) + ms - s_y);
  if constexpr (!kGrad) return loss;

  // Sweep 3, off S: g_j = e_j / z_off * g_kd (h_rest - H q_rest) [+ ce_coef q_j = e_j / z_off * ce_coef q_rest
  // when inv_t == 1] [+ ce_coef ec_j / zc, own CE]. B is 0 on S; the support columns are then written whole.
  const acc_t g_kd = p.kd_coef * inv_t, q_rest = std::exp(log_q_rest);
  const acc_t ce_on_q = (has_ce && !kOwnCE) ? p.ce_coef : acc_t(0);
  const acc_t per_e = has_off ? (g_kd * (h_rest - h_sum * q_rest) + ce_on_q * q_rest) / z_off : acc_t(0);
  const acc_t ce_scale = has_ce ? p.ce_coef / zc : acc_t(0);
  acc_t* G = cpu::grad_target(grad_row, kOwnCE ? E : B);  // the scratch row it overwrites is read first
  const Vec v_per_e(per_e), v_ce(ce_scale);
  for (int64_t j = 0; j < Cp; j += V) {
    Vec g = v_per_e * Vec::loadu(B + j);
    if constexpr (kOwnCE) g = g + v_ce * Vec::loadu(E + j);
    g.store(G + j, std::min(V, C - j));
  }
  for (int64_t a = 0; a < n_live; ++a) {
    const acc_t q_a = std::exp((s_sup[a] - ms) * inv_t - log_z);
    const acc_t ce_a = kOwnCE ? ce_scale * std::exp(s_sup[a] - ms) : ce_on_q * q_a;
    G[idx[a]] = g_kd * (h[a] - q_a * h_sum) + ce_a;
  }
  if (has_ce) G[y] -= p.ce_coef;
  cpu::finish_grad(G, grad_row, C);
  return loss;
}

// The number of leading padding entries of a sorted index row, or -1 when the row breaks the contract
// (an index < -1 or >= C, or live indices not strictly increasing): that row's loss and gradient are NaN.
inline int64_t leading_padding(const int64_t* idx, int64_t k, int64_t C) {
  int64_t n_pad = 0;
  while (n_pad < k && idx[n_pad] == -1) ++n_pad;
  for (int64_t a = n_pad; a < k; ++a) {
    if (idx[a] < 0 || idx[a] >= C || (a > n_pad && idx[a] <= idx[a - 1])) return -1;
  }
  return n_pad;
}

template <typename student_t, typename acc_t>
void sparse_rows(const student_t* student, const int64_t* indices, const acc_t* log_p, const Params<acc_t>& p,
                 acc_t* row_loss, student_t* grad, bool compute_grad) {
  const int64_t C = p.n_cols, k = p.k;
  const bool own_ce = p.target != nullptr && p.inv_student_temp != acc_t(1);
  // Enough columns per task that thread start-up is paid back (small C: one thread).
  const int64_t grain = std::max<int64_t>(1, 32768 / C);
  at::parallel_for(0, p.n_rows, grain, [&](int64_t begin, int64_t end) {
    RowBuffers<acc_t> buf(C, k, own_ce);
    for (int64_t i = begin; i < end; ++i) {
      const student_t* s_row = student + i * p.student_row_stride;
      student_t* g_row = compute_grad ? grad + i * C : nullptr;
      const int64_t* idx = indices + i * k;
      const acc_t* lp = log_p + i * (k + 1);
      const int64_t y = p.target ? p.target[i] : 0;
      if (p.target && y == p.ignore_index) {
        row_loss[i] = 0;
        if (compute_grad) std::memset(static_cast<void*>(g_row), 0, C * sizeof(student_t));
        continue;
      }
      const int64_t n_pad = leading_padding(idx, k, C);
      if (n_pad < 0 || y < 0 || y >= C) {  // the Python layer rejects these earlier on CPU; never read out of bounds
        row_loss[i] = std::numeric_limits<acc_t>::quiet_NaN();
        if (compute_grad) std::fill(g_row, g_row + C, static_cast<student_t>(NAN));
        continue;
      }
      const int64_t n_live = k - n_pad;
      if (own_ce) {
        row_loss[i] = compute_grad ? sparse_row<true, true>(s_row, idx + n_pad, lp + n_pad, n_live, y, p, buf, g_row)
                                   : sparse_row<false, true>(s_row, idx + n_pad, lp + n_pad, n_live, y, p, buf, g_row);
      } else {
        row_loss[i] = compute_grad ? sparse_row<true, false>(s_row, idx + n_pad, lp + n_pad, n_live, y, p, buf, g_row)
                                   : sparse_row<false, false>(s_row, idx + n_pad, lp + n_pad, n_live, y, p, buf, g_row);
      }
    }
  });
}

constexpr const char* kOp = "sparse_kd_loss_fwd";

// The CPU kernel; on meta tensors (torch.compile tracing, opcheck) the output shapes and dtypes only.
std::tuple<at::Tensor, at::Tensor> sparse_kd_loss_fwd_cpu(const at::Tensor& student, const at::Tensor& indices,
                                                          const at::Tensor& log_p,
                                                          const std::optional<at::Tensor>& target_in,
                                                          double inv_student_temp, double kd_coef, double ce_coef,
                                                          int64_t divergence, double beta, int64_t ignore_index,
                                                          bool compute_grad) {
  // The check requires unit stride along classes (any row stride), so the student is read in place.
  check_sparse_kd_loss_args(kOp, student, indices, log_p, target_in, inv_student_temp, kd_coef, ce_coef,
                            divergence, beta);
  if (student.is_meta()) return kd_outputs(student, compute_grad, acc_dtype(student.scalar_type()));
  TORCH_CHECK_VALUE(student.device().is_cpu(), kOp, ": the CPU kernel takes CPU tensors only");
  cpu::check_cpu_supports_build();
  at::Tensor target;
  if (target_in.has_value()) target = target_in->contiguous();

  const int64_t N = student.size(0), C = student.size(1);
  auto [row_loss, grad] = kd_outputs(student, compute_grad, acc_dtype(student.scalar_type()));
  if (N == 0) return {row_loss, grad};

  dispatch_float<true>(student.scalar_type(), kOp, "student", [&](auto s_tag) {
    using student_t = typename decltype(s_tag)::type;
    using acc_t = cpu::acc_type<student_t>;
    const Params<acc_t> p{N, C, indices.size(1), student.stride(0),
                          target.defined() ? target.const_data_ptr<int64_t>() : nullptr,
                          acc_t(inv_student_temp), acc_t(kd_coef), acc_t(ce_coef), acc_t(beta), divergence,
                          ignore_index};
    sparse_rows<student_t, acc_t>(student.const_data_ptr<student_t>(), indices.const_data_ptr<int64_t>(),
                                  log_p.const_data_ptr<acc_t>(), p, row_loss.mutable_data_ptr<acc_t>(),
                                  compute_grad ? grad.mutable_data_ptr<student_t>() : nullptr, compute_grad);
  });
  return {row_loss, grad};
}

}  // namespace
}  // namespace ued_fast

TORCH_LIBRARY_FRAGMENT(ued_fast, m) {
  m.def(
      "sparse_kd_loss_fwd(Tensor student, Tensor indices, Tensor log_p, Tensor? target, float inv_student_temp, "
      "float kd_coef, float ce_coef, int divergence, float beta, int ignore_index, bool compute_grad) "
      "-> (Tensor, Tensor)");
  m.impl("sparse_kd_loss_fwd", torch::dispatch(c10::DispatchKey::Meta, TORCH_FN(ued_fast::sparse_kd_loss_fwd_cpu)));
}

TORCH_LIBRARY_IMPL(ued_fast, CPU, m) {
  m.impl("sparse_kd_loss_fwd", &ued_fast::sparse_kd_loss_fwd_cpu);
}
