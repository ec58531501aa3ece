"""fused_linear_kd_loss: kd_loss on the logits of a linear head (an LM head), never materialized whole.

Spec: materialize logits = hidden @ weight.T + bias (and the teacher's, in the hidden-state form) and call
ued_fast.reference.kd_loss_reference (ensemble form: ensemble_kd_loss_reference); backend='reference'
does exactly that.

The native backends walk the rows in chunks. Per chunk: logits = h_chunk @ W.T (+ b), teacher logits
(given, or t_chunk @ W_t.T + b_t), then ONE row-kernel call (the kernel contract of kd_loss /
ensemble_kd_loss through _spine.native_forward, with the coefficients of _spine.kd_coefficients, so
every divergence of kd_loss is there) gives the row losses and g = d row_loss / d logits. The forward pass then accumulates
    grad_hidden[chunk] = g @ W,   grad_W += g.T @ h_chunk,   grad_b += g.sum(0)
(grad_W and grad_b in float32, float64 for float64 input) and scales them once by the reduction's
factor, which comes from `target` on the device (no host synchronization). Backward is one in-place
multiply by grad_output (a second backward through the same graph runs the pass again). reduction='none' cannot fold a per-row grad_output into grad_W ahead of time, so its
backward runs the chunked pass again with grad_output as per-row weights.

A sparse (top-k) teacher (fused_linear_sparse_kd_loss) reaches the pass as its kernel form (sorted
indices [N, k] and log-probs [N, k+1], ops/_sparse_teacher.py), sliced per chunk like teacher logits,
and each chunk calls the sparse_kd_loss row kernel (docs/DESIGN.md 2.5) instead.

Memory beyond the inputs and the parameter-sized gradients: O(chunk_size x V). chunk_size=None picks
the rows whose per-chunk temporaries fit in CHUNK_BYTES.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ..reference import (MIXES, REDUCTIONS, TEACHER_KINDS, compute_dtype, ensemble_kd_loss_reference,
                         kd_loss_reference)
from . import _checks, _sparse_teacher, _spine
from ._spine import DEFAULT_BETA, DEFAULT_DIVERGENCE, DEFAULT_IGNORE_INDEX, DEFAULT_REDUCTION

OP = "fused_linear_kd_loss"
ENSEMBLE_OP = "fused_linear_ensemble_kd_loss"
SPARSE_OP = "fused_linear_sparse_kd_loss"
# The pass's teacher_kind for a sparse teacher: teachers = [sorted indices, log_p], not logits.
SPARSE_TEACHER = "sparse"
# Per-chunk temporaries (logits, their gradient, teacher logits) are sized to stay under this.
CHUNK_BYTES = 256 * 2**20
# An LM head's defaults (not kd_loss's image-classification ones).
DEFAULT_TEMPERATURE = 1.0
DEFAULT_ALPHA = 0.5


# ----------------------------------------------------------------------------------------------
# The chunked pass (plain Python over the native row kernels; wrapped as custom ops below)
# ----------------------------------------------------------------------------------------------

def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return torch.mm(x, w.t()) if b is None else torch.addmm(b, x, w.t())


def _add_mm_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with acc in float32/64 and a, b maybe 16-bit: the products are accumulated in acc's
    precision across chunks (a 16-bit partial per chunk would lose the small per-chunk contributions)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.is_cuda:
        acc.add_(torch.mm(a, b, out_dtype=acc.dtype))
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _row_kernel(backend, ensemble, logits, teacher_chunks, mix_weights, target, coefficients, ignore_index,
                teacher_kind, mix, compute_grad):
    """Row losses [n] and d row_loss / d logits [n, V] (or empty) of one chunk."""
    if teacher_kind == SPARSE_TEACHER:
        indices, log_p = teacher_chunks
        return _sparse_teacher.forward_rows(backend, logits, indices, log_p, target, coefficients, ignore_index,
                                            compute_grad)
    if ensemble:
        teacher_chunks = [t.to(logits.dtype) for t in teacher_chunks]  # the kernels read the student's dtype
        return _spine.native_forward("ensemble_kd_loss", backend, logits, teacher_chunks, mix_weights, target,
                                     *coefficients, ignore_index, _spine.MIX_CODE[mix], compute_grad)
    return _spine.native_forward("kd_loss", backend, logits, teacher_chunks[0], target, *coefficients, ignore_index,
                                 _spine.KERNEL_TEACHER_KIND[teacher_kind], compute_grad)


def _chunked_pass(hidden, weight, bias, teachers, teacher_weights, teacher_biases, mix_weights, target, grad_scale,
                  temperature, alpha, t2_scale, ignore_index, teacher_kind, mix, ensemble, backend, chunk_size,
                  need_hidden, need_weight, need_bias, divergence=DEFAULT_DIVERGENCE, beta=DEFAULT_BETA,
                  teacher_temperature=None):
    """Row losses [N] and (grad_hidden, grad_weight, grad_bias) of sum_i grad_scale_i * row_loss_i.

    grad_scale: 0-d (one factor, applied once at the end in the accumulation dtype) or [N] (per row,
    applied to each chunk's logit gradient before the products). A gradient not asked for is empty.
    """
    n, v = hidden.shape[0], weight.shape[0]
    acc_dtype = compute_dtype(hidden.dtype)
    rows = torch.empty(n, dtype=acc_dtype, device=hidden.device)
    grad_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_hidden else hidden.new_empty(0)
    grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_weight else None
    grad_bias = torch.zeros(v, dtype=acc_dtype, device=weight.device) if need_bias else None
    compute_grad = need_hidden or need_weight or need_bias
    teacher_is_hidden = len(teacher_weights) > 0
    coefficients = _spine.kd_coefficients(temperature, alpha, t2_scale, target is not None, teacher_kind,
                                          teacher_temperature, divergence, beta)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        h = hidden[start:stop]
        logits = _linear(h, weight, bias)
        if teacher_is_hidden:
            with torch.no_grad():
                biases = teacher_biases or [None] * len(teachers)
                teacher_chunks = [_linear(t[start:stop], tw, tb) for t, tw, tb in zip(teachers, teacher_weights, biases)]
        else:
            teacher_chunks = [_checks.last_dim_contiguous(t[start:stop]) for t in teachers]
        w_chunk = None if mix_weights is None else mix_weights[:, start:stop]
        y_chunk = None if target is None else target[start:stop]
        row_loss, g = _row_kernel(backend, ensemble, logits, teacher_chunks, w_chunk, y_chunk, coefficients,
                                  ignore_index, teacher_kind, mix, compute_grad)
        rows[start:stop] = row_loss
        del logits, teacher_chunks
        if not compute_grad:
            continue
        if grad_scale.dim() == 1:
            g.mul_(grad_scale[start:stop, None].to(g.dtype))
        if need_hidden:
            torch.mm(g, weight, out=grad_hidden[start:stop])
        if need_weight:
            _add_mm_(grad_weight, g.t(), h)
        if need_bias:
            grad_bias.add_(g.sum(0, dtype=acc_dtype))
    if grad_scale.dim() == 0 and compute_grad:
        if need_hidden:
            grad_hidden.mul_(grad_scale.to(grad_hidden.dtype))
        if need_weight:
            grad_weight.mul_(grad_scale)
        if need_bias:
            grad_bias.mul_(grad_scale)
    grad_weight = weight.new_empty(0) if grad_weight is None else grad_weight.to(weight.dtype)
    grad_bias = weight.new_empty(0) if grad_bias is None else grad_bias.to(bias.dtype)
    return rows, grad_hidden, grad_weight, grad_bias


# ----------------------------------------------------------------------------------------------
# torch.library custom ops: the pass (used by the 'none' backward) and the loss (with autograd)
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("ued_fast::fused_linear_kd_pass", mutates_args=())
def _pass_op(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], teachers: list[torch.Tensor],
    teacher_weights: list[torch.Tensor], teacher_biases: list[torch.Tensor],
    mix_weights: Optional[torch.Tensor], target: Optional[torch.Tensor], grad_scale: torch.Tensor,
    temperature: float, alpha: float, t2_scale: bool, ignore_index: int, teacher_kind: str, mix: str,
    ensemble: bool, backend: str, chunk_size: int, need_hidden: bool, need_weight: bool, need_bias: bool,
    divergence: str = DEFAULT_DIVERGENCE, beta: float = DEFAULT_BETA, teacher_temperature: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row losses [N], grad_hidden, grad_weight, grad_bias) of sum_i grad_scale_i * row_loss_i."""
    return _chunked_pass(hidden, weight, bias, teachers, teacher_weights, teacher_biases, mix_weights, target,
                         grad_scale, temperature, alpha, t2_scale, ignore_index, teacher_kind, mix, ensemble,
                         backend, chunk_size, need_hidden, need_weight, need_bias, divergence, beta,
                         teacher_temperature)


def _fake_grads(hidden, weight, need_hidden, need_weight, need_bias):
    return (hidden.new_empty(hidden.shape if need_hidden else (0,)),
            weight.new_empty(weight.shape if need_weight else (0,)),
            weight.new_empty((weight.shape[0],) if need_bias else (0,)))


@_pass_op.register_fake
def _(hidden, weight, bias, teachers, teacher_weights, teacher_biases, mix_weights, target, grad_scale, temperature,
      alpha, t2_scale, ignore_index, teacher_kind, mix, ensemble, backend, chunk_size, need_hidden, need_weight,
      need_bias, divergence=DEFAULT_DIVERGENCE, beta=DEFAULT_BETA, teacher_temperature=None):
    rows = hidden.new_empty((hidden.shape[0],), dtype=compute_dtype(hidden.dtype))
    return (rows,) + _fake_grads(hidden, weight, need_hidden, need_weight, need_bias)


@torch.library.custom_op("ued_fast::fused_linear_kd_loss", mutates_args=())
def _loss_op(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], teachers: list[torch.Tensor],
    teacher_weights: list[torch.Tensor], teacher_biases: list[torch.Tensor],
    mix_weights: Optional[torch.Tensor], target: Optional[torch.Tensor], temperature: float, alpha: float,
    t2_scale: bool, reduction: str, ignore_index: int, teacher_kind: str, mix: str, ensemble: bool, backend: str,
    chunk_size: int, need_hidden: bool, need_weight: bool, need_bias: bool,
    divergence: str = DEFAULT_DIVERGENCE, beta: float = DEFAULT_BETA, teacher_temperature: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, grad_hidden, grad_weight, grad_bias): the gradients of the reduced loss, made in the forward
    pass (empty for reduction='none', whose backward runs the pass again)."""
    acc_dtype = compute_dtype(hidden.dtype)
    factor = _spine.reduction_scale(target, ignore_index, hidden.shape[0], weight.shape[0], reduction, acc_dtype,
                                    hidden.device)
    if reduction == "none":
        need_hidden = need_weight = need_bias = False
    rows, grad_hidden, grad_weight, grad_bias = _chunked_pass(
        hidden, weight, bias, teachers, teacher_weights, teacher_biases, mix_weights, target, factor, temperature,
        alpha, t2_scale, ignore_index, teacher_kind, mix, ensemble, backend, chunk_size, need_hidden, need_weight,
        need_bias, divergence, beta, teacher_temperature)
    loss = rows if reduction == "none" else rows.sum() * factor
    return loss, grad_hidden, grad_weight, grad_bias


@_loss_op.register_fake
def _(hidden, weight, bias, teachers, teacher_weights, teacher_biases, mix_weights, target, temperature, alpha,
      t2_scale, reduction, ignore_index, teacher_kind, mix, ensemble, backend, chunk_size, need_hidden, need_weight,
      need_bias, divergence=DEFAULT_DIVERGENCE, beta=DEFAULT_BETA, teacher_temperature=None):
    acc_dtype = compute_dtype(hidden.dtype)
    loss = hidden.new_empty((hidden.shape[0],) if reduction == "none" else (), dtype=acc_dtype)
    if reduction == "none":
        need_hidden = need_weight = need_bias = False
    return (loss,) + _fake_grads(hidden, weight, need_hidden, need_weight, need_bias)


_LOSS_ARG_NAMES = ("hidden", "weight", "bias", "teachers", "teacher_weights", "teacher_biases", "mix_weights",
                   "target", "temperature", "alpha", "t2_scale", "reduction", "ignore_index", "teacher_kind", "mix",
                   "ensemble", "backend", "chunk_size", "need_hidden", "need_weight", "need_bias", "divergence", "beta",
                   "teacher_temperature")


def _setup_context(ctx, inputs, output):
    args = dict(zip(_LOSS_ARG_NAMES, inputs))
    ctx.args = {k: v for k, v in args.items() if not isinstance(v, (torch.Tensor, list)) and v is not None}
    ctx.counts = (len(args["teachers"]), len(args["teacher_weights"]), len(args["teacher_biases"]))
    ctx.grads_handed_out = False
    # The inputs (references, no copies) let a backward run the pass again: always for 'none', and for a
    # second backward through the same graph (retain_graph=True) after the saved gradients were used.
    saved = [args["hidden"], args["weight"], args["bias"], args["mix_weights"], args["target"],
             *args["teachers"], *args["teacher_weights"], *args["teacher_biases"]]
    ctx.save_for_backward(*saved, *(output[1:] if args["reduction"] != "none" else ()))


def _backward(ctx, grad_loss, _gh, _gw, _gb):
    if torch.is_grad_enabled():  # create_graph=True: the gradients made in the forward pass are constants
        raise RuntimeError(f"{OP}: double backward (create_graph=True) is not supported by the chunked op; "
                           "call it with backend='reference' (materializes the logits) for second derivatives")
    a = ctx.args
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    k, n_tw, n_tb = ctx.counts
    # After the saved gradients were scaled in place, saved_tensors would refuse to unpack (their version
    # changed): a later backward takes the inputs kept aside then.
    saved = ctx.inputs_kept if ctx.grads_handed_out else ctx.saved_tensors
    hidden, weight, bias, mix_weights, target, *rest = saved
    teachers, teacher_weights, teacher_biases = rest[:k], rest[k:k + n_tw], rest[k + n_tw:k + n_tw + n_tb]
    acc_dtype = compute_dtype(hidden.dtype)
    if a["reduction"] != "none" and not ctx.grads_handed_out:
        grads = rest[k + n_tw + n_tb:]
        # Traced backwards (torch.compile, AOT) see functional/fake tensors: no in-place there.
        if torch.compiler.is_compiling() or any(type(g) is not torch.Tensor for g in grads):
            grad_hidden, grad_weight, grad_bias = (g * grad_loss if g.numel() else g for g in grads)
        else:
            # Scaled in place: a [V, H] copy of the weight gradient would double this op's peak memory.
            ctx.inputs_kept = tuple(saved[:len(saved) - 3])
            ctx.grads_handed_out = True  # they may now be the parameters' .grad: never touched again
            grad_hidden, grad_weight, grad_bias = (g.mul_(grad_loss) if g.numel() else g for g in grads)
    else:
        grad_scale = grad_loss.to(acc_dtype)
        if a["reduction"] != "none":
            grad_scale = grad_scale * _spine.reduction_scale(target, a["ignore_index"], hidden.shape[0],
                                                             weight.shape[0], a["reduction"], acc_dtype, hidden.device)
        _, grad_hidden, grad_weight, grad_bias = _pass_op(
            hidden, weight, bias, list(teachers), list(teacher_weights), list(teacher_biases), mix_weights, target,
            grad_scale, a["temperature"], a["alpha"], a["t2_scale"], a["ignore_index"], a["teacher_kind"], a["mix"],
            a["ensemble"], a["backend"], a["chunk_size"], bool(need_hidden), bool(need_weight), bool(need_bias),
            a["divergence"], a["beta"], a.get("teacher_temperature"))
    return ((grad_hidden if need_hidden else None, grad_weight if need_weight else None,
             grad_bias if need_bias else None, [None] * k, [None] * n_tw, [None] * n_tb)
            + (None,) * (len(_LOSS_ARG_NAMES) - 6))


_loss_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Argument checks, backend and chunk size
# ----------------------------------------------------------------------------------------------

def _check_head(op, hidden, weight, bias):
    _checks.check_tensor(op, "hidden", hidden, dims=2, floating=True)
    if hidden.shape[0] == 0 or hidden.shape[1] == 0:
        raise ValueError(f"{op}: hidden must be a non-empty [N, H] tensor, got shape {tuple(hidden.shape)}")
    _checks.check_tensor(op, "weight", weight, dims=2, floating=True)
    if weight.shape[0] == 0 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"{op}: weight must be [V, H] = [V, {hidden.shape[1]}] with V >= 1 (nn.Linear layout), "
                         f"got shape {tuple(weight.shape)}")
    _checks.check_same_device(op, "weight", weight, "hidden", hidden)
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{op}: weight is {weight.dtype} but hidden is {hidden.dtype} (they must match)")
    if bias is not None:
        _check_bias(op, "bias", bias, weight)


def _check_bias(op, name, bias, weight):
    _checks.check_tensor(op, name, bias, dims=1, floating=True)
    if bias.shape[0] != weight.shape[0]:
        raise ValueError(f"{op}: {name} must be [V] = [{weight.shape[0]}], got shape {tuple(bias.shape)}")
    _checks.check_same_device(op, name, bias, "weight", weight)
    if bias.dtype != weight.dtype:
        raise TypeError(f"{op}: {name} is {bias.dtype} but its weight is {weight.dtype} (they must match)")


def _check_teacher(op, name, teacher, t_weight, t_bias, hidden, v, w_name, b_name):
    """One teacher: logits [N, V] (t_weight None) or hidden states [N, Ht] with t_weight [V, Ht]."""
    _checks.check_tensor(op, name, teacher, dims=2, floating=True)
    _checks.check_same_device(op, name, teacher, "hidden", hidden)
    n = hidden.shape[0]
    if t_weight is None:
        if t_bias is not None:
            raise ValueError(f"{op}: {b_name} is given without {w_name}")
        if tuple(teacher.shape) != (n, v):
            raise ValueError(f"{op}: {name} (logits) must be [N, V] = [{n}, {v}], got shape {tuple(teacher.shape)}")
        return
    if teacher.shape[0] != n or teacher.shape[1] == 0:
        raise ValueError(f"{op}: {name} (hidden states) must be [N, Ht] = [{n}, Ht], got shape {tuple(teacher.shape)}")
    _checks.check_tensor(op, w_name, t_weight, dims=2, floating=True)
    if tuple(t_weight.shape) != (v, teacher.shape[1]):
        raise ValueError(f"{op}: {w_name} must be [V, Ht] = [{v}, {teacher.shape[1]}], got shape {tuple(t_weight.shape)}")
    _checks.check_same_device(op, w_name, t_weight, "hidden", hidden)
    if t_weight.dtype != teacher.dtype:
        raise TypeError(f"{op}: {w_name} is {t_weight.dtype} but {name} is {teacher.dtype} (they must match)")
    if t_bias is not None:
        _check_bias(op, b_name, t_bias, t_weight)


def _check_common(op, temperature, alpha, t2_scale, reduction, ignore_index, chunk_size, divergence, beta,
                  teacher_temperature):
    _checks.check_kd_scalars(op, temperature, alpha, t2_scale, ignore_index)
    _checks.check_divergence_args(op, divergence, beta, teacher_temperature)
    _checks.check_choice(op, "reduction", reduction, REDUCTIONS)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)):
        raise TypeError(f"{op}: chunk_size must be a positive int or None, got {type(chunk_size).__name__}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"{op}: chunk_size must be >= 1, got {chunk_size}")


def auto_chunk_size(n: int, v: int, dtype: torch.dtype, teacher_logits_per_row: int,
                    budget_bytes: int = CHUNK_BYTES) -> int:
    """Rows per chunk so that a chunk's temporaries stay under budget_bytes: student logits and their
    gradient (input dtype), float32 copies of the gradient for 16-bit inputs, teacher logits made here."""
    item = torch.empty((), dtype=dtype).element_size()
    per_row = v * (2 * item + (4 if item < 4 else 0) + teacher_logits_per_row * 4)
    rows = max(1, budget_bytes // per_row)
    if rows >= 64:
        rows -= rows % 64  # whole tiles for the matrix products
    return int(min(n, rows))


def _needs(hidden, weight, bias):
    grad_on = torch.is_grad_enabled()
    return (grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
            grad_on and bias is not None and bias.requires_grad)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------

def fused_linear_kd_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    temperature: float = DEFAULT_TEMPERATURE,
    alpha: float = DEFAULT_ALPHA,
    t2_scale: bool = True,
    reduction: str = DEFAULT_REDUCTION,
    ignore_index: int = DEFAULT_IGNORE_INDEX,
    teacher_kind: str = "logits",
    divergence: str = DEFAULT_DIVERGENCE,
    beta: float = DEFAULT_BETA,
    teacher_temperature: float | None = None,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """kd_loss(hidden @ weight.T + bias, teacher_logits, target, ...) without the [N, V] logits.

    hidden [N, H], weight [V, H] (nn.Linear layout: the LM head), bias [V] or None, all one dtype
    (float32, bfloat16, float16; float64 on 'cpp'/'reference'). teacher: logits [N, V] (teacher_kind
    'logits', 'log_probs' or 'probs'), or, when teacher_weight [V, Ht] is given, the teacher's hidden
    states [N, Ht] (teacher logits = teacher @ teacher_weight.T + teacher_bias, made chunk by chunk;
    teacher_kind must be 'logits'). Loss semantics, reductions and ignore_index as kd_loss: per row
    alpha*s2*D(p, q) + (1-alpha)*CE(s, y), s2 = T^2 if t2_scale, q = softmax(s/T), p the teacher's
    distribution at teacher_temperature (default T), D the `divergence` ('forward_kl' KL(p || q),
    'reverse_kl' KL(q || p), 'jsd' beta*KL(p || m) + (1-beta)*KL(q || m), m = beta*p + (1-beta)*q; the
    formulas and gradients of kd_loss); 'batchmean' divides by the non-ignored rows of the whole batch. Gradients reach hidden, weight and bias (float32
    accumulation); the teacher is a constant. chunk_size: rows per chunk (None: automatic, about
    CHUNK_BYTES of temporaries). backend: None (best for the device), 'cpp', 'cuda', 'triton', 'reference'.
    """
    _check_head(OP, hidden, weight, bias)
    v = weight.shape[0]
    _check_teacher(OP, "teacher", teacher, teacher_weight, teacher_bias, hidden, v, "teacher_weight", "teacher_bias")
    _checks.check_choice(OP, "teacher_kind", teacher_kind, TEACHER_KINDS)
    if teacher_weight is not None and teacher_kind != "logits":
        raise ValueError(f"{OP}: teacher_kind must be 'logits' when teacher_weight is given (the teacher's head "
                         f"makes logits), got {teacher_kind!r}")
    _check_common(OP, temperature, alpha, t2_scale, reduction, ignore_index, chunk_size, divergence, beta,
                  teacher_temperature)
    _checks.check_target(OP, target, hidden, ignore_index, "hidden", num_classes=v)
    temperature, alpha, beta, teacher_temperature = _spine.kd_scalars(temperature, alpha, beta, teacher_temperature)
    chosen = _spine.resolve_backend(OP, backend, hidden)
    if chosen == "reference":
        with torch.no_grad():
            t = teacher if teacher_weight is None else _linear(teacher, teacher_weight, teacher_bias)
        return kd_loss_reference(_linear(hidden, weight, bias), t, target, temperature=temperature, alpha=alpha,
                                 t2_scale=t2_scale, reduction=reduction, ignore_index=ignore_index,
                                 teacher_kind=teacher_kind, divergence=divergence, beta=beta,
                                 teacher_temperature=teacher_temperature)
    if chunk_size is None:
        chunk_size = auto_chunk_size(hidden.shape[0], v, hidden.dtype, int(teacher_weight is not None))
    teacher_weights = [] if teacher_weight is None else [teacher_weight.detach()]
    teacher_biases = [] if teacher_bias is None else [teacher_bias.detach()]
    loss, _, _, _ = _loss_op(hidden, weight, bias, [teacher.detach()], teacher_weights, teacher_biases, None, target,
                             temperature, alpha, t2_scale, reduction, ignore_index, teacher_kind, "prob", False,
                             chosen, chunk_size, *_needs(hidden, weight, bias), divergence, beta, teacher_temperature)
    return loss


def _as_teacher_list(op, name, teachers) -> list[torch.Tensor]:
    if isinstance(teachers, torch.Tensor):
        _checks.check_tensor(op, name, teachers, dims=3, floating=True)
        if teachers.shape[0] < 1:
            raise ValueError(f"{op}: {name} must hold at least one teacher (K >= 1)")
        return list(teachers.unbind(0))  # views: nothing of size K x N x V is written
    if not isinstance(teachers, Sequence) or isinstance(teachers, str) or len(teachers) < 1:
        raise TypeError(f"{op}: {name} must be a [K, ...] tensor or a non-empty list of tensors")
    return list(teachers)


def _bias_list(biases, weights) -> list[torch.Tensor]:
    """[] when no teacher has a bias, else one [V] tensor per teacher (zeros where it has none): the custom
    op's schema takes a plain list of tensors."""
    if all(b is None for b in biases):
        return []
    return [w.new_zeros(w.shape[0]) if b is None else b.detach() for b, w in zip(biases, weights)]


