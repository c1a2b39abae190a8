"""Building the policy π(θ+w) for BridgeTrainer: the model by name, a PeftModel adopted as (θ, w), the adapter w's
LoRA config, the selection of θ, fp32 master weights, and the model-structure helpers the trainer relies on (TRL's
fused LM head, the frozen decoder prefix)."""

from __future__ import annotations

import copy
import re
import warnings
from contextlib import contextmanager

import torch
from accelerate.utils import is_peft_model
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from transformers.utils import logging
from trl.trainer.utils import create_model_from_path

from ..engines.export import merged_state_dict, plain_name

logger = logging.get_logger(__name__)


def load_model(name: str, args, quantization_config=None):
    """`model` given by name: the offline alias resolves as on the command line (`trl_bridge.models`), and a local
    folder that does not exist or a name the Hub cannot serve fails with one line naming it."""
    from ..models import explain_model_load_errors, resolve_model_path

    init_kwargs = dict(args.model_init_kwargs or {})
    init_kwargs.setdefault("trust_remote_code", args.trust_remote_code)
    if quantization_config is not None:
        init_kwargs["quantization_config"] = quantization_config
    with explain_model_load_errors(name):
        model = create_model_from_path(resolve_model_path(name), **init_kwargs)
    args.model_init_kwargs = None  # consumed here; GRPOTrainer would warn that an instance ignores them
    return model


def adapter_config(args) -> LoraConfig:
    """The adapter w from the `lora_*` fields (paper: r = 16, α = 16)."""
    return LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=args.lora_target_modules,
        layers_to_transform=args.lora_layers_to_transform,
        task_type="CAUSAL_LM",
    )


def adopt_peft_model(peft_model, peft_config, args):
    """A `PeftModel` passed in: its LoRA adapter becomes w and its base weights θ (GRPOTrainer would train the
    adapter alone; BRIDGE trains the base by definition). Returns (plain base model, the adapter's LoraConfig,
    the adapter's weights, the merged initial policy π(θ⁰+w⁰) for the KL reference or None). At λ = 1 throughout
    the adapter would never train: it is merged into the base (PEFT's `merge_and_unload`) and GRPO trains that.
    The PeftModel is unwrapped in place; use `trainer.model` afterwards."""
    if peft_config is not None:  # GRPOTrainer's refusal, same type and advice
        raise ValueError(
            "You passed a `PeftModel` instance together with a `peft_config` to the trainer. Please first merge "
            "and unload the existing adapter, save the resulting base model, and then pass that base model along "
            "with the new `peft_config` to the trainer."
        )
    names = list(peft_model.peft_config)
    if len(names) != 1:
        raise ValueError(
            f"The PeftModel carries {len(names)} adapters {names}; BRIDGE trains one adapter w. Keep one "
            "(`delete_adapter`) or merge the others into the base (`merge_and_unload`) before passing it."
        )
    name = names[0]
    config = peft_model.peft_config[name]
    if not isinstance(config, LoraConfig):
        raise ValueError(
            f"The PeftModel's adapter is {type(config).__name__} ({config.peft_type}); BRIDGE's adapter w is LoRA "
            "(its gradient is the cooperative gain on θ+w). Merge it into the base (`merge_and_unload()`) and pass "
            "the plain model, with `peft_config=LoraConfig(...)` or the `lora_*` fields for w."
        )
    if args.lambda_is_always_one():
        return peft_model.merge_and_unload(), None, None, None
    check_adapter_config(config)
    config = copy.deepcopy(config)
    config.inference_mode = False  # a PeftModel loaded for inference still trains here, as w
    if hasattr(config, "init_lora_weights"):
        config.init_lora_weights = True  # the weights are the adapter's own (PiSSA/LoftQ init would redo it on θ)
    weights = {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model, adapter_name=name).items()}
    ref_weights = merged_state_dict(peft_model, adapter_name=name) if args.beta != 0.0 else None
    if ref_weights is not None:
        ref_weights = {k: v.detach().clone() for k, v in ref_weights.items()}
    return peft_model.unload(), config, weights, ref_weights


