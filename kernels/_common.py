"""Pieces shared by the Triton kernels of kd_loss, ensemble_kd_loss and grouped_heads.

Device side (@triton.jit): online softmax statistics, the tempered teacher load, the divergences
(forward_kl, reverse_kl, jsd) and their gradients, the gradient store. Host side: the launch device,
the outputs of the KD ops and the checks of the contract's divergence arguments.

The divergences (the kernel contract in docs/DESIGN.md 2; q the student's tempered distribution, p the teacher's):
every one is written as a per-element term d (D = sum d) and a per-element h with which
    forward_kl: dD/dz = q - p
    reverse_kl: dD/dz = h - q * sum(h),  h = q (log q - log p)        (sum(h) = D)
    jsd:        dD/dz = h - q * sum(h),  h = (1-beta) q (log q - log m)
so that a row needs sum(d) (and for jsd sum(h)) before its gradient: whole-row kernels have both at
once, chunked kernels take one more pass over the row for reverse_kl and jsd.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

FORWARD_KL, REVERSE_KL, JSD = 0, 1, 2
DIVERGENCE_CODES = (FORWARD_KL, REVERSE_KL, JSD)
# Running-max start of the per-lane online softmax: finite, so that max - start never makes
# inf - inf = NaN; a lane that only ever saw -inf keeps it and a sum of 0, and drops out of the merge.
# A constexpr: the kernels read it as a global.
MAX_START = tl.constexpr(-1.0e30)


# --- device helpers ------------------------------------------------------------------------------

@triton.jit
def load_tempered_teacher(ptrs, mask, inv_teacher_temp, TEACHER_KIND: tl.constexpr, EVICT: tl.constexpr):
    """a = t * inv_teacher_temp for logits (0) and log-probs (1), log(t) * inv_teacher_temp for probs (2),
    in fp32; -inf where masked. A zero probability becomes -inf, so masked probs load as 0 (log(-inf)
    would be NaN)."""
    if TEACHER_KIND == 2:
        t = tl.load(ptrs, mask=mask, other=0.0, eviction_policy=EVICT).to(tl.float32)
        return tl.log(t) * inv_teacher_temp
    t = tl.load(ptrs, mask=mask, other=float("-inf"), eviction_policy=EVICT).to(tl.float32)
    return t * inv_teacher_temp


@triton.jit
def to_grad_dtype(g, grad_ptr, SOFT_BF16_ROUNDING: tl.constexpr):
    """fp32 -> the grad's dtype, rounding to nearest even.

    The interpreter truncates fp32 -> bf16 (a GPU rounds to nearest), so on CPU tensors the
    rounding is done on the bits here: add 0x7FFF plus the lowest kept bit, keep the top 16 bits
    (NaN and inf keep their class)."""
    if SOFT_BF16_ROUNDING:
        bits = g.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return g.to(grad_ptr.dtype.element_ty)


@triton.jit
def online_update(run_max, run_sum, x):
    """Per-lane online softmax step: (max, sum of exp(. - max)) after seeing x; one exp per element.

    exp(-|x - max|) is exp(x - max) when x <= max, and the rescale factor exp(max - x) when x is
    the new max. x = -inf leaves the state unchanged (run_max starts at MAX_START, finite)."""
    d = tl.exp(-tl.abs(x - run_max))
    bigger = x > run_max
    new_sum = tl.where(bigger, run_sum * d + 1.0, run_sum + d)
    return tl.where(bigger, x, run_max), new_sum


@triton.jit
def merge_lanes(run_max, run_sum):
    """Merges per-lane (max, sum) into the row's max and sum of exp(. - max)."""
    row_max = tl.max(run_max, axis=0)
    return row_max, tl.sum(run_sum * tl.exp(run_max - row_max), axis=0)


@triton.jit
def online_lse(run_max, run_sum, x, axis: tl.constexpr):
    """One online log-sum-exp step reducing x along `axis` (-inf entries add nothing, no inf - inf)."""
    new_max = tl.maximum(run_max, tl.max(x, axis=axis))
    safe = tl.where(new_max == float("-inf"), 0.0, new_max)
    new_sum = run_sum * tl.exp(run_max - safe) + tl.sum(tl.exp(x - tl.expand_dims(safe, axis)), axis=axis)
    return new_max, new_sum


