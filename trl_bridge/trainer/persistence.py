"""What BridgeTrainer writes and reads besides training: θ̂ as a state dict, the merged π(θ+w) export, BRIDGE's model
card, and atomic, engine-independent checkpoints that resume exactly (in any epoch of the RL prompts).

`PersistenceHooks` holds the Trainer hooks BridgeTrainer overrides for that, each a call into the module that does it
(`engines.export`, `model_card`, `checkpoint_state`, `checkpointing`, `reference`, `resume_sampler`). At λ = 1 for the
whole run (GRPO alone) the Trainer's own files are written, plus GRPOTrainer's rollout buffer.
"""

from __future__ import annotations

import os

import torch
from transformers.trainer import TRAINING_ARGS_NAME

from ..engines.export import save_merged_model
from ..engines.fsdp2 import full_tensor
from .checkpoint_state import load_rollout_buffer, save_rollout_buffer
from .checkpointing import save_checkpoint_atomically
from .model_card import write_bridge_model_card
from .reference import load_synced_ref_model, save_synced_ref_model
from .resume_sampler import epoch_exact_sampler


class PersistenceHooks:
    """Mixed into BridgeTrainer before GRPOTrainer: `super()` here is GRPOTrainer's."""

    def shadow_state_dict(self) -> dict[str, torch.Tensor]:
        """θ̂, keyed like the plain base model's state dict (only the trainable weights have a shadow). Full tensors
        (under FSDP2 every rank must call it: the shards are gathered). At λ = 1 throughout θ̂ is θ (no copy is kept)."""
        if self._grpo_only:
            return {name: full_tensor(p).clone() for name, p in self.base_params}
        if self.delta_shadow is not None:  # θ̂ = θ + d
            return {name: self.delta_shadow.full_shadow(i) for i, (name, _) in enumerate(self.base_params)}
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
        if self.is_world_process_zero():
            write_bridge_model_card(self, model_name=model_name, dataset_name=dataset_name)

    def _save_optimizer_and_scheduler(self, output_dir):
        save_synced_ref_model(self, output_dir)
        if self._grpo_only:  # θ alone, in the Trainer's optimizer: its own files (and GRPOTrainer's rollout buffer)
            save_rollout_buffer(self, output_dir)
            return super()._save_optimizer_and_scheduler(output_dir)
        self.checkpoint_state.save(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if self._grpo_only:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        self.checkpoint_state.load_tensors(resume_from_checkpoint)

    def _load_optimizer_and_scheduler(self, checkpoint):
        if checkpoint is None:
            return
        load_synced_ref_model(self, checkpoint)
        if self._grpo_only:
            load_rollout_buffer(self, checkpoint)
            return super()._load_optimizer_and_scheduler(checkpoint)
        self.checkpoint_state.load(checkpoint)

    def _get_train_sampler(self, dataset=None):
        """A resumed run shuffles every pass over the RL prompts as the uninterrupted run does (`resume_sampler`:
        GRPOTrainer's sampler would start again from the first epoch's order)."""
        return epoch_exact_sampler(super()._get_train_sampler(dataset), lambda: self.state.epoch)

    def _save_checkpoint(self, model, trial):
        save_checkpoint_atomically(self, super()._save_checkpoint, model, trial)

    def _get_output_dir(self, trial):
        return self._staging_root if getattr(self, "_staging_root", None) else super()._get_output_dir(trial)
