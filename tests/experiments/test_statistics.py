"""The statistics behind `trl-bridge compare`'s verdicts, each against a case computed by hand: the t distribution,
the paired t-test, Holm–Bonferroni, TOST equivalence, the clean→noisy interaction, the two-level bootstrap; the
comparison plan (pre-registration) and its refusals; per-problem held-out records from a tiny training run."""

import argparse
import json
import math

import pytest

import trl_bridge.experiments.compare as compare_mod
from trl_bridge.experiments import statistics as stats
from trl_bridge.experiments.compare import aggregate, table_statistics
from trl_bridge.train_cli import main as train_main

from ..helpers import TINY_RUN


def test_t_distribution_against_closed_forms():
    # df = 1 is the Cauchy distribution: P(T > t) = 1/2 − atan(t)/π; df = 2: P(T > t) = 1/2 − t / (2·sqrt(t² + 2))
    assert stats.t_sf(1.0, 1) == pytest.approx(0.25, abs=1e-12)
    assert stats.t_sf(10.0, 1) == pytest.approx(0.5 - math.atan(10) / math.pi, abs=1e-12)
    assert stats.t_sf(2.0, 2) == pytest.approx(0.5 - 2 / (2 * math.sqrt(6)), abs=1e-12)
    assert stats.t_sf(-2.0, 2) == pytest.approx(0.5 + 2 / (2 * math.sqrt(6)), abs=1e-12)
    # quantiles: the printed two-sided 95% table (3 decimals) and the one-sided 95% value for df = 5
    for df, q in {1: 12.706, 2: 4.303, 4: 2.776, 5: 2.571, 10: 2.228, 30: 2.042}.items():
        assert stats.t_quantile(0.975, df) == pytest.approx(q, abs=1e-3), df
    assert stats.t_quantile(0.95, 5) == pytest.approx(2.015, abs=1e-3)
    assert stats.t_quantile(0.5, 7) == pytest.approx(0.0, abs=1e-9)


def test_paired_t_by_hand():
    # differences −0.1, −0.2, 0.0: mean −0.1, sd 0.1, t = −sqrt(3), df 2: two-sided p = 1 − sqrt(3)/sqrt(5)
    t = stats.paired_t([-0.1, -0.2, 0.0])
    assert t["mean"] == pytest.approx(-0.1) and t["sd"] == pytest.approx(0.1) and t["n"] == 3
    assert t["t"] == pytest.approx(-math.sqrt(3))
    assert t["p"] == pytest.approx(1 - math.sqrt(3) / math.sqrt(5), abs=1e-9)
    assert t["ci"] == pytest.approx([-0.1 - 4.3027 * 0.1 / math.sqrt(3), -0.1 + 4.3027 * 0.1 / math.sqrt(3)], abs=1e-4)
    assert stats.paired_t([0.02, 0.02, 0.02])["p"] == 0.0  # no spread, not zero: t infinite
    assert stats.paired_t([0.0, 0.0])["p"] == 1.0
    assert stats.paired_t([0.1])["p"] is None  # one seed: no test


def test_holm_by_hand():
    # sorted 0.01, 0.03, 0.04 (m = 3): 3·0.01 = 0.03; max(0.03, 2·0.03) = 0.06; max(0.06, 1·0.04) = 0.06
    assert stats.holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": None}) == pytest.approx(
        {"a": 0.03, "b": 0.06, "c": 0.06, "d": None})
    # capped at 1, and monotone in the raw p-values
    assert stats.holm({"x": 0.5, "y": 0.6}) == {"x": 1.0, "y": 1.0}
    assert stats.holm({"a": 0.01, "b": 0.02, "c": 0.5}) == pytest.approx({"a": 0.03, "b": 0.04, "c": 0.5})
    assert stats.holm({}) == {}


