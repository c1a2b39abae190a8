"""BRIDGE on top of TRL's GRPOTrainer: one file, read top to bottom against BRIDGE.md §3.

    θ  — the base weights (all, or `trainable_base_parameters`); trained by the Trainer's own optimizer.
    w  — the LoRA adapter (PEFT); the policy is π(θ+w).
    θ̂  — the RL-only shadow: a persistent copy of the trainable base weights, initialised to θ⁰.

One meta-step (Algorithm 2), all gradients at iterate k:
  1. GRPOTrainer samples rollouts once from π(θ+w), scores them and computes group advantages (unchanged).
  2. fused base update    θ ← θ − α [(1−λ) ∇θ L_SFT(θ,w) + λ ∇θ L_RL(θ,w)]
  3. shadow update        θ̂ ← θ̂ − α ∇θ̂ L_RL(θ̂,w)                     (same rollouts)
  4. adapter update       w ← w − β [(1−λ) ∇w L_SFT(θ,w) + λ (∇w L_RL(θ,w) − ∇w L_RL(θ̂,w))]

How the gradients are routed (ordinary forward+backward pairs through the wrapped model, so DDP all-reduces and FSDP2
reduce-scatters each parameter once per backward, and gradient checkpointing recomputes with the right weights):
  * pass A (`compute_loss`): the gradient of (1−λ) L_SFT(θ,w) + λ L_RL(θ,w), as an SFT forward+backward followed by
    an RL forward whose backward the Trainer runs. Fills θ.grad (step 2) and the first two terms of w.grad (step 4).
  * pass B (`_shadow_backward`): θ̂ is swapped into the base parameters' storage (and θ's accumulated gradients are
    set aside), L_RL(θ̂,w) is computed with TRL's own `_compute_loss` on the same rollouts and backpropagated: the
    base parameters receive ∇θ̂ L_RL (step 3); w's new gradient is scaled by −λ and added to w.grad (last term of
    step 4). Then the weights and gradients are swapped back.
  * `BridgeCallback.on_pre_optimizer_step` (between the fused base steps) clips and applies the θ̂ and w updates
    with their own optimizers and learning-rate schedules; the Trainer then applies the θ update (its optimizer holds
    θ only).

θ, θ̂ and w are fp32 master weights (bf16 only as compute). Under FSDP2 all three are sharded alike
(`_bind_sharded_params`); DeepSpeed, FSDP1 and fp16 are refused.
"""

from __future__ import annotations

import copy
import os
import re
from contextlib import contextmanager

import torch
from accelerate.utils import is_peft_model
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor
from datasets import Dataset, IterableDataset
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback, get_scheduler
from transformers.utils import logging
from transformers.trainer import TRAINING_ARGS_NAME
from trl import GRPOTrainer
from trl.data_utils import is_conversational
from trl.trainer.utils import add_fused_lm_head, create_model_from_path, disable_dropout_in_model

from .bridge_config import BridgeConfig
from .data import validate_rl_dataset, validate_sft_dataset
from .export import check_exportable, plain_name, save_merged_model
from .sft_stream import SFTStream, tokenize_sft_dataset

logger = logging.get_logger(__name__)

BRIDGE_STATE_FILE = "bridge_state.safetensors"
BRIDGE_OPTIM_FILE = "bridge_optimizers.pt"


class BridgeCallback(TrainerCallback):
    """Runs the shadow (§3.3) and adapter (§3.4) updates between the fused base-model steps (§3.2)."""

    def __init__(self, trainer: "BridgeTrainer"):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._apply_shadow_and_adapter_updates()


