"""Training: teachers with cross-entropy, students by distillation, evaluation.

One loop (`fit`) serves both; read it top to bottom. The data lives on the device as uint8 and
every batch is made there (ued_fast.augment). channels_last everywhere; on CUDA bf16 autocast, on
CPU fp32. Every random stream is seeded and checkpointed, so `resume=True` after a kill or Ctrl-C ends
with the same weights as an uninterrupted run (bitwise on CPU with deterministic=True).

Under torchrun (ued_fast.distributed) every rank takes its slice of each global batch, the loss
runs inside DistributedDataParallel, metrics are all-reduced, and only rank 0 writes files.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .augment import AugmentConfig, Augmenter, batch_slices, epoch_permutation, make_generator
from .checkpoint import (atomic_write, load_checkpoint, prepare_run_dir, rng_state, save_checkpoint, save_json,
                         set_rng_state)

CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "log.jsonl"
RESULT_NAME = "result.json"  # written by the callers of fit (the CLI, the experiment)
RUN_OUTPUTS = (CHECKPOINT_NAME, LOG_NAME, RESULT_NAME)
SCHEDULE = "warmup-linear-decay"  # WarmupLinearDecay, recorded in every run's config


class Interrupted(Exception):
    """Raised after Ctrl-C (SIGINT) once the current step is done and a checkpoint is saved."""

    def __init__(self, checkpoint: Path | None, epoch: int, step: int):
        where = f"checkpoint saved to {checkpoint}" if checkpoint else "no checkpoint folder was given"
        super().__init__(f"interrupted at epoch {epoch + 1}, step {step}; {where}; rerun with --resume to continue")
        self.checkpoint = checkpoint


@dataclass
class TrainConfig:
    """Every hyperparameter of a run, in one place (the optimizer, schedule and loop read only these)."""
    epochs: int = 10
    batch_size: int = 128  # the global batch: under torchrun each process takes its slice of it
    lr: float = 0.05  # the peak learning rate of SGD, reached at the end of the warmup
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4  # on conv and linear weights only, never on BatchNorm or biases
    warmup: float = 0.1  # fraction of all steps spent warming the lr up linearly, then linear decay to 0
    label_smoothing: float = 0.0  # off for teachers by default (smoothed teachers distill worse)
    eval_batch_size: int = 1024  # evaluation only: no effect on training

    def __post_init__(self):
        for name in ("epochs", "batch_size", "eval_batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        for name in ("lr", "momentum", "weight_decay", "warmup", "label_smoothing"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.warmup > 1 or self.label_smoothing >= 1 or self.momentum >= 1:
            raise ValueError("warmup must be in [0, 1], label_smoothing and momentum in [0, 1)")
        if not isinstance(self.nesterov, bool):
            raise ValueError(f"nesterov must be true or false, got {self.nesterov!r}")
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov needs momentum > 0")


@dataclass
class RunOptions:
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    deterministic: bool = False
    quiet: bool = False
    run_dir: Path | None = None  # checkpoint, log.jsonl and config.json go here (None: none of them)
    resume: bool = False
    desc: str = "train"
    # What the caller knows of the run (dataset, model and its args, teacher, T, alpha, ...): recorded
    # in config.json with what fit knows (seed, train and augment settings); resume needs it equal.
    config: dict | None = None
    overwrite: bool = False  # a fresh run may replace an earlier run's files in run_dir


@dataclass
class Splits:
    """A dataset on the device: uint8 images [N, C, H, W], int64 labels, and its normalization."""
    name: str
    num_classes: int
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: tuple
    std: tuple

    @property
    def in_channels(self) -> int:
        return self.train_x.shape[1]

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.train_x.shape[2:])


# --- Setup ----------------------------------------------------------------------------------------

def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"--device: {device!r} is not a device ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device: {device!r} asked for, but CUDA is not available here")
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_deterministic(on: bool) -> None:
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(on)


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _dataset_stats(name: str, train_x: torch.Tensor):
    """(num_classes or None, mean, std) in [0, 1] units: from ued_fast.data.DATASETS where it says,
    else measured on the training images."""
    from . import data

    info = data.DATASETS.get(name) if hasattr(data, "DATASETS") else None

    def get(key):
        if info is None:
            return None
        return info.get(key) if isinstance(info, dict) else getattr(info, key, None)

    mean, std = get("mean"), get("std")
    if mean is None or std is None:
        x = train_x.double().div(255).transpose(0, 1).reshape(train_x.shape[1], -1)
        mean, std = x.mean(1).tolist(), x.std(1).clamp_min(1e-3).tolist()
    mean = [float(m) for m in np.atleast_1d(mean)]
    std = [float(s) for s in np.atleast_1d(std)]
    if max(mean) > 1.0:  # given in pixel units
        mean, std = [m / 255 for m in mean], [s / 255 for s in std]
    return get("num_classes"), tuple(mean), tuple(std)


def load_splits(dataset: str, device, *, root=None, val_fraction: float = 0.1, seed: int = 0,
                train_subset: int | None = None) -> Splits:
    """Load a dataset by name (root: its folder, ued_fast.data.dataset_root; None: the default one),
    hold out a seeded validation split from its training set, and move everything to the device. train_subset: keep only this many training images (seeded, before the
    validation split), for CPU budgets."""
    from . import data

    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    train_x, train_y = data.load(dataset, "train", root=root)
    test_x, test_y = data.load(dataset, "test", root=root)
    train_x, train_y = torch.as_tensor(train_x), torch.as_tensor(train_y).long()
    test_x, test_y = torch.as_tensor(test_x), torch.as_tensor(test_y).long()
    if train_x.dim() == 3:  # [N, H, W] grayscale
        train_x, test_x = train_x[:, None], test_x[:, None]
    split_gen = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(train_x.shape[0], generator=split_gen)
    if train_subset is not None:
        if isinstance(train_subset, bool) or not isinstance(train_subset, int) or train_subset < 2:
            raise ValueError(f"train_subset must be an int >= 2 or null, got {train_subset!r}")
        order = order[:train_subset]
    n_val = int(round(val_fraction * order.numel()))
    val_idx, train_idx = order[:n_val], order[n_val:]
    num_classes, mean, std = _dataset_stats(dataset, train_x[train_idx])
    if num_classes is None:
        num_classes = int(max(train_y.max(), test_y.max())) + 1
    dev = torch.device(device)
    return Splits(
        name=dataset, num_classes=int(num_classes),
        train_x=train_x[train_idx].contiguous().to(dev), train_y=train_y[train_idx].to(dev),
        val_x=train_x[val_idx].contiguous().to(dev), val_y=train_y[val_idx].to(dev),
        test_x=test_x.contiguous().to(dev), test_y=test_y.to(dev), mean=mean, std=std,
    )


class WarmupLinearDecay:
    """lr factor: 0 -> 1 linearly over the warmup steps, then 1 -> 0 linearly (a one-cycle shape)."""

    def __init__(self, total_steps: int, warmup: float):
        self.total = max(1, total_steps)
        self.warm = max(1, int(round(warmup * self.total))) if warmup > 0 else 0

    def __call__(self, step: int) -> float:
        if step < self.warm:
            return (step + 1) / self.warm
        return max(0.0, (self.total - step) / max(1, self.total - self.warm))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # No weight decay on BatchNorm and biases (1-d parameters): it only fights their scale.
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _to_device_model(model: nn.Module, device: torch.device) -> nn.Module:
    # channels_last on CPU too: oneDNN's convolutions train 1.5-2.2x faster in it (bench/bench_cpu_train.py).
    return model.to(device).to(memory_format=torch.channels_last)


def _prep_images(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


def _show_progress(quiet: bool) -> bool:
    """A tqdm bar when both streams are terminals; otherwise plain per-epoch lines (`_progress_line`)."""
    return not quiet and sys.stderr.isatty() and sys.stdout.isatty()


def _print_progress_lines(quiet: bool) -> bool:
    return not quiet and not _show_progress(quiet)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


def _progress_line(desc: str, entry: dict, epochs: int, session_seconds: list[float], elapsed: float) -> str:
    """One line per finished epoch, for logs and pipes; ETA from this process's epoch times."""
    eta = (epochs - entry["epoch"]) * sum(session_seconds) / max(len(session_seconds), 1)
    return (f"{desc}: epoch {entry['epoch']}/{epochs}  loss {entry['loss']:.4f}  val acc {100 * entry['val_acc']:.2f}%"
            f"  elapsed {_duration(elapsed)}  ETA {_duration(eta)}")


