"""The expert-trace (SFT) stream that feeds L_SFT in every BRIDGE step.

Tokenisation, completion masking and truncation are TRL's own: `SFTTrainer._prepare_dataset` (the same code SFTTrainer
runs, so every TRL SFT format works: prompt/completion, conversational `messages`, plain `text`) and TRL's
`DataCollatorForLanguageModeling`. This module only adds what BRIDGE needs on top: an endless, seeded, resumable
sampler (each epoch is a fresh permutation; the position is part of the checkpoint), sharded across processes.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import torch
from datasets import Dataset
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling, SFTTrainer

logger = logging.getLogger(__name__)

#: The largest share of the traces that truncation may leave without a completion token. TRL drops such a trace (a
#: prompt alone fills `sft_max_length`: nothing left to learn from); a few long prompts are dropped with a warning, but
#: when more than this share would go, `sft_max_length` is too small for the data and the run stops instead.
MAX_DROPPED_SHARE = 0.5


def tokenize_sft_dataset(dataset: Dataset, tokenizer, max_length: int | None, num_proc: int | None = None) -> Dataset:
    """Tokenise with SFTTrainer's own pipeline: prompt tokens masked (`labels=-100`), truncated to `max_length`.

    A trace whose prompt alone fills `max_length` keeps no completion token, so TRL drops it; the number dropped is
    logged as one warning that names ``sft_max_length``. More than `MAX_DROPPED_SHARE` of the traces dropped (all
    of them included) raises ``ValueError`` instead.
    """
    # `_prepare_dataset` reads these attributes of the trainer and these fields of SFTConfig, nothing else.
    trainer_shim = SimpleNamespace(_tokenizer=tokenizer, completion_only_loss=True, chat_template=None)
    args_shim = SimpleNamespace(
        dataset_num_proc=num_proc,
        dataset_text_field="text",
        assistant_only_loss=False,
        max_length=max_length,
        truncation_mode="keep_start",
        packing_strategy="bfd",
        shuffle_dataset=False,
        seed=0,
    )
    row = "__bridge_row__"  # to name the rows that TRL drops after truncation
    tokenized = SFTTrainer._prepare_dataset(
        trainer_shim, dataset.add_column(row, list(range(len(dataset)))), tokenizer, args_shim, packing=False,
        formatting_func=None, dataset_name="sft",
    )
    if len(tokenized) < len(dataset):
        # TRL silently drops a trace whose prompt alone fills max_length (nothing left to learn from): say so, and
        # refuse when so many go that the SFT stream would no longer be the dataset the user gave.
        kept = set(tokenized[row])
        dropped = [i for i in range(len(dataset)) if i not in kept]
        which = f"{len(dropped)} of {len(dataset)} traces (rows {dropped[:5]}{' ...' if len(dropped) > 5 else ''})"
        if len(dropped) > MAX_DROPPED_SHARE * len(dataset):
            raise ValueError(
                f"`sft_dataset`: {which} have no completion token left after truncation to sft_max_length="
                f"{max_length}: their prompt alone fills it. Dropping more than {MAX_DROPPED_SHARE:.0%} of the traces "
                "would train on another dataset than the one given: raise `sft_max_length` or shorten those prompts."
            )
        logger.warning(
            "SFT dataset: dropped %s whose prompt alone fills sft_max_length=%d (no completion token left to learn "
            "from); raise `sft_max_length` to keep them", which, max_length,
        )
    return tokenized.select_columns(["input_ids", "labels"])


class SFTStream:
    """Endless, seeded, resumable batches of tokenised expert traces.

    Epoch e is the permutation `torch.randperm(n, generator=seed + e)`; each call returns the next
    `batch_size * world_size` rows of it, of which this process keeps its `rank`-th share. The state is two integers,
    so a checkpoint restores the exact stream.
    """

    def __init__(self, dataset: Dataset, pad_token_id: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.collator = DataCollatorForLanguageModeling(pad_token_id=pad_token_id)
        self.epoch = 0
        self.offset = 0
        self._perm = None

    def _permutation(self):
        if self._perm is None:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            self._perm = torch.randperm(len(self.dataset), generator=g).tolist()
        return self._perm

    def next_batch(self) -> dict[str, torch.Tensor]:
        n_global = self.batch_size * self.world_size
        indices = []
        while len(indices) < n_global:
            perm = self._permutation()
            take = perm[self.offset : self.offset + n_global - len(indices)]
            indices += take
            self.offset += len(take)
            if self.offset >= len(perm):
                self.epoch, self.offset, self._perm = self.epoch + 1, 0, None
        mine = indices[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return self.collator([self.dataset[i] for i in mine])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.offset, self._perm = int(state["epoch"]), int(state["offset"]), None

