"""Exact resume in any pass over the RL prompts: a checkpoint at the end of an epoch, or inside a later one, resumes to
the uninterrupted run's θ, θ̂, w and logged rewards (BRIDGE and λ = 1), because every epoch's prompts are shuffled the
same way in a resumed run (trl_bridge/trainer/resume_sampler.py)."""

import pytest
import torch
from accelerate.data_loader import prepare_data_loader, skip_first_batches
from torch.utils.data import DataLoader
from trl.trainer.utils import RepeatSampler

from trl_bridge import BridgeConfig, BridgeTrainer
from trl_bridge.trainer.resume_sampler import EpochExactSampler, epoch_exact_sampler
from trl_bridge.tiny import make_tiny_model, make_tiny_tokenizer

from ..helpers import COMMON, digit_reward, rl_dataset, sft_dataset


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


def trl_sampler(shuffle=True):
    return RepeatSampler(list(range(10)), mini_repeat_count=2, batch_size=3, repeat_count=2, shuffle=shuffle, seed=7)


# ----------------------------------------------------------------------------------------------------------------------
# 1. The sampler: epoch e is TRL's (e+1)-th pass, whichever pass of this instance it is
# ----------------------------------------------------------------------------------------------------------------------
def test_each_epoch_is_shuffled_as_an_uninterrupted_trl_sampler_shuffles_it():
    uninterrupted = trl_sampler()
    passes = [list(uninterrupted) for _ in range(4)]
    assert len({tuple(p) for p in passes}) == 4  # every epoch has its own order
    assert list(trl_sampler()) == passes[0]  # TRL's sampler, built anew on resume, starts again from epoch 0's order
    epoch = [0]
    exact = epoch_exact_sampler(trl_sampler(), lambda: epoch[0])
    assert isinstance(exact, EpochExactSampler) and len(exact) == len(uninterrupted) == len(passes[0])
    for e in (3, 1, 1, 0, 2, 3):  # a sampler built at any epoch; any order of passes
        epoch[0] = e
        assert list(exact) == passes[e], e
    epoch[0] = 2.5  # the Trainer's `state.epoch` inside epoch 2
    assert list(exact) == passes[2]
    unshuffled = trl_sampler(shuffle=False)
    assert epoch_exact_sampler(unshuffled, lambda: 1) is unshuffled


def test_a_resumed_epoch_yields_the_uninterrupted_batches_under_two_processes():
    """Two processes resumed inside epoch 2 (accelerate shards the batches and skips the trained ones, and does not
    pass `set_epoch` on to the sampler there): each rank gets the rest of the uninterrupted run's epoch 2."""
    epoch = [0]

    def loader(rank):
        sampler = epoch_exact_sampler(trl_sampler(), lambda: epoch[0])
        return prepare_data_loader(DataLoader(list(range(10)), batch_size=3, sampler=sampler), num_processes=2,
                                   process_index=rank)

    for rank in (0, 1):
        uninterrupted, epochs = loader(rank), []
        for e in range(3):
            epoch[0] = e
            epochs.append([b.tolist() for b in uninterrupted])
        assert epochs[2] != epochs[0]
        resumed = skip_first_batches(loader(rank), 1)  # a new dataloader, as the Trainer builds on resume
        assert [b.tolist() for b in resumed] == epochs[2][1:]


# ----------------------------------------------------------------------------------------------------------------------
# 2. Training: checkpoints at and after an epoch boundary resume to the uninterrupted result
# ----------------------------------------------------------------------------------------------------------------------
# 16 prompts, 8 completions per device, 2 rollouts per prompt, gradient accumulation 2: a generation batch is 8 prompts,
# an epoch 2 optimizer steps. Step 2 and 4 end an epoch, step 3 lies inside the second.
EPOCH_OF_TWO_STEPS = dict(per_device_train_batch_size=8, num_generations=2, gradient_accumulation_steps=2, max_steps=5,
                          learning_rate=3e-3, max_grad_norm=1.0, save_strategy="steps", save_steps=1, lora_r=4,
                          sft_per_device_train_batch_size=2)


def answer_reward(completions, answer, **kwargs):
    """The same for every completion of a prompt (so it adds nothing to the advantages): the logged reward of a step
    then depends on which prompts it drew, not only on what the tiny model generated."""
    return [int(a) / 32 for a in answer]


def make(tok, out, lam):
    args = BridgeConfig(output_dir=str(out / "out"), bridge_lambda=lam, **{**COMMON, **EPOCH_OF_TWO_STEPS})
    return BridgeTrainer(model=make_tiny_model(tok), reward_funcs=[digit_reward, answer_reward], args=args,
                         train_dataset=rl_dataset(), sft_dataset=sft_dataset(), processing_class=tok)


def trained_state(trainer):
    """θ and w (the model's parameters), θ̂, and the rewards logged at each step."""
    state = {f"model.{n}": p.detach().clone() for n, p in trainer.model.named_parameters()}
    state.update({f"shadow.{n}": s for n, s in trainer.shadow_state_dict().items()})
    rewards = [(h["reward"], h["rewards/answer_reward/mean"]) for h in trainer.state.log_history if "reward" in h]
    return state, rewards


@pytest.mark.parametrize("lam", [0.5, 1.0], ids=["bridge", "lambda_1_grpo_path"])
def test_resume_at_and_after_an_epoch_boundary_is_bit_identical(tok, tmp_path, lam):
    full = make(tok, tmp_path / "full", lam)
    full.train()
    assert full.state.epoch == 2.5
    expected, rewards = trained_state(full)
    assert len(rewards) == 5 and rewards[2][1] != rewards[0][1]  # epoch 1 starts with other prompts than epoch 0
    for step in (2, 3, 4):
        resumed = make(tok, tmp_path / f"resumed{step}", lam)
        resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "out" / f"checkpoint-{step}"))
        state, resumed_rewards = trained_state(resumed)
        assert resumed_rewards == rewards, step
        assert state.keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(state[key], value), (step, key)
