"""`trl-bridge compare`: BRIDGE against its baselines on one config — same data, model, hyper-parameters and budget of
optimizer steps — over several seeds, optionally with noisy rewards.

    trl-bridge compare --config configs/compare_cpu.yaml --methods bridge,grpo,sft,cold_start,naive_mixing,bridge_no_meta \\
        --seeds 0,1,2 --output_dir outputs/compare/clean [--reward_noise 0.2] [--jobs 2] [any `trl-bridge train` flag]

Every method is the config plus the overrides in `METHODS` (printed by `--help`); flags not listed below go to every
run (`trl-bridge train --help` lists them), and a method's own overrides come after them. Each (method, seed) trains
in its own process (`--jobs` at a time; peak memory is that process's) under `<output_dir>/runs/<method>/seed<k>/`,
which keeps the run's exact settings (`config.yaml`, `spec.json`), its log, metrics.jsonl and merged model. A run
whose `done.json` matches its spec is reused, so a grid that was stopped continues where it was; one whose settings
changed is refused (use another `--output_dir`); nothing already written is deleted. `--reuse_runs DIR` copies in the
records of another grid's completed runs whose settings are exactly this grid's (`reuse.py`). `--earlier_results` takes the
completed runs of an earlier grid of the same settings from its results.json (e.g. a published grid extended to more
seeds): they are tabulated, not trained again, and results.md names where they came from; a run of that grid that
is also completed here is tabulated from here and checked against it (reproduced exactly, or which of its accuracies
and curves differ, in results.md and as `reproduces` in results.json).

Progress: while runs train, every `--progress_interval` seconds (default 30) one line gives the runs done / total
(reused ones count as done), the time elapsed and an estimate of the time remaining ('?' until known), and one line
per running run its method, seed, step n/N and seconds per step, read from its train.log; a line also follows each
finished run. Plain lines, the same in a terminal, a CI log or through `| tee`; they never go into the results files.

Statistics (`statistics.py`; `results.json` → `statistics`): each compared method against the reference by a paired
t-test over seeds, Holm–Bonferroni over the table's comparisons ("significant" only after it), TOST within
`--equivalence_margin` ("as good as" only when it shows equivalence, else "not separated"), a two-level (seeds,
problems) bootstrap interval when every run of a comparison has per-problem records (`heldout_per_problem.json`),
and with `--noise_baseline` the clean→noisy drop per method and its difference to the reference's. `--plan` declares
a table's methods, seeds, comparisons, test and margin before running; a grid that differs from it is refused.

Writes to `--output_dir`: `results.json` (every run and the per-method aggregates), `results.md` (table: held-out
accuracy mean ± std over seeds, the paired difference to BRIDGE with a 95% t confidence interval, its Holm-adjusted
p-value and TOST p-value, reward stability, steps to `--target_accuracy`, wall time, peak memory) and plots, mean
over seeds with a ±1 std band:
`reward_curves.png` (the rollouts' reward per step; the clean reward when `--reward_noise` flips them),
`heldout_curves.png` (held-out accuracy every `--heldout_eval_steps`) and `diagnostics.png` (BRIDGE's
`bridge/shadow_divergence`, `bridge/cooperative_to_sft_grad_ratio`, `bridge/cooperative_gain`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import yaml

from . import statistics as stats
from . import reuse, tuning
from .progress import DEFAULT_INTERVAL, CompareProgress, LogFollower, log_size, resume_marker, stage_marker
from .workers import Workers

# ----------------------------------------------------------------------------------------------------------------------
# Methods: each is the config plus these `trl-bridge train` overrides ("unset" keys are removed from the config).
# "No adapter" = adapter_learning_rate 0: LoRA B starts at zero and never moves, so the policy is exactly π(θ).
# ----------------------------------------------------------------------------------------------------------------------
NO_ADAPTER = {"adapter_learning_rate": 0.0, "bridge_meta_term": False}
METHODS: dict[str, tuple[str, dict, tuple[str, ...]]] = {
    "bridge": ("BRIDGE as configured: fused θ, RL-only shadow θ̂, adapter w on the cooperative gain", {}, ()),
    "grpo": ("RL-zero: GRPO on θ (λ = 1, no adapter, no shadow)",
             {"bridge_lambda": 1.0, "bridge_lambda_warmup_steps": 0, **NO_ADAPTER}, ("bridge_lambda_end",)),
    "sft": ("SFT of θ on the expert traces (λ = 0, no adapter, no shadow)",
            {"bridge_lambda": 0.0, "bridge_lambda_warmup_steps": 0, **NO_ADAPTER}, ("bridge_lambda_end",)),
    "cold_start": ("two-stage: `sft` for --cold_start_fraction of the steps, then `grpo` from that model", {}, ()),
    "naive_mixing": ("one model, one loss (1−λ)·L_SFT + λ·L_RL on θ (no adapter, no shadow), λ as configured",
                     dict(NO_ADAPTER), ()),
    "alternating": ("the paper's Algorithm 1 on θ: an RL step (λ = 1), then an SFT step (λ = 0), ... (no adapter)",
                    {"bridge_lambda_alternate": True, "bridge_lambda_warmup_steps": 0, **NO_ADAPTER},
                    ("bridge_lambda_end",)),
    "bridge_no_meta": ("BRIDGE minus the −λ∇w L_RL(θ̂,w) term: θ and w both on the mixed loss (no shadow pass)",
                       {"bridge_meta_term": False}, ()),
    "bridge_truncated_is": ("BRIDGE with the shadow's truncated importance weights (shadow_off_policy: truncated_is)",
                            {"shadow_off_policy": "truncated_is"}, ()),
    "bridge_lean": ("BRIDGE with the lean shadow (shadow_storage: lean: θ̂ trained by momentum-free factored Adafactor)",
                    {"shadow_storage": "lean"}, ()),
    "bridge_compressed": ("BRIDGE with the compressed shadow (shadow_storage: bf16_delta: θ̂ = θ + a stochastically "
                          "rounded bf16 delta, trained by momentum-free factored Adafactor)",
                          {"shadow_storage": "bf16_delta"}, ()),
    "bridge_shadow50": ("BRIDGE with the shadow pass on half of each generation batch's prompt groups "
                        "(shadow_fraction: 0.5, rescaled to be unbiased; an extension beyond the paper)",
                        {"shadow_fraction": 0.5}, ()),
    "chord": ("CHORD (arXiv 2508.11408) on θ: (1−μ)·L_RL + μ·L_SFT, μ warmed up to 0.9 then cosine-decayed to 0.05 over "
              "the run, expert tokens weighted by φ = p(1−p) (no adapter, no shadow)",
              {"chord_mu_peak": 0.9, "chord_mu_valley": 0.05, "chord_phi": True, "bridge_lambda_warmup_steps": 0,
               **NO_ADAPTER}, ("bridge_lambda_end",)),
    "luffy": ("LUFFY (arXiv 2504.14945) on θ: mixed-policy GRPO, each group's last rollout replaced by the prompt's "
              "expert trace, its tokens shaped by f(x) = x/(x+0.1), unclipped (λ = 1, no adapter, no shadow)",
              {"luffy": True, "bridge_lambda": 1.0, "bridge_lambda_warmup_steps": 0, **NO_ADAPTER},
              ("bridge_lambda_end",)),
}
DEFAULT_METHODS = "bridge,grpo,sft,cold_start,naive_mixing,bridge_no_meta"
DIAGNOSTICS = ("bridge/shadow_divergence", "bridge/cooperative_to_sft_grad_ratio", "bridge/cooperative_gain")


def _t975(df: int) -> float:
    """The two-sided 95% Student t quantile (exact; `statistics.t_quantile`)."""
    return stats.t_quantile(0.975, df)


# ----------------------------------------------------------------------------------------------------------------------
# Run specifications
# ----------------------------------------------------------------------------------------------------------------------
def _flags(overrides: dict) -> list[str]:
    return [x for k, v in overrides.items() for x in (f"--{k}", str(v).lower() if isinstance(v, bool) else str(v))]


def _stage(name, run_dir, base_yaml, unset, argv_tail):
    config = {k: v for k, v in base_yaml.items() if k not in unset}
    return {"name": name, "dir": run_dir, "config": config, "argv": ["--config", os.path.join(run_dir, "config.yaml"), *argv_tail]}


def build_runs(args, extra: list[str], base_yaml: dict) -> list[dict]:
    """One entry per (method, seed): its folder and stages (cold_start has two), each an exact `trl-bridge train` argv."""
    runs = []
    common = {"max_steps": args.max_steps, "save_strategy": "no", "reward_noise": args.reward_noise,
              "heldout_eval_steps": args.heldout_eval_steps}
    if "logging_steps" not in base_yaml:  # one log entry per step: the curves are read from them (GRPOConfig logs every 10)
        common["logging_steps"] = 1
    for method in args.methods:
        for seed in args.seeds:
            run_dir = os.path.join(args.output_dir, "runs", method, f"seed{seed}")
            tail = [*extra]
            base = method.split("@")[0].split("#")[0]
            # a tuning trial's overrides (`method#i`, --tune), or the tuned winner's (--tuned)
            chosen = {**getattr(args, "trial_overrides", {}).get(method, {}),
                      **getattr(args, "tuned_overrides", {}).get(base, {})}
            fraction = chosen.pop("cold_start_fraction", args.cold_start_fraction)
            if base == "cold_start":
                n_sft = max(1, min(args.max_steps - 1, round(fraction * args.max_steps)))
                _, sft, sft_unset = METHODS["sft"]
                _, grpo, grpo_unset = METHODS["grpo"]
                stage1_dir = os.path.join(run_dir, "sft")
                stages = [
                    _stage("sft", stage1_dir, base_yaml, sft_unset,
                           [*tail, *_flags({**common, **sft, **chosen, "max_steps": n_sft, "seed": seed,
                                             "output_dir": stage1_dir})]),
                    _stage("grpo", os.path.join(run_dir, "rl"), base_yaml, grpo_unset,
                           [*tail, *_flags({**common, **grpo, **chosen, "max_steps": args.max_steps - n_sft, "seed": seed,
                                             "output_dir": os.path.join(run_dir, "rl"), "model_name_or_path": stage1_dir,
                                             "eval_before": False})]),
                ]
            else:
                _, overrides, unset = METHODS[base]
                overrides = {**overrides, **_variant_overrides(method), **chosen}
                stages = [_stage(method, run_dir, base_yaml, unset,
                                 [*tail, *_flags({**common, **overrides, "seed": seed, "output_dir": run_dir})])]
            runs.append({"method": method, "seed": seed, "dir": run_dir, "stages": stages})
    return runs


def _variant_overrides(method: str) -> dict:
    """`bridge@key=value` (a point of a --vary sweep) -> {key: value}; a plain method name -> {}."""
    if "@" not in method:
        return {}
    key, value = method.split("@", 1)[1].split("=", 1)
    return {key: value}


def _spec(stage) -> dict:
    return {"config": stage["config"], "argv": stage["argv"]}


def _done(stage) -> dict | None:
    """The stage's done.json when it exists and was produced by exactly this spec; raises when the spec changed."""
    path = os.path.join(stage["dir"], "done.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        done = json.load(f)
    if done.get("spec") != _spec(stage):
        raise ValueError(
            f"{stage['dir']} holds a completed run with different settings (its done.json spec differs from this "
            "invocation's config, method overrides or flags). Use another --output_dir to compare new settings; "
            "nothing was deleted."
        )
    return done


def _check_settings(runs) -> None:
    """Parse every stage's settings (config + flags) before any training, so a bad value fails first, naming the field."""
    from ..train_cli import make_parser

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for run in runs:
            for stage in run["stages"]:
                path = os.path.join(tmp, "config.yaml")
                with open(path, "w") as f:
                    yaml.safe_dump(stage["config"], f)
                try:
                    make_parser().parse_args_and_config(["--config", path, *stage["argv"][2:]])
                except SystemExit as err:  # argparse already printed the message naming the flag
                    raise ValueError(f"invalid settings for {run['method']} (seed {run['seed']}); see above") from err


# ----------------------------------------------------------------------------------------------------------------------
# Executing runs: a subprocess per (method, seed) (`python -m trl_bridge.experiments.compare _run <spec>`), or in this process
# ----------------------------------------------------------------------------------------------------------------------
def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes


class _RssSampler:
    """Peak resident memory of this process while a run is in flight (for in-process runs, which share the process)."""

    def __init__(self):
        import psutil

        self.process, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _provenance() -> dict:
    """Versions of trl-bridge and its main dependencies, and the git commit of the source tree when there is one."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in ("trl-bridge", "trl", "transformers", "peft", "torch"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    try:
        src = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        commit = subprocess.run(["git", "-C", src, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", src, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10)
        versions["git_commit"] = commit.stdout.strip() or None
        versions["git_dirty"] = bool(dirty.stdout.strip()) if commit.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        versions["git_commit"] = versions["git_dirty"] = None
    return versions


ATTEMPTS = "stopped_attempts.json"  # per stage folder: the attempts stopped by a signal since the run last started anew


def _write_json(path: str, value) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=2)


def _resume_point(run_dir: str, training_args) -> tuple[str | None, list[dict]]:
    """A stage stopped by SIGINT/SIGTERM (the grid was interrupted) left a complete checkpoint: continue from it (exact
    resume) instead of starting over, and return the stopped attempts that led to it. Without one, whatever an
    unfinished attempt left in the run's own folder is cleared (overwrite_output_dir) and the run starts anew. The
    run's spec is unchanged either way: resuming is how the same run is completed, not another setting."""
    from ..trainer.checkpointing import latest_complete_checkpoint

    if training_args.resume_from_checkpoint not in (None, False, ""):  # asked for explicitly: as asked
        return None, []
    path = latest_complete_checkpoint(run_dir)
    attempts_path = os.path.join(run_dir, ATTEMPTS)
    if path is None:
        training_args.overwrite_output_dir = True
        if os.path.exists(attempts_path):
            os.remove(attempts_path)
        return None, []
    training_args.resume_from_checkpoint = path
    attempts = []
    if os.path.isfile(attempts_path):
        with open(attempts_path) as f:
            attempts = json.load(f)
    return path, attempts


def run_stage(stage: dict, in_process: bool = False) -> dict:
    """Train one stage (its settings are written to its folder first) and write its done.json."""
    import torch

    from ..trainer.checkpointing import TrainingInterrupted
    from ..train_cli import make_parser, run

    os.makedirs(stage["dir"], exist_ok=True)
    with open(os.path.join(stage["dir"], "config.yaml"), "w") as f:
        yaml.safe_dump(stage["config"], f)
    with open(os.path.join(stage["dir"], "spec.json"), "w") as f:
        json.dump(_spec(stage), f, indent=2)
    script_args, training_args, model_args = make_parser().parse_args_and_config(stage["argv"])
    resumed_from, earlier = _resume_point(stage["dir"], training_args)
    if resumed_from:
        print(resume_marker(stage["dir"], resumed_from), flush=True)
    code = _provenance()  # read before training: the code this run is made with, whatever the tree becomes meanwhile
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with _RssSampler() as sampler:
        try:
            heldout = run(script_args, training_args, model_args)
        except TrainingInterrupted as stop:  # SIGINT/SIGTERM: its checkpoint is written; the next attempt resumes
            _write_json(os.path.join(stage["dir"], ATTEMPTS), [*earlier, {
                "seconds": time.perf_counter() - start, "stopped_after_step": stop.step, "checkpoint": stop.checkpoint}])
            raise
    seconds = time.perf_counter() - start
    done = {
        "spec": _spec(stage),
        "heldout": heldout,
        # wall time of every attempt that led here (a resumed run's earlier attempts included)
        "seconds": seconds + sum(a["seconds"] for a in earlier),
        # the stopped attempts it was resumed after; one of unknown duration when the attempt was not recorded
        "resumed": ([{"from": os.path.basename(a["checkpoint"] or "") or None, "after_seconds": a["seconds"]}
                     for a in earlier] or [{"from": os.path.basename(resumed_from), "after_seconds": None}])
        if resumed_from else None,
        "optimizer_steps": training_args.max_steps,
        "peak_rss_mb": sampler.peak / 2**20 if in_process else max(_peak_rss_mb(), sampler.peak / 2**20),
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "code": code,  # which code produced it (a grid may be continued by a later version)
    }
    with open(os.path.join(stage["dir"], "done.json"), "w") as f:
        json.dump(done, f, indent=2)
    if resumed_from:  # the run is complete (merged model written): the stopped attempts' checkpoints served their turn
        import shutil

        from ..trainer.checkpointing import CHECKPOINT_RE

        for name in os.listdir(stage["dir"]):
            if CHECKPOINT_RE.match(name):
                shutil.rmtree(os.path.join(stage["dir"], name), ignore_errors=True)
        if os.path.exists(os.path.join(stage["dir"], ATTEMPTS)):
            os.remove(os.path.join(stage["dir"], ATTEMPTS))
    return done


def _stage_steps(stage: dict) -> int:
    """The stage's optimizer steps: the last `--max_steps` of its argv (compare always sets it)."""
    argv = stage["argv"]
    return int(argv[len(argv) - 1 - argv[::-1].index("--max_steps") + 1])


def _progress_stages(run: dict) -> list[dict]:
    """The run's stages not done yet, each with where its steps lie in the whole run (for the worker's stage line)."""
    total, first, todo = sum(_stage_steps(s) for s in run["stages"]), 0, []
    for stage in run["stages"]:
        if _done(stage) is None:
            todo.append({**stage, "progress": {"first_step": first, "steps": _stage_steps(stage), "total": total}})
        first += _stage_steps(stage)
    return todo


def _label(run: dict) -> str:
    return f"{run['method']} seed {run['seed']}"


def _execute(run: dict, in_process: bool, progress: CompareProgress | None = None,
             workers: Workers | None = None) -> str | None:
    """Run the stages of one (method, seed) that are not done yet; returns an error message or None. With `progress`,
    the run is registered there (its train.log followed from the size it had when this run started); a subprocess run
    goes through `workers` (a signal to the grid stops it with a checkpoint)."""
    todo = _progress_stages(run)
    if not todo:
        return None
    key, total = f"{run['method']}/seed{run['seed']}", todo[0]["progress"]["total"]
    if in_process:
        if progress is not None:
            progress.started(key, _label(run), total)
        try:
            for stage in todo:
                run_stage(stage, in_process=True)
        except Exception as err:  # noqa: BLE001 - reported per run; the grid goes on
            return f"{type(err).__name__}: {err}"
        return None
    os.makedirs(run["dir"], exist_ok=True)
    spec_path = os.path.join(run["dir"], "stages.json")
    with open(spec_path, "w") as f:
        json.dump(todo, f)
    log_path = os.path.join(run["dir"], "train.log")
    if progress is not None:
        first = todo[0]["progress"]
        progress.started(key, _label(run), total, LogFollower(log_path, offset=log_size(log_path), total=total,
                                                              first_step=first["first_step"], stage_steps=first["steps"]))
    env = {**os.environ}
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                      env.get("PYTHONPATH")]))
    with open(log_path, "a") as log:
        returncode = (workers or Workers()).run([sys.executable, "-m", "trl_bridge.experiments.compare", "_run",
                                                 spec_path], log, env)
    if returncode:
        return f"exit code {returncode}; see {log_path}"
    return None


