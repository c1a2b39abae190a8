"""Tests for trl_bridge.tasks.data: the arithmetic task, the GSM8K/MATH loaders (Hub sources answered at the
`datasets.load_dataset` boundary from fixtures in the Hub schemas, the local copies from the fixture data folder, and
whole-file counts on the full local copies where TRL_BRIDGE_DATA_DIR names them), specs and validation."""

import json
import logging
import random
import re

import pytest
from datasets import Dataset, DatasetDict

from trl_bridge.tasks import data
from trl_bridge.tasks.benchmarks import get_benchmark
from trl_bridge.tasks.data import (
    BUILTIN_SOURCES,
    REASONING_INSTRUCTION,
    dataset_source,
    load_dataset_spec,
    load_gsm8k,
    load_math,
    load_math_level3to5,
    make_arithmetic_task,
    parse_column_map,
    validate_rl_dataset,
    validate_sft_dataset,
)
from trl_bridge.tasks.grading import extract_boxed
from trl_bridge.tasks.rewards import completion_text, math_correctness_reward

from ..conftest import FIXTURES, HUB_FIXTURES


@pytest.fixture
def full_data(benchmarks_dir, monkeypatch):
    """The full local copies, selected through TRL_BRIDGE_DATA_DIR (skipped without it)."""
    monkeypatch.setenv("TRL_BRIDGE_DATA_DIR", str(benchmarks_dir))
    return benchmarks_dir


def _hub_rows(fixture: str) -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / "hub" / fixture).read_text().splitlines()]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _shift_answer(answer: str) -> str:
    return str(int(answer) + 1)


# ---------------------------------------------------------------------------------------------------- arithmetic task


def test_arithmetic_chat_format_and_every_trace_is_graded_correct():
    task = make_arithmetic_task(num_train=300, num_test=50, seed=3)
    assert isinstance(task, DatasetDict) and set(task) == {"rl", "sft", "test"}
    assert (len(task["rl"]), len(task["sft"]), len(task["test"])) == (300, 300, 50)
    rl, sft = task["rl"], task["sft"]
    assert rl["prompt"] == sft["prompt"]
    first = rl[0]["prompt"]
    assert first[0]["role"] == "user" and first[0]["content"].endswith(REASONING_INSTRUCTION)
    assert sft[0]["completion"][0]["role"] == "assistant"
    assert math_correctness_reward(completions=sft["completion"], answer=rl["answer"]) == [1.0] * 300
    wrong = [_shift_answer(a) for a in rl["answer"]]
    assert math_correctness_reward(completions=sft["completion"], answer=wrong) == [0.0] * 300
    validate_rl_dataset(task["test"], required=("prompt", "answer"))
    validate_sft_dataset(sft)


def test_arithmetic_default_is_short_and_easy():
    task = make_arithmetic_task(num_train=200, num_test=10, seed=0)
    for completion, answer in zip(task["sft"]["completion"], task["rl"]["answer"]):
        lines = completion_text(completion).splitlines()
        assert 2 <= len(lines) <= 3  # 1-2 equations + the boxed answer
        assert 0 <= int(answer) <= 30


def test_arithmetic_plain_style_is_strings():
    task = make_arithmetic_task(num_train=20, num_test=5, seed=1, prompt_style="plain")
    row = task["sft"][0]
    assert isinstance(row["prompt"], str) and isinstance(row["completion"], str)
    assert row["prompt"].endswith(REASONING_INSTRUCTION + "\n")
    assert math_correctness_reward(task["sft"]["completion"], answer=task["rl"]["answer"]) == [1.0] * 20


def test_arithmetic_is_deterministic_by_seed():
    a = make_arithmetic_task(num_train=50, num_test=10, seed=7)
    b = make_arithmetic_task(num_train=50, num_test=10, seed=7)
    c = make_arithmetic_task(num_train=50, num_test=10, seed=8)
    for split in ("rl", "sft", "test"):
        assert a[split].to_list() == b[split].to_list()
    assert a["rl"]["prompt"] != c["rl"]["prompt"]


_OP_WORDS = re.compile(r"\d+|buys|finds|gets|gives away|loses|sells|times")


