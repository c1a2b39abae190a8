"""What makes a long BRIDGE run survive interruptions: atomic checkpoints, picking the checkpoint to resume, refusing to
train over another run, and stopping cleanly on SIGINT/SIGTERM.

  * Atomic checkpoints: `BridgeTrainer._save_checkpoint` lets the Trainer write `checkpoint-N` inside a staging folder
    `tmp-checkpoint-N`; `publish_checkpoint` flushes every file to disk and renames the folder into place in one step,
    so a process killed mid-write leaves a `tmp-` folder (ignored, removed by the next save of that step) and never a
    `checkpoint-N` that looks complete but is not.
  * `resolve_resume_from_checkpoint`: `True`, "true", "last" or "latest" mean the newest complete checkpoint of
    `output_dir`; a path must be a complete BRIDGE checkpoint. Either is checked before any step.
  * `check_output_dir`: an `output_dir` that already holds a run is refused unless the run is resumed or
    `overwrite_output_dir` is set (then the old run's checkpoints are removed, so "last" can never pick one of them).
  * `StopOnSignal`: SIGINT/SIGTERM finish the optimizer step in flight, write a checkpoint and stop training; the
    trainer then raises `TrainingInterrupted`, whose message says how to resume.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import threading
from contextlib import contextmanager

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

logger = logging.get_logger(__name__)

STAGING_PREFIX = "tmp-"  # tmp-checkpoint-N: never matched by the Trainer's `checkpoint-*` globs and regexes
CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
STAGING_RE = re.compile(rf"^{STAGING_PREFIX}{PREFIX_CHECKPOINT_DIR}-(\d+)$")
# What a complete BRIDGE checkpoint holds besides the merged model (see BridgeTrainer._save_optimizer_and_scheduler).
REQUIRED_FILES = ("trainer_state.json", "bridge_state.safetensors", "bridge_optimizers.pt")
# Files that only a training run leaves in output_dir (checkpoint folders aside).
RUN_FILES = ("trainer_state.json", "training_args.bin", "bridge_state.safetensors", "model.safetensors",
             "model.safetensors.index.json")
RESUME_LATEST = ("true", "last", "latest")
SIGNALS = (signal.SIGINT, signal.SIGTERM)


# ----------------------------------------------------------------------------------------------------------------------
# Atomic checkpoint folders
# ----------------------------------------------------------------------------------------------------------------------
def staging_dir(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, f"{STAGING_PREFIX}{PREFIX_CHECKPOINT_DIR}-{step}")


def _fsync_tree(path: str):
    """Flush every file under `path` (and the folders themselves) to disk, so the rename publishes data, not promises."""
    for root, dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(root)


def _fsync_dir(path: str):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems do not fsync folders
        pass
    finally:
        os.close(fd)


def publish_checkpoint(written: str, final: str):
    """Make the fully written folder `written` appear as `final` in one rename (replacing an older `final`)."""
    _fsync_tree(written)
    parent = os.path.dirname(final)
    old = None
    if os.path.exists(final):  # the same step saved again (e.g. after a resume): keep the old one until the new is in
        old = os.path.join(parent, f"{STAGING_PREFIX}old-{os.path.basename(final)}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(written, final)
    _fsync_dir(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# A run with bridge_lambda = 1 throughout is GRPO alone: its checkpoint is the Trainer's own (optimizer.pt / .bin).
GRPO_ONLY_FILES = (("trainer_state.json", "optimizer.pt"), ("trainer_state.json", "optimizer.bin"))


def missing_files(checkpoint: str) -> list[str]:
    def missing(files):
        return [f for f in files if not os.path.isfile(os.path.join(checkpoint, f))]

    if any(not missing(files) for files in GRPO_ONLY_FILES) and not os.path.isfile(os.path.join(checkpoint, REQUIRED_FILES[1])):
        return []
    return missing(REQUIRED_FILES)


# ----------------------------------------------------------------------------------------------------------------------
# Which checkpoint to resume, and whether output_dir may be trained into
# ----------------------------------------------------------------------------------------------------------------------
def latest_complete_checkpoint(output_dir: str) -> str | None:
    """The `checkpoint-N` folder of `output_dir` with the largest N that holds every file of a BRIDGE checkpoint."""
    if not os.path.isdir(output_dir):
        return None
    steps = sorted(
        (int(m.group(1)), name) for name in os.listdir(output_dir)
        if (m := CHECKPOINT_RE.match(name)) and os.path.isdir(os.path.join(output_dir, name))
    )
    for _, name in reversed(steps):
        path = os.path.join(output_dir, name)
        missing = missing_files(path)
        if not missing:
            return path
        logger.warning("Skipping %s: it is not a complete BRIDGE checkpoint (missing %s).", path, missing)
    return None


def resolve_resume_from_checkpoint(value, output_dir: str) -> str | None:
    """`resume_from_checkpoint` as given to `train()` or on the command line -> the checkpoint folder to load, or None.

    True / "true" / "last" / "latest": the newest complete checkpoint in `output_dir`. A path: it must be a complete
    BRIDGE checkpoint. None / False / "" / "false" / "none": start from scratch."""
    if value is None or value is False or (isinstance(value, str) and value.strip().lower() in ("", "false", "none")):
        return None
    if value is True or (isinstance(value, str) and value.strip().lower() in RESUME_LATEST):
        path = latest_complete_checkpoint(output_dir)
        if path is None:
            raise ValueError(
                f"resume_from_checkpoint={value!r} asks for the latest checkpoint, but output_dir={output_dir!r} holds "
                f"no complete checkpoint (a {PREFIX_CHECKPOINT_DIR}-N folder with {', '.join(REQUIRED_FILES)}; "
                f"{STAGING_PREFIX}{PREFIX_CHECKPOINT_DIR}-N folders are writes that never finished). Leave "
                "resume_from_checkpoint unset to start a new run."
            )
        return path
    path = str(value)
    if not os.path.isdir(path):
        raise ValueError(f"resume_from_checkpoint={path!r} is not a folder. Give a {PREFIX_CHECKPOINT_DIR}-N folder, "
                         "or 'last' for the newest complete checkpoint in output_dir.")
    missing = missing_files(path)
    if missing:
        raise ValueError(
            f"resume_from_checkpoint={path!r} is not a complete BRIDGE checkpoint: {missing} missing. Give another "
            f"{PREFIX_CHECKPOINT_DIR}-N folder, or 'last' for the newest complete one in output_dir."
        )
    return path


def previous_run_entries(output_dir: str) -> list[str]:
    """What in `output_dir` shows that a training run already wrote there (checkpoints, trainer state, a model)."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(
        name for name in os.listdir(output_dir)
        if CHECKPOINT_RE.match(name) or STAGING_RE.match(name) or name in RUN_FILES
    )


