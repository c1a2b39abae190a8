"""BridgeTrainer as a drop-in for GRPOTrainer: the GRPOTrainer features users rely on, each run with GRPOTrainer and with
BridgeTrainer (λ = 0.5, plus `sft_dataset`) on the same tiny model and config, asserting the same observable behaviour
(metrics present in the last log entry, parameters that should move move, errors of the same type and wording).

Written for this project (not copied from TRL's test suite); TRL's tests/test_grpo_trainer.py lists the features."""

import dataclasses
import inspect
import pathlib
import tomllib

import huggingface_hub
import pytest
import torch
import trl
from huggingface_hub import RepoUrl
from peft import IA3Config, LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from trl_bridge import BridgeConfig, BridgeTrainer
from trl_bridge.compat import TESTED_VERSIONS, check_versions
from trl_bridge.engines.export import merged_state_dict
from trl_bridge.tiny import make_tiny_model, make_tiny_tokenizer

from ..helpers import digit_reward, rl_dataset, sft_dataset

# GRPOConfig's own defaults wherever the feature does not need another value (`logging_steps` included).
TINY = dict(
    per_device_train_batch_size=4, num_generations=4, max_completion_length=8, report_to="none", save_strategy="no",
    seed=7, bf16=False, gradient_checkpointing=False, use_cpu=True, learning_rate=1e-2, max_steps=2,
)
BRIDGE = dict(bridge_lambda=0.5, lora_r=4, lora_alpha=8, sft_per_device_train_batch_size=2)
PROBE = torch.tensor([[5, 17, 33, 2, 9, 41, 7, 12]])


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


@pytest.fixture(scope="module")
def tiny_path(tiny_model_dir):
    """The tiny model on disk: GRPOTrainer builds its KL reference from the model's path."""
    return str(tiny_model_dir)


def length_reward(completions, **kwargs):
    return [len(c) / 8.0 for c in completions]


async def async_vowel_reward(completions, **kwargs):
    return [sum(ch in "aeiou0123456789" for ch in c) / max(len(c), 1) for c in completions]


def tiny_reward_model(tok):
    config = make_tiny_model(tok).config
    config.num_labels = 1
    config._name_or_path = "tiny-reward-model"
    torch.manual_seed(3)
    return AutoModelForSequenceClassification.from_config(config).eval()


def snapshot(named):
    return {n: p.detach().clone() for n, p in named}


def moved(before, after):
    return {n for n in before if not torch.equal(before[n], after[n])}


def run_both(tok, tmp_path, reward_funcs=(digit_reward,), model=None, trainer_kwargs=None, prepare=None, **config):
    """The same run with GRPOTrainer, then with BridgeTrainer (each built right before it trains, so both sample from
    the same seeded RNG). `prepare(trainer)` runs before each `train()`. Returns (grpo, bridge, moved) where `moved`
    holds the parameter names each changed: GRPO's trainable ones, BRIDGE's θ, w and θ̂."""
    opts = {**TINY, **config}
    make = model or (lambda: make_tiny_model(tok))
    changed = {}
    grpo = GRPOTrainer(make(), list(reward_funcs), GRPOConfig(output_dir=str(tmp_path / "grpo"), **opts), rl_dataset(),
                       processing_class=tok, **(trainer_kwargs or {}))
    g0 = snapshot((n, p) for n, p in grpo.model.named_parameters() if p.requires_grad)
    if prepare:
        prepare(grpo)
    grpo.train()
    changed.update(grpo=moved(g0, snapshot(grpo.model.named_parameters())), n_grpo=len(g0))
    bridge = BridgeTrainer(make(), list(reward_funcs), BridgeConfig(output_dir=str(tmp_path / "bridge"), **BRIDGE, **opts),
                           rl_dataset(), processing_class=tok, sft_dataset=sft_dataset(), **(trainer_kwargs or {}))
    theta0, w0, shadow0 = snapshot(bridge.base_params), snapshot(bridge.adapter_params), bridge.shadow_state_dict()
    if prepare:
        prepare(bridge)
    bridge.train()
    changed.update(theta=moved(theta0, snapshot(bridge.base_params)), w=moved(w0, snapshot(bridge.adapter_params)),
                   shadow=moved(shadow0, bridge.shadow_state_dict()), n_w=len(w0))
    return grpo, bridge, changed


