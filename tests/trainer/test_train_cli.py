"""`trl-bridge train`: config parsing (YAML + overrides, bad keys), every shipped config, an end-to-end tiny run with
all its outputs, the paper config on Hub data (answered at the `datasets.load_dataset` boundary) and offline, local
data folders, and a Hub push stopped at huggingface_hub's network boundary."""

import json
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM

from trl_bridge import BridgeConfig
from trl_bridge.cli import main as cli_main
from trl_bridge.train_cli import main as train_main
from trl_bridge.train_cli import make_parser

from ..helpers import TINY_RUN

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
PAPER_CONFIG = REPO / "configs" / "qwen2.5-3b_math.yaml"
MATH_LIGHTEVAL_REVISION = "0530c78699ea5e8eb5530600900e1f328b48acad"


def parse(argv):
    return make_parser().parse_args_and_config(argv)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_parses(config, tmp_path):
    script_args, args, model_args = parse(["--config", str(config), "--output_dir", str(tmp_path)])
    raw = yaml.safe_load(config.read_text())
    assert isinstance(args, BridgeConfig)
    assert model_args.model_name_or_path == raw["model_name_or_path"]
    assert args.bridge_lambda == raw["bridge_lambda"] and args.lora_r == raw["lora_r"]
    assert script_args.dataset_name == raw["dataset_name"]
    if config.name.endswith("_math.yaml"):  # the paper-setting configs
        assert (args.num_generations, args.max_completion_length, args.learning_rate) == (5, 3000, 5e-7)
        assert args.use_vllm and args.lora_alpha == 16
        assert args.per_device_train_batch_size * 8 * args.gradient_accumulation_steps == 64 * 5  # fsdp2.yaml: 8 GPUs
        assert model_args.dtype == "float32"  # fp32 master weights: bf16 updates at lr 5e-7 round away


