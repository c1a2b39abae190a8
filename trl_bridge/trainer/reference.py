"""The KL reference of BridgeTrainer (`beta` > 0): a frozen copy of the initial policy π(θ⁰+w⁰), and its sync.

TRL's PEFT default (the adapter disabled) would be π(θ), which moves as θ trains; BRIDGE keeps its own frozen copy.
With `sync_ref_model`, every `ref_model_sync_steps` steps ref ← (1−α)·ref + α·π(θ+w) (α = `ref_model_mixup_alpha`),
as TRL's SyncRefModelCallback does with the policy; here the policy is the merged θ+w. A synced reference is training
state: checkpoints keep it."""

from __future__ import annotations

import copy
import os

import torch
from accelerate.utils import is_peft_model
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback
from trl.trainer.utils import add_fused_lm_head, disable_dropout_in_model

from ..engines.export import merged_state_dict

REF_MODEL_FILE = "bridge_ref_model.safetensors"  # written only when `sync_ref_model` moves the reference


def frozen_reference(model, weights=None):
    """A frozen copy of the initial policy (with `weights`: a PeftModel's trained adapter merged in)."""
    ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    if weights is not None:
        ref_model.load_state_dict(weights)
    return ref_model


def attach_reference(trainer, ref_model):
    """Make `ref_model` the trainer's KL reference as GRPOTrainer would prepare its own (dropout off, TRL's fused LM
    head, accelerate's evaluation-mode preparation), synced when `sync_ref_model` is set (beta = 0 with
    `sync_ref_model` was refused by GRPOTrainer, as for GRPO users)."""
    if trainer.args.disable_dropout:
        disable_dropout_in_model(ref_model)
    add_fused_lm_head(ref_model, temperature=trainer.temperature, cast_lm_head_to_fp32=trainer.args.cast_lm_head_to_fp32)
    trainer.ref_model = trainer.accelerator.prepare_model(ref_model, evaluation_mode=True)
    if trainer.args.sync_ref_model:
        trainer.add_callback(RefModelSyncCallback(trainer))


class RefModelSyncCallback(TrainerCallback):
    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % args.ref_model_sync_steps == 0:
            sync_ref_model(self.trainer, args.ref_model_mixup_alpha)


@torch.no_grad()
def sync_ref_model(trainer, alpha: float):
    """ref ← (1−α)·ref + α·π(θ+w). The policy's weights are the merged θ+w (PEFT's merge on a detached copy, as for the
    export), or the plain model's at λ = 1 throughout."""
    policy = trainer.accelerator.unwrap_model(trainer.model)
    source = merged_state_dict(policy) if is_peft_model(policy) else policy.state_dict()
    for name, p in trainer.accelerator.unwrap_model(trainer.ref_model).named_parameters():
        p.mul_(1.0 - alpha).add_(source[name].to(p.device), alpha=alpha)


def save_synced_ref_model(trainer, output_dir):
    if not trainer.args.sync_ref_model or trainer.ref_model is None or not trainer.args.should_save:
        return
    ref = trainer.accelerator.unwrap_model(trainer.ref_model)
    save_file({n: p.detach().contiguous() for n, p in ref.named_parameters()}, os.path.join(output_dir, REF_MODEL_FILE))


@torch.no_grad()
def load_synced_ref_model(trainer, checkpoint):
    if not trainer.args.sync_ref_model or trainer.ref_model is None:
        return
    path = os.path.join(checkpoint, REF_MODEL_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{checkpoint} has no {REF_MODEL_FILE}: it was written without `sync_ref_model`, so the synced KL "
            "reference cannot be restored. Resume with the settings the checkpoint was written with."
        )
    saved = load_file(path)
    for name, p in trainer.accelerator.unwrap_model(trainer.ref_model).named_parameters():
        p.copy_(saved[name].to(p.device, p.dtype))
