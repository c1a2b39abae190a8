"""The compressed shadow (`shadow_storage="bf16_delta"`): θ̂ = θ + d with d in bf16 and momentum-free factored Adafactor.
It keeps at most 3 bytes per trainable parameter between steps, puts θ̂ in θ's storage for pass B and gives θ back bit
for bit, stays an absolute copy when θ moves, drifts from an fp32 shadow within a stated bound, resumes bit-identically
and round-trips through checkpoints. Under DDP and FSDP2: tests/distributed/test_fsdp2.py."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from trl_bridge import BridgeConfig
from trl_bridge.tiny import make_tiny_tokenizer
from trl_bridge.trainer.delta_shadow import DeltaShadow, local, rounding_noise, stochastic_round

from ..helpers import make_trainer

DELTA = dict(shadow_storage="bf16_delta")


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


def bits(t):
    return t.detach().contiguous().view(torch.int32).clone()


def test_shadow_keeps_at_most_three_bytes_per_parameter_between_steps_and_trains(tok, tmp_path):
    trainer = make_trainer(tok, tmp_path, max_steps=3, learning_rate=1e-2, **DELTA)
    theta0 = {n: p.detach().clone() for n, p in trainer.base_params}
    trainer.train()
    shadow = trainer.delta_shadow
    params = sum(p.numel() for _, p in trainer.base_params)
    held = sum(d.numel() * d.element_size() for d in shadow.deltas)
    held += sum(v.numel() * v.element_size() for st in trainer.shadow_optimizer.state.values() for v in st.values()
                if torch.is_tensor(v))
    assert held / params <= 3.0 and shadow.bytes_per_parameter(trainer.shadow_optimizer) == held / params
    assert all(d.dtype == torch.bfloat16 for d in shadow.deltas)
    # θ̂'s fp32 slots hold no memory between steps, and no gradient of θ̂ outlives the step
    assert all(local(s).untyped_storage().nbytes() == 0 for s in trainer.shadow_params)
    assert shadow.grads == [None] * len(shadow.grads) and all(s.grad is None for s in trainer.shadow_params)
    moved = [not torch.equal(s, theta0[n]) for n, s in trainer.shadow_state_dict().items()]
    assert sum(moved) > 0.7 * len(moved)
    divergence = [h["bridge/shadow_divergence"] for h in trainer.state.log_history if "bridge/shadow_divergence" in h]
    assert divergence[0] == 0.0 and divergence[-1] > 0.01  # ‖d‖/‖θ‖: θ̂ separates from θ


@pytest.mark.parametrize("chunk", [1 << 20, 100])
@pytest.mark.parametrize("hooks", [False, True])
def test_pass_b_puts_theta_hat_in_place_and_restores_theta_bit_for_bit(monkeypatch, chunk, hooks):
    """Including the elements that a 1-byte correction cannot restore (θ = ±0, |θ| ≪ |d|, sign changes), processed
    in one chunk or many; θ̂'s gradient reaches its bf16 accumulator after the backward or (`hooks`) during it."""
    import trl_bridge.trainer.delta_shadow as delta_shadow

    monkeypatch.setattr(delta_shadow, "CHUNK", chunk)
    torch.manual_seed(0)
    theta = torch.randn(64, 48) * 0.02
    theta.view(-1)[:6] = theta.view(-1)[-6:] = torch.tensor([0.0, -0.0, 1e-30, -1e-12, 3e-8, -2e-6])
    p = torch.nn.Parameter(theta.clone())
    p.grad = torch.full_like(theta, 7.0)  # θ's gradient from pass A, set aside during pass B
    shadow = DeltaShadow([("w", p)], seed=0)
    shadow.deltas[0] = (torch.randn(64, 48) * 1e-3).to(torch.bfloat16)
    shadow.deltas[0].view(-1)[:6] = shadow.deltas[0].view(-1)[-6:] = torch.tensor(
        [1e-3, -1e-3, 2e-3, 1e-4, -5e-3, 1e-5], dtype=torch.bfloat16)
    with shadow.in_place(torch.nn.Module(), hooks=hooks):
        torch.testing.assert_close(p.detach(), theta + shadow.deltas[0].float(), rtol=0, atol=0)
        assert p.grad is None
        (p * 2.0).sum().backward()  # θ̂'s gradient: 2 everywhere
        assert (p.grad is None) == hooks and (shadow.grads[0] is not None) == hooks  # folded in during the backward
    assert torch.equal(bits(p), bits(theta))
    assert torch.equal(p.grad, torch.full_like(theta, 7.0))
    assert torch.equal(shadow.grads[0], torch.full_like(theta, 2.0, dtype=torch.bfloat16))
    with shadow.in_place(torch.nn.Module(), keep_grads=True):
        pass
    assert torch.equal(bits(p), bits(theta)) and torch.equal(shadow.grads[0].float(), torch.full_like(theta, 2.0))


