"""Export of the BRIDGE policy π(θ+w) as one plain model folder (the adapter merged into the base weights).

What is exported: the base architecture (no PEFT wrappers, no adapter keys) whose weights are the current base
weights θ with the LoRA adapter w merged in by PEFT (`merge_and_unload()`). Every option PEFT merges is covered
because the merge *is* PEFT's: LoRA, rsLoRA, `lora_bias=True` (the lora_B bias goes into the base bias, so only
layers that have one can take it), DoRA (`use_dora=True`, the magnitude rescale), `modules_to_save` (the trained
copy replaces the original module), `trainable_token_indices`. Tied embeddings stay tied unless the adapter changes
one side only (LoRA on the input embedding, a trained `lm_head` copy): then the folder is written untied
(`tie_word_embeddings=False`), so the merge does not leak into the tied twin as an in-place `merge_and_unload()` on
the live model would. Options PEFT cannot merge raise a `ValueError` naming the `LoraConfig` field instead of
exporting wrong weights; a state dict of sharded DTensors (FSDP2) is refused too (pass the gathered one).

How (`merged_tensors`, the one merge that the export, the vLLM weight sync and the KL-reference sync share): each
PEFT-wrapped module is copied with fresh full tensors and merged by PEFT itself on the copy (`merge`, or the
wrapper's `unload_and_optionally_merge_module`, exactly as `merge_and_unload()` visits it); every other tensor is
passed through read-only. The live model's parameters, adapters and merge state are unchanged, so a checkpoint or a
weight sync mid-training leaves training untouched (bit for bit). Under FSDP2 the sharded parameters are gathered one
module at a time, or a gathered full state dict is read instead. Other adapters of the model (TRL's `ref` adapter)
are ignored. Each tensor keeps the live model's dtype.

The folder loads with `AutoModelForCausalLM.from_pretrained` and generates like the in-memory policy.
"""

from __future__ import annotations

import copy
import os
import warnings

import torch

_PEFT_PREFIX = "base_model.model."

# LoraConfig fields whose adapters PEFT cannot merge into the base weights (their effect is not a weight delta).
_UNMERGEABLE_FIELDS = {
    "alora_invocation_tokens": "activated LoRA (aLoRA) only applies after its invocation tokens",
    "arrow_config": "an Arrow router picks adapters per token",
    "layer_replication": "replicated layers share one base weight but have their own adapters",
}


def plain_name(peft_param_name: str) -> str:
    """`base_model.model.model.layers.0.q_proj.base_layer.weight` -> `model.layers.0.q_proj.weight`."""
    name = peft_param_name[len(_PEFT_PREFIX) :] if peft_param_name.startswith(_PEFT_PREFIX) else peft_param_name
    return name.replace(".base_layer.", ".")


def _check_mergeable(config) -> None:
    for field, reason in _UNMERGEABLE_FIELDS.items():
        if getattr(config, field, None):
            raise ValueError(
                f"Cannot export the merged policy: PEFT cannot merge an adapter with `LoraConfig.{field}` set "
                f"({reason}). Save the adapter separately instead."
            )


def _check_lora_bias(peft_model, adapter_name: str) -> None:
    """`lora_bias=True` on a layer without a bias: the plain architecture has no tensor to hold the lora_B bias."""
    from peft.tuners.lora import LoraLayer

    no_bias = [
        name[len(_PEFT_PREFIX) :] if name.startswith(_PEFT_PREFIX) else name
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer)
        and getattr(module, "lora_bias", {}).get(adapter_name)
        and getattr(module.get_base_layer(), "bias", None) is None
    ]
    if no_bias:
        raise ValueError(
            f"Cannot export the merged policy: `LoraConfig.lora_bias=True` but {len(no_bias)} targeted layers have no "
            f"bias in the base architecture (e.g. {no_bias[:3]}), so a plain model cannot hold their lora_B bias. "
            "Target only layers with a bias (`LoraConfig.target_modules`) or set `lora_bias=False`."
        )


def check_exportable(peft_model, adapter_name: str = "default") -> None:
    """Raise now (before training) if the adapter could not be merged into a plain model at export time."""
    _check_mergeable(peft_model.peft_config[adapter_name])
    _check_lora_bias(peft_model, adapter_name)


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)


