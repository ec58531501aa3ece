"""A/B speed check of two checkouts of ued_fast on the CPU: the same op calls, timed in alternating
subprocesses (A, B, A, B, ...) so that a shared machine's load falls on both alike; reports the median
time of each and the ratio B / A per case (1.00 = unchanged; < 1 = B faster).

    python bench/ab_compare.py --a /path/to/old/checkout --b . --rounds 7 --out bench/results/ab_cpu

Each checkout needs its C++ extension built in place (ued_fast/_C*.so). One intra-op thread.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ued_fast.experiment import cpu_name  # noqa: E402

# name -> statement timed in the child (forward + backward); setup builds the inputs.
CASES = {
    "kd_loss cpp [4096, 1000]": ("s = torch.randn(4096, 1000).requires_grad_(); t = torch.randn(4096, 1000); "
                                 "y = torch.randint(0, 1000, (4096,))",
                                 "ued_fast.kd_loss(s, t, y, backend='cpp').backward()"),
    "kd_loss cpp [1024, 32000]": ("s = torch.randn(1024, 32000).requires_grad_(); t = torch.randn(1024, 32000); "
                                  "y = torch.randint(0, 32000, (1024,))",
                                  "ued_fast.kd_loss(s, t, y, backend='cpp').backward()"),
    "kd_loss cpp [512, 10]": ("s = torch.randn(512, 10).requires_grad_(); t = torch.randn(512, 10); "
                              "y = torch.randint(0, 10, (512,))",
                              "ued_fast.kd_loss(s, t, y, backend='cpp').backward()"),
    "ensemble_kd_loss cpp K=5 [4096, 1000]": (
        "s = torch.randn(4096, 1000).requires_grad_(); t = torch.randn(5, 4096, 1000) * 3; "
        "y = torch.randint(0, 1000, (4096,))",
        "ued_fast.ensemble_kd_loss(s, t, y, backend='cpp').backward()"),
    "grouped_heads cpp prob_mean D=64 C=100": (
        "cover = [list(range(0, 20)), list(range(10, 40)), list(range(30, 60)), list(range(60, 80)), "
        "list(range(80, 100))]; f = torch.randn(512, 5 * 64).requires_grad_(); "
        "w = (torch.randn(5, 64, 31) / 8).requires_grad_(); b = torch.randn(5, 31).requires_grad_(); "
        "g = torch.randn(512, 100)",
        "ued_fast.grouped_heads(f, w, b, cover, mode='prob_mean', backend='cpp').backward(g)"),
    "fused_linear_kd_loss cpp N=1024 H=512 V=32000": (
        "h = torch.randn(1024, 512).requires_grad_(); w = (torch.randn(32000, 512) / 23).requires_grad_(); "
        "t = torch.randn(1024, 32000); y = torch.randint(0, 32000, (1024,))",
        "ued_fast.fused_linear_kd_loss(h, w, t, y, backend='cpp').backward()"),
}

CHILD = r"""
import json, sys, time, warnings
import torch
torch.set_num_threads(1)
warnings.simplefilter("ignore")
import ued_fast
setup, stmt, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3])
exec(setup)
exec(stmt); exec(stmt)  # warm-up
times = []
for _ in range(repeats):
    t0 = time.perf_counter(); exec(stmt); times.append(time.perf_counter() - t0)
print(json.dumps(min(times)))
"""


def time_case(root: Path, setup: str, stmt: str, repeats: int) -> float:
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", CHILD, setup, stmt, str(repeats)], env=env, cwd=root,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def git_commit(root: Path) -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                          text=True).stdout.strip() or "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", type=Path, required=True, help="the baseline checkout")
    ap.add_argument("--b", type=Path, default=Path("."), help="the checkout compared with it")
    ap.add_argument("--rounds", type=int, default=7, help="alternating A/B subprocess pairs per case")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per subprocess (its minimum counts)")
    ap.add_argument("--cases", default=None, help="substring filter on case names")
    ap.add_argument("--out", default=None, help="write <out>.json and <out>.md")
    args = ap.parse_args(argv)
    a, b = args.a.resolve(), args.b.resolve()
    load_before = os.getloadavg()
    rows = []
    for name, (setup, stmt) in CASES.items():
        if args.cases and args.cases not in name:
            continue
        ta, tb = [], []
        for _ in range(args.rounds):
            ta.append(time_case(a, setup, stmt, args.repeats))
            tb.append(time_case(b, setup, stmt, args.repeats))
        ratios = [y / x for x, y in zip(ta, tb)]
        row = dict(case=name, a_ms=1e3 * statistics.median(ta), b_ms=1e3 * statistics.median(tb),
                   ratio_median=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios))
        rows.append(row)
        print(f"{name}: A {row['a_ms']:.3f} ms, B {row['b_ms']:.3f} ms, B/A {row['ratio_median']:.2f} "
              f"({row['ratio_min']:.2f}-{row['ratio_max']:.2f})", flush=True)
    meta = dict(a=str(a), a_commit=git_commit(a), b=str(b), b_commit=git_commit(b), rounds=args.rounds,
                repeats=args.repeats, load_before=load_before, load_after=os.getloadavg(),
                cpu=cpu_name(), torch_threads=1)
    if args.out:
        Path(args.out + ".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
        lines = [f"# A/B CPU speed: {meta['b_commit']} (B) against {meta['a_commit']} (A)", "",
                 f"- CPU: {meta['cpu']}, 1 intra-op thread; load average {load_before[0]:.1f} before, "
                 f"{meta['load_after'][0]:.1f} after (the machine was shared with other jobs)",
                 f"- {args.rounds} alternating A/B subprocess pairs per case; each subprocess times "
                 f"{args.repeats} calls of forward + backward and keeps the minimum; ratio = B / A per pair",
                 "", "| case | A median ms | B median ms | B / A median | B / A range |", "|---|---|---|---|---|"]
        lines += [f"| {r['case']} | {r['a_ms']:.3f} | {r['b_ms']:.3f} | {r['ratio_median']:.2f} | "
                  f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f} |" for r in rows]
        Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
