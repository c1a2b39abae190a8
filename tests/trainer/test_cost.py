"""No work the algorithm does not need (issue: cost): the SFT pass never materialises the vocabulary logits, truncated IS
adds no forwards on fresh rollouts, and the logged `step_time` includes the shadow pass. `trl-bridge bench` itself:
tests/experiments/test_bench.py."""

import time

import pytest
import torch
import torch.nn.functional as F

from trl_bridge.tiny import make_tiny_tokenizer

from ..helpers import make_trainer


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


def test_sft_loss_is_nll_at_temperature_one_through_the_fused_head(tok, tmp_path):
    """Sampling at temperature 0.7 does not change L_SFT (the NLL at temperature 1), the LM head module is never run
    (TRL's fused head projects in tiles: no (batch, length, vocabulary) logits), and GRPO's head keeps its temperature."""
    trainer = make_trainer(tok, tmp_path, temperature=0.7, max_steps=1)
    model = trainer.model
    batch = trainer.sft_stream.next_batch()
    trainer.sft_stream.next_batch = lambda: batch
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop
    head_calls = []
    handle = model.get_base_model().lm_head.register_forward_hook(lambda *a: head_calls.append(1))
    loss = trainer._sft_loss(model, 0)
    handle.remove()
    assert head_calls == []
    ids, mask = batch["input_ids"], batch["attention_mask"]
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    expected = F.cross_entropy(logits.flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    # GRPO's head still scores at the sampling temperature afterwards
    logps, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, mask, ids.size(1) - 1)
    want = torch.gather(F.log_softmax(logits / 0.7, -1), 2, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    real = mask[:, 1:].bool()
    torch.testing.assert_close(logps[real], want[real], rtol=1e-5, atol=1e-5)


def test_truncated_is_on_fresh_rollouts_adds_no_forward(tok, tmp_path):
    """num_iterations = 1: the importance weights min(π(θ̂+w)/π(θ+w), C) come from passes A and B themselves (no
    no-grad forwards), and equal those of independent forwards of both policies."""
    trainer = make_trainer(tok, tmp_path, shadow_off_policy="truncated_is", shadow_is_cap=1.5, max_steps=4,
                           learning_rate=3e-2)
    extra_forwards, checked = [], []
    no_grad_logps = trainer._no_grad_logps
    trainer._no_grad_logps = lambda batch: extra_forwards.append(1) or no_grad_logps(batch)
    original = trainer._rl_loss_and_logps

    def spy(model, inputs):
        if trainer._record.on_logps is None:
            return original(model, inputs)
        base_adv = inputs["advantages"].unsqueeze(1)
        shadow = no_grad_logps(inputs)  # pass B runs with θ̂ in the base weights' place
        with trainer._shadow_in_place(keep_grads=True):
            base = no_grad_logps(inputs)
        expected = torch.exp(shadow - base).clamp(max=1.5)
        out = original(model, inputs)
        keep = (base_adv != 0).expand_as(expected) & inputs["completion_mask"].bool()
        torch.testing.assert_close((inputs["advantages"] / base_adv)[keep], expected[keep], rtol=1e-4, atol=1e-5)
        checked.append((expected[keep] - 1).abs().max().item())
        return out

    trainer._rl_loss_and_logps = spy
    trainer.train()
    assert extra_forwards == []
    assert len(checked) == 4 and max(checked) > 1e-4  # θ̂ drifted from θ: the weights are not all 1


def test_shadow_logps_at_sampling_only_when_grpo_keeps_old_logps(tok, tmp_path):
    calls = []
    trainer = make_trainer(tok, tmp_path, num_iterations=2, max_steps=2)
    no_grad_logps = trainer._no_grad_logps
    trainer._no_grad_logps = lambda batch: calls.append(1) or no_grad_logps(batch)
    trainer.train()
    assert len(calls) == 1  # one generation batch serves both iterations: θ̂'s sampling-time log-probs once


def test_step_time_includes_the_shadow_pass(tok, tmp_path):
    trainer = make_trainer(tok, tmp_path, max_steps=2, gradient_accumulation_steps=2, per_device_train_batch_size=2)
    original = trainer._shadow_backward

    def slow(*args, **kwargs):
        time.sleep(0.25)
        return original(*args, **kwargs)

    trainer._shadow_backward = slow
    trainer.train()
    step_times = [h["step_time"] for h in trainer.state.log_history if "step_time" in h]
    assert len(step_times) == 2 and min(step_times) >= 0.5  # two micro-batches, each with a 0.25 s pass B
    assert trainer.phases.seconds["shadow"] >= 1.0 and trainer.phases.seconds["sft"] > 0


def test_lean_shadow_keeps_no_full_size_optimizer_state_and_trains(tok, tmp_path):
    trainer = make_trainer(tok, tmp_path, shadow_storage="lean", max_steps=3, learning_rate=1e-2)
    shadow0 = [s.detach().clone() for s in trainer.shadow_params]
    trainer.train()
    moved = [not torch.equal(a, b) for a, b in zip(shadow0, trainer.shadow_params)]
    assert sum(moved) > 0.7 * len(moved)
    state_elems = sum(v.numel() for st in trainer.shadow_optimizer.state.values() for v in st.values() if torch.is_tensor(v))
    param_elems = sum(s.numel() for s in trainer.shadow_params)
    full_elems = sum(v.numel() for st in trainer.optimizer.state.values() for v in st.values() if torch.is_tensor(v) and v.dim())
    assert full_elems >= 2 * sum(p.numel() for _, p in trainer.base_params)  # θ keeps AdamW's two moments
    assert state_elems < 0.2 * param_elems  # θ̂'s state: row/column statistics (and 1-D tensors' own), no moments


def test_lean_shadow_resumes_bit_identically(tok, tmp_path):
    opts = dict(shadow_storage="lean", max_steps=4, learning_rate=3e-3, save_strategy="steps", save_steps=2)
    full = make_trainer(tok, tmp_path / "full", **opts)
    full.train()
    resumed = make_trainer(tok, tmp_path / "resumed", **opts)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "out" / "checkpoint-2"))
    for name, s in full.shadow_state_dict().items():
        assert torch.equal(s, resumed.shadow_state_dict()[name]), name
    for (name, a), (_, b) in zip(full.base_params + full.adapter_params, resumed.base_params + resumed.adapter_params):
        assert torch.equal(a, b), name


