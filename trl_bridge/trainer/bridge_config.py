"""`BridgeConfig`: TRL's `GRPOConfig` plus the few knobs BRIDGE adds (BRIDGE.md §1 and §5)."""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass, field

import torch

from ..compat import check_versions

check_versions()  # before importing trl: an untested trl fails here, naming the tested range

from trl import GRPOConfig  # noqa: E402

from .baselines import LUFFY_LOSS_TYPES, chord_mu  # noqa: E402

SHADOW_OFF_POLICY_MODES = ("on_policy", "truncated_is")
SHADOW_STORAGES = ("full", "lean", "bf16_delta")
# `optim` values that build one plain torch optimizer per parameter set, so θ, θ̂ and w each get their own (tested in
# tests/trainer/test_scale.py). The others are refused: GaLore/APOLLO need target modules of one model, LOMO/AdaLomo fuse the
# update into the backward (θ̂ and w are never in that backward's parameter list), schedule-free optimizers need
# train()/eval() switches the Trainer only makes for its own optimizer, bitsandbytes/torchao/XLA/NPU ones are untested.
SUPPORTED_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adagrad", "rmsprop")
# `lr_scheduler_type` values that act the same on the three optimizers (each follows θ's shape from its own peak lr).
# reduce_lr_on_plateau and greedy need an evaluation metric per step, which only the Trainer's own scheduler receives.
SUPPORTED_SCHEDULERS = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt",
    "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay",
)


def _accelerator_available() -> bool:
    accelerator = getattr(torch, "accelerator", None)
    return bool(accelerator.is_available()) if accelerator is not None else torch.cuda.is_available()


