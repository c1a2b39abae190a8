"""vLLM weight sync for BridgeTrainer: vLLM samples from the merged policy π(θ+w), computed out of place.

TRL's `VLLMGeneration` pushes a PEFT model's weights by merging the adapter into the base weights in place
(`merge_adapter`), reading them, and unmerging (`unmerge_adapter`). For BRIDGE that has two faults: fl(fl(θ+Δ)−Δ) is
not θ, so every sync moves θ by float rounding (measured: ~0.1% of the adapted weights change by one ulp per sync),
and under FSDP2 TRL's in-place merge on sharded parameters is untested upstream. BridgeTrainer therefore replaces the
weight stream of its `VLLMGeneration` (`_iter_named_params`, read by both colocate `load_weights` and the server's
`update_named_params`) with `trl_bridge.engines.export.merged_tensors`: the same merge as the exported model folder, on
detached copies, gathered one module at a time under FSDP2. θ, θ̂ and w are bit-identical across a sync, vLLM
holds exactly the export's weights, and θ̂ is never pushed (it lives outside the model except inside pass B, which
runs after generation). Everything else (sampling, log-probs, the importance-sampling correction) is TRL's.

At λ = 1 throughout BridgeTrainer trains a plain model without adapter: TRL's own stream is used unchanged.
"""

from __future__ import annotations

import types

from accelerate.utils import is_peft_model

from .export import merged_tensors
from .fsdp2 import reshard

__all__ = ["check_vllm_can_hold_the_policy", "keep_vllm_cpu_weights_live", "merged_policy_params", "sync_merged_policy"]


def merged_policy_params(generation):
    """`VLLMGeneration._iter_named_params` for a PEFT policy: ``(vLLM name, tensor)`` of π(θ+w), one at a time, tied
    weights once, on the training device. Every process must iterate (FSDP2 gathers are collectives)."""
    model = generation.model
    reshard(model)  # no gathered FSDP2 copy of θ may stand in for the shards being read
    device = generation.accelerator.device
    for name, tensor in merged_tensors(model, parameters_only=True, tied_once=True):
        yield generation._fix_param_name_to_vllm(name), tensor.to(device)


def sync_merged_policy(generation) -> None:
    """Make `generation` (TRL's `VLLMGeneration`) push π(θ+w) computed out of place (`merged_policy_params`)."""
    if is_peft_model(generation.model):
        generation._iter_named_params = types.MethodType(merged_policy_params, generation)


def check_vllm_can_hold_the_policy(peft_model) -> None:
    """vLLM ties the output embedding to the input one when the checkpoint does; an adapter on either side of a tied
    pair makes π(θ+w) untied, which vLLM cannot hold. Refused before training."""
    base = peft_model.get_base_model()
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    if not getattr(config, "tie_word_embeddings", False):
        return
    markers = ("lora_", "modules_to_save", "trainable_tokens")
    sides = {"input embedding": base.get_input_embeddings(), "output embedding": base.get_output_embeddings()}
    touched = [side for side, module in sides.items()
               if module is not None and any(m in n for n, _ in module.named_parameters() for m in markers)]
    if touched:
        raise ValueError(
            f"use_vllm=True with an adapter on the tied {' and '.join(touched)}: the merged policy π(θ+w) has untied "
            "embeddings, which vLLM (loading the model's tied checkpoint) cannot hold. Leave `embed_tokens`/`lm_head` "
            "out of `lora_target_modules`, or set use_vllm=False."
        )


def keep_vllm_cpu_weights_live() -> bool:
    """vLLM on CPU (the `vllm-cpu` build) packs each linear weight into a oneDNN handle when the model loads and drops
    the weight itself, so every later weight sync fails (``'Parameter' object has no attribute 'weight_loader'``) or,
    for the tied head, is silently ignored. Turning oneDNN packing off makes vLLM compute with
    ``torch.nn.functional.linear`` on the live weights, which a sync updates in place. Call before the engine is built
    (colocate mode); a no-op on GPU platforms and without vLLM (TRL then says how to install it). Returns whether it
    applied."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return False
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    import vllm._custom_ops as vllm_ops

    if not hasattr(vllm_ops, "_supports_onednn"):
        raise RuntimeError(
            "This vLLM CPU build has no `vllm._custom_ops._supports_onednn`, which trl-bridge turns off so that weight "
            "syncs reach the engine; it was written for vllm-cpu 0.32. Use that version, or vLLM on a GPU."
        )
    vllm_ops._supports_onednn = False
    return True

