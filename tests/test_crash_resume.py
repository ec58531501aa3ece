"""Crash safety of real training processes: SIGKILL at random moments (and inside a checkpoint
write), SIGINT, then `--resume`.

Every run is `python -m ued_fast.cli train-teacher|distill` on sklearn's digits with a tiny model on
CPU in --deterministic mode, so a resumed run must end with bitwise the weights of a straight run.
What is checked after every kill: the checkpoint (if any) loads, it holds every epoch the run had
logged as finished (so a kill loses less than one epoch), and the finished run has exactly the
requested epochs.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ued_fast.checkpoint import load_checkpoint
from ued_fast.train import CHECKPOINT_NAME, LOG_NAME

REPO = Path(__file__).resolve().parent.parent
EPOCHS = 3
ARCH = ["widths=[4, 8]", "depths=[1, 1]"]
COMMON = ["--dataset", "digits", "--epochs", str(EPOCHS), "--batch-size", "16", "--train-subset", "240",
          "--lr", "0.1", "--deterministic", "--quiet", "--device", "cpu"]
TEACHER = ["train-teacher", "--model", "teacher_s", *[a for x in ARCH for a in ("--model-arg", x)], *COMMON]
EXIT_INTERRUPTED = 130

# Runs a CLI command with atomic_write slowed down on one chosen checkpoint write: it writes the first
# half of the checkpoint's bytes into the temporary file, signals that through a marker file and
# stalls, so the test can SIGKILL the process in the middle of a checkpoint write.
STALLING_LAUNCHER = r"""
import io, os, sys, time
import ued_fast.checkpoint as ck
marker, stall_at = os.environ["UED_TEST_MARKER"], int(os.environ["UED_TEST_STALL_AT"])
real_atomic_write, calls = ck.atomic_write, [0]
def atomic_write(path, write, mode="wb"):
    calls[0] += os.path.basename(path) == "checkpoint.pt"
    if os.path.basename(path) != "checkpoint.pt" or calls[0] != stall_at:
        return real_atomic_write(path, write, mode)
    def half_then_stall(f):
        buf = io.BytesIO(); write(buf); data = buf.getvalue()
        f.write(data[: len(data) // 2]); f.flush(); os.fsync(f.fileno())
        open(marker, "w").close()
        time.sleep(600)
        f.write(data[len(data) // 2 :])
    return real_atomic_write(path, half_then_stall, mode)
ck.atomic_write = atomic_write
from ued_fast.cli import app
app(sys.argv[1:], prog_name="ued-fast")
"""


# Runs a CLI command with every training step slowed by UED_TEST_STEP_SLEEP seconds (the numbers are
# untouched), so that a signal sent after the first epoch surely lands inside the training loop.
SLOW_STEP_LAUNCHER = r"""
import os, sys, time
import ued_fast.augment as augment
pause, real_train_batch = float(os.environ["UED_TEST_STEP_SLEEP"]), augment.Augmenter.train_batch
first_step = os.environ.get("UED_TEST_FIRST_STEP")
def train_batch(self, images, gen):
    if first_step and not os.path.exists(first_step):
        open(first_step, "w").close()
    time.sleep(pause)
    return real_train_batch(self, images, gen)
augment.Augmenter.train_batch = train_batch
from ued_fast.cli import app
app(sys.argv[1:], prog_name="ued-fast")
"""


def _env(**extra):
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1", **extra}


def _start(args, out: Path, *, resume=False, launcher=None, env=None):
    cmd = [sys.executable, "-c", launcher] if launcher else [sys.executable, "-m", "ued_fast.cli"]
    cmd += [*args, "--out", str(out)] + (["--resume"] if resume else [])
    return subprocess.Popen(cmd, env=env or _env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}: {err[-2000:]}"
    return out, err


def _logged_epochs(run: Path) -> list[int]:
    log = run / LOG_NAME
    return [json.loads(line)["epoch"] for line in log.read_text().splitlines()] if log.exists() else []


def _check_after_kill(run: Path, logged_before_kill: int) -> int:
    """The checkpoint loads and holds at least every epoch logged before the kill; returns its epoch."""
    ckpt = run / CHECKPOINT_NAME
    if not ckpt.exists():
        assert logged_before_kill == 0, "epochs were logged but no checkpoint exists"
        return 0
    state = load_checkpoint(ckpt)  # never corrupt: raises if it were
    assert state["epoch"] >= logged_before_kill, "the kill lost a finished epoch"
    assert state["step"] == 0 and len(state["log"]) == state["epoch"]
    return state["epoch"]


def _check_finished(run: Path, straight: Path):
    state = load_checkpoint(run / CHECKPOINT_NAME)
    assert state["epoch"] == EPOCHS and [e["epoch"] for e in state["log"]] == list(range(1, EPOCHS + 1))
    assert _logged_epochs(run) == list(range(1, EPOCHS + 1))
    want = load_checkpoint(straight / CHECKPOINT_NAME)
    assert state["model"].keys() == want["model"].keys()
    for name, tensor in want["model"].items():
        assert torch.equal(state["model"][name], tensor), f"{name} differs from the uninterrupted run"
    got, ref = (json.loads((r / "result.json").read_text()) for r in (run, straight))
    assert (got["val_acc"], got["test_acc"]) == (ref["val_acc"], ref["test_acc"])
    # An epoch split by Ctrl-C sums its loss in two float32 parts: equal up to that rounding.
    assert [e["loss"] for e in state["log"]] == pytest.approx([e["loss"] for e in want["log"]], rel=1e-6)
    assert [e["train_acc"] for e in state["log"]] == [e["train_acc"] for e in want["log"]]


STEP_SLEEP = "0.02"


def _start_slow(args, out: Path, marker: Path, *, resume=False):
    """A run whose training steps take >= STEP_SLEEP s each; `marker` appears at its first step."""
    marker.unlink(missing_ok=True)
    return _start(args, out, resume=resume, launcher=SLOW_STEP_LAUNCHER,
                  env=_env(UED_TEST_STEP_SLEEP=STEP_SLEEP, UED_TEST_FIRST_STEP=str(marker)))


def _wait_for(path: Path, proc, timeout=300):
    deadline = time.monotonic() + timeout
    while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    return path.exists()


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Uninterrupted teacher and (from that teacher) distillation runs, and how long training takes
    (first step to exit) with slowed steps."""
    root = tmp_path_factory.mktemp("straight")
    marker = root / "first_step"
    proc = _start_slow(TEACHER, root / "teacher", marker)
    assert _wait_for(marker, proc), proc.communicate()[1][-2000:]
    t0 = time.monotonic()
    _finish(proc)
    train_seconds = time.monotonic() - t0
    distill_args = _distill_args(root / "teacher" / CHECKPOINT_NAME)
    _finish(_start(distill_args, root / "student"))
    return {"teacher": root / "teacher", "student": root / "student", "seconds": train_seconds,
            "distill_args": distill_args}


def _distill_args(teacher_ckpt: Path) -> list[str]:
    return ["distill", "--student", "student_small", "--teacher", "teacher_s",
            *[a for x in ARCH for a in ("--teacher-arg", x)], "--teacher-checkpoint", str(teacher_ckpt),
            "--temperature", "3", "--alpha", "0.7", *COMMON]


def _kill_at_random_then_resume(args, run: Path, straight_run: Path, seconds: float, seed: int, kills: int):
    """`kills` times: start (or resume) the run, SIGKILL it at a uniformly random moment of its
    training (from its first step to a little past the time a whole run takes), check the checkpoint."""
    rng = random.Random(seed)
    marker = run.parent / f"first_step_{seed}"
    for _ in range(kills):
        proc = _start_slow(args, run, marker, resume=True)  # --resume on an empty folder starts fresh
        _wait_for(marker, proc)
        time.sleep(rng.uniform(0.0, 1.1 * seconds))
        logged = len(_logged_epochs(run))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        _check_after_kill(run, logged)
    _finish(_start(args, run, resume=True))
    _check_finished(run, straight_run)


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_teacher_survives_random_sigkills(straight, tmp_path, seed):
    _kill_at_random_then_resume(TEACHER, tmp_path / "run", straight["teacher"], straight["seconds"], seed, kills=2)


def test_distill_survives_a_random_sigkill(straight, tmp_path):
    _kill_at_random_then_resume(straight["distill_args"], tmp_path / "run", straight["student"],
                                straight["seconds"], seed=7, kills=1)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(2, 8))
def test_teacher_survives_many_random_sigkills(straight, tmp_path, seed):
    _kill_at_random_then_resume(TEACHER, tmp_path / "run", straight["teacher"], straight["seconds"], seed, kills=4)


@pytest.mark.parametrize("stall_at", [pytest.param(1, marks=pytest.mark.slow), 2])
def test_sigkill_inside_a_checkpoint_write_keeps_the_previous_checkpoint(straight, tmp_path, stall_at):
    """Killed with half of the end-of-epoch-`stall_at` checkpoint's bytes in the temporary file."""
    run, marker = tmp_path / "run", tmp_path / "stalled"
    proc = _start(TEACHER, run, launcher=STALLING_LAUNCHER,
                  env=_env(UED_TEST_MARKER=str(marker), UED_TEST_STALL_AT=str(stall_at)))
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert marker.exists(), f"the run never reached checkpoint write {stall_at}: {proc.communicate()[1][-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = list(run.glob(f".{CHECKPOINT_NAME}.*.tmp"))
    assert len(partial) == 1, "the kill should have left the half-written temporary file"
    with pytest.raises(Exception):
        torch.load(partial[0], weights_only=False)  # what a non-atomic write would have left behind
    assert _check_after_kill(run, len(_logged_epochs(run))) == stall_at - 1
    _finish(_start(TEACHER, run, resume=True))
    _check_finished(run, straight["teacher"])


def test_sigint_saves_and_exits_130_then_resume_matches(straight, tmp_path):
    run = tmp_path / "run"
    proc = _start(TEACHER, run, launcher=SLOW_STEP_LAUNCHER, env=_env(UED_TEST_STEP_SLEEP="0.05"))
    deadline = time.monotonic() + 300
    while not _logged_epochs(run) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, (proc.returncode, err)
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("ued-fast: error: interrupted") and "--resume" in last, err
    state = load_checkpoint(run / CHECKPOINT_NAME)
    assert state["epoch"] == 1 and state["step"] > 0, "the checkpoint should be taken in epoch 2"
    _finish(_start(TEACHER, run, resume=True))
    _check_finished(run, straight["teacher"])
