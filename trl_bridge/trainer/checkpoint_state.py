"""What a BRIDGE checkpoint holds beyond the Trainer's own files, engine-independent (full tensors), so a checkpoint
written under FSDP2 resumes under FSDP2 or in one process, and vice versa:

    bridge_state.safetensors   θ, θ̂ and w (`base.*`, `shadow.*`, `adapter.*`, keyed by the plain model's names; with
                               `shadow_storage="bf16_delta"` θ̂ is saved as its bf16 delta from θ, `shadow_delta.*`)
    bridge_optimizers.pt       the three optimizers' and schedules' states, the SFT stream's position, the numeric-fault
                               counters (`BridgeState.state_dict`)
    bridge_rollouts_rank{i}.pt one per process: GRPOTrainer's buffered rollouts, its micro-step counter and its
                               adaptive-entropy state (`save_rollout_buffer`), so a resume inside a generation batch uses
                               the rollouts the uninterrupted run uses.
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file, save_file
from transformers.utils import logging

from ..engines.fsdp2 import assign_full, full_optimizer_state, full_tensor, load_full_optimizer_state

logger = logging.get_logger(__name__)

BRIDGE_STATE_FILE = "bridge_state.safetensors"
BRIDGE_OPTIM_FILE = "bridge_optimizers.pt"
BRIDGE_ROLLOUTS_FILE = "bridge_rollouts_rank{}.pt"
# GRPOTrainer's adaptive-entropy controller state (saved with the rollouts so that it resumes too).
ENTROPY_STATE = ("entropy_coef", "_entropy_window_stats", "_last_world_entropy")


class BridgeState:
    """θ, θ̂, w and what moves them, read from and written into a live BridgeTrainer."""

    def __init__(self, trainer):
        self.trainer = trainer

    def tensors(self) -> dict[str, torch.Tensor]:
        """θ, θ̂ and w as full tensors (gathered from every rank under FSDP2: all ranks must call it)."""
        t = self.trainer
        tensors = {f"base.{n}": full_tensor(p).contiguous() for n, p in t.base_params}
        if t.delta_shadow is None:
            tensors.update({f"shadow.{n}": full_tensor(s).contiguous() for (n, _), s in zip(t.base_params, t.shadow_params)})
        else:  # θ̂ = θ + d: d itself, bit for bit
            tensors.update({f"shadow_delta.{n}": full_tensor(d).contiguous()
                            for (n, _), d in zip(t.base_params, t.delta_shadow.deltas)})
        tensors.update({f"adapter.{n}": full_tensor(p).contiguous() for n, p in t.adapter_params})
        return tensors

    def load_tensors(self, checkpoint: str):
        t = self.trainer
        path = os.path.join(checkpoint, BRIDGE_STATE_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{checkpoint} is not a BRIDGE checkpoint: {BRIDGE_STATE_FILE} is missing.")
        saved = load_file(path)
        missing = sorted(set(self.tensors()) - set(saved))
        kinds = {"shadow.": "full' or 'lean", "shadow_delta.": "bf16_delta"}
        written = [kind for prefix, kind in kinds.items() if any(k.startswith(prefix) for k in saved)]
        if missing and written and not any(m.startswith(("base.", "adapter.")) for m in missing):
            raise ValueError(
                f"{checkpoint} holds θ̂ written with shadow_storage='{written[0]}', which this run's shadow_storage="
                f"'{t.args.shadow_storage}' cannot resume exactly; resume with the storage it was written with."
            )
        if missing:
            raise ValueError(f"{path} does not match this model/config; missing e.g. {missing[:3]}")
        for n, p in t.base_params:
            assign_full(p, saved[f"base.{n}"])
        if t.delta_shadow is None:
            for (n, _), s in zip(t.base_params, t.shadow_params):
                assign_full(s, saved[f"shadow.{n}"])
        else:
            for (n, _), d in zip(t.base_params, t.delta_shadow.deltas):
                assign_full(d, saved[f"shadow_delta.{n}"])
        for n, p in t.adapter_params:
            assign_full(p, saved[f"adapter.{n}"])

    def optimizers(self) -> dict:
        t = self.trainer
        optimizers = {"base": t.optimizer, "shadow": t.shadow_optimizer, "adapter": t.adapter_optimizer}
        return {k: v for k, v in optimizers.items() if v is not None}

    def state_dict(self) -> dict:
        t = self.trainer
        return {
            **{f"{k}_optimizer": full_optimizer_state(opt) for k, opt in self.optimizers().items()},
            "base_scheduler": t.lr_scheduler.state_dict(),
            "shadow_scheduler": None if t.shadow_scheduler is None else t.shadow_scheduler.state_dict(),
            "adapter_scheduler": t.adapter_scheduler.state_dict(),
            "sft_stream": t.sft_stream.state_dict(),
            "numeric_faults": t.numeric_faults.state_dict(),
        }

    def load_state_dict(self, state: dict):
        t = self.trainer
        for key, opt in self.optimizers().items():
            load_full_optimizer_state(opt, state[f"{key}_optimizer"])
        t.lr_scheduler.load_state_dict(state["base_scheduler"])
        if t.shadow_scheduler is not None:
            t.shadow_scheduler.load_state_dict(state["shadow_scheduler"])
        t.adapter_scheduler.load_state_dict(state["adapter_scheduler"])
        t.sft_stream.load_state_dict(state["sft_stream"])
        t.numeric_faults.load_state_dict(state.get("numeric_faults", {}))

    def save(self, output_dir: str):
        """Every process writes its rollout buffer; the main process writes θ, θ̂, w and the optimizer file."""
        tensors = self.tensors()  # a collective under FSDP2
        state = self.state_dict()
        save_rollout_buffer(self.trainer, output_dir)
        if not self.trainer.args.should_save:
            return
        save_file(tensors, os.path.join(output_dir, BRIDGE_STATE_FILE))
        torch.save(state, os.path.join(output_dir, BRIDGE_OPTIM_FILE))

    def load(self, checkpoint: str):
        """The optimizer file and this process's rollout buffer (θ, θ̂, w: `load_tensors`)."""
        state = torch.load(os.path.join(checkpoint, BRIDGE_OPTIM_FILE), map_location="cpu", weights_only=False)
        self.load_state_dict(state)
        load_rollout_buffer(self.trainer, checkpoint)


