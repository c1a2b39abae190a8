"""Record, or check against a recording, a fixed 3-step BRIDGE run on a tiny model in each of several settings.

    python scripts/reference_run.py record OUT.pt    # θ, θ̂, w, the three optimizers' states and the logged metrics
    python scripts/reference_run.py check OUT.pt     # the same run again: every tensor must be bit-identical

A refactoring of the trainer must not change a single bit of what it trains: this is the check for that. The settings
cover the options the test suite covers: gradient accumulation, `num_iterations` (old log-probs kept), a λ schedule,
`shadow_fraction`, the lean shadow, frozen-activation replay, truncated IS, the KL reference with `sync_ref_model`, the
"w/o J_meta" ablation, λ = 1 (GRPO), the alternating baseline, the bf16-delta shadow (θ stepped before pass B, and
with gradient accumulation), CHORD and LUFFY. CPU, one thread, fp32.
"""

import os
import sys
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from datasets import Dataset

from trl_bridge import BridgeConfig, BridgeTrainer
from trl_bridge.tiny import make_tiny_model, make_tiny_tokenizer

torch.set_num_threads(1)

COMMON = dict(per_device_train_batch_size=4, num_generations=4, max_completion_length=8, report_to="none",
              save_strategy="no", logging_steps=1, seed=7, bf16=False, gradient_checkpointing=False, use_cpu=True,
              learning_rate=1e-2, lora_r=4, lora_alpha=8, sft_per_device_train_batch_size=2, max_steps=3,
              max_grad_norm=1.0)

SETTINGS = {
    "ga_iterations_kl_truncated_is": dict(gradient_accumulation_steps=2, num_iterations=2, beta=0.04,
                                          sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=0.5,
                                          shadow_off_policy="truncated_is", bridge_lambda=0.3, bridge_lambda_end=0.7,
                                          bridge_lambda_warmup_steps=3),
    "fraction_lean_frozen_replay": dict(gradient_accumulation_steps=2, num_generations=2, shadow_fraction=0.5,
                                        shadow_storage="lean", share_frozen_activations=True,
                                        trainable_base_parameters=[r"model\.layers\.1\."], lora_layers_to_transform=[1]),
    "truncated_is_fresh": dict(shadow_off_policy="truncated_is", adapter_learning_rate=3e-2),
    "no_meta_term": dict(bridge_meta_term=False),
    "grpo_only": dict(bridge_lambda=1.0),
    "alternating": dict(bridge_lambda_alternate=True),
    "bf16_delta_theta_first": dict(shadow_storage="bf16_delta"),
    "bf16_delta_ga": dict(shadow_storage="bf16_delta", gradient_accumulation_steps=2),
    "chord": dict(chord_mu_peak=0.9, chord_mu_warmup_steps=1, chord_mu_decay_steps=2, chord_phi=True,
                  bridge_lambda_warmup_steps=0, adapter_learning_rate=0.0, bridge_meta_term=False),
    "luffy": dict(luffy=True, bridge_lambda=1.0, bridge_lambda_warmup_steps=0),
}


def digit_reward(completions, answer, **kwargs):
    return [float(a in c) + sum(ch.isdigit() for ch in c) / max(len(c), 1) for c, a in zip(completions, answer)]


def run(name: str, overrides: dict) -> dict[str, torch.Tensor]:
    tok = make_tiny_tokenizer()
    rl = Dataset.from_list([{"prompt": f"What is {i} + {i + 1}?", "answer": str(2 * i + 1)} for i in range(16)])
    sft = Dataset.from_list([{"prompt": f"What is {i} + {i + 1}?",
                              "completion": f" {i} + {i + 1} = {2 * i + 1}. \\boxed{{{2 * i + 1}}}"} for i in range(16)])
    with tempfile.TemporaryDirectory() as out:
        args = BridgeConfig(output_dir=out, **{**COMMON, **overrides})
        trainer = BridgeTrainer(model=make_tiny_model(tok), reward_funcs=digit_reward, args=args, train_dataset=rl,
                                sft_dataset=sft, processing_class=tok)
        trainer.train()
    record = {f"model.{n}": p.detach().clone() for n, p in trainer.model.named_parameters()}
    record.update({f"shadow.{n}": t for n, t in trainer.shadow_state_dict().items()})
    for key in ("optimizer", "shadow_optimizer", "adapter_optimizer"):
        opt = getattr(trainer, key, None)
        if opt is None:
            continue
        for i, state in opt.state_dict()["state"].items():
            for k, v in state.items():
                record[f"{key}.{i}.{k}"] = torch.as_tensor(v).clone()
    for i, log in enumerate(trainer.state.log_history):
        for k, v in log.items():
            if isinstance(v, (int, float)) and "time" not in k and "per_second" not in k and k != "total_flos":
                record[f"log.{i}.{k}"] = torch.tensor(float(v), dtype=torch.float64)
    return {f"{name}/{k}": v for k, v in record.items()}


def main():
    mode, path = sys.argv[1], sys.argv[2]
    record = {}
    for name, overrides in SETTINGS.items():
        record.update(run(name, overrides))
    if mode == "record":
        torch.save(record, path)
        print(f"recorded {len(record)} tensors of {len(SETTINGS)} runs in {path}")
        return
    expected = torch.load(path)
    missing, extra = sorted(set(expected) - set(record)), sorted(set(record) - set(expected))
    differ = [k for k in expected if k in record and not torch.equal(expected[k], record[k])]
    print(f"{len(expected)} recorded tensors: {len(differ)} differ, {len(missing)} missing, {len(extra)} new")
    print("settings that differ:", sorted({k.split("/")[0] for k in differ}))
    for k in (differ + missing + extra)[:20]:
        print("  ", k)
    sys.exit(1 if differ or missing or extra else 0)


if __name__ == "__main__":
    main()