def _arithmetic_signature(prompt) -> tuple:
    """Numbers and operation words of a question: equal signatures mean the same arithmetic."""
    question = completion_text(prompt).split("\n")[0]
    return tuple(_OP_WORDS.findall(question))


def test_arithmetic_test_split_is_disjoint_from_train():
    task = make_arithmetic_task(num_train=800, num_test=200, seed=0)
    train = {_arithmetic_signature(p) for p in task["rl"]["prompt"]}
    test = {_arithmetic_signature(p) for p in task["test"]["prompt"]}
    assert len(test) == 200
    assert not train & test


def test_arithmetic_difficulty_knobs():
    task = make_arithmetic_task(
        num_train=100, num_test=0, num_steps=(3, 4), max_operand=50, operations=("+", "-", "*"), seed=2
    )
    traces = [completion_text(c) for c in task["sft"]["completion"]]
    assert all(4 <= len(t.splitlines()) <= 5 for t in traces)
    assert any(" * " in t for t in traces)
    assert any(int(a) > 50 for a in task["rl"]["answer"])
    assert math_correctness_reward(traces, answer=task["rl"]["answer"]) == [1.0] * 100
    assert len(task["test"]) == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_train": 0}, "num_train"),
        ({"max_operand": "10"}, "max_operand"),
        ({"num_steps": (3, 1)}, "num_steps"),
        ({"operations": ("/",)}, "operations"),
        ({"operations": ("-",)}, "non-negative"),
        ({"prompt_style": "fancy"}, "prompt_style"),
        ({"num_train": 500, "num_steps": 1, "max_operand": 3}, "distinct problems"),
    ],
)
def test_arithmetic_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_arithmetic_task(**{"num_train": 10, "num_test": 2, **kwargs})


# ---------------------------------------------------------------------------------------------------- GSM8K


def test_gsm8k_helpers():
    solution = "Natalia sold 48/2 = <<48/2=24>>24 clips.\nIn total 48+24 = <<48+24=72>>72.\n#### 1,072"
    assert data.gsm8k_gold_answer(solution) == "1072"
    trace = data.gsm8k_solution_to_trace(solution)
    assert trace == "Natalia sold 48/2 = 24 clips.\nIn total 48+24 = 72.\nThe answer is \\boxed{1072}."
    with pytest.raises(ValueError, match="####"):
        data.gsm8k_gold_answer("no final line")


def test_gsm8k_full_files(full_data):
    train = load_gsm8k()
    test = load_gsm8k(split="test", prompt_style="plain", limit=25)
    assert (len(train["rl"]), len(train["sft"])) == (7473, 7473)
    assert len(test["rl"]) == 25 and isinstance(test["rl"][0]["prompt"], str)
    assert train["rl"][0]["answer"] == "72"
    assert train["rl"][0]["prompt"][0]["content"].startswith("Natalia sold clips to 48 of her friends")
    answers = train["rl"]["answer"]
    assert all(re.fullmatch(r"-?\d+(\.\d+)?", a) for a in answers), "gold answers are plain numbers"
    assert "1080" in answers  # '#### 1,080' in the raw file
    sample = random.Random(0).sample(range(7473), 150)
    completions = [train["sft"][i]["completion"] for i in sample]
    assert not any("<<" in completion_text(c) for c in completions)
    golds = [answers[i] for i in sample]
    assert math_correctness_reward(completions, answer=golds) == [1.0] * len(sample)


def test_gsm8k_from_the_data_folder(fixture_data_dir, hub_training_data, monkeypatch):
    train = load_gsm8k(data_dir=fixture_data_dir)
    assert len(train["rl"]) == len(train["sft"]) == 4 and train["rl"][0]["answer"] == "72"
    assert math_correctness_reward(train["sft"]["completion"], answer=train["rl"]["answer"]) == [1.0] * 4
    monkeypatch.setenv("TRL_BRIDGE_DATA_DIR", str(fixture_data_dir))  # the variable selects the folder too
    test = load_gsm8k(split="test", prompt_style="plain")
    assert test["rl"]["answer"] == ["18", "3", "70000", "540"] and isinstance(test["rl"][0]["prompt"], str)
    assert hub_training_data.calls == []  # a data folder given: nothing is asked of the Hub


