"""BRIDGE on top of TRL's GRPOTrainer: one file, read top to bottom against BRIDGE.md §3.

    θ  — the base weights (all, or `trainable_base_parameters`); trained by the Trainer's own optimizer.
    w  — the LoRA adapter (PEFT); the policy is π(θ+w).
    θ̂  — the RL-only shadow: a persistent copy of the trainable base weights, initialised to θ⁰.

One meta-step (Algorithm 2), all gradients at iterate k:
  1. GRPOTrainer samples rollouts once from π(θ+w), scores them and computes group advantages (unchanged).
  2. fused base update    θ ← θ − α [(1−λ) ∇θ L_SFT(θ,w) + λ ∇θ L_RL(θ,w)]
  3. shadow update        θ̂ ← θ̂ − α ∇θ̂ L_RL(θ̂,w)                     (same rollouts)
  4. adapter update       w ← w − β [(1−λ) ∇w L_SFT(θ,w) + λ (∇w L_RL(θ,w) − ∇w L_RL(θ̂,w))]

How the gradients are routed (two ordinary backward passes per micro-batch, so DDP all-reduces each parameter once per
backward, and gradient checkpointing recomputes with the right weights):
  * pass A (`compute_loss`): loss = (1−λ) L_SFT(θ,w) + λ L_RL(θ,w). Its backward fills θ.grad (step 2) and the first
    two terms of w.grad (step 4).
  * pass B (`_shadow_backward`): θ̂ is swapped into the base parameters' storage (and θ's accumulated gradients are
    set aside), L_RL(θ̂,w) is computed with TRL's own `_compute_loss` on the same rollouts, and backpropagated with a
    hook that scales w's incoming gradient by −λ: the base parameters receive ∇θ̂ L_RL (step 3), w receives
    −λ ∇w L_RL(θ̂,w) (last term of step 4). Then the weights and gradients are swapped back.
  * `BridgeCallback.on_pre_optimizer_step` (between the fused base steps) clips and applies the θ̂ and w updates
    with their own optimizers and learning-rate schedules; the Trainer then applies the θ update (its optimizer holds
    θ only).
"""

from __future__ import annotations

import copy
import os
import re
from contextlib import contextmanager

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset, IterableDataset
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback, get_scheduler
from transformers.trainer import TRAINING_ARGS_NAME
from trl import GRPOTrainer
from trl.data_utils import is_conversational
from trl.trainer.utils import add_fused_lm_head, create_model_from_path, disable_dropout_in_model

