"""ensemble_kd_loss: kd_loss against the mixture of K teachers (DESIGN 2.2).

Spec: ued_fast.reference.ensemble_kd_loss_reference. Backends: 'cpp' and 'cuda' are the C++ op
torch.ops.ued_fast.ensemble_kd_loss_fwd (csrc/ensemble_kd_loss.cpp, csrc/ensemble_kd_loss_cuda.cu),
'triton' is ued_fast.kernels.ensemble_kd_loss, 'reference' is the spec (differentiated by autograd).

Every native backend implements one forward, the kernel contract (docs/DESIGN.md 2):
    ensemble_kd_loss_fwd(student [N, C], teachers: K tensors [N, C] in the student's dtype (unit stride
                         along classes, any row stride; views of one [K, N, C] tensor are not copied;
                         Triton takes them as one [K, N, C] tensor), weights [K, N] normalized over K
                         (float32; float64 for a float64 student), target [N] int64 or None,
                         inv_student_temp, inv_teacher_temp, kd_coef, ce_coef, divergence, beta,
                         ignore_index, mix (0 'prob', 1 'logit'), compute_grad)
      -> row_loss [N] float32 (float64 for float64), 0 on ignored rows;
         grad [N, C] contiguous in the student's dtype, d row_loss[i] / d student[i] (0 on ignored
         rows), or an empty tensor when compute_grad is False.
The teachers reach the kernels as log-space scores (logits, log-probs, or the log of probabilities),
tempered by inv_teacher_temp (1 for the already-tempered kinds). The kernels read each teacher row, form
the mixture in registers and never write a [K, N, C] or [N, C] target tensor. Backend choice, the native
call and the autograd are the spine's (ops/_spine.py), as in kd_loss.
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch
from torch import nn

from ..reference import MIXES, compute_dtype, ensemble_kd_loss_reference, teacher_scores
from . import _checks, _spine
from ._spine import (CUDA_MAX_TEACHERS, DEFAULT_ALPHA, DEFAULT_BETA, DEFAULT_DIVERGENCE,  # noqa: F401
                     DEFAULT_IGNORE_INDEX, DEFAULT_REDUCTION, DEFAULT_TEMPERATURE, stacked_view)

OP = "ensemble_kd_loss"


def _as_teacher_stack(teachers, student: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
    if isinstance(teachers, torch.Tensor):
        _checks.check_tensor(OP, "teachers", teachers, dims=3, floating=True)
        if teachers.shape[0] < 1:
            raise ValueError(f"{OP}: teachers must hold at least one teacher (K >= 1)")
        if tuple(teachers.shape[1:]) != tuple(student.shape):
            raise ValueError(f"{OP}: teachers has shape {tuple(teachers.shape)}; expected [K, {student.shape[0]}, {student.shape[1]}]")
        _checks.check_same_device(OP, "teachers", teachers, "student", student)
        return teachers
    if not isinstance(teachers, Sequence) or len(teachers) < 1:
        raise TypeError(f"{OP}: teachers must be a [K, N, C] tensor or a non-empty list of [N, C] tensors")
    for k, t in enumerate(teachers):
        _checks.check_tensor(OP, f"teachers[{k}]", t, dims=2, floating=True)
        if t.shape != student.shape:
            raise ValueError(f"{OP}: teachers[{k}] has shape {tuple(t.shape)} but student has {tuple(student.shape)}")
        _checks.check_same_device(OP, f"teachers[{k}]", t, "student", student)
    return list(teachers)


def _forward(
    student: torch.Tensor, teachers: list[torch.Tensor], weights: torch.Tensor, target: torch.Tensor | None,
    temperature: float, alpha: float, t2_scale: bool, reduction: str, ignore_index: int, mix: str,
    backend: str, compute_grad: bool, divergence: str = DEFAULT_DIVERGENCE, beta: float = DEFAULT_BETA,
    teacher_temperature: float | None = None, teacher_kind: str = "logits",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss, grad of the row losses [N, C] or empty, reduction scale 0-d). teachers are log-space
    scores: teacher_kind 'logits', 'log_probs' or 'tempered_log_probs'."""
    coefficients = _spine.kd_coefficients(temperature, alpha, t2_scale, target is not None, teacher_kind,
                                          teacher_temperature, divergence, beta)
    rows, grad = _spine.native_forward(OP, backend, student, teachers, weights, target, *coefficients,
                                       ignore_index, _spine.MIX_CODE[mix], compute_grad)
    return _spine.reduce_rows(rows, grad, target, ignore_index, reduction, student.shape[1])


