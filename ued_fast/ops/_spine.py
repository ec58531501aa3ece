"""The op spine: what every fused op shares (docs/DESIGN.md 2).

- BACKEND_TABLE and resolve_backend: which backends an op has, their limits, and the one rule that
  picks a backend for a call (a constant under torch.compile).
- native_op / native_forward: the one call into a native kernel ('triton' -> ued_fast.kernels.<op>,
  'cpp'/'cuda' -> torch.ops.ued_fast.<op>_fwd), with the argument tuple of the kernel contract.
- kd_coefficients: the KD scalars of a call (1/T, 1/T_teacher, kd_coef, ce_coef, divergence code,
  beta), computed once on the host; no kernel recomputes them.
- KDAutograd and EagerKDFunction: the autograd of the KD ops. The forward makes the row losses and
  their student gradient at once; backward is one multiply of that gradient; a backward with
  create_graph=True recomputes the gradient through the differentiable reference.
- reduction_scale, stacked_view, normalized_mix_weights: the small pieces the KD ops share.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Callable, NamedTuple, Sequence

import torch

from .. import _backend
from . import _checks
from ..reference import (DEFAULT_ALPHA, DEFAULT_BETA, DEFAULT_DIVERGENCE, DEFAULT_IGNORE_INDEX,  # noqa: F401
                         DEFAULT_REDUCTION, DEFAULT_TEMPERATURE, DIVERGENCES, MIXES, compute_dtype)

# --- the backend table --------------------------------------------------------------------------------

# The CUDA ensemble kernel passes the teacher pointers by value in its launch arguments.
CUDA_MAX_TEACHERS = 32


class BackendRule(NamedTuple):
    """What an op's backends take. `main_input` names the tensor whose dtype decides (for errors)."""
    backends: tuple[str, ...]
    main_input: str
    no_float64: tuple[str, ...] = ("triton", "cuda")  # the GPU kernels are written for 16- and 32-bit floats
    max_teachers: tuple[tuple[str, int], ...] = ()


BACKEND_TABLE: dict[str, BackendRule] = {
    "kd_loss": BackendRule(_backend.BACKENDS, "student"),
    "ensemble_kd_loss": BackendRule(_backend.BACKENDS, "student", max_teachers=(("cuda", CUDA_MAX_TEACHERS),)),
    "grouped_heads": BackendRule(_backend.BACKENDS, "features"),
    "fused_linear_kd_loss": BackendRule(_backend.BACKENDS, "hidden"),
    # Runs the ensemble row kernel on each chunk: the same teacher limit.
    "fused_linear_ensemble_kd_loss": BackendRule(_backend.BACKENDS, "hidden",
                                                 max_teachers=(("cuda", CUDA_MAX_TEACHERS),)),
    "sparse_kd_loss": BackendRule(_backend.BACKENDS, "student"),
    # Runs the sparse_kd_loss row kernel on each chunk.
    "fused_linear_sparse_kd_loss": BackendRule(_backend.BACKENDS, "hidden"),
}


def _limit_error(op: str, rule: BackendRule, backend: str, is_fp64: bool, k: int) -> Exception | None:
    if backend in rule.no_float64 and is_fp64:
        return TypeError(f"{op}: backend={backend!r} takes float32, bfloat16 or float16 {rule.main_input}, "
                         "not float64")
    for limited, most in rule.max_teachers:
        if backend == limited and k > most:
            return ValueError(f"{op}: backend={backend!r} takes at most {most} teachers, got K={k}")
    return None


@_backend.constant_under_compile  # torch.compile: evaluated, not traced (backend discovery imports modules)
def _resolve(op: str, backend: str | None, device: str, is_fp64: bool, k: int) -> str:
    rule = BACKEND_TABLE[op]
    if backend is None:  # the best backend here that takes this call
        return next(b for b in _backend.available_backends(device)
                    if b in rule.backends and _limit_error(op, rule, b, is_fp64, k) is None)
    chosen = _backend.resolve_backend(backend, torch.device(device), op)
    error = _limit_error(op, rule, chosen, is_fp64, k)
    if error is not None:
        raise error
    return chosen


