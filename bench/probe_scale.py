"""Short scale probes for the claim configs: train candidate models on a dataset's full training
split (less the validation split), one seed, and report test accuracy and seconds per epoch.

    PYTHONPATH=. python bench/probe_scale.py --dataset fashion-mnist --data-dir /work/shared/data \
        --epochs 2 --model 'student=cnn:width=6;depth=1;stages=3' --model 'v1=uste_v1:width=8;depth=1' \
        --out /tmp/probe.json

Each --model is label=registry_name:key=value;... (values parsed as YAML). The machine's load average
is recorded: per-epoch seconds under load are upper bounds for an idle machine.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import yaml

from ued_fast.augment import AugmentConfig
from ued_fast.models import build_model, count_parameters
from ued_fast.data import dataset_root
from ued_fast.train import RunOptions, TrainConfig, load_splits, seed_everything, train_teacher


def parse_model(text: str):
    label, rest = text.split("=", 1)
    name, _, kw = rest.partition(":")
    kwargs = {}
    for item in filter(None, kw.split(";")):
        k, v = item.split("=", 1)
        kwargs[k] = yaml.safe_load(v)
    return label, name, kwargs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--crop-padding", type=int, default=2)
    ap.add_argument("--flip", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", action="append", required=True)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    splits = load_splits(args.dataset, "cpu", root=dataset_root(args.dataset, args.data_dir), val_fraction=0.1, seed=0)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, warmup=0.1, eval_batch_size=1000)
    aug = AugmentConfig(args.crop_padding, "reflect", args.flip)
    out = {"dataset": args.dataset, "train_images": int(splits.train_x.shape[0]), "epochs": args.epochs,
           "threads": args.threads, "load_before": os.getloadavg(), "models": {}}
    for spec in args.model:
        label, name, kwargs = parse_model(spec)
        seed_everything(0)
        model = build_model(name, splits.num_classes, splits.in_channels, splits.image_size, **kwargs)
        t0 = time.time()
        r = train_teacher(model, splits, cfg, aug, RunOptions(seed=0, quiet=True))
        out["models"][label] = {"name": name, "kwargs": kwargs, "params": count_parameters(model),
                                "test_acc": r["test_acc"], "val_acc": r["val_acc"],
                                "seconds_per_epoch": r["train_seconds"] / args.epochs, "wall": time.time() - t0,
                                "val_curve": [e["val_acc"] for e in r["log"]]}
        print(label, json.dumps(out["models"][label]), flush=True)
    out["load_after"] = os.getloadavg()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
