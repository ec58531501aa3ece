"""The build and the package: every native op has a CUDA kernel whenever the extension was built with
CUDA (and CI's FORCE_CUDA build really has them), the version has one source, every third-party
module the package imports is a declared dependency, and a build without torch fails in one line."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ued_fast
from ued_fast import _backend

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def native_op_names() -> set[str]:
    """Ops with a CPU kernel in csrc/*.cpp (TORCH_LIBRARY_IMPL(ued_fast, CPU, m) { m.impl("name", ...) })."""
    names = set()
    for src in sorted((REPO / "csrc").glob("*.cpp")):
        for block in re.findall(r"TORCH_LIBRARY_IMPL\(\s*ued_fast\s*,\s*CPU\s*,\s*\w+\s*\)\s*\{(.*?)\n\}",
                                src.read_text(), flags=re.S):
            names |= set(re.findall(r'\.impl\(\s*"(\w+)"', block))
    return names


def test_native_ops_are_found_in_the_sources():
    # The scan below must see the ops it is meant to check.
    assert {"kd_loss_fwd", "ensemble_kd_loss_fwd", "grouped_heads_fwd", "grouped_heads_bwd",
            "sparse_kd_loss_fwd"} <= native_op_names()


@pytest.mark.skipif(not _backend.extension_loaded(), reason="ued_fast._C is not built")
def test_every_native_op_has_a_cuda_kernel_iff_built_with_cuda():
    built = bool(torch.ops.ued_fast.cuda_built())
    has_cuda = {name: torch._C._dispatch_has_kernel_for_dispatch_key(f"ued_fast::{name}", "CUDA")
                for name in sorted(native_op_names())}
    if built:
        assert all(has_cuda.values()), f"built with CUDA but without a CUDA kernel: {[n for n, h in has_cuda.items() if not h]}"
    else:
        assert not any(has_cuda.values()), f"CUDA kernels registered by a CPU-only build: {has_cuda}"


@pytest.mark.skipif(os.environ.get("UED_FAST_EXPECT_CUDA") != "1",
                    reason="UED_FAST_EXPECT_CUDA=1 (set by .ci/run and bench/gpu_run.sh) asks for the CUDA build")
def test_the_expected_cuda_build_is_the_one_loaded():
    assert _backend.extension_loaded(), "ued_fast._C did not load"
    assert torch.ops.ued_fast.cuda_built(), "ued_fast._C was built without its CUDA kernels (FORCE_CUDA=1, nvcc?)"


def test_version_has_one_source():
    assert PYPROJECT["project"]["dynamic"] == ["version"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "ued_fast.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", ued_fast.__version__)


# Import name -> distribution name, where they differ.
DISTRIBUTIONS = {"sklearn": "scikit-learn", "PIL": "pillow", "yaml": "pyyaml"}


def imported_top_level_modules(paths) -> set[str]:
    found = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found


def requirement_names(requirements) -> set[str]:
    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_every_imported_third_party_module_is_declared():
    sources = list((REPO / "ued_fast").glob("**/*.py")) + list((REPO / "kernels").glob("*.py"))
    third_party = imported_top_level_modules(sources) - set(sys.stdlib_module_names) - {"ued_fast", "__future__"}
    assert {"torch", "numpy", "sklearn", "PIL"} <= third_party  # the scan sees the imports
    required = requirement_names(PYPROJECT["project"]["dependencies"])
    optional = requirement_names(r for extra in PYPROJECT["project"]["optional-dependencies"].values() for r in extra)
    missing = {m for m in third_party if DISTRIBUTIONS.get(m, m).lower() not in required}
    assert missing <= {"triton"}, f"imported but not in [project] dependencies: {sorted(missing)}"
    assert "triton" in optional  # the Triton backend is optional: ued_fast imports it lazily


def test_console_script_points_at_the_cli():
    module, _, func = PYPROJECT["project"]["scripts"]["ued-fast"].partition(":")
    import importlib

    assert callable(getattr(importlib.import_module(module), func))


def test_building_without_torch_is_a_one_line_error(tmp_path):
    # torch made unimportable, then setup.py run as pip's build backend would run it.
    code = "import sys, runpy; sys.modules['torch'] = None; sys.argv = ['setup.py', '--name']; runpy.run_path('setup.py', run_name='__main__')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "UED_FAST_NO_EXT": ""})
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "install torch first" in lines[0] and "--no-build-isolation" in lines[0]


