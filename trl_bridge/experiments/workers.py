"""Training runs as subprocesses that one signal to the parent stops cleanly.

`trl-bridge compare` trains each run in a subprocess of its own session, so that a signal reaches it only through the
parent: SIGINT (Ctrl-C, which the terminal sends to the parent's group alone) or SIGTERM (a scheduler, `kill`) to the
parent is forwarded once to every running run, which finishes its step, writes a checkpoint and stops; no further run
starts, and the same command continues every stopped run from its checkpoint. (Without this, a SIGTERM to the parent
left its runs training on, orphaned, while a restarted grid trained the same runs beside them.)"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Workers:
    def __init__(self):
        self._procs: set[subprocess.Popen] = set()
        self._lock = threading.Lock()
        self.stopped_by: int | None = None  # the signal that stopped the grid

    def run(self, argv: list[str], log, env: dict) -> int | None:
        """Run `argv` to its end; its exit code, or None when the grid was stopped before it started."""
        with self._lock:
            if self.stopped_by is not None:
                return None
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            self._procs.add(proc)
        try:
            return proc.wait()
        finally:
            with self._lock:
                self._procs.discard(proc)

    def _forward(self, signum, frame):
        with self._lock:
            first = self.stopped_by is None
            self.stopped_by = signum if first else self.stopped_by
            running = list(self._procs)
        if first:
            sys.stderr.write(f"\n[trl-bridge compare] {signal.Signals(signum).name} received: each running run finishes "
                             "its step, writes a checkpoint and stops; no other run starts. Run the same command again "
                             "to continue.\n")
        for proc in running:  # a second Ctrl-C reaches the runs as a second SIGINT: they stop without a checkpoint
            if proc.poll() is None:
                proc.send_signal(signum)

    @contextmanager
    def forwarding_signals(self):
        """SIGINT/SIGTERM to this process are forwarded to the running runs while the block runs (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.signal(s, self._forward) for s in SIGNALS}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
