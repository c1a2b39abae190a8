"""FSDP2 through accelerate on 2 CPU ranks (gloo): BRIDGE trains exactly like DDP with θ, θ̂, w and their optimizer states
sharded, and its checkpoints resume under FSDP2 and in one process. tests/distributed/fsdp_worker.py does the training; accelerate
is told to use FSDP on CPU processes by tests/distributed/cpu_fsdp_patch.py (accelerate 1.15 never does so by itself)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

TESTS = Path(__file__).resolve().parent
WORKER = TESTS / "fsdp_worker.py"
# CPU processes over gloo, on a GPU machine too (the ranks would otherwise pick CUDA devices that may not exist)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "CUDA_VISIBLE_DEVICES": ""}


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _run(cmd, env=ENV):
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=TESTS.parents[1])
    assert proc.returncode == 0, proc.stderr[-4000:]


def run_ddp(out, *extra, overrides=None):
    env = {**ENV, "BRIDGE_TEST_OVERRIDES": json.dumps(overrides or {})}
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
          "--master_port", _port(), str(WORKER), "train", str(out), *extra], env=env)


def run_fsdp2(out, *extra, overrides=None):
    env = {**ENV, "TRL_BRIDGE_TEST_CPU_FSDP": "1", "ACCELERATE_USE_CPU": "true",
           "BRIDGE_TEST_OVERRIDES": json.dumps(overrides or {})}
    _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(TESTS / "accelerate" / "fsdp2_cpu.yaml"),
          "--main_process_port", _port(), str(WORKER), "train", str(out), *extra], env=env)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("engines")
    run_ddp(root / "ddp")
    run_fsdp2(root / "fsdp2")
    return root


def assert_same_training(ddp, fsdp):
    assert set(ddp) == set(fsdp)
    assert any(k.endswith("lm_head.weight") for k in ddp if k.startswith("base."))
    assert any(k.endswith("lm_head.weight") for k in ddp if k.startswith("shadow."))
    for group in ("base.", "shadow.", "adapter."):  # θ, θ̂, w as wholes
        keys = [k for k in ddp if k.startswith(group)]
        num = sum(((ddp[k] - fsdp[k]).double() ** 2).sum() for k in keys) ** 0.5
        den = sum((ddp[k].double() ** 2).sum() for k in keys) ** 0.5
        assert num / den < 1e-5, group
    for k in ddp:  # and tensor by tensor
        rel = ((ddp[k] - fsdp[k]).norm() / ddp[k].norm()).item()
        if k.endswith("k_proj.bias"):
            # ∂L/∂(key bias) is exactly 0 (softmax is shift-invariant), so AdamW (and the lean shadow's Adafactor,
            # which normalises by the gradient's own RMS) steps on round-off: compare absolutely, at 1e-3 of lr = 1e-2
            assert (ddp[k] - fsdp[k]).abs().max() < 1e-5, k
        else:
            assert rel < 1e-5, (k, rel)
    # θ̂ really trained apart from θ (otherwise the comparison would prove little)
    moved = [k for k in ddp if k.startswith("shadow.") and not torch.equal(ddp[k], ddp["base." + k[len("shadow."):]])]
    assert len(moved) > len(ddp) // 4


def test_fsdp2_trains_like_ddp_including_lm_head(runs):
    assert_same_training(torch.load(runs / "ddp" / "final_state.pt"), torch.load(runs / "fsdp2" / "final_state.pt"))


def test_fsdp2_with_kl_reference_truncated_is_shadow_iterations_and_checkpointing_trains_like_ddp(tmp_path):
    """The paths with extra no-grad forwards (old and shadow log-probs, the frozen KL reference) and recomputation
    (gradient checkpointing replays pass B with θ̂ in place) under FSDP2."""
    overrides = {"beta": 0.04, "shadow_off_policy": "truncated_is", "num_iterations": 2, "gradient_checkpointing": True,
                 "save_strategy": "no"}
    run_ddp(tmp_path / "ddp", overrides=overrides)
    run_fsdp2(tmp_path / "fsdp2", overrides=overrides)
    assert_same_training(torch.load(tmp_path / "ddp" / "final_state.pt"), torch.load(tmp_path / "fsdp2" / "final_state.pt"))


def test_fsdp2_shards_the_shadow_and_its_optimizer_state(runs):
    for rank in (0, 1):
        stats = torch.load(runs / "fsdp2" / f"stats_rank{rank}.pt")
        assert stats["engine"] == "DistributedType.FSDP" and stats["world_size"] == 2
        assert stats["shadow_is_dtensor"]
        assert 0.45 < stats["shadow_local"] / stats["shadow_full"] < 0.55, stats
        assert 0.45 < stats["shadow_optim_local"] / stats["shadow_optim_full"] < 0.55, stats
        assert stats["divergence"][-1] > 0.01  # bridge/shadow_divergence is logged and non-zero
    ddp_stats = torch.load(runs / "ddp" / "stats_rank0.pt")
    assert ddp_stats["shadow_local"] == ddp_stats["shadow_full"]  # DDP keeps a full θ̂ per rank


def test_fsdp2_merged_export_matches_ddp(runs):
    ddp = load_file(runs / "ddp" / "export" / "model.safetensors")
    fsdp = load_file(runs / "fsdp2" / "export" / "model.safetensors")
    assert set(ddp) == set(fsdp)
    for k in ddp:
        assert (ddp[k] - fsdp[k]).abs().max() < 1e-5, k


def test_vllm_weight_sync_under_fsdp2_streams_the_export_and_leaves_the_shards_untouched(runs):
    """FSDP2 + vLLM: BRIDGE's sync gathers π(θ+w) one module at a time on every rank (TRL's in-place PEFT merge on
    sharded parameters is untested upstream); what the engine receives is the export, tied weights once, and no rank's
    shard of θ, θ̂ or w changes. (The engine is a stand-in: vLLM colocate on CPU ranks is not exercised here.)"""
    for engine in ("ddp", "fsdp2"):
        pushed = torch.load(runs / engine / "vllm_pushed.pt")
        export = load_file(runs / engine / "export" / "model.safetensors")
        assert pushed and not any("lora" in n for n in pushed)
        assert set(pushed) <= set(export) and len(pushed) >= len(export) - 1
        for name, tensor in pushed.items():
            assert torch.equal(tensor, export[name]), (engine, name)
        for rank in (0, 1):
            assert torch.load(runs / engine / f"stats_rank{rank}.pt")["theta_changed_by_vllm_sync"] == 0


def test_fsdp2_checkpoint_resumes_under_fsdp2_and_in_one_process(runs, tmp_path):
    ckpt = runs / "fsdp2" / "checkpoint-2"
    saved = load_file(ckpt / "bridge_state.safetensors")
    optim = torch.load(ckpt / "bridge_optimizers.pt", weights_only=False)
    run_fsdp2(tmp_path / "fsdp2", str(ckpt))
    subprocess_env_single = {k: v for k, v in ENV.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    _run([sys.executable, str(WORKER), "train", str(tmp_path / "single"), str(ckpt)], env=subprocess_env_single)
    for where in ("fsdp2", "single"):
        begin = torch.load(tmp_path / where / "begin_state.pt")
        for k, v in saved.items():  # θ, θ̂ and w as written under FSDP2 (full tensors)
            assert torch.equal(begin[k], v), (where, k)
        assert torch.equal(begin["shadow_exp_avg_0"], optim["shadow_optimizer"]["state"][0]["exp_avg"]), where
    # resuming under FSDP2 continues exactly as the uninterrupted run
    final, uninterrupted = torch.load(tmp_path / "fsdp2" / "final_state.pt"), torch.load(runs / "fsdp2" / "final_state.pt")
    for k in uninterrupted:
        assert torch.allclose(final[k], uninterrupted[k], rtol=0, atol=1e-6), k


def test_fsdp1_launch_is_refused_before_training(tmp_path):
    env = {**ENV, "TRL_BRIDGE_TEST_CPU_FSDP": "1", "ACCELERATE_USE_CPU": "true", "ACCELERATE_TORCH_DEVICE": "cpu"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(TESTS / "accelerate" / "fsdp1_cpu.yaml"),
           "--main_process_port", _port(), str(WORKER), "train", str(tmp_path / "out")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=TESTS.parents[1])
    assert proc.returncode != 0
    assert "does not support FSDP1" in proc.stderr and "fsdp2.yaml" in proc.stderr
    assert not (tmp_path / "out" / "checkpoint-2").exists()


def test_lean_shadow_under_fsdp2_trains_like_ddp_and_resumes(tmp_path):
    """shadow_storage="lean": θ̂'s factored Adafactor statistics are DTensors too (rows sharded like θ̂, columns
    replicated); training equals DDP's, and a checkpoint resumes under FSDP2 exactly."""
    lean = {"shadow_storage": "lean"}
    run_ddp(tmp_path / "ddp", overrides=lean)
    run_fsdp2(tmp_path / "fsdp2", overrides=lean)
    uninterrupted = torch.load(tmp_path / "fsdp2" / "final_state.pt")
    assert_same_training(torch.load(tmp_path / "ddp" / "final_state.pt"), uninterrupted)
    stats = torch.load(tmp_path / "fsdp2" / "stats_rank0.pt")
    assert stats["shadow_optim_full"] < 0.3 * stats["shadow_full"]  # no moments: row/column statistics only
    run_fsdp2(tmp_path / "resumed", str(tmp_path / "fsdp2" / "checkpoint-2"), overrides=lean)
    final = torch.load(tmp_path / "resumed" / "final_state.pt")
    for k in uninterrupted:
        assert torch.allclose(final[k], uninterrupted[k], rtol=0, atol=1e-6), k



