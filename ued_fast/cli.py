"""The `ued-fast` command line: demo, experiment, train-teacher, distill.

Bad input (unknown dataset or model, a missing or malformed config, a bad --set) ends with one
line on stderr naming the argument or file and exit code 2; Ctrl-C saves a checkpoint and exits 130.
Every run folder records its settings (config.json): --resume refuses other settings, naming them,
and a fresh run refuses a folder holding an earlier run's files unless --overwrite.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import List, Optional

import typer
from typer.core import TyperGroup

# The on/off options are flags; a value after one in the usual spellings (--resume true, --quiet=no)
# is accepted too, since the help lists them as <bool>.
BOOL_FLAGS = ("--resume", "--overwrite", "--deterministic", "--quiet", "-q")
_TRUE, _FALSE = ("true", "yes", "on", "1", "y", "t"), ("false", "no", "off", "0", "n", "f")


def normalize_bool_flags(args: list[str]) -> list[str]:
    """['--resume', 'true'] -> ['--resume']; ['--resume=no'] -> []; everything else as it is."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        flag, eq, value = arg.partition("=")
        if flag in BOOL_FLAGS and eq and value.lower() in _TRUE + _FALSE:
            out += [flag] if value.lower() in _TRUE else []
        elif arg in BOOL_FLAGS and i + 1 < len(args) and args[i + 1].lower() in _TRUE + _FALSE:
            out += [arg] if args[i + 1].lower() in _TRUE else []
            i += 1
        else:
            out.append(arg)
        i += 1
    return out


class _Group(TyperGroup):
    def main(self, args=None, *rest, **kwargs):
        import sys

        return super().main(normalize_bool_flags(list(sys.argv[1:] if args is None else args)), *rest, **kwargs)


