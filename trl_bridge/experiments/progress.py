"""Progress in the terminal of `trl-bridge compare` and `trl-bridge bench`: plain lines, at most every
`--progress_interval` seconds, that read the same on a terminal, in CI logs and through `| tee`.

- `LogFollower` follows one run's `train.log` as it grows (only the bytes written by this invocation) and reads the
  run's optimizer step from what `trl-bridge train` writes there: its compact per-step lines (``step 3/20 | ...``),
  its progress bar (``15%|█▌   | 3/20 [...]``) and its ``done: 20 steps`` line; `stage_marker` lines (printed by the
  compare worker before each stage) place a stage's steps in the whole run (cold_start trains two stages). Seconds per
  step are measured from the times at which the step was seen to change (a resumed run's jump from 0 to its
  checkpoint's step is not one).
- `CompareProgress` holds the runs of one `compare` invocation and prints, from a thread of its own (stopped and joined
  when the `with` block ends), an overall line (runs done / total, reused, elapsed, estimated remaining) and one line
  per running run (method, seed, step n/N, s/step).
- `BenchProgress` prints `bench`'s lines (variant i/N, step n/N, s/step, elapsed, estimated remaining) from its loop.

Nothing here writes files: progress goes to stdout only, never into results.
"""

from __future__ import annotations

import heapq
import os
import re
import statistics
import sys
import threading
import time
from typing import Callable

DEFAULT_INTERVAL = 30.0
STAGE_PREFIX = "[trl-bridge compare] stage"
_STAGE = re.compile(r"^\[trl-bridge compare\] stage (\d+)/(\d+) \S+: steps (\d+)\.\.(\d+) of (\d+)")
_STEP_LINE = re.compile(r"^step (\d+)/(\d+)(?: \||\s*$)")  # reporting.format_log_line, one per logging step
_REPORTED_SPS = re.compile(r"\| (\d+(?:\.\d+)?) s/step\s*$")
_BAR = re.compile(r"^\s*\d{1,3}%\|[^|]*\|\s*(\d+)/(\d+) \[")  # the Trainer's tqdm bar (no description before the %)
_DONE = re.compile(r"^done: (\d+) steps")
_RESUMED = re.compile(r"^\[trl-bridge compare\] .*: resuming from \S*checkpoint-(\d+)")  # resume_marker's line
_SPS_WINDOW = 8  # s/step: over the last this many observed step changes


def format_duration(seconds: float | None) -> str:
    """``45s``, ``12m03s``, ``3h05m``; ``?`` when unknown."""
    if seconds is None:
        return "?"
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    minutes, s = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{s:02d}s"
    hours, m = divmod(minutes, 60)
    return f"{hours}h{m:02d}m"


def format_rate(seconds_per_step: float | None) -> str:
    if seconds_per_step is None:
        return "? s/step"
    return f"{seconds_per_step:.2f} s/step" if seconds_per_step < 10 else f"{seconds_per_step:.1f} s/step"


def stage_marker(index: int, count: int, name: str, first_step: int, steps: int, total: int) -> str:
    """The line the compare worker prints into `train.log` before stage `index` (1-based) of `count`: the stage's
    steps are the run's steps first_step+1 .. first_step+steps of `total`."""
    return f"{STAGE_PREFIX} {index}/{count} {name}: steps {first_step + 1}..{first_step + steps} of {total}"


def resume_marker(run_dir: str, checkpoint: str) -> str:
    """The line the compare worker prints into `train.log` when a stage resumes from `checkpoint` (its
    ``checkpoint-<step>`` folder): that stage's bar starts at 0 and jumps to the checkpoint's step, which is no training."""
    return f"[trl-bridge compare] {run_dir}: resuming from {checkpoint} (an earlier attempt was stopped)"


