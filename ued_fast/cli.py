"""The `ued-fast` command line: demo, experiment, train-teacher, distill.

Bad input (unknown dataset or model, a missing or malformed config, a bad --set) ends with one
line on stderr naming the argument or file and exit code 2; Ctrl-C saves a checkpoint and exits 130.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Knowledge distillation from a Unified Ensemble of Specialized Teachers (USTE).")

EXIT_USAGE, EXIT_INTERRUPTED = 2, 130


class _Globals:
    data_dir: Optional[Path] = None
    device: Optional[str] = None
    quiet: bool = False


G = _Globals()

DataDirOpt = typer.Option(None, "--data-dir", envvar="UED_FAST_DATA_DIR",
                          help="Folder holding dataset subfolders (mnist/, fashion-mnist/, cifar10/).")
DeviceOpt = typer.Option(None, "--device", help="cpu, cuda, cuda:1 or auto (default: cuda if available).")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bars or per-run lines.")
ResumeOpt = typer.Option(False, "--resume", help="Continue from the checkpoints in the output folder.")
SetOpt = typer.Option(None, "--set", help="Override a config key: --set train.epochs=3 (value parsed as YAML).")


@app.callback()
def _main(data_dir: Optional[Path] = DataDirOpt, device: Optional[str] = DeviceOpt, quiet: bool = QuietOpt):
    G.data_dir, G.device, G.quiet = data_dir, device, quiet


def _fail(message: str, code: int = EXIT_USAGE):
    typer.echo(f"ued-fast: error: {message}", err=True)
    raise typer.Exit(code)


def _parse_seeds(seeds: Optional[str]) -> Optional[list]:
    if seeds is None:
        return None
    try:
        out = [int(s) for s in seeds.replace(" ", "").split(",") if s != ""]
    except ValueError:
        _fail(f"--seeds {seeds!r}: expected comma-separated ints, e.g. 0,1,2")
    if not out:
        _fail("--seeds: give at least one seed")
    return out


def _guarded(fn):
    """Run fn(); turn our validation errors into one line and exit 2, Ctrl-C into exit 130."""
    from .experiment import ConfigError
    from .train import Interrupted

    try:
        return fn()
    except Interrupted as e:
        _fail(str(e), EXIT_INTERRUPTED)
    except KeyboardInterrupt:
        _fail("interrupted", EXIT_INTERRUPTED)
    except (ConfigError, ValueError, TypeError, FileNotFoundError, NotADirectoryError) as e:
        _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)


def _overrides(sets: Optional[List[str]], seeds: Optional[str], data_dir, device, quiet, deterministic=None) -> dict:
    from .experiment import parse_set

    over = parse_set(sets)
    if (s := _parse_seeds(seeds)) is not None:
        over["seeds"] = s
    if (d := data_dir or G.data_dir) is not None:
        over["data_dir"] = str(d)
    if (dev := device or G.device) is not None:
        over["device"] = dev
    if quiet or G.quiet:
        over["quiet"] = True
    if deterministic:
        over["deterministic"] = True
    return over


def _run_experiment(config, sets, seeds, out, resume, data_dir, device, quiet, deterministic):
    from .experiment import load_config, run_experiment

    def go():
        cfg = load_config(config, _overrides(sets, seeds, data_dir, device, quiet, deterministic))
        started = time.time()
        results = run_experiment(cfg, out, resume=resume)
        if not cfg["quiet"]:
            typer.echo((Path(out) / "results.md").read_text())
        typer.echo(f"wrote {out}/results.json, results.md and plots in {time.time() - started:.1f} s")
        return results

    return _guarded(go)


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Output folder."),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="Comma-separated seeds (default 0,1,2)."),
    sets: Optional[List[str]] = SetOpt, resume: bool = ResumeOpt,
    data_dir: Optional[Path] = DataDirOpt, device: Optional[str] = DeviceOpt, quiet: bool = QuietOpt,
    deterministic: bool = typer.Option(False, "--deterministic"),
):
    """The whole experiment on sklearn's digits with small models (a few minutes on 2 CPU cores)."""
    _run_experiment("demo", sets, seeds, out, resume, data_dir, device, quiet, deterministic)