app = typer.Typer(add_completion=False, no_args_is_help=True, cls=_Group,
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
ResumeOpt = typer.Option(False, "--resume", help="Continue the run in the output folder (refused if its recorded "
                                                  "settings differ).")
OverwriteOpt = typer.Option(False, "--overwrite", help="Start again in an output folder that holds an earlier run "
                                                       "(its checkpoints and results are replaced).")
SetOpt = typer.Option(None, "--set", help="Override a config key: --set train.epochs=3 (value parsed as YAML).")


def _print_version(value: bool):
    if value:
        from . import __version__

        typer.echo(f"ued-fast {__version__}")
        raise typer.Exit()


@app.callback()
def _main(data_dir: Optional[Path] = DataDirOpt, device: Optional[str] = DeviceOpt, quiet: bool = QuietOpt,
          version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print the version and exit.")):
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


def _run_experiment(config, sets, seeds, out, resume, overwrite, data_dir, device, quiet, deterministic):
    from .experiment import load_config, run_experiment

    def go():
        cfg = load_config(config, _overrides(sets, seeds, data_dir, device, quiet, deterministic))
        started = time.time()
        results = run_experiment(cfg, out, resume=resume, overwrite=overwrite)
        from . import distributed

        if not distributed.current().is_main:  # under torchrun rank 0 alone writes and reports
            return results
        if not cfg["quiet"]:
            typer.echo((Path(out) / "results.md").read_text())
        typer.echo(f"wrote {out}/results.json, results.md and plots in {time.time() - started:.1f} s")
        return results

    try:
        return _guarded(go)
    finally:
        _cleanup_distributed()


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Output folder."),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="Comma-separated seeds (default: the config's seeds)."),
    sets: Optional[List[str]] = SetOpt, resume: bool = ResumeOpt, overwrite: bool = OverwriteOpt,
    data_dir: Optional[Path] = DataDirOpt, device: Optional[str] = DeviceOpt, quiet: bool = QuietOpt,
    deterministic: bool = typer.Option(False, "--deterministic"),
):
    """The whole experiment on sklearn's digits with small models (a few minutes on 2 CPU cores)."""
    _run_experiment("demo", sets, seeds, out, resume, overwrite, data_dir, device, quiet, deterministic)


@app.command()
def experiment(
    config: str = typer.Option(..., "--config", "-c", help="YAML file, or a packaged config name (demo, mnist, ...)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default runs/<config name>)."),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="Comma-separated seeds."),
    sets: Optional[List[str]] = SetOpt, resume: bool = ResumeOpt, overwrite: bool = OverwriteOpt,
    data_dir: Optional[Path] = DataDirOpt, device: Optional[str] = DeviceOpt, quiet: bool = QuietOpt,
    deterministic: bool = typer.Option(False, "--deterministic", help="torch.use_deterministic_algorithms."),
):
    """Run an experiment (DESIGN 1.5) described by a YAML file."""
    out = out if out is not None else Path("runs") / Path(config).stem
    _run_experiment(config, sets, seeds, out, resume, overwrite, data_dir, device, quiet, deterministic)


def _model_kwargs(items: Optional[List[str]], flag: str) -> dict:
    from .experiment import ConfigError, parse_set

    try:
        return parse_set(items)
    except ConfigError as e:
        _fail(str(e).replace("--set", flag))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _resolve_teacher(name: Optional[str], checkpoint: Path, args: Optional[List[str]], dataset: str) -> dict:
    """The teacher: its model (name, kwargs) read from the config.json that train-teacher wrote next
    to its checkpoint, its run folder, its result.json. --teacher and --teacher-arg are needed only
    for a checkpoint without a config.json; given with one, they must agree with it."""
    import json

    from .checkpoint import config_differences, read_run_config
    from .experiment import ConfigError
    from .train import CHECKPOINT_NAME, RESULT_NAME

    path = Path(checkpoint)
    ckpt = path / CHECKPOINT_NAME if path.is_dir() else path
    if not ckpt.is_file():
        raise ConfigError(f"--teacher-checkpoint: file {str(ckpt)!r} not found")
    run_dir = ckpt.parent
    given = _model_kwargs(args, "--teacher-arg") if args else None
    recorded = read_run_config(run_dir)
    if recorded is None:
        if name is None:
            raise ConfigError(f"--teacher: {str(run_dir)!r} has no config.json to read the teacher's model from; "
                              "name it with --teacher (and --teacher-arg)")
        return {"name": name, "kwargs": given or {}, "checkpoint": ckpt, "run": run_dir, "result": None}
    spec = dict(recorded.get("model") or {})
    r_name = spec.pop("name", None)
    spec.pop("label", None)
    if recorded.get("dataset") != dataset:
        raise ConfigError(f"--teacher-checkpoint: the teacher in {str(run_dir)!r} was trained on "
                          f"{recorded.get('dataset')!r}, not on --dataset {dataset!r}")
    if name is not None and name != r_name:
        raise ConfigError(f"--teacher {name!r} does not fit the checkpoint: its run folder records model {r_name!r} "
                          "(leave --teacher out to use that)")
    if given is not None and (diffs := config_differences(spec, given)):
        raise ConfigError(f"--teacher-arg does not match the teacher's recorded model args ({'; '.join(diffs)}); "
                          "leave --teacher-arg out to use those")
    result_path = run_dir / RESULT_NAME
    result = json.loads(result_path.read_text()) if result_path.is_file() else None
    return {"name": r_name, "kwargs": spec, "checkpoint": ckpt, "run": run_dir, "result": result}


def _single_run(kind, dataset, model, model_args, out, epochs, batch_size, lr, seed, val_fraction, train_subset,
                resume, overwrite, data_dir, device, quiet, deterministic, teacher=None, temperature=4.0, alpha=0.9):
    from .augment import AugmentConfig
    from .checkpoint import load_checkpoint, prepare_run_dir, read_run_config
    from .data import dataset_root
    from .experiment import DEFAULTS, ConfigError, _build, _model_spec
    from .train import RUN_OUTPUTS, RunOptions, TrainConfig, distill, load_splits, run_once, start_process, train_teacher

    def go():
        from . import models

        if model not in models.MODELS:
            raise ConfigError(f"--model: unknown model {model!r}; known models: {sorted(models.MODELS)}")
        kwargs = _model_kwargs(model_args, "--model-arg")
        config = {"kind": kind, "dataset": dataset, "model": {"name": model, **kwargs}, "val_fraction": val_fraction,
                  "train_subset": train_subset}
        result_extra = {"kind": kind, "model": model, "model_args": kwargs, "dataset": dataset, "seed": seed,
                        "epochs": epochs, "lr": lr, "batch_size": batch_size}
        t = None
        if teacher is not None:
            t = _resolve_teacher(*teacher, dataset)
            if t["name"] not in models.MODELS:
                raise ConfigError(f"--teacher: unknown model {t['name']!r}; known models: {sorted(models.MODELS)}")
            t_model = {"name": t["name"], **t["kwargs"]}
            config.update(kd={"temperature": temperature, "alpha": alpha}, teacher={
                "run": str(t["run"].resolve()), "model": t_model, "checkpoint_sha256": _sha256(t["checkpoint"])})
            t_result = t["result"] or {}
            result_extra.update(temperature=temperature, alpha=alpha, teacher={
                **config["teacher"], "val_acc": t_result.get("val_acc"), "test_acc": t_result.get("test_acc")})
        # Refuse a resume with other settings, or a fresh run over an earlier one, before loading the
        # data: the keys known here are checked now, all of them again in fit.
        prepare_run_dir(out, {**(read_run_config(out) or {}), **config}, resume=resume, overwrite=overwrite,
                        outputs=RUN_OUTPUTS, write=False)
        process = start_process(device or G.device, deterministic)
        cfg = TrainConfig(**{**DEFAULTS["train"], "epochs": epochs, "batch_size": batch_size, "lr": lr})
        augment = AugmentConfig(**{**DEFAULTS["augment"], "flip": dataset.startswith("cifar")})
        splits = load_splits(dataset, process.device, root=dataset_root(dataset, data_dir or G.data_dir),
                             val_fraction=val_fraction, seed=seed, train_subset=train_subset)
        opts = RunOptions(device=process.device, seed=seed, deterministic=deterministic, quiet=quiet or G.quiet,
                          run_dir=Path(out), resume=resume, desc=f"{kind} {model}", config=config, overwrite=overwrite)

        def train(net, opts):
            if t is None:
                return train_teacher(net, splits, cfg, augment, opts)
            t_net = _build(_model_spec(t_model, "--teacher"), splits)
            try:
                state = load_checkpoint(t["checkpoint"])
            except Exception as e:
                raise ConfigError(f"--teacher-checkpoint {str(t['checkpoint'])!r} is not a readable checkpoint "
                                  f"({type(e).__name__})") from None
            try:
                t_net.load_state_dict(state.get("model", state))
            except RuntimeError as e:
                raise ConfigError(f"--teacher-checkpoint {str(t['checkpoint'])!r} does not fit model {t['name']!r}: "
                                  f"{str(e).splitlines()[0]}") from None
            return distill(net, t_net, splits, cfg, augment, opts, temperature=temperature, alpha=alpha)

        result, _ = run_once(opts, lambda: _build(_model_spec({"name": model, **kwargs}, "--model"), splits), train,
                             result_extra)
        if process.is_main:  # rank 0 alone reports
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
    out: Path = typer.Option(..., "--out", help="Run folder (config.json, checkpoint.pt, log.jsonl, result.json)."),
    epochs: int = typer.Option(10, "--epochs", min=1), batch_size: int = typer.Option(128, "--batch-size", min=1),
    lr: float = typer.Option(0.05, "--lr", min=0.0), seed: int = typer.Option(0, "--seed"),
    val_fraction: float = typer.Option(0.1, "--val-fraction"),
    train_subset: Optional[int] = typer.Option(None, "--train-subset", help="Use only this many training images."),
    resume: bool = ResumeOpt, overwrite: bool = OverwriteOpt, data_dir: Optional[Path] = DataDirOpt,
    device: Optional[str] = DeviceOpt, quiet: bool = QuietOpt,
    deterministic: bool = typer.Option(False, "--deterministic"),
):
    """Train one model with cross-entropy (a teacher, or a student from scratch)."""
    _single_run("teacher", dataset, model, model_args, out, epochs, batch_size, lr, seed, val_fraction, train_subset,
                resume, overwrite, data_dir, device, quiet, deterministic)


