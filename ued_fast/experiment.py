"""The experiment of DESIGN 1.5, described by a YAML file.

For each seed, with one student architecture, optimizer, epochs, T and alpha for every row:
  scratch      the student trained alone (cross-entropy)
  kd_strong    KD from the strongest single teacher (the last, largest, teacher of the sweep)
  kd_generalist  KD from the generalist ensemble (the USTE branches, each over all classes)
  kd_uste_v1   KD from the unified ensemble of specialists (v1)
  kd_uste_v2   KD from the specialists with an 'other' unit (v2)
  kd_<teacher> the teacher-strength sweep: KD from single teachers of growing size
Teachers are trained once per seed and reused. Every model of a seed starts from torch.manual_seed
of that seed and sees the same batch order, so rows differ only in the teacher.

Outputs (out dir): results.json, results.md, accuracy.png, learning_curves.png,
entropy_vs_student.png, and runs/seed<s>/<kind>/<name>/ (checkpoint.pt, log.jsonl, result.json).
"""
from __future__ import annotations

import copy
import functools
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
import yaml

from .augment import AugmentConfig
from . import rows as claim_rows
from .checkpoint import atomic_write, prepare_run_dir, read_run_config, save_json
from .data import dataset_root
from .models import set_ops_backend
from .train import (RunOptions, TrainConfig, load_splits, run_once, run_provenance, soft_target_entropy, start_process,
                    train_teacher)

CONFIG_DIR = Path(__file__).parent / "configs"

_TRAIN_KEYS = {f.name for f in fields(TrainConfig)}
DEFAULTS: dict = {
    "name": "experiment",
    "dataset": "digits",
    "data_dir": None,  # parent folder holding dataset subfolders (None: the data module's default)
    "train_subset": None,  # keep only this many training images (seeded), for small budgets
    "val_fraction": 0.1,
    "seeds": [0, 1, 2],
    "device": "auto",
    "deterministic": False,
    "num_threads": None,  # torch intra-op threads (None: torch's default); tiny models run best on 1
    "quiet": False,
    "student": {"name": "student"},
    # Single teachers of growing size; the last one is the strong teacher of row kd_strong.
    "sweep": [{"name": "teacher_s"}, {"name": "teacher_m"}, {"name": "teacher_l"}, {"name": "teacher_xl"}],
    "generalist": {"name": "generalist_ensemble"},
    "uste_v1": {"name": "uste_v1"},
    "uste_v2": {"name": "uste_v2"},
    # Built with uste_v1's width/depth/stages unless the spec names its own.
    "matched": {"name": "matched_single"},  # one CNN with USTE v1's parameters and FLOPs (within 10%)
    "joint_generalist": {"name": "joint_generalist"},  # v1's joint logit-mean training, no specialization
    "rows": ["scratch", "sweep", "kd_generalist", "kd_uste_v1", "kd_uste_v2"],  # + kd_matched, kd_joint_generalist
    "cover": "contiguous",  # USTE v1's cover; the generalist gets the same K
    "cover_v2": "authors_v2",
    "augment": {"crop_padding": 2, "padding_mode": "reflect", "flip": False},
    "train": {f.name: f.default for f in fields(TrainConfig)},  # every student row
    "teacher_train": {},  # overrides of `train` for the teachers
    # variant: 'hinton' | 'authors' (ued_fast.distill_losses); views: V fixed augmented views per image
    # with the teacher outputs cached (ued_fast.teacher_cache; null: fresh augmentation, teacher run
    # live); select: {temperature: [...], alpha: [...]} chosen per row on validation (ued_fast.rows);
    # authors: the authors' loss as an ablation, {rows: [...], temperature: [...], lambda: [...]}.
    "kd": {"temperature": 4.0, "alpha": 0.9, "backend": None, "variant": "hinton", "views": None, "view_seed": 0,
           "select": None, "authors": None},
    "ops": {"backend": None},  # 'reference' forces the reference backend of every fused op
}
_MODEL_SECTIONS = ("student", "generalist", "uste_v1", "uste_v2", "matched", "joint_generalist")
_ROW_NAMES = ("scratch", "sweep", "kd_matched", "kd_generalist", "kd_joint_generalist", "kd_uste_v1", "kd_uste_v2")
ROW_TITLES = {
    "scratch": "Student from scratch (CE)",
    "kd_strong": "KD from the strong single teacher",
    "kd_generalist": "KD from the generalist ensemble",
    "kd_uste_v1": "KD from USTE v1",
    "kd_uste_v2": "KD from USTE v2",
}
# Every main row in table order, the rows a config must opt into (`rows`) included.
ALL_ROW_TITLES = {"scratch": ROW_TITLES["scratch"], "kd_strong": ROW_TITLES["kd_strong"],
                  "kd_matched": "KD from one teacher matched to USTE v1 (params, FLOPs)",
                  "kd_generalist": ROW_TITLES["kd_generalist"],
                  "kd_joint_generalist": "KD from the joint generalist (v1 training, all classes)",
                  "kd_uste_v1": ROW_TITLES["kd_uste_v1"], "kd_uste_v2": ROW_TITLES["kd_uste_v2"]}