@app.command()
def experiment(
    config: str = typer.Option(..., "--config", "-c", help="YAML file, or a packaged config name (demo, mnist, ...)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default runs/<config name>)."),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="Comma-separated seeds."),
    sets: Optional[List[str]] = SetOpt, resume: bool = ResumeOpt,
    data_dir: Optional[Path] = DataDirOpt, device: Optional[str] = DeviceOpt, quiet: bool = QuietOpt,
    deterministic: bool = typer.Option(False, "--deterministic", help="torch.use_deterministic_algorithms."),
):
    """Run an experiment (DESIGN 1.5) described by a YAML file."""
    out = out if out is not None else Path("runs") / Path(config).stem
    _run_experiment(config, sets, seeds, out, resume, data_dir, device, quiet, deterministic)


def _model_kwargs(items: Optional[List[str]], flag: str) -> dict:
    from .experiment import ConfigError, parse_set

    try:
        return parse_set(items)
    except ConfigError as e:
        _fail(str(e).replace("--set", flag))


def _single_run(kind, dataset, model, model_args, out, epochs, batch_size, lr, seed, val_fraction, train_subset,
                resume, data_dir, device, quiet, deterministic, teacher=None, temperature=4.0, alpha=0.9):
    from .augment import AugmentConfig
    from .checkpoint import load_checkpoint, save_json
    from .experiment import DEFAULTS, ConfigError, _build, _model_spec
    from .train import (RunOptions, dataset_root, TrainConfig, distill, load_splits, resolve_device, seed_everything,
                        set_deterministic, train_teacher)

    def go():
        from . import models

        if model not in models.MODELS:
            raise ConfigError(f"--model: unknown model {model!r}; known models: {sorted(models.MODELS)}")
        from . import distributed

        # Under torchrun: join the process group; each process takes its own device.
        dist_info = distributed.init_from_env(resolve_device(device or G.device))
        dev = dist_info.device
        set_deterministic(deterministic)
        dd = data_dir or G.data_dir
        root = dataset_root(dd, dataset)
        cfg = TrainConfig(**{**DEFAULTS["train"], "epochs": epochs, "batch_size": batch_size, "lr": lr})
        augment = AugmentConfig(**{**DEFAULTS["augment"], "flip": dataset.startswith("cifar")})
        splits = load_splits(dataset, dev, root=root, val_fraction=val_fraction, seed=seed, train_subset=train_subset)
        opts = RunOptions(device=dev, seed=seed, deterministic=deterministic, quiet=quiet or G.quiet,
                          run_dir=Path(out), resume=resume, desc=f"{kind} {model}")
        seed_everything(seed)
        net = _build(_model_spec({"name": model, **_model_kwargs(model_args, "--model-arg")}, "--model"), splits)
        if teacher is None:
            result = train_teacher(net, splits, cfg, augment, opts)
        else:
            t_name, t_ckpt, t_args = teacher
            if t_name not in models.MODELS:
                raise ConfigError(f"--teacher: unknown model {t_name!r}; known models: {sorted(models.MODELS)}")
            if not Path(t_ckpt).is_file():
                raise ConfigError(f"--teacher-checkpoint: file {str(t_ckpt)!r} not found")
            t_net = _build(_model_spec({"name": t_name, **_model_kwargs(t_args, "--teacher-arg")}, "--teacher"), splits)
            try:
                state = load_checkpoint(t_ckpt)
            except Exception as e:
                raise ConfigError(f"--teacher-checkpoint {str(t_ckpt)!r} is not a readable checkpoint "
                                  f"({type(e).__name__})") from None
            try:
                t_net.load_state_dict(state.get("model", state))
            except RuntimeError as e:
                raise ConfigError(f"--teacher-checkpoint {str(t_ckpt)!r} does not fit model {t_name!r}: "
                                  f"{str(e).splitlines()[0]}") from None
            result = distill(net, t_net, splits, cfg, augment, opts, temperature=temperature, alpha=alpha)
        result.update({"kind": kind, "model": model, "dataset": dataset, "seed": seed})
        if not dist_info.is_main:  # rank 0 alone writes and reports
            return
        save_json(Path(out) / "result.json", result)
        typer.echo(f"{kind} {model} on {dataset}: val acc {100 * result['val_acc']:.2f}%, "
                   f"test acc {100 * result['test_acc']:.2f}%, {result['params']:,} params, "
                   f"{result['train_seconds']:.1f} s; checkpoint in {out}")

    try:
        _guarded(go)
    finally:
        _cleanup_distributed()


