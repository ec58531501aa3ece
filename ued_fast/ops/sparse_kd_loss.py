"""Knowledge distillation from a sparse (top-k) teacher: k stored (index, value) pairs per row.

Offline distillation of large vocabularies stores only the teacher's top-k entries per token. The
convention here is DistillKit's (distillkit/lossfuncs/common.py get_logprobs / get_target_logprobs,
distillkit/lossfuncs/kl.py sparse_kl_div, distillkit/lossfuncs/jsd.py sparse_js_div):

- The student's side is its FULL-vocabulary distribution q = softmax(student / T), read at the k
  indices (log q_j = z_j - logsumexp(z), z = student / T); it is not renormalized over the k entries.
- The teacher's stored values are log-probabilities ('log_probs', DistillKit's default) or logits
  ('logits'). Temperature is applied AFTER the top-k: p = softmax(values / teacher_temperature) over
  the stored entries. (DistillKit states it as values * T_gen / T for log-probs stored at a generation
  temperature T_gen: that is teacher_temperature = T / T_gen here; with T_gen = 1 it is T.)
- The mass outside the top-k, `convention`:
  'zero' (DistillKit's default, MissingProbabilityHandling.ZERO): the teacher puts none there; its
      k values are renormalized to sum to 1. The student's mass outside the top-k still counts where
      the divergence sees it (JSD: KL(q || m) there is q_rest * log(1 / (1 - beta))). reverse_kl is
      +inf under this convention whenever the student has any mass outside the top-k, and is rejected.
  'symmetric_uniform' (MissingProbabilityHandling.SYMMETRIC_UNIFORM, log-probs only): the teacher's
      missing mass 1 - sum(exp(values)) is one more category, 'rest', tempered with the others; the
      student's 'rest' is its mass outside the k indices. The divergence is then taken between the two
      (k+1)-category distributions, which equals the full-vocabulary divergence when both spread their
      'rest' mass alike over the missing indices (DistillKit's assumption). A missing mass within the
      rounding error of the k-term sum (or a sum above 1) is 0; DistillKit instead clamps the sum below
      1 - 1e-6 and drops missing masses under 1e-6, which differs from this by at most ~1e-5 per row.
  Under both, the divergence is the one of the contract (forward_kl, reverse_kl, jsd with beta) between
  the (k+1)-category distributions (teacher: k stored entries + 'rest', 0 under 'zero'; student: its
  mass at the k indices + the mass elsewhere). DistillKit's own sparse JSD is beta = 0.5.
- Padding: an entry whose value is -inf holds no teacher mass and is not part of the support (pad a row
  with any in-range index and value -inf). Under 'zero' every row needs one finite entry (a row of padding
  only has no teacher distribution: an error on CPU tensors, an undefined row on accelerators). Duplicate
  indices among the finite entries are an error (DistillKit does not check them; they would count the
  student's mass at that index twice). These checks read the values, so they run for CPU tensors only
  (as ued_fast's target check does).

sparse_kd_loss_reference densifies the student's side and is the spec (backend 'reference'). The native
backends ('cpp' csrc/sparse_kd_loss.cpp, 'cuda' csrc/sparse_kd_loss_cuda.cu, 'triton' kernels/sparse_kd_loss.py)
never make a dense [N, C] teacher: the host tempers and normalizes the teacher's k+1 categories ([N, k+1]),
sorts each row's indices, and one kernel streams the student's rows and writes the gradient (the one [N, C]
tensor the op makes) in the forward pass. Their contract: docs/DESIGN.md 2.5.
"""
from __future__ import annotations

import torch
from torch import nn

from . import _checks, _sparse_teacher, _spine
from ._sparse_teacher import CONVENTIONS, OP, VALUE_KINDS, _check_args, sparse_kd_loss_reference
from ..reference import REDUCTIONS


