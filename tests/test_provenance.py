"""Run folders record their settings (config.json); --resume refuses other settings, a fresh run
refuses to replace an earlier one, distill reads its teacher from the teacher's run folder; progress
lines when stdout is not a terminal; file permissions; small CLI conveniences."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ued_fast import __version__
from ued_fast import augment as A
from ued_fast.checkpoint import RUN_CONFIG_NAME, atomic_write, config_differences, load_checkpoint, save_json
from ued_fast.cli import app, normalize_bool_flags
from ued_fast.experiment import device_description, load_config, run_experiment
from ued_fast.models import build_model
from ued_fast.train import CHECKPOINT_NAME, LOG_NAME, RunOptions, TrainConfig, load_splits, train_teacher

REPO = Path(__file__).resolve().parent.parent
TINY = {"widths": [4, 8], "depths": [1, 1]}
TINY_ARGS = ["--model-arg", "widths=[4, 8]", "--model-arg", "depths=[1, 1]"]
COMMON = ["--train-subset", "160", "--batch-size", "32", "--device", "cpu", "--quiet"]
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_error_line(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output)
    err = (result.stderr or result.output).strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith("ued-fast: error:"), err
    return err


@pytest.fixture(scope="module")
def splits():
    return load_splits("digits", "cpu", val_fraction=0.2, seed=0, train_subset=160)


def tiny_model(splits, arch=TINY):
    torch.manual_seed(0)
    return build_model("teacher_s", splits.num_classes, splits.in_channels, splits.image_size, **arch)


def fit_tiny(splits, run_dir, *, epochs=1, arch=TINY, seed=0, lr=0.1, **opts):
    cfg = TrainConfig(epochs=epochs, batch_size=32, lr=lr)
    return train_teacher(tiny_model(splits, arch), splits, cfg, A.AugmentConfig(),
                         RunOptions(run_dir=run_dir, quiet=True, seed=seed, **opts))


# --- the library: fit --------------------------------------------------------------------------------

def test_config_differences_name_dotted_keys_old_to_new():
    old = {"kd": {"temperature": 4.0, "alpha": 0.9}, "train": {"epochs": 6}, "sweep": [{"w": [8]}], "x": 1}
    new = {"kd": {"temperature": 1.0, "alpha": 0.9}, "train": {"epochs": 2}, "sweep": [{"w": [16]}], "y": (1, 2)}
    assert config_differences(old, new) == [
        "kd.temperature: 4.0 -> 1.0", "sweep[0].w: [8] -> [16]", "train.epochs: 6 -> 2", 'x: 1 -> "<absent>"',
        'y: "<absent>" -> [1, 2]']
    assert config_differences(new, json.loads(json.dumps(new))) == []  # tuples and lists are the same setting


def test_fit_records_its_settings_and_provenance(splits, tmp_path):
    fit_tiny(splits, tmp_path, config={"model": {"name": "teacher_s", **TINY}, "kind": "teacher"})
    saved = json.loads((tmp_path / RUN_CONFIG_NAME).read_text())
    cfg, prov = saved["config"], saved["provenance"]
    assert cfg["dataset"] == "digits" and cfg["seed"] == 0 and cfg["model"] == {"name": "teacher_s", **TINY}
    assert cfg["train"]["epochs"] == 1 and cfg["train"]["lr"] == 0.1 and cfg["train"]["batch_size"] == 32
    assert cfg["schedule"] == "warmup-linear-decay" and cfg["augment"] == {"crop_padding": 0, "padding_mode": "reflect", "flip": False}
    assert prov["ued_fast"] == __version__ and {"git_commit", "torch", "device", "started"} <= set(prov)


@pytest.mark.parametrize("change, keys", [
    ({"epochs": 2}, ["train.epochs: 1 -> 2", "cannot be extended"]),
    ({"seed": 3}, ["seed: 0 -> 3"]),
    ({"epochs": 1, "lr": 0.2}, ["train.lr: 0.1 -> 0.2"]),
    ({"arch": {"widths": [8, 8], "depths": [1, 1]}}, ["params:"]),
    ({"config": {"kd": {"alpha": 0.1}}}, ['kd.alpha: "<absent>" -> 0.1']),
])
def test_resume_with_other_settings_is_refused_naming_them(splits, tmp_path, change, keys):
    fit_tiny(splits, tmp_path)
    before = (tmp_path / CHECKPOINT_NAME).read_bytes()
    with pytest.raises(ValueError, match="--resume") as info:
        fit_tiny(splits, tmp_path, resume=True, **change)
    message = str(info.value)
    assert len(message.splitlines()) == 1
    assert ("cannot be extended" in message) == (change.get("epochs", 1) > 1)  # only where it applies
    for key in keys:
        assert key in message, (key, message)
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == before  # untouched


def test_resume_with_the_same_settings_continues(splits, tmp_path):
    fit_tiny(splits, tmp_path, epochs=2)
    again = fit_tiny(splits, tmp_path, epochs=2, resume=True)  # finished: nothing left to train
    assert [e["epoch"] for e in again["log"]] == [1, 2]


def test_fresh_run_never_replaces_an_earlier_run_without_overwrite(splits, tmp_path):
    fit_tiny(splits, tmp_path)
    (tmp_path / "result.json").write_text("{}")
    before = (tmp_path / CHECKPOINT_NAME).read_bytes()
    with pytest.raises(ValueError, match="already holds checkpoint.pt, log.jsonl, result.json.*--overwrite"):
        fit_tiny(splits, tmp_path, seed=1)
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == before
    fit_tiny(splits, tmp_path, seed=1, overwrite=True)
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)["seed"] == 1
    assert not (tmp_path / "result.json").exists()  # the earlier run's result is gone, not left to mislead
    assert json.loads((tmp_path / RUN_CONFIG_NAME).read_text())["config"]["seed"] == 1
    with pytest.raises(ValueError, match="exclude each other"):
        fit_tiny(splits, tmp_path, resume=True, overwrite=True)


def test_checkpoint_without_recorded_settings_is_not_resumed(splits, tmp_path):
    fit_tiny(splits, tmp_path)
    (tmp_path / RUN_CONFIG_NAME).unlink()  # as an older version left its folders
    with pytest.raises(ValueError, match="no config.json"):
        fit_tiny(splits, tmp_path, resume=True)


def test_resume_on_an_empty_folder_starts_fresh(splits, tmp_path):
    fit_tiny(splits, tmp_path / "new", resume=True)
    assert load_checkpoint(tmp_path / "new" / CHECKPOINT_NAME)["epoch"] == 1


# --- the experiment ----------------------------------------------------------------------------------

def tiny_experiment(**extra):
    over = {"seeds": [0], "train_subset": 160, "quiet": True, "device": "cpu",
            "student": {"name": "teacher_s", **TINY},
            "sweep": [{"label": "t_small", "name": "teacher_s", **TINY}],
            "generalist": {"name": "generalist_ensemble", "width": 4, "depth": 1, "stages": 2},
            "uste_v1": {"name": "uste_v1", "width": 4, "depth": 1, "stages": 2},
            "uste_v2": {"name": "uste_v2", "width": 4, "depth": 1, "stages": 2},
            "train": {"epochs": 1, "batch_size": 32, "lr": 0.1}, "teacher_train": {"epochs": 1}}
    return load_config("demo", {**over, **extra})


@pytest.fixture(scope="module")
def experiment_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("experiment")
    run_experiment(tiny_experiment(), out)
    return out


def test_experiment_resume_with_other_settings_is_refused_naming_them(experiment_dir):
    before = (experiment_dir / "results.md").read_text()
    changed = tiny_experiment(kd={"temperature": 1.0, "alpha": 0.1}, train={"epochs": 2, "batch_size": 32, "lr": 0.1})
    with pytest.raises(ValueError) as info:
        run_experiment(changed, experiment_dir, resume=True)
    message = str(info.value)
    for key in ("kd.alpha: 0.9 -> 0.1", "kd.temperature: 4.0 -> 1.0", "train.epochs: 1 -> 2"):
        assert key in message, message
    assert (experiment_dir / "results.md").read_text() == before
    # Settings of how, not what, may change (device, quiet, threads, the kd backend).
    same = tiny_experiment(num_threads=1, kd={"backend": "reference"})
    assert run_experiment(same, experiment_dir, resume=True)["summary"] is not None


def test_experiment_fresh_run_refuses_a_folder_with_results(experiment_dir):
    with pytest.raises(ValueError, match="already holds results.json, results.md, runs.*--overwrite"):
        run_experiment(tiny_experiment(), experiment_dir)


def test_experiment_run_folders_record_teacher_identity(experiment_dir):
    student = json.loads((experiment_dir / "runs/seed0/student/kd_uste_v1" / RUN_CONFIG_NAME).read_text())["config"]
    assert student["teacher"]["run"] == "runs/seed0/teacher/uste_v1"
    assert student["teacher"]["model"]["name"] == "uste_v1" and student["teacher"]["model"]["cover"] == "contiguous"
    assert student["kd"] == {"variant": "hinton", "temperature": 4.0, "alpha": 0.9, "views": 4} and student["model"]["name"] == "teacher_s"


def test_results_and_run_files_are_readable_by_all_under_umask_022(tmp_path):
    old = os.umask(0o022)
    try:
        run_experiment(tiny_experiment(), tmp_path)
        save_json(tmp_path / "extra.json", {})
    finally:
        os.umask(old)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {"results.json", "results.md", "config.json", "learning_curves.png", "checkpoint.pt", "log.jsonl",
            "result.json"} <= {p.name for p in files}
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, (p, oct(p.stat().st_mode))


def test_atomic_write_follows_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        atomic_write(tmp_path / "private", lambda f: f.write(b"x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "private").stat().st_mode) == 0o600


def test_one_epoch_learning_curves_show_their_points(experiment_dir, tmp_path, monkeypatch):
    import matplotlib.figure

    from ued_fast.experiment import plot_results

    results = json.loads((experiment_dir / "results.json").read_text())
    figures = {}
    real_savefig = matplotlib.figure.Figure.savefig

    def savefig(fig, path, *a, **k):
        figures[Path(path).name] = fig
        return real_savefig(fig, path, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    plot_results(results, tmp_path)
    lines = figures["learning_curves.png"].axes[0].get_lines()
    assert lines and all(len(line.get_xdata()) == 1 for line in lines)
    assert all(line.get_marker() not in (None, "None", "", " ") for line in lines), "a 1-point line draws nothing"


def test_device_description_reports_torch_threads_and_cores():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        text = device_description(torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    assert "1 thread)" in text and f"{os.cpu_count()} cores" in text, text


# --- the CLI -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "t"
    r = invoke("train-teacher", "--dataset", "digits", "--model", "teacher_s", *TINY_ARGS, "--epochs", "1", *COMMON,
               "--out", out)
    assert r.exit_code == 0, r.output
    return out


def test_distill_reads_the_teacher_from_its_run_folder_and_records_it(teacher_dir, tmp_path):
    r = invoke("distill", "--dataset", "digits", "--student", "teacher_s", "--student-arg", "widths=[4, 8]",
               "--student-arg", "depths=[1, 1]", "--teacher-checkpoint", teacher_dir / CHECKPOINT_NAME,
               "-T", "3", "--alpha", "0.5", "--epochs", "1", "--lr", "0.07", *COMMON, "--out", tmp_path / "s")
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "s" / "result.json").read_text())
    teacher = json.loads((teacher_dir / "result.json").read_text())
    assert result["teacher"]["run"] == str(teacher_dir.resolve())
    assert result["teacher"]["model"] == {"name": "teacher_s", **TINY}
    assert result["teacher"]["test_acc"] == teacher["test_acc"] and result["teacher"]["val_acc"] == teacher["val_acc"]
    assert (result["temperature"], result["alpha"], result["epochs"], result["lr"]) == (3.0, 0.5, 1, 0.07)
    cfg = json.loads((tmp_path / "s" / RUN_CONFIG_NAME).read_text())["config"]
    assert cfg["teacher"]["model"]["name"] == "teacher_s" and len(cfg["teacher"]["checkpoint_sha256"]) == 64
    # The run folder works as --teacher-checkpoint too; a teacher of another dataset is refused.
    err = one_error_line(invoke("distill", "--dataset", "mnist", "--teacher-checkpoint", teacher_dir, *COMMON,
                                "--out", tmp_path / "m"))
    assert "--teacher-checkpoint" in err and "'digits'" in err and "'mnist'" in err
    err = one_error_line(invoke("distill", "--dataset", "digits", "--teacher-checkpoint", teacher_dir,
                                "--teacher-arg", "widths=[8, 8]", *COMMON, "--out", tmp_path / "w"))
    assert "--teacher-arg" in err and "widths" in err
    # Resuming with another T names it.
    err = one_error_line(invoke("distill", "--dataset", "digits", "--student", "teacher_s", "--student-arg",
                                "widths=[4, 8]", "--student-arg", "depths=[1, 1]", "--teacher-checkpoint", teacher_dir,
                                "-T", "1", "--alpha", "0.5", "--epochs", "1", "--lr", "0.07", *COMMON,
                                "--out", tmp_path / "s", "--resume"))
    assert "kd.temperature: 3.0 -> 1.0" in err


def test_distill_needs_teacher_name_only_without_a_run_config(teacher_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "teacher.pt").write_bytes((teacher_dir / CHECKPOINT_NAME).read_bytes())
    err = one_error_line(invoke("distill", "--dataset", "digits", "--teacher-checkpoint", bare / "teacher.pt",
                                *COMMON, "--out", tmp_path / "s"))
    assert "--teacher" in err and "config.json" in err


def test_cli_resume_refusals_and_overwrite(teacher_dir, tmp_path):
    run = tmp_path / "t"
    base = ["train-teacher", "--dataset", "digits", "--model", "teacher_s", *TINY_ARGS, *COMMON, "--out", run]
    assert invoke(*base, "--epochs", "1").exit_code == 0
    err = one_error_line(invoke(*base, "--epochs", "3", "--resume"))
    assert "train.epochs: 1 -> 3" in err and "cannot be extended" in err
    err = one_error_line(invoke(*base[:5], "--model-arg", "widths=[8, 8]", "--model-arg", "depths=[1, 1]", *base[9:],
                                "--epochs", "1", "--resume"))
    assert "model.widths: [4, 8] -> [8, 8]" in err
    # Another dataset is refused before its data is loaded (there is none under this --data-dir).
    err = one_error_line(invoke("--data-dir", tmp_path / "no-data", *base[:2], "mnist", *base[3:], "--epochs", "1",
                                "--resume"))
    assert 'dataset: "digits" -> "mnist"' in err
    err = one_error_line(invoke(*base, "--epochs", "1"))
    assert "already holds" in err and "--overwrite" in err
    assert invoke(*base, "--epochs", "2", "--overwrite").exit_code == 0
    assert load_checkpoint(run / CHECKPOINT_NAME)["epoch"] == 2


@pytest.mark.parametrize("args, want", [
    (["--resume", "true"], ["--resume"]), (["--resume", "No"], []), (["--resume=yes"], ["--resume"]),
    (["--resume=0", "--out", "x"], ["--out", "x"]), (["--resume", "--out", "x"], ["--resume", "--out", "x"]),
    (["-q", "1", "demo"], ["-q", "demo"]), (["--out", "true"], ["--out", "true"]),
])
def test_bool_flags_accept_the_usual_spellings(args, want):
    assert normalize_bool_flags(args) == want


def test_resume_true_is_accepted_on_the_command_line(teacher_dir):
    base = ["train-teacher", "--dataset", "digits", "--model", "teacher_s", *TINY_ARGS, "--epochs", "1", *COMMON,
            "--out", teacher_dir]
    assert invoke(*base, "--resume", "true").exit_code == 0  # the finished run, resumed: nothing to train
    r = invoke(*base, "--resume", "maybe")
    assert r.exit_code == 2 and "maybe" in r.output


def test_version():
    r = invoke("--version")
    assert r.exit_code == 0 and r.output.strip() == f"ued-fast {__version__}"


def test_piped_run_prints_a_progress_line_per_epoch(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "ued_fast.cli", "train-teacher", "--dataset", "digits", "--model",
                        "teacher_s", *TINY_ARGS, "--epochs", "2", "--train-subset", "160", "--device", "cpu",
                        "--out", str(tmp_path / "t")], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.splitlines()
    log = [json.loads(line) for line in (tmp_path / "t" / LOG_NAME).read_text().splitlines()]
    for i, entry in enumerate(log):
        line = next(l for l in lines if f"epoch {i + 1}/2" in l)
        assert f"loss {entry['loss']:.4f}" in line and f"val acc {100 * entry['val_acc']:.2f}%" in line
        assert "elapsed" in line and "ETA" in line
    assert lines.index(next(l for l in lines if "epoch 1/2" in l)) < lines.index(
        next(l for l in lines if "epoch 2/2" in l)) < len(lines) - 1  # before the final summary line
