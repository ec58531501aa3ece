"""ensemble_kd_loss: kd_loss against the mixture of K teachers (DESIGN 2.2).

Spec: ued_fast.reference.ensemble_kd_loss_reference. Backends: 'cpp' and 'cuda' are the C++ op
torch.ops.ued_fast.ensemble_kd_loss_fwd (csrc/ensemble_kd_loss.cpp, csrc/ensemble_kd_loss_cuda.cu),
'triton' is ued_fast.kernels.ensemble_kd_loss, 'reference' is the spec (differentiated by autograd).

Every native backend implements one forward with this contract:
    ensemble_kd_loss_fwd(student [N, C], teachers: K tensors [N, C] in the student's dtype (unit stride
                         along classes, any row stride; views of one [K, N, C] tensor are not copied),
                         weights [K, N] normalized over K (float32; float64 for a float64 student),
                         target [N] int64 or None, temperature, alpha, t2_scale, ignore_index,
                         mix (0 'prob', 1 'logit'), compute_grad)
      -> row_loss [N] float32 (float64 for float64), 0 on ignored rows;
         grad [N, C] contiguous in the student's dtype, d row_loss[i] / d student[i] (0 on ignored
         rows), or an empty tensor when compute_grad is False.
The kernels read each teacher row, form the mixture in registers and never write a [K, N, C] or
[N, C] target tensor. Backward is one multiply of the saved gradient, as in kd_loss.
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch
from torch import nn

from .. import _backend
from ..reference import MIXES, compute_dtype, ensemble_kd_loss_reference, teacher_scores
from . import _checks
from .kd_loss import check_kd_args, fake_kd_outputs, reduction_scale, reference_grad, student_grad

OP = "ensemble_kd_loss"
_MIX_CODE = {name: i for i, name in enumerate(MIXES)}
# The CUDA kernel passes the teacher pointers by value in its launch arguments.
CUDA_MAX_TEACHERS = 32


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
    if weights.device.type == "cpu" and not torch.compiler.is_compiling():  # value checks would break graphs
        if bool((weights < 0).any()) or not bool(torch.isfinite(weights).all()):
            raise ValueError(f"{OP}: weights must be finite and >= 0")
        if bool((weights.sum(0) <= 0).any()):
            raise ValueError(f"{OP}: weights must not sum to 0 over the K teachers")


def stacked_view(teachers: Sequence[torch.Tensor]) -> torch.Tensor:
    """K same-shaped [N, C] tensors as one [K, N, C] tensor: a view when they are equally spaced views
    of one storage (e.g. the unbind of a stack), else a copy (torch.stack)."""
    first = teachers[0]
    if len(teachers) == 1:
        return first.unsqueeze(0)
    step = teachers[1].storage_offset() - first.storage_offset()
    same_layout = all(
        t.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        and t.stride() == first.stride() and t.dtype == first.dtype
        and t.storage_offset() == first.storage_offset() + k * step
        for k, t in enumerate(teachers)
    )
    if same_layout and step >= 0:
        return first.as_strided((len(teachers),) + tuple(first.shape), (step,) + tuple(first.stride()),
                                first.storage_offset())
    return torch.stack(list(teachers))


def _native_forward(backend, student, teachers, weights, target, temperature, alpha, t2_scale, ignore_index,
                    mix, compute_grad):
    code = _MIX_CODE[mix]
    if backend == "triton":
        from ..kernels.ensemble_kd_loss import ensemble_kd_loss_fwd as triton_ensemble_kd_loss_fwd

        return triton_ensemble_kd_loss_fwd(student, stacked_view(teachers), weights, target, temperature, alpha,
                                           t2_scale, ignore_index, code, compute_grad)
    return torch.ops.ued_fast.ensemble_kd_loss_fwd(student, teachers, weights, target, temperature, alpha,
                                                   t2_scale, ignore_index, code, compute_grad)


@torch.library.custom_op("ued_fast::ensemble_kd_loss", mutates_args=())
def _ensemble_kd_loss_op(
    student: torch.Tensor, teachers: list[torch.Tensor], weights: torch.Tensor, target: torch.Tensor | None,
    temperature: float, alpha: float, t2_scale: bool, reduction: str, ignore_index: int, mix: str,
    backend: str, compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss, grad of the row losses [N, C] or empty, reduction scale 0-d)."""
    return _forward_impl(student, teachers, weights, target, temperature, alpha, t2_scale, reduction, ignore_index,
                         mix, backend, compute_grad)


def _forward_impl(student, teachers, weights, target, temperature, alpha, t2_scale, reduction, ignore_index, mix,
                  backend, compute_grad):
    rows, grad = _native_forward(backend, student, teachers, weights, target, temperature, alpha, t2_scale,
                                 ignore_index, mix, compute_grad)
    valid = None if target is None else target != ignore_index
    scale = reduction_scale(valid, student.shape[0], student.shape[1], reduction, rows.dtype, rows.device)
    loss = rows if reduction == "none" else rows.sum() * scale
    return loss, grad, scale


