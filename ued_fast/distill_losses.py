"""Distillation losses by name, for the experiment's `kd.variant` option.

'hinton' (the default): alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y), on
    the teacher's output t (logits, or log-probabilities for uste_v2 / the generalist ensemble,
    which give the same softmax), computed by ued_fast.kd_loss.
'authors': the loss of the authors' code, kept as an ablation. It feeds the teacher's
    PROBABILITIES p = softmax(t) through a second tempered softmax, q = softmax(p / T), and trains
    the student with the soft cross-entropy -sum_c q_c log softmax(s/T)_c (batch mean) plus
    lambda * CE(s, y); no T^2 factor. With p in [0, 1], q is close to uniform for T >= 1 (its
    entropy is near log C), so the soft term carries little of the teacher's ranking.
    The experiment passes kd.alpha as lambda for this variant.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

VARIANTS = ("hinton", "authors")


def _check(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float) -> None:
    if student.dim() != 2 or teacher.shape != student.shape:
        raise ValueError(f"student and teacher must both be [N, C], got {tuple(student.shape)} and {tuple(teacher.shape)}")
    if labels.shape != student.shape[:1]:
        raise ValueError(f"labels must be [N] = [{student.shape[0]}], got {tuple(labels.shape)}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")


def authors_kd_loss(student_logits: torch.Tensor, teacher_out: torch.Tensor, labels: torch.Tensor, *,
                    temperature: float, lam: float) -> torch.Tensor:
    """The authors' distillation loss (see the module docstring); teacher_out: the teacher's logits
    or log-probabilities (softmax makes them its probabilities). Computed in fp32 at least."""
    _check(student_logits, teacher_out, labels, temperature)
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or lam < 0:
        raise ValueError(f"lam must be a number >= 0, got {lam!r}")
    s = student_logits if student_logits.dtype == torch.float64 else student_logits.float()
    with torch.no_grad():
        p = torch.softmax(teacher_out.to(s.dtype), dim=1)
        q = torch.softmax(p / temperature, dim=1)
    soft = -(q * F.log_softmax(s / temperature, dim=1)).sum(dim=1).mean()
    return soft + lam * F.cross_entropy(s, labels)


def distill_loss(variant: str, student_logits: torch.Tensor, teacher_out: torch.Tensor, labels: torch.Tensor, *,
                 temperature: float, alpha: float, backend: str | None = None) -> torch.Tensor:
    """The student's loss for one batch under the named variant (alpha is lambda for 'authors')."""
    if variant == "hinton":
        import ued_fast

        s = student_logits if student_logits.dtype == torch.float64 else student_logits.float()
        return ued_fast.kd_loss(s, teacher_out.to(s.dtype), labels, temperature=temperature, alpha=alpha,
                                teacher_kind="logits", backend=backend)
    if variant == "authors":
        return authors_kd_loss(student_logits, teacher_out, labels, temperature=temperature, lam=alpha)
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