def test_tost_by_hand_equivalent_and_not():
    # differences +0.01, −0.01, 0: mean 0, se 0.01/sqrt(3); margin 0.03: t = 3·sqrt(3) for each one-sided test, df 2
    eq = stats.tost([0.01, -0.01, 0.0], margin=0.03)
    t = 3 * math.sqrt(3)
    assert eq["p_lower"] == pytest.approx(0.5 - t / (2 * math.sqrt(t * t + 2)), abs=1e-9)
    assert eq["p_upper"] == pytest.approx(eq["p_lower"]) and eq["p"] == pytest.approx(0.017548, abs=1e-5)
    assert eq["equivalent"]
    # three times the spread: t = sqrt(3), p = 1/2 − sqrt(3)/(2·sqrt(5)) ≈ 0.113: not shown equivalent
    wide = stats.tost([0.03, -0.03, 0.0], margin=0.03)
    assert wide["p"] == pytest.approx(0.5 - math.sqrt(3) / (2 * math.sqrt(5)), abs=1e-9) and not wide["equivalent"]
    # a clear shift: the lower test rejects, the upper one does not
    shifted = stats.tost([0.025, 0.03, 0.035], margin=0.03)
    assert shifted["p_lower"] < 0.002 and shifted["p_upper"] == pytest.approx(0.5) and not shifted["equivalent"]
    with pytest.raises(ValueError, match="margin"):
        stats.tost([0.0, 0.1], margin=0)


def test_noise_interaction_by_hand():
    clean = {"bridge": {0: 0.7, 1: 0.8, 2: 0.6}, "grpo": {0: 0.5, 1: 0.4, 2: 0.3}, "naive": {0: 0.6, 1: 0.6, 2: 0.6}}
    noisy = {"bridge": {0: 0.7, 1: 0.7, 2: 0.6}, "grpo": {0: 0.1, 1: 0.2, 2: 0.3}, "naive": {0: 0.55, 1: 0.45, 2: 0.55}}
    out = stats.difference_in_differences(clean, noisy, "bridge", ["grpo", "naive"])
    assert out["drops"]["bridge"]["per_seed"] == pytest.approx([0.0, 0.1, 0.0])
    assert out["drops"]["grpo"]["per_seed"] == pytest.approx([0.4, 0.2, 0.0])
    grpo = out["interaction"]["grpo"]  # drops minus bridge's: 0.4, 0.1, 0.0
    assert grpo["per_seed"] == pytest.approx([0.4, 0.1, 0.0]) and grpo["mean"] == pytest.approx(1 / 6)
    assert grpo["sd"] == pytest.approx(math.sqrt(0.13 / 3))
    t = (1 / 6) / (math.sqrt(0.13 / 3) / math.sqrt(3))
    assert grpo["p"] == pytest.approx(1 - t / math.sqrt(t * t + 2), abs=1e-9)
    naive = out["interaction"]["naive"]  # drops 0.05, 0.15, 0.05 minus bridge's: 0.05 on every seed
    assert naive["per_seed"] == pytest.approx([0.05, 0.05, 0.05]) and naive["p"] < 1e-12  # no spread (but rounding)
    # Holm over the two: naive's (smallest) ×2; grpo's is the larger, ×1
    assert naive["p_holm"] == pytest.approx(2 * naive["p"]) and grpo["p_holm"] == pytest.approx(grpo["p"])


def test_two_level_bootstrap_is_seeded_and_exact_in_degenerate_cases():
    runs = {0: [1, 0, 1, 1], 1: [0, 0, 1, 1], 2: [1, 1, 1, 0]}
    same = stats.two_level_bootstrap(runs, runs, samples=500)
    assert same["mean"] == 0.0 and same["ci"] == [0.0, 0.0]  # identical runs: a zero-width interval at 0
    always = stats.two_level_bootstrap({k: [1] * 4 for k in runs}, {k: [0] * 4 for k in runs}, samples=500)
    assert always["ci"] == [1.0, 1.0]  # right on every problem of every seed against wrong on every one
    other = {0: [0, 0, 1, 1], 1: [1, 0, 1, 0], 2: [1, 0, 0, 0]}
    a = stats.two_level_bootstrap(runs, other, samples=500, seed=3)
    assert a == stats.two_level_bootstrap(runs, other, samples=500, seed=3)  # seeded
    assert a["ci"][0] < a["mean"] < a["ci"][1] and a["mean"] == pytest.approx(3 / 12)
    assert -1.0 <= a["ci"][0] and a["ci"][1] <= 1.0 and a["n_seeds"] == 3 and a["n_problems"] == 4
    with pytest.raises(ValueError, match="seed 1"):
        stats.two_level_bootstrap({1: [1, 0]}, {1: [1, 0, 1]})


