"""Self-check: every op on every native backend of a device against its float64 reference.

    python -m ued_fast.selftest [--device cuda|cpu|cuda:1]

Runs kd_loss, ensemble_kd_loss, grouped_heads and sparse_kd_loss forward and backward on a few shapes
(odd sizes, ignored rows, both teacher mixes and head modes, both top-k conventions, float32 and bfloat16)
on each backend of
`ued_fast.available_backends(device)` but 'reference' (the spec the others are measured against),
prints a table and exits 1 if any check fails. Takes seconds; run it first on a new GPU machine.

`check_backends(device)` returns the same results as a dict, so a training run can refuse a backend
that fails here before spending GPU time on it.
"""
from __future__ import annotations

import argparse
import math
import sys
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

import ued_fast

OPS = ("kd_loss", "ensemble_kd_loss", "grouped_heads", "sparse_kd_loss")

# Allowed error, relative to the largest entry of the float64 reference output or gradient. Kernels
# compute in float32 registers; bfloat16 results (gradients) are rounded to 8 mantissa bits.
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2}

# The authors' C=10, K=5 cover (overlapping subsets).
COVER = [[0, 1], [1, 2, 3], [3, 4, 5], [6, 7], [8, 9]]


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one (op, backend): `passed`, the worst relative error over its cases
    (nan when a case raised) and, on failure, `reason` naming the case."""

    passed: bool
    max_error: float
    reason: str = ""
    max_error_by_dtype: dict = field(default_factory=dict, compare=False)  # {'float32': err, ...}

    def __bool__(self) -> bool:
        return self.passed


@dataclass(frozen=True)
class Case:
    """One call: inputs built by `make(device, dtype, generator)` -> (args, kwargs, differentiable
    input names); the op's output is reduced with a fixed random weighting before backward."""

    name: str
    dtype: torch.dtype
    make: Callable


def _kd_case(n, c, *, teacher_kind="logits", with_target=True):
    def make(device, dtype, g):
        student = torch.randn(n, c, generator=g, dtype=torch.float64) * 3
        teacher = torch.randn(n, c, generator=g, dtype=torch.float64) * 3
        if teacher_kind == "probs":
            teacher = teacher.softmax(-1)
        target = None
        if with_target:
            target = torch.randint(0, c, (n,), generator=g)
            target[::4] = -100  # ignored rows
        kwargs = dict(temperature=2.0, alpha=0.5, teacher_kind=teacher_kind)
        return {"student": student, "teacher": teacher, "target": target}, kwargs, ("student",)
    return make


def _ensemble_case(k, n, c, *, mix):
    def make(device, dtype, g):
        student = torch.randn(n, c, generator=g, dtype=torch.float64) * 2
        teachers = torch.randn(k, n, c, generator=g, dtype=torch.float64) * 2
        weights = torch.rand(k, n, generator=g, dtype=torch.float64) + 0.1
        target = torch.randint(0, c, (n,), generator=g)
        target[1] = -100
        kwargs = dict(mix=mix, temperature=3.0, alpha=0.7)
        return ({"student": student, "teachers": teachers, "weights": weights, "target": target}, kwargs,
                ("student",))
    return make


def _heads_case(n, d, *, mode):
    def make(device, dtype, g):
        k = len(COVER)
        width = max(len(s) for s in COVER) + (1 if mode == "prob_mean" else 0)
        features = torch.randn(n, k * d, generator=g, dtype=torch.float64)
        weight = torch.randn(k, d, width, generator=g, dtype=torch.float64) / math.sqrt(d)
        bias = torch.randn(k, width, generator=g, dtype=torch.float64)
        return ({"features": features, "weight": weight, "bias": bias, "cover": COVER}, dict(mode=mode),
                ("features", "weight", "bias"))
    return make


def _sparse_case(n, c, k, *, convention, divergence):
    def make(device, dtype, g):
        student = torch.randn(n, c, generator=g, dtype=torch.float64) * 3
        teacher = torch.randn(n, c, generator=g, dtype=torch.float64) * 3
        values, indices = torch.log_softmax(teacher, -1).topk(k, dim=-1)
        values[::3, -1] = -math.inf  # padding entries
        target = torch.randint(0, c, (n,), generator=g)
        target[::4] = -100
        kwargs = dict(temperature=2.0, alpha=0.5, convention=convention, divergence=divergence, beta=0.3)
        return ({"student": student, "indices": indices, "values": values, "target": target}, kwargs,
                ("student",))
    return make


CASES = {
    "kd_loss": [
        Case("7x10", torch.float32, _kd_case(7, 10)),
        Case("33x1000 probs", torch.float32, _kd_case(33, 1000, teacher_kind="probs")),
        Case("4x2051 no target", torch.float32, _kd_case(4, 2051, with_target=False)),
        Case("16x257 bf16", torch.bfloat16, _kd_case(16, 257)),
    ],
    "ensemble_kd_loss": [
        Case("K=3 9x100 prob", torch.float32, _ensemble_case(3, 9, 100, mix="prob")),
        Case("K=2 5x1001 logit", torch.float32, _ensemble_case(2, 5, 1001, mix="logit")),
        Case("K=3 8x130 bf16", torch.bfloat16, _ensemble_case(3, 8, 130, mix="prob")),
    ],
    "grouped_heads": [
        Case("13x5*8 logit_mean", torch.float32, _heads_case(13, 8, mode="logit_mean")),
        Case("6x5*33 prob_mean", torch.float32, _heads_case(6, 33, mode="prob_mean")),
        Case("9x5*16 bf16", torch.bfloat16, _heads_case(9, 16, mode="logit_mean")),
    ],
    "sparse_kd_loss": [
        Case("9x100 k=8 zero", torch.float32, _sparse_case(9, 100, 8, convention="zero", divergence="forward_kl")),
        Case("5x2051 k=64 symmetric jsd", torch.float32,
             _sparse_case(5, 2051, 64, convention="symmetric_uniform", divergence="jsd")),
        Case("8x130 k=5 bf16 reverse_kl", torch.bfloat16,
             _sparse_case(8, 130, 5, convention="symmetric_uniform", divergence="reverse_kl")),
    ],
}


