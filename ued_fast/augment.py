"""Batches made on the device: the dataset stays there as uint8, each batch is cropped, flipped and
normalized in a few vectorized ops (no Python loop over images), all randomness from one
torch.Generator so that a run is reproducible and resumable.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

PADDING_MODES = ("reflect", "zeros")


@dataclass(frozen=True)
class AugmentConfig:
    crop_padding: int = 0  # random crop of the image padded by this many pixels per side; 0: off
    padding_mode: str = "reflect"
    flip: bool = False  # random horizontal flip: right for natural images, wrong for digits

    def __post_init__(self):
        if isinstance(self.crop_padding, bool) or not isinstance(self.crop_padding, int) or self.crop_padding < 0:
            raise ValueError(f"augment.crop_padding must be an int >= 0, got {self.crop_padding!r}")
        if self.padding_mode not in PADDING_MODES:
            raise ValueError(f"augment.padding_mode must be one of {PADDING_MODES}, got {self.padding_mode!r}")
        if not isinstance(self.flip, bool):
            raise ValueError(f"augment.flip must be true or false, got {self.flip!r}")


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return gen


def normalize(images_u8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """uint8 [N, C, H, W] -> float (dtype), (x/255 - mean) / std per channel; mean/std are [C] in [0, 1]."""
    x = images_u8.to(dtype) / 255.0  # a new tensor: a float input is never changed in place
    return x.sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))


def random_crop(x: torch.Tensor, padding: int, mode: str, gen: torch.Generator) -> torch.Tensor:
    """Each image cropped back to H x W at its own random offset of the image padded by `padding`."""
    if padding == 0:
        return x
    n, c, h, w = x.shape
    # Reflect needs padding < the side; fall back to zeros for tiny images rather than fail.
    pad_mode = "reflect" if mode == "reflect" and padding < min(h, w) else "constant"
    padded = F.pad(x, (padding,) * 4, mode=pad_mode)
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=gen, device=x.device)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=gen, device=x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # [N, 1, H, 1]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # [N, 1, 1, W]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]


def random_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    flip = torch.rand(x.shape[0], generator=gen, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


class Augmenter:
    """Turns uint8 image batches into normalized float batches, augmented when training."""

    def __init__(self, mean, std, config: AugmentConfig, device):
        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=device)
        self.std = torch.as_tensor(std, dtype=torch.float32, device=device)
        self.config = config

    def train_batch(self, images_u8: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        # Normalize first, so zero padding is the dataset's mean colour rather than black.
        x = normalize(images_u8, self.mean, self.std)
        x = random_crop(x, self.config.crop_padding, self.config.padding_mode, gen)
        if self.config.flip:
            x = random_flip(x, gen)
        return x

    def eval_batch(self, images_u8: torch.Tensor) -> torch.Tensor:
        return normalize(images_u8, self.mean, self.std)


def epoch_permutation(n: int, gen: torch.Generator, device, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """A shuffled order of the n training images, drawn on the device. Under DDP every rank draws the
    same permutation (same seed) and keeps its own strided shard."""
    perm = torch.randperm(n, generator=gen, device=device)
    return perm[rank::world_size] if world_size > 1 else perm


def batch_slices(n: int, batch_size: int) -> list[slice]:
    """Full batches only (a tiny last batch is noise for BatchNorm), but at least one batch."""
    if n <= batch_size:
        return [slice(0, n)]
    return [slice(i * batch_size, (i + 1) * batch_size) for i in range(n // batch_size)]
