"""The specs: one pure-PyTorch reference per fused op (DESIGN section 2).

Each reference computes in float32 (float64 when given float64) and is differentiated by autograd.
Every backend (C++ CPU, CUDA, Triton) is tested and benchmarked against these functions; when a
backend and this file disagree, this file is right.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
import torch.nn.functional as F

REDUCTIONS = ("none", "sum", "batchmean", "mean")
# How a teacher is given. 'logits', 'log_probs' and 'probs' are tempered by the op (softmax(t / T));
# 'tempered_probs' and 'tempered_log_probs' are soft targets already at temperature T (e.g. cached
# softmax(t / T)), used as they are.
TEACHER_KINDS = ("logits", "log_probs", "probs", "tempered_probs", "tempered_log_probs")
MIXES = ("prob", "logit")
# p: the teacher's tempered distribution, q: the student's. forward_kl = KL(p || q) (Hinton's KD),
# reverse_kl = KL(q || p), jsd = beta*KL(p || m) + (1-beta)*KL(q || m) with m = beta*p + (1-beta)*q.
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
HEAD_MODES = ("logit_mean", "prob_mean")
# The KD ops' defaults, written once (the ops take them from here).
DEFAULT_TEMPERATURE = 4.0
DEFAULT_ALPHA = 0.9
DEFAULT_BETA = 0.5
DEFAULT_IGNORE_INDEX = -100
DEFAULT_REDUCTION = "batchmean"
DEFAULT_DIVERGENCE = "forward_kl"


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _reduce(rows: torch.Tensor, valid: torch.Tensor, num_classes: int, reduction: str) -> torch.Tensor:
    """rows [N] (zero where not valid) -> the requested reduction. No host sync: counts stay tensors."""
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    n_valid = valid.sum().to(rows.dtype)
    if reduction == "mean":
        n_valid = n_valid * num_classes
    # An all-ignored batch gives loss 0 (and gradient 0), not NaN.
    return total / n_valid.clamp(min=1)


def _weighted_log_ratio(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """sum_c a_c (log a_c - log b_c) over the last dim, with 0 * log 0 = 0: entries where a is 0 count
    nowhere, and their gradient is 0, not NaN (a NaN a is not 0, so NaN inputs still make a NaN)."""
    a = log_a.exp()
    return (a * torch.where(a == 0, torch.zeros_like(log_a), log_a - log_b)).sum(-1)


def divergence_rows(log_p: torch.Tensor, log_q: torch.Tensor, divergence: str = DEFAULT_DIVERGENCE,
                    beta: float = DEFAULT_BETA) -> torch.Tensor:
    """Per-row divergence [N] between the teacher's log-distribution log_p and the student's log_q."""
    if divergence == "forward_kl":
        return _weighted_log_ratio(log_p, log_q)
    if divergence == "reverse_kl":
        return _weighted_log_ratio(log_q, log_p)
    # log m = logsumexp(log beta + log p, log(1-beta) + log q); beta in {0, 1} drops a side exactly.
    if beta == 0.0:
        log_m = log_q
    elif beta == 1.0:
        log_m = log_p
    else:
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    # A side of weight 0 counts nowhere: at beta = 1, KL(q || m) = KL(q || p) may be +inf (p = 0 < q) and
    # 0 * inf is NaN, so that side is taken against itself (0, and the student stays in the graph).
    p_side = _weighted_log_ratio(log_p, log_m if beta > 0.0 else log_p)
    q_side = _weighted_log_ratio(log_q, log_m if beta < 1.0 else log_q)
    return beta * p_side + (1.0 - beta) * q_side


def _kd_rows(
    student: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    target: torch.Tensor | None,
    temperature: float,
    alpha: float,
    t2_scale: bool,
    ignore_index: int,
    divergence: str = DEFAULT_DIVERGENCE,
    beta: float = DEFAULT_BETA,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss [N] and row validity [N] for student logits (tempered by `temperature`) against a
    tempered teacher distribution."""
    s2 = temperature * temperature if t2_scale else 1.0
    log_q = F.log_softmax(student / temperature, dim=-1)
    kl = divergence_rows(teacher_log_probs, log_q, divergence, beta)
    if target is None:
        return s2 * kl, torch.ones_like(kl, dtype=torch.bool)
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    ce = torch.logsumexp(student, dim=-1) - student.gather(-1, safe_target[:, None]).squeeze(-1)
    rows = alpha * s2 * kl + (1.0 - alpha) * ce
    return torch.where(valid, rows, torch.zeros_like(rows)), valid