def run_provenance(device: torch.device, world: int, deterministic: bool) -> dict:
    """Where and by what a run was made (recorded in config.json, never compared on resume)."""
    import datetime
    import platform

    import ued_fast
    from .experiment import device_description, git_commit

    return {"ued_fast": ued_fast.__version__, "git_commit": git_commit(), "torch": torch.__version__,
            "python": platform.python_version(), "device": device_description(device), "processes": world,
            "deterministic": deterministic, "command": sys.argv,
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


class _SigintFlag:
    """Ctrl-C sets a flag the loop checks between steps; a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.set = False
        self._old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.set:
            raise KeyboardInterrupt
        self.set = True
        print("\nCtrl-C: finishing the current step, then saving a checkpoint (Ctrl-C again to abort)",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


# --- Evaluation -----------------------------------------------------------------------------------

@torch.no_grad()
def predict(model: nn.Module, images_u8: torch.Tensor, augmenter: Augmenter, batch_size: int = 1024) -> torch.Tensor:
    """[N, C] float32 outputs of the model in eval mode (no augmentation)."""
    was_training = model.training
    model.eval()
    device = images_u8.device
    outs = []
    for i in range(0, images_u8.shape[0], batch_size):
        x = _prep_images(augmenter.eval_batch(images_u8[i : i + batch_size]), device)
        with _autocast(device):
            outs.append(model(x).float())
    model.train(was_training)
    return torch.cat(outs) if outs else torch.empty(0, device=device)


def evaluate(model: nn.Module, images_u8: torch.Tensor, labels: torch.Tensor, augmenter: Augmenter,
             batch_size: int = 1024) -> float:
    """Top-1 accuracy in [0, 1]."""
    if labels.numel() == 0:
        return float("nan")
    out = predict(model, images_u8, augmenter, batch_size)
    return (out.argmax(1) == labels).float().mean().item()


def soft_target_entropy(logits: torch.Tensor, temperature: float) -> float:
    """Mean entropy (nats) of softmax(t / T): how much a teacher's targets say beyond the top class."""
    logp = F.log_softmax(logits.float() / temperature, dim=1)
    return -(logp.exp() * logp).nan_to_num(0.0).sum(1).mean().item()


# --- The loop -------------------------------------------------------------------------------------

StepLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def fit(model: nn.Module, splits: Splits, cfg: TrainConfig, augment: AugmentConfig, opts: RunOptions,
        step_loss: StepLoss, *, keep_test_outputs: bool = False,
        batch_fn: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None) -> dict:
    """Train `model` for cfg.epochs; step_loss(model, images, labels) -> (loss, logits).

    Returns {'val_acc', 'test_acc' (last epoch), 'log' (one dict per epoch), 'train_seconds', 'params'},
    plus 'test_outputs' [N_test, C] when keep_test_outputs (e.g. for a teacher's soft-target entropy).
    batch_fn(indices, generator) -> images replaces the augmenter's batches (e.g. the fixed views of
    ued_fast.teacher_cache); single process only.
    """
    device = opts.device
    rank, world = _dist_rank_world()
    model = _to_device_model(model, device)
    train_step = _train_step_module(model, step_loss, cfg, batch_fn, rank, world, device)
    optimizer = make_optimizer(model, cfg)
    n_train = splits.train_x.shape[0]
    # Every rank walks the same global batches (same permutation, same augmentation draws) and
    # trains on its own slice of each: W processes take the steps of one process.
    slices = batch_slices(n_train, cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupLinearDecay(cfg.epochs * len(slices), cfg.warmup))
    gen = make_generator(opts.seed, device)
    augmenter = Augmenter(splits.mean, splits.std, augment, device)
    files = _RunFiles(opts, rank, world, model, optimizer, scheduler, gen, cfg)
    files.prepare(splits, augment)
    run = files.resume() or _Progress()

    from tqdm.auto import tqdm

    lines = rank == 0 and _print_progress_lines(opts.quiet)
    session_seconds: list[float] = []  # epochs trained by this process: the ETA's pace
    bar = tqdm(total=cfg.epochs * len(slices), initial=run.epoch * len(slices) + run.step, desc=opts.desc,
               disable=not _show_progress(opts.quiet), leave=False, dynamic_ncols=True)
    with _SigintFlag() as sigint, bar:
        while run.epoch < cfg.epochs:
            start = time.perf_counter()
            model.train()
            if run.perm is None:  # a new epoch (a resumed one keeps the permutation it was drawn with)
                run.perm = epoch_permutation(n_train, gen, device)
                run.reset_sums()
            sums = _StepSums(device)
            while run.step < len(slices):
                if _stop_requested(sigint, world):
                    run.add(sums)
                    run.epoch_seconds += time.perf_counter() - start
                    files.checkpoint(run)
                    raise Interrupted(files.checkpoint_path if files.writer else None, run.epoch, run.step)
                idx = run.perm[slices[run.step]]
                images = augmenter.train_batch(splits.train_x[idx], gen) if batch_fn is None else batch_fn(idx, gen)
                labels = splits.train_y[idx]
                global_n = labels.shape[0]
                if world > 1:  # this rank's slice of the global batch
                    images, labels = (torch.tensor_split(t, world)[rank] for t in (images, labels))
                with _autocast(device):
                    loss, logits = train_step(_prep_images(images, device), labels)
                optimizer.zero_grad(set_to_none=True)
                _backward(loss, labels.shape[0], global_n, world)
                optimizer.step()
                scheduler.step()
                sums.add(loss, logits, labels)
                run.step += 1
                bar.update(1)
            run.add(sums)
            if world > 1:  # BatchNorm running statistics: rank 0's, on every rank
                distributed.broadcast_buffers(model)
            val_acc = evaluate(model, splits.val_x, splits.val_y, augmenter, cfg.eval_batch_size)
            run.epoch_seconds += time.perf_counter() - start
            run.log.append({
                "epoch": run.epoch + 1, "loss": run.loss_sum / max(run.seen, 1), "train_acc": run.correct / max(run.seen, 1),
                "val_acc": val_acc, "lr": scheduler.get_last_lr()[0], "seconds": run.epoch_seconds,
            })
            bar.set_postfix(loss=f"{run.log[-1]['loss']:.3f}", val=f"{val_acc:.3f}")
            session_seconds.append(time.perf_counter() - start)
            if lines:
                print(_progress_line(opts.desc, run.log[-1], cfg.epochs, session_seconds,
                                     sum(e["seconds"] for e in run.log)), flush=True)
            run.next_epoch()
            files.checkpoint(run)
            files.write_log(run.log)
    test_outputs = predict(model, splits.test_x, augmenter, cfg.eval_batch_size)
    result = {
        "val_acc": run.log[-1]["val_acc"] if run.log else float("nan"),
        "test_acc": (test_outputs.argmax(1) == splits.test_y).float().mean().item(),
        "log": run.log,
        "train_seconds": sum(e["seconds"] for e in run.log),
        "params": sum(p.numel() for p in model.parameters()),
    }
    if keep_test_outputs:
        result["test_outputs"] = test_outputs
    return result


# --- The loop's helpers: where the run stands, its files, multi-process training, Ctrl-C ------------

@dataclass
class _Progress:
    """Where a run stands: the epoch in progress, the next step in it, that epoch's permutation and
    its running sums (a Ctrl-C checkpoint is taken mid-epoch; an end-of-epoch one has step 0)."""
    epoch: int = 0
    step: int = 0
    perm: torch.Tensor | None = None
    log: list = field(default_factory=list)
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    epoch_seconds: float = 0.0

    def reset_sums(self) -> None:
        self.loss_sum, self.correct, self.seen, self.epoch_seconds = 0.0, 0, 0, 0.0

    def next_epoch(self) -> None:
        self.epoch, self.step, self.perm = self.epoch + 1, 0, None
        self.reset_sums()

    def add(self, sums: "_StepSums") -> None:
        """Fold a segment's step sums, over all ranks, into the epoch's (global) sums."""
        total = distributed.all_reduce_sums({"loss": sums.loss, "correct": sums.correct, "seen": sums.seen})
        self.loss_sum += total["loss"]
        self.correct += int(total["correct"])
        self.seen += int(total["seen"])


class _StepSums:
    """Loss and correct predictions summed on the device over steps: no host sync per step."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.seen = 0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.loss += loss.detach().float() * labels.shape[0]
        self.correct += (logits.detach().argmax(1) == labels).sum()
        self.seen += labels.shape[0]


class _RunFiles:
    """The run folder of one fit: its recorded settings, checkpoint and log; rank 0 alone writes."""

    def __init__(self, opts: RunOptions, rank: int, world: int, model, optimizer, scheduler, gen, cfg: TrainConfig):
        self.opts, self.world, self.cfg = opts, world, cfg
        self.model, self.optimizer, self.scheduler, self.gen = model, optimizer, scheduler, gen
        self.writer = rank == 0 and opts.run_dir is not None
        self.checkpoint_path = opts.run_dir / CHECKPOINT_NAME if opts.run_dir is not None else None

    def prepare(self, splits: Splits, augment: AugmentConfig) -> None:
        """Check the folder against this run's settings (every rank, before rank 0 writes to it)."""
        opts = self.opts
        if opts.run_dir is None:
            return
        run_config = {"dataset": splits.name, **(opts.config or {}), "seed": opts.seed, "train": asdict(self.cfg),
                      "schedule": SCHEDULE, "augment": asdict(augment),
                      "data_sizes": [int(t.shape[0]) for t in (splits.train_x, splits.val_x, splits.test_x)],
                      "params": sum(p.numel() for p in self.model.parameters())}
        provenance = run_provenance(opts.device, self.world, opts.deterministic) if self.writer else None
        prepare_run_dir(opts.run_dir, run_config, resume=opts.resume, overwrite=opts.overwrite, outputs=RUN_OUTPUTS,
                        provenance=provenance, write=self.writer)
        if self.world > 1:
            distributed.barrier()

    def resume(self) -> _Progress | None:
        """On resume, load the checkpoint into the model, optimizer, schedule and generator; None
        when there is none to continue from."""
        path = self.checkpoint_path
        if not (self.opts.resume and path is not None and path.exists()):
            return None
        try:
            state = load_checkpoint(path)
        except Exception as e:  # not a checkpoint this package wrote (it never leaves a torn one)
            raise ValueError(f"--resume: {str(path)!r} is not a readable checkpoint "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as e:
            raise ValueError(f"--resume: {str(path)!r} does not fit this model: {str(e).splitlines()[0]}") from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"], self.gen)
        perm = state["perm"].to(self.opts.device) if state["perm"] is not None else None
        run = _Progress(state["epoch"], state["step"], perm, state["log"])
        run.loss_sum, run.correct, run.seen, run.epoch_seconds = state["partial"]
        return run

    def checkpoint(self, run: _Progress) -> None:
        if not self.writer:
            return
        save_checkpoint(self.checkpoint_path, {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "rng": rng_state(self.gen), "epoch": run.epoch, "step": run.step,
            "perm": run.perm.cpu() if run.perm is not None else None,
            "partial": (float(run.loss_sum), int(run.correct), int(run.seen), float(run.epoch_seconds)), "log": run.log,
            "train_config": asdict(self.cfg), "seed": self.opts.seed,
        })

    def write_log(self, log: list) -> None:
        if self.writer:
            text = "".join(json.dumps(entry) + "\n" for entry in log)
            atomic_write(self.opts.run_dir / LOG_NAME, lambda f: f.write(text), mode="w")


def _train_step_module(model: nn.Module, step_loss: StepLoss, cfg: TrainConfig, batch_fn, rank: int, world: int,
                       device: torch.device) -> nn.Module:
    """The module the loop calls for (loss, logits). Under DDP (torchrun) the loss computation runs
    inside the wrapped module, so that DDP's gradient all-reduce hooks see it; `model` stays the
    plain module (checkpoints, evaluation)."""
    train_step = distributed.LossModule(model, step_loss)
    if world > 1 and batch_fn is not None:
        raise ValueError("batch_fn (cached teacher views) runs in a single process only")
    if world == 1:
        return train_step
    if cfg.batch_size < world:
        raise ValueError(f"batch_size={cfg.batch_size} (the global batch) must be >= the {world} processes")
    return distributed.wrap_model(train_step, distributed.DistInfo(rank, world, device=device))


def _backward(loss: torch.Tensor, local_n: int, global_n: int, world: int) -> None:
    if world > 1:  # DDP averages over ranks: make that the global-batch mean
        (loss * distributed.loss_scale(local_n, global_n, world)).backward()
    else:
        loss.backward()


def _stop_requested(sigint: _SigintFlag, world: int) -> bool:
    """Ctrl-C seen. Under DDP all ranks must stop at the same step: they agree on the flag (one tiny
    all-reduce per step, only when distributed)."""
    return distributed.any_rank(sigint.set) if world > 1 else sigint.set


# --- Teachers and students ------------------------------------------------------------------------

def _ce_step(label_smoothing: float) -> StepLoss:
    def step(model, images, labels):
        if label_smoothing > 0:  # on the model's output (its log-probabilities for v2/generalist)
            logits = model(images)
            return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing), logits
        return model.training_loss(images, labels)

    return step


def train_teacher(model: nn.Module, splits: Splits, cfg: TrainConfig, augment: AugmentConfig,
                  opts: RunOptions, *, keep_test_outputs: bool = False) -> dict:
    """Train a model (teacher, or a student from scratch) with its own training loss (cross-entropy)."""
    return fit(model, splits, cfg, augment, opts, _ce_step(cfg.label_smoothing), keep_test_outputs=keep_test_outputs)


def distill(student: nn.Module, teacher: nn.Module, splits: Splits, cfg: TrainConfig, augment: AugmentConfig,
            opts: RunOptions, *, temperature: float = 4.0, alpha: float = 0.9, kd_backend: str | None = None) -> dict:
    """Train `student` against a frozen `teacher` run on the same augmented batch:
    loss = alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y) (ued_fast.kd_loss)."""
    import ued_fast

    teacher = _to_device_model(teacher, opts.device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    def step(model, images, labels):
        with torch.no_grad():
            t = teacher(images)
        s = model(images)
        # [N, C] is tiny: compute the loss in fp32 whatever the autocast dtype.
        loss = ued_fast.kd_loss(s.float(), t.float(), labels, temperature=temperature, alpha=alpha,
                                teacher_kind="logits", backend=kd_backend)
        return loss, s

    return fit(student, splits, cfg, augment, opts, step)


# --- One run, wired the same way for the CLI and the experiment -------------------------------------

def start_process(device, deterministic: bool, num_threads: int | None = None):
    """Settle this process before any run: join the torchrun process group when launched by torchrun
    (each process then takes its own device), determinism, torch's intra-op threads. Returns the
    ued_fast.distributed.DistInfo."""
    from . import distributed

    info = distributed.init_from_env(resolve_device(device))
    set_deterministic(bool(deterministic))
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    return info


def run_once(opts: RunOptions, build: Callable[[], nn.Module], train: Callable[[nn.Module, RunOptions], dict],
             extra: dict | None = None, *, reuse_finished: bool = False) -> tuple[dict, nn.Module]:
    """One run: seed, build the model, train it, add `extra` to its result and write result.json
    (rank 0 alone). reuse_finished: on resume, a run whose result.json exists is reloaded from its
    checkpoint instead of trained again (the experiment, whose folder-wide settings were checked)."""
    seed_everything(opts.seed)
    model = build()
    done = opts.run_dir / RESULT_NAME
    if reuse_finished and opts.resume and done.exists():
        result = json.loads(done.read_text())
        model.load_state_dict(load_checkpoint(opts.run_dir / CHECKPOINT_NAME)["model"])
        return result, model.to(opts.device)
    result = train(model, opts)
    result.update(extra or {})
    if _dist_rank_world()[0] == 0:
        save_json(done, result)
    return result, model

