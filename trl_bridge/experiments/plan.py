"""`trl-bridge plan`: the bytes of training state per process that a `trl-bridge train` config will hold, from the
model's config alone (nothing is loaded or downloaded: the model is built on the meta device).

    trl-bridge plan --config configs/qwen2.5-3b_math.yaml --model_name_or_path configs/model_configs/qwen2.5-3b --num_processes 8

Any other option overrides the training config as in `trl-bridge train`. The model is built from its `config.json`
(`AutoModelForCausalLM.from_config` on the meta device), wrapped in the LoRA adapter w the trainer would make
(`lora_r`, `lora_target_modules`, `lora_layers_to_transform`), and θ selected by `trainable_base_parameters`, exactly as
BridgeTrainer does (`trl_bridge.trainer.model_setup`). Then, tensor by tensor, in the dtype each one has in training:

    θ, θ̂, w            fp32 master weights (BridgeTrainer upcasts half-precision trainable weights) and their
                       gradients
    optimizer states   by `optim`: AdamW two moments in the weight's dtype + a 4-byte step per tensor; Adafactor no
                       first moment, a factored fp32 second moment (row and column statistics; one full statistic for
                       1-D tensors) + a 4-byte RMS per tensor; SGD its momentum buffer when momentum > 0, else
                       nothing; Adagrad its sum + step; RMSprop its square average + step (+ momentum buffer,
                       + gradient average when centered).
                       `shadow_storage: lean` gives θ̂ the factored, momentum-free Adafactor whatever `optim` is;
                       `bf16_delta` that optimizer too, and θ̂ (its delta d from θ) and θ̂'s accumulated gradient in
                       bf16 (2 bytes each; θ̂'s fp32 copy exists one weight at a time, not counted here). With one
                       micro-batch per step θ steps right after pass A, so θ's gradient and θ̂'s are never held at
                       once: the total counts the larger of the two
    frozen weights     the load dtype (`dtype`); fp32 when a half-precision model trains without `bf16` (the trainer
                       then upcasts the whole policy)
    KL reference       (`beta` > 0) a frozen copy of the whole model in the load dtype
    GRPO               TRL's GRPOTrainer on the same θ: no θ̂, no w, θ in the load dtype (no fp32 master copy; under
                       FSDP2 with mixed precision accelerate upcasts a half-precision θ to fp32, which this row omits)

FSDP2 (`--num_processes N`) shards every one of these tensors along its first dimension; each process holds
ceil(rows / N) rows of each (rank 0 always holds that many: the figures are its), scalars (optimizer steps) are
replicated, and Adafactor's column statistics of a 2-D weight are replicated (`trl_bridge.engines.fsdp2`). A single
process holds everything (N = 1; DDP replicates it on every process).

Not in the plan: activations (they grow with micro-batch × sequence length; activation checkpointing keeps one layer's
inputs), the bf16 copies FSDP2's mixed precision all-gathers for the units in flight (about 2 bytes × two decoder
layers' parameters), CUDA's caching-allocator slack, and vLLM's share of the GPU with `vllm_mode: colocate`
(`vllm_gpu_memory_utilization`). `trl-bridge bench` measures the same state bytes on a real run (tested equal) and the
peak memory beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass

PARTS = ("θ", "θ grad", "θ optimizer", "θ̂", "θ̂ grad", "θ̂ optimizer", "w", "w grad", "w optimizer",
         "frozen weights", "KL reference")
GRADS = ("θ grad", "θ̂ grad", "w grad")
VARIANTS = ("grpo", "bridge", "bridge_lean", "bridge_bf16_delta")
TITLES = {"grpo": "GRPO", "bridge": "BRIDGE (shadow_storage: full)", "bridge_lean": "BRIDGE (shadow_storage: lean)",
          "bridge_bf16_delta": "BRIDGE (shadow_storage: bf16_delta)"}
BF16 = 2
STEP_BYTES = 4  # a float32 scalar per parameter tensor: torch optimizers' `step`, Adafactor's `RMS`
FP32 = 4


@dataclass(frozen=True)
class OptimizerStates:
    """Which states an optimizer keeps per parameter tensor (all created on the first step)."""

    full: int = 0  # tensors of the weight's shape, in the weight's dtype (AdamW moments, SGD momentum, ...)
    step: bool = False  # a float32 scalar (torch optimizers' `step`, Adafactor's `RMS`)
    factored: bool = False  # Adafactor: fp32 row + column statistics of a ≥2-D weight, one full statistic for 1-D
    first_moment: bool = False  # Adafactor with beta1: an fp32 tensor of the weight's shape


def optimizer_states(args, lean: bool = False) -> OptimizerStates:
    """The states of the optimizer `make_optimizer` builds for `args` (`lean`: θ̂'s with `shadow_storage="lean"`)."""
    import torch
    from transformers import Trainer
    from transformers.optimization import Adafactor

    if lean:  # LeanShadowOptimizer: Adafactor, beta1=None
        return OptimizerStates(factored=True, step=True)
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    kwargs = {k: v for k, v in kwargs.items() if k != "lr"}
    probe = torch.nn.Parameter(torch.zeros(1))
    defaults = cls([probe], lr=1e-3, **{k: v for k, v in kwargs.items() if k not in ("fused", "foreach")}).defaults
    if issubclass(cls, Adafactor):
        return OptimizerStates(factored=True, step=True, first_moment=defaults.get("beta1") is not None)
    if issubclass(cls, (torch.optim.Adam, torch.optim.AdamW)):
        return OptimizerStates(full=3 if defaults.get("amsgrad") else 2, step=True)
    if issubclass(cls, torch.optim.SGD):
        return OptimizerStates(full=1 if defaults.get("momentum", 0) else 0)
    if issubclass(cls, torch.optim.Adagrad):
        return OptimizerStates(full=1, step=True)
    if issubclass(cls, torch.optim.RMSprop):
        return OptimizerStates(full=1 + bool(defaults.get("momentum", 0)) + bool(defaults.get("centered")), step=True)
    raise ValueError(f"`optim`={args.optim!r} ({cls.__name__}): its state size is not known to `trl-bridge plan`.")


def shard_numel(shape, n: int, sharded: bool = True) -> int:
    """Elements rank 0 holds of a tensor of `shape` under FSDP2 over `n` processes (Shard(0), padded to ceil)."""
    if not shape or not sharded or n == 1:
        return math.prod(shape)
    return math.ceil(shape[0] / n) * math.prod(shape[1:])


def state_bytes(shape, dtype_bytes: int, states: OptimizerStates, n: int) -> int:
    """Bytes of one parameter tensor's optimizer state on rank 0."""
    total = states.full * shard_numel(shape, n) * dtype_bytes + (STEP_BYTES if states.step else 0)
    if states.first_moment:
        total += shard_numel(shape, n) * FP32
    if states.factored:
        if len(shape) >= 2:  # rows keep the sharded first dimension; columns drop the second-to-last (replicated for 2-D)
            total += shard_numel(shape[:-1], n) * FP32
            total += shard_numel(shape[:-2] + shape[-1:], n, sharded=len(shape) > 2) * FP32
        else:
            total += shard_numel(shape, n) * FP32
    return total


def _dtype(name):
    import torch

    if name in (None, "auto"):
        return None
    return name if isinstance(name, torch.dtype) else getattr(torch, str(name).replace("torch.", ""))


def build_meta_model(config, dtype):
    """The causal LM of `config` on the meta device (shapes and dtypes, no memory)."""
    import warnings

    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notices, not the user's
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def plan_bytes(config, args, load_dtype, num_processes: int = 1) -> dict:
    """Bytes per process (rank 0 under FSDP2 over `num_processes`) of each part of the training state, for GRPO and
    BRIDGE with each `shadow_storage`, plus the parameter counts. `config` is the model's `PretrainedConfig`, `args` a
    `BridgeConfig`, `load_dtype` the dtype the weights load in."""
    import warnings

    import torch
    from peft import get_peft_model

    from ..trainer import model_setup

    load_dtype = _dtype(load_dtype) or _dtype(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)) \
        or torch.float32
    n = num_processes
    model = build_meta_model(config, load_dtype)
    named = [(n_, p) for n_, p in model.named_parameters()]
    params = sum(p.numel() for _, p in named)
    half = load_dtype in (torch.float16, torch.bfloat16)

    def nbytes(tensors, dtype_bytes):
        return sum(shard_numel(tuple(p.shape), n) * dtype_bytes for p in tensors)

    def optim_bytes(tensors, dtype_bytes, states):
        return sum(state_bytes(tuple(p.shape), dtype_bytes, states, n) for p in tensors)

    load_bytes = torch.empty((), dtype=load_dtype).element_size()
    ref = nbytes([p for _, p in named], load_bytes) if args.beta != 0.0 else 0
    theta_grpo = [p for _, p in model_setup.select_base_params(model, args.trainable_base_parameters)]
    theta_ids = {id(p) for p in theta_grpo}
    frozen_grpo = [p for _, p in named if id(p) not in theta_ids]
    states = optimizer_states(args)
    grpo = {
        "θ": nbytes(theta_grpo, load_bytes), "θ grad": nbytes(theta_grpo, load_bytes),
        "θ optimizer": optim_bytes(theta_grpo, load_bytes, states),
        "frozen weights": nbytes(frozen_grpo, load_bytes), "KL reference": ref,
    }

    # BRIDGE: the adapter w as the trainer makes it (same checks, same PEFT call on the meta device), θ by the regexes
    grpo_only = args.lambda_is_always_one()
    if not grpo_only:
        peft_config = model_setup.adapter_config(args)
        model_setup.check_lora_targets(model, peft_config, field="lora_target_modules")
        with torch.device("meta"), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            model = get_peft_model(model, peft_config)
    theta = [p for _, p in model_setup.select_base_params(model, args.trainable_base_parameters)]
    theta_ids = {id(p) for p in theta}
    adapter = [p for n_, p in model.named_parameters() if "lora_" in n_]
    adapter_ids = {id(p) for p in adapter}
    frozen = [p for p in model.parameters() if id(p) not in theta_ids | adapter_ids]
    frozen_bytes = FP32 if half and not args.bf16 else load_bytes  # keep_fp32_master_weights upcasts all without bf16
    shadow = theta if args.bridge_meta_term and not grpo_only else []
    bridge = {
        "θ": nbytes(theta, FP32), "θ grad": nbytes(theta, FP32), "θ optimizer": optim_bytes(theta, FP32, states),
        "θ̂": nbytes(shadow, FP32), "θ̂ grad": nbytes(shadow, FP32),
        "θ̂ optimizer": optim_bytes(shadow, FP32, states),
        "w": nbytes(adapter, FP32), "w grad": nbytes(adapter, FP32), "w optimizer": optim_bytes(adapter, FP32, states),
        "frozen weights": nbytes(frozen, frozen_bytes), "KL reference": ref,
    }
    lean = dict(bridge, **{"θ̂ optimizer": optim_bytes(shadow, FP32, optimizer_states(args, lean=True))})
    delta = dict(lean, **{"θ̂": nbytes(shadow, BF16), "θ̂ grad": nbytes(shadow, BF16)})
    table = {}
    for name, parts in (("grpo", grpo), ("bridge", bridge), ("bridge_lean", lean), ("bridge_bf16_delta", delta)):
        parts = {k: parts.get(k, 0) for k in PARTS}
        parts["total"] = sum(parts.values())
        parts["without gradients"] = parts["total"] - sum(parts[k] for k in GRADS)
        if name == "bridge_bf16_delta" and args.gradient_accumulation_steps == 1 and parts["θ̂ grad"]:
            # θ steps right after pass A and releases its gradient before θ̂'s accumulates: never both at once
            parts["total"] -= min(parts["θ grad"], parts["θ̂ grad"])
        table[name] = parts
    return {
        "bytes": table,
        "parameters": {"model": params, "θ": sum(p.numel() for p in theta), "w": sum(p.numel() for p in adapter),
                       "frozen": sum(p.numel() for p in frozen)},
        "load_dtype": str(load_dtype).replace("torch.", ""),
        "frozen_dtype": "float32" if frozen_bytes == FP32 else str(load_dtype).replace("torch.", ""),
        "optim": str(getattr(args.optim, "value", args.optim)),
        "num_processes": n,
        "beta": args.beta,
    }


