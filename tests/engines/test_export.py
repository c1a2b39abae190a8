"""Export of π(θ+w): the saved plain folder computes the live PEFT policy's logits, for every adapter option PEFT
merges, and the export leaves the live model untouched. Tiny Qwen2 models built from a config, fp32, on CPU."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM

from trl_bridge.engines import export
from trl_bridge.tiny import make_tiny_model, make_tiny_tokenizer

ATOL = 1e-5


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


def make_base(tok, tied=False, dtype=torch.float32):
    model = make_tiny_model(tok)
    if tied:
        config = copy.deepcopy(model.config)
        config.tie_word_embeddings = True
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.generation_config.pad_token_id = tok.pad_token_id
        model.generation_config.eos_token_id = tok.eos_token_id
        assert model.lm_head.weight is model.model.embed_tokens.weight
    return model.to(dtype)


@torch.no_grad()
def perturb(peft_model, seed=1):
    """Noise on every parameter (base θ and every adapter tensor: lora_A/B, lora_B bias, DoRA magnitude,
    modules_to_save copy), so every term of the merge shows in the logits."""
    gen = torch.Generator().manual_seed(seed)
    for _, p in peft_model.named_parameters():
        p.add_(0.1 * torch.randn(p.shape, generator=gen).to(p.dtype))


def make_policy(tok, tied=False, seed=1, **lora_kwargs):
    kwargs = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", **lora_kwargs}
    peft_model = get_peft_model(make_base(tok, tied=tied), LoraConfig(**kwargs))
    perturb(peft_model, seed)
    return peft_model.eval()


def inputs(tok, n=2, length=12):
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, len(tok), (n, length), generator=gen)


def snapshot(peft_model):
    return (
        {k: v.detach().clone() for k, v in peft_model.state_dict().items()},
        [type(m) for m in peft_model.modules()],
        [m.merged for m in peft_model.modules() if isinstance(m, LoraLayer)],
    )


def assert_unchanged(peft_model, before):
    state, types, merged = snapshot(peft_model)
    assert types == before[1], "the export changed the live model's modules"
    assert merged == before[2] and not any(merged), "the export merged the live model's adapter"
    assert state.keys() == before[0].keys()
    for k, v in state.items():
        assert torch.equal(v, before[0][k]), f"the export changed {k}"


def reload(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def check_export(tok, tmp_path, peft_model, **save_kwargs):
    """Save π(θ+w), reload it as a plain model, compare logits with the live policy; return the reloaded model."""
    ids = inputs(tok)
    before = snapshot(peft_model)
    with torch.no_grad():
        live = peft_model(input_ids=ids).logits
    export.save_merged_model(peft_model, tok, str(tmp_path / "merged"), **save_kwargs)
    assert_unchanged(peft_model, before)
    model = reload(tmp_path / "merged")
    assert not any("lora" in n or "modules_to_save" in n or "original_module" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, live, atol=ATOL, rtol=0)
    return model


def assert_matches_peft_merge(peft_model, merged):
    """`merged_state_dict` equals PEFT's own `merge_and_unload()` on a deep copy, key for key and dtype for dtype."""
    expected = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    assert merged.keys() == expected.keys()
    for k, v in expected.items():
        assert merged[k].dtype == v.dtype, k
        torch.testing.assert_close(merged[k], v, atol=0, rtol=0, msg=k)


VARIANTS = {
    "lora": {},
    # Qwen2 has a bias only on q/k/v: PEFT can merge a lora_B bias only into a layer that has one.
    "lora_bias": {"lora_bias": True, "target_modules": ["q_proj", "k_proj", "v_proj"]},
    "dora": {"use_dora": True},
    "rslora": {"use_rslora": True},
    "modules_to_save": {"modules_to_save": ["lm_head"]},
    "trainable_tokens": {"trainable_token_indices": [1, 5, 7]},
    "dora_modules_to_save": {"use_dora": True, "modules_to_save": ["lm_head", "norm"]},
    "lora_bias_modules_to_save": {
        "lora_bias": True,  # PEFT refuses lora_bias with DoRA
        "target_modules": ["q_proj", "k_proj", "v_proj"],
        "modules_to_save": ["lm_head", "model.layers.1.post_attention_layernorm"],
    },
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_export_reloads_to_the_live_policy(tok, tmp_path, variant):
    peft_model = make_policy(tok, **VARIANTS[variant])
    check_export(tok, tmp_path, peft_model)
    before = snapshot(peft_model)
    merged = export.merged_state_dict(peft_model)
    assert_unchanged(peft_model, before)
    assert "lm_head.weight" in merged and "model.layers.0.self_attn.q_proj.weight" in merged
    assert_matches_peft_merge(peft_model, merged)


def lora_layers(peft_model):
    return [m for m in peft_model.modules() if isinstance(m, LoraLayer)]


def test_every_term_matters(tok):
    """The checks above can fail: an export that drops the lora_B bias, the DoRA magnitude or the trained
    modules_to_save copy (as adding only `get_delta_weight` does) moves the logits far beyond ATOL."""
    ids = inputs(tok)
    for kwargs, drop in [
        (
            {"lora_bias": True, "target_modules": ["q_proj", "v_proj"]},
            lambda pm: [m.lora_B["default"].bias.zero_() for m in lora_layers(pm)],
        ),
        ({"use_dora": True}, lambda pm: [m.lora_magnitude_vector["default"].weight.mul_(1.1) for m in lora_layers(pm)]),
        (
            {"modules_to_save": ["lm_head"]},
            lambda pm: pm.base_model.model.lm_head.modules_to_save["default"].weight.zero_(),
        ),
    ]:
        peft_model = make_policy(tok, **kwargs)
        with torch.no_grad():
            full = peft_model(input_ids=ids).logits
            drop(peft_model)
            partial = peft_model(input_ids=ids).logits
        assert (full - partial).abs().max() > 100 * ATOL, kwargs


def test_tied_embeddings_reload_and_generate_identically(tok, tmp_path):
    # LoRA on every linear layer and on the (tied) input embedding.
    linear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = make_policy(tok, tied=True, target_modules=[*linear, "embed_tokens"])
    live_embedding = peft_model.base_model.model.lm_head.weight.detach().clone()
    model = check_export(tok, tmp_path, peft_model)
    # The policy's lm_head is the tied θ_embed, its input embedding θ_embed + ΔW: the export unties them. (PEFT's own
    # in-place `merge_and_unload()` would also add ΔW to the tied lm_head and change the logits.)
    assert not model.config.tie_word_embeddings
    torch.testing.assert_close(model.lm_head.weight, live_embedding, atol=0, rtol=0)
    assert not torch.equal(model.model.embed_tokens.weight, live_embedding)
    prompt = inputs(tok, n=1, length=6)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=None)
    with torch.no_grad():
        assert torch.equal(model.generate(prompt, **kwargs), peft_model.generate(input_ids=prompt, **kwargs))


