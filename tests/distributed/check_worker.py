"""Run by `accelerate launch` from tests/experiments/test_accumulation_check.py: `trl-bridge check <argv>` under FSDP2
on CPU ranks (tests/distributed/cpu_fsdp_patch.py turns FSDP on for CPU processes, which accelerate never does)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cpu_fsdp_patch  # noqa: F401,E402

from trl_bridge.experiments.accumulation_check import main  # noqa: E402

if __name__ == "__main__":
    code = main(sys.argv[1:])
    # Skip interpreter teardown, as ddp_worker.py does: a background C++ thread (gloo, GRPOTrainer's async reward
    # loop) destroyed there can abort a process that has finished.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