from .bridge_config import BridgeConfig
from .data import validate_rl_dataset, validate_sft_dataset
from .export import plain_name, save_merged_model
from .sft_stream import SFTStream, tokenize_sft_dataset

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
      * `__init__`: wraps the model in the LoRA adapter w, unfreezes θ, creates θ̂ and the SFT stream, and (when
        `beta > 0`) keeps a frozen copy of the initial policy as the KL reference so it does not move with θ.
      * `compute_loss` / `training_step`: pass A (fused loss) and pass B (shadow loss) of the module docstring.
      * `create_optimizer`, `create_scheduler`, `_clip_grad_norm`, `_get_grad_norm`: the Trainer's optimizer and
        clipping act on θ alone; θ̂ and w get their own optimizers, schedules and clipping (in `BridgeCallback`).
      * `_calculate_rewards`, `_generate_and_score_completions`, `_get_per_token_logps_and_entropies`: keep each
        rollout's reward and the log-probs of both passes (for the cooperative-gain estimate), and the shadow's own
        sampling-time log-probs when GRPOTrainer keeps old log-probs or `shadow_off_policy="truncated_is"`.
      * `train`: probes every reward function once on the first RL row, so a broken one fails before step 1.
      * `_save`, `_save_optimizer_and_scheduler`, `_load_from_checkpoint`, `_load_optimizer_and_scheduler`: the merged
        π(θ+w) export, and checkpoints holding θ, θ̂, w, all optimizer states and the SFT stream position.
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

        # θ: PEFT froze the base; unfreeze the selected weights.  w: the LoRA parameters.
        self.base_params = _select_base_params(self.model, args.trainable_base_parameters)
        for _, p in self.base_params:
            p.requires_grad_(True)
        self.adapter_params = [(n, p) for n, p in self.model.named_parameters() if "lora_" in n and p.requires_grad]
        # θ̂ ← θ⁰: a persistent full-precision copy of the trainable base weights only.
        self.shadow_params = [torch.nn.Parameter(p.detach().clone()) for _, p in self.base_params]

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
        self.add_callback(BridgeCallback(self))

    def train(self, *args, **kwargs):
        self._check_reward_funcs()
        return super().train(*args, **kwargs)

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
        # Pass A. §3.2 (θ) and the first two terms of §3.4 (w): backward of (1−λ) L_SFT(θ,w) + λ L_RL(θ,w).
        rl_loss, base_logps = self._rl_loss_and_logps(model, inputs)
        sft_loss = self._sft_loss(model)
        self._rl_inputs = (inputs, base_logps)
        ga = self.current_gradient_accumulation_steps
        self._log_mean("bridge/rl_loss", rl_loss.detach() * ga)
        self._log_mean("bridge/sft_loss", sft_loss.detach() * ga)
        self._log_mean("bridge/lambda", torch.tensor(lam, device=rl_loss.device))
        return (1.0 - lam) * sft_loss + lam * rl_loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)  # rollouts + pass A (forward and backward)
        if self.model.training and self._rl_inputs is not None:
            if self.args.bridge_meta_term:  # False: the "w/o J_meta" ablation, no shadow
                self._shadow_backward(model, *self._rl_inputs, lam=self.bridge_lambda)  # pass B
            self._rl_inputs = None
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
        with self._shadow_in_place(), self._scale_adapter_grads(-lam), self._metrics_set_aside():
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
        """Estimate of J_RL(θ,w) − J_RL(θ̂,w) on the shared rollouts.

        J_RL(θ,w) is the mean reward of the rollouts (sampled from π(θ+w)); J_RL(θ̂,w) is its self-normalised
        importance-sampling estimate with sequence weights π(θ̂+w)(y)/π(θ+w)(y) from the two passes' log-probs.
        """
        mask = inputs["completion_mask"]
        rewards = torch.nan_to_num(inputs["bridge_rewards"].float(), nan=0.0)
        seq_log_ratio = ((shadow_logps - base_logps) * mask).sum(-1).clamp(-20.0, 20.0)
        weights = torch.softmax(seq_log_ratio.float(), dim=0)
        return rewards.mean() - (weights * rewards).sum()

    # ------------------------------------------------------------------------------------------------------------
    # §3.3 and §3.4 updates (called by BridgeCallback before the Trainer's θ step)
    # ------------------------------------------------------------------------------------------------------------
    def _apply_shadow_and_adapter_updates(self):
        max_norm = self.args.max_grad_norm if self.args.max_grad_norm and self.args.max_grad_norm > 0 else float("inf")
        shadow_norm = torch.nn.utils.clip_grad_norm_(self.shadow_params, max_norm)
        adapter_norm = torch.nn.utils.clip_grad_norm_([p for _, p in self.adapter_params], max_norm)
        self._metrics["train"]["bridge/grad_norm_shadow"].append(float(shadow_norm))
        self._metrics["train"]["bridge/grad_norm_adapter"].append(float(adapter_norm))
        self.shadow_optimizer.step()  # θ̂ ← θ̂ − α ∇θ̂ L_RL(θ̂,w)
        self.adapter_optimizer.step()  # w ← w − β [cooperative-gain gradient]
        self.shadow_scheduler.step()
        self.adapter_scheduler.step()
        self.shadow_optimizer.zero_grad(set_to_none=True)
        self.adapter_optimizer.zero_grad(set_to_none=True)

    def _clip_grad_norm(self, model):
        """The Trainer's clipping (and its logged `grad_norm`) covers θ alone; θ̂ and w are clipped separately."""
        norm = self.accelerator.clip_grad_norm_([p for _, p in self.base_params], self.args.max_grad_norm)
        self._metrics["train"]["bridge/grad_norm_base"].append(float(norm))
        return norm

    def _get_grad_norm(self, model, grad_norm=None):
        if grad_norm is None:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for _, p in self.base_params if p.grad is not None])
            self._metrics["train"]["bridge/grad_norm_base"].append(float(grad_norm))
        return super()._get_grad_norm(model, grad_norm)

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

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if self.shadow_optimizer is not None:
            return scheduler
        shadow_named = list(zip([n for n, _ in self._peft_named(self.base_params)], self.shadow_params))
        self.shadow_optimizer = self._make_optimizer(shadow_named, self.args.shadow_learning_rate)
        self.adapter_optimizer = self._make_optimizer(self.adapter_params, self.args.adapter_learning_rate)
        self.shadow_scheduler, self.adapter_scheduler = (
            get_scheduler(
                self.args.lr_scheduler_type,
                optimizer=opt,
                num_warmup_steps=self.args.get_warmup_steps(num_training_steps),
                num_training_steps=num_training_steps,
                scheduler_specific_kwargs=self.args.lr_scheduler_kwargs or {},
            )
            for opt in (self.shadow_optimizer, self.adapter_optimizer)
        )
        return scheduler

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
        """Put θ̂ in the base parameters' storage (and θ̂'s accumulated gradients in their .grad); swap back after."""

        def swap():
            for (_, p), s in zip(self.base_params, self.shadow_params):
                p.data, s.data = s.data, p.data
                if not keep_grads:
                    p.grad, s.grad = s.grad, p.grad

        swap()
        try:
            yield
        finally:
            swap()

    @contextmanager
    def _scale_adapter_grads(self, scale: float):
        handles = [p.register_hook(lambda g, s=scale: g * s) for _, p in self.adapter_params]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

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
        """θ̂, keyed like the plain base model's state dict (only the trainable weights have a shadow)."""
        return {name: s.detach().clone() for (name, _), s in zip(self.base_params, self.shadow_params)}

    def _save(self, output_dir=None, state_dict=None):
        """`save_model` writes the merged policy π(θ+w) as a plain model folder (loadable with AutoModelForCausalLM)."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        save_merged_model(self.accelerator.unwrap_model(self.model), self.processing_class, output_dir)
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
        tensors = {f"base.{n}": p.detach().contiguous() for n, p in self.base_params}
        tensors.update({f"shadow.{n}": s.detach().contiguous() for (n, _), s in zip(self.base_params, self.shadow_params)})
        tensors.update({f"adapter.{n}": p.detach().contiguous() for n, p in self.adapter_params})
        return tensors

    def _save_optimizer_and_scheduler(self, output_dir):
        super()._save_optimizer_and_scheduler(output_dir)
        if not self.args.should_save:
            return
        save_file(self._bridge_tensors(), os.path.join(output_dir, BRIDGE_STATE_FILE))
        torch.save(
            {
                "shadow_optimizer": self.shadow_optimizer.state_dict(),
                "adapter_optimizer": self.adapter_optimizer.state_dict(),
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
        with torch.no_grad():
            for (n, p), s in zip(self.base_params, self.shadow_params):
                p.copy_(saved[f"base.{n}"])
                s.copy_(saved[f"shadow.{n}"])
            for n, p in self.adapter_params:
                p.copy_(saved[f"adapter.{n}"])

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        state = torch.load(os.path.join(checkpoint, BRIDGE_OPTIM_FILE), map_location="cpu", weights_only=False)
        self.shadow_optimizer.load_state_dict(state["shadow_optimizer"])
        self.adapter_optimizer.load_state_dict(state["adapter_optimizer"])
        self.shadow_scheduler.load_state_dict(state["shadow_scheduler"])
        self.adapter_scheduler.load_state_dict(state["adapter_scheduler"])
        self.sft_stream.load_state_dict(state["sft_stream"])


CARD_HYPERPARAMETERS = (
    "bridge_lambda", "bridge_lambda_end", "bridge_lambda_warmup_steps", "learning_rate", "adapter_learning_rate",
    "shadow_learning_rate", "lora_r", "lora_alpha", "trainable_base_parameters", "shadow_off_policy", "loss_type",
    "beta", "num_generations", "per_device_train_batch_size", "gradient_accumulation_steps", "max_completion_length",
    "sft_per_device_train_batch_size", "sft_max_length", "max_steps", "seed",
)
CARD_METRICS = ("reward", "bridge/sft_loss", "bridge/rl_loss", "bridge/rl_loss_shadow", "bridge/cooperative_gain", "bridge/lambda")


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
