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
    """The local benchmark files (tests that grade real rows use them through --data_dir; the Hub path is tested at
    the `datasets.load_dataset` boundary in test_benchmark_sources.py). The skip reason shows in the summary (-rs)."""
    if not SHARED_BENCHMARKS.is_dir():
        pytest.skip(f"needs the local benchmark files, not found at {SHARED_BENCHMARKS}; set TRL_BRIDGE_DATA_DIR to a "
                    "copy (tests never download from the Hub)")
    return SHARED_BENCHMARKS
