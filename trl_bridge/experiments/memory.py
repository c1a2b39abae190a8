"""Memory BRIDGE needs for its weights and optimizer states, against GRPO, per GPU under FSDP2 (docs/scaling.md).

    trl-bridge memory --params 3.09e9 --gpus 8

Bytes per parameter, fp32 master weights with bf16 compute and AdamW (two fp32 moments), as BridgeTrainer trains:
    θ (trainable base):  weight 4 + gradient 4 + AdamW 8 = 16      (GRPO full fine-tuning: the same 16)
    θ̂ (shadow of θ):     weight 4 + gradient 4 + AdamW 8 = 16      (BRIDGE only)
    w (LoRA adapter):    weight 4 + gradient 4 + AdamW 8 = 16 per adapter parameter
    frozen base weights: their load dtype (4 in the paper configs)
    KL reference (beta > 0): one frozen copy of the initial policy in its load dtype
FSDP2 shards every one of these across the GPUs (θ̂ is placed on θ's mesh with θ's placements: tests/distributed/test_fsdp2.py
measures each of 2 ranks holding half of θ̂ and of its optimizer state). Not included: activations (they grow with
micro-batch x sequence length; gradient checkpointing keeps one layer's), the bf16 all-gather buffers of the FSDP
units in flight (about 2 bytes x 2 decoder layers' parameters), and vLLM's share of the GPU when `vllm_mode: colocate`
(`vllm_gpu_memory_utilization`, 0.3 of the GPU by default).
"""

from __future__ import annotations

import argparse

GB = 1e9
ADAMW_BYTES = 4 + 4 + 8  # fp32 weight, fp32 gradient, two fp32 AdamW moments


def estimate(params: float, trainable: float | None = None, lora_params: float | None = None, gpus: int = 1,
             kl_reference: bool = False, load_bytes: int = 4) -> dict[str, dict[str, float]]:
    """GB per GPU for each part of GRPO's and BRIDGE's weight-related memory (FSDP2 shards all of it over `gpus`)."""
    trainable = params if trainable is None else trainable
    lora_params = 1e-3 * params if lora_params is None else lora_params
    frozen = (params - trainable) * load_bytes
    ref = params * load_bytes if kl_reference else 0.0
    grpo = {"θ + grad + AdamW": trainable * ADAMW_BYTES, "frozen base": frozen, "KL reference": ref}
    bridge = {
        "θ + grad + AdamW": trainable * ADAMW_BYTES,
        "θ̂ + grad + AdamW": trainable * ADAMW_BYTES,
        "w + grad + AdamW": lora_params * ADAMW_BYTES,
        "frozen base": frozen,
        "KL reference": ref,
    }
    per_gpu = {name: {k: v / gpus / GB for k, v in parts.items()} for name, parts in (("GRPO", grpo), ("BRIDGE", bridge))}
    for parts in per_gpu.values():
        parts["total"] = sum(parts.values())
    return per_gpu


def main(argv=None):
    parser = argparse.ArgumentParser(prog="trl-bridge memory", description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=float, required=True, help="parameters of the model (e.g. 3.09e9)")
    parser.add_argument("--trainable", type=float, default=None, help="trainable base parameters (default: all)")
    parser.add_argument("--lora_params", type=float, default=None, help="adapter parameters (default: 0.1%% of params)")
    parser.add_argument("--gpus", type=int, default=8, help="FSDP2 processes the states are sharded over")
    parser.add_argument("--kl_reference", action="store_true", help="beta > 0: a frozen reference copy is kept")
    args = parser.parse_args(argv)
    table = estimate(args.params, args.trainable, args.lora_params, args.gpus, args.kl_reference)
    keys = list(table["BRIDGE"])
    print(f"GB per GPU, {args.params:.3g} parameters, FSDP2 over {args.gpus} GPUs (weights and optimizer states only)")
    print(f"| {'part':<18} | {'GRPO':>8} | {'BRIDGE':>8} |")
    print(f"|{'-' * 20}|{'-' * 10}|{'-' * 10}|")
    for k in keys:
        print(f"| {k:<18} | {table['GRPO'].get(k, 0.0):8.2f} | {table['BRIDGE'][k]:8.2f} |")
    return table


if __name__ == "__main__":
    main()