# ----------------------------------------------------------------------------------------------------------------------
# Results: per-run records, per-method aggregates, results.md / results.json, plots
# ----------------------------------------------------------------------------------------------------------------------
def _series(entries, key, offset=0) -> list[tuple[int, float]]:
    out = []
    for e in entries:
        v = e.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and "step" in e:
            out.append((int(e["step"]) + offset, float(v)))
    return out


def _reward_series(entries, offset=0) -> list[tuple[int, float]]:
    """The clean reward per step: the mean of `rewards/<f>/clean_mean` when rewards were flipped, else `reward`."""
    clean_keys = sorted({k for e in entries for k in e if k.startswith("rewards/") and k.endswith("/clean_mean")})
    if not clean_keys:
        return _series(entries, "reward", offset)
    steps: dict[int, list[float]] = {}
    for key in clean_keys:
        for s, v in _series(entries, key, offset):
            steps.setdefault(s, []).append(v)
    return sorted((s, statistics.fmean(v)) for s, v in steps.items())


def collect_run(run: dict) -> dict:
    """One (method, seed)'s record from its stages' done.json and metrics.jsonl (None fields when not done)."""
    from ..trainer.reporting import read_metrics_jsonl

    record = {"method": run["method"], "seed": run["seed"], "dir": run["dir"], "done": False}
    dones = [_done(s) for s in run["stages"]]
    if any(d is None for d in dones):
        return record
    reward, heldout, diag, offset = [], [], {k: [] for k in DIAGNOSTICS}, 0
    for stage, done in zip(run["stages"], dones):
        entries = read_metrics_jsonl(os.path.join(stage["dir"], "metrics.jsonl"))
        reward += _reward_series(entries, offset)
        curve = _series(entries, "heldout/accuracy", offset)
        heldout += [p for p in curve if not heldout or p[0] > heldout[-1][0]]  # stage 2's step 0 = stage 1's end
        if any("bridge/rl_loss_shadow" in e for e in entries):  # the meta term's diagnostics mean nothing without it
            for k in DIAGNOSTICS:
                diag[k] += _series(entries, k, offset)
        offset += done["optimizer_steps"]
    record.update(
        done=True,
        heldout_accuracy_before=dones[0]["heldout"].get("heldout_accuracy_before"),
        heldout_accuracy_after=dones[-1]["heldout"].get("heldout_accuracy_after"),
        optimizer_steps=offset,
        seconds=sum(d["seconds"] for d in dones),
        peak_rss_mb=max(d["peak_rss_mb"] for d in dones),
        peak_cuda_mb=None if dones[0]["peak_cuda_mb"] is None else max(d["peak_cuda_mb"] for d in dones),
        reward_curve=reward,
        heldout_curve=heldout,
        diagnostics={k: v for k, v in diag.items() if v},
        code=dones[-1].get("code"),  # versions and git commit that produced it
        resumed=[r for d in dones for r in (d.get("resumed") or [])] or None,  # stopped, then resumed from a checkpoint
        heldout_per_problem=_per_problem(run["stages"], dones),
        reused_from=_reused_from(run, dones),
    )
    return record


