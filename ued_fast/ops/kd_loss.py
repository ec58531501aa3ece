"""kd_loss: the fused knowledge-distillation loss (DESIGN 2.1).

Spec: ued_fast.reference.kd_loss_reference. Backends: 'cpp' and 'cuda' are the C++ op
torch.ops.ued_fast.kd_loss_fwd (csrc/kd_loss.cpp, csrc/kd_loss_cuda.cu), 'triton' is
ued_fast.kernels.kd_loss, 'reference' is the spec itself (differentiated by autograd).

Every native backend implements one forward with this contract:
    kd_loss_fwd(student [N, C], teacher [N, C], target [N] int64 or None, temperature, alpha,
                t2_scale, ignore_index, teacher_kind (0 logits, 1 log_probs, 2 probs), compute_grad)
      -> row_loss [N] float32 (float64 for float64 student), 0 on ignored rows;
         grad [N, C] contiguous in the student's dtype, d row_loss[i] / d student[i]
         (0 on ignored rows), or an empty tensor when compute_grad is False.
Inputs have unit stride along classes and any row stride; teacher and student dtypes may differ.
The gradient is made in the forward pass (one read of student and teacher); backward is one
multiply of it by grad_output times the reduction's scale.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import _backend
from ..reference import REDUCTIONS, TEACHER_KINDS, kd_loss_reference
from . import _checks

OP = "kd_loss"
_TEACHER_KIND_CODE = {name: i for i, name in enumerate(TEACHER_KINDS)}


def reduction_scale(valid: torch.Tensor | None, n_rows: int, num_classes: int, reduction: str,
                    dtype: torch.dtype, device) -> torch.Tensor:
    """The factor that turns the sum of row losses into the reduction, as a 0-d tensor (no host sync)."""
    if reduction in ("none", "sum"):
        return torch.ones((), dtype=dtype, device=device)
    n_valid = valid.sum().to(dtype) if valid is not None else torch.tensor(float(n_rows), dtype=dtype, device=device)
    if reduction == "mean":
        n_valid = n_valid * num_classes
    return 1.0 / n_valid.clamp(min=1)


def _native_forward(backend, student, teacher, target, temperature, alpha, t2_scale, ignore_index,
                    teacher_kind, compute_grad):
    code = _TEACHER_KIND_CODE[teacher_kind]
    if backend == "triton":
        from ..kernels.kd_loss import kd_loss_fwd as triton_kd_loss_fwd

        return triton_kd_loss_fwd(student, teacher, target, temperature, alpha, t2_scale,
                                  ignore_index, code, compute_grad)
    return torch.ops.ued_fast.kd_loss_fwd(student, teacher, target, temperature, alpha, t2_scale,
                                          ignore_index, code, compute_grad)


@torch.library.custom_op("ued_fast::kd_loss", mutates_args=())
def _kd_loss_op(
    student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor | None, temperature: float,
    alpha: float, t2_scale: bool, reduction: str, ignore_index: int, teacher_kind: str,
    backend: str, compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss, grad of the row losses [N, C] or empty, reduction scale 0-d)."""
    rows, grad = _native_forward(backend, student, teacher, target, temperature, alpha, t2_scale,
                                 ignore_index, teacher_kind, compute_grad)
    valid = None if target is None else target != ignore_index
    scale = reduction_scale(valid, student.shape[0], student.shape[1], reduction, rows.dtype, rows.device)
    loss = rows if reduction == "none" else rows.sum() * scale
    return loss, grad, scale


def fake_kd_outputs(student: torch.Tensor, reduction: str, compute_grad: bool):
    """Shapes and dtypes of (loss, grad, scale), the outputs of every KD custom op."""
    loss_dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    n, c = student.shape
    loss = student.new_empty((n,) if reduction == "none" else (), dtype=loss_dtype)
    grad = student.new_empty((n, c) if compute_grad else (0,))
    return loss, grad, student.new_empty((), dtype=loss_dtype)


@_kd_loss_op.register_fake
def _(student, teacher, target, temperature, alpha, t2_scale, reduction, ignore_index, teacher_kind,
      backend, compute_grad):
    return fake_kd_outputs(student, reduction, compute_grad)


def _setup_context(ctx, inputs, output):
    _, grad, scale = output
    ctx.reduction = inputs[6]
    ctx.save_for_backward(grad, scale)


def student_grad(op: str, grad, scale, grad_loss, reduction: str) -> torch.Tensor:
    """The student gradient from the one the kernel made in the forward pass: one multiply."""
    if grad.numel() == 0:
        raise RuntimeError(f"{op}: the student gradient was not computed in the forward pass")
    if reduction == "none":
        return grad * grad_loss.to(grad.dtype)[:, None]
    return grad * (grad_loss * scale)  # 0-d factor: one multiply, in the grad's dtype


def _backward(ctx, grad_loss, _grad_grad, _grad_scale):
    grad, scale = ctx.saved_tensors
    grad_student = student_grad(OP, grad, scale, grad_loss, ctx.reduction) if ctx.needs_input_grad[0] else None
    return (grad_student,) + (None,) * 10


