"""What `trl-bridge compare`'s methods and diagnostics rest on: the per-group cooperative-gain estimate, prompt groups
kept through TRL's shuffle, the alternating λ, an adapter that never moves, the clean reward under noise, held-out
evaluation during training that leaves training unchanged, and a validation split disjoint from train and test."""

import json
import math

import pytest
import torch

from trl_bridge import BridgeConfig
from trl_bridge.trainer.bridge_trainer import cooperative_gain_estimate
from trl_bridge.tasks.data import make_arithmetic_task
from trl_bridge.tasks.rewards import with_reward_noise
from trl_bridge.tiny import make_tiny_tokenizer
from trl_bridge.train_cli import main as train_main

from ..helpers import adapter_state, base_state, make_trainer, rel_err
from ..helpers import TINY_RUN


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


def _gain(rewards, groups, shadow, base=None, proposal=None):
    """One-token completions: the sequence log-prob of row i is the given number."""
    col = lambda xs: torch.tensor(xs, dtype=torch.float32).unsqueeze(1)  # noqa: E731
    base = [0.0] * len(rewards) if base is None else base
    proposal = base if proposal is None else proposal
    return cooperative_gain_estimate(torch.tensor(rewards), torch.ones(len(rewards), 1),
                                     None if groups is None else torch.tensor(groups), col(proposal), col(base),
                                     col(shadow)).item()


def test_cooperative_gain_normalises_importance_weights_within_each_prompt_group():
    rewards, groups = [1.0, 0.0, 1.0, 0.0], [0, 0, 1, 1]
    # θ̂ puts 3:1 weight on group 0's rewarded rollout, is indifferent in group 1: Ĵ(θ̂) = (0.75·2 + 0.5·2)/4
    gain = _gain(rewards, groups, [math.log(3.0), 0.0, 0.0, 0.0])
    assert gain == pytest.approx(0.5 - 0.625)
    old_microbatch = 0.5 - (3 * 1 + 1 * 1) / 6  # the former estimate normalised over all four rows
    assert gain != pytest.approx(old_microbatch)
    # shifting every log-prob of one prompt by a constant (a prompt θ̂ finds likelier) moves no weight between
    # prompts: the estimate of E_x E_{y~π(θ̂)}[r] is unchanged
    assert _gain(rewards, groups, [math.log(3.0) + 5, 5.0, 0.0, 0.0]) == pytest.approx(gain)
    assert _gain(rewards, None, [math.log(3.0) + 5, 5.0, 0.0, 0.0]) != pytest.approx(gain)  # one group: it would
    # a prompt with one rollout in the micro-batch adds its reward to both terms: no gain from it
    assert _gain([1.0, 0.0, 1.0], [0, 0, 1], [math.log(3.0), 0.0, 7.0]) == pytest.approx((0.5 * 2 + 1) / 3 - (0.75 * 2 + 1) / 3)


def test_cooperative_gain_uses_the_sampling_policy_as_proposal():
    """With rollouts from an older policy q, both terms are importance-weighted from q (not from π(θ+w))."""
    rewards, groups = [1.0, 0.0], [4, 4]
    gain = _gain(rewards, groups, shadow=[0.0, 0.0], base=[math.log(2.0), 0.0], proposal=[0.0, 0.0])
    assert gain == pytest.approx(2 / 3 - 1 / 2)  # Ĵ(θ) = 2/3 (weights 2:1), Ĵ(θ̂) = 1/2


def test_prompt_groups_survive_trl_shuffle_and_the_logged_gain_is_the_estimate(tok, tmp_path):
    """Two prompts per generation batch, shuffled by TRL and split into 2 accumulation micro-batches."""
    trainer = make_trainer(tok, tmp_path, gradient_accumulation_steps=2, max_steps=2)
    seen, logged = [], []
    original = trainer._cooperative_gain

    def record(inputs, base_logps, shadow_logps):
        value = original(inputs, base_logps, shadow_logps)
        seen.append((inputs["bridge_group_ids"].clone(), inputs["prompt_ids"].clone(), inputs["prompt_mask"].clone()))
        logged.append(value.item())
        return value

    trainer._cooperative_gain = record
    trainer.train()
    assert len(seen) == 4  # 2 steps x 2 micro-batches
    for step in (seen[:2], seen[2:]):  # group ids number the prompts of one generation batch
        rows = {}
        for groups, prompt_ids, mask in step:
            for g, ids, m in zip(groups.tolist(), prompt_ids, mask):
                rows.setdefault(g, []).append(tuple(ids[m.bool()].tolist()))
        assert sorted(rows) == [0, 1] and all(len(r) == 4 and len(set(r)) == 1 for r in rows.values())  # 4 rollouts, 1 prompt
        assert rows[0][0] != rows[1][0]
    gains = [h["bridge/cooperative_gain"] for h in trainer.state.log_history if "bridge/cooperative_gain" in h]
    assert gains == pytest.approx([sum(logged[:2]) / 2, sum(logged[2:]) / 2])