def _reused_from(run: dict, dones: list[dict]) -> str | None:
    """The folder of the run that --reuse_runs copied this one from (its first stage's, one level up for a cold
    start's two stages), or None when it was trained here."""
    source = (dones[0].get("reused_from") or {}).get("dir")
    return None if source is None else source if len(run["stages"]) == 1 else os.path.dirname(source)


def _per_problem(stages: list[dict], dones: list[dict]) -> dict | None:
    """The run's per-problem held-out grades (0/1 in problem order) from its stages' heldout_per_problem.json: before
    training (first stage), after (last stage) and at each held-out curve step (a later stage's step 0 is the earlier
    stage's end, kept once). None when the run did not write them (runs made before they were recorded)."""
    from ..train_cli import HELDOUT_PER_PROBLEM

    out, offset = {"before": None, "after": None, "steps": {}}, 0
    for i, (stage, done) in enumerate(zip(stages, dones)):
        path = os.path.join(stage["dir"], HELDOUT_PER_PROBLEM)
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            data = json.load(f)
        if i == 0:
            out["before"] = data.get("before")
        if i == len(stages) - 1:
            out["after"] = data.get("after")
        for step, grades in data.get("steps", {}).items():
            out["steps"].setdefault(str(int(step) + offset), grades)
        offset += done["optimizer_steps"]
    return out


# the compare settings that change what a run is (with the config and the flags passed on to every run)
_RUN_SETTINGS = ("max_steps", "reward_noise", "heldout_eval_steps", "cold_start_fraction")
_RECORD_FIELDS = ("heldout_accuracy_before", "heldout_accuracy_after", "optimizer_steps", "seconds", "peak_rss_mb",
                  "peak_cuda_mb", "reward_curve", "heldout_curve", "diagnostics")


def _settings_differ(settings: dict, args, extra: list[str], base_yaml: dict, keys) -> list[str]:
    """Which of a results.json's settings differ from this invocation's: `keys`, the config and the flags."""
    differ = [k for k in keys if settings.get(k) != getattr(args, k)]
    if "config_yaml" in settings:  # recorded since the second round; before, only the path
        differ += [] if settings["config_yaml"] == base_yaml else ["config (its content)"]
    elif os.path.normpath(str(settings.get("config"))) != os.path.normpath(args.config):
        differ.append("config")
    _, earlier_extra = make_parser().parse_known_args(shlex.split(settings["command"])[2:])
    if earlier_extra != extra:
        differ.append(f"flags passed to every run ({shlex.join(earlier_extra) or 'none'} there, "
                      f"{shlex.join(extra) or 'none'} here)")
    return differ


def _read_results(path: str, flag: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"{flag} {path}: cannot be read as a results.json: {err}") from err
    settings, runs = (data.get("settings"), data.get("runs")) if isinstance(data, dict) else (None, None)
    if not isinstance(settings, dict) or not isinstance(runs, list) or not isinstance(settings.get("command"), str):
        raise ValueError(f"{flag} {path}: not a `trl-bridge compare` results.json (it needs 'settings' with the "
                         "'command', and 'runs')")
    return data


def load_noise_baseline(args, extra: list[str], base_yaml: dict) -> dict | None:
    """The clean grid of `--noise_baseline`: {"path", "reward_noise", "clean": method -> {seed: held-out accuracy}}.
    Refused unless it was run with the same settings as this grid except a lower reward noise."""
    path = args.noise_baseline
    if not path:
        return None
    data = _read_results(path, "--noise_baseline")
    settings = data["settings"]
    differ = _settings_differ(settings, args, extra, base_yaml, [k for k in _RUN_SETTINGS if k != "reward_noise"])
    if differ:
        raise ValueError(f"--noise_baseline {path}: its grid was run with other settings ({', '.join(differ)}); the "
                         "interaction needs the same grid with only the reward noise changed")
    base_noise = float(settings.get("reward_noise") or 0.0)
    if not base_noise < args.reward_noise:
        raise ValueError(f"--noise_baseline {path}: its reward noise ({base_noise:g}) must be below this grid's "
                         f"({args.reward_noise:g}); tabulate the noisier grid with the cleaner one as baseline")
    clean = {m: {k: v for k, v in by.items() if k in args.seeds} for m, by in _by_seed(data["runs"]).items()
             if m in args.methods}
    if args.reference not in clean:
        raise ValueError(f"--noise_baseline {path}: has no completed run of the reference {args.reference!r}")
    return {"path": path, "reward_noise": base_noise, "clean": clean}


def load_earlier_results(args, extra: list[str], base_yaml: dict) -> dict[tuple[str, int], dict]:
    """(method, seed) -> completed run record, from each `--earlier_results` results.json of a grid with the same
    settings (config, steps, reward noise, held-out schedule, cold-start split and flags); refused, naming the file and
    what differs, otherwise. Only the pairs this invocation asks for are kept; a later file does not replace an earlier."""
    found: dict[tuple[str, int], dict] = {}
    for path in args.earlier_results:
        data = _read_results(path, "--earlier_results")
        settings, runs = data["settings"], data["runs"]
        differ = _settings_differ(settings, args, extra, base_yaml, _RUN_SETTINGS)
        if differ:
            raise ValueError(f"--earlier_results {path}: its grid was run with other settings ({', '.join(differ)}); "
                             "only runs of the same settings can be tabulated together")
        for record in runs:
            key = (record.get("method"), record.get("seed"))
            if record.get("done") and key[0] in args.methods and key[1] in args.seeds and key not in found:
                missing = [k for k in _RECORD_FIELDS if k not in record]
                if missing:
                    raise ValueError(f"--earlier_results {path}: run {key[0]}/seed{key[1]} lacks {', '.join(missing)}")
                found[key] = {**record, "source": path}
    return found


def _mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _steps_to_target(curve, target):
    return next((s for s, v in curve if v >= target), None)


def _max_drop(curve):
    """Largest fall of the held-out curve below its best value so far (0: it never went down)."""
    best, drop = -math.inf, 0.0
    for _, v in curve:
        best = max(best, v)
        drop = max(drop, best - v)
    return drop


