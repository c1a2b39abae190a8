"""BridgeTrainer with TRL's options (accumulation, num_iterations, every loss_type, KL), BRIDGE's options, and bad input."""

import pytest
import torch
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from trl_bridge import BridgeConfig, BridgeTrainer
from trl_bridge.tiny import make_tiny_model, make_tiny_tokenizer

from ..helpers import COMMON, adapter_state, base_state, digit_reward, make_trainer, rel_err, rl_dataset, sft_dataset

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"]


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_loss_type_with_accumulation_and_iterations(tok, tmp_path, loss_type):
    trainer = make_trainer(
        tok, tmp_path, loss_type=loss_type, max_steps=2, gradient_accumulation_steps=2, num_iterations=2,
        per_device_train_batch_size=2, num_generations=4, steps_per_generation=2, max_grad_norm=1.0,
    )
    theta0, w0 = base_state(trainer), adapter_state(trainer)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "bridge/sft_loss" in h]
    assert len(logs) == 2
    for h in logs:
        for key in ("loss", "bridge/sft_loss", "bridge/rl_loss", "bridge/rl_loss_shadow", "bridge/cooperative_gain"):
            assert torch.isfinite(torch.tensor(h[key])), (key, h[key])
    assert rel_err(list(base_state(trainer).values()), list(theta0.values())) > 1e-4
    assert rel_err(list(adapter_state(trainer).values()), list(w0.values())) > 1e-4
    assert rel_err(list(trainer.shadow_state_dict().values()), list(base_state(trainer).values())) > 1e-5


def test_lambda_one_reproduces_grpo_with_kl_accumulation_and_iterations(tok, tmp_path, monkeypatch):
    """The hard regime: beta > 0 (frozen reference), GA=2, num_iterations=2 (old log-probs, clipping), dapo. The full
    BRIDGE step is forced at λ = 1 (λ = 1 throughout would take the GRPO-only path): the shadow's own old log-probs
    and the frozen reference must keep it equal to GRPO."""
    monkeypatch.setattr(BridgeConfig, "lambda_is_always_one", lambda self: False)
    path = tmp_path / "tiny"
    make_tiny_model(tok).save_pretrained(path)
    tok.save_pretrained(path)
    opts = dict(COMMON, max_steps=4, learning_rate=1e-2, beta=0.1, gradient_accumulation_steps=2, num_iterations=2,
                per_device_train_batch_size=2, steps_per_generation=2, loss_type="dapo")
    bridge = BridgeTrainer(
        model=str(path), reward_funcs=digit_reward, train_dataset=rl_dataset(), sft_dataset=sft_dataset(),
        processing_class=tok, args=BridgeConfig(output_dir=str(tmp_path / "b"), bridge_lambda=1.0, lora_r=4, **opts),
    )
    w0 = adapter_state(bridge)
    bridge.train()
    grpo = GRPOTrainer(model=str(path), reward_funcs=digit_reward, train_dataset=rl_dataset(), processing_class=tok,
                       args=GRPOConfig(output_dir=str(tmp_path / "g"), **opts))
    grpo.train()
    for key in ("loss", "kl"):
        a = [h[key] for h in bridge.state.log_history if key in h]
        b = [h[key] for h in grpo.state.log_history if key in h]
        assert len(a) == len(b) == 4
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b))
    grpo_params = dict(grpo.model.named_parameters())
    for name, p in bridge.base_params:
        torch.testing.assert_close(p, grpo_params[name])
    assert all(torch.equal(p, w0[n]) for n, p in bridge.adapter_params)
    assert all(torch.equal(p, s) for (_, p), s in zip(bridge.base_params, bridge.shadow_params))


def test_kl_reference_is_the_frozen_initial_policy(tok, tmp_path):
    trainer = make_trainer(tok, tmp_path, beta=0.1, max_steps=3, learning_rate=1e-2)
    theta0 = base_state(trainer)
    trainer.train()
    ref = dict(trainer.ref_model.named_parameters())
    for name, p in trainer.base_params:
        assert torch.equal(ref[name], theta0[name]), name  # the reference did not move with θ
    assert rel_err(list(base_state(trainer).values()), list(theta0.values())) > 1e-4
    assert any(h.get("kl", 0) > 0 for h in trainer.state.log_history)


