"""`python -m trl_bridge.compare`: every variant runs on the same config and the outputs are written."""

import json

from trl_bridge.compare import main

from .test_train_cli import TINY_RUN, tiny_model_dir  # noqa: F401  (fixture)


def test_compare_runs_baselines_and_writes_results(tiny_model_dir, tmp_path):  # noqa: F811
    config = tmp_path / "c.yaml"
    config.write_text(f"model_name_or_path: {tiny_model_dir}\n")
    out = tmp_path / "cmp"
    run = [a for a in TINY_RUN]
    run[run.index("--max_steps") + 1] = "2"
    assert main(["--config", str(config), "--variants", "grpo,mix,sft_then_rl", "--max_steps", "2", "--output_dir", str(out), *run]) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["grpo", "mix", "sft_then_rl"]
    for r in results.values():
        assert len(r["reward_curve"]) == 2 and r["heldout_accuracy_after"] is not None
    assert (out / "sft_then_rl" / "rl" / "model.safetensors").is_file()  # stage 2 trained from stage 1's export
    assert (out / "reward_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "sft_then_rl" in (out / "results.md").read_text()
