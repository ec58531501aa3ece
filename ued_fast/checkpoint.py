"""Atomic checkpoints: a crash or a kill at any moment leaves either the old file or the new one.

Write to a temporary file in the same folder, flush and fsync it, os.replace it over the target
(atomic on POSIX), then fsync the folder so the rename itself survives a power cut.

Every run folder also records its settings in config.json (`prepare_run_dir`): `resume` continues a
run only when the settings are the same, and a fresh run never replaces an earlier one's files
unless asked to (`overwrite`).
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


def _new_file_mode() -> int:
    """The mode open() gives a new file: 0o666 less the umask (mkstemp's files are 0o600)."""
    try:  # Linux: read the umask without changing it (os.umask's read-and-restore races with threads)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Call write(file) on a temporary file next to `path`, then move it over `path` atomically.
    The file gets the permissions a plain open() would give it (readable by others under umask 022)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, _new_file_mode())
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


# --- Run folders: recorded settings, resume and overwrite ------------------------------------------

RUN_CONFIG_NAME = "config.json"
_ABSENT = "<absent>"


def _plain(obj):
    """The JSON form of obj (tuples become lists, paths strings): what config.json holds."""
    return json.loads(json.dumps(obj, default=str))


def _flatten(obj, prefix: str = "") -> dict:
    if isinstance(obj, dict) and obj:
        out = {}
        for key, value in obj.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(obj, list) and obj and any(isinstance(v, (dict, list)) for v in obj):
        out = {f"{prefix}.len": len(obj)}
        for i, value in enumerate(obj):
            out.update(_flatten(value, f"{prefix}[{i}]"))
        return out
    return {prefix: obj}


def config_differences(old: dict, new: dict) -> list[str]:
    """['kd.alpha: 0.9 -> 0.1', ...]: every dotted key whose value differs, sorted."""
    a, b = _flatten(_plain(old)), _flatten(_plain(new))
    return [f"{key}: {json.dumps(a.get(key, _ABSENT))} -> {json.dumps(b.get(key, _ABSENT))}"
            for key in sorted(a.keys() | b.keys()) if a.get(key, _ABSENT) != b.get(key, _ABSENT)]


def _more_epochs(old: dict, new: dict) -> bool:
    """Does `new` ask for more epochs than `old` under any key named epochs (train.epochs, ...)?"""
    a, b = _flatten(_plain(old)), _flatten(_plain(new))
    return any(key.split(".")[-1] == "epochs" and isinstance(a.get(key), int) and isinstance(b.get(key), int)
               and b[key] > a[key] for key in b)


def read_run_config(run_dir) -> dict | None:
    """The settings a run folder recorded (the 'config' of its config.json), or None."""
    path = Path(run_dir) / RUN_CONFIG_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{str(path)!r} is not a run config this package wrote ({type(e).__name__})") from None


def prepare_run_dir(run_dir, config: dict, *, resume: bool, overwrite: bool, outputs, provenance: dict | None = None,
                    write: bool = True, recorded: dict | None = None) -> bool:
    """Check a run folder against the settings of the run about to use it, then record them.

    resume: the folder's recorded settings must equal `config` (else ValueError naming every
    differing key, old -> new); a folder with none of `outputs` starts fresh. Not resume: a folder
    holding any of `outputs` is refused unless overwrite, which deletes them (a config.json alone,
    of a run that ended before writing anything, is replaced).
    `recorded`: settings to compare against when the folder has no config.json (older runs kept them
    elsewhere). write=False only checks (the processes of a distributed run other than rank 0).
    Returns True when an earlier run of the same settings is continued."""
    run_dir = Path(run_dir)

    def record():
        save_json(run_dir / RUN_CONFIG_NAME, {"config": _plain(config), "provenance": _plain(provenance or {})})

    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other: continue the run, or start it again")
    present = [name for name in outputs if (run_dir / name).exists()]
    saved = read_run_config(run_dir)
    has_config_file = saved is not None
    if resume:
        if saved is None:
            saved = recorded
        if saved is None and present:
            raise ValueError(f"--resume: {str(run_dir)!r} holds {', '.join(present)} but no {RUN_CONFIG_NAME}, so "
                             "its settings cannot be checked; use --overwrite to start that run again")
        if saved is not None:
            diffs = config_differences(saved, config)
            if diffs:
                hint = ""
                if _more_epochs(saved, config):
                    hint = (" (a run cannot be extended by more epochs: its learning rate already decays to 0 at "
                            "its last epoch)")
                raise ValueError(f"--resume: {str(run_dir)!r} was run with other settings: {'; '.join(diffs)}{hint}; "
                                 "use another --out, or --overwrite to start again")
            if write and not has_config_file:
                record()
            return True
    else:
        if present and not overwrite:
            raise ValueError(f"{str(run_dir)!r} already holds {', '.join(present)} of an earlier run: --resume "
                             "continues it, --overwrite replaces it")
        if write:
            for name in present:
                if (run_dir / name).is_file():
                    (run_dir / name).unlink()
    if write:
        record()
    return False
