// kd_loss_fwd: the C++ CPU kernel of the fused knowledge-distillation loss (DESIGN 2.1).
// The contract (shapes, dtypes, what the two outputs hold) is in ued_fast/ops/kd_loss.py; the spec
// is ued_fast.reference.kd_loss_reference.
//
// Per row, with a = teacher/T (log(teacher)/T for probs), b = s/T, c = s:
//   KL  = sum_j p_j (log p_j - log q_j) = W/Za - log Za + log Zb,
//         W = sum_j exp(a_j - ma) * ((a_j - ma) - (b_j - mb))      (0 where p_j = 0: 0 log 0 = 0)
//   CE  = log Zc - (s_y - mc)
//   row = alpha*s2*KL + (1-alpha)*CE        (s2*KL when target is None)
//   grad_j = alpha*(s2/T)*(q_j - p_j) + (1-alpha)*(softmax(s)_j - [j == y])
// Three sweeps over the row: load (convert to the accumulation type) and maxima, exponentials and
// sums, gradient. Student and teacher are read from memory once, by the first; the row then sits in
// per-thread buffers in L1/L2 (3 rows of floats: 384 KiB at C = 32000). Taking the maxima first
// from cache costs less than an online max, which rescales the running sums with an extra exp.
// Shifting by the maxima keeps logits of magnitude 1e4 finite; writing W with shifted terms keeps
// the KL free of the cancellation a sum of p*(a-b) of unshifted logits would suffer.
//
// Vector width: ATen's Vectorized follows the compile-time CPU_CAPABILITY that setup.py sets
// (AVX2+FMA by default on x86-64, see the comment there). On a CPU without that capability the
// kernel raises a clear error at its first call (best effort: other code built with the same flags
// may hit an illegal instruction first).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace ued_fast {
namespace {

using at::vec::Vectorized;

// The teacher_kind codes of the Python layer (ued_fast.reference.TEACHER_KINDS order).
constexpr int64_t kLogits = 0, kLogProbs = 1, kProbs = 2;

template <typename acc_t>
inline Vectorized<acc_t> fast_exp(const Vectorized<acc_t>& x) {
  // exp_u20: inline polynomial, ~2e-6 relative error, 0 for x < ln(FLT_MIN) and for -inf.
  if constexpr (std::is_same_v<acc_t, float>) {
    return x.exp_u20();
  } else {
    return x.exp();
  }
}

// src[0, n) converted to the accumulation type into dst.
template <typename scalar_t, typename acc_t>
inline void load_row(const scalar_t* src, acc_t* dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::memcpy(dst, src, n * sizeof(acc_t));
  } else if constexpr (std::is_same_v<acc_t, float> && at::vec::is_reduced_floating_point_v<scalar_t>) {
    constexpr int64_t V = Vectorized<float>::size();
    int64_t j = 0;
    for (; j + V <= n; j += V) {
      Vectorized<float> v;
      at::vec::load_to_float(src + j, v);
      v.store(dst + j);
    }
    for (; j < n; ++j) dst[j] = static_cast<float>(src[j]);
  } else {
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<acc_t>(src[j]);
  }
}

template <typename acc_t>
inline acc_t max_nan(acc_t x, acc_t y) {
  return (x != x || x > y) ? x : y;  // NaN wins, so a NaN input gives a NaN loss
}

template <typename acc_t>
inline acc_t row_max(const acc_t* x, int64_t padded) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  Vec m(-std::numeric_limits<acc_t>::infinity());
  for (int64_t j = 0; j < padded; j += V) m = at::vec::maximum(m, Vec::loadu(x + j));
  acc_t lanes[V];
  m.store(lanes);
  acc_t r = lanes[0];
  for (int64_t k = 1; k < V; ++k) r = max_nan(r, lanes[k]);
  return r;
}

template <typename acc_t>
inline acc_t hsum(const Vectorized<acc_t>& v) {
  constexpr int64_t V = Vectorized<acc_t>::size();
  acc_t lanes[V];
  v.store(lanes);
  acc_t r = 0;
  for (int64_t k = 0; k < V; ++k) r += lanes[k];
  return r;
}