TOP_LAYER = dict(trainable_base_parameters=[r"layers\.1\.", r"model\.norm\."], lora_layers_to_transform=[1])


@pytest.mark.parametrize("extra", [{}, {"gradient_checkpointing": True, "gradient_accumulation_steps": 2,
                                         "per_device_train_batch_size": 2, "shadow_off_policy": "truncated_is"}])
def test_shadow_pass_reuses_frozen_layer_activations_exactly(tok, tmp_path, extra):
    """θ and w only in layer 1 (of 2): pass B skips layer 0 and still gives bit-identical θ, θ̂ and w."""
    runs, layer0_calls = {}, {}
    for share in (True, False):
        trainer = make_trainer(tok, tmp_path / str(share), max_steps=3, share_frozen_activations=share, **TOP_LAYER, **extra)
        assert trainer._frozen_prefix == (1 if share else 0)
        calls = []
        layer0 = trainer.model.get_base_model().model.layers[0]
        layer0.mlp.register_forward_hook(lambda *a: calls.append(torch.is_grad_enabled()))
        trainer.train()
        runs[share] = (trainer.base_params, trainer.shadow_params, trainer.adapter_params)
        layer0_calls[share] = calls.count(True)  # training forwards (generation runs without grad)
    for (n, a), (_, b) in zip(runs[True][0] + runs[True][2], runs[False][0] + runs[False][2]):
        assert torch.equal(a, b), n
    for a, b in zip(runs[True][1], runs[False][1]):
        assert torch.equal(a, b)
    micro_batches = 3 * extra.get("gradient_accumulation_steps", 1)
    assert layer0_calls[False] - layer0_calls[True] == micro_batches  # one skipped layer-0 forward per pass B


def test_no_sharing_when_a_bottom_weight_trains(tok, tmp_path):
    assert make_trainer(tok, tmp_path, max_steps=1)._frozen_prefix == 0  # all weights, the embedding included
    both = make_trainer(tok, tmp_path, max_steps=1, trainable_base_parameters=[r"layers\.1\."], lora_layers_to_transform=[0])
    assert both._frozen_prefix == 0  # w in layer 0


def test_naive_mixing_holds_no_shadow_and_resumes_bit_identically(tok, tmp_path):
    """bridge_meta_term=False never uses θ̂, so none is kept (no copy of θ, no optimizer state); checkpoints still resume."""
    opts = dict(bridge_meta_term=False, max_steps=4, learning_rate=3e-3, save_strategy="steps", save_steps=2)
    full = make_trainer(tok, tmp_path / "full", **opts)
    full.train()
    assert full.shadow_params == [] and full.shadow_optimizer is None and full.shadow_state_dict() == {}
    resumed = make_trainer(tok, tmp_path / "resumed", **opts)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "out" / "checkpoint-2"))
    for (name, a), (_, b) in zip(full.base_params + full.adapter_params, resumed.base_params + resumed.adapter_params):
        assert torch.equal(a, b), name
