"""builtin:knights_knaves and the knights_knaves reward: Hub rows (fixtures in the Hub schema, answered at the
`datasets.load_dataset` boundary), local copies, the offline error, and agreement of the reward with the benchmark
grader on every fixture row."""

import json
import shutil
from pathlib import Path

import pytest

from trl_bridge.tasks.benchmarks import get_benchmark, knights_knaves_prompt
from trl_bridge.tasks.data import dataset_source, load_dataset_spec, load_knights_knaves, parse_people
from trl_bridge.tasks.rewards import get_reward_funcs

HUB = Path(__file__).resolve().parents[1] / "fixtures" / "hub"
REVISION = "2f68547989981b1af37cb3dde5fdefa847aa8619"


def hub_rows(n: int) -> list[dict]:
    return [json.loads(line) for line in (HUB / f"K-and-K__knights-and-knaves__train__{n}ppl.jsonl").open()]


def test_loads_the_pinned_train_config_for_the_chosen_sizes(hub_training_data):
    rl = load_dataset_spec("builtin:knights_knaves", people="3-4")
    sft = load_dataset_spec("builtin:knights_knaves", kind="sft", people="3-4")
    assert [(c["path"], c["name"], c["split"], c["revision"]) for c in hub_training_data.calls[:2]] == [
        ("K-and-K/knights-and-knaves", "train", "3ppl", REVISION), ("K-and-K/knights-and-knaves", "train", "4ppl", REVISION)]
    rows = hub_rows(3) + hub_rows(4)
    assert rl["prompt"] == sft["prompt"] == [knights_knaves_prompt(r["quiz"]) for r in rows]
    assert rl["answer"] == [r["solution_text_format"] for r in rows]
    assert sft[0]["completion"].startswith(f" {rows[0]['cot_head']}\n{rows[0]['cot_repeat_steps'][0]}")
    assert sft[0]["completion"].endswith(f"</think>\n<answer>\n{rows[0]['solution_text_format']}\n</answer>")
    source = dataset_source("builtin:knights_knaves", people="3-4")
    assert (source["repo"], source["config"], source["split"], source["revision"]) == (
        "K-and-K/knights-and-knaves", "train", "3ppl, 4ppl", REVISION)


def test_local_copy_gives_the_same_rows(hub_training_data, tmp_path):
    for n in (3, 5):
        (tmp_path / "knights_knaves" / f"{n}ppl").mkdir(parents=True)
        shutil.copy(HUB / f"K-and-K__knights-and-knaves__train__{n}ppl.jsonl",
                    tmp_path / "knights_knaves" / f"{n}ppl" / "train.jsonl")
    local = load_knights_knaves("3,5", data_dir=tmp_path)
    assert hub_training_data.calls == []
    hub = load_knights_knaves([3, 5])
    assert local["rl"].to_list() == hub["rl"].to_list() and local["sft"].to_list() == hub["sft"].to_list()
    assert dataset_source("builtin:knights_knaves", data_dir=tmp_path, people="3,5")["source"] == "local"
    with pytest.raises(FileNotFoundError, match="knights_knaves/4ppl/train.jsonl"):
        load_knights_knaves("4", data_dir=tmp_path)


def test_reward_and_benchmark_grader_agree_on_every_fixture_row(hub_training_data):
    reward = get_reward_funcs(["knights_knaves"])[0]
    grader = get_benchmark("knights_knaves_3ppl")
    task = load_knights_knaves("3-7")
    rl, sft = task["rl"], task["sft"]
    answers = rl["answer"]
    wrong = [a.replace("knight", "KNAVE").replace("knave", "knight").replace("KNAVE", "knave") for a in answers]
    for completions in (sft["completion"], [f"<answer>\n{w}\n</answer>" for w in wrong], ["no answer"] * len(answers)):
        rewards = reward(completions, answer=answers)
        verdicts = [g["correct"] for g in grader.grade([{"gold": a} for a in answers], completions)]
        assert rewards == [float(v) for v in verdicts]
    assert reward(sft["completion"], answer=answers) == [1.0] * len(answers) == [1.0] * 10
    assert reward([f"<answer>{w}</answer>" for w in wrong], answer=answers) == [0.0] * 10
    # chat completions are graded on the last message, as the other rewards do
    assert reward([[{"role": "assistant", "content": sft[0]["completion"]}]], answer=answers[:1]) == [1.0]
    with pytest.raises(ValueError, match="column named 'answer'"):
        reward(["x"])


def test_offline_without_a_local_copy_names_the_dataset(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'K-and-K/knights-and-knaves' on the Hub (OfflineModeIsEnabled)\nmore")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.delenv("TRL_BRIDGE_DATA_DIR", raising=False)
    with pytest.raises(OSError) as exc:
        load_dataset_spec("builtin:knights_knaves")
    message = str(exc.value)
    assert "\n" not in message and message.startswith(
        f"cannot load K-and-K/knights-and-knaves (train), split '3ppl', revision {REVISION} from the Hugging Face Hub")
    assert "--data_dir" in message


@pytest.mark.parametrize("people, expected", [("3-5", (3, 4, 5)), ("7,3", (3, 7)), ("4", (4,)), (None, (3, 4, 5, 6, 7))])
def test_parse_people(people, expected):
    assert parse_people(people) == expected


@pytest.mark.parametrize("people", ["2-4", "x", "3-", "", [3, True], 8])
def test_bad_people_name_the_option(people):
    with pytest.raises(ValueError, match="task_people"):
        parse_people(people)


def test_bad_split_and_prompt_style(hub_training_data):
    with pytest.raises(ValueError, match="only has split 'train'"):
        load_dataset_spec("builtin:knights_knaves", split="test")
    with pytest.raises(ValueError, match="prompt_style must be 'plain'"):
        load_dataset_spec("builtin:knights_knaves", prompt_style="chat")


def test_full_train_files_do_not_overlap_the_benchmark(benchmarks_dir):
    """On the full local copies: 900 training puzzles per size, none of them among the benchmark's test puzzles."""
    train = load_knights_knaves("3-7", data_dir=benchmarks_dir)["rl"]
    assert len(train) == 4500
    prompts = set(train["prompt"])
    for n in range(3, 8):
        test = get_benchmark(f"knights_knaves_{n}ppl").load(benchmarks_dir)
        assert len(test) == 100 and not any(row["raw_prompt"] in prompts for row in test)
