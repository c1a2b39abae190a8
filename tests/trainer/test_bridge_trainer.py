"""BridgeTrainer's guarantees (BRIDGE.md §3), each proved on a tiny Qwen2 model built from a config, on CPU."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from trl_bridge import BridgeConfig
from trl_bridge.tiny import make_tiny_model

from ..helpers import COMMON, adapter_state, base_state, digit_reward, make_trainer, policy_copy, rel_err, rl_dataset


# ----------------------------------------------------------------------------------------------------------------------
# 1. Gradient reference: the three update directions equal an independent implementation of BRIDGE.md §3
# ----------------------------------------------------------------------------------------------------------------------
class _Recorder(TrainerCallback):
    """At the start of step `step`: snapshot θ, θ̂, w. Before its optimizer steps: the gradients about to be applied."""

    def __init__(self, trainer_ref, step):
        self.ref, self.step = trainer_ref, step
        self.snapshot = self.grads = None

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == self.step:
            t = self.ref[0]
            self.snapshot = (policy_copy(t, t.processing_class), [s.detach().clone() for s in t.shadow_params])

    def on_pre_optimizer_step(self, args, state, control, **kw):
        if state.global_step == self.step:
            t = self.ref[0]
            self.grads = (
                [p.grad.detach().clone() for _, p in t.base_params],
                [s.grad.detach().clone() for s in t.shadow_params],
                [p.grad.detach().clone() for _, p in t.adapter_params],
            )


def _naive_rl_loss(model, batch):
    """GRPO surrogate (loss_type="grpo") at ratio 1 (num_iterations=1): −mean_i (1/|o_i|) Σ_t A_i · exp(logp − sg(logp))."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    n = batch["completion_ids"].size(1)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, -n - 1 : -1].float()
    logp = torch.gather(F.log_softmax(logits, -1), 2, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)
    per_token = -torch.exp(logp - logp.detach()) * batch["advantages"].unsqueeze(1)
    cm = batch["completion_mask"].float()
    return ((per_token * cm).sum(1) / cm.sum(1).clamp(min=1)).mean()


def _naive_sft_loss(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    return F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=-100)


def test_gradients_match_naive_bridge_reference(tok, tmp_path):
    lam, step = 0.3, 2  # step 2: θ̂ has already diverged from θ, so the cooperative term is non-trivial
    ref = []
    rec = _Recorder(ref, step)
    trainer = make_trainer(
        tok, tmp_path, callbacks=[rec], bridge_lambda=lam, max_steps=step + 1, lr_scheduler_type="constant", loss_type="grpo"
    )
    ref.append(trainer)
    rl_batches, sft_batches = [], []
    prepare, next_sft = trainer._prepare_inputs, trainer.sft_stream.next_batch
    trainer._prepare_inputs = lambda b: rl_batches.append(prepare(b)) or rl_batches[-1]
    trainer.sft_stream.next_batch = lambda: sft_batches.append(next_sft()) or sft_batches[-1]
    trainer.train()
    assert rec.grads is not None and len(rl_batches) == step + 1
    rl, sft = rl_batches[step], sft_batches[step]

    model, shadow = rec.snapshot  # θ and w at iterate k, θ̂ at iterate k
    model.train()
    names = [n for n, _ in trainer.base_params]
    theta = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    w = [p for n, p in model.named_parameters() if "lora_" in n]
    assert len(theta) == len(names) and len(w) == len(trainer.adapter_params)

    g_sft = torch.autograd.grad(_naive_sft_loss(model, sft), theta + w)  # ∇ L_SFT(θ,w)
    g_rl = torch.autograd.grad(_naive_rl_loss(model, rl), theta + w)  # ∇ L_RL(θ,w)
    shadow_model = policy_copy(trainer, tok)
    shadow_model.load_state_dict(model.state_dict())
    shadow_theta = [p for n, p in shadow_model.named_parameters() if p.requires_grad and "lora_" not in n]
    shadow_w = [p for n, p in shadow_model.named_parameters() if "lora_" in n]
    with torch.no_grad():
        for p, s in zip(shadow_theta, shadow):
            p.copy_(s)
    g_hat = torch.autograd.grad(_naive_rl_loss(shadow_model, rl), shadow_theta + shadow_w)  # ∇ L_RL(θ̂,w)

    k = len(theta)
    expect_theta = [(1 - lam) * a + lam * b for a, b in zip(g_sft[:k], g_rl[:k])]  # §3.2
    expect_shadow = list(g_hat[:k])  # §3.3
    expect_w = [(1 - lam) * a + lam * (b - c) for a, b, c in zip(g_sft[k:], g_rl[k:], g_hat[k:])]  # §3.4
    got_theta, got_shadow, got_w = rec.grads
    assert rel_err(got_theta, expect_theta) < 1e-5
    assert rel_err(got_shadow, expect_shadow) < 1e-5
    assert rel_err(got_w, expect_w) < 1e-5
    # the cooperative term is really exercised: θ̂ ≠ θ and ∇w L_RL(θ,w) ≠ ∇w L_RL(θ̂,w)
    assert rel_err(g_rl[k:], g_hat[k:]) > 1e-4
    # and the logged diagnostic is ‖λ(∇w L_RL(θ,w) − ∇w L_RL(θ̂,w))‖ / ‖(1−λ)∇w L_SFT(θ,w)‖ of this very step
    coop = torch.cat([(lam * (b - c)).flatten() for b, c in zip(g_rl[k:], g_hat[k:])]).norm()
    sft_part = torch.cat([((1 - lam) * a).flatten() for a in g_sft[k:]]).norm()
    logged = next(h for h in trainer.state.log_history if h.get("step") == step + 1)
    assert logged["bridge/cooperative_to_sft_grad_ratio"] == pytest.approx((coop / sft_part).item(), rel=1e-4)