class ConfigError(ValueError):
    """A bad experiment description: the message names the key or the file."""


# --- Config ---------------------------------------------------------------------------------------

def _merge(base: dict, override: dict, where: str) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        path = f"{where}{key}"
        if key not in base:
            raise ConfigError(f"unknown config key {path!r}; known: {sorted(base)}")
        if key in _MODEL_SECTIONS:
            out[key] = _model_spec(value, path)
        elif key == "sweep":
            if not isinstance(value, list) or not value:
                raise ConfigError(f"{path!r} must be a non-empty list of model specs")
            out[key] = [_model_spec(v, f"{path}[{i}]") for i, v in enumerate(value)]
        elif isinstance(base[key], dict) and key != "teacher_train" and base[key] is not None:
            if not isinstance(value, dict):
                raise ConfigError(f"{path!r} must be a mapping, got {value!r}")
            out[key] = _merge(base[key], value, f"{path}.")
        elif key == "teacher_train":
            if not isinstance(value, dict) or set(value) - _TRAIN_KEYS:
                raise ConfigError(f"{path!r} must be a mapping of train keys {sorted(_TRAIN_KEYS)}, got {value!r}")
            out[key] = dict(value)
        else:
            out[key] = value
    return out


def _model_spec(value, where: str) -> dict:
    """A model: a registry name, or {name: ..., label: ..., **build_model kwargs}."""
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise ConfigError(f"{where!r} must be a model name or a mapping with a 'name', got {value!r}")
    return dict(value)


