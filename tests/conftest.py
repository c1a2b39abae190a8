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


def pytest_terminal_summary(terminalreporter):
    """One line per distinct skip reason, with its count, right above pytest's final line (e.g. `52 tests: needs the
    local benchmark files ...`), so a summary saying "52 skipped" always says why."""
    reasons: dict[str, int] = {}
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
        reason = reason.removeprefix("Skipped: ")
        reasons[reason] = reasons.get(reason, 0) + 1
    if reasons:
        terminalreporter.section("skipped tests, by reason", sep="-")
        for reason, count in sorted(reasons.items(), key=lambda item: -item[1]):
            terminalreporter.write_line(f"{count} test{'s' * (count != 1)}: {reason}")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Qwen2 and its locally trained tokenizer saved as a model folder, as a user passes one by path
    (GRPOTrainer also builds its KL reference from the path)."""
    from trl_bridge.tiny import make_tiny_model, make_tiny_tokenizer

    path = tmp_path_factory.mktemp("tiny_model")
    tok = make_tiny_tokenizer()
    make_tiny_model(tok).save_pretrained(path)
    tok.save_pretrained(path)
    return path
