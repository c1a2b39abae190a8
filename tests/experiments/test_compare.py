"""`trl-bridge compare`: every method on one tiny config, results and plots, reuse of completed runs, parallel runs,
and the statistics in the table."""

import argparse
import json
import re
import threading

import pytest

import trl_bridge.experiments.compare as compare_mod
from trl_bridge.cli import main as cli_main
from trl_bridge.experiments.compare import METHODS, aggregate

from ..helpers import TINY_RUN

PNG = b"\x89PNG\r\n\x1a\n"


def _config(tmp_path, model_dir):
    config = tmp_path / "c.yaml"
    config.write_text(f"model_name_or_path: {model_dir}\nbridge_lambda: 0.5\nbridge_lambda_end: 0.6\n"
                      "bridge_lambda_warmup_steps: 2\nadapter_learning_rate: 1.0e-2\n")
    return config


def _metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_compare_runs_every_method_and_writes_results_and_plots(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--config", str(_config(tmp_path, tiny_model_dir)), "--methods", ",".join(METHODS),
            "--seeds", "3", "--max_steps", "2", "--heldout_eval_steps", "1", "--reward_noise", "0.3",
            "--target_accuracy", "0.0", "--in_process", "--output_dir", str(out), *TINY_RUN]
    assert cli_main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == set(METHODS) and not results["failed"]
    for record in results["runs"]:
        assert record["done"] and record["seed"] == 3 and record["optimizer_steps"] == 2, record["method"]
        assert [s for s, _ in record["reward_curve"]] == [1, 2], record["method"]
        assert [s for s, _ in record["heldout_curve"]] == [0, 1, 2], record["method"]  # step 0, every step
        assert record["heldout_accuracy_after"] is not None and record["peak_rss_mb"] > 0 and record["seconds"] > 0
    runs = {r["method"]: r for r in results["runs"]}
    summary = results["methods"]
    assert summary["bridge"]["diff_to_reference"] is None
    for method in set(METHODS) - {"bridge"}:
        diff = summary[method]["diff_to_reference"]
        assert diff["n"] == 1 and diff["mean"] == pytest.approx(
            runs[method]["heldout_accuracy_after"] - runs["bridge"]["heldout_accuracy_after"])
        assert summary[method]["steps_to_target"] == [0]  # target 0.0 is reached at the first evaluation

    def metrics(method, stage=""):
        return _metrics(out / "runs" / method / "seed3" / stage / "metrics.jsonl")

    def logged(method, key, stage=""):
        return [m[key] for m in metrics(method, stage) if key in m]

    # each method is the configuration it claims to be
    assert logged("grpo", "bridge/lambda") == [1.0, 1.0] and logged("sft", "bridge/lambda") == [0.0, 0.0]
    assert logged("alternating", "bridge/lambda") == [1.0, 0.0]  # an RL step, then an SFT step
    assert logged("bridge", "bridge/lambda") == pytest.approx([0.5, 0.55])  # the config's schedule
    assert logged("naive_mixing", "bridge/lambda") == pytest.approx([0.5, 0.55])
    assert logged("chord", "bridge/lambda") == pytest.approx([0.1, 0.525])  # λ = 1 − μ: μ from 0.9 halfway to 0.05
    assert logged("luffy", "bridge/lambda") == [1.0, 1.0]
    for method in ("bridge", "bridge_truncated_is"):
        for key in ("bridge/rl_loss_shadow", "bridge/shadow_divergence", "bridge/cooperative_gain"):
            assert len(logged(method, key)) == 2, (method, key)
        assert set(runs[method]["diagnostics"]) >= {"bridge/shadow_divergence", "bridge/cooperative_gain"}
    for method in ("grpo", "sft", "naive_mixing", "alternating", "bridge_no_meta", "chord", "luffy"):
        assert not logged(method, "bridge/rl_loss_shadow"), method  # no shadow pass
        assert runs[method]["diagnostics"] == {}, method  # so no meta-term diagnostics to plot
    def argv_of(method, stage=""):
        return json.loads((out / "runs" / method / "seed3" / stage / "spec.json").read_text())

    def flag(argv, name):  # the last value given wins (method overrides come after the shared flags)
        return argv[len(argv) - 1 - argv[::-1].index(name) + 1]

    for method in ("grpo", "sft", "naive_mixing", "alternating", "chord", "luffy"):  # no adapter (lr 0: w stays 0)
        assert flag(argv_of(method)["argv"], "--adapter_learning_rate") == "0.0", method
    assert "--adapter_learning_rate" not in argv_of("bridge_no_meta")["argv"]  # keeps the adapter
    assert "bridge_lambda_end" not in argv_of("alternating")["config"]  # removed: alternation replaces the schedule
    assert flag(argv_of("bridge_truncated_is")["argv"], "--shadow_off_policy") == "truncated_is"
    # cold start: SFT for one step, then GRPO for one step from the SFT stage's export
    assert logged("cold_start", "bridge/lambda", "sft") == [0.0] and logged("cold_start", "bridge/lambda", "rl") == [1.0]
    assert flag(argv_of("cold_start", "rl")["argv"], "--model_name_or_path") == str(out / "runs" / "cold_start" / "seed3" / "sft")
    # noisy rewards: the curves are the clean reward, logged next to the flipped one
    bridge_metrics = [m for m in metrics("bridge") if "reward" in m]
    clean = [m["rewards/math_correctness_reward/clean_mean"] for m in bridge_metrics]
    assert [v for _, v in runs["bridge"]["reward_curve"]] == pytest.approx(clean)
    assert "rewards/noisy_math_correctness_reward/mean" in bridge_metrics[0]
    # the table and the plots
    table = (out / "results.md").read_text()
    for method in METHODS:
        assert f"| {method} |" in table
    assert "p = 0.3" in table and "(n = 1)" in table and "Command: `trl-bridge compare --config" in table
    for name in ("reward_curves.png", "heldout_curves.png", "diagnostics.png"):
        assert (out / name).read_bytes()[:8] == PNG, name
    assert "| bridge |" in capsys.readouterr().out