def teacher_scores(teacher: torch.Tensor, temperature: float, teacher_kind: str) -> tuple[torch.Tensor, float]:
    """(scores, t) with the teacher's tempered distribution = softmax(scores / t): t = T for the kinds the op
    tempers, t = 1 for the already-tempered ones. Scores are log-space (log of probabilities, 0 -> -inf)."""
    scores = torch.log(teacher) if teacher_kind in ("probs", "tempered_probs") else teacher
    return scores, (1.0 if teacher_kind.startswith("tempered_") else temperature)


def teacher_log_probs(teacher: torch.Tensor, temperature: float, teacher_kind: str) -> torch.Tensor:
    """log softmax(t / T) for logits and log-probs, log softmax(log(t) / T) for probs (0 stays 0);
    log of the (renormalized) given distribution for the tempered kinds."""
    scores, t = teacher_scores(teacher, temperature, teacher_kind)
    return F.log_softmax(scores / t, dim=-1)


def kd_loss_reference(
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
) -> torch.Tensor:
    """DESIGN 2.1. loss = alpha*s2*D(p, q) + (1-alpha)*CE(s, y) per row, q = softmax(s/T), s2 = T^2 if
    t2_scale, D the `divergence` (see DIVERGENCES; forward_kl is KL(p || q)).

    p is the teacher's tempered distribution (see teacher_log_probs and TEACHER_KINDS), tempered by
    teacher_temperature (default: temperature, the student's).

    With target None a row's loss is s2*KL and alpha is unused. Rows whose target is ignore_index
    count nowhere. The loss is float32 (float64 for float64 input); the teacher is a constant.
    """
    cd = compute_dtype(student.dtype)
    s = student.to(cd)
    t_teacher = temperature if teacher_temperature is None else teacher_temperature
    log_p = teacher_log_probs(teacher.detach().to(cd), t_teacher, teacher_kind)
    rows, valid = _kd_rows(s, log_p, target, temperature, alpha, t2_scale, ignore_index, divergence, beta)
    return _reduce(rows, valid, student.shape[-1], reduction)


def normalize_ensemble_weights(weights: torch.Tensor | None, k: int, n: int, device, dtype) -> torch.Tensor:
    """None, [K] or [K, N] non-negative weights -> [K, N] weights that sum to 1 over K."""
    if weights is None:
        return torch.full((k, n), 1.0 / k, device=device, dtype=dtype)
    w = weights.to(device=device, dtype=dtype)
    if w.dim() == 1:
        w = w[:, None].expand(k, n)
    return w / w.sum(0, keepdim=True)


def ensemble_log_probs(
    teachers: torch.Tensor, weights: torch.Tensor, temperature: float, mix: str
) -> torch.Tensor:
    """teachers [K, N, C] logits (or log-space scores), weights [K, N] normalized -> log of the mixture
    distribution [N, C], each teacher tempered by `temperature`."""
    if mix == "prob":
        # log sum_k w_k softmax(t_k/T), in log space so that tiny probabilities keep their precision.
        log_pk = F.log_softmax(teachers / temperature, dim=-1)
        return torch.logsumexp(log_pk + torch.log(weights)[..., None], dim=0)
    # A teacher of weight 0 counts nowhere, even where its logit is -inf (0 * -inf would be NaN).
    weighted = torch.where(weights[..., None] == 0, torch.zeros_like(teachers), weights[..., None] * teachers)
    return F.log_softmax(weighted.sum(0) / temperature, dim=-1)


