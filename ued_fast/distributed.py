"""Multi-process data-parallel training helpers (torchrun + DistributedDataParallel).

One process per device. torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT;
`init_from_env` reads them (gloo on CPU, nccl on CUDA). Without them everything here degrades to a
single process, so the training loop calls the same functions either way.

How a run with W processes stays equal to one process with the same global batch B:
- every rank draws the SAME per-epoch permutation (same seed), cuts it into the same global
  batches of B, and takes its own contiguous slice of each (`rank_batches`): over the ranks the
  samples of every step are exactly those of the single-process step;
- each rank scales its local mean loss by local_n * W / global_n (`loss_scale`), so DDP's gradient
  average over ranks is the gradient of the global-batch mean;
- metrics are sums (loss * n, correct, n) all-reduced before dividing (`all_reduce_sums`);
- only rank 0 writes files (`is_main`), the others wait at a barrier.
What still differs: BatchNorm computes batch statistics over the local slice (B/W samples) unless
it is converted to SyncBatchNorm, which PyTorch implements for GPUs only; so on CUDA `wrap_model`
uses SyncBatchNorm by default, on CPU/gloo every rank normalizes with its own slice's statistics
(running statistics come from rank 0: DDP broadcasts buffers each forward). Float reductions also
run in another order (per-rank sums, then the all-reduce), which changes results in the last bits.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import socket
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch
import torch.distributed as dist
from torch import nn

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return all(v in env for v in TORCHRUN_VARS)


def _env_int(env: Mapping[str, str], name: str) -> int:
    try:
        value = int(env[name])
    except ValueError:
        raise ValueError(f"environment variable {name}={env[name]!r} is not an int") from None
    if value < 0:
        raise ValueError(f"environment variable {name}={value} must be >= 0")
    return value


def init_from_env(device: str | torch.device | None = None, *, backend: str | None = None,
                  timeout_s: float = 300.0) -> DistInfo:
    """Join the process group torchrun describes in the environment; a single process otherwise.

    device: 'cpu', 'cuda' or None (CUDA when available). Under torchrun with CUDA, each process
    takes cuda:LOCAL_RANK. backend: None means nccl for CUDA, gloo for CPU.
    """
    env = os.environ
    wanted = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if wanted.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {wanted}")
    if not launched_by_torchrun(env) or _env_int(env, "WORLD_SIZE") <= 1:
        return DistInfo(device=wanted)
    rank, world, local = (_env_int(env, v) for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if rank >= world:
        raise ValueError(f"RANK={rank} must be < WORLD_SIZE={world}")
    if wanted.type == "cuda":
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local} but only {torch.cuda.device_count()} CUDA devices are visible")
        wanted = torch.device("cuda", local)
        torch.cuda.set_device(wanted)
    backend = backend or ("nccl" if wanted.type == "cuda" else "gloo")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=wanted)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def current() -> DistInfo:
    """The rank and world size of the initialized process group (a single process when none)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(),
                        local_rank=int(os.environ.get("LOCAL_RANK", 0)))
    return DistInfo()


def is_main() -> bool:
    return current().is_main


def barrier() -> None:
    if current().distributed:
        dist.barrier()


# --- data sharding -------------------------------------------------------------------------------

def shard(indices: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank `rank`'s contiguous slice of one global batch; slice sizes differ by at most one."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    return torch.tensor_split(indices, world_size)[rank]


def global_batches(permutation: torch.Tensor, batch_size: int, world_size: int = 1,
                   drop_last: bool = False) -> list[torch.Tensor]:
    """The epoch's global batches of `batch_size` samples, in order.

    A final batch smaller than world_size would leave some rank with no sample (DDP needs every
    rank in every step), so it is dropped; with drop_last every partial batch is dropped.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if batch_size < world_size:
        raise ValueError(f"batch_size={batch_size} (global) must be >= world_size={world_size}")
    batches = list(torch.split(permutation, batch_size))
    if batches and (len(batches[-1]) < world_size or (drop_last and len(batches[-1]) < batch_size)):
        batches.pop()
    return batches


def rank_batches(permutation: torch.Tensor, batch_size: int, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False) -> Iterator[tuple[torch.Tensor, int]]:
    """(this rank's indices, the global batch's size) for every step of an epoch.

    `permutation` must be the same on every rank (draw it from the shared seed), `batch_size` is
    the GLOBAL batch: so W processes see exactly the batches of one process.
    """
    for batch in global_batches(permutation, batch_size, world_size, drop_last):
        yield shard(batch, rank, world_size), len(batch)


def loss_scale(local_n: int, global_n: int, world_size: int) -> float:
    """Factor for a local MEAN loss so that DDP's average over ranks is the global-batch mean."""
    return local_n * world_size / global_n


# --- collectives ---------------------------------------------------------------------------------

def all_reduce_sums(values: Mapping[str, float | torch.Tensor], device=None) -> dict[str, float]:
    """Sum named scalars over all ranks (one all-reduce); identity in a single process.

    Reduce sums and counts, never means: mean = all_reduce(sum) / all_reduce(count).
    """
    names = list(values)
    if not names:
        return {}
    flat = torch.stack([torch.as_tensor(values[k], dtype=torch.float64).detach().reshape(()).cpu()
                        for k in names])
    if current().distributed:
        backend = dist.get_backend()
        flat = flat.to(device if device is not None else ("cuda" if backend == "nccl" else "cpu"))
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    return {k: float(v) for k, v in zip(names, flat.cpu().tolist())}


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any rank (e.g. Ctrl-C seen by one process)."""
    if not current().distributed:
        return bool(flag)
    return all_reduce_sums({"flag": float(bool(flag))})["flag"] > 0


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Copy rank `src`'s buffers (BatchNorm running statistics) to every rank."""
    if not current().distributed:
        return
    for buf in module.buffers():
        dist.broadcast(buf.data, src=src)


def broadcast_object(obj, src: int = 0):
    """rank `src`'s Python object on every rank (e.g. a run folder name chosen by rank 0)."""
    if not current().distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (e.g. to create a cache or folder); the others after it."""
    info = current()
    if info.distributed and not info.is_main:
        dist.barrier()
    try:
        yield
    finally:
        if info.distributed and info.is_main:
            dist.barrier()


# --- model wrapping ------------------------------------------------------------------------------

class LossModule(nn.Module):
    """forward(images, labels) = step_loss(model, images, labels): the whole loss computation as one
    module call, so that DistributedDataParallel wraps it (its hooks see every parameter used,
    whether the step calls model(x) or model.training_loss(x, y))."""

    def __init__(self, model: nn.Module, step_loss):
        super().__init__()
        self.model = model
        self.step_loss = step_loss

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        return self.step_loss(self.model, images, labels)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def wrap_model(model: nn.Module, info: DistInfo, *, sync_batchnorm: bool | None = None) -> nn.Module:
    """DistributedDataParallel around `model` (returned unchanged in a single process).

    sync_batchnorm None means: on CUDA yes (batch statistics over the global batch, as in one
    process), on CPU no (PyTorch's SyncBatchNorm runs on GPUs only; see the module docstring).
    """
    if not info.distributed:
        return model
    if sync_batchnorm is None:
        sync_batchnorm = info.device.type == "cuda"
    if sync_batchnorm:
        if info.device.type != "cuda":
            raise ValueError("sync_batchnorm=True needs CUDA: PyTorch's SyncBatchNorm has no CPU kernel")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(info.device)
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP (what checkpoints store, so they load with or without DDP)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def free_port() -> int:
    """A free TCP port on the loopback interface (for tests and single-node launches)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
