"""Compare BRIDGE with its baselines on one config, same seed, same data, same budget of optimizer steps.

    python -m trl_bridge.compare --config configs/quickstart.yaml --max_steps 10 --output_dir outputs/compare

Variants (each is the config plus a few overrides):
  bridge               the config as is
  grpo                 λ = 1 (BridgeTrainer at λ = 1 is GRPO step for step)
  sft                  λ = 0 (SFT of π(θ+w))
  mix                  the paper's "w/o J_meta": naive (1−λ)·SFT + λ·RL mixing, no shadow
  sft_then_rl          two-stage: SFT (λ = 0) for half the steps, then GRPO (λ = 1) from that model for the other half
  bridge_truncated_is  BRIDGE with the shadow's truncated importance weights (`shadow_off_policy: truncated_is`)

Writes `results.json`, `results.md` (held-out accuracy before/after, mean reward over the last half of training, its
step-to-step standard deviation, wall time) and `reward_curves.png` to `--output_dir`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

VARIANTS = {
    "bridge": [],
    "grpo": ["--bridge_lambda", "1.0", "--bridge_lambda_end", "1.0"],
    "sft": ["--bridge_lambda", "0.0", "--bridge_lambda_end", "0.0"],
    "mix": ["--bridge_meta_term", "false"],
    "bridge_truncated_is": ["--shadow_off_policy", "truncated_is"],
}
TWO_STAGE = "sft_then_rl"


def _run(argv: list[str]):
    from .train_cli import make_parser, run

    script_args, training_args, model_args = make_parser().parse_args_and_config(argv)
    start = time.perf_counter()
    heldout = run(script_args, training_args, model_args)
    rewards = [h["reward"] for h in _reward_history(training_args.output_dir)]
    return heldout, rewards, time.perf_counter() - start


def _reward_history(output_dir: str) -> list[dict]:
    from .reporting import read_metrics_jsonl

    return [h for h in read_metrics_jsonl(os.path.join(output_dir, "metrics.jsonl")) if "reward" in h]


def compare(config: str, variants: list[str], max_steps: int, output_dir: str, extra: list[str]) -> dict:
    results = {}
    # one log entry per step: the reward curve is read from it (GRPOConfig's default logs every 10 steps)
    common = ["--config", config, "--max_steps", str(max_steps), "--save_strategy", "no", "--logging_steps", "1", *extra]
    for name in variants:
        out = os.path.join(output_dir, name)
        if name == TWO_STAGE:
            half = max(1, max_steps // 2)
            stage1 = os.path.join(out, "sft")
            h1, r1, t1 = _run([*common, *VARIANTS["sft"], "--max_steps", str(half), "--output_dir", stage1])
            h2, r2, t2 = _run([*common, *VARIANTS["grpo"], "--max_steps", str(max_steps - half), "--output_dir",
                               os.path.join(out, "rl"), "--model_name_or_path", stage1, "--eval_before", "false"])
            heldout = {"heldout_accuracy_before": h1.get("heldout_accuracy_before"),
                       "heldout_accuracy_after": h2.get("heldout_accuracy_after")}
            rewards, seconds = r1 + r2, t1 + t2
        elif name in VARIANTS:
            heldout, rewards, seconds = _run([*common, *VARIANTS[name], "--output_dir", out])
        else:
            raise ValueError(f"unknown variant {name!r}; choose from {sorted([*VARIANTS, TWO_STAGE])}")
        last_half = rewards[len(rewards) // 2 :] or rewards
        results[name] = {
            **heldout,
            "reward_curve": rewards,
            "reward_last_half_mean": statistics.fmean(last_half) if last_half else None,
            "reward_last_half_std": statistics.pstdev(last_half) if len(last_half) > 1 else 0.0,
            "seconds": seconds,
        }
        _write(results, output_dir)
    return results


def _write(results: dict, output_dir: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    lines = ["| variant | held-out acc. before | after | reward (last half, mean ± std) | wall time (s) |", "|---|---|---|---|---|"]
    for name, r in results.items():
        fmt = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(f"| {name} | {fmt(r.get('heldout_accuracy_before'))} | {fmt(r.get('heldout_accuracy_after'))} | "
                     f"{fmt(r['reward_last_half_mean'])} ± {fmt(r['reward_last_half_std'])} | {r['seconds']:.0f} |")
    with open(os.path.join(output_dir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in results.items():
        ax.plot(range(1, len(r["reward_curve"]) + 1), r["reward_curve"], marker="o", label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("mean reward of the step's rollouts")
    ax.set_title("BRIDGE vs baselines")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(output_dir, "reward_curves.png"), dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trl_bridge.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="trl-bridge train YAML config shared by every variant")
    parser.add_argument("--variants", default="bridge,grpo,mix,sft_then_rl,bridge_truncated_is",
                        help="comma-separated variants (see above)")
    parser.add_argument("--max_steps", type=int, default=10, help="optimizer steps per variant")
    parser.add_argument("--output_dir", default="outputs/compare")
    args, extra = parser.parse_known_args(argv)
    results = compare(args.config, [v.strip() for v in args.variants.split(",") if v.strip()], args.max_steps,
                      args.output_dir, extra)
    print(open(os.path.join(args.output_dir, "results.md")).read())
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