def test_gsm8k_local_file_and_errors(tmp_path):
    path = _write_jsonl(tmp_path / "g.jsonl", [{"question": "1+1?", "answer": "1+1=<<1+1=2>>2\n#### 2"}])
    ds = load_gsm8k(path)
    assert ds["rl"][0]["answer"] == "2"
    assert completion_text(ds["sft"][0]["completion"]) == "1+1=2\nThe answer is \\boxed{2}."
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"q": "1+1?", "answer": "#### 2"}])
    with pytest.raises(ValueError, match=r"missing column\(s\) \['question'\]"):
        load_gsm8k(bad)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_gsm8k(tmp_path / "nope.jsonl")


def test_missing_local_copy_names_the_folder_and_the_hub_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("TRL_BRIDGE_DATA_DIR", str(tmp_path))  # a data folder without gsm8k/
    with pytest.raises(FileNotFoundError, match="TRL_BRIDGE_DATA_DIR") as exc:
        load_gsm8k()
    assert "gsm8k/train.jsonl" in str(exc.value) and "openai/gsm8k" in str(exc.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_math(data_dir=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="split"):
        load_gsm8k(split="validation")


# ---------------------------------------------------------------------------------------------------- MATH


def test_math_full_train_drops_rows_without_answer(full_data, caplog):
    with caplog.at_level(logging.WARNING, logger="trl_bridge.tasks.data"):
        ds = load_math()
    assert len(ds["rl"]) == len(ds["sft"]) == 7496  # 2 rows have answer None, 2 have an empty \boxed{}
    assert "dropped 4 of 7500" in caplog.text
    assert ds["rl"][0]["answer"] == "0"
    sample = random.Random(1).sample(range(len(ds["rl"])), 40)
    completions = [ds["sft"][i]["completion"] for i in sample]
    golds = [ds["rl"][i]["answer"] for i in sample]
    assert math_correctness_reward(completions, answer=golds) == [1.0] * len(sample)


def test_math_from_the_data_folder(fixture_data_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="trl_bridge.tasks.data"):
        ds = load_math(data_dir=fixture_data_dir)
    assert len(ds["rl"]) == len(ds["sft"]) == 4 and "dropped 1 of 5" in caplog.text  # the row without an answer
    assert math_correctness_reward(ds["sft"]["completion"], answer=ds["rl"]["answer"]) == [1.0] * 4
    test = load_math(split="test", prompt_style="plain", data_dir=fixture_data_dir)  # MATH-500
    assert test["rl"][0]["prompt"].startswith("Convert the point $(0,3)$")
    assert math_correctness_reward(test["sft"]["completion"], answer=test["rl"]["answer"]) == [1.0] * 4


def test_math_without_answer_column_uses_last_boxed(tmp_path, caplog):
    rows = [
        {"problem": "2+2?", "solution": "First \\boxed{3} is wrong; it is $\\boxed{4}$."},
        {"problem": "x?", "solution": "no final answer"},
    ]
    with caplog.at_level(logging.WARNING, logger="trl_bridge.tasks.data"):
        ds = load_math(_write_jsonl(tmp_path / "m.jsonl", rows))
    assert ds["rl"]["answer"] == ["4"]
    assert "dropped 1 of 2" in caplog.text
    with pytest.raises(ValueError, match="no row"):
        load_math(_write_jsonl(tmp_path / "none.jsonl", rows[1:]))


def test_math_level3to5_full_file(full_data):
    ds = load_math_level3to5()
    assert set(ds) == {"rl"} and len(ds["rl"]) == 8521
    assert ds["rl"][0]["answer"] == "118"
    assert "\\boxed{}" in ds["rl"][0]["prompt"][0]["content"]


def test_math_level3to5_from_the_data_folder(fixture_data_dir):
    ds = load_math_level3to5(data_dir=fixture_data_dir, prompt_style="plain")["rl"]
    assert ds["answer"] == ["118", "5", "30", "1"]
    assert ds[0]["prompt"].endswith("output the final answer within \\boxed{}.\n")  # the stored message, as is


# ---------------------------------------------------------------------------------------------------- Hub sources


def test_builtin_hub_sources_are_pinned_where_verified():
    """GSM8K and MATH-500 share the benchmarks' pinned sources; MATH-lighteval is pinned; SimpleRL-Zoo-Data has no
    verified commit (docs/data.md says so). Every source has a fixture in its Hub schema."""
    hubs = {(name, split): hub for name, splits in BUILTIN_SOURCES.items() for split, (_, hub) in splits.items()}
    assert hubs[("gsm8k", "test")] == get_benchmark("gsm8k").hub
    assert hubs[("gsm8k", "train")].revision == get_benchmark("gsm8k").hub.revision
    assert hubs[("math", "test")] == get_benchmark("math500").hub
    assert hubs[("math", "train")].revision == "0530c78699ea5e8eb5530600900e1f328b48acad"
    assert hubs[("math_level3to5", "train")].revision is None
    for (name, split), hub in hubs.items():
        if hub.revision is not None:
            assert re.fullmatch(r"[0-9a-f]{40}", hub.revision), (name, split)
        assert (hub.repo, hub.config, hub.split, hub.data_files) in HUB_FIXTURES, (name, split)


@pytest.mark.parametrize(
    "spec, split, kind, call",
    [
        ("builtin:math_level3to5", "train", "rl", {"path": "hkust-nlp/SimpleRL-Zoo-Data", "name": None, "split": "train",
                                                  "revision": None, "data_files": "simplelr_qwen_level3to5/train.parquet"}),
        ("builtin:math", "train", "sft", {"path": "DigitalLearningGmbH/MATH-lighteval", "name": "default", "split": "train",
                                          "revision": "0530c78699ea5e8eb5530600900e1f328b48acad"}),
        ("builtin:math", "test", "rl", {"path": "HuggingFaceH4/MATH-500", "name": None, "split": "test",
                                        "revision": "6e4ed1a2a79af7d8630a6b768ec859cb5af4d3be"}),
        ("builtin:gsm8k", "train", "sft", {"path": "openai/gsm8k", "name": "main", "split": "train",
                                           "revision": "cc7b047b6e5bb11b4f1af84efc572db110a51b3c"}),
        ("builtin:gsm8k", "test", "rl", {"path": "openai/gsm8k", "name": "main", "split": "test",
                                         "revision": "cc7b047b6e5bb11b4f1af84efc572db110a51b3c"}),
    ],
)
def test_builtin_datasets_load_their_pinned_hub_dataset_by_default(spec, split, kind, call, hub_training_data):
    ds = load_dataset_spec(spec, split=split, kind=kind)
    assert hub_training_data.calls == [call]
    assert len(ds) == 4 and dataset_source(spec, split)["repo"] == call["path"]


def test_hub_rows_map_onto_the_local_format(hub_training_data, fixture_data_dir, caplog):
    """The same problems from the Hub fixtures (Hub schemas) and from the local fixture files give the same rows."""
    for name, kinds in (("gsm8k", ("rl", "sft")), ("math", ("rl", "sft"))):
        for split in ("train", "test"):
            for kind in kinds:
                hub = load_dataset_spec(f"builtin:{name}", split=split, kind=kind)
                local = load_dataset_spec(f"builtin:{name}", split=split, kind=kind, data_dir=fixture_data_dir)
                assert hub.to_list() == local.to_list(), (name, split, kind)
    math = load_math()  # MATH-lighteval has no answer column: the gold is the solution's last \boxed{}
    solutions = [r["solution"] for r in _hub_rows("DigitalLearningGmbH__MATH-lighteval__default__train.jsonl")]
    assert math["rl"]["answer"] == [extract_boxed(s) for s in solutions[:4]]
    assert math_correctness_reward(math["sft"]["completion"], answer=math["rl"]["answer"]) == [1.0] * 4
    with caplog.at_level(logging.WARNING, logger="trl_bridge.tasks.data"):
        hub = load_math_level3to5()["rl"]
    assert "dropped 1 of 5" in caplog.text  # an empty gt_answer: two level-5 problems on the Hub
    local = load_math_level3to5(data_dir=fixture_data_dir)["rl"]
    assert hub["answer"] == local["answer"] == ["118", "5", "30", "1"]
    raw = _hub_rows("hkust-nlp__SimpleRL-Zoo-Data__simplelr_qwen_level3to5__train.jsonl")
    for row, hub_prompt, local_prompt in zip(raw, hub["prompt"], local["prompt"]):
        # the raw question plus the paper's instruction (the Hub file's own prompt carries Qwen chat markup)
        assert hub_prompt == [{"role": "user", "content": f"{row['question']}\n{REASONING_INSTRUCTION}"}]
        assert local_prompt[0]["content"].startswith(row["question"]) and "<|im_start|>" not in hub_prompt[0]["content"]


def test_hub_row_without_a_mapped_column_is_a_clear_error(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: Dataset.from_list([{"problem": "1+1?", "answer": "2"}]))
    monkeypatch.delenv("TRL_BRIDGE_DATA_DIR", raising=False)
    with pytest.raises(KeyError, match="SimpleRL-Zoo-Data.*row 0 has no field 'question'"):
        load_math_level3to5()


def test_offline_without_a_local_copy_names_the_hub_dataset_and_data_dir(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'hkust-nlp/SimpleRL-Zoo-Data' on the Hub (OfflineModeIsEnabled)\nmore")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.delenv("TRL_BRIDGE_DATA_DIR", raising=False)
    with pytest.raises(OSError) as exc:
        load_dataset_spec("builtin:math_level3to5")
    message = str(exc.value)
    assert "\n" not in message and message.startswith(
        "cannot load hkust-nlp/SimpleRL-Zoo-Data (simplelr_qwen_level3to5/train.parquet), split 'train', revision main "
        "(not pinned) from the Hugging Face Hub")
    assert "--data_dir" in message and "TRL_BRIDGE_DATA_DIR" in message and "OfflineModeIsEnabled" in message


def test_dataset_source_says_where_the_rows_come_from(fixture_data_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("TRL_BRIDGE_DATA_DIR", raising=False)
    math = dataset_source("builtin:math")
    assert (math["source"], math["repo"], math["config"], math["split"], math["revision"]) == (
        "hub", "DigitalLearningGmbH/MATH-lighteval", "default", "train", "0530c78699ea5e8eb5530600900e1f328b48acad")
    assert "revision 0530c78699ea5e8eb5530600900e1f328b48acad" in math["description"]
    level = dataset_source("builtin:math_level3to5")
    assert level["data_files"] == "simplelr_qwen_level3to5/train.parquet" and "main (not pinned)" in level["description"]
    path = str(fixture_data_dir / "gsm8k" / "test.jsonl")
    assert dataset_source("builtin:gsm8k", "test", fixture_data_dir) == {
        "spec": "builtin:gsm8k", "source": "local", "path": path, "description": f"local copy {path}"}
    monkeypatch.setenv("TRL_BRIDGE_DATA_DIR", str(fixture_data_dir))
    assert dataset_source("builtin:math")["path"] == str(fixture_data_dir / "math" / "train.jsonl")
    assert dataset_source("builtin:arithmetic")["source"] == "generated"
    assert dataset_source(str(tmp_path))["source"] == "local"
    assert dataset_source("someone/data", "validation")["repo"] == "someone/data"


# ---------------------------------------------------------------------------------------------------- specs


def test_builtin_specs(fixture_data_dir):
    rl = load_dataset_spec("builtin:arithmetic", num_train=30, num_test=5, seed=4)
    sft = load_dataset_spec("builtin:arithmetic", kind="sft", num_train=30, num_test=5, seed=4)
    test = load_dataset_spec("builtin:arithmetic", split="test", num_train=30, num_test=5, seed=4, limit=3)
    assert (len(rl), len(sft), len(test)) == (30, 30, 3)
    assert rl["prompt"] == sft["prompt"]
    gsm = load_dataset_spec("builtin:gsm8k", kind="sft", limit=3, prompt_style="plain", data_dir=fixture_data_dir)
    assert len(gsm) == 3 and isinstance(gsm[0]["completion"], str)
    math500 = load_dataset_spec("builtin:math", split="test", limit=2, data_dir=fixture_data_dir)
    assert math500["answer"] == ["\\left( 3, \\frac{\\pi}{2} \\right)", "p - q"]
    assert len(load_dataset_spec("builtin:math_level3to5", limit=2, data_dir=fixture_data_dir)) == 2
    path = FIXTURES / "data_dir" / "gsm8k" / "test.jsonl"  # path= overrides the builtin source
    assert load_dataset_spec("builtin:gsm8k", split="test", path=path)["answer"] == ["18", "3", "70000", "540"]


@pytest.mark.parametrize(
    "spec, kwargs, match",
    [
        ("builtin:nope", {}, "builtin:arithmetic"),
        ("builtin:math_level3to5", {"kind": "sft"}, "no solutions"),
        ("builtin:arithmetic", {"kind": "sft", "split": "test"}, "split 'train'"),
        ("builtin:arithmetic", {"column_map": "a->b"}, "column_map"),
        ("builtin:gsm8k", {"seed": 1}, "does not take"),
        ("builtin:arithmetic", {"kind": "dpo"}, "kind"),
        ("", {}, "non-empty"),
    ],
)
def test_spec_errors(spec, kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_dataset_spec(spec, **kwargs)


def test_local_jsonl_with_column_map_and_prompt_style(tmp_path):
    rows = [{"question": "What is 2+3?", "gold": "5", "extra": 1}, {"question": "What is 1+1?", "gold": "2", "extra": 2}]
    path = _write_jsonl(tmp_path / "q.jsonl", rows)
    ds = load_dataset_spec(str(path), column_map="question->prompt, gold->answer", prompt_style="chat",
                           required=("prompt", "answer"))  # fmt: skip
    assert ds["answer"] == ["5", "2"]
    assert ds[0]["prompt"] == [{"role": "user", "content": "What is 2+3?\n" + REASONING_INSTRUCTION}]
    raw = load_dataset_spec(path, column_map={"question": "prompt"})
    assert raw[0]["prompt"] == "What is 2+3?"  # left alone without prompt_style
    with pytest.raises(ValueError, match=r"\['answer'\]"):
        load_dataset_spec(path, column_map={"question": "prompt"}, required=("prompt", "answer"))
    with pytest.raises(ValueError, match=r"source column\(s\) \['query'\]"):
        load_dataset_spec(path, column_map="query->prompt")
    with pytest.raises(ValueError, match="'prompt'"):
        load_dataset_spec(path)  # no prompt column and no mapping


def test_nested_column_map_on_verl_rows(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": "1+1?"}], "reward_model": {"ground_truth": "2", "style": "rule"}}]
    path = _write_jsonl(tmp_path / "verl.jsonl", rows)
    ds = load_dataset_spec(path, column_map="reward_model.ground_truth->answer", required=("prompt", "answer"))
    assert ds[0]["answer"] == "2" and ds[0]["prompt"][0]["content"] == "1+1?"


def test_csv_parquet_and_folder_sources(tmp_path):
    Dataset.from_dict({"prompt": ["a", "b"], "answer": ["1", "2"]}).to_csv(tmp_path / "d.csv", index=False)
    Dataset.from_dict({"prompt": ["c"], "answer": ["3"]}).to_parquet(tmp_path / "d.parquet")
    assert load_dataset_spec(tmp_path / "d.csv")["prompt"] == ["a", "b"]
    assert load_dataset_spec(tmp_path / "d.parquet")["answer"] == ["3"]
    folder = tmp_path / "folder"
    folder.mkdir()
    _write_jsonl(folder / "train.jsonl", [{"prompt": "tr", "answer": "1"}])
    _write_jsonl(folder / "test.jsonl", [{"prompt": "te", "answer": "2"}])
    assert load_dataset_spec(folder)["prompt"] == ["tr"]
    assert load_dataset_spec(folder, split="test")["prompt"] == ["te"]
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(ValueError, match="unsupported data file"):
        load_dataset_spec(tmp_path / "d.txt")


def test_missing_sources_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_dataset_spec(str(tmp_path / "missing.jsonl"))
    with pytest.raises(FileNotFoundError, match="no-such-user/no-such-dataset"):
        load_dataset_spec("no-such-user/no-such-dataset")


def test_sft_spec_formats(tmp_path):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    ds = load_dataset_spec(_write_jsonl(tmp_path / "m.jsonl", [{"messages": messages}]), kind="sft")
    assert ds[0]["messages"] == messages
    text = load_dataset_spec(_write_jsonl(tmp_path / "t.jsonl", [{"body": "all text"}]), kind="sft",
                             column_map="body->text")  # fmt: skip
    assert text["text"] == ["all text"]
    pc = load_dataset_spec(_write_jsonl(tmp_path / "pc.jsonl", [{"q": "1+1?", "sol": "\\boxed{2}"}]), kind="sft",
                           column_map="q->prompt,sol->completion", prompt_style="chat")  # fmt: skip
    assert pc[0]["completion"] == [{"role": "assistant", "content": "\\boxed{2}"}]


# ---------------------------------------------------------------------------------------------------- validation


def test_parse_column_map():
    assert parse_column_map("question->prompt, answer -> answer") == {"question": "prompt", "answer": "answer"}
    assert parse_column_map(None) == {}
    with pytest.raises(ValueError, match="source->target"):
        parse_column_map("question=prompt")
    with pytest.raises(ValueError, match=r"\['prompt'\]"):
        parse_column_map("a->prompt,b->prompt")
    with pytest.raises(ValueError, match="column_map"):
        parse_column_map(["a->b"])


def test_validate_rl_dataset_errors():
    good = Dataset.from_dict({"prompt": [[{"role": "user", "content": "q"}]], "answer": ["1"]})
    assert validate_rl_dataset(good, required=("prompt", "answer")) is good
    with pytest.raises(ValueError, match=r"missing column\(s\) \['answer'\]"):
        validate_rl_dataset(Dataset.from_dict({"prompt": ["q"]}), required=("prompt", "answer"))
    with pytest.raises(ValueError, match="empty"):
        validate_rl_dataset(Dataset.from_dict({"prompt": []}))
    with pytest.raises(ValueError, match="column 'prompt' must hold"):
        validate_rl_dataset(Dataset.from_dict({"prompt": [3]}))
    with pytest.raises(ValueError, match="column 'prompt' must hold"):
        validate_rl_dataset(Dataset.from_dict({"prompt": [[{"text": "no role"}]]}))
    with pytest.raises(ValueError, match="datasets.Dataset, got list"):
        validate_rl_dataset([{"prompt": "q"}])
    with pytest.raises(ValueError, match=r"DatasetDict with splits \['train'\]"):
        validate_rl_dataset(DatasetDict({"train": good}))


def test_validate_sft_dataset_errors():
    with pytest.raises(ValueError, match="'prompt' \\+ 'completion', 'messages', or 'text'"):
        validate_sft_dataset(Dataset.from_dict({"question": ["q"]}))
    with pytest.raises(ValueError, match=r"missing column\(s\) \['completion'\]"):
        validate_sft_dataset(Dataset.from_dict({"prompt": ["q"]}))
    with pytest.raises(ValueError, match="'prompt' is messages but 'completion' is text"):
        validate_sft_dataset(Dataset.from_dict({"prompt": [[{"role": "user", "content": "q"}]], "completion": ["a"]}))
    with pytest.raises(ValueError, match="column 'completion' must hold"):
        validate_sft_dataset(Dataset.from_dict({"prompt": ["q"], "completion": [5]}))
    with pytest.raises(ValueError, match="column 'messages' must hold"):
        validate_sft_dataset(Dataset.from_dict({"messages": ["just text"]}))
    with pytest.raises(ValueError, match="column 'text' must hold strings"):
        validate_sft_dataset(Dataset.from_dict({"text": [1]}))
    with pytest.raises(ValueError, match="empty"):
        validate_sft_dataset(Dataset.from_dict({"text": []}))
