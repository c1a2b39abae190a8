"""CHORD and LUFFY (trl_bridge.trainer.baselines), each checked against an independent computation of its loss and
gradient on a tiny model, and refused where they cannot combine with another option."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import TrainerCallback

from trl_bridge import BridgeConfig
from trl_bridge.trainer.baselines import chord_mu

from trl_bridge.tiny import make_tiny_model

from ..helpers import make_trainer, policy_copy, rel_err, rl_dataset, sft_dataset

NO_ADAPTER = dict(adapter_learning_rate=0.0, bridge_meta_term=False)


class _AtStep(TrainerCallback):
    """At the start of step `step`: a copy of the trainer's model. Before its optimizer step: θ's gradients."""

    def __init__(self, holder, step):
        self.holder, self.step = holder, step
        self.model = self.grads = None

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == self.step:  # an independent copy (TRL's fused head binds the forward to its model)
            trainer = self.holder[0]
            if hasattr(trainer.model, "peft_config"):
                self.model = policy_copy(trainer, trainer.processing_class)
            else:
                self.model = make_tiny_model(trainer.processing_class)
                self.model.load_state_dict(trainer.model.state_dict())

    def on_pre_optimizer_step(self, args, state, control, **kw):
        if state.global_step == self.step:
            self.grads = [p.grad.detach().clone() for _, p in self.holder[0].base_params]


def _completion_logps(model, batch):
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    n = batch["completion_ids"].size(1)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, -n - 1 : -1].float()
    return torch.gather(F.log_softmax(logits, -1), 2, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)


def _theta(model):
    return [p for n, p in model.named_parameters() if "lora_" not in n]


def _plain(name):
    from trl_bridge.engines.export import plain_name

    return plain_name(name)


def test_chord_mu_schedule_warms_up_then_decays_to_the_valley():
    mus = [chord_mu(s, 0.8, 0.1, warmup_steps=2, decay_steps=4) for s in range(8)]
    assert mus[:3] == pytest.approx([0.0, 0.4, 0.8])  # linear warm-up to the peak
    assert mus[4] == pytest.approx(0.1 + 0.7 * 0.5 * (1 + math.cos(math.pi * 2 / 4)))  # half cosine
    assert mus[6:] == pytest.approx([0.1, 0.1])  # the valley
    args = BridgeConfig(output_dir="/tmp/chord", chord_mu_peak=0.8, chord_mu_valley=0.1, chord_mu_warmup_steps=2,
                        chord_mu_decay_steps=4, use_cpu=True, report_to="none")
    assert [args.lambda_at(s) for s in range(8)] == pytest.approx([1 - m for m in mus])
    assert not args.lambda_is_always_one()


def test_chord_gradient_matches_an_independent_chord_loss(tok, tmp_path):
    """θ's gradient at step 2 = ∇[(1−μ) L_GRPO + μ L_SFT-φ], L_SFT-φ = token-mean of −p(1−p)·log p (p detached)."""
    step, holder = 2, []
    rec = _AtStep(holder, step)
    trainer = make_trainer(tok, tmp_path, callbacks=[rec], max_steps=step + 1, loss_type="grpo", chord_mu_peak=0.8,
                           chord_mu_valley=0.2, chord_mu_warmup_steps=1, chord_mu_decay_steps=3, chord_phi=True,
                           lr_scheduler_type="constant", **NO_ADAPTER)
    holder.append(trainer)
    rl_batches, sft_batches = [], []
    prepare, next_sft = trainer._prepare_inputs, trainer.sft_stream.next_batch
    trainer._prepare_inputs = lambda b: rl_batches.append(prepare(b)) or rl_batches[-1]
    trainer.sft_stream.next_batch = lambda: sft_batches.append(next_sft()) or sft_batches[-1]
    trainer.train()
    rl, sft = rl_batches[step], sft_batches[step]
    mu = chord_mu(step, 0.8, 0.2, 1, 3)

    model = rec.model.train()
    logp = _completion_logps(model, rl)
    cm = rl["completion_mask"].float()
    per_token = -torch.exp(logp - logp.detach()) * rl["advantages"].unsqueeze(1)
    l_grpo = ((per_token * cm).sum(1) / cm.sum(1).clamp(min=1)).mean()
    logits = model(input_ids=sft["input_ids"], attention_mask=sft["attention_mask"]).logits[:, :-1].float()
    labels = sft["labels"][:, 1:]
    keep = labels != -100
    token_logp = torch.gather(F.log_softmax(logits, -1), 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)[keep]
    p = token_logp.detach().exp()
    l_sft_phi = (-(p * (1 - p)) * token_logp).mean()
    names = {n for n, _ in trainer.base_params}
    theta = [q for n, q in model.named_parameters() if "lora_" not in n and _plain(n) in names]
    assert len(theta) == len(names)
    expected = torch.autograd.grad((1 - mu) * l_grpo + mu * l_sft_phi, theta, retain_graph=True)
    assert rel_err(rec.grads, expected) < 1e-5
    logged = next(h for h in trainer.state.log_history if h.get("step") == step + 1)
    assert logged["bridge/lambda"] == pytest.approx(1 - mu)
    # φ matters: the plain NLL gives another gradient
    plain = torch.autograd.grad((1 - mu) * l_grpo + mu * (-token_logp).mean(), theta)
    assert rel_err(plain, expected) > 1e-3