def test_force_cuda_without_nvcc_or_cuda_torch_is_an_error_not_a_cpu_build():
    code = "import runpy, sys; sys.argv = ['setup.py', '--name']; runpy.run_path('setup.py', run_name='__main__')"
    env = {**os.environ, "FORCE_CUDA": "1", "UED_FAST_NO_EXT": "", "UED_FAST_NO_CUDA": "", "CUDA_HOME": "/nonexistent"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    expected = "nvcc was not found" if torch.version.cuda else "has no CUDA"
    assert proc.returncode == 1 and f"FORCE_CUDA=1 but" in proc.stderr and expected in proc.stderr, proc.stderr


# The shared helper layer of the kernels (csrc/utils.h, codes.h, cpu_vec.h, cuda_utils.cuh, cuda_reduce.cuh):
# each helper is defined once, in its header, and every kernel source includes the layer.
HELPER_HEADERS = {"utils.h", "codes.h", "cpu_vec.h", "cuda_utils.cuh", "cuda_reduce.cuh"}
SHARED_HELPERS = ["vexp", "fast_exp", "fast_log", "lane_exp", "hsum", "hmax", "row_max", "load_row", "reduce_sum",
                  "reduce_max", "warp_sum", "warp_max", "warp_allreduce", "group_allreduce", "group_sum",
                  "dispatch_float", "to_float", "from_float", "check_cpu_supports_build", "divergence_terms",
                  "log_ratio_terms", "check_kd_loss_args", "check_ensemble_kd_loss_args", "kd_outputs", "heads_view",
                  "empty_head_grads"]


def helper_definitions(text: str, name: str) -> int:
    """How many times `name` is defined: a line with a return type (and qualifiers) before the name, then
    '(' ... ') {' (a call has no type before the name)."""
    pattern = rf"^[ \t]*(?!return\b)(?:[\w:<>,*&]+[ \t]+)+{name}(?:<[^>\n]*>)?\s*\([^;{{]*\)\s*(?:const\s*)?\{{"
    return len(re.findall(pattern, text, flags=re.M))


def test_each_kernel_helper_is_defined_once_in_the_shared_headers():
    sources = {p.name: p.read_text() for p in sorted((REPO / "csrc").iterdir()) if p.suffix in (".h", ".cuh", ".cpp", ".cu")}
    assert HELPER_HEADERS <= set(sources)
    for name in SHARED_HELPERS:
        where = {f: n for f, text in sources.items() if (n := helper_definitions(text, name))}
        assert set(where) <= HELPER_HEADERS, f"{name} is defined in a kernel source: {where}"
        overloads = {"to_float": 3, "from_float": 4, "lane_exp": 2}.get(name, 1)
        assert sum(where.values()) <= overloads, f"{name} is defined more than once: {where}"


def test_every_kernel_source_includes_the_shared_helpers():
    for src in sorted((REPO / "csrc").iterdir()):
        if src.suffix not in (".cpp", ".cu") or src.name == "module.cpp":
            continue
        includes = set(re.findall(r'#include "([\w.]+)"', src.read_text()))
        assert includes & HELPER_HEADERS, f"{src.name} includes none of the shared helper headers"


@pytest.mark.skipif(not _backend.extension_loaded(), reason="ued_fast._C is not built")
def test_kd_op_schemas_take_the_contract_arguments():
    common = ["inv_student_temp", "inv_teacher_temp", "kd_coef", "ce_coef", "divergence", "beta", "ignore_index"]
    expected = {
        "kd_loss_fwd": ["student", "teacher", "target", *common, "teacher_kind", "compute_grad"],
        "ensemble_kd_loss_fwd": ["student", "teachers", "weights", "target", *common, "mix", "compute_grad"],
        # The teacher arrives tempered and normalized (log_p), so no inv_teacher_temp.
        "sparse_kd_loss_fwd": ["student", "indices", "log_p", "target",
                               *[name for name in common if name != "inv_teacher_temp"], "compute_grad"],
    }
    for op, names in expected.items():
        schema = getattr(torch.ops.ued_fast, op).default._schema
        assert [a.name for a in schema.arguments] == names, str(schema)
