"""Multi-process training helpers (ued_fast.distributed): sharding, collectives, DDP equivalence.

The multi-process tests start 2 processes on CPU with the gloo backend on a free loopback port.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from ued_fast import distributed as D

WORLD = 2


# --- single-process properties ---------------------------------------------------------------------

@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n,batch", [(1, 1), (10, 4), (17, 5), (64, 64), (9, 8), (13, 4)])
def test_rank_batches_partition_every_global_batch(world, n, batch):
    if batch < world:
        with pytest.raises(ValueError, match="batch_size"):
            list(D.rank_batches(torch.arange(n), batch, 0, world))
        return
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(n))
    per_rank = [list(D.rank_batches(perm, batch, r, world)) for r in range(world)]
    steps = len(per_rank[0])
    assert all(len(p) == steps for p in per_rank), "every rank must take the same number of steps"
    seen = []
    for step in range(steps):
        parts = [per_rank[r][step][0] for r in range(world)]
        global_n = per_rank[0][step][1]
        assert all(per_rank[r][step][1] == global_n for r in range(world))
        sizes = [len(p) for p in parts]
        assert sum(sizes) == global_n and min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
        glued = torch.cat(parts)
        assert torch.equal(glued, perm[step * batch: step * batch + global_n]), "ranks must cover the step in order"
        seen.append(glued)
    covered = torch.cat(seen) if seen else torch.empty(0, dtype=perm.dtype)
    # Only a final batch smaller than the world size is dropped.
    tail = n - len(covered)
    assert tail == (n % batch if 0 < n % batch < world else 0)


def test_drop_last_drops_every_partial_batch():
    batches = D.global_batches(torch.arange(10), 4, 1, drop_last=True)
    assert [len(b) for b in batches] == [4, 4]


def test_loss_scale_turns_rank_means_into_the_global_mean():
    losses = torch.randn(7, dtype=torch.float64)
    parts = torch.tensor_split(losses, 2)
    ddp_average = sum(p.mean() * D.loss_scale(len(p), 7, 2) for p in parts) / 2
    assert torch.allclose(ddp_average, losses.mean())


def test_single_process_without_torchrun_env(monkeypatch):
    for var in D.TORCHRUN_VARS:
        monkeypatch.delenv(var, raising=False)
    info = D.init_from_env("cpu")
    assert (info.rank, info.world_size, info.distributed, info.is_main) == (0, 1, False, True)
    model = nn.Linear(2, 2)
    assert D.wrap_model(model, info) is model and D.unwrap(model) is model
    assert D.all_reduce_sums({"a": 2.0, "b": torch.tensor(3)}) == {"a": 2.0, "b": 3.0}
    assert D.broadcast_object({"x": 1}) == {"x": 1}
    D.barrier()  # a no-op


@pytest.mark.parametrize("env,word", [
    ({"RANK": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK"),
    ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK=2"),
    ({"RANK": "0", "WORLD_SIZE": "-1", "LOCAL_RANK": "0"}, "WORLD_SIZE"),
])
def test_bad_torchrun_env_names_the_variable(monkeypatch, env, word):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match=word):
        D.init_from_env("cpu")


def test_bad_device_and_rank_arguments():
    with pytest.raises(ValueError, match="device"):
        D.init_from_env("meta")
    with pytest.raises(ValueError, match="rank"):
        D.shard(torch.arange(4), 2, 2)
    with pytest.raises(ValueError, match="batch_size"):
        D.global_batches(torch.arange(4), 0)
    with pytest.raises(ValueError, match="CUDA"):
        D.wrap_model(nn.BatchNorm1d(2), D.DistInfo(rank=0, world_size=2), sync_batchnorm=True)


# --- two gloo processes ----------------------------------------------------------------------------

def _mlp(seed: int, batchnorm: bool) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(5, 8)] + ([nn.BatchNorm1d(8)] if batchnorm else []) + [nn.Tanh(), nn.Linear(8, 3)]
    return nn.Sequential(*layers).double()


def _data(n=23):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _train(model, x, y, batch, rank, world, steps_epochs=2):
    """Plain SGD over 2 epochs with the shared-permutation sharding; returns summed metrics."""
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    totals = {}
    for epoch in range(steps_epochs):
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(100 + epoch))
        sums = {"loss": 0.0, "correct": 0.0, "n": 0.0}
        for idx, global_n in D.rank_batches(perm, batch, rank, world):
            out = model(x[idx])
            loss = nn.functional.cross_entropy(out, y[idx])
            opt.zero_grad()
            (loss * D.loss_scale(len(idx), global_n, world)).backward()
            opt.step()
            sums["loss"] += float(loss.detach()) * len(idx)
            sums["correct"] += float((out.argmax(1) == y[idx]).sum())
            sums["n"] += len(idx)
        totals = D.all_reduce_sums(sums)
    return totals


def _worker(rank: int, port: int, out_dir: str):
    """Everything the 2-process tests check, in one spawn (starting processes is the slow part)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    info = D.init_from_env("cpu")
    try:
        assert info.distributed and info.rank == rank and D.current().world_size == WORLD
        sums = D.all_reduce_sums({"rank": rank, "one": 1})
        assert sums == {"rank": 0 + 1, "one": 2}, sums
        assert D.any_rank(rank == 1) and not D.any_rank(False)
        assert D.broadcast_object(f"from {rank}") == "from 0"
        # main_first: rank 0's write is visible to the others when they enter.
        marker = os.path.join(out_dir, "made_by_rank0")
        with D.main_first():
            if info.is_main:
                with open(marker, "w") as f:
                    f.write("x")
            else:
                assert os.path.exists(marker)
        bn = nn.BatchNorm1d(3)
        bn.running_mean.fill_(float(rank))
        D.broadcast_buffers(bn)
        assert float(bn.running_mean.sum()) == 0.0
        for batchnorm in (False, True):
            model = D.wrap_model(_mlp(0, batchnorm), info)
            assert isinstance(model, nn.parallel.DistributedDataParallel)
            assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
            x, y = _data()
            metrics = _train(model, x, y, batch=6, rank=rank, world=WORLD)
            if info.is_main:  # rank-0-only write
                torch.save({"state": D.unwrap(model).state_dict(), "metrics": metrics},
                           os.path.join(out_dir, f"mlp_bn{int(batchnorm)}.pt"))
        for kind in ("teacher", "distill"):
            result = _fit_run(os.path.join(out_dir, kind), kind)
            if info.is_main:
                torch.save({k: v for k, v in result.items() if k != "test_outputs"},
                           os.path.join(out_dir, kind, "fit.pt"))
        D.barrier()
    finally:
        D.cleanup()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(D.free_port(), str(out)), nprocs=WORLD, join=True)
    return out


