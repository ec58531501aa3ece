"""kd_loss: the fused knowledge-distillation loss (DESIGN 2.1).

Spec: ued_fast.reference.kd_loss_reference. Backends: 'cpp' and 'cuda' are the C++ op
torch.ops.ued_fast.kd_loss_fwd (csrc/kd_loss.cpp, csrc/kd_loss_cuda.cu), 'triton' is
ued_fast.kernels.kd_loss, 'reference' is the spec itself (differentiated by autograd).

Every native backend implements one forward, the kernel contract (docs/DESIGN.md 2):
    kd_loss_fwd(student [N, C], teacher [N, C], target [N] int64 or None, inv_student_temp,
                inv_teacher_temp, kd_coef, ce_coef, divergence, beta, ignore_index,
                teacher_kind (0 logits, 1 log_probs, 2 probs), compute_grad)
      -> row_loss [N] float32 (float64 for float64 student), 0 on ignored rows;
         grad [N, C] contiguous in the student's dtype, d row_loss[i] / d student[i]
         (0 on ignored rows), or an empty tensor when compute_grad is False.
The scalars come from _spine.kd_coefficients. Inputs have unit stride along classes and any row
stride; teacher and student dtypes may differ. Backend choice, the native call and the autograd
(gradient made in the forward pass, backward one multiply, create_graph=True through the reference)
are the spine's (ops/_spine.py).
"""
from __future__ import annotations

import torch
from torch import nn

from ..reference import kd_loss_reference
from . import _checks, _spine
from ._spine import (DEFAULT_ALPHA, DEFAULT_BETA, DEFAULT_DIVERGENCE, DEFAULT_IGNORE_INDEX, DEFAULT_REDUCTION,
                     DEFAULT_TEMPERATURE)

OP = "kd_loss"


def _forward(
    student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor | None, temperature: float,
    alpha: float, t2_scale: bool, reduction: str, ignore_index: int, teacher_kind: str,
    backend: str, compute_grad: bool, divergence: str = DEFAULT_DIVERGENCE, beta: float = DEFAULT_BETA,
    teacher_temperature: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss, grad of the row losses [N, C] or empty, reduction scale 0-d)."""
    coefficients = _spine.kd_coefficients(temperature, alpha, t2_scale, target is not None, teacher_kind,
                                          teacher_temperature, divergence, beta)
    rows, grad = _spine.native_forward(OP, backend, student, teacher, target, *coefficients, ignore_index,
                                       _spine.KERNEL_TEACHER_KIND[teacher_kind], compute_grad)
    return _spine.reduce_rows(rows, grad, target, ignore_index, reduction, student.shape[1])


def _split(student, teacher, target, temperature, alpha, t2_scale, reduction, ignore_index, teacher_kind,
           backend, compute_grad, divergence, beta, teacher_temperature) -> _spine.KDCall:
    spec = dict(temperature=temperature, alpha=alpha, t2_scale=t2_scale, reduction=reduction,
                ignore_index=ignore_index, teacher_kind=teacher_kind, divergence=divergence, beta=beta,
                teacher_temperature=teacher_temperature)
    return _spine.KDCall(student, (teacher, target), spec, reduction, compute_grad)


_kd_loss_op = torch.library.custom_op("ued_fast::kd_loss", _forward, mutates_args=())
_AUTOGRAD = _spine.KDAutograd(OP, _kd_loss_op, _forward, _split, kd_loss_reference)


class _EagerKDLoss(_spine.EagerKDFunction):
    """kd_loss's eager autograd (see _spine.KDAutograd)."""