def test_luffy_injects_one_expert_trace_per_group_and_matches_an_independent_luffy_loss(tok, tmp_path):
    """λ = 1 (LUFFY as RL): the last rollout of every group is the prompt's expert trace, advantages are TRL's over the
    union, and θ's gradient = ∇ token-mean[on-policy: −Â·ratio; expert: −Â·π/(π+γ)] (LUFFY's `mix_core_alg`)."""
    holder, gamma = [], 0.1
    rec = _AtStep(holder, 0)
    trainer = make_trainer(tok, tmp_path, callbacks=[rec], max_steps=1, loss_type="bnpo", luffy=True, bridge_lambda=1.0,
                           luffy_gamma=gamma, **NO_ADAPTER)
    holder.append(trainer)
    batches = []
    prepare = trainer._prepare_inputs
    trainer._prepare_inputs = lambda b: batches.append(prepare(b)) or batches[-1]
    trainer.train()
    batch = batches[0]
    off = batch["luffy_off_policy"]
    assert off.sum().item() == len(off) // trainer.num_generations  # one expert trace per group

    # the expert rows hold the tokenised trace of their prompt (+ EOS, within max_completion_length)
    traces = {row["prompt"]: row["completion"] for row in sft_dataset()}
    prompts = tok.batch_decode(batch["prompt_ids"], skip_special_tokens=True)
    for i in off.nonzero().squeeze(1).tolist():
        ids = batch["completion_ids"][i][batch["completion_mask"][i].bool()].tolist()
        want = (tok(traces[prompts[i].strip()], add_special_tokens=False)["input_ids"] + [tok.eos_token_id])[:8]
        assert ids == want

    model = rec.model.train()
    logp = _completion_logps(model, batch)
    adv = batch["advantages"].unsqueeze(1)
    p = logp.exp()
    per_token = torch.where(off.unsqueeze(1), -adv * p / (p + gamma), -adv * torch.exp(logp - logp.detach()))
    cm = batch["completion_mask"].float()
    loss = (per_token * cm).sum() / cm.sum()
    expected = torch.autograd.grad(loss, [q for q in _theta(model) if q.requires_grad], retain_graph=True)
    assert rel_err(rec.grads, expected) < 1e-5
    # the shaping matters: plain GRPO on the same batch gives another gradient
    plain = torch.autograd.grad(((-adv * torch.exp(logp - logp.detach())) * cm).sum() / cm.sum(),
                                [q for q in _theta(model) if q.requires_grad])
    assert rel_err(plain, expected) > 1e-3


def test_luffy_advantages_are_computed_over_the_union_with_the_expert_reward(tok, tmp_path):
    """Before TRL's shuffle: the last rollout of each group of `num_generations` is the expert trace, it is rewarded
    like the others, and each row's advantage is TRL's group-normalised reward over the whole group (the union)."""
    trainer = make_trainer(tok, tmp_path, max_steps=1, luffy=True, bridge_lambda=1.0, scale_rewards="group", **NO_ADAPTER)
    outputs, rewards = [], []
    generate, calculate = trainer._generate_and_score_completions, trainer._calculate_rewards
    trainer._generate_and_score_completions = lambda b: outputs.append(generate(b)) or outputs[-1]
    trainer._calculate_rewards = lambda *a: rewards.append(calculate(*a)) or rewards[-1]
    trainer.train()
    out, r = outputs[0], rewards[0].sum(1)
    g = trainer.num_generations
    expert = out["luffy_off_policy"].view(-1, g)
    assert expert[:, -1].all() and not expert[:, :-1].any()
    groups = r.view(-1, g)
    expected = (groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)
    torch.testing.assert_close(out["advantages"].view(-1, g), expected, atol=1e-5, rtol=0)
    assert (groups[:, -1] >= 1.0).all()  # every expert trace holds its answer: the digit reward gives it at least 1


@pytest.mark.parametrize("overrides, match", [
    (dict(luffy=True, bridge_lambda=0.5), "shadow"),
    (dict(luffy=True, bridge_lambda=1.0, use_vllm=True), "use_vllm"),
    (dict(luffy=True, bridge_lambda=1.0, loss_type="sapo"), "loss_type"),
    (dict(luffy=True, bridge_lambda=1.0, chord_mu_peak=0.5, bridge_meta_term=False), "chord_mu_peak"),
    (dict(chord_mu_peak=0.5, bridge_lambda_end=0.7, bridge_lambda_warmup_steps=3), "λ schedule"),
    (dict(chord_mu_peak=1.5), "chord_mu_peak"),
    (dict(luffy_gamma=0.0), "luffy_gamma"),
])
def test_baseline_settings_it_cannot_honour_are_refused(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        BridgeConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_train_batch_size=4,
                     num_generations=4, **overrides)


def test_luffy_refuses_rl_prompts_without_an_expert_trace(tok, tmp_path):
    from datasets import Dataset

    from trl_bridge import BridgeTrainer
    from trl_bridge.tiny import make_tiny_model

    from ..helpers import COMMON, digit_reward

    args = BridgeConfig(output_dir=str(tmp_path / "o"), **{**COMMON, "max_steps": 1}, luffy=True, bridge_lambda=1.0)
    traces = Dataset.from_list([row for row in sft_dataset() if "3 +" not in row["prompt"]])
    with pytest.raises(ValueError, match="no expert trace"):
        BridgeTrainer(model=make_tiny_model(tok), reward_funcs=digit_reward, args=args, train_dataset=rl_dataset(),
                      sft_dataset=traces, processing_class=tok)