@_ensemble_kd_loss_op.register_fake
def _(student, teachers, weights, target, temperature, alpha, t2_scale, reduction, ignore_index, mix, backend,
      compute_grad):
    return fake_kd_outputs(student, reduction, compute_grad)


def _setup_context(ctx, inputs, output):
    student, teachers, weights, target = inputs[:4]
    _, grad, scale = output
    ctx.reduction = inputs[7]
    ctx.num_teachers = len(teachers)
    ctx.spec = _spec(*inputs[4:10])
    ctx.save_for_backward(grad, scale, student, weights, target, *teachers)


def _spec(temperature, alpha, t2_scale, reduction, ignore_index, mix) -> dict:
    """The reference's keyword arguments for a kernel call (its teachers are logits)."""
    return dict(temperature=temperature, alpha=alpha, t2_scale=t2_scale, reduction=reduction,
                ignore_index=ignore_index, mix=mix)


def _student_grad(ctx, grad_loss):
    """The student's gradient from the saved tensors: the kernels' one, or with create_graph=True the
    reference's, recomputed so that it is differentiable again."""
    grad, scale, student, weights, target, *teachers = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None
    if torch.is_grad_enabled():
        stack = torch.stack(teachers)
        (grad_student,) = reference_grad(
            lambda s: ensemble_kd_loss_reference(s, stack, weights, target, **ctx.spec), (student,), grad_loss)
        return grad_student
    return student_grad(OP, grad, scale, grad_loss, ctx.reduction)


def _backward(ctx, grad_loss, _grad_grad, _grad_scale):
    return (_student_grad(ctx, grad_loss), [None] * ctx.num_teachers) + (None,) * 10


_ensemble_kd_loss_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerEnsembleKDLoss(torch.autograd.Function):
    """Eager-mode twin of the custom op: same forward and backward, without the custom-op wrapper's
    per-call cost (~0.2 ms, which dominates at CIFAR shapes). torch.compile always takes the custom op,
    torch.func transforms the reference."""

    @staticmethod
    def forward(ctx, student, weights, target, temperature, alpha, t2_scale, reduction, ignore_index, mix, backend,
                compute_grad, *teachers):
        loss, grad, scale = _forward_impl(student, list(teachers), weights, target, temperature, alpha, t2_scale,
                                          reduction, ignore_index, mix, backend, compute_grad)
        ctx.reduction = reduction
        ctx.spec = _spec(temperature, alpha, t2_scale, reduction, ignore_index, mix)
        ctx.save_for_backward(grad, scale, student, weights, target, *teachers)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        return (_student_grad(ctx, grad_loss),) + (None,) * (len(ctx.needs_input_grad) - 1)


def _resolve(backend, student: torch.Tensor, k: int) -> str:
    return _pick_backend(backend, str(student.device), student.dtype == torch.float64, k)


@_backend.constant_under_compile
def _pick_backend(backend: str | None, device: str, is_fp64: bool, k: int) -> str:
    """A constant for torch.compile: backend discovery imports modules, which dynamo must not trace."""
    device = torch.device(device)
    if backend is None and device.type != "cpu":
        if is_fp64:
            return "reference"  # the GPU kernels are written for 16- and 32-bit floats
        return [b for b in _backend.available_backends(device) if not (b == "cuda" and k > CUDA_MAX_TEACHERS)][0]
    chosen = _backend.resolve_backend(backend, device, OP)
    if chosen in ("triton", "cuda") and is_fp64:
        raise TypeError(f"{OP}: backend={chosen!r} takes float32, bfloat16 or float16 student, not float64")
    if chosen == "cuda" and k > CUDA_MAX_TEACHERS:
        raise ValueError(f"{OP}: backend='cuda' takes at most {CUDA_MAX_TEACHERS} teachers, got K={k}")
    return chosen


def _normalized_weights(weights: torch.Tensor | None, k: int, student: torch.Tensor) -> torch.Tensor:
    """[K, N] weights summing to 1 over K, float32 (float64 for float64 student); [K] and None stay
    stride-0 expansions, so nothing of size K*N is written for them."""
    dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    n = student.shape[0]
    if weights is None:
        return torch.full((k, 1), 1.0 / k, dtype=dtype, device=student.device).expand(k, n)
    w = weights.detach().to(dtype)
    if w.dim() == 1:
        return (w / w.sum())[:, None].expand(k, n)
    return w / w.sum(0, keepdim=True)