def resolve_backend(op: str, backend: str | None, x: torch.Tensor, k: int = 1) -> str:
    """The backend a call of `op` runs on, for its main input x (and k teachers): `backend` if given and
    it takes the call (else a clear error), the best one that does when None. 'reference' takes all,
    and every call under torch.func transforms (grad, vmap, ...): the kernels have no batching rules."""
    chosen = _resolve(op, backend, str(x.device), x.dtype == torch.float64, k)
    return "reference" if _checks.transforms_active() else chosen


def kd_scalars(temperature, alpha, beta, teacher_temperature) -> tuple:
    """The checked KD scalars as Python floats (teacher_temperature may stay None)."""
    return (float(temperature), float(alpha), float(beta),
            None if teacher_temperature is None else float(teacher_temperature))


# --- the native call ------------------------------------------------------------------------------------

def native_op(backend: str, module: str, name: str) -> Callable:
    """The native function `name`: ued_fast.kernels.<module>.<name> for 'triton', torch.ops.ued_fast.<name>
    for 'cpp' and 'cuda' (the extension dispatches on the tensors' device)."""
    if backend == "triton":
        return getattr(importlib.import_module(f"ued_fast.kernels.{module}"), name)
    return getattr(torch.ops.ued_fast, name)


def native_forward(op: str, backend: str, *args):
    """One KD forward kernel call with the contract's arguments (the kernel contract, docs/DESIGN.md 2: student, teacher(s),
    [weights], target, *KDCoefficients, ignore_index, teacher_kind or mix, compute_grad) -> (row_loss, grad).
    Triton's ensemble takes the teachers as one [K, N, C] tensor (a view when they are one's slices)."""
    if backend == "triton" and op == "ensemble_kd_loss":
        args = (args[0], stacked_view(args[1])) + args[2:]
    return native_op(backend, op, f"{op}_fwd")(*args)


# --- the KD coefficients ----------------------------------------------------------------------------------

# Teacher kinds as the kernels take them (0 logits, 1 log_probs, 2 probs): an already-tempered teacher is
# the plain kind with inv_teacher_temp = 1 (softmax(log p_T) = p_T), so no elementwise pass rewrites it.
KERNEL_TEACHER_KIND = {"logits": 0, "log_probs": 1, "probs": 2, "tempered_log_probs": 1, "tempered_probs": 2}
DIVERGENCE_CODE = {name: i for i, name in enumerate(DIVERGENCES)}
MIX_CODE = {name: i for i, name in enumerate(MIXES)}


class KDCoefficients(NamedTuple):
    """The KD scalars of a kernel call, in the contract's order."""
    inv_student_temp: float
    inv_teacher_temp: float
    kd_coef: float
    ce_coef: float
    divergence: int
    beta: float


def kd_coefficients(temperature: float, alpha: float, t2_scale: bool, has_target: bool,
                    teacher_kind: str = "logits", teacher_temperature: float | None = None,
                    divergence: str = DEFAULT_DIVERGENCE, beta: float = DEFAULT_BETA) -> KDCoefficients:
    """row_loss = kd_coef * D(p, q) + ce_coef * CE(s, y), q = softmax(s * inv_student_temp),
    p = softmax(scores * inv_teacher_temp): kd_coef = alpha*s2 with a target, s2 without one
    (s2 = T^2 if t2_scale else 1); ce_coef = 1 - alpha with a target, 0 without one;
    inv_teacher_temp = 1 / teacher_temperature (default: T), 1 for the already-tempered kinds."""
    s2 = temperature * temperature if t2_scale else 1.0
    t_teacher = temperature if teacher_temperature is None else teacher_temperature
    inv_teacher_temp = 1.0 if teacher_kind.startswith("tempered_") else 1.0 / t_teacher
    return KDCoefficients(1.0 / temperature, inv_teacher_temp, alpha * s2 if has_target else s2,
                          1.0 - alpha if has_target else 0.0, DIVERGENCE_CODE[divergence], float(beta))


