"""`trl-bridge compare --reuse_runs DIR`: adopt completed runs of another grid whose settings are this grid's.

A run is the same run when every one of its stages has the same config and the same `trl-bridge train` flags, its
folders aside (`--output_dir`, `--config`, a cold start's `--model_name_or_path`) and numbers compared by value
("1e-3" = "0.001"). Such a run is not trained again: its small files (done.json, metrics.jsonl, the held-out
records, its config and log; no weights, no checkpoints) are copied into this grid's folder, and its done.json
records where it came from (`reused_from`) and keeps its own commit. A run is adopted whole or not at all: a cold
start whose RL stage is missing would need the SFT stage's weights.
"""

from __future__ import annotations

import json
import os
import re
import shutil

# a run's own folder inside a grid: <output_dir>/runs/<method>/seed<k>, in any path of its flags
_RUN_DIR = re.compile(r"^.*?[/\\]runs[/\\][^/\\]+[/\\]seed\d+")
# files a run's record is made of; larger files (weights, tokenizer, optimizer state) are not needed to tabulate it
_MAX_BYTES = 5 * 1024 * 1024
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def _canonical(value: str):
    """A flag value as compared: a path inside a run's folder relative to it, a number by value."""
    value = _RUN_DIR.sub("<run>", value)
    try:
        number = float(value)
    except ValueError:
        return value
    return value if number != number else number  # NaN stays its text


def settings_key(spec: dict) -> str:
    """What makes two stages the same training: config (its output_dir aside: every stage's flags set it) and flags."""
    config = {k: v for k, v in spec["config"].items() if k != "output_dir"}
    return json.dumps({"config": config, "argv": [_canonical(a) for a in spec["argv"]]}, sort_keys=True, default=str)


def index(roots: list[str]) -> dict[str, str]:
    """settings key -> folder of a completed stage, for every done.json under the roots (first found wins)."""
    found: dict[str, str] = {}
    for root in roots:
        if not os.path.isdir(root):
            raise ValueError(f"--reuse_runs {root}: no such folder")
        for folder, dirs, files in sorted(os.walk(root)):
            dirs.sort()
            if "done.json" in files:
                with open(os.path.join(folder, "done.json")) as f:
                    done = json.load(f)
                if "spec" in done:
                    found.setdefault(settings_key(done["spec"]), folder)
    return found


def _copy_record(source: str, target: str) -> None:
    os.makedirs(target, exist_ok=True)
    for name in sorted(os.listdir(source)):
        path = os.path.join(source, name)
        if (name == "done.json" or not os.path.isfile(path) or name.endswith(_SKIP_SUFFIXES)
                or os.path.getsize(path) > _MAX_BYTES):
            continue
        shutil.copy2(path, os.path.join(target, name))


def adopt(runs: list[dict], roots: list[str], spec_of, done_of) -> list[tuple[dict, str]]:
    """Adopt every not-yet-completed run of `runs` whose stages all have a completed twin under `roots`.

    `spec_of(stage)` is the spec a stage's done.json must hold here, `done_of(stage)` its done.json or None.
    Returns (run, source folder of its first stage) for each adopted run.
    """
    if not roots:
        return []
    found = index(roots)
    adopted = []
    for run in runs:
        stages = run["stages"]
        if all(done_of(s) is not None for s in stages):
            continue
        sources = [found.get(settings_key(spec_of(s))) for s in stages]
        if any(s is None for s in sources) or any(done_of(s) is not None for s in stages):
            continue  # whole or nothing: a run with a stage completed here keeps its own records
        for stage, source in zip(stages, sources):
            _copy_record(source, stage["dir"])
            with open(os.path.join(source, "done.json")) as f:
                done = json.load(f)
            done["reused_from"] = {"dir": source, "spec": done["spec"]}
            done["spec"] = spec_of(stage)
            with open(os.path.join(stage["dir"], "done.json"), "w") as f:
                json.dump(done, f, indent=1)
        adopted.append((run, sources[0]))
    return adopted
