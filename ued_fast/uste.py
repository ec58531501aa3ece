"""USTE, the method in one file: a Unified Ensemble of Specialized Teachers (DESIGN 1.1-1.4).

Read top to bottom:
  1. The class cover: K subsets S_1..S_K of the C classes, overlapping, whose union is all classes
     (constructions and validation live in ued_fast.covers, which the fused ops import too; the
     cover API is re-exported here).
  2. The unified network: K teachers as ONE CNN (ConvBody with groups=K: the first conv reads the
     shared input, every later conv is grouped, so branch k owns channel block k of every layer).
  3. Heads and their assembly into one C-class output (UnifiedEnsemble, via ued_fast.grouped_heads):
     v1 ('logit_mean'): z_c = mean over the heads covering c of their logit for c;
     v2 ('prob_mean'): each head has an extra 'other' unit, the output is the log of the
     renormalized mean of the covering heads' probabilities.
  4. Losses: v1 trains CE(z, y); v2 sums each specialist's CE with labels outside S_k mapped to
     'other' (specialist_loss); the student then learns from the ensemble's output (distill_loss:
     Hinton's KD by default, the authors' loss as an ablation).
  5. Builders (uste_v1, uste_v2): the registry entries of ued_fast.models.MODELS.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .covers import (AUTHORS_CONTIGUOUS_10, AUTHORS_RFOLD_10, COVER_BUILDERS, Cover, authors_v2, check_int, confusion,
                     confusion_matrix, contiguous, cover_counts, cover_index, cover_num_classes, load_cover,
                     make_cover, rfold, validate_cover)
from .ops.grouped_heads import grouped_heads

__all__ = [
    "Cover", "validate_cover", "make_cover", "load_cover", "contiguous", "rfold", "authors_v2", "confusion",
    "confusion_matrix", "cover_counts", "cover_index", "cover_num_classes", "COVER_BUILDERS",
    "AUTHORS_CONTIGUOUS_10", "AUTHORS_RFOLD_10",
    "ConvBody", "UnifiedEnsemble", "specialist_loss", "distill_loss", "authors_kd_loss", "VARIANTS",
    "uste_v1", "uste_v2", "default_v2_cover", "branch_body", "BRANCH_WIDTH", "BRANCH_DEPTH", "BRANCH_STAGES",
]

EXECUTORS = ("auto", "grouped", "loop")


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """Loss math in fp32 for half inputs; fp64 stays fp64."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _positive_int(name: str, value) -> int:
    return check_int(name, value, 1)


def _image_side(image_size) -> int:
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        sides = [image_size]
    elif isinstance(image_size, Sequence) and len(image_size) == 2 and all(isinstance(s, int) for s in image_size):
        sides = list(image_size)
    else:
        raise TypeError(f"image_size must be an int or (H, W), got {image_size!r}")
    if min(sides) < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size!r}")
    return min(sides)


# --- 2. The unified network ------------------------------------------------------------------------


@torch.compiler.assume_constant_result  # torch.compile: the executor choice is a constant, not traced
def _cpu_threads() -> int:
    return torch.get_num_threads()


def _batch_norm_slice(layer: nn.BatchNorm2d, h: torch.Tensor, b: int, k: int) -> torch.Tensor:
    """nn.BatchNorm2d on channel block b of k: the same math and the same running-statistics update
    (the statistics' slices are views, updated in place), counted once per batch (at b = 0)."""
    n = layer.num_features // k
    sl = slice(b * n, (b + 1) * n)
    momentum = layer.momentum
    if layer.training and layer.track_running_stats:
        if b == 0:
            layer.num_batches_tracked.add_(1)
        if momentum is None:  # cumulative moving average, as nn.BatchNorm2d does
            momentum = 1.0 / float(layer.num_batches_tracked)
    use_batch_stats = layer.training or layer.running_mean is None
    running_mean = layer.running_mean[sl] if layer.running_mean is not None else None
    running_var = layer.running_var[sl] if layer.running_var is not None else None
    return F.batch_norm(h, running_mean, running_var, layer.weight[sl], layer.bias[sl], use_batch_stats,
                        0.0 if momentum is None else momentum, layer.eps)