def _records(accuracy: dict, per_problem: dict | None = None):
    return [{"method": m, "seed": k, "done": True, "heldout_accuracy_after": a, "heldout_accuracy_before": 0.1,
             "reward_curve": [(1, 0.5), (2, 0.5)], "heldout_curve": [(2, a)], "seconds": 1.0, "optimizer_steps": 2,
             "peak_rss_mb": 1.0, "peak_cuda_mb": None,
             "heldout_per_problem": None if per_problem is None else {"after": per_problem[m][k]}}
            for m, by in accuracy.items() for k, a in by.items()]


def _args(**kw):
    return argparse.Namespace(**{"command": "trl-bridge compare ...", "config": "c.yaml", "max_steps": 2,
                                 "reward_noise": 0.0, "reference": "bridge", "target_accuracy": 0.5, "plan": None,
                                 "plan_spec": None, "equivalence_margin": 0.03, **kw})


def test_table_says_significant_only_after_holm_and_as_good_as_only_with_tost():
    acc = {"bridge": {0: 0.70, 1: 0.80, 2: 0.60, 3: 0.70},
           "far": {0: 0.50, 1: 0.62, 2: 0.38, 3: 0.50},    # −0.20, −0.18, −0.22, −0.20: significant after Holm
           "close": {0: 0.70, 1: 0.80, 2: 0.60, 3: 0.72},  # 0, 0, 0, +0.02: equivalent within ±0.03
           "noisy": {0: 0.60, 1: 0.85, 2: 0.55, 3: 0.70}}  # −0.1, +0.05, −0.05, 0: neither
    args = _args(methods=list(acc), seeds=[0, 1, 2, 3])
    records = _records(acc)
    summary = aggregate(records, 0.5)
    tests = table_statistics(summary, records, args, config_yaml={"eval_samples": 50})
    c = tests["comparisons"]
    raw = {m: stats.paired_t(summary[m]["diff_to_reference"]["per_seed"])["p"] for m in ("far", "close", "noisy")}
    assert {m: c[m]["p_holm"] for m in c} == pytest.approx(stats.holm(raw))
    assert c["far"]["significant"] and not c["far"]["equivalent"]
    assert c["close"]["equivalent"] and not c["close"]["significant"]
    assert not c["noisy"]["significant"] and not c["noisy"]["equivalent"]
    assert tests["interval"] == "seeds only" and tests["binomial_se"]["se"] == pytest.approx(math.sqrt(0.7 * 0.3 / 50))
    md = compare_mod.results_markdown(summary, args, {}, records, tests)
    assert "- far: -0.200 [" in md and "**significantly lower** than bridge (Holm-adjusted p" in md
    assert "- close: +0.005 [" in md and "**as good as** bridge within ±0.03" in md
    assert "- noisy: -0.025 [" in md and "**not separated** from bridge" in md
    assert "the finite test set adds about sqrt(p(1−p)/50) per accuracy (±0.065 at bridge's 0.700" in md
    assert "Not pre-registered (no `--plan`)" in md

    # per-problem records for every run: the two-level bootstrap interval, stated in results.md
    per_problem = {m: {k: [1] * round(a * 50) + [0] * (50 - round(a * 50)) for k, a in by.items()}
                   for m, by in acc.items()}
    records = _records(acc, per_problem)
    tests = table_statistics(aggregate(records, 0.5), records, args)
    assert tests["interval"] == "seeds and problems"
    assert tests["comparisons"]["far"]["bootstrap"]["n_problems"] == 50
    md = compare_mod.results_markdown(aggregate(records, 0.5), args, {}, records, tests)
    assert "two-level bootstrap (4000 replicates, seed 0" in md and "seeds and problems resampled: [" in md
    assert "no per-problem records" not in md

    # one method's runs predate the per-problem records: its row alone lacks the bootstrap, and the page says which
    records = [r if r["method"] != "noisy" else {**r, "heldout_per_problem": None} for r in records]
    tests = table_statistics(aggregate(records, 0.5), records, args)
    assert tests["interval"] == "mixed" and tests["comparisons"]["noisy"]["bootstrap"] is None
    assert tests["comparisons"]["far"]["bootstrap"] is not None
    md = compare_mod.results_markdown(aggregate(records, 0.5), args, {}, records, tests)
    assert "noisy: some of their runs have no per-problem records to resample" in md
    assert "the runs have no per-problem records" not in md and "far: some of" not in md