def parse_set(items: list[str] | None) -> dict:
    """['train.epochs=3', 'seeds=[0,1]'] -> nested dict; values are parsed as YAML."""
    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value (e.g. train.epochs=3)")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"--set {item!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: value is not valid YAML ({str(e).splitlines()[0]})") from None
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {p!r} was already set to a value")
        node[parts[-1]] = value
    return out


def _deep_update(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_update(out[k], v)
        else:
            out[k] = v
    return out


def resolve_config_path(config) -> Path:
    """A file path, or the name of a packaged config ('demo', 'cifar10', ...)."""
    path = Path(config)
    if path.exists():
        return path
    packaged = CONFIG_DIR / f"{config}.yaml"
    if not path.suffix and packaged.exists():
        return packaged
    raise ConfigError(f"config file {str(config)!r} not found (packaged configs: {packaged_configs()})")


def packaged_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_config(config=None, overrides: dict | None = None) -> dict:
    """DEFAULTS <- the YAML file <- overrides (a nested dict, e.g. from parse_set), then checked."""
    raw: dict = {}
    if config is not None:
        path = resolve_config_path(config)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {str(e).splitlines()[0]}") from None
        except OSError as e:
            raise ConfigError(f"config file {str(path)!r} cannot be read: {e.strerror}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys, got {type(raw).__name__}")
    if overrides:
        raw = _deep_update(raw, overrides)
    cfg = _merge(DEFAULTS, raw, "")
    check_config(cfg)
    return cfg


def check_config(cfg: dict) -> None:
    from . import models

    seeds = cfg["seeds"]
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        cfg["seeds"] = seeds = [seeds]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"'seeds' must be a non-empty list of ints, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"'seeds' repeats a seed: {seeds!r}")
    for spec in [cfg[s] for s in _MODEL_SECTIONS] + cfg["sweep"]:
        if spec["name"] not in models.MODELS:
            raise ConfigError(f"unknown model {spec['name']!r}; known models: {sorted(models.MODELS)}")
    labels = [_label(s) for s in cfg["sweep"]]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"'sweep' teachers need distinct labels, got {labels} (add label: ... to each)")
    try:
        TrainConfig(**cfg["train"])
        TrainConfig(**{**cfg["train"], **cfg["teacher_train"]})
        AugmentConfig(**cfg["augment"])
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bad training/augment setting: {e}") from None
    kd = cfg["kd"]
    if not isinstance(kd["temperature"], (int, float)) or isinstance(kd["temperature"], bool) or not kd["temperature"] > 0:
        raise ConfigError(f"'kd.temperature' must be > 0, got {kd['temperature']!r}")
    if not isinstance(kd["alpha"], (int, float)) or isinstance(kd["alpha"], bool) or not 0 <= kd["alpha"] <= 1:
        raise ConfigError(f"'kd.alpha' must be in [0, 1], got {kd['alpha']!r}")
    if not isinstance(cfg["val_fraction"], (int, float)) or not 0 < cfg["val_fraction"] < 1:
        raise ConfigError(f"'val_fraction' must be in (0, 1), got {cfg['val_fraction']!r}")
    nt = cfg["num_threads"]
    if nt is not None and (isinstance(nt, bool) or not isinstance(nt, int) or nt < 1):
        raise ConfigError(f"'num_threads' must be an int >= 1 or null, got {nt!r}")
    if not isinstance(cfg["dataset"], str):
        raise ConfigError(f"'dataset' must be a dataset name, got {cfg['dataset']!r}")
    _check_claim_config(cfg)


def _check_claim_config(cfg: dict) -> None:
    from . import rows
    from ._backend import BACKENDS

    try:
        rows.check_kd_config(cfg["kd"])
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not isinstance(cfg["rows"], list) or set(cfg["rows"]) - set(_ROW_NAMES) or "scratch" not in cfg["rows"]:
        raise ConfigError(f"'rows' must be a list of {list(_ROW_NAMES)} holding 'scratch', got {cfg['rows']!r}")
    if cfg["ops"]["backend"] not in (None,) + BACKENDS:
        raise ConfigError(f"'ops.backend' must be null or one of {BACKENDS}, got {cfg['ops']['backend']!r}")


def _label(spec: dict) -> str:
    return spec.get("label", spec["name"])


def _describe(spec: dict) -> str:
    """The model of a spec with its own kwargs: 'teacher_s(widths=[8, 16, 32], depths=[1, 1, 1])'."""
    kwargs = {k: v for k, v in spec.items() if k not in ("name", "label")}
    return spec["name"] + (f"({', '.join(f'{k}={v}' for k, v in kwargs.items())})" if kwargs else "")


def _build(spec: dict, splits, extra: dict | None = None):
    from .models import build_model

    kwargs = {k: v for k, v in spec.items() if k not in ("name", "label")}
    for k, v in (extra or {}).items():
        kwargs.setdefault(k, v)
    return build_model(spec["name"], splits.num_classes, splits.in_channels, splits.image_size, **kwargs)


# --- Provenance -----------------------------------------------------------------------------------

# How a run is executed, not what it computes: these may change between a run and its --resume.
# `seeds` too: each seed's runs live in their own folder (runs/seed<n>) with their own checks, so a
# resume may add seeds, or run a subset of them in another process.
RUNTIME_KEYS = ("data_dir", "device", "deterministic", "num_threads", "quiet", "seeds")


def experiment_settings(cfg: dict) -> dict:
    """The settings an experiment folder records and --resume compares (cfg less RUNTIME_KEYS and
    kd.backend: every kd backend agrees with the fp64 reference)."""
    out = {k: v for k, v in cfg.items() if k not in RUNTIME_KEYS}
    out["kd"] = {k: v for k, v in cfg["kd"].items() if k != "backend"}
    return out


@functools.lru_cache(maxsize=None)  # once per process: every run folder records it
def git_commit() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
           "cuda": torch.version.cuda}
    from . import __version__

    out["ued_fast"] = __version__
    for pkg in ("triton",):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return (f"cpu ({cpu_name()}, {os.cpu_count()} cores; torch uses {threads} thread{'s' if threads != 1 else ''})")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# --- Running --------------------------------------------------------------------------------------

