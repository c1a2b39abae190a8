"""BRIDGE on top of TRL's GRPOTrainer, read top to bottom against BRIDGE.md §3 (the paper's Algorithm 2).

    θ  — the base weights (all, or `trainable_base_parameters`); trained by the Trainer's own optimizer.
    w  — the LoRA adapter (PEFT); the policy is π(θ+w).
    θ̂  — the RL-only shadow: a persistent copy of the trainable base weights, initialised to θ⁰.

One meta-step, all gradients at iterate k, in the order of this file:
  1. rollouts               GRPOTrainer samples once from π(θ+w), scores, computes group advantages (unchanged)
  2. pass A (θ and w)       ∇ of (1−λ) L_SFT(θ,w) + λ L_RL(θ,w)       → θ.grad, and w.grad's first two terms
  3. pass B (θ̂ and w)       ∇ of L_RL(θ̂,w) on the same rollouts        → θ̂.grad, and −λ ∇w L_RL(θ̂,w) into w.grad
  4. the three updates      θ ← θ − α [(1−λ) ∇θ L_SFT(θ,w) + λ ∇θ L_RL(θ,w)]                           (§3.2)
                            θ̂ ← θ̂ − α ∇θ̂ L_RL(θ̂,w)                                                    (§3.3)
                            w ← w − β [(1−λ) ∇w L_SFT(θ,w) + λ (∇w L_RL(θ,w) − ∇w L_RL(θ̂,w))]          (§3.4)
  5. the cooperative gain   J_RL(θ,w) − J_RL(θ̂,w), estimated on the shared rollouts and logged

Passes A (its RL half, then its SFT half) and B are ordinary forward+backward pairs through the wrapped model (DDP
all-reduces and FSDP2 reduce-scatters each parameter once per backward); pass B swaps θ̂ into the base parameters'
storage (`gradient_routing`). `BridgeCallback` applies the θ̂ and w updates between the Trainer's backward and its θ
step. With θ̂ stored as a delta from θ, θ steps weight by weight beside θ̂ — or, at one micro-batch per step, right
after pass A, so that pass B holds no gradient of θ (pass B never reads θ). Everything else is a call into a module
named for what it does: `model_setup` (the policy, θ's and w's selection, fp32 master weights), `checks` (arguments,
datasets and refusals before step 1), `frozen_replay`, `shadow_fraction` and `shadow_off_policy` (pass B's options),
`optimizers`, `numeric_faults`, `reference` (the KL reference), `persistence` (export, model card and checkpoint
hooks, with `checkpoint_state` and `checkpointing`), `delta_shadow` (θ̂ stored as a bf16 delta from θ), `baselines`
(CHORD, LUFFY), and the engines (`fsdp2`, `vllm_sync`, `export`).
"""

from __future__ import annotations

import math
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field

from ..compat import check_versions

check_versions()  # before trl is imported: an untested trl/transformers fails here, naming the tested range

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset, IterableDataset
from transformers import TrainerCallback
from trl import GRPOTrainer

from ..engines.export import check_exportable
from ..engines.fsdp2 import clip_grad_norm, gather_output_head_with_backbone, reshard, sum_of_squares, total_grad_norm
from ..engines.vllm_sync import check_vllm_can_hold_the_policy, keep_vllm_cpu_weights_live, sync_merged_policy
from ..profiling import PhaseTimer
from . import checks, model_setup
from .baselines import ExpertTraces, chord_phi_nll_sum, luffy_reweight
from .bridge_config import BridgeConfig
from .checkpoint_state import ENTROPY_STATE, BridgeState
from .checkpointing import StopOnSignal, check_output_dir, clear_output_dir, resolve_resume_from_checkpoint
from .delta_shadow import DeltaShadow
from .frozen_replay import FrozenPrefixReplay, frozen_prefix_length
from .gradient_routing import grads_added_with_scale, grads_captured, shadow_in_place, side_effects_set_aside
from .numeric_faults import NumericFaultGuard
from .optimizers import make_optimizer, make_scheduler
from .persistence import PersistenceHooks
from .reference import attach_reference, frozen_reference
from .sft_stream import SFTStream, tokenize_sft_dataset
from .shadow_off_policy import behaviour_logps, reweight_shadow_advantages
from .shadow_fraction import draw_shadow_rows, shadow_subset