_kd_loss_op.register_autograd(_backward, setup_context=_setup_context)


def _resolve(backend, student: torch.Tensor) -> str:
    if backend is None and student.dtype == torch.float64 and student.device.type != "cpu":
        return "reference"  # the GPU kernels are written for 16- and 32-bit floats
    chosen = _backend.resolve_backend(backend, student.device, OP)
    if chosen in ("triton", "cuda") and student.dtype == torch.float64:
        raise TypeError(f"{OP}: backend={chosen!r} takes float32, bfloat16 or float16 student, not float64")
    return chosen


def check_kd_args(op, student, teacher, target, temperature, alpha, t2_scale, reduction, ignore_index,
                  teacher_kind=None):
    _checks.check_tensor(op, "student", student, dims=2, floating=True)
    if student.shape[0] == 0:
        raise ValueError(f"{op}: student is an empty batch (shape {tuple(student.shape)})")
    if student.shape[1] == 0:
        raise ValueError(f"{op}: student has no classes (shape {tuple(student.shape)})")
    if teacher is not None:
        _checks.check_tensor(op, "teacher", teacher, dims=2, floating=True)
        if teacher.shape != student.shape:
            raise ValueError(f"{op}: teacher has shape {tuple(teacher.shape)} but student has {tuple(student.shape)}")
        _checks.check_same_device(op, "teacher", teacher, "student", student)
    _checks.check_kd_scalars(op, temperature, alpha, t2_scale, ignore_index)
    _checks.check_choice(op, "reduction", reduction, REDUCTIONS)
    if teacher_kind is not None:
        _checks.check_choice(op, "teacher_kind", teacher_kind, TEACHER_KINDS)
    _checks.check_target(op, target, student, ignore_index)


def kd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    temperature: float = 4.0,
    alpha: float = 0.9,
    t2_scale: bool = True,
    reduction: str = "batchmean",
    ignore_index: int = -100,
    teacher_kind: str = "logits",
    backend: str | None = None,
) -> torch.Tensor:
    """Fused KD loss: alpha*T^2*KL(softmax(t/T) || softmax(s/T)) + (1-alpha)*CE(s, y), per row.

    student [N, C] float32/bfloat16/float16 (float64 on 'cpp'/'reference'); teacher [N, C] given as
    teacher_kind 'logits', 'log_probs' or 'probs' (tempered in every case); target [N] int64 or None
    (then the loss is T^2*KL, alpha unused). reduction: 'batchmean' (sum / valid rows), 'sum',
    'mean' (sum / (valid rows * C)), 'none' ([N]). Rows with target == ignore_index count nowhere.
    The loss is float32 (float64 for float64 student); the gradient flows to the student only.
    backend: None (the best for the device), 'cpp', 'cuda', 'triton' or 'reference'.
    """
    check_kd_args(OP, student, teacher, target, temperature, alpha, t2_scale, reduction, ignore_index,
                  teacher_kind)
    temperature, alpha = float(temperature), float(alpha)
    chosen = _resolve(backend, student)
    if chosen == "reference":
        return kd_loss_reference(student, teacher, target, temperature=temperature, alpha=alpha,
                                 t2_scale=t2_scale, reduction=reduction, ignore_index=ignore_index,
                                 teacher_kind=teacher_kind)
    student_c = _checks.last_dim_contiguous(student)
    teacher_c = _checks.last_dim_contiguous(teacher.detach())
    compute_grad = student.requires_grad and torch.is_grad_enabled()
    loss, _, _ = _kd_loss_op(student_c, teacher_c, target, temperature, alpha, t2_scale, reduction,
                             ignore_index, teacher_kind, chosen, compute_grad)
    return loss


class KDLoss(nn.Module):
    """nn.Module form of kd_loss: KDLoss(temperature=4.0, alpha=0.9, ...)(student, teacher, target=None)."""

    def __init__(self, *, temperature: float = 4.0, alpha: float = 0.9, t2_scale: bool = True,
                 reduction: str = "batchmean", ignore_index: int = -100, teacher_kind: str = "logits",
                 backend: str | None = None):
        super().__init__()
        check_kd_args("KDLoss", torch.zeros(1, 1), None, None, temperature, alpha, t2_scale, reduction,
                      ignore_index, teacher_kind)
        self.temperature, self.alpha, self.t2_scale = float(temperature), float(alpha), t2_scale
        self.reduction, self.ignore_index, self.teacher_kind = reduction, ignore_index, teacher_kind
        self.backend = backend

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor | None = None):
        return kd_loss(student, teacher, target, temperature=self.temperature, alpha=self.alpha,
                       t2_scale=self.t2_scale, reduction=self.reduction, ignore_index=self.ignore_index,
                       teacher_kind=self.teacher_kind, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, alpha={self.alpha}, t2_scale={self.t2_scale}, "
                f"reduction={self.reduction!r}, teacher_kind={self.teacher_kind!r}")