def resolve_peft_config(model, peft_config, args, grpo_only: bool):
    """w's adapter: the `peft_config` given, else the `lora_*` keys' (none at λ = 1 throughout: its gradient would be
    zero), checked against what the trainer and the merged export support."""
    from_args = peft_config is None
    if grpo_only:
        if peft_config is not None:
            warnings.warn(
                "`peft_config` is ignored: with bridge_lambda = 1 for the whole run BRIDGE is GRPO on the base "
                "weights and builds no adapter (its gradient would be zero).", UserWarning, stacklevel=3,
            )
        return None
    if peft_config is None:
        peft_config = adapter_config(args)
    check_adapter_config(peft_config)
    check_lora_targets(model, peft_config, field="lora_target_modules" if from_args else "peft_config.target_modules")
    return peft_config


def check_adapter_config(peft_config):
    for field in ("modules_to_save", "trainable_token_indices"):
        if getattr(peft_config, field, None):
            raise ValueError(
                f"`peft_config.{field}` is not supported by BridgeTrainer: BRIDGE trains the base weights θ in full "
                "(select them with `trainable_base_parameters`), so a second trainable copy inside the adapter w "
                "would have no shadow and no defined update. Leave it unset."
            )


def check_lora_targets(model, peft_config, field: str):
    """Every entry of LoRA's `target_modules` must match a module of the model: PEFT fails only when none matches and
    silently drops an entry that matches nothing (a typo would leave those layers without adapter)."""
    from peft.tuners.tuners_utils import check_target_module_exists

    targets = getattr(peft_config, "target_modules", None)
    if targets is None or targets in ("all-linear", ["all-linear"]):
        return
    names = [n for n, _ in model.named_modules() if n]

    def matches(entry):
        probe = copy.copy(peft_config)
        probe.target_modules = entry if isinstance(targets, str) else {entry}
        found = (check_target_module_exists(probe, n) for n in names)
        return any(f and type(f).__name__ != "_ExcludedModule" for f in found)

    unmatched = [t for t in ([targets] if isinstance(targets, str) else sorted(targets)) if not matches(t)]
    if unmatched:
        layers = getattr(peft_config, "layers_to_transform", None)
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ValueError(
            f"`{field}`={sorted(targets) if not isinstance(targets, str) else targets!r}: {unmatched} match no module of "
            f"the model{f' in layers_to_transform={layers}' if layers is not None else ''}, so they would get no adapter. "
            f"The model's linear modules are named {leaves}."
        )


def load_adapter_weights(peft_model, weights):
    """Load a PeftModel's adapter weights (keys without the adapter name) into w, the adapter named "default"."""
    result = set_peft_model_state_dict(peft_model, weights, adapter_name="default")
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        raise ValueError(
            f"The PeftModel's adapter weights do not fit the re-created adapter w: unexpected {result.unexpected_keys[:3]}, "
            f"missing {missing[:3]}."
        )


def select_base_params(peft_model, patterns):
    """(plain name, param) for the base weights θ selected by `trainable_base_parameters` (regexes; None = all)."""
    candidates = [(plain_name(n), p) for n, p in peft_model.named_parameters() if "lora_" not in n and ".ref." not in n]
    if patterns is None:
        return candidates
    regexes = [re.compile(pat) for pat in patterns]
    selected = [(n, p) for n, p in candidates if any(r.search(n) for r in regexes)]
    if not selected:
        raise ValueError(
            f"`trainable_base_parameters`={patterns} matches no base parameter; names look like {candidates[0][0]!r}."
        )
    return selected


def trainable_sets(model, args, grpo_only: bool):
    """(θ, w) as (plain name, param) lists. PEFT froze the base: the weights `trainable_base_parameters` selects are
    made trainable again (at λ = 1 throughout there is no PEFT: what is not θ is frozen, as PEFT does); w is every
    trainable LoRA parameter. Both are kept as fp32 master weights."""
    base_params = select_base_params(model, args.trainable_base_parameters)
    if grpo_only:
        theta = {id(p) for _, p in base_params}
        for p in model.parameters():
            p.requires_grad_(id(p) in theta)
    for _, p in base_params:
        p.requires_grad_(True)
    adapter_params = [(n, p) for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]
    keep_fp32_master_weights(model, base_params + adapter_params, autocast=args.bf16)
    return base_params, adapter_params


