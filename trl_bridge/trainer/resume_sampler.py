"""Exact resume in any pass over the RL prompts.

TRL's `RepeatSampler` (GRPOTrainer's sampler of training prompts) shuffles each pass over the prompts — an epoch — with
`torch.randperm` from one generator, seeded with `seed` once, when the sampler is built: epoch e gets the generator's
(e+1)-th permutation. Resuming builds a new dataloader, hence a new sampler, restores the global RNGs (not this
generator) and skips the batches of the resumed epoch already trained; `RepeatSampler` has no `set_epoch`. So a run
resumed from a checkpoint at or after the end of the first pass (epoch e ≥ 1) shuffles with the *first* permutation
where the uninterrupted run uses the (e+1)-th: other prompts, another trajectory. Plain GRPOTrainer behaves the same
(the reproduction is in docs/failure_behaviour.md).

`EpochExactSampler` wraps TRL's sampler: at the start of each pass it re-seeds the generator and draws the
permutations of the epochs before, so epoch e is shuffled with the (e+1)-th permutation in a resumed run too — the
order of an uninterrupted TRL run, unchanged. The epoch is read from the trainer's state (`int(state.epoch)`: after
every optimizer step the Trainer sets `state.epoch` to the epoch plus the fraction of it done, and it restores it from
the checkpoint before the first pass) rather than taken from `set_epoch`, which accelerate does not pass on to the
sampler in every wrapping (e.g. two processes resumed inside an epoch: `SkipBatchSampler(BatchSamplerShard(...))`).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.data import Sampler
from trl.trainer.utils import RepeatSampler


class EpochExactSampler(Sampler):
    """TRL's `RepeatSampler`, shuffled for pass `int(epoch())` however many passes this instance has made before."""

    def __init__(self, sampler: RepeatSampler, epoch: Callable[[], float]):
        self.sampler, self.epoch = sampler, epoch

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        sampler, epoch = self.sampler, int(self.epoch() or 0)
        sampler.generator.manual_seed(sampler.seed)
        for _ in range(epoch):  # the permutations of the earlier passes, drawn as RepeatSampler.__iter__ draws them
            torch.randperm(sampler.num_samples, generator=sampler.generator)
        return iter(sampler)


def epoch_exact_sampler(sampler: Sampler, epoch: Callable[[], float]) -> Sampler:
    """`sampler` (GRPOTrainer's training sampler) made to shuffle pass `int(epoch())` the same way whether or not the
    run was resumed. A sampler that does not shuffle (`shuffle_dataset=False`) or has no seed is returned unchanged."""
    if isinstance(sampler, RepeatSampler) and sampler.shuffle and sampler.seed is not None:
        return EpochExactSampler(sampler, epoch)
    return sampler
