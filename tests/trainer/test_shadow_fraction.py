"""`shadow_fraction`: the shadow pass (L_RL(θ̂,w), pass B) on a drawn subset of whole prompt groups, rescaled to be
unbiased. Proved on a tiny Qwen2: the average of the θ̂ and w gradients over every possible subset equals the full
pass's (for each way TRL normalises its loss), 1.0 leaves training bit-identical, a run resumes exactly, and the
settings it cannot honour are refused."""

import itertools

import pytest
import torch
from transformers import TrainerCallback

from trl_bridge import BridgeConfig

from ..helpers import make_trainer

GROUPS = dict(per_device_train_batch_size=8, num_generations=2)  # G = 4 prompt groups per generation batch


class GradsBeforeUpdate(TrainerCallback):
    """θ̂'s and w's gradients as BridgeCallback is about to apply them (callbacks given to the trainer run first)."""

    def __init__(self):
        self.trainer, self.grads = None, None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        t = self.trainer
        self.grads = [s.grad.detach().clone() for s in t.shadow_params] + \
                     [p.grad.detach().clone() for _, p in t.adapter_params]


def one_step(tok, tmp_path, subset=None, **overrides):  # noqa: F811
    """One optimizer step; with `subset` (group indices) the shadow pass is forced onto those groups."""
    grads = GradsBeforeUpdate()
    seen_rows = []
    trainer = make_trainer(tok, tmp_path, callbacks=[grads], max_steps=1, **GROUPS, **overrides)
    grads.trainer = trainer
    if subset is not None:
        chosen = torch.zeros(4, dtype=torch.bool)
        chosen[list(subset)] = True
        trainer._draw_shadow_rows = lambda group_ids: chosen[group_ids]
    original = trainer._rl_loss_and_logps

    def counting(model, inputs):
        seen_rows.append(inputs["completion_ids"].size(0))
        return original(model, inputs)

    trainer._rl_loss_and_logps = counting
    trainer.train()
    return grads.grads, seen_rows


@pytest.mark.parametrize("loss_type,top_layer_only", [("dapo", False), ("grpo", False), ("bnpo", False), ("dapo", True)])
def test_average_over_every_subset_equals_the_full_shadow_pass(tok, tmp_path, loss_type, top_layer_only):  # noqa: F811
    """k = 2 of G = 4 groups: the six subsets, each drawn with equal probability; their mean θ̂ and w gradients are the
    full pass's. `top_layer_only` trains the top layer alone, so pass B replays pass A's frozen-layer activations of
    the drawn rows."""
    opts = dict(loss_type=loss_type, learning_rate=1e-2)
    if top_layer_only:
        opts.update(trainable_base_parameters=[r"model\.layers\.1\.", r"model\.norm\."], lora_layers_to_transform=[1])
    full, rows = one_step(tok, tmp_path / "full", **opts)
    assert rows == [8, 8]  # pass A and pass B, every rollout
    subsets = list(itertools.combinations(range(4), 2))
    runs = []
    for i, subset in enumerate(subsets):
        grads, rows = one_step(tok, tmp_path / f"s{i}", subset=subset, shadow_fraction=0.5, **opts)
        assert rows == [8, 4]  # pass B on the two drawn groups only
        runs.append(grads)
    for j, expected in enumerate(full):
        mean = torch.stack([run[j] for run in runs]).mean(0)
        torch.testing.assert_close(mean, expected, rtol=1e-4, atol=1e-7)
    # and the subsets really differ from the full pass (the check above is not vacuous)
    assert any(not torch.allclose(runs[0][j], full[j], rtol=1e-3, atol=1e-6) for j in range(len(full)))


def test_shadow_fraction_one_leaves_training_bit_identical(tok, tmp_path):  # noqa: F811
    """1.0 draws nothing (the path is the paper's), and a subset that is every group gives the same bits too."""
    default = make_trainer(tok, tmp_path / "default", max_steps=2, **GROUPS)
    batches = []
    original = default._generate_and_score_completions
    default._generate_and_score_completions = lambda inputs: batches.append(original(inputs)) or batches[-1]
    default.train()
    assert batches and all("bridge_shadow_rows" not in b for b in batches)
    everything = make_trainer(tok, tmp_path / "all", max_steps=2, shadow_fraction=0.5, **GROUPS)
    everything._shadow_groups = lambda: (4, 4)
    everything._draw_shadow_rows = lambda group_ids: torch.ones_like(group_ids, dtype=torch.bool)
    everything.train()
    for a, b in ((default.checkpoint_state.tensors(), everything.checkpoint_state.tensors()),):
        for name in a:
            assert torch.equal(a[name], b[name]), name


def test_shadow_fraction_resumes_exactly(tok, tmp_path):  # noqa: F811
    """Checkpoints inside a generation batch (its draw is stored with the buffered rollouts) and at its boundary (the
    next draw is seeded by the step)."""
    opts = dict(max_steps=4, save_strategy="steps", save_steps=1, shadow_fraction=0.5, learning_rate=3e-3,
                per_device_train_batch_size=4, num_generations=2, gradient_accumulation_steps=2, steps_per_generation=4)
    full = make_trainer(tok, tmp_path / "full", **opts)
    full.train()
    expected = full.checkpoint_state.tensors()
    for step in (1, 2):
        resumed = make_trainer(tok, tmp_path / f"resumed{step}", **opts)
        resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "out" / f"checkpoint-{step}"))
        got = resumed.checkpoint_state.tensors()
        for name in expected:
            assert torch.equal(expected[name], got[name]), (step, name)
    divergence = [h["bridge/shadow_divergence"] for h in full.state.log_history if "bridge/shadow_divergence" in h]
    assert divergence[-1] > 0


def test_draw_is_whole_groups_seeded_and_at_least_one(tok, tmp_path):  # noqa: F811
    trainer = make_trainer(tok, tmp_path, max_steps=1, shadow_fraction=0.1, **GROUPS)
    assert trainer._shadow_groups() == (4, 1)  # round(0.4) = 0 -> at least one group
    group_ids = torch.arange(8) // 2
    draws = []
    for step in range(6):
        trainer._step = step
        rows = trainer._draw_shadow_rows(group_ids)
        assert rows.sum() == 2 and torch.equal(rows[0::2], rows[1::2])  # both rollouts of one group
        assert torch.equal(rows, trainer._draw_shadow_rows(group_ids))  # seeded
        draws.append(tuple(rows.tolist()))
    assert len(set(draws)) > 1


@pytest.mark.parametrize("overrides,match", [
    (dict(shadow_fraction=0.0), "shadow_fraction"),
    (dict(shadow_fraction=1.5), "shadow_fraction"),
    (dict(shadow_fraction=0.5, top_entropy_quantile=0.5), "top_entropy_quantile"),
])
def test_settings_it_cannot_honour_are_refused(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        BridgeConfig(output_dir=str(tmp_path), **overrides)