def rebind_by_name(model, base_params, adapter_params):
    """(θ, w) looked up again by name in `model`: FSDP2's `fully_shard` replaced every parameter by a DTensor one."""
    named = dict(model.named_parameters())
    by_plain = {plain_name(n): p for n, p in named.items() if "lora_" not in n}
    return [(n, by_plain[n]) for n, _ in base_params], [(n, named[n]) for n, _ in adapter_params]


def keep_fp32_master_weights(model, trainable, autocast: bool):
    """θ (and so θ̂, its copy) and w train in fp32 whatever dtype the model was loaded in. At the paper's lr (5e-7) a
    bf16 update of a weight of size ~0.02 is below bf16's spacing (~1e-4) and rounds away: θ would not move, θ̂ would
    stay equal to θ and the cooperative gain would vanish. With `bf16=True` the forward still computes in bf16
    (autocast); without it, the whole policy is upcast so that every matmul sees one dtype."""
    half = [n for n, p in trainable if p.dtype in (torch.bfloat16, torch.float16)]
    bad = [f"{n} ({p.dtype})" for n, p in trainable if not p.dtype.is_floating_point]
    if bad:
        raise ValueError(
            f"Trainable base weights must be floating point; {bad[:3]} are not (a quantized model?). BRIDGE trains the "
            "base weights θ in full: load the model unquantized, or leave those weights out of `trainable_base_parameters`."
        )
    if not half:
        return
    params = [p for _, p in trainable] if autocast else [p for p in model.parameters() if p.dtype.is_floating_point]
    for p in params:
        if p.dtype in (torch.bfloat16, torch.float16):
            p.data = p.data.float()
    logger.warning(
        "%d trainable weights were loaded in half precision (e.g. %s); BRIDGE keeps fp32 master weights for θ, θ̂ and "
        "w (half-precision updates at small learning rates round away). %s",
        len(half), half[0],
        "Compute stays in bf16 (autocast, bf16=True)." if autocast else "bf16=False: the policy now computes in fp32.",
    )


def fused_head_cells(causal_lm) -> dict:
    """The closure cells of the forward that TRL's `add_fused_lm_head` patched in (temperature, computed outputs)."""
    fn = getattr(causal_lm.forward, "__func__", causal_lm.forward)
    cells = dict(zip(fn.__code__.co_freevars, fn.__closure__ or ()))
    if not {"temperature", "outputs"} <= set(cells):
        raise RuntimeError(
            "TRL's fused LM head (trl.trainer.utils.add_fused_lm_head) is not the one this trl-bridge version was built "
            "for: install the trl version pyproject.toml pins."
        )
    return cells


@contextmanager
def fused_head_for_sft(causal_lm):
    """GRPOTrainer patched the fused head at the sampling temperature and with entropies; L_SFT is the NLL at
    temperature 1 and needs log-probs only. The kernel reads both when called (and saves them for its backward)."""
    cells = fused_head_cells(causal_lm)
    saved = cells["temperature"].cell_contents, cells["outputs"].cell_contents
    cells["temperature"].cell_contents, cells["outputs"].cell_contents = 1.0, ("log_probs",)
    try:
        yield
    finally:
        cells["temperature"].cell_contents, cells["outputs"].cell_contents = saved


def model_name(peft_model) -> str:
    """The base model's Hub name or path; a model built from a config has none, so name its class."""
    base = peft_model.get_base_model() if is_peft_model(peft_model) else peft_model
    return base.config._name_or_path or f"{type(base).__name__} (built from a config)"


@contextmanager
def fields_overridden(args, **values):
    """Set config fields for the duration of the block (GRPOTrainer.__init__), then restore them."""
    saved = {k: getattr(args, k) for k in values}
    for k, v in values.items():
        setattr(args, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(args, k, v)
