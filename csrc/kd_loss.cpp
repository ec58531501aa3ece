// kd_loss_fwd: the C++ CPU kernel of the fused knowledge-distillation loss (DESIGN 2.1) and the op's
// schema. Arguments and semantics: the kernel contract, docs/DESIGN.md 2 (the coefficients arrive computed on the host); the spec
// is ued_fast.reference.kd_loss_reference.
//
// Per row, with a = teacher * inv_teacher_temp (log(teacher) * inv_teacher_temp for probs),
// b = s * inv_student_temp, c = s, p = softmax(a), q = softmax(b):
//   forward_kl: D = sum_j p_j (log p_j - log q_j) = W/Za - log Za + log Zb,
//               W = sum_j exp(a_j - ma) * ((a_j - ma) - (b_j - mb))   (0 where p_j = 0: 0 log 0 = 0)
//   reverse_kl, jsd: cpu::divergence_terms on log p and log q per element (one more sweep)
//   CE  = log Zc - (s_y - mc)
//   row = kd_coef*D + ce_coef*CE,   grad = kd_coef*inv_student_temp*dD/db + ce_coef*(softmax(s) - onehot(y))
// forward_kl: three sweeps over the row: load (convert to the accumulation type) and maxima,
// exponentials and sums, gradient. Student and teacher are read from memory once, by the first; the
// row then sits in per-thread buffers in L1/L2 (3 rows of floats: 384 KiB at C = 32000). Taking the
// maxima first from cache costs less than an online max, which rescales the running sums with an
// extra exp. Shifting by the maxima keeps logits of magnitude 1e4 finite; writing W with shifted terms
// keeps the KL free of the cancellation a sum of p*(a-b) of unshifted logits would suffer.
// reverse_kl and jsd: the sums of sweep 2 give log p and log q per element in sweep 3, which
// accumulates D and S = sum q h and keeps q and h; sweep 4 writes q (h - S).
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
  int64_t n_rows, n_cols;
  int64_t student_row_stride, teacher_row_stride;
  const int64_t* target;  // nullptr: no target (KD term only)
  acc_t inv_student_temp, inv_teacher_temp, kd_coef, ce_coef, beta;
  int64_t divergence, ignore_index, teacher_kind;
};

// Per-thread scratch: three rows of the accumulation type, padded to whole vectors.
template <typename acc_t>
struct RowBuffers {
  int64_t padded;
  std::vector<acc_t> a, b, c;
  explicit RowBuffers(int64_t n_cols) : padded(cpu::padded_size<acc_t>(n_cols)), a(padded), b(padded), c(padded) {}
  std::tuple<acc_t*, acc_t*, acc_t*> rows() { return {a.data(), b.data(), c.data()}; }
};

template <typename acc_t>
struct RowMax {
  acc_t teacher, student;
};

// Sweep 1: the row loaded, tempered teacher log-weights a in A, student s in B, padding lanes -inf;
// returns the maxima of a and s.
template <typename student_t, typename teacher_t, typename acc_t>
RowMax<acc_t> load_tempered(const student_t* s_row, const teacher_t* t_row, const Params<acc_t>& p, acc_t* A, acc_t* B,
                   int64_t Cp) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const int64_t C = p.n_cols;
  const acc_t inv_t = p.inv_teacher_temp;
  cpu::load_row(t_row, A, C);
  cpu::load_row(s_row, B, C);
  const Vec vinv_t(inv_t);
  if (p.teacher_kind == kTeacherProbs) {
    for (int64_t j = 0; j < C - C % V; j += V) (Vec::loadu(A + j).log() * vinv_t).store(A + j);
    for (int64_t j = C - C % V; j < C; ++j) A[j] = std::log(A[j]) * inv_t;  // log 0 = -inf
  } else {
    for (int64_t j = 0; j < C - C % V; j += V) (Vec::loadu(A + j) * vinv_t).store(A + j);
    for (int64_t j = C - C % V; j < C; ++j) A[j] = A[j] * inv_t;
  }
  for (int64_t j = C; j < Cp; ++j) A[j] = B[j] = -std::numeric_limits<acc_t>::infinity();
  return {cpu::row_max(A, Cp), cpu::row_max(B, Cp)};
}