def _plan(tmp_path, **changes):
    plan = {"methods": ["bridge", "sft"], "seeds": [0, 1], "reference": "bridge", "compared": ["sft"],
            "test": "paired_t", "correction": "holm", "alpha": 0.05, "equivalence_margin": 0.03, **changes}
    path = tmp_path / "plan.yaml"
    path.write_text(json.dumps(plan))  # JSON is YAML
    return path


@pytest.mark.parametrize("flags, changes, message", [
    (["--methods", "bridge,sft,grpo", "--seeds", "0,1"], {}, "methods (bridge,sft declared, bridge,sft,grpo here)"),
    (["--methods", "bridge,sft", "--seeds", "0,1,2"], {}, "seeds (0,1 declared, 0,1,2 here)"),
    (["--methods", "bridge,sft", "--seeds", "0,1", "--equivalence_margin", "0.05"], {},
     "equivalence_margin (0.03 declared, 0.05 here)"),
    (["--methods", "bridge,sft", "--seeds", "0,1"], {"max_steps": 40}, "max_steps (40 declared, 2 here)"),
    (["--methods", "bridge,sft", "--seeds", "0,1"], {"compared": ["bridge"]}, "compared must list methods"),
    (["--methods", "bridge,sft", "--seeds", "0,1"], {"margin": 0.03}, "unknown field(s) margin"),
    (["--methods", "bridge,sft", "--seeds", "0,1"], {"tuned": "tuning.json"}, "tuned (tuning.json declared, None here)"),
    (["--methods", "bridge,sft", "--seeds", "0,1"], {"test": "wilcoxon"}, "test must be one of paired_t"),
    (["--methods", "bridge,sft", "--seeds", "0,1"], {"equivalence_margin": "3%"}, "equivalence_margin must be"),
])
def test_a_grid_that_differs_from_its_plan_is_refused(tmp_path, capsys, flags, changes, message):
    config = tmp_path / "c.yaml"
    config.write_text("max_steps: 2\n")
    with pytest.raises(SystemExit) as exc:
        compare_mod.main(["--config", str(config), "--plan", str(_plan(tmp_path, **changes)), *flags,
                          "--output_dir", str(tmp_path / "o")])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_the_plan_sets_reference_margin_and_withholds_tests_until_complete(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("max_steps: 2\n")
    path = _plan(tmp_path, methods=["sft", "bridge"], reference="sft", compared=["bridge"], equivalence_margin=0.05)
    args, _, _ = compare_mod.parse_args(["--config", str(config), "--plan", str(path), "--methods", "bridge,sft",
                                         "--seeds", "1,0"])
    assert args.reference == "sft" and args.equivalence_margin == 0.05 and args.plan_spec["compared"] == ["bridge"]
    records = _records({"sft": {0: 0.5, 1: 0.6}, "bridge": {0: 0.7}})  # bridge/seed1 not completed
    tests = table_statistics(aggregate(records, 0.5, "sft"), records, args)
    assert tests["withheld"] == "1 of the plan's 4 runs are not completed (bridge/seed1)" and not tests["comparisons"]
    args.command, args.target_accuracy, args.reward_noise, args.max_steps = "trl-bridge compare", 0.5, 0.0, 2
    md = compare_mod.results_markdown(aggregate(records, 0.5, "sft"), args, {}, records, tests)
    assert "Holm–Bonferroni-adjusted over the plan's 1 comparisons (withheld until its runs are complete)" in md
    records = _records({"sft": {0: 0.5, 1: 0.6}, "bridge": {0: 0.7, 1: 0.7}})
    tests = table_statistics(aggregate(records, 0.5, "sft"), records, args)
    assert tests["withheld"] is None and set(tests["comparisons"]) == {"bridge"}
    assert tests["equivalence_margin"] == 0.05 and tests["plan"] == str(path)


def test_noise_baseline_must_be_the_same_grid_with_less_noise(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("max_steps: 2\n")
    clean = {"settings": {"command": f"trl-bridge compare --config {config}", "config_yaml": {"max_steps": 2},
                          "max_steps": 2, "reward_noise": 0.0, "heldout_eval_steps": 5, "cold_start_fraction": 0.5},
             "runs": _records({"bridge": {0: 0.7, 1: 0.8}, "sft": {0: 0.6, 1: 0.6}})}
    path = tmp_path / "clean.json"
    path.write_text(json.dumps(clean))
    argv = ["--config", str(config), "--methods", "bridge,sft", "--seeds", "0,1", "--noise_baseline", str(path)]
    args, extra, base = compare_mod.parse_args([*argv, "--reward_noise", "0.2"])
    noise = compare_mod.load_noise_baseline(args, extra, base)
    assert noise["clean"] == {"bridge": {0: 0.7, 1: 0.8}, "sft": {0: 0.6, 1: 0.6}} and noise["reward_noise"] == 0.0
    args.command = "trl-bridge compare ..."
    records = _records({"bridge": {0: 0.7, 1: 0.7}, "sft": {0: 0.4, 1: 0.5}})
    inter = table_statistics(aggregate(records, 0.5), records, args, noise)["noise_interaction"]
    assert inter["drops"]["sft"]["per_seed"] == pytest.approx([0.2, 0.1])
    assert inter["interaction"]["sft"]["per_seed"] == pytest.approx([0.2, 0.0])  # minus bridge's drops 0, 0.1
    md = compare_mod.results_markdown(aggregate(records, 0.5), args, {}, records,
                                      table_statistics(aggregate(records, 0.5), records, args, noise))
    assert "| sft | 2 | +0.150 [" in md and "reward noise 0 → 0.2" in md
    with pytest.raises(ValueError, match="max_steps"):
        compare_mod.load_noise_baseline(*compare_mod.parse_args([*argv, "--reward_noise", "0.2", "--max_steps", "3"]))
    clean["settings"]["reward_noise"] = 0.3
    path.write_text(json.dumps(clean))
    with pytest.raises(ValueError, match=r"its reward noise \(0.3\) must be below this grid's \(0.2\)"):
        compare_mod.load_noise_baseline(args, extra, base)
    with pytest.raises(SystemExit):
        compare_mod.parse_args(argv)  # a clean grid has no clean baseline


def test_train_writes_per_problem_heldout_records(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    assert train_main(["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(out), *TINY_RUN,
                       "--heldout_eval_steps", "1"]) == 0
    records = json.loads((out / "heldout_per_problem.json").read_text())
    accuracy = json.loads((out / "heldout_accuracy.json").read_text())
    assert len(records["before"]) == len(records["after"]) == 4 and set(records["before"] + records["after"]) <= {0, 1}
    assert sum(records["before"]) / 4 == accuracy["heldout_accuracy_before"]
    assert sum(records["after"]) / 4 == accuracy["heldout_accuracy_after"]
    assert list(records["steps"]) == ["0", "1", "2"]  # every evaluation of the held-out curve, by step
    curve = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = {m["step"]: m["heldout/accuracy"] for m in curve if "heldout/accuracy" in m}
    assert {int(s): sum(v) / len(v) for s, v in records["steps"].items()} == pytest.approx(logged)
    # compare collects them into its record (before from the first stage, after from the last)
    stage = {"dir": str(out)}
    per = compare_mod._per_problem([stage], [{"optimizer_steps": 2}])
    assert per["before"] == records["before"] and per["after"] == records["after"] and set(per["steps"]) == {"0", "1", "2"}
