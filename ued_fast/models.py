"""Models (DESIGN 1.2, 1.3, 1.5): the unified ensembles, the generalist ensemble, single teachers, students.

Every model maps normalized images [N, C_in, H, W] to [N, num_classes] logits of its distribution
(log-probabilities for uste_v2 and generalist_ensemble) and has training_loss(images, labels) ->
(loss, logits). Build them by name with build_model; MODELS lists the names.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .covers import Cover, cover_num_classes, make_cover, validate_cover
from .ops.grouped_heads import grouped_heads


EXECUTORS = ("auto", "grouped", "loop")


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (trainable ones only when asked)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """Loss math in fp32 for half inputs; fp64 stays fp64."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _image_side(image_size) -> int:
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        side = image_size
    elif isinstance(image_size, Sequence) and len(image_size) == 2 and all(isinstance(s, int) for s in image_size):
        side = min(image_size)
    else:
        raise TypeError(f"image_size must be an int or (H, W), got {image_size!r}")
    if side < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size!r}")
    return side


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


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
        n = feats.shape[0]
        u = _upcast(self.head_logits(feats)).masked_fill(self.pad_mask, float("-inf"))
        targets = self.local_targets[:, labels].t()  # [N, K]
        # Sum over specialists of each one's mean CE.
        loss = F.cross_entropy(u.reshape(-1, u.shape[-1]), targets.reshape(-1), reduction="sum") / n
        return loss, logits

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

# Branch of the unified ensembles: 3 stages of (w, 2w, 4w) channels, `depth` convs each. With the
# defaults (w=24, depth=2, K=5) the ensemble has ~0.81M parameters at 32x32x3, near the authors' 925k.
BRANCH_WIDTH, BRANCH_DEPTH, BRANCH_STAGES = 24, 2, 3
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


def _branch_body(in_channels, image_size, k, width, depth, stages, executor="auto") -> ConvBody:
    width, depth, stages = (_positive_int(n, v) for n, v in (("width", width), ("depth", depth), ("stages", stages)))
    widths = [width * 2**i for i in range(stages)]
    return ConvBody(in_channels, image_size, widths, [depth] * stages, groups=k, executor=executor)


def _uste(mode, default_cover):
    def build(num_classes, in_channels, image_size, *, cover=default_cover, width=BRANCH_WIDTH,
              depth=BRANCH_DEPTH, stages=BRANCH_STAGES, second_softmax=False, executor="auto"):
        cover = make_cover(cover, num_classes)
        body = _branch_body(in_channels, image_size, len(cover), width, depth, stages, executor)
        kwargs = {"second_softmax": second_softmax} if mode == "prob_mean" else {}
        if mode != "prob_mean" and second_softmax:
            raise ValueError("second_softmax is a uste_v2 option")
        return UnifiedEnsemble(body, cover, num_classes, mode=mode, **kwargs)

    return build


def _k_of(k, cover, num_classes) -> int:
    # K follows the USTE cover when one is named, so configs can pass the same kwargs to every ensemble.
    if k is None:
        k = len(make_cover(cover if cover is not None else "contiguous", num_classes))
    return _positive_int("k", k)


def _generalist(num_classes, in_channels, image_size, *, k=None, cover=None, width=BRANCH_WIDTH,
                depth=BRANCH_DEPTH, stages=BRANCH_STAGES, executor="auto"):
    body = _branch_body(in_channels, image_size, _k_of(k, cover, num_classes), width, depth, stages, executor)
    return GeneralistEnsemble(body, num_classes)


def _joint_generalist(num_classes, in_channels, image_size, *, k=None, cover=None, width=BRANCH_WIDTH,
                      depth=BRANCH_DEPTH, stages=BRANCH_STAGES, executor="auto"):
    """USTE v1's structure and training (one CE on the logit mean of the heads) with every branch
    over all classes: it separates the effect of specialization from that of the joint training."""
    k = _k_of(k, cover, num_classes)
    body = _branch_body(in_channels, image_size, k, width, depth, stages, executor)
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


def _default_v2_cover(num_classes: int):
    # The authors' v2 cover where it is defined (C a multiple of 10), the generic 2-fold one elsewhere.
    return "authors_v2" if num_classes % 10 == 0 else "rfold"


def _uste_v2(num_classes, in_channels, image_size, *, cover=None, **kwargs):
    cover = _default_v2_cover(num_classes) if cover is None else cover
    return _uste("prob_mean", None)(num_classes, in_channels, image_size, cover=cover, **kwargs)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "uste_v1": _uste("logit_mean", "contiguous"),
    "uste_v2": _uste_v2,
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
    try:
        return MODELS[name](num_classes, in_channels, image_size, **kwargs)
    except TypeError as e:
        if "unexpected keyword" in str(e):
            raise TypeError(f"build_model({name!r}): {e}") from None
        raise