class LogFollower:
    """One run's step, read from its growing log; `poll()` reads what was appended since the last call."""

    def __init__(self, path: str, offset: int = 0, total: int | None = None, first_step: int = 0,
                 stage_steps: int | None = None, clock: Callable[[], float] = time.monotonic):
        self.path, self.pos, self.clock = path, offset, clock
        self.total, self.first_step, self.stage_steps = total, first_step, stage_steps
        self.step: int | None = None  # optimizer steps of the whole run completed so far (None: none seen yet)
        self.reported_sps: float | None = None  # the trainer's own "x s/step" of its last compact line
        self.changes: list[tuple[float, int]] = []  # (time seen, step) of the current stage, each time a poll saw it move
        self.previous_sps: float | None = None  # the s/step of the stages before (cold_start's first stage)
        self._tail = b""
        self._seen = False  # a poll read a step from the trainer's own output
        self._resumed_at: int | None = None  # the run's step a resumed stage's checkpoint holds, until passed

    def poll(self, now: float | None = None) -> int | None:
        now = self.clock() if now is None else now
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                data = f.read()
        except OSError:
            return self.step
        self.pos += len(data)
        data = self._tail + data
        pieces = re.split(rb"[\r\n]", data)
        self._tail = pieces.pop()  # not ended yet (a bar being redrawn, a line being written)
        if len(self._tail) > 1 << 16:  # a bar never ends its line: read it as it stands, without growing forever
            pieces.append(self._tail)
            self._tail = b""
        self._seen = False
        for piece in pieces:
            self._feed(piece.decode("utf-8", errors="replace"))
        tail = self._tail.decode("utf-8", errors="replace")
        if _BAR.match(tail):  # tqdm writes "\r" + bar: the bar drawn last has no end yet, and its "n/N [" is complete
            self._feed(tail)
        # the first sighting of a stage's step (its bar at 0: training starts) and every move after it; several steps
        # read in one poll count as seen together, at this poll's time
        if self._seen and (not self.changes or self.changes[-1][1] != self.step):
            if self._resumed_at is not None:  # a resumed stage: its bar starts at 0, then jumps past the checkpoint's
                if self.changes and self.changes[-1][1] <= self._resumed_at:  # step; that jump is no training
                    self.changes = []
                if self.step > self._resumed_at:
                    self._resumed_at = None
            self.changes.append((now, self.step))
            del self.changes[:-_SPS_WINDOW]
        return self.step

    def _feed(self, text: str) -> None:
        if m := _STAGE.match(text):
            first, last, total = int(m[3]) - 1, int(m[4]), int(m[5])
            self.first_step, self.stage_steps, self.total = first, last - first, total
            self.step = first if self.step is None else max(self.step, first)
            # a new stage: loading its model is no step; its s/step is measured afresh
            self.previous_sps = self.seconds_per_step or self.previous_sps
            self.changes, self.reported_sps, self._seen = [], None, False
            return
        if m := _RESUMED.match(text):
            self._resumed_at = self.first_step + int(m[1])
            return
        n = None
        if m := _STEP_LINE.match(text):
            n = int(m[1])
            if s := _REPORTED_SPS.search(text):
                self.reported_sps = float(s[1])
        elif m := _BAR.match(text):
            if self.stage_steps is None or int(m[2]) == self.stage_steps:  # not an evaluation loop's bar
                n = int(m[1])
        elif m := _DONE.match(text):
            n = int(m[1])
        if n is not None and (self.stage_steps is None or n <= self.stage_steps):
            self.step, self._seen = self.first_step + n, True

    @property
    def seconds_per_step(self) -> float | None:
        """From the times the step was seen to change (the last few changes); the trainer's own figure before that."""
        if len(self.changes) >= 2:
            (t0, s0), (t1, s1) = self.changes[0], self.changes[-1]
            if s1 > s0 and t1 > t0:
                return (t1 - t0) / (s1 - s0)
        return self.reported_sps if self.reported_sps is not None else self.previous_sps

    def remaining_seconds(self) -> float | None:
        sps = self.seconds_per_step
        if sps is None or self.total is None:
            return None
        return max(0, self.total - (self.step or 0)) * sps

    def describe(self, running: bool = True) -> str:
        total = "?" if self.total is None else self.total
        if self.step is None or not self.changes and self.seconds_per_step is None:
            return f"step {self.step or 0}/{total} (starting)"
        done = ", training done (evaluating, saving)" if running and self.total is not None and self.step >= self.total else ""
        return f"step {self.step}/{total}, {format_rate(self.seconds_per_step)}{done}"


