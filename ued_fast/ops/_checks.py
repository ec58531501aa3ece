"""Argument checks shared by the ops: each error names the argument it is about."""
from __future__ import annotations

import math
import os
import warnings

import torch

from ..reference import DEFAULT_BETA, DEFAULT_DIVERGENCE, DIVERGENCES, REDUCTIONS, TEACHER_KINDS

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_tensor(op: str, name: str, x, *, dims: int | None = None, floating: bool = False) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if dims is not None and x.dim() != dims:
        raise ValueError(f"{op}: {name} must be {dims}-D, got shape {tuple(x.shape)}")
    if floating and x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, bfloat16, float16 or float64, got {x.dtype}")


def check_same_device(op: str, name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if x.device != ref.device:
        raise ValueError(f"{op}: {name} is on {x.device} but {ref_name} is on {ref.device}")


def check_choice(op: str, name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{op}: {name} must be one of {tuple(choices)}, got {value!r}")


def check_kd_scalars(op: str, temperature, alpha, t2_scale, ignore_index) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"{op}: temperature must be a number, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{op}: temperature must be finite and > 0, got {temperature}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"{op}: alpha must be a number, got {type(alpha).__name__}")
    if not (0.0 <= alpha <= 1.0):
        raise ValueError(f"{op}: alpha must be in [0, 1], got {alpha}")
    if not isinstance(t2_scale, bool):
        raise TypeError(f"{op}: t2_scale must be a bool, got {type(t2_scale).__name__}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{op}: ignore_index must be an int, got {type(ignore_index).__name__}")


def check_divergence_args(op: str, divergence, beta, teacher_temperature) -> None:
    check_choice(op, "divergence", divergence, DIVERGENCES)
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise TypeError(f"{op}: beta must be a number, got {type(beta).__name__}")
    if not (math.isfinite(beta) and 0.0 <= beta <= 1.0):
        raise ValueError(f"{op}: beta must be finite and in [0, 1], got {beta}")
    if teacher_temperature is None:
        return
    if isinstance(teacher_temperature, bool) or not isinstance(teacher_temperature, (int, float)):
        raise TypeError(f"{op}: teacher_temperature must be a number or None, got "
                        f"{type(teacher_temperature).__name__}")
    if not (math.isfinite(teacher_temperature) and teacher_temperature > 0):
        raise ValueError(f"{op}: teacher_temperature must be finite and > 0, got {teacher_temperature}")


def check_kd_args(op, student, teacher, target, temperature, alpha, t2_scale, reduction, ignore_index,
                  teacher_kind=None, divergence=DEFAULT_DIVERGENCE, beta=DEFAULT_BETA, teacher_temperature=None):
    """The arguments every KD op takes: student [N, C] logits, teacher [N, C] (None: checked by the op),
    target, the scalars, reduction, teacher_kind (None: not taken) and the divergence's arguments."""
    check_tensor(op, "student", student, dims=2, floating=True)
    if student.shape[0] == 0:
        raise ValueError(f"{op}: student is an empty batch (shape {tuple(student.shape)})")
    if student.shape[1] == 0:
        raise ValueError(f"{op}: student has no classes (shape {tuple(student.shape)})")
    if teacher is not None:
        check_tensor(op, "teacher", teacher, dims=2, floating=True)
        if teacher.shape != student.shape:
            raise ValueError(f"{op}: teacher has shape {tuple(teacher.shape)} but student has {tuple(student.shape)}")
        check_same_device(op, "teacher", teacher, "student", student)
    check_kd_scalars(op, temperature, alpha, t2_scale, ignore_index)
    check_choice(op, "reduction", reduction, REDUCTIONS)
    if teacher_kind is not None:
        check_choice(op, "teacher_kind", teacher_kind, TEACHER_KINDS)
    check_divergence_args(op, divergence, beta, teacher_temperature)
    check_target(op, target, student, ignore_index)


def check_target(op: str, target, rows: torch.Tensor, ignore_index: int, rows_name: str = "student",
                 num_classes: int | None = None) -> None:
    """target: None or int64 [N] on the device of `rows` (the op's [N, ...] input, named rows_name), values
    in [0, C) or ignore_index; C is rows' last dimension unless num_classes says otherwise.

    The value check reads the tensor, so it runs only for CPU tensors: on a GPU it would be a host
    synchronization. GPU kernels give a NaN row loss for an out-of-range target instead.
    """
    if target is None:
        return
    check_tensor(op, "target", target, dims=1)
    if target.dtype != torch.int64:
        raise TypeError(f"{op}: target must be int64 class indices, got {target.dtype}")
    if target.shape[0] != rows.shape[0]:
        raise ValueError(f"{op}: target has {target.shape[0]} rows but {rows_name} has {rows.shape[0]}")
    check_same_device(op, "target", target, rows_name, rows)
    if target.device.type == "cpu" and not _is_fake(target):
        c = rows.shape[-1] if num_classes is None else num_classes
        bad = (target != ignore_index) & ((target < 0) | (target >= c))
        if bool(bad.any()):
            first = int(target[bad][0])
            raise ValueError(
                f"{op}: target holds class {first}, outside [0, {c}) and not ignore_index={ignore_index}"
            )


def check_mix_weights(op: str, weights, k: int, rows: torch.Tensor, rows_name: str) -> None:
    """weights: None, [K] or [K, N] on the device of `rows` [N, ...]; finite, >= 0, not all 0 over K."""
    if weights is None:
        return
    check_tensor(op, "weights", weights, floating=True)
    n = rows.shape[0]
    if tuple(weights.shape) not in ((k,), (k, n)):
        raise ValueError(f"{op}: weights must have shape [{k}] or [{k}, {n}], got {tuple(weights.shape)}")
    check_same_device(op, "weights", weights, rows_name, rows)
    if weights.device.type == "cpu" and not torch.compiler.is_compiling():  # value checks would break graphs
        if bool((weights < 0).any()) or not bool(torch.isfinite(weights).all()):
            raise ValueError(f"{op}: weights must be finite and >= 0")
        if bool((weights.sum(0) <= 0).any()):
            raise ValueError(f"{op}: weights must not sum to 0 over the K teachers")


def _is_fake(x: torch.Tensor) -> bool:
    return isinstance(x, torch._subclasses.fake_tensor.FakeTensor) or torch.compiler.is_compiling()


def last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """Kernels take any row stride but need unit stride along classes."""
    return x if x.stride(-1) == 1 else x.contiguous()


# --- value guards against common mistakes (warn once) --------------------------------------------

_INPUT_CHECKS_ENV = "UED_FAST_INPUT_CHECKS"
_input_checks: bool | None = None  # None: CPU tensors only, unless the environment variable says otherwise
_warned: set[str] = set()
# Rows read by a guard: a tensor of probabilities passed as logits is one in every row, so a few suffice.
GUARD_ROWS = 8


def set_input_checks(enabled: bool | None) -> None:
    """Turn the ops' value guards on for tensors on every device (True), off everywhere (False), or back
    to the default (None: CPU tensors only, or what UED_FAST_INPUT_CHECKS=1/0 says).

    The guards read a few rows of the inputs; on a GPU that is a host synchronization, so they are off
    there unless asked for. They never run under torch.compile or torch.func transforms.
    """
    global _input_checks
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"set_input_checks: enabled must be True, False or None, got {enabled!r}")
    _input_checks = enabled


def input_checks_enabled(x: torch.Tensor) -> bool:
    if _is_fake(x) or transforms_active() or x.device.type == "meta":
        return False
    setting = _input_checks
    if setting is None:
        env = os.environ.get(_INPUT_CHECKS_ENV)
        setting = None if env is None or env == "" else env == "1"
    return x.device.type == "cpu" if setting is None else setting


def transforms_active() -> bool:
    """True inside torch.func transforms (grad, vmap, jacrev, ...): values there are wrapped tensors."""
    return torch._C._are_functorch_transforms_active()


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, UserWarning, stacklevel=4)


