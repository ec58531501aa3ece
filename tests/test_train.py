"""Training loop, augmentation, checkpoints/resume and the experiment, on tiny digits runs."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ued_fast import augment as A
from ued_fast.checkpoint import atomic_write, load_checkpoint, save_checkpoint
from ued_fast.experiment import ROW_TITLES, load_config, run_experiment
from ued_fast.models import build_model
from ued_fast.train import (CHECKPOINT_NAME, LOG_NAME, Interrupted, RunOptions, TrainConfig, WarmupLinearDecay,
                            distill, fit, load_splits, set_deterministic, train_teacher, _ce_step)

REPO = Path(__file__).resolve().parent.parent
TINY = {"widths": [4, 8], "depths": [1, 1]}  # a few hundred parameters: fast on any CPU


@pytest.fixture(scope="module")
def splits():
    return load_splits("digits", "cpu", val_fraction=0.2, seed=0, train_subset=320)


def tiny_model(splits, seed=0, arch=TINY):
    torch.manual_seed(seed)
    return build_model("teacher_s", splits.num_classes, splits.in_channels, splits.image_size, **arch)


# --- augmentation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["reflect", "zeros"])
def test_random_crop_is_a_window_of_the_padded_image(mode):
    gen = A.make_generator(0, "cpu")
    x = torch.randn(9, 3, 7, 5)
    out = A.random_crop(x, 2, mode, gen)
    padded = torch.nn.functional.pad(x, (2,) * 4, mode="reflect" if mode == "reflect" else "constant")
    assert out.shape == x.shape
    offsets = set()
    for i in range(x.shape[0]):
        windows = [(dy, dx) for dy in range(5) for dx in range(5)
                   if torch.equal(padded[i, :, dy:dy + 7, dx:dx + 5], out[i])]
        assert windows, f"image {i} is not a crop of its padded image"
        offsets.add(windows[0])
    assert len(offsets) > 1  # offsets are drawn per image


def test_augment_is_seeded_and_flip_mirrors():
    x = torch.randint(0, 256, (64, 1, 6, 6), dtype=torch.uint8)
    aug = A.Augmenter([0.5], [0.25], A.AugmentConfig(crop_padding=1, flip=True), "cpu")
    a = aug.train_batch(x, A.make_generator(3, "cpu"))
    b = aug.train_batch(x, A.make_generator(3, "cpu"))
    assert torch.equal(a, b)
    assert not torch.equal(a, aug.train_batch(x, A.make_generator(4, "cpu")))
    flipped = A.random_flip(torch.arange(2 * 3.0).view(1, 1, 2, 3).expand(200, 1, 2, 3), A.make_generator(0, "cpu"))
    n_flipped = (flipped[:, 0, 0, 0] == 2).sum().item()
    assert 50 < n_flipped < 150 and torch.equal(flipped[flipped[:, 0, 0, 0] == 2][0, 0, 0], torch.tensor([2.0, 1.0, 0.0]))
    norm = aug.eval_batch(torch.tensor([[[[0, 255]]]], dtype=torch.uint8))
    assert torch.allclose(norm, torch.tensor([[[[-2.0, 2.0]]]]))


def test_augment_config_rejects_bad_values():
    with pytest.raises(ValueError, match="crop_padding"):
        A.AugmentConfig(crop_padding=-1)
    with pytest.raises(ValueError, match="padding_mode"):
        A.AugmentConfig(padding_mode="wrap")


def test_permutation_shards_cover_every_image_once():
    shards = [A.epoch_permutation(103, A.make_generator(5, "cpu"), "cpu", rank, 4) for rank in range(4)]
    assert sorted(torch.cat(shards).tolist()) == list(range(103))
    assert A.batch_slices(10, 4) == [slice(0, 4), slice(4, 8)]
    assert A.batch_slices(3, 4) == [slice(0, 3)]


def test_schedule_warms_up_then_decays_to_zero():
    sched = WarmupLinearDecay(100, 0.1)
    values = [sched(i) for i in range(101)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[10:], values[11:])) and values[100] == 0.0


def test_train_config_rejects_bad_values():
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=float("nan"))


# --- checkpoints ----------------------------------------------------------------------------------

def test_atomic_write_keeps_old_file_when_writer_fails(tmp_path):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"a": 1})

    def broken(f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(path, broken)
    assert load_checkpoint(path) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temp file left


# --- the loop -------------------------------------------------------------------------------------

def test_training_learns_and_logs(splits, tmp_path):
    cfg = TrainConfig(epochs=3, batch_size=32, lr=0.1)
    r = train_teacher(tiny_model(splits), splits, cfg, A.AugmentConfig(), RunOptions(run_dir=tmp_path, quiet=True))
    assert r["test_acc"] > 0.3  # chance is 0.1
    lines = [json.loads(l) for l in (tmp_path / LOG_NAME).read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [1, 2, 3]
    assert set(lines[0]) == {"epoch", "loss", "train_acc", "val_acc", "lr", "seconds"}
    assert lines[-1]["loss"] < lines[0]["loss"]
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)["epoch"] == 3


def _final_weights(run_dir):
    return load_checkpoint(Path(run_dir) / CHECKPOINT_NAME)["model"]


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


class _Fail(Exception):
    pass


@pytest.mark.parametrize("how, stop_at", [("crash", 2), ("sigint", 2), ("sigint", 0)])
def test_resume_gives_the_same_weights_as_a_straight_run(splits, tmp_path, how, stop_at):
    """Straight 3 epochs vs. stopped in epoch 2 (a crash: resume from the end-of-epoch-1 checkpoint; or
    Ctrl-C: a mid-epoch checkpoint, or one taken before the first step of epoch 2, after its permutation
    was drawn) and resumed: bitwise the same weights (CPU, deterministic)."""
    set_deterministic(True)
    try:
        cfg = TrainConfig(epochs=3, batch_size=64, lr=0.1)
        aug = A.AugmentConfig(crop_padding=1)
        straight = fit(tiny_model(splits), splits, cfg, aug, RunOptions(run_dir=tmp_path / "a", quiet=True),
                       _ce_step(0.0))

        calls = {"n": 0}
        steps_per_epoch = len(A.batch_slices(splits.train_x.shape[0], 64))
        base = _ce_step(0.0)

        def stopping_step(model, x, y):
            calls["n"] += 1
            if calls["n"] == steps_per_epoch + stop_at:
                if how == "crash":
                    raise _Fail
                os.kill(os.getpid(), signal.SIGINT)  # handled: the loop stops before the next step
            return base(model, x, y)

        opts = RunOptions(run_dir=tmp_path / "b", quiet=True)
        with pytest.raises(_Fail if how == "crash" else Interrupted):
            fit(tiny_model(splits), splits, cfg, aug, opts, stopping_step)
        ck = load_checkpoint(tmp_path / "b" / CHECKPOINT_NAME)
        assert (ck["epoch"], ck["step"]) == (1, 0 if how == "crash" else stop_at)
        assert (ck["perm"] is None) == (how == "crash")
        opts.resume = True
        resumed = fit(tiny_model(splits, seed=123), splits, cfg, aug, opts, base)  # other init: must be overwritten
    finally:
        set_deterministic(False)
    _assert_same_weights(_final_weights(tmp_path / "a"), _final_weights(tmp_path / "b"))
    assert resumed["test_acc"] == straight["test_acc"]
    assert [e["epoch"] for e in resumed["log"]] == [1, 2, 3]
    assert [e["loss"] for e in resumed["log"]] == pytest.approx([e["loss"] for e in straight["log"]])


def test_distill_freezes_the_teacher_and_beats_chance(splits):
    arch = {"widths": [8, 16], "depths": [1, 1]}
    teacher = tiny_model(splits, seed=1, arch=arch)
    cfg = TrainConfig(epochs=4, batch_size=32, lr=0.1)
    train_teacher(teacher, splits, cfg, A.AugmentConfig(), RunOptions(quiet=True))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    r = distill(tiny_model(splits, arch=arch), teacher, splits, cfg, A.AugmentConfig(), RunOptions(quiet=True),
                temperature=4.0, alpha=0.9)
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    _assert_same_weights(before, teacher.state_dict())  # BatchNorm running stats untouched too
    assert r["test_acc"] > 0.35 and r["log"][-1]["loss"] < r["log"][0]["loss"]


def _cli(*args, **kw):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-m", "ued_fast.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_sigkill_mid_run_then_resume_finishes_like_a_straight_run(tmp_path):
    common = ["train-teacher", "--dataset", "digits", "--model", "teacher_s", "--model-arg", "widths=[4, 8]",
              "--model-arg", "depths=[1, 1]", "--epochs", "6", "--batch-size", "16", "--train-subset", "400",
              "--deterministic", "--quiet", "--device", "cpu"]
    killed = tmp_path / "killed"
    proc = _cli(*common, "--out", str(killed))
    log = killed / LOG_NAME
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 2:
            break
        time.sleep(0.02)
    if proc.poll() is not None:
        pytest.fail(f"run ended before it could be killed: {proc.communicate()}")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    epochs_done = load_checkpoint(killed / CHECKPOINT_NAME)["epoch"]
    assert 2 <= epochs_done < 6
    resumed = _cli(*common, "--out", str(killed), "--resume")
    straight = _cli(*common, "--out", str(tmp_path / "straight"))
    for p in (resumed, straight):
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    ck = load_checkpoint(killed / CHECKPOINT_NAME)
    assert ck["epoch"] == 6 and [e["epoch"] for e in ck["log"]] == [1, 2, 3, 4, 5, 6]
    assert [json.loads(l)["epoch"] for l in log.read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    _assert_same_weights(ck["model"], _final_weights(tmp_path / "straight"))
    assert json.loads((killed / "result.json").read_text())["test_acc"] == \
        json.loads((tmp_path / "straight" / "result.json").read_text())["test_acc"]


# --- the experiment -------------------------------------------------------------------------------

def tiny_experiment_config(**extra):
    over = {
        "seeds": [0, 1], "train_subset": 240, "quiet": True, "device": "cpu",
        "rows": ["scratch", "sweep", "kd_generalist", "kd_uste_v1", "kd_uste_v2"],
        "student": {"name": "teacher_s", **TINY},
        "sweep": [{"label": "t_small", "name": "teacher_s", "widths": [4, 8], "depths": [1, 1]},
                  {"label": "t_big", "name": "teacher_s", "widths": [8, 16], "depths": [1, 1]}],
        "generalist": {"name": "generalist_ensemble", "width": 4, "depth": 1, "stages": 2},
        "uste_v1": {"name": "uste_v1", "width": 4, "depth": 1, "stages": 2},
        "uste_v2": {"name": "uste_v2", "width": 4, "depth": 1, "stages": 2},
        "train": {"epochs": 2, "batch_size": 32, "lr": 0.1}, "teacher_train": {"epochs": 2},
    }
    over.update(extra)
    return load_config("demo", over)


def test_tiny_experiment_writes_every_row(tmp_path):
    cfg = tiny_experiment_config()
    results = run_experiment(cfg, tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["runs"] == json.loads(json.dumps(results["runs"]))
    students = saved["summary"]["students"]
    assert set(students) == set(ROW_TITLES) | {"kd_t_small"}
    assert set(saved["summary"]["teachers"]) == {"t_small", "t_big", "generalist", "uste_v1", "uste_v2"}
    assert students["kd_strong"]["teacher"] == "t_big"
    for r in saved["runs"]:
        assert 0.0 <= r["test_acc"] <= 1.0 and 0.0 <= r["val_acc"] <= 1.0
        assert r["params"] > 0 and r["train_seconds"] > 0 and len(r["log"]) == 2
        if r["kind"] == "teacher":
            assert 0.0 <= r["entropy"] <= math.log(10) + 1e-6
        else:
            assert ("teacher" in r) == (r["row"] != "scratch")
    # Every student row starts from the same weights: same parameter count everywhere.
    assert len({s["params"] for s in students.values()}) == 1
    assert all(s["seeds"] == 2 for s in students.values())
    md = (tmp_path / "results.md").read_text()
    for title in ROW_TITLES.values():
        assert title in md
    assert "t_small" in md and "±" in md
    for png in ("accuracy.png", "learning_curves.png", "entropy_vs_student.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {"torch", "python"} <= set(saved["versions"]) and saved["device"].startswith("cpu")

    # Resume skips finished runs and reproduces the same summary.
    again = run_experiment(cfg, tmp_path, resume=True)
    assert again["summary"]["students"] == results["summary"]["students"]
