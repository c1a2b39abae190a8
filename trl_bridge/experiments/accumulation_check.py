"""`trl-bridge check`: does gradient accumulation give the gradient of the whole batch? A self-check to run before a
long job, in seconds on a tiny model.

    trl-bridge check --config configs/bench/tiny.yaml [--accumulation_steps 2] [--methods bridge,grpo,sft] \\
        [--tolerance 1e-4] [any `trl-bridge train` flag]
    torchrun --nproc_per_node 2 -m trl_bridge.cli check --config ...        # the same under DDP (or accelerate launch)

Engine bugs in gradient accumulation train wrongly in silence: a micro-batch whose gradient is dropped (DeepSpeed did so
under CPU offload) or losses weighted wrongly across micro-batches (OpenRLHF did) leave a run that trains, logs and
looks plausible. For each method (`compare`'s METHODS, default all but `cold_start`, whose two stages are `sft` and
`grpo`), the config's first optimizer step is run twice from the same weights, seed and data:

  (a) gradient accumulation k, micro-batch b (the config's per_device_train_batch_size), SFT micro-batch s
      (sft_per_device_train_batch_size), steps_per_generation k: one generation batch of k·b rollouts per process;
  (b) gradient accumulation 1, one micro-batch of k·b rollouts and k·s traces, steps_per_generation 1: the same
      generation batch, and the SFT stream draws the same k·s·world_size traces (one call instead of k).

Both runs must see the same rollouts: the prompt and completion ids of the generation batch (recorded from
`_generate_and_score_completions`' output by a BridgeTrainer subclass used only here) are compared, and a run whose
rollouts differ fails as inconclusive. The gradients of θ (`base_params`), θ̂ (`shadow_params`) and w
(`adapter_params`) are captured just before the optimizer steps, by a callback placed ahead of `BridgeCallback` (which
applies the θ̂ and w updates there), gathered to full tensors on rank 0 (FSDP2 shards them), and compared per
parameter set: ‖g_a − g_b‖ / ‖g_b‖ ≤ tolerance. The default tolerance 1e-4 is for fp32: the two runs differ only by
rounding in differently shaped matmuls (about 1e-7 on the tiny model), while one dropped micro-batch of two moves a
gradient by about 0.5; under bf16 use about 1e-2. `max_grad_norm` is set to 0, since θ's gradient is clipped before the
capture point and clipping rescales the gradient; the learning rate is irrelevant (the step is captured before it is
taken). Exit code 0: every set of every method passed; 1: a set differed, the rollouts differed, or a set's gradient
was zero in both runs (nothing compared, reported as NOT CHECKED: a random model's rewards are all 0, so its RL
gradients are; `--reward_noise 0.3` makes them vary); 2: a usage error.

The check runs the whole config (model, data, rewards, engine) but only one optimizer step per run, and run (b) holds k
times the activations of (a): for a large model lower `per_device_train_batch_size` (b) with a flag.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import tempfile

import yaml

from .compare import METHODS, _flags

#: `compare` methods whose first optimizer step the check runs (cold_start is `sft` then `grpo`: both are checked).
CHECK_METHODS = tuple(m for m in METHODS if m != "cold_start")
DEFAULT_TOLERANCE = 1e-4
#: Set by the check for runs (a) and (b); a config key or flag of these would break the comparison.
SET_BY_CHECK = ("steps_per_generation", "generation_batch_size")
PARAMETER_SETS = ("θ (base)", "θ̂ (shadow)", "w (adapter)")
ZERO = "zero gradient in both runs"  # nothing compared: reported as not checked, never as a pass
TINY, TINY_SIZE = "tiny-qwen2", (256, 4)  # as `trl-bridge bench`: a random Qwen2 built locally (configs/bench/tiny.yaml)


# ----------------------------------------------------------------------------------------------------------------------
# One run: the config's first optimizer step, with the rollouts and the gradients before the step recorded
# ----------------------------------------------------------------------------------------------------------------------
def _recording_trainer_cls():
    from ..trainer.bridge_trainer import BridgeTrainer

    class RolloutRecordingTrainer(BridgeTrainer):
        """BridgeTrainer that keeps (on CPU) the ids of every generation batch it trains on; nothing else changes."""

        recorded_rollouts: list

        def _generate_and_score_completions(self, inputs):
            output = super()._generate_and_score_completions(inputs)
            if self.model.training:
                keys = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")
                self.recorded_rollouts = [*getattr(self, "recorded_rollouts", []),
                                          {k: output[k].detach().cpu() for k in keys}]
            return output

    return RolloutRecordingTrainer


def _gradient_capture(trainer, seed: int):
    from transformers import TrainerCallback, set_seed

    from ..engines.export import plain_name
    from ..engines.fsdp2 import full_tensor

    class GradientCapture(TrainerCallback):
        """Seeds the run as it starts (the same RNG state at the rollouts of (a) and (b)); before the first optimizer
        step, keeps the full gradients of θ, θ̂ and w (rank 0; a collective under FSDP2, so every rank gathers)."""

        grads: dict | None = None
        theta_stepped_early: dict | None = None  # θ's clipped gradient when θ stepped right after pass A (bf16_delta)

        def on_train_begin(self, args, state, control, **kwargs):
            set_seed(seed)

        def on_step_begin(self, args, state, control, **kwargs):
            delta = getattr(trainer, "delta_shadow", None)  # created by then, sharded under FSDP2
            if delta is None or self.theta_stepped_early is not None or getattr(delta, "_captured", False):
                return
            step_base = delta.step_base

            def capturing(base_optimizer, step):  # θ's gradient, clipped, just before θ takes its step
                if self.theta_stepped_early is None:
                    self.theta_stepped_early = {id(p): None if p.grad is None else p.grad.detach().clone()
                                                for p in delta.base}
                step_base(base_optimizer, step)

            delta.step_base, delta._captured = capturing, True

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            if self.grads is not None:
                return
            import torch

            # θ and w by name in the model as it trains (under FSDP2 `fully_shard` replaced the parameters)
            current = {}
            for n, p in trainer.model.named_parameters():
                current.setdefault(n, p)
                current.setdefault(plain_name(n), p)
            sets = dict(zip(PARAMETER_SETS, ([current.get(n, p) for n, p in trainer.base_params],
                                             list(trainer.shadow_params or []),
                                             [current.get(n, p) for n, p in trainer.adapter_params])))
            # θ̂ stored as a bf16 delta (`shadow_storage: bf16_delta`) keeps its gradient in a bf16 accumulator
            delta = getattr(trainer, "delta_shadow", None)
            held = {id(s): g for s, g in zip(trainer.shadow_params or [], delta.grads)} if delta is not None else {}
            held.update(self.theta_stepped_early or {})  # θ already stepped and released its gradient
            main = trainer.accelerator.is_main_process
            self.grads = {}
            for name, params in sets.items():
                if not params:
                    continue
                flat = []
                for p in params:  # a parameter without a gradient contributed zero
                    grad = held.get(id(p), p.grad)
                    g = full_tensor(grad).double().cpu() if grad is not None else torch.zeros(p.shape, dtype=torch.float64)
                    if main:
                        flat.append(g.flatten())
                self.grads[name] = torch.cat(flat) if main else None

    return GradientCapture()


def _run_once(argv: list[str]) -> tuple[dict, list]:
    """The first optimizer step of `trl-bridge train <argv>`: (gradients per parameter set on rank 0, rollouts)."""
    from transformers import set_seed

    from ..train_cli import make_parser, prepare
    from ..trainer.reporting import CompactLogCallback

    script_args, args, model_args = make_parser().parse_args_and_config(argv)
    script_args.eval_samples, script_args.heldout_eval_steps, script_args.benchmark_eval = 0, 0, None
    set_seed(args.seed)  # the adapter's initialisation included: the same in (a) and (b)
    trainer, _, _ = prepare(script_args, args, model_args, trainer_cls=_recording_trainer_cls())
    trainer.remove_callback(CompactLogCallback)
    capture = _gradient_capture(trainer, args.seed)
    trainer.callback_handler.callbacks.insert(0, capture)  # before BridgeCallback: the gradients before the θ̂/w updates
    trainer.train()
    grads, rollouts = capture.grads, getattr(trainer, "recorded_rollouts", [])
    del trainer
    gc.collect()
    if grads is None:
        raise RuntimeError("the run took no optimizer step, so no gradient was captured")
    return grads, rollouts


def _same_rollouts(a: list, b: list) -> tuple[bool, str]:
    """Whether (a) and (b) trained on the same generation batch, on every process."""
    import torch
    import torch.distributed as dist

    same, detail = len(a) == len(b) == 1, f"{len(a)} and {len(b)} generation batches"
    if same:
        ra, rb = a[0], b[0]
        diff = [k for k in ra if ra[k].shape != rb[k].shape or not torch.equal(ra[k], rb[k])]
        same = not diff
        n = ra["completion_ids"].size(0)
        detail = f"{n} completions per process" + (f"; different {', '.join(diff)}" if diff else "")
    if dist.is_available() and dist.is_initialized():
        flag = torch.tensor([int(same)])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if same and not flag.item():
            detail += "; another process's differ"
        same = bool(flag.item())
    return same, detail


#: θ̂'s gradient under `shadow_storage: bf16_delta` is accumulated in bf16 (one rounding per micro-batch), so
#: accumulation and one batch differ by bf16's rounding (~4e-3 relative), not by fp32's
BF16_ACCUMULATOR_TOLERANCE = 1e-2


def compare_gradients(ga: dict, gb: dict, tolerance: float, bf16_shadow: bool = False) -> list[dict]:
    """Per parameter set: ‖g_a − g_b‖, ‖g_b‖, their ratio and whether it is within `tolerance` (for θ̂ stored as a
    bf16 delta, within `BF16_ACCUMULATOR_TOLERANCE` at least: its gradient accumulator is bf16)."""
    rows = []
    for name in PARAMETER_SETS:
        if name not in ga and name not in gb:
            continue
        if (name in ga) != (name in gb) or ga[name].shape != gb[name].shape:
            rows.append({"parameters": name, "norm_b": float("nan"), "rel_diff": float("inf"), "passed": False,
                         "note": "present in only one run or shaped differently"})
            continue
        norm_b, diff = gb[name].norm().item(), (ga[name] - gb[name]).norm().item()
        if norm_b == 0 and diff == 0:  # nothing to compare: not a pass
            rows.append({"parameters": name, "norm_b": 0.0, "rel_diff": float("nan"), "passed": False,
                         "note": ZERO})
            continue
        rel = diff / norm_b if norm_b > 0 else math.inf
        limit = max(tolerance, BF16_ACCUMULATOR_TOLERANCE) if bf16_shadow and name == PARAMETER_SETS[1] else tolerance
        row = {"parameters": name, "norm_b": norm_b, "rel_diff": rel, "passed": rel <= limit}
        if limit != tolerance:
            row["note"] = f"bf16 gradient accumulator: tolerance {limit:g}"
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# The check: (a) and (b) per method, then the table
# ----------------------------------------------------------------------------------------------------------------------
def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _say(message: str) -> None:
    if _is_main():
        print(message, flush=True)


def _tiny_model_dir(tmp: str, seed: int = 0) -> str:
    """`model_name_or_path: tiny-qwen2`: the random Qwen2 of `trl-bridge bench`, saved as a folder `train` loads."""
    from ..tiny import make_tiny_model, make_tiny_tokenizer

    path = os.path.join(tmp, TINY)
    tokenizer = make_tiny_tokenizer()
    make_tiny_model(tokenizer, hidden_size=TINY_SIZE[0], num_layers=TINY_SIZE[1], seed=seed).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _flag_value(flags: list[str], key: str, default=None):
    """The last value given to `--key` (as `--key value` or `--key=value`) in a flag list, else `default`."""
    value = default
    for i, flag in enumerate(flags):
        if flag == f"--{key}" and i + 1 < len(flags):
            value = flags[i + 1]
        elif flag.startswith(f"--{key}="):
            value = flag.split("=", 1)[1]
    return value


def check(config: str, overrides: list[str], methods: list[str], accumulation_steps: int | None = None,
          tolerance: float = DEFAULT_TOLERANCE) -> dict:
    """Runs (a) and (b) for every method and compares their gradients; returns the results (rank 0's are complete).
    Raises ValueError for a usage error."""
    from ..train_cli import make_parser

    unknown = [m for m in methods if m not in CHECK_METHODS]
    if unknown:
        raise ValueError(f"--methods: unknown {unknown}; choose from {list(CHECK_METHODS)}")
    if not methods:
        raise ValueError("--methods: no method given")
    if not tolerance > 0:
        raise ValueError(f"--tolerance must be > 0, got {tolerance}")
    for key in SET_BY_CHECK:
        if any(flag == f"--{key}" or flag.startswith(f"--{key}=") for flag in overrides):
            raise ValueError(f"--{key}: set by the check for runs (a) and (b); leave it out")
    with open(config) as f:
        base_yaml = yaml.safe_load(f) or {}
    if not isinstance(base_yaml, dict):
        raise ValueError(f"--config {config!r}: not a YAML mapping of `trl-bridge train` keys")
    base_yaml = {k: v for k, v in base_yaml.items() if k not in SET_BY_CHECK}
    world = _world_size()
    results = {"config": config, "overrides": overrides, "world_size": world, "tolerance": tolerance, "methods": {}}
    with tempfile.TemporaryDirectory(prefix="trl-bridge-check-") as tmp:
        def write_config(name, unset=()):
            path = os.path.join(tmp, f"{name}.yaml")
            with open(path, "w") as f:
                yaml.safe_dump({k: v for k, v in base_yaml.items() if k not in unset}, f)
            return path

        # before parsing, which starts torch.distributed under torchrun (transformers then saves on rank 0 only)
        tiny = _flag_value(overrides, "model_name_or_path", base_yaml.get("model_name_or_path")) == TINY
        model_flags = ["--model_name_or_path", _tiny_model_dir(tmp)] if tiny else []
        parsed = make_parser().parse_args_and_config(
            ["--config", write_config("base"), *overrides, *model_flags, "--output_dir", os.path.join(tmp, "parse")])[1]
        b, s = parsed.per_device_train_batch_size, parsed.sft_per_device_train_batch_size
        k = accumulation_steps or (parsed.gradient_accumulation_steps if parsed.gradient_accumulation_steps > 1 else 2)
        if k < 2:
            raise ValueError(f"--accumulation_steps must be >= 2 (1 would compare a run with itself), got {k}")
        results.update(accumulation_steps=k, micro_batch=b, sft_micro_batch=s)
        settings = {
            "a": {"gradient_accumulation_steps": k, "steps_per_generation": k, "per_device_train_batch_size": b,
                  "sft_per_device_train_batch_size": s},
            "b": {"gradient_accumulation_steps": 1, "steps_per_generation": 1, "per_device_train_batch_size": k * b,
                  "sft_per_device_train_batch_size": k * s},
        }
        _say(f"[trl-bridge check] {len(methods)} methods, each one optimizer step twice: (a) accumulation {k} × "
             f"micro-batch {b} (SFT {s}), (b) accumulation 1 × {k * b} (SFT {k * s}); {world} process"
             f"{'es' * (world > 1)}")
        for method in methods:
            _, method_overrides, unset = METHODS[method]
            config_path = write_config(method, unset)
            grads, rollouts = {}, {}
            for run in ("a", "b"):
                fixed = {**settings[run], "max_steps": 1, "max_grad_norm": 0.0, "save_strategy": "no",
                         "push_to_hub": False, "report_to": "none", "logging_steps": 1,
                         "output_dir": os.path.join(tmp, method, run)}
                argv = ["--config", config_path, *overrides, *model_flags, *_flags(method_overrides), *_flags(fixed)]
                grads[run], rollouts[run] = _run_once(argv)
            same, detail = _same_rollouts(rollouts["a"], rollouts["b"])
            storage = _flag_value(overrides, "shadow_storage", base_yaml.get("shadow_storage"))
            bf16_shadow = method_overrides.get("shadow_storage", storage) == "bf16_delta"
            rows = compare_gradients(grads["a"], grads["b"], tolerance, bf16_shadow) if _is_main() else []
            results["methods"][method] = {"rollouts_identical": same, "rollouts": detail, "rows": rows,
                                          "passed": same and all(r["passed"] for r in rows)}
            _say(f"[trl-bridge check] {method}: " + ("; ".join(f"{r['parameters']} {r['rel_diff']:.1e}" for r in rows)
                                                     if same else f"the rollouts differ ({detail})"))
    results["passed"] = all(m["passed"] for m in results["methods"].values())
    return results


def format_table(results: dict) -> str:
    k, b, s, tol = results["accumulation_steps"], results["micro_batch"], results["sft_micro_batch"], results["tolerance"]
    world = results["world_size"]
    lines = [f"Gradient accumulation vs one batch, one optimizer step: (a) accumulation {k} × micro-batch {b} (SFT {s}) "
             f"against (b) 1 × {k * b} (SFT {k * s}), {world} process{'es' * (world > 1)}; tolerance {tol:g} on "
             "‖g_a − g_b‖ / ‖g_b‖", "",
             "| method | parameters | ‖g_b‖ | ‖g_a − g_b‖ / ‖g_b‖ | result |", "|---|---|---|---|---|"]
    failures, unchecked = [], []
    for method, m in results["methods"].items():
        if not m["rollouts_identical"]:
            failures.append(f"{method}: the rollouts of (a) and (b) differ ({m['rollouts']}), so their gradients cannot "
                            "be compared")
        for r in m["rows"]:
            if not m["rollouts_identical"]:
                verdict = "NOT COMPARED (rollouts differ)"
            elif r.get("note") == ZERO:
                verdict = "NOT CHECKED (zero gradient)"
                unchecked.append(f"{method} {r['parameters']}")
            elif r["passed"]:
                verdict = "pass"
            else:
                verdict = "FAIL"
                failures.append(f"{method} {r['parameters']} ({r['rel_diff']:.1e} > {tol:g}"
                                + (f"; {r['note']}" if r.get("note") else "") + ")")
            lines.append(f"| {method} | {r['parameters']} | {r['norm_b']:.3e} | {r['rel_diff']:.1e} | {verdict} |")
    lines.append("")
    same = [m for m in results["methods"].values() if m["rollouts_identical"]]
    if same:
        lines.append(f"rollouts: identical in (a) and (b) for {len(same)} of {len(results['methods'])} methods "
                     f"({same[0]['rollouts']})")
    if failures:
        lines.append("FAIL: " + "; ".join(failures))
    if unchecked:
        lines.append("NOT CHECKED: " + ", ".join(unchecked) + ": the gradient is zero in both runs, so accumulation "
                     "was not tested there (an RL gradient is zero when every prompt group's rollouts got equal rewards, "
                     "e.g. all 0 on a random model: add reward noise, `--reward_noise 0.3`, or use a model that solves "
                     "some prompts)")
    if not failures and not unchecked:
        lines.append("PASS: gradient accumulation gives the gradient of the whole batch for every method and parameter set")
    return "\n".join(lines)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="trl-bridge check",
        description="Gradient-accumulation self-check before a long job: for each method, the config's first "
        "optimizer step with accumulation k (micro-batch b) and with one micro-batch of k·b, on the same rollouts and "
        "SFT traces; the gradients of θ, θ̂ and w must agree. Any other option (e.g. --max_completion_length 16) "
        "overrides the config in every run. Exit code 0: pass; 1: a parameter set differs, the rollouts differ, or a "
        "set's gradient is zero in both runs (not checked).",
    )
    p.add_argument("--config", required=True, help="a `trl-bridge train` YAML config (e.g. configs/bench/tiny.yaml)")
    p.add_argument("--accumulation_steps", type=int, default=None,
                   help="k of run (a) (default: the config's gradient_accumulation_steps when > 1, else 2)")
    p.add_argument("--methods", default=",".join(CHECK_METHODS),
                   help=f"comma-separated, from {list(CHECK_METHODS)} (`trl-bridge compare`'s methods; default: all)")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help=f"largest ‖g_a − g_b‖ / ‖g_b‖ that passes (default {DEFAULT_TOLERANCE:g}, for fp32; about 1e-2 "
                   "under bf16)")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, overrides = make_parser().parse_known_args(argv)
    import warnings

    import datasets
    from transformers.utils import logging as hf_logging

    # the progress bars of loading and tokenising, once per run, and PEFT's deprecation warning: noise around the table
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated", category=FutureWarning)
    if not os.path.isfile(args.config):
        print(f"trl-bridge check: error: --config {args.config!r} does not exist", file=sys.stderr)
        return 2
    try:
        results = check(args.config, overrides, [m.strip() for m in args.methods.split(",") if m.strip()],
                        args.accumulation_steps, args.tolerance)
    except ValueError as err:  # (a bad `trl-bridge train` flag: TrlParser has printed it and exited with 2)
        print(f"trl-bridge check: error: {err}", file=sys.stderr)
        return 2
    code = 0 if results["passed"] else 1
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():  # rank 0 compared the gradients: its verdict is every rank's
        verdict = [code]
        dist.broadcast_object_list(verdict, src=0)
        code = verdict[0]
    if _is_main():
        print(format_table(results))
    return code


if __name__ == "__main__":
    sys.exit(main())
