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
    step 4). Then the weights and gradients are swapped back. With `shadow_fraction` < 1 (an extension beyond the
    paper) pass B runs on a drawn subset of whole prompt groups, rescaled to be unbiased (`_shadow_subset`).
  * `BridgeCallback.on_pre_optimizer_step` (between the fused base steps) clips and applies the θ̂ and w updates
    with their own optimizers and learning-rate schedules; the Trainer then applies the θ update (its optimizer holds
    θ only).

θ, θ̂ and w are fp32 master weights (bf16 only as compute). Under FSDP2 all three are sharded alike
(`_bind_sharded_params`); DeepSpeed, FSDP1 and fp16 are refused.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import math
import os
import re
import shutil
import time
import warnings
from contextlib import contextmanager

from .compat import check_versions

check_versions()  # before trl is imported: an untested trl/transformers fails here, naming the tested range

import torch
from accelerate.utils import is_peft_model
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from datasets import Dataset, IterableDataset
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback, get_scheduler
from transformers.utils import logging
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from trl import GRPOConfig, GRPOTrainer
from trl.data_utils import is_conversational
from trl.trainer.utils import add_fused_lm_head, create_model_from_path, disable_dropout_in_model, is_async_callable

from .bridge_config import BridgeConfig
from .checkpointing import (
    StopOnSignal, TrainingInterrupted, check_output_dir, latest_complete_checkpoint, publish_checkpoint,
    remove_previous_run_checkpoints, remove_stale_staging, resolve_resume_from_checkpoint, staging_dir,
)
from .data import validate_rl_dataset, validate_sft_dataset
from .export import check_exportable, merged_state_dict, plain_name, save_merged_model
from .fsdp2 import (
    LeanShadowOptimizer, assign_full, clip_grad_norm, full_optimizer_state, full_tensor, total_grad_norm,
    load_full_optimizer_state, reshard, sum_of_squares,
)
from .resume_sampler import epoch_exact_sampler
from .sft_stream import SFTStream, tokenize_sft_dataset
from .vllm_sync import check_vllm_can_hold_the_policy, keep_vllm_cpu_weights_live, sync_merged_policy

logger = logging.get_logger(__name__)

BRIDGE_STATE_FILE = "bridge_state.safetensors"
BRIDGE_OPTIM_FILE = "bridge_optimizers.pt"
REF_MODEL_FILE = "bridge_ref_model.safetensors"  # the KL reference, written only when `sync_ref_model` moves it
BRIDGE_ROLLOUTS_FILE = "bridge_rollouts_rank{}.pt"  # one per process: GRPOTrainer's buffered rollouts and step counter
# A NaN/inf in any of these (on any rank) makes the step a numeric fault (see `_skip_if_non_finite`).
CHECKED_LOSSES = ("bridge/sft_loss", "bridge/rl_loss", "bridge/rl_loss_shadow")
# GRPOTrainer's adaptive-entropy controller state (saved with the rollouts so that it resumes too).
ENTROPY_STATE = ("entropy_coef", "_entropy_window_stats", "_last_world_entropy")


class BridgeCallback(TrainerCallback):
    """Runs the shadow (§3.3) and adapter (§3.4) updates between the fused base-model steps (§3.2)."""

    def __init__(self, trainer: "BridgeTrainer"):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._apply_shadow_and_adapter_updates()


class RefModelSyncCallback(TrainerCallback):
    """`sync_ref_model=True`: every `ref_model_sync_steps` steps, ref ← (1−α)·ref + α·π(θ+w) (α =
    `ref_model_mixup_alpha`), as TRL's SyncRefModelCallback does with the policy; here the policy is the merged θ+w."""

    def __init__(self, trainer: "BridgeTrainer"):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % args.ref_model_sync_steps == 0:
            self.trainer._sync_ref_model(args.ref_model_mixup_alpha)


