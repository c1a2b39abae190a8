"""Run by `torchrun --nproc_per_node 2` from test_ddp.py: BRIDGE for 3 steps, then each rank saves its
θ, θ̂, w and the first SFT batch it saw, so the test can check the ranks stayed in sync on different data.

    python ddp_worker.py OUT_DIR [SHADOW_STORAGE]"""

import os
import sys

import torch
from datasets import Dataset

from trl_bridge import BridgeConfig, BridgeTrainer
from trl_bridge.tiny import make_tiny_model, make_tiny_tokenizer


def reward(completions, answer, **kwargs):
    return [float(a in c) + sum(ch.isdigit() for ch in c) / max(len(c), 1) for c, a in zip(completions, answer)]


def main(out_dir, shadow_storage="full"):
    tok = make_tiny_tokenizer()
    rl = Dataset.from_list([{"prompt": f"What is {i} + {i + 1}?", "answer": str(2 * i + 1)} for i in range(32)])
    sft = Dataset.from_list([{"prompt": f"What is {i} + {i + 1}?", "completion": f" {2 * i + 1}"} for i in range(32)])
    args = BridgeConfig(output_dir=out_dir, per_device_train_batch_size=4, num_generations=4, max_completion_length=8,
                        max_steps=3, learning_rate=1e-2, lora_r=4, sft_per_device_train_batch_size=2, report_to="none",
                        save_strategy="no", seed=3, gradient_accumulation_steps=2, max_grad_norm=1.0,
                        use_cpu=True, ddp_backend="gloo", shadow_storage=shadow_storage)
    trainer = BridgeTrainer(model=make_tiny_model(tok), reward_funcs=reward, args=args, train_dataset=rl,
                            sft_dataset=sft, processing_class=tok)
    seen, next_batch = [], trainer.sft_stream.next_batch
    trainer.sft_stream.next_batch = lambda: seen.append(next_batch()) or seen[-1]
    trainer.train()
    state = {f"base.{n}": p.detach().clone() for n, p in trainer.base_params}
    state.update({f"shadow.{n}": s for n, s in trainer.shadow_state_dict().items()})
    state.update({f"adapter.{n}": p.detach().clone() for n, p in trainer.adapter_params})
    state["first_sft_batch"] = seen[0]["input_ids"]
    state["world_size"] = torch.tensor(trainer.accelerator.num_processes)
    torch.save(state, f"{out_dir}/rank{trainer.accelerator.process_index}.pt")
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
