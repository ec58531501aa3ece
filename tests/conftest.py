"""Shared test helpers: which backends run here, markers, tolerances derived from dtypes.

Backends come from ued_fast.available_backends for 'cpu' (plus 'cuda' when a GPU is present), so a
backend is covered as soon as it exists: 'triton' runs on CPU tensors under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ued_fast


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running tests, deselected in CI with -m 'not slow'")


def backend_cases(op: str) -> list:
    """pytest params (backend, device) for every backend of `op` that can run on this machine."""
    cases = []
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for backend in ued_fast.available_backends(device):
            cases.append(pytest.param(backend, device, id=f"{backend}-{device}"))
    return cases


def float_dtypes(backend: str) -> list[torch.dtype]:
    """Input dtypes a backend takes: the GPU kernels are written for 16- and 32-bit floats."""
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    if backend in ("cpp", "reference"):
        dtypes.append(torch.float64)
    return dtypes


# The Triton interpreter runs every program in numpy: it gets small problems only.
TRITON_MAX_ROWS, TRITON_MAX_COLS = 64, 4097


def sized_for(backend: str, device: str, n: int, c: int) -> int:
    """Rows to use for a [n, c] case (fewer under the Triton interpreter); skips a case too wide for it."""
    if backend == "triton" and device == "cpu":
        if c > TRITON_MAX_COLS:
            pytest.skip(f"C={c} is too wide for the Triton interpreter (one case with C=32000 runs elsewhere)")
        return min(n, TRITON_MAX_ROWS)
    return n


def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def compute_eps(dtype: torch.dtype) -> float:
    """Unit roundoff of the arithmetic: float32 registers for every input dtype but float64."""
    return eps(torch.float64) if dtype == torch.float64 else eps(torch.float32)


def assert_close(actual, expected, *, rtol: float, atol: float, what: str):
    """|actual - expected| <= atol + rtol*|expected| entrywise, with the same non-finite entries."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(actual), finite), f"{what}: non-finite entries differ"
    assert torch.equal(actual[~finite], expected[~finite]) or bool(
        torch.isnan(expected[~finite]).all()
    ), f"{what}: infinities differ"
    err = (actual[finite] - expected[finite]).abs()
    atol = torch.as_tensor(atol, dtype=torch.float64).cpu().expand_as(expected)[finite]
    bound = atol + rtol * expected[finite].abs()
    if err.numel() and not bool((err <= bound).all()):
        worst = int((err - bound).argmax())
        raise AssertionError(
            f"{what}: max error {float(err.max()):.3g}; worst entry {float(actual[finite][worst]):.6g} vs "
            f"{float(expected[finite][worst]):.6g} (bound {float(bound[worst]):.3g})"
        )


def teacher_as_kind(logits, kind: str, temperature: float):
    """The teacher tensor a `teacher_kind` means, made from logits (tempered_* kinds divide by temperature)."""
    import torch.nn.functional as F

    t = logits / temperature if kind.startswith("tempered_") else logits
    if kind.endswith("log_probs"):
        return F.log_softmax(t, -1)
    return F.softmax(t, -1) if kind.endswith("probs") else t


def triton_device_or_skip_module() -> str:
    """The device Triton tests run on; skips the calling module where the Triton backend cannot run."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if "triton" not in ued_fast.available_backends(device):
        pytest.skip("Triton backend not available here (on CPU it needs TRITON_INTERPRET=1)",
                    allow_module_level=True)
    return device


# The interpreter evaluates masked-out lanes too (exp(-inf - -inf) and the like): numpy warns.
IGNORE_INTERPRETER_WARNINGS = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def assert_compiled_kd_step_matches_eager(backend: str, student, teacher, target):
    """torch.compile(fullgraph=True) of a step around kd_loss gives the eager loss and student gradient."""
    torch._dynamo.reset()

    def step(s, t, y):
        return ued_fast.kd_loss(s, t, y, temperature=2.0, alpha=0.5, backend=backend) * 2.0

    compiled = torch.compile(step, fullgraph=True)
    a, b = student.clone().requires_grad_(), student.clone().requires_grad_()
    loss_c, loss_e = compiled(a, teacher, target), step(b, teacher, target)
    loss_c.backward()
    loss_e.backward()
    assert_close(loss_c, loss_e, rtol=1e-6, atol=1e-6, what="compiled loss")
    assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7, what="compiled grad")


def assert_one_line_cli_error(result, *words):
    """Exit code 2, no traceback, one `ued-fast: error:` line that names every word."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    err = result.stderr if getattr(result, "stderr", None) else result.output
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ued-fast: error:"), err
    for word in words:
        assert word in lines[0], (word, lines[0])


class TensorSizeWatch(TorchDispatchMode):
    """Watches the tensors ops return: `largest`, the most elements of any; `storages`, the distinct storages
    of those with at least `numel` elements (views and in-place results share theirs and count once);
    `largest_other`, the most elements of any smaller one."""

    def __init__(self, numel: float = math.inf):
        super().__init__()
        self.numel = numel
        self.largest = 0
        self.storages = set()
        self.largest_other = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
                if t.numel() >= self.numel:
                    self.storages.add(t.untyped_storage().data_ptr())
                else:
                    self.largest_other = max(self.largest_other, t.numel())
        return out
