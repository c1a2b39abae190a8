"""`trl-bridge compare --tune` / `--tuned`: every method tuned alike on the validation split by a rule fixed before
running, the winner recorded, then used on the test split (trl_bridge.experiments.tuning)."""

import json

import pytest
import yaml

import trl_bridge.experiments.compare as compare_mod
from trl_bridge.experiments.compare import METHODS
from trl_bridge.experiments.tuning import choose, load_tuned, load_tuning_plan

from ..helpers import TINY_RUN


def _flag(argv, name):
    """The value a `trl-bridge train` argv gives `name` (the last occurrence wins)."""
    return argv[len(argv) - 1 - argv[::-1].index(name) + 1]


def _plan(tmp_path, trials, rule="max_mean_validation_accuracy"):
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump({"rule": rule, "trials": trials}))
    return str(path)


@pytest.mark.parametrize("trials, rule, match", [
    ({"bridge": [{}, {}], "grpo": [{}]}, "max_mean_validation_accuracy", "same number"),
    ({"bridgee": [{}]}, "max_mean_validation_accuracy", "unknown methods"),
    ({"grpo": [{"seed": 3}]}, "max_mean_validation_accuracy", "compare sets itself"),
    ({"grpo": [{"cold_start_fraction": 0.3}]}, "max_mean_validation_accuracy", "only cold_start"),
    ({"grpo": [{}]}, "best_on_test", "rule"),
    ({"grpo": ["lr=1"]}, "max_mean_validation_accuracy", "mapping of overrides"),
])
def test_a_tuning_plan_that_is_not_alike_or_not_fixed_is_refused(tmp_path, trials, rule, match):
    with pytest.raises(ValueError, match=match):
        load_tuning_plan(_plan(tmp_path, trials, rule), METHODS)


def test_the_rule_picks_the_highest_mean_validation_accuracy_and_the_first_listed_on_a_tie(tmp_path):
    plan = load_tuning_plan(_plan(tmp_path, {"grpo": [{}, {"learning_rate": 1e-4}, {"learning_rate": 2e-4}],
                                             "sft": [{}, {"learning_rate": 1e-4}, {"learning_rate": 2e-4}]}), METHODS)
    acc = {"grpo#0": (0.5, 0.6), "grpo#1": (0.7, 0.6), "grpo#2": (0.6, 0.5), "sft#0": (0.4, 0.4), "sft#1": (0.4, 0.4),
           "sft#2": (0.2, 0.6)}
    records = [{"method": m, "seed": s, "done": True, "heldout_accuracy_after": a}
               for m, pair in acc.items() for s, a in zip((0, 1), pair)]
    chosen = choose(plan, records)
    assert chosen["methods"]["grpo"]["winner"] == 1 and chosen["methods"]["grpo"]["overrides"] == {"learning_rate": 1e-4}
    assert chosen["methods"]["sft"]["winner"] == 0  # three trials tie at 0.4: the first listed wins
    assert chosen["methods"]["grpo"]["trials"][1]["mean"] == pytest.approx(0.65)
    # an incomplete budget chooses nothing
    assert choose(plan, records[:-1])["methods"]["sft"]["winner"] is None