def check_output_dir(output_dir: str, resume_from_checkpoint, overwrite_output_dir: bool):
    """Refuse to start a new run in an `output_dir` that holds another one (its checkpoints would mix with the new ones
    and `--resume_from_checkpoint last` could pick the old run's), unless resuming or overwriting was asked for."""
    if resume_from_checkpoint not in (None, False) or overwrite_output_dir:
        return
    found = previous_run_entries(output_dir)
    if found:
        shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        complete = any(CHECKPOINT_RE.match(n) and not missing_files(os.path.join(output_dir, n)) for n in os.listdir(output_dir))
        resume = ("Resume it with `--resume_from_checkpoint last`, " if complete else
                  "It holds no complete checkpoint, so `--resume_from_checkpoint last` cannot continue it: ")
        raise ValueError(
            f"output_dir={output_dir!r} already holds a training run ({shown}). {resume}start over with "
            "`--overwrite_output_dir` (removes its checkpoints), or choose another `--output_dir`."
        )


def remove_previous_run_checkpoints(output_dir: str):
    """`overwrite_output_dir=True`: remove the old run's checkpoint folders (the other files are overwritten)."""
    old = [n for n in previous_run_entries(output_dir) if CHECKPOINT_RE.match(n) or STAGING_RE.match(n)]
    for name in old:
        shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    if old:
        logger.warning("overwrite_output_dir: removed the previous run's checkpoints from %s: %s", output_dir, old)


def clear_output_dir(args, resume_from_checkpoint):
    """Before training starts (main process): an overwritten run's checkpoints and any staging folder of an
    interrupted checkpoint write go."""
    if not args.should_save:
        return
    if resume_from_checkpoint is None and args.overwrite_output_dir:
        remove_previous_run_checkpoints(args.output_dir)
    remove_stale_staging(args.output_dir)


def remove_stale_staging(output_dir: str):
    """Staging folders left by a process killed while writing a checkpoint hold nothing usable."""
    if not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        if STAGING_RE.match(name) or name.startswith(f"{STAGING_PREFIX}old-{PREFIX_CHECKPOINT_DIR}-"):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
            logger.warning("Removed %s: an unfinished checkpoint write of an interrupted process.", name)


