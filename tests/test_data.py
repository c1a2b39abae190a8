"""Tests for trl_bridge.data: the arithmetic task, GSM8K/MATH loaders on the shared files, specs and validation."""

import json
import logging
import random
import re

import pytest
from datasets import Dataset, DatasetDict

from trl_bridge import data
from trl_bridge.data import (
    REASONING_INSTRUCTION,
    load_dataset_spec,
    load_gsm8k,
    load_math,
    load_math_level3to5,
    make_arithmetic_task,
    parse_column_map,
    validate_rl_dataset,
    validate_sft_dataset,
)
from trl_bridge.rewards import completion_text, math_correctness_reward


@pytest.fixture
def shared_data(benchmarks_dir, monkeypatch):
    monkeypatch.setenv("TRL_BRIDGE_DATA_DIR", str(benchmarks_dir))
    return benchmarks_dir


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


def test_gsm8k_shared_files(shared_data):
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


def test_shared_files_missing_names_the_env_var(tmp_path, monkeypatch):
    monkeypatch.setenv("TRL_BRIDGE_DATA_DIR", str(tmp_path))
    assert data.benchmarks_dir() == tmp_path
    with pytest.raises(FileNotFoundError, match="TRL_BRIDGE_DATA_DIR"):
        load_gsm8k()
    with pytest.raises(ValueError, match="split"):
        load_gsm8k(split="validation")


# ---------------------------------------------------------------------------------------------------- MATH


def test_math_shared_train_drops_rows_without_answer(shared_data, caplog):
    with caplog.at_level(logging.WARNING, logger="trl_bridge.data"):
        ds = load_math()
    assert len(ds["rl"]) == len(ds["sft"]) == 7496  # 2 rows have answer None, 2 have an empty \boxed{}
    assert "dropped 4 of 7500" in caplog.text
    assert ds["rl"][0]["answer"] == "0"
    sample = random.Random(1).sample(range(len(ds["rl"])), 40)
    completions = [ds["sft"][i]["completion"] for i in sample]
    golds = [ds["rl"][i]["answer"] for i in sample]
    assert math_correctness_reward(completions, answer=golds) == [1.0] * len(sample)


def test_math500_test_split(shared_data):
    ds = load_math(split="test", prompt_style="plain", limit=30)
    assert len(ds["rl"]) == 30
    assert ds["rl"][0]["prompt"].startswith("Convert the point $(0,3)$")
    assert math_correctness_reward(ds["sft"]["completion"], answer=ds["rl"]["answer"]) == [1.0] * 30


def test_math_without_answer_column_uses_last_boxed(tmp_path, caplog):
    rows = [
        {"problem": "2+2?", "solution": "First \\boxed{3} is wrong; it is $\\boxed{4}$."},
        {"problem": "x?", "solution": "no final answer"},
    ]
    with caplog.at_level(logging.WARNING, logger="trl_bridge.data"):
        ds = load_math(_write_jsonl(tmp_path / "m.jsonl", rows))
    assert ds["rl"]["answer"] == ["4"]
    assert "dropped 1 of 2" in caplog.text
    with pytest.raises(ValueError, match="no row"):
        load_math(_write_jsonl(tmp_path / "none.jsonl", rows[1:]))


def test_math_level3to5(shared_data):
    ds = load_math_level3to5()
    assert set(ds) == {"rl"} and len(ds["rl"]) == 8521
    assert ds["rl"][0]["answer"] == "118"
    assert "\\boxed{}" in ds["rl"][0]["prompt"][0]["content"]


# ---------------------------------------------------------------------------------------------------- specs


def test_builtin_specs(shared_data):
    rl = load_dataset_spec("builtin:arithmetic", num_train=30, num_test=5, seed=4)
    sft = load_dataset_spec("builtin:arithmetic", kind="sft", num_train=30, num_test=5, seed=4)
    test = load_dataset_spec("builtin:arithmetic", split="test", num_train=30, num_test=5, seed=4, limit=3)
    assert (len(rl), len(sft), len(test)) == (30, 30, 3)
    assert rl["prompt"] == sft["prompt"]
    gsm = load_dataset_spec("builtin:gsm8k", kind="sft", limit=5, prompt_style="plain")
    assert len(gsm) == 5 and isinstance(gsm[0]["completion"], str)
    assert load_dataset_spec("builtin:math", split="test", limit=4)["answer"][:1] == ["\\left( 3, \\frac{\\pi}{2} \\right)"]
    assert len(load_dataset_spec("builtin:math_level3to5", limit=6)) == 6


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
