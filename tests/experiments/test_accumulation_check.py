"""`trl-bridge check`: on the real trainer, gradient accumulation k gives the gradient of one k-times larger micro-batch
for every method and parameter set (one process and 2 DDP ranks); an accumulation that drops or mis-weights micro-batches,
or rollouts that differ between the two runs, make it fail, naming the parameter set."""

import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml

from trl_bridge.experiments.accumulation_check import CHECK_METHODS, check, compare_gradients, format_table, main
from trl_bridge.trainer.bridge_trainer import BridgeTrainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
       "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}


@pytest.fixture
def config(tmp_path, tiny_model_dir):
    """A tiny arithmetic config whose first step has non-zero gradients in every set: the rewards of a random model
    (all 0) are flipped with probability 0.5, so advantages are not all 0. The expert traces are the builtin task's,
    of unequal lengths (so micro-batches hold different numbers of completion tokens) and paired with the RL prompts
    (LUFFY puts each prompt's trace into its group)."""
    path = tmp_path / "check.yaml"
    path.write_text(yaml.safe_dump({
        "model_name_or_path": str(tiny_model_dir), "dataset_name": "builtin:arithmetic",
        "sft_dataset_name": "builtin:arithmetic",
        "task_num_train": 16, "reward_funcs": ["math_correctness"], "reward_noise": 0.5, "per_device_train_batch_size": 8,
        "num_generations": 4, "sft_per_device_train_batch_size": 2, "max_completion_length": 8, "lora_r": 4, "seed": 0,
    }))
    return str(path)


def _names_of_failed(results):
    return {(m, r["parameters"]) for m, v in results["methods"].items() for r in v["rows"] if not r["passed"]}


def test_check_passes_for_every_method_on_the_real_trainer(config, capsys):
    assert main(["--config", config]) == 0
    out = capsys.readouterr().out
    assert "PASS: gradient accumulation gives the gradient of the whole batch" in out
    for method in CHECK_METHODS:
        assert f"| {method} | θ (base) |" in out, method
    assert "| bridge | θ̂ (shadow) |" in out and "| bridge | w (adapter) |" in out
    assert "| grpo | θ̂ (shadow) |" not in out and "| grpo | w (adapter) |" not in out  # λ = 1: GRPO on θ alone
    assert "FAIL" not in out and "NOT CHECKED" not in out


def _broken_accumulation(monkeypatch, how):
    """BridgeTrainer whose accumulation drops every micro-batch's gradient after the first of a step (as DeepSpeed did
    under CPU offload), or counts it twice."""
    original = BridgeTrainer.training_step

    def training_step(self, model, inputs, num_items_in_batch=None):
        later = self._step % self.current_gradient_accumulation_steps > 0  # TRL counts micro-batches after this call
        params = list(model.parameters()) + list(self.shadow_params or [])
        before = [None if p.grad is None else p.grad.clone() for p in params]
        loss = original(self, model, inputs, num_items_in_batch)
        if later:
            for p, g in zip(params, before):
                if how == "drop":
                    p.grad = g
                elif p.grad is not None:
                    p.grad = p.grad + (p.grad - (0 if g is None else g))  # this micro-batch's gradient twice
        return loss

    monkeypatch.setattr(BridgeTrainer, "training_step", training_step)


@pytest.mark.parametrize("how", ["drop", "double"])
def test_check_fails_naming_the_parameter_sets_of_a_broken_accumulation(config, monkeypatch, how):
    _broken_accumulation(monkeypatch, how)
    results = check(config, [], ["bridge"])
    assert not results["passed"]
    assert _names_of_failed(results) == {("bridge", "θ (base)"), ("bridge", "θ̂ (shadow)"), ("bridge", "w (adapter)")}
    assert all(r["rel_diff"] > 0.05 for r in results["methods"]["bridge"]["rows"])  # far beyond rounding (~1e-7)
    assert results["methods"]["bridge"]["rollouts_identical"]  # the same rollouts: the gradients alone differ
    table = format_table(results)
    assert "FAIL: bridge θ (base) (" in table and "bridge θ̂ (shadow) (" in table and "bridge w (adapter) (" in table


