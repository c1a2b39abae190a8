"""Training reports: metrics as JSON lines, training-curve plots, a compact console log and a Hugging Face model card.

- `write_metrics_jsonl` / `read_metrics_jsonl`: the Trainer's ``state.log_history`` (a list of dicts) one JSON
  object per line.
- `make_training_figure` / `plot_training_curves`: a 2x3 matplotlib figure (Agg, no display needed) of the mean
  reward, the SFT loss (``bridge/sft_loss``), the cooperative gain (``bridge/cooperative_gain``), the RL/SFT mixing
  weight λ (``bridge/lambda``), the held-out accuracy (before/after training, and at intervals when measured) and the
  completion length against the training step. Noisy per-step curves are drawn faint, with an exponential moving
  average on top; panels whose metric was never logged say so.
- `format_log_line` / `CompactLogCallback`: one short line per logging step (step, reward, SFT loss, cooperative gain,
  λ, seconds per step) printed above the progress bar, instead of the Trainer's dict of ~30 metrics.
- `training_summary`: means over the first and last part of training (what the model card reports).
- `write_model_card`: ``README.md`` with YAML metadata (``huggingface_hub.ModelCardData``) describing a BRIDGE run:
  a summary (held-out accuracy before → after, mean reward over the last part of training), the task, data,
  hyper-parameters, evaluation results, usage that works from any directory, and the paper citation.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = [
    "CURVE_PANELS",
    "CompactLogCallback",
    "format_log_line",
    "make_training_figure",
    "plot_training_curves",
    "read_metrics_jsonl",
    "training_summary",
    "write_metrics_jsonl",
    "write_model_card",
]

from ..citation import CITATION, PAPER_AUTHORS, PAPER_TITLE, PAPER_URL

#: (log key, panel title, y-axis label, smoothed) for each metric panel of the training-curve figure, in reading order.
#: Smoothed panels draw the raw per-step values faint and an exponential moving average on top.
CURVE_PANELS: tuple[tuple[str, str, str, bool], ...] = (
    ("reward", "Reward (mean per batch)", "reward", True),
    ("bridge/sft_loss", "SFT loss", "loss", True),
    ("bridge/cooperative_gain", "Cooperative gain", "gain", True),
    ("bridge/lambda", "λ (RL weight; SFT gets 1−λ)", "λ", False),
    ("completions/mean_length", "Completion length (mean tokens)", "tokens", True),
)
HELDOUT_PANEL_TITLE = "Held-out accuracy"


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


def ema(values: Sequence[float], span: int) -> list[float]:
    """Exponential moving average with smoothing factor 2/(span+1) (pandas' ``ewm(span=..., adjust=False)``)."""
    alpha = 2.0 / (max(1, span) + 1.0)
    out, current = [], None
    for value in values:
        current = value if current is None else alpha * value + (1 - alpha) * current
        out.append(current)
    return out


def smoothing_span(n_points: int) -> int:
    """EMA span for a curve of `n_points`: about a quarter of the run, at least 3 and at most 50 steps."""
    return max(3, min(50, round(n_points / 4)))


def _heldout_series(entries: list[dict], heldout: Mapping | None, last_step) -> dict[str, tuple[list, list]]:
    """{label: (steps, accuracies)}: before/after training from `heldout`, and any held-out or benchmark accuracy logged
    at intervals during training (``heldout_accuracy`` or ``eval/<benchmark>/pass@1`` in the log history)."""
    series: dict[str, tuple[list, list]] = {}
    before = (heldout or {}).get("heldout_accuracy_before")
    after = (heldout or {}).get("heldout_accuracy_after")
    points = [(0, before)] if isinstance(before, (int, float)) else []
    steps, values = _series(entries, "heldout_accuracy")
    points += list(zip(steps, values))
    if isinstance(after, (int, float)):
        points.append((last_step if last_step is not None else (points[-1][0] + 1 if points else 1), after))
    if points:
        series["held-out split (greedy)"] = ([p[0] for p in points], [float(p[1]) for p in points])
    for key in sorted({k for e in entries for k in e if k.startswith("eval/") and k.endswith("/pass@1")}):
        steps, values = _series(entries, key)
        if steps:
            series[key.removeprefix("eval/").removesuffix("/pass@1") + " pass@1"] = (steps, values)
    return series


def _empty_panel(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray")
    ax.set_xticks([])
    ax.set_yticks([])


def make_training_figure(log_history: Sequence[Mapping], title: str | None = None, heldout: Mapping | None = None):
    """A matplotlib `Figure`: one panel per `CURVE_PANELS` entry plus the held-out accuracy panel.

    Smoothed metrics are drawn raw (faint) with an exponential moving average over them (``eval_<key>`` is overlaid
    when logged). `heldout` is ``{"heldout_accuracy_before": a, "heldout_accuracy_after": b}`` (either may be
    missing); ``heldout_accuracy`` or ``eval/<benchmark>/pass@1`` entries in the log history add points at the steps
    they were measured. Uses the object-oriented API (no pyplot), so it works headless and leaves global state alone.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if heldout is not None and not isinstance(heldout, Mapping):
        raise ValueError(f"heldout must be a dict or None, got {type(heldout).__name__}")
    entries = _check_log_history(log_history)
    fig = Figure(figsize=(15, 8), layout="constrained")
    axes = list(fig.subplots(2, 3).ravel())
    steps_logged = [e["step"] for e in entries if isinstance(e.get("step"), (int, float))]
    last_step = max(steps_logged) if steps_logged else None
    panels = [(key, title_, ylabel, smooth) for key, title_, ylabel, smooth in CURVE_PANELS]
    panels.insert(4, (None, HELDOUT_PANEL_TITLE, "accuracy", False))
    for ax, (key, panel_title, ylabel, smooth) in zip(axes, panels):
        ax.set_title(panel_title)
        if key is None:
            plotted = False
            for label, (steps, values) in _heldout_series(entries, heldout, last_step).items():
                ax.plot(steps, values, "o--", label=label, markersize=5)  # dashed: measured only at the dots
                for x, y in zip(steps, values):
                    ax.annotate(f"{y:.2f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
                plotted = True
            if plotted:
                ax.set_ylim(-0.05, 1.1)
        else:
            plotted = False
            steps, values = _series(entries, key)
            if steps:
                if smooth and len(values) > 2:
                    span = smoothing_span(len(values))
                    (raw,) = ax.plot(steps, values, "-", alpha=0.3, linewidth=1, label="per step")
                    ax.plot(steps, ema(values, span), "-", color=raw.get_color(), linewidth=2.2,
                            label=f"moving average ({span} steps)")
                else:
                    ax.plot(steps, values, ".-", label="per step", markersize=4)
                plotted = True
            steps, values = _series(entries, f"eval_{key}")
            if steps:
                ax.plot(steps, values, "o--", label="eval", markersize=4)
                plotted = True
        if plotted:
            ax.set_xlabel("step")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
        else:
            _empty_panel(ax, f"{key}\nnot logged" if key else "not measured")
    for ax in axes[len(panels):]:
        ax.set_axis_off()
    if title:
        fig.suptitle(title)
    return fig


def plot_training_curves(
    log_history: Sequence[Mapping], path: str | os.PathLike, title: str | None = None, heldout: Mapping | None = None
) -> Path:
    """Save `make_training_figure(log_history, title, heldout)` as a PNG at `path` (parent folders are created)."""
    path = Path(path)
    fig = make_training_figure(log_history, title=title, heldout=heldout)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path


# --------------------------------------------------------------------------------------------------------------------
# Console log and run summary
# --------------------------------------------------------------------------------------------------------------------

#: (log key, label, format) of the compact per-step log line, in order.
LOG_LINE_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("reward", "reward", "{:.3f}"),
    ("bridge/sft_loss", "sft_loss", "{:.3f}"),
    ("bridge/cooperative_gain", "coop_gain", "{:+.4f}"),
    ("bridge/lambda", "λ", "{:.2f}"),
)


def _number(value):
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def format_log_line(logs: Mapping, step: int | None = None, max_steps: int | None = None,
                    seconds_per_step: float | None = None) -> str | None:
    """One compact line for a Trainer log dict, or ``None`` when it holds nothing worth a line.

    Training logs give ``step 3/20 | reward 0.250 | sft_loss 0.412 | coop_gain +0.0120 | λ 0.30 | 16.8 s/step``
    (TRL's ``step_time`` is the seconds per step when present); the end-of-training summary gives ``done: ...``;
    benchmark evaluations give ``eval: math500 pass@1 0.125 ...``.
    """
    where = f"step {step}/{max_steps}" if step is not None and max_steps else (f"step {step}" if step is not None else "")
    if "train_runtime" in logs:
        runtime = _number(logs.get("train_runtime"))
        loss = _number(logs.get("train_loss"))
        parts = [f"done: {step} steps" if step is not None else "done"]
        if runtime is not None:
            minutes, seconds = divmod(int(round(runtime)), 60)
            parts.append(f"{minutes}m {seconds:02d}s" if minutes else f"{runtime:.1f}s")
        if loss is not None:
            parts.append(f"train_loss {loss:.4f}")
        return " | ".join(parts)
    fields = [(label, fmt.format(v)) for key, label, fmt in LOG_LINE_FIELDS if (v := _number(logs.get(key))) is not None]
    if fields:
        seconds = _number(logs.get("step_time"))
        seconds = seconds if seconds is not None else seconds_per_step
        tail = [f"{seconds:.1f} s/step"] if seconds is not None else []
        return " | ".join([where] * bool(where) + [f"{label} {value}" for label, value in fields] + tail)
    evals = [(k, v) for k, v in logs.items() if k.startswith("eval") and _number(v) is not None and "samples_per_second" not in k]
    if evals:
        shown = ", ".join(f"{k.removeprefix('eval/').removeprefix('eval_')} {v:.3f}" for k, v in evals[:6])
        return f"eval ({where}): {shown}" if where else f"eval: {shown}"
    return None


def _progress_callback_base():
    from transformers.trainer_callback import ProgressCallback

    return ProgressCallback


class CompactLogCallback(_progress_callback_base()):
    """The Trainer's progress bar, with one `format_log_line` line per logging step written above it instead of the
    whole metrics dict (every metric still reaches `log_history`, `metrics.jsonl` and the reporting integrations).
    Install with ``trainer.remove_callback(ProgressCallback); trainer.add_callback(CompactLogCallback())``; with
    ``disable_tqdm`` the lines are printed without a bar."""

    def __init__(self, print_fn=print):
        super().__init__()
        self.print_fn = print_fn
        self._last = None  # (step, time) of the previous log line, for seconds per step when TRL gives no step_time

    def on_log(self, args, state, control, logs=None, **kwargs):
        import time

        if not state.is_world_process_zero or not logs:
            return
        now = time.perf_counter()
        per_step = None
        if self._last is not None and state.global_step > self._last[0]:
            per_step = (now - self._last[1]) / (state.global_step - self._last[0])
        line = format_log_line(logs, state.global_step, state.max_steps, per_step)
        if "train_runtime" not in logs:
            self._last = (state.global_step, now)
        if line is None:
            return
        if self.training_bar is not None:
            self.training_bar.write(line)
        else:
            self.print_fn(line)

    def on_train_begin(self, args, state, control, **kwargs):
        import time

        if not args.disable_tqdm:
            super().on_train_begin(args, state, control, **kwargs)
        else:
            self.current_step = 0
        self._last = (state.global_step, time.perf_counter())

    def on_step_end(self, args, state, control, **kwargs):
        if self.training_bar is not None:
            super().on_step_end(args, state, control, **kwargs)

    def on_train_end(self, args, state, control, **kwargs):
        if self.training_bar is not None:
            super().on_train_end(args, state, control, **kwargs)


def training_summary(log_history: Sequence[Mapping], fraction: float = 0.25,
                     keys: Sequence[str] = ("reward", "bridge/sft_loss", "bridge/cooperative_gain", "bridge/lambda")) -> dict:
    """Means of `keys` over the first and the last `fraction` of the logged training steps (at least one step each).

    Returns ``{"steps": n, "window": k, "first": {key: mean}, "last": {key: mean}, "last_steps": [from, to]}``; a
    single step's reward is 0 or 1 on a small batch, so the card and the plot report averages, not the last value.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    entries = [e for e in _check_log_history(log_history) if any(_number(e.get(k)) is not None for k in keys)]
    if not entries:
        return {"steps": 0, "window": 0, "first": {}, "last": {}, "last_steps": None}
    window = max(1, round(len(entries) * fraction))

    def means(part):
        out = {}
        for key in keys:
            values = [v for e in part if (v := _number(e.get(key))) is not None]
            if values:
                out[key] = sum(values) / len(values)
        return out

    last = entries[-window:]
    return {
        "steps": len(entries),
        "window": window,
        "first": means(entries[:window]),
        "last": means(last),
        "last_steps": [last[0].get("step"), last[-1].get("step")],
    }


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
    from ..models import OFFLINE_SMOLLM2_HUB_ID, is_offline_smollm2_alias

    if is_offline_smollm2_alias(base_model):
        return OFFLINE_SMOLLM2_HUB_ID
    if Path(base_model).exists() or base_model.startswith((".", "/", "~")):
        return None
    return base_model


def _is_hub_dataset(name: str) -> bool:
    return "/" in name and ":" not in name and not Path(name).exists() and not name.startswith((".", "/", "~"))


def _dataset_name(dataset: str | Mapping) -> str:
    return dataset["spec"] if isinstance(dataset, Mapping) else dataset


def _hub_dataset_id(dataset: str | Mapping) -> str | None:
    """The Hub repository id a dataset entry was loaded from (a source record's ``repo``), or None."""
    if isinstance(dataset, Mapping):
        return dataset.get("repo") if dataset.get("source") == "hub" else None
    return dataset if _is_hub_dataset(dataset) else None


def _dataset_line(dataset: str | Mapping) -> str:
    """``- `spec``` or, for a source record (`trl_bridge.train_cli.data_sources`), its role, split, rows and source."""
    if not isinstance(dataset, Mapping):
        return f"- `{dataset}`"
    role = f"{dataset['role']}: " if dataset.get("role") else ""
    details = ", ".join(part for part in (f"split `{dataset['split']}`" if dataset.get("split") else "",
                                          f"{dataset['rows']} rows" if dataset.get("rows") is not None else "") if part)
    return f"- {role}`{dataset['spec']}`{f' ({details})' if details else ''} — {dataset['description']}"


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


def _summary_lines(summary: Mapping | None, heldout: Mapping | None) -> list[str]:
    lines = []
    before = _number((heldout or {}).get("heldout_accuracy_before"))
    after = _number((heldout or {}).get("heldout_accuracy_after"))
    n = (heldout or {}).get("num_problems")
    what = f"{n} problems of the task's held-out split" if n else "the task's held-out split"
    if before is not None and after is not None:
        lines.append(f"- Held-out accuracy ({what}, greedy decoding): **{before:.2f} → {after:.2f}** (before → after training).")
    elif after is not None:
        lines.append(f"- Held-out accuracy after training ({what}, greedy decoding): **{after:.2f}**.")
    if summary and summary.get("steps"):
        window, first, last = summary["window"], summary.get("first", {}), summary.get("last", {})
        span = summary.get("last_steps") or [None, None]
        where = f" (steps {span[0]}–{span[1]})" if span[0] is not None and span[0] != span[1] else ""
        for key, label, fmt in (("reward", "Mean reward per batch", "{:.3f}"), ("bridge/sft_loss", "SFT loss", "{:.3f}"),
                                ("bridge/cooperative_gain", "Cooperative gain", "{:+.4f}")):
            if key in last:
                start = f"{fmt.format(first[key])} over the first {window} logged step(s) → " if key in first else ""
                lines.append(f"- {label}: {start}{fmt.format(last[key])} over the last {window} logged step(s){where}.")
        lam = (first.get("bridge/lambda"), last.get("bridge/lambda"))
        steps_line = f"- {summary['steps']} logged training steps"
        if None not in lam:
            steps_line += f"; λ {lam[0]:.2f} → {lam[1]:.2f}" if abs(lam[0] - lam[1]) > 1e-9 else f"; λ {lam[1]:.2f}"
        lines.append(steps_line + ".")
    return lines


def write_model_card(
    output_dir: str | os.PathLike,
    base_model: str,
    datasets: Sequence[str | Mapping] | str,
    hyperparameters: Mapping,
    final_metrics: Mapping,
    eval_results: Mapping | None = None,
    model_name: str | None = None,
    summary: Mapping | None = None,
    heldout: Mapping | None = None,
    task: str | None = None,
    usage_model: str | None = None,
) -> Path:
    """Write ``README.md`` (a Hugging Face model card) for a BRIDGE-trained model into `output_dir`.

    Metadata: ``library_name: transformers``, tags (``trl``, ``bridge``, ``grpo``, ...), ``base_model`` (the Hub id;
    the offline SmolLM2 alias maps to ``HuggingFaceTB/SmolLM2-135M-Instruct``), Hub datasets, and a model-index with
    the numeric `eval_results` (benchmarks: ``{benchmark: accuracy}`` or ``{benchmark: {metric: value}}``).
    `datasets` are names (``builtin:math``, ``openai/gsm8k``, a path) or source records with ``spec`` and
    ``description`` (and optionally ``role``, ``split``, ``rows``, ``source``, ``repo``: see
    `trl_bridge.tasks.data.dataset_source`); the metadata lists the Hub repository ids, the body each entry's source
    (repository, config, revision or local path).

    The body starts with a summary: the held-out accuracy before → after training (`heldout`:
    ``{"heldout_accuracy_before", "heldout_accuracy_after", "num_problems"}``) and the first/last means of
    `summary` (see `training_summary`); then the `task` (a sentence; default: the datasets), the data, the
    `hyperparameters` and `final_metrics` (the training metrics, e.g. means over the last part of training) as tables,
    the evaluation results, usage with `usage_model` (default: the absolute path of `output_dir`, so the snippet works
    from any directory; a Hub id after a push), and the citation. Returns the path of the card.
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    if not isinstance(base_model, str) or not base_model.strip():
        raise ValueError(f"base_model must be a non-empty string, got {base_model!r}")
    if isinstance(datasets, str):
        datasets = [datasets]
    if not isinstance(datasets, Sequence) or not all(
        isinstance(d, str) or (isinstance(d, Mapping) and isinstance(d.get("spec"), str)
                               and isinstance(d.get("description"), str)) for d in datasets
    ):
        raise ValueError(f"datasets must be a list of dataset names or source records with 'spec' and 'description', "
                         f"got {datasets!r}")
    for field, value in (("hyperparameters", hyperparameters), ("final_metrics", final_metrics)):
        if not isinstance(value, Mapping):
            raise ValueError(f"{field} must be a dict, got {type(value).__name__}")
    for field, value in (("eval_results", eval_results), ("summary", summary), ("heldout", heldout)):
        if value is not None and not isinstance(value, Mapping):
            raise ValueError(f"{field} must be a dict or None, got {type(value).__name__}")

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model_name = model_name or output_dir.resolve().name
    usage_model = usage_model or str(output_dir.resolve())
    evals = _eval_rows(eval_results)
    hub_base = _hub_base_model(base_model)
    numeric_evals = {k: v for k, v in evals.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        base_model=hub_base,
        datasets=list(dict.fromkeys(filter(None, map(_hub_dataset_id, datasets)))) or None,
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
    dataset_list = "\n".join(map(_dataset_line, datasets)) or "- (not recorded)"
    names = dict.fromkeys(map(_dataset_name, datasets))
    task = task or ("Reasoning with verifiable answers; data: " + ", ".join(f"`{d}`" for d in names) + "." if datasets
                    else "Not recorded.")
    summary_lines = _summary_lines(summary, heldout)
    summary_section = "\n".join(summary_lines) if summary_lines else "No training metrics or held-out results were recorded."
    window = (summary or {}).get("window")
    metrics_title = f"Training metrics (mean over the last {window} logged steps)" if window else "Training metrics"
    eval_section = _table(evals, ("benchmark/metric", "value")) if evals else "No benchmark evaluation was run."
    body = f"""
# {model_name}

This model is a fine-tuned version of {base_link}, trained with **BRIDGE** (cooperative SFT and RL) using
`trl-bridge`, which builds on [TRL](https://github.com/huggingface/trl)'s `GRPOTrainer`.

BRIDGE ([{PAPER_TITLE}]({PAPER_URL}), {PAPER_AUTHORS}; ICML 2026) trains with RL on verifiable rewards (GRPO) and
SFT on expert traces *at the same time* instead of SFT-then-RL: the base weights follow (1−λ)·SFT + λ·RL, and a LoRA
adapter is meta-learned (a bilevel problem) to maximise the *cooperative gain* of joint training over an RL-only
shadow copy of the model.

## Summary

{summary_section}

## Task

{task}

## Training data

{dataset_list}

## Training hyper-parameters

{_table(hyperparameters, ("hyper-parameter", "value"))}

## {metrics_title}

{_table(final_metrics, ("metric", "value")) if final_metrics else "No metrics were logged."}

## Evaluation

{eval_section}

## Usage

```python
from transformers import pipeline

generator = pipeline("text-generation", model={json.dumps(usage_model)})
question = "Tom has 7 apples. Then he buys 5 more apples. How many apples does Tom have now?"
prompt = question + "\\nPlease reason step by step, and put your final answer within \\\\boxed{{}}."
print(generator([{{"role": "user", "content": prompt}}], max_new_tokens=256)[0]["generated_text"][-1]["content"])
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