@pytest.mark.parametrize("batchnorm", [False, True], ids=["no_bn", "batchnorm"])
def test_two_gloo_processes_match_one_process(two_processes, batchnorm):
    got = torch.load(two_processes / f"mlp_bn{int(batchnorm)}.pt")
    single = _mlp(0, batchnorm)
    x, y = _data()
    want = _train(single, x, y, batch=6, rank=0, world=1)
    assert got["metrics"]["n"] == want["n"] == 23  # 23 = 3 full batches of 6 and one of 5
    if not batchnorm:
        # Same samples per step, gradients averaged into the global mean: equal up to summation order.
        for name, p in single.state_dict().items():
            torch.testing.assert_close(got["state"][name], p, rtol=1e-10, atol=1e-12, msg=name)
        assert got["metrics"]["correct"] == want["correct"]
        assert got["metrics"]["loss"] == pytest.approx(want["loss"], rel=1e-10)
    else:
        # Per-rank batch statistics (no SyncBatchNorm on CPU) make it a different, close computation.
        diffs = [float((got["state"][k] - v).abs().max()) for k, v in single.state_dict().items()
                 if v.is_floating_point()]
        assert max(diffs) > 1e-9, "per-rank BatchNorm statistics should change the result"
        assert got["metrics"]["loss"] == pytest.approx(want["loss"], rel=0.2)