class ConvBody(nn.Module):
    """A VGG-style CNN: stages of (3x3 conv, BatchNorm, ReLU) x depth, then 2x2 max-pool, then
    global average pooling. widths[i] channels in stage i.

    groups=K builds K independent branches of that architecture as ONE network (DESIGN 1.2): the
    first conv reads the shared input with groups=1 and K*w outputs, every later conv has K*w
    channels and groups=K, BatchNorm spans all K*w channels (it is per channel, so per branch).
    Branch k owns channels k*w..(k+1)*w of every layer, so the output [N, K*D] holds branch k's
    features in columns k*D..(k+1)*D. Pooling stops once the map is smaller than 4x4, so 8x8
    inputs keep a 2x2 map before the global pool.
    """

    def __init__(self, in_channels: int, image_size, widths: Sequence[int], depths: Sequence[int], groups: int = 1,
                 executor: str = "auto"):
        super().__init__()
        if executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")
        in_channels = _positive_int("in_channels", in_channels)
        groups = _positive_int("groups", groups)
        side = _image_side(image_size)
        if len(widths) != len(depths) or len(widths) == 0:
            raise ValueError(f"widths {list(widths)} and depths {list(depths)} must be non-empty and of equal length")
        for w in widths:
            _positive_int("width", w)
        for d in depths:
            _positive_int("depth", d)
        layers: list[nn.Module] = []
        channels = in_channels
        first = True
        for width, depth in zip(widths, depths):
            for _ in range(depth):
                out = groups * width
                layers += [
                    nn.Conv2d(channels, out, 3, padding=1, bias=False, groups=1 if first else groups),
                    nn.BatchNorm2d(out),
                    nn.ReLU(inplace=True),
                ]
                channels, first = out, False
            if side >= 4:
                layers.append(nn.MaxPool2d(2))
                side //= 2
        self.layers = nn.Sequential(*layers)
        self.in_channels = in_channels
        self.image_size = image_size
        self.widths, self.depths = tuple(widths), tuple(depths)
        self.groups = groups
        self.feature_dim = widths[-1]  # per branch
        self.executor = executor

    def resolved_executor(self, device: torch.device) -> str:
        """'grouped' (one grouped conv per layer) or 'loop' (the K branches one after another on
        slices of the same weights). 'auto': the loop on a CPU running one intra-op thread (1.3-1.6x
        the grouped convs there), grouped convs elsewhere (on 2 CPU threads the loop's small convs
        lose 2-3x; bench/results/cpu_train.md)."""
        if self.groups == 1:
            return "grouped"
        if self.executor == "auto":
            return "loop" if device.type == "cpu" and _cpu_threads() == 1 else "grouped"
        return self.executor

    def _forward_loop(self, x: torch.Tensor) -> torch.Tensor:
        # Exactly the grouped network: branch b runs every layer with its slice of the weights
        # (the first conv, groups=1, too: its output slice is branch b's), so each branch's
        # activations are contiguous tensors of their own, as K separate networks would have.
        k = self.groups
        outs = []
        for b in range(k):
            h = x
            for layer in self.layers:
                if isinstance(layer, nn.Conv2d):
                    n = layer.out_channels // k
                    h = F.conv2d(h, layer.weight[b * n:(b + 1) * n], None, layer.stride, layer.padding)
                elif isinstance(layer, nn.BatchNorm2d):
                    h = _batch_norm_slice(layer, h, b, k)
                else:
                    h = layer(h)
            outs.append(h.mean(dim=(2, 3)))
        return torch.cat(outs, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Shape and dtype only (no value reads, so no host sync): torch's own errors here are cryptic.
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"images must be [N, {self.in_channels}, H, W], got {got}")
        if not x.is_floating_point():
            raise TypeError(f"images must be floating point (normalized), got {x.dtype}")
        if self.resolved_executor(x.device) == "loop":
            return self._forward_loop(x)
        return self.layers(x).mean(dim=(2, 3))

    def split(self) -> list["ConvBody"]:
        """K separate single-branch bodies holding copies of this grouped body's weights."""
        k = self.groups
        branches = []
        for b in range(k):
            branch = ConvBody(self.in_channels, self.image_size, self.widths, self.depths, groups=1)
            branch = branch.to(device=next(self.parameters()).device, dtype=next(self.parameters()).dtype)
            with torch.no_grad():
                for src, dst in zip(self.layers, branch.layers):
                    if isinstance(src, nn.Conv2d):
                        n = src.out_channels // k
                        dst.weight.copy_(src.weight[b * n : (b + 1) * n])
                    elif isinstance(src, nn.BatchNorm2d):
                        n = src.num_features // k
                        for name in ("weight", "bias", "running_mean", "running_var"):
                            getattr(dst, name).copy_(getattr(src, name)[b * n : (b + 1) * n])
                        dst.num_batches_tracked.copy_(src.num_batches_tracked)
            branch.train(self.training)
            branches.append(branch)
        return branches


