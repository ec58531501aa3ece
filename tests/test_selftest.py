"""ued_fast.selftest: passes every backend of this machine, and reports a broken backend as failed
(with its reason and a non-zero exit) instead of passing it or crashing."""
from __future__ import annotations

import math

import pytest
import torch

import ued_fast
from ued_fast import selftest


def test_every_native_backend_passes_on_cpu():
    results = selftest.check_backends("cpu")
    backends = selftest.native_backends("cpu")
    assert "reference" not in backends
    assert set(results) == {(op, b) for op in selftest.OPS for b in backends}
    for key, result in results.items():
        assert result.passed, (key, result.reason)
        assert result.max_error <= selftest.TOLERANCE[torch.bfloat16], key
        assert result.max_error_by_dtype["float32"] <= selftest.TOLERANCE[torch.float32], key


def _break(monkeypatch, op: str, backend: str, breakage):
    """Replace ued_fast.<op> with a version whose `backend` results go through `breakage`."""
    original = getattr(ued_fast, op)

    def broken(*args, backend=None, **kwargs):
        out = original(*args, backend=backend, **kwargs)
        return breakage(out) if backend == BROKEN_BACKEND else out

    BROKEN_BACKEND = backend
    monkeypatch.setattr(ued_fast, op, broken)


@pytest.mark.parametrize("op", selftest.OPS)
def test_a_slightly_wrong_backend_fails(monkeypatch, op):
    backend = selftest.native_backends("cpu")[0]
    _break(monkeypatch, op, backend, lambda out: out * (1 + 1e-3))  # 0.1% off: still "plausible" numbers
    results = selftest.check_backends("cpu", ops=[op])
    broken = results[(op, backend)]
    assert not broken.passed and not broken
    assert "output relative error" in broken.reason and broken.max_error > 5e-4
    assert all(r.passed for key, r in results.items() if key != (op, backend))


def test_a_nan_gradient_fails(monkeypatch):
    backend = selftest.native_backends("cpu")[0]

    class NanGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g * math.nan

    _break(monkeypatch, "kd_loss", backend, NanGrad.apply)
    result = selftest.check_backends("cpu", ops=["kd_loss"])[("kd_loss", backend)]
    assert not result.passed and "grad student" in result.reason and math.isinf(result.max_error)


def test_a_raising_backend_is_reported_not_raised(monkeypatch):
    backend = selftest.native_backends("cpu")[0]

    def boom(out):
        raise RuntimeError("no kernel image is available for execution on the device")

    _break(monkeypatch, "grouped_heads", backend, boom)
    result = selftest.check_backends("cpu", ops=["grouped_heads"])[("grouped_heads", backend)]
    assert not result.passed and math.isnan(result.max_error)
    assert "RuntimeError: no kernel image" in result.reason


def test_main_prints_the_table_and_exits_nonzero_on_a_failure(monkeypatch, capsys):
    assert selftest.main(["--device", "cpu"]) == 0
    table = capsys.readouterr().out
    for op in selftest.OPS:
        assert op in table
    assert "FAIL" not in table and f"{len(selftest.OPS) * len(selftest.native_backends('cpu'))} of" in table

    backend = selftest.native_backends("cpu")[0]
    _break(monkeypatch, "ensemble_kd_loss", backend, lambda out: out + 1)
    assert selftest.main(["--device", "cpu"]) == 1
    row = [line for line in capsys.readouterr().out.splitlines() if "ensemble_kd_loss" in line and backend in line]
    assert len(row) == 1 and "FAIL (" in row[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_cuda_device_without_gpu_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        selftest.main(["--device", "cuda"])
    assert exc.value.code == 2 and "--device cuda" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_every_gpu_backend_passes():
    results = selftest.check_backends("cuda")
    assert results and all(r.passed for r in results.values()), {k: r.reason for k, r in results.items() if not r}


def test_experiment_refuses_a_backend_that_fails_the_self_check(monkeypatch):
    from ued_fast import experiment, selftest

    bad = {("kd_loss", "cpp"): selftest.CheckResult(False, 0.5, "kd_loss 1-row case off by 0.5"),
           ("grouped_heads", "cpp"): selftest.CheckResult(True, 1e-7)}
    asked = []
    monkeypatch.setattr(selftest, "check_backends", lambda device, **kw: asked.append(kw) or bad)
    with pytest.raises(experiment.ConfigError, match=r"'cpp' kernels failed the self-check.*kd_loss 1-row case"):
        experiment.refuse_failing_backends(torch.device("cpu"), "cpp")
    assert asked == [{"backends": ("cpp",)}]  # only the backend the run will use is checked
    experiment.refuse_failing_backends(torch.device("cpu"), "reference")  # the reference is the spec: no check
    monkeypatch.setattr(selftest, "check_backends",
                        lambda device, **kw: {k: selftest.CheckResult(True, 0.0) for k in bad})
    experiment.refuse_failing_backends(torch.device("cpu"), None)