def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour():
    x = torch.full((400_000,), 1.0 + 3 * 2**-10)  # 3/8 of the way from bf16's 1.0 to 1.0078125
    for sign in (1.0, -1.0):
        r = stochastic_round(sign * x, rounding_noise(x, 11)).float()
        assert set(r.abs().unique().tolist()) == {1.0, 1.0078125}
        assert abs(r.double().mean().item() - sign * x[0].item()) < 3e-5  # std of the mean ≈ 6e-6
    noise = rounding_noise(torch.empty(10, 7), 5)
    assert torch.equal(noise, rounding_noise(torch.empty(10, 7), 5)) and not torch.equal(noise, rounding_noise(torch.empty(10, 7), 6))


def test_theta_hat_stays_put_when_theta_moves(tok, tmp_path):
    """shadow_learning_rate = 0: θ̂ must stay θ⁰ while θ trains, i.e. d follows −Δθ after every step of θ (d ← θ̂ − θ
    right after θᵢ's step), up to d's own bf16 rounding: two roundings per step (θ's step before pass B, θ̂'s after),
    each within one bf16 spacing of |d| (≤ 2^-7 |d|), unbiased."""
    steps = 3
    trainer = make_trainer(tok, tmp_path, max_steps=steps, learning_rate=1e-2, shadow_learning_rate=0.0, **DELTA)
    theta0 = {n: p.detach().clone() for n, p in trainer.base_params}
    trainer.train()
    theta = dict(trainer.base_params)
    assert sum(not torch.equal(theta[n], theta0[n]) for n in theta0) > 0.7 * len(theta0)  # θ trained
    err = gap = 0.0
    for n, s in trainer.shadow_state_dict().items():
        largest_d = (theta0[n] - theta[n]).abs().max()
        assert (s - theta0[n]).abs().max() <= 2 * steps * 2**-7 * largest_d + 1e-12, n
        err, gap = err + ((s - theta0[n]) ** 2).sum(), gap + ((theta[n] - theta0[n]) ** 2).sum()
    assert (err / gap) ** 0.5 < 2**-8  # a d not updated after θ's step would leave θ̂ = θ + 0, i.e. a relative error of 1


def test_the_update_holds_one_weight_of_fp32_theta_hat_at_a_time_and_steps_theta_as_the_trainer_would(tok, tmp_path,
                                                                                                      monkeypatch):
    """θ̂ and θ step weight by weight: θ̂'s fp32 slots are allocated one at a time, θ's gradient is released once its
    weight has stepped, and θ after step 1 (which θ̂ does not influence) is bit for bit what the Trainer's own
    optimizer step gives it with the fp32 lean shadow."""
    import trl_bridge.trainer.delta_shadow as delta_shadow

    trainer = make_trainer(tok, tmp_path / "delta", max_steps=2, **DELTA)
    held, allocate = [], delta_shadow.allocate

    def counting_allocate(t):
        held.append(sum(local(s).untyped_storage().nbytes() > 0 for s in trainer.delta_shadow.slots))
        allocate(t)

    monkeypatch.setattr(delta_shadow, "allocate", counting_allocate)
    first = {}
    trainer.add_callback(type("First", (TrainerCallback,), {"on_step_end": lambda self, args, state, control, **kw: (
        first.update({n: p.detach().clone() for n, p in trainer.base_params}) if state.global_step == 1 else None)})())
    trainer.train()
    assert len(held) == 2 * len(trainer.base_params) and max(held) == 0  # none held when the next is allocated
    lean = make_trainer(tok, tmp_path / "lean", max_steps=1, shadow_storage="lean")
    lean.train()
    for n, p in lean.base_params:
        assert torch.equal(first[n], p), n