def test_completed_runs_are_reused_and_changed_settings_refused(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """Two runs in parallel processes (--jobs 2), with their progress in the terminal; a second invocation trains
    nothing; changed settings are refused."""
    out = tmp_path / "cmp"
    argv = ["--config", str(_config(tmp_path, tiny_model_dir)), "--methods", "grpo,sft", "--seeds", "0",
            "--max_steps", "2", "--jobs", "2", "--progress_interval", "0.5", "--output_dir", str(out), *TINY_RUN]
    assert compare_mod.main(argv) == 0
    printed = capsys.readouterr().out
    # while they train: the overall line and one line per running run, read from its train.log
    assert re.search(r"^\[trl-bridge compare\] runs 0/2 done, 2 running, 0 waiting \| elapsed \S+ \| remaining ",
                     printed, re.M)
    for method in ("grpo", "sft"):
        assert re.search(rf"^\[trl-bridge compare\]   {method} seed 0: step \d/2", printed, re.M), method
        # as each finishes: its last step and s/step, and the overall line
        assert re.search(rf"^\[trl-bridge compare\] {method} seed 0: done in \S+ \(step 2/2, [\d.]+ s/step\) \| runs "
                         r"[12]/2 done", printed, re.M), method
    assert re.search(r"\| runs 2/2 done, 0 running, 0 waiting \| elapsed \S+ \| remaining ~0s$", printed, re.M)
    assert not any(t.name == "trl-bridge-progress" for t in threading.enumerate())  # the thread ended with the command
    for name in ("results.md", "results.json"):  # progress goes to the terminal only
        assert "s/step" not in (out / name).read_text() and "remaining" not in (out / name).read_text(), name
    first = json.loads((out / "results.json").read_text())
    assert all(r["done"] for r in first["runs"])
    assert all(r["peak_rss_mb"] > 100 for r in first["runs"])  # each process's own peak (torch alone is > 100 MB)
    done_before = {m: (out / "runs" / m / "seed0" / "done.json").read_text() for m in ("grpo", "sft")}

    def must_not_train(*a, **k):
        raise AssertionError("a completed run was trained again")

    monkeypatch.setattr(compare_mod, "run_stage", must_not_train)
    monkeypatch.setattr(compare_mod.subprocess, "run", must_not_train)
    assert compare_mod.main(argv) == 0
    assert "2 reused, 0 to train" in capsys.readouterr().out
    second = json.loads((out / "results.json").read_text())
    assert second["methods"] == first["methods"]
    # changed settings: refused before anything trains, and nothing is deleted
    assert compare_mod.main([*argv, "--learning_rate", "5e-3"]) == 2
    assert "different settings" in capsys.readouterr().err
    assert {m: (out / "runs" / m / "seed0" / "done.json").read_text() for m in ("grpo", "sft")} == done_before


def test_stopped_grid_trains_only_the_missing_runs(tiny_model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cmp"
    base = ["--config", str(_config(tmp_path, tiny_model_dir)), "--seeds", "0", "--max_steps", "2", "--in_process",
            "--output_dir", str(out), *TINY_RUN]
    assert compare_mod.main([*base, "--methods", "sft"]) == 0
    trained = []
    real = compare_mod.run_stage
    monkeypatch.setattr(compare_mod, "run_stage", lambda stage, in_process=False: trained.append(stage["dir"]) or real(stage, in_process))
    assert compare_mod.main([*base, "--methods", "sft,naive_mixing"]) == 0
    assert trained == [str(out / "runs" / "naive_mixing" / "seed0")]
    # in process: no progress thread (the run prints its own steps), a line as it finishes; the reused run counts
    assert re.search(r"^\[trl-bridge compare\] naive_mixing seed 0: done in \S+ \| runs 2/2 done \(1 reused\), "
                     r"0 running, 0 waiting", capsys.readouterr().out, re.M)
    assert set(json.loads((out / "results.json").read_text())["methods"]) == {"sft", "naive_mixing"}


@pytest.mark.parametrize("flags, message", [
    (["--methods", "bridge,ppo"], "--methods"),
    (["--seeds", "0,x"], "--seeds"),
    (["--reward_noise", "1.5"], "--reward_noise"),
    (["--jobs", "0"], "--jobs"),
    (["--max_steps", "1"], "--max_steps"),
    (["--seed", "4"], "--seed"),
    (["--methods", "grpo,sft", "--reference", "bridge"], "--reference"),
])
def test_bad_arguments_are_errors_naming_the_option(tmp_path, capsys, flags, message):
    config = tmp_path / "c.yaml"
    config.write_text("model_name_or_path: m\nmax_steps: 5\n")
    with pytest.raises(SystemExit) as exc:
        compare_mod.main(["--config", str(config), "--output_dir", str(tmp_path / "o"), *flags])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_invalid_train_flag_fails_before_any_run(tmp_path, capsys, monkeypatch):
    config = tmp_path / "c.yaml"
    config.write_text("model_name_or_path: m\nmax_steps: 5\n")
    monkeypatch.setattr(compare_mod, "run_stage", lambda *a, **k: pytest.fail("trained despite a bad flag"))
    assert compare_mod.main(["--config", str(config), "--methods", "bridge", "--in_process", "--output_dir",
                             str(tmp_path / "o"), "--bridge_lambda", "2.0"]) == 2
    assert "bridge_lambda" in capsys.readouterr().err


def test_aggregate_paired_difference_interval_and_steps_to_target():
    def rec(method, seed, acc, curve):
        return {"method": method, "seed": seed, "done": True, "heldout_accuracy_after": acc,
                "heldout_accuracy_before": 0.1, "reward_curve": [(1, 0.0), (2, 1.0), (3, 0.5), (4, 0.5)],
                "heldout_curve": curve, "seconds": 10.0, "optimizer_steps": 4, "peak_rss_mb": 1.0, "peak_cuda_mb": None}

    records = [rec("bridge", s, a, [(0, 0.1), (2, 0.6), (4, a)]) for s, a in ((0, 0.6), (1, 0.7), (2, 0.8))]
    records += [rec("grpo", s, a, [(0, 0.1), (2, 0.3), (4, a)]) for s, a in ((0, 0.5), (1, 0.5), (2, 0.8))]
    s = aggregate(records, target=0.55)
    assert s["bridge"]["heldout_accuracy_after_mean"] == pytest.approx(0.7)
    assert s["bridge"]["heldout_accuracy_after_std"] == pytest.approx(0.1)
    d = s["grpo"]["diff_to_reference"]  # differences -0.1, -0.2, 0.0: mean -0.1, sd 0.1, t(2) = 4.303
    assert d["mean"] == pytest.approx(-0.1) and d["n"] == 3
    assert d["ci95"] == pytest.approx([-0.1 - 4.303 * 0.1 / 3**0.5, -0.1 + 4.303 * 0.1 / 3**0.5], abs=1e-4)
    assert d["seeds"] == [0, 1, 2]
    assert s["bridge"]["steps_to_target"] == [2, 2, 2] and s["grpo"]["steps_to_target"] == [None, None, 4]
    assert s["grpo"]["steps_to_target_mean"] == 4
    assert s["bridge"]["heldout_max_drop_mean"] == pytest.approx(0.0)
    assert s["grpo"]["heldout_max_drop_mean"] == pytest.approx(0.0)
    assert s["bridge"]["reward_last_half_mean"] == pytest.approx(0.5) and s["bridge"]["reward_last_half_std"] == 0.0
    # results.md: every seed's value (seed 3 not completed) and one plain sentence per comparison
    records += [rec("sft", k, a, [(0, 0.1), (4, a)]) for k, a in ((0, 0.3), (1, 0.5), (2, 0.55))]
    s = aggregate(records, target=0.55)
    args = argparse.Namespace(command="trl-bridge compare ...", config="c.yaml", max_steps=4, seeds=[0, 1, 2, 3],
                              reward_noise=0.0, reference="bridge", target_accuracy=0.55,
                              methods=["bridge", "grpo", "sft"])
    md = compare_mod.results_markdown(s, args, {})
    assert "| grpo | 0.100 | 0.600 ± 0.173 (seeds 0,1,2) | 0.50 / 0.50 / 0.80 / · | -0.100 [-0.348, +0.148] |" in md
    # grpo: t = −sqrt(3), df 2: p = 1 − sqrt(3/5) = 0.225; TOST's lower test t = −0.07·sqrt(3)/0.1 = −1.212, p = 0.825.
    # sft: −0.2, −0.3, −0.25: t = −5·sqrt(3), p = 1 − t/sqrt(t² + 2) = 0.0131. Holm: sft 2 × 0.0131 = 0.026, grpo 0.225
    assert ("- grpo: -0.100 [-0.348, +0.148] (higher on 0, lower on 2, equal on 1 of 3 seeds); **not separated** from "
            "bridge: no difference after correction (Holm-adjusted p = 0.225, unadjusted 0.225) and equivalence within "
            "±0.03 not shown (TOST ±0.03: p = 0.825).") in md
    assert ("- sft: -0.250 [-0.374, -0.126] (higher on 0, lower on 3, equal on 0 of 3 seeds); **significantly lower** "
            "than bridge (Holm-adjusted p = 0.026, unadjusted 0.013; α = 0.05); TOST ±0.03: p = 0.992.") in md
    assert "| sft | 0.100 | 0.450 ± 0.132 (seeds 0,1,2) | 0.30 / 0.50 / 0.55 / · | -0.250 [-0.374, -0.126] | 0.026 * |" in md
    assert "- bridge:" not in md


def test_vary_sweeps_one_setting_on_the_validation_split(tiny_model_dir, tmp_path):
    """`--vary KEY=V1,V2`: one more `bridge` run per value (the value reaches that run only), compared with the config's
    `bridge` paired by seed; its held-out numbers come from the validation split; done.json records the code."""
    out = tmp_path / "sweep"
    argv = ["--config", str(_config(tmp_path, tiny_model_dir)), "--seeds", "0", "--max_steps", "2", "--in_process",
            "--vary", "adapter_learning_rate=0.0", "--dataset_test_split", "validation", "--task_num_validation", "3",
            "--output_dir", str(out), *TINY_RUN]
    assert compare_mod.main(argv) == 0
    point = out / "runs" / "bridge@adapter_learning_rate=0.0" / "seed0"
    base = out / "runs" / "bridge" / "seed0"
    argv_point = json.loads((point / "spec.json").read_text())["argv"]
    assert argv_point[argv_point.index("--adapter_learning_rate") + 1] == "0.0"
    assert "--adapter_learning_rate" not in json.loads((base / "spec.json").read_text())["argv"][2:]
    assert argv_point[argv_point.index("--dataset_test_split") + 1] == "validation"
    for run in (base, point):  # held-out curve on the 3 validation problems (the test split has 4)
        assert {e["heldout/num_problems"] for e in _metrics(run / "metrics.jsonl") if "heldout/num_problems" in e} == {3}
    results = json.loads((out / "results.json").read_text())
    assert list(results["methods"]) == ["bridge", "bridge@adapter_learning_rate=0.0"]
    assert results["methods"]["bridge@adapter_learning_rate=0.0"]["diff_to_reference"]["n"] == 1
    assert "| bridge@adapter_learning_rate=0.0 |" in (out / "results.md").read_text()
    code = json.loads((base / "done.json").read_text())["code"]
    assert code["trl"] and code["torch"] and "git_commit" in code
    # the value took effect: the runs differ only there, and their merged models differ (β = 0 leaves w at zero)
    import safetensors.torch

    a = safetensors.torch.load_file(str(base / "model.safetensors"))
    b = safetensors.torch.load_file(str(point / "model.safetensors"))
    assert any(not (a[k] == b[k]).all() for k in a)


def test_vary_refuses_the_test_split_and_bad_forms(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("model_name_or_path: m\nmax_steps: 5\n")
    for flags, message in (
        (["--vary", "shadow_learning_rate=1e-5"], "validation split"),
        (["--vary", "shadow_learning_rate", "--dataset_test_split", "validation"], "KEY=V1,V2"),
        (["--vary", "seed=1,2", "--dataset_test_split", "validation"], "set by compare"),
    ):
        with pytest.raises(SystemExit) as exc:
            compare_mod.main(["--config", str(config), "--output_dir", str(tmp_path / "o"), *flags])
        assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_report_only_tabulates_a_grid_in_progress_without_training(tiny_model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cmp"
    base = ["--config", str(_config(tmp_path, tiny_model_dir)), "--max_steps", "2", "--in_process",
            "--output_dir", str(out), *TINY_RUN]
    assert compare_mod.main([*base, "--methods", "sft", "--seeds", "0"]) == 0
    monkeypatch.setattr(compare_mod, "run_stage", lambda *a, **k: pytest.fail("--report_only trained"))
    assert compare_mod.main([*base, "--methods", "sft,grpo", "--seeds", "0,1", "--report_only"]) == 0
    assert "1 of 4 runs completed" in capsys.readouterr().out
    table = (out / "results.md").read_text()
    assert "| sft | " in table and "(seeds 0)" in table and "| grpo |" not in table
    assert "Not completed yet (3 runs): sft/seed1, grpo/seed0, grpo/seed1." in table
    results = json.loads((out / "results.json").read_text())
    assert results["methods"]["sft"]["seeds"] == [0]
    # the run's per-problem held-out grades are collected into its record (4 test problems, before and after)
    record = next(r for r in results["runs"] if r["done"])
    per_problem = record["heldout_per_problem"]
    assert len(per_problem["before"]) == len(per_problem["after"]) == 4
    assert sum(per_problem["after"]) / 4 == record["heldout_accuracy_after"]
    assert results["statistics"]["compared"] == ["sft", "grpo"] and results["statistics"]["comparisons"] == {}  # no bridge run


def test_earlier_results_extend_a_grid_without_training_its_runs_again(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """A published grid (results.json only) is extended to more seeds: its runs are tabulated, not trained again, and
    named in results.md; a grid of other settings, or a file that is no results.json, is refused naming the file."""
    config = str(_config(tmp_path, tiny_model_dir))
    base = ["--config", config, "--methods", "sft", "--max_steps", "2", "--in_process", *TINY_RUN]
    assert compare_mod.main([*base, "--seeds", "0", "--output_dir", str(tmp_path / "first")]) == 0
    first = json.loads((tmp_path / "first" / "results.json").read_text())
    published = tmp_path / "published.json"  # the run folders are gone: only the results file is kept
    published.write_text(json.dumps(first))
    trained = []
    real = compare_mod.run_stage
    monkeypatch.setattr(compare_mod, "run_stage",
                        lambda stage, in_process=False: trained.append(stage["dir"]) or real(stage, in_process))
    out = tmp_path / "more"
    argv = [*base, "--seeds", "0,1", "--output_dir", str(out), "--earlier_results", str(published)]
    assert compare_mod.main(argv) == 0
    assert trained == [str(out / "runs" / "sft" / "seed1")]
    assert "2 runs, 1 reused (1 from --earlier_results), 1 to train" in capsys.readouterr().out
    result = json.loads((out / "results.json").read_text())
    assert result["methods"]["sft"]["seeds"] == [0, 1]
    seed0 = next(r for r in result["runs"] if r["seed"] == 0)
    assert seed0["source"] == str(published)
    assert seed0["heldout_accuracy_after"] == first["runs"][0]["heldout_accuracy_after"]
    assert seed0["reward_curve"] == first["runs"][0]["reward_curve"]
    seed1 = next(r for r in result["runs"] if r["seed"] == 1)
    assert "source" not in seed1 and seed1["code"]["trl"]  # the run trained here names its code (versions, commit)
    assert {"torch", "transformers", "peft", "git_commit", "git_dirty"} <= set(seed1["code"])
    table = (out / "results.md").read_text()
    assert f"Taken from `{published}`" in table and "sft/seed0." in table and "Code: 1 run at commit" in table
    assert result["settings"]["config_yaml"]["bridge_lambda"] == 0.5  # the config's content, for later extensions
    # any method can be the reference of the paired differences: here sft against itself is the only pairing
    assert compare_mod.main([*argv, "--reference", "sft", "--report_only"]) == 0
    assert "| Δ vs sft [95% CI] |" in (out / "results.md").read_text()

    # a run trained again where the earlier grid has it too: tabulated from here and checked against the earlier record
    monkeypatch.setattr(compare_mod, "run_stage", lambda *a, **k: pytest.fail("--report_only trained"))
    again = [*base, "--seeds", "0", "--output_dir", str(tmp_path / "first"), "--report_only", "--earlier_results"]
    assert compare_mod.main([*again, str(published)]) == 0
    rerun = json.loads((tmp_path / "first" / "results.json").read_text())["runs"][0]
    assert "source" not in rerun and rerun["reproduces"] == {"source": str(published), "identical": True, "differs": {}}
    assert (f"Trained here again and also in `{published}`, reproduced exactly (heldout accuracy before, heldout "
            "accuracy after, reward curve, heldout curve identical; the table uses the runs made here): sft/seed0."
            ) in (tmp_path / "first" / "results.md").read_text()
    other = json.loads(published.read_text())
    other["runs"][0]["heldout_accuracy_after"] += 0.5
    other["runs"][0]["reward_curve"][1][1] += 1.0
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert compare_mod.main([*again, str(tmp_path / "other.json")]) == 0
    rerun = json.loads((tmp_path / "first" / "results.json").read_text())["runs"][0]
    assert not rerun["reproduces"]["identical"] and set(rerun["reproduces"]["differs"]) == {
        "heldout_accuracy_after", "reward_curve"}
    assert rerun["heldout_accuracy_after"] == first["runs"][0]["heldout_accuracy_after"]  # the table keeps this run's
    table = (tmp_path / "first" / "results.md").read_text()
    assert "**not** reproduced" in table and "reward_curve at 1 of 2 points" in table

    monkeypatch.setattr(compare_mod, "run_stage", lambda *a, **k: pytest.fail("trained despite refused results"))
    for flags, what in ((["--max_steps", "3"], "max_steps"), (["--learning_rate", "1e-3"], "flags passed to every run"),
                        (["--reward_noise", "0.2"], "reward_noise")):
        argv = [*base, *flags, "--seeds", "0,1", "--output_dir", str(tmp_path / "other"), "--earlier_results",
                str(published)]
        assert compare_mod.main(argv) == 2
        err = capsys.readouterr().err
        assert f"--earlier_results {published}" in err and what in err, (flags, err)
    broken = tmp_path / "broken.json"
    broken.write_text('{"runs": []}')
    assert compare_mod.main([*base, "--seeds", "0", "--output_dir", str(tmp_path / "o2"), "--earlier_results",
                             str(broken)]) == 2
    assert f"--earlier_results {broken}: not a `trl-bridge compare` results.json" in capsys.readouterr().err


def test_a_run_stopped_by_a_signal_resumes_from_its_checkpoint(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """A grid stopped mid-run (SIGTERM: the step finishes, a checkpoint is written) continues that run from its
    checkpoint on the next invocation, with the same outcome as a run never stopped; done.json and results.md say so."""
    import os
    import signal

    from transformers import TrainerCallback

    from trl_bridge.trainer.bridge_trainer import BridgeTrainer
    from trl_bridge.trainer.checkpointing import TrainingInterrupted

    base = ["--config", str(_config(tmp_path, tiny_model_dir)), "--methods", "bridge", "--seeds", "0", "--in_process",
            *TINY_RUN, "--max_steps", "4", "--heldout_eval_steps", "2"]
    assert compare_mod.main([*base, "--output_dir", str(tmp_path / "never_stopped")]) == 0

    class SigtermInStep2(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 1:
                os.kill(os.getpid(), signal.SIGTERM)

    init = BridgeTrainer.__init__

    def init_with_stop(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.add_callback(SigtermInStep2())

    out = tmp_path / "stopped"
    run_dir = out / "runs" / "bridge" / "seed0"
    monkeypatch.setattr(BridgeTrainer, "__init__", init_with_stop)
    with pytest.raises(TrainingInterrupted):
        compare_mod.main([*base, "--output_dir", str(out)])
    assert (run_dir / "checkpoint-2").is_dir() and not (run_dir / "done.json").exists()
    assert json.loads((run_dir / "stopped_attempts.json").read_text())[0]["stopped_after_step"] == 2
    monkeypatch.setattr(BridgeTrainer, "__init__", init)
    capsys.readouterr()
    assert compare_mod.main([*base, "--output_dir", str(out)]) == 0
    assert "resuming from" in capsys.readouterr().out
    done = json.loads((run_dir / "done.json").read_text())
    reference = json.loads((tmp_path / "never_stopped" / "runs" / "bridge" / "seed0" / "done.json").read_text())
    assert done["spec"]["argv"][-1] == str(run_dir) and done["resumed"][0]["from"] == "checkpoint-2"
    assert done["heldout"] == reference["heldout"]
    assert done["seconds"] > done["resumed"][0]["after_seconds"]
    stopped, never = (json.loads((d / "results.json").read_text())["runs"][0] for d in (out, tmp_path / "never_stopped"))
    assert stopped["reward_curve"] == never["reward_curve"] and len(stopped["reward_curve"]) == 4
    assert stopped["heldout_curve"] == never["heldout_curve"] and [s for s, _ in stopped["heldout_curve"]] == [0, 2, 4]
    assert stopped["diagnostics"] == never["diagnostics"]
    assert not list(run_dir.glob("checkpoint-*")) and not (run_dir / "stopped_attempts.json").exists()
    assert "Stopped and resumed from their checkpoint" in (out / "results.md").read_text()
    # a checkpoint whose attempt was not recorded (e.g. written by an older version): resumed, said so, time unknown
    seed2 = out / "runs" / "bridge" / "seed2"
    argv2 = [*base[:base.index("--seeds")], "--seeds", "2", *base[base.index("--seeds") + 2:], "--output_dir", str(out)]
    monkeypatch.setattr(BridgeTrainer, "__init__", init_with_stop)
    with pytest.raises(TrainingInterrupted):
        compare_mod.main(argv2)
    monkeypatch.setattr(BridgeTrainer, "__init__", init)
    (seed2 / "stopped_attempts.json").unlink()
    assert compare_mod.main(argv2) == 0
    assert json.loads((seed2 / "done.json").read_text())["resumed"] == [{"from": "checkpoint-2", "after_seconds": None}]
    # an attempt killed before any checkpoint (a leftover file of the trainer, no checkpoint): the run starts anew
    seed1 = out / "runs" / "bridge" / "seed1"
    seed1.mkdir(parents=True)
    (seed1 / "trainer_state.json").write_text("{}")
    assert compare_mod.main([*base[:base.index("--seeds")], "--seeds", "1", *base[base.index("--seeds") + 2:],
                             "--output_dir", str(out)]) == 0
    assert json.loads((seed1 / "done.json").read_text())["resumed"] is None


def test_sigterm_to_the_grid_stops_its_runs_with_a_checkpoint_and_leaves_none_running(tiny_model_dir, tmp_path):
    """A SIGTERM sent to `trl-bridge compare` alone (as `kill` or a scheduler sends it) reaches the run in flight: it
    writes a checkpoint and stops, no other run starts, no training process outlives the grid, and the exit code says
    which signal stopped it. The same command then continues from the checkpoint."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "grid"
    argv = [sys.executable, "-m", "trl_bridge.cli", "compare", "--config", str(_config(tmp_path, tiny_model_dir)),
            "--methods", "bridge", "--seeds", "0,1", "--jobs", "1", "--output_dir", str(out), *TINY_RUN,
            "--max_steps", "400", "--heldout_eval_steps", "400", "--progress_interval", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    grid = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    log = out / "runs" / "bridge" / "seed0" / "train.log"
    deadline = time.monotonic() + 300
    while not (log.exists() and "step 2/400" in log.read_text(errors="replace")):
        assert grid.poll() is None and time.monotonic() < deadline, grid.stdout.read() if grid.poll() is not None else ""
        time.sleep(0.2)
    grid.send_signal(signal.SIGTERM)
    output, _ = grid.communicate(timeout=300)
    assert grid.returncode == 128 + signal.SIGTERM, output
    assert "SIGTERM received" in output and "stopped by SIGTERM" in output
    assert "seed 0: stopped after" in output and "FAILED" not in output

    def training_processes():
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmdline = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
            except OSError:
                continue
            if "_run" in cmdline and str(out) in cmdline:
                found.append(pid)
        return found

    assert training_processes() == []
    seed0 = out / "runs" / "bridge" / "seed0"
    stopped_after = json.loads((seed0 / "stopped_attempts.json").read_text())[0]["stopped_after_step"]
    assert (seed0 / f"checkpoint-{stopped_after}").is_dir() and not (seed0 / "done.json").exists()
    assert not (out / "runs" / "bridge" / "seed1" / "train.log").exists()  # no other run started


def test_reuse_runs_adopts_another_grids_runs_with_the_same_settings_only(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """--reuse_runs: a run completed in another grid with exactly these settings (its folders aside, numbers by
    value) is copied in, records only, and not trained again; a cold start is adopted with both its stages; a run
    whose settings differ trains."""
    base = ["--config", str(_config(tmp_path, tiny_model_dir)), "--seeds", "0", "--max_steps", "2", "--in_process",
            *TINY_RUN]
    first = tmp_path / "first"
    assert compare_mod.main([*base, "--methods", "sft,cold_start", "--output_dir", str(first),
                             "--learning_rate", "1e-3"]) == 0
    before = {r["method"]: r for r in json.loads((first / "results.json").read_text())["runs"]}
    trained = []
    real = compare_mod.run_stage
    monkeypatch.setattr(compare_mod, "run_stage",
                        lambda stage, in_process=False: trained.append(stage["dir"]) or real(stage, in_process))
    second = tmp_path / "second"
    assert compare_mod.main([*base, "--methods", "sft,cold_start,grpo", "--output_dir", str(second),
                             "--learning_rate", "0.001", "--reuse_runs", str(first / "runs")]) == 0
    assert trained == [str(second / "runs" / "grpo" / "seed0")]
    assert "sft/seed0: the same settings completed in" in capsys.readouterr().out
    after = {r["method"]: r for r in json.loads((second / "results.json").read_text())["runs"]}
    for method in ("sft", "cold_start"):
        for key in ("heldout_accuracy_after", "heldout_curve", "reward_curve", "heldout_per_problem", "code"):
            assert after[method][key] == before[method][key], (method, key)
        assert after[method]["reused_from"] == before[method]["dir"]
    done = json.loads((second / "runs" / "sft" / "seed0" / "done.json").read_text())
    assert done["reused_from"]["dir"] == str(first / "runs" / "sft" / "seed0")
    assert str(second) in " ".join(done["spec"]["argv"])  # this grid's spec: a later invocation reuses it plainly
    assert not list((second / "runs" / "sft" / "seed0").glob("*.safetensors"))  # records, not weights
    assert (f"copied from `{first / 'runs'}` (--reuse_runs; its commits are counted below): sft seed 0; "
            "cold_start seed 0.") in (second / "results.md").read_text()
    trained.clear()
    third = tmp_path / "third"  # another learning rate: not the same run
    assert compare_mod.main([*base, "--methods", "sft", "--output_dir", str(third), "--learning_rate", "2e-3",
                             "--reuse_runs", str(first / "runs")]) == 0
    assert trained == [str(third / "runs" / "sft" / "seed0")]
    with pytest.raises(SystemExit):
        compare_mod.main([*base, "--methods", "sft", "--output_dir", str(tmp_path / "fourth"), "--reuse_runs",
                          str(tmp_path / "missing")])
    assert "--reuse_runs" in capsys.readouterr().err and not (tmp_path / "fourth").exists()