def assert_same_observables(grpo, bridge, changed, extra_keys=()):
    """GRPO's last-log metrics are all in BRIDGE's (plus BRIDGE's own); what GRPO trains, BRIDGE's θ trains; w and θ̂
    train too. With GRPOConfig's default `logging_steps` (10) and a shorter run, the metrics reach the final entry of
    `log_history` (the train summary), where TRL's own tests read them."""
    for trainer in (grpo, bridge):
        assert trainer.state.log_history[-1]["train_loss"] is not None
    last_g, last_b = ([h for h in t.state.log_history if "reward" in h][-1] for t in (grpo, bridge))
    if grpo.args.logging_steps > grpo.state.global_step:
        assert last_g is grpo.state.log_history[-1] and last_b is bridge.state.log_history[-1]
    missing = set(last_g) - set(last_b)
    assert not missing, missing
    for key in ("bridge/sft_loss", "bridge/rl_loss_shadow", "bridge/cooperative_gain", *extra_keys):
        assert key in last_b, key
    assert len(changed["grpo"]) > changed["n_grpo"] // 2  # the run really trained (not a vacuous comparison)
    assert changed["grpo"] <= changed["theta"], changed["grpo"] - changed["theta"]
    assert len(changed["w"]) == changed["n_w"] and changed["shadow"]