def test_tune_trains_every_trial_on_validation_and_tuned_runs_the_winners_on_the_test_split(tiny_model_dir, tmp_path,
                                                                                            capsys):
    config = tmp_path / "c.yaml"
    config.write_text(f"model_name_or_path: {tiny_model_dir}\nbridge_lambda: 0.5\nadapter_learning_rate: 1.0e-2\n")
    plan = _plan(tmp_path, {"naive_mixing": [{}, {"bridge_lambda": 0.8}],
                            "cold_start": [{}, {"cold_start_fraction": 0.25, "learning_rate": 2.0e-3}]})
    out = tmp_path / "tune"
    common = ["--config", str(config), "--seeds", "0", "--in_process", *TINY_RUN, "--max_steps", "4"]  # 4 steps win
    with pytest.raises(SystemExit):  # the test split is never used for tuning
        compare_mod.main([*common, "--tune", plan, "--output_dir", str(out)])
    argv = [*common, "--tune", plan, "--dataset_test_split", "validation", "--task_num_validation", "3",
            "--output_dir", str(out)]
    with pytest.raises(SystemExit):  # --methods picks among the plan's methods only
        compare_mod.main([*argv, "--methods", "grpo"])
    # --methods: only naive_mixing's trials train now; cold_start's winner stays open
    assert compare_mod.main([*argv, "--methods", "naive_mixing"]) == 0
    assert "4 runs, 0 reused, 2 left for later (not in --methods), 2 to train" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["naive_mixing#0", "naive_mixing#1"]
    partial = json.loads((out / "tuning.json").read_text())["methods"]
    assert partial["naive_mixing"]["winner"] is not None and partial["cold_start"]["winner"] is None
    grid = ["--output_dir", str(tmp_path / "grid"), "--tuned", str(out / "tuning.json")]
    compare_mod.parse_args([*common, *grid, "--methods", "naive_mixing"])  # its winner is known
    with pytest.raises(SystemExit):  # cold_start's is not
        compare_mod.parse_args([*common, *grid, "--methods", "cold_start"])
    args, _, _ = compare_mod.parse_args([*common, *grid, "--methods", "cold_start,naive_mixing", "--report_only"])
    assert set(args.tuned_overrides) == {"naive_mixing"}  # reported as it stands: cold_start's runs are missing
    before = (out / "runs" / "naive_mixing#1" / "seed0" / "done.json").stat().st_mtime_ns
    assert compare_mod.main(argv) == 0  # the whole plan: naive_mixing's trials are reused, cold_start's train
    assert (out / "runs" / "naive_mixing#1" / "seed0" / "done.json").stat().st_mtime_ns == before
    spec = json.loads((out / "runs" / "naive_mixing#1" / "seed0" / "spec.json").read_text())["argv"]
    assert _flag(spec, "--bridge_lambda") == "0.8" and "--adapter_learning_rate" in spec
    sft_stage = json.loads((out / "runs" / "cold_start#1" / "seed0" / "sft" / "spec.json").read_text())["argv"]
    assert _flag(sft_stage, "--max_steps") == "1"  # a quarter of 4 steps of SFT
    assert _flag(sft_stage, "--learning_rate") == "0.002"
    tuned = json.loads((out / "tuning.json").read_text())
    assert tuned["rule"] == "max_mean_validation_accuracy" and tuned["budget"] == 2
    for method in ("naive_mixing", "cold_start"):
        entry = tuned["methods"][method]
        means = [row["mean"] for row in entry["trials"]]
        assert entry["winner"] == max(range(2), key=lambda i: (means[i], -i))
    assert "| naive_mixing | 1 |" in (out / "tuning.md").read_text()

    # --tuned: each method runs with its winner's overrides, under its own name, on the config's test split
    args, extra, base_yaml = compare_mod.parse_args([*common, "--methods", "naive_mixing,cold_start", "--tuned",
                                                     str(out / "tuning.json"), "--output_dir", str(tmp_path / "grid")])
    runs = {r["method"]: r for r in compare_mod.build_runs(args, extra, base_yaml)}
    winner = tuned["methods"]["naive_mixing"]["overrides"]
    naive_argv = runs["naive_mixing"]["stages"][0]["argv"]
    for key, value in winner.items():
        assert _flag(naive_argv, f"--{key}") == str(value).lower()
    assert "--dataset_test_split" not in naive_argv


def test_tuned_refuses_a_tuning_of_another_config_or_an_incomplete_one(tmp_path):
    tuned = tmp_path / "tuning.json"
    tuned.write_text(json.dumps({"settings": {"config_yaml": {"learning_rate": 1e-4}},
                                 "methods": {"grpo": {"winner": 0, "overrides": {}}}}))
    with pytest.raises(ValueError, match="another config.*learning_rate"):
        load_tuned(str(tuned), {"learning_rate": 2e-4})
    tuned.write_text(json.dumps({"settings": {"config_yaml": {}}, "methods": {"grpo": {"winner": None}}}))
    with pytest.raises(ValueError, match="no winner yet"):
        load_tuned(str(tuned), {})
    with pytest.raises(ValueError, match="no winner yet"):
        load_tuned(str(tuned), {}, ["grpo", "sft"])
    assert load_tuned(str(tuned), {}, ["sft"]) == {}  # grpo is not asked for; sft is outside the tuning