# --- 3. Heads and their assembly ------------------------------------------------------------------

class _BranchList(nn.Module):
    """Heterogeneous branches run in a loop; features zero-padded to the widest branch."""

    def __init__(self, branches: Sequence[nn.Module], feature_dims: Sequence[int] | None):
        super().__init__()
        self.branches = nn.ModuleList(branches)
        if feature_dims is None:
            dims = []
            for k, b in enumerate(branches):
                if not isinstance(getattr(b, "feature_dim", None), int):
                    raise ValueError(f"branches[{k}] has no int attribute feature_dim; pass feature_dims")
                dims.append(b.feature_dim)
        else:
            if len(feature_dims) != len(branches):
                raise ValueError(f"feature_dims has {len(feature_dims)} entries for {len(branches)} branches")
            dims = [_positive_int("feature_dims", d) for d in feature_dims]
        self.feature_dims = tuple(dims)
        self.feature_dim = max(dims)
        self.groups = len(branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = []
        for k, branch in enumerate(self.branches):
            h = branch(x)
            if h.dim() != 2 or h.shape[1] != self.feature_dims[k]:
                raise ValueError(f"branches[{k}] returned shape {tuple(h.shape)}, expected [N, {self.feature_dims[k]}]")
            feats.append(F.pad(h, (0, self.feature_dim - h.shape[1])))
        return torch.cat(feats, dim=1)


def _init_heads(weight: torch.Tensor, bias: torch.Tensor, real_outputs: Sequence[int], fan_in: Sequence[int]):
    """nn.Linear's default init for the real outputs of each head; padding stays zero."""
    with torch.no_grad():
        weight.zero_()
        bias.zero_()
        for k, (n_out, d) in enumerate(zip(real_outputs, fan_in)):
            bound = 1.0 / math.sqrt(d)
            weight[k, :d, :n_out].uniform_(-bound, bound)
            bias[k, :n_out].uniform_(-bound, bound)


class UnifiedEnsemble(nn.Module):
    """K specialist teachers trained as one model (DESIGN 1.2 v1 and 1.3 v2).

    body: a ConvBody with groups=K (the unified network: one forward for all branches), or a list of
    K branch modules (heterogeneous fallback, run in a loop; each maps images to [N, D_k] and has
    feature_dim, or pass feature_dims). Heads: weight [K, D, W], bias [K, W], W = max|S_k| (+1 for
    v2's 'other' unit), assembled by ued_fast.grouped_heads.
    mode 'logit_mean' (v1): forward returns z, z_c = mean over covering heads of their logit for c;
    training loss CE(z, y). mode 'prob_mean' (v2): forward returns the log of the renormalized mean
    of the covering heads' probabilities; training loss: per-specialist CE with labels outside S_k
    mapped to 'other', summed over k. second_softmax (v2 only): the authors' extra softmax over r.
    """

    def __init__(self, body, cover, num_classes: int | None = None, *, mode: str = "logit_mean",
                 second_softmax: bool = False, feature_dims: Sequence[int] | None = None):
        super().__init__()
        if mode not in ("logit_mean", "prob_mean"):
            raise ValueError(f"mode must be 'logit_mean' or 'prob_mean', got {mode!r}")
        if not isinstance(second_softmax, bool):
            raise TypeError(f"second_softmax must be a bool, got {type(second_softmax).__name__}")
        if second_softmax and mode != "prob_mean":
            raise ValueError("second_softmax applies to mode='prob_mean' (v2) only")
        cover = validate_cover(cover, num_classes, name="cover")
        self.num_classes = num_classes if num_classes is not None else cover_num_classes(cover)
        if isinstance(body, (list, tuple, nn.ModuleList)):
            body = _BranchList(list(body), feature_dims)
        elif not isinstance(body, nn.Module):
            raise TypeError(f"body must be a ConvBody or a list of branch modules, got {type(body).__name__}")
        if getattr(body, "groups", None) != len(cover):
            raise ValueError(f"body has {getattr(body, 'groups', None)} branches but cover has K={len(cover)} subsets")
        self.body = body
        self.cover: Cover = cover
        self.mode = mode
        self.second_softmax = second_softmax
        k, d = len(cover), body.feature_dim
        sizes = [len(s) for s in cover]
        extra = 1 if mode == "prob_mean" else 0
        width = max(sizes) + extra
        self.head_weight = nn.Parameter(torch.empty(k, d, width))
        self.head_bias = nn.Parameter(torch.empty(k, width))
        dims = getattr(body, "feature_dims", (d,) * k)
        _init_heads(self.head_weight, self.head_bias, [s + extra for s in sizes], dims)
        self.ops_backend: str | None = None  # None: grouped_heads picks the best backend
        index = torch.tensor([list(s_) + [0] * (max(sizes) - len(s_)) for s_ in cover])
        counts = torch.zeros(self.num_classes)
        for s_ in cover:
            counts[list(s_)] += 1
        self.register_buffer("cover_index", index, persistent=False)
        self.register_buffer("cover_counts", counts, persistent=False)
        if mode == "prob_mean":
            # local_targets[k, c]: head k's output index for true class c (|S_k|, 'other', if c not in S_k).
            local = torch.tensor([[s.index(c) if c in s else len(s) for c in range(self.num_classes)] for s in cover])
            pad = torch.arange(width).expand(k, width) > torch.tensor(sizes)[:, None]
            self.register_buffer("local_targets", local, persistent=False)
            self.register_buffer("pad_mask", pad, persistent=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[N, K*D]: branch k's features in columns k*D..(k+1)*D."""
        return self.body(x)

    def _heads(self, feats: torch.Tensor):
        # Cast like autocast would: features may be bf16/fp16 under mixed precision.
        return self.head_weight.to(feats.dtype), self.head_bias.to(feats.dtype)

    def assemble(self, feats: torch.Tensor) -> torch.Tensor:
        w, b = self._heads(feats)
        if self.second_softmax:
            # The authors' extra softmax reads the raw mean of the covering heads' probabilities
            # (it does not sum to 1), not the renormalized one that grouped_heads returns.
            return F.log_softmax(self.raw_prob_mean(feats), dim=-1).to(feats.dtype)
        return grouped_heads(feats, w, b, self.cover, mode=self.mode, backend=self.ops_backend)

    def raw_prob_mean(self, feats: torch.Tensor) -> torch.Tensor:
        """[N, C] r_c = mean over the heads covering c of their probability of c (v2; 'other'
        units included in each head's softmax, not renormalized over classes)."""
        if self.mode != "prob_mean":
            raise ValueError("raw_prob_mean is defined for mode='prob_mean' (v2) only")
        u = _upcast(self.head_logits(feats)).masked_fill(self.pad_mask, float("-inf"))
        q = torch.softmax(u, dim=-1)  # [N, K, W]
        r = q.new_zeros(q.shape[0], self.num_classes)
        for k, s in enumerate(self.cover):
            r = r.index_add(1, self.cover_index[k][: len(s)], q[:, k, : len(s)])
        return r / self.cover_counts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.assemble(self.features(x))

    def head_logits(self, feats: torch.Tensor) -> torch.Tensor:
        """[N, K, W] raw head outputs (padding included)."""
        w, b = self._heads(feats)
        k, d = w.shape[0], w.shape[1]
        return torch.einsum("nkd,kdw->nkw", feats.view(feats.shape[0], k, d), w) + b

    def training_loss(self, images: torch.Tensor, labels: torch.Tensor):
        feats = self.features(images)
        logits = self.assemble(feats)
        if self.mode == "logit_mean":
            return F.cross_entropy(logits, labels), logits
        return specialist_loss(self.head_logits(feats), self.pad_mask, self.local_targets, labels), logits

    def separate(self) -> "UnifiedEnsemble":
        """The same ensemble as K separate branch networks run in a loop (for tests and benchmarks)."""
        if not isinstance(self.body, ConvBody):
            raise TypeError("separate() needs a grouped ConvBody body")
        twin = UnifiedEnsemble(self.body.split(), self.cover, self.num_classes, mode=self.mode,
                               second_softmax=self.second_softmax)
        twin.to(device=self.head_weight.device, dtype=self.head_weight.dtype)
        with torch.no_grad():
            twin.head_weight.copy_(self.head_weight)
            twin.head_bias.copy_(self.head_bias)
        return twin.train(self.training)


# --- 4. Losses -------------------------------------------------------------------------------------
# v1's loss is plain cross-entropy on the assembled logits (UnifiedEnsemble.training_loss).

def specialist_loss(head_logits: torch.Tensor, pad_mask: torch.Tensor, local_targets: torch.Tensor,
                    labels: torch.Tensor) -> torch.Tensor:
    """v2's loss: the sum over specialists of each one's mean CE, head k's target being the local
    index of y in S_k, or its 'other' unit when y is not in S_k.

    head_logits [N, K, W] (padding included), pad_mask [K, W] (True past |S_k| + 1),
    local_targets [K, C] (head k's output index for class c), labels [N]."""
    n = head_logits.shape[0]
    u = _upcast(head_logits).masked_fill(pad_mask, float("-inf"))
    targets = local_targets[:, labels].t()  # [N, K]
    return F.cross_entropy(u.reshape(-1, u.shape[-1]), targets.reshape(-1), reduction="sum") / n


# The student's loss, by name (the experiment's `kd.variant` option):
#
# 'hinton' (the default): alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y), on
#     the teacher's output t (logits, or log-probabilities for uste_v2 / the generalist ensemble,
#     which give the same softmax), computed by ued_fast.kd_loss.
# 'authors': the loss of the authors' code, kept as an ablation. It feeds the teacher's
#     PROBABILITIES p = softmax(t) through a second tempered softmax, q = softmax(p / T), and trains
#     the student with the soft cross-entropy -sum_c q_c log softmax(s/T)_c (batch mean) plus
#     lambda * CE(s, y); no T^2 factor. With p in [0, 1], q is close to uniform for T >= 1 (its
#     entropy is near log C), so the soft term carries little of the teacher's ranking.
#     The experiment passes kd.alpha as lambda for this variant.
VARIANTS = ("hinton", "authors")


def _check_distill_inputs(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float) -> None:
    if student.dim() != 2 or teacher.shape != student.shape:
        raise ValueError(f"student and teacher must both be [N, C], got {tuple(student.shape)} and {tuple(teacher.shape)}")
    if labels.shape != student.shape[:1]:
        raise ValueError(f"labels must be [N] = [{student.shape[0]}], got {tuple(labels.shape)}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")


def authors_kd_loss(student_logits: torch.Tensor, teacher_out: torch.Tensor, labels: torch.Tensor, *,
                    temperature: float, lam: float) -> torch.Tensor:
    """The authors' distillation loss (see the comment above VARIANTS); teacher_out: the teacher's logits
    or log-probabilities (softmax makes them its probabilities). Computed in fp32 at least."""
    _check_distill_inputs(student_logits, teacher_out, labels, temperature)
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or lam < 0:
        raise ValueError(f"lam must be a number >= 0, got {lam!r}")
    s = student_logits if student_logits.dtype == torch.float64 else student_logits.float()
    with torch.no_grad():
        p = torch.softmax(teacher_out.to(s.dtype), dim=1)
        q = torch.softmax(p / temperature, dim=1)
    soft = -(q * F.log_softmax(s / temperature, dim=1)).sum(dim=1).mean()
    return soft + lam * F.cross_entropy(s, labels)


def distill_loss(variant: str, student_logits: torch.Tensor, teacher_out: torch.Tensor, labels: torch.Tensor, *,
                 temperature: float, alpha: float, backend: str | None = None) -> torch.Tensor:
    """The student's loss for one batch under the named variant (alpha is lambda for 'authors')."""
    if variant == "hinton":
        import ued_fast

        s = student_logits if student_logits.dtype == torch.float64 else student_logits.float()
        return ued_fast.kd_loss(s, teacher_out.to(s.dtype), labels, temperature=temperature, alpha=alpha,
                                teacher_kind="logits", backend=backend)
    if variant == "authors":
        return authors_kd_loss(student_logits, teacher_out, labels, temperature=temperature, lam=alpha)
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


# --- 5. Builders (registered in ued_fast.models.MODELS) --------------------------------------------

# Branch of the unified ensembles: 3 stages of (w, 2w, 4w) channels, `depth` convs each. With the
# defaults (w=24, depth=2, K=5) the ensemble has ~0.81M parameters at 32x32x3, near the authors' 925k.
BRANCH_WIDTH, BRANCH_DEPTH, BRANCH_STAGES = 24, 2, 3


def branch_body(in_channels, image_size, k, width, depth, stages, executor="auto") -> ConvBody:
    width, depth, stages = (_positive_int(n, v) for n, v in (("width", width), ("depth", depth), ("stages", stages)))
    widths = [width * 2**i for i in range(stages)]
    return ConvBody(in_channels, image_size, widths, [depth] * stages, groups=k, executor=executor)


def _unified(mode, num_classes, in_channels, image_size, cover, width, depth, stages, executor, **kwargs):
    cover = make_cover(cover, num_classes)
    body = branch_body(in_channels, image_size, len(cover), width, depth, stages, executor)
    return UnifiedEnsemble(body, cover, num_classes, mode=mode, **kwargs)


def uste_v1(num_classes, in_channels, image_size, *, cover="contiguous", width=BRANCH_WIDTH, depth=BRANCH_DEPTH,
            stages=BRANCH_STAGES, second_softmax=False, executor="auto") -> UnifiedEnsemble:
    """USTE v1: the logit mean of the specialists' heads, one CE."""
    if second_softmax:
        raise ValueError("second_softmax is a uste_v2 option")
    return _unified("logit_mean", num_classes, in_channels, image_size, cover, width, depth, stages, executor)


def default_v2_cover(num_classes: int):
    # The authors' v2 cover where it is defined (C a multiple of 10), the generic 2-fold one elsewhere.
    return "authors_v2" if num_classes % 10 == 0 else "rfold"


def uste_v2(num_classes, in_channels, image_size, *, cover=None, width=BRANCH_WIDTH, depth=BRANCH_DEPTH,
            stages=BRANCH_STAGES, second_softmax=False, executor="auto") -> UnifiedEnsemble:
    """USTE v2: specialists with an 'other' unit, the renormalized mean of their probabilities."""
    cover = default_v2_cover(num_classes) if cover is None else cover
    return _unified("prob_mean", num_classes, in_channels, image_size, cover, width, depth, stages, executor,
                    second_softmax=second_softmax)
