"""Atomic checkpoints: a crash or a kill at any moment leaves either the old file or the new one.

Write to a temporary file in the same folder, flush and fsync it, os.replace it over the target
(atomic on POSIX), then fsync the folder so the rename itself survives a power cut.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems (and Windows) do not open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Call write(file) on a temporary file next to `path`, then move it over `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def save_checkpoint(path, state: dict) -> None:
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path, map_location="cpu") -> dict:
    # weights_only=False: the checkpoint holds RNG states and the log as plain Python objects;
    # we only load files this package wrote.
    return torch.load(path, map_location=map_location, weights_only=False)


def save_json(path, obj) -> None:
    text = json.dumps(obj, indent=2, sort_keys=False, default=str)
    atomic_write(path, lambda f: f.write(text + "\n"), mode="w")


def rng_state(generator: torch.Generator | None) -> dict:
    """Every random stream a run draws from (torch CPU, CUDA, the data generator)."""
    state = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def set_rng_state(state: dict, generator: torch.Generator | None) -> None:
    torch.set_rng_state(state["torch_cpu"])
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["torch_cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])