def test_check_fails_when_the_two_runs_train_on_different_rollouts(config, monkeypatch):
    original = BridgeTrainer._generate_and_score_completions

    def generate(self, inputs):  # run (b) trains on other completions than run (a)
        output = original(self, inputs)
        if self.args.gradient_accumulation_steps == 1:
            output["completion_ids"] = output["completion_ids"].flip(0)
        return output

    monkeypatch.setattr(BridgeTrainer, "_generate_and_score_completions", generate)
    results = check(config, [], ["grpo"])
    assert not results["passed"] and not results["methods"]["grpo"]["rollouts_identical"]
    assert "different completion_ids" in results["methods"]["grpo"]["rollouts"]
    table = format_table(results)
    assert "FAIL: grpo: the rollouts of (a) and (b) differ (16 completions per process; different completion_ids)" in table
    assert "| grpo | θ (base) |" in table and "| NOT COMPARED (rollouts differ) |" in table


def test_a_set_without_gradient_is_not_checked_rather_than_passed():
    # e.g. GRPO when every group's rollouts got equal rewards (all advantages 0): nothing was compared
    zero, grad = torch.zeros(3, dtype=torch.float64), torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64)
    rows = compare_gradients({"θ (base)": zero, "w (adapter)": grad * (1 + 2e-5)},
                             {"θ (base)": zero, "w (adapter)": grad}, tolerance=1e-4)
    assert [(r["parameters"], r["passed"]) for r in rows] == [("θ (base)", False), ("w (adapter)", True)]
    assert rows[1]["rel_diff"] == pytest.approx(2e-5) and rows[1]["norm_b"] == pytest.approx(3.0)
    results = {"accumulation_steps": 2, "micro_batch": 4, "sft_micro_batch": 2, "tolerance": 1e-4, "world_size": 1,
               "methods": {"grpo": {"rows": rows, "rollouts_identical": True, "rollouts": "8 completions per process"}}}
    table = format_table(results)
    assert "| grpo | θ (base) | 0.000e+00 | nan | NOT CHECKED (zero gradient) |" in table
    assert "| grpo | w (adapter) | 3.000e+00 | 2.0e-05 | pass |" in table
    assert "NOT CHECKED: grpo θ (base): the gradient is zero in both runs" in table
    assert "PASS" not in table and "FAIL" not in table
    # a gradient only one run has is a failure, however small
    assert compare_gradients({"θ (base)": zero + 1e-12}, {"θ (base)": zero}, 1e-4)[0]["passed"] is False


def test_usage_errors_name_the_option(config, capsys):
    assert main(["--config", config, "--methods", "bridge,nope"]) == 2
    assert "--methods: unknown ['nope']" in capsys.readouterr().err
    assert main(["--config", config, "--accumulation_steps", "1"]) == 2
    assert "--accumulation_steps must be >= 2" in capsys.readouterr().err
    assert main(["--config", config, "--steps_per_generation", "2"]) == 2
    assert "--steps_per_generation: set by the check" in capsys.readouterr().err


def test_sft_token_mean_across_micro_batches_of_unequal_length(config):
    # the builtin arithmetic traces differ in length, so the micro-batches of run (a) differ in token counts
    results = check(config, ["--sft_dataset_name", "builtin:arithmetic"], ["sft"])
    assert results["passed"], format_table(results)


@pytest.mark.slow
def test_check_passes_for_every_method_on_two_ddp_ranks(config):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", port, "-m", "trl_bridge.cli", "check", "--config", config, "--use_cpu", "true"]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 processes" in proc.stdout and proc.stdout.count("| θ (base) |") == len(CHECK_METHODS)
    assert "PASS: gradient accumulation gives the gradient of the whole batch" in proc.stdout


@pytest.mark.slow
def test_check_passes_under_fsdp2_on_two_cpu_ranks(config):
    # gradients are DTensor shards there, gathered to full tensors on rank 0 before the comparison
    distributed = os.path.join(ROOT, "tests", "distributed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           os.path.join(distributed, "accelerate", "fsdp2_cpu.yaml"), "--main_process_port", port,
           os.path.join(distributed, "check_worker.py"), "--config", config, "--methods", "bridge,grpo,sft"]
    env = {**ENV, "TRL_BRIDGE_TEST_CPU_FSDP": "1", "ACCELERATE_USE_CPU": "true"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 processes" in proc.stdout and "| bridge | θ̂ (shadow) |" in proc.stdout
    assert "PASS: gradient accumulation gives the gradient of the whole batch" in proc.stdout
