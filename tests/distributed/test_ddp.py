"""Two processes (torchrun, DDP over gloo, CPU): every parameter set — θ, the shadow θ̂ and the adapter w — stays identical
across ranks although each rank trains on different rollouts and traces, i.e. each gradient is all-reduced."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("ddp_worker.py")


@pytest.mark.parametrize("storage", ["full", pytest.param("bf16_delta", marks=pytest.mark.slow)])
def test_two_process_ddp_keeps_theta_shadow_and_adapter_in_sync(tmp_path, storage):
    """With `bf16_delta` (2 micro-batches per step) θ̂'s bf16 gradient accumulator must hold all-reduced gradients."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}  # CPU ranks
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), str(WORKER), str(tmp_path), storage]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert int(r0["world_size"]) == 2
    assert not torch.equal(r0["first_sft_batch"], r1["first_sft_batch"])  # the ranks saw different traces
    keys = [k for k in r0 if k.split(".")[0] in ("base", "shadow", "adapter")]
    assert {k.split(".")[0] for k in keys} == {"base", "shadow", "adapter"}
    for key in keys:
        assert torch.equal(r0[key], r1[key]), key
    moved = [k for k in keys if k.startswith("shadow.") and not torch.equal(r0[k], r0["base." + k[len("shadow."):]])]
    assert moved  # θ̂ really trained apart from θ


def test_processes_the_trainer_would_run_alone_are_refused_naming_use_cpu(tmp_path):
    """torchrun without a GPU and without `use_cpu`: transformers initialises the process group but would train every
    process alone, each writing the same output_dir. BridgeConfig refuses it; with use_cpu + gloo it is one DDP job."""
    script = tmp_path / "config.py"
    # Each rank writes its own file: two processes printing to one pipe can interleave their lines.
    script.write_text("import os, sys\nfrom trl_bridge import BridgeConfig\n"
                      "extra = dict(use_cpu=True, ddp_backend='gloo') if sys.argv[1] == 'cpu' else {}\n"
                      f"args = BridgeConfig(output_dir={str(tmp_path / 'out')!r}, report_to='none', **extra)\n"
                      f"open(os.path.join({str(tmp_path)!r}, 'rank' + os.environ['RANK']), 'w')"
                      ".write(str(args.world_size))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    for mode in ("default", "cpu"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(port), str(script), mode]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        if mode == "default":
            assert proc.returncode != 0 and "BridgeConfig.use_cpu=False is invalid: 2 processes" in proc.stderr
        else:
            assert proc.returncode == 0, proc.stderr[-2000:]
            assert [(tmp_path / f"rank{r}").read_text() for r in (0, 1)] == ["2", "2"]
