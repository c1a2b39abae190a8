"""Export of the BRIDGE policy π(θ+w) as one plain model folder (the adapter merged into the base weights).

The merge reads the adapter's delta from PEFT (`LoraLayer.get_delta_weight`) without touching the live model, so a
checkpoint written mid-training leaves the training state unchanged. The folder loads with
`AutoModelForCausalLM.from_pretrained` and generates exactly like the in-memory policy.
"""

from __future__ import annotations

import os

import torch
from peft.tuners.lora import LoraLayer

_PEFT_PREFIX = "base_model.model."


def plain_name(peft_param_name: str) -> str:
    """`base_model.model.model.layers.0.q_proj.base_layer.weight` -> `model.layers.0.q_proj.weight`."""
    name = peft_param_name[len(_PEFT_PREFIX) :] if peft_param_name.startswith(_PEFT_PREFIX) else peft_param_name
    return name.replace(".base_layer.", ".")


@torch.no_grad()
def merged_state_dict(peft_model, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """State dict of the plain base architecture with every LoRA delta added to its base weight (θ + w)."""
    deltas = {}
    for module_name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            key = plain_name(f"{module_name}.base_layer.weight")
            deltas[key] = module.get_delta_weight(adapter_name)
    merged = {}
    for name, tensor in peft_model.state_dict().items():
        if "lora_" in name or name.endswith(".ref.weight"):
            continue
        key = plain_name(name)
        value = tensor.detach()
        if key in deltas:
            value = value + deltas.pop(key).to(value.dtype)
        merged[key] = value.contiguous()
    if deltas:
        raise RuntimeError(f"LoRA deltas without a matching base weight: {sorted(deltas)[:3]}")
    return merged


def save_merged_model(peft_model, tokenizer, output_dir: str, adapter_name: str = "default") -> None:
    """Write π(θ+w) as a plain `transformers` model folder (weights, config, generation config, tokenizer)."""
    os.makedirs(output_dir, exist_ok=True)
    base = peft_model.get_base_model()
    state_dict = merged_state_dict(peft_model, adapter_name)
    base.save_pretrained(output_dir, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