def _split(student, teachers, weights, target, temperature, alpha, t2_scale, reduction, ignore_index, mix, backend,
           compute_grad, divergence, beta, teacher_temperature, teacher_kind) -> _spine.KDCall:
    spec = dict(temperature=temperature, alpha=alpha, t2_scale=t2_scale, reduction=reduction,
                ignore_index=ignore_index, mix=mix, divergence=divergence, beta=beta,
                teacher_temperature=teacher_temperature, teacher_kind=teacher_kind)
    return _spine.KDCall(student, (weights, target, *teachers), spec, reduction, compute_grad)


def _reference_of_scores(student, weights, target, *teachers, **spec):
    return ensemble_kd_loss_reference(student, torch.stack(teachers), weights, target, **spec)


_ensemble_kd_loss_op = torch.library.custom_op("ued_fast::ensemble_kd_loss", _forward, mutates_args=())
_AUTOGRAD = _spine.KDAutograd(OP, _ensemble_kd_loss_op, _forward, _split, _reference_of_scores)


class _EagerEnsembleKDLoss(_spine.EagerKDFunction):
    """ensemble_kd_loss's eager autograd (see _spine.KDAutograd); torch.compile takes the custom op,
    torch.func transforms the reference."""


def _as_scores(teacher: torch.Tensor, teacher_kind: str, dtype: torch.dtype) -> tuple[torch.Tensor, str]:
    """A teacher as the kernels take it: log-space scores in the student's dtype, and their kind. Logits and
    log-probs pass unchanged; probabilities cost one log (in float32, float64 for float64)."""
    if teacher_kind in ("probs", "tempered_probs"):
        scores, _ = teacher_scores(teacher.to(compute_dtype(teacher.dtype)), 1.0, teacher_kind)
        return scores.to(dtype), teacher_kind.replace("probs", "log_probs")
    return teacher.to(dtype), teacher_kind


def _reject_positional_weights(target) -> None:
    """The old signature was (student, teachers, weights, target): a float tensor in third place is weights."""
    if isinstance(target, torch.Tensor) and target.is_floating_point():
        raise TypeError(
            f"{OP}: the third positional argument is target (int64 class indices) and got a {target.dtype} "
            "tensor; weights is keyword-only now: call ensemble_kd_loss(student, teachers, target, weights=...)")