# ----------------------------------------------------------------------------------------------------------------------
# Construction: GRPOTrainer's signature, its config, its wording
# ----------------------------------------------------------------------------------------------------------------------
def test_positional_parameters_are_grpotrainers_and_sft_dataset_is_keyword_only(tok, tmp_path):
    grpo_params = list(inspect.signature(GRPOTrainer.__init__).parameters.values())
    bridge_params = list(inspect.signature(BridgeTrainer.__init__).parameters.values())
    positional = [p.name for p in bridge_params if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert positional == [p.name for p in grpo_params if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert [p.name for p in bridge_params if p.kind is p.KEYWORD_ONLY] == ["sft_dataset"]
    # a GRPOTrainer-style positional call: eval_dataset and processing_class land where GRPOTrainer puts them
    evals = rl_dataset(4)
    args = BridgeConfig(output_dir=str(tmp_path), **BRIDGE, **TINY)
    trainer = BridgeTrainer(make_tiny_model(tok), digit_reward, args, rl_dataset(), evals, tok, sft_dataset=sft_dataset())
    assert trainer.eval_dataset is evals and trainer.processing_class is tok


def test_quantization_config_reaches_the_model_loader_as_in_grpotrainer(tok, tmp_path, monkeypatch):
    import trl_bridge.trainer.model_setup as bt

    seen = {}

    def loader(name, **kwargs):
        seen.update(kwargs, name=name)
        return make_tiny_model(tok)

    monkeypatch.setattr(bt, "create_model_from_path", loader)
    marker = object()
    BridgeTrainer("some/model", digit_reward, BridgeConfig(output_dir=str(tmp_path), **BRIDGE, **TINY), rl_dataset(),
                  processing_class=tok, quantization_config=marker, sft_dataset=sft_dataset())
    assert seen["name"] == "some/model" and seen["quantization_config"] is marker


def test_grpo_config_is_upgraded_with_bridge_defaults_and_a_warning(tok, tmp_path):
    grpo_args = GRPOConfig(output_dir=str(tmp_path), **{**TINY, "max_steps": 1}, beta=0.05, num_iterations=2,
                           gradient_accumulation_steps=2, loss_type="dapo", logging_steps=1)
    with pytest.warns(UserWarning, match="upgraded it to a BridgeConfig.*bridge_lambda=0.5"):
        trainer = BridgeTrainer(make_tiny_model(tok), digit_reward, grpo_args, rl_dataset(), processing_class=tok,
                                sft_dataset=sft_dataset())
    args = trainer.args
    assert isinstance(args, BridgeConfig)
    for f in dataclasses.fields(GRPOConfig):
        assert getattr(args, f.name) == getattr(grpo_args, f.name), f.name
    assert (args.bridge_lambda, args.lora_r, args.adapter_learning_rate) == (0.5, 16, grpo_args.learning_rate)
    trainer.train()
    assert "bridge/sft_loss" in trainer.state.log_history[0] and "kl" in trainer.state.log_history[0]


def test_logging_steps_default_is_grpoconfigs(tmp_path):
    assert BridgeConfig(output_dir=str(tmp_path), use_cpu=True).logging_steps == GRPOConfig(
        output_dir=str(tmp_path), use_cpu=True).logging_steps == 10


def test_missing_train_dataset_is_grpotrainers_error(tok, tmp_path):
    errors = []
    for cls, extra in ((GRPOTrainer, {}), (BridgeTrainer, {"sft_dataset": sft_dataset()})):
        cfg = (GRPOConfig if cls is GRPOTrainer else BridgeConfig)(output_dir=str(tmp_path), **TINY)
        with pytest.raises(ValueError) as err:
            cls(make_tiny_model(tok), digit_reward, cfg, processing_class=tok, **extra)
        errors.append(str(err.value))
    assert errors[0] == errors[1] == "`train_dataset` is required unless an `environment_factory` is provided."


BAD_INPUTS = {
    "reward_weights_length": (dict(reward_weights=[1.0, 2.0]), {}),
    "sync_ref_model_without_beta": (dict(sync_ref_model=True, beta=0.0), {}),
    "optimizers_given": ({}, {"optimizers": (torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), None)}),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_raises_the_same_error_type_as_grpotrainer(tok, tmp_path, case):
    config, kwargs = BAD_INPUTS[case]
    types = []
    for cls in (GRPOTrainer, BridgeTrainer):
        extra = {"sft_dataset": sft_dataset()} if cls is BridgeTrainer else {}
        cfg = (GRPOConfig(output_dir=str(tmp_path), **TINY, **config) if cls is GRPOTrainer
               else BridgeConfig(output_dir=str(tmp_path), **BRIDGE, **TINY, **config))
        try:
            trainer = cls(make_tiny_model(tok), digit_reward, cfg, rl_dataset(), processing_class=tok, **kwargs, **extra)
            trainer.train()
            types.append(None)
        except Exception as err:  # noqa: BLE001 - the type is what is compared
            types.append(type(err))
    if case == "optimizers_given":  # GRPOTrainer takes it; BRIDGE needs one optimizer per parameter set (README)
        assert types == [None, ValueError]
    else:
        assert types[0] is not None and types[0] is types[1], types


# ----------------------------------------------------------------------------------------------------------------------
# Reward functions: sync, async, several with weights, reward models
# ----------------------------------------------------------------------------------------------------------------------
REWARDS = {  # (reward functions, config)
    "sync": (lambda tok: [digit_reward], {}),
    "sync_and_async": (lambda tok: [digit_reward, async_vowel_reward], {}),
    "weighted": (lambda tok: [digit_reward, length_reward], {"reward_weights": [1.0, 0.5], "logging_steps": 1}),
    "reward_model": (lambda tok: [tiny_reward_model(tok), digit_reward], {}),
}


@pytest.mark.parametrize("kind", REWARDS)
def test_reward_functions(tok, tmp_path, kind):
    make_funcs, config = REWARDS[kind]
    funcs = make_funcs(tok)
    kwargs = {"reward_processing_classes": [tok] + [None] * (len(funcs) - 1)} if kind == "reward_model" else None
    grpo, bridge, changed = run_both(tok, tmp_path, funcs, trainer_kwargs=kwargs, **config)
    names = ["tiny-reward-model" if isinstance(f, torch.nn.Module) else f.__name__ for f in funcs]
    assert_same_observables(grpo, bridge, changed, extra_keys=[f"rewards/{n}/{s}" for n in names for s in ("mean", "std")])
    if kind == "weighted":  # the logged reward is the weighted sum, in both
        for trainer in (grpo, bridge):
            for h in trainer.state.log_history[:-1]:
                expected = h["rewards/digit_reward/mean"] + 0.5 * h["rewards/length_reward/mean"]
                assert h["reward"] == pytest.approx(expected, rel=1e-5)


def test_async_reward_function_is_probed_before_the_first_step(tok, tmp_path):
    async def broken_async_reward(completions, answer, **kwargs):
        return [float(a) / 0 for a in answer]

    trainer = BridgeTrainer(make_tiny_model(tok), [digit_reward, broken_async_reward],
                            BridgeConfig(output_dir=str(tmp_path), **BRIDGE, **TINY), rl_dataset(), processing_class=tok,
                            sft_dataset=sft_dataset())
    theta0 = snapshot(trainer.base_params)
    with pytest.raises(RuntimeError, match="broken_async_reward.*ZeroDivisionError"):
        trainer.train()
    assert trainer.state.global_step == 0 and not moved(theta0, snapshot(trainer.base_params))


# ----------------------------------------------------------------------------------------------------------------------
# Loss and optimisation options
# ----------------------------------------------------------------------------------------------------------------------
# grpo always runs (dapo, GRPOConfig's default, runs in every other test); the others are marked slow
# (tests/trainer/test_bridge_options.py runs all eight on BRIDGE alone)
LOSS_TYPES = ["grpo"] + [pytest.param(t, marks=pytest.mark.slow) for t in
                         ("dapo", "bnpo", "dr_grpo", "cispo", "sapo", "luspo", "vespo")]


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_types(tok, tmp_path, loss_type):
    grpo, bridge, changed = run_both(tok, tmp_path, loss_type=loss_type)
    assert_same_observables(grpo, bridge, changed)


def test_beta_keeps_a_frozen_reference_and_logs_kl(tok, tmp_path, tiny_path):
    grpo, bridge, changed = run_both(tok, tmp_path, model=lambda: tiny_path, beta=0.1)
    assert_same_observables(grpo, bridge, changed, extra_keys=["kl"])
    assert grpo.ref_model is not None and bridge.ref_model is not None


def test_num_iterations_and_steps_per_generation(tok, tmp_path):
    grpo, bridge, changed = run_both(tok, tmp_path, num_iterations=2, steps_per_generation=2,
                                     gradient_accumulation_steps=2, per_device_train_batch_size=2)
    assert_same_observables(grpo, bridge, changed, extra_keys=["clip_ratio/region_mean"])


def test_mask_truncated_completions_leaves_no_rl_signal(tok, tmp_path):
    """Every completion hits max_completion_length (the tiny model never samples EOS in 8 tokens): GRPO does not
    move; BRIDGE's RL terms are zero too (θ̂, trained by RL alone, does not move), θ and w follow the SFT term."""
    grpo, bridge, changed = run_both(tok, tmp_path, mask_truncated_completions=True, loss_type="dapo", logging_steps=1)
    for trainer in (grpo, bridge):
        assert all(h["completions/clipped_ratio"] == 1.0 for h in trainer.state.log_history[:-1])
    assert grpo.state.log_history[-1]["train_loss"] == pytest.approx(0.0)
    assert not changed["grpo"]
    assert all(h["bridge/rl_loss"] == 0.0 for h in bridge.state.log_history[:-1])
    assert not changed["shadow"]
    assert changed["theta"] and changed["w"]


ENTROPY = {
    "entropy_filter": (dict(top_entropy_quantile=0.2), ["entropy"]),
    "static_entropy_bonus": (dict(entropy_coef=0.1), ["policy_loss", "entropy_coef"]),
    "adaptive_entropy_bonus": (dict(entropy_coef=0.01, use_adaptive_entropy=True, entropy_target=15.0),
                               ["policy_loss", "entropy_coef"]),
}


@pytest.mark.parametrize("case", ENTROPY)
def test_entropy_options(tok, tmp_path, case):
    config, keys = ENTROPY[case]
    grpo, bridge, changed = run_both(tok, tmp_path, **config)
    assert_same_observables(grpo, bridge, changed, extra_keys=keys)
    if case == "adaptive_entropy_bonus":  # entropy < target throughout: the coefficient rose in both (pass B left it be)
        assert grpo.entropy_coef == pytest.approx(bridge.entropy_coef) and bridge.entropy_coef > 0.01


# ----------------------------------------------------------------------------------------------------------------------
# sync_ref_model
# ----------------------------------------------------------------------------------------------------------------------
def _ref_state(trainer):
    return snapshot(trainer.ref_model.named_parameters())


def test_sync_ref_model_mixes_the_merged_policy_into_the_reference(tok, tmp_path, tiny_path):
    alpha, ref0 = 0.6, {}
    grpo, bridge, _ = run_both(tok, tmp_path, model=lambda: tiny_path, beta=0.1, sync_ref_model=True,
                               ref_model_sync_steps=2, ref_model_mixup_alpha=alpha,
                               prepare=lambda t: ref0.update({type(t).__name__: _ref_state(t)}))
    assert moved(ref0["GRPOTrainer"], _ref_state(grpo)) and moved(ref0["BridgeTrainer"], _ref_state(bridge))
    # BRIDGE's reference after the step-2 sync: (1 − α)·π(θ⁰+w⁰) + α·π(θ₂+w₂), the policy merged as in the export
    b_ref0, policy = ref0["BridgeTrainer"], merged_state_dict(bridge.model)
    for name, p in bridge.ref_model.named_parameters():
        torch.testing.assert_close(p, (1 - alpha) * b_ref0[name] + alpha * policy[name], rtol=1e-5, atol=1e-6)
    assert moved(b_ref0, {n: policy[n] for n in b_ref0})  # the policy really differs from the initial reference
    assert "kl" in bridge.state.log_history[-1]


def test_sync_ref_model_at_lambda_one_equals_grpotrainer(tok, tmp_path, tiny_path):
    opts = dict(TINY, beta=0.1, sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=0.5, max_steps=3,
                logging_steps=1)
    grpo = GRPOTrainer(tiny_path, digit_reward, GRPOConfig(output_dir=str(tmp_path / "g"), **opts), rl_dataset(),
                       processing_class=tok)
    grpo.train()
    bridge = BridgeTrainer(tiny_path, digit_reward, BridgeConfig(output_dir=str(tmp_path / "b"), bridge_lambda=1.0, **opts),
                           rl_dataset(), processing_class=tok)
    bridge.train()
    for key in ("loss", "kl"):
        a = [h[key] for h in bridge.state.log_history if key in h]
        b = [h[key] for h in grpo.state.log_history if key in h]
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b))
    ref_g = dict(grpo.ref_model.named_parameters())
    for name, p in bridge.ref_model.named_parameters():
        torch.testing.assert_close(p, ref_g[name])