struct Params {
  int64_t n_rows, n_cols;
  int64_t student_row_stride, teacher_row_stride;
  const int64_t* target;  // nullptr: no target (pure KL)
  double temperature, alpha;
  bool t2_scale;
  int64_t ignore_index, teacher_kind;
};

// Per-thread scratch: three rows of the accumulation type, padded to whole vectors.
template <typename acc_t>
struct RowBuffers {
  int64_t padded;
  std::vector<acc_t> a, b, c;
  explicit RowBuffers(int64_t n_cols)
      : padded((n_cols + Vectorized<acc_t>::size() - 1) / Vectorized<acc_t>::size() *
               Vectorized<acc_t>::size()),
        a(padded), b(padded), c(padded) {}
};

// One row: loss returned, gradient (when kGrad) written to grad_row in the student's dtype.
// kCE: the row has a cross-entropy term (target given, alpha < 1).
template <bool kCE, bool kGrad, typename student_t, typename teacher_t, typename acc_t>
acc_t kd_row(const student_t* s_row, const teacher_t* t_row, int64_t y, const Params& p,
             RowBuffers<acc_t>& buf, student_t* grad_row) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const int64_t C = p.n_cols, Cp = buf.padded;
  const acc_t inv_t = acc_t(1) / static_cast<acc_t>(p.temperature);
  const acc_t s2 = p.t2_scale ? static_cast<acc_t>(p.temperature * p.temperature) : acc_t(1);
  const acc_t kl_weight = p.target ? static_cast<acc_t>(p.alpha) * s2 : s2;
  const acc_t ce_weight = kCE ? acc_t(1) - static_cast<acc_t>(p.alpha) : acc_t(0);
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  acc_t* A = buf.a.data();
  acc_t* B = buf.b.data();
  acc_t* E = buf.c.data();

  // Sweep 1: load, tempered teacher log-weights a, maxima. Padding lanes are -inf (exp -> 0).
  load_row(t_row, A, C);
  load_row(s_row, B, C);
  const Vec vinv_t(inv_t);
  if (p.teacher_kind == kProbs) {
    for (int64_t j = 0; j < C - C % V; j += V) (Vec::loadu(A + j).log() * vinv_t).store(A + j);
    for (int64_t j = C - C % V; j < C; ++j) A[j] = std::log(A[j]) * inv_t;  // log 0 = -inf
  } else {
    for (int64_t j = 0; j < C - C % V; j += V) (Vec::loadu(A + j) * vinv_t).store(A + j);
    for (int64_t j = C - C % V; j < C; ++j) A[j] = A[j] * inv_t;
  }
  for (int64_t j = C; j < Cp; ++j) A[j] = B[j] = neg_inf;
  const acc_t ma = row_max(A, Cp);
  const acc_t ms = row_max(B, Cp);
  const acc_t s_y = kCE ? B[y] : acc_t(0);

  // Sweep 2: exponentials (kept for sweep 3) and their sums.
  const Vec vma(ma), vms(ms), zero(0);
  Vec za(0), zb(0), zc(0), w(0);
  for (int64_t j = 0; j < Cp; j += V) {
    const Vec da = Vec::loadu(A + j) - vma;
    const Vec ds = Vec::loadu(B + j) - vms;
    const Vec db = ds * vinv_t;
    const Vec ea = fast_exp(da);
    const Vec eb = fast_exp(db);
    za += ea;
    zb += eb;
    // 0 * log 0 = 0: drop the term where p_j = 0 (a_j = -inf would make it NaN).
    w += Vec::blendv(ea * (da - db), zero, ea == zero);
    if constexpr (kGrad) {
      ea.store(A + j);
      eb.store(B + j);
    }
    if constexpr (kCE) {
      const Vec ec = fast_exp(ds);
      zc += ec;
      if constexpr (kGrad) ec.store(E + j);
    }
  }
  const acc_t Za = hsum(za), Zb = hsum(zb), W = hsum(w);
  const acc_t kl = W / Za - std::log(Za) + std::log(Zb);
  acc_t loss = kl_weight * kl;
  acc_t Zc = 1;
  if constexpr (kCE) {
    Zc = hsum(zc);
    loss += ce_weight * (std::log(Zc) - (s_y - ms));
  }

  // Sweep 3: grad_j = kl_weight/T * (eb_j/Zb - ea_j/Za) + ce_weight * (ec_j/Zc - [j == y]).
  if constexpr (kGrad) {
    const acc_t cq = kl_weight * inv_t / Zb, cp = kl_weight * inv_t / Za;
    const acc_t cs = kCE ? ce_weight / Zc : acc_t(0);
    const acc_t g_y = kCE ? cq * B[y] - cp * A[y] + cs * E[y] - ce_weight : acc_t(0);
    const Vec vcq(cq), vcp(cp), vcs(cs);
    // Same dtype: write the gradient straight to the output; else through A, then convert.
    acc_t* G;
    if constexpr (std::is_same_v<student_t, acc_t>) {
      G = grad_row;
    } else {
      G = A;
    }
    for (int64_t j = 0; j < Cp; j += V) {
      Vec g = vcq * Vec::loadu(B + j) - vcp * Vec::loadu(A + j);
      if constexpr (kCE) g = g + vcs * Vec::loadu(E + j);
      if (j + V <= C) {
        g.store(G + j);
      } else {
        g.store(G + j, C - j);
      }
    }
    if constexpr (kCE) G[y] = g_y;
    if constexpr (!std::is_same_v<student_t, acc_t>) at::vec::convert(G, grad_row, C);
  }
  return loss;
}