def fused_linear_ensemble_kd_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teachers: torch.Tensor | Sequence[torch.Tensor],
    target: torch.Tensor | None = None,
    *,
    weights: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    teacher_weights: torch.Tensor | Sequence[torch.Tensor] | None = None,
    teacher_biases: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
    mix: str = "prob",
    temperature: float = DEFAULT_TEMPERATURE,
    alpha: float = DEFAULT_ALPHA,
    t2_scale: bool = True,
    reduction: str = DEFAULT_REDUCTION,
    ignore_index: int = DEFAULT_IGNORE_INDEX,
    divergence: str = DEFAULT_DIVERGENCE,
    beta: float = DEFAULT_BETA,
    teacher_temperature: float | None = None,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """ensemble_kd_loss(hidden @ weight.T + bias, teachers, weights, target, mix=...) without [N, V] logits.

    K teachers sharing the student's vocabulary, in one of two forms:
    - logits: teachers [K, N, V] or a list of K [N, V] tensors (teacher_weights None);
    - hidden states: teachers a list of K [N, Ht_k] tensors (or [K, N, Ht]) with teacher_weights a list of
      K [V, Ht_k] heads (or [K, V, Ht]) and teacher_biases None, a list of K [V] tensors or None, or [K, V].
    The op never builds a [K, N, V] tensor: per chunk it reads (or makes) K [chunk, V] teacher logits.
    weights: None (uniform), [K] or [K, N], non-negative, normalized over K. mix='prob':
    p = sum_k w_k softmax(t_k/T_t); mix='logit': p = softmax(sum_k w_k t_k / T_t), T_t = teacher_temperature
    (default T). divergence and beta as fused_linear_kd_loss, of the mixture p. Everything else as
    fused_linear_kd_loss.
    """
    op = ENSEMBLE_OP
    _check_head(op, hidden, weight, bias)
    v = weight.shape[0]
    teacher_list = _as_teacher_list(op, "teachers", teachers)
    k = len(teacher_list)
    if teacher_weights is None:
        if teacher_biases is not None:
            raise ValueError(f"{op}: teacher_biases is given without teacher_weights")
        tw_list, tb_list = [None] * k, [None] * k
    else:
        tw_list = _as_teacher_list(op, "teacher_weights", teacher_weights)
        if len(tw_list) != k:
            raise ValueError(f"{op}: teacher_weights holds {len(tw_list)} heads but teachers holds {k} teachers")
        tb_list = [None] * k if teacher_biases is None else (
            list(teacher_biases.unbind(0)) if isinstance(teacher_biases, torch.Tensor) else list(teacher_biases))
        if len(tb_list) != k:
            raise ValueError(f"{op}: teacher_biases holds {len(tb_list)} biases but teachers holds {k} teachers")
    for i in range(k):
        _check_teacher(op, f"teachers[{i}]", teacher_list[i], tw_list[i], tb_list[i], hidden, v,
                       f"teacher_weights[{i}]", f"teacher_biases[{i}]")
    _checks.check_choice(op, "mix", mix, MIXES)
    _check_common(op, temperature, alpha, t2_scale, reduction, ignore_index, chunk_size, divergence, beta,
                  teacher_temperature)
    _checks.check_target(op, target, hidden, ignore_index, "hidden", num_classes=v)
    _checks.check_mix_weights(op, weights, k, hidden, "hidden")
    mix_weights = _spine.normalized_mix_weights(weights, k, hidden)
    temperature, alpha, beta, teacher_temperature = _spine.kd_scalars(temperature, alpha, beta, teacher_temperature)
    chosen = _spine.resolve_backend(op, backend, hidden, k)
    if chosen == "reference":
        with torch.no_grad():
            t = [x if tw is None else _linear(x, tw, tb) for x, tw, tb in zip(teacher_list, tw_list, tb_list)]
        return ensemble_kd_loss_reference(_linear(hidden, weight, bias), torch.stack(t), weights, target, mix=mix,
                                          temperature=temperature, alpha=alpha, t2_scale=t2_scale,
                                          reduction=reduction, ignore_index=ignore_index, divergence=divergence,
                                          beta=beta, teacher_temperature=teacher_temperature)
    is_hidden_form = teacher_weights is not None
    if chunk_size is None:
        made_here = k if (is_hidden_form or hidden.dtype != teacher_list[0].dtype or chosen == "triton") else 0
        chunk_size = auto_chunk_size(hidden.shape[0], v, hidden.dtype, made_here)
    tw_arg = [w.detach() for w in tw_list] if is_hidden_form else []
    tb_arg = _bias_list(tb_list, tw_list) if is_hidden_form else []
    loss, _, _, _ = _loss_op(hidden, weight, bias, [t.detach() for t in teacher_list], tw_arg, tb_arg, mix_weights,
                             target, temperature, alpha, t2_scale, reduction, ignore_index, "logits", mix, True,
                             chosen, chunk_size, *_needs(hidden, weight, bias), divergence, beta, teacher_temperature)
    return loss