def test_resume_with_synced_reference_is_bit_identical(tok, tmp_path, tiny_path):
    opts = dict(TINY, **BRIDGE, beta=0.1, sync_ref_model=True, ref_model_sync_steps=1, max_steps=4, save_strategy="steps",
                save_steps=2)

    def trainer(out):
        return BridgeTrainer(tiny_path, digit_reward, BridgeConfig(output_dir=str(out), **opts), rl_dataset(),
                             processing_class=tok, sft_dataset=sft_dataset())

    full = trainer(tmp_path / "full")
    full.train()
    assert (tmp_path / "full" / "checkpoint-2" / "bridge_ref_model.safetensors").is_file()
    resumed = trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    for a, b in ((_ref_state(full), _ref_state(resumed)), (snapshot(full.base_params), snapshot(resumed.base_params)),
                 (snapshot(full.adapter_params), snapshot(resumed.adapter_params))):
        assert not moved(a, b)


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation, callbacks, report_to, push_to_hub, resume_from_checkpoint
# ----------------------------------------------------------------------------------------------------------------------
def test_eval_dataset_is_evaluated_during_training(tok, tmp_path):
    grpo, bridge, changed = run_both(tok, tmp_path, trainer_kwargs={"eval_dataset": rl_dataset(4)},
                                     eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=4, logging_steps=1)
    assert_same_observables(grpo, bridge, changed)
    for trainer in (grpo, bridge):
        evals = [h for h in trainer.state.log_history if "eval_loss" in h]
        assert len(evals) == 2 and all("eval_reward" in h for h in evals)