class BridgeTrainer(GRPOTrainer):
    """
    Trainer for BRIDGE (Chen et al., "Beyond Two-Stage Training: Cooperative SFT and RL for LLM Reasoning",
    arXiv:2509.06948): cooperative SFT + RL with a fused base θ, an RL-only shadow θ̂ and a LoRA adapter w trained on
    the cooperative gain.

    A drop-in replacement for [`~trl.GRPOTrainer`] (its parameters, in its order) that takes one more dataset, the
    keyword-only `sft_dataset` (expert reasoning traces in any TRL SFT format). Rollout generation, reward computation
    and advantages are GRPOTrainer's, unchanged. The overrides, each for one reason:
      * `__init__`: wraps the model in the LoRA adapter w (a `PeftModel` passed in supplies w), unfreezes θ (fp32
        master weights), creates θ̂ and the SFT stream, and (when `beta > 0`) keeps a frozen copy of the initial
        policy as the KL reference so it does not move with θ (synced from the merged policy with `sync_ref_model`).
        A `GRPOConfig` is upgraded to a `BridgeConfig`. At λ = 1 for the whole run none of this is built: the run is
        GRPOTrainer's own and the overrides below defer to it (the reward probe aside). Refuses engines and adapter
        options BRIDGE cannot honour.
      * `compute_loss` / `training_step`: pass A (fused loss) and pass B (shadow loss) of the module docstring.
      * `create_optimizer`, `create_scheduler`, `_clip_grad_norm`, `_get_grad_norm`: the Trainer's optimizer and
        clipping act on θ alone; θ̂ and w get their own optimizers, schedules and clipping (in `BridgeCallback`);
        under FSDP2, `create_scheduler` (after `prepare`) re-binds θ and w to the sharded parameters and shards θ̂.
      * `_calculate_rewards`, `_generate_and_score_completions`, `_get_per_token_logps_and_entropies`: keep each
        rollout's reward and the log-probs of both passes (for the cooperative-gain estimate), and the shadow's own
        sampling-time log-probs when GRPOTrainer keeps old log-probs or `shadow_off_policy="truncated_is"`.
      * `train`: probes every reward function on the first RL rows (a broken, infinite or never-rewarding one fails
        before step 1), resolves `resume_from_checkpoint="last"`, refuses an `output_dir` holding another run, and
        turns SIGINT/SIGTERM into "finish the step, write a checkpoint, stop" (`TrainingInterrupted`).
      * `_save`, `_save_optimizer_and_scheduler`, `_load_from_checkpoint`, `_load_optimizer_and_scheduler`: the merged
        π(θ+w) export, and engine-independent checkpoints (full tensors) holding θ, θ̂, w, the three optimizers' and
        schedules' states, the SFT stream position and GRPOTrainer's buffered rollouts (exact resume anywhere).
      * `_save_checkpoint`, `_get_output_dir`: checkpoints are written to a staging folder and renamed when complete.
      * `_get_train_sampler`: a resumed run shuffles every epoch's prompts as the uninterrupted one does
        (`trl_bridge.resume_sampler`; GRPOTrainer's sampler starts again from the first epoch's order).
      * `_get_grad_norm`, `_log_mean`, `log`: a NaN/inf loss or gradient skips the step for θ, θ̂ and w together
        (`_skip_if_non_finite`, logged as `bridge/skipped_steps`).
      * `create_model_card`: a card that names BRIDGE, the base model, data, hyper-parameters and final metrics.
    With `use_vllm=True`, vLLM is sent π(θ+w) merged out of place (`trl_bridge.vllm_sync`): TRL's in-place
    merge/unmerge would move θ by float rounding at every sync.
    """

    _tag_names = ["trl", "bridge", "grpo"]
    card_base_model: str | None = None  # what the model card names as base model / datasets / results (set by the CLI)
    card_datasets: list[str | dict] | None = None
    card_eval_results: dict | None = None  # benchmark results ({benchmark: accuracy}); filed in the card's model-index
    card_heldout: dict | None = None  # {"heldout_accuracy_before", "heldout_accuracy_after", "num_problems"}
    card_task: str | None = None  # one sentence describing the task
    _name = "BRIDGE"
    _paper = {"title": "Beyond Two-Stage Training: Cooperative SFT and RL for LLM Reasoning", "id": "2509.06948"}

    def __init__(
        self,
        model,
        reward_funcs=None,
        args: BridgeConfig | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset=None,
        processing_class=None,
        reward_processing_classes=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        tools=None,
        rollout_func=None,
        environment_factory=None,
        *,
        sft_dataset: Dataset | None = None,
    ):
        # GRPOTrainer's parameters in GRPOTrainer's order, so positional calls mean the same; `sft_dataset` is keyword-only.
        self._given_model_name = model if isinstance(model, str) else None  # the model card names it
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = BridgeConfig(f"{str(name).split('/')[-1]}-BRIDGE")
        elif isinstance(args, GRPOConfig) and not isinstance(args, BridgeConfig):
            args = BridgeConfig.from_grpo_config(args)  # keeps every GRPO value, BRIDGE's defaults; warns
        if not isinstance(args, BridgeConfig):
            raise TypeError(f"`args` must be a BridgeConfig (it extends GRPOConfig), got {type(args).__name__}.")
        if optimizers != (None, None):
            raise ValueError("`optimizers` is not supported: BRIDGE builds one optimizer per parameter set (θ, θ̂, w).")
        if train_dataset is None and environment_factory is None:
            raise ValueError("`train_dataset` is required unless an `environment_factory` is provided.")  # GRPOTrainer's
        if isinstance(train_dataset, Dataset):
            validate_rl_dataset(train_dataset, name="`train_dataset` (RL prompts)")
            _check_one_generation_batch(train_dataset, args)
        # λ = 1 for the whole run is GRPO exactly (no SFT term; θ̂ stays θ; w's gradient is zero): run GRPO alone.
        self._grpo_only = args.lambda_is_always_one()
        if sft_dataset is None and not self._grpo_only:
            raise ValueError(
                "`sft_dataset` is required: BRIDGE needs expert reasoning traces for L_SFT (only a run with "
                "bridge_lambda = 1 throughout, i.e. GRPO, can go without)."
            )
        if sft_dataset is not None:
            validate_sft_dataset(sft_dataset, name="`sft_dataset` (expert traces)")
        if isinstance(model, str):
            model = self._load_model(model, args, quantization_config)
            quantization_config = None  # consumed here, as GRPOTrainer does
        adapter_weights = ref_weights = None
        if is_peft_model(model):  # the user's adapter becomes w (its base weights are θ); see `_adopt_peft_model`
            model, peft_config, adapter_weights, ref_weights = self._adopt_peft_model(model, peft_config, args)
        # KL reference (beta > 0): the initial policy π(θ⁰+w⁰) = π(θ⁰) (LoRA B starts at zero; a PeftModel's trained
        # adapter is merged in), frozen. TRL's PEFT default (adapter disabled) would be π(θ), which moves as θ trains.
        ref_model = copy.deepcopy(model).eval().requires_grad_(False) if args.beta != 0.0 else None
        if ref_model is not None and ref_weights is not None:
            ref_model.load_state_dict(ref_weights)
        from_args = peft_config is None
        if self._grpo_only:
            if peft_config is not None:
                warnings.warn(
                    "`peft_config` is ignored: with bridge_lambda = 1 for the whole run BRIDGE is GRPO on the base "
                    "weights and builds no adapter (its gradient would be zero).",
                    UserWarning,
                    stacklevel=2,
                )
            peft_config = None
        elif peft_config is None:
            peft_config = LoraConfig(
                r=args.lora_r,
                lora_alpha=args.lora_alpha,
                lora_dropout=args.lora_dropout,
                target_modules=args.lora_target_modules,
                layers_to_transform=args.lora_layers_to_transform,
                task_type="CAUSAL_LM",
            )
        if peft_config is not None:
            _check_adapter_config(peft_config)
            _check_lora_targets(model, peft_config, field="lora_target_modules" if from_args else "peft_config.target_modules")
        if args.use_vllm and args.vllm_mode == "colocate":
            keep_vllm_cpu_weights_live()  # vLLM on CPU: weight syncs must reach live weights (a no-op on GPUs)
        # GRPOTrainer would load a second copy of the plain model as its reference, or refuse `sync_ref_model` for a
        # PEFT model; BRIDGE keeps its own frozen reference (above) and syncs it itself (`_sync_ref_model`).
        overrides = dict(beta=0.0, sync_ref_model=False) if args.beta != 0.0 else {}
        with _fields_overridden(args, **overrides):
            super().__init__(
                model=model,
                reward_funcs=reward_funcs,
                args=args,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                reward_processing_classes=reward_processing_classes,
                callbacks=callbacks,
                quantization_config=quantization_config,
                peft_config=peft_config,
                tools=tools,
                rollout_func=rollout_func,
                environment_factory=environment_factory,
            )
        self.beta = args.beta
        self._probe_reward_funcs = rollout_func is None and environment_factory is None
        if ref_model is not None:
            if args.disable_dropout:
                disable_dropout_in_model(ref_model)
            add_fused_lm_head(ref_model, temperature=self.temperature, cast_lm_head_to_fp32=args.cast_lm_head_to_fp32)
            self.ref_model = self.accelerator.prepare_model(ref_model, evaluation_mode=True)
            if args.sync_ref_model:  # (beta = 0 with sync_ref_model was refused by GRPOTrainer, as for GRPO users)
                self.add_callback(RefModelSyncCallback(self))

        self._refuse_unsupported_engines()
        if self.use_vllm and not self._grpo_only:  # vLLM samples π(θ+w), merged out of place (θ untouched by a sync)
            check_vllm_can_hold_the_policy(self.model)
            sync_merged_policy(self.vllm_generation)
        # the causal LM GRPOTrainer gave TRL's fused LM head (checked now, not at step 1, in case its layout changed)
        self._fused_lm = self.model.get_base_model() if is_peft_model(self.model) else self.model
        _fused_head_cells(self._fused_lm)
        if adapter_weights is not None:
            _load_adapter_weights(self.model, adapter_weights)
        if not self._grpo_only:
            check_exportable(self.model)  # an adapter option the final export could not merge fails now, not after training
        # θ: PEFT froze the base; unfreeze the selected weights.  w: the LoRA parameters.
        self.base_params = _select_base_params(self.model, args.trainable_base_parameters)
        if self._grpo_only:  # no PEFT: freeze what is not θ, as PEFT does
            theta = {id(p) for _, p in self.base_params}
            for p in self.model.parameters():
                p.requires_grad_(id(p) in theta)
        for _, p in self.base_params:
            p.requires_grad_(True)
        self.adapter_params = [(n, p) for n, p in self.model.named_parameters() if "lora_" in n and p.requires_grad]
        _keep_fp32_master_weights(self.model, self.base_params + self.adapter_params, autocast=args.bf16)
        # FSDP2 shards the parameters when the Trainer prepares the model (train()); θ̂ is then created sharded like θ.
        self._fsdp2 = bool(self.is_fsdp_enabled and self.accelerator.is_fsdp2)
        if self._fsdp2 and not self._grpo_only:
            # One reduce-scatter per backward: FSDP2's no_sync accumulates unsharded gradients inside FSDP, where the
            # θ/θ̂ swap of pass B cannot separate them.
            self.accelerator.gradient_state.plugin_kwargs["sync_each_batch"] = True
        # θ̂ ← θ⁰: a persistent fp32 copy of the trainable base weights only (none at λ = 1 throughout: θ̂ would be θ;
        # empty without the meta term, which never uses it). Under FSDP2 it is created sharded, in `_bind_sharded_params`.
        self._bound_sharded = False
        if self._fsdp2 or self._grpo_only:
            self.shadow_params = None
        else:
            self.shadow_params = [torch.nn.Parameter(p.detach().clone()) for _, p in self.base_params] if args.bridge_meta_term else []

        self._check_chat_template(train_dataset, sft_dataset)
        self.sft_stream = None
        if not self._grpo_only:
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
        self._reweight_after_logps = None
        # Decoder layers below every trainable weight compute the same activations in passes A and B: pass B reuses
        # pass A's output of the highest of them instead of recomputing (single process and DDP).
        self._frozen_prefix = 0 if self._fsdp2 or not args.share_frozen_activations else _frozen_prefix_length(
            self._fused_lm, [p for _, p in self.base_params + self.adapter_params])
        self._shared_acts, self._recording = [], False
        if self._frozen_prefix:
            layers = getattr(self._fused_lm, self._fused_lm.base_model_prefix).layers
            layers[self._frozen_prefix - 1].register_forward_hook(self._record_frozen_output)
        # Seconds spent in BRIDGE's own phases ("sft": pass A's SFT forward+backward, "shadow": pass B, "shadow_logps":
        # the shadow's sampling-time log-probs), read by `trl-bridge bench`; `synchronize_phases` makes them exact on CUDA.
        self.phase_seconds = collections.defaultdict(float)
        self.synchronize_phases = False
        if not self._grpo_only:
            self.add_callback(BridgeCallback(self))
        # Reliability (see `train`, `_skip_if_non_finite`, `_save_checkpoint`): numeric-fault counters, the θ gradient
        # norm of the step, the staging folder of the checkpoint being written, SIGINT/SIGTERM handling.
        self._skipped_steps = self._consecutive_skipped = 0
        self._non_finite_losses = set()
        self._base_grad_norm = 0.0
        self._staging_root = None
        self._stop_on_signal = StopOnSignal(self.accelerator)
        self.add_callback(self._stop_on_signal)

    @staticmethod
    def _adopt_peft_model(peft_model, peft_config, args):
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
        _check_adapter_config(config)
        config = copy.deepcopy(config)
        config.inference_mode = False  # a PeftModel loaded for inference still trains here, as w
        if hasattr(config, "init_lora_weights"):
            config.init_lora_weights = True  # the weights are the adapter's own (PiSSA/LoftQ init would redo it on θ)
        weights = {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model, adapter_name=name).items()}
        ref_weights = merged_state_dict(peft_model, adapter_name=name) if args.beta != 0.0 else None
        if ref_weights is not None:
            ref_weights = {k: v.detach().clone() for k, v in ref_weights.items()}
        return peft_model.unload(), config, weights, ref_weights

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """Checks everything that can be checked before step 1 (the checkpoint to resume, `output_dir`, the reward
        functions), then trains with SIGINT/SIGTERM turned into "finish the step, save a checkpoint, stop" (raising
        `TrainingInterrupted` afterwards). `resume_from_checkpoint` also accepts "last" (= True: the newest complete
        checkpoint in `output_dir`)."""
        resume_from_checkpoint = resolve_resume_from_checkpoint(resume_from_checkpoint, self.args.output_dir)
        check_output_dir(self.args.output_dir, resume_from_checkpoint, self.args.overwrite_output_dir)
        self._check_reward_funcs()
        self._check_rewards_are_finite()
        if self.args.should_save:
            if resume_from_checkpoint is None and self.args.overwrite_output_dir:
                remove_previous_run_checkpoints(self.args.output_dir)
            remove_stale_staging(self.args.output_dir)
        self.accelerator.wait_for_everyone()
        with self._stop_on_signal.installed():
            output = super().train(resume_from_checkpoint, *args, **kwargs)
        signum = self._stop_on_signal.stopped_by
        if signum is not None and self.state.global_step < self.state.max_steps:
            checkpoint = os.path.join(self._get_output_dir(None), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            raise TrainingInterrupted(signum, self.state.global_step, checkpoint if os.path.isdir(checkpoint) else None)
        if self._stop_on_signal.signum is not None:
            logger.warning("A signal arrived after the last training step: training completed.")
        return output

    @staticmethod
    def _load_model(name: str, args: BridgeConfig, quantization_config=None):
        """`model` given by name: the offline alias resolves as on the command line (`trl_bridge.models`), and a local
        folder that does not exist or a name the Hub cannot serve fails with one line naming it."""
        from .models import explain_model_load_errors, resolve_model_path

        init_kwargs = dict(args.model_init_kwargs or {})
        init_kwargs.setdefault("trust_remote_code", args.trust_remote_code)
        if quantization_config is not None:
            init_kwargs["quantization_config"] = quantization_config
        with explain_model_load_errors(name):
            model = create_model_from_path(resolve_model_path(name), **init_kwargs)
        args.model_init_kwargs = None  # consumed here; GRPOTrainer would warn that an instance ignores them
        return model

    def _refuse_unsupported_engines(self):
        """Engines BRIDGE cannot run correctly are refused here, before any step (an accelerate config sets them)."""
        if self.is_deepspeed_enabled:
            raise ValueError(
                "BridgeTrainer does not support DeepSpeed: its engine steps θ inside backward() (the shadow pass would "
                "step θ a second time) and θ̂ and w, outside its optimizer, would never have their gradients reduced. "
                "Use FSDP2: `accelerate launch --config_file configs/accelerate/fsdp2.yaml ...`."
            )
        if self.is_fsdp_enabled:
            if self.args.sync_ref_model:
                raise ValueError(
                    "BridgeTrainer does not support `sync_ref_model=True` under FSDP: the reference is synced from the "
                    "merged policy θ+w, which is not gathered from the shards for it. Set `sync_ref_model=False` (the "
                    "reference stays the initial policy) or train without FSDP."
                )
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
        """Call every reward function once on the first RL row before any step, so a broken one fails early and clearly.
        Async functions are awaited on GRPOTrainer's event loop, as in training. Skipped when a `rollout_func` or an
        `environment_factory` supplies what the reward functions read (extra fields, `environments`)."""
        if not isinstance(self.train_dataset, Dataset) or not self._probe_reward_funcs:
            return
        row = self.train_dataset[0]
        prompt = row["prompt"]
        probe = "The answer is \\boxed{0}."
        completion = [{"role": "assistant", "content": probe}] if is_conversational({"prompt": prompt}) else probe
        extra = {k: [v] for k, v in row.items() if k not in ("prompt", "completion", "completion_ids")}
        for func, name in zip(self.reward_funcs, self.reward_func_names):
            if isinstance(func, torch.nn.Module):
                continue
            kwargs = dict(prompts=[prompt], completions=[completion], completion_ids=[[0]], trainer_state=self.state,
                          log_extra=lambda *a: None, log_metric=lambda *a: None, **extra)
            try:
                out = self._call_reward_func(func, kwargs)
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

    def _call_reward_func(self, func, kwargs):
        """A reward function called as in training: async ones are awaited on GRPOTrainer's event loop."""
        if is_async_callable(func):
            return asyncio.run_coroutine_threadsafe(func(**kwargs), self.async_loop).result()
        return func(**kwargs)

    def _check_rewards_are_finite(self, num_rows: int = 8):
        """Probe every reward function on the first RL rows before step 1: ±inf is refused (TRL would zero the advantages
        of the group), and so is NaN on every row (TRL reads NaN like None, "no reward", so such a function never
        gives one), as is every function giving no reward at all on any probed row."""
        if not isinstance(self.train_dataset, Dataset) or not self._probe_reward_funcs:
            return
        rows = [self.train_dataset[i] for i in range(min(num_rows, len(self.train_dataset)))]
        probe = "The answer is \\boxed{0}."
        prompts = [row["prompt"] for row in rows]
        completions = [[{"role": "assistant", "content": probe}] if is_conversational({"prompt": p}) else probe for p in prompts]
        extra = {k: [row[k] for row in rows] for k in rows[0] if k not in ("prompt", "completion", "completion_ids")}
        rewarded = [False] * len(rows)
        for func, name in zip(self.reward_funcs, self.reward_func_names):
            if isinstance(func, torch.nn.Module):  # a reward model always scores
                rewarded = [True] * len(rows)
                continue
            try:
                out = self._call_reward_func(func, dict(
                    prompts=prompts, completions=completions, completion_ids=[[0]] * len(rows), trainer_state=self.state,
                    log_extra=lambda *a: None, log_metric=lambda *a: None, **extra))
                values = [math.nan if v is None else float(v) for v in out]
            except Exception as err:
                raise RuntimeError(f"Reward function {name!r} raised {type(err).__name__}: {err} when probed, before "
                                   f"training, with the first {len(rows)} RL rows.") from err
            if len(values) != len(rows):
                raise TypeError(f"Reward function {name!r} returned {len(values)} rewards for {len(rows)} completions.")
            if any(math.isinf(v) for v in values):
                raise ValueError(f"Reward function {name!r} returned an infinite reward ({values}) when probed, before "
                                 "training, on the first RL rows: rewards must be finite (TRL turns the group's "
                                 "advantages into NaN and then zeroes them: the group teaches nothing).")
            if all(math.isnan(v) for v in values) and any(v is not None for v in out):
                raise ValueError(f"Reward function {name!r} returned NaN for every one of the first {len(rows)} RL rows "
                                 "when probed before training: TRL reads NaN as 'no reward', so it would never reward "
                                 "anything. Return a number, or None for the rows it does not apply to.")
            rewarded = [r or not math.isnan(v) for r, v in zip(rewarded, values)]
        if not any(rewarded):
            raise ValueError(f"No reward function gave a reward (all returned None) for any of the first {len(rows)} "
                             f"RL rows when probed before training ({self.reward_func_names}): the RL loss would be zero. "
                             "Check that the reward functions apply to this dataset.")

    def _check_chat_template(self, train_dataset, sft_dataset):
        """Conversational rows need the tokenizer's chat template; without one they would fail at step 1 (RL prompts)
        or inside the tokenizer with no word of which data or setting is at fault (expert traces)."""
        if getattr(self.processing_class, "chat_template", None):
            return
        for name, dataset in (("train_dataset` (RL prompts", train_dataset), ("sft_dataset` (expert traces", sft_dataset)):
            if isinstance(dataset, Dataset) and len(dataset) and is_conversational(dataset[0]):
                raise ValueError(
                    f"`{name}) is conversational (lists of {{role, content}} messages), but the tokenizer "
                    "(`processing_class`) has no chat template to render it. Use the tokenizer of a chat/instruct model, "
                    "set `processing_class.chat_template`, or give plain-text "
                    "prompts (`prompt_style: plain` in trl-bridge train)."
                )

    # ------------------------------------------------------------------------------------------------------------
    # λ and the one-meta-step computation (BRIDGE.md §3)
    # ------------------------------------------------------------------------------------------------------------
    @property
    def bridge_lambda(self) -> float:
        return self.args.lambda_at(self.state.global_step)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._grpo_only and self.model.training:  # λ = 1 throughout: GRPO's loss alone, nothing else computed
            self._metrics["train"]["bridge/lambda"].append(1.0)
        if self._grpo_only or not self.model.training:  # evaluation: the RL loss of π(θ+w), as GRPOTrainer reports it
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        lam = self.bridge_lambda
        # Pass A. §3.2 (θ) and the first two terms of §3.4 (w): the gradient of (1−λ) L_SFT(θ,w) + λ L_RL(θ,w), as
        # two forward+backward pairs (one backward per forward, which FSDP2 needs). The SFT half is back-propagated
        # here; the Trainer back-propagates the returned λ L_RL (the detached SFT term only makes the logged loss whole).
        first_micro_batch = self._step % self.current_gradient_accumulation_steps == 0
        with self._timed("sft"):
            sft_loss = self._sft_loss(model)
            self.accelerator.backward((1.0 - lam) * sft_loss)
        if first_micro_batch:  # w's SFT gradient, for the cooperative/SFT ratio logged after pass B
            self._adapter_sft_grads = [None if p.grad is None else p.grad.detach().clone() for _, p in self.adapter_params]
        with self._recording_frozen_layers():
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
            start = self._clock()
            if self.args.bridge_meta_term:  # False: the "w/o J_meta" ablation, no shadow
                with self._timed("shadow"):
                    self._shadow_backward(model, *self._rl_inputs, lam=self.bridge_lambda)  # pass B
            self._rl_inputs = None
            if self._adapter_sft_grads is not None:
                self._log_cooperative_to_sft_ratio()
            # GRPOTrainer's `step_time` is taken inside its training_step: add pass B to it
            if self._step % self.current_gradient_accumulation_steps == 0 and self._metrics["train"]["step_time"]:
                self._metrics["train"]["step_time"][-1] += self._clock() - start
            else:
                self._current_train_step_time += self._clock() - start
        return loss

    def _shadow_backward(self, model, inputs, base_logps, lam):
        """Pass B. §3.3: ∇θ̂ L_RL(θ̂,w) into θ̂'s gradients; last term of §3.4: −λ ∇w L_RL(θ̂,w) into w.grad."""
        rows, scale = None, 1.0
        if "bridge_shadow_rows" in inputs:  # shadow_fraction < 1: the drawn prompt groups only, rescaled (unbiased)
            inputs, base_logps, rows, scale = self._shadow_subset(inputs, base_logps)
        shadow_inputs = dict(inputs)
        # The shadow's PPO ratio is against its own log-probs at sampling time when GRPOTrainer keeps old log-probs
        # (num_iterations > 1, ...), else against its current ones, detached (ratio 1), exactly as for θ.
        if inputs.get("old_per_token_logps") is not None:
            shadow_inputs["old_per_token_logps"] = inputs["shadow_old_per_token_logps"]
        if self.args.shadow_off_policy == "truncated_is":
            # rollouts come from π(θ+w): re-weight each token by min(π(θ̂+w)/π(θ+w), C), detached (BRIDGE.md §5), with
            # both policies' log-probs at sampling time. When θ and θ̂ have not moved since sampling (no old log-probs
            # kept), those are pass A's log-probs and pass B's own, applied as soon as pass B has computed them.
            behaviour = inputs.get("behaviour_per_token_logps", base_logps)
            if "shadow_old_per_token_logps" in inputs:
                shadow_inputs["advantages"] = self._truncated_is_advantages(
                    inputs["advantages"], inputs["shadow_old_per_token_logps"], behaviour
                )
            else:
                self._reweight_after_logps = (shadow_inputs, behaviour)
        with self._shadow_in_place(), self._adapter_grads_scaled(-lam), self._metrics_set_aside(), \
                self._replaying_frozen_layers(rows):
            shadow_loss, shadow_logps = self._rl_loss_and_logps(model, shadow_inputs)
            if scale != 1.0:
                shadow_loss = shadow_loss * scale
            self.accelerator.backward(shadow_loss)
        ga = self.current_gradient_accumulation_steps
        self._log_mean("bridge/rl_loss_shadow", shadow_loss.detach() * ga)
        gain = self._cooperative_gain(inputs, base_logps, shadow_logps) if scale != 0.0 else float("nan")
        self._log_mean("bridge/cooperative_gain", gain)

    def _shadow_subset(self, inputs, base_logps):
        """`shadow_fraction` < 1: the micro-batch's rows of the drawn prompt groups, and the factor that makes the
        subset's L_RL(θ̂,w) gradient unbiased for the full micro-batch's. Each row is drawn with probability f = k/G
        (k of the generation batch's G groups), so (subset loss × c) / f is unbiased, where c turns the subset loss
        into the full loss restricted to the subset (TRL normalises per row for grpo/sapo/luspo/dr_grpo, per token of
        the micro-batch for bnpo, by a batch-wide constant for dapo/cispo/vespo). A micro-batch without a drawn row
        still runs pass B on one row, at scale 0, so that every process takes part in the gradient collectives."""
        chosen = inputs["bridge_shadow_rows"]
        size = chosen.numel()
        rows = chosen.nonzero().squeeze(1)
        if rows.numel() == 0:
            rows, factor = rows.new_zeros(1), 0.0
        elif self.loss_type == "bnpo":
            mask = inputs["completion_mask"] if inputs.get("tool_mask") is None else inputs["completion_mask"] * inputs["tool_mask"]
            factor = float(mask[rows].sum().clamp(min=1.0) / mask.sum().clamp(min=1.0))
        elif self.loss_type in ("grpo", "sapo", "luspo", "dr_grpo"):
            factor = rows.numel() / size
        else:  # dapo, cispo, vespo: the normaliser is num_items_in_batch, the same for any subset
            factor = 1.0
        groups, drawn = self._shadow_groups()
        subset = {k: v[rows] if torch.is_tensor(v) and v.dim() >= 1 and v.size(0) == size else v for k, v in inputs.items()}
        return subset, base_logps[rows], rows, factor * groups / drawn

    def _shadow_groups(self) -> tuple[int, int]:
        """(G, k): prompt groups per generation batch, and how many of them the shadow pass draws."""
        groups = self.args.generation_batch_size // self.num_generations
        return groups, max(1, round(self.args.shadow_fraction * groups))

    def _draw_shadow_rows(self, group_ids):
        """Which local rollouts the shadow pass uses: the rows of k prompt groups drawn uniformly without replacement,
        seeded by the run's seed and the micro-step of generation (the same on every process; stored with the
        buffered rollouts, so a resumed run uses the same draw)."""
        groups, drawn = self._shadow_groups()
        generator = torch.Generator().manual_seed(self.args.seed * 1_000_003 + self._step)
        chosen = torch.zeros(groups, dtype=torch.bool)
        chosen[torch.randperm(groups, generator=generator)[:drawn]] = True
        return chosen.to(group_ids.device)[group_ids]

    def _truncated_is_advantages(self, advantages, shadow_logps, behaviour_logps):
        ratio = torch.exp(shadow_logps - behaviour_logps).clamp(max=self.args.shadow_is_cap)
        return (advantages.unsqueeze(1) if advantages.dim() == 1 else advantages) * ratio

    def _rl_loss_and_logps(self, model, inputs):
        """TRL's GRPO loss on the rollouts, plus the per-token log-probs it computed (detached)."""
        self._capture_logps = True
        try:
            loss = self._compute_loss(model, inputs)
        finally:
            self._capture_logps = False
        return loss, self._captured_logps

    def _sft_loss(self, model):
        """L_SFT: token-mean NLL of a batch of expert traces (prompt tokens carry label −100), scaled for accumulation.
        Through TRL's fused LM head at temperature 1: the (batch, length, vocabulary) logits are never materialised."""
        batch = {k: v.to(self.accelerator.device) for k, v in self.sft_stream.next_batch().items()}
        with self.accelerator.autocast(), _fused_head_for_sft(self._fused_lm):
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                        fused_lm_head=True)
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
        reshard(self.model)  # no unsharded FSDP2 copy may outlive the update
        max_norm = self.args.max_grad_norm if self.args.max_grad_norm and self.args.max_grad_norm > 0 else float("inf")
        shadow_norm = clip_grad_norm(self.shadow_params, max_norm)
        adapter_norm = clip_grad_norm([p for _, p in self.adapter_params], max_norm)
        self._metrics["train"]["bridge/grad_norm_shadow"].append(shadow_norm)
        self._metrics["train"]["bridge/grad_norm_adapter"].append(adapter_norm)
        if self._skip_if_non_finite(shadow_norm, adapter_norm):
            return
        self.adapter_optimizer.step()  # w ← w − β [cooperative-gain gradient]
        self.adapter_scheduler.step()
        self.adapter_optimizer.zero_grad(set_to_none=True)
        if self.shadow_optimizer is None:  # bridge_meta_term=False: no shadow
            return
        # ‖θ̂−θ‖/‖θ‖ at iterate k: ~0 means the shadow has not separated from θ, so the cooperative term vanishes and
        # BRIDGE has degenerated to naive mixing (e.g. half-precision updates rounding away).
        diff = sum_of_squares(s - p for (_, p), s in zip(self.base_params, self.shadow_params))
        norm = sum_of_squares(p for _, p in self.base_params)
        self._metrics["train"]["bridge/shadow_divergence"].append((diff / max(norm, 1e-30)) ** 0.5)
        self.shadow_optimizer.step()  # θ̂ ← θ̂ − α ∇θ̂ L_RL(θ̂,w)
        self.shadow_scheduler.step()
        self.shadow_optimizer.zero_grad(set_to_none=True)

    def _clip_grad_norm(self, model):
        """The Trainer's clipping (and its logged `grad_norm`) covers θ alone; θ̂ and w are clipped separately."""
        if self._grpo_only:
            return super()._clip_grad_norm(model)
        norm = clip_grad_norm([p for _, p in self.base_params], self.args.max_grad_norm)
        self._metrics["train"]["bridge/grad_norm_base"].append(norm)
        return norm

    def _get_grad_norm(self, model, grad_norm=None):
        if self._grpo_only:
            return super()._get_grad_norm(model, grad_norm)
        if grad_norm is None:
            grad_norm = total_grad_norm([p for _, p in self.base_params])
            self._metrics["train"]["bridge/grad_norm_base"].append(grad_norm)
        self._base_grad_norm = float(grad_norm)  # for `_skip_if_non_finite`
        return super()._get_grad_norm(model, grad_norm)

    def _skip_if_non_finite(self, shadow_norm: float, adapter_norm: float) -> bool:
        """Numeric faults. A NaN/inf in any loss (pass A or B, any process, any micro-batch) or in the gradient of θ,
        θ̂ or w skips the step for all three sets together: their gradients are dropped, so the Trainer's θ optimizer
        has nothing to apply and θ̂'s and w's are not stepped (no set moves without the others, no optimizer state sees
        the fault); the three learning-rate schedules still advance, staying in step with `global_step`. Counted in
        `bridge/skipped_steps`; more than `max_consecutive_skipped_steps` in a row stops training with an error."""
        faults = [f"loss {name}" for name in sorted(self._non_finite_losses)]
        self._non_finite_losses = set()
        for name, norm in (("θ gradient", self._base_grad_norm), ("θ̂ gradient", shadow_norm), ("w gradient", adapter_norm)):
            if not math.isfinite(norm):
                faults.append(f"{name} (norm {norm})")
        if not faults:
            self._consecutive_skipped = 0
            return False
        self._skipped_steps += 1
        self._consecutive_skipped += 1
        step, limit = self.state.global_step + 1, self.args.max_consecutive_skipped_steps
        if self._consecutive_skipped > limit:
            raise FloatingPointError(
                f"Training stopped at step {step}: {self._consecutive_skipped} steps in a row had a non-finite loss or "
                f"gradient (this one: {', '.join(faults)}), more than max_consecutive_skipped_steps={limit}. None of them "
                f"updated θ, θ̂ or w, which hold the values of step {step - self._consecutive_skipped}; the last complete "
                f"checkpoint is {latest_complete_checkpoint(self.args.output_dir)}. Look for a reward function returning "
                "inf, a learning rate at which the loss overflows, or a corrupt batch, then resume from that checkpoint."
            )
        logger.warning(
            "Step %d skipped for θ, θ̂ and w: non-finite %s (%d skipped so far, %d in a row; max_consecutive_skipped_steps"
            "=%d).", step, ", ".join(faults), self._skipped_steps, self._consecutive_skipped, limit,
        )
        for p in [p for _, p in self.base_params] + list(self.shadow_params) + [p for _, p in self.adapter_params]:
            p.grad = None
        for scheduler in (self.shadow_scheduler, self.adapter_scheduler):
            if scheduler is not None:
                scheduler.step()
        return True

    def log(self, logs, start_time=None):
        if "loss" in logs:  # a training-step log: the number of steps skipped for a numeric fault so far
            logs["bridge/skipped_steps"] = self._skipped_steps
        super().log(logs, start_time)

    def _log_cooperative_to_sft_ratio(self):
        """‖λ(∇w L_RL(θ,w) − ∇w L_RL(θ̂,w))‖ / ‖(1−λ)∇w L_SFT(θ,w)‖ on the step's first micro-batch: near 0, w is trained
        on SFT alone (BRIDGE has become LoRA-SFT)."""
        sft = self._adapter_sft_grads
        total = [p.grad for _, p in self.adapter_params]
        coop = [t if s is None else t - s for t, s in zip(total, sft) if t is not None]
        sft_sq = sum_of_squares([g for g in sft if g is not None])
        if sft_sq > 0:
            self._metrics["train"]["bridge/cooperative_to_sft_grad_ratio"].append((sum_of_squares(coop) / sft_sq) ** 0.5)
        self._adapter_sft_grads = None

    # ------------------------------------------------------------------------------------------------------------
    # Optimizers: θ in the Trainer's optimizer, θ̂ and w in their own (same class, same schedule type)
    # ------------------------------------------------------------------------------------------------------------
    def _make_optimizer(self, named_params, lr, lean: bool = False):
        decay = set(self.get_decay_parameter_names(self.model))
        groups = [
            {"params": [p for n, p in named_params if n in decay], "weight_decay": self.args.weight_decay},
            {"params": [p for n, p in named_params if n not in decay], "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
        if lean:  # shadow_storage="lean": no first moment, second moment factored into row and column statistics
            return LeanShadowOptimizer(groups, lr=lr, beta1=None, relative_step=False, scale_parameter=False,
                                        warmup_init=False)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
        return optimizer_cls(groups, **{**optimizer_kwargs, "lr": lr})

    def create_optimizer(self, model=None):
        if self._grpo_only:  # θ = every parameter that requires grad: the Trainer's own optimizer, as for GRPO
            return super().create_optimizer(model)
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
        if self._grpo_only:
            return super().create_scheduler(num_training_steps, optimizer)
        if self.lr_scheduler is None:
            self.lr_scheduler = self._make_scheduler(self.optimizer if optimizer is None else optimizer, num_training_steps)
            self._created_lr_scheduler = True
        if self.adapter_optimizer is not None:
            return self.lr_scheduler
        self._bind_sharded_params()  # called after accelerate prepared (and, under FSDP2, sharded) the model
        if self.shadow_params:
            shadow_named = list(zip([n for n, _ in self._peft_named(self.base_params)], self.shadow_params))
            self.shadow_optimizer = self._make_optimizer(shadow_named, self.args.shadow_learning_rate,
                                                         lean=self.args.shadow_storage == "lean")
            self.shadow_scheduler = self._make_scheduler(self.shadow_optimizer, num_training_steps)
        self.adapter_optimizer = self._make_optimizer(self.adapter_params, self.args.adapter_learning_rate)
        self.adapter_scheduler = self._make_scheduler(self.adapter_optimizer, num_training_steps)
        return self.lr_scheduler

    def _bind_sharded_params(self):
        """FSDP2: `fully_shard` replaced every parameter by a DTensor one. Re-bind θ and w by name, create θ̂ sharded
        exactly like θ (same mesh and placements: each rank holds its shard of θ̂ and of θ̂'s optimizer state), and
        make TRL's fused LM head, which reads `lm_head.weight` without calling `lm_head`, see the gathered weight."""
        if not self._fsdp2 or self._bound_sharded:
            return
        self._bound_sharded = True
        named = dict(self.model.named_parameters())
        by_plain = {plain_name(n): p for n, p in named.items() if "lora_" not in n}
        self.base_params = [(n, by_plain[n]) for n, _ in self.base_params]
        self.adapter_params = [(n, named[n]) for n, _ in self.adapter_params]
        self.shadow_params = [torch.nn.Parameter(p.detach().clone()) for _, p in self.base_params] \
            if self.args.bridge_meta_term else []  # θ̂ ← θ⁰, sharded
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
        if self._grpo_only:
            return output
        n_local = output["prompt_ids"].size(0)
        start = self.accelerator.process_index * n_local
        weights = self.reward_weights.to(self._last_rewards_per_func.device)
        rewards = (self._last_rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
        output["bridge_rewards"] = rewards[start : start + n_local]
        # each row's prompt group (rollouts of one prompt are consecutive in the global batch), kept through TRL's shuffle
        rows = torch.arange(start, start + n_local, device=rewards.device)
        output["bridge_group_ids"] = rows // self.num_generations
        if self.model.training and self.args.bridge_meta_term and self.args.shadow_fraction < 1.0:
            output["bridge_shadow_rows"] = self._draw_shadow_rows(output["bridge_group_ids"])
        # θ̂'s own log-probs at sampling time, only when GRPOTrainer keeps θ's (θ moves before these rollouts are used)
        if self.model.training and output.get("old_per_token_logps") is not None and self.args.bridge_meta_term:
            with self._timed("shadow_logps"), self._shadow_in_place(keep_grads=True):
                output["shadow_old_per_token_logps"] = self._no_grad_logps(output)
        if self.model.training and self.args.shadow_off_policy == "truncated_is":
            behaviour = self._behaviour_logps(output)
            if behaviour is not None:
                output["behaviour_per_token_logps"] = behaviour
        return output

    def _behaviour_logps(self, output):
        """The log-probs that truncated IS divides by: the policy the rollouts are corrected to. With vLLM and TRL's
        importance-sampling correction, TRL already re-weights every token by π(θ+w)/π_vLLM in both passes, so the
        shadow's ratio is against π(θ+w) at sampling time; with vLLM uncorrected, against vLLM's own sampling log-probs;
        otherwise against π(θ+w) at sampling time (None: pass A's log-probs, θ and w have not moved since)."""
        if self.use_vllm and not self.vllm_importance_sampling_correction:
            return output.get("sampling_per_token_logps")
        return output.get("old_per_token_logps")

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
            if self._reweight_after_logps is not None:  # pass B, truncated IS on fresh rollouts (see _shadow_backward)
                shadow_inputs, base_logps = self._reweight_after_logps
                shadow_inputs["advantages"] = self._truncated_is_advantages(shadow_inputs["advantages"], out[0].detach(), base_logps)
                self._reweight_after_logps = None
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
            reshard(self.model)
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

    def _record_frozen_output(self, module, args, output):
        if self._recording:
            self._shared_acts.append(output.detach() if torch.is_tensor(output) else output)

    @contextmanager
    def _recording_frozen_layers(self):
        """Pass A: keep the output of the highest frozen decoder layer (one per log-prob chunk) for pass B."""
        self._shared_acts = []
        self._recording = bool(self._frozen_prefix) and self.args.bridge_meta_term and self.model.training
        try:
            yield
        finally:
            self._recording = False

    @contextmanager
    def _replaying_frozen_layers(self, rows=None):
        """Pass B: the frozen decoder layers return pass A's activations instead of computing them (same rollouts,
        same weights below the first trainable layer: the same numbers); with `rows`, those rows' activations."""
        if not self._shared_acts:
            yield
            return
        layers = getattr(self._fused_lm, self._fused_lm.base_model_prefix).layers[: self._frozen_prefix]
        recorded = self._shared_acts
        if rows is not None:  # TRL's loss forward runs the micro-batch as one chunk: so does pass B on the subset
            recorded = [torch.cat(recorded)[rows]]
        acts = iter(recorded)

        def first(hidden_states, *args, **kwargs):
            out = next(acts, None)
            if out is None or out.shape != hidden_states.shape:
                raise RuntimeError("pass B's frozen-layer inputs differ from pass A's; set `share_frozen_activations: false`")
            return out

        saved = [layer.__dict__.get("forward") for layer in layers]
        for i, layer in enumerate(layers):
            layer.forward = first if i == 0 else (lambda hidden_states, *args, **kwargs: hidden_states)
        try:
            yield
        finally:
            for layer, forward in zip(layers, saved):
                del layer.forward
                if forward is not None:
                    layer.forward = forward
            self._shared_acts = []

    def _clock(self) -> float:
        if self.synchronize_phases and torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    @contextmanager
    def _timed(self, phase: str):
        start = self._clock()
        try:
            yield
        finally:
            self.phase_seconds[phase] += self._clock() - start

    def _log_mean(self, name: str, value: torch.Tensor):
        value = torch.as_tensor(value, device=self.accelerator.device, dtype=torch.float32).reshape(1)
        values = self.accelerator.gather(value)
        if name in CHECKED_LOSSES and not bool(torch.isfinite(values).all()):
            self._non_finite_losses.add(name)  # a numeric fault of this step, on some process (`_skip_if_non_finite`)
        self._metrics["train"][name].append(values.nanmean().item())

    # ------------------------------------------------------------------------------------------------------------
    # Export and checkpoints
    # ------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _sync_ref_model(self, alpha: float):
        """`sync_ref_model`: ref ← (1−α)·ref + α·π(θ+w). The policy's weights are the merged θ+w (PEFT's merge on a
        detached copy, as for the export), or the plain model's at λ = 1 throughout."""
        policy = self.accelerator.unwrap_model(self.model)
        source = merged_state_dict(policy) if is_peft_model(policy) else policy.state_dict()
        for name, p in self.accelerator.unwrap_model(self.ref_model).named_parameters():
            p.mul_(1.0 - alpha).add_(source[name].to(p.device), alpha=alpha)

    def _save_synced_ref_model(self, output_dir):
        """A synced reference is training state: the checkpoint keeps it, so a resumed run continues from it."""
        if not self.args.sync_ref_model or self.ref_model is None or not self.args.should_save:
            return
        ref = self.accelerator.unwrap_model(self.ref_model)
        save_file({n: p.detach().contiguous() for n, p in ref.named_parameters()}, os.path.join(output_dir, REF_MODEL_FILE))

    @torch.no_grad()
    def _load_synced_ref_model(self, checkpoint):
        if not self.args.sync_ref_model or self.ref_model is None:
            return
        path = os.path.join(checkpoint, REF_MODEL_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{checkpoint} has no {REF_MODEL_FILE}: it was written without `sync_ref_model`, so the synced KL "
                "reference cannot be restored. Resume with the settings the checkpoint was written with."
            )
        saved = load_file(path)
        for name, p in self.accelerator.unwrap_model(self.ref_model).named_parameters():
            p.copy_(saved[name].to(p.device, p.dtype))

    def shadow_state_dict(self) -> dict[str, torch.Tensor]:
        """θ̂, keyed like the plain base model's state dict (only the trainable weights have a shadow). Full tensors
        (under FSDP2 every rank must call it: the shards are gathered). At λ = 1 throughout θ̂ is θ (no copy is kept)."""
        if self._grpo_only:
            return {name: full_tensor(p).clone() for name, p in self.base_params}
        return {name: full_tensor(s).clone() for (name, _), s in zip(self.base_params, self.shadow_params)}

    def _save(self, output_dir=None, state_dict=None):
        """`save_model` writes the merged policy π(θ+w) as a plain model folder (loadable with AutoModelForCausalLM)."""
        if self._grpo_only:  # a plain model (no adapter): the Trainer's own save
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        # Under FSDP2 the Trainer passes the gathered full state dict of the PEFT model; else the live model is read.
        save_merged_model(self.accelerator.unwrap_model(self.model), self.processing_class, output_dir, state_dict=state_dict)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def create_model_card(self, model_name=None, dataset_name=None, tags=None, **kwargs):
        """The model card names BRIDGE (with the citation), the base model, the task, data, hyper-parameters, a summary
        (held-out accuracy before → after when measured, mean reward over the last quarter of training) and usage."""
        if not self.is_world_process_zero():
            return
        from .reporting import training_summary, write_model_card

        hparams = {k: getattr(self.args, k) for k in CARD_HYPERPARAMETERS}
        summary = training_summary(self.state.log_history, fraction=0.25, keys=CARD_METRICS)
        datasets = self.card_datasets or ([dataset_name] if isinstance(dataset_name, str) else list(dataset_name or []))
        pushed = self.args.push_to_hub and self.args.hub_model_id
        write_model_card(
            self.args.output_dir,
            base_model=self.card_base_model or getattr(self, "_given_model_name", None)
            or _model_name(self.accelerator.unwrap_model(self.model)),
            datasets=datasets,
            hyperparameters=hparams,
            final_metrics=summary["last"],
            eval_results=self.card_eval_results,
            model_name=model_name,
            summary=summary,
            heldout=self.card_heldout,
            task=self.card_task,
            usage_model=self.args.hub_model_id if pushed else None,
        )

    def _bridge_tensors(self) -> dict[str, torch.Tensor]:
        """θ, θ̂ and w as full tensors (gathered from every rank under FSDP2: all ranks must call it)."""
        tensors = {f"base.{n}": full_tensor(p).contiguous() for n, p in self.base_params}
        tensors.update({f"shadow.{n}": full_tensor(s).contiguous() for (n, _), s in zip(self.base_params, self.shadow_params)})
        tensors.update({f"adapter.{n}": full_tensor(p).contiguous() for n, p in self.adapter_params})
        return tensors

    def _optimizers(self):
        optimizers = {"base": self.optimizer, "shadow": self.shadow_optimizer, "adapter": self.adapter_optimizer}
        return {k: v for k, v in optimizers.items() if v is not None}

    def _save_optimizer_and_scheduler(self, output_dir):
        """All three optimizers and schedules in one engine-independent file (full tensors), so a checkpoint written
        under FSDP2 resumes under FSDP2 or in one process, and vice versa."""
        self._save_synced_ref_model(output_dir)
        if self._grpo_only:  # θ alone, in the Trainer's optimizer: its own files (and GRPOTrainer's rollout buffer)
            self._save_rollout_buffer(output_dir)
            return super()._save_optimizer_and_scheduler(output_dir)
        tensors = self._bridge_tensors()
        optimizers = {f"{k}_optimizer": full_optimizer_state(opt) for k, opt in self._optimizers().items()}
        self._save_rollout_buffer(output_dir)  # every process writes its own
        if not self.args.should_save:
            return
        save_file(tensors, os.path.join(output_dir, BRIDGE_STATE_FILE))
        torch.save(
            {
                **optimizers,
                "base_scheduler": self.lr_scheduler.state_dict(),
                "shadow_scheduler": None if self.shadow_scheduler is None else self.shadow_scheduler.state_dict(),
                "adapter_scheduler": self.adapter_scheduler.state_dict(),
                "sft_stream": self.sft_stream.state_dict(),
                "numeric_faults": {"skipped": self._skipped_steps, "consecutive": self._consecutive_skipped},
            },
            os.path.join(output_dir, BRIDGE_OPTIM_FILE),
        )

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if self._grpo_only:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, BRIDGE_STATE_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{resume_from_checkpoint} is not a BRIDGE checkpoint: {BRIDGE_STATE_FILE} is missing.")
        saved = load_file(path)
        expected = self._bridge_tensors()
        missing = sorted(set(expected) - set(saved))
        if missing:
            raise ValueError(f"{path} does not match this model/config; missing e.g. {missing[:3]}")
        for n, p in self.base_params:
            assign_full(p, saved[f"base.{n}"])
        for (n, _), s in zip(self.base_params, self.shadow_params):
            assign_full(s, saved[f"shadow.{n}"])
        for n, p in self.adapter_params:
            assign_full(p, saved[f"adapter.{n}"])

    def _load_optimizer_and_scheduler(self, checkpoint):
        if checkpoint is None:
            return
        self._load_synced_ref_model(checkpoint)
        if self._grpo_only:
            self._load_rollout_buffer(checkpoint)
            return super()._load_optimizer_and_scheduler(checkpoint)
        state = torch.load(os.path.join(checkpoint, BRIDGE_OPTIM_FILE), map_location="cpu", weights_only=False)
        for key, opt in self._optimizers().items():
            load_full_optimizer_state(opt, state[f"{key}_optimizer"])
        self.lr_scheduler.load_state_dict(state["base_scheduler"])
        if self.shadow_scheduler is not None:
            self.shadow_scheduler.load_state_dict(state["shadow_scheduler"])
        self.adapter_scheduler.load_state_dict(state["adapter_scheduler"])
        self.sft_stream.load_state_dict(state["sft_stream"])
        faults = state.get("numeric_faults", {})
        self._skipped_steps, self._consecutive_skipped = faults.get("skipped", 0), faults.get("consecutive", 0)
        self._load_rollout_buffer(checkpoint)

    def _save_rollout_buffer(self, output_dir):
        """GRPOTrainer generates once every `steps_per_generation × num_iterations` micro-steps and buffers the rollouts
        in between (`_buffered_inputs`, indexed by its micro-step counter `_step`). A checkpoint inside that window
        carries both, or the resumed run would sample new rollouts where the uninterrupted one reuses the buffered ones."""
        state = {
            "step": self._step,
            "world_size": self.accelerator.num_processes,
            "buffered_inputs": _to_device(self._buffered_inputs, "cpu"),
            **{k: _to_device(getattr(self, k), "cpu") for k in ENTROPY_STATE if hasattr(self, k)},
        }
        os.makedirs(output_dir, exist_ok=True)
        torch.save(state, os.path.join(output_dir, BRIDGE_ROLLOUTS_FILE.format(self.accelerator.process_index)))

    def _load_rollout_buffer(self, checkpoint):
        path = os.path.join(checkpoint, BRIDGE_ROLLOUTS_FILE.format(self.accelerator.process_index))
        state = torch.load(path, map_location="cpu", weights_only=False) if os.path.isfile(path) else None
        if state is not None and state["world_size"] == self.accelerator.num_processes:
            self._step = state["step"]
            self._buffered_inputs = _to_device(state["buffered_inputs"], self.accelerator.device)
            for k in ENTROPY_STATE:
                if k in state:
                    setattr(self, k, _to_device(state[k], self.accelerator.device))
            return
        # No buffer for this process (a checkpoint of an older version, or written by another number of processes).
        self._step = state["step"] if state is not None else self.state.global_step * self.args.gradient_accumulation_steps
        self._buffered_inputs = None  # GRPOTrainer generates anew on the next micro-step
        if self._step % (self.args.steps_per_generation * self.num_iterations) != 0:
            logger.warning(
                "%s falls inside a generation batch, but its buffered rollouts cannot be used here (%s): new rollouts "
                "are sampled, so this resumed run will differ from an uninterrupted one.", checkpoint,
                "written by another number of processes" if state is not None else f"{os.path.basename(path)} missing",
            )

    def _get_train_sampler(self, dataset=None):
        return epoch_exact_sampler(super()._get_train_sampler(dataset), lambda: self.state.epoch)

    def _save_checkpoint(self, model, trial):
        """Atomic checkpoints. The Trainer (and GRPOTrainer) write `checkpoint-N` as usual, but inside the staging folder
        `tmp-checkpoint-N` (`_get_output_dir` points there meanwhile); once every process has written its files they are
        flushed to disk and the folder is renamed into place, so a process killed mid-write (kill -9, a node lost)
        leaves a `tmp-` folder, never a `checkpoint-N` that looks complete but is not. The Hub upload and the rotation
        (`save_total_limit`) run after the rename, on the published folder."""
        run_dir = self._get_output_dir(trial=trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = staging_dir(run_dir, self.state.global_step)
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)  # left by a process killed while writing this very step
        self.accelerator.wait_for_everyone()
        push = self.args.push_to_hub
        self._staging_root, self.args.push_to_hub = staging, False
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_root, self.args.push_to_hub = None, push
        written, final = os.path.join(staging, name), os.path.join(run_dir, name)
        if self.state.best_model_checkpoint == written:  # this step is the best so far: point at where it will be
            self.state.best_model_checkpoint = final
            if self.args.should_save:
                self.state.save_to_json(os.path.join(written, "trainer_state.json"))
        self.accelerator.wait_for_everyone()  # every process's files (RNG states, rollouts) are in
        if self.args.should_save:
            publish_checkpoint(written, final)
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        if push:
            self._push_from_checkpoint(final)
        if self.args.should_save:
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)

    def _get_output_dir(self, trial):
        return self._staging_root if getattr(self, "_staging_root", None) else super()._get_output_dir(trial)


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


def _check_one_generation_batch(train_dataset: Dataset, args: BridgeConfig):
    """TRL's sampler only yields whole generation batches: with fewer distinct prompts than one batch needs, the epoch
    is empty and training stops at step 0, saving an untrained model. Refuse that before anything is built."""
    needed = args.generation_batch_size // args.num_generations
    if len(train_dataset) < needed:
        raise ValueError(
            f"`train_dataset` has {len(train_dataset)} prompts, but one generation batch needs {needed} distinct prompts "
            f"(generation_batch_size {args.generation_batch_size} = per_device_train_batch_size "
            f"{args.per_device_train_batch_size} x {args.world_size} process(es) x steps_per_generation "
            f"{args.steps_per_generation}, divided by num_generations {args.num_generations}); with fewer, no batch is "
            "ever drawn and nothing trains. Add prompts, or lower per_device_train_batch_size / steps_per_generation."
        )


# ----------------------------------------------------------------------------------------------------------------------
# Precision and model-structure helpers (the FSDP2/DTensor helpers are in `fsdp2.py`)
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


def _frozen_prefix_length(causal_lm, trainable) -> int:
    """The number L of decoder layers below every trainable parameter, when all of them sit in layers ≥ L or in the
    final norm / output head (0 otherwise: then nothing is shared)."""
    backbone = getattr(causal_lm, causal_lm.base_model_prefix, None)
    layers = getattr(backbone, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        return 0
    layer_of = {id(p): i for i, layer in enumerate(layers) for p in layer.parameters()}
    above = {id(p) for m in (getattr(backbone, "norm", None), causal_lm.get_output_embeddings()) if m is not None
             for p in m.parameters()}
    above -= {id(p) for p in causal_lm.get_input_embeddings().parameters()}  # tied head: the embedding trains
    if any(id(p) not in layer_of and id(p) not in above for p in trainable):
        return 0
    return min((layer_of[id(p)] for p in trainable if id(p) in layer_of), default=0)


def _fused_head_cells(causal_lm) -> dict:
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
def _fused_head_for_sft(causal_lm):
    """GRPOTrainer patched the fused head at the sampling temperature and with entropies; L_SFT is the NLL at
    temperature 1 and needs log-probs only. The kernel reads both when called (and saves them for its backward)."""
    cells = _fused_head_cells(causal_lm)
    saved = cells["temperature"].cell_contents, cells["outputs"].cell_contents
    cells["temperature"].cell_contents, cells["outputs"].cell_contents = 1.0, ("log_probs",)
    try:
        yield
    finally:
        cells["temperature"].cell_contents, cells["outputs"].cell_contents = saved


def _to_device(obj, device):
    """`obj` with every tensor in it (nested dicts, lists, tuples) moved to `device`."""
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def _check_lora_targets(model, peft_config, field: str):
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


def _model_name(peft_model) -> str:
    """The base model's Hub name or path; a model built from a config has none, so name its class."""
    base = peft_model.get_base_model() if is_peft_model(peft_model) else peft_model
    return base.config._name_or_path or f"{type(base).__name__} (built from a config)"


def _check_adapter_config(peft_config):
    for field in ("modules_to_save", "trainable_token_indices"):
        if getattr(peft_config, field, None):
            raise ValueError(
                f"`peft_config.{field}` is not supported by BridgeTrainer: BRIDGE trains the base weights θ in full "
                "(select them with `trainable_base_parameters`), so a second trainable copy inside the adapter w "
                "would have no shadow and no defined update. Leave it unset."
            )


def _load_adapter_weights(peft_model, weights):
    """Load a PeftModel's adapter weights (keys without the adapter name) into w, the adapter named "default"."""
    result = set_peft_model_state_dict(peft_model, weights, adapter_name="default")
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        raise ValueError(
            f"The PeftModel's adapter weights do not fit the re-created adapter w: unexpected {result.unexpected_keys[:3]}, "
            f"missing {missing[:3]}."
        )


@contextmanager
def _fields_overridden(args, **values):
    """Set config fields for the duration of the block (GRPOTrainer.__init__), then restore them."""
    saved = {k: getattr(args, k) for k in values}
    for k, v in values.items():
        setattr(args, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(args, k, v)


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