def test_truncated_is_shadow_weights_are_capped(tok, tmp_path):
    trainer = make_trainer(tok, tmp_path, shadow_off_policy="truncated_is", shadow_is_cap=1.5, max_steps=4, learning_rate=3e-2)
    seen = []
    original = trainer._rl_loss_and_logps

    def spy(model, inputs):
        out = original(model, inputs)
        if inputs["advantages"].dim() == 2:  # the shadow's re-weighted advantages (set once pass B has its log-probs)
            base = trainer._record.rl_inputs["advantages"].unsqueeze(1)
            ratio = torch.where(base != 0, inputs["advantages"] / base, torch.ones_like(inputs["advantages"]))
            seen.append(ratio)
        return out

    trainer._rl_loss_and_logps = spy
    trainer.train()
    assert len(seen) == 4
    ratios = torch.cat([r.flatten() for r in seen])
    assert ratios.max() <= 1.5 + 1e-6 and ratios.min() > 0
    assert (ratios - 1).abs().max() > 1e-4  # θ̂ drifted from θ, so the weights are not all 1


def test_lambda_schedule_warms_up(tok, tmp_path):
    trainer = make_trainer(tok, tmp_path, bridge_lambda=0.2, bridge_lambda_end=0.8, bridge_lambda_warmup_steps=3, max_steps=5)
    trainer.train()
    lams = [h["bridge/lambda"] for h in trainer.state.log_history if "bridge/lambda" in h]
    assert lams == pytest.approx([0.2, 0.4, 0.6, 0.8, 0.8])


def test_trainable_base_subset_freezes_the_rest(tok, tmp_path):
    trainer = make_trainer(tok, tmp_path, trainable_base_parameters=[r"layers\.1\.mlp"], max_steps=2, learning_rate=1e-2)
    everything0 = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    names = [n for n, _ in trainer.base_params]
    assert names and all("layers.1.mlp" in n for n in names)
    assert set(trainer.shadow_state_dict()) == set(names)
    for n, p in trainer.model.named_parameters():
        moved = not torch.equal(p, everything0[n])
        if "lora_" in n:
            continue
        assert moved == ("layers.1.mlp" in n), n


def test_without_meta_term_is_naive_mixing(tok, tmp_path):
    """The paper's "w/o J_meta" ablation: no shadow pass; θ and w follow (1−λ)L_SFT + λL_RL."""
    trainer = make_trainer(tok, tmp_path, bridge_meta_term=False, max_steps=3, learning_rate=1e-2)
    theta0, w0 = base_state(trainer), adapter_state(trainer)
    trainer.train()
    assert trainer.shadow_params == [] and trainer.shadow_optimizer is None  # no θ̂ is kept (nor its memory)
    assert rel_err(list(base_state(trainer).values()), list(theta0.values())) > 1e-4
    assert rel_err(list(adapter_state(trainer).values()), list(w0.values())) > 1e-4
    assert not any("bridge/rl_loss_shadow" in h for h in trainer.state.log_history)


def test_gradient_checkpointing_gives_the_same_updates(tok, tmp_path):
    runs = []
    for gc in (False, True):
        t = make_trainer(tok, tmp_path / str(gc), gradient_checkpointing=gc, max_steps=2, learning_rate=1e-2)
        t.train()
        runs.append((base_state(t), adapter_state(t), t.shadow_state_dict()))
    for a, b in zip(*runs):
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