@dataclass
class BridgeConfig(GRPOConfig):
    r"""
    Configuration class for [`BridgeTrainer`].

    BRIDGE ("Beyond Two-Stage Training: Cooperative SFT and RL for LLM Reasoning", Chen et al., arXiv:2509.06948)
    trains three parameter sets at once on every step: the base weights θ on the fused loss
    `(1-λ)·L_SFT + λ·L_RL`, a shadow copy θ̂ of the base on `L_RL` alone (the RL-only baseline), and a LoRA adapter w
    on the *cooperative gain* `(1-λ)·L_SFT(θ,w) + λ·[L_RL(θ,w) - L_RL(θ̂,w)]`. The policy is π(θ+w).

    `BridgeConfig` inherits every parameter of [`~trl.GRPOConfig`] (rollouts, rewards, `loss_type`, `beta`, vLLM, ...)
    and documents only what BRIDGE adds or changes:

    Parameters:
        bridge_lambda (`float`, defaults to `0.5`): λ, the weight of RL against SFT. λ=1 is plain GRPO, λ=0 is SFT.
        bridge_lambda_end (`float` or `None`): if set, λ moves linearly from `bridge_lambda` to this value over
            `bridge_lambda_warmup_steps` optimizer steps (the paper suggests small-to-large λ).
        bridge_lambda_warmup_steps (`int`, defaults to `0`): length of the λ schedule.
        bridge_lambda_alternate (`bool`, defaults to `False`): λ = 1 on even optimizer steps and 0 on odd ones (an RL
            step, then an SFT step): the paper's naive alternating baseline (Algorithm 1). For comparisons only.
        adapter_learning_rate (`float` or `None`): β, the adapter's learning rate; defaults to `learning_rate`.
        shadow_learning_rate (`float` or `None`): learning rate of θ̂; defaults to `learning_rate` (α, as in the paper).
        lora_r / lora_alpha / lora_dropout / lora_target_modules / lora_layers_to_transform: the adapter w (paper:
            r=16, α=16). Ignored when a `peft_config` is passed to the trainer.
        trainable_base_parameters (`list[str]` or `None`): regular expressions selecting the base weights θ that train
            (matched with `re.search` against the plain model's parameter names, e.g. `model.layers.0.mlp.up_proj.weight`).
            `None` trains all of them. The shadow copies only these.
        sft_per_device_train_batch_size (`int`, defaults to `4`): expert traces per micro-batch.
        sft_max_length (`int` or `None`, defaults to `1024`): SFT sequences are truncated to this many tokens.
        shadow_off_policy (`str`, defaults to `"on_policy"`): how the shadow θ̂ treats rollouts sampled from π(θ+w)
            (BRIDGE.md §5): `"on_policy"` uses them as if sampled from π(θ̂+w); `"truncated_is"` re-weights each token by
            min(π(θ̂+w)/π(θ+w), `shadow_is_cap`).
        shadow_is_cap (`float`, defaults to `2.0`): the truncation C of `"truncated_is"`.
        shadow_storage (`str`, defaults to `"full"`): `"lean"` trains θ̂ with momentum-free, factored Adafactor
            (half of θ̂'s memory; see README "Cost"). `"bf16_delta"` also stores θ̂ as a bf16 delta from θ (θ̂ = θ + d,
            ~2 bytes per trainable parameter; docs/cost.md has its measured drift from the full shadow).
        shadow_fraction (`float`, defaults to `1.0`): the shadow pass runs on this fraction of each generation
            batch's prompt groups (a seeded random subset of whole groups, at least one), its θ̂ and w gradients
            rescaled to be unbiased for the full pass. An extension beyond the paper (cheaper pass B, noisier θ̂).
        bridge_meta_term (`bool`, defaults to `True`): `False` is the paper's "w/o J_meta" ablation (naive mixing).
        chord_mu_peak / chord_mu_valley / chord_mu_warmup_steps / chord_mu_decay_steps / chord_phi: CHORD (Zhang et al.,
            arXiv:2508.11408), a baseline: λ = 1 − μ(step) with μ warmed up to the peak then cosine-decayed to the
            valley, and (`chord_phi`) each expert token's NLL weighted by φ(p) = p(1−p). Follows Trinity-RFT's
            `mix_chord` (`mu_schedule_function`, `SFTPhiLossFn`). Refused with `bridge_lambda_end` or alternation.
        luffy / luffy_gamma: LUFFY (Yan et al., arXiv:2504.14945), a baseline: mixed-policy GRPO, the last rollout of
            each group replaced by the prompt's expert trace, advantages over the union, the expert tokens' loss
            −Â·f(π) with f(x) = x/(x+γ), the expert probability taken as 1, unclipped (LUFFY's verl `mix_src`,
            `off_policy_reshape="p_div_p_0.1"`). Refused with vLLM generation, the shadow pass, loss types other than
            grpo/bnpo/dr_grpo/dapo, and `num_generations` < 2. See `trl_bridge.trainer.baselines`.
        max_consecutive_skipped_steps (`int`, defaults to `5`): a step with a NaN/inf loss or gradient is skipped for
            θ, θ̂ and w together (logged as `bridge/skipped_steps`); more than this many in a row stop training.
        overwrite_output_dir (`bool`, defaults to `False`): allow a new run in an `output_dir` that holds another one
            (transformers 5 dropped the field; BRIDGE refuses such an `output_dir` without it or a resume).

    Checkpoints are written atomically, also hold GRPOTrainer's buffered rollouts (resume is exact mid-generation), and
    SIGINT/SIGTERM end training with a final checkpoint; `save_only_model=True` is refused.

    Precision and engines: θ and θ̂ always keep fp32 master weights (a half-precision model gets its trainable weights
    upcast; `bf16=True` then computes in bf16 under autocast). `fp16`, DeepSpeed and FSDP1 are refused; FSDP2 (through
    accelerate) is the multi-GPU engine. `optim` and `lr_scheduler_type` accept the values in `SUPPORTED_OPTIMIZERS` and
    `SUPPORTED_SCHEDULERS`; an absolute `min_lr` in `lr_scheduler_kwargs` becomes the relative `min_lr_rate`, so each
    of the three schedules ends at the same fraction of its own peak.

    CPU-friendly defaults: activation (gradient) checkpointing and `bf16` default to on only when CUDA is available (TRL
    turns both on unconditionally; on CPU they are slow or unsupported), and `dataloader_pin_memory` only when an
    accelerator is present (pinning on a CPU-only machine only produces a warning).
    """

    # Defaults that differ from GRPOConfig: resolved in __post_init__ by the hardware present.
    if "activation_checkpointing" not in {f.name for f in dataclasses.fields(GRPOConfig)}:
        # transformers < 5.20 names it `gradient_checkpointing` only: accept the current name too, so one config file
        # works across the supported transformers range.
        activation_checkpointing: bool | None = field(
            default=None,
            metadata={"help": "Checkpoint activations (recompute them in backward to save memory). Unset: True on CUDA, "
                      "False on CPU. (transformers < 5.20 calls it `gradient_checkpointing`; either name works.)"},
        )
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "Deprecated alias of `activation_checkpointing` (transformers). Unset: `activation_checkpointing` "
                  "defaults to True on CUDA and False on CPU."},
    )
    dataloader_pin_memory: bool | None = field(
        default=None,
        metadata={"help": "Pin host memory in the data loaders. Defaults to True when an accelerator is present, else False."},
    )

    bridge_lambda: float = field(
        default=0.5,
        metadata={
            "help": "λ in [0, 1]: the weight of the RL loss against the SFT loss in the fused base update and the "
            "adapter update. 1.0 reproduces GRPO, 0.0 is SFT. Paper: 0.5 (0.3-0.7 robust)."
        },
    )
    bridge_lambda_end: float | None = field(
        default=None,
        metadata={
            "help": "If set, λ is scheduled linearly from `bridge_lambda` to this value over "
            "`bridge_lambda_warmup_steps` optimizer steps, then held."
        },
    )
    bridge_lambda_warmup_steps: int = field(
        default=0, metadata={"help": "Number of optimizer steps of the λ schedule (0: no schedule)."}
    )
    bridge_lambda_alternate: bool = field(
        default=False,
        metadata={
            "help": "Alternate λ = 1 (an RL step) and λ = 0 (an SFT step) on successive optimizer steps, starting with "
            "RL: the paper's naive alternating baseline (Algorithm 1). Replaces `bridge_lambda`. For comparisons only."
        },
    )
    adapter_learning_rate: float | None = field(
        default=None,
        metadata={"help": "β: learning rate of the LoRA adapter w. Defaults to `learning_rate`."},
    )
    shadow_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Learning rate of the RL-only shadow θ̂. Defaults to `learning_rate` (α, as in the paper)."},
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank of the adapter w (paper: 16)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha of the adapter w (paper: 16)."})
    lora_dropout: float = field(
        default=0.0,
        metadata={"help": "LoRA dropout. 0 keeps BRIDGE(λ=1) bit-identical to GRPO (dropout consumes the RNG)."},
    )
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Module names LoRA wraps (PEFT's `target_modules`). None: PEFT's default for the model type."},
    )
    lora_layers_to_transform: list[int] | None = field(
        default=None,
        metadata={
            "help": "Layer indices LoRA is applied to (PEFT's `layers_to_transform`). None: all layers. With a "
            "`trainable_base_parameters` subset of the same top layers, backward stops there (cheap on CPU)."
        },
    )
    trainable_base_parameters: list[str] | None = field(
        default=None,
        metadata={
            "help": "Regular expressions (re.search) over the plain model's parameter names selecting the trainable "
            "base weights θ; the shadow θ̂ copies only these. None: all base weights train."
        },
    )
    sft_per_device_train_batch_size: int = field(
        default=4, metadata={"help": "Number of expert traces in each SFT micro-batch (per device)."}
    )
    sft_max_length: int | None = field(
        default=1024, metadata={"help": "Maximum length in tokens of an SFT sequence (prompt + trace); longer ones are truncated."}
    )
    shadow_fraction: float = field(
        default=1.0,
        metadata={
            "help": "Fraction of each generation batch's prompt groups the shadow pass (L_RL(θ̂,w), pass B) runs on: a "
            "seeded random subset of whole groups (at least one), drawn when the rollouts are generated (so it resumes "
            "exactly), with θ̂'s and w's pass-B gradients rescaled to be unbiased for the full pass. 1.0 (default, the "
            "paper): every rollout. An extension beyond the paper that trades variance for the cost of pass B; Adam's "
            "update is not linear in the gradient, so θ̂'s trajectory is not the full pass's in expectation. Supports "
            "the loss types whose normalisation is per row or per token (grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo, "
            "vespo) and top_entropy_quantile = 1."
        },
    )
    shadow_off_policy: str = field(
        default="on_policy",
        metadata={
            "help": "How the RL-only shadow θ̂ uses rollouts sampled from π(θ+w): 'on_policy' (as if sampled from "
            "π(θ̂+w)) or 'truncated_is' (each token re-weighted by min(π(θ̂+w)/π(θ+w), shadow_is_cap)). The default "
            "is the cheaper one; both gave the same result in `python -m trl_bridge.experiments.compare` (see README).",
            "choices": list(SHADOW_OFF_POLICY_MODES),
        },
    )
    shadow_storage: str = field(
        default="full",
        metadata={
            "help": "'full': θ̂ is trained with the same optimizer as θ (AdamW: θ̂ costs its weights, gradients and two "
            "moments, 16 bytes per trainable parameter). 'lean': θ̂ keeps fp32 weights but its optimizer is Adafactor "
            "without momentum (factored second moment, ~0 bytes of state): 8 bytes per trainable parameter. "
            "'bf16_delta': that optimizer, and θ̂ stored as a bfloat16 delta from θ (θ̂ = θ + d, stochastically rounded): "
            "~2 bytes per trainable parameter between steps. Measured cost and effect on training: README, 'Cost', and "
            "docs/cost.md.",
            "choices": list(SHADOW_STORAGES),
        },
    )
    share_frozen_activations: bool = field(
        default=True,
        metadata={
            "help": "When every trainable weight (θ and w) sits in decoder layer L or above, the shadow pass reuses the "
            "fused pass's output of layer L−1 on the same rollouts instead of recomputing the frozen layers (exact; "
            "single process and DDP). False recomputes them."
        },
    )
    bridge_meta_term: bool = field(
        default=True,
        metadata={
            "help": "False runs the paper's 'w/o J_meta' ablation: no shadow pass, so θ and w both follow the naive "
            "mixed loss (1-λ)·L_SFT + λ·L_RL. For comparisons only."
        },
    )
    shadow_is_cap: float = field(
        default=2.0, metadata={"help": "Truncation cap C of the 'truncated_is' shadow importance weights."}
    )
    chord_mu_peak: float | None = field(
        default=None,
        metadata={
            "help": "CHORD (arXiv 2508.11408), a baseline: L = (1−μ)·L_RL + μ·L_SFT with μ warmed up linearly from 0 to "
            "this peak over `chord_mu_warmup_steps`, then decayed along a half cosine to `chord_mu_valley` over "
            "`chord_mu_decay_steps` (λ = 1 − μ replaces `bridge_lambda`). None (default): off. `trl-bridge compare`'s "
            "`chord` method runs it on θ without adapter and shadow."
        },
    )
    chord_mu_valley: float = field(default=0.05, metadata={"help": "CHORD: μ after the decay (Trinity-RFT's example: 0.05)."})
    chord_mu_warmup_steps: int = field(default=0, metadata={"help": "CHORD: optimizer steps of μ's linear warm-up."})
    chord_mu_decay_steps: int | None = field(
        default=None, metadata={"help": "CHORD: optimizer steps of μ's cosine decay (None: the rest of `max_steps`)."}
    )
    chord_phi: bool = field(
        default=False,
        metadata={
            "help": "CHORD-φ: weigh each expert token's NLL in L_SFT by φ(p) = p(1−p) (p the policy's probability of "
            "the token, detached), a token-mean over the batch."
        },
    )
    luffy: bool = field(
        default=False,
        metadata={
            "help": "LUFFY (arXiv 2504.14945), a baseline: mixed-policy GRPO. The last rollout of each prompt's group is "
            "replaced by the prompt's expert trace (from `sft_dataset`, matched by prompt), rewarded, and advantages are "
            "computed over the union; its tokens take the loss −Â·f(π) with f(x) = x/(x+γ) (γ = `luffy_gamma`), "
            "unclipped. Runs without the shadow (λ = 1 throughout, or `bridge_meta_term: false`); "
            "`trl-bridge compare`'s `luffy` method runs it as RL on θ."
        },
    )
    luffy_gamma: float = field(default=0.1, metadata={"help": "LUFFY: γ of the policy shaping f(x) = x/(x+γ) (paper: 0.1)."})
    max_consecutive_skipped_steps: int = field(
        default=5,
        metadata={
            "help": "A step whose loss or gradient (of θ, θ̂ or w) holds NaN/inf is skipped for all three parameter "
            "sets and counted in `bridge/skipped_steps`; more than this many such steps in a row stop training with an "
            "error (0: stop at the first)."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start a new run in an `output_dir` that already holds one (its checkpoints are removed). Without "
            "it, such an `output_dir` is refused unless `resume_from_checkpoint` is given."
        },
    )

    def __post_init__(self):
        self._refuse_engines()
        if not self.use_cpu and os.environ.get("ACCELERATE_USE_CPU", "").strip().lower() in ("1", "true", "yes", "on"):
            # `accelerate launch --cpu`: accelerate runs on the CPU, so the Trainer must place the model there too (it
            # reads only `use_cpu`, and would put the model on a visible GPU: a device mismatch at the first step)
            self.use_cpu = True
        has_cuda = torch.cuda.is_available() and not self.use_cpu
        # Resolve the CPU-friendly default through the current name: setting the deprecated `gradient_checkpointing`
        # here would make transformers print its deprecation warning on every run.
        if "activation_checkpointing" not in {f.name for f in dataclasses.fields(GRPOConfig)}:
            # transformers < 5.20: the Trainer reads `gradient_checkpointing`; `activation_checkpointing` is our alias
            if self.gradient_checkpointing is None:
                self.gradient_checkpointing = has_cuda if self.activation_checkpointing is None else self.activation_checkpointing
            self.activation_checkpointing = self.gradient_checkpointing
        elif self.gradient_checkpointing is None and self.activation_checkpointing is None:
            self.activation_checkpointing = has_cuda
        if self.dataloader_pin_memory is None:
            self.dataloader_pin_memory = _accelerator_available() and not self.use_cpu
        if self.bf16 is None and not self.fp16 and not has_cuda:
            self.bf16 = False
        generation_batch_size_given = self.generation_batch_size is not None
        try:
            super().__post_init__()
        except ValueError as err:
            if "must be divisible by num_generations" not in str(err):
                raise
            # GRPOConfig names the derived generation_batch_size; name what the user sets instead.
            name = "generation_batch_size" if generation_batch_size_given else "per_device_train_batch_size"
            raise ValueError(
                f"BridgeConfig.{name}={getattr(self, name)!r} is invalid: a generation batch (per_device_train_batch_size "
                f"× processes × steps_per_generation = {self.generation_batch_size}) must hold whole groups of "
                f"num_generations={self.num_generations} completions of one prompt. Make it a multiple of "
                f"{self.num_generations}."
            ) from err
        self._refuse_processes_training_alone()
        if self.adapter_learning_rate is None:
            self.adapter_learning_rate = self.learning_rate
        if self.shadow_learning_rate is None:
            self.shadow_learning_rate = self.learning_rate
        self._validate()
        kwargs = self.lr_scheduler_kwargs
        if isinstance(kwargs, dict) and kwargs.get("min_lr") is not None:
            # An absolute floor would be the same number for θ (lr α), θ̂ and w (lr β): with β < min_lr, w's lr would
            # *rise* to the floor. Express it relative to each optimizer's own peak instead.
            kwargs = dict(kwargs)
            min_lr = kwargs.pop("min_lr")
            kwargs["min_lr_rate"] = min_lr / self.learning_rate if self.learning_rate > 0 else 0.0
            self.lr_scheduler_kwargs = kwargs

    def _refuse_processes_training_alone(self):
        """Launched as several processes (torchrun, accelerate launch) that the Trainer does not run as one job: on a
        machine without a GPU and without `use_cpu`, transformers initialises the process group but trains every
        process alone, each writing the same `output_dir`. Refused instead of training wrongly in silence."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 and self.world_size == 1:
            self._need(
                False, "use_cpu",
                f"{dist.get_world_size()} processes were launched, but the Trainer would train each of them alone "
                "(no GPU for it to distribute over): on CPU set `use_cpu: true` and `ddp_backend: gloo` "
                "(`--use_cpu true --ddp_backend gloo`), or launch one process",
            )

    def _need(self, ok, name, what):
        if not ok:
            raise ValueError(f"BridgeConfig.{name}={getattr(self, name)!r} is invalid: {what}.")

    def _refuse_engines(self):
        """Checked before GRPOConfig's own checks, which would otherwise report e.g. fp16-on-CPU first."""
        self._need(
            not self.fp16, "fp16",
            "BRIDGE does not support fp16: θ̂ and w have their own optimizers, outside the fp16 loss scaler, so they "
            "would step on loss-scaled gradients and on the overflow steps that θ skips. Use bf16=True (fp32 master "
            "weights, bf16 autocast) or full precision",
        )
        self._need(
            not self.deepspeed, "deepspeed",
            "DeepSpeed is not supported: its engine steps θ inside backward() (BRIDGE's shadow pass would step θ "
            "again) and never reduces θ̂'s and w's gradients. Use FSDP2 through accelerate "
            "(`accelerate launch --config_file configs/accelerate/fsdp2.yaml`)",
        )
        opt = getattr(self.optim, "value", self.optim)
        self._need(
            opt in SUPPORTED_OPTIMIZERS, "optim",
            f"BRIDGE builds the same optimizer for θ, θ̂ and w; supported: {SUPPORTED_OPTIMIZERS}",
        )
        self._need(
            not self.optim_target_modules, "optim_target_modules",
            "GaLore/APOLLO-style target modules are not supported by BRIDGE (θ̂ is not a module of the model)",
        )
        sched = getattr(self.lr_scheduler_type, "value", self.lr_scheduler_type)
        self._need(
            sched in SUPPORTED_SCHEDULERS, "lr_scheduler_type",
            f"θ̂ and w follow θ's schedule from their own peak lr, which needs a metric-free schedule; supported: "
            f"{SUPPORTED_SCHEDULERS}",
        )

    def _validate(self):
        need = self._need

        need(0.0 <= self.bridge_lambda <= 1.0, "bridge_lambda", "must lie in [0, 1]")
        need(self.bridge_lambda_end is None or 0.0 <= self.bridge_lambda_end <= 1.0, "bridge_lambda_end", "must lie in [0, 1]")
        need(self.bridge_lambda_warmup_steps >= 0, "bridge_lambda_warmup_steps", "must be >= 0")
        need(
            not (self.bridge_lambda_alternate and self.bridge_lambda_end is not None), "bridge_lambda_end",
            "cannot be combined with bridge_lambda_alternate=True (λ alternates between 1 and 0); unset one of them",
        )
        need(self.adapter_learning_rate >= 0, "adapter_learning_rate", "must be >= 0")
        need(self.shadow_learning_rate >= 0, "shadow_learning_rate", "must be >= 0")
        need(self.lora_r > 0, "lora_r", "must be a positive integer")
        need(self.lora_alpha > 0, "lora_alpha", "must be positive")
        need(0.0 <= self.lora_dropout < 1.0, "lora_dropout", "must lie in [0, 1)")
        need(self.sft_per_device_train_batch_size > 0, "sft_per_device_train_batch_size", "must be a positive integer")
        need(self.sft_max_length is None or self.sft_max_length > 0, "sft_max_length", "must be positive or None")
        need(self.shadow_off_policy in SHADOW_OFF_POLICY_MODES, "shadow_off_policy", f"choose one of {SHADOW_OFF_POLICY_MODES}")
        need(self.shadow_is_cap >= 1.0, "shadow_is_cap", "must be >= 1")
        need(self.shadow_storage in SHADOW_STORAGES, "shadow_storage", f"choose one of {SHADOW_STORAGES}")
        need(0.0 < self.shadow_fraction <= 1.0, "shadow_fraction", "must lie in (0, 1]")
        need(
            self.shadow_fraction == 1.0 or self.top_entropy_quantile == 1.0, "shadow_fraction",
            "a subset shadow pass cannot be rescaled to the full one when top_entropy_quantile < 1 (the entropy mask is a "
            "quantile over the whole batch); use shadow_fraction=1.0 or top_entropy_quantile=1.0",
        )
        need(self.max_consecutive_skipped_steps >= 0, "max_consecutive_skipped_steps", "must be >= 0")
        self._validate_baselines()
        need(
            not self.save_only_model, "save_only_model",
            "BRIDGE checkpoints must hold θ, θ̂, w, their optimizers and the buffered rollouts to resume; a model-only "
            "checkpoint holds the merged policy π(θ+w) alone and could not resume BRIDGE. Leave it False (to keep only "
            "the final model, use save_strategy='no' and `trainer.save_model()`, which trl-bridge train calls at the end)",
        )
        fsdp_version = (self.fsdp_config or {}).get("version", (self.fsdp_config or {}).get("fsdp_version", 1))
        need(
            not self.fsdp or int(fsdp_version) == 2, "fsdp",
            "FSDP1 is not supported (TRL's fused LM head reads the flattened shard of lm_head.weight). Use FSDP2: "
            "fsdp_config={'version': 2} or `accelerate launch --config_file configs/accelerate/fsdp2.yaml`",
        )

    def _validate_baselines(self):
        need = self._need
        if self.chord_mu_peak is not None:
            need(0.0 <= self.chord_mu_peak <= 1.0, "chord_mu_peak", "must lie in [0, 1] (μ is the weight of L_SFT)")
            need(0.0 <= self.chord_mu_valley <= 1.0, "chord_mu_valley", "must lie in [0, 1]")
            need(self.chord_mu_warmup_steps >= 0, "chord_mu_warmup_steps", "must be >= 0")
            need(self.chord_mu_decay_steps is None or self.chord_mu_decay_steps >= 1, "chord_mu_decay_steps",
                 "must be >= 1 or None")
            scheduled = self.bridge_lambda_end is not None and self.bridge_lambda_warmup_steps > 0
            need(not scheduled and not self.bridge_lambda_alternate, "chord_mu_peak",
                 "CHORD's μ schedule sets λ = 1 − μ at every step: unset the λ schedule (bridge_lambda_end with "
                 "bridge_lambda_warmup_steps > 0) and bridge_lambda_alternate")
        need(self.luffy_gamma > 0, "luffy_gamma", "must be > 0")
        if self.luffy:
            need(not self.use_vllm, "luffy",
                 "LUFFY with use_vllm is not supported: the expert trace replaces a rollout whose vLLM sampling "
                 "log-probs (TRL's importance-sampling correction) belong to other tokens. Generate with transformers "
                 "(use_vllm: false)")
            need(self.loss_type in LUFFY_LOSS_TYPES, "loss_type",
                 f"LUFFY's off-policy term is built on the surrogate −Â·ratio of the loss types {LUFFY_LOSS_TYPES}")
            need(self.num_generations >= 2, "num_generations",
                 "LUFFY replaces one rollout of each group by the expert trace and needs at least one on-policy rollout")
            need(self.lambda_is_always_one() or not self.bridge_meta_term, "luffy",
                 "LUFFY is a baseline on one policy: the shadow's pass (bridge_meta_term) would re-weight the expert "
                 "tokens with θ's probabilities, not θ̂'s. Use bridge_lambda: 1 (LUFFY as RL) or bridge_meta_term: false")
            need(self.chord_mu_peak is None, "luffy", "cannot be combined with CHORD's μ schedule (chord_mu_peak)")

    def lambda_is_always_one(self) -> bool:
        """λ = 1 at every step of the run: BRIDGE is then GRPO exactly (no SFT term, a shadow that equals θ, an adapter
        whose gradient is zero), so BridgeTrainer runs GRPO alone, at GRPO's cost."""
        if self.bridge_lambda != 1.0 or self.chord_mu_peak is not None:
            return False
        return self.bridge_lambda_end is None or self.bridge_lambda_warmup_steps <= 0 or self.bridge_lambda_end == 1.0

    @classmethod
    def from_grpo_config(cls, grpo_args: GRPOConfig) -> "BridgeConfig":
        """A BridgeConfig with every GRPOConfig field as `grpo_args` has it (what GRPOTrainer would have used) and
        BRIDGE's own fields (`bridge_lambda`, `lora_r`, `sft_*`, ...) at their defaults. Warns with those defaults."""
        grpo_fields = [f.name for f in dataclasses.fields(GRPOConfig) if f.init]
        values = {name: getattr(grpo_args, name) for name in grpo_fields}
        # GRPOConfig.__post_init__ derived one of these from the other; passing both is an error, so pass one.
        values.pop("generation_batch_size")
        bridge_args = cls(**values)
        defaults = {f.name: getattr(bridge_args, f.name) for f in dataclasses.fields(cls) if f.name not in values}
        defaults.pop("generation_batch_size", None)
        warnings.warn(
            "`args` is a GRPOConfig: BridgeTrainer upgraded it to a BridgeConfig that keeps every GRPOConfig value and "
            "uses BRIDGE's defaults for the rest (" + ", ".join(f"{k}={v!r}" for k, v in defaults.items()) + "). Pass "
            "a BridgeConfig to choose them (`bridge_lambda` weighs RL against SFT).",
            UserWarning,
            stacklevel=3,
        )
        return bridge_args

    def lambda_at(self, step: int) -> float:
        """λ at optimizer step `step`: constant, linear from `bridge_lambda` to `bridge_lambda_end`, or alternating
        1 (RL) / 0 (SFT) with `bridge_lambda_alternate`."""
        if self.chord_mu_peak is not None:  # CHORD: λ = 1 − μ(step)
            decay = self.chord_mu_decay_steps
            if decay is None:
                decay = max(1, self.max_steps - self.chord_mu_warmup_steps) if self.max_steps > 0 else 1
            return 1.0 - chord_mu(step, self.chord_mu_peak, self.chord_mu_valley, self.chord_mu_warmup_steps, decay)
        if self.bridge_lambda_alternate:
            return 1.0 if step % 2 == 0 else 0.0
        if self.bridge_lambda_end is None or self.bridge_lambda_warmup_steps <= 0:
            return self.bridge_lambda
        frac = min(1.0, step / self.bridge_lambda_warmup_steps)
        return self.bridge_lambda + frac * (self.bridge_lambda_end - self.bridge_lambda)