def ensemble_kd_loss_reference(
    student: torch.Tensor,
    teachers: torch.Tensor | Sequence[torch.Tensor],
    weights: torch.Tensor | None = None,
    target: torch.Tensor | None = None,
    *,
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
) -> torch.Tensor:
    """DESIGN 2.2. kd_loss against the mixture of K teachers, each given as `teacher_kind` (as in kd_loss).

    With p_k the tempered distribution of teacher k (softmax(t_k/T) for logits and log-probs,
    softmax(log(t_k)/T) for probs, the given distribution for the tempered kinds) and s_k its log:
    mix='prob': p = sum_k w_k p_k; mix='logit': p = softmax(sum_k w_k s_k) (for logits that is
    softmax(sum_k w_k t_k / T)). weights None (uniform), [K] or [K, N]; normalized over K. The teachers
    are tempered by teacher_temperature (default: temperature); divergence and beta as in kd_loss_reference,
    applied to the mixture p.
    """
    cd = compute_dtype(student.dtype)
    t = teachers if isinstance(teachers, torch.Tensor) else torch.stack(list(teachers))
    t_teacher = temperature if teacher_temperature is None else teacher_temperature
    scores, t_apply = teacher_scores(t.detach().to(cd), t_teacher, teacher_kind)
    k, n = t.shape[0], t.shape[1]
    w = normalize_ensemble_weights(weights, k, n, t.device, cd)
    log_p = ensemble_log_probs(scores, w, t_apply, mix)
    rows, valid = _kd_rows(student.to(cd), log_p, target, temperature, alpha, t2_scale, ignore_index,
                           divergence, beta)
    return _reduce(rows, valid, student.shape[-1], reduction)


@functools.lru_cache(maxsize=256)
def _cover_on_device(cover: tuple[tuple[int, ...], ...], device: torch.device) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The cover's subsets as index tensors on `device` and the number of subsets holding each class
    (int64 [C]): made once per (cover, device), so a call copies nothing from the host."""
    num_classes = 1 + max(max(s) for s in cover)
    counts = [0] * num_classes
    for subset in cover:
        for c in subset:
            counts[c] += 1
    return ([torch.tensor(s, dtype=torch.int64, device=device) for s in cover],
            torch.tensor(counts, dtype=torch.int64, device=device))


def grouped_heads_reference(
    features: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    cover: Sequence[Sequence[int]],
    *,
    mode: str = "logit_mean",
) -> torch.Tensor:
    """DESIGN 2.3. K linear heads over K feature groups, assembled into one C-class output.

    features [N, K*D] (group k is columns k*D..(k+1)*D) or [K, N, D]; weight [K, D, W]; bias [K, W].
    Head k's output j < |S_k| is class cover[k][j].
    - 'logit_mean' (W >= max|S_k|): z_c = mean over heads covering c of their logit for c.
    - 'prob_mean' (W >= max|S_k| + 1): head k's output |S_k| is its 'other' unit; q_k = softmax over
      its |S_k|+1 real outputs; r_c = mean over covering heads of q_k[c]; returns log(r / sum r).
    Outputs past a head's real ones are padding and ignored. Returns [N, C] in the features' dtype.
    """
    cd = compute_dtype(features.dtype)
    k, d = weight.shape[0], weight.shape[1]
    h = features.view(features.shape[0], k, d) if features.dim() == 2 else features.permute(1, 0, 2)
    u = torch.einsum("nkd,kdw->nkw", h.to(cd), weight.to(cd)) + bias.to(cd)  # [N, K, W]
    sizes = [len(s) for s in cover]
    subsets, class_counts = _cover_on_device(tuple(tuple(int(c) for c in s) for s in cover), features.device)
    num_classes = class_counts.numel()
    counts = class_counts.to(cd)
    n = u.shape[0]
    if mode == "logit_mean":
        z = u.new_zeros(n, num_classes)
        for j, subset in enumerate(subsets):
            z = z.index_add(1, subset, u[:, j, : sizes[j]])
        return (z / counts).to(features.dtype)
    # prob_mean, in log space: log r_c = logsumexp over covering heads of log q_k[c] - log count(c).
    per_class = u.new_full((n, num_classes, k), -math.inf)
    for j, subset in enumerate(subsets):
        log_q = F.log_softmax(u[:, j, : sizes[j] + 1], dim=-1)
        per_class[:, subset, j] = log_q[:, : sizes[j]]
    log_r = torch.logsumexp(per_class, dim=-1) - torch.log(counts)
    return (log_r - torch.logsumexp(log_r, dim=-1, keepdim=True)).to(features.dtype)