def test_cpu_defaults_turn_off_bf16_and_checkpointing(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CPU defaults")
    args = BridgeConfig(output_dir=str(tmp_path))
    assert args.bf16 is False and args.gradient_checkpointing is False
    assert args.adapter_learning_rate == args.learning_rate == args.shadow_learning_rate


def test_accelerate_launch_cpu_keeps_the_model_on_the_cpu_with_cpu_defaults(tmp_path, monkeypatch):
    """`accelerate launch --cpu` (ACCELERATE_USE_CPU) on a machine with a GPU: the Trainer's device and the defaults are
    the CPU's (the Trainer would otherwise move the model to the GPU while accelerate runs on the CPU)."""
    is_available = torch.cuda.is_available
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    args = BridgeConfig(output_dir=str(tmp_path))
    assert args.use_cpu is True and args.bf16 is False and args.gradient_checkpointing is False
    assert args.dataloader_pin_memory is False and args.device.type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", is_available)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "false")  # without --cpu: as configured
    assert BridgeConfig(output_dir=str(tmp_path), bf16=False).use_cpu is False


# ----------------------------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the field, before any training step, nothing written lost
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field,value,match",
    [
        ("bridge_lambda", 1.5, "bridge_lambda"),
        ("bridge_lambda_end", -0.1, "bridge_lambda_end"),
        ("lora_r", 0, "lora_r"),
        ("shadow_off_policy", "bogus", "shadow_off_policy"),
        ("sft_per_device_train_batch_size", 0, "sft_per_device_train_batch_size"),
    ],
)
def test_invalid_config_names_the_field(tmp_path, field, value, match):
    with pytest.raises(ValueError, match=match):
        BridgeConfig(output_dir=str(tmp_path), **{field: value})


@pytest.mark.parametrize(
    "sft,match",
    [
        (None, "sft_dataset"),
        (Dataset.from_list([]), "empty"),
        (Dataset.from_list([{"prompt": "q"}]), "'completion'"),
        (Dataset.from_list([{"question": "q", "trace": "t"}]), "prompt"),
        (Dataset.from_list([{"prompt": 1, "completion": 2}]), "'prompt'"),
    ],
)
def test_bad_sft_dataset_is_rejected_at_construction(tok, tmp_path, sft, match):
    with pytest.raises((ValueError, TypeError), match=match):
        BridgeTrainer(model=make_tiny_model(tok), reward_funcs=digit_reward, train_dataset=rl_dataset(), sft_dataset=sft,
                      processing_class=tok, args=BridgeConfig(output_dir=str(tmp_path), **COMMON))


@pytest.mark.parametrize("rl,match", [(Dataset.from_list([]), "empty"), (Dataset.from_list([{"question": "q"}]), "'prompt'")])
def test_bad_rl_dataset_is_rejected_at_construction(tok, tmp_path, rl, match):
    with pytest.raises(ValueError, match=match):
        BridgeTrainer(model=make_tiny_model(tok), reward_funcs=digit_reward, train_dataset=rl, sft_dataset=sft_dataset(),
                      processing_class=tok, args=BridgeConfig(output_dir=str(tmp_path), **COMMON))


def test_raising_reward_function_fails_before_any_step_and_keeps_files(tok, tmp_path):
    def broken_reward(completions, answer, **kwargs):
        return [float(a) / 0 for a in answer]

    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    args = BridgeConfig(output_dir=str(out), max_steps=2, **{**COMMON, "save_strategy": "steps", "save_steps": 1})
    trainer = BridgeTrainer(model=make_tiny_model(tok), reward_funcs=[digit_reward, broken_reward], args=args,
                            train_dataset=rl_dataset(), sft_dataset=sft_dataset(), processing_class=tok)
    theta0 = base_state(trainer)
    with pytest.raises(RuntimeError, match="broken_reward.*ZeroDivisionError"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(p, theta0[n]) for n, p in trainer.base_params)
    assert sorted(x.name for x in out.iterdir()) == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "keep me"


def test_reward_function_with_wrong_return_type_is_rejected(tok, tmp_path):
    def scalar_reward(completions, **kwargs):
        return 1.0

    trainer = make_trainer(tok, tmp_path, max_steps=1)
    trainer.reward_funcs, trainer.reward_func_names = [scalar_reward], ["scalar_reward"]
    with pytest.raises(TypeError, match="scalar_reward"):
        trainer.train()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_on_gpu_trains(tok, tmp_path):
    args = dict(COMMON, use_cpu=False, bf16=True, gradient_checkpointing=True, max_steps=3, learning_rate=1e-3)
    trainer = BridgeTrainer(model=make_tiny_model(tok).cuda(), reward_funcs=digit_reward, train_dataset=rl_dataset(),
                            sft_dataset=sft_dataset(), processing_class=tok,
                            args=BridgeConfig(output_dir=str(tmp_path), lora_r=4, **args))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "bridge/sft_loss" in h]
    assert len(logs) == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    assert logs[-1]["bridge/sft_loss"] < logs[0]["bridge/sft_loss"]
