"""The sparse (top-k) teacher, shared by sparse_kd_loss and fused_linear_sparse_kd_loss: its checks, its
(k+1)-category log-probabilities, the kernels' form of it (sorted indices) and the spec,
sparse_kd_loss_reference. The convention (DistillKit's) is written out in ops/sparse_kd_loss.py; the kernel
contract in docs/DESIGN.md 2.5."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

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
    indices = indices.to(torch.int64)  # int32 indices (a compact store) are widened here, O(N k)
    keys, order = torch.where(live, indices, torch.full_like(indices, -1)).sort(dim=-1)
    k = indices.shape[1]
    return keys.contiguous(), torch.cat([log_p[:, :k].gather(-1, order), log_p[:, k:]], dim=-1).contiguous()


def check_sparse_teacher(op: str, indices: torch.Tensor, values: torch.Tensor, like: torch.Tensor, like_name: str,
                         num_classes: int, convention: str, values_kind: str, divergence: str) -> None:
    """indices [N, k] int64 or int32 and values [N, k] on the device of `like` (the [N, ...] input named like_name),
    a convention and values_kind valid for the divergence; on CPU tensors the index values too (in
    [0, num_classes), none repeated, a finite entry per row under 'zero'). Reading them on an accelerator
    would synchronize with it, so there the kernels turn a bad row into NaN instead."""
    n = like.shape[0]
    _checks.check_tensor(op, "indices", indices, dims=2)
    if indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{op}: indices must be int64 or int32, got {indices.dtype}")
    if indices.shape[0] != n or indices.shape[1] == 0:
        raise ValueError(f"{op}: indices must be [N, k] = [{n}, k >= 1], got {tuple(indices.shape)}")
    _checks.check_tensor(op, "values", values, dims=2, floating=True)
    if values.shape != indices.shape:
        raise ValueError(f"{op}: values must have the shape of indices {tuple(indices.shape)}, got {tuple(values.shape)}")
    _checks.check_same_device(op, "indices", indices, like_name, like)
    _checks.check_same_device(op, "values", values, like_name, like)
    _checks.check_choice(op, "convention", convention, CONVENTIONS)
    _checks.check_choice(op, "values_kind", values_kind, VALUE_KINDS)
    if convention == "symmetric_uniform" and values_kind == "logits":
        raise ValueError(f"{op}: convention='symmetric_uniform' needs values_kind='log_probs' (the missing mass "
                         "1 - sum(p) is undefined for logits of the top-k only)")
    if divergence == "reverse_kl" and convention == "zero":
        raise ValueError(f"{op}: divergence='reverse_kl' is +inf under convention='zero' (the teacher has no mass "
                         "outside its top-k where the student has some); use convention='symmetric_uniform'")
    if indices.device.type == "cpu" and not _checks._is_fake(indices):
        _check_index_values(op, indices, values, num_classes, convention)


def _check_index_values(op: str, indices: torch.Tensor, values: torch.Tensor, num_classes: int,
                        convention: str) -> None:
    """Indices in [0, C); no index twice among a row's finite (non-padding) entries; under 'zero' at least
    one finite entry per row (else that row's teacher has no distribution at all)."""
    bad = (indices < 0) | (indices >= num_classes)
    if bool(bad.any()):
        raise ValueError(f"{op}: indices holds {int(indices[bad][0])}, outside [0, {num_classes})")
    live = values > -math.inf
    if convention == "zero" and not bool(live.any(dim=-1).all()):
        row = int((~live.any(dim=-1)).nonzero()[0])
        raise ValueError(f"{op}: values has no finite entry in row {row}: under convention='zero' that row's teacher "
                         "has no distribution (give such rows target=ignore_index and keep one entry, or use "
                         "convention='symmetric_uniform')")
    k = indices.shape[1]
    # Padding entries get distinct negative keys so that they never collide.
    keys = torch.where(live, indices, -1 - torch.arange(k, device=indices.device)).sort(dim=-1).values
    dup = (keys[:, 1:] == keys[:, :-1]) & (keys[:, 1:] >= 0)
    if bool(dup.any()):
        row = int(dup.any(dim=-1).nonzero()[0])
        raise ValueError(f"{op}: indices repeats a class in row {row} among entries with finite values "
                         "(pad with value -inf instead)")


def teacher_side(values, temperature, convention, teacher_temperature):
    """(live entries [N, k], teacher log-probs [N, k+1]) of checked values, in the values' dtype."""
    live = values > -math.inf
    t_teacher = temperature if teacher_temperature is None else teacher_temperature
    return live, teacher_log_probs_ext(values.detach(), live, t_teacher, convention)


def native_inputs(indices: torch.Tensor, values: torch.Tensor, like: torch.Tensor, temperature: float,
                  convention: str, teacher_temperature: float | None):
    """(sorted indices, log_p [N, k+1]) of the kernel contract, log_p in the compute dtype of `like`."""
    live, log_p = teacher_side(values.to(compute_dtype(like.dtype)), temperature, convention, teacher_temperature)
    return kernel_inputs(indices, live, log_p)


def forward_rows(backend: str, student: torch.Tensor, indices: torch.Tensor, log_p: torch.Tensor, target,
                 coefficients, ignore_index: int, compute_grad: bool):
    """(row losses [N], their gradient [N, C] or empty): one sparse_kd_loss_fwd kernel call on the teacher's
    kernel form (native_inputs), with the spine's KD coefficients (the teacher arrives tempered: no
    inv_teacher_temp)."""
    c = coefficients
    return _spine.native_op(backend, OP, f"{OP}_fwd")(student, indices, log_p, target, c.inv_student_temp, c.kd_coef,
                                                     c.ce_coef, c.divergence, c.beta, ignore_index, compute_grad)


def _check_args(student, indices, values, target, temperature, alpha, t2_scale, reduction, ignore_index,
                convention, values_kind, divergence, beta, teacher_temperature) -> None:
    _checks.check_tensor(OP, "student", student, dims=2, floating=True)
    if student.shape[0] == 0 or student.shape[1] == 0:
        raise ValueError(f"{OP}: student must be a non-empty [N, C] tensor, got shape {tuple(student.shape)}")
    _checks.check_kd_scalars(OP, temperature, alpha, t2_scale, ignore_index)
    _checks.check_choice(OP, "reduction", reduction, REDUCTIONS)
    _checks.check_divergence_args(OP, divergence, beta, teacher_temperature)
    check_sparse_teacher(OP, indices, values, student, "student", student.shape[1], convention, values_kind,
                         divergence)
    _checks.check_target(OP, target, student, ignore_index)


def _prepare(student, indices, values, target, temperature, alpha, t2_scale, reduction, ignore_index, convention,
             values_kind, divergence, beta, teacher_temperature):
    """Checks, then (compute dtype, live entries, teacher log-probs in the compute dtype, kd_coef, ce_coef)."""
    _check_args(student, indices, values, target, temperature, alpha, t2_scale, reduction, ignore_index,
                convention, values_kind, divergence, beta, teacher_temperature)
    cd = compute_dtype(student.dtype)
    live, log_p = teacher_side(values.to(cd), temperature, convention, teacher_temperature)
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
    indices = indices.to(torch.int64)
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
