"""`trl-bridge` console script: dispatches to the `train`, `eval`, `compare`, `bench`, `plan` and `check` subcommands."""

import sys

USAGE = """usage: trl-bridge <command> [options]

commands:
  train   Train a model with BRIDGE (cooperative SFT + RL). `trl-bridge train --help`: BRIDGE's and the common
          options; `trl-bridge train --help-all`: every option.
  eval    Evaluate a model on math / out-of-domain benchmarks. `trl-bridge eval --help` lists every option.
  compare Compare BRIDGE with its baselines over seeds (results table and plots). `trl-bridge compare --help`.
  bench   Time and memory of BRIDGE against GRPO and naive mixing, per phase. `trl-bridge bench --help`.
  plan    Bytes per process of θ, θ̂, w, their gradients and optimizer states (GRPO and BRIDGE, full and lean shadow,
          under FSDP2 over N processes) from the model's config alone. `trl-bridge plan --help`.
  check   Gradient-accumulation self-check before a long job: one optimizer step with accumulation k and with one
          k-times larger micro-batch, same rollouts; the gradients of θ, θ̂ and w must agree. `trl-bridge check --help`.
"""


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "train":
        from .train_cli import main as train_main

        return train_main(rest)
    if command == "compare":
        from .experiments.compare import main as compare_main

        return compare_main(rest)
    if command == "eval":
        from .evaluation.evaluate import main as eval_main

        return eval_main(rest)
    if command == "bench":
        from .experiments.bench import main as bench_main

        return bench_main(rest)
    if command == "plan":
        from .experiments.plan import main as plan_main

        return plan_main(rest)
    if command == "check":
        from .experiments.accumulation_check import main as check_main

        return check_main(rest)
    print(f"trl-bridge: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