# --- shared pieces of the KD ops ----------------------------------------------------------------------

def reduction_scale(target: torch.Tensor | None, ignore_index: int, n_rows: int, num_classes: int,
                    reduction: str, dtype: torch.dtype, device) -> torch.Tensor:
    """The 0-d factor from the sum of row losses to the reduction; counts the non-ignored rows.

    Made on the device (torch.full is a fill kernel, not a host-to-device copy; the count of valid rows
    stays a tensor): no host synchronization, and capturable in a CUDA graph. An all-ignored batch
    gives factor 1 (its loss is 0)."""
    if reduction in ("none", "sum"):
        return torch.ones((), dtype=dtype, device=device)
    per_row = num_classes if reduction == "mean" else 1
    if target is None:
        return torch.full((), 1.0 / (n_rows * per_row), dtype=dtype, device=device)
    return 1.0 / ((target != ignore_index).sum().to(dtype) * per_row).clamp(min=1)


def reduce_rows(rows: torch.Tensor, grad: torch.Tensor, target, ignore_index: int, reduction: str,
                num_classes: int):
    """(loss, grad, scale), the outputs of every KD custom op, from a kernel's row losses and gradient."""
    scale = reduction_scale(target, ignore_index, rows.shape[0], num_classes, reduction, rows.dtype, rows.device)
    return (rows if reduction == "none" else rows.sum() * scale), grad, scale


def fake_kd_outputs(student: torch.Tensor, reduction: str, compute_grad: bool):
    """Shapes and dtypes of (loss, grad, scale), the outputs of every KD custom op."""
    loss_dtype = compute_dtype(student.dtype)
    n, c = student.shape
    loss = student.new_empty((n,) if reduction == "none" else (), dtype=loss_dtype)
    grad = student.new_empty((n, c) if compute_grad else (0,))
    return loss, grad, student.new_empty((), dtype=loss_dtype)


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


def normalized_mix_weights(weights: torch.Tensor | None, k: int, like: torch.Tensor) -> torch.Tensor:
    """[K, N] weights summing to 1 over K, float32 (float64 for a float64 `like` [N, ...]); [K] and None
    stay stride-0 expansions, so nothing of size K*N is written for them."""
    dtype, n = compute_dtype(like.dtype), like.shape[0]
    if weights is None:
        return torch.full((k, 1), 1.0 / k, dtype=dtype, device=like.device).expand(k, n)
    w = weights.detach().to(dtype)
    if w.dim() == 1:
        return (w / w.sum())[:, None].expand(k, n)
    return w / w.sum(0, keepdim=True)


# --- the autograd core of the KD ops ------------------------------------------------------------------

def reference_grad(loss_of, inputs, grad_output):
    """Gradients of loss_of(*inputs) recomputed through the differentiable reference, with create_graph:
    what a backward returns when the caller asked for a differentiable gradient (double backward),
    which the gradient the kernels made in the forward pass is not."""
    with torch.enable_grad():
        loss = loss_of(*inputs)
        return torch.autograd.grad(loss, inputs, grad_output, create_graph=True, allow_unused=True)


def student_grad(op: str, grad, scale, grad_loss, reduction: str) -> torch.Tensor:
    """The student gradient from the one the kernel made in the forward pass: one multiply."""
    if grad.numel() == 0:
        raise RuntimeError(f"{op}: the student gradient was not computed in the forward pass")
    if reduction == "none":
        return grad * grad_loss.to(grad.dtype)[:, None]
    return grad * (grad_loss * scale)  # 0-d factor: one multiply, in the grad's dtype