def format_plan(plan: dict, model: str) -> str:
    gib = 2**30
    c = plan["parameters"]
    n = plan["num_processes"]
    where = (f"per process, FSDP2 over {n} processes (each tensor sharded along its first dimension; rank 0's share)"
             if n > 1 else "one process (nothing sharded; DDP keeps this on every process)")
    lines = [
        f"{model}: {c['model'] / 1e9:.3f}B parameters; θ {c['θ'] / 1e9:.3f}B, w (LoRA) {c['w'] / 1e6:.2f}M, frozen "
        f"{c['frozen'] / 1e9:.3f}B; load dtype {plan['load_dtype']} (frozen weights kept in {plan['frozen_dtype']}), "
        f"optim {plan['optim']}, beta {plan['beta']:g}",
        f"GiB {where}; weights, gradients and optimizer states only",
        "",
        "| part | " + " | ".join(TITLES[v] for v in VARIANTS) + " |",
        "|---" * (len(VARIANTS) + 1) + "|",
    ]
    for part in (*PARTS, "total", "without gradients"):
        cells = " | ".join(f"{plan['bytes'][v][part] / gib:.3f}" for v in VARIANTS)
        label = f"**{part}**" if part == "total" else part
        lines.append(f"| {label} | {cells} |")
    lines += ["", "Not included: activations, FSDP2's bf16 all-gather buffers, allocator slack, vLLM's colocated share "
              "(see `trl-bridge plan --help`)."]
    return "\n".join(lines)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="trl-bridge plan",
        description="Bytes per process of θ, θ̂, w, their gradients and optimizer states, the frozen weights and the KL "
        "reference that a `trl-bridge train` config will hold, for GRPO and BRIDGE with each shadow_storage, from the "
        "model's config.json alone (built on the meta device: nothing is loaded or downloaded). Any other option "
        "(e.g. --model_name_or_path configs/model_configs/qwen2.5-3b) overrides the training config.",
        epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="a `trl-bridge train` YAML config (e.g. configs/qwen2.5-3b_math.yaml)")
    p.add_argument("--num_processes", type=int, default=1, help="FSDP2 processes the state is sharded over (default 1)")
    p.add_argument("--output", default=None, help="also write the plan (exact bytes) to this JSON file")
    return p


