# The two first commands: `make demo` (the main job on the embedded digits data) and `make test`.
# Both set everything up themselves in .venv: torch (pinned, CPU wheel where one is local), the other
# dependencies, and the ued_fast._C extension.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ued_fast-installed

.PHONY: setup demo test test-all bench-cpu check-cuda clean

setup: $(STAMP)

# torch is installed on its own and pinned: an unpinned resolve would pull several GB of CUDA wheels.
$(STAMP): setup.py requirements-dev.txt $(wildcard csrc/*.cpp csrc/*.cu)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ued-fast demo

# TRITON_INTERPRET=1 runs the Triton kernels on CPU tensors, so the 'triton' backend is tested here too.
test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m "not slow" tests

test-all: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

bench-cpu: $(STAMP)
	$(PY) -m pytest -q bench --benchmark-only

check-cuda: $(STAMP)
	PYTHON=$(PY) bash .ci/check_cuda.sh

clean:
	rm -rf build $(VENV) ued_fast/_C*.so *.egg-info