@dataclass
class StepRecord:
    """The values that pass between GRPOTrainer's hooks inside one micro-step, in one place. Each field is set and
    read in the order below and cleared by its reader, so nothing outlives the micro-step that made it.

    rewards_per_func   `_calculate_rewards` → `_generate_and_score_completions` (the same generation): every
                       function's reward of every rollout, for the cooperative-gain estimate.
    rl_inputs          pass A (`compute_loss`) → pass B (`training_step`): the micro-batch's rollouts.
    base_logps         pass A → pass B: π(θ+w)'s per-token log-probs of those rollouts (detached).
    adapter_sft_grads  pass A on an optimizer step's first micro-batch → after pass B: w's SFT gradient, for the
                       logged cooperative/SFT gradient ratio.
    capturing, logps   `_rl_loss_and_logps` ↔ `_get_per_token_logps_and_entropies`: TRL's loss computes the
                       log-probs inside; the override stores them here while `capturing`.
    on_logps           a re-weighting of the advantages that needs the log-probs of this very forward, applied by
                       `_get_per_token_logps_and_entropies` as soon as they exist, before TRL's loss uses the advantages:
                       pass B with truncated IS on fresh rollouts (by π(θ̂+w)/π(θ+w)), and LUFFY's expert tokens.
    off_policy_rows    `_generate` → `_generate_and_score_completions` (LUFFY): which local rollouts are expert traces.
    sft_window         drawn at an optimizer step's first micro-batch, one SFT batch popped per micro-batch
                       (`_sft_loss`); sft_window_tokens: their completion tokens per process, L_SFT's normaliser.
    theta_stepped      `_step_theta_before_pass_b` → the Trainer's clipping and the updates: θ's gradient norm and
                       ‖θ̂−θ‖/‖θ‖, when θ has already stepped (bf16_delta, one micro-batch per step).
    """

    rewards_per_func: torch.Tensor | None = None
    rl_inputs: dict | None = None
    base_logps: torch.Tensor | None = None
    adapter_sft_grads: list | None = None
    capturing: bool = False
    logps: torch.Tensor | None = None
    on_logps: object = field(default=None, repr=False)
    off_policy_rows: list | None = None
    sft_window: list = field(default_factory=list)
    sft_window_tokens: float = 1.0
    theta_stepped: tuple | None = None


class BridgeCallback(TrainerCallback):
    """Runs the shadow (§3.3) and adapter (§3.4) updates between the fused base-model steps (§3.2)."""

    def __init__(self, trainer: "BridgeTrainer"):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._apply_shadow_and_adapter_updates()


