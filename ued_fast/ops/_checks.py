"""Argument checks shared by the ops: each error names the argument it is about."""
from __future__ import annotations

import math

import torch

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


def check_target(op: str, target, student: torch.Tensor, ignore_index: int) -> None:
    """target: None or int64 [N] on the student's device, values in [0, C) or ignore_index.

    The value check reads the tensor, so it runs only for CPU tensors: on a GPU it would be a host
    synchronization. GPU kernels give a NaN row loss for an out-of-range target instead.
    """
    if target is None:
        return
    check_tensor(op, "target", target, dims=1)
    if target.dtype != torch.int64:
        raise TypeError(f"{op}: target must be int64 class indices, got {target.dtype}")
    if target.shape[0] != student.shape[0]:
        raise ValueError(
            f"{op}: target has {target.shape[0]} rows but student has {student.shape[0]}"
        )
    check_same_device(op, "target", target, "student", student)
    if target.device.type == "cpu" and not _is_fake(target):
        c = student.shape[-1]
        bad = (target != ignore_index) & ((target < 0) | (target >= c))
        if bool(bad.any()):
            first = int(target[bad][0])
            raise ValueError(
                f"{op}: target holds class {first}, outside [0, {c}) and not ignore_index={ignore_index}"
            )


def _is_fake(x: torch.Tensor) -> bool:
    return isinstance(x, torch._subclasses.fake_tensor.FakeTensor) or torch.compiler.is_compiling()


def last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """Kernels take any row stride but need unit stride along classes."""
    return x if x.stride(-1) == 1 else x.contiguous()