# Measured by scripts/shadow_drift.py (docs/cost.md): 1.3e-2 after 10 steps at this learning rate; the bound leaves room.
DRIFT_BOUND_10_STEPS = 0.03


def test_drift_from_the_fp32_shadow_stays_within_the_stated_bound(tok, tmp_path):
    """With w frozen the rollouts are the same whatever θ̂ does: bf16_delta against the same optimizer on an fp32 θ̂
    (`lean`) differs by the compression alone. ‖θ̂_delta − θ̂_lean‖ / ‖θ̂_lean − θ⁰‖ after 10 steps ≤ the bound, and the
    logged cooperative gains agree closely."""
    runs = {}
    for storage in ("lean", "bf16_delta"):
        trainer = make_trainer(tok, tmp_path / storage, max_steps=10, learning_rate=1e-4, adapter_learning_rate=0.0,
                               max_grad_norm=1.0, shadow_storage=storage)
        theta0 = {n: p.detach().clone() for n, p in trainer.base_params}
        trainer.train()
        gains = [h["bridge/cooperative_gain"] for h in trainer.state.log_history if "bridge/cooperative_gain" in h]
        runs[storage] = (trainer.shadow_state_dict(), gains)
    ref, x = runs["lean"][0], runs["bf16_delta"][0]
    num = sum(((x[n] - ref[n]).double() ** 2).sum() for n in ref) ** 0.5
    den = sum(((ref[n] - theta0[n]).double() ** 2).sum() for n in ref) ** 0.5
    assert den > 0 and 0 < num / den < DRIFT_BOUND_10_STEPS
    gains_ref, gains = torch.tensor(runs["lean"][1]), torch.tensor(runs["bf16_delta"][1])
    assert gains_ref.abs().max() > 0
    assert (gains - gains_ref).abs().max() < 0.05 * gains_ref.abs().mean()


def test_resumes_bit_identically_with_gradient_accumulation(tok, tmp_path):
    opts = dict(max_steps=4, learning_rate=3e-3, save_strategy="steps", save_steps=2, gradient_accumulation_steps=2,
                per_device_train_batch_size=2, max_grad_norm=1.0, **DELTA)
    full = make_trainer(tok, tmp_path / "full", **opts)
    full.train()
    resumed = make_trainer(tok, tmp_path / "resumed", **opts)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "out" / "checkpoint-2"))
    for a, b in zip(full.delta_shadow.deltas, resumed.delta_shadow.deltas):
        assert torch.equal(a, b)
    for (name, a), (_, b) in zip(full.base_params + full.adapter_params, resumed.base_params + resumed.adapter_params):
        assert torch.equal(a, b), name
    a, b = full.shadow_optimizer.state_dict()["state"], resumed.shadow_optimizer.state_dict()["state"]
    assert a.keys() == b.keys()
    for i in a:
        for k, v in a[i].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(b[i][k])), (i, k)


