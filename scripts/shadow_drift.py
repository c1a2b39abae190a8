"""How far the bf16-delta shadow (`shadow_storage: bf16_delta`) drifts from an fp32 shadow on the same run.

    python scripts/shadow_drift.py [--steps 1,10,40] [--learning_rates 1e-4,1e-6] [--json docs/bench/shadow_drift.json]

The tiny model of the test suite, every weight trainable, CPU, fp32 compute. The adapter's learning rate is 0, so θ,
w and therefore the rollouts are the same in every run whatever θ̂ does: the runs differ only in how θ̂ is stored and
trained, and the differences below are that storage's, not the chaos of different samples. Printed, at each step:

    θ̂ rel. error   ‖θ̂_x − θ̂_ref‖ / ‖θ̂_ref − θ⁰‖ over all trainable weights (θ⁰: the initial weights)
    gain error     |gain_x − gain_ref| / mean over steps ≤ this one of |gain_ref|, for the logged `bridge/cooperative_gain`

for x = bf16_delta against ref = lean (the same optimizer, momentum-free factored Adafactor, on an fp32 θ̂: the
compression alone) and against ref = full (the default: AdamW on an fp32 θ̂: compression and optimizer together), and,
for scale, lean against full.
"""

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.helpers import make_trainer  # noqa: E402  (the test suite's tiny BRIDGE set-up)
from trl_bridge.tiny import make_tiny_tokenizer  # noqa: E402

torch.set_num_threads(1)


class Snapshots(TrainerCallback):
    def __init__(self, trainer, steps):
        self.trainer, self.steps, self.shadows = trainer, set(steps), {}

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.steps:
            self.shadows[state.global_step] = self.trainer.shadow_state_dict()


def run(storage: str, steps: list[int], lr: float, out: Path) -> dict:
    trainer = make_trainer(make_tiny_tokenizer(), out, shadow_storage=storage, max_steps=max(steps), learning_rate=lr,
                           adapter_learning_rate=0.0, max_grad_norm=1.0)
    theta0 = {n: p.detach().clone() for n, p in trainer.base_params}
    snaps = Snapshots(trainer, steps)
    trainer.add_callback(snaps)
    trainer.train()
    gains = [h["bridge/cooperative_gain"] for h in trainer.state.log_history if "bridge/cooperative_gain" in h]
    return {"theta0": theta0, "shadows": snaps.shadows, "gains": gains}


def relative_error(x: dict, ref: dict, theta0: dict) -> float:
    num = sum(((x[n] - ref[n]).double() ** 2).sum() for n in ref) ** 0.5
    den = sum(((ref[n] - theta0[n]).double() ** 2).sum() for n in ref) ** 0.5
    return float(num / den)


def gain_error(x: list, ref: list, step: int) -> float | None:
    scale = sum(abs(g) for g in ref[:step]) / step
    return abs(x[step - 1] - ref[step - 1]) / scale if scale else None  # every gain so far 0: nothing to compare


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", default="1,10,40")
    parser.add_argument("--learning_rates", default="1e-4,1e-6", help="θ's and θ̂'s learning rates, one run set each")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    steps = [int(s) for s in args.steps.split(",")]
    rows = []
    for lr in [float(x) for x in args.learning_rates.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            runs = {s: run(s, steps, lr, Path(tmp) / s) for s in ("full", "lean", "bf16_delta")}
        theta0 = runs["full"]["theta0"]
        for x, ref in (("bf16_delta", "lean"), ("bf16_delta", "full"), ("lean", "full")):
            for step in steps:
                rows.append({
                    "learning_rate": lr, "compared": f"{x} vs {ref}", "step": step,
                    "theta_hat_rel_error": relative_error(runs[x]["shadows"][step], runs[ref]["shadows"][step], theta0),
                    "gain_rel_error": gain_error(runs[x]["gains"], runs[ref]["gains"], step),
                    "gain": runs[x]["gains"][step - 1], "gain_ref": runs[ref]["gains"][step - 1],
                })
    print("tiny model, every weight trainable, fp32, w frozen (the same rollouts in every run); gain error: n/a while "
          "every gain so far is 0 (θ̂ = θ at step 1)")
    print(f"{'lr':>7}  {'compared':<20}{'step':>5}{'θ̂ rel. error':>15}{'gain error':>12}{'gain':>12}{'gain ref':>12}")
    for r in rows:
        gain_err = "n/a" if r["gain_rel_error"] is None else f"{r['gain_rel_error']:.2e}"
        print(f"{r['learning_rate']:>7.0e}  {r['compared']:<20}{r['step']:>5}{r['theta_hat_rel_error']:>15.2e}"
              f"{gain_err:>12}{r['gain']:>12.3e}{r['gain_ref']:>12.3e}")
    if args.json:
        Path(args.json).write_text(json.dumps({"command": "python scripts/shadow_drift.py " + " ".join(sys.argv[1:]),
                                               "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