def test_tied_embeddings_untouched_stay_tied(tok, tmp_path):
    peft_model = make_policy(tok, tied=True)  # all-linear: PEFT leaves the (tied) lm_head alone
    model = check_export(tok, tmp_path, peft_model)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_tied_embeddings_with_trained_lm_head_copy_are_untied(tok, tmp_path):
    """`modules_to_save=["lm_head"]` on a tied model trains an lm_head copy: the export must untie, not drop it."""
    peft_model = make_policy(tok, tied=True, modules_to_save=["lm_head"])
    with pytest.warns(UserWarning, match="no longer tied"):
        model = check_export(tok, tmp_path, peft_model)
    assert not model.config.tie_word_embeddings
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


@pytest.mark.parametrize("tied", [False, True])
def test_explicit_state_dict_gives_the_same_export(tok, tmp_path, tied):
    """The FSDP2 path: a full state dict (separate CPU tensors, as gathered) instead of the live tensors."""
    peft_model = make_policy(tok, tied=tied, use_dora=True, modules_to_save=["lm_head"])
    state_dict = {k: v.detach().clone() for k, v in peft_model.state_dict().items()}
    check_export(tok, tmp_path, peft_model, state_dict=state_dict)
    merged = export.merged_state_dict(peft_model, state_dict=state_dict)
    assert_matches_peft_merge(peft_model, merged)
    # The given state dict is what is exported: change it and the export follows, not the live model.
    key = "base_model.model.model.layers.0.mlp.down_proj.base_layer.weight"
    state_dict[key] = state_dict[key] + 1.0
    changed = export.merged_state_dict(peft_model, state_dict=state_dict)
    name = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(changed[name], merged[name])
    del state_dict[key]
    with pytest.raises(ValueError, match="lacks 1 entries"):
        export.merged_state_dict(peft_model, state_dict=state_dict)


def test_other_adapters_are_not_exported(tok, tmp_path):
    """Entries outside the exported adapter's PEFT model (TRL's `ref` adapter) are skipped."""
    peft_model = make_policy(tok, use_dora=True)
    peft_model.add_adapter("ref", LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    perturb(peft_model, seed=2)
    assert any(".ref." in k for k in peft_model.state_dict())
    peft_model.set_adapter("default")
    check_export(tok, tmp_path, peft_model)


def test_dtypes_follow_the_live_model(tok):
    config = LoraConfig(r=4, target_modules="all-linear", use_dora=True)
    peft_model = get_peft_model(make_base(tok, dtype=torch.bfloat16), config)
    perturb(peft_model)
    live = {export.plain_name(k): v.dtype for k, v in peft_model.state_dict().items() if "lora_" not in k}
    merged = export.merged_state_dict(peft_model)
    assert {k: v.dtype for k, v in merged.items()} == live
    assert all(v.dtype == torch.bfloat16 for v in merged.values())
    assert_matches_peft_merge(peft_model, merged)


def test_unmergeable_adapter_is_refused(tok, tmp_path):
    config = LoraConfig(r=4, target_modules=["q_proj"], alora_invocation_tokens=[1, 2], task_type="CAUSAL_LM")
    peft_model = get_peft_model(make_base(tok), config)
    with pytest.raises(ValueError, match="LoraConfig.alora_invocation_tokens"):
        export.save_merged_model(peft_model, tok, str(tmp_path / "merged"))
    # lora_bias on layers without a bias (Qwen2's o_proj, MLP): PEFT only warns when wrapping, then fails to merge.
    with pytest.warns(UserWarning, match="no bias"):
        peft_model = get_peft_model(make_base(tok), LoraConfig(r=4, target_modules="all-linear", lora_bias=True))
    with pytest.raises(ValueError, match=r"LoraConfig.lora_bias=True.*model.layers.0.self_attn.o_proj"):
        export.save_merged_model(peft_model, tok, str(tmp_path / "merged"))
    with pytest.raises(ValueError, match="not found"):
        export.merged_state_dict(peft_model, adapter_name="nope")