def _recorded_settings(out_dir: Path) -> dict | None:
    """The settings in results.json, for folders written before config.json was."""
    try:
        return experiment_settings(json.loads((out_dir / "results.json").read_text())["config"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def refuse_failing_backends(device: torch.device, forced_backend: str | None) -> None:
    """Run the self-check (ued_fast.selftest) for the backend the ops will use on `device` and refuse
    to train on one that does not match its float64 reference: a GPU run never depends on a kernel that
    failed on that device. ConfigError names the failing ops and the way out."""
    from . import available_backends, selftest

    backend = forced_backend or available_backends(device)[0]
    if backend == "reference":
        return
    failing = {key: result for key, result in selftest.check_backends(device, backends=(backend,)).items()
               if key[1] == backend and not result}
    if failing:
        detail = "; ".join(f"{op}: {result.reason or 'mismatch'}" for (op, _), result in sorted(failing.items()))
        raise ConfigError(f"the {backend!r} kernels failed the self-check on {device} ({detail}); "
                          f"run `python -m ued_fast.selftest --device {device}` for the table, or "
                          f"--set ops.backend=reference to train on the reference ops")


def run_experiment(cfg: dict, out_dir, *, resume: bool = False, overwrite: bool = False) -> dict:
    """Run every row for every seed; write results.json, results.md and the plots into out_dir.
    resume: keep finished runs, continue interrupted ones (refused if the settings differ from the
    folder's config.json); overwrite: a fresh run may replace the results of an earlier one."""
    out_dir = Path(out_dir)
    # Under torchrun every process runs every row on its slice of each batch; rank 0 alone writes.
    process = start_process(cfg["device"], cfg["deterministic"], cfg["num_threads"])
    device = process.device
    if process.distributed and cfg["kd"].get("views") is not None:
        raise ConfigError("'kd.views' (cached teacher views) runs in a single process only: set kd.views=null "
                          "to train under torchrun")
    prepare_run_dir(out_dir, experiment_settings(cfg), resume=resume, overwrite=overwrite,
                    outputs=("results.json", "results.md", "runs"), recorded=_recorded_settings(out_dir),
                    provenance=run_provenance(device, process.world_size, bool(cfg["deterministic"])),
                    write=process.is_main)
    if process.distributed:
        from . import distributed

        distributed.barrier()  # every rank checked the folder before any run writes into it
    student_cfg = TrainConfig(**cfg["train"])
    teacher_cfg = TrainConfig(**{**cfg["train"], **cfg["teacher_train"]})
    augment = AugmentConfig(**cfg["augment"])
    T, alpha, kd_backend = float(cfg["kd"]["temperature"]), float(cfg["kd"]["alpha"]), cfg["kd"]["backend"]
    kd_backend = cfg["ops"]["backend"] or kd_backend  # ops.backend forces every fused op
    if device.type == "cuda":
        refuse_failing_backends(device, cfg["ops"]["backend"])
    root = dataset_root(cfg["dataset"], cfg["data_dir"])
    started = time.time()
    runs: list[dict] = []

    for seed in cfg["seeds"]:
        splits = load_splits(cfg["dataset"], device, root=root, val_fraction=cfg["val_fraction"], seed=seed,
                             train_subset=cfg["train_subset"])
        seed_dir = out_dir / "runs" / f"seed{seed}"
        views = claim_rows.student_views(cfg["kd"], augment, splits, seed)

        def run(kind, name, build, train_fn, extra=None, config=None):
            """Train (or, on resume, reload a finished run); returns (result dict, trained model)."""
            config = {"dataset": cfg["dataset"], "val_fraction": cfg["val_fraction"],
                      "train_subset": cfg["train_subset"], "kind": kind, "name": name, **(config or {})}
            opts = RunOptions(device=device, seed=seed, deterministic=cfg["deterministic"], quiet=cfg["quiet"],
                              run_dir=seed_dir / kind / name, resume=resume, desc=f"seed {seed} {kind} {name}",
                              config=config, overwrite=overwrite)
            return run_once(opts, lambda: set_ops_backend(build(), cfg["ops"]["backend"]), train_fn,
                            {"kind": kind, "name": name, "seed": seed, **(extra or {})}, reuse_finished=True)

        def student_row(row, teacher=None, teacher_result=None):
            # Every KD setting of the row (default, validation grid, authors' ablation): one run each,
            # all from the same initialization, batch order and views (ued_fast.rows).
            settings = claim_rows.kd_settings(cfg["kd"], row) if teacher is not None else [None]
            cached = (claim_rows.teacher_outputs_for(teacher, splits, views, seed_dir / "teacher" / teacher_result["name"])
                      if teacher is not None else None)
            for setting in settings:
                def train_fn(model, o, setting=setting):
                    return claim_rows.train_student(model, splits, student_cfg, augment, o, setting=setting,
                                                    teacher=teacher, views=views, teacher_outputs=cached,
                                                    backend=kd_backend)

                extra = {"row": row, "base_row": row}
                config = {"model": cfg["student"]}
                if teacher_result is not None:
                    ent = (teacher_result.get("entropies") or {}).get(setting.variant, {}).get(f"{setting.temperature:g}")
                    extra.update({"teacher": teacher_result["name"], "teacher_test_acc": teacher_result["test_acc"],
                                  "teacher_entropy": teacher_result["entropy"], "teacher_params": teacher_result["params"],
                                  "teacher_entropy_at_T": ent})
                    t_dir = seed_dir / "teacher" / teacher_result["name"]
                    config.update(kd={"variant": setting.variant, "temperature": setting.temperature,
                                      "alpha": setting.alpha, "views": cfg["kd"].get("views")}, teacher={
                        "label": teacher_result["name"], "run": str(t_dir.relative_to(out_dir)),
                        "model": (read_run_config(t_dir) or {}).get("model")})
                name = row + (setting.suffix() if setting is not None else "")
                result, _ = run("student", name, lambda: _build(cfg["student"], splits), train_fn, extra, config)
                runs.append(result)

        def teacher_run(name, spec, extra_kwargs=None):
            def train_fn(model, o):
                r = train_teacher(model, splits, teacher_cfg, augment, o, keep_test_outputs=True)
                r["entropies"] = claim_rows.teacher_entropies(r["test_outputs"], cfg["kd"])
                r["entropy"] = soft_target_entropy(r.pop("test_outputs"), T)
                r["model"] = _describe({**spec, **{k: v for k, v in (extra_kwargs or {}).items() if k not in spec}})
                return r

            result, model = run("teacher", name, lambda: _build(spec, splits, extra_kwargs), train_fn,
                                config={"model": {**(extra_kwargs or {}), **spec}, "entropy_temperature": T})
            runs.append(result)
            return result, model

        student_row("scratch")
        strong = _label(cfg["sweep"][-1])
        for spec in cfg["sweep"] if "sweep" in cfg["rows"] else []:
            label = _label(spec)
            t_result, teacher = teacher_run(label, spec)
            student_row("kd_strong" if label == strong else f"kd_{label}", teacher, t_result)
            del teacher
        v1_size = {k: v for k, v in cfg["uste_v1"].items() if k in ("width", "depth", "stages")}
        for row, section, extra in (("kd_matched", "matched", {"cover": cfg["cover"], **v1_size}),
                                    ("kd_generalist", "generalist", {"cover": cfg["cover"]}),
                                    ("kd_joint_generalist", "joint_generalist", {"cover": cfg["cover"], **v1_size}),
                                    ("kd_uste_v1", "uste_v1", {"cover": cfg["cover"]}),
                                    ("kd_uste_v2", "uste_v2", {"cover": cfg["cover_v2"]})):
            if row not in cfg["rows"]:
                continue
            t_result, teacher = teacher_run(section, cfg[section], extra)
            student_row(row, teacher, t_result)
            del teacher

    results = {
        "config": cfg, "versions": versions(), "device": device_description(device), "git_commit": git_commit(),
        "wall_seconds": time.time() - started, "strong_teacher": _label(cfg["sweep"][-1]),
        "sweep": [_label(s) for s in cfg["sweep"]], "runs": runs,
    }
    results["summary"] = summarize(results)
    results["summary"]["claim"] = claim_rows.claim_summary(results)
    if process.is_main:
        save_json(out_dir / "results.json", results)
        atomic_write(out_dir / "results.md", lambda f: f.write(render_markdown(results)), mode="w")
        plot_results(results, out_dir)
    return results


# --- Reporting ------------------------------------------------------------------------------------

def _mean_std(values) -> tuple[float, float]:
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    if arr.size == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def summarize(results: dict) -> dict:
    """Per student row and per teacher: mean and std over seeds."""
    students: dict = {}
    teachers: dict = {}
    for r in results["runs"]:
        (students if r["kind"] == "student" else teachers).setdefault(r["name"], []).append(r)
    out = {"students": {}, "teachers": {}}
    for row, rs in students.items():
        acc, acc_std = _mean_std(r["test_acc"] for r in rs)
        val, val_std = _mean_std(r["val_acc"] for r in rs)
        entry = {"test_acc": acc, "test_acc_std": acc_std, "val_acc": val, "val_acc_std": val_std,
                 "params": rs[0]["params"], "train_seconds": _mean_std(r["train_seconds"] for r in rs)[0],
                 "seeds": len(rs), "teacher": rs[0].get("teacher")}
        if rs[0].get("teacher") is not None:
            entry["teacher_test_acc"], entry["teacher_test_acc_std"] = _mean_std(r["teacher_test_acc"] for r in rs)
            entry["teacher_entropy"], entry["teacher_entropy_std"] = _mean_std(r["teacher_entropy"] for r in rs)
            entry["teacher_params"] = rs[0]["teacher_params"]
        out["students"][row] = entry
    for name, rs in teachers.items():
        acc, acc_std = _mean_std(r["test_acc"] for r in rs)
        ent, ent_std = _mean_std(r["entropy"] for r in rs)
        out["teachers"][name] = {"test_acc": acc, "test_acc_std": acc_std, "entropy": ent, "entropy_std": ent_std,
                                 "params": rs[0]["params"], "model": rs[0].get("model"),
                                 "train_seconds": _mean_std(r["train_seconds"] for r in rs)[0]}
    return out


def _pct(mean, std) -> str:
    if mean is None or math.isnan(mean):
        return "-"
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def render_markdown(results: dict) -> str:
    s = results["summary"]
    cfg = results["config"]
    students = s["students"]
    lines = [
        f"# {cfg['name']}: {cfg['dataset']}",
        "",
        f"Test accuracy of the last epoch, mean ± std over seeds {cfg['seeds']}. Student: "
        f"`{cfg['student']['name']}`; T = {cfg['kd']['temperature']}, alpha = {cfg['kd']['alpha']}; "
        f"{cfg['train']['epochs']} student epochs, {TrainConfig(**{**cfg['train'], **cfg['teacher_train']}).epochs} "
        f"teacher epochs. Device: {results['device']}; commit {results['git_commit']}; "
        f"wall time {results['wall_seconds']:.1f} s.",
        "",
        "| row | student test acc % | student val acc % | student params | student train s | teacher | "
        "teacher params | teacher test acc % | soft-target entropy (nats) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    main_rows = [r for r in ALL_ROW_TITLES if r in students]
    for row in main_rows:
        e = students[row]
        teacher = e.get("teacher")
        title = ALL_ROW_TITLES[row] + (f" ({teacher})" if row == "kd_strong" else "")
        lines.append(
            f"| {title} | {_pct(e['test_acc'], e['test_acc_std'])} | {_pct(e['val_acc'], e['val_acc_std'])} | "
            f"{e['params']:,} | {e['train_seconds']:.1f} | {teacher or '-'} | "
            f"{e.get('teacher_params', 0):,} | {_pct(e.get('teacher_test_acc'), e.get('teacher_test_acc_std', 0))} | "
            f"{e['teacher_entropy']:.3f} |" if teacher else
            f"| {title} | {_pct(e['test_acc'], e['test_acc_std'])} | {_pct(e['val_acc'], e['val_acc_std'])} | "
            f"{e['params']:,} | {e['train_seconds']:.1f} | - | - | - | - |"
        )
    lines += ["", "## Teacher-strength sweep", "",
              "| teacher | params | teacher test acc % | soft-target entropy (nats) | student test acc % |",
              "|---|---|---|---|---|"]
    for label in results["sweep"]:
        t = s["teachers"].get(label)
        row = "kd_strong" if label == results["strong_teacher"] else f"kd_{label}"
        st = students.get(row)
        if t is None or st is None:
            continue
        lines.append(f"| {label} | {t['params']:,} | {_pct(t['test_acc'], t['test_acc_std'])} | "
                     f"{t['entropy']:.3f} ± {t['entropy_std']:.3f} | {_pct(st['test_acc'], st['test_acc_std'])} |")
    lines += ["", "## Teachers", "", "| teacher | model | params | test acc % | entropy | train s |", "|---|---|---|---|---|---|"]
    for name, t in s["teachers"].items():
        lines.append(f"| {name} | {t['model']} | {t['params']:,} | {_pct(t['test_acc'], t['test_acc_std'])} | "
                     f"{t['entropy']:.3f} | {t['train_seconds']:.1f} |")
    lines += claim_rows.render_claim_sections(results) + claim_rows.render_all_runs_table(results)
    return "\n".join(lines) + "\n"


def _save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_results(results: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = results["summary"]
    students = s["students"]
    paths = []
    rows = [r for r in ALL_ROW_TITLES if r in students]

    fig, ax = plt.subplots(figsize=(7, 4))
    means = [100 * students[r]["test_acc"] for r in rows]
    stds = [100 * students[r]["test_acc_std"] for r in rows]
    ax.bar(range(len(rows)), means, yerr=stds, capsize=4, color="tab:blue")
    ax.set_xticks(range(len(rows)), [r.replace("kd_", "KD ") for r in rows], rotation=20)
    lo = min(m - e for m, e in zip(means, stds))
    ax.set_ylim(max(0.0, lo - 5), min(100.0, max(m + e for m, e in zip(means, stds)) + 2))
    ax.set_ylabel("student test accuracy (%)")
    ax.set_title(f"{results['config']['dataset']}: student accuracy, mean ± std over {len(results['config']['seeds'])} seeds")
    paths.append(_save_figure(fig, out_dir / "accuracy.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    for row in students:
        curves = [r["log"] for r in results["runs"] if r["kind"] == "student" and r["name"] == row]
        n = min(len(c) for c in curves)
        val = np.mean([[e["val_acc"] for e in c[:n]] for c in curves], axis=0)
        # Markers: a 1-epoch run is a single point, which a line alone does not draw.
        ax.plot(range(1, n + 1), 100 * val, label=row, linestyle="-" if row in ALL_ROW_TITLES else ":", marker="o",
                markersize=3)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("student learning curves (mean over seeds)")
    ax.legend(fontsize=8)
    paths.append(_save_figure(fig, out_dir / "learning_curves.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for label in results["sweep"]:
        row = "kd_strong" if label == results["strong_teacher"] else f"kd_{label}"
        t, st = s["teachers"].get(label), students.get(row)
        if t is None or st is None:
            continue
        ax.errorbar(t["entropy"], 100 * st["test_acc"], xerr=t["entropy_std"], yerr=100 * st["test_acc_std"],
                    fmt="o", capsize=3)
        ax.annotate(f"{label}\n({100 * t['test_acc']:.1f}%, {t['params'] / 1e3:.0f}k)", (t["entropy"], 100 * st["test_acc"]),
                    fontsize=7, textcoords="offset points", xytext=(5, 5))
    ax.set_xlabel(f"teacher soft-target entropy at T={results['config']['kd']['temperature']} (nats)")
    ax.set_ylabel("student test accuracy (%)")
    ax.set_title("teacher-strength sweep")
    paths.append(_save_figure(fig, out_dir / "entropy_vs_student.png"))
    return paths