template <typename student_t, typename teacher_t, typename acc_t>
void kd_loss_rows(const student_t* student, const teacher_t* teacher, const Params& p, acc_t* row_loss,
                  student_t* grad, bool compute_grad) {
  const int64_t C = p.n_cols;
  const bool has_ce = p.target != nullptr && p.alpha < 1.0;
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

// Calls f(scalar_t{}) for the floating dtypes the op takes.
template <typename F>
void dispatch_float(at::ScalarType t, const char* name, F&& f) {
  switch (t) {
    case at::kFloat: return f(float{});
    case at::kDouble: return f(double{});
    case at::kBFloat16: return f(c10::BFloat16{});
    case at::kHalf: return f(c10::Half{});
    default: TORCH_CHECK_TYPE(false, "kd_loss_fwd: ", name, " must be float32, float64, bfloat16 or float16, got ", t);
  }
}

void check_cpu_supports_build() {
#if defined(__AVX2__) && (defined(__GNUC__) || defined(__clang__))
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  TORCH_CHECK(ok, "ued_fast._C was built for AVX2+FMA (x86-64-v3) but this CPU lacks them; rebuild with "
                  "UED_FAST_CPU_ARCH=x86-64 (see setup.py)");
#endif
#if defined(__AVX512F__) && (defined(__GNUC__) || defined(__clang__))
  static const bool ok512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                            __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  TORCH_CHECK(ok512, "ued_fast._C was built for AVX-512 but this CPU lacks it; rebuild with "
                     "UED_FAST_CPU_ARCH=x86-64-v3 (see setup.py)");
#endif
}

void check_args(const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& target,
                double temperature, double alpha, int64_t teacher_kind) {
  TORCH_CHECK_VALUE(student.dim() == 2, "kd_loss_fwd: student must be 2-D [N, C], got ", student.sizes());
  TORCH_CHECK_VALUE(teacher.sizes() == student.sizes(), "kd_loss_fwd: teacher has shape ", teacher.sizes(),
                    " but student has ", student.sizes());
  TORCH_CHECK_VALUE(student.size(1) > 0, "kd_loss_fwd: student has no classes");
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0,
                    "kd_loss_fwd: temperature must be finite and > 0, got ", temperature);
  TORCH_CHECK_VALUE(alpha >= 0 && alpha <= 1, "kd_loss_fwd: alpha must be in [0, 1], got ", alpha);
  TORCH_CHECK_VALUE(teacher_kind >= kLogits && teacher_kind <= kProbs,
                    "kd_loss_fwd: teacher_kind must be 0 (logits), 1 (log_probs) or 2 (probs), got ", teacher_kind);
  if (target.has_value()) {
    TORCH_CHECK_TYPE(target->scalar_type() == at::kLong, "kd_loss_fwd: target must be int64, got ",
                     target->scalar_type());
    TORCH_CHECK_VALUE(target->dim() == 1 && target->size(0) == student.size(0),
                      "kd_loss_fwd: target must be [N] with N = ", student.size(0), ", got ", target->sizes());
  }
}

