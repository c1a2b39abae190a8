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

How: the merge runs on a detached copy, never on the live training model. The copy is the same base class built on
the `meta` device from `base.config`, wrapped by `peft.get_peft_model` with the adapter's config (so the module names
are the live model's), then loaded with the live model's state dict (or the full state dict the caller gives, e.g.
gathered from FSDP2 DTensors) by assignment. The tensors PEFT merges in place are cloned first, the others are
shared read-only; the live model's parameters, adapters and merge state are unchanged, so a checkpoint written
mid-training leaves training untouched. Entries of the state dict that are not part of this adapter's PEFT model
(other adapters such as TRL's `ref` adapter) are ignored. Each tensor keeps the live model's dtype.

The folder loads with `AutoModelForCausalLM.from_pretrained` and generates like the in-memory policy.
"""

from __future__ import annotations

import copy
import os
import re
import warnings
from collections import defaultdict

import torch

_PEFT_PREFIX = "base_model.model."
_WRAPPER_SEGMENT = re.compile(r"\.(base_layer|original_module)(?=\.)")

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


def _storage_key(t: torch.Tensor):
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


@torch.no_grad()
def _merged_model(peft_model, adapter_name: str, state_dict: dict[str, torch.Tensor] | None):
    """A detached plain base model holding θ+w (PEFT's merge), sharing no mutated storage with `peft_model`."""
    if adapter_name not in peft_model.peft_config:
        raise ValueError(f"Adapter {adapter_name!r} not found; the model has {sorted(peft_model.peft_config)}.")
    config = copy.deepcopy(peft_model.peft_config[adapter_name])
    _check_mergeable(config)
    # The weights come from the state dict: no initialisation (PiSSA, LoftQ, EVA... would recompute from the base).
    if hasattr(config, "init_lora_weights"):
        config.init_lora_weights = True
    base = peft_model.get_base_model()
    if state_dict is None:
        state_dict = peft_model.state_dict()
    if any(_is_dtensor(v) for v in state_dict.values()):
        raise ValueError(
            "The model's parameters are sharded DTensors (FSDP2): gather a full state dict on every rank "
            "(e.g. `accelerator.get_state_dict(model)`) and pass it as `state_dict`."
        )

    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    with warnings.catch_warnings():
        # The live model already warned about these when it was wrapped.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message=".*ensure_weight_tying.*")
        warnings.filterwarnings("ignore", message=".*lora_bias=True.*has no bias.*")  # refused just below
        with torch.device("meta"):
            skeleton = type(base)(copy.deepcopy(base.config))
        copy_model = get_peft_model(skeleton, config, adapter_name=adapter_name, low_cpu_mem_usage=True)

    _check_lora_bias(copy_model, adapter_name)

    # Keys of the copy that name one shared parameter (tied embeddings): fill a missing one from its twin, and let twins
    # given as separate but equal tensors (a gathered state dict) share one tensor, so the tie survives the export.
    expected = copy_model.state_dict(keep_vars=True)
    groups = defaultdict(list)
    for key, value in expected.items():
        groups[id(value)].append(key)
    # A module the live model wraps only for another adapter (e.g. `modules_to_save` of a second adapter) is plain in
    # the copy: find its tensor under the wrapper's name (`X.original_module.weight`, `X.base_layer.weight`).
    by_base_name = {}
    for key in state_dict:
        by_base_name.setdefault(_WRAPPER_SEGMENT.sub("", key), key)
    sd = {}
    for key in expected:
        source = key if key in state_dict else by_base_name.get(_WRAPPER_SEGMENT.sub("", key))
        if source is not None:
            sd[key] = state_dict[source]
    for keys in groups.values():
        given = [k for k in keys if k in sd]
        if not given or len(keys) == 1:
            continue
        src = sd[given[0]]
        for k in keys:
            if k not in sd or _storage_key(sd[k]) == _storage_key(src):
                sd[k] = src
            elif sd[k].shape == src.shape and sd[k].dtype == src.dtype and torch.equal(sd[k], src):
                sd[k] = src
    missing = [k for k in expected if k not in sd]
    if missing:
        raise ValueError(
            f"The state dict lacks {len(missing)} entries of the PEFT model for adapter {adapter_name!r}, "
            f"e.g. {missing[:3]}; expected keys like `peft_model.state_dict()`."
        )

    # PEFT merges in place into the wrapped layers' tensors: clone those (keeping shared tensors shared), so the merge
    # never writes into the live model's storage.
    wrapper_types = (BaseTunerLayer, AuxiliaryTrainingWrapper)
    wrapped = tuple(f"{name}." for name, module in copy_model.named_modules() if isinstance(module, wrapper_types))
    clones = {}
    for key, value in sd.items():
        value = value.detach()
        if key.startswith(wrapped):
            value = clones.setdefault(_storage_key(value), value.clone())
        sd[key] = value
    copy_model.load_state_dict(sd, strict=True, assign=True)

    try:
        merged = copy_model.merge_and_unload(adapter_names=[adapter_name])
    except (NotImplementedError, RuntimeError, AttributeError, ValueError) as err:
        raise ValueError(
            f"Cannot export the merged policy: PEFT cannot merge adapter {adapter_name!r} ({err}). Check the "
            "`LoraConfig` fields `target_modules`/`target_parameters` (layer types PEFT cannot merge) and the "
            f"adapter variant options (`use_dora`, `lora_bias`, ...)."
        ) from err
    stray = [k for k, v in merged.state_dict().items() if v.is_meta]
    if stray:
        raise RuntimeError(f"Merged model has weights not covered by the state dict: {stray[:3]}")
    merged.generation_config = copy.deepcopy(base.generation_config)
    return merged


def merged_state_dict(
    peft_model, adapter_name: str = "default", state_dict: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """State dict of the plain base architecture with the adapter merged in (θ + w), as `merge_and_unload()` gives.

    `peft_model` is not modified. `state_dict`, when given, is a full (unsharded) state dict keyed like
    `peft_model.state_dict()` (e.g. gathered under FSDP2) and is used instead of the live tensors. Weights the
    merge does not touch may share storage with the source; treat the result as read-only.
    """
    return _merged_model(peft_model, adapter_name, state_dict).state_dict()


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
