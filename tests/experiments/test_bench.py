"""`trl-bridge bench` smoke test: real worker processes, one measured step each, a parsable table and JSON."""

import json
import os
import re
import subprocess
import sys

import pytest

from trl_bridge.experiments.bench import PHASES, format_table, summarise

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_bench_runs_grpo_and_bridge_for_one_step(tmp_path):
    out = tmp_path / "bench.json"
    pythonpath = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": pythonpath}
    cmd = [sys.executable, "-m", "trl_bridge.cli", "bench", "--config", os.path.join(ROOT, "configs/bench/tiny.yaml"),
           "--output", str(out), "--variants", "grpo,bridge_lean,bridge", "--warmup", "0", "--steps", "1",
           "--max_completion_length", "8", "--per_device_train_batch_size", "4", "--num_generations", "4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| bridge |" in proc.stdout and "overhead_vs_floor" in proc.stdout
    # progress on stdout, plain lines: the workers, then each variant's step with its s/step
    assert "[trl-bridge bench] 3 variants (grpo, bridge_lean, bridge), 1 optimizer steps each" in proc.stdout
    assert "[trl-bridge bench] workers ready (" in proc.stdout
    for i, variant in enumerate(("grpo", "bridge_lean", "bridge"), 1):
        assert re.search(rf"^\[trl-bridge bench\] variant {i}/3 {variant}: step 1/1 \(measured\), [\d.]+ s/step \| "
                         r"elapsed \S+ \| remaining ", proc.stdout, re.M), variant
    assert "s/step" not in out.read_text().replace("seconds_per_step", "")  # nothing of it in the results
    result = json.loads(out.read_text())
    grpo, bridge, lean = (result["variants"][v] for v in ("grpo", "bridge", "bridge_lean"))
    assert grpo["phases"]["sft"] == 0 and grpo["phases"]["shadow"] == 0
    assert bridge["phases"]["sft"] > 0 and bridge["phases"]["shadow"] > 0 and bridge["phases"]["rl"] > 0
    # every rollout generated the same number of tokens (min_new_tokens = max_completion_length)
    assert result["raw"]["grpo"]["steps"][0]["tokens"] == result["raw"]["bridge"]["steps"][0]["tokens"]
    # θ̂ with AdamW doubles the trainable part of the training state; the lean shadow adds half of that
    assert bridge["memory"]["state_bytes"] > lean["memory"]["state_bytes"] > grpo["memory"]["state_bytes"]
    # each phase's own peak; the run's peak is the largest of them (GRPO has no SFT or shadow pass)
    for v, phases in ((grpo, {"generation", "training_step", "optimizer", "other"}),
                      (bridge, {"generation", "training_step", "sft", "shadow", "optimizer", "other"})):
        peaks = v["memory"]["peak_bytes_by_phase"]  # shadow_logps only when TRL keeps sampling-time log-probs
        assert phases <= set(peaks) <= phases | {"shadow_logps"} and v["memory"]["peak_rss_bytes"] == max(peaks.values())
        assert all(b > 0 for b in peaks.values())
    assert result["malloc_mmap_threshold"] == str(1 << 17)  # RSS tracks live memory (freed blocks leave it)
    assert "Peak memory by phase" in proc.stdout and "| shadow (pass B) |" in proc.stdout
    assert bridge["step_vs_grpo"] == pytest.approx(bridge["seconds_per_step"] / grpo["seconds_per_step"])
    assert "bridge" in result["targets"] and "overhead_vs_floor" in result["targets"]["bridge"]


def test_summary_floor_and_ratios_from_phase_times():
    def step(total, **phases):
        return {"total": total, "tokens": 100, "phases": {p: phases.get(p, 0.0) for p in PHASES}}

    raw = {
        "grpo": {"steps": [step(9.0), step(2.0, rl=1.0)], "memory": {"peak_rss_bytes": 100, "state_bytes": 10}},
        "bridge": {"steps": [step(9.0), step(4.0, rl=1.0, sft=0.5, shadow=1.0)],
                   "memory": {"peak_rss_bytes": 130, "state_bytes": 20}},
    }
    s = summarise(raw, warmup=1)  # the first step of each is warm-up and left out
    b = s["variants"]["bridge"]
    assert b["floor_seconds"] == pytest.approx(2.0 + 1.0 + 0.5)  # GRPO step + one more RL pass + the SFT pass
    assert b["overhead_vs_floor"] == pytest.approx(4.0 / 3.5)
    assert b["step_vs_grpo"] == pytest.approx(2.0) and b["peak_memory_vs_grpo"] == pytest.approx(1.3)
    assert s["targets"]["bridge"]["overhead_vs_floor"]["met"] is False
    assert s["targets"]["bridge"]["peak_memory_vs_grpo"]["met"] is True


def test_options_of_bridge_are_compared_with_bridge_in_the_same_run():
    """Without GRPO in the run (e.g. `--variants bridge,bridge_shadow50`), the table shows no GRPO ratios and a line per
    BRIDGE option against BRIDGE: step, shadow phase and peak memory."""
    def step(total, shadow):
        return {"total": total, "tokens": 100, "phases": {p: shadow if p == "shadow" else 0.0 for p in PHASES}}

    raw = {"bridge": {"steps": [step(4.0, 2.0)], "memory": {"peak_rss_bytes": 200, "state_bytes": 20}},
           "bridge_shadow50": {"steps": [step(3.0, 1.0)], "memory": {"peak_rss_bytes": 190, "state_bytes": 20}}}
    s = summarise(raw, warmup=0)
    half = s["variants"]["bridge_shadow50"]
    assert half["step_vs_bridge"] == pytest.approx(0.75) and half["shadow_vs_bridge"] == pytest.approx(0.5)
    assert half["peak_memory_vs_bridge"] == pytest.approx(0.95)
    table = format_table(s)
    assert "nan" not in table
    assert "bridge_shadow50 vs bridge (same run): step 0.75×, shadow phase 0.50×, peak memory 0.95×" in table