// One row: loss returned, gradient (when kGrad) written to grad_row in the student's dtype.
// kCE: the row has a cross-entropy term (target given, ce_coef > 0).
// forward_kl: sweep 2 keeps the exponentials and W; sweep 3 writes the gradient.
// reverse_kl / jsd (see cpu::divergence_terms): sweep 2 takes only the sums; sweep 3 forms log p,
// log q, p and q per element, D and S = sum q h, and keeps q (in B) and h (in A) for sweep 4.
template <bool kCE, bool kGrad, typename student_t, typename teacher_t, typename acc_t>
acc_t kd_row(const student_t* s_row, const teacher_t* t_row, int64_t y, const Params<acc_t>& p,
             RowBuffers<acc_t>& buf, student_t* grad_row) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const int64_t C = p.n_cols, Cp = buf.padded;
  auto [A, B, E] = buf.rows();
  const auto [ma, ms] = load_tempered(s_row, t_row, p, A, B, Cp);
  const acc_t s_y = kCE ? B[y] : acc_t(0);
  const bool forward_kl = p.divergence == kForwardKl;
  const Vec vma(ma), vms(ms), vinv_s(p.inv_student_temp), zero(0);
  const acc_t g_kd = p.kd_coef * p.inv_student_temp;
  Vec za(0), zb(0), zc(0);
  acc_t loss, Za = 1, Zb = 1, S = 0;
  // softmax(s)'s exponentials (kept for the gradient) and their sum, for the CE term.
  auto add_ce = [&](const Vec& ds, int64_t j) {
    if constexpr (kCE) {
      const Vec ec = cpu::vexp(ds);
      zc += ec;
      if constexpr (kGrad) ec.store(E + j);
    }
  };

  if (forward_kl) {
    // Sweep 2: exponentials (kept for sweep 3) and their sums.
    Vec w(0);
    for (int64_t j = 0; j < Cp; j += V) {
      const Vec da = Vec::loadu(A + j) - vma;
      const Vec ds = Vec::loadu(B + j) - vms;
      const Vec db = ds * vinv_s;
      const Vec ea = cpu::vexp(da);
      const Vec eb = cpu::vexp(db);
      za += ea;
      zb += eb;
      // 0 * log 0 = 0: drop the term where p_j = 0 (a_j = -inf would make it NaN).
      w += Vec::blendv(ea * (da - db), zero, ea == zero);
      if constexpr (kGrad) {
        ea.store(A + j);
        eb.store(B + j);
      }
      add_ce(ds, j);
    }
    Za = cpu::hsum(za);
    Zb = cpu::hsum(zb);
    loss = p.kd_coef * (cpu::hsum(w) / Za - std::log(Za) + std::log(Zb));
  } else {
    // Sweep 2: the three sums of exponentials (softmax(s)'s numerators kept for the gradient).
    for (int64_t j = 0; j < Cp; j += V) {
      const Vec ds = Vec::loadu(B + j) - vms;
      za += cpu::vexp(Vec::loadu(A + j) - vma);
      zb += cpu::vexp(ds * vinv_s);
      add_ce(ds, j);
    }
    // Sweep 3: log p, log q, the divergence and S = sum_j q_j h_j.
    const bool jsd = p.divergence == kJsd;
    const Vec v_lpa(ma + std::log(cpu::hsum(za))), v_lqb(std::log(cpu::hsum(zb)));
    const Vec vbeta(p.beta), vobeta(acc_t(1) - p.beta);
    Vec d(0), s(0);
    for (int64_t j = 0; j < Cp; j += V) {
      const Vec log_p = Vec::loadu(A + j) - v_lpa;
      const Vec log_q = (Vec::loadu(B + j) - vms) * vinv_s - v_lqb;
      const Vec pj = cpu::vexp(log_p), qj = cpu::vexp(log_q);
      Vec h;
      // Padding lanes: p = q = 0, so they add nothing.
      d += cpu::divergence_terms(jsd, vbeta, vobeta, pj, log_p, qj, log_q, h);
      s += Vec::blendv(qj * h, zero, qj == zero);
      if constexpr (kGrad) {
        h.store(A + j);
        qj.store(B + j);
      }
    }
    loss = p.kd_coef * cpu::hsum(d);
    S = cpu::hsum(s);
  }
  acc_t Zc = 1;
  if constexpr (kCE) {
    Zc = cpu::hsum(zc);
    loss += p.ce_coef * (std::log(Zc) - (s_y - ms));
  }
  if constexpr (!kGrad) return loss;

  // Last sweep, the gradient: + ce_coef * (ec_j/Zc - [j == y]) and
  //   forward_kl: g_kd * (eb_j/Zb - ea_j/Za);   reverse_kl, jsd: g_kd * q_j (h_j - S).
  const Vec vcs(kCE ? p.ce_coef / Zc : acc_t(0));
  acc_t* G = cpu::grad_target(grad_row, A);
  acc_t g_y = 0;
  if (forward_kl) {
    const Vec vcq(g_kd / Zb), vcp(g_kd / Za);
    if constexpr (kCE) g_y = g_kd / Zb * B[y] - g_kd / Za * A[y] + p.ce_coef / Zc * E[y] - p.ce_coef;  // before G = A
    for (int64_t j = 0; j < Cp; j += V) {
      Vec g = vcq * Vec::loadu(B + j) - vcp * Vec::loadu(A + j);
      if constexpr (kCE) g = g + vcs * Vec::loadu(E + j);
      g.store(G + j, std::min(V, C - j));
    }
  } else {
    const Vec v_gkd(g_kd), v_s(S);
    for (int64_t j = 0; j < Cp; j += V) {
      const Vec q = Vec::loadu(B + j);
      Vec g = v_gkd * Vec::blendv(q * (Vec::loadu(A + j) - v_s), zero, q == zero);
      if constexpr (kCE) g = g + vcs * Vec::loadu(E + j);
      g.store(G + j, std::min(V, C - j));
    }
    if constexpr (kCE) g_y = G[y] - p.ce_coef;
  }
  if constexpr (kCE) G[y] = g_y;
  cpu::finish_grad(G, grad_row, C);
  return loss;
}

