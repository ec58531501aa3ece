"""Frozen teachers, computed once: a fixed set of augmented views per image, teacher outputs cached.

Design. A teacher is frozen (eval mode) while a student learns from it, so its output depends only on
the image it sees. Each training image i gets V fixed augmented views (random crop offset and flip
drawn once from `view_seed`); the teacher's outputs on all N*V views are computed once, [N, V, C]
float32, and kept on disk in the teacher's run folder, keyed by (teacher weights, training images,
V, view seed, augmentation). Each student step draws, per image of its batch, one of the V views
from the run's generator, and reads the teacher's output for that view from the cache: the teacher
never runs during distillation. Every student row of a seed (the scratch row included) samples the
same views in the same order, so rows differ only in the teacher. With V views the student sees V
augmentations of each image rather than a fresh one every epoch: V is a stated setting of the
experiment (kd.views).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from .augment import AugmentConfig, normalize
from .checkpoint import atomic_write

CACHE_NAME = "view_outputs.pt"


class ViewSet:
    """V fixed augmented views of each of N images: crop offsets [N, V, 2] and flips [N, V]."""

    def __init__(self, num_images: int, num_views: int, augment: AugmentConfig, view_seed: int, device):
        if isinstance(num_views, bool) or not isinstance(num_views, int) or num_views < 1:
            raise ValueError(f"num_views must be an int >= 1, got {num_views!r}")
        self.num_views, self.augment, self.view_seed = num_views, augment, int(view_seed)
        gen = torch.Generator().manual_seed(self.view_seed)
        pad = augment.crop_padding
        self.offsets = torch.randint(0, 2 * pad + 1, (num_images, num_views, 2), generator=gen).to(device)
        flips = torch.rand(num_images, num_views, generator=gen) < 0.5
        self.flips = (flips if augment.flip else torch.zeros_like(flips)).to(device)

    def render(self, images_u8: torch.Tensor, idx: torch.Tensor, view: torch.Tensor, mean: torch.Tensor,
               std: torch.Tensor) -> torch.Tensor:
        """Normalized float views: image idx[j] (a row of images_u8[idx]) in its view view[j]."""
        x = normalize(images_u8, mean, std)
        pad = self.augment.crop_padding
        if pad > 0:
            n, c, h, w = x.shape
            mode = "reflect" if self.augment.padding_mode == "reflect" and pad < min(h, w) else "constant"
            padded = F.pad(x, (pad,) * 4, mode=mode)
            off = self.offsets[idx, view]  # [n, 2]
            rows = (off[:, 0, None] + torch.arange(h, device=x.device))[:, None, :, None]
            cols = (off[:, 1, None] + torch.arange(w, device=x.device))[:, None, None, :]
            batch = torch.arange(n, device=x.device)[:, None, None, None]
            chan = torch.arange(c, device=x.device)[None, :, None, None]
            x = padded[batch, chan, rows, cols]
        flip = self.flips[idx, view]
        return torch.where(flip[:, None, None, None], x.flip(-1), x)


def _fingerprint(*parts) -> str:
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        if isinstance(p, torch.Tensor):
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()


def cache_key(teacher: torch.nn.Module, train_x: torch.Tensor, views: ViewSet) -> str:
    """Teacher weights (and buffers) + training images + views: any change gives a new key."""
    state = [t for _, t in sorted(teacher.state_dict().items())]
    aug = {"crop_padding": views.augment.crop_padding, "padding_mode": views.augment.padding_mode,
           "flip": views.augment.flip}
    return _fingerprint(*state, train_x, views.num_views, views.view_seed, aug)


@torch.no_grad()
def teacher_view_outputs(teacher: torch.nn.Module, train_x: torch.Tensor, views: ViewSet, mean, std, *,
                         batch_size: int = 1024, prepare=None) -> torch.Tensor:
    """[N, V, C] float32 outputs of the frozen teacher (eval mode) on every view of every image.
    prepare: optional images -> images (e.g. the memory format of the training loop)."""
    was_training = teacher.training
    teacher.eval()
    device = train_x.device
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=device)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=device)
    n = train_x.shape[0]
    outs = []
    for v in range(views.num_views):
        per_view = []
        for i in range(0, n, batch_size):
            idx = torch.arange(i, min(n, i + batch_size), device=device)
            x = views.render(train_x[idx], idx, torch.full_like(idx, v), mean_t, std_t)
            per_view.append(teacher(prepare(x) if prepare else x).float())
        outs.append(torch.cat(per_view))
    teacher.train(was_training)
    return torch.stack(outs, dim=1)


def cached_teacher_outputs(teacher, train_x, views: ViewSet, mean, std, cache_dir: Path | None, **kwargs):
    """teacher_view_outputs, read from cache_dir/view_outputs.pt when its key matches, else computed
    and written there (atomically). Returns (outputs [N, V, C], hit: bool)."""
    key = cache_key(teacher, train_x, views)
    path = Path(cache_dir) / CACHE_NAME if cache_dir is not None else None
    if path is not None and path.exists():
        try:
            saved = torch.load(path, map_location=train_x.device, weights_only=True)
            if saved.get("key") == key:
                return saved["outputs"], True
        except Exception:  # unreadable: recompute and overwrite
            pass
    outputs = teacher_view_outputs(teacher, train_x, views, mean, std, **kwargs)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: torch.save({"key": key, "outputs": outputs.cpu()}, f))
    return outputs, False


class ViewBatches:
    """The student's batch source over a ViewSet: fit(batch_fn=...) calls it with the batch's image
    indices and the run's generator; it draws one view per image and renders the batch. With teacher
    outputs [N, V, C], `targets` then holds the teacher's outputs for exactly those views."""

    def __init__(self, train_x: torch.Tensor, views: ViewSet, mean, std, teacher_outputs: torch.Tensor | None = None):
        self.train_x, self.views = train_x, views
        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=train_x.device)
        self.std = torch.as_tensor(std, dtype=torch.float32, device=train_x.device)
        if teacher_outputs is not None and tuple(teacher_outputs.shape[:2]) != (train_x.shape[0], views.num_views):
            raise ValueError(f"teacher_outputs must be [N={train_x.shape[0]}, V={views.num_views}, C], "
                             f"got {tuple(teacher_outputs.shape)}")
        self.teacher_outputs = teacher_outputs
        self.targets: torch.Tensor | None = None

    def __call__(self, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        view = torch.randint(0, self.views.num_views, (idx.shape[0],), generator=gen, device=idx.device)
        if self.teacher_outputs is not None:
            self.targets = self.teacher_outputs[idx, view]
        return self.views.render(self.train_x[idx], idx, view, self.mean, self.std)