def kd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    temperature: float = DEFAULT_TEMPERATURE,
    alpha: float = DEFAULT_ALPHA,
    t2_scale: bool = True,
    reduction: str = DEFAULT_REDUCTION,
    ignore_index: int = DEFAULT_IGNORE_INDEX,
    teacher_kind: str = "logits",
    divergence: str = DEFAULT_DIVERGENCE,
    beta: float = DEFAULT_BETA,
    teacher_temperature: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Fused KD loss: alpha*T^2*D(p, q) + (1-alpha)*CE(s, y) per row, q = softmax(s/T), p = softmax(t/T_t).

    student [N, C]: raw logits (not log_softmax: the op applies log_softmax(s/T) itself), float32/
    bfloat16/float16 (float64 on 'cpp'/'reference'). target [N] int64 or None (then the loss is
    T^2*KL and alpha is unused). Rows with target == ignore_index count nowhere.
    teacher [N, C], as teacher_kind says:
      'logits'             raw teacher logits; the op tempers them: softmax(t/T)
      'log_probs'          log-probabilities (e.g. log_softmax(t)); tempered: softmax(t/T)
      'probs'              probabilities (e.g. softmax(t)); tempered: softmax(log(t)/T)
      'tempered_probs'     soft targets already at temperature T (e.g. cached softmax(t/T)); used as given
      'tempered_log_probs' log of such soft targets (e.g. log_softmax(t/T)); used as given
    The old nn.KLDivLoss habit, kd_loss(log_softmax(s/T), softmax(t/T)), is wrong twice over: pass
    kd_loss(s, t) or kd_loss(s, softmax(t/T), teacher_kind='tempered_probs'). On CPU tensors (or on
    every device after ued_fast.set_input_checks(True)) a guard warns once when a teacher given as
    logits looks like probabilities, a student looks like log-probabilities (at T != 1), or a
    'probs'/'log_probs' teacher is not a distribution.
    divergence (D, with 0*log 0 = 0):
      'forward_kl' (default) KL(p || q) = sum p (log p - log q)          (Hinton's KD)
      'reverse_kl'           KL(q || p) = sum q (log q - log p)          (+inf where p = 0 < q)
      'jsd'                  beta*KL(p || m) + (1-beta)*KL(q || m), m = beta*p + (1-beta)*q, beta in [0, 1]
    teacher_temperature: T_t, the temperature of the teacher's softmax (default: temperature); the
    already-tempered kinds are used as given. T^2 and the student's 1/T use temperature.
    Gradient (z = s/T): T*alpha*dD/dz + (1-alpha)*(softmax(s) - onehot(y)), with dD/dz = q - p
    (forward_kl), q*(log q - log p - KL(q || p)) (reverse_kl), q*(g - sum q*g) with
    g = (1-beta)*(log q - log m) (jsd).
    reduction: 'batchmean' (sum / valid rows; the KD loss), 'sum', 'none' ([N]), or 'mean', which
    divides by valid rows * C (torch.nn.KLDivLoss's 'mean'): it scales the CE term by 1/C as well, so
    it is NOT the mean CE per row. Use 'batchmean' unless you mean that.
    The loss is float32 (float64 for float64 student); the gradient flows to the student only, and a
    gradient taken with create_graph=True is differentiable again (recomputed by the reference).
    Under torch.func transforms (grad, vmap, ...) the op runs the reference.
    backend: None (the best for the device), 'cpp', 'cuda', 'triton' or 'reference'.
    """
    _checks.check_kd_args(OP, student, teacher, target, temperature, alpha, t2_scale, reduction, ignore_index,
                          teacher_kind, divergence, beta, teacher_temperature)
    temperature, alpha, beta, teacher_temperature = _spine.kd_scalars(temperature, alpha, beta, teacher_temperature)
    _checks.guard_kd_inputs(OP, student, teacher, teacher_kind, temperature)
    chosen = _spine.resolve_backend(OP, backend, student)
    if chosen == "reference":
        return kd_loss_reference(student, teacher, target, temperature=temperature, alpha=alpha,
                                 t2_scale=t2_scale, reduction=reduction, ignore_index=ignore_index,
                                 teacher_kind=teacher_kind, divergence=divergence, beta=beta,
                                 teacher_temperature=teacher_temperature)
    compute_grad = student.requires_grad and torch.is_grad_enabled()
    return _AUTOGRAD.loss(_EagerKDLoss, _checks.last_dim_contiguous(student),
                          _checks.last_dim_contiguous(teacher.detach()), target, temperature, alpha, t2_scale,
                          reduction, ignore_index, teacher_kind, chosen, compute_grad, divergence, beta,
                          teacher_temperature)


class KDLoss(_spine.KDModuleSettings, nn.Module):
    """nn.Module form of kd_loss: KDLoss(temperature=4.0, alpha=0.9, ...)(student, teacher, target=None)."""

    def __init__(self, *, temperature: float = DEFAULT_TEMPERATURE, alpha: float = DEFAULT_ALPHA,
                 t2_scale: bool = True, reduction: str = DEFAULT_REDUCTION, ignore_index: int = DEFAULT_IGNORE_INDEX,
                 teacher_kind: str = "logits", divergence: str = DEFAULT_DIVERGENCE, beta: float = DEFAULT_BETA,
                 teacher_temperature: float | None = None, backend: str | None = None):
        super().__init__()
        _checks.check_kd_args("KDLoss", torch.zeros(1, 1), None, None, temperature, alpha, t2_scale, reduction,
                              ignore_index, teacher_kind, divergence, beta, teacher_temperature)
        self.store_settings(temperature=float(temperature), alpha=float(alpha), t2_scale=t2_scale,
                            reduction=reduction, ignore_index=ignore_index, teacher_kind=teacher_kind,
                            divergence=divergence, beta=float(beta), teacher_temperature=teacher_temperature,
                            backend=backend)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor | None = None):
        return kd_loss(student, teacher, target, **self.settings())