def fused_linear_sparse_kd_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    indices: torch.Tensor,
    values: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = DEFAULT_TEMPERATURE,
    alpha: float = DEFAULT_ALPHA,
    t2_scale: bool = True,
    reduction: str = DEFAULT_REDUCTION,
    ignore_index: int = DEFAULT_IGNORE_INDEX,
    convention: str = "zero",
    values_kind: str = "log_probs",
    divergence: str = DEFAULT_DIVERGENCE,
    beta: float = DEFAULT_BETA,
    teacher_temperature: float | None = None,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """sparse_kd_loss(hidden @ weight.T + bias, indices, values, target, ...) without the [N, V] logits: an
    LM head distilled from a teacher stored as its top-k per token (offline distillation).

    hidden [N, H], weight [V, H], bias [V] or None as fused_linear_kd_loss; indices [N, k] int64 (or int32) and values
    [N, k] (the teacher's top-k log-probs or logits, -inf = padding) with the convention, values_kind,
    divergence, beta and teacher_temperature of sparse_kd_loss. Per chunk of rows: the chunk's logits, then
    the sparse_kd_loss kernel (no dense teacher anywhere), then the gradients of hidden, weight and bias
    accumulated as fused_linear_kd_loss does. backend: None, 'cpp', 'cuda', 'triton', 'reference'.
    """
    op = SPARSE_OP
    _check_head(op, hidden, weight, bias)
    v = weight.shape[0]
    _check_common(op, temperature, alpha, t2_scale, reduction, ignore_index, chunk_size, divergence, beta,
                  teacher_temperature)
    _sparse_teacher.check_sparse_teacher(op, indices, values, hidden, "hidden", v, convention, values_kind,
                                         divergence)
    _checks.check_target(op, target, hidden, ignore_index, "hidden", num_classes=v)
    temperature, alpha, beta, teacher_temperature = _spine.kd_scalars(temperature, alpha, beta, teacher_temperature)
    chosen = _spine.resolve_backend(op, backend, hidden)
    if chosen == "reference":
        return _sparse_teacher.sparse_kd_loss_reference(
            _linear(hidden, weight, bias), indices, values, target, temperature=temperature, alpha=alpha,
            t2_scale=t2_scale, reduction=reduction, ignore_index=ignore_index, convention=convention,
            values_kind=values_kind, divergence=divergence, beta=beta, teacher_temperature=teacher_temperature)
    if chunk_size is None:
        chunk_size = auto_chunk_size(hidden.shape[0], v, hidden.dtype, 0)
    sorted_indices, log_p = _sparse_teacher.native_inputs(indices, values, hidden, temperature, convention,
                                                          teacher_temperature)
    loss, _, _, _ = _loss_op(hidden, weight, bias, [sorted_indices, log_p], [], [], None, target, temperature, alpha,
                             t2_scale, reduction, ignore_index, SPARSE_TEACHER, "prob", False, chosen, chunk_size,
                             *_needs(hidden, weight, bias), divergence, beta, teacher_temperature)
    return loss


