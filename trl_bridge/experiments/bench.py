"""`trl-bridge bench`: what BRIDGE costs against GRPO and naive mixing, per phase, on the same model, data and seed.

    trl-bridge bench --config configs/bench/tiny.yaml --output outputs/bench_tiny.json [--warmup 2 --steps 6]

Each variant trains in its own worker process (so that its peak memory is its own) and the workers take turns, one
optimizer step at a time, in a rotating order, so that machine noise hits every variant alike. Variants:

  grpo          TRL's GRPOTrainer on the same trainable weights θ (no adapter, no SFT)
  naive_mixing  BridgeTrainer without the meta term: (1−λ)L_SFT + λL_RL on θ and w, no shadow θ̂
  bridge        BridgeTrainer as configured
  bridge_lean   BridgeTrainer with `shadow_storage: lean`
  bridge_bf16_delta  BridgeTrainer with `shadow_storage: bf16_delta` (not in the default list)
  bridge_shadow50, bridge_shadow25  BridgeTrainer with `shadow_fraction` 0.5 / 0.25 (pass B on that share of the
                prompt groups; not in the default list: use a config with several prompt groups per generation batch)
  bridge_bf16_delta_shadow50  both: the compressed shadow and pass B on half of the prompt groups

Per variant: seconds per optimizer step split into generation / rl (pass A's RL forward+backward) / sft / shadow (pass
B and the shadow's sampling-time log-probs) / optimizer (the three optimizer steps) / other, peak memory (RSS on CPU,
with glibc's mmap threshold held at 128 KiB so that freed activations leave the RSS; CUDA peak on GPU; both from the
start of training) and each phase's own peak, the bytes of training state (weights, gradients, optimizer states)
and rollout tokens per second; ratios to GRPO; and BRIDGE's algorithmic floor, GRPO's step + one more RL pass + the
SFT pass, all from the same run. Generation is forced to `max_completion_length` tokens so that every variant
generates the same number of tokens. While it runs, plain progress lines on stdout give the variant (i/N), its step
(n/N, warmup or measured), its mean seconds per step, the time elapsed and an estimate of the time remaining.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from .progress import DEFAULT_INTERVAL, BenchProgress, format_duration

VARIANTS = {
    "grpo": None,
    "naive_mixing": ["--bridge_meta_term", "false"],
    "bridge": [],
    "bridge_lean": ["--shadow_storage", "lean"],
    "bridge_bf16_delta": ["--shadow_storage", "bf16_delta"],
    "bridge_shadow50": ["--shadow_fraction", "0.5"],
    "bridge_shadow25": ["--shadow_fraction", "0.25"],
    "bridge_bf16_delta_shadow50": ["--shadow_storage", "bf16_delta", "--shadow_fraction", "0.5"],
}
DEFAULT_VARIANTS = ("grpo", "naive_mixing", "bridge", "bridge_lean")
MMAP_THRESHOLD = 1 << 17  # bytes (glibc's initial value, held fixed): see _Worker
TINY, TINY_SIZE = "tiny-qwen2", (256, 4)  # `model_name_or_path: tiny-qwen2`: a random Qwen2, hidden 256, 4 layers
PHASES = ("generation", "rl", "sft", "shadow", "optimizer", "other")
# the PhaseTimer phases whose own peak memory bench reports, and their column names
PEAK_PHASES = (("generation", "generation"), ("training_step", "rl (pass A)"), ("sft", "sft"),
               ("shadow_logps", "shadow logps"), ("shadow", "shadow (pass B)"), ("optimizer", "optimizer"),
               ("other", "other"))
TARGETS = {"overhead_vs_floor": 1.10, "step_vs_grpo_generation_heavy": 1.5, "memory_vs_grpo": 1.5, "memory_lean_vs_grpo": 1.25,
           "memory_bf16_delta_vs_grpo": 1.15}


# ----------------------------------------------------------------------------------------------------------------------
# Worker: one variant, one process. Steps when the parent says so; reports each step's phase times on a pipe.
# ----------------------------------------------------------------------------------------------------------------------
def _peak_rss_reset():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (Linux >= 4.0), so the peak is training's, not model loading's
    except OSError:
        pass


def _peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _state_bytes(trainer) -> int:
    """Bytes of weights (policy, reference, shadow), gradients and optimizer states, each storage counted once."""
    import torch

    seen, total = set(), 0

    def add(t):
        nonlocal total
        if torch.is_tensor(t):
            t = getattr(t, "_local_tensor", t)
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()

    models = [trainer.model] + ([trainer.ref_model] if getattr(trainer, "ref_model", None) is not None else [])
    for m in models:
        for p in m.parameters():
            add(p)
            add(p.grad)
    for s in getattr(trainer, "shadow_params", None) or []:
        add(s)
        add(s.grad)
    delta = getattr(trainer, "delta_shadow", None)  # shadow_storage="bf16_delta": d and θ̂'s bf16 gradient accumulators
    for t in [] if delta is None else delta.deltas + delta.grads:
        add(t)
    for opt in (trainer.optimizer, getattr(trainer, "shadow_optimizer", None), getattr(trainer, "adapter_optimizer", None)):
        if opt is not None:
            for st in getattr(opt, "optimizer", opt).state.values():
                for v in st.values():
                    add(v)
    return total


def _build(variant: str, argv: list[str]):
    import dataclasses

    from transformers import AutoTokenizer
    from trl import GRPOConfig
    from trl.trainer.utils import create_model_from_path

    from ..profiling import ProfiledGRPOTrainer
    from ..trainer.bridge_config import BridgeConfig
    from ..trainer.bridge_trainer import BridgeTrainer
    from ..trainer.model_setup import select_base_params
    from ..models import resolve_model_path
    from ..tasks.rewards import get_reward_funcs
    from ..train_cli import load_datasets, make_parser

    script_args, args, model_args = make_parser().parse_args_and_config(argv)
    script_args.eval_samples = 0
    if model_args.model_name_or_path == TINY:  # built locally, the same in every worker (seeded)
        from ..tiny import make_tiny_model, make_tiny_tokenizer

        tokenizer = make_tiny_tokenizer()
        model_path = None
    else:
        model_path = resolve_model_path(model_args.model_name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    rl, sft, _ = load_datasets(script_args, args.seed)
    reward_funcs = get_reward_funcs(script_args.reward_funcs)
    init_kwargs = {"dtype": model_args.dtype or "float32", **(args.model_init_kwargs or {})}
    gen_kwargs = dict(args.generation_kwargs or {})
    gen_kwargs["min_new_tokens"] = args.max_completion_length  # equal work per rollout for every variant
    args.generation_kwargs = gen_kwargs
    if model_path is None:
        model = make_tiny_model(tokenizer, hidden_size=TINY_SIZE[0], num_layers=TINY_SIZE[1])
    else:
        model = create_model_from_path(model_path, **init_kwargs)
    if variant != "grpo":
        return BridgeTrainer(model=model, reward_funcs=reward_funcs, args=args, train_dataset=rl, sft_dataset=sft,
                             processing_class=tokenizer)
    theta = {n for n, _ in select_base_params(model, args.trainable_base_parameters)}
    for n, p in model.named_parameters():
        p.requires_grad_(n in theta)  # the same θ as BRIDGE's
    # GRPOConfig with what this run set (fields GRPOConfig derives in __post_init__ stay underived where unchanged)
    default = BridgeConfig(output_dir=args.output_dir)
    names = {f.name for f in dataclasses.fields(GRPOConfig) if f.init} - {"model_init_kwargs"}
    always = {"bf16", "gradient_checkpointing", "logging_steps", "per_device_train_batch_size", "num_generations"}
    grpo_args = GRPOConfig(**{k: v for k, v in vars(args).items()
                              if k in names and (k in always or v != getattr(default, k, None))})
    return ProfiledGRPOTrainer(model=model, reward_funcs=reward_funcs, args=grpo_args, train_dataset=rl,
                               processing_class=tokenizer)


def _worker(variant: str, fd: int, argv: list[str]) -> int:
    import torch
    from transformers import TrainerCallback

    out = os.fdopen(fd, "w", buffering=1)
    trainer = _build(variant, argv)
    cuda = torch.cuda.is_available()
    phases = trainer.phases  # BridgeTrainer's and ProfiledGRPOTrainer's PhaseTimer (trl_bridge.profiling)
    phases.synchronize = True
    # each phase's own peak: read and reset at every phase boundary (the step's peak is the largest of them)
    phases.memory = ((torch.cuda.max_memory_allocated, torch.cuda.reset_peak_memory_stats) if cuda
                     else (_peak_rss_bytes, _peak_rss_reset))
    clock = phases.clock

    class Turns(TrainerCallback):
        def _wait(self):
            if sys.stdin.readline().strip() != "go":
                raise SystemExit(0)

        def on_train_begin(self, args, state, control, **kw):
            _peak_rss_reset()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            out.write(json.dumps({"ready": True}) + "\n")

        def on_step_begin(self, args, state, control, **kw):
            self._wait()
            phases.clear()
            self.tokens0 = state.num_input_tokens_seen
            self.t0 = clock()

        def on_pre_optimizer_step(self, args, state, control, **kw):
            self.t_opt = phases.enter("optimizer")

        def on_optimizer_step(self, args, state, control, **kw):
            self.opt = clock() - self.t_opt
            phases.exit("optimizer", self.t_opt)

        def on_step_end(self, args, state, control, **kw):
            total = clock() - self.t0
            seconds = phases.seconds
            shadow_logps, pass_b, sft = seconds["shadow_logps"], seconds["shadow"], seconds["sft"]
            generation, training_step = seconds["generation"], seconds["training_step"]
            step = {  # "training_step" holds the rollouts when due and pass A; pass B follows it
                "generation": generation,
                "rl": training_step - generation - shadow_logps - sft,
                "sft": sft,
                "shadow": pass_b + shadow_logps,
                "optimizer": self.opt,
                "other": total - training_step - pass_b - self.opt,
            }
            tokens = int(state.num_input_tokens_seen - self.tokens0)
            out.write(json.dumps({"step": state.global_step, "total": total, "phases": step, "tokens": tokens}) + "\n")

    trainer.callback_handler.callbacks.insert(0, Turns())  # before BridgeCallback: its updates count as "optimizer"
    trainer.train()
    phases._boundary()  # the end of training counts as "other"
    by_phase = dict(phases.peak_bytes)
    memory = {"peak_bytes_by_phase": by_phase, "state_bytes": _state_bytes(trainer)}
    if cuda:
        memory["cuda_peak_bytes"], memory["peak_rss_bytes"] = max(by_phase.values()), _peak_rss_bytes()
    else:
        memory["peak_rss_bytes"] = max(by_phase.values())
    out.write(json.dumps({"done": True, "memory": memory}) + "\n")
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# Parent: start the workers, hand out turns, summarise
# ----------------------------------------------------------------------------------------------------------------------
class _Worker:
    def __init__(self, variant, argv, log_dir):
        read_fd, write_fd = os.pipe()
        cmd = [sys.executable, "-m", "trl_bridge.experiments.bench", "--_worker", variant, "--_fd", str(write_fd), "--", *argv]
        self.log_path = os.path.join(log_dir, f"{variant}.log")
        self.log = open(self.log_path, "w")
        # glibc's mmap threshold starts at 128 KiB and rises as large blocks are freed, after which freed activations
        # stay resident: RSS would count memory the process no longer uses (0.8 GiB more for naive mixing than for GRPO
        # between passes on SmolLM2). Held at 128 KiB, every larger block returns to the system when freed, so the peak
        # RSS is the peak of live memory; smaller blocks come from the heap and are reused.
        env = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), **os.environ}
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=self.log, stderr=subprocess.STDOUT, text=True, env=env,
                                     pass_fds=(write_fd,))
        os.close(write_fd)
        self.messages = os.fdopen(read_fd)
        self.variant = variant

    def receive(self) -> dict:
        line = self.messages.readline()
        if not line:
            self.proc.wait()
            with open(self.log_path) as f:
                tail = f.read()[-3000:]
            raise RuntimeError(f"bench worker {self.variant!r} exited with code {self.proc.returncode}:\n{tail}")
        return json.loads(line)

    def go(self) -> dict:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return self.receive()


def _mean(xs):
    return statistics.fmean(xs) if xs else float("nan")


def summarise(raw: dict, warmup: int) -> dict:
    """Per-variant means over the measured steps, ratios to GRPO, BRIDGE's floor and the targets."""
    variants = {}
    for name, r in raw.items():
        steps = r["steps"][warmup:]
        total = _mean([s["total"] for s in steps])
        variants[name] = {
            "seconds_per_step": total,
            "seconds_per_step_std": statistics.pstdev([s["total"] for s in steps]) if len(steps) > 1 else 0.0,
            "phases": {p: _mean([s["phases"][p] for s in steps]) for p in PHASES},
            "tokens_per_second": _mean([s["tokens"] / s["total"] for s in steps]),
            "memory": r["memory"],
            "measured_steps": len(steps),
        }
    summary = {"variants": variants}
    full = variants.get("bridge")
    if full:  # BRIDGE's own options (lean shadow, shadow_fraction) against BRIDGE as configured, in the same run
        for name, v in variants.items():
            if name.startswith("bridge_"):
                v["step_vs_bridge"] = v["seconds_per_step"] / full["seconds_per_step"]
                v["shadow_vs_bridge"] = v["phases"]["shadow"] / full["phases"]["shadow"] if full["phases"]["shadow"] else None
                mem_key = "cuda_peak_bytes" if "cuda_peak_bytes" in full["memory"] else "peak_rss_bytes"
                v["peak_memory_vs_bridge"] = v["memory"][mem_key] / full["memory"][mem_key]
    grpo = variants.get("grpo")
    if grpo:
        mem_key = "cuda_peak_bytes" if "cuda_peak_bytes" in grpo["memory"] else "peak_rss_bytes"
        for v in variants.values():
            v["step_vs_grpo"] = v["seconds_per_step"] / grpo["seconds_per_step"]
            v["peak_memory_vs_grpo"] = v["memory"][mem_key] / grpo["memory"][mem_key]
            v["state_bytes_vs_grpo"] = v["memory"]["state_bytes"] / grpo["memory"]["state_bytes"]
        targets = {}
        for name in [v for v in variants if v.startswith("bridge")]:
            b = variants[name]
            floor = grpo["seconds_per_step"] + grpo["phases"]["rl"] + b["phases"]["sft"]
            b["floor_seconds"] = floor
            b["overhead_vs_floor"] = b["seconds_per_step"] / floor
            limit = TARGETS.get(f"memory_{name[len('bridge_'):]}_vs_grpo", TARGETS["memory_vs_grpo"])
            targets[name] = {
                "overhead_vs_floor": [b["overhead_vs_floor"], TARGETS["overhead_vs_floor"]],
                "step_vs_grpo": [b["step_vs_grpo"], TARGETS["step_vs_grpo_generation_heavy"]],
                "peak_memory_vs_grpo": [b["peak_memory_vs_grpo"], limit],
            }
        summary["memory_measure"] = mem_key
        summary["targets"] = {n: {k: {"value": v, "limit": lim, "met": v <= lim} for k, (v, lim) in t.items()}
                              for n, t in targets.items()}
    return summary