@app.command("train-teacher")
def train_teacher_cmd(
    dataset: str = typer.Option(..., "--dataset", help="digits, mnist, fashion-mnist, cifar10, ..."),
    model: str = typer.Option(..., "--model", help="A registered model (teacher_xl, uste_v1, ...)."),
    model_args: Optional[List[str]] = typer.Option(None, "--model-arg", help="build_model kwarg: --model-arg width=16"),
    out: Path = typer.Option(..., "--out", help="Run folder (checkpoint.pt, log.jsonl, result.json)."),
    epochs: int = typer.Option(10, "--epochs", min=1), batch_size: int = typer.Option(128, "--batch-size", min=1),
    lr: float = typer.Option(0.05, "--lr", min=0.0), seed: int = typer.Option(0, "--seed"),
    val_fraction: float = typer.Option(0.1, "--val-fraction"),
    train_subset: Optional[int] = typer.Option(None, "--train-subset", help="Use only this many training images."),
    resume: bool = ResumeOpt, data_dir: Optional[Path] = DataDirOpt, device: Optional[str] = DeviceOpt,
    quiet: bool = QuietOpt, deterministic: bool = typer.Option(False, "--deterministic"),
):
    """Train one model with cross-entropy (a teacher, or a student from scratch)."""
    _single_run("teacher", dataset, model, model_args, out, epochs, batch_size, lr, seed, val_fraction, train_subset,
                resume, data_dir, device, quiet, deterministic)


@app.command("distill")
def distill_cmd(
    dataset: str = typer.Option(..., "--dataset"),
    student: str = typer.Option("student", "--student", help="The student model."),
    student_args: Optional[List[str]] = typer.Option(None, "--student-arg"),
    teacher: str = typer.Option(..., "--teacher", help="The teacher's model name."),
    teacher_args: Optional[List[str]] = typer.Option(None, "--teacher-arg"),
    teacher_checkpoint: Path = typer.Option(..., "--teacher-checkpoint", help="checkpoint.pt of train-teacher."),
    out: Path = typer.Option(..., "--out"),
    temperature: float = typer.Option(4.0, "--temperature", "-T"), alpha: float = typer.Option(0.9, "--alpha"),
    epochs: int = typer.Option(10, "--epochs", min=1), batch_size: int = typer.Option(128, "--batch-size", min=1),
    lr: float = typer.Option(0.05, "--lr", min=0.0), seed: int = typer.Option(0, "--seed"),
    val_fraction: float = typer.Option(0.1, "--val-fraction"),
    train_subset: Optional[int] = typer.Option(None, "--train-subset"),
    resume: bool = ResumeOpt, data_dir: Optional[Path] = DataDirOpt, device: Optional[str] = DeviceOpt,
    quiet: bool = QuietOpt, deterministic: bool = typer.Option(False, "--deterministic"),
):
    """Distill a student from a trained teacher (ued_fast.kd_loss)."""
    _single_run("student", dataset, student, student_args, out, epochs, batch_size, lr, seed, val_fraction,
                train_subset, resume, data_dir, device, quiet, deterministic,
                teacher=(teacher, teacher_checkpoint, teacher_args), temperature=temperature, alpha=alpha)


def _cleanup_distributed():
    from . import distributed

    distributed.cleanup()


def main():
    app()


if __name__ == "__main__":
    main()