def main(argv=None) -> int:
    from transformers import AutoConfig

    from ..models import explain_model_load_errors, resolve_model_path
    from ..train_cli import make_parser as make_train_parser

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser()
    args, overrides = parser.parse_known_args(argv)
    if args.num_processes < 1:
        parser.error(f"--num_processes must be a positive integer, got {args.num_processes}")
    if not os.path.isfile(args.config):
        print(f"trl-bridge plan: error: --config {args.config!r} does not exist", file=sys.stderr)
        return 2
    if "--output_dir" not in overrides:
        overrides += ["--output_dir", os.devnull]  # nothing is written; the config's own may not exist here
    try:
        _, train_args, model_args = make_train_parser().parse_args_and_config(["--config", args.config, *overrides])
        name = model_args.model_name_or_path
        with explain_model_load_errors(name):
            config = AutoConfig.from_pretrained(resolve_model_path(name), revision=model_args.model_revision,
                                                trust_remote_code=train_args.trust_remote_code)
        dtype = (train_args.model_init_kwargs or {}).get("dtype") or model_args.dtype or "float32"
        plan = plan_bytes(config, train_args, dtype, args.num_processes)
    except (ValueError, OSError) as err:
        print(f"trl-bridge plan: error: {err}", file=sys.stderr)
        return 2
    print(format_plan(plan, name))
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump({"model": name, "config": args.config, "overrides": overrides, **plan}, f, indent=2,
                      ensure_ascii=False)
        print(f"\n[trl-bridge] wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