# --- the training loop under DDP (ued_fast.train.fit, as torchrun runs it) ---------------------------

class _NoBatchNormNet(nn.Module):
    """A small CNN without BatchNorm: DDP must then reproduce one process up to float summation order."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))

    def training_loss(self, images, labels):
        logits = self(images)
        return nn.functional.cross_entropy(logits, labels), logits


def _splits():
    from ued_fast.train import Splits

    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (150, 1, 8, 8), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 4, (150,), generator=g)
    x[y == 1, :, :4] = 255  # something learnable
    x[y == 2, :, :, :4] = 0
    return Splits(name="toy", num_classes=4, train_x=x[:100], train_y=y[:100], val_x=x[100:125], val_y=y[100:125],
                  test_x=x[125:], test_y=y[125:], mean=(0.5,), std=(0.25,))


def _fit_run(run_dir, kind: str):
    """Teacher training (kind 'teacher') or distillation from a fixed teacher (kind 'distill')."""
    from ued_fast import train
    from ued_fast.augment import AugmentConfig

    cfg = train.TrainConfig(epochs=3, batch_size=21, lr=0.1)  # 11 + 10 rows per rank: uneven
    opts = train.RunOptions(run_dir=Path(run_dir), quiet=True, seed=5)
    aug = AugmentConfig(crop_padding=1)
    if kind == "teacher":
        return train.train_teacher(_NoBatchNormNet(0), _splits(), cfg, aug, opts)
    return train.distill(_NoBatchNormNet(1), _NoBatchNormNet(2), _splits(), cfg, aug, opts, temperature=3.0,
                         alpha=0.6, kd_backend="reference")


@pytest.mark.parametrize("kind", ["teacher", "distill"])
def test_fit_on_two_processes_equals_one_process(two_processes, tmp_path, kind):
    from ued_fast.checkpoint import load_checkpoint

    torch.set_num_threads(1)
    single = _fit_run(tmp_path / "one", kind)
    ddp = torch.load(two_processes / kind / "fit.pt", weights_only=False)
    got, want = (load_checkpoint(d / "checkpoint.pt") for d in (two_processes / kind, tmp_path / "one"))
    assert got["model"].keys() == want["model"].keys()  # the plain module's keys, no 'module.' prefix
    for name, p in want["model"].items():
        torch.testing.assert_close(got["model"][name], p, rtol=1e-5, atol=1e-6, msg=name)
    for a, b in zip(ddp["log"], single["log"], strict=True):
        assert a["epoch"] == b["epoch"] and a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert abs(a["train_acc"] - b["train_acc"]) <= 1 / 84  # an argmax near-tie may flip one image
        assert a["val_acc"] == pytest.approx(b["val_acc"], abs=1 / 25)
    assert ddp["test_acc"] == pytest.approx(single["test_acc"], abs=1 / 25)


# --- torchrun end to end: `torchrun --nproc_per_node 2 -m ued_fast.cli ...` --------------------------

REPO = Path(__file__).resolve().parent.parent
CLI_COMMON = ["--dataset", "digits", "--epochs", "4", "--batch-size", "32", "--lr", "0.2", "--train-subset", "600",
              "--deterministic", "--quiet", "--device", "cpu"]
TEACHER_ARCH = ["widths=[8, 16]", "depths=[1, 1]"]
# The models here have BatchNorm, whose batch statistics each rank takes over its 16 of the 32
# images (no SyncBatchNorm on CPU): the two runs are different computations of the same training.
# Measured gaps: final loss 4-20% relative, accuracies 0.5-3 points; the bounds leave room.
LOSS_RTOL, ACC_ATOL = 0.25, 0.06


def _run_cli(args, nproc: int):
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "ued_fast.cli", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(D.free_port()), "-m", "ued_fast.cli", *args]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def _result(run: Path) -> dict:
    import json

    return json.loads((run / "result.json").read_text())


def _close_runs(one: dict, two: dict):
    assert [e["epoch"] for e in two["log"]] == [e["epoch"] for e in one["log"]]
    assert two["log"][-1]["loss"] == pytest.approx(one["log"][-1]["loss"], rel=LOSS_RTOL)
    assert two["log"][-1]["loss"] < two["log"][0]["loss"]  # it trains
    for key in ("val_acc", "test_acc"):
        assert abs(two[key] - one[key]) <= ACC_ATOL, (key, one[key], two[key])


def test_torchrun_teacher_and_distill_match_one_process(tmp_path):
    from ued_fast.checkpoint import load_checkpoint

    teacher = ["train-teacher", "--model", "teacher_s", *[a for x in TEACHER_ARCH for a in ("--model-arg", x)],
               *CLI_COMMON]
    _run_cli(teacher + ["--out", str(tmp_path / "t1")], 1)
    p = _run_cli(teacher + ["--out", str(tmp_path / "t2")], 2)
    assert p.stdout.count("teacher teacher_s on digits") == 1  # rank 0 alone reports
    _close_runs(_result(tmp_path / "t1"), _result(tmp_path / "t2"))
    ckpt = load_checkpoint(tmp_path / "t2" / "checkpoint.pt")
    assert ckpt["epoch"] == 4 and not any(k.startswith("module.") for k in ckpt["model"])

    distill = ["distill", "--student", "student_small", "--teacher", "teacher_s",
               *[a for x in TEACHER_ARCH for a in ("--teacher-arg", x)],
               "--teacher-checkpoint", str(tmp_path / "t1" / "checkpoint.pt"), *CLI_COMMON]
    _run_cli(distill + ["--out", str(tmp_path / "s1")], 1)
    _run_cli(distill + ["--out", str(tmp_path / "s2")], 2)
    _close_runs(_result(tmp_path / "s1"), _result(tmp_path / "s2"))


def test_torchrun_experiment_runs_every_row_on_two_processes(tmp_path):
    """`experiment` is wired by the same run builder as the CLI's single runs, so it trains under
    torchrun too: every row trains, rank 0 alone writes and reports, the folder records 2 processes."""
    import json

    config = tmp_path / "tiny.yaml"
    config.write_text(
        "name: tiny\ndataset: digits\ntrain_subset: 400\nseeds: [0]\nrows: [scratch, kd_uste_v1]\n"
        "student: {name: teacher_s, widths: [4, 8], depths: [1, 1]}\n"
        "uste_v1: {name: uste_v1, width: 4, depth: 1, stages: 2}\n"
        "train: {epochs: 3, batch_size: 32, lr: 0.2}\nteacher_train: {epochs: 3}\n"
        "kd: {views: null}\n")
    out = tmp_path / "run"
    p = _run_cli(["-q", "--device", "cpu", "experiment", "-c", str(config), "--out", str(out), "--deterministic"], 2)
    assert p.stdout.count("wrote ") == 1  # rank 0 alone reports
    results = json.loads((out / "results.json").read_text())
    assert sorted((r["kind"], r["name"]) for r in results["runs"]) == [
        ("student", "kd_uste_v1"), ("student", "scratch"), ("teacher", "uste_v1")]
    for r in results["runs"]:
        assert len(r["log"]) == 3 and r["log"][-1]["loss"] < r["log"][0]["loss"], r["name"]  # it trains
        assert 0.0 <= r["test_acc"] <= 1.0
    recorded = json.loads((out / "runs" / "seed0" / "teacher" / "uste_v1" / "config.json").read_text())
    assert recorded["provenance"]["processes"] == 2
