"""Turn a pytest-benchmark JSON file into a Markdown table: times, GB/s over the byte floor, ratios.

Each benchmark must set extra_info 'case' (the shape or problem), 'impl' (the implementation) and
'bytes' (the byte floor of one call); rows are grouped by case, ratios are taken against --baseline.

    python bench/report.py bench/results/cpu_kd_loss.json --baseline eager --title "..." > out.md
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict


def _machine_lines(data: dict) -> list[str]:
    m = data.get("machine_info", {})
    c = data.get("commit_info", {})
    cpu = m.get("cpu_model") or m.get("cpu", {}).get("brand_raw") or m.get("processor", "?")
    loads = [b["extra_info"].get("load_average") for b in data.get("benchmarks", [])]
    loads = [l[0] for l in loads if l]
    lines = [
        f"- CPU: {cpu}, {m.get('logical_cpus', m.get('cpu', {}).get('count', '?'))} logical cores, "
        f"torch threads {m.get('torch_threads', '?')}, ATen CPU capability {m.get('torch_cpu_capability', '?')}",
        f"- torch {m.get('torch', '?')}, triton {m.get('triton')}, CUDA {m.get('cuda')}, GPU {m.get('gpu')}, "
        f"Python {m.get('python_version', '?')}",
        f"- commit {c.get('id', '?')[:12]}{' (dirty tree)' if c.get('dirty') else ''} on {c.get('branch', '?')}, "
        f"run {data.get('datetime', '?')}",
    ]
    if loads:
        lines.append(f"- 1-minute load average at the start of each benchmark: {min(loads):.2f} to {max(loads):.2f}")
    return lines


def to_markdown(data: dict, baseline: str | None = None, title: str | None = None,
                peak_gbs: float | None = None) -> str:
    """The report for one pytest-benchmark JSON document (already parsed)."""
    by_case: dict[str, dict[str, dict]] = defaultdict(dict)
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        by_case[info["case"]][info["impl"]] = bench
    impls = sorted({impl for case in by_case.values() for impl in case},
                   key=lambda i: (i != baseline, i))
    out = [f"# {title}" if title else "# Benchmark", "", *_machine_lines(data), ""]
    header = ["case", "impl", "median ms", "min ms", "GB/s (median)", "GB/s (min)"]
    if peak_gbs:
        header.append(f"% of {peak_gbs:g} GB/s (min)")
    if baseline:
        header += [f"speed-up vs {baseline} (median)", f"speed-up vs {baseline} (min)"]
    out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for case, runs in by_case.items():
        base = runs.get(baseline)
        for impl in impls:
            if impl not in runs:
                continue
            stats, info = runs[impl]["stats"], runs[impl]["extra_info"]
            gbs, gbs_min = (info["bytes"] / stats[k] / 1e9 for k in ("median", "min"))
            row = [case, impl, f"{stats['median'] * 1e3:.3f}", f"{stats['min'] * 1e3:.3f}", f"{gbs:.2f}",
                   f"{gbs_min:.2f}"]
            if peak_gbs:
                row.append(f"{100 * gbs_min / peak_gbs:.0f}%")
            if baseline:
                row += [f"{base['stats'][k] / stats[k]:.2f}x" if base else "-" for k in ("median", "min")]
            out.append("| " + " | ".join(row) + " |")
    out += ["", "GB/s: the byte floor of one call (extra_info 'bytes') over the time. On a shared machine the",
            "minimum is the least disturbed measurement; the median shows what a busy machine gives."]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_file")
    parser.add_argument("--baseline", help="impl the speed-ups are taken against")
    parser.add_argument("--title")
    parser.add_argument("--peak-gbs", type=float, help="measured bandwidth to report a percentage of")
    args = parser.parse_args(argv)
    with open(args.json_file) as f:
        data = json.load(f)
    sys.stdout.write(to_markdown(data, args.baseline, args.title, args.peak_gbs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
