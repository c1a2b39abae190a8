"""Training reports: metrics as JSON lines, training-curve plots, and a Hugging Face model card.

- `write_metrics_jsonl` / `read_metrics_jsonl`: the Trainer's ``state.log_history`` (a list of dicts) one JSON
  object per line.
- `make_training_figure` / `plot_training_curves`: a 2x2 matplotlib figure (Agg, no display needed) of the mean
  reward, the SFT loss (``bridge/sft_loss``), the cooperative gain (``bridge/cooperative_gain``) and the RL/SFT mixing
  weight λ (``bridge/lambda``) against the training step; panels whose metric was never logged say so.
- `write_model_card`: ``README.md`` with YAML metadata (``huggingface_hub.ModelCardData``) describing a BRIDGE run,
  its hyper-parameters, final metrics, evaluation results and the paper citation.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = [
    "CURVE_PANELS",
    "make_training_figure",
    "plot_training_curves",
    "read_metrics_jsonl",
    "write_metrics_jsonl",
    "write_model_card",
]

from .citation import CITATION, PAPER_AUTHORS, PAPER_TITLE, PAPER_URL

#: (log key, panel title, y-axis label) for each panel of the training-curve figure, in reading order.
CURVE_PANELS: tuple[tuple[str, str, str], ...] = (
    ("reward", "Reward (mean per batch)", "reward"),
    ("bridge/sft_loss", "SFT loss", "loss"),
    ("bridge/cooperative_gain", "Cooperative gain", "gain"),
    ("bridge/lambda", "λ (RL weight; SFT gets 1−λ)", "λ"),
)


def _check_log_history(log_history) -> list[dict]:
    if not isinstance(log_history, Sequence) or isinstance(log_history, (str, bytes)):
        raise ValueError(f"log_history must be a list of dicts (trainer.state.log_history), got {type(log_history).__name__}")
    for i, entry in enumerate(log_history):
        if not isinstance(entry, Mapping):
            raise ValueError(f"log_history[{i}] must be a dict, got {type(entry).__name__}")
    return list(log_history)


def _to_json(value):
    """JSON fallback for tensors / numpy scalars that end up in log dicts."""
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def write_metrics_jsonl(log_history: Sequence[Mapping], path: str | os.PathLike) -> Path:
    """Write each log entry as one JSON line to `path` (parent folders are created). Returns the path."""
    entries = _check_log_history(log_history)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for entry in entries:
            f.write(json.dumps(dict(entry), default=_to_json) + "\n")
    return path


def read_metrics_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read back a file written by `write_metrics_jsonl` (blank lines are skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metrics file not found: {path}")
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _series(entries: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) for every entry that logged `key` as a finite number; entries without a step use their index."""
    steps, values = [], []
    for i, entry in enumerate(entries):
        value = entry.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        steps.append(entry.get("step", i))
        values.append(float(value))
    return steps, values


