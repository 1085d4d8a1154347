# Two commands do all the set-up on a fresh machine:
#   make demo   -> creates .venv, installs gpuquant, runs `gpuquant demo`
#   make test   -> creates .venv, installs gpuquant[test], runs the test suite (CPU; Triton
#                  kernels through TRITON_INTERPRET=1)
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.13.0: this project's machines hold its CPU build locally; from PyPI pip takes the
# multi-GB CUDA build, so elsewhere set TORCH_INDEX=https://download.pytorch.org/whl/cpu for
# the CPU build; override with TORCH_SPEC='torch' (or your CUDA build) on a GPU machine.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
TORCH_PIP_ARGS = $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
# worksteal: an idle worker takes queued tests from the other. xdist's default ("load") hands
# out consecutive chunks and never takes them back, which left one worker idle for the last
# ~7 of 14 minutes (bench/README.md NOTES, 2026-11-28).
PYTEST_ARGS ?= -n 2 --dist worksteal

.PHONY: demo test test-triton36 bench clean gpu gpu-lease tcache wheels

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[test,demo,bench]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/gpuquant demo $(DEMO_ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

# The GPU machines run Triton 3.6 (CI and .venv: the newest): every Triton kernel's tests
# (interpreter, PTX for sm_80 / sm_90) again under Triton 3.6, in a second venv. NumPy < 2.4:
# Triton 3.6's interpreter cannot run kernels with a runtime loop bound under NumPy 2.4.
VENV_T36 ?= .venv-triton36
TRITON36_TESTS ?= tests/backends/test_triton_*.py tests/transformers

$(VENV_T36)/.installed: pyproject.toml
	python3 -m venv $(VENV_T36)
	$(VENV_T36)/bin/python -m pip install -q --upgrade pip
	$(VENV_T36)/bin/python -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(VENV_T36)/bin/python -m pip install -q -e '.[test]' "triton==3.6.0" "numpy<2.4"
	touch $@

test-triton36: $(VENV_T36)/.installed
	$(VENV_T36)/bin/python -m pytest -q $(PYTEST_ARGS) $(TRITON36_TESTS)

bench: $(VENV)/.installed
	$(VENV)/bin/gpuquant bench --quick --out bench/results/local

clean:
	rm -rf $(VENV) $(VENV_T36)

# On a GPU machine, in an environment that already has torch (CUDA build), triton, pytest
# (and optionally cupy): nothing is installed, the package runs from this checkout. The GPU
# tests, then every GPU benchmark suite into bench/results/<device-slug>/.
PYTHON ?= python3
gpu:
	PYTHONPATH=$(CURDIR) $(PYTHON) -m pytest -q -m gpu tests
	PYTHONPATH=$(CURDIR) $(PYTHON) -m gpuquant bench fake_quant qat_step gemm conv models \
	  linear_dynamic --out bench/results/$$(PYTHONPATH=$(CURDIR) $(PYTHON) -c \
	  "from gpuquant.bench import device_slug; print(device_slug('cuda'))")

# A short GPU lease: the same stages in priority order under one time budget (seconds),
# results and logs packed into $(LEASE_OUT)/lease.tar.gz (see gpuquant/bench/lease.py).
LEASE_OUT ?= lease-out
LEASE_BUDGET ?= 540
gpu-lease:
	PYTHONPATH=$(CURDIR) $(PYTHON) -m gpuquant.bench.lease --out $(LEASE_OUT) --budget $(LEASE_BUDGET)

# Before a lease, here: the suites' kernels compiled for the GPU machines' Triton (3.6.0 on
# CPython 3.12: its wheel gives the cache key) and packed into .tcache/ (git-ignored; carry
# it with the checkout), which gpu-lease unpacks (gpuquant/bench/tcache.py), with the
# weight-only and Gluon GEMMs' forced configs (the GPU probes' and tests': warm.py
# weight_only_tiles, gluon_tiles).
# ~16 min on 2 cores (1047 kernels, 34 MiB: metadata and cubins, no PTX).
TRITON_WHEEL_DIR ?= /tmp/gpuquant-triton-wheel
tcache: $(VENV_T36)/.installed
	$(VENV_T36)/bin/python -m pip download -q --no-deps --only-binary=:all: \
	  --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
	  -d $(TRITON_WHEEL_DIR) triton==3.6.0
	env -u TRITON_INTERPRET $(VENV_T36)/bin/python -m gpuquant.bench.tcache build \
	  --wheel $$(ls $(TRITON_WHEEL_DIR)/triton-3.6.0-cp312-*.whl) \
	  --out .tcache/triton-3.6.0-cp312-sm90.tar.gz

# Before a lease, here: wheels of the optional comparison packages (torchao: the
# linear_dynamic suite's torchao rows) for the GPU machines' CPython 3.12, into .tcache/wheels/
# (carried with .tcache); the lease runner unzips each and uses it if it imports there
# (gpuquant/bench/wheels.py). torchao 0.17.0: built against torch 2.11 (the GPU machines').
TORCHAO_SPEC ?= torchao==0.17.0
wheels:
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp --platform manylinux_2_28_x86_64 -d .tcache/wheels "$(TORCHAO_SPEC)"
