"""grouped_heads: K specialist heads over grouped features, assembled into C classes (DESIGN 2.3).

Spec: ued_fast.reference.grouped_heads_reference. Backends: 'cpp' and 'cuda' are the C++ ops
torch.ops.ued_fast.grouped_heads_fwd / grouped_heads_bwd (csrc/grouped_heads.cpp,
csrc/grouped_heads_cuda.cu), 'triton' is ued_fast.kernels.grouped_heads, 'reference' is the spec
(differentiated by autograd).

Every native backend implements this contract (mode 0 = logit_mean, 1 = prob_mean):
    fwd(features [N, K*D] or [K, N, D], weight [K, D, W], bias [K, W], cover tables, mode)
      -> out [N, C] in the features' dtype, saved (the head outputs for prob_mean, in float32 (float64
         for float64): [K, N, W] on 'triton'/'cuda', transposed [K, W, N] on 'cpp'; empty for logit_mean)
    bwd(grad_out [N, C], features, weight, saved, cover tables, mode, need_features, need_params)
      -> grad_features (the features' shape), grad_weight [K, D, W], grad_bias [K, W]
         (empty when not requested).
The cover tables (see CoverTables) are built once per (cover, W, device) and cached, so a call
runs no Python loop over heads or classes. Math in float32 registers (float64 for float64).
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch
from torch import nn

from ..covers import Cover, cover_index, validate_cover
from ..reference import HEAD_MODES, compute_dtype, grouped_heads_reference
from . import _checks, _spine

OP = "grouped_heads"
_MODE_CODE = {name: i for i, name in enumerate(HEAD_MODES)}  # logit_mean 0, prob_mean 1


@dataclass(frozen=True)
class CoverTables:
    """The cover as kernel inputs (all int64, on one device).

    cover_index [K, W]: class of head k's output j, -1 for padding and for the 'other' output.
    class_ptr [C+1], class_entries [nnz]: CSR from class c to the flat k*W + j of the head outputs
        holding it; count(c) = class_ptr[c+1] - class_ptr[c].
    slot_of [K, C]: j such that head k's output j is class c, or -1 (the gather table of the fused
        logit_mean tiles).
    sizes [K]: |S_k|. max_count: the largest count(c) (a Python int, for kernel block sizes).
    """

    cover_index: torch.Tensor
    class_ptr: torch.Tensor
    class_entries: torch.Tensor
    slot_of: torch.Tensor
    sizes: torch.Tensor
    max_count: int

    @property
    def num_classes(self) -> int:
        return self.class_ptr.numel() - 1


@functools.lru_cache(maxsize=256)
def _cover_tables_cpu(cover: Cover, width: int) -> CoverTables:
    k_heads = len(cover)
    num_classes = 1 + max(max(s) for s in cover)
    index = cover_index(cover, width)
    slot_of = torch.full((k_heads, num_classes), -1, dtype=torch.int64)
    holders: list[list[int]] = [[] for _ in range(num_classes)]
    for k, subset in enumerate(cover):
        for j, c in enumerate(subset):
            holders[c].append(k * width + j)
            slot_of[k, c] = j
    ptr = [0]
    for h in holders:
        ptr.append(ptr[-1] + len(h))
    entries = torch.tensor([e for h in holders for e in h], dtype=torch.int64)
    sizes = torch.tensor([len(s) for s in cover], dtype=torch.int64)
    max_count = max(len(h) for h in holders)
    return CoverTables(index, torch.tensor(ptr, dtype=torch.int64), entries, slot_of, sizes, max_count)


@functools.lru_cache(maxsize=256)
def cover_tables(cover: Cover, width: int, device: torch.device) -> CoverTables:
    """The kernel tables of a validated cover for heads of `width` outputs, cached per device."""
    cpu = _cover_tables_cpu(cover, width)
    if device.type == "cpu":
        return cpu
    moved = (t.to(device) for t in (cpu.cover_index, cpu.class_ptr, cpu.class_entries, cpu.slot_of, cpu.sizes))
    return CoverTables(*moved, cpu.max_count)


@functools.lru_cache(maxsize=256)
def _validated(cover_key) -> Cover:
    return validate_cover(cover_key, name="cover")


def _validate_cover_cached(cover) -> Cover:
    """validate_cover, cached on the cover's value: a model calls this every step with one cover."""
    try:
        key = tuple(map(tuple, cover))
    except TypeError:
        return validate_cover(cover, name="cover")  # raises the error that names the argument
    # Only plain ints may hit the cache (1.0 == 1 and True == 1 would otherwise pass as valid).
    if isinstance(cover, (str, bytes)) or set(map(type, itertools.chain.from_iterable(key))) != {int}:
        return validate_cover(cover, name="cover")
    return _validated(key)