class CountingCallback(TrainerCallback):
    def __init__(self):
        self.events, self.logged = {}, []

    def _count(self, name):
        self.events[name] = self.events.get(name, 0) + 1

    def on_train_begin(self, *a, **k):
        self._count("train_begin")

    def on_step_end(self, *a, **k):
        self._count("step_end")

    def on_train_end(self, *a, **k):
        self._count("train_end")

    def on_log(self, args, state, control, logs=None, **k):
        self.logged.append(dict(logs))


def test_callbacks_see_the_same_events(tok, tmp_path):
    g_cb, b_cb = CountingCallback(), CountingCallback()
    run_both(tok, tmp_path, max_steps=3, logging_steps=1,
             prepare=lambda t: t.add_callback(g_cb if type(t) is GRPOTrainer else b_cb))
    assert g_cb.events == b_cb.events == {"train_begin": 1, "step_end": 3, "train_end": 1}
    assert len(g_cb.logged) == len(b_cb.logged) == 4
    assert all(set(g) <= set(b) for g, b in zip(g_cb.logged, b_cb.logged))
    assert all("bridge/sft_loss" in b for b in b_cb.logged[:-1])


class RecordingIntegration(TrainerCallback):
    """Stands in for a reporting integration (e.g. TensorBoard, not installed here): the Trainer builds it from
    `report_to` and hands it every log."""

    instances = []

    def __init__(self):
        self.logs = []
        RecordingIntegration.instances.append(self)

    def on_log(self, args, state, control, logs=None, **k):
        self.logs.append(dict(logs))


def test_report_to_feeds_the_reporting_integration(tok, tmp_path, monkeypatch):
    from transformers.integrations import integration_utils

    monkeypatch.setitem(integration_utils.INTEGRATION_TO_CALLBACK, "tensorboard", RecordingIntegration)
    RecordingIntegration.instances = []
    run_both(tok, tmp_path, report_to=["tensorboard"], logging_steps=1)
    g, b = RecordingIntegration.instances
    assert len(g.logs) == len(b.logs) == 3
    assert "reward" in g.logs[0] and {"reward", "bridge/sft_loss", "bridge/cooperative_gain"} <= set(b.logs[0])


