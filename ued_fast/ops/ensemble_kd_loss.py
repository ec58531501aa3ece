"""ensemble_kd_loss: kd_loss against the mixture of K teachers (DESIGN 2.2).

Spec: ued_fast.reference.ensemble_kd_loss_reference. The native backends read each teacher once
and never write a [K, N, C] or [N, C] target tensor.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .. import _backend
from ..reference import MIXES, ensemble_kd_loss_reference
from . import _checks
from .kd_loss import check_kd_args

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


def _check_weights(weights, k: int, student: torch.Tensor) -> None:
    if weights is None:
        return
    _checks.check_tensor(OP, "weights", weights, floating=True)
    n = student.shape[0]
    if tuple(weights.shape) not in ((k,), (k, n)):
        raise ValueError(f"{OP}: weights must have shape [{k}] or [{k}, {n}], got {tuple(weights.shape)}")
    _checks.check_same_device(OP, "weights", weights, "student", student)
    if weights.device.type == "cpu":
        if bool((weights < 0).any()) or not bool(torch.isfinite(weights).all()):
            raise ValueError(f"{OP}: weights must be finite and >= 0")
        if bool((weights.sum(0) <= 0).any()):
            raise ValueError(f"{OP}: weights must not sum to 0 over the K teachers")


def ensemble_kd_loss(
    student: torch.Tensor,
    teachers: torch.Tensor | Sequence[torch.Tensor],
    weights: torch.Tensor | None = None,
    target: torch.Tensor | None = None,
    *,
    mix: str = "prob",
    temperature: float = 4.0,
    alpha: float = 0.9,
    t2_scale: bool = True,
    reduction: str = "batchmean",
    ignore_index: int = -100,
    backend: str | None = None,
) -> torch.Tensor:
    """kd_loss of student [N, C] against the mixture of K teachers' logits ([K, N, C] or a list).

    mix='prob': p = sum_k w_k softmax(t_k/T); mix='logit': p = softmax(sum_k w_k t_k / T).
    weights: None (uniform), [K] or [K, N], non-negative, normalized over K. Other arguments as kd_loss.
    """
    check_kd_args(OP, student, None, target, temperature, alpha, t2_scale, reduction, ignore_index)
    _checks.check_choice(OP, "mix", mix, MIXES)
    stack = _as_teacher_stack(teachers, student)
    k = stack.shape[0] if isinstance(stack, torch.Tensor) else len(stack)
    _check_weights(weights, k, student)
    # Until the kernels land, None means the reference.
    chosen = "reference" if backend is None else _backend.resolve_backend(backend, student.device, OP)
    if chosen != "reference":
        raise NotImplementedError(f"{OP}: backend {chosen!r} is not built yet; use backend='reference'")
    return ensemble_kd_loss_reference(student, stack, weights, target, mix=mix, temperature=float(temperature),
                                      alpha=float(alpha), t2_scale=t2_scale, reduction=reduction,
                                      ignore_index=ignore_index)


class EnsembleKDLoss(nn.Module):
    """nn.Module form of ensemble_kd_loss: forward(student, teachers, weights=None, target=None)."""

    def __init__(self, *, mix: str = "prob", temperature: float = 4.0, alpha: float = 0.9, t2_scale: bool = True,
                 reduction: str = "batchmean", ignore_index: int = -100, backend: str | None = None):
        super().__init__()
        check_kd_args("EnsembleKDLoss", torch.zeros(1, 1), None, None, temperature, alpha, t2_scale, reduction,
                      ignore_index)
        _checks.check_choice("EnsembleKDLoss", "mix", mix, MIXES)
        self.mix, self.temperature, self.alpha, self.t2_scale = mix, float(temperature), float(alpha), t2_scale
        self.reduction, self.ignore_index, self.backend = reduction, ignore_index, backend

    def forward(self, student, teachers, weights=None, target=None):
        return ensemble_kd_loss(student, teachers, weights, target, mix=self.mix, temperature=self.temperature,
                                alpha=self.alpha, t2_scale=self.t2_scale, reduction=self.reduction,
                                ignore_index=self.ignore_index, backend=self.backend)