def test_checkpoint_holds_the_delta_and_a_full_shadow_checkpoint_is_refused(tok, tmp_path):
    trainer = make_trainer(tok, tmp_path / "delta", max_steps=2, save_strategy="steps", save_steps=2, **DELTA)
    trainer.train()
    ckpt = tmp_path / "delta" / "out" / "checkpoint-2"
    saved = load_file(ckpt / "bridge_state.safetensors")
    assert not any(k.startswith("shadow.") for k in saved)
    for (n, _), d in zip(trainer.base_params, trainer.delta_shadow.deltas):
        assert saved[f"shadow_delta.{n}"].dtype == torch.bfloat16 and torch.equal(saved[f"shadow_delta.{n}"], d)
    loaded = make_trainer(tok, tmp_path / "loaded", max_steps=2, **DELTA)
    loaded.checkpoint_state.load_tensors(str(ckpt))
    for n, s in trainer.shadow_state_dict().items():
        assert torch.equal(loaded.shadow_state_dict()[n], s), n
    full = make_trainer(tok, tmp_path / "full", max_steps=2, save_strategy="steps", save_steps=2)
    full.train()
    with pytest.raises(ValueError, match="shadow_storage='full' or 'lean'.*shadow_storage='bf16_delta'"):
        make_trainer(tok, tmp_path / "mixed", max_steps=2, **DELTA).checkpoint_state.load_tensors(
            str(tmp_path / "full" / "out" / "checkpoint-2"))


def test_bad_shadow_storage_is_refused_naming_the_field(tmp_path):
    with pytest.raises(ValueError, match="shadow_storage.*bf16_delta"):
        BridgeConfig(output_dir=str(tmp_path), shadow_storage="bf16")


def test_half_precision_base_weights_are_refused():
    with pytest.raises(ValueError, match="bf16_delta.*fp32"):
        DeltaShadow([("w", torch.nn.Parameter(torch.zeros(2, 2, dtype=torch.bfloat16)))], seed=0)


def drift_of_a_fixed_shadow(monkeypatch=None, steps=1000, step_size=1e-6):
    """θ moves by `step_size` per step, θ̂ does not train: the mean of θ̂ − θ⁰ after `steps` steps of θ."""
    theta = torch.nn.Parameter(torch.full((2000,), 0.02))
    shadow = DeltaShadow([("w", theta)], seed=0)
    theta_optimizer = torch.optim.SGD([theta], lr=step_size)
    for step in range(steps):
        theta.grad = torch.full_like(theta, -1.0)  # θ's own step: +step_size
        shadow.step(optimizer=None, norm=0.0, max_norm=float("inf"), base_optimizer=theta_optimizer, step=step)
        assert theta.grad is None  # released: the Trainer's own step would leave θ alone
    assert float(theta.detach().mean()) == pytest.approx(0.02 + steps * step_size, rel=1e-4)
    return float((theta.detach() + shadow.deltas[0].float() - 0.02).mean())


def test_stochastic_rounding_keeps_a_far_shadow_in_place_where_round_to_nearest_follows_theta(monkeypatch):
    """Once |d| has grown to 256× θ's step, θ's step is below half of d's bf16 spacing: rounded to nearest, d stops
    changing and θ̂ = θ + d follows θ. Stochastic rounding keeps θ̂ where it is, on average."""
    assert abs(drift_of_a_fixed_shadow()) < 2e-5  # θ moved by 1e-3
    import trl_bridge.trainer.delta_shadow as delta_shadow

    monkeypatch.setattr(delta_shadow, "stochastic_round", lambda x, noise: x.to(torch.bfloat16))
    assert drift_of_a_fixed_shadow() > 4e-4  # θ̂ followed θ for half of its way