def make_training_figure(log_history: Sequence[Mapping], title: str | None = None):
    """A matplotlib `Figure` with one panel per `CURVE_PANELS` entry (``eval_<key>`` is overlaid when logged).

    Uses the object-oriented API (no pyplot), so it works headless and leaves global state alone.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    entries = _check_log_history(log_history)
    fig = Figure(figsize=(10, 7), layout="constrained")
    axes = fig.subplots(2, 2).ravel()
    for ax, (key, panel_title, ylabel) in zip(axes, CURVE_PANELS):
        ax.set_title(panel_title)
        plotted = False
        for log_key, label, style in ((key, "train", ".-"), (f"eval_{key}", "eval", "o--")):
            steps, values = _series(entries, log_key)
            if steps:
                ax.plot(steps, values, style, label=label, markersize=3)
                plotted = True
        if plotted:
            ax.set_xlabel("step")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, f"{key}\nnot logged", ha="center", va="center", transform=ax.transAxes, color="gray")
            ax.set_xticks([])
            ax.set_yticks([])
    if title:
        fig.suptitle(title)
    return fig


def plot_training_curves(log_history: Sequence[Mapping], path: str | os.PathLike, title: str | None = None) -> Path:
    """Save `make_training_figure(log_history)` as a PNG at `path` (parent folders are created). Returns the path."""
    path = Path(path)
    fig = make_training_figure(log_history, title=title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path


# --------------------------------------------------------------------------------------------------------------------
# Model card
# --------------------------------------------------------------------------------------------------------------------


def _format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (str, int)):
        return str(value)
    return json.dumps(value, default=_to_json)


def _table(rows: Mapping, header: tuple[str, str]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| `{key}` | {_format_value(value)} |".replace("\n", " ") for key, value in rows.items()]
    return "\n".join(lines)


def _hub_base_model(base_model: str) -> str | None:
    """The Hub id to record as ``base_model`` metadata, or ``None`` for local folders."""
    from .models import OFFLINE_SMOLLM2_HUB_ID, is_offline_smollm2_alias

    if is_offline_smollm2_alias(base_model):
        return OFFLINE_SMOLLM2_HUB_ID
    if Path(base_model).exists() or base_model.startswith((".", "/", "~")):
        return None
    return base_model


def _is_hub_dataset(name: str) -> bool:
    return "/" in name and ":" not in name and not Path(name).exists() and not name.startswith((".", "/", "~"))


def _eval_rows(eval_results: Mapping | None) -> dict[str, float]:
    """Flatten ``{"gsm8k": 0.41}`` or ``{"gsm8k": {"accuracy": 0.41, ...}}`` to ``{"gsm8k/accuracy": 0.41}``."""
    rows: dict[str, float] = {}
    for benchmark, result in (eval_results or {}).items():
        if isinstance(result, Mapping):
            for metric, value in result.items():
                rows[f"{benchmark}/{metric}"] = value
        else:
            rows[f"{benchmark}/accuracy"] = result
    return rows


def write_model_card(
    output_dir: str | os.PathLike,
    base_model: str,
    datasets: Sequence[str] | str,
    hyperparameters: Mapping,
    final_metrics: Mapping,
    eval_results: Mapping | None = None,
    model_name: str | None = None,
) -> Path:
    """Write ``README.md`` (a Hugging Face model card) for a BRIDGE-trained model into `output_dir`.

    Metadata: ``library_name: transformers``, tags (``trl``, ``bridge``, ``grpo``, ...), ``base_model`` (the Hub id;
    the offline SmolLM2 alias maps to ``HuggingFaceTB/SmolLM2-135M-Instruct``), Hub datasets, and a model-index with
    the numeric `eval_results` (``{benchmark: accuracy}`` or ``{benchmark: {metric: value}}``). The body describes
    BRIDGE, lists `datasets`, the `hyperparameters` and `final_metrics` as tables, shows usage, and cites the paper.
    Returns the path of the card.
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData


    if not isinstance(base_model, str) or not base_model.strip():
        raise ValueError(f"base_model must be a non-empty string, got {base_model!r}")
    if isinstance(datasets, str):
        datasets = [datasets]
    if not isinstance(datasets, Sequence) or not all(isinstance(d, str) for d in datasets):
        raise ValueError(f"datasets must be a list of dataset names, got {datasets!r}")
    for field, value in (("hyperparameters", hyperparameters), ("final_metrics", final_metrics)):
        if not isinstance(value, Mapping):
            raise ValueError(f"{field} must be a dict, got {type(value).__name__}")
    if eval_results is not None and not isinstance(eval_results, Mapping):
        raise ValueError(f"eval_results must be a dict or None, got {type(eval_results).__name__}")

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model_name = model_name or output_dir.resolve().name
    evals = _eval_rows(eval_results)
    hub_base = _hub_base_model(base_model)
    numeric_evals = {k: v for k, v in evals.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        base_model=hub_base,
        datasets=[d for d in datasets if _is_hub_dataset(d)] or None,
        tags=["trl", "bridge", "grpo", "sft", "reinforcement-learning", "reasoning"],
        model_name=model_name if numeric_evals else None,
        eval_results=[
            EvalResult(
                task_type="text-generation",
                dataset_type=key.split("/")[0],
                dataset_name=key.split("/")[0],
                metric_type=key.split("/", 1)[1],
                metric_value=float(value),
            )
            for key, value in numeric_evals.items()
        ]
        or None,
    )
    base_link = f"[{hub_base}](https://huggingface.co/{hub_base})" if hub_base else f"`{base_model}`"
    dataset_list = "\n".join(f"- `{d}`" for d in datasets) or "- (not recorded)"
    eval_section = _table(evals, ("benchmark/metric", "value")) if evals else "No evaluation was run."
    body = f"""
# {model_name}

This model is a fine-tuned version of {base_link}, trained with **BRIDGE** (cooperative SFT and RL) using
`trl-bridge`, which builds on [TRL](https://github.com/huggingface/trl)'s `GRPOTrainer`.

BRIDGE ([{PAPER_TITLE}]({PAPER_URL}), {PAPER_AUTHORS}; ICML 2026) trains with RL on verifiable rewards (GRPO) and
SFT on expert traces *at the same time* instead of SFT-then-RL: the base weights follow (1−λ)·SFT + λ·RL, and a LoRA
adapter is meta-learned (a bilevel problem) to maximise the *cooperative gain* of joint training over an RL-only
shadow copy of the model.

## Training data

{dataset_list}

## Training hyper-parameters

{_table(hyperparameters, ("hyper-parameter", "value"))}

## Final training metrics

{_table(final_metrics, ("metric", "value")) if final_metrics else "No metrics were logged."}

## Evaluation

{eval_section}

## Usage

```python
from transformers import pipeline

generator = pipeline("text-generation", model="{model_name}")
question = "Tom has 7 apples. Then he buys 5 more apples. How many apples does Tom have now?"
prompt = question + "\\nPlease reason step by step, and put your final answer within \\\\boxed{{}}."
print(generator([{{"role": "user", "content": prompt}}], max_new_tokens=256)[0]["generated_text"])
```

## Citation

BRIDGE:

```bibtex
{CITATION}
```
"""
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}")
    path = output_dir / "README.md"
    card.save(path)
    return path
