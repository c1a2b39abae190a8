"""Seconds per phase of a training step, for `trl-bridge bench` and anyone reading a run's cost.

One mechanism for every trainer that `bench` times: the trainer owns a `PhaseTimer` (`trainer.phases`) and wraps its
phases in `with trainer.phases("name"):`. BridgeTrainer times "generation", "training_step" (GRPOTrainer's step: the
rollouts when due and pass A), "sft" (pass A's SFT forward+backward), "shadow" (pass B) and "shadow_logps" (the
shadow's sampling-time log-probs); `ProfiledGRPOTrainer` is TRL's GRPOTrainer timed alike, as bench's baseline.
"""

from __future__ import annotations

import collections
import time
from contextlib import contextmanager

import torch
from trl import GRPOTrainer


class PhaseTimer:
    """Accumulated wall seconds per phase name (`seconds`). With `synchronize` (set by bench on CUDA), each reading
    first waits for the GPU, so a phase's time is its own and not the kernels it queued."""

    def __init__(self):
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.synchronize = False

    def clock(self) -> float:
        if self.synchronize and torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    @contextmanager
    def __call__(self, phase: str):
        start = self.clock()
        try:
            yield
        finally:
            self.seconds[phase] += self.clock() - start

    def clear(self):
        self.seconds.clear()


class ProfiledGRPOTrainer(GRPOTrainer):
    """TRL's GRPOTrainer, unchanged, with its "generation" and "training_step" phases timed as BridgeTrainer's are."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.phases = PhaseTimer()

    def _generate_and_score_completions(self, inputs):
        with self.phases("generation"):
            return super()._generate_and_score_completions(inputs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        with self.phases("training_step"):
            return super().training_step(model, inputs, num_items_in_batch)
