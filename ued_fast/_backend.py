"""Which backends exist on this machine, and which one an op uses for a given tensor.

Backends: 'reference' (pure PyTorch, the spec), 'cpp' (ued_fast._C, CPU tensors), 'cuda'
(ued_fast._C built with nvcc, CUDA tensors), 'triton' (kernels/, CUDA tensors, or CPU tensors
under TRITON_INTERPRET=1).
"""
from __future__ import annotations

import functools
import importlib
import os
import warnings

import torch

BACKENDS = ("reference", "cpp", "triton", "cuda")


def constant_under_compile(fn):
    """torch.compiler.assume_constant_result (torch.compile treats fn's result as a constant and does not
    trace it), without its `import torch._dynamo`, which would cost ~1.3 s on every `import ued_fast`.
    It sets the same marker dynamo reads (tests/test_api_guards.py checks that they agree)."""
    fn._dynamo_marked_constant = True
    return fn


@functools.lru_cache(maxsize=None)
@constant_under_compile
def extension_loaded() -> bool:
    """Import ued_fast._C once; its import registers the C++ (and CUDA) ops with torch.library."""
    if os.environ.get("UED_FAST_NO_EXT") == "1":
        return False
    try:
        importlib.import_module("ued_fast._C")
    except ImportError as exc:  # not built: fall back to reference/Triton, but say so once
        warnings.warn(f"ued_fast._C is not available ({exc}); using the reference and Triton backends")
        return False
    return True


@functools.lru_cache(maxsize=None)
@constant_under_compile
def cuda_kernels_built() -> bool:
    return extension_loaded() and hasattr(torch.ops.ued_fast, "cuda_built") and bool(
        torch.ops.ued_fast.cuda_built()
    )


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
@constant_under_compile
def cuda_device_present() -> bool:
    return torch.cuda.is_available()


@functools.lru_cache(maxsize=None)
@constant_under_compile
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@constant_under_compile  # torch.compile: evaluated, not traced (it reads lru_caches and the environment)
def available_backends(device: str | torch.device) -> list[str]:
    """Backends that can run on tensors of `device` here, best first (reference always last)."""
    kind = torch.device(device).type
    found = []
    if kind == "cuda":
        if not cuda_device_present():  # a CPU-only install (or torch without CUDA): nothing native runs
            return ["reference"]
        if cuda_kernels_built():
            found.append("cuda")
        if triton_available():
            found.append("triton")
    elif kind == "cpu":
        if extension_loaded():
            found.append("cpp")
        if triton_available() and triton_interpreted():
            found.append("triton")
    found.append("reference")
    return found


def resolve_backend(backend: str | None, device: torch.device, op: str) -> str:
    """The backend an op call runs on: `backend` if given (checked), else the best for `device`."""
    if backend is None:
        return available_backends(device)[0]
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend not in available_backends(device):
        raise ValueError(
            f"{op}: backend={backend!r} cannot run on {device.type} tensors here "
            f"(available: {available_backends(device)})"
        )
    return backend