# ----------------------------------------------------------------------------------------------------------------------
# SIGINT / SIGTERM
# ----------------------------------------------------------------------------------------------------------------------
class TrainingInterrupted(KeyboardInterrupt):
    """Raised by `BridgeTrainer.train()` after SIGINT/SIGTERM, once the step in flight finished and its checkpoint was
    written. A KeyboardInterrupt, so that code after `train()` (e.g. `save_model`) does not run on a half-trained model."""

    def __init__(self, signum: int, step: int, checkpoint: str | None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        where = f"checkpoint written to {checkpoint}" if checkpoint else "no checkpoint could be written"
        super().__init__(
            f"training stopped by {name} after step {step}; {where}. Resume with `--resume_from_checkpoint last` "
            f"(trl-bridge train, same arguments) or `trainer.train(resume_from_checkpoint={checkpoint or 'True'!r})`."
        )

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention for "ended by signal N" (130 SIGINT, 143 SIGTERM)


class StopOnSignal(TrainerCallback):
    """SIGINT/SIGTERM during training: finish the optimizer step in flight, save a checkpoint, stop.

    The handlers are installed only around `train()` (and only in the main thread); a second SIGINT aborts at once
    (the checkpoint being written, if any, stays a `tmp-` folder). Under several processes the ranks agree at every step
    end (one all-reduce of a flag), so that all of them save and stop at the same step."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.signum = None  # set by the handler on this process
        self.stopped_by = None  # the signal all processes agreed to stop on

    @contextmanager
    def installed(self):
        self.signum = self.stopped_by = None
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.getsignal(s) for s in SIGNALS}
        for s in SIGNALS:
            signal.signal(s, self._handle)
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: abort without waiting for the checkpoint
        self.signum = signum
        # os.write, not print: a handler may run in the middle of another write to the same stream
        os.write(2, (f"\n[trl-bridge] {signal.Signals(signum).name} received: finishing the current step, then writing "
                     "a checkpoint and stopping (Ctrl-C again aborts without a checkpoint)\n").encode())

    def raise_if_stopped(self, trainer):
        """After `train()`: `TrainingInterrupted` when a signal stopped training before `max_steps`."""
        if self.stopped_by is not None and trainer.state.global_step < trainer.state.max_steps:
            step = trainer.state.global_step
            checkpoint = os.path.join(trainer._get_output_dir(None), f"{PREFIX_CHECKPOINT_DIR}-{step}")
            raise TrainingInterrupted(self.stopped_by, step, checkpoint if os.path.isdir(checkpoint) else None)
        if self.signum is not None:
            logger.warning("A signal arrived after the last training step: training completed.")

    def on_step_end(self, args, state, control, **kwargs):
        flag = self.signum or 0
        if self.accelerator.num_processes > 1:
            flag = int(self.accelerator.reduce(torch.tensor([flag], device=self.accelerator.device), "max").item())
        if flag:
            self.stopped_by = flag
            control.should_save = True
            control.should_training_stop = True
        return control


# ----------------------------------------------------------------------------------------------------------------------
# `trl-bridge train`
# ----------------------------------------------------------------------------------------------------------------------
def check_run_start(args):
    """Before the command line loads anything: resolve `resume_from_checkpoint` ("last" -> the folder, in place) and
    refuse an `output_dir` that holds another run."""
    args.resume_from_checkpoint = resolve_resume_from_checkpoint(args.resume_from_checkpoint, args.output_dir)
    check_output_dir(args.output_dir, args.resume_from_checkpoint, args.overwrite_output_dir)


def resume_arguments(argv: list[str]) -> list[str]:
    """`argv` of an interrupted `trl-bridge train` with `--resume_from_checkpoint last` in place of any earlier value."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--resume_from_checkpoint":
            skip = True
        elif not arg.startswith("--resume_from_checkpoint="):
            kept.append(arg)
    return [*kept, "--resume_from_checkpoint", "last"]


# What each launcher sets in its workers' environment. torchrun's elastic agent: TORCHELASTIC_RUN_ID, WORLD_SIZE,
# LOCAL_WORLD_SIZE (torch/distributed/elastic/agent/server/local_elastic_agent.py). `accelerate launch`: every
# launcher sets ACCELERATE_MIXED_PRECISION and ACCELERATE_DYNAMO_BACKEND (accelerate/utils/launch.py); with several
# processes it runs torchrun's agent in-process, so TORCHELASTIC_RUN_ID is set too (accelerate is checked first).
LAUNCHER_ENV = (("accelerate launch", ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_DYNAMO_BACKEND")),
                ("torchrun", ("TORCHELASTIC_RUN_ID",)))
LAUNCHER_SCRIPTS = ("torchrun", "accelerate")  # console scripts: run as `<python> <bin>/torchrun ...`


def launcher(environ=None) -> str | None:
    """`torchrun` or `accelerate launch`, whichever started this process (from the variables it sets); else None."""
    environ = os.environ if environ is None else environ
    return next((name for name, keys in LAUNCHER_ENV if all(k in environ for k in keys)), None)


def parent_command_line() -> list[str] | None:
    """The command line of this process's parent (a launcher's, under torchrun or `accelerate launch`); None where the
    system does not show it (Linux shows it in /proc)."""
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return [arg.decode(errors="surrogateescape") for arg in raw.split(b"\0")[:-1]] or None


def resume_command(argv: list[str], environ=None, parent: list[str] | None = None,
                   own_argv: list[str] | None = None) -> str:
    """What to run to resume an interrupted `trl-bridge train` whose arguments were `argv`: the same command with
    `--resume_from_checkpoint last`. Under a launcher that is the launcher's command (resuming in one process would
    continue a multi-process run with another batch per step): its command line `parent` is used when it verifiably
    launched this process (it ends with this process's own arguments `own_argv`, of which `argv` is the end); otherwise
    the hint names the launcher and the number of processes and gives the arguments to pass again."""
    import shlex

    environ = os.environ if environ is None else environ
    own_argv = sys.argv[1:] if own_argv is None else own_argv
    resume, name = resume_arguments(argv), launcher(environ)
    if name is None:
        return "trl-bridge train " + shlex.join(resume)
    world, local = (environ.get(k, "") for k in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"))
    world = int(world) if world.isdigit() else 1  # `accelerate launch` with one process sets no WORLD_SIZE
    nodes = world // int(local) if local.isdigit() and 0 < int(local) < world else 1
    verified = (parent and own_argv and len(parent) > len(own_argv) >= len(argv)
                and parent[-len(own_argv):] == own_argv and own_argv[len(own_argv) - len(argv):] == argv)
    if not verified:
        where = f"{world} process{'es' if world > 1 else ''}" + (f" on {nodes} nodes" if nodes > 1 else "")
        return (f"the same `{name}` command as before ({where}), with these trl-bridge train arguments: "
                + shlex.join(resume))
    launch = parent[:len(parent) - len(argv)]
    if len(launch) > 1 and os.path.basename(launch[1]) in LAUNCHER_SCRIPTS and os.path.isfile(launch[1]):
        script = shutil.which(os.path.basename(launch[1]))  # shown by its name when that name runs this very script
        shown = os.path.basename(launch[1]) if script and os.path.samefile(script, launch[1]) else launch[1]
        launch = [shown, *launch[2:]]
    return shlex.join([*launch, *resume]) + (f" (on each of the {nodes} nodes, as before)" if nodes > 1 else "")


def save_checkpoint_atomically(trainer, save, model, trial):
    """Atomic checkpoints. `save(model, trial)` (the Trainer's and GRPOTrainer's `_save_checkpoint`) writes
    `checkpoint-N` as usual, but inside the staging folder `tmp-checkpoint-N` (`trainer._staging_root`, which the
    trainer's `_get_output_dir` returns meanwhile); once every process has written its files they are flushed to disk
    and the folder is renamed into place, so a process killed mid-write (kill -9, a node lost) leaves a `tmp-` folder,
    never a `checkpoint-N` that looks complete but is not. The Hub upload and the rotation (`save_total_limit`) run
    after the rename, on the published folder."""
    from transformers.trainer_utils import rotate_checkpoints

    args, state = trainer.args, trainer.state
    run_dir = trainer._get_output_dir(trial=trial)
    name = f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
    staging = staging_dir(run_dir, state.global_step)
    if args.should_save:
        shutil.rmtree(staging, ignore_errors=True)  # left by a process killed while writing this very step
    trainer.accelerator.wait_for_everyone()
    push = args.push_to_hub
    trainer._staging_root, args.push_to_hub = staging, False
    try:
        save(model, trial)
    finally:
        trainer._staging_root, args.push_to_hub = None, push
    written, final = os.path.join(staging, name), os.path.join(run_dir, name)
    if state.best_model_checkpoint == written:  # this step is the best so far: point at where it will be
        state.best_model_checkpoint = final
        if args.should_save:
            state.save_to_json(os.path.join(written, "trainer_state.json"))
    trainer.accelerator.wait_for_everyone()  # every process's files (RNG states, rollouts) are in
    if args.should_save:
        publish_checkpoint(written, final)
        shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    if push:
        trainer._push_from_checkpoint(final)
    if args.should_save:
        rotate_checkpoints(output_dir=run_dir, save_total_limit=args.save_total_limit,
                           best_model_checkpoint=state.best_model_checkpoint, use_mtime=True)