# ----------------------------------------------------------------------------------------------------------------------
# 2. λ = 1 reproduces GRPO step for step
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("full_machinery", [False, True], ids=["grpo_fast_path", "sft_shadow_adapter_at_lambda_1"])
def test_lambda_one_reproduces_grpo(tok, tmp_path, monkeypatch, full_machinery):
    """λ = 1 for the whole run takes the GRPO-only path (no SFT, shadow or adapter); forcing the full BRIDGE step at
    λ = 1 (SFT term with weight 0, pass B, the adapter) must give the same trajectory, with w and θ̂ = θ unchanged."""
    if full_machinery:
        monkeypatch.setattr(BridgeConfig, "lambda_is_always_one", lambda self: False)
    steps = 5
    bridge = make_trainer(tok, tmp_path, bridge_lambda=1.0, max_steps=steps, learning_rate=1e-2)
    assert (bridge.shadow_params is not None) == full_machinery
    w0 = adapter_state(bridge)
    bridge.train()

    grpo_args = GRPOConfig(output_dir=str(tmp_path / "grpo"), max_steps=steps, learning_rate=1e-2, **COMMON)
    grpo = GRPOTrainer(
        model=make_tiny_model(tok), reward_funcs=digit_reward, args=grpo_args, train_dataset=rl_dataset(), processing_class=tok
    )
    grpo.train()

    bridge_losses = [h["loss"] for h in bridge.state.log_history if "loss" in h]
    grpo_losses = [h["loss"] for h in grpo.state.log_history if "loss" in h]
    assert len(bridge_losses) == len(grpo_losses) == steps
    torch.testing.assert_close(torch.tensor(bridge_losses), torch.tensor(grpo_losses))
    grpo_params = dict(grpo.model.named_parameters())
    for name, p in bridge.base_params:
        torch.testing.assert_close(p, grpo_params[name])
    # the adapter never moves and the shadow is the base
    assert bool(bridge.adapter_params) == full_machinery
    for name, p in bridge.adapter_params:
        assert torch.equal(p, w0[name]), name
    for name, s in bridge.shadow_state_dict().items():
        assert torch.equal(dict(bridge.base_params)[name], s), name
    # and the weights did move (the comparison is not vacuous)
    assert any(not torch.equal(p, q) for (_, p), q in zip(bridge.base_params, make_tiny_model(tok).parameters()))


# ----------------------------------------------------------------------------------------------------------------------
# 3. λ = 0 is SFT of π(θ+w)
# ----------------------------------------------------------------------------------------------------------------------
def test_lambda_zero_is_sft_of_the_policy(tok, tmp_path):
    steps = 4
    trainer = make_trainer(
        tok, tmp_path, bridge_lambda=0.0, max_steps=steps, lr_scheduler_type="constant", optim="sgd",
        learning_rate=0.1, adapter_learning_rate=0.03,
    )
    reference = policy_copy(trainer, tok)  # π(θ⁰+w⁰), before any step
    batches, next_sft = [], trainer.sft_stream.next_batch
    trainer.sft_stream.next_batch = lambda: batches.append(next_sft()) or batches[-1]
    trainer.train()
    assert len(batches) == steps

    # a plain SFT loop on the same batches: SGD on θ (lr α) and on w (lr β). (SGD, not AdamW: Adam turns the
    # round-off-sized gradients of, e.g., the key biases into full-size steps of arbitrary sign.)
    theta = [p for n, p in reference.named_parameters() if "lora_" not in n]
    w = [p for n, p in reference.named_parameters() if "lora_" in n]
    opt_theta = torch.optim.SGD(theta, lr=0.1)
    opt_w = torch.optim.SGD(w, lr=0.03)
    reference.train()
    for batch in batches:
        loss = reference(**batch).loss
        loss.backward()
        opt_theta.step(), opt_w.step()
        opt_theta.zero_grad(), opt_w.zero_grad()

    got = dict(trainer.model.named_parameters())
    for name, p in reference.named_parameters():
        torch.testing.assert_close(got[name], p, rtol=1e-5, atol=1e-6, msg=name)
    # the SFT loss fell along the way
    sft_losses = [h["bridge/sft_loss"] for h in trainer.state.log_history if "bridge/sft_loss" in h]
    assert sft_losses[-1] < sft_losses[0]