class FusedLinearKDLoss(_spine.KDModuleSettings, nn.Module):
    """nn.Module form of fused_linear_kd_loss:
    FusedLinearKDLoss(temperature=1.0, alpha=0.5, ...)(hidden, weight, teacher, target=None, bias=None,
    teacher_weight=None, teacher_bias=None)."""

    def __init__(self, *, temperature: float = DEFAULT_TEMPERATURE, alpha: float = DEFAULT_ALPHA,
                 t2_scale: bool = True, reduction: str = DEFAULT_REDUCTION, ignore_index: int = DEFAULT_IGNORE_INDEX,
                 teacher_kind: str = "logits", divergence: str = DEFAULT_DIVERGENCE, beta: float = DEFAULT_BETA,
                 teacher_temperature: float | None = None, chunk_size: int | None = None,
                 backend: str | None = None):
        super().__init__()
        _check_common("FusedLinearKDLoss", temperature, alpha, t2_scale, reduction, ignore_index, chunk_size,
                      divergence, beta, teacher_temperature)
        _checks.check_choice("FusedLinearKDLoss", "teacher_kind", teacher_kind, TEACHER_KINDS)
        self.store_settings(temperature=float(temperature), alpha=float(alpha), t2_scale=t2_scale,
                            reduction=reduction, ignore_index=ignore_index, teacher_kind=teacher_kind,
                            divergence=divergence, beta=float(beta), teacher_temperature=teacher_temperature,
                            chunk_size=chunk_size, backend=backend)

    def forward(self, hidden, weight, teacher, target=None, *, bias=None, teacher_weight=None, teacher_bias=None):
        return fused_linear_kd_loss(hidden, weight, teacher, target, bias=bias, teacher_weight=teacher_weight,
                                    teacher_bias=teacher_bias, **self.settings())