def aggregate(records: list[dict], target: float, reference: str = "bridge") -> dict:
    """Per-method summaries over seeds; the difference to `reference` is paired by seed."""
    by_method: dict[str, list[dict]] = {}
    for r in records:
        if r["done"]:
            by_method.setdefault(r["method"], []).append(r)
    ref = {r["seed"]: r["heldout_accuracy_after"] for r in by_method.get(reference, [])}
    summary = {}
    for method, runs in by_method.items():
        acc_mean, acc_std = _mean_std([r["heldout_accuracy_after"] for r in runs])
        before_mean, _ = _mean_std([r["heldout_accuracy_before"] for r in runs])
        pairs = [(r["seed"], r["heldout_accuracy_after"] - ref[r["seed"]]) for r in runs
                 if r["seed"] in ref and r["heldout_accuracy_after"] is not None and ref[r["seed"]] is not None]
        diffs = [d for _, d in pairs]
        diff = None
        if diffs and method != reference:
            mean = statistics.fmean(diffs)
            half = _t975(len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else None
            diff = {"mean": mean, "ci95": None if half is None else [mean - half, mean + half], "n": len(diffs),
                    "per_seed": diffs, "seeds": [k for k, _ in pairs]}
        last_half = [[v for _, v in r["reward_curve"][len(r["reward_curve"]) // 2:]] for r in runs]
        reached = [_steps_to_target(r["heldout_curve"], target) for r in runs]
        summary[method] = {
            "seeds": [r["seed"] for r in runs],
            "heldout_accuracy_before_mean": before_mean,
            "heldout_accuracy_after_mean": acc_mean,
            "heldout_accuracy_after_std": acc_std,
            "heldout_accuracy_after_by_seed": {r["seed"]: r["heldout_accuracy_after"] for r in runs},
            "diff_to_reference": diff,
            "reward_last_half_mean": _mean_std([statistics.fmean(v) for v in last_half if v])[0],
            # stability: the step-to-step spread of the reward over the last half of training, averaged over seeds
            "reward_last_half_std": _mean_std([statistics.pstdev(v) for v in last_half if len(v) > 1])[0],
            "heldout_max_drop_mean": _mean_std([_max_drop(r["heldout_curve"]) for r in runs if r["heldout_curve"]])[0],
            "steps_to_target": reached,
            "steps_to_target_mean": _mean_std([s for s in reached if s is not None])[0],
            "seconds_mean": _mean_std([r["seconds"] for r in runs])[0],
            "optimizer_steps": runs[0]["optimizer_steps"],
            "peak_rss_mb_max": max(r["peak_rss_mb"] for r in runs),
            "peak_cuda_mb_max": max((r["peak_cuda_mb"] for r in runs if r["peak_cuda_mb"] is not None), default=None),
        }
    return summary


def _by_seed(records: list[dict]) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for r in records:
        if r.get("done") and r.get("heldout_accuracy_after") is not None:
            out.setdefault(r["method"], {})[int(r["seed"])] = r["heldout_accuracy_after"]
    return out


def _n_problems(records: list[dict], config_yaml: dict | None) -> tuple[int | None, str]:
    """How many held-out problems an accuracy is measured on: from the per-problem records, else the config's
    `eval_samples` (capped by `task_num_test` for the built-in task)."""
    lengths = {len(r["heldout_per_problem"]["after"]) for r in records
               if r.get("done") and (r.get("heldout_per_problem") or {}).get("after")}
    if len(lengths) == 1:
        return lengths.pop(), "per-problem records"
    cfg = config_yaml or {}
    n = [v for v in (cfg.get("eval_samples"), cfg.get("task_num_test")) if isinstance(v, int) and v > 0]
    return (min(n), "the config's eval_samples") if n else (None, "unknown")


def table_statistics(summary: dict, records: list[dict], args, noise: dict | None = None,
                     config_yaml: dict | None = None) -> dict:
    """The tests behind the table's verdicts (results.json `statistics`): for each compared method, the paired t-test
    over seeds against the reference, Holm–Bonferroni over the table's comparisons, TOST within ±margin and, when
    every run of a comparison has per-problem records, a two-level (seeds, problems) bootstrap interval; with `noise`
    (a clean baseline grid), the clean→noisy drop per method and its difference to the reference's.

    With a pre-registered plan the tests are withheld (`withheld` says why) until every planned run is completed."""
    plan = getattr(args, "plan_spec", None) or {}
    alpha = plan.get("alpha", stats.ALPHA)
    margin = getattr(args, "equivalence_margin", None) or stats.DEFAULT_EQUIVALENCE_MARGIN
    compared = plan.get("compared") or [m for m in args.methods if m != args.reference]
    out = {"plan": getattr(args, "plan", None), "reference": args.reference, "compared": compared, "alpha": alpha,
           "test": "paired t-test over seeds, two-sided", "correction": "holm", "equivalence": "tost",
           "equivalence_margin": margin, "withheld": None, "comparisons": {}}
    n, source = _n_problems(records, config_yaml)
    ref_acc = summary.get(args.reference, {}).get("heldout_accuracy_after_mean")
    out["binomial_se"] = {"n_problems": n, "n_problems_from": source, "reference_accuracy": ref_acc,
                          "se": None if n is None or ref_acc is None else stats.binomial_se(ref_acc, n)}
    done = {(r["method"], r["seed"]) for r in records if r.get("done")}
    missing = [f"{m}/seed{k}" for m in args.methods for k in args.seeds if (m, k) not in done]
    if plan and missing:
        out["withheld"] = (f"{len(missing)} of the plan's {len(args.methods) * len(args.seeds)} runs are not completed "
                           f"({', '.join(missing)})")
        return out
    per_problem = {(r["method"], r["seed"]): (r.get("heldout_per_problem") or {}).get("after")
                   for r in records if r.get("done")}
    for method in compared:
        d = (summary.get(method) or {}).get("diff_to_reference")
        if not d:
            continue
        seeds = d.get("seeds") or []
        test = stats.paired_t(d["per_seed"], alpha)
        a = {k: per_problem.get((method, k)) for k in seeds}
        b = {k: per_problem.get((args.reference, k)) for k in seeds}
        both = seeds and all(a[k] is not None and b[k] is not None for k in seeds)
        out["comparisons"][method] = {
            "mean": test["mean"], "n": test["n"], "ci95": test["ci"], "p": test["p"], "seeds": seeds,
            "tost": stats.tost(d["per_seed"], margin, alpha),
            "bootstrap": stats.two_level_bootstrap(a, b, alpha=alpha) if both else None,
        }
    adjusted = stats.holm({m: c["p"] for m, c in out["comparisons"].items()})
    for method, c in out["comparisons"].items():
        c["p_holm"] = adjusted[method]
        c["significant"] = c["p_holm"] is not None and c["p_holm"] < alpha
        c["equivalent"] = c["tost"]["equivalent"]
    comparisons = out["comparisons"].values()
    with_problems = [c["bootstrap"] is not None for c in comparisons]
    out["interval"] = ("seeds and problems" if with_problems and all(with_problems)
                       else "mixed" if any(with_problems) else "seeds only")
    if noise is not None:
        interaction = stats.difference_in_differences(noise["clean"], _by_seed(records), args.reference, compared,
                                                      alpha)
        out["noise_interaction"] = {"baseline": noise["path"], "baseline_reward_noise": noise["reward_noise"],
                                    "reward_noise": args.reward_noise, **interaction}
    return out


def _p(v) -> str:
    return "–" if v is None else "< 0.001" if v < 0.001 else f"{v:.3f}"


def _p_is(v) -> str:
    """'= 0.015' or '< 0.001', to follow 'p' in a sentence."""
    return _p(v) if v is not None and v < 0.001 else f"= {_p(v)}"


def _fmt(v, digits=3):
    return "–" if v is None else f"{v:.{digits}f}"


# what a run trained again must give to reproduce an earlier record of the same settings
_REPRODUCED_FIELDS = ("heldout_accuracy_before", "heldout_accuracy_after", "reward_curve", "heldout_curve")


def _reproduction(record: dict, earlier: dict) -> dict:
    """How a run completed here compares with the earlier grid's record of the same (method, seed): the fields of
    `_REPRODUCED_FIELDS` that differ (none: reproduced exactly), with the number of steps where a curve differs."""
    def same(a, b):  # as results.json holds them: tuples as lists, NaN equal to NaN
        return json.dumps(a) == json.dumps(b)

    differs = {}
    for key in _REPRODUCED_FIELDS:
        here, there = record.get(key), earlier.get(key)
        if same(here, there):
            continue
        if isinstance(here, list) and isinstance(there, list):  # curves: [step, value] points
            a, b = {p[0]: p[1] for p in here}, {p[0]: p[1] for p in there}
            differs[key] = (f"at {sum(not same(a.get(k), b.get(k)) for k in set(a) | set(b))} of "
                            f"{len(set(a) | set(b))} points")
        else:
            differs[key] = f"{there} there, {here} here"
    return {"source": earlier["source"], "identical": not differs, "differs": differs}


def _provenance_lines(records: list[dict]) -> list[str]:
    """Which code produced the runs in the table: commits (a '+' marks uncommitted changes), and earlier results."""
    commits: dict[str, int] = {}
    earlier: dict[str, list[str]] = {}
    for r in records:
        if not r["done"]:
            continue
        if r.get("source"):
            earlier.setdefault(r["source"], []).append(f"{r['method']}/seed{r['seed']}")
            continue
        code = r.get("code") or {}
        name = (code.get("git_commit") or "unknown")[:12] + ("+" if code.get("git_dirty") else "")
        commits[name] = commits.get(name, 0) + 1
    resumed = [f"{r['method']}/seed{r['seed']} (from {', '.join(str(x['from']) for x in r['resumed'])})"
               for r in records if r["done"] and r.get("resumed")]
    adopted: dict[str, dict[str, list[str]]] = {}  # source folder -> method -> seeds
    for r in records:
        if r["done"] and r.get("reused_from"):
            root = os.path.dirname(os.path.dirname(r["reused_from"]))
            adopted.setdefault(root, {}).setdefault(r["method"], []).append(str(r["seed"]))
    lines = []
    for root, by_method in adopted.items():
        names = "; ".join(f"{m} seed{'s' if len(k) > 1 else ''} {', '.join(k)}" for m, k in by_method.items())
        lines.append(f"Trained with the same settings in another grid and copied from `{root}` (--reuse_runs; its "
                     f"commits are counted below): {names}.")
    if resumed:
        lines.append(f"Stopped and resumed from their checkpoint (exact resume; wall time counts every recorded attempt): "
                     f"{', '.join(resumed)}.")
    if commits:
        lines.append("Code: " + ", ".join(f"{n} run{'s' if n > 1 else ''} at commit {c}" for c, n in commits.items()) + ".")
    for path, names in earlier.items():
        lines.append(f"Taken from `{path}` (not trained again; commits as recorded there, none for runs made before "
                     f"runs recorded one): {', '.join(names)}.")
    checked: dict[str, dict[bool, list[str]]] = {}
    for r in records:
        if r["done"] and r.get("reproduces"):
            rep = r["reproduces"]
            name = f"{r['method']}/seed{r['seed']}" + ("" if rep["identical"] else " (" + "; ".join(
                f"{k} {v}" for k, v in rep["differs"].items()) + ")")
            checked.setdefault(rep["source"], {True: [], False: []})[rep["identical"]].append(name)
    for path, by in checked.items():
        what = ", ".join(f.replace("_", " ") for f in _REPRODUCED_FIELDS)
        if by[True]:
            lines.append(f"Trained here again and also in `{path}`, reproduced exactly ({what} identical; the table "
                         f"uses the runs made here): {', '.join(by[True])}.")
        if by[False]:
            lines.append(f"Trained here again and also in `{path}`, **not** reproduced (the table uses the runs made "
                         f"here): {', '.join(by[False])}.")
    return lines


def _verdict(c: dict, reference: str, alpha: float) -> str:
    """What a comparison supports: a difference only when it survives Holm, 'as good as' only when TOST shows
    equivalence within the margin, otherwise 'not separated'."""
    margin, eq = c["tost"]["margin"], c["tost"]
    if c["p"] is None:
        return "one seed: no test, nothing can be concluded"
    holm_text = f"Holm-adjusted p {_p_is(c['p_holm'])}, unadjusted {_p(c['p'])}"
    tost_text = f"TOST ±{margin:g}: p {_p_is(eq['p'])}"
    if c["significant"]:
        side = "higher" if c["mean"] > 0 else "lower"
        within = (f"; yet within ±{margin:g} of it ({tost_text}): a difference smaller than the equivalence margin"
                  if c["equivalent"] else f"; {tost_text}")
        return f"**significantly {side}** than {reference} ({holm_text}; α = {alpha:g}){within}"
    if c["equivalent"]:
        return (f"**as good as** {reference} within ±{margin:g} ({tost_text}: both one-sided nulls rejected at "
                f"α = {alpha:g}); no difference after correction ({holm_text})")
    return (f"**not separated** from {reference}: no difference after correction ({holm_text}) and equivalence "
            f"within ±{margin:g} not shown ({tost_text})")


def _difference_sentences(summary: dict, args, tests: dict) -> list[str]:
    """One plain sentence per compared method: the paired difference with its interval(s), on how many seeds it is
    higher / lower, and what the corrected tests support ('significant' only after Holm)."""
    out = []
    for method in [m for m in tests["compared"] if m in tests["comparisons"]]:
        c = tests["comparisons"][method]
        d = summary[method]["diff_to_reference"]
        per = d.get("per_seed") or []
        tally = (f"higher on {sum(x > 0 for x in per)}, lower on {sum(x < 0 for x in per)}, equal on "
                 f"{sum(x == 0 for x in per)} of {d['n']} seed{'s' if d['n'] > 1 else ''}")
        interval = "" if c["ci95"] is None else f" [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}]"
        boot = ("" if not c["bootstrap"] else
                f"; seeds and problems resampled: [{c['bootstrap']['ci'][0]:+.3f}, {c['bootstrap']['ci'][1]:+.3f}]")
        out.append(f"- {method}: {c['mean']:+.3f}{interval}{boot} ({tally}); "
                   f"{_verdict(c, args.reference, tests['alpha'])}.")
    return out


def _noise_lines(noise: dict, reference: str) -> list[str]:
    """The clean→noisy interaction table: each method's drop, and its difference to the reference's drop."""
    lines = [
        "", f"Noise robustness, as an interaction (clean grid: `{noise['baseline']}`, reward noise "
        f"{noise['baseline_reward_noise']:g} → {noise['reward_noise']:g}): drop = clean − noisy held-out accuracy, "
        f"paired by seed, mean [95% t interval]; Δ drop vs {reference} = the method's drop minus {reference}'s on the "
        "same seed (positive: the method loses more to the noise), paired t-test over seeds, Holm over these "
        "comparisons. This compares how much each method loses, not where it ends.",
        "",
        f"| method | seeds | drop [95% CI] | Δ drop vs {reference} [95% CI] | p | p (Holm) |",
        "|---|---|---|---|---|---|",
    ]

    def ci(t):
        return f"{t['mean']:+.3f}" + ("" if t["ci"] is None else f" [{t['ci'][0]:+.3f}, {t['ci'][1]:+.3f}]")

    for method, drop in noise["drops"].items():
        i = noise["interaction"].get(method)
        lines.append(f"| {method} | {len(drop['seeds'])} | {ci(drop)} | {'–' if i is None else ci(i)} | "
                     f"{'–' if i is None else _p(i['p'])} | {'–' if i is None else _p(i['p_holm'])} |")
    return lines


def _interval_sentence(tests: dict, reference: str) -> str:
    """What the table's intervals cover: seeds only (t intervals, tests), and seeds then problems (the two-level
    bootstrap) for the comparisons whose runs all have per-problem records, naming those that have none."""
    bootstrap = (f"The bracketed intervals after 'seeds and problems resampled' come from a two-level bootstrap "
                 f"({stats.BOOTSTRAP_SAMPLES} replicates, seed {stats.BOOTSTRAP_SEED}: seeds drawn with replacement, "
                 f"then problems within each drawn seed, the same problems for both methods)")
    if tests["interval"] == "seeds and problems":
        return f"{bootstrap}; the t intervals and tests cover the variation over seeds only."
    se = tests["binomial_se"]
    size = (f"about sqrt(p(1−p)/{se['n_problems']}) per accuracy (±{se['se']:.3f} at {reference}'s "
            f"{se['reference_accuracy']:.3f}; {se['n_problems']} problems from {se['n_problems_from']})"
            if se["se"] is not None else "a binomial standard error per accuracy")
    if tests["interval"] == "mixed":  # some runs predate the per-problem records: say which rows lack them
        seeds_only = [m for m, c in tests["comparisons"].items() if c["bootstrap"] is None]
        return (f"{bootstrap}. {', '.join(seeds_only)}: some of their runs have no per-problem records to resample, so "
                f"they have no such interval. Every t interval and test covers the variation over seeds only: the "
                f"finite test set adds {size}, not in the intervals.")
    return (f"The intervals and tests cover the variation over seeds only (the runs have no per-problem records to "
            f"resample): the finite test set adds {size}, not in the intervals.")


def results_markdown(summary: dict, args, failed: dict, records: list[dict] | None = None,
                     tests: dict | None = None) -> str:
    tests = tests if tests is not None else table_statistics(summary, records or [], args)
    margin = tests["equivalence_margin"]
    noise = f", rewards flipped with p = {args.reward_noise}" if args.reward_noise else ""
    plan = getattr(args, "plan_spec", None)
    family = (f"the plan's {len(plan['compared'])} comparisons (withheld until its runs are complete)"
              if plan and tests.get("withheld") else f"the table's {len(tests['comparisons'])} comparisons")
    lines = [
        f"Command: `{args.command}`",
        "",
        f"Config `{args.config}`, {args.max_steps} optimizer steps per run, seeds {','.join(map(str, args.seeds))}{noise}. "
        f"Held-out accuracy: greedy, after training (mean ± std over seeds); Δ vs {args.reference}: paired by seed, mean "
        f"[95% t interval]; p (Holm): the paired t-test's two-sided p-value over seeds, Holm–Bonferroni-adjusted over "
        f"{family}; TOST ±{margin:g}: the larger p-value of the two one-sided "
        f"tests of equivalence within ±{margin:g} (equivalent when < {tests['alpha']:g}); "
        f"reward: the rollouts' {'clean ' if args.reward_noise else ''}mean reward over the last half "
        f"of training, mean ± its step-to-step std (stability); max drop: the held-out curve's largest fall below "
        f"its best so far; steps to {args.target_accuracy}: first held-out evaluation at or above it "
        f"(mean over the seeds that reached it, reached/total).",
        "",
        f"| method | held-out acc. before | after | per seed {' / '.join(map(str, args.seeds))} | Δ vs {args.reference} "
        f"[95% CI] | p (Holm) | TOST ±{margin:g} | reward (last half) | max drop | steps to {args.target_accuracy} | "
        f"wall time (s) | peak mem (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method in [m for m in args.methods if m in summary]:
        s = summary[method]
        d = s["diff_to_reference"]
        c = tests["comparisons"].get(method)
        if d is None:
            delta = "–"
        elif d["ci95"] is None:
            delta = f"{d['mean']:+.3f} (n = 1)"
        else:
            delta = f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"
        p_holm = "–" if c is None else _p(c["p_holm"]) + (" *" if c["significant"] else "")
        tost = "–" if c is None else _p(c["tost"]["p"]) + (" (equiv.)" if c["equivalent"] else "")
        reached = [x for x in s["steps_to_target"] if x is not None]
        mem = s["peak_rss_mb_max"] if s["peak_cuda_mb_max"] is None else s["peak_cuda_mb_max"]
        partial = f" (seeds {','.join(map(str, s['seeds']))})" if len(s["seeds"]) < len(args.seeds) else ""
        by_seed = {int(k): v for k, v in s["heldout_accuracy_after_by_seed"].items()}
        per_seed = " / ".join("·" if k not in by_seed else _fmt(by_seed[k], 2) for k in args.seeds)
        lines.append(
            f"| {method} | {_fmt(s['heldout_accuracy_before_mean'])} | {_fmt(s['heldout_accuracy_after_mean'])} ± "
            f"{_fmt(s['heldout_accuracy_after_std'])}{partial} | {per_seed} | {delta} | {p_holm} | {tost} | "
            f"{_fmt(s['reward_last_half_mean'])} ± "
            f"{_fmt(s['reward_last_half_std'])} | {_fmt(s['heldout_max_drop_mean'])} | "
            f"{_fmt(s['steps_to_target_mean'], 1)} ({len(reached)}/{len(s['steps_to_target'])}) | "
            f"{_fmt(s['seconds_mean'], 0)} | {_fmt(mem, 0)}{'' if s['peak_cuda_mb_max'] is None else ' (GPU)'} |"
        )
    plan = getattr(args, "plan_spec", None)
    if plan:
        lines += ["", f"Comparison plan `{args.plan}` (recorded in results.json; a grid that differs from it is "
                      f"refused): methods {', '.join(args.methods)}; "
                      f"seeds {','.join(map(str, args.seeds))}; each of {', '.join(tests['compared'])} compared with "
                      f"{args.reference}; {plan['test']} test, {plan['correction']} correction, α = {tests['alpha']:g}, "
                      f"equivalence margin ±{margin:g}."]
    else:
        lines += ["", f"Not pre-registered (no `--plan`): every method is compared with {args.reference}; Holm over "
                      f"these {len(tests['comparisons'])} comparisons, α = {tests['alpha']:g}, equivalence margin "
                      f"±{margin:g}."]
    if tests["withheld"]:
        lines += ["", f"Tests withheld until the plan's runs are complete: {tests['withheld']}."]
    sentences = _difference_sentences(summary, args, tests)
    if sentences:
        lines += ["", f"Paired by seed, held-out accuracy after training minus {args.reference}'s ('·' in 'per seed': "
                      "not completed); 'significant' only where the Holm-adjusted p-value is below α, 'as good as' "
                      "only where TOST shows equivalence within the margin ('*' and '(equiv.)' in the table):",
                  *sentences]
    if tests["comparisons"]:
        lines += ["", _interval_sentence(tests, args.reference)]
    if "noise_interaction" in tests:
        lines += _noise_lines(tests["noise_interaction"], args.reference)
    provenance = _provenance_lines(records or [])
    if provenance:
        lines += ["", *provenance]
    pending = [f"{m}/seed{k}" for m in args.methods for k in args.seeds if k not in summary.get(m, {}).get("seeds", [])]
    if pending:
        lines += ["", f"Not completed yet ({len(pending)} runs): {', '.join(pending)}."]
    for name, why in failed.items():
        lines.append(f"- failed: {name}: {why}")
    return "\n".join(lines) + "\n"


def _band(curves, smooth: int):
    """(steps, mean, std) over seeds of per-seed curves [(step, value)], each smoothed by a trailing mean."""
    import numpy as np

    per_seed = []
    for curve in curves:
        steps = [s for s, _ in curve]
        values = np.array([v for _, v in curve], dtype=float)
        if smooth > 1 and len(values):
            values = np.array([values[max(0, i - smooth + 1): i + 1].mean() for i in range(len(values))])
        per_seed.append(dict(zip(steps, values)))
    steps = sorted(set.intersection(*(set(d) for d in per_seed))) if per_seed else []
    stacked = np.array([[d[s] for s in steps] for d in per_seed])
    return steps, stacked.mean(0) if len(steps) else [], stacked.std(0) if len(steps) else []


def plot_results(records: list[dict], methods: list[str], output_dir: str, smooth: int, title: str) -> list[str]:
    from matplotlib.figure import Figure

    done = [r for r in records if r["done"]]
    written = []

    def panel(ax, key_fn, ylabel, smooth_n, only=None):
        plotted = False
        for method in methods:
            curves = [key_fn(r) for r in done if r["method"] == method]
            curves = [c for c in curves if c]
            if not curves or (only and method not in only):
                continue
            steps, mean, std = _band(curves, smooth_n)
            if not len(steps):
                continue
            line, = ax.plot(steps, mean, label=f"{method} (n={len(curves)})", linewidth=1.5)
            ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.15)
            plotted = True
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if plotted:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
        return plotted

    for name, key_fn, ylabel, smooth_n in (
        ("reward_curves.png", lambda r: r["reward_curve"], f"rollout reward (trailing mean of {smooth} steps)", smooth),
        ("heldout_curves.png", lambda r: r["heldout_curve"], "held-out accuracy (greedy)", 1),
    ):
        fig = Figure(figsize=(8, 4.5), layout="constrained")
        ax = fig.subplots()
        panel(ax, key_fn, ylabel, smooth_n)
        ax.set_title(f"{title}: mean over seeds ± 1 std")
        fig.savefig(os.path.join(output_dir, name), dpi=110)
        written.append(name)
    fig = Figure(figsize=(14, 4), layout="constrained")
    for ax, key in zip(fig.subplots(1, 3), DIAGNOSTICS):
        panel(ax, lambda r, k=key: r["diagnostics"].get(k, []), key, 1)
        ax.set_title(key)
    fig.suptitle(f"{title}: BRIDGE mechanism diagnostics (mean over seeds ± 1 std)")
    fig.savefig(os.path.join(output_dir, "diagnostics.png"), dpi=110)
    written.append("diagnostics.png")
    return written


def write_results(args, runs: list[dict], failed: dict, earlier: dict | None = None, base_yaml: dict | None = None,
                  noise: dict | None = None) -> dict:
    """Results of the runs completed here and, for the (method, seed) pairs not completed here, of `earlier`; with
    `noise` (`load_noise_baseline`), the clean→noisy interaction too."""
    records = []
    for run in runs:
        record = collect_run(run)
        before = (earlier or {}).get((run["method"], run["seed"]))
        if record["done"] and before is not None:  # trained here as well: does it reproduce the earlier run?
            record["reproduces"] = _reproduction(record, before)
        records.append(record if record["done"] or before is None else before)
    summary = aggregate(records, args.target_accuracy, args.reference)
    tests = table_statistics(summary, records, args, noise, base_yaml)
    os.makedirs(args.output_dir, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "progress_interval"}  # how it is shown changes no result
    settings["config_yaml"] = base_yaml
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump({"settings": settings, "methods": summary, "statistics": tests, "runs": records, "failed": failed},
                  f, indent=2)
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write(results_markdown(summary, args, failed, records, tests))
    if getattr(args, "tune_plan", None) is not None:  # --tune: each method's trials and the winner under the rule
        tuning.write_tuning(args.output_dir, args.tune_plan, records, settings)
    title = f"{os.path.basename(args.config)}" + (f", reward noise {args.reward_noise}" if args.reward_noise else "")
    plot_results(records, args.methods, args.output_dir, args.smooth, title)
    return summary


# ----------------------------------------------------------------------------------------------------------------------
# Pre-registration: the comparison plan of a table, declared before its runs
# ----------------------------------------------------------------------------------------------------------------------
PLAN_TESTS, PLAN_CORRECTIONS = ("paired_t",), ("holm",)
_PLAN_REQUIRED = ("methods", "seeds", "reference", "compared", "test", "correction", "equivalence_margin")
_PLAN_OPTIONAL = ("alpha", "config", "max_steps", "reward_noise", "noise_baseline", "tuned")


def load_plan(path: str) -> dict:
    """A comparison plan (YAML mapping), checked field by field; errors name the file and the field."""
    try:
        with open(path) as f:
            plan = yaml.safe_load(f)
    except OSError as err:
        raise ValueError(f"--plan: cannot read {path}: {err}") from err
    except yaml.YAMLError as err:
        raise ValueError(f"--plan: {path} is not valid YAML: {err}") from err
    if not isinstance(plan, dict):
        raise ValueError(f"--plan: {path} must be a YAML mapping")
    unknown = sorted(set(plan) - set(_PLAN_REQUIRED) - set(_PLAN_OPTIONAL))
    missing = [k for k in _PLAN_REQUIRED if k not in plan]
    if unknown or missing:
        raise ValueError(f"--plan {path}: " + "; ".join(
            ([f"unknown field(s) {', '.join(unknown)}"] if unknown else []) +
            ([f"missing field(s) {', '.join(missing)}"] if missing else [])) +
            f" (fields: {', '.join(_PLAN_REQUIRED)}; optional: {', '.join(_PLAN_OPTIONAL)})")

    def names(key):
        v = plan[key]
        if not isinstance(v, list) or not v or not all(isinstance(x, str) and x for x in v) or len(set(v)) != len(v):
            raise ValueError(f"--plan {path}: {key} must be a non-empty list of distinct method names, got {v!r}")
        return v

    names("methods")
    names("compared")
    seeds = plan["seeds"]
    if (not isinstance(seeds, list) or not seeds or not all(isinstance(k, int) and not isinstance(k, bool) for k in seeds)
            or len(set(seeds)) != len(seeds)):
        raise ValueError(f"--plan {path}: seeds must be a non-empty list of distinct integers, got {seeds!r}")
    if plan["reference"] not in plan["methods"]:
        raise ValueError(f"--plan {path}: reference {plan['reference']!r} is not one of its methods")
    wrong = [m for m in plan["compared"] if m not in plan["methods"] or m == plan["reference"]]
    if wrong:
        raise ValueError(f"--plan {path}: compared must list methods of the plan other than the reference, got {wrong}")
    if plan["test"] not in PLAN_TESTS:
        raise ValueError(f"--plan {path}: test must be one of {', '.join(PLAN_TESTS)}, got {plan['test']!r}")
    if plan["correction"] not in PLAN_CORRECTIONS:
        raise ValueError(f"--plan {path}: correction must be one of {', '.join(PLAN_CORRECTIONS)}, got "
                         f"{plan['correction']!r}")
    for key, default in (("equivalence_margin", None), ("alpha", stats.ALPHA)):
        v = plan.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
            raise ValueError(f"--plan {path}: {key} must be a number in (0, 1), got {v!r}")
        plan[key] = float(v)
    return plan


def check_plan(plan: dict, args) -> None:
    """Refuse a grid that is not the one the plan declared (naming every field that differs); fill what the command
    line left unset (reference, margin, noise baseline) from the plan."""
    differ = []
    if set(args.methods) != set(plan["methods"]):
        differ.append(f"methods ({','.join(plan['methods'])} declared, {','.join(args.methods)} here)")
    if set(args.seeds) != set(plan["seeds"]):
        differ.append(f"seeds ({','.join(map(str, plan['seeds']))} declared, {','.join(map(str, args.seeds))} here)")
    for key, here in (("reference", args.reference), ("equivalence_margin", args.equivalence_margin),
                      ("noise_baseline", args.noise_baseline)):
        if here is not None and key in plan and here != plan[key]:
            differ.append(f"{key} ({plan[key]} declared, {here} here)")
    if "config" in plan and os.path.normpath(str(plan["config"])) != os.path.normpath(args.config):
        differ.append(f"config ({plan['config']} declared, {args.config} here)")
    if "tuned" in plan and (args.tuned is None or os.path.normpath(str(plan["tuned"])) != os.path.normpath(args.tuned)):
        differ.append(f"tuned ({plan['tuned']} declared, {args.tuned} here)")  # the tuning whose winners are run
    for key in ("max_steps", "reward_noise"):
        if key in plan and float(plan[key]) != float(getattr(args, key)):
            differ.append(f"{key} ({plan[key]} declared, {getattr(args, key)} here)")
    if differ:
        raise ValueError(f"--plan {args.plan}: the grid differs from the declared plan: {'; '.join(differ)}. A "
                         "pre-registered table is tabulated only as declared (change the plan before running, not "
                         "after)")
    args.reference = plan["reference"]
    args.equivalence_margin = plan["equivalence_margin"]
    if args.noise_baseline is None:
        args.noise_baseline = plan.get("noise_baseline")


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------
def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def make_parser() -> argparse.ArgumentParser:
    methods = "\n".join(f"  {name:<20} {desc}" for name, (desc, _, _) in METHODS.items())
    parser = argparse.ArgumentParser(
        prog="trl-bridge compare", formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
        description=__doc__, epilog=f"methods:\n{methods}",
    )
    parser.add_argument("--config", required=True, help="`trl-bridge train` YAML shared by every method")
    parser.add_argument("--methods", default=None,
                        help=f"comma-separated, from: {','.join(METHODS)} (default: {DEFAULT_METHODS}; with --vary: "
                        "bridge)")
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds, e.g. 0,1,2")
    parser.add_argument("--vary", action="append", default=[], metavar="KEY=V1,V2",
                        help="a one-at-a-time sweep around the config: for each value, one more run of `bridge` with "
                        "`--KEY value` (row `bridge@KEY=value`, compared with the config's `bridge` paired by seed); "
                        "repeatable. Tuning must not see the test split, so it needs --dataset_test_split validation")
    parser.add_argument("--max_steps", type=int, default=None, help="optimizer steps per run (default: the config's)")
    parser.add_argument("--reward_noise", type=float, default=None,
                        help="flip each reward 1<->0 with this probability, seeded (default: the config's, else 0)")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel, one process each")
    parser.add_argument("--report_only", action="store_true",
                        help="train nothing: write results.md / results.json / plots from the runs already completed "
                        "(a grid still in progress, or stopped); the missing ones are listed as not completed")
    parser.add_argument("--earlier_results", action="append", default=[], metavar="RESULTS_JSON",
                        help="a results.json of an earlier grid with the same settings (config, steps, reward noise, "
                        "flags; refused otherwise): its completed (method, seed) runs are tabulated with this grid's "
                        "and not trained again when this grid has no run of its own for them (e.g. extend a "
                        "published grid to more seeds); results.md names the file and the runs taken from it; "
                        "repeatable")
    parser.add_argument("--reuse_runs", action="append", default=[], metavar="DIR",
                        help="a folder of another grid's runs (e.g. its <output_dir>/runs, or committed copies of "
                        "them): a run not completed here whose settings are exactly one of those (config and flags, "
                        "its folders aside; numbers by value) is copied here (its records, not its weights) and "
                        "not trained again; done.json keeps where it came from and results.md names it; repeatable")
    parser.add_argument("--in_process", action="store_true",
                        help="train in this process, one run after another (tests, debugging); peak memory is then "
                        "the process's resident memory sampled during each run")
    parser.add_argument("--cold_start_fraction", type=float, default=0.5, help="cold_start: share of the steps spent on SFT")
    parser.add_argument("--tune", default=None, metavar="TUNING_YAML",
                        help="tune every method alike on the validation split: the plan's trials of each method (the "
                        "same number for all) as rows `method#i`, scored by its rule; writes tuning.json / tuning.md "
                        "(trl_bridge.experiments.tuning). Needs --dataset_test_split validation. With --methods, trains only those "
                        "methods' trials now and reports the whole plan as it stands (the others' winners stay open)")
    parser.add_argument("--tuned", default=None, metavar="TUNING_JSON",
                        help="run each method with the overrides its tuning (a tuning.json of --tune on this config) "
                        "chose, on the config's test split; each method asked for must have its winner (with "
                        "--report_only, one without is reported with its runs missing)")
    parser.add_argument("--heldout_eval_steps", type=int, default=None,
                        help="held-out accuracy every this many steps (default: the config's, else 5)")
    parser.add_argument("--reference", default=None,
                        help="the method every other is compared with (paired by seed) in the Δ column; one of --methods "
                        "(default: bridge)")
    parser.add_argument("--plan", default=None, metavar="PLAN_YAML",
                        help="the table's pre-registered comparison plan (declared before running): methods, seeds, "
                        "reference, the methods compared with it, test, correction, alpha, equivalence margin, and "
                        "optionally config, max_steps, reward_noise, noise_baseline (see configs/plans/*.yaml)."
                        " Recorded in results.json; a grid that does not match it is refused, and its tests are "
                        "withheld until every planned run is completed")
    parser.add_argument("--equivalence_margin", type=float, default=None, metavar="ACCURACY",
                        help="TOST margin: a method is reported 'as good as' the reference only when both one-sided "
                        f"tests reject a difference of ±margin (default: the plan's, else "
                        f"{stats.DEFAULT_EQUIVALENCE_MARGIN})")
    parser.add_argument("--noise_baseline", default=None, metavar="CLEAN_RESULTS_JSON",
                        help="when this grid has noisy rewards: the results.json of the same grid with clean rewards; "
                        "adds each method's clean→noisy drop and its difference to the reference's drop (paired by "
                        "seed, t interval, Holm) (default: the plan's)")
    parser.add_argument("--target_accuracy", type=float, default=0.5, help="held-out accuracy for 'steps to target'")
    parser.add_argument("--smooth", type=int, default=5, help="trailing-mean window of the reward plot")
    parser.add_argument("--output_dir", default="outputs/compare")
    parser.add_argument("--progress_interval", type=float, default=DEFAULT_INTERVAL, metavar="SECONDS",
                        help="while runs train, print every this many seconds one overall line (runs done/total, "
                        "reused, elapsed, estimated remaining time, '?' while unknown) and one line per running run "
                        "(method, seed, step n/N, s/step measured from its train.log); plain lines, so they read the "
                        "same in a terminal, a CI log or through `| tee`. A line also follows each finished run. 0: "
                        f"only those (default {DEFAULT_INTERVAL:g})")
    return parser


def parse_args(argv):
    parser = make_parser()
    args, extra = parser.parse_known_args(argv)
    # --tune with --methods trains only those methods' trials now; the report still covers the whole plan
    args.train_only = sorted(set(_csv(args.methods))) if args.tune is not None and args.methods is not None else []
    if not os.path.isfile(args.config):
        parser.error(f"--config: file not found: {args.config}")
    args.methods = _csv(args.methods if args.methods is not None else "bridge" if args.vary else DEFAULT_METHODS)
    unknown = [m for m in args.methods if m not in METHODS]  # sweep rows (bridge@KEY=V) come from --vary only
    if unknown or not args.methods:
        parser.error(f"--methods: unknown {unknown or 'none given'}; choose from {','.join(METHODS)}")
    for item in args.vary:
        key, sep, values = item.partition("=")
        key = key.strip().removeprefix("--")
        if not sep or not key or not _csv(values) or any(c in key for c in "@=/ "):
            parser.error(f"--vary: expected KEY=V1,V2 (e.g. shadow_learning_rate=1e-5,2e-4), got {item!r}")
        if key in ("seed", "output_dir", "max_steps", "reward_noise", "heldout_eval_steps"):
            parser.error(f"--vary: {key} is set by compare itself and cannot be swept")
        for value in _csv(values):
            if "/" in value:
                parser.error(f"--vary: {key} values must not contain '/', got {value!r}")
            if f"bridge@{key}={value}" not in args.methods:
                args.methods.append(f"bridge@{key}={value}")
    try:
        args.seeds = [int(s) for s in _csv(args.seeds)]
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if not args.seeds or len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds must list distinct integers, got {args.seeds}")
    try:
        with open(args.config) as f:
            base_yaml = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        parser.error(f"--config: {args.config} is not valid YAML: {err}")
    if not isinstance(base_yaml, dict):
        parser.error(f"--config: {args.config} must be a YAML mapping")
    args.trial_overrides, args.tuned_overrides, args.tune_plan = {}, {}, None
    if args.tune is not None:
        if args.vary or args.tuned or args.plan:
            parser.error("--tune runs its own trials: it cannot be combined with --vary, --tuned or --plan")
        try:
            args.tune_plan = tuning.load_tuning_plan(args.tune, METHODS)
        except ValueError as err:
            parser.error(str(err))
        args.trial_overrides = tuning.trial_rows(args.tune_plan)
        outside = [m for m in args.train_only if m not in args.tune_plan["trials"]]
        if outside:
            parser.error(f"--methods: {outside} not in the tuning plan {args.tune} (its methods: "
                         f"{','.join(args.tune_plan['trials'])})")
        args.methods = list(args.trial_overrides)
        if args.reference is None:
            args.reference = next((m for m in args.methods if m.startswith("bridge#")), args.methods[0])
    if args.tuned is not None:
        try:
            # --report_only trains nothing: a method whose tuning is incomplete is reported with its runs missing
            args.tuned_overrides = tuning.load_tuned(args.tuned, base_yaml,
                                                     [] if args.report_only else [m.split("@")[0] for m in args.methods])
        except ValueError as err:
            parser.error(str(err))
    if args.vary or args.tune:  # tuning must never look at the test split
        split = base_yaml.get("dataset_test_split")
        for i, a in enumerate(extra):
            if a == "--dataset_test_split" and i + 1 < len(extra):
                split = extra[i + 1]
            elif a.startswith("--dataset_test_split="):
                split = a.split("=", 1)[1]
        if split != "validation":
            parser.error("--vary and --tune tune hyper-parameters, so their runs must be scored on the validation split, never on "
                         "the test split: add --dataset_test_split validation (the config's data needs one: "
                         "task_num_validation for the built-in task)")
        if args.vary and "bridge" not in args.methods:
            args.methods.insert(0, "bridge")
    if args.reward_noise is None:
        args.reward_noise = float(base_yaml.get("reward_noise") or 0.0)
    if args.max_steps is None:
        args.max_steps = int(base_yaml.get("max_steps", 0))
    args.plan_spec = None
    if args.plan is not None:
        try:
            args.plan_spec = load_plan(args.plan)
            check_plan(args.plan_spec, args)
        except ValueError as err:
            parser.error(str(err))
    if args.reference is None:
        args.reference = "bridge"
    elif args.reference not in args.methods:
        parser.error(f"--reference: {args.reference!r} is not one of --methods ({','.join(args.methods)})")
    if args.equivalence_margin is None:
        args.equivalence_margin = stats.DEFAULT_EQUIVALENCE_MARGIN
    if not args.equivalence_margin > 0:
        parser.error(f"--equivalence_margin must be > 0 (an accuracy difference), got {args.equivalence_margin}")
    if args.noise_baseline is not None and not args.reward_noise > 0:
        parser.error("--noise_baseline is the clean grid of a noisy one: it needs --reward_noise > 0 here")
    if args.heldout_eval_steps is None:
        args.heldout_eval_steps = int(base_yaml.get("heldout_eval_steps") or 5)
    if not 0.0 <= args.reward_noise <= 1.0:
        parser.error(f"--reward_noise must lie in [0, 1], got {args.reward_noise}")
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    for folder in args.reuse_runs:
        if not os.path.isdir(folder):
            parser.error(f"--reuse_runs {folder}: no such folder")
    if not args.progress_interval >= 0:
        parser.error(f"--progress_interval must be >= 0 seconds, got {args.progress_interval}")
    if not 0.0 < args.cold_start_fraction < 1.0:
        parser.error(f"--cold_start_fraction must lie in (0, 1), got {args.cold_start_fraction}")
    if args.heldout_eval_steps < 1:
        parser.error(f"--heldout_eval_steps must be >= 1, got {args.heldout_eval_steps}")
    for key in ("output_dir", "seed"):
        if any(a == f"--{key}" or a.startswith(f"--{key}=") for a in extra):
            parser.error(f"--{key} is set by compare for each run (use --output_dir / --seeds of compare)")
    if args.max_steps < 2:
        parser.error(f"--max_steps must be >= 2 (the config's max_steps or --max_steps), got {args.max_steps}")
    return args, extra, base_yaml


def compare(argv) -> int:
    args, extra, base_yaml = parse_args(argv)
    args.command = shlex.join(["trl-bridge", "compare", *argv])
    runs = build_runs(args, extra, base_yaml)
    for run in runs:  # a changed spec is refused before anything trains
        for stage in run["stages"]:
            _done(stage)
    _check_settings(runs)
    for run, source in reuse.adopt(runs, args.reuse_runs, _spec, _done):
        print(f"[trl-bridge compare] {run['method']}/seed{run['seed']}: the same settings completed in {source}; "
              "its records are copied here (--reuse_runs), not trained again", flush=True)
    earlier = load_earlier_results(args, extra, base_yaml)
    noise = load_noise_baseline(args, extra, base_yaml)
    todo = [r for r in runs if any(_done(s) is None for s in r["stages"]) and (r["method"], r["seed"]) not in earlier]
    left = []
    if args.train_only:  # --tune --methods: the other methods' trials are reported as they stand, not trained
        left = [r for r in todo if r["method"].split("#")[0] not in args.train_only]
        todo = [r for r in todo if r["method"].split("#")[0] in args.train_only]
    reused, jobs = len(runs) - len(todo) - len(left), 1 if args.in_process else args.jobs
    if args.report_only:
        print(f"[trl-bridge compare] {len(runs) - len(todo) - len(left)} of {len(runs)} runs completed under {args.output_dir}/runs; "
              "--report_only: training none", flush=True)
        todo = []
    else:
        every = ("in process: a line as each run finishes" if args.in_process else
                 f"each run's log: <run>/train.log; progress every {args.progress_interval:g}s"
                 if args.progress_interval > 0 else "each run's log: <run>/train.log; a line as each run finishes")
        taken = sum(1 for r in runs if (r["method"], r["seed"]) in earlier and any(_done(s) is None for s in r["stages"]))
        reused_text = (f"{reused} reused" + (f" ({taken} from --earlier_results)" if taken else "")
                       + (f", {len(left)} left for later (not in --methods)" if left else ""))
        print(f"[trl-bridge compare] {len(runs)} runs, {reused_text}, {len(todo)} to train ({jobs} at a time) under "
              f"{args.output_dir}/runs; {every}", flush=True)
    failed: dict[str, str] = {}
    lock = threading.Lock()
    # in-process runs print their own log lines here, so no progress thread then: a line as each run finishes
    progress = CompareProgress(len(runs) - len(left), reused, jobs, interval=0 if args.in_process or not todo else args.progress_interval)

    workers = Workers()

    def job(run):
        if workers.stopped_by is not None:  # stopped by a signal: no other run starts
            return
        name = f"{run['method']}/seed{run['seed']}"
        error = _execute(run, args.in_process, progress, workers)
        with lock:
            if error and workers.stopped_by is not None:  # stopped by the signal: not a failure, it resumes
                progress.emit(progress.stopped(name))
            else:
                if error:
                    failed[name] = error
                progress.emit(progress.finished(name, error))
            write_results(args, runs, failed, earlier, base_yaml, noise)  # partial results survive an interruption

    with progress:  # the progress thread ends with this block, whatever happens in it
        if args.in_process:
            for run in todo:
                job(run)
        else:
            with workers.forwarding_signals(), ThreadPoolExecutor(max_workers=args.jobs) as pool:
                list(pool.map(job, todo))
    write_results(args, runs, failed, earlier, base_yaml, noise)
    print(open(os.path.join(args.output_dir, "results.md")).read())
    if workers.stopped_by is not None:
        print(f"[trl-bridge compare] stopped by {signal.Signals(workers.stopped_by).name}: the runs in flight wrote a "
              "checkpoint; the same command continues them.", flush=True)
        return 128 + workers.stopped_by
    return 1 if failed else 0


def _worker(spec_path: str) -> int:
    with open(spec_path) as f:
        stages = json.load(f)
    for i, stage in enumerate(stages, 1):
        if "progress" in stage:  # where this stage's steps lie in the run, for the parent's progress lines
            p = stage["progress"]
            print(stage_marker(i, len(stages), stage["name"], p["first_step"], p["steps"], p["total"]), flush=True)
        run_stage(stage)
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_run"]:
        return _worker(argv[1])
    try:
        return compare(argv)
    except ValueError as err:
        print(f"trl-bridge compare: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