@triton.jit
def load_row_target(y_ptr, row, y_stride, ignore_index, n_cols, HAS_TARGET: tl.constexpr):
    """(y, live, y_ok) of a one-row program: the row is live unless its target is ignore_index, y_ok
    says the target is a class in [0, n_cols). Without a target: y = 0 and both flags true."""
    live = row >= 0  # a true scalar tensor
    y_ok = live
    y = 0
    if HAS_TARGET:
        y = tl.load(y_ptr + row * y_stride)
        live = y != ignore_index
        y_ok = (y >= 0) & (y < n_cols)
    return y, live, y_ok


@triton.jit
def divergence_terms(log_p, log_q, p, q, beta, DIVERGENCE: tl.constexpr):
    """Per-element (d, h) of the divergence (see the module docstring), 0 * log 0 = 0 on every side.

    reverse_kl where p = 0 < q is +inf (log p = -inf), as the math says. jsd's log m is a log-space
    logaddexp, so that probabilities that underflow fp32 keep their logs; beta 0 or 1 drops a side
    (its weight is 0, so its terms are 0, not 0 * inf)."""
    if DIVERGENCE == 0:
        d = tl.where(p != 0.0, p * (log_p - log_q), 0.0)
        h = d
    elif DIVERGENCE == 1:
        d = tl.where(q != 0.0, q * (log_q - log_p), 0.0)
        h = d
    else:
        one_minus_beta = 1.0 - beta
        lp = log_p + tl.log(beta)
        lq = log_q + tl.log(one_minus_beta)
        hi = tl.maximum(lp, lq)
        lo = tl.minimum(lp, lq)
        log_m = tl.where(hi == float("-inf"), hi, hi + tl.log(1.0 + tl.exp(lo - hi)))
        wp = beta * p
        wq = one_minus_beta * q
        h = tl.where(wq > 0.0, wq * (log_q - log_m), 0.0)
        d = tl.where(wp > 0.0, wp * (log_p - log_m), 0.0) + h
    return d, h


@triton.jit
def divergence_grad(p, q, h, h_sum, DIVERGENCE: tl.constexpr):
    """dD/dz (z the tempered student logits) from divergence_terms' h and the row's sum of h."""
    if DIVERGENCE == 0:
        return q - p
    return h - q * h_sum


@triton.jit
def divergence_sums(d, h, axis: tl.constexpr, DIVERGENCE: tl.constexpr):
    """The row's divergence D = sum(d) and the sum of h its gradient needs (D itself but for jsd)."""
    div = tl.sum(d, axis=axis)
    h_sum = div
    if DIVERGENCE == 2:
        h_sum = tl.sum(h, axis=axis)
    return div, h_sum


# --- host helpers --------------------------------------------------------------------------------

def on_device(t: torch.Tensor):
    """Launch on the tensor's GPU (not the current one): a tensor on cuda:1 runs on cuda:1."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def kd_outputs(student: torch.Tensor, compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(row_loss [N] float32, grad [N, C] in the student's dtype, or empty) of a KD op, uninitialized."""
    n_rows, n_cols = student.shape
    row_loss = torch.empty(n_rows, dtype=torch.float32, device=student.device)
    grad = torch.empty((n_rows, n_cols) if compute_grad else (0,), dtype=student.dtype, device=student.device)
    return row_loss, grad


def check_same_device(op: str, student: torch.Tensor, **others: torch.Tensor | None) -> None:
    """A clear error naming the first tensor that is not on the student's device (None is skipped)."""
    for name, x in others.items():
        if x is not None and x.device != student.device:
            raise ValueError(f"{op}: {name} is on {x.device} but student is on {student.device}")


def check_kd_scalars(op: str, inv_student_temp, inv_teacher_temp, divergence, beta) -> None:
    """Clear errors for the contract's scalar arguments that the kernels cannot take."""
    for name, value in (("inv_student_temp", inv_student_temp), ("inv_teacher_temp", inv_teacher_temp)):
        if not (float(value) > 0.0 and float(value) < float("inf")):
            raise ValueError(f"{op}: {name} must be a positive finite number, got {value!r}")
    if divergence not in DIVERGENCE_CODES:
        raise ValueError(f"{op}: divergence must be 0 (forward_kl), 1 (reverse_kl) or 2 (jsd), got {divergence!r}")
    if not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"{op}: beta must be in [0, 1], got {beta!r}")