def _forward(student: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, target: torch.Tensor | None,
             temperature: float, alpha: float, t2_scale: bool, reduction: str, ignore_index: int, convention: str,
             values_kind: str, divergence: str, beta: float, teacher_temperature: float | None, backend: str,
             compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The custom op's body on checked inputs: (loss, grad of the row losses [N, C] or empty, reduction scale)."""
    sorted_indices, sorted_log_p = _sparse_teacher.native_inputs(indices, values, student, temperature, convention,
                                                                 teacher_temperature)
    c = _spine.kd_coefficients(temperature, alpha, t2_scale, target is not None, divergence=divergence, beta=beta)
    rows, grad = _sparse_teacher.forward_rows(backend, student, sorted_indices, sorted_log_p, target, c, ignore_index,
                                              compute_grad)
    return _spine.reduce_rows(rows, grad, target, ignore_index, reduction, student.shape[1])


def _split(student, indices, values, target, temperature, alpha, t2_scale, reduction, ignore_index, convention,
           values_kind, divergence, beta, teacher_temperature, backend, compute_grad) -> _spine.KDCall:
    spec = dict(temperature=temperature, alpha=alpha, t2_scale=t2_scale, reduction=reduction,
                ignore_index=ignore_index, convention=convention, values_kind=values_kind, divergence=divergence,
                beta=beta, teacher_temperature=teacher_temperature)
    return _spine.KDCall(student, (indices, values, target), spec, reduction, compute_grad)


_sparse_kd_loss_op = torch.library.custom_op("ued_fast::sparse_kd_loss", _forward, mutates_args=())
_AUTOGRAD = _spine.KDAutograd(OP, _sparse_kd_loss_op, _forward, _split, sparse_kd_loss_reference)


class _EagerSparseKDLoss(_spine.EagerKDFunction):
    """sparse_kd_loss's eager autograd (see _spine.KDAutograd)."""


def sparse_kd_loss(
    student: torch.Tensor,
    indices: torch.Tensor,
    values: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    temperature: float = 4.0,
    alpha: float = 0.9,
    t2_scale: bool = True,
    reduction: str = "batchmean",
    ignore_index: int = -100,
    convention: str = "zero",
    values_kind: str = "log_probs",
    divergence: str = "forward_kl",
    beta: float = 0.5,
    teacher_temperature: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """sparse_kd_loss_reference without a dense teacher: student [N, C], indices [N, k] int64 (or int32), values
    [N, k] (the teacher's top-k log-probs or logits), target None or int64 [N]. On a native backend one
    kernel streams the student (no host synchronization on accelerator tensors) and makes the gradient in
    the forward pass. The loss is float32 (float64 for float64 student), the gradient in the student's
    dtype; values are constants. backend: None (the best for the device), 'cpp', 'cuda', 'triton' or
    'reference' (the spec); under torch.func transforms the op runs the reference."""
    _check_args(student, indices, values, target, temperature, alpha, t2_scale, reduction, ignore_index,
                convention, values_kind, divergence, beta, teacher_temperature)
    temperature, alpha, beta, teacher_temperature = _spine.kd_scalars(temperature, alpha, beta, teacher_temperature)
    chosen = _spine.resolve_backend(OP, backend, student)
    if chosen == "reference":
        return sparse_kd_loss_reference(student, indices, values, target, temperature=temperature, alpha=alpha,
                                        t2_scale=t2_scale, reduction=reduction, ignore_index=ignore_index,
                                        convention=convention, values_kind=values_kind, divergence=divergence,
                                        beta=beta, teacher_temperature=teacher_temperature)
    compute_grad = student.requires_grad and torch.is_grad_enabled()
    return _AUTOGRAD.loss(_EagerSparseKDLoss, _checks.last_dim_contiguous(student), indices, values.detach(), target,
                          temperature, alpha, t2_scale, reduction, ignore_index, convention, values_kind, divergence,
                          beta, teacher_temperature, chosen, compute_grad)


class SparseKDLoss(_spine.KDModuleSettings, nn.Module):
    """nn.Module form of sparse_kd_loss: SparseKDLoss(temperature=4.0, ...)(student, indices, values, target=None)."""

    def __init__(self, *, temperature: float = 4.0, alpha: float = 0.9, t2_scale: bool = True,
                 reduction: str = "batchmean", ignore_index: int = -100, convention: str = "zero",
                 values_kind: str = "log_probs", divergence: str = "forward_kl", beta: float = 0.5,
                 teacher_temperature: float | None = None, backend: str | None = None):
        super().__init__()
        name = "SparseKDLoss"
        _checks.check_kd_scalars(name, temperature, alpha, t2_scale, ignore_index)
        _checks.check_choice(name, "reduction", reduction, REDUCTIONS)
        _checks.check_choice(name, "convention", convention, CONVENTIONS)
        _checks.check_choice(name, "values_kind", values_kind, VALUE_KINDS)
        _checks.check_divergence_args(name, divergence, beta, teacher_temperature)
        self.store_settings(temperature=float(temperature), alpha=float(alpha), t2_scale=t2_scale,
                            reduction=reduction, ignore_index=ignore_index, convention=convention,
                            values_kind=values_kind, divergence=divergence, beta=float(beta),
                            teacher_temperature=teacher_temperature, backend=backend)

    def forward(self, student: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
                target: torch.Tensor | None = None) -> torch.Tensor:
        return sparse_kd_loss(student, indices, values, target, **self.settings())