template <typename student_t, typename teacher_t, typename acc_t>
void kd_loss_rows(const student_t* student, const teacher_t* teacher, const Params<acc_t>& p, acc_t* row_loss,
                  student_t* grad, bool compute_grad) {
  const int64_t C = p.n_cols;
  const bool has_ce = p.target != nullptr && p.ce_coef > 0;
  // Enough columns per task that thread start-up is paid back (small C: one thread).
  const int64_t grain = std::max<int64_t>(1, 32768 / C);
  at::parallel_for(0, p.n_rows, grain, [&](int64_t begin, int64_t end) {
    RowBuffers<acc_t> buf(C);
    for (int64_t i = begin; i < end; ++i) {
      const student_t* s_row = student + i * p.student_row_stride;
      const teacher_t* t_row = teacher + i * p.teacher_row_stride;
      student_t* g_row = compute_grad ? grad + i * C : nullptr;
      int64_t y = 0;
      if (p.target) {
        y = p.target[i];
        if (y == p.ignore_index) {
          row_loss[i] = 0;
          if (compute_grad) std::memset(static_cast<void*>(g_row), 0, C * sizeof(student_t));
          continue;
        }
        if (y < 0 || y >= C) {  // the Python layer rejects this earlier; never read out of bounds
          row_loss[i] = std::numeric_limits<acc_t>::quiet_NaN();
          if (compute_grad) std::fill(g_row, g_row + C, static_cast<student_t>(NAN));
          continue;
        }
      }
      if (has_ce) {
        row_loss[i] = compute_grad ? kd_row<true, true>(s_row, t_row, y, p, buf, g_row)
                                   : kd_row<true, false>(s_row, t_row, y, p, buf, g_row);
      } else {
        row_loss[i] = compute_grad ? kd_row<false, true>(s_row, t_row, y, p, buf, g_row)
                                   : kd_row<false, false>(s_row, t_row, y, p, buf, g_row);
      }
    }
  });
}

