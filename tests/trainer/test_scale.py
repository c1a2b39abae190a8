"""What keeps BRIDGE correct at the paper's scale, on one CPU process: fp32 master weights under bf16 compute, every
accepted optimizer and schedule acting on all three parameter sets, refusals (naming the field) for what cannot work,
and the diagnostics that show when BRIDGE has degenerated (FSDP2 itself: tests/distributed/test_fsdp2.py)."""

import pytest
import torch
from peft import LoraConfig
from transformers import TrainerCallback

from trl_bridge import BridgeConfig, BridgeTrainer
from trl_bridge.trainer.bridge_config import SUPPORTED_OPTIMIZERS, SUPPORTED_SCHEDULERS
from trl_bridge.tiny import make_tiny_model, make_tiny_tokenizer

from ..helpers import digit_reward, make_trainer, rl_dataset, sft_dataset


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


def _states(trainer):
    return (
        [p.detach().clone() for _, p in trainer.base_params],
        [s.detach().clone() for s in trainer.shadow_params],
        [p.detach().clone() for _, p in trainer.adapter_params],
    )


# ----------------------------------------------------------------------------------------------------------------------
# Precision: bf16 compute, fp32 master weights
# ----------------------------------------------------------------------------------------------------------------------
def test_bf16_model_at_paper_lr_keeps_fp32_masters_that_move(tok, tmp_path):
    """A bf16 model at lr 5e-7: in bf16 the updates round away (θ̂ ≡ θ, no cooperative gain); with fp32 masters θ and θ̂
    move on nearly every entry that has a gradient and separate from each other, while the forward computes in bf16."""
    model = make_tiny_model(tok).to(torch.bfloat16)
    theta0 = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    trainer = make_trainer(tok, tmp_path, model=model, learning_rate=5e-7, bf16=True, max_steps=5)
    assert all(p.dtype == torch.float32 for _, p in trainer.base_params + trainer.adapter_params)
    assert all(s.dtype == torch.float32 for s in trainer.shadow_params)
    seen = []
    trainer.model.get_base_model().model.layers[0].mlp.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    trainer.train()
    assert torch.bfloat16 in seen  # the training forward ran under bf16 autocast
    total = sum(p.numel() for _, p in trainer.base_params)
    moved = sum((p.detach() != theta0[n]).sum().item() for n, p in trainer.base_params)
    apart = sum((s.detach() != p.detach()).sum().item() for (_, p), s in zip(trainer.base_params, trainer.shadow_params))
    # ~21% of θ's entries get no gradient at all on this task (unused token embeddings, key biases): same as in fp32
    assert moved / total > 0.7, moved / total
    assert apart / total > 0.6, apart / total
    assert [h["bridge/shadow_divergence"] for h in trainer.state.log_history if "bridge/shadow_divergence" in h][-1] > 0


def test_half_model_without_autocast_is_upcast_whole(tok, tmp_path):
    """bf16 weights with bf16=False: the policy computes in fp32 (a trainable subset must not meet bf16 frozen weights
    in one matmul), and trains."""
    model = make_tiny_model(tok).to(torch.bfloat16)
    trainer = make_trainer(tok, tmp_path, model=model, bf16=False, max_steps=1,
                           trainable_base_parameters=[r"layers\.1\.mlp"])
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    before = _states(trainer)
    trainer.train()
    after = _states(trainer)
    assert all(not torch.equal(a, b) for a, b in zip(before[0], after[0]))


# ----------------------------------------------------------------------------------------------------------------------
# Optimizers and schedules: the same for θ, θ̂ and w, or refused
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("optim", SUPPORTED_OPTIMIZERS)
def test_every_supported_optimizer_trains_all_three_sets(tok, tmp_path, optim):
    trainer = make_trainer(tok, tmp_path, optim=optim, max_steps=2, learning_rate=1e-3)
    before = _states(trainer)
    trainer.train()
    classes = {type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer),
               type(trainer.shadow_optimizer), type(trainer.adapter_optimizer)}
    assert len(classes) == 1  # one optimizer class for the three sets
    for name, b, a in zip(("θ", "θ̂", "w"), before, _states(trainer)):
        assert any(not torch.equal(x, y) for x, y in zip(b, a)), f"{optim}: {name} did not move"


@pytest.mark.parametrize("schedule", SUPPORTED_SCHEDULERS)
def test_every_supported_schedule_scales_all_three_learning_rates_alike(tok, tmp_path, schedule):
    kwargs = {"min_lr_rate": 0.1} if "min_lr" in schedule else {}
    if schedule == "warmup_stable_decay":
        kwargs = {"num_decay_steps": 4}
    trainer = make_trainer(tok, tmp_path, lr_scheduler_type=schedule, lr_scheduler_kwargs=kwargs, warmup_steps=2,
                           learning_rate=1e-2, adapter_learning_rate=3e-3, shadow_learning_rate=5e-3)
    trainer.create_optimizer()
    trainer.create_scheduler(num_training_steps=10)
    for step in range(10):
        lrs = [opt.param_groups[0]["lr"] for opt in (trainer.optimizer, trainer.shadow_optimizer, trainer.adapter_optimizer)]
        assert lrs[1] / 5e-3 == pytest.approx(lrs[0] / 1e-2, abs=1e-9), (schedule, step)
        assert lrs[2] / 3e-3 == pytest.approx(lrs[0] / 1e-2, abs=1e-9), (schedule, step)
        for s in (trainer.lr_scheduler, trainer.shadow_scheduler, trainer.adapter_scheduler):
            s.step()