def _tuner_modules(model) -> dict:
    """The outermost PEFT-wrapped modules of the base model (LoRA layers, `modules_to_save` / trainable-token
    wrappers), by their plain names."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    found = {}
    for name, module in model.named_modules():
        if isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)) and not _inside(name, found):
            found[name] = module
    return found


def _inside(name: str, outer_names) -> bool:
    return any(name.startswith(f"{outer}.") for outer in outer_names)


@torch.no_grad()
def _merged_module(module, prefix: str, adapter_name: str, tensor):
    """PEFT's merge of `adapter_name` on a detached copy of one wrapped module, as `merge_and_unload()` does it (the
    wrapper's `unload_and_optionally_merge_module`, else `merge` + `get_base_layer`). The copy holds fresh full
    tensors (``tensor(key, live)`` gathers or looks each one up), so nothing of the live module is written.
    Returns the plain module that takes the wrapper's place."""
    from peft.utils.other import AuxiliaryTrainingWrapper

    memo = {}
    named = list(module.named_parameters(prefix=prefix, remove_duplicate=False))
    named += list(module.named_buffers(prefix=prefix, remove_duplicate=False))
    for key, live in named:
        if id(live) not in memo:
            full = tensor(key, live).clone()
            memo[id(live)] = torch.nn.Parameter(full, requires_grad=False) if isinstance(live, torch.nn.Parameter) else full
    copied = copy.deepcopy(module, memo)
    if isinstance(copied, AuxiliaryTrainingWrapper):  # modules_to_save / trainable tokens: PEFT's own unload
        copied.set_adapter([adapter_name] if adapter_name in copied._get_available_adapters() else [])
        return copied.unload_and_optionally_merge_module(merge=True, safe_merge=False, adapter_names=[adapter_name])
    if getattr(copied, "merged_adapters", None):
        raise ValueError(f"`{prefix}` has adapters merged in place ({copied.merged_adapters}): unmerge them first.")
    if adapter_name in copied._get_available_adapters():
        copied.merge(safe_merge=False, adapter_names=[adapter_name])
    return copied.get_base_layer()


def merged_tensors(
    peft_model,
    adapter_name: str = "default",
    state_dict: dict[str, torch.Tensor] | None = None,
    parameters_only: bool = False,
    tied_once: bool = False,
):
    """π(θ+w) one tensor at a time: ``(plain name, tensor)`` of the base architecture with the adapter merged in.

    The one merge of trl-bridge: the export (`merged_state_dict`, `save_merged_model`), the vLLM weight sync and the
    KL-reference sync all read it. Each PEFT-wrapped module is merged by PEFT itself on a detached copy holding fresh
    full tensors (`_merged_module`); every other tensor is passed through read-only. The live model (parameters,
    adapters, merge state) is never written. FSDP2's sharded DTensors are gathered one module at a time (a
    collective: every rank must iterate, in the same order), unless `state_dict` (a full state dict keyed like
    ``peft_model.state_dict()``) supplies the tensors. `parameters_only` leaves out buffers; `tied_once` yields a
    parameter shared by several modules (tied embeddings) once, under its first name, as vLLM loads them.
    """
    if adapter_name not in peft_model.peft_config:
        raise ValueError(f"Adapter {adapter_name!r} not found; the model has {sorted(peft_model.peft_config)}.")
    _check_mergeable(peft_model.peft_config[adapter_name])
    if state_dict is not None and any(_is_dtensor(v) for v in state_dict.values()):
        raise ValueError(
            "The state dict holds sharded DTensors (FSDP2): gather a full state dict on every rank (e.g. "
            "`accelerator.get_state_dict(model)`) and pass it as `state_dict`, or pass none (each module is gathered "
            "in turn)."
        )
    base = peft_model.get_base_model()
    missing = []

    def tensor(key, live):
        if state_dict is None:
            return live.detach().full_tensor() if _is_dtensor(live) else live.detach()
        value = state_dict.get(_PEFT_PREFIX + key)
        if value is None:
            missing.append(_PEFT_PREFIX + key)
            return torch.empty(live.shape, dtype=live.dtype)
        return value.detach()

    wrapped = _tuner_modules(base)
    seen = set()
    for name, module in base.named_modules(remove_duplicate=False):
        if _inside(name, wrapped):
            continue
        dot = f"{name}." if name else ""
        if name in wrapped:
            live_ids = {id(t) for t in [*module.parameters(), *module.buffers()]}
            if tied_once and live_ids & seen:
                continue
            seen |= live_ids
            merged = _merged_module(module, name, adapter_name, tensor)
            items = list(merged.named_parameters(remove_duplicate=False))
            if not parameters_only:
                items += list(merged.state_dict(keep_vars=True).items())
            for key, value in dict(items).items():
                yield dot + key, value.detach()
            continue
        items = list(module.named_parameters(recurse=False))
        if not parameters_only:
            skip = getattr(module, "_non_persistent_buffers_set", set())
            items += [(k, v) for k, v in module.named_buffers(recurse=False) if k not in skip]
        for key, value in items:
            if tied_once and id(value) in seen:
                continue
            seen.add(id(value))
            yield dot + key, tensor(dot + key, value)
    if missing:
        raise ValueError(
            f"The state dict lacks {len(missing)} entries of the PEFT model for adapter {adapter_name!r}, "
            f"e.g. {missing[:3]}; expected keys like `peft_model.state_dict()`."
        )