def reset_warnings() -> None:
    """Forget which guards have warned (each warns once per process)."""
    _warned.clear()


def _tolerance(x: torch.Tensor) -> float:
    # Rounding each probability to the input dtype moves a row sum by at most eps/2.
    return 2 * torch.finfo(x.dtype).eps + 1e-4


def looks_like_probs(x: torch.Tensor) -> bool:
    """The first GUARD_ROWS rows are >= 0 and sum to 1. Logits fail the first, cheaper test."""
    rows = x.detach()[..., :GUARD_ROWS, :]
    if not bool(rows.min() >= 0):
        return False
    return bool((rows.double().sum(-1) - 1).abs().max() <= _tolerance(x))


def looks_like_log_probs(x: torch.Tensor) -> bool:
    """The first GUARD_ROWS rows are <= 0 with logsumexp 0. Logits fail the first, cheaper test."""
    rows = x.detach()[..., :GUARD_ROWS, :]
    if not bool(rows.max() <= 0):
        return False
    return bool(torch.logsumexp(rows.double(), -1).abs().max() <= _tolerance(x))


def guard_kd_inputs(op: str, student: torch.Tensor, teacher: torch.Tensor, teacher_kind: str,
                    temperature: float) -> None:
    """Warn once per mistake when the inputs look like a common misuse of the KD ops (see README).

    Reads the first GUARD_ROWS rows of student and teacher (teacher: [N, C] or [K, N, C])."""
    if not input_checks_enabled(student):
        return
    if teacher_kind == "logits" and looks_like_probs(teacher):
        warn_once(f"{op}:probs-as-logits", (
            f"{op}: the teacher looks like probabilities (rows >= 0 summing to 1) but teacher_kind='logits'; "
            "pass teacher_kind='probs' (tempered by the op) or 'tempered_probs' (already softmax(t/T))"))
    if teacher_kind in ("probs", "tempered_probs") and not looks_like_probs(teacher):
        warn_once(f"{op}:bad-probs", (
            f"{op}: teacher_kind={teacher_kind!r} but the teacher has values outside [0, 1] or rows not summing "
            "to 1; pass logits with teacher_kind='logits'"))
    if teacher_kind in ("log_probs", "tempered_log_probs") and not looks_like_log_probs(teacher):
        warn_once(f"{op}:bad-log-probs", (
            f"{op}: teacher_kind={teacher_kind!r} but the teacher's rows are not log-probabilities "
            "(logsumexp != 0); pass logits with teacher_kind='logits'"))
    # log_softmax(s) as the student is harmless (softmax is shift invariant); log_softmax(s / T) is
    # tempered twice. The two look alike, so the warning says both; at T = 1 they are the same.
    if temperature != 1.0 and looks_like_log_probs(student):
        warn_once(f"{op}:log-probs-student", (
            f"{op}: the student looks like log-probabilities (<= 0, logsumexp 0). The op tempers it itself "
            "(log_softmax(student / T)): if it is log_softmax(s / T), the nn.KLDivLoss habit, it is tempered "
            "twice; pass the logits s. (log_softmax(s) is harmless; ued_fast.set_input_checks(False) silences "
            "this.)"))
