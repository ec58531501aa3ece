"""The ued-fast command line: bad input gives one clear line and exit code 2; --set parsing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import assert_one_line_cli_error
from ued_fast.cli import app
from ued_fast.experiment import ConfigError, load_config, packaged_configs, parse_set

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, list(args))


def test_parse_set_nests_keys_and_parses_yaml_values():
    got = parse_set(["train.epochs=3", "kd.temperature=2.5", "seeds=[0, 1]", "name=abc", "kd.backend=null",
                     "student.widths=[8, 16]"])
    assert got == {"train": {"epochs": 3}, "kd": {"temperature": 2.5, "backend": None}, "seeds": [0, 1],
                   "name": "abc", "student": {"widths": [8, 16]}}
    assert parse_set(["note=a=b"]) == {"note": "a=b"}


@pytest.mark.parametrize("item, needle", [("epochs", "key=value"), ("=3", "empty key"), ("train..lr=1", "empty key"),
                                          ("seeds=[0, 1", "not valid YAML")])
def test_parse_set_rejects_malformed_items(item, needle):
    with pytest.raises(ConfigError, match=needle):
        parse_set([item])


def test_load_config_applies_overrides_and_checks_keys():
    cfg = load_config("demo", parse_set(["train.epochs=1", "seeds=[5]"]))
    assert cfg["train"]["epochs"] == 1 and cfg["seeds"] == [5]
    assert cfg["train"]["batch_size"] == 128  # untouched keys kept from the file
    with pytest.raises(ConfigError, match="train.epoch"):
        load_config("demo", parse_set(["train.epoch=1"]))
    with pytest.raises(ConfigError, match="kd.alpha"):
        load_config("demo", parse_set(["kd.alpha=2"]))
    with pytest.raises(ConfigError, match="unknown model 'nope'"):
        load_config("demo", parse_set(["uste_v1.name=nope"]))


@pytest.mark.parametrize("name", ["demo", "mnist", "fashion_mnist", "fashion_mnist_cpu", "cifar10",
                                  "fashion_mnist_claim", "cifar10_claim"])
def test_packaged_configs_are_valid(name):
    assert name in packaged_configs()
    cfg = load_config(name)
    assert {k: cfg["kd"][k] for k in ("temperature", "alpha", "backend")} == {
        "temperature": 4.0, "alpha": 0.9, "backend": None}
    assert len(cfg["seeds"]) == (5 if name in ("demo", "fashion_mnist_claim", "cifar10_claim") else 3)


def test_cifar10_config_student_is_about_107k_parameters():
    from ued_fast.models import build_model, count_parameters

    cfg = load_config("cifar10")
    spec = {k: v for k, v in cfg["student"].items() if k not in ("name", "label")}
    n = count_parameters(build_model(cfg["student"]["name"], 10, 3, 32, **spec))
    assert 90_000 <= n <= 125_000


def test_missing_config_file(tmp_path):
    assert_one_line_cli_error(invoke("experiment", "--config", str(tmp_path / "nope.yaml")), "nope.yaml", "not found")


def test_bad_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset: [digits\n")
    assert_one_line_cli_error(invoke("experiment", "--config", str(bad)), "bad.yaml", "not valid YAML")
    notmap = tmp_path / "list.yaml"
    notmap.write_text("- 1\n- 2\n")
    assert_one_line_cli_error(invoke("experiment", "--config", str(notmap)), "list.yaml", "mapping")


def test_bad_set_and_unknown_key():
    assert_one_line_cli_error(invoke("demo", "--set", "train.epochs"), "--set", "key=value")
    assert_one_line_cli_error(invoke("demo", "--set", "train.nope=1"), "train.nope")


def test_unknown_dataset_and_model(tmp_path):
    assert_one_line_cli_error(invoke("demo", "--set", "dataset=nope-set", "--out", str(tmp_path)), "nope-set")
    assert_one_line_cli_error(
        invoke("train-teacher", "--dataset", "digits", "--model", "nope", "--out", str(tmp_path)), "--model", "nope")
    assert_one_line_cli_error(
        invoke("train-teacher", "--dataset", "nope-set", "--model", "student", "--out", str(tmp_path)), "nope-set")


def test_bad_seeds_and_device(tmp_path):
    assert_one_line_cli_error(invoke("demo", "--seeds", "a,b", "--out", str(tmp_path)), "--seeds")
    assert_one_line_cli_error(invoke("demo", "--device", "tpu9", "--out", str(tmp_path)), "--device")


def test_distill_needs_an_existing_teacher_checkpoint(tmp_path):
    assert_one_line_cli_error(invoke("distill", "--dataset", "digits", "--teacher", "teacher_s", "--teacher-checkpoint",
                                     str(tmp_path / "missing.pt"), "--out", str(tmp_path)), "--teacher-checkpoint")


def test_train_teacher_then_distill_end_to_end(tmp_path):
    arch = ["--model-arg", "widths=[4, 8]", "--model-arg", "depths=[1, 1]"]
    r = invoke("--quiet", "train-teacher", "--dataset", "digits", "--model", "teacher_s", *arch, "--epochs", "1",
               "--train-subset", "200", "--out", str(tmp_path / "t"))
    assert r.exit_code == 0, r.output
    assert "test acc" in r.output and (tmp_path / "t" / "checkpoint.pt").exists()
    r = invoke("--quiet", "distill", "--dataset", "digits", "--student", "teacher_s", "--student-arg", "widths=[4, 8]",
               "--student-arg", "depths=[1, 1]", "--teacher", "teacher_s", "--teacher-arg", "widths=[4, 8]",
               "--teacher-arg", "depths=[1, 1]", "--teacher-checkpoint", str(tmp_path / "t" / "checkpoint.pt"),
               "--epochs", "1", "--train-subset", "200", "--out", str(tmp_path / "s"))
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "s" / "result.json").read_text())
    assert result["kind"] == "student" and 0 <= result["test_acc"] <= 1
    # A checkpoint that does not fit the named teacher is a clear error.
    bad_fit = invoke("distill", "--dataset", "digits", "--teacher", "teacher_xl", "--teacher-checkpoint",
                     str(tmp_path / "t" / "checkpoint.pt"), "--out", str(tmp_path / "x"))
    assert_one_line_cli_error(bad_fit, "does not fit")


def test_real_process_prints_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, "-m", "ued_fast.cli", "experiment", "--config", str(tmp_path / "x.yaml")],
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "x.yaml" in p.stderr and "Traceback" not in p.stderr