def _as_logits(teacher: torch.Tensor, temperature: float, teacher_kind: str) -> torch.Tensor:
    """A teacher as the kernels take it, logits they temper by T: x with x / T = the teacher's tempered
    log-space scores (see reference.teacher_scores). Logits and log-probs pass unchanged; probs cost one
    log, already-tempered kinds one log and one multiply by T."""
    if teacher_kind in ("logits", "log_probs"):
        return teacher
    scores, applied = teacher_scores(teacher.to(compute_dtype(teacher.dtype)), temperature, teacher_kind)
    return scores if applied == temperature else scores * (temperature / applied)


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
    temperature: float = 4.0,
    alpha: float = 0.9,
    t2_scale: bool = True,
    reduction: str = "batchmean",
    ignore_index: int = -100,
    teacher_kind: str = "logits",
    backend: str | None = None,
) -> torch.Tensor:
    """kd_loss of student [N, C] against the mixture of K teachers ([K, N, C] or a list of [N, C]).

    Arguments read as in kd_loss (target third, the rest keyword-only); teacher_kind applies to every
    teacher and takes kd_loss's kinds. With p_k teacher k's tempered distribution (softmax(t_k/T) for
    logits) and s_k = log p_k: mix='prob': p = sum_k w_k p_k; mix='logit': p = softmax(sum_k w_k s_k)
    (for logits, softmax(sum_k w_k t_k / T)). weights: None (uniform), [K] or [K, N], non-negative,
    normalized over K. reduction='mean' divides by valid rows * C, CE term included (see kd_loss): use
    'batchmean' unless you mean that. The gradient flows to the student only (teachers and weights are
    constants); with create_graph=True it is differentiable again (recomputed by the reference). Under
    torch.func transforms the op runs the reference.
    backend: None (the best for the device), 'cpp', 'cuda', 'triton' or 'reference'.
    """
    _reject_positional_weights(target)
    check_kd_args(OP, student, None, target, temperature, alpha, t2_scale, reduction, ignore_index, teacher_kind)
    _checks.check_choice(OP, "mix", mix, MIXES)
    stack = _as_teacher_stack(teachers, student)
    k = stack.shape[0] if isinstance(stack, torch.Tensor) else len(stack)
    _check_weights(weights, k, student)
    temperature, alpha = float(temperature), float(alpha)
    _checks.guard_kd_inputs(OP, student, stack if isinstance(stack, torch.Tensor) else stack[0], teacher_kind,
                            temperature)
    chosen = _resolve(backend, student, k)
    if chosen == "reference" or _checks.transforms_active():  # the kernels have no batching rules
        return ensemble_kd_loss_reference(student, stack, weights, target, mix=mix, temperature=temperature,
                                          alpha=alpha, t2_scale=t2_scale, reduction=reduction,
                                          ignore_index=ignore_index, teacher_kind=teacher_kind)
    # Kernels take teachers as logits in the student's dtype with unit stride along classes; a [K, N, C]
    # input becomes K views (no copy unless its class dimension is strided or its dtype or kind differs).
    if isinstance(stack, torch.Tensor):
        stack = _as_logits(stack.detach(), temperature, teacher_kind).to(student.dtype)
        teacher_list = list(_checks.last_dim_contiguous(stack).unbind(0))
    else:
        teacher_list = [_checks.last_dim_contiguous(_as_logits(t.detach(), temperature, teacher_kind).to(student.dtype))
                        for t in stack]
    w = _normalized_weights(weights, k, student)
    compute_grad = student.requires_grad and torch.is_grad_enabled()
    student_c = _checks.last_dim_contiguous(student)
    if torch.compiler.is_compiling():
        loss, _, _ = _ensemble_kd_loss_op(student_c, teacher_list, w, target, temperature, alpha, t2_scale,
                                          reduction, ignore_index, mix, chosen, compute_grad)
        return loss
    return _EagerEnsembleKDLoss.apply(student_c, w, target, temperature, alpha, t2_scale, reduction, ignore_index,
                                      mix, chosen, compute_grad, *teacher_list)


class EnsembleKDLoss(nn.Module):
    """nn.Module form of ensemble_kd_loss: forward(student, teachers, target=None, *, weights=None)."""

    def __init__(self, *, mix: str = "prob", temperature: float = 4.0, alpha: float = 0.9, t2_scale: bool = True,
                 reduction: str = "batchmean", ignore_index: int = -100, teacher_kind: str = "logits",
                 backend: str | None = None):
        super().__init__()
        check_kd_args("EnsembleKDLoss", torch.zeros(1, 1), None, None, temperature, alpha, t2_scale, reduction,
                      ignore_index, teacher_kind)
        _checks.check_choice("EnsembleKDLoss", "mix", mix, MIXES)
        self.mix, self.temperature, self.alpha, self.t2_scale = mix, float(temperature), float(alpha), t2_scale
        self.reduction, self.ignore_index, self.teacher_kind = reduction, ignore_index, teacher_kind
        self.backend = backend

    def forward(self, student, teachers, target=None, *, weights=None):
        return ensemble_kd_loss(student, teachers, target, weights=weights, mix=self.mix,
                                temperature=self.temperature, alpha=self.alpha, t2_scale=self.t2_scale,
                                reduction=self.reduction, ignore_index=self.ignore_index,
                                teacher_kind=self.teacher_kind, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"mix={self.mix!r}, temperature={self.temperature}, alpha={self.alpha}, t2_scale={self.t2_scale}, "
                f"reduction={self.reduction!r}, teacher_kind={self.teacher_kind!r}")