# ----------------------------------------------------------------------------------------------------------------------
# 4. Learning sanity: SFT loss falls; θ, θ̂ and w all move; θ̂ ≠ θ
# ----------------------------------------------------------------------------------------------------------------------
def test_learning_sanity_all_three_parameter_sets_move(tok, tmp_path):
    trainer = make_trainer(tok, tmp_path, bridge_lambda=0.5, max_steps=30, learning_rate=3e-3, max_grad_norm=1.0)
    theta0, w0 = base_state(trainer), adapter_state(trainer)
    trainer.train()
    sft = [h["bridge/sft_loss"] for h in trainer.state.log_history if "bridge/sft_loss" in h]
    assert len(sft) == 30
    assert sum(sft[-5:]) / 5 < 0.85 * sum(sft[:5]) / 5  # a clear fall, not noise
    theta, w, shadow = base_state(trainer), adapter_state(trainer), trainer.shadow_state_dict()
    assert all(set(d) for d in (theta, w, shadow))
    assert rel_err(list(theta.values()), list(theta0.values())) > 1e-3  # θ moved
    assert rel_err(list(shadow.values()), list(theta0.values())) > 1e-3  # θ̂ moved
    assert rel_err(list(w.values()), list(w0.values())) > 1e-3  # w moved
    assert rel_err(list(shadow.values()), list(theta.values())) > 1e-3  # θ̂ ≠ θ
    for key in ("bridge/cooperative_gain", "bridge/rl_loss_shadow", "bridge/grad_norm_adapter", "bridge/grad_norm_shadow"):
        assert key in trainer.state.log_history[0], key


# ----------------------------------------------------------------------------------------------------------------------
# 5. Resume from a mid-run checkpoint is bit-identical
# ----------------------------------------------------------------------------------------------------------------------
def test_resume_is_bit_identical(tok, tmp_path):
    opts = dict(max_steps=6, bridge_lambda=0.5, learning_rate=3e-3, save_strategy="steps", save_steps=3, max_grad_norm=1.0)
    full = make_trainer(tok, tmp_path / "full", **opts)  # uninterrupted, writes checkpoint-3 on its way
    full.train()
    ckpt = tmp_path / "full" / "out" / "checkpoint-3"
    assert (ckpt / "bridge_state.safetensors").is_file() and (ckpt / "bridge_optimizers.pt").is_file()

    resumed = make_trainer(tok, tmp_path / "resumed", **opts)  # a fresh process would build exactly this
    resumed.train(resume_from_checkpoint=str(ckpt))
    for a, b in ((base_state(full), base_state(resumed)), (adapter_state(full), adapter_state(resumed))):
        for name in a:
            assert torch.equal(a[name], b[name]), name
    sa, sb = full.shadow_state_dict(), resumed.shadow_state_dict()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


# ----------------------------------------------------------------------------------------------------------------------
# 6. Export: the merged model folder generates exactly like the in-memory policy
# ----------------------------------------------------------------------------------------------------------------------
def test_saved_merged_model_generates_like_the_policy(tok, tmp_path):
    trainer = make_trainer(tok, tmp_path, max_steps=3, learning_rate=3e-2)
    trainer.train()
    out = tmp_path / "export"
    trainer.save_model(str(out))
    loaded = AutoModelForCausalLM.from_pretrained(out)
    policy = trainer.model.eval()
    prompts = tok(["What is 3 + 4?", "What is 10 + 11?"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**prompts).logits, policy(**prompts).logits, rtol=1e-4, atol=1e-5)
        a = policy.generate(**prompts, max_new_tokens=12, do_sample=False)
        b = loaded.generate(**prompts, max_new_tokens=12, do_sample=False)
    assert torch.equal(a, b)
    assert not any("lora" in k for k in loaded.state_dict())
    # the adapter is really merged: it moved, and dropping it changes the logits
    assert any(p.abs().sum() > 0 for n, p in trainer.adapter_params if "lora_B" in n)