@pytest.mark.slow
@pytest.mark.parametrize("accumulation", [2, pytest.param(1, marks=pytest.mark.slow)], ids=["ga2", "ga1-theta-first"])
def test_bf16_delta_shadow_under_fsdp2_is_sharded_trains_like_ddp_and_resumes(tmp_path, accumulation):
    """shadow_storage="bf16_delta": d is a bf16 DTensor sharded like θ, θ̂'s slots and factored statistics too; its
    stochastic rounding draws the same bits for an element whether θ is sharded or not. θ and w equal DDP's as for the
    full shadow; d rounds fp32 values that differ in their last bits (the reduction order), so an element of d may
    land one bf16 spacing apart: d agrees within a fraction of its spacing (2^-8 relative) as a whole. A checkpoint
    resumes under FSDP2 bit for bit. With one micro-batch per step θ steps right after pass A (on its reduced,
    sharded gradient) — the same on both engines."""
    delta = {"shadow_storage": "bf16_delta", "gradient_accumulation_steps": accumulation}
    run_ddp(tmp_path / "ddp", overrides=delta)
    run_fsdp2(tmp_path / "fsdp2", overrides=delta)
    ddp, uninterrupted = (torch.load(tmp_path / w / "final_state.pt") for w in ("ddp", "fsdp2"))
    deltas = [k for k in ddp if k.startswith("shadow_delta.")]
    assert deltas and not any(k.startswith("shadow.") for k in ddp) and set(ddp) == set(uninterrupted)
    assert all(uninterrupted[k].dtype == torch.bfloat16 for k in deltas)
    # θ first: pass B's θ̂ = θ + d already carries this step's rounding of d, whose elements may land one bf16 spacing
    # apart between the engines (below), and w's pass-B gradient follows it: w agrees to 1e-4 instead of 1e-5
    tolerance = {"base.": 1e-5, "adapter.": 1e-5 if accumulation > 1 else 1e-4}
    for group in ("base.", "adapter."):
        keys = [k for k in ddp if k.startswith(group)]
        num = sum(((ddp[k] - uninterrupted[k]).double() ** 2).sum() for k in keys) ** 0.5
        assert num / sum((ddp[k].double() ** 2).sum() for k in keys) ** 0.5 < tolerance[group], group
    num = sum(((ddp[k].float() - uninterrupted[k].float()).double() ** 2).sum() for k in deltas) ** 0.5
    den = sum((ddp[k].double() ** 2).sum() for k in deltas) ** 0.5
    assert den > 0 and num / den < 2**-8
    for rank in (0, 1):
        stats = torch.load(tmp_path / "fsdp2" / f"stats_rank{rank}.pt")
        assert stats["shadow_is_dtensor"] and 0.45 < stats["shadow_local"] / stats["shadow_full"] < 0.55, stats
        assert stats["shadow_optim_full"] < 0.3 * stats["shadow_full"]
        assert stats["divergence"][-1] > 0.01
    run_fsdp2(tmp_path / "resumed", str(tmp_path / "fsdp2" / "checkpoint-2"), overrides=delta)
    final = torch.load(tmp_path / "resumed" / "final_state.pt")
    for k in uninterrupted:
        assert torch.equal(final[k], uninterrupted[k]), k
