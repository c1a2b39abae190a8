"""Tuning every method alike, on the validation split, by a rule fixed before running (`trl-bridge compare --tune`).

A tuning plan (YAML) lists, for each method, the same number of trials (the budget), each a set of `trl-bridge train`
overrides over that method's own knobs (and `cold_start_fraction` for `cold_start`):

    rule: max_mean_validation_accuracy   # the only rule: highest mean held-out accuracy on the validation split over
                                         # the tuning seeds; a tie goes to the trial listed first
    trials:
      bridge:     [{}, {adapter_learning_rate: 1.0e-3}, {learning_rate: 1.0e-4}]
      chord:      [{}, {chord_mu_peak: 0.5}, {learning_rate: 1.0e-4}]
      cold_start: [{}, {cold_start_fraction: 0.25}, {learning_rate: 1.0e-4}]

    trl-bridge compare --config C.yaml --tune PLAN.yaml --seeds 0 --dataset_test_split validation --output_dir T
        trains one run per (method, trial, seed) — rows `method#i` — and writes T/tuning.json and T/tuning.md: each
        trial's validation accuracies and mean, and each method's winner under the rule;
    trl-bridge compare --config C.yaml --tuned T/tuning.json --methods ... --seeds 0,...,5 --output_dir G
        runs each method with its winner's overrides on the config's test split (the results record them).
"""

from __future__ import annotations

import json
import os
import statistics

import yaml

RULES = ("max_mean_validation_accuracy",)
#: set by compare itself for each run, so a trial cannot change them
RESERVED = ("seed", "output_dir", "max_steps", "reward_noise", "heldout_eval_steps", "dataset_test_split")


def load_tuning_plan(path: str, methods: dict) -> dict:
    """The plan, checked: a known rule, known methods, the same number (≥ 1) of trials for each, trials that are
    mappings of overrides (none reserved, `cold_start_fraction` only for `cold_start`)."""
    try:
        with open(path) as f:
            plan = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"--tune: cannot read {path}: {err}") from err
    if not isinstance(plan, dict) or not isinstance(plan.get("trials"), dict) or not plan["trials"]:
        raise ValueError(f"--tune: {path} must be a mapping with `rule` and `trials: {{method: [overrides, ...]}}`")
    if plan.get("rule") not in RULES:
        raise ValueError(f"--tune: {path}: `rule` must be one of {RULES} (written down before running), "
                         f"got {plan.get('rule')!r}")
    unknown = [m for m in plan["trials"] if m not in methods]
    if unknown:
        raise ValueError(f"--tune: {path}: unknown methods {unknown}; choose from {','.join(methods)}")
    budgets = {m: len(t) if isinstance(t, list) else -1 for m, t in plan["trials"].items()}
    if len(set(budgets.values())) != 1 or min(budgets.values()) < 1:
        raise ValueError(f"--tune: {path}: every method gets the same number (≥ 1) of trials, got {budgets}")
    for method, trials in plan["trials"].items():
        for i, trial in enumerate(trials):
            if not isinstance(trial, dict):
                raise ValueError(f"--tune: {path}: trials.{method}[{i}] must be a mapping of overrides, got {trial!r}")
            bad = [k for k in trial if k in RESERVED or (k == "cold_start_fraction" and method != "cold_start")]
            if bad:
                raise ValueError(f"--tune: {path}: trials.{method}[{i}] sets {bad}, which compare sets itself (or, for "
                                 "cold_start_fraction, only cold_start has)")
    plan["budget"] = next(iter(budgets.values()))
    return plan


def trial_rows(plan: dict) -> dict[str, dict]:
    """`method#i` -> the overrides of trial i of `method`."""
    return {f"{m}#{i}": dict(t) for m, trials in plan["trials"].items() for i, t in enumerate(trials)}


def choose(plan: dict, records: list[dict]) -> dict:
    """Each method's trials with their validation accuracies, and the winner under the plan's rule."""
    by_row: dict[str, list] = {}
    for r in records:
        if r.get("done") and r.get("heldout_accuracy_after") is not None:
            by_row.setdefault(r["method"], []).append((r["seed"], r["heldout_accuracy_after"]))
    methods = {}
    for method, trials in plan["trials"].items():
        rows = []
        for i, overrides in enumerate(trials):
            scores = sorted(by_row.get(f"{method}#{i}", []))
            rows.append({"trial": i, "overrides": overrides, "validation_accuracy": dict(scores),
                         "mean": statistics.fmean(a for _, a in scores) if scores else None})
        complete = all(row["mean"] is not None for row in rows) and len({len(row["validation_accuracy"]) for row in rows}) == 1
        winner = max(rows, key=lambda row: (row["mean"], -row["trial"])) if complete else None
        methods[method] = {"trials": rows, "winner": None if winner is None else winner["trial"],
                           "overrides": None if winner is None else winner["overrides"]}
    return {"rule": plan["rule"], "budget": plan["budget"], "methods": methods}


def write_tuning(output_dir: str, plan: dict, records: list[dict], settings: dict) -> dict:
    result = {**choose(plan, records), "settings": settings}
    with open(os.path.join(output_dir, "tuning.json"), "w") as f:
        json.dump(result, f, indent=2)
    lines = [f"# Tuning on the validation split (rule: {plan['rule']}; {plan['budget']} trials per method)", "",
             "| method | trial | overrides | validation accuracy per seed | mean | chosen |", "|---|---|---|---|---|---|"]
    for method, entry in result["methods"].items():
        for row in entry["trials"]:
            per_seed = ", ".join(f"{a:.2f}" for _, a in sorted(row["validation_accuracy"].items())) or "–"
            mean = "–" if row["mean"] is None else f"{row['mean']:.3f}"
            lines.append(f"| {method} | {row['trial']} | `{json.dumps(row['overrides'])}` | {per_seed} | {mean} | "
                         f"{'✓' if entry['winner'] == row['trial'] else ''} |")
    lines += ["", "A method without ✓ has trials still missing: no winner is chosen from an incomplete budget."]
    with open(os.path.join(output_dir, "tuning.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return result


def load_tuned(path: str, config_yaml: dict, methods: list[str] | None = None) -> dict[str, dict]:
    """{method: the winner's overrides} from a tuning.json made on this config (its test split aside). Each of `methods`
    that the tuning covers must have a winner (a method outside the plan runs at the config's settings)."""
    try:
        with open(path) as f:
            tuned = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--tuned: cannot read {path}: {err}") from err
    made_on = {k: v for k, v in (tuned.get("settings", {}).get("config_yaml") or {}).items() if k != "dataset_test_split"}
    here = {k: v for k, v in config_yaml.items() if k != "dataset_test_split"}
    if made_on != here:
        differ = sorted(k for k in made_on.keys() | here.keys() if made_on.get(k) != here.get(k))
        raise ValueError(f"--tuned: {path} was tuned on another config (fields {differ} differ); tune on this one")
    missing = [m for m, e in tuned.get("methods", {}).items()
               if e.get("winner") is None and (methods is None or m in methods)]
    if missing:
        raise ValueError(f"--tuned: {path}: no winner yet for {missing} (their trials are incomplete)")
    return {m: e["overrides"] for m, e in tuned["methods"].items() if e.get("winner") is not None}
