"""Shared fixtures: tiny models built from a config and a tokenizer made locally (no Hub access)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED_BENCHMARKS = Path(os.environ.get("TRL_BRIDGE_DATA_DIR", REPO.parent / "shared" / "benchmarks"))


@pytest.fixture(scope="session")
def benchmarks_dir():
    if not SHARED_BENCHMARKS.is_dir():
        pytest.skip(f"benchmark data not found at {SHARED_BENCHMARKS}")
    return SHARED_BENCHMARKS