@torch.no_grad()
def _merged_model(peft_model, adapter_name: str, state_dict: dict[str, torch.Tensor] | None):
    """A detached plain base model holding θ+w (`merged_tensors`), sharing no mutated storage with `peft_model`.
    Tied embeddings stay tied unless the adapter changed one side only: then the model is untied."""
    _check_lora_bias(peft_model, adapter_name)
    sd = merged_state_dict(peft_model, adapter_name, state_dict)
    base = peft_model.get_base_model()
    config = copy.deepcopy(base.config)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    tied = bool(getattr(text_config, "tie_word_embeddings", False))
    if tied:
        in_key, out_key = _weight_key(base, base.get_input_embeddings()), _weight_key(base, base.get_output_embeddings())
        if in_key in sd and out_key in sd and torch.equal(sd[in_key], sd[out_key]):
            sd[out_key] = sd[in_key]
        elif in_key in sd and out_key in sd:
            tied = False
            for c in {id(config): config, id(text_config): text_config}.values():
                if hasattr(c, "tie_word_embeddings"):
                    c.tie_word_embeddings = False
            warnings.warn("Input and output embeddings are no longer tied after merging (the adapter changed one of "
                          "them). Setting `tie_word_embeddings=False` in the model config.", UserWarning, stacklevel=3)
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore", FutureWarning)
        merged = type(base)(config)
    expected = merged.state_dict()
    uncovered = [k for k in expected if k not in sd]
    if uncovered:
        raise RuntimeError(f"Merged model has weights not covered by the state dict: {uncovered[:3]}")
    merged.load_state_dict({k: sd[k] for k in expected}, strict=True, assign=True)
    if tied:
        merged.tie_weights()
    merged.generation_config = copy.deepcopy(base.generation_config)
    return merged


def _weight_key(model, module) -> str | None:
    """``<name>.weight`` of `module` inside `model` (None when it is not a submodule)."""
    for name, sub in model.named_modules(remove_duplicate=False):
        if sub is module and module is not None:
            return f"{name}.weight"
    return None


def merged_state_dict(
    peft_model, adapter_name: str = "default", state_dict: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """State dict of the plain base architecture with the adapter merged in (θ + w), as `merge_and_unload()` gives
    (`merged_tensors`, collected).

    `peft_model` is not modified. `state_dict`, when given, is a full (unsharded) state dict keyed like
    `peft_model.state_dict()` (e.g. gathered under FSDP2) and is used instead of the live tensors. Weights the
    merge does not touch may share storage with the source; treat the result as read-only.
    """
    return dict(merged_tensors(peft_model, adapter_name, state_dict))


def save_merged_model(
    peft_model,
    tokenizer,
    output_dir: str,
    adapter_name: str = "default",
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write π(θ+w) as a plain `transformers` model folder (weights, config, generation config, tokenizer).

    The config is the live base model's, except `tie_word_embeddings`, which PEFT clears when the merge unties the
    input and output embeddings (e.g. `modules_to_save=["lm_head"]` on a tied model).
    """
    os.makedirs(output_dir, exist_ok=True)
    merged = _merged_model(peft_model, adapter_name, state_dict)
    merged.save_pretrained(output_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    _respect_umask(output_dir)


def _respect_umask(folder: str) -> None:
    """transformers writes the weights through a private temporary file (mode 0600) and renames it; give the folder's
    files the mode any other new file gets (0666 minus the umask, e.g. 0644), as `cp` or `save_file` would."""
    umask = os.umask(0)
    os.umask(umask)
    mode = 0o666 & ~umask
    for entry in os.scandir(folder):
        if entry.is_file(follow_symlinks=False) and (entry.stat().st_mode & 0o777) == 0o600 and mode != 0o600:
            os.chmod(entry.path, mode)
