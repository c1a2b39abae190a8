"""Run by tests/distributed/test_fsdp2.py: BRIDGE on a tiny Qwen2 for 3 steps (2 micro-batches per step, clipping on, every base
weight trainable, lm_head included) under the engine the launcher set up, then rank 0 saves the full θ, θ̂, w and the
merged export, and every rank saves how much of θ̂ and of θ̂'s optimizer state it holds.

    python fsdp_worker.py MODE OUT_DIR [CHECKPOINT]
MODE: train (under torchrun = DDP, under `accelerate launch` with an FSDP2 config = FSDP2; a checkpoint at step 2),
resume (continue from CHECKPOINT to step 3). TRL_BRIDGE_TEST_CPU_FSDP=1 imports tests/distributed/cpu_fsdp_patch.py first;
BRIDGE_TEST_OVERRIDES (JSON) overrides BridgeConfig fields."""

import json
import os
import sys

if os.environ.get("TRL_BRIDGE_TEST_CPU_FSDP") == "1":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import cpu_fsdp_patch  # noqa: F401

import torch
from datasets import Dataset
from torch.distributed.tensor import DTensor
from transformers import TrainerCallback

from trl_bridge import BridgeConfig, BridgeTrainer
from trl_bridge.tiny import make_tiny_model, make_tiny_tokenizer


def reward(completions, answer, **kwargs):
    return [float(a in c) + sum(ch.isdigit() for ch in c) / max(len(c), 1) for c, a in zip(completions, answer)]


def local_numel(t):
    return (t._local_tensor if isinstance(t, DTensor) else t).numel()


class AtTrainBegin(TrainerCallback):
    """What the trainer holds right after loading a checkpoint (gathered; every rank calls it)."""

    def __init__(self, trainer):
        self.trainer, self.state = trainer, None

    def on_train_begin(self, args, state, control, **kwargs):
        t = self.trainer
        self.state = {k: v.clone() for k, v in t.checkpoint_state.tensors().items()}
        opt = t.shadow_optimizer.state_dict()["state"]
        first = opt[0].get("exp_avg", opt[0].get("exp_avg_sq_row", opt[0].get("exp_avg_sq"))) if opt else None
        self.state["shadow_exp_avg_0"] = t._bridge_full(first).clone() if first is not None else torch.zeros(())


def vllm_sync_changes_nothing(trainer, out_dir, rank):
    """BRIDGE's vLLM weight sync through TRL's own `VLLMGeneration.sync_weights` (colocate branch), its engine a
    stand-in that records `load_weights`: every rank streams π(θ+w), gathered module by module. Rank 0 saves what it
    received; returns the number of local parameter elements the sync changed on this rank (must be 0)."""
    import types

    from trl.generation.vllm_generation import VLLMGeneration

    from trl_bridge.engines.vllm_sync import sync_merged_policy

    pushed = {}
    engine = types.SimpleNamespace(load_weights=lambda weights: pushed.update({n: t.detach().cpu().clone() for n, t in weights}))
    runner = types.SimpleNamespace(model=engine)
    generation = object.__new__(VLLMGeneration)
    generation.model, generation.accelerator, generation.mode, generation.enable_sleep_mode = (
        trainer.model, trainer.accelerator, "colocate", False)
    generation.llm = types.SimpleNamespace(
        llm_engine=types.SimpleNamespace(model_executor=types.SimpleNamespace(
            driver_worker=types.SimpleNamespace(model_runner=runner))),
        reset_prefix_cache=lambda: None)
    sync_merged_policy(generation)
    local = lambda t: (t._local_tensor if isinstance(t, DTensor) else t).detach().clone()  # noqa: E731
    before = {n: local(p) for n, p in trainer.model.named_parameters()}
    generation.sync_weights()
    after = {n: local(p) for n, p in trainer.model.named_parameters()}
    if rank == 0:
        torch.save(pushed, os.path.join(out_dir, "vllm_pushed.pt"))
    return sum(int((before[n] != after[n]).sum()) for n in before)


def main(mode, out_dir, checkpoint=None):
    tok = make_tiny_tokenizer()
    rl = Dataset.from_list([{"prompt": f"What is {i} + {i + 1}?", "answer": str(2 * i + 1)} for i in range(32)])
    sft = Dataset.from_list([{"prompt": f"What is {i} + {i + 1}?", "completion": f" {2 * i + 1}"} for i in range(32)])
    overrides = json.loads(os.environ.get("BRIDGE_TEST_OVERRIDES", "{}"))
    args = BridgeConfig(**{**dict(
        output_dir=out_dir, per_device_train_batch_size=4, num_generations=4, max_completion_length=8, max_steps=3,
        learning_rate=1e-2, adapter_learning_rate=2e-2, lora_r=4, sft_per_device_train_batch_size=2, report_to="none",
        save_strategy="steps", save_steps=2, seed=3, gradient_accumulation_steps=2, max_grad_norm=1.0, bf16=False,
        use_cpu=True, ddp_backend="gloo" if "WORLD_SIZE" in os.environ else None, logging_steps=1,
    ), **overrides})
    trainer = BridgeTrainer(model=make_tiny_model(tok), reward_funcs=reward, args=args, train_dataset=rl,
                            sft_dataset=sft, processing_class=tok)
    trainer._bridge_full = lambda t: (t.full_tensor() if isinstance(t, DTensor) else t).detach()
    begin = AtTrainBegin(trainer)
    trainer.add_callback(begin)
    trainer.train(resume_from_checkpoint=checkpoint)
    rank = trainer.accelerator.process_index
    state = {k: v.clone() for k, v in trainer.checkpoint_state.tensors().items()}  # collective under FSDP2
    shadow_opt = trainer.shadow_optimizer.state_dict()["state"]
    stats = {
        "engine": str(trainer.accelerator.distributed_type),
        "world_size": trainer.accelerator.num_processes,
        "shadow_local": sum(local_numel(s) for s in trainer.shadow_params),
        "shadow_full": sum(s.numel() for s in trainer.shadow_params),
        "shadow_optim_local": sum(local_numel(v) for st in shadow_opt.values() for k, v in st.items() if k != "step"),
        "shadow_optim_full": sum(v.numel() for st in shadow_opt.values() for k, v in st.items() if k != "step"),
        "shadow_is_dtensor": all(isinstance(s, DTensor) for s in trainer.shadow_params),
        "divergence": [h["bridge/shadow_divergence"] for h in trainer.state.log_history if "bridge/shadow_divergence" in h],
    }
    stats["theta_changed_by_vllm_sync"] = vllm_sync_changes_nothing(trainer, out_dir, rank)
    torch.save(stats, os.path.join(out_dir, f"stats_rank{rank}.pt"))
    trainer.save_model(os.path.join(out_dir, "export"))
    if rank == 0:
        torch.save(state, os.path.join(out_dir, "final_state.pt"))
        torch.save(begin.state, os.path.join(out_dir, "begin_state.pt"))
    if torch.distributed.is_initialized():  # a clean gloo shutdown (an open group can abort the process at exit)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
    # Everything is written and the process group is closed. Skip interpreter teardown: a background C++ thread
    # (gloo, or GRPOTrainer's async reward loop) destroyed there can abort the process ("terminate called without an
    # active exception"), failing a run that has finished.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