class KDCall(NamedTuple):
    """A KD custom op's inputs as the autograd core reads them."""
    student: torch.Tensor
    constants: tuple  # the tensors the reference takes after the student
    spec: dict  # the reference's keyword arguments
    reduction: str
    compute_grad: bool


class KDAutograd:
    """The autograd of a KD op, shared by its torch.library custom op (torch.compile, opcheck) and its
    eager autograd.Function (EagerKDFunction: the same forward and backward without the custom-op
    wrapper's per-call cost, ~0.2 ms, which dominates at CIFAR shapes).

    forward(*inputs) -> (loss, grad, scale): the custom op's body. split(*inputs) -> KDCall.
    reference(student, *constants, **spec) -> loss: the differentiable spec.
    """

    def __init__(self, op: str, custom_op, forward: Callable, split: Callable, reference: Callable):
        self.op, self.custom_op, self.forward, self.split, self.reference = op, custom_op, forward, split, reference
        signature = inspect.signature(forward)

        def fake(*args, **kwargs):  # a fake kernel gets the arguments as given, defaults not filled in
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            call = split(*bound.args)
            return fake_kd_outputs(call.student, call.reduction, call.compute_grad)

        custom_op.register_fake(fake)
        custom_op.register_autograd(self._backward, setup_context=self.setup_context)

    def setup_context(self, ctx, inputs, output) -> None:
        call = self.split(*inputs)
        ctx.kd_reduction, ctx.kd_spec = call.reduction, call.spec
        # The gradients of the other inputs: None, or a list of Nones for a list of tensors (the teachers).
        ctx.kd_no_grads = tuple([None] * len(x) if isinstance(x, list) else None for x in inputs[1:])
        ctx.save_for_backward(output[1], output[2], call.student, *call.constants)

    def student_grad(self, ctx, grad_loss, needed: bool):
        """The kernels' gradient times grad_loss, or with create_graph=True the reference's, recomputed so
        that it is differentiable again."""
        if not needed:
            return None
        grad, scale, student, *constants = ctx.saved_tensors
        if torch.is_grad_enabled():
            (grad_student,) = reference_grad(lambda s: self.reference(s, *constants, **ctx.kd_spec),
                                             (student,), grad_loss)
            return grad_student
        return student_grad(self.op, grad, scale, grad_loss, ctx.kd_reduction)

    def _backward(self, ctx, grad_loss, _grad_grad, _grad_scale):
        return (self.student_grad(ctx, grad_loss, ctx.needs_input_grad[0]),) + ctx.kd_no_grads

    def loss(self, eager_function: type, *inputs) -> torch.Tensor:
        """The op's loss: through the custom op under torch.compile, else through eager_function."""
        if torch.compiler.is_compiling():
            return self.custom_op(*inputs)[0]
        return eager_function.apply(self, *inputs)


class EagerKDFunction(torch.autograd.Function):
    """Eager twin of a KD custom op (see KDAutograd); each op subclasses it for a grad_fn of its own name."""

    @staticmethod
    def forward(ctx, core: KDAutograd, *inputs):
        output = core.forward(*inputs)
        core.setup_context(ctx, inputs, output)
        ctx.kd_core = core
        return output[0]

    @staticmethod
    def backward(ctx, grad_loss):
        grad_student = ctx.kd_core.student_grad(ctx, grad_loss, ctx.needs_input_grad[1])
        return (None, grad_student) + (None,) * (len(ctx.needs_input_grad) - 2)


class KDModuleSettings:
    """What the KD modules (KDLoss, EnsembleKDLoss, FusedLinear*KDLoss) share: their keyword settings,
    kept as attributes (a later assignment counts), passed to their function and shown by extra_repr."""

    def store_settings(self, **settings) -> None:
        self._setting_names = tuple(settings)
        for name, value in settings.items():
            setattr(self, name, value)

    def settings(self) -> dict:
        return {name: getattr(self, name) for name in self._setting_names}

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={value!r}" for name, value in self.settings().items() if name != "backend")