def test_a_numeric_fault_skips_the_step_for_theta_hat_too(tok, tmp_path):
    """A NaN loss at step 2: θ, θ̂ = θ + d and w keep their values through it (d is not updated, its gradient dropped)."""
    from transformers import TrainerCallback

    class Snapshots(TrainerCallback):
        after = []

        def on_step_end(self, args, state, control, **kwargs):
            self.after.append({**{f"shadow.{n}": s for n, s in trainer.shadow_state_dict().items()},
                               **{f"base.{n}": p.detach().clone() for n, p in trainer.base_params + trainer.adapter_params}})

    trainer = make_trainer(tok, tmp_path, max_steps=3, callbacks=[Snapshots()], **DELTA)
    sft_loss = trainer._sft_loss
    trainer._sft_loss = lambda model, micro_batch: sft_loss(model, micro_batch) * (
        float("nan") if trainer.state.global_step == 1 else 1.0)
    trainer.train()
    first, skipped, last = Snapshots.after
    for k in first:
        assert torch.equal(first[k], skipped[k]), k
    assert sum(not torch.equal(skipped[k], last[k]) for k in first if k.startswith("shadow.")) > 0.7 * len(trainer.base_params)
    assert trainer.delta_shadow.grads == [None] * len(trainer.base_params)


@pytest.mark.parametrize("ga", [1, 2])
def test_theta_steps_before_pass_b_at_one_micro_batch_so_pass_b_holds_no_gradient_of_theta(tok, tmp_path, ga):
    """One micro-batch per step: θ has stepped (and released its gradient) before pass B; the logged grad_norm is
    still θ's. With gradient accumulation θ steps after the last micro-batch, as the Trainer does."""
    trainer = make_trainer(tok, tmp_path, max_steps=2, gradient_accumulation_steps=ga, **DELTA)
    seen, shadow_backward = [], trainer._shadow_backward

    def recording(*args, **kwargs):
        seen.append(sum(p.grad is not None for _, p in trainer.base_params))
        return shadow_backward(*args, **kwargs)

    trainer._shadow_backward = recording
    trainer.train()
    if ga == 1:
        assert seen == [0, 0]
    else:  # θ's gradient of the step's first micro-batch is held through both passes B
        assert len(seen) == 4 and all(n == len(trainer.base_params) for n in seen[1::2])
    logs = [h for h in trainer.state.log_history if "grad_norm" in h]
    assert all(h["grad_norm"] == pytest.approx(h["bridge/grad_norm_base"]) and h["grad_norm"] > 0 for h in logs)


def test_a_fault_only_pass_b_shows_skips_theta_hat_and_w_once_theta_has_stepped(tok, tmp_path):
    """bf16_delta at one micro-batch: θ steps before pass B, so a non-finite pass B at step 2 leaves θ moved while θ̂
    (up to d's rounding) and w keep their values, with a warning that says so."""
    from transformers import TrainerCallback

    after = []

    class Snapshots(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            after.append(({n: s for n, s in trainer.shadow_state_dict().items()},
                          {n: p.detach().clone() for n, p in trainer.adapter_params},
                          {n: p.detach().clone() for n, p in trainer.base_params}))

    trainer = make_trainer(tok, tmp_path, max_steps=2, callbacks=[Snapshots()], **DELTA)
    rl_loss_and_logps = trainer._rl_loss_and_logps

    def nan_in_pass_b(model, inputs):
        loss, logps = rl_loss_and_logps(model, inputs)
        shadow_pass = trainer.state.global_step == 1 and "shadow_old_per_token_logps" not in inputs and \
            trainer._record.rl_inputs is not None
        return (loss * float("nan"), logps) if shadow_pass else (loss, logps)

    trainer._rl_loss_and_logps = nan_in_pass_b
    with pytest.warns(UserWarning, match="θ had already taken this step's update"):
        trainer.train()
    (shadow1, w1, theta1), (shadow2, w2, theta2) = after
    for n in shadow1:  # θ̂ = θ + d unmoved, up to the one rounding of d re-based to the moved θ
        largest_d = (shadow1[n] - theta1[n]).abs().max() + (theta2[n] - theta1[n]).abs().max()
        assert (shadow2[n] - shadow1[n]).abs().max() <= 2**-7 * largest_d + 1e-12, n
    assert all(torch.equal(w1[n], w2[n]) for n in w1)
    assert sum(not torch.equal(theta1[n], theta2[n]) for n in theta1) > 0.7 * len(theta1)