class FusedLinearEnsembleKDLoss(_spine.KDModuleSettings, nn.Module):
    """nn.Module form of fused_linear_ensemble_kd_loss: forward(hidden, weight, teachers, target=None,
    weights=None, bias=None, teacher_weights=None, teacher_biases=None)."""

    def __init__(self, *, mix: str = "prob", temperature: float = DEFAULT_TEMPERATURE, alpha: float = DEFAULT_ALPHA,
                 t2_scale: bool = True, reduction: str = DEFAULT_REDUCTION, ignore_index: int = DEFAULT_IGNORE_INDEX,
                 divergence: str = DEFAULT_DIVERGENCE, beta: float = DEFAULT_BETA,
                 teacher_temperature: float | None = None, chunk_size: int | None = None,
                 backend: str | None = None):
        super().__init__()
        _check_common("FusedLinearEnsembleKDLoss", temperature, alpha, t2_scale, reduction, ignore_index, chunk_size,
                      divergence, beta, teacher_temperature)
        _checks.check_choice("FusedLinearEnsembleKDLoss", "mix", mix, MIXES)
        self.store_settings(mix=mix, temperature=float(temperature), alpha=float(alpha), t2_scale=t2_scale,
                            reduction=reduction, ignore_index=ignore_index, divergence=divergence, beta=float(beta),
                            teacher_temperature=teacher_temperature, chunk_size=chunk_size, backend=backend)

    def forward(self, hidden, weight, teachers, target=None, *, weights=None, bias=None, teacher_weights=None,
                teacher_biases=None):
        return fused_linear_ensemble_kd_loss(
            hidden, weight, teachers, target, weights=weights, bias=bias, teacher_weights=teacher_weights,
            teacher_biases=teacher_biases, **self.settings())