def format_table(summary: dict) -> str:
    rows = ["| variant | s/step | " + " | ".join(PHASES) + " | tokens/s | peak mem (GiB) | state (GiB) | step × GRPO "
            "| memory × GRPO | step ÷ floor |",
            "|---" * (len(PHASES) + 8) + "|"]
    for name, v in summary["variants"].items():
        mem = v["memory"].get("cuda_peak_bytes", v["memory"]["peak_rss_bytes"]) / 2**30
        rows.append(
            f"| {name} | {v['seconds_per_step']:.3f} | " + " | ".join(f"{v['phases'][p]:.3f}" for p in PHASES)
            + f" | {v['tokens_per_second']:.0f} | {mem:.2f} | {v['memory']['state_bytes'] / 2**30:.3f}"
            + "".join(f" | {v[k]:.2f}" if k in v else " | –" for k in ("step_vs_grpo", "peak_memory_vs_grpo"))
            + (f" | {v['overhead_vs_floor']:.2f} |" if "overhead_vs_floor" in v else " | |")
        )
    lines = ["\n".join(rows), ""]
    by_phase = {name: v["memory"]["peak_bytes_by_phase"] for name, v in summary["variants"].items()
                if v["memory"].get("peak_bytes_by_phase")}
    if by_phase:  # where in the step each variant's peak falls
        lines += ["Peak memory by phase (GiB; each phase's own peak, nested phases apart):", "",
                  "| variant | " + " | ".join(label for _, label in PEAK_PHASES) + " |",
                  "|---" * (len(PEAK_PHASES) + 1) + "|"]
        for name, peaks in by_phase.items():
            lines.append(f"| {name} | " + " | ".join(f"{peaks[k] / 2**30:.2f}" if k in peaks else "–"
                                                     for k, _ in PEAK_PHASES) + " |")
        lines.append("")
    for name, v in summary["variants"].items():
        if "step_vs_bridge" in v:
            shadow = f"{v['shadow_vs_bridge']:.2f}×" if v["shadow_vs_bridge"] is not None else "–"
            lines.append(f"{name} vs bridge (same run): step {v['step_vs_bridge']:.2f}×, shadow phase {shadow}, "
                         f"peak memory {v['peak_memory_vs_bridge']:.2f}×")
    for name, t in summary.get("targets", {}).items():
        for key, r in t.items():
            note = " [target set for the generation-heavy setting]" if key == "step_vs_grpo" else ""
            lines.append(f"{name}: {key} = {r['value']:.2f} (target <= {r['limit']}{note}): {'met' if r['met'] else 'NOT met'}")
    return "\n".join(lines)