def _reference(op: str) -> Callable:
    return getattr(ued_fast, f"{op}_reference")


def _run(fn: Callable, inputs: dict, kwargs: dict, grad_names, upstream_seed: int, **extra):
    """(output, {name: gradient}) of fn(**inputs, **kwargs) under a fixed random upstream gradient."""
    inputs = {k: (v.detach().requires_grad_(True) if k in grad_names else v) for k, v in inputs.items()}
    out = fn(**inputs, **kwargs, **extra)
    g = torch.Generator().manual_seed(upstream_seed)
    upstream = torch.rand(out.shape, generator=g, dtype=torch.float64).to(out.device) + 0.5
    grads = torch.autograd.grad((out.double() * upstream).sum(), [inputs[k] for k in grad_names])
    return out, dict(zip(grad_names, grads))


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    if actual.shape != expected.shape:
        raise AssertionError(f"shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    if not bool(torch.isfinite(actual).all()):
        return math.inf
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    return float((actual - expected).abs().max()) / max(scale, 1e-12) if actual.numel() else 0.0


def check_case(op: str, backend: str, case: Case, device: torch.device, seed: int = 0) -> tuple[float, str]:
    """(worst relative error of the output and every gradient, '' or what exceeded the tolerance)."""
    g = torch.Generator().manual_seed(seed)
    inputs, kwargs, grad_names = case.make(device, case.dtype, g)
    on_device = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    # The same values the backend sees (rounded to its dtype), in float64, for the reference.
    exact = {k: v.to(case.dtype).double() if k in grad_names or k in ("teacher", "teachers") else v
             for k, v in on_device.items()}
    under_test = {k: v.to(case.dtype) if k in grad_names or k in ("teacher", "teachers") else v
                  for k, v in on_device.items()}
    out, grads = _run(getattr(ued_fast, op), under_test, kwargs, grad_names, seed + 1, backend=backend)
    ref_out, ref_grads = _run(_reference(op), exact, kwargs, grad_names, seed + 1)
    tolerance = TOLERANCE[case.dtype]
    worst, problem = 0.0, ""
    for what, a, r in [("output", out, ref_out)] + [(f"grad {k}", grads[k], ref_grads[k]) for k in grad_names]:
        err = _relative_error(a, r)
        if not problem and not err <= tolerance:
            problem = f"{case.name}: {what} relative error {err:.2e} > {tolerance:.0e}"
        worst = max(worst, err)
    return worst, problem


def _worse(a: float, b: float) -> float:
    """The larger error, nan (a case that raised) above everything."""
    return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)


def native_backends(device) -> list[str]:
    """The backends under test on `device`: all available ones but the reference itself."""
    return [b for b in ued_fast.available_backends(device) if b != "reference"]


def check_backends(device=None, ops=OPS, backends=None) -> dict[tuple[str, str], CheckResult]:
    """{(op, backend): CheckResult} for every op in `ops` and every backend in `backends` (default: every
    native backend of `device`; device default: cuda if available, else cpu). Never raises for a
    backend's failure: it is reported."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    results = {}
    for op in ops:
        for backend in backends or native_backends(device):
            worst, reason, by_dtype = 0.0, "", {}
            for case in CASES[op]:
                try:
                    err, problem = check_case(op, backend, case, device)
                except Exception as exc:  # a crashing backend is a failed check, not a crashed self-check
                    err, problem = math.nan, f"{case.name}: {type(exc).__name__}: {exc}".splitlines()[0]
                worst = _worse(worst, err)
                dtype = str(case.dtype).removeprefix("torch.")
                by_dtype[dtype] = _worse(by_dtype.get(dtype, 0.0), err)
                if problem and not reason:
                    reason = problem
            results[(op, backend)] = CheckResult(not reason, worst, reason, by_dtype)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return results


def format_table(results: dict[tuple[str, str], CheckResult]) -> str:
    """One row per (backend, op): the worst relative error per input dtype, pass or FAIL (reason)."""
    dtypes = [str(d).removeprefix("torch.") for d in TOLERANCE]
    rows = [("backend", "op", *(f"max err {d}" for d in dtypes), "result")]
    for (op, backend), r in sorted(results.items(), key=lambda item: (item[0][1], item[0][0])):
        errors = [f"{r.max_error_by_dtype[d]:.1e}" if d in r.max_error_by_dtype else "-" for d in dtypes]
        rows.append((backend, op, *errors, "pass" if r.passed else f"FAIL ({r.reason})"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ued_fast.selftest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None,
                        help="torch device to check (default: cuda if available, else cpu)")
    args = parser.parse_args(argv)
    try:
        device = torch.device(args.device if args.device else ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as exc:
        parser.error(f"--device: {exc}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {device}: torch {torch.__version__} sees no CUDA device")
    print(f"ued_fast {ued_fast.__version__} self-check on {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
          f"torch {torch.__version__}; backends: {', '.join(ued_fast.available_backends(device))}")
    with warnings.catch_warnings():  # numpy's divide-by-zero notes from the Triton interpreter (-inf is legal)
        warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"triton\..*")
        results = check_backends(device)
    if not results:
        print("no native backend on this device (ued_fast._C not built?): only the reference runs")
        return 0
    print(format_table(results))
    failed = [key for key, r in results.items() if not r.passed]
    print(f"{len(results) - len(failed)} of {len(results)} passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