def test_command_line_overrides_yaml(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model_name_or_path: some/model\nbridge_lambda: 0.3\nlearning_rate: 1.0e-5\n")
    _, args, _ = parse(["--config", str(config), "--output_dir", str(tmp_path), "--bridge_lambda", "0.7"])
    assert args.bridge_lambda == 0.7 and args.learning_rate == 1e-5


def test_unknown_yaml_key_is_an_error_naming_it(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("model_name_or_path: m\nbridge_lamda: 0.3\n")
    assert train_main(["--config", str(config), "--output_dir", str(tmp_path)]) == 2
    assert "bridge_lamda" in capsys.readouterr().err


def test_malformed_or_missing_yaml_and_wrong_types_are_clear_errors(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("model_name_or_path: m\nbridge_lambda: [1, 2\n")
    assert train_main(["--config", str(broken), "--output_dir", str(tmp_path)]) == 2
    assert "broken.yaml" in capsys.readouterr().err
    assert train_main(["--config", str(tmp_path / "missing.yaml"), "--output_dir", str(tmp_path)]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    typed = tmp_path / "typed.yaml"
    typed.write_text("model_name_or_path: m\nbridge_lambda: abc\n")
    with pytest.raises(SystemExit) as exc:  # argparse names the field and exits with 2
        train_main(["--config", str(typed), "--output_dir", str(tmp_path)])
    assert exc.value.code == 2 and "--bridge_lambda" in capsys.readouterr().err


def test_unknown_flag_and_invalid_value_are_errors(tmp_path, capsys):
    assert train_main(["--output_dir", str(tmp_path), "--no_such_flag", "1"]) == 2
    assert "--no_such_flag" in capsys.readouterr().err
    assert train_main(["--output_dir", str(tmp_path), "--bridge_lambda", "2.0"]) == 2
    assert "bridge_lambda" in capsys.readouterr().err


def test_help_lists_every_option_with_its_help(capsys):
    assert train_main(["--help-all"]) == 0
    text = capsys.readouterr().out
    for option in ("--bridge_lambda", "--adapter_learning_rate", "--sft_dataset_name", "--reward_funcs", "--num_generations", "--model_name_or_path"):
        assert option in text
    assert "weight of the RL loss" in text  # BridgeConfig's help strings are shown
    assert cli_main(["--help"]) == 0 and "train" in capsys.readouterr().out




def test_end_to_end_run_writes_everything(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    config = tmp_path / "tiny.yaml"
    config.write_text(f"model_name_or_path: {tiny_model_dir}\ndataset_name: builtin:arithmetic\nbridge_lambda: 0.5\n")
    assert train_main(["--config", str(config), "--output_dir", str(out), *TINY_RUN]) == 0
    printed = capsys.readouterr().out
    assert "held-out accuracy before training" in printed and "held-out accuracy after training" in printed
    for name in ("model.safetensors", "config.json", "tokenizer.json", "metrics.jsonl", "training_curves.png", "README.md",
                 "heldout_accuracy.json", "summary.json"):
        assert (out / name).is_file(), name
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("bridge/cooperative_gain" in m for m in metrics) and any("reward" in m for m in metrics)
    card = (out / "README.md").read_text()
    assert "BRIDGE" in card and "2509.06948" in card and "bridge_lambda" in card
    accuracy = json.loads((out / "heldout_accuracy.json").read_text())
    before, after = accuracy["heldout_accuracy_before"], accuracy["heldout_accuracy_after"]
    assert f"**{before:.2f} → {after:.2f}** (before → after training)" in card and "Mean reward per batch" in card
    assert "Arithmetic word problems" in card and f'model="{out.resolve()}"' in card
    assert (out / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    accuracy = json.loads((out / "heldout_accuracy.json").read_text())
    assert set(accuracy) == {"heldout_accuracy_before", "heldout_accuracy_after"}
    summary = json.loads((out / "summary.json").read_text())
    assert [(d["role"], d["spec"], d["split"], d["rows"], d["source"]) for d in summary["data"]] == [
        ("RL prompts", "builtin:arithmetic", "train", 20, "generated"), ("SFT traces", "builtin:arithmetic", "train", 20, "generated"),
        ("held-out", "builtin:arithmetic", "test", 4, "generated")]
    assert summary["heldout_accuracy_after"] == after
    model = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in k for k in model.state_dict())


def test_runs_under_accelerate_launch(tiny_model_dir, tmp_path):
    import os
    import subprocess
    import sys

    out = tmp_path / "launched"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "trl_bridge.cli", "train",
           "--model_name_or_path", str(tiny_model_dir), "--output_dir", str(out), *TINY_RUN]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "model.safetensors").is_file() and (out / "metrics.jsonl").is_file()


def test_benchmark_eval_during_training_is_logged(tiny_model_dir, tmp_path, fixture_data_dir, monkeypatch):
    monkeypatch.delenv("TRL_BRIDGE_DATA_DIR", raising=False)
    out = tmp_path / "bench"  # benchmark_eval reads its files from data_dir when benchmark_eval_data_dir is unset
    assert train_main(["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(out), *TINY_RUN,
                       "--benchmark_eval", "gsm8k", "--benchmark_eval_limit", "2", "--benchmark_eval_steps", "1",
                       "--data_dir", str(fixture_data_dir)]) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [m["eval/gsm8k/pass@1"] for m in metrics if "eval/gsm8k/pass@1" in m]
    assert len(logged) == 2 and all(0.0 <= v <= 1.0 for v in logged)  # steps 1 and 2 (the end adds none: same step)
    card = (out / "README.md").read_text()  # the final evaluation is filed in the model card's results
    assert "gsm8k" in card and f"value: {logged[-1]}" in card.replace("value: '", "value: ")


def test_model_card_describes_a_knights_and_knaves_task():
    from trl_bridge.train_cli import BridgeScriptArguments, describe_task

    text = describe_task(BridgeScriptArguments(dataset_name="builtin:knights_knaves", task_people="3-5",
                                               reward_funcs=["knights_knaves"]))
    assert "Knights-and-Knaves" in text and "3-5 people" in text and "<answer>" in text and "boxed" not in text


def test_paper_config_reaches_training_on_hub_data(hub_training_data, tiny_model_dir, tmp_path):
    """configs/qwen2.5-3b_math.yaml from a fresh clone: its datasets come from the Hub (pinned repositories, configs,
    splits and revisions asked of `datasets.load_dataset`), and the source and revision land in summary.json and the
    model card. Only the model and the sizes are overridden (a tiny model, 1 step, no vLLM)."""
    out = tmp_path / "paper"
    assert train_main(["--config", str(PAPER_CONFIG), "--model_name_or_path", str(tiny_model_dir), "--output_dir", str(out),
                       "--use_vllm", "false", "--max_steps", "1", "--per_device_train_batch_size", "2",
                       "--gradient_accumulation_steps", "1", "--num_generations", "2", "--max_completion_length", "4",
                       "--sft_per_device_train_batch_size", "2", "--sft_max_length", "2048", "--lora_r", "4",
                       "--lora_alpha", "4", "--save_strategy", "no"]) == 0
    assert hub_training_data.calls == [
        {"path": "hkust-nlp/SimpleRL-Zoo-Data", "name": None, "split": "train", "revision": None,
         "data_files": "simplelr_qwen_level3to5/train.parquet"},
        {"path": "DigitalLearningGmbH/MATH-lighteval", "name": "default", "split": "train", "revision": MATH_LIGHTEVAL_REVISION},
    ]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("bridge/sft_loss" in m for m in metrics)  # a training step ran
    data = json.loads((out / "summary.json").read_text())["data"]
    assert [(d["role"], d["repo"], d["revision"], d["rows"]) for d in data] == [
        ("RL prompts", "hkust-nlp/SimpleRL-Zoo-Data", None, 4), ("SFT traces", "DigitalLearningGmbH/MATH-lighteval",
                                                                 MATH_LIGHTEVAL_REVISION, 4)]
    card = (out / "README.md").read_text()
    assert yaml.safe_load(card.split("---")[1])["datasets"] == ["hkust-nlp/SimpleRL-Zoo-Data", "DigitalLearningGmbH/MATH-lighteval"]
    assert f"DigitalLearningGmbH/MATH-lighteval (default), split 'train', revision {MATH_LIGHTEVAL_REVISION}" in card
    assert "hkust-nlp/SimpleRL-Zoo-Data (simplelr_qwen_level3to5/train.parquet), split 'train', revision main (not pinned)" in card


def test_paper_config_offline_fails_before_the_model_in_one_line(monkeypatch, tmp_path, capsys):
    import datasets

    import trl_bridge.models

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'hkust-nlp/SimpleRL-Zoo-Data' on the Hub (OfflineModeIsEnabled)")

    def no_model(name):
        raise AssertionError("the model was loaded before the data")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setattr(trl_bridge.models, "resolve_model_path", no_model)
    monkeypatch.delenv("TRL_BRIDGE_DATA_DIR", raising=False)
    assert train_main(["--config", str(PAPER_CONFIG), "--output_dir", str(tmp_path / "offline")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        "trl-bridge train: error: dataset_name: cannot load hkust-nlp/SimpleRL-Zoo-Data "
        "(simplelr_qwen_level3to5/train.parquet), split 'train', revision main (not pinned) from the Hugging Face Hub")
    assert "--data_dir" in err and "TRL_BRIDGE_DATA_DIR" in err
    assert not (tmp_path / "offline").exists()


def test_data_dir_reads_the_local_copies(fixture_data_dir, hub_training_data, tmp_path, monkeypatch):
    from trl_bridge.train_cli import data_sources, load_datasets

    argv = ["--output_dir", str(tmp_path), "--dataset_name", "builtin:math_level3to5", "--sft_dataset_name", "builtin:math",
            "--dataset_test_split", "null"]
    script_args, _, _ = parse([*argv, "--data_dir", str(fixture_data_dir)])
    rl, sft, test = load_datasets(script_args, seed=0)
    assert (len(rl), len(sft), test) == (4, 4, None) and hub_training_data.calls == []
    assert [d["path"] for d in data_sources(script_args, rl, sft, test)] == [
        str(fixture_data_dir / "math_level3to5" / "train.jsonl"), str(fixture_data_dir / "math" / "train.jsonl")]
    monkeypatch.setenv("TRL_BRIDGE_DATA_DIR", str(fixture_data_dir))  # the variable, when no --data_dir is given
    script_args, _, _ = parse(argv)
    assert [len(ds) for ds in load_datasets(script_args, seed=0)[:2]] == [4, 4] and hub_training_data.calls == []
    script_args, _, _ = parse([*argv, "--data_dir", str(tmp_path / "nowhere")])
    with pytest.raises(FileNotFoundError, match="dataset_name: data_dir .*nowhere.* does not exist"):
        load_datasets(script_args, seed=0)


def test_push_to_hub_uploads_the_merged_model_and_card(tiny_model_dir, tmp_path, monkeypatch):
    """The Hub push is stopped at huggingface_hub's network boundary (HfApi.create_repo and HfApi.upload_folder):
    what would be uploaded is the folder's files after huggingface_hub's own ignore-pattern filter."""
    import huggingface_hub
    from huggingface_hub import RepoUrl
    from huggingface_hub.utils import filter_repo_objects

    created, uploads = [], []

    def fake_create_repo(self, repo_id, **kwargs):
        created.append(repo_id)
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def fake_upload_folder(self, repo_id, folder_path, ignore_patterns=None, allow_patterns=None, **kwargs):
        files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
        kept = list(filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
        uploads.append({"repo_id": repo_id, "files": {f: (Path(folder_path) / f).read_bytes() for f in kept}})

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", fake_upload_folder)
    out = tmp_path / "push"
    assert train_main(["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(out), "--push_to_hub", "true",
                       "--hub_model_id", "someone/bridge-tiny", "--save_strategy", "no", *TINY_RUN]) == 0
    assert created == ["someone/bridge-tiny"]
    upload = uploads[-1]
    assert upload["repo_id"] == "someone/bridge-tiny"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "README.md"):
        assert name in upload["files"], name
    card = upload["files"]["README.md"].decode()
    assert "BRIDGE" in card and "2509.06948" in card and "bridge_lambda" in card
    meta = yaml.safe_load(card.split("---")[1])
    assert "bridge" in meta["tags"]
    from safetensors.torch import load

    weights = load(upload["files"]["model.safetensors"])
    assert weights and not any("lora" in k for k in weights)
