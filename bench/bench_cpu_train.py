"""CPU training-step throughput, ratios measured in ONE run (the machine may be shared).

    PYTHONPATH=. python bench/bench_cpu_train.py --threads 1 --out bench/results/cpu_train

Measures images/second of one SGD step (forward, loss, backward, optimizer) for:
  student         NCHW vs channels_last
  uste_v1         grouped convs vs the branch loop (ConvBody executor), NCHW vs channels_last
  distillation    the teacher run on every batch (uste_v1 teacher, branch loop) vs its outputs read
                  from the view cache (ued_fast.teacher_cache), against the scratch step
Configurations are timed in interleaved rounds (A B C ... A B C ...) and the median per configuration
is reported, so that load changes during the run hit every configuration alike.
Writes <out>.md and <out>.json with machine info and the load average before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from ued_fast.augment import AugmentConfig
from ued_fast.distill_losses import distill_loss
from ued_fast.experiment import cpu_name
from ued_fast.models import build_model
from ued_fast.teacher_cache import ViewBatches, ViewSet


def make_configs(image, batch, teacher_kwargs):
    c, side = image[0], image[1]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *image, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    train_x = torch.randint(0, 256, (batch * 4, *image), dtype=torch.uint8, generator=gen)
    configs = {}

    def step_fn(model, loss_fn, cl, batch_source):
        if cl:
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)

        def step():
            xb = batch_source()
            if cl:
                xb = xb.contiguous(memory_format=torch.channels_last)
            loss, _ = loss_fn(model, xb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step

    def ce(model, xb):
        return model.training_loss(xb, y)

    fixed = lambda: x  # noqa: E731
    for cl in (False, True):
        tag = "channels_last" if cl else "NCHW"
        torch.manual_seed(0)
        configs[f"student {tag}"] = step_fn(build_model("student", 10, c, side), ce, cl, fixed)
        for ex in ("grouped", "loop"):
            torch.manual_seed(0)
            configs[f"uste_v1 {ex} {tag}"] = step_fn(build_model("uste_v1", 10, c, side, executor=ex, **teacher_kwargs),
                                                     ce, cl, fixed)
    # Distillation, channels_last student: the same view batches for all three.
    aug = AugmentConfig(crop_padding=2, padding_mode="reflect", flip=True)
    views = ViewSet(train_x.shape[0], 4, aug, 0, "cpu")
    torch.manual_seed(0)
    teacher = build_model("uste_v1", 10, c, side, **teacher_kwargs).eval().to(memory_format=torch.channels_last)
    cached = torch.randn(train_x.shape[0], 4, 10)
    source = ViewBatches(train_x, views, [0.5] * c, [0.25] * c, cached)
    sgen = torch.Generator().manual_seed(1)
    idx_all = torch.arange(train_x.shape[0])

    def view_batch():
        idx = idx_all[torch.randint(0, train_x.shape[0], (batch,), generator=sgen)]
        return source(idx, sgen)

    def kd_live(model, xb):
        with torch.no_grad():
            t = teacher(xb)
        s = model(xb)
        return distill_loss("hinton", s, t, y, temperature=4.0, alpha=0.9), s

    def kd_cached(model, xb):
        s = model(xb)
        return distill_loss("hinton", s, source.targets, y, temperature=4.0, alpha=0.9), s

    def scratch(model, xb):
        return model.training_loss(xb, y)

    for name, fn in (("distill: scratch step (views)", scratch), ("distill: teacher run every step", kd_live),
                     ("distill: cached teacher outputs", kd_cached)):
        torch.manual_seed(0)
        configs[name] = step_fn(build_model("student", 10, c, side), fn, True, view_batch)
    return configs


def run(configs, batch, rounds, steps):
    for step in configs.values():  # warm-up (oneDNN primitive creation)
        step()
        step()
    times = {k: [] for k in configs}
    for _ in range(rounds):
        for name, step in configs.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            times[name].append(steps * batch / (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--images", default="3x32x32,1x28x28")
    ap.add_argument("--teacher-width", type=int, default=24)
    ap.add_argument("--out", default=None, help="write <out>.md and <out>.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    results = {}
    for spec in args.images.split(","):
        image = tuple(int(v) for v in spec.split("x"))
        configs = make_configs(image, args.batch, {"width": args.teacher_width})
        results[spec] = run(configs, args.batch, args.rounds, args.steps)
        print(spec, json.dumps({k: round(v, 1) for k, v in results[spec].items()}), flush=True)
    info = {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
            "python": platform.python_version(), "load_before": load_before, "load_after": os.getloadavg(),
            "batch": args.batch, "rounds": args.rounds, "steps_per_round": args.steps,
            "teacher_width": args.teacher_width}
    lines = [f"# CPU training steps ({info['cpu']}, {info['cores']} cores, {args.threads} thread(s), "
             f"torch {info['torch']})", "",
             f"Load average before/after: {load_before[0]:.1f} / {info['load_after'][0]:.1f} (a shared machine: "
             "compare ratios within one image size, not absolute numbers). Batch "
             f"{args.batch}, median of {args.rounds} interleaved rounds of {args.steps} steps. "
             f"uste_v1: K = 5 branches of width {args.teacher_width}. Command: "
             f"`PYTHONPATH=. python bench/bench_cpu_train.py --threads {args.threads} --out ...`", ""]
    for spec, r in results.items():
        base_s, base_u = r["student NCHW"], r["uste_v1 grouped NCHW"]
        scratch = r["distill: scratch step (views)"]
        lines += [f"## images {spec}", "", "| configuration | img/s | ratio |", "|---|---|---|"]
        for name, v in r.items():
            ref = base_s if name.startswith("student") else base_u if name.startswith("uste") else scratch
            ref_name = ("student NCHW" if name.startswith("student") else "uste_v1 grouped NCHW"
                        if name.startswith("uste") else "scratch step")
            lines.append(f"| {name} | {v:.1f} | {v / ref:.2f}x {ref_name} |")
        lines.append("")
        lines.append(f"Cached distillation step costs {scratch / r['distill: cached teacher outputs']:.2f}x the scratch "
                     f"step; the teacher-in-the-loop step {scratch / r['distill: teacher run every step']:.2f}x.")
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out + ".md").write_text(text)
        Path(args.out + ".json").write_text(json.dumps({"info": info, "results": results}, indent=1))


if __name__ == "__main__":
    main()
