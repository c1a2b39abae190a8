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
    first waits for the GPU, so a phase's time is its own and not the kernels it queued. With `memory` (set by bench: a
    pair of callables, read the peak memory since the last reset / reset it), `peak_bytes` holds each phase's own peak,
    read and reset at every phase boundary: a nested phase's peak is its own, not its parent's, and time outside every
    phase counts as "other"."""

    def __init__(self):
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.synchronize = False
        self.memory = None
        self.peak_bytes: dict[str, int] = collections.defaultdict(int)
        self._open: list[str] = []

    def clock(self) -> float:
        if self.synchronize and torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def _boundary(self):
        if self.memory is not None:
            read, reset = self.memory
            phase = self._open[-1] if self._open else "other"
            self.peak_bytes[phase] = max(self.peak_bytes[phase], read())
            reset()

    def enter(self, phase: str):
        """Open `phase` (for phases that begin and end in different callbacks; otherwise use `with timer(phase)`)."""
        self._boundary()
        self._open.append(phase)
        return self.clock()

    def exit(self, phase: str, start: float):
        self.seconds[phase] += self.clock() - start
        self._boundary()
        self._open.remove(phase)

    @contextmanager
    def __call__(self, phase: str):
        start = self.enter(phase)
        try:
            yield
        finally:
            self.exit(phase, start)

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