class FusedLinearSparseKDLoss(_spine.KDModuleSettings, nn.Module):
    """nn.Module form of fused_linear_sparse_kd_loss: forward(hidden, weight, indices, values, target=None,
    bias=None)."""

    def __init__(self, *, temperature: float = DEFAULT_TEMPERATURE, alpha: float = DEFAULT_ALPHA,
                 t2_scale: bool = True, reduction: str = DEFAULT_REDUCTION, ignore_index: int = DEFAULT_IGNORE_INDEX,
                 convention: str = "zero", values_kind: str = "log_probs", divergence: str = DEFAULT_DIVERGENCE,
                 beta: float = DEFAULT_BETA, teacher_temperature: float | None = None, chunk_size: int | None = None,
                 backend: str | None = None):
        super().__init__()
        name = "FusedLinearSparseKDLoss"
        _check_common(name, temperature, alpha, t2_scale, reduction, ignore_index, chunk_size, divergence, beta,
                      teacher_temperature)
        _checks.check_choice(name, "convention", convention, _sparse_teacher.CONVENTIONS)
        _checks.check_choice(name, "values_kind", values_kind, _sparse_teacher.VALUE_KINDS)
        self.store_settings(temperature=float(temperature), alpha=float(alpha), t2_scale=t2_scale,
                            reduction=reduction, ignore_index=ignore_index, convention=convention,
                            values_kind=values_kind, divergence=divergence, beta=float(beta),
                            teacher_temperature=teacher_temperature, chunk_size=chunk_size, backend=backend)

    def forward(self, hidden, weight, indices, values, target=None, *, bias=None):
        return fused_linear_sparse_kd_loss(hidden, weight, indices, values, target, bias=bias, **self.settings())
