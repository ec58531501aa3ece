"""pytest setup for bench/: collect bench_*.py files, and record the software and load in the JSON."""
from __future__ import annotations

import os

import pytest


def pytest_collect_file(file_path, parent):
    # Benchmarks are named bench_*.py so that `pytest tests` never runs them; collect them here
    # (a file named on the command line is collected by pytest itself).
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_benchmark_update_machine_info(config, machine_info):
    import torch

    from ued_fast.experiment import cpu_name

    machine_info["torch"] = torch.__version__
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    try:
        import triton

        machine_info["triton"] = triton.__version__
    except ImportError:
        machine_info["triton"] = None
    machine_info["cuda"] = torch.version.cuda
    machine_info["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    machine_info["cpu_model"] = cpu_name()
    machine_info["logical_cpus"] = os.cpu_count()
    machine_info["load_average_at_start"] = os.getloadavg() if hasattr(os, "getloadavg") else None