@functools.lru_cache(maxsize=256)
def _flat_cover(cover: Cover) -> tuple[list[int], list[int]]:
    return [c for s in cover for c in s], [len(s) for s in cover]


def _unflatten_cover(cover_flat: list[int], cover_sizes: list[int]) -> Cover:
    out, start = [], 0
    for size in cover_sizes:
        out.append(tuple(cover_flat[start:start + size]))
        start += size
    return tuple(out)


@functools.lru_cache(maxsize=256)
def _cover_from_args(cover_flat: tuple[int, ...], cover_sizes: tuple[int, ...]) -> Cover:
    return _unflatten_cover(list(cover_flat), list(cover_sizes))


def _tables_for(cover_flat, cover_sizes, width: int, device: torch.device) -> CoverTables:
    return cover_tables(_cover_from_args(tuple(cover_flat), tuple(cover_sizes)), width, device)


def _no_autocast(fn):
    """The kernels pick their own precision (fp32 accumulation); autocast must not recast the GEMMs inside them."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return fn(*args, **kwargs)
    return wrapper


@_no_autocast
def _native_forward(backend, features, weight, bias, tables: CoverTables, mode_code: int):
    forward = _spine.native_op(backend, OP, "grouped_heads_fwd")
    if backend == "triton":  # Triton takes the tables object, C++ its tensors
        return forward(features, weight, bias, tables, mode_code)
    return forward(features, weight, bias, tables.cover_index, tables.class_ptr, tables.class_entries, mode_code)


@_no_autocast
def _native_backward(backend, grad_out, features, weight, saved, tables: CoverTables, mode_code: int,
                     need_features: bool, need_params: bool):
    backward = _spine.native_op(backend, OP, "grouped_heads_bwd")
    if backend == "triton":
        return backward(grad_out, features, weight, saved, tables, mode_code, need_features, need_params)
    return backward(grad_out, features, weight, saved, tables.cover_index, tables.class_ptr, tables.class_entries,
                    mode_code, need_features, need_params)


@torch.library.custom_op("ued_fast::grouped_heads", mutates_args=())
def _grouped_heads_op(
    features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, cover_flat: list[int],
    cover_sizes: list[int], num_classes: int, mode: str, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out [N, C], saved: the head outputs for prob_mean (layout per backend), empty for logit_mean)."""
    tables = _tables_for(cover_flat, cover_sizes, weight.shape[2], features.device)
    return _native_forward(backend, features, weight, bias, tables, _MODE_CODE[mode])


@_grouped_heads_op.register_fake
def _(features, weight, bias, cover_flat, cover_sizes, num_classes, mode, backend):
    k, _, width = weight.shape
    n = features.shape[0] if features.dim() == 2 else features.shape[1]
    cd = compute_dtype(features.dtype)
    out = features.new_empty((n, num_classes))
    saved_shape = (k, width, n) if backend == "cpp" else (k, n, width)
    saved = features.new_empty(saved_shape if mode == "prob_mean" else (0,), dtype=cd)
    return out, saved