class CompareProgress:
    """The runs of one `compare` invocation: `with CompareProgress(...) as p:` starts the thread that prints the
    progress lines every `interval` seconds (none when `interval` is 0 or no run has a log to follow); leaving the
    block stops and joins it. `started` / `finished` are called from the threads that run the runs."""

    def __init__(self, total: int, reused: int, jobs: int, interval: float = DEFAULT_INTERVAL,
                 prefix: str = "[trl-bridge compare]", clock: Callable[[], float] = time.monotonic,
                 print_fn: Callable[[str], None] | None = None, poll_seconds: float = 1.0):
        self.total, self.reused, self.jobs, self.interval, self.prefix = total, reused, jobs, interval, prefix
        self.clock = clock
        self.print_fn = print_fn or (lambda text: print(text, file=sys.stdout, flush=True))
        self.poll_seconds = min(poll_seconds, interval) if interval > 0 else poll_seconds
        self.start_time = clock()
        self.running: dict[str, dict] = {}  # key -> {"label", "started", "follower", "steps"}
        self.durations: list[float] = []  # seconds of the runs finished by this invocation
        self.done = self.failed = 0
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_print = self.start_time

    # -- life cycle ----------------------------------------------------------------------------------------------------
    def __enter__(self):
        if self.interval > 0:
            self._thread = threading.Thread(target=self._loop, name="trl-bridge-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self):
        while not self._stop.wait(self.poll_seconds):
            with self._lock:
                self.poll()
                if self.running and self.clock() - self._last_print >= self.interval:
                    self.emit(self.lines())

    # -- runs ----------------------------------------------------------------------------------------------------------
    def started(self, key: str, label: str, steps: int, follower: LogFollower | None = None) -> None:
        with self._lock:
            self.running[key] = {"label": label, "started": self.clock(), "follower": follower, "steps": steps}

    def finished(self, key: str, error: str | None = None) -> str:
        """Record the end of a run; returns its line (with the overall state), which the caller prints."""
        with self._lock:
            run = self.running.pop(key, None) or {"label": key, "started": self.clock(), "follower": None}
            seconds = self.clock() - run["started"]
            follower = run["follower"]
            if follower is not None:
                follower.poll()
            if error:
                self.failed += 1
                what = f"FAILED ({format_duration(seconds)}): {error}"
            else:
                self.done += 1
                self.durations.append(seconds)
                what = f"done in {format_duration(seconds)}"
            if follower is not None and follower.step is not None:
                what += f" ({follower.describe(running=False)})"
            return f"{self.prefix} {run['label']}: {what} | {self.overall()}"

    def stopped(self, key: str) -> str:
        """Record a run stopped by a signal (it wrote a checkpoint and resumes next time); returns its line."""
        with self._lock:
            run = self.running.pop(key, None) or {"label": key, "started": self.clock()}
            what = f"stopped after {format_duration(self.clock() - run['started'])}, checkpoint written"
            return f"{self.prefix} {run['label']}: {what} | {self.overall()}"

    def poll(self) -> None:
        with self._lock:
            now = self.clock()
            for run in self.running.values():
                if run["follower"] is not None:
                    run["follower"].poll(now)

    # -- lines ---------------------------------------------------------------------------------------------------------
    def eta(self) -> float | None:
        """Seconds until every run is done: each running run's remaining steps × its s/step, or the mean duration of
        the runs finished so far minus its time so far when that is longer (a run is more than its steps: loading,
        evaluations, saving); each waiting run the mean duration of the finished runs (else its steps × the mean
        s/step of the running runs); runs are laid on `jobs` slots in order. None when something is unknown."""
        now = self.clock()
        mean_run = statistics.fmean(self.durations) if self.durations else None
        rates = [r["follower"].seconds_per_step for r in self.running.values() if r["follower"] is not None]
        rates = [r for r in rates if r is not None]
        slots = []
        for run in self.running.values():
            left = run["follower"].remaining_seconds() if run["follower"] is not None else None
            if mean_run is not None:  # its steps are not all of a run's time (loading, evaluations, saving)
                left = max(left or 0.0, mean_run - (now - run["started"]))
            if left is None:
                return None
            slots.append(left)
        waiting = self.waiting
        if waiting:
            per_run = mean_run
            if per_run is None and rates:
                steps = statistics.fmean(r["steps"] for r in self.running.values())
                per_run = steps * statistics.fmean(rates)
            if per_run is None:
                return None
            slots += [0.0] * max(0, self.jobs - len(slots))
            heapq.heapify(slots)
            for _ in range(waiting):
                heapq.heappush(slots, heapq.heappop(slots) + per_run)
        return max(slots, default=0.0)

    @property
    def waiting(self) -> int:
        return self.total - self.reused - self.done - self.failed - len(self.running)

    def overall(self) -> str:
        with self._lock:
            finished = self.reused + self.done
            parts = [f"runs {finished}/{self.total} done" + (f" ({self.reused} reused)" if self.reused else "")]
            if self.failed:
                parts.append(f"{self.failed} failed")
            parts.append(f"{len(self.running)} running, {self.waiting} waiting")
            eta = self.eta()
            return (f"{', '.join(parts)} | elapsed {format_duration(self.clock() - self.start_time)} | remaining "
                    f"{'?' if eta is None else '~' + format_duration(eta)}")

    def lines(self) -> list[str]:
        with self._lock:
            out = [f"{self.prefix} {self.overall()}"]
            for run in self.running.values():
                f = run["follower"]
                state = f.describe() if f is not None else "running"
                out.append(f"{self.prefix}   {run['label']}: {state}, running {format_duration(self.clock() - run['started'])}")
            return out

    def emit(self, lines) -> None:
        with self._lock:
            self.print_fn("\n".join([lines] if isinstance(lines, str) else lines))
            self._last_print = self.clock()


class BenchProgress:
    """`bench`'s lines, printed from its loop: every variant's first step, the last step, and otherwise at most every
    `interval` seconds (0: only the first and the last)."""

    def __init__(self, variants: list[str], steps: int, warmup: int, interval: float = DEFAULT_INTERVAL,
                 prefix: str = "[trl-bridge bench]", clock: Callable[[], float] = time.monotonic,
                 print_fn: Callable[[str], None] | None = None):
        self.variants, self.steps, self.warmup, self.interval, self.prefix = variants, steps, warmup, interval, prefix
        self.clock = clock
        self.print_fn = print_fn or (lambda text: print(text, file=sys.stdout, flush=True))
        self.start_time = clock()
        self.seconds: dict[str, list[float]] = {v: [] for v in variants}
        self._last_print: float | None = None

    def say(self, text: str) -> None:
        self.print_fn(f"{self.prefix} {text}")

    def step(self, variant: str, seconds: float) -> str | None:
        """Record one optimizer step of `variant` (its seconds); returns the line printed, if any."""
        self.seconds[variant].append(seconds)
        n = len(self.seconds[variant])
        done = sum(map(len, self.seconds.values()))
        last = done == self.steps * len(self.variants)
        now = self.clock()
        due = self.interval > 0 and self._last_print is not None and now - self._last_print >= self.interval
        if not (n == 1 or last or due):
            return None
        self._last_print = now
        line = self.line(variant)
        self.print_fn(line)
        return line

    def line(self, variant: str) -> str:
        n = len(self.seconds[variant])
        rate = statistics.fmean(self.seconds[variant]) if self.seconds[variant] else None
        phase = "warmup" if n <= self.warmup else "measured"
        left = sum((self.steps - len(s)) * statistics.fmean(s) for s in self.seconds.values() if s)
        unknown = any(not s for s in self.seconds.values())
        return (f"{self.prefix} variant {self.variants.index(variant) + 1}/{len(self.variants)} {variant}: "
                f"step {n}/{self.steps} ({phase}), {format_rate(rate)} | elapsed "
                f"{format_duration(self.clock() - self.start_time)} | remaining "
                f"{'?' if unknown else '~' + format_duration(left)}")


def log_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0