def test_push_to_hub_uploads_the_merged_model(tok, tmp_path, monkeypatch):
    """Stopped at huggingface_hub's network boundary (HfApi.create_repo / upload_folder), as in test_train_cli."""
    uploads = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                        lambda self, repo_id, **kw: RepoUrl(f"https://huggingface.co/{repo_id}"))

    def fake_upload_folder(self, repo_id, folder_path, **kwargs):
        uploads.append((repo_id, {p.name: p.read_bytes() for p in pathlib.Path(folder_path).iterdir() if p.is_file()}))

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", fake_upload_folder)
    grpo, bridge, _ = run_both(tok, tmp_path, push_to_hub=True, hub_model_id="someone/tiny")
    for trainer in (grpo, bridge):
        trainer.push_to_hub()
    (g_repo, g_files), (b_repo, b_files) = uploads
    assert g_repo == b_repo == "someone/tiny"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "README.md"):
        assert name in g_files and name in b_files, name
    from safetensors.torch import load

    weights = load(b_files["model.safetensors"])
    assert set(weights) == set(load(g_files["model.safetensors"]))  # a plain model, like GRPO's: the merged π(θ+w)
    assert "BRIDGE" in b_files["README.md"].decode()


def test_resume_from_checkpoint_true_continues_the_run(tok, tmp_path):
    """`resume_from_checkpoint=True` (the last checkpoint in output_dir), as GRPO users call it."""
    opts = dict(TINY, **BRIDGE, max_steps=4, save_strategy="steps", save_steps=2)

    def trainer(out):
        return BridgeTrainer(make_tiny_model(tok), digit_reward, BridgeConfig(output_dir=str(out), **opts), rl_dataset(),
                             processing_class=tok, sft_dataset=sft_dataset())

    class StopAfterTwoSteps(TrainerCallback):  # an interrupted run (same schedule as the full one)
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 2

    full = trainer(tmp_path / "full")
    full.train()
    interrupted = trainer(tmp_path / "resumed")
    interrupted.add_callback(StopAfterTwoSteps())
    interrupted.train()
    assert interrupted.state.global_step == 2 and (tmp_path / "resumed" / "checkpoint-2").is_dir()
    resumed = trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 4
    assert not moved(snapshot(full.base_params), snapshot(resumed.base_params))
    assert not moved(snapshot(full.adapter_params), snapshot(resumed.adapter_params))
    assert not moved(full.shadow_state_dict(), resumed.shadow_state_dict())


# ----------------------------------------------------------------------------------------------------------------------
# A PeftModel passed in supplies w
# ----------------------------------------------------------------------------------------------------------------------
def trained_peft_model(tok, config=None, seed=11):
    """A PeftModel whose adapter is not at its zero initialisation (as a user's trained adapter would be)."""
    model = get_peft_model(make_tiny_model(tok), config or LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return model


def logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=PROBE).logits


