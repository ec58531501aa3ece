# The two first commands: `make demo` (the main job on the embedded digits data) and `make test`.
# Both set everything up themselves in .venv: torch (pinned), triton, the other dependencies, and the
# ued_fast._C extension.
#
# TORCH_SPEC picks the torch build (always pinned: an unpinned resolve pulls whatever is newest).
# Default: the CUDA 13.0 build, which brings its own pinned triton. TORCH_SPEC=torch==2.13.0 is a CPU
# wheel: TRITON_SPEC is then installed for the Triton backend (it runs on CPU under TRITON_INTERPRET=1).
# The CUDA kernels are compiled when torch has CUDA, nvcc is found and a GPU is visible or FORCE_CUDA=1
# (CI sets it); otherwise only the C++ CPU kernels, so `make demo` on a CPU box does not wait for nvcc.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
TRITON_SPEC ?= triton==3.8.0
PIP_SPEC ?= pip==26.2.1
MAX_JOBS ?= $(shell nproc 2>/dev/null || echo 2)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ued_fast-installed

export MAX_JOBS

.PHONY: setup demo test test-all selftest bench-cpu check-cuda clean

setup: $(STAMP)

# A current pip: an old one with the new setuptools fails in build isolation.
$(STAMP): setup.py pyproject.toml requirements-dev.txt $(wildcard csrc/*.cpp csrc/*.cu)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(PIP_SPEC)"
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install -q "$(TRITON_SPEC)"
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	$(PY) -c "import torch, ued_fast; print('ued_fast', ued_fast.__version__, '| torch', torch.__version__, '| CUDA kernels built:', bool(torch.ops.ued_fast.cuda_built()))"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ued-fast demo

# TRITON_INTERPRET=1 runs the Triton kernels on CPU tensors, so the 'triton' backend is tested here too.
test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m "not slow" tests

test-all: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

# Every op on every backend of this machine's default device against the reference.
selftest: $(STAMP)
	$(PY) -m ued_fast.selftest

bench-cpu: $(STAMP)
	$(PY) -m pytest -q bench --benchmark-only

# nvcc compile-only check of csrc/*.cu (seconds per file, no link): a developer tool, CI builds for real.
check-cuda: $(STAMP)
	PYTHON=$(PY) bash .ci/check_cuda.sh

clean:
	rm -rf build $(VENV) ued_fast/_C*.so *.egg-info