def bench(config: str, output: str, variants: list[str], warmup: int, steps: int, overrides: list[str],
          progress_interval: float = DEFAULT_INTERVAL) -> dict:
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    with tempfile.TemporaryDirectory(prefix="trl-bridge-bench-") as tmp:
        common = ["--config", config, *overrides, "--max_steps", str(warmup + steps), "--save_strategy", "no",
                  "--report_to", "none", "--logging_steps", "1", "--output_dir", os.path.join(tmp, "run")]
        log_dir = os.path.dirname(os.path.abspath(output)) or "."
        os.makedirs(log_dir, exist_ok=True)
        progress = BenchProgress(variants, warmup + steps, warmup, progress_interval)
        progress.say(f"{len(variants)} variants ({', '.join(variants)}), {warmup + steps} optimizer steps each "
                     f"({warmup} warmup + {steps} measured), taking turns; loading the models (worker logs: "
                     f"{os.path.join(log_dir, '<variant>.log')})")
        workers = [_Worker(v, common + (VARIANTS[v] or []), log_dir) for v in variants]
        raw = {w.variant: {"steps": [], "memory": None} for w in workers}
        try:
            for w in workers:
                w.receive()  # ready: model loaded, trainer built
            progress.say(f"workers ready ({format_duration(progress.clock() - progress.start_time)}); training")
            for i in range(warmup + steps):
                order = workers[i % len(workers):] + workers[: i % len(workers)]  # rotate who goes first
                for w in order:
                    raw[w.variant]["steps"].append(w.go())
                    progress.step(w.variant, raw[w.variant]["steps"][-1]["total"])
            for w in workers:
                raw[w.variant]["memory"] = w.receive()["memory"]
                w.proc.wait()
        finally:
            for w in workers:
                if w.proc.poll() is None:
                    w.proc.kill()
                w.log.close()
    summary = summarise(raw, warmup)
    summary.update(config=config, overrides=overrides, warmup=warmup, steps=steps, raw=raw,
                   malloc_mmap_threshold=os.environ.get("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD)),
                   device=_device_name(), command=" ".join(["trl-bridge bench", *sys.argv[2:]]) if sys.argv[1:2] == ["bench"] else None)
    with open(output, "w") as f:
        json.dump(summary, f, indent=2)
    print(format_table(summary))
    print(f"\n[trl-bridge] wrote {output}")
    return summary


def _device_name() -> str:
    import platform

    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="trl-bridge bench",
        description="Time and memory of BRIDGE against GRPO and naive mixing, per phase, interleaved step by step. Any "
        "other option (e.g. --max_completion_length 64) overrides the config for every variant. Progress (variant "
        "i/N, step n/N, s/step, elapsed, remaining) is printed to stdout as plain lines; see --progress_interval.",
    )
    p.add_argument("--config", required=True, help="a `trl-bridge train` YAML config (e.g. configs/bench/tiny.yaml)")
    p.add_argument("--output", required=True, help="JSON file for the results (worker logs go beside it)")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma-separated, from {list(VARIANTS)} (default: {','.join(DEFAULT_VARIANTS)})")
    p.add_argument("--warmup", type=int, default=2, help="optimizer steps per variant not measured (default 2)")
    p.add_argument("--steps", type=int, default=6, help="measured optimizer steps per variant (default 6)")
    p.add_argument("--progress_interval", type=float, default=DEFAULT_INTERVAL, metavar="SECONDS",
                   help="progress on stdout, plain lines (a terminal, a CI log or `| tee` alike): one when the workers "
                   "are ready, one after each variant's first step and the last step, and in between one at most every "
                   "this many seconds, each with variant i/N, step n/N (warmup or measured), that variant's mean "
                   f"s/step, elapsed and estimated remaining time; none of it goes into --output (default "
                   f"{DEFAULT_INTERVAL:g}; 0: only the first and last steps)")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--_worker"]:
        variant, fd, rest = argv[1], int(argv[3]), argv[5:]
        return _worker(variant, fd, rest)
    parser = make_parser()
    args, overrides = parser.parse_known_args(argv)
    if not args.progress_interval >= 0:
        parser.error(f"--progress_interval must be >= 0 seconds, got {args.progress_interval}")
    if not os.path.isfile(args.config):
        print(f"trl-bridge bench: error: --config {args.config!r} does not exist", file=sys.stderr)
        return 2
    try:
        bench(args.config, args.output, [v.strip() for v in args.variants.split(",") if v.strip()], args.warmup,
              args.steps, overrides, args.progress_interval)
    except (ValueError, RuntimeError) as err:
        print(f"trl-bridge bench: error: {err}", file=sys.stderr)
        return 2 if isinstance(err, ValueError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
