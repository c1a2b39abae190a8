"""Numeric faults: a NaN/inf in any checked loss (pass A or B, any process, any micro-batch) or in the gradient of θ,
θ̂ or w skips the step for all three sets together (BridgeTrainer drops their gradients, so no set moves without the
others and no optimizer state sees the fault; the three learning-rate schedules still advance, staying in step with
`global_step`). Counted in `bridge/skipped_steps`; more than `max_consecutive_skipped_steps` in a row stop training.
One exception: with `shadow_storage="bf16_delta"` and one micro-batch per step, θ steps right after pass A (so that
pass B holds no gradient of θ); a fault that only pass B shows then skips θ̂ and w, with a warning that θ has moved."""

from __future__ import annotations

import math

import torch
from transformers.utils import logging

from .checkpointing import latest_complete_checkpoint

logger = logging.get_logger(__name__)

# A NaN/inf in any of these (on any rank) makes the step a numeric fault.
CHECKED_LOSSES = ("bridge/sft_loss", "bridge/rl_loss", "bridge/rl_loss_shadow")


class NumericFaultGuard:
    """The step's faults so far (`note_loss`, `base_grad_norm`) and the run's counters (`state_dict`)."""

    def __init__(self, max_consecutive: int, output_dir: str):
        self.max_consecutive, self.output_dir = max_consecutive, output_dir
        self.skipped = self.consecutive = 0
        self.non_finite_losses: set[str] = set()
        self.base_grad_norm = 0.0  # θ's gradient norm of the step (the Trainer's clipping computes it)

    def note_loss(self, name: str, values: torch.Tensor):
        if name in CHECKED_LOSSES and not bool(torch.isfinite(values).all()):
            self.non_finite_losses.add(name)

    def step_is_faulty(self, step: int, shadow_norm: float, adapter_norm: float) -> bool:
        """True when this step must be skipped (logged); raises after too many in a row. Clears the step's faults."""
        faults = [f"loss {name}" for name in sorted(self.non_finite_losses)]
        self.non_finite_losses = set()
        for name, norm in (("θ gradient", self.base_grad_norm), ("θ̂ gradient", shadow_norm), ("w gradient", adapter_norm)):
            if not math.isfinite(norm):
                faults.append(f"{name} (norm {norm})")
        if not faults:
            self.consecutive = 0
            return False
        self.skipped += 1
        self.consecutive += 1
        limit = self.max_consecutive
        if self.consecutive > limit:
            raise FloatingPointError(
                f"Training stopped at step {step}: {self.consecutive} steps in a row had a non-finite loss or "
                f"gradient (this one: {', '.join(faults)}), more than max_consecutive_skipped_steps={limit}. None of them "
                f"updated θ, θ̂ or w, which hold the values of step {step - self.consecutive}; the last complete "
                f"checkpoint is {latest_complete_checkpoint(self.output_dir)}. Look for a reward function returning "
                "inf, a learning rate at which the loss overflows, or a corrupt batch, then resume from that checkpoint."
            )
        logger.warning(
            "Step %d skipped for θ, θ̂ and w: non-finite %s (%d skipped so far, %d in a row; max_consecutive_skipped_steps"
            "=%d).", step, ", ".join(faults), self.skipped, self.consecutive, limit,
        )
        return True

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict):
        self.skipped, self.consecutive = state.get("skipped", 0), state.get("consecutive", 0)
