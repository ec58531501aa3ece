"""Class covers (DESIGN 1.1): K subsets of the C classes whose union is all classes; they may overlap."""
from __future__ import annotations

from typing import Sequence

import torch

Cover = tuple[tuple[int, ...], ...]


def validate_cover(cover, num_classes: int | None = None, *, name: str = "cover") -> Cover:
    """Check a cover and return it as a tuple of tuples of ints.

    Errors (ValueError/TypeError naming `name`): K < 1, an empty subset, a non-integer or
    out-of-range class, a class repeated inside one subset, a class in no subset.
    num_classes None means C = 1 + the largest class named.
    """
    if isinstance(cover, (str, bytes)) or not isinstance(cover, Sequence):
        raise TypeError(f"{name} must be a list of K lists of class indices, got {type(cover).__name__}")
    if len(cover) < 1:
        raise ValueError(f"{name} must hold at least one subset (K >= 1)")
    subsets = []
    for k, subset in enumerate(cover):
        if isinstance(subset, (str, bytes)) or not isinstance(subset, Sequence):
            raise TypeError(f"{name}[{k}] must be a list of class indices, got {type(subset).__name__}")
        if len(subset) == 0:
            raise ValueError(f"{name}[{k}] is empty: every teacher needs at least one class")
        for c in subset:
            if isinstance(c, bool) or not isinstance(c, int):
                raise TypeError(f"{name}[{k}] holds {c!r}, not an int class index")
            if c < 0 or (num_classes is not None and c >= num_classes):
                bound = f"[0, {num_classes})" if num_classes is not None else ">= 0"
                raise ValueError(f"{name}[{k}] holds class {c}, outside {bound}")
        if len(set(subset)) != len(subset):
            raise ValueError(f"{name}[{k}] names a class twice: {list(subset)}")
        subsets.append(tuple(int(c) for c in subset))
    c_total = num_classes if num_classes is not None else 1 + max(max(s) for s in subsets)
    missing = sorted(set(range(c_total)) - {c for s in subsets for c in s})
    if missing:
        raise ValueError(f"{name} leaves classes {missing} in no subset (C = {c_total})")
    return tuple(subsets)


def cover_num_classes(cover: Cover) -> int:
    return 1 + max(max(s) for s in cover)


def cover_counts(cover: Cover, num_classes: int | None = None) -> list[int]:
    """cover_count(c): how many subsets hold class c."""
    counts = [0] * (num_classes if num_classes is not None else cover_num_classes(cover))
    for s in cover:
        for c in s:
            counts[c] += 1
    return counts


def cover_index(cover: Cover, width: int | None = None, device=None) -> torch.Tensor:
    """[K, width] int64: entry (k, j) is the class of head k's output j, -1 past |S_k| (padding)."""
    width = width if width is not None else max(len(s) for s in cover)
    index = torch.full((len(cover), width), -1, dtype=torch.int64)
    for k, s in enumerate(cover):
        index[k, : len(s)] = torch.tensor(s, dtype=torch.int64)
    return index.to(device) if device is not None else index