@torch.library.custom_op("ued_fast::grouped_heads_backward", mutates_args=())
def _grouped_heads_backward_op(
    grad_out: torch.Tensor, features: torch.Tensor, weight: torch.Tensor, saved: torch.Tensor,
    cover_flat: list[int], cover_sizes: list[int], mode: str, backend: str, need_features: bool,
    need_params: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    tables = _tables_for(cover_flat, cover_sizes, weight.shape[2], features.device)
    return _native_backward(backend, grad_out, features, weight, saved, tables, _MODE_CODE[mode],
                            need_features, need_params)


@_grouped_heads_backward_op.register_fake
def _(grad_out, features, weight, saved, cover_flat, cover_sizes, mode, backend, need_features, need_params):
    k, _, width = weight.shape
    grad_features = features.new_empty(features.shape if need_features else (0,))
    grad_weight = weight.new_empty(weight.shape if need_params else (0,))
    grad_bias = weight.new_empty((k, width) if need_params else (0,))
    return grad_features, grad_weight, grad_bias


def _setup_context(ctx, inputs, output):
    features, weight, bias, cover_flat, cover_sizes, _, mode, backend = inputs
    ctx.cover_flat, ctx.cover_sizes, ctx.mode, ctx.backend = cover_flat, cover_sizes, mode, backend
    ctx.save_for_backward(features, weight, bias, output[1])


def _backward(ctx, grad_out, _grad_saved):
    features, weight, bias, saved = ctx.saved_tensors
    needs = ctx.needs_input_grad[:3]
    if torch.is_grad_enabled():  # create_graph=True: the gradients must themselves be differentiable
        grads = _reference_grads(ctx, grad_out, (features, weight, bias), needs)
        return grads + (None,) * 5
    need_features = needs[0]
    need_params = needs[1] or needs[2]
    grad_features, grad_weight, grad_bias = _grouped_heads_backward_op(
        grad_out, features, weight, saved, ctx.cover_flat, ctx.cover_sizes, ctx.mode, ctx.backend,
        need_features, need_params)
    return (grad_features if need_features else None, grad_weight if needs[1] else None,
            grad_bias if needs[2] else None, None, None, None, None, None)


def _reference_grads(ctx, grad_out, inputs, needs) -> tuple:
    """The reference's gradients for the inputs that need one, recomputed with create_graph=True."""
    cover = _cover_from_args(tuple(ctx.cover_flat), tuple(ctx.cover_sizes))
    wanted = [x for x, need in zip(inputs, needs) if need]
    with torch.enable_grad():
        out = grouped_heads_reference(*inputs, cover, mode=ctx.mode)
        found = iter(torch.autograd.grad(out, wanted, grad_out, create_graph=True, allow_unused=True))
    return tuple(next(found) if need else None for need in needs)


_grouped_heads_op.register_autograd(_backward, setup_context=_setup_context)


def check_heads_args(features, weight, bias, cover, mode):
    _checks.check_choice(OP, "mode", mode, HEAD_MODES)
    cover = _validate_cover_cached(cover)
    k = len(cover)
    _checks.check_tensor(OP, "weight", weight, dims=3, floating=True)
    _checks.check_tensor(OP, "bias", bias, dims=2, floating=True)
    _checks.check_tensor(OP, "features", features, floating=True)
    if weight.shape[0] != k:
        raise ValueError(f"{OP}: weight has {weight.shape[0]} heads but cover has K={k} subsets")
    d, width = weight.shape[1], weight.shape[2]
    if d == 0:
        raise ValueError(f"{OP}: weight has D = 0 features per head")
    need = max(len(s) for s in cover) + (1 if mode == "prob_mean" else 0)
    if width < need:
        raise ValueError(f"{OP}: weight has {width} outputs per head; mode={mode!r} with this cover needs >= {need}")
    if tuple(bias.shape) != (k, width):
        raise ValueError(f"{OP}: bias must have shape [{k}, {width}], got {tuple(bias.shape)}")
    if features.dim() == 2:
        if features.shape[1] != k * d:
            raise ValueError(f"{OP}: features [N, K*D] must have K*D = {k * d} columns, got {features.shape[1]}")
    elif features.dim() == 3:
        if features.shape[0] != k or features.shape[2] != d:
            raise ValueError(f"{OP}: features [K, N, D] must have shape [{k}, N, {d}], got {tuple(features.shape)}")
    else:
        raise ValueError(f"{OP}: features must be [N, K*D] or [K, N, D], got shape {tuple(features.shape)}")
    if features.shape[-2 if features.dim() == 3 else 0] == 0:
        raise ValueError(f"{OP}: features is an empty batch")
    for name, t in (("weight", weight), ("bias", bias)):
        _checks.check_same_device(OP, name, t, "features", features)
        if t.dtype != features.dtype:
            raise TypeError(f"{OP}: {name} is {t.dtype} but features is {features.dtype}")
    return cover


def grouped_heads(
    features: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    cover,
    *,
    mode: str = "logit_mean",
    backend: str | None = None,
) -> torch.Tensor:
    """K linear heads on grouped features, assembled into one [N, C] output (DESIGN 2.3).

    features [N, K*D] or [K, N, D]; weight [K, D, W], bias [K, W] (W >= max|S_k|, +1 for prob_mean);
    cover: K lists of classes (head k's output j is class cover[k][j]; outputs past |S_k| (past the
    'other' output |S_k| for prob_mean) are padding and ignored).
    'logit_mean': z_c = mean of the covering heads' logits; 'prob_mean': log of the renormalized mean
    of the covering heads' probabilities (each head's softmax includes its 'other' output |S_k|).
    Returns [N, C] in the features' dtype; differentiable in features, weight and bias, twice over
    (a backward with create_graph=True recomputes through the reference). Under torch.func transforms
    (grad, vmap, ...) the op runs the reference.
    backend: None (the best for the device), 'cpp', 'cuda', 'triton' or 'reference'.
    """
    cover = check_heads_args(features, weight, bias, cover, mode)
    chosen = _spine.resolve_backend(OP, backend, features)
    if chosen == "reference":
        return grouped_heads_reference(features, weight, bias, cover, mode=mode)
    cover_flat, cover_sizes = _flat_cover(cover)
    num_classes = 1 + max(cover_flat)
    out, _ = _grouped_heads_op(_checks.last_dim_contiguous(features), weight, bias, cover_flat, cover_sizes,
                               num_classes, mode, chosen)
    return out


class GroupedHeads(nn.Module):
    """K specialist linear heads over grouped features with their assembly (grouped_heads as a module).

    GroupedHeads(cover, in_features_per_head, mode='logit_mean')(features) -> [N, C].
    Each head's weight is initialized like nn.Linear(D, |S_k|(+1)); padding columns are zero.
    """

    def __init__(self, cover, in_features_per_head: int, *, mode: str = "logit_mean",
                 backend: str | None = None, device=None, dtype=None):
        super().__init__()
        _checks.check_choice("GroupedHeads", "mode", mode, HEAD_MODES)
        self.cover = validate_cover(cover, name="cover")
        self.mode, self.backend = mode, backend
        k, d = len(self.cover), int(in_features_per_head)
        width = max(len(s) for s in self.cover) + (1 if mode == "prob_mean" else 0)
        self.weight = nn.Parameter(torch.zeros(k, d, width, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(k, width, device=device, dtype=dtype))
        bound = 1.0 / d ** 0.5
        with torch.no_grad():
            for j, subset in enumerate(self.cover):
                real = len(subset) + (1 if mode == "prob_mean" else 0)
                self.weight[j, :, :real].uniform_(-bound, bound)
                self.bias[j, :real].uniform_(-bound, bound)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return grouped_heads(features, self.weight, self.bias, self.cover, mode=self.mode, backend=self.backend)

    def extra_repr(self) -> str:
        return f"K={len(self.cover)}, D={self.weight.shape[1]}, W={self.weight.shape[2]}, mode={self.mode!r}"