class BridgeTrainer(PersistenceHooks, GRPOTrainer):
    """
    Trainer for BRIDGE (Chen et al., "Beyond Two-Stage Training: Cooperative SFT and RL for LLM Reasoning",
    arXiv:2509.06948): cooperative SFT + RL with a fused base θ, an RL-only shadow θ̂ and a LoRA adapter w trained on
    the cooperative gain.

    A drop-in replacement for [`~trl.GRPOTrainer`] (its parameters, in its order) that takes one more dataset, the
    keyword-only `sft_dataset` (expert reasoning traces in any TRL SFT format). Rollout generation, reward computation
    and advantages are GRPOTrainer's, unchanged. What changes, and why:
      * `compute_loss` (pass A) and `training_step` (pass B): the two gradients of the meta-step.
      * `_calculate_rewards`, `_generate_and_score_completions`, `_get_per_token_logps_and_entropies`: keep what pass
        B and the cooperative-gain estimate need (rewards, group ids, both passes' log-probs, the shadow's sampling-time
        log-probs when GRPOTrainer keeps old log-probs or `shadow_off_policy="truncated_is"`).
      * `create_optimizer`, `create_scheduler`, `_clip_grad_norm`, `_get_grad_norm`: the Trainer's optimizer and
        clipping act on θ alone; θ̂ and w get their own optimizers, schedules and clipping (`BridgeCallback`).
      * `__init__` and `train`: build w, θ̂, the SFT stream and a frozen KL reference, and check everything that can
        be checked before step 1 (`checks`); SIGINT/SIGTERM end training with a checkpoint (`TrainingInterrupted`).
      * `PersistenceHooks` (`persistence`): `_save`, `_save_optimizer_and_scheduler`, `_load_from_checkpoint`,
        `_load_optimizer_and_scheduler`, `_save_checkpoint`, `_get_output_dir`, `_get_train_sampler`,
        `create_model_card`: the merged π(θ+w) export, atomic engine-independent checkpoints (exact resume anywhere, in
        any epoch of the RL prompts) and BRIDGE's model card; `shadow_state_dict` returns θ̂.
    At λ = 1 for the whole run none of BRIDGE is built: the run is GRPOTrainer's own. With `use_vllm=True`, vLLM is
    sent π(θ+w) merged out of place (`vllm_sync`): TRL's in-place merge/unmerge would move θ by float rounding.
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
        args = checks.check_arguments(model, args, train_dataset, sft_dataset, optimizers, environment_factory)
        # λ = 1 for the whole run is GRPO exactly (no SFT term; θ̂ stays θ; w's gradient is zero): run GRPO alone.
        self._grpo_only = args.lambda_is_always_one()

        # The policy π(θ+w): a PeftModel passed in supplies w (its base weights are θ); else w is the `lora_*` adapter.
        if isinstance(model, str):
            model = model_setup.load_model(model, args, quantization_config)
            quantization_config = None  # consumed here, as GRPOTrainer does
        adapter_weights = ref_weights = None
        if is_peft_model(model):
            model, peft_config, adapter_weights, ref_weights = model_setup.adopt_peft_model(model, peft_config, args)
        # KL reference (beta > 0): the initial policy π(θ⁰+w⁰) = π(θ⁰) (LoRA B starts at zero; a PeftModel's trained
        # adapter is merged in), frozen; GRPOTrainer is told beta = 0 so that it loads no reference of its own.
        ref_model = frozen_reference(model, ref_weights) if args.beta != 0.0 else None
        peft_config = model_setup.resolve_peft_config(model, peft_config, args, self._grpo_only)
        if args.use_vllm and args.vllm_mode == "colocate":
            keep_vllm_cpu_weights_live()  # vLLM on CPU: weight syncs must reach live weights (a no-op on GPUs)
        overrides = dict(beta=0.0, sync_ref_model=False) if args.beta != 0.0 else {}
        with model_setup.fields_overridden(args, **overrides):
            super().__init__(
                model=model, reward_funcs=reward_funcs, args=args, train_dataset=train_dataset,
                eval_dataset=eval_dataset, processing_class=processing_class,
                reward_processing_classes=reward_processing_classes, callbacks=callbacks,
                quantization_config=quantization_config, peft_config=peft_config, tools=tools,
                rollout_func=rollout_func, environment_factory=environment_factory,
            )
        self.beta = args.beta
        self.probe_reward_funcs_before_training = rollout_func is None and environment_factory is None
        if ref_model is not None:
            attach_reference(self, ref_model)
        checks.refuse_unsupported_engines(self)
        if self.use_vllm and not self._grpo_only:  # vLLM samples π(θ+w), merged out of place (θ untouched by a sync)
            check_vllm_can_hold_the_policy(self.model)
            sync_merged_policy(self.vllm_generation)
        # the causal LM GRPOTrainer gave TRL's fused LM head (checked now, not at step 1, in case its layout changed)
        self._fused_lm = self.model.get_base_model() if is_peft_model(self.model) else self.model
        model_setup.fused_head_cells(self._fused_lm)
        if adapter_weights is not None:
            model_setup.load_adapter_weights(self.model, adapter_weights)
        if not self._grpo_only:
            check_exportable(self.model)  # an adapter option the final export could not merge fails now, not after training

        # θ: the selected base weights, trainable; w: the LoRA parameters (both fp32 master weights)
        self.base_params, self.adapter_params = model_setup.trainable_sets(self.model, args, self._grpo_only)
        self._fsdp2 = bool(self.is_fsdp_enabled and self.accelerator.is_fsdp2)
        if self._fsdp2 and not self._grpo_only:
            # One reduce-scatter per backward: FSDP2's no_sync accumulates unsharded gradients inside FSDP, where the
            # θ/θ̂ swap of pass B cannot separate them.
            self.accelerator.gradient_state.plugin_kwargs["sync_each_batch"] = True
        if args.shadow_storage == "bf16_delta" and not self._grpo_only:  # θ̂'s gradient accumulates outside DDP
            self.accelerator.gradient_state.plugin_kwargs["sync_each_batch"] = True
        # θ̂ ← θ⁰: a persistent fp32 copy of the trainable base weights only (none at λ = 1 throughout: θ̂ would be θ;
        # empty without the meta term, which never uses it). FSDP2 shards the model in train(): θ̂ is created sharded
        # like θ then (`_bind_sharded_params`).
        self._bound_sharded = False
        self.delta_shadow = None  # shadow_storage="bf16_delta": θ̂ = θ + d (`delta_shadow`)
        if self._fsdp2 or self._grpo_only:
            self.shadow_params = None
        else:
            self.shadow_params = self._new_shadow() if args.bridge_meta_term else []

        # L_SFT's data: TRL's SFT tokenisation, then an endless seeded resumable stream of batches.
        checks.check_chat_template(self.processing_class, train_dataset, sft_dataset)
        self.sft_stream = None
        if not self._grpo_only:
            self.sft_stream = SFTStream(
                tokenize_sft_dataset(sft_dataset, self._tokenizer, args.sft_max_length),
                pad_token_id=self._tokenizer.pad_token_id, batch_size=args.sft_per_device_train_batch_size,
                seed=args.seed, rank=self.accelerator.process_index, world_size=self.accelerator.num_processes,
            )
        # LUFFY (a baseline, `baselines`): each RL prompt's expert trace, injected into its group of rollouts.
        self._expert_traces = ExpertTraces.for_luffy(args, sft_dataset, train_dataset, self._tokenizer,
                                                     own_generation=self.probe_reward_funcs_before_training and not tools)
        self.shadow_optimizer = self.adapter_optimizer = None
        self.shadow_scheduler = self.adapter_scheduler = None
        self._record = StepRecord()
        # Decoder layers below every trainable weight compute the same activations in passes A and B: pass B reuses
        # pass A's output of the highest of them instead of recomputing (single process and DDP).
        self._frozen_prefix = 0 if self._fsdp2 or not args.share_frozen_activations else frozen_prefix_length(
            self._fused_lm, [p for _, p in self.base_params + self.adapter_params])
        self._frozen_replay = FrozenPrefixReplay(self._fused_lm, self._frozen_prefix)
        self.phases = PhaseTimer()  # seconds per phase of the step, read by `trl-bridge bench`
        if not self._grpo_only:
            self.add_callback(BridgeCallback(self))
        self.numeric_faults = NumericFaultGuard(args.max_consecutive_skipped_steps, args.output_dir)
        self.checkpoint_state = BridgeState(self)
        self._staging_root = None
        self._stop_on_signal = StopOnSignal(self.accelerator)
        self.add_callback(self._stop_on_signal)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """Checks everything that can be checked before step 1 (the checkpoint to resume, `output_dir`, the reward
        functions), then trains with SIGINT/SIGTERM turned into "finish the step, save a checkpoint, stop" (raising
        `TrainingInterrupted` afterwards). `resume_from_checkpoint` also accepts "last" (= True: the newest complete
        checkpoint in `output_dir`)."""
        resume_from_checkpoint = resolve_resume_from_checkpoint(resume_from_checkpoint, self.args.output_dir)
        check_output_dir(self.args.output_dir, resume_from_checkpoint, self.args.overwrite_output_dir)
        checks.probe_reward_funcs(self)
        clear_output_dir(self.args, resume_from_checkpoint)
        self.accelerator.wait_for_everyone()
        with self._stop_on_signal.installed():
            output = super().train(resume_from_checkpoint, *args, **kwargs)
        self._stop_on_signal.raise_if_stopped(self)
        return output

    @property
    def bridge_lambda(self) -> float:
        """λ at the current optimizer step (constant, scheduled, or alternating; `BridgeConfig.lambda_at`)."""
        return self.args.lambda_at(self.state.global_step)

    # ------------------------------------------------------------------------------------------------------------
    # 1. Rollouts, once, from π(θ+w): GRPOTrainer's, plus what pass B and the gain estimate need
    # ------------------------------------------------------------------------------------------------------------
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        self._record.rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        return self._record.rewards_per_func

    def _generate(self, prompts):
        """GRPOTrainer's generation; with `luffy`, the last rollout of each group is the prompt's expert trace."""
        out = super()._generate(prompts)
        if self._expert_traces is None or not self.model.training:
            return out
        prompt_ids, completion_ids, tool_mask, completions, logprobs, *rest = out
        first_row = self.accelerator.process_index * len(prompts)
        completion_ids, completions, self._record.off_policy_rows = self._expert_traces.inject(
            prompts, completion_ids, completions, first_row, self.num_generations)
        return (prompt_ids, completion_ids, tool_mask, completions, logprobs, *rest)

    def _generate_and_score_completions(self, inputs):
        with self.phases("generation"):
            output = super()._generate_and_score_completions(inputs)
        if self._record.off_policy_rows is not None:  # LUFFY: which rows are expert traces (kept through TRL's shuffle)
            rows, self._record.off_policy_rows = self._record.off_policy_rows, None
            output["luffy_off_policy"] = torch.tensor(rows, dtype=torch.bool, device=output["prompt_ids"].device)
        if self._grpo_only:
            return output
        n_local = output["prompt_ids"].size(0)
        start = self.accelerator.process_index * n_local
        rewards_per_func, self._record.rewards_per_func = self._record.rewards_per_func, None
        weights = self.reward_weights.to(rewards_per_func.device)
        rewards = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
        output["bridge_rewards"] = rewards[start : start + n_local]
        # each row's prompt group (rollouts of one prompt are consecutive in the global batch), kept through TRL's shuffle
        rows = torch.arange(start, start + n_local, device=rewards.device)
        output["bridge_group_ids"] = rows // self.num_generations
        if self.model.training and self.args.bridge_meta_term and self.args.shadow_fraction < 1.0:
            output["bridge_shadow_rows"] = self._draw_shadow_rows(output["bridge_group_ids"])
        # θ̂'s own log-probs at sampling time, only when GRPOTrainer keeps θ's (θ moves before these rollouts are used)
        if self.model.training and output.get("old_per_token_logps") is not None and self.args.bridge_meta_term:
            with self.phases("shadow_logps"), self._shadow_in_place(keep_grads=True):
                output["shadow_old_per_token_logps"] = self._no_grad_logps(output)
        if self.model.training and self.args.shadow_off_policy == "truncated_is":
            behaviour = behaviour_logps(output, self.use_vllm, self.vllm_importance_sampling_correction)
            if behaviour is not None:
                output["behaviour_per_token_logps"] = behaviour
        return output

    def _shadow_groups(self) -> tuple[int, int]:
        """(G, k): prompt groups per generation batch, and how many of them the shadow pass draws (`shadow_fraction`)."""
        groups = self.args.generation_batch_size // self.num_generations
        return groups, max(1, round(self.args.shadow_fraction * groups))

    def _draw_shadow_rows(self, group_ids):
        """Which local rollouts pass B uses (`shadow_fraction`): whole prompt groups, seeded and resumable."""
        return draw_shadow_rows(group_ids, *self._shadow_groups(), self.args.seed, self._step)

    @torch.no_grad()
    def _no_grad_logps(self, batch):
        input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        logps, _, _ = super()._get_per_token_logps_and_entropies(
            self.model, input_ids, attention_mask, batch["completion_ids"].size(1),
            batch_size=self.args.per_device_train_batch_size,
        )
        return logps

    # ------------------------------------------------------------------------------------------------------------
    # 2. Pass A: ∇ of (1−λ) L_SFT(θ,w) + λ L_RL(θ,w) into θ.grad (§3.2) and w.grad (§3.4, first two terms)
    # ------------------------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._grpo_only and self.model.training:  # λ = 1 throughout: GRPO's loss alone, nothing else computed
            self._metrics["train"]["bridge/lambda"].append(1.0)
        if "luffy_off_policy" in inputs and self.model.training:  # LUFFY's expert tokens: f(π)'s gradient (`baselines`)
            inputs = dict(inputs)  # the loss's own copy: the buffered batch is reused by later iterations
            self._record.on_logps = lambda logps: luffy_reweight(inputs, logps, self.args.luffy_gamma)
        if self._grpo_only or not self.model.training:  # evaluation: the RL loss of π(θ+w), as GRPOTrainer reports it
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        lam = self.bridge_lambda
        # Two forward+backward pairs (one backward per forward, which FSDP2 needs): the Trainer back-propagates the
        # returned λ L_RL; the SFT half follows in `training_step` (`_sft_backward`), once the RL half's activations
        # are freed, so that θ's gradient and the RL backward's activations are never held whole at once.
        with self._frozen_replay.recording(self.args.bridge_meta_term and self.model.training):
            rl_loss, base_logps = self._rl_loss_and_logps(model, inputs)
        self._record.rl_inputs, self._record.base_logps = inputs, base_logps
        ga = self.current_gradient_accumulation_steps
        self._log_mean("bridge/rl_loss", rl_loss.detach() * ga)
        self._log_mean("bridge/lambda", torch.tensor(lam, device=rl_loss.device))
        return lam * rl_loss

    def _sft_backward(self, model, micro_batch: int) -> torch.Tensor:
        """Pass A's SFT half: (1−λ) ∇ L_SFT(θ,w) added to θ.grad and w.grad; returns the detached (1−λ) L_SFT that
        makes the logged loss whole (on the scale of the Trainer's returned loss)."""
        lam, ga = self.bridge_lambda, self.current_gradient_accumulation_steps
        # on an optimizer step's first micro-batch, w's SFT gradient alone is kept for the cooperative/SFT ratio
        sft_grads = self._record.adapter_sft_grads = [] if micro_batch % ga == 0 else None
        with grads_captured(self.adapter_params, sft_grads) if sft_grads is not None else nullcontext(), \
                self.phases("sft"):
            sft_loss = self._sft_loss(model, micro_batch)
            self.accelerator.backward((1.0 - lam) * sft_loss)
        self._log_mean("bridge/sft_loss", sft_loss.detach() * ga)
        return ((1.0 - lam) * sft_loss).detach() / (1 if self.loss_is_scaled_for_ga else ga)

    def _sft_loss(self, model, micro_batch: int):
        """L_SFT: the token-mean NLL of the optimizer step's expert traces (prompt tokens carry label −100), as this
        micro-batch's share: its summed NLL over the completion tokens of every micro-batch of the step on every
        process (as one large batch would weigh them; `trl-bridge check` compares the two). Through TRL's fused LM
        head at temperature 1: the (batch, length, vocabulary) logits are never materialised."""
        if micro_batch % self.current_gradient_accumulation_steps == 0 or not self._record.sft_window:
            self._draw_sft_window()
        batch = {k: v.to(self.accelerator.device) for k, v in self._record.sft_window.pop(0).items()}
        with self.accelerator.autocast(), model_setup.fused_head_for_sft(self._fused_lm):
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                        fused_lm_head=True)
        # CHORD-φ (`baselines`) weighs each token's NLL by p(1−p)
        nll = chord_phi_nll_sum(out.log_probs, out.label_mask) if self.args.chord_phi else -out.log_probs.sum()
        return nll / self._record.sft_window_tokens

    def _draw_sft_window(self):
        """The SFT batches of this optimizer step's micro-batches, and their completion tokens per process (the
        all-processes count over the number of processes: DDP and FSDP2 average the gradients over processes)."""
        window = [self.sft_stream.next_batch() for _ in range(self.current_gradient_accumulation_steps)]
        tokens = torch.tensor(float(sum(int((b["labels"][:, 1:] != -100).sum()) for b in window)),
                              device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            tokens = self.accelerator.reduce(tokens, "sum") / self.accelerator.num_processes
        self._record.sft_window, self._record.sft_window_tokens = window, max(float(tokens), 1.0)

    def _rl_loss_and_logps(self, model, inputs):
        """L_RL: TRL's GRPO loss on the rollouts (any `loss_type`, clipping, KL), plus the per-token log-probs it
        computed (detached)."""
        self._record.capturing = True
        try:
            loss = self._compute_loss(model, inputs)
        finally:
            self._record.capturing = False
        logps, self._record.logps = self._record.logps, None
        return loss, logps

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        out = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        if self._record.capturing:
            self._record.logps = out[0].detach()
        if self._record.on_logps is not None:  # truncated IS on fresh rollouts (`_shadow_backward`), LUFFY
            on_logps, self._record.on_logps = self._record.on_logps, None
            on_logps(out[0].detach())
        return out

    # ------------------------------------------------------------------------------------------------------------
    # 3. Pass B: ∇θ̂ L_RL(θ̂,w) into θ̂.grad (§3.3) and −λ ∇w L_RL(θ̂,w) into w.grad (§3.4, last term)
    # ------------------------------------------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        micro_batch = self._step  # GRPOTrainer counts this micro-batch at the end of its training_step
        record = self._record
        with self.phases("training_step"):
            loss = super().training_step(model, inputs, num_items_in_batch)  # rollouts when due + pass A's RL half
            start = self.phases.clock()
            if self.model.training and record.rl_inputs is not None:
                loss = loss + self._sft_backward(model, micro_batch)  # pass A's SFT half
                if self._theta_steps_before_pass_b:
                    self._step_theta_before_pass_b()
        if self.model.training and record.rl_inputs is not None:
            if self.args.bridge_meta_term:  # False: the "w/o J_meta" ablation, no shadow
                with self.phases("shadow"):
                    self._shadow_backward(model, record.rl_inputs, record.base_logps, lam=self.bridge_lambda)
            record.rl_inputs = record.base_logps = None
            if record.adapter_sft_grads is not None:
                self._log_cooperative_to_sft_ratio()
            # GRPOTrainer's `step_time` is taken inside its training_step: add pass B to it
            if self._step % self.current_gradient_accumulation_steps == 0 and self._metrics["train"]["step_time"]:
                self._metrics["train"]["step_time"][-1] += self.phases.clock() - start
            else:
                self._current_train_step_time += self.phases.clock() - start
        return loss

    def _shadow_backward(self, model, inputs, base_logps, lam):
        rows, scale = None, 1.0
        if "bridge_shadow_rows" in inputs:  # shadow_fraction < 1: the drawn prompt groups only, rescaled (unbiased)
            inputs, base_logps, rows, scale = shadow_subset(inputs, base_logps, self.loss_type, *self._shadow_groups())
        shadow_inputs = dict(inputs)
        # The shadow's PPO ratio is against its own log-probs at sampling time when GRPOTrainer keeps old log-probs
        # (num_iterations > 1, ...), else against its current ones, detached (ratio 1), exactly as for θ.
        if inputs.get("old_per_token_logps") is not None:
            shadow_inputs["old_per_token_logps"] = inputs["shadow_old_per_token_logps"]
        if self.args.shadow_off_policy == "truncated_is":  # rollouts come from π(θ+w): min(π(θ̂+w)/π(θ+w), C) per token
            self._record.on_logps = reweight_shadow_advantages(shadow_inputs, inputs, base_logps, self.args.shadow_is_cap)
        with self._shadow_in_place(), grads_added_with_scale(self.adapter_params, -lam), \
                side_effects_set_aside(self, ENTROPY_STATE), self._frozen_replay.replaying(rows):
            shadow_loss, shadow_logps = self._rl_loss_and_logps(model, shadow_inputs)
            if scale != 1.0:
                shadow_loss = shadow_loss * scale
            self.accelerator.backward(shadow_loss)
        ga = self.current_gradient_accumulation_steps
        self._log_mean("bridge/rl_loss_shadow", shadow_loss.detach() * ga)
        # 5. the cooperative gain of this micro-batch's rollouts (logged; the adapter's gradient already holds it)
        gain = self._cooperative_gain(inputs, base_logps, shadow_logps) if scale != 0.0 else float("nan")
        self._log_mean("bridge/cooperative_gain", gain)

    def _shadow_in_place(self, keep_grads: bool = False):
        if self.delta_shadow is not None:  # θ̂ = θ + d; one process: θ̂'s gradient folded into bf16 during the backward
            return self.delta_shadow.in_place(self.model, keep_grads, hooks=self.accelerator.num_processes == 1)
        return shadow_in_place(self.model, self.base_params, self.shadow_params, keep_grads=keep_grads)

    @property
    def _theta_steps_before_pass_b(self) -> bool:
        return (self.delta_shadow is not None and self.args.bridge_meta_term
                and self.current_gradient_accumulation_steps == 1)

    def _step_theta_before_pass_b(self):
        """shadow_storage="bf16_delta", one micro-batch per step: θ's update (§3.2, below) is taken as soon as pass A
        has made θ's whole gradient, weight by weight, with d re-based so that θ̂ does not move; pass B then runs
        without θ's gradient held (4 bytes per trainable parameter). Pass B reads θ̂ and w, never θ, so no value
        changes but d's rounding. A non-finite loss or gradient of pass A leaves θ unstepped: the fault check skips
        the step for all three sets; a fault that only pass B shows skips θ̂ and w (θ has moved)."""
        reshard(self.model)
        params = [p for _, p in self.base_params]
        norm = clip_grad_norm(params, self.args.max_grad_norm) if self.args.max_grad_norm > 0 else total_grad_norm(params)
        divergence = (self.delta_shadow.divergence_sq() / max(sum_of_squares(params), 1e-30)) ** 0.5
        self._record.theta_stepped = (norm, divergence)
        if not math.isfinite(norm) or self.numeric_faults.non_finite_losses:
            self._record.theta_stepped = None
            return
        self.delta_shadow.step_base(getattr(self.optimizer, "optimizer", self.optimizer), self.state.global_step)

    # ------------------------------------------------------------------------------------------------------------
    # 4. The three updates: θ̂ (§3.3) and w (§3.4) here, before the Trainer's own θ step (§3.2)
    # ------------------------------------------------------------------------------------------------------------
    def _apply_shadow_and_adapter_updates(self):
        reshard(self.model)  # no unsharded FSDP2 copy may outlive the update
        max_norm = self.args.max_grad_norm if self.args.max_grad_norm and self.args.max_grad_norm > 0 else float("inf")
        delta = self.delta_shadow
        shadow_norm = clip_grad_norm(self.shadow_params, max_norm) if delta is None else delta.grad_norm()
        adapter_norm = clip_grad_norm([p for _, p in self.adapter_params], max_norm)
        self._metrics["train"]["bridge/grad_norm_shadow"].append(shadow_norm)
        self._metrics["train"]["bridge/grad_norm_adapter"].append(adapter_norm)
        if self.numeric_faults.step_is_faulty(self.state.global_step + 1, shadow_norm, adapter_norm):
            if self._record.theta_stepped is not None:
                warnings.warn("θ had already taken this step's update (shadow_storage='bf16_delta' steps θ before "
                              "pass B); only θ̂ and w skip it.", stacklevel=2)
            self._record.theta_stepped = None
            self._drop_step()
            return
        self.adapter_optimizer.step()  # w ← w − β [(1−λ) ∇w L_SFT(θ,w) + λ (∇w L_RL(θ,w) − ∇w L_RL(θ̂,w))]
        self.adapter_scheduler.step()
        self.adapter_optimizer.zero_grad(set_to_none=True)
        if self.shadow_optimizer is None:  # bridge_meta_term=False: no shadow
            return
        # ‖θ̂−θ‖/‖θ‖ at iterate k: ~0 means the shadow has not separated from θ, so the cooperative term vanishes and
        # BRIDGE has degenerated to naive mixing (e.g. half-precision updates rounding away).
        if self._record.theta_stepped is not None:  # measured before θ's step (`_step_theta_before_pass_b`)
            self._metrics["train"]["bridge/shadow_divergence"].append(self._record.theta_stepped[1])
        else:
            diff = sum_of_squares(s - p for (_, p), s in zip(self.base_params, self.shadow_params)) if delta is None \
                else delta.divergence_sq()
            norm = sum_of_squares(p for _, p in self.base_params)
            self._metrics["train"]["bridge/shadow_divergence"].append((diff / max(norm, 1e-30)) ** 0.5)
        if delta is None:
            self.shadow_optimizer.step()  # θ̂ ← θ̂ − α ∇θ̂ L_RL(θ̂,w)
        else:
            # the same on θ̂ = θ + d, weight by weight together with θ's own step (d is relative to θ; one weight's
            # fp32 θ̂ at a time), which then leaves the Trainer's step nothing to do on θ
            delta.step(self.shadow_optimizer, shadow_norm, max_norm, getattr(self.optimizer, "optimizer", self.optimizer),
                       self.state.global_step)
        self.shadow_scheduler.step()
        self.shadow_optimizer.zero_grad(set_to_none=True)
        self._record.theta_stepped = None
        # θ ← θ − α [(1−λ) ∇θ L_SFT(θ,w) + λ ∇θ L_RL(θ,w)]: the Trainer's optimizer step, right after this callback
        # (with bf16_delta: in `delta.step` above, or right after pass A at one micro-batch per step)

    def _drop_step(self):
        """A numeric fault (`numeric_faults`): no set moves; the three schedules still advance with `global_step`."""
        for p in [p for _, p in self.base_params] + list(self.shadow_params) + [p for _, p in self.adapter_params]:
            p.grad = None
        if self.delta_shadow is not None:
            self.delta_shadow.drop_grads()
        for scheduler in (self.shadow_scheduler, self.adapter_scheduler):
            if scheduler is not None:
                scheduler.step()

    def _clip_grad_norm(self, model):
        """The Trainer's clipping (and its logged `grad_norm`) covers θ alone; θ̂ and w are clipped separately."""
        if self._grpo_only:
            return super()._clip_grad_norm(model)
        if self._record.theta_stepped is not None:  # θ clipped and stepped after pass A (`_step_theta_before_pass_b`)
            norm = self._record.theta_stepped[0]
        else:
            norm = clip_grad_norm([p for _, p in self.base_params], self.args.max_grad_norm)
        self._metrics["train"]["bridge/grad_norm_base"].append(norm)
        return norm

    def _get_grad_norm(self, model, grad_norm=None):
        if self._grpo_only:
            return super()._get_grad_norm(model, grad_norm)
        if grad_norm is None:
            grad_norm = total_grad_norm([p for _, p in self.base_params]) if self._record.theta_stepped is None \
                else self._record.theta_stepped[0]
            self._metrics["train"]["bridge/grad_norm_base"].append(grad_norm)
        self.numeric_faults.base_grad_norm = float(grad_norm)
        return super()._get_grad_norm(model, grad_norm)

    def create_optimizer(self, model=None):
        """θ in the Trainer's optimizer (θ̂ and w get theirs in `create_scheduler`, once the model is prepared)."""
        if self._grpo_only:  # θ = every parameter that requires grad: the Trainer's own optimizer, as for GRPO
            return super().create_optimizer(model)
        if self.optimizer is None:
            self.optimizer = make_optimizer(self, self._peft_named(self.base_params), self.args.learning_rate)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self._grpo_only:
            return super().create_scheduler(num_training_steps, optimizer)
        if self.lr_scheduler is None:
            self.lr_scheduler = make_scheduler(self.args, self.optimizer if optimizer is None else optimizer,
                                               num_training_steps)
            self._created_lr_scheduler = True
        if self.adapter_optimizer is not None:
            return self.lr_scheduler
        self._bind_sharded_params()  # called after accelerate prepared (and, under FSDP2, sharded) the model
        if self.shadow_params:
            shadow_named = list(zip([n for n, _ in self._peft_named(self.base_params)], self.shadow_params))
            self.shadow_optimizer = make_optimizer(self, shadow_named, self.args.shadow_learning_rate,
                                                   lean=self.args.shadow_storage in ("lean", "bf16_delta"))
            self.shadow_scheduler = make_scheduler(self.args, self.shadow_optimizer, num_training_steps)
        self.adapter_optimizer = make_optimizer(self, self.adapter_params, self.args.adapter_learning_rate)
        self.adapter_scheduler = make_scheduler(self.args, self.adapter_optimizer, num_training_steps)
        return self.lr_scheduler

    def _bind_sharded_params(self):
        """FSDP2: `fully_shard` replaced every parameter by a DTensor one. Re-bind θ and w by name, create θ̂ sharded
        exactly like θ (same mesh and placements: each rank holds its shard of θ̂ and of θ̂'s optimizer state), and
        make TRL's fused LM head, which reads `lm_head.weight` without calling `lm_head`, see the gathered weight."""
        if not self._fsdp2 or self._bound_sharded:
            return
        self._bound_sharded = True
        self.base_params, self.adapter_params = model_setup.rebind_by_name(self.model, self.base_params,
                                                                          self.adapter_params)
        self.shadow_params = self._new_shadow() if self.args.bridge_meta_term else []  # θ̂ ← θ⁰, sharded
        gather_output_head_with_backbone(self.accelerator.unwrap_model(self.model).get_base_model())

    def _new_shadow(self) -> list:
        """θ̂ ← θ⁰: an fp32 copy of θ, or with `shadow_storage="bf16_delta"` a zero bf16 delta d from θ, whose fp32
        parameter slots (memory only between θ̂'s update and θ's) are what θ̂'s optimizer steps."""
        if self.args.shadow_storage == "bf16_delta":
            self.delta_shadow = DeltaShadow(self.base_params, self.args.seed)
            return self.delta_shadow.slots
        return [torch.nn.Parameter(p.detach().clone()) for _, p in self.base_params]

    def _peft_named(self, plain_named):
        """(plain name, param) -> (the name the param has in self.model, param), for weight-decay grouping."""
        by_id = {id(p): n for n, p in self.model.named_parameters()}
        return [(by_id[id(p)], p) for _, p in plain_named]

    # ------------------------------------------------------------------------------------------------------------
    # 5. The cooperative gain J_RL(θ,w) − J_RL(θ̂,w), and how much of w's gradient it is
    # ------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _cooperative_gain(self, inputs, base_logps, shadow_logps):
        """Estimate on the shared rollouts (`cooperative_gain_estimate`). The proposal is the sampling policy: its
        log-probs as TRL keeps them (vLLM's `sampling_per_token_logps`, else `old_per_token_logps`), else π(θ+w) from
        pass A (θ and w have not moved since sampling)."""
        proposal = inputs.get("sampling_per_token_logps")
        proposal = inputs.get("old_per_token_logps") if proposal is None else proposal
        return cooperative_gain_estimate(
            inputs["bridge_rewards"], inputs["completion_mask"], inputs.get("bridge_group_ids"),
            base_logps if proposal is None else proposal, base_logps, shadow_logps,
        )

    def _log_cooperative_to_sft_ratio(self):
        """‖λ(∇w L_RL(θ,w) − ∇w L_RL(θ̂,w))‖ / ‖(1−λ)∇w L_SFT(θ,w)‖ on the step's first micro-batch: near 0, w is trained
        on SFT alone (BRIDGE has become LoRA-SFT)."""
        sft, self._record.adapter_sft_grads = self._record.adapter_sft_grads, None
        total = [p.grad for _, p in self.adapter_params]
        coop = [t if s is None else t - s for t, s in zip(total, sft) if t is not None]
        sft_sq = sum_of_squares([g for g in sft if g is not None])
        if sft_sq > 0:
            self._metrics["train"]["bridge/cooperative_to_sft_grad_ratio"].append((sum_of_squares(coop) / sft_sq) ** 0.5)

    # ------------------------------------------------------------------------------------------------------------
    # Logging, export and checkpoints (each a call into the module that does it)
    # ------------------------------------------------------------------------------------------------------------
    def _log_mean(self, name: str, value: torch.Tensor):
        value = torch.as_tensor(value, device=self.accelerator.device, dtype=torch.float32).reshape(1)
        values = self.accelerator.gather(value)
        self.numeric_faults.note_loss(name, values)  # a NaN/inf loss on any process makes the step a numeric fault
        self._metrics["train"][name].append(values.nanmean().item())

    def log(self, logs, start_time=None):
        if "loss" in logs:  # a training-step log: the number of steps skipped for a numeric fault so far
            logs["bridge/skipped_steps"] = self.numeric_faults.skipped
        super().log(logs, start_time)


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