class BridgeTrainer(GRPOTrainer):
    """
    Trainer for BRIDGE (Chen et al., "Beyond Two-Stage Training: Cooperative SFT and RL for LLM Reasoning",
    arXiv:2509.06948): cooperative SFT + RL with a fused base θ, an RL-only shadow θ̂ and a LoRA adapter w trained on
    the cooperative gain.

    A drop-in replacement for [`~trl.GRPOTrainer`] that takes one more dataset, `sft_dataset` (expert reasoning traces
    in any TRL SFT format). Rollout generation, reward computation and advantages are GRPOTrainer's, unchanged. The
    overrides, each for one reason:
      * `__init__`: wraps the model in the LoRA adapter w, unfreezes θ (fp32 master weights), creates θ̂ and the SFT
        stream, and (when `beta > 0`) keeps a frozen copy of the initial policy as the KL reference so it does not move
        with θ. Refuses engines and adapter options BRIDGE cannot honour.
      * `compute_loss` / `training_step`: pass A (fused loss) and pass B (shadow loss) of the module docstring.
      * `create_optimizer`, `create_scheduler`, `_clip_grad_norm`, `_get_grad_norm`: the Trainer's optimizer and
        clipping act on θ alone; θ̂ and w get their own optimizers, schedules and clipping (in `BridgeCallback`);
        under FSDP2, `create_scheduler` (after `prepare`) re-binds θ and w to the sharded parameters and shards θ̂.
      * `_calculate_rewards`, `_generate_and_score_completions`, `_get_per_token_logps_and_entropies`: keep each
        rollout's reward and the log-probs of both passes (for the cooperative-gain estimate), and the shadow's own
        sampling-time log-probs when GRPOTrainer keeps old log-probs or `shadow_off_policy="truncated_is"`.
      * `train`: probes every reward function once on the first RL row, so a broken one fails before step 1.
      * `_save`, `_save_optimizer_and_scheduler`, `_load_from_checkpoint`, `_load_optimizer_and_scheduler`: the merged
        π(θ+w) export, and engine-independent checkpoints (full tensors) holding θ, θ̂, w, the three optimizers' and
        schedules' states and the SFT stream position.
      * `create_model_card`: a card that names BRIDGE, the base model, data, hyper-parameters and final metrics.
    """

    _tag_names = ["trl", "bridge", "grpo"]
    card_base_model: str | None = None  # what the model card names as base model / datasets / results (set by the CLI)
    card_datasets: list[str] | None = None
    card_eval_results: dict | None = None
    _name = "BRIDGE"
    _paper = {"title": "Beyond Two-Stage Training: Cooperative SFT and RL for LLM Reasoning", "id": "2509.06948"}

    def __init__(
        self,
        model,
        reward_funcs=None,
        args: BridgeConfig | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        sft_dataset: Dataset | None = None,
        eval_dataset=None,
        processing_class=None,
        reward_processing_classes=None,
        callbacks=None,
        optimizers=(None, None),
        peft_config=None,
        **kwargs,
    ):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = BridgeConfig(f"{str(name).split('/')[-1]}-BRIDGE")
        if not isinstance(args, BridgeConfig):
            raise TypeError(f"`args` must be a BridgeConfig (it extends GRPOConfig), got {type(args).__name__}.")
        if optimizers != (None, None):
            raise ValueError("`optimizers` is not supported: BRIDGE builds one optimizer per parameter set (θ, θ̂, w).")
        if train_dataset is None:
            raise ValueError("`train_dataset` (the RL prompts) is required.")
        if isinstance(train_dataset, Dataset):
            validate_rl_dataset(train_dataset, name="`train_dataset` (RL prompts)")
        if sft_dataset is None:
            raise ValueError("`sft_dataset` is required: BRIDGE needs expert reasoning traces for L_SFT.")
        validate_sft_dataset(sft_dataset, name="`sft_dataset` (expert traces)")
        if isinstance(model, str):
            init_kwargs = dict(args.model_init_kwargs or {})
            init_kwargs.setdefault("trust_remote_code", args.trust_remote_code)
            model = create_model_from_path(model, **init_kwargs)
            args.model_init_kwargs = None  # consumed here; GRPOTrainer would warn that an instance ignores them
        if is_peft_model(model):
            raise ValueError(
                "Pass a plain (non-PEFT) model: BRIDGE trains the base weights and creates the adapter w itself "
                "(configure it with `lora_*` fields or `peft_config`)."
            )
        # KL reference (beta > 0): the initial policy π(θ⁰+w⁰) = π(θ⁰) (LoRA B starts at zero), frozen. TRL's PEFT
        # default (adapter disabled) would be π(θ), which moves as the base trains.
        ref_model = copy.deepcopy(model).eval().requires_grad_(False) if args.beta != 0.0 else None
        if peft_config is None:
            peft_config = LoraConfig(
                r=args.lora_r,
                lora_alpha=args.lora_alpha,
                lora_dropout=args.lora_dropout,
                target_modules=args.lora_target_modules,
                layers_to_transform=args.lora_layers_to_transform,
                task_type="CAUSAL_LM",
            )
        for field in ("modules_to_save", "trainable_token_indices"):
            if getattr(peft_config, field, None):
                raise ValueError(
                    f"`peft_config.{field}` is not supported by BridgeTrainer: BRIDGE trains the base weights θ in full "
                    "(select them with `trainable_base_parameters`), so a second trainable copy inside the adapter w "
                    "would have no shadow and no defined update. Leave it unset."
                )
        super().__init__(
            model=model,
            reward_funcs=reward_funcs,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            reward_processing_classes=reward_processing_classes,
            callbacks=callbacks,
            peft_config=peft_config,
            **kwargs,
        )
        if ref_model is not None:
            if args.disable_dropout:
                disable_dropout_in_model(ref_model)
            add_fused_lm_head(ref_model, temperature=self.temperature, cast_lm_head_to_fp32=args.cast_lm_head_to_fp32)
            self.ref_model = self.accelerator.prepare_model(ref_model, evaluation_mode=True)

        self._refuse_unsupported_engines()
        check_exportable(self.model)  # an adapter option the final export could not merge fails now, not after training
        # θ: PEFT froze the base; unfreeze the selected weights.  w: the LoRA parameters.
        self.base_params = _select_base_params(self.model, args.trainable_base_parameters)
        for _, p in self.base_params:
            p.requires_grad_(True)
        self.adapter_params = [(n, p) for n, p in self.model.named_parameters() if "lora_" in n and p.requires_grad]
        _keep_fp32_master_weights(self.model, self.base_params + self.adapter_params, autocast=args.bf16)
        # FSDP2 shards the parameters when the Trainer prepares the model (train()); θ̂ is then created sharded like θ.
        self._fsdp2 = bool(self.is_fsdp_enabled and self.accelerator.is_fsdp2)
        if self._fsdp2:
            # One reduce-scatter per backward: FSDP2's no_sync accumulates unsharded gradients inside FSDP, where the
            # θ/θ̂ swap of pass B cannot separate them.
            self.accelerator.gradient_state.plugin_kwargs["sync_each_batch"] = True
        # θ̂ ← θ⁰: a persistent fp32 copy of the trainable base weights only.
        self.shadow_params = None if self._fsdp2 else [torch.nn.Parameter(p.detach().clone()) for _, p in self.base_params]

        sft_tokenized = tokenize_sft_dataset(sft_dataset, self._tokenizer, args.sft_max_length)
        self.sft_stream = SFTStream(
            sft_tokenized,
            pad_token_id=self._tokenizer.pad_token_id,
            batch_size=args.sft_per_device_train_batch_size,
            seed=args.seed,
            rank=self.accelerator.process_index,
            world_size=self.accelerator.num_processes,
        )
        self.shadow_optimizer = self.adapter_optimizer = None
        self.shadow_scheduler = self.adapter_scheduler = None
        self._rl_inputs = None  # the rollouts of the current micro-batch, shared by passes A and B
        self._capture_logps = False
        self._captured_logps = None
        self._adapter_sft_grads = None
        self.add_callback(BridgeCallback(self))

    def train(self, *args, **kwargs):
        self._check_reward_funcs()
        return super().train(*args, **kwargs)

    def _refuse_unsupported_engines(self):
        """Engines BRIDGE cannot run correctly are refused here, before any step (an accelerate config sets them)."""
        if self.is_deepspeed_enabled:
            raise ValueError(
                "BridgeTrainer does not support DeepSpeed: its engine steps θ inside backward() (the shadow pass would "
                "step θ a second time) and θ̂ and w, outside its optimizer, would never have their gradients reduced. "
                "Use FSDP2: `accelerate launch --config_file configs/accelerate/fsdp2.yaml ...`."
            )
        if self.is_fsdp_enabled:
            if not self.accelerator.is_fsdp2:
                raise ValueError(
                    "BridgeTrainer does not support FSDP1 (TRL's fused LM head reads the flattened shard of "
                    "lm_head.weight). Use FSDP2: `fsdp_version: 2` in the accelerate config "
                    "(configs/accelerate/fsdp2.yaml)."
                )
            sd_type = str(self.accelerator.state.fsdp_plugin.state_dict_type)
            if "FULL_STATE_DICT" not in sd_type:
                raise ValueError(
                    f"BridgeTrainer under FSDP2 needs `fsdp_state_dict_type: FULL_STATE_DICT` (got {sd_type}): the merged "
                    "π(θ+w) export and BRIDGE's checkpoints gather full tensors."
                )

    def _check_reward_funcs(self):
        """Call every reward function once on the first RL row before any step, so a broken one fails early and clearly."""
        if not isinstance(self.train_dataset, Dataset):
            return
        row = self.train_dataset[0]
        prompt = row["prompt"]
        probe = "The answer is \\boxed{0}."
        completion = [{"role": "assistant", "content": probe}] if is_conversational({"prompt": prompt}) else probe
        extra = {k: [v] for k, v in row.items() if k not in ("prompt", "completion", "completion_ids")}
        for func, name in zip(self.reward_funcs, self.reward_func_names):
            if isinstance(func, torch.nn.Module):
                continue
            try:
                out = func(prompts=[prompt], completions=[completion], completion_ids=[[0]], trainer_state=self.state,
                           log_extra=lambda *a: None, log_metric=lambda *a: None, **extra)
            except Exception as err:
                raise RuntimeError(
                    f"Reward function {name!r} raised {type(err).__name__}: {err} when probed, before training, with the "
                    f"first RL row (columns passed: {sorted(extra)}). Fix the function or the dataset columns it reads."
                ) from err
            if not isinstance(out, (list, tuple)) or len(out) != 1 or not (out[0] is None or isinstance(out[0], (int, float))):
                raise TypeError(
                    f"Reward function {name!r} must return a list with one float (or None) per completion; "
                    f"for one completion it returned {out!r}."
                )

    # ------------------------------------------------------------------------------------------------------------
    # λ and the one-meta-step computation (BRIDGE.md §3)
    # ------------------------------------------------------------------------------------------------------------
    @property
    def bridge_lambda(self) -> float:
        return self.args.lambda_at(self.state.global_step)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.model.training:  # evaluation: the RL loss of π(θ+w), as GRPOTrainer reports it
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        lam = self.bridge_lambda
        # Pass A. §3.2 (θ) and the first two terms of §3.4 (w): the gradient of (1−λ) L_SFT(θ,w) + λ L_RL(θ,w), as
        # two forward+backward pairs (one backward per forward, which FSDP2 needs). The SFT half is back-propagated
        # here; the Trainer back-propagates the returned λ L_RL (the detached SFT term only makes the logged loss whole).
        first_micro_batch = self._step % self.current_gradient_accumulation_steps == 0
        sft_loss = self._sft_loss(model)
        self.accelerator.backward((1.0 - lam) * sft_loss)
        if first_micro_batch:  # w's SFT gradient, for the cooperative/SFT ratio logged after pass B
            self._adapter_sft_grads = [None if p.grad is None else p.grad.detach().clone() for _, p in self.adapter_params]
        rl_loss, base_logps = self._rl_loss_and_logps(model, inputs)
        self._rl_inputs = (inputs, base_logps)
        ga = self.current_gradient_accumulation_steps
        self._log_mean("bridge/rl_loss", rl_loss.detach() * ga)
        self._log_mean("bridge/sft_loss", sft_loss.detach() * ga)
        self._log_mean("bridge/lambda", torch.tensor(lam, device=rl_loss.device))
        return lam * rl_loss + ((1.0 - lam) * sft_loss).detach()

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)  # rollouts + pass A (forward and backward)
        if self.model.training and self._rl_inputs is not None:
            if self.args.bridge_meta_term:  # False: the "w/o J_meta" ablation, no shadow
                self._shadow_backward(model, *self._rl_inputs, lam=self.bridge_lambda)  # pass B
            self._rl_inputs = None
            if self._adapter_sft_grads is not None:
                self._log_cooperative_to_sft_ratio()
        return loss

    def _shadow_backward(self, model, inputs, base_logps, lam):
        """Pass B. §3.3: ∇θ̂ L_RL(θ̂,w) into θ̂'s gradients; last term of §3.4: −λ ∇w L_RL(θ̂,w) into w.grad."""
        shadow_inputs = dict(inputs)
        # The shadow's PPO ratio is against its own log-probs at sampling time when GRPOTrainer keeps old log-probs
        # (num_iterations > 1, ...), else against its current ones, detached (ratio 1), exactly as for θ.
        if inputs.get("old_per_token_logps") is not None:
            shadow_inputs["old_per_token_logps"] = inputs["shadow_old_per_token_logps"]
        if self.args.shadow_off_policy == "truncated_is":
            # rollouts come from π(θ+w): re-weight each token by min(π(θ̂+w)/π(θ+w), C), detached (BRIDGE.md §5)
            ratio = torch.exp(inputs["shadow_old_per_token_logps"] - inputs["behaviour_per_token_logps"])
            advantages = inputs["advantages"]
            advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
            shadow_inputs["advantages"] = advantages * ratio.clamp(max=self.args.shadow_is_cap)
        with self._shadow_in_place(), self._adapter_grads_scaled(-lam), self._metrics_set_aside():
            shadow_loss, shadow_logps = self._rl_loss_and_logps(model, shadow_inputs)
            self.accelerator.backward(shadow_loss)
        ga = self.current_gradient_accumulation_steps
        self._log_mean("bridge/rl_loss_shadow", shadow_loss.detach() * ga)
        self._log_mean("bridge/cooperative_gain", self._cooperative_gain(inputs, base_logps, shadow_logps))

    def _rl_loss_and_logps(self, model, inputs):
        """TRL's GRPO loss on the rollouts, plus the per-token log-probs it computed (detached)."""
        self._capture_logps = True
        try:
            loss = self._compute_loss(model, inputs)
        finally:
            self._capture_logps = False
        return loss, self._captured_logps

    def _sft_loss(self, model):
        """L_SFT: token-mean NLL of a batch of expert traces (prompt tokens carry label −100), scaled for accumulation."""
        batch = {k: v.to(self.accelerator.device) for k, v in self.sft_stream.next_batch().items()}
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"], use_cache=False)
        return out.loss / self.current_gradient_accumulation_steps

    @torch.no_grad()
    def _cooperative_gain(self, inputs, base_logps, shadow_logps):
        """Estimate of J_RL(θ,w) − J_RL(θ̂,w) on the shared rollouts (`cooperative_gain_estimate`). The proposal is
        the sampling policy: its log-probs as TRL keeps them (vLLM's `sampling_per_token_logps`, else
        `old_per_token_logps`), else π(θ+w) from pass A (θ and w have not moved since sampling)."""
        proposal = inputs.get("sampling_per_token_logps")
        proposal = inputs.get("old_per_token_logps") if proposal is None else proposal
        return cooperative_gain_estimate(
            inputs["bridge_rewards"], inputs["completion_mask"], inputs.get("bridge_group_ids"),
            base_logps if proposal is None else proposal, base_logps, shadow_logps,
        )

    # ------------------------------------------------------------------------------------------------------------
    # §3.3 and §3.4 updates (called by BridgeCallback before the Trainer's θ step)
    # ------------------------------------------------------------------------------------------------------------
    def _apply_shadow_and_adapter_updates(self):
        _reshard_fsdp(self.model)  # no unsharded FSDP2 copy may outlive the update
        max_norm = self.args.max_grad_norm if self.args.max_grad_norm and self.args.max_grad_norm > 0 else float("inf")
        shadow_norm = _clip_grad_norm(self.shadow_params, max_norm)
        adapter_norm = _clip_grad_norm([p for _, p in self.adapter_params], max_norm)
        self._metrics["train"]["bridge/grad_norm_shadow"].append(shadow_norm)
        self._metrics["train"]["bridge/grad_norm_adapter"].append(adapter_norm)
        # ‖θ̂−θ‖/‖θ‖ at iterate k: ~0 means the shadow has not separated from θ, so the cooperative term vanishes and
        # BRIDGE has degenerated to naive mixing (e.g. half-precision updates rounding away).
        diff = _sum_of_squares(s - p for (_, p), s in zip(self.base_params, self.shadow_params))
        norm = _sum_of_squares(p for _, p in self.base_params)
        self._metrics["train"]["bridge/shadow_divergence"].append((diff / max(norm, 1e-30)) ** 0.5)
        self.shadow_optimizer.step()  # θ̂ ← θ̂ − α ∇θ̂ L_RL(θ̂,w)
        self.adapter_optimizer.step()  # w ← w − β [cooperative-gain gradient]
        self.shadow_scheduler.step()
        self.adapter_scheduler.step()
        self.shadow_optimizer.zero_grad(set_to_none=True)
        self.adapter_optimizer.zero_grad(set_to_none=True)

    def _clip_grad_norm(self, model):
        """The Trainer's clipping (and its logged `grad_norm`) covers θ alone; θ̂ and w are clipped separately."""
        norm = _clip_grad_norm([p for _, p in self.base_params], self.args.max_grad_norm)
        self._metrics["train"]["bridge/grad_norm_base"].append(norm)
        return norm

    def _get_grad_norm(self, model, grad_norm=None):
        if grad_norm is None:
            grad_norm = _grad_norm([p for _, p in self.base_params])
            self._metrics["train"]["bridge/grad_norm_base"].append(grad_norm)
        return super()._get_grad_norm(model, grad_norm)

    def _log_cooperative_to_sft_ratio(self):
        """‖λ(∇w L_RL(θ,w) − ∇w L_RL(θ̂,w))‖ / ‖(1−λ)∇w L_SFT(θ,w)‖ on the step's first micro-batch: near 0, w is trained
        on SFT alone (BRIDGE has become LoRA-SFT)."""
        sft = self._adapter_sft_grads
        total = [p.grad for _, p in self.adapter_params]
        coop = [t if s is None else t - s for t, s in zip(total, sft) if t is not None]
        sft_sq = _sum_of_squares([g for g in sft if g is not None])
        if sft_sq > 0:
            self._metrics["train"]["bridge/cooperative_to_sft_grad_ratio"].append((_sum_of_squares(coop) / sft_sq) ** 0.5)
        self._adapter_sft_grads = None

    # ------------------------------------------------------------------------------------------------------------
    # Optimizers: θ in the Trainer's optimizer, θ̂ and w in their own (same class, same schedule type)
    # ------------------------------------------------------------------------------------------------------------
    def _make_optimizer(self, named_params, lr):
        decay = set(self.get_decay_parameter_names(self.model))
        groups = [
            {"params": [p for n, p in named_params if n in decay], "weight_decay": self.args.weight_decay},
            {"params": [p for n, p in named_params if n not in decay], "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
        return optimizer_cls(groups, **{**optimizer_kwargs, "lr": lr})

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            self.optimizer = self._make_optimizer(self._peft_named(self.base_params), self.args.learning_rate)
        return self.optimizer

    def _make_scheduler(self, optimizer, num_training_steps: int):
        """The same schedule shape for θ, θ̂ and w, each from its own peak lr (BridgeConfig made min_lr relative; the
        polynomial schedule's absolute `lr_end` is scaled here by this optimizer's peak over θ's)."""
        kwargs = dict(self.args.lr_scheduler_kwargs or {})
        if getattr(self.args.lr_scheduler_type, "value", self.args.lr_scheduler_type) == "polynomial":
            peak = optimizer.param_groups[0]["lr"]
            kwargs["lr_end"] = kwargs.get("lr_end", 1e-7) * (peak / self.args.learning_rate if self.args.learning_rate else 0.0)
        return get_scheduler(
            self.args.lr_scheduler_type,
            optimizer=optimizer,
            num_warmup_steps=self.args.get_warmup_steps(num_training_steps),
            num_training_steps=num_training_steps,
            scheduler_specific_kwargs=kwargs,
        )

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            self.lr_scheduler = self._make_scheduler(self.optimizer if optimizer is None else optimizer, num_training_steps)
            self._created_lr_scheduler = True
        if self.shadow_optimizer is not None:
            return self.lr_scheduler
        self._bind_sharded_params()  # called after accelerate prepared (and, under FSDP2, sharded) the model
        shadow_named = list(zip([n for n, _ in self._peft_named(self.base_params)], self.shadow_params))
        self.shadow_optimizer = self._make_optimizer(shadow_named, self.args.shadow_learning_rate)
        self.adapter_optimizer = self._make_optimizer(self.adapter_params, self.args.adapter_learning_rate)
        self.shadow_scheduler = self._make_scheduler(self.shadow_optimizer, num_training_steps)
        self.adapter_scheduler = self._make_scheduler(self.adapter_optimizer, num_training_steps)
        return self.lr_scheduler

    def _bind_sharded_params(self):
        """FSDP2: `fully_shard` replaced every parameter by a DTensor one. Re-bind θ and w by name, create θ̂ sharded
        exactly like θ (same mesh and placements: each rank holds its shard of θ̂ and of θ̂'s optimizer state), and
        make TRL's fused LM head, which reads `lm_head.weight` without calling `lm_head`, see the gathered weight."""
        if not self._fsdp2 or self.shadow_params is not None:
            return
        named = dict(self.model.named_parameters())
        by_plain = {plain_name(n): p for n, p in named.items() if "lora_" not in n}
        self.base_params = [(n, by_plain[n]) for n, _ in self.base_params]
        self.adapter_params = [(n, named[n]) for n, _ in self.adapter_params]
        self.shadow_params = [torch.nn.Parameter(p.detach().clone()) for _, p in self.base_params]  # θ̂ ← θ⁰, sharded
        base = self.accelerator.unwrap_model(self.model).get_base_model()
        head = base.get_output_embeddings()
        if isinstance(head, FSDPModule):
            # accelerate puts lm_head in its own FSDP unit, gathered only when lm_head.forward runs; the fused head
            # never calls it. Gather it when the backbone finishes: its gradient then reaches FSDP's reduce-scatter.
            base.base_model.register_forward_hook(lambda *_: head.unshard())

    def _peft_named(self, plain_named):
        """(plain name, param) -> (the name the param has in self.model, param), for weight-decay grouping."""
        by_id = {id(p): n for n, p in self.model.named_parameters()}
        return [(by_id[id(p)], p) for _, p in plain_named]

    # ------------------------------------------------------------------------------------------------------------
    # Rollouts: add what the shadow and the gain estimate need to GRPOTrainer's batch
    # ------------------------------------------------------------------------------------------------------------
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._last_rewards_per_func = rewards_per_func
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        n_local = output["prompt_ids"].size(0)
        start = self.accelerator.process_index * n_local
        weights = self.reward_weights.to(self._last_rewards_per_func.device)
        rewards = (self._last_rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
        output["bridge_rewards"] = rewards[start : start + n_local]
        # each row's prompt group (rollouts of one prompt are consecutive in the global batch), kept through TRL's shuffle
        rows = torch.arange(start, start + n_local, device=rewards.device)
        output["bridge_group_ids"] = rows // self.num_generations
        if self.model.training:
            needs_old = output.get("old_per_token_logps") is not None
            if needs_old or self.args.shadow_off_policy == "truncated_is":
                with self._shadow_in_place(keep_grads=True):
                    output["shadow_old_per_token_logps"] = self._no_grad_logps(output)
            if self.args.shadow_off_policy == "truncated_is":
                behaviour = output.get("old_per_token_logps")
                output["behaviour_per_token_logps"] = behaviour if behaviour is not None else self._no_grad_logps(output)
        return output

    @torch.no_grad()
    def _no_grad_logps(self, batch):
        input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        logps, _, _ = super()._get_per_token_logps_and_entropies(
            self.model, input_ids, attention_mask, batch["completion_ids"].size(1),
            batch_size=self.args.per_device_train_batch_size,
        )
        return logps

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        out = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        if self._capture_logps:
            self._captured_logps = out[0].detach()
        return out

    # ------------------------------------------------------------------------------------------------------------
    # Plumbing: weight swaps, gradient scaling, metrics
    # ------------------------------------------------------------------------------------------------------------
    @contextmanager
    def _shadow_in_place(self, keep_grads: bool = False):
        """Put θ̂ in the base parameters' storage (and θ̂'s accumulated gradients in their .grad); swap back after.

        Under FSDP2 the local shards are exchanged in place (FSDP all-gathers from that storage), with every FSDP unit
        resharded first so that no gathered copy of the other weights is reused."""

        def swap():
            _reshard_fsdp(self.model)
            with torch.no_grad():
                for (_, p), s in zip(self.base_params, self.shadow_params):
                    if isinstance(p, DTensor):
                        tmp = p._local_tensor.clone()
                        p._local_tensor.copy_(s._local_tensor)
                        s._local_tensor.copy_(tmp)
                    else:
                        p.data, s.data = s.data, p.data
                    if not keep_grads:
                        p.grad, s.grad = s.grad, p.grad

        swap()
        try:
            yield
        finally:
            swap()

    @contextmanager
    def _adapter_grads_scaled(self, scale: float):
        """w.grad += scale × (the gradient the enclosed backward produces). Applied to the gradient as DDP/FSDP leave
        it after the backward (a tensor hook would not fire on FSDP2's sharded parameters)."""
        saved = [p.grad for _, p in self.adapter_params]
        for _, p in self.adapter_params:
            p.grad = None
        try:
            yield
        finally:
            for (_, p), before in zip(self.adapter_params, saved):
                new = p.grad
                p.grad = before if new is None else (scale * new if before is None else before + scale * new)

    @contextmanager
    def _metrics_set_aside(self):
        """GRPOTrainer's _compute_loss logs entropy/clip/KL metrics; keep the shadow's out of the policy's logs."""
        metrics = self._metrics["train"]
        lengths = {k: len(v) for k, v in metrics.items()}
        entropy_state = {k: getattr(self, k) for k in ("entropy_coef", "_entropy_window_stats", "_last_world_entropy") if hasattr(self, k)}
        try:
            yield
        finally:
            for k in list(metrics):
                if k in lengths:
                    del metrics[k][lengths[k] :]
                else:
                    del metrics[k]
            for k, v in entropy_state.items():
                setattr(self, k, v)

    def _log_mean(self, name: str, value: torch.Tensor):
        value = torch.as_tensor(value, device=self.accelerator.device, dtype=torch.float32).reshape(1)
        self._metrics["train"][name].append(self.accelerator.gather(value).nanmean().item())

    # ------------------------------------------------------------------------------------------------------------
    # Export and checkpoints
    # ------------------------------------------------------------------------------------------------------------
    def shadow_state_dict(self) -> dict[str, torch.Tensor]:
        """θ̂, keyed like the plain base model's state dict (only the trainable weights have a shadow). Full tensors
        (under FSDP2 every rank must call it: the shards are gathered)."""
        return {name: _full(s).clone() for (name, _), s in zip(self.base_params, self.shadow_params)}

    def _save(self, output_dir=None, state_dict=None):
        """`save_model` writes the merged policy π(θ+w) as a plain model folder (loadable with AutoModelForCausalLM)."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        # Under FSDP2 the Trainer passes the gathered full state dict of the PEFT model; else the live model is read.
        save_merged_model(self.accelerator.unwrap_model(self.model), self.processing_class, output_dir, state_dict=state_dict)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def create_model_card(self, model_name=None, dataset_name=None, tags=None, **kwargs):
        """The model card names BRIDGE (with the citation), the base model, data, hyper-parameters and final metrics."""
        if not self.is_world_process_zero():
            return
        from .reporting import write_model_card

        hparams = {k: getattr(self.args, k) for k in CARD_HYPERPARAMETERS}
        logs = [h for h in self.state.log_history if "bridge/sft_loss" in h]
        final = {k: v for k, v in (logs[-1] if logs else {}).items() if k in CARD_METRICS}
        datasets = self.card_datasets or ([dataset_name] if isinstance(dataset_name, str) else list(dataset_name or []))
        write_model_card(
            self.args.output_dir,
            base_model=self.card_base_model or _model_name(self.accelerator.unwrap_model(self.model)),
            datasets=datasets,
            hyperparameters=hparams,
            final_metrics=final,
            eval_results=self.card_eval_results,
            model_name=model_name,
        )

    def _bridge_tensors(self) -> dict[str, torch.Tensor]:
        """θ, θ̂ and w as full tensors (gathered from every rank under FSDP2: all ranks must call it)."""
        tensors = {f"base.{n}": _full(p).contiguous() for n, p in self.base_params}
        tensors.update({f"shadow.{n}": _full(s).contiguous() for (n, _), s in zip(self.base_params, self.shadow_params)})
        tensors.update({f"adapter.{n}": _full(p).contiguous() for n, p in self.adapter_params})
        return tensors

    def _optimizers(self):
        return {"base": self.optimizer, "shadow": self.shadow_optimizer, "adapter": self.adapter_optimizer}

    def _save_optimizer_and_scheduler(self, output_dir):
        """All three optimizers and schedules in one engine-independent file (full tensors), so a checkpoint written
        under FSDP2 resumes under FSDP2 or in one process, and vice versa."""
        tensors = self._bridge_tensors()
        optimizers = {f"{k}_optimizer": _full_optimizer_state(opt) for k, opt in self._optimizers().items()}
        if not self.args.should_save:
            return
        save_file(tensors, os.path.join(output_dir, BRIDGE_STATE_FILE))
        torch.save(
            {
                **optimizers,
                "base_scheduler": self.lr_scheduler.state_dict(),
                "shadow_scheduler": self.shadow_scheduler.state_dict(),
                "adapter_scheduler": self.adapter_scheduler.state_dict(),
                "sft_stream": self.sft_stream.state_dict(),
            },
            os.path.join(output_dir, BRIDGE_OPTIM_FILE),
        )

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        path = os.path.join(resume_from_checkpoint, BRIDGE_STATE_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{resume_from_checkpoint} is not a BRIDGE checkpoint: {BRIDGE_STATE_FILE} is missing.")
        saved = load_file(path)
        expected = self._bridge_tensors()
        missing = sorted(set(expected) - set(saved))
        if missing:
            raise ValueError(f"{path} does not match this model/config; missing e.g. {missing[:3]}")
        for (n, p), s in zip(self.base_params, self.shadow_params):
            _assign(p, saved[f"base.{n}"])
            _assign(s, saved[f"shadow.{n}"])
        for n, p in self.adapter_params:
            _assign(p, saved[f"adapter.{n}"])

    def _load_optimizer_and_scheduler(self, checkpoint):
        if checkpoint is None:
            return
        state = torch.load(os.path.join(checkpoint, BRIDGE_OPTIM_FILE), map_location="cpu", weights_only=False)
        for key, opt in self._optimizers().items():
            _load_full_optimizer_state(opt, state[f"{key}_optimizer"])
        self.lr_scheduler.load_state_dict(state["base_scheduler"])
        self.shadow_scheduler.load_state_dict(state["shadow_scheduler"])
        self.adapter_scheduler.load_state_dict(state["adapter_scheduler"])
        self.sft_stream.load_state_dict(state["sft_stream"])


def cooperative_gain_estimate(rewards, mask, group_ids, proposal_logps, base_logps, shadow_logps) -> torch.Tensor:
    """Ĵ(θ,w) − Ĵ(θ̂,w): each policy's mean reward estimated by self-normalised importance sampling from rollouts
    drawn from the proposal q, with sequence weights π(y)/q(y) (per-token log-probs summed over `mask`, log-ratios
    clamped to ±20) normalised *within each prompt's group*: one estimate of E_{y~π(·|x)}[r] per prompt x, averaged
    over the groups weighted by their number of rollouts. (Normalising over the whole micro-batch would also move
    weight between prompts, i.e. change the prompt distribution.) A group with one rollout in the micro-batch
    contributes its reward to both terms, so nothing to the gain. `group_ids` None: one group."""
    rewards = torch.nan_to_num(rewards.float(), nan=0.0)
    mask = mask.float()
    if group_ids is None:
        group_ids = torch.zeros_like(rewards, dtype=torch.long)
    _, group = torch.unique(group_ids, return_inverse=True)
    n_groups = int(group.max()) + 1
    sizes = torch.bincount(group, minlength=n_groups).float()

    def snis(logps):
        log_w = ((logps.float() - proposal_logps.float()) * mask).sum(-1).clamp(-20.0, 20.0)
        peak = torch.full((n_groups,), -torch.inf, device=log_w.device).scatter_reduce(0, group, log_w, "amax")
        unnormalised = torch.exp(log_w - peak[group])
        weights = unnormalised / torch.zeros(n_groups, device=log_w.device).index_add_(0, group, unnormalised)[group]
        per_group = torch.zeros(n_groups, device=log_w.device).index_add_(0, group, weights * rewards)
        return (per_group * sizes).sum() / sizes.sum()

    return snis(base_logps) - snis(shadow_logps)


CARD_HYPERPARAMETERS = (
    "bridge_lambda", "bridge_lambda_end", "bridge_lambda_warmup_steps", "learning_rate", "adapter_learning_rate",
    "shadow_learning_rate", "lora_r", "lora_alpha", "trainable_base_parameters", "shadow_off_policy", "loss_type",
    "beta", "num_generations", "per_device_train_batch_size", "gradient_accumulation_steps", "max_completion_length",
    "sft_per_device_train_batch_size", "sft_max_length", "max_steps", "seed",
)
CARD_METRICS = ("reward", "bridge/sft_loss", "bridge/rl_loss", "bridge/rl_loss_shadow", "bridge/cooperative_gain", "bridge/lambda")


# ----------------------------------------------------------------------------------------------------------------------
# Precision and FSDP2 helpers (plain tensors pass through unchanged)
# ----------------------------------------------------------------------------------------------------------------------
def _keep_fp32_master_weights(model, trainable, autocast: bool):
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


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor, detached (a collective for FSDP2's DTensors: every rank must call it in the same order)."""
    t = t.detach()
    return t.full_tensor() if isinstance(t, DTensor) else t


def _assign(param: torch.Tensor, full: torch.Tensor):
    """Copy a full tensor into a parameter, or into this rank's shard of it."""
    with torch.no_grad():
        if isinstance(param, DTensor):
            full = distribute_tensor(full.to(param.dtype), param.device_mesh, param.placements, src_data_rank=None)
        param.copy_(full.to(param.device, param.dtype))


def _sum_of_squares(tensors) -> float:
    total = sum((_full(t.detach().float().pow(2).sum()) for t in tensors), torch.zeros(()))
    return float(total)


def _grad_norm(params) -> float:
    """Total L2 norm of the gradients of `params` (DTensor-aware: the shards' norms are combined)."""
    grads = [p.grad for p in params if p.grad is not None]
    return float(_full(torch.nn.utils.get_total_norm(grads))) if grads else 0.0


def _clip_grad_norm(params, max_norm: float) -> float:
    """Clip the gradients of `params` to a total norm of `max_norm`; returns the norm before clipping."""
    norm = _grad_norm(params)
    if max_norm and 0 < max_norm < float("inf"):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, torch.tensor(norm))
    return norm


def _reshard_fsdp(model):
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _full_optimizer_state(optimizer) -> dict:
    """`optimizer.state_dict()` with every sharded state tensor gathered (collective under FSDP2)."""
    sd = optimizer.state_dict()
    return {
        "state": {i: {k: _full(v).cpu() if torch.is_tensor(v) else v for k, v in st.items()} for i, st in sd["state"].items()},
        "param_groups": sd["param_groups"],
    }


def _load_full_optimizer_state(optimizer, sd: dict):
    """Load a full optimizer state, sharding each tensor like its parameter when the parameters are DTensors."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {}
    for i, st in sd["state"].items():
        p = params[int(i)]
        state[i] = {
            k: distribute_tensor(v.to(p.dtype), p.device_mesh, p.placements, src_data_rank=None)
            if isinstance(p, DTensor) and torch.is_tensor(v) and v.shape == p.shape else v
            for k, v in st.items()
        }
    optimizer.load_state_dict({"state": state, "param_groups": sd["param_groups"]})


def _model_name(peft_model) -> str:
    """The base model's Hub name or path; a model built from a config has none, so name its class."""
    base = peft_model.get_base_model()
    return base.config._name_or_path or f"{type(base).__name__} (built from a config)"


def _select_base_params(peft_model, patterns):
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
