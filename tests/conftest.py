"""Shared fixtures: tiny models built from a config and a tokenizer made locally (no Hub access), the data fixtures
(`fixture_data_dir`, `hub_training_data`) and the full local data files where TRL_BRIDGE_DATA_DIR names them
(`benchmarks_dir`)."""

import json
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
FIXTURES = REPO / "tests" / "fixtures"
#: The full local copies of the benchmark and training files: only where TRL_BRIDGE_DATA_DIR names them (no folder is
#: looked for anywhere else).
FULL_DATA_DIR = os.environ.get("TRL_BRIDGE_DATA_DIR") or None


@pytest.fixture(scope="session")
def benchmarks_dir():
    """The full local data files ($TRL_BRIDGE_DATA_DIR), for the tests that grade or count whole benchmarks and
    datasets; they skip without it (the reason shows in the summary). Tests that need a few real rows use
    `fixture_data_dir`; the Hub path is tested at the `datasets.load_dataset` boundary (`hub_training_data`,
    test_benchmark_sources.py)."""
    if FULL_DATA_DIR is None:
        pytest.skip("grades or counts a whole benchmark/dataset: needs the full local data files; set "
                    "TRL_BRIDGE_DATA_DIR to a copy (tests never download from the Hub)")
    if not Path(FULL_DATA_DIR).is_dir():
        pytest.fail(f"TRL_BRIDGE_DATA_DIR={FULL_DATA_DIR!r} is not a directory")
    return Path(FULL_DATA_DIR)


@pytest.fixture(scope="session")
def fixture_data_dir():
    """A small data folder shipped with the tests (tests/fixtures/data_dir, the local file layout and formats): the
    first rows of gsm8k/, math/, math500/, math_level3to5/, aime24/, amc23/, knights_knaves/{3,4}ppl/ and three
    made-up GPQA-format rows (GPQA's authors ask that its questions stay off the web). Pass it as `data_dir` /
    --data_dir."""
    return FIXTURES / "data_dir"


#: (repo, config, split, data_files) of every Hub dataset the builtin training sets load (`trl_bridge.tasks.data.
#: BUILTIN_SOURCES`) -> its fixture in tests/fixtures/hub: a few rows in that Hub dataset's own schema.
HUB_FIXTURES = {
    ("hkust-nlp/SimpleRL-Zoo-Data", None, "train", "simplelr_qwen_level3to5/train.parquet"):
        "hkust-nlp__SimpleRL-Zoo-Data__simplelr_qwen_level3to5__train.jsonl",
    ("DigitalLearningGmbH/MATH-lighteval", "default", "train", None):
        "DigitalLearningGmbH__MATH-lighteval__default__train.jsonl",
    ("openai/gsm8k", "main", "train", None): "openai__gsm8k__main__train.jsonl",
    ("openai/gsm8k", "main", "test", None): "openai__gsm8k__main__test.jsonl",
    ("HuggingFaceH4/MATH-500", None, "test", None): "HuggingFaceH4__MATH-500__test.jsonl",
    **{("K-and-K/knights-and-knaves", "train", f"{n}ppl", None): f"K-and-K__knights-and-knaves__train__{n}ppl.jsonl"
       for n in range(3, 8)},
}


class FakeHub:
    """Stands in for `datasets.load_dataset`: Hub sources in `HUB_FIXTURES` get their fixture rows, any other Hub
    name raises the ConnectionError an offline machine gets; local builders (json, parquet, csv) go to the real
    function. `calls` holds one dict per Hub call: path, name, split, revision (and data_files when given)."""

    LOCAL_BUILDERS = ("json", "parquet", "csv")

    def __init__(self, real):
        self.real, self.calls = real, []

    def __call__(self, path, name=None, split=None, revision=None, data_files=None, **kwargs):
        import datasets

        if path in self.LOCAL_BUILDERS:
            return self.real(path, name, split=split, revision=revision, data_files=data_files, **kwargs)
        self.calls.append({"path": path, "name": name, "split": split, "revision": revision,
                           **({"data_files": data_files} if data_files is not None else {}), **kwargs})
        fixture = HUB_FIXTURES.get((path, name, split, data_files))
        if fixture is None:
            raise ConnectionError(f"Couldn't reach {path!r} (config {name!r}, split {split!r}, data_files "
                                  f"{data_files!r}) on the Hub: not among the test fixtures (tests/fixtures/hub)")
        return datasets.Dataset.from_list([json.loads(line) for line in (FIXTURES / "hub" / fixture).open()])


@pytest.fixture
def hub_training_data(monkeypatch):
    """`datasets.load_dataset` answered from tests/fixtures/hub (`FakeHub`), with TRL_BRIDGE_DATA_DIR unset, so that
    `builtin:math_level3to5`, `builtin:math` (train; test = MATH-500) and `builtin:gsm8k` (train, test) load their
    Hub datasets as on a fresh machine. Returns the `FakeHub`; assert on its `calls`, e.g.
    ``{c["path"] for c in hub_training_data.calls}``."""
    import datasets

    fake = FakeHub(datasets.load_dataset)
    monkeypatch.setattr(datasets, "load_dataset", fake)
    monkeypatch.delenv("TRL_BRIDGE_DATA_DIR", raising=False)
    return fake


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


@pytest.fixture(scope="session")
def tok():
    """The tiny tokenizer made locally by the `tokenizers` library (trl_bridge.tiny)."""
    from trl_bridge.tiny import make_tiny_tokenizer

    return make_tiny_tokenizer()
