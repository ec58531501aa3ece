// Host-side helpers shared by every ued_fast kernel (C++ CPU and CUDA): the floating
// dtype dispatch and the argument checks of the KD ops. No vector or device code here (cpu_vec.h,
// cuda_utils.cuh).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <optional>

#include "codes.h"

namespace ued_fast {

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}) with T the c10 type of a floating dtype (float, double, c10::BFloat16,
// c10::Half); float64 only when kAllowDouble (the CUDA kernels compute in float32; f is then never
// instantiated for double).
template <bool kAllowDouble, typename F>
void dispatch_float(at::ScalarType t, const char* op, const char* name, F&& f) {
  switch (t) {
    case at::kFloat: return f(TypeTag<float>{});
    case at::kBFloat16: return f(TypeTag<c10::BFloat16>{});
    case at::kHalf: return f(TypeTag<c10::Half>{});
    case at::kDouble:
      if constexpr (kAllowDouble) return f(TypeTag<double>{});
      [[fallthrough]];
    default:
      TORCH_CHECK_TYPE(false, op, ": ", name, " must be float32, ", kAllowDouble ? "float64, " : "",
                       "bfloat16 or float16, got ", t);
  }
}

// Accumulation dtype of a kernel: float64 for float64 inputs, float32 otherwise.
inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// The host-computed KD coefficients (docs/DESIGN.md 2, the kernel contract), checked once per call.
inline void check_kd_coefficients(const char* op, double inv_student_temp, double inv_teacher_temp, double kd_coef,
                                  double ce_coef, int64_t divergence, double beta) {
  TORCH_CHECK_VALUE(std::isfinite(inv_student_temp) && inv_student_temp > 0, op,
                    ": inv_student_temp (1 / temperature) must be finite and > 0, got ", inv_student_temp);
  TORCH_CHECK_VALUE(std::isfinite(inv_teacher_temp) && inv_teacher_temp > 0, op,
                    ": inv_teacher_temp (1 / teacher_temperature) must be finite and > 0, got ", inv_teacher_temp);
  TORCH_CHECK_VALUE(std::isfinite(kd_coef) && kd_coef >= 0, op, ": kd_coef must be finite and >= 0, got ", kd_coef);
  TORCH_CHECK_VALUE(std::isfinite(ce_coef) && ce_coef >= 0, op, ": ce_coef must be finite and >= 0, got ", ce_coef);
  TORCH_CHECK_VALUE(divergence >= kForwardKl && divergence <= kJsd, op,
                    ": divergence must be 0 (forward_kl), 1 (reverse_kl) or 2 (jsd), got ", divergence);
  TORCH_CHECK_VALUE(beta >= 0 && beta <= 1, op, ": beta must be in [0, 1], got ", beta);
}

// target: None, or int64 [n_rows] on the student's device.
inline void check_target(const char* op, const std::optional<at::Tensor>& target, const at::Tensor& student) {
  if (!target.has_value() || !target->defined()) return;
  TORCH_CHECK_VALUE(target->device() == student.device(), op, ": target is on ", target->device(),
                    " but student is on ", student.device());
  TORCH_CHECK_TYPE(target->scalar_type() == at::kLong, op, ": target must be int64, got ", target->scalar_type());
  TORCH_CHECK_VALUE(target->dim() == 1 && target->size(0) == student.size(0), op, ": target must be [N] with N = ",
                    student.size(0), ", got ", target->sizes());
}

// The student [N, C] with C > 0 and the teacher of kd_loss_fwd (same shape, a valid teacher_kind).
inline void check_kd_pair(const char* op, const at::Tensor& student, const at::Tensor& teacher, int64_t teacher_kind) {
  TORCH_CHECK_VALUE(student.dim() == 2, op, ": student must be 2-D [N, C], got ", student.sizes());
  TORCH_CHECK_VALUE(teacher.sizes() == student.sizes(), op, ": teacher has shape ", teacher.sizes(),
                    " but student has ", student.sizes());
  TORCH_CHECK_VALUE(student.size(1) > 0, op, ": student has no classes");
  TORCH_CHECK_VALUE(teacher.device() == student.device(), op, ": teacher is on ", teacher.device(),
                    " but student is on ", student.device());
  TORCH_CHECK_VALUE(teacher_kind >= kTeacherLogits && teacher_kind <= kTeacherProbs, op,
                    ": teacher_kind must be 0 (logits), 1 (log_probs) or 2 (probs), got ", teacher_kind);
}

// The student, teachers and weights of ensemble_kd_loss_fwd (K >= 1 teachers of the student's shape, dtype
// and device, unit stride along classes; weights [K, N]; a valid mix).
inline void check_ensemble(const char* op, const at::Tensor& student, at::TensorList teachers,
                           const at::Tensor& weights, int64_t mix) {
  TORCH_CHECK_VALUE(student.dim() == 2, op, ": student must be 2-D [N, C], got ", student.sizes());
  const int64_t N = student.size(0), C = student.size(1), K = static_cast<int64_t>(teachers.size());
  TORCH_CHECK_VALUE(K >= 1, op, ": teachers must hold at least one tensor");
  TORCH_CHECK_VALUE(C <= 1 || N == 0 || student.stride(1) == 1, op, ": student needs unit stride along classes");
  for (int64_t k = 0; k < K; ++k) {
    const auto& t = teachers[k];
    TORCH_CHECK_VALUE(t.device() == student.device(), op, ": teachers[", k, "] is on ", t.device(),
                      " but student is on ", student.device());
    TORCH_CHECK_VALUE(t.sizes() == student.sizes(), op, ": teachers[", k, "] has shape ", t.sizes(),
                      " but student has ", student.sizes());
    TORCH_CHECK_TYPE(t.scalar_type() == student.scalar_type(), op, ": teachers[", k, "] must have the student's dtype ",
                     student.scalar_type(), ", got ", t.scalar_type());
    TORCH_CHECK_VALUE(C <= 1 || N == 0 || t.stride(1) == 1, op, ": teachers[", k, "] needs unit stride along classes");
  }
  TORCH_CHECK_VALUE(weights.dim() == 2 && weights.size(0) == K && weights.size(1) == N, op,
                    ": weights must be [K, N] = [", K, ", ", N, "], got ", weights.sizes());
  TORCH_CHECK_VALUE(mix == kMixProb || mix == kMixLogit, op, ": mix must be 0 (prob) or 1 (logit), got ", mix);
}

// Every argument check of a kd_loss_fwd call, the same for its CPU and CUDA kernels.
inline void check_kd_loss_args(const char* op, const at::Tensor& student, const at::Tensor& teacher,
                               const std::optional<at::Tensor>& target, double inv_student_temp,
                               double inv_teacher_temp, double kd_coef, double ce_coef, int64_t divergence,
                               double beta, int64_t teacher_kind) {
  check_kd_pair(op, student, teacher, teacher_kind);
  check_kd_coefficients(op, inv_student_temp, inv_teacher_temp, kd_coef, ce_coef, divergence, beta);
  check_target(op, target, student);
}

// Every argument check of an ensemble_kd_loss_fwd call, the same for its CPU and CUDA kernels.
inline void check_ensemble_kd_loss_args(const char* op, const at::Tensor& student, at::TensorList teachers,
                                        const at::Tensor& weights, const std::optional<at::Tensor>& target,
                                        double inv_student_temp, double inv_teacher_temp, double kd_coef,
                                        double ce_coef, int64_t divergence, double beta, int64_t mix) {
  check_ensemble(op, student, teachers, weights, mix);
  check_kd_coefficients(op, inv_student_temp, inv_teacher_temp, kd_coef, ce_coef, divergence, beta);
  check_target(op, target, student);
}

// Every argument check of a sparse_kd_loss_fwd call (a top-k teacher), the same for its CPU and CUDA kernels:
// student [N, C] with unit stride along classes; indices [N, k] int64 contiguous; log_p [N, k+1] contiguous in
// the accumulation dtype; all on the student's device. The index values are the host's to check (CPU only).
inline void check_sparse_kd_loss_args(const char* op, const at::Tensor& student, const at::Tensor& indices,
                                      const at::Tensor& log_p, const std::optional<at::Tensor>& target,
                                      double inv_student_temp, double kd_coef, double ce_coef, int64_t divergence,
                                      double beta) {
  TORCH_CHECK_VALUE(student.dim() == 2, op, ": student must be 2-D [N, C], got ", student.sizes());
  TORCH_CHECK_VALUE(student.size(1) > 0, op, ": student has no classes");
  const int64_t N = student.size(0);
  TORCH_CHECK_VALUE(N == 0 || student.size(1) == 1 || student.stride(1) == 1, op,
                    ": student needs unit stride along classes");
  TORCH_CHECK_VALUE(indices.dim() == 2 && indices.size(0) == N && indices.size(1) >= 1, op,
                    ": indices must be [N, k] with N = ", N, " and k >= 1, got ", indices.sizes());
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong, op, ": indices must be int64, got ", indices.scalar_type());
  TORCH_CHECK_VALUE(indices.is_contiguous(), op, ": indices must be contiguous");
  const int64_t k = indices.size(1);
  TORCH_CHECK_VALUE(log_p.dim() == 2 && log_p.size(0) == N && log_p.size(1) == k + 1, op,
                    ": log_p must be [N, k + 1] = [", N, ", ", k + 1, "], got ", log_p.sizes());
  TORCH_CHECK_TYPE(log_p.scalar_type() == acc_dtype(student.scalar_type()), op, ": log_p must be ",
                   acc_dtype(student.scalar_type()), " for a ", student.scalar_type(), " student, got ",
                   log_p.scalar_type());
  TORCH_CHECK_VALUE(log_p.is_contiguous(), op, ": log_p must be contiguous");
  TORCH_CHECK_VALUE(indices.device() == student.device() && log_p.device() == student.device(), op,
                    ": indices and log_p must be on the student's device ", student.device());
  check_kd_coefficients(op, inv_student_temp, 1.0, kd_coef, ce_coef, divergence, beta);
  check_target(op, target, student);
}

// (row_loss [N] in the accumulation dtype, grad [N, C] in the student's dtype or empty).
inline std::tuple<at::Tensor, at::Tensor> kd_outputs(const at::Tensor& student, bool compute_grad,
                                                     at::ScalarType loss_dtype) {
  at::Tensor row_loss = at::empty({student.size(0)}, student.options().dtype(loss_dtype));
  at::Tensor grad = compute_grad ? at::empty(student.sizes(), student.options()) : at::empty({0}, student.options());
  return {row_loss, grad};
}

// grouped_heads: features [N, K*D] or [K, N, D] -> a [K, N, D] view (no copy).
inline at::Tensor heads_view(const at::Tensor& features, int64_t K, int64_t D) {
  return features.dim() == 3 ? features : features.unflatten(1, {K, D}).transpose(0, 1);
}

// grouped_heads backward: (grad_features, grad_weight, grad_bias), each empty until it is asked for.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> empty_head_grads(const at::Tensor& features,
                                                                       const at::Tensor& weight) {
  return {at::empty({0}, features.options()), at::empty({0}, weight.options()), at::empty({0}, weight.options())};
}

}  // namespace ued_fast