def save_rollout_buffer(trainer, output_dir: str):
    """GRPOTrainer generates once every `steps_per_generation × num_iterations` micro-steps and buffers the rollouts
    in between (`_buffered_inputs`, indexed by its micro-step counter `_step`). A checkpoint inside that window carries
    both, or the resumed run would sample new rollouts where the uninterrupted one reuses the buffered ones."""
    state = {
        "step": trainer._step,
        "world_size": trainer.accelerator.num_processes,
        "buffered_inputs": to_device(trainer._buffered_inputs, "cpu"),
        **{k: to_device(getattr(trainer, k), "cpu") for k in ENTROPY_STATE if hasattr(trainer, k)},
    }
    os.makedirs(output_dir, exist_ok=True)
    torch.save(state, os.path.join(output_dir, BRIDGE_ROLLOUTS_FILE.format(trainer.accelerator.process_index)))


def load_rollout_buffer(trainer, checkpoint: str):
    path = os.path.join(checkpoint, BRIDGE_ROLLOUTS_FILE.format(trainer.accelerator.process_index))
    state = torch.load(path, map_location="cpu", weights_only=False) if os.path.isfile(path) else None
    if state is not None and state["world_size"] == trainer.accelerator.num_processes:
        trainer._step = state["step"]
        trainer._buffered_inputs = to_device(state["buffered_inputs"], trainer.accelerator.device)
        for k in ENTROPY_STATE:
            if k in state:
                setattr(trainer, k, to_device(state[k], trainer.accelerator.device))
        return
    # No buffer for this process (a checkpoint of an older version, or written by another number of processes).
    trainer._step = state["step"] if state is not None else trainer.state.global_step * trainer.args.gradient_accumulation_steps
    trainer._buffered_inputs = None  # GRPOTrainer generates anew on the next micro-step
    if trainer._step % (trainer.args.steps_per_generation * trainer.num_iterations) != 0:
        logger.warning(
            "%s falls inside a generation batch, but its buffered rollouts cannot be used here (%s): new rollouts "
            "are sampled, so this resumed run will differ from an uninterrupted one.", checkpoint,
            "written by another number of processes" if state is not None else f"{os.path.basename(path)} missing",
        )


def to_device(obj, device):
    """`obj` with every tensor in it (nested dicts, lists, tuples) moved to `device`."""
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj
