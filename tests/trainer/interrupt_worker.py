"""`trl-bridge train` in a real process, for tests/trainer/test_reliability.py, with two test hooks set by environment variables so
that the test's signals land at a known point of the run (the signals themselves are real, sent by the test):

  BRIDGE_TEST_PAUSE_IN_STEP=N    during optimizer step N, between its two micro-batches, touch $BRIDGE_TEST_READY.pause
                                 and wait until a signal has arrived, then go on
  BRIDGE_TEST_HANG_IN_SAVE_OF=N  while checkpoint-N is being written (BRIDGE's files are in the staging folder, the
                                 folder is not published yet), touch $BRIDGE_TEST_READY.save and hang until killed

    python -m tests.trainer.interrupt_worker <trl-bridge train arguments>
"""

import os
import sys
import time
from pathlib import Path

from transformers import TrainerCallback

from trl_bridge.trainer.bridge_trainer import BridgeTrainer
from trl_bridge.train_cli import main


def digit_reward(completions, answer, **kwargs):
    """Dense and deterministic (so that θ̂ moves): fraction of digits, plus 1 when the answer appears."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [float(a in t) + sum(ch.isdigit() for ch in t) / max(len(t), 1) for t, a in zip(texts, answer)]


class _PauseForSignal(TrainerCallback):
    def __init__(self, trainer, step, ready):
        self.trainer, self.step, self.ready = trainer, step, ready

    def on_substep_end(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            Path(self.ready).touch()
            deadline = time.monotonic() + 120
            while self.trainer._stop_on_signal.signum is None and time.monotonic() < deadline:
                time.sleep(0.02)


def _install_hooks():
    ready = os.environ.get("BRIDGE_TEST_READY")
    if "BRIDGE_TEST_PAUSE_IN_STEP" in os.environ:
        step, init = int(os.environ["BRIDGE_TEST_PAUSE_IN_STEP"]), BridgeTrainer.__init__

        def init_with_pause(self, *args, **kwargs):
            init(self, *args, **kwargs)
            self.add_callback(_PauseForSignal(self, step, f"{ready}.pause"))

        BridgeTrainer.__init__ = init_with_pause
    if "BRIDGE_TEST_HANG_IN_SAVE_OF" in os.environ:
        step, save = int(os.environ["BRIDGE_TEST_HANG_IN_SAVE_OF"]), BridgeTrainer._save_optimizer_and_scheduler

        def save_then_hang(self, output_dir):
            save(self, output_dir)
            if self.state.global_step == step:
                Path(f"{ready}.save").touch()
                time.sleep(600)

        BridgeTrainer._save_optimizer_and_scheduler = save_then_hang


if __name__ == "__main__":
    _install_hooks()
    sys.exit(main(sys.argv[1:]))