@app.command("distill")
def distill_cmd(
    dataset: str = typer.Option(..., "--dataset"),
    student: str = typer.Option("student", "--student", help="The student model."),
    student_args: Optional[List[str]] = typer.Option(None, "--student-arg"),
    teacher_checkpoint: Path = typer.Option(..., "--teacher-checkpoint",
                                            help="checkpoint.pt of train-teacher (or its run folder)."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="The teacher's model name: read from the "
                                          "teacher's run folder (config.json); needed only where there is none."),
    teacher_args: Optional[List[str]] = typer.Option(None, "--teacher-arg", help="Likewise its build_model kwargs."),
    out: Path = typer.Option(..., "--out"),
    temperature: float = typer.Option(4.0, "--temperature", "-T"), alpha: float = typer.Option(0.9, "--alpha"),
    epochs: int = typer.Option(10, "--epochs", min=1), batch_size: int = typer.Option(128, "--batch-size", min=1),
    lr: float = typer.Option(0.05, "--lr", min=0.0), seed: int = typer.Option(0, "--seed"),
    val_fraction: float = typer.Option(0.1, "--val-fraction"),
    train_subset: Optional[int] = typer.Option(None, "--train-subset"),
    resume: bool = ResumeOpt, overwrite: bool = OverwriteOpt, data_dir: Optional[Path] = DataDirOpt,
    device: Optional[str] = DeviceOpt, quiet: bool = QuietOpt,
    deterministic: bool = typer.Option(False, "--deterministic"),
):
    """Distill a student from a trained teacher (ued_fast.kd_loss)."""
    _single_run("student", dataset, student, student_args, out, epochs, batch_size, lr, seed, val_fraction,
                train_subset, resume, overwrite, data_dir, device, quiet, deterministic,
                teacher=(teacher, teacher_checkpoint, teacher_args), temperature=temperature, alpha=alpha)


def _cleanup_distributed():
    from . import distributed

    distributed.cleanup()


def main():
    app()


if __name__ == "__main__":
    main()
