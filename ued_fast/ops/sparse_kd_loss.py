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

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import _checks, _spine
from ..reference import REDUCTIONS, _reduce, compute_dtype, divergence_rows

OP = "sparse_kd_loss"
CONVENTIONS = ("zero", "symmetric_uniform")
VALUE_KINDS = ("log_probs", "logits")


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0 (x >= 0 gives -inf), accurate at both ends."""
    x = x.clamp(max=0.0)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def teacher_log_probs_ext(values: torch.Tensor, live: torch.Tensor, teacher_temperature: float,
                          convention: str) -> torch.Tensor:
    """[N, k+1] teacher log-probabilities: the k stored entries (-inf where padded), then 'rest'."""
    scores = torch.where(live, values, torch.full_like(values, -math.inf))
    if convention == "zero":
        rest = torch.full_like(scores[:, :1], -math.inf)
    else:
        log_total = torch.logsumexp(scores, dim=-1, keepdim=True)
        # A missing mass within the rounding error of the k-term sum is noise, not mass: 0 (otherwise a
        # full top-k, k = C, would give the teacher ~1e-16 where the student has exactly none).
        noise = math.log1p(-scores.shape[-1] * torch.finfo(scores.dtype).eps)
        rest = torch.where(log_total >= noise, torch.full_like(log_total, -math.inf), _log1mexp(log_total))
    return F.log_softmax(torch.cat([scores, rest], dim=-1) / teacher_temperature, dim=-1)


def kernel_inputs(indices: torch.Tensor, live: torch.Tensor, log_p: torch.Tensor):
    """The teacher side of the kernel contract (docs/DESIGN.md 2): (indices [N, k] int64 with padding entries
    -1, each row sorted ascending, so padding comes first; log_p [N, k+1] in that order, 'rest' last), both
    contiguous. Sorted rows let a kernel find the live indices of a chunk of columns with a running pointer."""
    keys, order = torch.where(live, indices, torch.full_like(indices, -1)).sort(dim=-1)
    k = indices.shape[1]
    return keys.contiguous(), torch.cat([log_p[:, :k].gather(-1, order), log_p[:, k:]], dim=-1).contiguous()


def _check_args(student, indices, values, target, temperature, alpha, t2_scale, reduction, ignore_index,
                convention, values_kind, divergence, beta, teacher_temperature) -> None:
    _checks.check_tensor(OP, "student", student, dims=2, floating=True)
    if student.shape[0] == 0 or student.shape[1] == 0:
        raise ValueError(f"{OP}: student must be a non-empty [N, C] tensor, got shape {tuple(student.shape)}")
    _checks.check_tensor(OP, "indices", indices, dims=2)
    if indices.dtype != torch.int64:
        raise TypeError(f"{OP}: indices must be int64, got {indices.dtype}")
    if indices.shape[0] != student.shape[0] or indices.shape[1] == 0:
        raise ValueError(f"{OP}: indices must be [N, k] = [{student.shape[0]}, k >= 1], got {tuple(indices.shape)}")
    _checks.check_tensor(OP, "values", values, dims=2, floating=True)
    if values.shape != indices.shape:
        raise ValueError(f"{OP}: values must have the shape of indices {tuple(indices.shape)}, got {tuple(values.shape)}")
    _checks.check_same_device(OP, "indices", indices, "student", student)
    _checks.check_same_device(OP, "values", values, "student", student)
    _checks.check_kd_scalars(OP, temperature, alpha, t2_scale, ignore_index)
    _checks.check_choice(OP, "reduction", reduction, REDUCTIONS)
    _checks.check_choice(OP, "convention", convention, CONVENTIONS)
    _checks.check_choice(OP, "values_kind", values_kind, VALUE_KINDS)
    _checks.check_divergence_args(OP, divergence, beta, teacher_temperature)
    if convention == "symmetric_uniform" and values_kind == "logits":
        raise ValueError(f"{OP}: convention='symmetric_uniform' needs values_kind='log_probs' (the missing mass "
                         "1 - sum(p) is undefined for logits of the top-k only)")
    if divergence == "reverse_kl" and convention == "zero":
        raise ValueError(f"{OP}: divergence='reverse_kl' is +inf under convention='zero' (the teacher has no mass "
                         "outside its top-k where the student has some); use convention='symmetric_uniform'")
    _checks.check_target(OP, target, student, ignore_index)
    if indices.device.type == "cpu" and not _checks._is_fake(indices):
        _check_index_values(indices, values, student.shape[1], convention)


def _check_index_values(indices: torch.Tensor, values: torch.Tensor, num_classes: int, convention: str) -> None:
    """Indices in [0, C); no index twice among a row's finite (non-padding) entries; under 'zero' at least
    one finite entry per row (else that row's teacher has no distribution at all)."""
    bad = (indices < 0) | (indices >= num_classes)
    if bool(bad.any()):
        raise ValueError(f"{OP}: indices holds {int(indices[bad][0])}, outside [0, {num_classes})")
    live = values > -math.inf
    if convention == "zero" and not bool(live.any(dim=-1).all()):
        row = int((~live.any(dim=-1)).nonzero()[0])
        raise ValueError(f"{OP}: values has no finite entry in row {row}: under convention='zero' that row's teacher "
                         "has no distribution (give such rows target=ignore_index and keep one entry, or use "
                         "convention='symmetric_uniform')")
    k = indices.shape[1]
    # Padding entries get distinct negative keys so that they never collide.
    keys = torch.where(live, indices, -1 - torch.arange(k, device=indices.device)).sort(dim=-1).values
    dup = (keys[:, 1:] == keys[:, :-1]) & (keys[:, 1:] >= 0)
    if bool(dup.any()):
        row = int(dup.any(dim=-1).nonzero()[0])
        raise ValueError(f"{OP}: indices repeats a class in row {row} among entries with finite values "
                         "(pad with value -inf instead)")


def _teacher_side(values, temperature, convention, teacher_temperature):
    """(live entries [N, k], teacher log-probs [N, k+1]) of checked values, in the values' dtype."""
    live = values > -math.inf
    t_teacher = temperature if teacher_temperature is None else teacher_temperature
    return live, teacher_log_probs_ext(values.detach(), live, t_teacher, convention)


def _prepare(student, indices, values, target, temperature, alpha, t2_scale, reduction, ignore_index, convention,
             values_kind, divergence, beta, teacher_temperature):
    """Checks, then (compute dtype, live entries, teacher log-probs in the compute dtype, kd_coef, ce_coef)."""
    _check_args(student, indices, values, target, temperature, alpha, t2_scale, reduction, ignore_index,
                convention, values_kind, divergence, beta, teacher_temperature)
    cd = compute_dtype(student.dtype)
    live, log_p = _teacher_side(values.to(cd), temperature, convention, teacher_temperature)
    c = _spine.kd_coefficients(temperature, alpha, t2_scale, target is not None)
    return cd, live, log_p, c.kd_coef, c.ce_coef


def sparse_kd_loss_reference(
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
) -> torch.Tensor:
    """The spec (see the module docstring): per row alpha*s2*D(p, q) + (1-alpha)*CE(student, target), D
    between the teacher's (k+1)-category distribution and the student's, differentiated by autograd.

    The student's (k+1) categories are read off its dense log-softmax: log q at the k indices, and the
    log-sum-exp of log q over a dense mask of the other classes for 'rest'."""
    cd, live, log_p, kd_coef, ce_coef = _prepare(
        student, indices, values, target, temperature, alpha, t2_scale, reduction, ignore_index, convention,
        values_kind, divergence, beta, teacher_temperature)
    s = student.to(cd)
    n, c = s.shape
    log_q = F.log_softmax(s / temperature, dim=-1)
    in_support = torch.zeros(n, c, dtype=cd, device=s.device).scatter_add(-1, indices, live.to(cd)) > 0
    log_q_rest = torch.logsumexp(log_q.masked_fill(in_support, -math.inf), dim=-1, keepdim=True)
    log_q_k = torch.where(live, log_q.gather(-1, indices), torch.full_like(log_p[:, :-1], -math.inf))
    rows = kd_coef * divergence_rows(log_p, torch.cat([log_q_k, log_q_rest], dim=-1), divergence, beta)
    if target is None:
        return _reduce(rows, torch.ones_like(rows, dtype=torch.bool), c, reduction)
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    ce = torch.logsumexp(s, dim=-1) - s.gather(-1, safe_target[:, None]).squeeze(-1)
    rows = torch.where(valid, rows + ce_coef * ce, torch.zeros_like(rows))
    return _reduce(rows, valid, c, reduction)


def _forward(student: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, target: torch.Tensor | None,
             temperature: float, alpha: float, t2_scale: bool, reduction: str, ignore_index: int, convention: str,
             values_kind: str, divergence: str, beta: float, teacher_temperature: float | None, backend: str,
             compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The custom op's body on checked inputs: (loss, grad of the row losses [N, C] or empty, reduction scale)."""
    live, log_p = _teacher_side(values.to(compute_dtype(student.dtype)), temperature, convention,
                                teacher_temperature)
    sorted_indices, sorted_log_p = kernel_inputs(indices, live, log_p)
    c = _spine.kd_coefficients(temperature, alpha, t2_scale, target is not None, divergence=divergence, beta=beta)
    rows, grad = _spine.native_op(backend, OP, f"{OP}_fwd")(
        student, sorted_indices, sorted_log_p, target, c.inv_student_temp, c.kd_coef, c.ce_coef, c.divergence,
        c.beta, ignore_index, compute_grad)
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
    """sparse_kd_loss_reference without a dense teacher: student [N, C], indices [N, k] int64, values
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