def test_alternating_lambda_is_an_rl_step_then_an_sft_step(tmp_path):
    args = BridgeConfig(output_dir=str(tmp_path), bridge_lambda_alternate=True, report_to="none")
    assert [args.lambda_at(s) for s in range(5)] == [1.0, 0.0, 1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="bridge_lambda_end"):
        BridgeConfig(output_dir=str(tmp_path), bridge_lambda_alternate=True, bridge_lambda_end=0.5, report_to="none")


def test_zero_adapter_learning_rate_is_training_without_an_adapter(tok, tmp_path):
    """compare's no-adapter methods: LoRA B starts at 0 and never moves, so the policy is π(θ) with θ trained."""
    trainer = make_trainer(tok, tmp_path, adapter_learning_rate=0.0, bridge_meta_term=False, max_steps=2)
    theta0, w0 = base_state(trainer), adapter_state(trainer)
    trainer.train()
    assert all(torch.equal(p, w0[n]) for n, p in adapter_state(trainer).items())
    assert all(torch.count_nonzero(p) == 0 for n, p in trainer.adapter_params if "lora_B" in n)
    assert rel_err(list(base_state(trainer).values()), list(theta0.values())) > 1e-4


def test_noisy_reward_logs_the_clean_mean_through_trl_hook():
    logged = []
    noisy = with_reward_noise(lambda completions, **kw: [1.0, 0.0, 1.0, 1.0], 1.0, seed=0)
    out = noisy(completions=["a"] * 4, log_metric=lambda name, value: logged.append((name, value)))
    assert out == [0.0, 1.0, 0.0, 0.0]  # p = 1 flips every reward
    assert logged == [("rewards/<lambda>/clean_mean", 0.75)]


def test_heldout_evaluation_during_training_leaves_training_unchanged(tiny_model_dir, tmp_path):
    def train(name, *flags):
        out = tmp_path / name
        assert train_main(["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(out), *TINY_RUN, *flags]) == 0
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    plain = train("plain")
    evaluated = train("evaluated", "--heldout_eval_steps", "1", "--heldout_eval_subset", "3")
    curve = [(m["step"], m["heldout/num_problems"]) for m in evaluated if "heldout/accuracy" in m]
    assert curve == [(0, 3), (1, 3.0), (2, 3.0)]
    keys = ("reward", "loss", "bridge/sft_loss", "bridge/cooperative_gain")
    assert [[m.get(k) for k in keys] for m in plain if "reward" in m] == [[m.get(k) for k in keys] for m in evaluated if "reward" in m]


def test_bad_heldout_evaluation_settings_fail_before_training(tiny_model_dir, tmp_path, capsys):
    """One line naming the setting, exit code 2 (the CLI's user-error contract), nothing written."""
    assert train_main(["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path / "o"), *TINY_RUN,
                       "--heldout_eval_steps", "1", "--heldout_eval_subset", "0"]) == 2
    assert "heldout_eval_subset" in capsys.readouterr().err
    assert train_main(["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path / "o"), *TINY_RUN,
                       "--heldout_eval_steps", "1", "--eval_samples", "0"]) == 2
    assert "heldout_eval_steps needs a held-out split" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_validation_split_is_disjoint_and_leaves_train_and_test_unchanged():
    plain = make_arithmetic_task(num_train=40, num_test=10, seed=5)
    task = make_arithmetic_task(num_train=40, num_test=10, num_validation=10, seed=5)
    prompts = lambda split, t=task: [str(p) for p in t[split]["prompt"]]  # noqa: E731
    assert prompts("rl") == prompts("rl", plain) and prompts("test") == prompts("test", plain)
    val = set(prompts("validation"))
    assert len(val) == 10 and not val & set(prompts("rl") + prompts("test"))
    assert "validation" not in plain
