"""Plain networks and the model registry (DESIGN 1.3, 1.5): single teachers, students, the generalist
ensembles, the matched single teacher. The USTE method itself (class covers, the unified K-branch
network, the head assembly, its losses) is ued_fast.uste; its models are registered here too.

Every model maps normalized images [N, C_in, H, W] to [N, num_classes] logits of its distribution
(log-probabilities for uste_v2 and generalist_ensemble) and has training_loss(images, labels) ->
(loss, logits). Build them by name with build_model; MODELS lists the names.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .covers import call_reporting_kwargs, make_cover
# Re-exported: the unified network and ensemble were defined here before ued_fast.uste held them.
from .uste import (BRANCH_DEPTH, BRANCH_STAGES, BRANCH_WIDTH, EXECUTORS, ConvBody, UnifiedEnsemble,  # noqa: F401
                   _image_side, _init_heads, _positive_int, _upcast, branch_body, uste_v1, uste_v2)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (trainable ones only when asked)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


class SingleCNN(nn.Module):
    """One plain CNN over all classes: ConvBody + linear head. Forward returns logits."""

    def __init__(self, num_classes: int, in_channels: int, image_size, widths, depths):
        super().__init__()
        self.num_classes = _positive_int("num_classes", num_classes)
        self.body = ConvBody(in_channels, image_size, widths, depths)
        self.head = nn.Linear(self.body.feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def training_loss(self, images: torch.Tensor, labels: torch.Tensor):
        logits = self(images)
        return F.cross_entropy(logits, labels), logits


class GeneralistEnsemble(nn.Module):
    """K branches (the same grouped body as USTE), each head over ALL classes; forward returns the
    log of the mean of the branches' probabilities; training loss: sum of the per-branch CEs."""

    def __init__(self, body: ConvBody, num_classes: int):
        super().__init__()
        self.num_classes = _positive_int("num_classes", num_classes)
        self.body = body
        k, d = body.groups, body.feature_dim
        self.head_weight = nn.Parameter(torch.empty(k, d, num_classes))
        self.head_bias = nn.Parameter(torch.empty(k, num_classes))
        _init_heads(self.head_weight, self.head_bias, [num_classes] * k, [d] * k)

    def branch_logits(self, x: torch.Tensor) -> torch.Tensor:
        """[N, K, C] per-branch logits."""
        feats = self.body(x)
        w, b = self.head_weight.to(feats.dtype), self.head_bias.to(feats.dtype)
        k, d = w.shape[0], w.shape[1]
        return torch.einsum("nkd,kdc->nkc", feats.view(feats.shape[0], k, d), w) + b

    @staticmethod
    def _mix(u: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(_upcast(u), dim=-1)
        return torch.logsumexp(log_p, dim=1) - math.log(u.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._mix(self.branch_logits(x))

    def training_loss(self, images: torch.Tensor, labels: torch.Tensor):
        u = self.branch_logits(images)
        n, k, c = u.shape
        loss = F.cross_entropy(_upcast(u).reshape(n * k, c), labels.repeat_interleave(k), reduction="sum") / n
        return loss, self._mix(u)


# --- Registry --------------------------------------------------------------------------------------

# Single teachers for the strength sweep: (stage widths, convs per stage); parameters grow ~4x a step.
TEACHER_ARCHS = {
    "teacher_s": ((16, 32, 64), (2, 2, 2)),
    "teacher_m": ((32, 64, 128), (2, 2, 2)),
    "teacher_l": ((64, 128, 256), (2, 2, 2)),
    "teacher_xl": ((128, 256, 512), (2, 2, 2)),
}
# The student of every experiment row: ~104k parameters at 32x32x3 / 10 classes (authors: 107k).
STUDENT_ARCH = ((32, 64, 128), (2, 1, 1))
STUDENT_SMALL_ARCH = ((16, 32, 64), (1, 1, 1))


def _k_of(k, cover, num_classes) -> int:
    # K follows the USTE cover when one is named, so configs can pass the same kwargs to every ensemble.
    if k is None:
        k = len(make_cover(cover if cover is not None else "contiguous", num_classes))
    return _positive_int("k", k)


def _generalist(num_classes, in_channels, image_size, *, k=None, cover=None, width=BRANCH_WIDTH,
                depth=BRANCH_DEPTH, stages=BRANCH_STAGES, executor="auto"):
    body = branch_body(in_channels, image_size, _k_of(k, cover, num_classes), width, depth, stages, executor)
    return GeneralistEnsemble(body, num_classes)


def _joint_generalist(num_classes, in_channels, image_size, *, k=None, cover=None, width=BRANCH_WIDTH,
                      depth=BRANCH_DEPTH, stages=BRANCH_STAGES, executor="auto"):
    """USTE v1's structure and training (one CE on the logit mean of the heads) with every branch
    over all classes: it separates the effect of specialization from that of the joint training."""
    k = _k_of(k, cover, num_classes)
    body = branch_body(in_channels, image_size, k, width, depth, stages, executor)
    return UnifiedEnsemble(body, [list(range(num_classes))] * k, num_classes, mode="logit_mean")


def matched_widths(k: int, width: int, stages: int, scale: float = 1.0) -> list[int]:
    """Stage widths of one plain CNN with about the parameters and FLOPs of K branches of `width`:
    both grow with the square of the width (conv weights and MACs are width_in * width_out), so the
    single network is sqrt(K) times wider (times `scale`, for fine matching)."""
    base = max(1, round(width * math.sqrt(k) * scale))
    return [base * 2**i for i in range(stages)]


def _matched_single(num_classes, in_channels, image_size, *, k=None, cover=None, width=BRANCH_WIDTH,
                    depth=BRANCH_DEPTH, stages=BRANCH_STAGES, scale=None):
    """A single teacher matched to the unified ensemble built from the same kwargs: parameters and
    FLOPs within 10% (checked by tests/test_models.py). scale None searches the stage widths (the
    first stage's width on its own, the later ones doubling) for the smallest worst relative gap;
    a number gives matched_widths(..., scale) directly."""
    k = _k_of(k, cover, num_classes)
    width, depth, stages = (_positive_int(n, v) for n, v in (("width", width), ("depth", depth), ("stages", stages)))
    if scale is not None:
        widths = matched_widths(k, width, stages, scale)
    else:
        widths = list(_search_matched_widths(num_classes, in_channels, _image_side(image_size), k, width, depth,
                                             stages))
    return SingleCNN(num_classes, in_channels, image_size, widths, [depth] * stages)


@functools.lru_cache(maxsize=64)
def _search_matched_widths(num_classes, in_channels, side, k, width, depth, stages) -> tuple[int, ...]:
    # The ensemble's first conv reads the input into K*w channels at full resolution, so with few
    # input channels or shallow stages its FLOPs weigh more than its parameters: a wider first stage
    # than the sqrt(K) rule balances both.
    ref = UnifiedEnsemble(ConvBody(in_channels, side, [width * 2**i for i in range(stages)], [depth] * stages, groups=k),
                          [list(range(num_classes))] * k, num_classes)
    shape = (in_channels, side, side)
    p_ref, f_ref = count_parameters(ref), count_macs(ref, shape)
    base = matched_widths(k, width, stages)[0]
    best = None
    for b in range(max(1, int(base * 0.8)), int(base * 1.25) + 2):
        for first in range(max(1, base // 2), 2 * base + 1) if stages > 1 else [b]:
            widths = [first] + [b * 2**i for i in range(1, stages)]
            params, macs = _single_cnn_cost(num_classes, in_channels, side, widths, depth)
            gap = max(abs(params / p_ref - 1), abs(macs / f_ref - 1))
            if best is None or gap < best[0] - 1e-12:
                best = (gap, tuple(widths))
    return best[1]


def _single_cnn_cost(num_classes, in_channels, side, widths, depth) -> tuple[int, int]:
    """(parameters, MACs per image) of SingleCNN, counted layer by layer as ConvBody builds it."""
    params = macs = 0
    channels = in_channels
    for w in widths:
        for _ in range(depth):
            params += channels * w * 9 + 2 * w  # conv (no bias) + BatchNorm affine
            macs += side * side * channels * w * 9
            channels = w
        if side >= 4:
            side //= 2
    params += channels * num_classes + num_classes
    return params, macs + channels * num_classes


def _single(arch):
    def build(num_classes, in_channels, image_size, *, widths=None, depths=None):
        return SingleCNN(num_classes, in_channels, image_size, widths or arch[0], depths or arch[1])

    return build


def _cnn(num_classes, in_channels, image_size, *, width=32, depth=2, stages=3):
    """A single CNN of `stages` stages, widths width * 2^i: the small student of the claim configs."""
    widths = [_positive_int("width", width) * 2**i for i in range(_positive_int("stages", stages))]
    return SingleCNN(num_classes, in_channels, image_size, widths, [_positive_int("depth", depth)] * stages)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "uste_v1": uste_v1,
    "uste_v2": uste_v2,
    "generalist_ensemble": _generalist,
    "joint_generalist": _joint_generalist,
    "matched_single": _matched_single,
    **{name: _single(arch) for name, arch in TEACHER_ARCHS.items()},
    "student": _single(STUDENT_ARCH),
    "student_small": _single(STUDENT_SMALL_ARCH),
    "cnn": _cnn,
}


def count_macs(model: nn.Module, input_shape) -> int:
    """Multiply-accumulates of one forward pass of ONE image of shape [C, H, W]: every convolution
    (counted on the grouped executor), every linear layer and the ensembles' heads."""
    bodies = [m for m in model.modules() if isinstance(m, ConvBody)]
    saved = [b.executor for b in bodies]
    total = 0

    def conv_hook(module, inputs, output):
        nonlocal total
        kh, kw = module.kernel_size
        total += output[0].numel() * (module.in_channels // module.groups) * kh * kw

    hooks = [m.register_forward_hook(conv_hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    was_training = model.training
    try:
        for b in bodies:
            b.executor = "grouped"
        p = next(model.parameters())
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_shape, dtype=p.dtype, device=p.device))
    finally:
        for h in hooks:
            h.remove()
        for b, e in zip(bodies, saved):
            b.executor = e
        model.train(was_training)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            total += m.weight.numel()
        elif isinstance(m, (UnifiedEnsemble, GeneralistEnsemble)):
            total += m.head_weight.numel()
    return int(total)


def set_ops_backend(model: nn.Module, backend: str | None) -> nn.Module:
    """Force one backend (e.g. 'reference') for the fused ops a model calls (grouped_heads)."""
    for m in model.modules():
        if isinstance(m, UnifiedEnsemble):
            m.ops_backend = backend
    return model


def build_model(name: str, num_classes: int, in_channels: int, image_size, **kwargs) -> nn.Module:
    """Build a registered model. name: one of MODELS; image_size: int or (H, W)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {sorted(MODELS)}")
    _positive_int("num_classes", num_classes)
    _positive_int("in_channels", in_channels)
    _image_side(image_size)
    return call_reporting_kwargs(f"build_model({name!r})", MODELS[name], num_classes, in_channels, image_size,
                                 **kwargs)
