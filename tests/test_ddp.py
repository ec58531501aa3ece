"""Multi-process training helpers (ued_fast.distributed): sharding, collectives, DDP equivalence.

The multi-process tests start 2 processes on CPU with the gloo backend on a free loopback port.
"""
from __future__ import annotations

import os

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


def _worker(rank: int, port: int, out_dir: str, batchnorm: bool):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    info = D.init_from_env("cpu")
    try:
        assert info.distributed and info.rank == rank and D.current().world_size == WORLD
        sums = D.all_reduce_sums({"rank": rank, "one": 1})
        assert sums == {"rank": 0 + 1, "one": 2}, sums
        assert D.broadcast_object(f"from {rank}") == "from 0"
        # main_first: rank 0's write is visible to the others when they enter.
        marker = os.path.join(out_dir, "made_by_rank0")
        with D.main_first():
            if info.is_main:
                with open(marker, "w") as f:
                    f.write("x")
            else:
                assert os.path.exists(marker)
        model = D.wrap_model(_mlp(0, batchnorm), info)
        assert isinstance(model, nn.parallel.DistributedDataParallel)
        assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
        x, y = _data()
        metrics = _train(model, x, y, batch=6, rank=rank, world=WORLD)
        if info.is_main:  # rank-0-only write
            torch.save({"state": D.unwrap(model).state_dict(), "metrics": metrics},
                       os.path.join(out_dir, "result.pt"))
        D.barrier()
    finally:
        D.cleanup()


@pytest.mark.parametrize("batchnorm", [False, True], ids=["no_bn", "batchnorm"])
def test_two_gloo_processes_match_one_process(tmp_path, batchnorm):
    mp.spawn(_worker, args=(D.free_port(), str(tmp_path), batchnorm), nprocs=WORLD, join=True)
    got = torch.load(tmp_path / "result.pt")
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