def _old_signature_hint(fn):
    """The signature was (student, teachers, weights, target): four positional arguments get an error
    that says what changed, not only how many arguments Python expected."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if len(args) > 3:
            raise TypeError(
                f"{OP}: takes 3 positional arguments (student, teachers, target), got {len(args)}; weights is "
                "keyword-only now: call ensemble_kd_loss(student, teachers, target, weights=...)")
        return fn(*args, **kwargs)
    return wrapper


@_old_signature_hint
def ensemble_kd_loss(
    student: torch.Tensor,
    teachers: torch.Tensor | Sequence[torch.Tensor],
    target: torch.Tensor | None = None,
    *,
    weights: torch.Tensor | None = None,
    mix: str = "prob",
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
    """kd_loss of student [N, C] against the mixture of K teachers ([K, N, C] or a list of [N, C]).

    Arguments read as in kd_loss (target third, the rest keyword-only); teacher_kind applies to every
    teacher and takes kd_loss's kinds. With p_k teacher k's tempered distribution (softmax(t_k/T_t) for
    logits, T_t = teacher_temperature, default temperature) and s_k = log p_k: mix='prob':
    p = sum_k w_k p_k; mix='logit': p = softmax(sum_k w_k s_k) (for logits, softmax(sum_k w_k t_k / T_t)).
    The loss is alpha*T^2*D(p, q) + (1-alpha)*CE per row with D the `divergence` of the mixture p and
    q = softmax(s/T), as in kd_loss ('forward_kl', 'reverse_kl', 'jsd' with beta).
    weights: None (uniform), [K] or [K, N], non-negative, normalized over K. reduction='mean' divides by
    valid rows * C, CE term included (see kd_loss): use 'batchmean' unless you mean that. The gradient
    flows to the student only (teachers and weights are constants); with create_graph=True it is
    differentiable again (recomputed by the reference). Under torch.func transforms the op runs the
    reference.
    backend: None (the best for the device), 'cpp', 'cuda', 'triton' or 'reference'.
    """
    _reject_positional_weights(target)
    _checks.check_kd_args(OP, student, None, target, temperature, alpha, t2_scale, reduction, ignore_index,
                          teacher_kind, divergence, beta, teacher_temperature)
    _checks.check_choice(OP, "mix", mix, MIXES)
    stack = _as_teacher_stack(teachers, student)
    k = stack.shape[0] if isinstance(stack, torch.Tensor) else len(stack)
    _checks.check_mix_weights(OP, weights, k, student, "student")
    temperature, alpha, beta, teacher_temperature = _spine.kd_scalars(temperature, alpha, beta, teacher_temperature)
    _checks.guard_kd_inputs(OP, student, stack if isinstance(stack, torch.Tensor) else stack[0], teacher_kind,
                            temperature)
    chosen = _spine.resolve_backend(OP, backend, student, k)
    if chosen == "reference":
        return ensemble_kd_loss_reference(student, stack, weights, target, mix=mix, temperature=temperature,
                                          alpha=alpha, t2_scale=t2_scale, reduction=reduction,
                                          ignore_index=ignore_index, teacher_kind=teacher_kind,
                                          divergence=divergence, beta=beta, teacher_temperature=teacher_temperature)
    # Kernels take teachers as scores in the student's dtype with unit stride along classes; a [K, N, C]
    # input becomes K views (no copy unless its class dimension is strided or its dtype or kind differs).
    if isinstance(stack, torch.Tensor):
        scores, kind = _as_scores(stack.detach(), teacher_kind, student.dtype)
        teacher_list = list(_checks.last_dim_contiguous(scores).unbind(0))
    else:
        as_scores = [_as_scores(t.detach(), teacher_kind, student.dtype) for t in stack]
        teacher_list = [_checks.last_dim_contiguous(scores) for scores, _ in as_scores]
        kind = as_scores[0][1]
    w = _spine.normalized_mix_weights(weights, k, student)
    compute_grad = student.requires_grad and torch.is_grad_enabled()
    return _AUTOGRAD.loss(_EagerEnsembleKDLoss, _checks.last_dim_contiguous(student), teacher_list, w, target,
                          temperature, alpha, t2_scale, reduction, ignore_index, mix, chosen, compute_grad,
                          divergence, beta, teacher_temperature, kind)


class EnsembleKDLoss(_spine.KDModuleSettings, nn.Module):
    """nn.Module form of ensemble_kd_loss: forward(student, teachers, target=None, *, weights=None)."""

    def __init__(self, *, mix: str = "prob", temperature: float = DEFAULT_TEMPERATURE, alpha: float = DEFAULT_ALPHA,
                 t2_scale: bool = True, reduction: str = DEFAULT_REDUCTION, ignore_index: int = DEFAULT_IGNORE_INDEX,
                 teacher_kind: str = "logits", divergence: str = DEFAULT_DIVERGENCE, beta: float = DEFAULT_BETA,
                 teacher_temperature: float | None = None, backend: str | None = None):
        super().__init__()
        _checks.check_kd_args("EnsembleKDLoss", torch.zeros(1, 1), None, None, temperature, alpha, t2_scale,
                              reduction, ignore_index, teacher_kind, divergence, beta, teacher_temperature)
        _checks.check_choice("EnsembleKDLoss", "mix", mix, MIXES)
        self.store_settings(mix=mix, temperature=float(temperature), alpha=float(alpha), t2_scale=t2_scale,
                            reduction=reduction, ignore_index=ignore_index, teacher_kind=teacher_kind,
                            divergence=divergence, beta=float(beta), teacher_temperature=teacher_temperature,
                            backend=backend)

    def forward(self, student, teachers, target=None, *, weights=None):
        return ensemble_kd_loss(student, teachers, target, weights=weights, **self.settings())