constexpr const char* kOp = "kd_loss_fwd";

// The CPU kernel; on meta tensors (torch.compile tracing, opcheck) the output shapes and dtypes only.
std::tuple<at::Tensor, at::Tensor> kd_loss_fwd_cpu(const at::Tensor& student_in, const at::Tensor& teacher_in,
                                                   const std::optional<at::Tensor>& target_in,
                                                   double inv_student_temp, double inv_teacher_temp, double kd_coef,
                                                   double ce_coef, int64_t divergence, double beta,
                                                   int64_t ignore_index, int64_t teacher_kind, bool compute_grad) {
  check_kd_loss_args(kOp, student_in, teacher_in, target_in, inv_student_temp, inv_teacher_temp, kd_coef, ce_coef,
                     divergence, beta, teacher_kind);
  if (student_in.is_meta()) return kd_outputs(student_in, compute_grad, acc_dtype(student_in.scalar_type()));
  TORCH_CHECK_VALUE(student_in.device().is_cpu(), "kd_loss_fwd: the CPU kernel takes CPU tensors only");
  cpu::check_cpu_supports_build();
  // Any row stride is fine; the class dimension must be dense.
  const at::Tensor student = student_in.stride(1) == 1 ? student_in : student_in.contiguous();
  const at::Tensor teacher = teacher_in.stride(1) == 1 ? teacher_in : teacher_in.contiguous();
  at::Tensor target;
  if (target_in.has_value()) target = target_in->contiguous();

  const int64_t N = student.size(0), C = student.size(1);
  auto [row_loss, grad] = kd_outputs(student, compute_grad, acc_dtype(student.scalar_type()));
  if (N == 0) return {row_loss, grad};

  dispatch_float<true>(student.scalar_type(), kOp, "student", [&](auto s_tag) {
    using student_t = typename decltype(s_tag)::type;
    using acc_t = cpu::acc_type<student_t>;
    const Params<acc_t> p{N, C, student.stride(0), teacher.stride(0),
                          target.defined() ? target.const_data_ptr<int64_t>() : nullptr,
                          acc_t(inv_student_temp), acc_t(inv_teacher_temp), acc_t(kd_coef), acc_t(ce_coef),
                          acc_t(beta), divergence, ignore_index, teacher_kind};
    dispatch_float<true>(teacher.scalar_type(), kOp, "teacher", [&](auto t_tag) {
      using teacher_t = typename decltype(t_tag)::type;
      kd_loss_rows<student_t, teacher_t, acc_t>(
          student.const_data_ptr<student_t>(), teacher.const_data_ptr<teacher_t>(), p,
          row_loss.mutable_data_ptr<acc_t>(), compute_grad ? grad.mutable_data_ptr<student_t>() : nullptr,
          compute_grad);
    });
  });
  return {row_loss, grad};
}

}  // namespace
}  // namespace ued_fast

TORCH_LIBRARY_FRAGMENT(ued_fast, m) {
  m.def(
      "kd_loss_fwd(Tensor student, Tensor teacher, Tensor? target, float inv_student_temp, float inv_teacher_temp, "
      "float kd_coef, float ce_coef, int divergence, float beta, int ignore_index, int teacher_kind, "
      "bool compute_grad) -> (Tensor, Tensor)");
  m.impl("kd_loss_fwd", torch::dispatch(c10::DispatchKey::Meta, TORCH_FN(ued_fast::kd_loss_fwd_cpu)));
}

TORCH_LIBRARY_IMPL(ued_fast, CPU, m) {
  m.impl("kd_loss_fwd", &ued_fast::kd_loss_fwd_cpu);
}