def test_peft_model_supplies_the_adapter_w_and_its_base_is_theta(tok, tmp_path):
    peft_model = trained_peft_model(tok)
    policy0 = logits(peft_model)
    adapter0 = {n.replace(".default", ""): p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" in n}
    trainer = BridgeTrainer(peft_model, digit_reward, BridgeConfig(output_dir=str(tmp_path), **BRIDGE, **TINY, beta=0.1),
                            rl_dataset(), processing_class=tok, sft_dataset=sft_dataset())
    # w is the user's adapter, the policy is unchanged, the KL reference is that initial policy π(θ⁰+w⁰)
    assert {n.replace(".default", ""): p for n, p in trainer.adapter_params}.keys() == adapter0.keys()
    for n, p in trainer.adapter_params:
        assert torch.equal(p, adapter0[n.replace(".default", "")]), n
    torch.testing.assert_close(logits(trainer.model), policy0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits(trainer.ref_model), policy0, rtol=1e-5, atol=1e-6)
    theta0, w0 = snapshot(trainer.base_params), snapshot(trainer.adapter_params)
    trainer.train()
    assert moved(theta0, snapshot(trainer.base_params)) and moved(w0, snapshot(trainer.adapter_params))
    assert "bridge/sft_loss" in trainer.state.log_history[-1]


def test_peft_model_at_lambda_one_is_merged_and_trained_as_grpo(tok, tmp_path):
    peft_model = trained_peft_model(tok)
    policy0 = logits(peft_model)
    trainer = BridgeTrainer(peft_model, digit_reward, BridgeConfig(output_dir=str(tmp_path), bridge_lambda=1.0, **TINY),
                            rl_dataset(), processing_class=tok)
    assert not trainer.adapter_params and not any("lora" in n for n, _ in trainer.model.named_parameters())
    torch.testing.assert_close(logits(trainer.model), policy0, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "case,match",
    [("two_adapters", "2 adapters"), ("ia3", "IA3Config"), ("with_peft_config", "together with a `peft_config`")],
)
def test_peft_models_bridge_cannot_use_are_refused(tok, tmp_path, case, match):
    kwargs = {}
    if case == "two_adapters":
        model = trained_peft_model(tok)
        model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"]))
    elif case == "ia3":
        model = get_peft_model(make_tiny_model(tok), IA3Config(target_modules=["k_proj", "down_proj"],
                                                                 feedforward_modules=["down_proj"]))
    else:
        model, kwargs = trained_peft_model(tok), {"peft_config": LoraConfig(r=2)}
    with pytest.raises(ValueError, match=match):
        BridgeTrainer(model, digit_reward, BridgeConfig(output_dir=str(tmp_path), **BRIDGE, **TINY), rl_dataset(),
                      processing_class=tok, sft_dataset=sft_dataset(), **kwargs)
    if case == "with_peft_config":  # GRPOTrainer refuses it with the same error
        with pytest.raises(ValueError, match=match):
            GRPOTrainer(trained_peft_model(tok), digit_reward, GRPOConfig(output_dir=str(tmp_path), **TINY),
                        rl_dataset(), processing_class=tok, peft_config=LoraConfig(r=2))


# ----------------------------------------------------------------------------------------------------------------------
# train_dataset=None when an environment supplies the prompts
# ----------------------------------------------------------------------------------------------------------------------
class CounterEnvironment:
    def reset(self, **kwargs):
        self.counter = 0
        return "Add to the counter."

    def increment(self, step: int) -> int:
        """
        Increment the counter.

        Args:
            step: Value to add to the counter.

        Returns:
            The counter after the increment.
        """
        self.counter += step
        return self.counter


def content_length_reward(completions, **kwargs):
    return [len(c[-1]["content"]) / 8.0 for c in completions]


def test_environment_factory_without_train_dataset(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    tool_tok = make_tiny_tokenizer()
    tool_tok.chat_template = (pathlib.Path(trl.__file__).parent / "chat_templates" / "qwen3.jinja").read_text()
    opts = dict(TINY, logging_steps=1)
    trainers = [
        GRPOTrainer(make_tiny_model(tok), content_length_reward, GRPOConfig(output_dir=str(tmp_path / "g"), **opts),
                    processing_class=tool_tok, environment_factory=CounterEnvironment),
        BridgeTrainer(make_tiny_model(tok), content_length_reward,
                      BridgeConfig(output_dir=str(tmp_path / "b"), **BRIDGE, **opts), processing_class=tool_tok,
                      environment_factory=CounterEnvironment, sft_dataset=sft_dataset()),
    ]
    assert trainers[0].train_dataset.to_list() == trainers[1].train_dataset.to_list()  # GRPO's placeholder prompts
    for t in trainers:
        t.train()
        assert t.state.global_step == 2 and "tools/call_frequency" in t.state.log_history[-2]
    assert "bridge/sft_loss" in trainers[1].state.log_history[-2]


# ----------------------------------------------------------------------------------------------------------------------
# λ = 1 for the whole run: GRPO at GRPO's cost
# ----------------------------------------------------------------------------------------------------------------------
class ForwardCounter:
    def __init__(self, model):
        self.calls = 0
        backbone = model.get_base_model().model if hasattr(model, "get_base_model") else model.model
        backbone.register_forward_pre_hook(self.hook)

    def hook(self, *args):
        self.calls += 1


@pytest.mark.parametrize(
    "lam,end,warmup,always_one",
    [(1.0, None, 0, True), (1.0, 1.0, 3, True), (1.0, 0.5, 0, True), (1.0, 0.5, 3, False), (0.5, 1.0, 3, False),
     (0.999, None, 0, False)],
)
def test_lambda_is_always_one_reads_the_whole_schedule(tmp_path, lam, end, warmup, always_one):
    args = BridgeConfig(output_dir=str(tmp_path), use_cpu=True, bridge_lambda=lam, bridge_lambda_end=end,
                        bridge_lambda_warmup_steps=warmup)
    assert args.lambda_is_always_one() is always_one
    assert always_one == all(args.lambda_at(step) == 1.0 for step in range(10))


def test_lambda_one_throughout_runs_grpo_alone_at_grpos_cost(tok, tmp_path):
    schedule = {"bridge_lambda_end": 1.0, "bridge_lambda_warmup_steps": 3}
    opts = dict(TINY, max_steps=3, gradient_accumulation_steps=2, num_iterations=2, per_device_train_batch_size=2,
                logging_steps=1)
    grpo = GRPOTrainer(make_tiny_model(tok), digit_reward, GRPOConfig(output_dir=str(tmp_path / "g"), **opts),
                       rl_dataset(), processing_class=tok)
    grpo_forwards = ForwardCounter(grpo.model)
    grpo.train()
    bridge = BridgeTrainer(make_tiny_model(tok), digit_reward,
                           BridgeConfig(output_dir=str(tmp_path / "b"), bridge_lambda=1.0, **schedule, **opts),
                           rl_dataset(), processing_class=tok, sft_dataset=sft_dataset())
    # no adapter, no shadow, no SFT stream: the policy is the plain model, as GRPO's
    assert bridge.sft_stream is None and bridge.shadow_params is None and not bridge.adapter_params
    assert type(bridge.model) is type(grpo.model)
    bridge_forwards = ForwardCounter(bridge.model)
    bridge.train()
    assert grpo_forwards.calls == bridge_forwards.calls > 0  # generation and loss forwards only: no SFT pass, no pass B
    g = dict(grpo.model.named_parameters())
    for name, p in bridge.model.named_parameters():
        torch.testing.assert_close(p, g[name], rtol=1e-6, atol=1e-7)
    a = [h["loss"] for h in bridge.state.log_history if "loss" in h]
    b = [h["loss"] for h in grpo.state.log_history if "loss" in h]
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b))
    assert all(h["bridge/lambda"] == 1.0 for h in bridge.state.log_history[:-1])
    # and the export is the trained plain model
    bridge.save_model(str(tmp_path / "export"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    torch.testing.assert_close(logits(loaded), logits(bridge.model))


def test_lambda_one_checkpoints_resume_identically(tok, tmp_path):
    opts = dict(TINY, max_steps=4, save_strategy="steps", save_steps=2, bridge_lambda=1.0)

    def trainer(out):
        return BridgeTrainer(make_tiny_model(tok), digit_reward, BridgeConfig(output_dir=str(out), **opts), rl_dataset(),
                             processing_class=tok)

    full = trainer(tmp_path / "full")
    full.train()
    resumed = trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert not moved(snapshot(full.model.named_parameters()), snapshot(resumed.model.named_parameters()))


def test_lambda_one_honours_the_trainable_base_subset(tok, tmp_path):
    trainer = BridgeTrainer(make_tiny_model(tok), digit_reward,
                            BridgeConfig(output_dir=str(tmp_path), bridge_lambda=1.0, **TINY,
                                         trainable_base_parameters=[r"layers\.1\.mlp"]),
                            rl_dataset(), processing_class=tok)
    before = snapshot(trainer.model.named_parameters())
    trainer.train()
    changed = moved(before, snapshot(trainer.model.named_parameters()))
    assert changed and all("layers.1.mlp" in n for n in changed)
    assert {n for n, p in trainer.model.named_parameters() if p.requires_grad} == {n for n, _ in trainer.base_params}


def test_lambda_below_one_still_requires_sft_dataset(tok, tmp_path):
    with pytest.raises(ValueError, match="sft_dataset"):
        BridgeTrainer(make_tiny_model(tok), digit_reward, BridgeConfig(output_dir=str(tmp_path), **BRIDGE, **TINY),
                      rl_dataset(), processing_class=tok)


# ----------------------------------------------------------------------------------------------------------------------
# The tested trl range is enforced at import
# ----------------------------------------------------------------------------------------------------------------------
def test_untested_trl_fails_at_import_naming_the_tested_range(monkeypatch):
    versions = {"trl": "1.17.0", "transformers": "5.24.0"}
    with pytest.raises(ImportError, match=r"trl 1\.17\.0 is installed, but trl-bridge is tested with trl>=1\.16,<1\.17"):
        check_versions(get_version=versions.__getitem__)
    monkeypatch.setenv("TRL_BRIDGE_ALLOW_UNTESTED_VERSIONS", "1")
    with pytest.warns(UserWarning, match="trl>=1.16,<1.17"):
        check_versions(get_version=versions.__getitem__)
    check_versions()  # the installed versions are the tested ones


def test_tested_range_matches_the_pyproject_pin():
    pyproject = tomllib.loads((pathlib.Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    deps = {d.split(">")[0].split("<")[0].split("=")[0].strip(): d for d in pyproject["project"]["dependencies"]}
    for package, spec in TESTED_VERSIONS.items():
        assert deps[package].replace(" ", "") == package + spec
