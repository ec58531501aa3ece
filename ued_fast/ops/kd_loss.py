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
multiply of it by grad_output times the reduction's scale. A backward with create_graph=True
recomputes the gradient through the reference instead, from the saved student and teacher (saved as
references, not copies), so that it is differentiable again.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import _backend
from ..reference import REDUCTIONS, TEACHER_KINDS, compute_dtype, kd_loss_reference
from . import _checks

OP = "kd_loss"
# The kernels' teacher_kind codes; the tempered kinds reach them as log-probs (see kernel_teacher).
KERNEL_TEACHER_KINDS = ("logits", "log_probs", "probs")
_TEACHER_KIND_CODE = {name: i for i, name in enumerate(KERNEL_TEACHER_KINDS)}


def reduction_scale(valid: torch.Tensor | None, n_rows: int, num_classes: int, reduction: str,
                    dtype: torch.dtype, device) -> torch.Tensor:
    """The factor that turns the sum of row losses into the reduction, as a 0-d tensor.

    Made on the device (torch.full is a fill kernel, not a host-to-device copy; the count of valid rows
    stays a tensor): no host synchronization, and capturable in a CUDA graph."""
    per_row = num_classes if reduction == "mean" else 1
    if reduction in ("none", "sum"):
        return torch.ones((), dtype=dtype, device=device)
    if valid is None:
        return torch.full((), 1.0 / (n_rows * per_row), dtype=dtype, device=device)
    return 1.0 / (valid.sum().to(dtype) * per_row).clamp(min=1)


def kernel_teacher(teacher: torch.Tensor, temperature: float, teacher_kind: str) -> tuple[torch.Tensor, str]:
    """The teacher as the kernels take it: (tensor, one of KERNEL_TEACHER_KINDS).

    The kernels temper the teacher with the student's T. A teacher already at temperature T (p_T) is
    passed as log-probs scaled by T: softmax(T*log(p_T) / T) = p_T. That costs one elementwise pass
    (in float32, float64 for float64) over the teacher, none when T = 1."""
    if teacher_kind in _TEACHER_KIND_CODE:
        return teacher, teacher_kind
    if temperature == 1.0:
        return teacher, teacher_kind.removeprefix("tempered_")
    wide = teacher.to(compute_dtype(teacher.dtype))
    log_p = wide if teacher_kind == "tempered_log_probs" else torch.log(wide)
    return log_p * temperature, "log_probs"


def reference_grad(loss_of, inputs, grad_output):
    """Gradients of loss_of(*inputs) recomputed through the differentiable reference, with create_graph:
    what a backward returns when the caller asked for a differentiable gradient (double backward),
    which the gradient the kernels made in the forward pass is not."""
    with torch.enable_grad():
        loss = loss_of(*inputs)
        return torch.autograd.grad(loss, inputs, grad_output, create_graph=True, allow_unused=True)


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
    student, teacher, target, temperature, alpha, t2_scale, reduction, ignore_index, teacher_kind = inputs[:9]
    _, grad, scale = output
    ctx.reduction = reduction
    ctx.spec = dict(temperature=temperature, alpha=alpha, t2_scale=t2_scale, reduction=reduction,
                    ignore_index=ignore_index, teacher_kind=teacher_kind)
    ctx.save_for_backward(grad, scale, student, teacher, target)


def student_grad(op: str, grad, scale, grad_loss, reduction: str) -> torch.Tensor:
    """The student gradient from the one the kernel made in the forward pass: one multiply."""
    if grad.numel() == 0:
        raise RuntimeError(f"{op}: the student gradient was not computed in the forward pass")
    if reduction == "none":
        return grad * grad_loss.to(grad.dtype)[:, None]
    return grad * (grad_loss * scale)  # 0-d factor: one multiply, in the grad's dtype


def _backward(ctx, grad_loss, _grad_grad, _grad_scale):
    grad, scale, student, teacher, target = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        grad_student = None
    elif torch.is_grad_enabled():  # create_graph=True: the gradient must itself be differentiable
        (grad_student,) = reference_grad(
            lambda s: kd_loss_reference(s, teacher, target, **ctx.spec), (student,), grad_loss)
    else:
        grad_student = student_grad(OP, grad, scale, grad_loss, ctx.reduction)
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

    student [N, C]: raw logits (not log_softmax: the op applies log_softmax(s/T) itself), float32/
    bfloat16/float16 (float64 on 'cpp'/'reference'). target [N] int64 or None (then the loss is
    T^2*KL and alpha is unused). Rows with target == ignore_index count nowhere.
    teacher [N, C], as teacher_kind says:
      'logits'             raw teacher logits; the op tempers them: softmax(t/T)
      'log_probs'          log-probabilities (e.g. log_softmax(t)); tempered: softmax(t/T)
      'probs'              probabilities (e.g. softmax(t)); tempered: softmax(log(t)/T)
      'tempered_probs'     soft targets already at temperature T (e.g. cached softmax(t/T)); used as given
      'tempered_log_probs' log of such soft targets (e.g. log_softmax(t/T)); used as given
    The old nn.KLDivLoss habit, kd_loss(log_softmax(s/T), softmax(t/T)), is wrong twice over: pass
    kd_loss(s, t) or kd_loss(s, softmax(t/T), teacher_kind='tempered_probs'). On CPU tensors (or on
    every device after ued_fast.set_input_checks(True)) a guard warns once when a teacher given as
    logits looks like probabilities, a student looks like log-probabilities (at T != 1), or a
    'probs'/'log_probs' teacher is not a distribution.
    reduction: 'batchmean' (sum / valid rows; the KD loss), 'sum', 'none' ([N]), or 'mean', which
    divides by valid rows * C (torch.nn.KLDivLoss's 'mean'): it scales the CE term by 1/C as well, so
    it is NOT the mean CE per row. Use 'batchmean' unless you mean that.
    The loss is float32 (float64 for float64 student); the gradient flows to the student only, and a
    gradient taken with create_graph=True is differentiable again (recomputed by the reference).
    Under torch.func transforms (grad, vmap, ...) the op runs the reference.
    backend: None (the best for the device), 'cpp', 'cuda', 'triton' or 'reference'.
    """
    check_kd_args(OP, student, teacher, target, temperature, alpha, t2_scale, reduction, ignore_index,
                  teacher_kind)
    temperature, alpha = float(temperature), float(alpha)
    _checks.guard_kd_inputs(OP, student, teacher, teacher_kind, temperature)
    chosen = _resolve(backend, student)
    if chosen == "reference" or _checks.transforms_active():  # the kernels have no batching rules
        return kd_loss_reference(student, teacher, target, temperature=temperature, alpha=alpha,
                                 t2_scale=t2_scale, reduction=reduction, ignore_index=ignore_index,
                                 teacher_kind=teacher_kind)
    teacher_k, kind_k = kernel_teacher(teacher.detach(), temperature, teacher_kind)
    student_c = _checks.last_dim_contiguous(student)
    teacher_c = _checks.last_dim_contiguous(teacher_k)
    compute_grad = student.requires_grad and torch.is_grad_enabled()
    loss, _, _ = _kd_loss_op(student_c, teacher_c, target, temperature, alpha, t2_scale, reduction,
                             ignore_index, kind_k, chosen, compute_grad)
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
