"""grouped_heads: K specialist heads over grouped features, assembled into C classes (DESIGN 2.3).

Spec: ued_fast.reference.grouped_heads_reference.
"""
from __future__ import annotations

import torch

from .. import _backend
from ..covers import validate_cover
from ..reference import HEAD_MODES, grouped_heads_reference
from . import _checks

OP = "grouped_heads"


def check_heads_args(features, weight, bias, cover, mode):
    _checks.check_choice(OP, "mode", mode, HEAD_MODES)
    cover = validate_cover(cover, name="cover")
    k = len(cover)
    _checks.check_tensor(OP, "weight", weight, dims=3, floating=True)
    _checks.check_tensor(OP, "bias", bias, dims=2, floating=True)
    _checks.check_tensor(OP, "features", features, floating=True)
    if weight.shape[0] != k:
        raise ValueError(f"{OP}: weight has {weight.shape[0]} heads but cover has K={k} subsets")
    d, width = weight.shape[1], weight.shape[2]
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
    cover: K lists of classes (head k's output j is class cover[k][j]).
    'logit_mean': z_c = mean of the covering heads' logits; 'prob_mean': log of the renormalized mean
    of the covering heads' probabilities (each head's softmax includes its 'other' output |S_k|).
    """
    cover = check_heads_args(features, weight, bias, cover, mode)
    # Until the kernels land, None means the reference.
    chosen = "reference" if backend is None else _backend.resolve_backend(backend, features.device, OP)
    if chosen != "reference":
        raise NotImplementedError(f"{OP}: backend {chosen!r} is not built yet; use backend='reference'")
    return grouped_heads_reference(features, weight, bias, cover, mode=mode)