def test_absolute_min_lr_is_relative_to_each_peak(tok, tmp_path):
    """An absolute min_lr (1e-3) above w's peak (3e-4) would make w's lr *rise*; it becomes 10% of each peak."""
    trainer = make_trainer(tok, tmp_path, lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr": 1e-3},
                           learning_rate=1e-2, adapter_learning_rate=3e-4)
    assert trainer.args.lr_scheduler_kwargs == {"min_lr_rate": pytest.approx(0.1)}
    trainer.create_optimizer()
    trainer.create_scheduler(num_training_steps=10)
    for _ in range(10):
        trainer.lr_scheduler.step()
        trainer.adapter_scheduler.step()
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    assert trainer.adapter_optimizer.param_groups[0]["lr"] == pytest.approx(3e-5)


@pytest.mark.parametrize(
    "overrides,field",
    [
        ({"fp16": True}, "fp16"),
        ({"deepspeed": {"zero_optimization": {"stage": 2}}}, "deepspeed"),
        ({"fsdp": "full_shard", "fsdp_config": {"version": 1}}, "fsdp"),
        ({"optim": "lomo"}, "optim"),
        ({"optim": "schedule_free_adamw"}, "optim"),
        ({"optim": "galore_adamw"}, "optim"),
        ({"optim_target_modules": ["attn"]}, "optim_target_modules"),
        ({"lr_scheduler_type": "reduce_lr_on_plateau"}, "lr_scheduler_type"),
        ({"lr_scheduler_type": "greedy"}, "lr_scheduler_type"),
    ],
)
def test_unsupported_settings_are_refused_naming_the_field(tmp_path, overrides, field):
    with pytest.raises(ValueError, match=rf"BridgeConfig\.{field}="):
        BridgeConfig(output_dir=str(tmp_path), **overrides)
    assert not (tmp_path / "checkpoint-1").exists()


@pytest.mark.parametrize(
    "lora,match",
    [
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"lora_bias": True, "target_modules": ["q_proj", "o_proj"]}, "lora_bias"),  # o_proj has no bias to merge into
    ],
)
def test_adapter_options_the_export_cannot_honour_fail_at_construction(tok, tmp_path, lora, match):
    config = LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM", **lora)
    args = BridgeConfig(output_dir=str(tmp_path / "out"), max_steps=1, report_to="none", per_device_train_batch_size=4,
                        num_generations=4, max_completion_length=8)
    with pytest.raises(ValueError, match=match):
        BridgeTrainer(model=make_tiny_model(tok), reward_funcs=digit_reward, args=args, train_dataset=rl_dataset(),
                      sft_dataset=sft_dataset(), processing_class=tok, peft_config=config)
    out = tmp_path / "out"
    assert not out.exists() or not any(out.iterdir())  # nothing written


def test_dora_and_lora_bias_train_and_export_the_policy(tok, tmp_path):
    """Adapter variants that PEFT merges: the saved folder reproduces the trained policy's logits."""
    from transformers import AutoModelForCausalLM

    for i, lora in enumerate(({"use_dora": True}, {"lora_bias": True, "target_modules": ["q_proj", "v_proj"]})):
        config = LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM", **lora)
        trainer = make_trainer(tok, tmp_path / str(i), max_steps=2, learning_rate=1e-2)
        trainer = BridgeTrainer(model=make_tiny_model(tok), reward_funcs=digit_reward, args=trainer.args,
                                train_dataset=rl_dataset(), sft_dataset=sft_dataset(), processing_class=tok,
                                peft_config=config)
        trainer.train()
        trainer.save_model(str(tmp_path / str(i) / "export"))
        ids = torch.tensor([[5, 17, 33, 2, 9, 41]])
        trainer.model.eval()
        with torch.no_grad():
            live = trainer.model(input_ids=ids).logits
            saved = AutoModelForCausalLM.from_pretrained(tmp_path / str(i) / "export")(input_ids=ids).logits
        assert (live - saved).abs().max() < 1e-5, lora


# ----------------------------------------------------------------------------------------------------------------------
# Diagnostics that make a degenerate run visible
# ----------------------------------------------------------------------------------------------------------------------
class _Divergence(TrainerCallback):
    def __init__(self, ref):
        self.ref, self.values = ref, {}

    def on_step_end(self, args, state, control, **kw):
        t = self.ref[0]
        diff = sum(((s - p) ** 2).sum() for (_, p), s in zip(t.base_params, t.shadow_params)) ** 0.5
        norm = sum((p**2).sum() for _, p in t.base_params) ** 0.5
        self.values[state.global_step] = (diff / norm).item()


def test_shadow_divergence_is_logged_as_the_relative_distance_of_theta_hat_to_theta(tok, tmp_path):
    ref = []
    cb = _Divergence(ref)
    trainer = make_trainer(tok, tmp_path, callbacks=[cb], max_steps=3)
    ref.append(trainer)
    trainer.train()
    logged = {h["step"]: h["bridge/shadow_divergence"] for h in trainer.state.log_history if "bridge/shadow_divergence" in h}
    assert logged[1] == 0.0  # θ̂⁰ = θ⁰
    for step in (2, 3):  # logged at step k: ‖θ̂ − θ‖/‖θ‖ at iterate k, i.e. after step k − 1
        assert logged[step] == pytest.approx(cb.values[step - 1], rel=1e-5)
        assert logged[step] > 0


def test_cooperative_ratio_is_zero_without_rl_and_positive_with_it(tok, tmp_path):
    ratios = {}
    for lam in (0.0, 0.5):
        trainer = make_trainer(tok, tmp_path / str(lam), max_steps=2, bridge_lambda=lam)
        trainer.train()
        ratios[lam] = [h["bridge/cooperative_to_sft_grad_ratio"] for h in trainer.state.log_history
                       if "bridge/cooperative_to_sft_grad_ratio" in h]
    assert ratios[0.0] == [0.0, 0.0]
    assert all(r > 0 for r in ratios[0.5])