std::tuple<at::Tensor, at::Tensor> kd_loss_fwd_cpu(const at::Tensor& student_in, const at::Tensor& teacher_in,
                                                   const std::optional<at::Tensor>& target_in,
                                                   double temperature, double alpha, bool t2_scale,
                                                   int64_t ignore_index, int64_t teacher_kind,
                                                   bool compute_grad) {
  check_args(student_in, teacher_in, target_in, temperature, alpha, teacher_kind);
  TORCH_CHECK_VALUE(student_in.device().is_cpu() && teacher_in.device().is_cpu() &&
                        (!target_in.has_value() || target_in->device().is_cpu()),
                    "kd_loss_fwd: the CPU kernel takes CPU tensors only");
  check_cpu_supports_build();
  // Any row stride is fine; the class dimension must be dense.
  const at::Tensor student = student_in.stride(1) == 1 ? student_in : student_in.contiguous();
  const at::Tensor teacher = teacher_in.stride(1) == 1 ? teacher_in : teacher_in.contiguous();
  at::Tensor target;
  if (target_in.has_value()) target = target_in->contiguous();

  const int64_t N = student.size(0), C = student.size(1);
  const auto acc_dtype = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor row_loss = at::empty({N}, student.options().dtype(acc_dtype));
  at::Tensor grad = compute_grad ? at::empty({N, C}, student.options()) : at::empty({0}, student.options());
  if (N == 0) return {row_loss, grad};

  Params p{N, C, student.stride(0), teacher.stride(0), target.defined() ? target.data_ptr<int64_t>() : nullptr,
           temperature, alpha, t2_scale, ignore_index, teacher_kind};
  dispatch_float(student.scalar_type(), "student", [&](auto s_tag) {
    using student_t = decltype(s_tag);
    using acc_t = std::conditional_t<std::is_same_v<student_t, double>, double, float>;
    dispatch_float(teacher.scalar_type(), "teacher", [&](auto t_tag) {
      using teacher_t = decltype(t_tag);
      kd_loss_rows<student_t, teacher_t, acc_t>(
          student.const_data_ptr<student_t>(), teacher.const_data_ptr<teacher_t>(), p,
          row_loss.mutable_data_ptr<acc_t>(), compute_grad ? grad.mutable_data_ptr<student_t>() : nullptr,
          compute_grad);
    });
  });
  return {row_loss, grad};
}

// Shapes and dtypes only (torch.compile tracing, opcheck).
std::tuple<at::Tensor, at::Tensor> kd_loss_fwd_meta(const at::Tensor& student, const at::Tensor& teacher,
                                                    const std::optional<at::Tensor>& target, double temperature,
                                                    double alpha, bool t2_scale, int64_t ignore_index,
                                                    int64_t teacher_kind, bool compute_grad) {
  check_args(student, teacher, target, temperature, alpha, teacher_kind);
  const auto acc_dtype = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor row_loss = at::empty({student.size(0)}, student.options().dtype(acc_dtype));
  at::Tensor grad = compute_grad ? at::empty(student.sizes(), student.options()) : at::empty({0}, student.options());
  return {row_loss, grad};
}

}  // namespace
}  // namespace ued_fast

TORCH_LIBRARY_FRAGMENT(ued_fast, m) {
  m.def(
      "kd_loss_fwd(Tensor student, Tensor teacher, Tensor? target, float temperature, float alpha, "
      "bool t2_scale, int ignore_index, int teacher_kind, bool compute_grad) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ued_fast, CPU, m) {
  m.impl("kd_loss_fwd", &ued_fast::kd_loss_fwd_cpu);
}

TORCH_LIBRARY_IMPL(ued_fast, Meta, m) {
  m.impl("kd_loss_fwd", &ued_fast::kd_loss_fwd_meta);
}
