"""Reliability: resume is exact wherever a checkpoint falls, interrupted runs (SIGINT, SIGTERM, kill -9 during a
checkpoint write; real processes, real signals) end with the uninterrupted run's θ, θ̂ and w, numeric faults skip the
update of all three sets together, and the remaining bad input fails before step 1 naming the field."""

import math
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import TrainerCallback

from trl_bridge import BridgeConfig, BridgeTrainer
from trl_bridge.trainer.checkpointing import TrainingInterrupted, resume_command
from trl_bridge.tiny import make_tiny_model, make_tiny_tokenizer
from trl_bridge.train_cli import main as train_main

from ..helpers import COMMON, adapter_state, base_state, digit_reward, make_trainer, rl_dataset, sft_dataset

REPO = Path(__file__).resolve().parents[2]
# Rollouts are generated once per steps_per_generation × num_iterations = 6 micro-batches = 3 optimizer steps and
# reused in between: every checkpoint at a step that is not a multiple of 3 falls inside a generation batch.
MID_GENERATION = dict(per_device_train_batch_size=2, num_generations=2, gradient_accumulation_steps=2,
                      steps_per_generation=3, num_iterations=2)


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


def all_three(trainer):
    """θ, θ̂ and w, as one dict."""
    state = {f"base.{n}": p for n, p in base_state(trainer).items()}
    state.update({f"shadow.{n}": s.clone() for n, s in trainer.shadow_state_dict().items()})
    state.update({f"adapter.{n}": p for n, p in adapter_state(trainer).items()})
    return state


def assert_identical(a, b):
    assert a.keys() == b.keys() and {k.split(".")[0] for k in a} == {"base", "shadow", "adapter"}
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ----------------------------------------------------------------------------------------------------------------------
# 1. Exact resume wherever the checkpoint falls (GRPOTrainer's buffered rollouts are part of the checkpoint)
# ----------------------------------------------------------------------------------------------------------------------
def test_resume_is_bit_identical_from_checkpoints_inside_a_generation_batch(tok, tmp_path):
    opts = dict(max_steps=6, bridge_lambda=0.5, learning_rate=3e-3, save_strategy="steps", save_steps=1,
                max_grad_norm=1.0, **MID_GENERATION)
    full = make_trainer(tok, tmp_path / "full", **opts)
    full.train()
    expected = all_three(full)
    for step in (1, 2, 4):  # first iteration, second iteration of the first batch, inside the second batch
        checkpoint = tmp_path / "full" / "out" / f"checkpoint-{step}"
        assert (checkpoint / "bridge_rollouts_rank0.pt").is_file()
        resumed = make_trainer(tok, tmp_path / f"resumed{step}", **opts)
        resumed.train(resume_from_checkpoint=str(checkpoint))
        assert_identical(all_three(resumed), expected)
    assert not any(p.name.startswith("tmp-") for p in (tmp_path / "full" / "out").iterdir())  # every write published


# ----------------------------------------------------------------------------------------------------------------------
# 2. Interruptions: SIGINT, SIGTERM and kill -9 during a checkpoint write, in real `trl-bridge train` processes
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("cli")
    make_tiny_model(tok).save_pretrained(root / "tiny")
    tok.save_pretrained(root / "tiny")
    args = ["--model_name_or_path", str(root / "tiny"), "--dataset_name", "builtin:arithmetic",
            "--reward_funcs", "tests.trainer.interrupt_worker.digit_reward", "--task_num_train", "24", "--task_num_test", "4",
            "--eval_samples", "0", "--max_steps", "6", "--save_steps", "3", "--learning_rate", "3e-3",
            "--max_grad_norm", "1.0", "--max_completion_length", "8", "--lora_r", "4",
            "--sft_per_device_train_batch_size", "2", "--report_to", "none", "--seed", "5"]
    for key, value in MID_GENERATION.items():
        args += [f"--{key}", str(value)]
    return root, args


def _env(**extra):
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": pythonpath,
            **{k: str(v) for k, v in extra.items()}}


def _start(tmp_path, argv, name, launch=(sys.executable, "-m"), **hooks):
    """`trl-bridge train` (through tests/trainer/interrupt_worker.py, with its test hooks) in a real process, started by
    `launch` (a launcher's command, e.g. torchrun's, followed by "-m")."""
    env = _env(BRIDGE_TEST_READY=tmp_path / name, **hooks)
    log = tmp_path / f"{name}.log"
    proc = subprocess.Popen([*launch, "tests.trainer.interrupt_worker", *argv], cwd=REPO, env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT)
    return proc, log


def _wait_for(path, proc, log):
    deadline = time.monotonic() + 300
    while not path.exists():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"the worker never reached {path.name}"
        time.sleep(0.05)


def test_interrupted_runs_resume_to_the_uninterrupted_result(cli_setup, tmp_path):
    _, args = cli_setup
    reference, run = tmp_path / "reference", tmp_path / "run"
    assert train_main([*args, "--output_dir", str(reference)]) == 0

    # Ctrl-C (SIGINT) during step 2: the step finishes, checkpoint-2 (inside a generation batch) is written, exit 130
    proc, log = _start(tmp_path, [*args, "--output_dir", str(run)], "first", BRIDGE_TEST_PAUSE_IN_STEP=2)
    _wait_for(tmp_path / "first.pause", proc, log)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=300) == 130, log.read_text()[-3000:]
    text = log.read_text()
    assert "SIGINT received" in text and f"stopped by SIGINT after step 2; checkpoint written to {run / 'checkpoint-2'}" in text
    assert "resume: trl-bridge train" in text and "--resume_from_checkpoint last" in text
    assert sorted(p.name for p in run.glob("*checkpoint-*")) == ["checkpoint-2"]

    # `--resume_from_checkpoint last` picks it up; SIGTERM during step 4 starts the final checkpoint-4, and kill -9
    # arrives while it is being written (a scheduler's grace period running out): it stays an unpublished tmp- folder
    resume = [*args, "--output_dir", str(run), "--resume_from_checkpoint", "last"]
    proc, log = _start(tmp_path, resume, "second", BRIDGE_TEST_PAUSE_IN_STEP=4, BRIDGE_TEST_HANG_IN_SAVE_OF=4)
    _wait_for(tmp_path / "second.pause", proc, log)
    proc.send_signal(signal.SIGTERM)
    _wait_for(tmp_path / "second.save", proc, log)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert "SIGTERM received" in log.read_text()
    assert (run / "tmp-checkpoint-4" / "checkpoint-4" / "bridge_state.safetensors").is_file()  # written, unpublished
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]

    # `last` is the last complete checkpoint (3, written on the way by save_steps), and the run ends exactly where the
    # uninterrupted one did: θ, θ̂, w and the exported π(θ+w)
    assert train_main(resume) == 0
    assert sorted(p.name for p in run.glob("*checkpoint-*")) == ["checkpoint-2", "checkpoint-3", "checkpoint-6"]
    final = load_file(run / "checkpoint-6" / "bridge_state.safetensors")
    assert_identical(final, load_file(reference / "checkpoint-6" / "bridge_state.safetensors"))
    assert any(not torch.equal(final[k], final["base." + k[len("shadow."):]]) for k in final if k.startswith("shadow."))
    exported, exported_reference = load_file(run / "model.safetensors"), load_file(reference / "model.safetensors")
    assert exported.keys() == exported_reference.keys()
    for key, value in exported_reference.items():
        assert torch.equal(exported[key], value), key


def test_resume_hint_repeats_the_launch_command(tmp_path, monkeypatch):
    """Under torchrun or `accelerate launch` the printed resume command is the launcher's (resuming in one process
    would continue a two-process run with half the batch): its command line, read from the parent process when it
    verifiably launched this one, else the launcher named with the arguments to pass again."""
    argv = ["--config", "my run.yaml", "--resume_from_checkpoint", "out/checkpoint-2", "--seed", "3"]
    resume = "--config 'my run.yaml' --seed 3 --resume_from_checkpoint last"
    own = ["train", *argv]  # this process's arguments (`-m trl_bridge.cli train ...`)
    # the variables each launcher sets (torch/distributed/elastic/agent/server/local_elastic_agent.py,
    # accelerate/utils/launch.py); accelerate with several processes runs torchrun's agent, so sets both
    torchrun = {"TORCHELASTIC_RUN_ID": "none", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "RANK": "0", "GROUP_RANK": "0"}
    accelerate_one = {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_DYNAMO_BACKEND": "NO", "ACCELERATE_USE_CPU": "False"}
    accelerate = {**torchrun, **accelerate_one}
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("torchrun", "accelerate"):  # console scripts run as `<python> <bin>/<name> ...`
        (bin_dir / name).write_text("#!/bin/sh\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "elsewhere"))

    def hint(environ, launch):
        return resume_command(argv, environ, parent=[*launch, "-m", "trl_bridge.cli", *own], own_argv=own)

    assert resume_command(argv, {}, parent=["bash"], own_argv=own) == f"trl-bridge train {resume}"  # no launcher
    run_module = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    assert hint(torchrun, run_module) == shlex.join(run_module) + f" -m trl_bridge.cli train {resume}"
    script = [sys.executable, str(bin_dir / "torchrun"), "--nproc_per_node", "2"]
    assert hint(torchrun, script) == f"{bin_dir / 'torchrun'} --nproc_per_node 2 -m trl_bridge.cli train {resume}"
    monkeypatch.setenv("PATH", str(bin_dir))  # `torchrun` on PATH is that script: shown by its name
    assert hint(torchrun, script) == f"torchrun --nproc_per_node 2 -m trl_bridge.cli train {resume}"
    for environ in (accelerate, accelerate_one):
        launch = [sys.executable, str(bin_dir / "accelerate"), "launch", "--config_file", "fsdp2.yaml"]
        assert hint(environ, launch) == f"accelerate launch --config_file fsdp2.yaml -m trl_bridge.cli train {resume}"
    two_nodes = {**torchrun, "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"}
    assert hint(two_nodes, script).endswith(f"train {resume} (on each of the 2 nodes, as before)")
    # a parent that did not run this process's arguments (a shell, a launcher already gone): the launcher is named
    for environ, said in ((torchrun, "`torchrun` command as before (2 processes)"),
                          (accelerate, "`accelerate launch` command as before (2 processes)"),
                          (accelerate_one, "`accelerate launch` command as before (1 process)"),
                          (two_nodes, "`torchrun` command as before (8 processes on 2 nodes)")):
        for parent in (["/bin/bash"], None, [*script, "-m", "trl_bridge.cli", "train", "--seed", "4"]):
            text = resume_command(argv, environ, parent=parent, own_argv=own)
            assert text == f"the same {said}, with these trl-bridge train arguments: {resume}", (environ, parent)
    assert resume_command(argv, torchrun, parent=[*run_module, *own], own_argv=["--other", *own]).startswith("the same")


def test_resume_hint_under_a_real_accelerate_launch(tmp_path):
    """The variables and the parent command line that a real `accelerate launch` gives its process."""
    (tmp_path / "hint.py").write_text("import sys\nfrom trl_bridge.trainer.checkpointing import parent_command_line, resume_command\n"
                                      "print('HINT', resume_command(sys.argv[1:], parent=parent_command_line()))\n")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "hint.py"]
    proc = subprocess.run([*launch, "--output_dir", "my run"], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hints = [line[len("HINT "):] for line in proc.stdout.splitlines() if line.startswith("HINT ")]
    assert hints == [shlex.join([*launch, "--output_dir", "my run", "--resume_from_checkpoint", "last"])]


def test_sigterm_to_torchrun_checkpoints_and_the_printed_command_resumes_under_torchrun(cli_setup, tmp_path):
    """SIGTERM to torchrun (as a scheduler sends it): torchrun forwards it to both processes, which finish the step,
    write the checkpoint and print the torchrun command that resumes; that command ends the run exactly where an
    uninterrupted two-process run ends."""
    args = [*cli_setup[1], "--use_cpu", "true", "--ddp_backend", "gloo"]  # two CPU processes (DDP over gloo)
    reference, run = tmp_path / "reference", tmp_path / "run"
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m")
    cpu = dict(CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([*torchrun, "tests.trainer.interrupt_worker", *args, "--output_dir", str(reference)], cwd=REPO,
                          env=_env(**cpu), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    proc, log = _start(tmp_path, [*args, "--output_dir", str(run)], "torchrun", launch=torchrun,
                       BRIDGE_TEST_PAUSE_IN_STEP=2, **cpu)
    _wait_for(tmp_path / "torchrun.pause", proc, log)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) != 0
    text = log.read_text()
    assert f"stopped by SIGTERM after step 2; checkpoint written to {run / 'checkpoint-2'}" in text, text[-3000:]
    assert sorted(p.name for p in run.glob("*checkpoint-*")) == ["checkpoint-2"]
    assert {p.name for p in (run / "checkpoint-2").glob("bridge_rollouts_rank*.pt")} == {"bridge_rollouts_rank0.pt",
                                                                                        "bridge_rollouts_rank1.pt"}
    hints = [line.split("resume: ", 1)[1] for line in text.splitlines() if line.startswith("  resume: ")]
    expected = shlex.join([*torchrun, "tests.trainer.interrupt_worker", *args, "--output_dir", str(run),
                           "--resume_from_checkpoint", "last"])
    assert hints == [expected]  # printed once (by the main process), the whole torchrun command

    proc = subprocess.run(shlex.split(hints[0]), cwd=REPO, env=_env(**cpu), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in run.glob("*checkpoint-*")) == ["checkpoint-2", "checkpoint-3", "checkpoint-6"]
    assert_identical(load_file(run / "checkpoint-6" / "bridge_state.safetensors"),
                     load_file(reference / "checkpoint-6" / "bridge_state.safetensors"))


def test_sigterm_finishes_the_step_writes_a_checkpoint_and_raises_with_the_exit_code(tok, tmp_path):
    class SendSigterm(TrainerCallback):  # a real SIGTERM to this process, in the middle of step 2
        def on_substep_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.getsignal(signal.SIGTERM)
    trainer = make_trainer(tok, tmp_path, max_steps=6, callbacks=[SendSigterm()], save_strategy="steps", save_steps=5,
                           **MID_GENERATION)
    with pytest.raises(TrainingInterrupted) as stop:
        trainer.train()
    assert trainer.state.global_step == 2 and stop.value.exit_code == 143
    assert stop.value.checkpoint == str(tmp_path / "out" / "checkpoint-2")
    assert sorted(p.name for p in (tmp_path / "out").glob("*checkpoint-*")) == ["checkpoint-2"]
    assert signal.getsignal(signal.SIGTERM) is previous  # the handler was only installed around train()


def test_output_dir_with_another_run_is_refused_unless_resumed_or_overwritten(cli_setup, tmp_path, capsys):
    _, args = cli_setup
    out = tmp_path / "busy"
    (out / "checkpoint-3").mkdir(parents=True)
    (out / "checkpoint-3" / "trainer_state.json").write_text("{}")
    (out / "notes.txt").write_text("keep me")
    before = sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*"))
    assert train_main([*args, "--output_dir", str(out), "--max_steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "--overwrite_output_dir" in err and "--resume_from_checkpoint" in err and "checkpoint-3" in err
    assert len(err.strip().splitlines()) == 1
    assert sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*")) == before  # nothing touched
    # resuming an incomplete checkpoint is refused too, naming what is missing
    assert train_main([*args, "--output_dir", str(out), "--resume_from_checkpoint", str(out / "checkpoint-3")]) == 2
    assert "bridge_state.safetensors" in capsys.readouterr().err
    # --overwrite_output_dir starts over: the old run's checkpoints go, other files stay
    assert train_main([*args, "--output_dir", str(out), "--max_steps", "1", "--save_steps", "1",
                       "--overwrite_output_dir", "true"]) == 0
    assert sorted(p.name for p in out.glob("*checkpoint-*")) == ["checkpoint-1"]
    assert (out / "notes.txt").read_text() == "keep me"


# ----------------------------------------------------------------------------------------------------------------------
# 3. Numeric faults: skipped for θ, θ̂ and w together, counted, bounded
# ----------------------------------------------------------------------------------------------------------------------
class _Snapshots(TrainerCallback):
    def __init__(self):
        self.trainer, self.after = None, {0: None}

    def on_train_begin(self, args, state, control, **kwargs):
        self.after[0] = all_three(self.trainer)

    def on_step_end(self, args, state, control, **kwargs):
        self.after[state.global_step] = all_three(self.trainer)


def faulty_trainer(tok, tmp_path, rl_nan_steps=(), shadow_inf_steps=(), sft_nan_steps=(), reward_faults=None, **overrides):
    """A trainer whose step k (1-based) gets: a NaN GRPO loss (TRL's `_compute_loss`, so in passes A and B), an inf in
    θ̂'s gradient only, a NaN SFT loss, or rewards replaced as `reward_faults[k]` says."""

    def reward(completions, answer, trainer_state, **kwargs):
        rewards = digit_reward(completions, answer)
        return (reward_faults or {}).get(trainer_state.global_step + 1, lambda r: r)(rewards)

    snapshots = _Snapshots()
    args = BridgeConfig(output_dir=str(tmp_path / "out"), **{**COMMON, "learning_rate": 1e-2, "lora_r": 4,
                                                              "sft_per_device_train_batch_size": 2, **overrides})
    trainer = BridgeTrainer(model=make_tiny_model(tok), reward_funcs=reward, args=args, train_dataset=rl_dataset(),
                            sft_dataset=sft_dataset(), processing_class=tok, callbacks=[snapshots])
    snapshots.trainer = trainer
    rl_loss, sft_loss, shadow_backward = trainer._compute_loss, trainer._sft_loss, trainer._shadow_backward

    def at(steps):
        return trainer.state.global_step + 1 in steps

    def faulty_rl_loss(model, inputs):
        loss = rl_loss(model, inputs)
        return loss * math.nan if at(rl_nan_steps) else loss

    def faulty_sft_loss(model, micro_batch):
        loss = sft_loss(model, micro_batch)
        return loss * math.nan if at(sft_nan_steps) else loss

    def faulty_shadow_backward(*a, **k):
        shadow_backward(*a, **k)
        if at(shadow_inf_steps):
            trainer.shadow_params[0].grad[0] = math.inf

    trainer._compute_loss, trainer._sft_loss, trainer._shadow_backward = faulty_rl_loss, faulty_sft_loss, faulty_shadow_backward
    return trainer, snapshots


def test_non_finite_loss_or_gradient_skips_theta_shadow_and_adapter_together(tok, tmp_path):
    # steps 3 and 6: rewards of NaN (TRL's "no reward") and of inf (TRL zeroes the group's advantages) are no fault
    reward_faults = {3: lambda r: [math.nan] * len(r), 6: lambda r: [math.inf] + r[1:]}
    trainer, snap = faulty_trainer(tok, tmp_path, rl_nan_steps=(2,), shadow_inf_steps=(4,), sft_nan_steps=(5,),
                                   reward_faults=reward_faults, max_steps=6)
    trainer.train()
    skipped = {2, 4, 5}
    for step in range(1, 7):
        before, after = snap.after[step - 1], snap.after[step]
        for part in ("base", "shadow", "adapter"):
            moved = any(not torch.equal(after[k], before[k]) for k in after if k.startswith(part))
            assert moved == (step not in skipped), (step, part)
    assert all(torch.isfinite(v).all() for v in snap.after[6].values())
    logs = [h for h in trainer.state.log_history if "bridge/sft_loss" in h]
    assert [h["bridge/skipped_steps"] for h in logs] == [0, 1, 1, 2, 3, 3]
    # the three learning-rate schedules advanced together through the skipped steps
    lrs = {g["lr"] for opt in (trainer.optimizer, trainer.shadow_optimizer, trainer.adapter_optimizer) for g in opt.param_groups}
    assert trainer.lr_scheduler.last_epoch == trainer.shadow_scheduler.last_epoch == trainer.adapter_scheduler.last_epoch == 6
    assert len(lrs) == 1


def test_too_many_consecutive_faults_stop_training_with_the_last_good_checkpoint_intact(tok, tmp_path):
    trainer, snap = faulty_trainer(tok, tmp_path, rl_nan_steps=(3, 4, 5, 6), max_steps=6, max_consecutive_skipped_steps=2,
                                   save_strategy="steps", save_steps=1)
    with pytest.raises(FloatingPointError, match=r"step 5.*max_consecutive_skipped_steps=2.*step 2.*checkpoint-4"):
        trainer.train()
    assert trainer.state.global_step == 4
    now = all_three(trainer)
    assert all(torch.isfinite(v).all() for v in now.values())
    assert_identical(now, snap.after[2])  # steps 3 and 4 were skipped, step 5 stopped before any update
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("*checkpoint-*")) == [f"checkpoint-{i}" for i in range(1, 5)]
    assert_identical(load_file(out / "checkpoint-4" / "bridge_state.safetensors"), now)


# ----------------------------------------------------------------------------------------------------------------------
# 4. Remaining bad input: rejected before step 1, naming the field, nothing written
# ----------------------------------------------------------------------------------------------------------------------
def _bridge(tok, out, model=None, processing_class=None, train_dataset=None, sft=None, reward_funcs=digit_reward, **kw):
    args = BridgeConfig(output_dir=str(out), max_steps=1, **{**COMMON, "lora_r": 4, **kw})
    return BridgeTrainer(model=model or make_tiny_model(tok), reward_funcs=reward_funcs, args=args,
                         train_dataset=train_dataset if train_dataset is not None else rl_dataset(),
                         sft_dataset=sft if sft is not None else sft_dataset(), processing_class=processing_class or tok)


def _untouched(out):
    return sorted(p.name for p in out.iterdir()) == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"


@pytest.fixture
def out(tmp_path):
    path = tmp_path / "out"
    path.mkdir()
    (path / "notes.txt").write_text("keep me")
    return path


def test_save_only_model_is_refused(tmp_path):
    with pytest.raises(ValueError, match="save_only_model=True is invalid.*θ̂"):
        BridgeConfig(output_dir=str(tmp_path), save_only_model=True)


@pytest.mark.parametrize("overrides,field", [
    (dict(per_device_train_batch_size=3, num_generations=2), "per_device_train_batch_size=3"),
    (dict(per_device_train_batch_size=2, num_generations=4), "per_device_train_batch_size=2"),
    (dict(per_device_train_batch_size=2, generation_batch_size=6, num_generations=4), "generation_batch_size=6"),
])
def test_batch_that_does_not_hold_whole_generation_groups_is_refused(tmp_path, overrides, field):
    with pytest.raises(ValueError, match=f"{field} is invalid.*whole groups of num_generations"):
        BridgeConfig(output_dir=str(tmp_path), **overrides)


@pytest.mark.parametrize("targets,layers,unmatched", [
    (["nope_proj"], None, "nope_proj"),
    (["q_proj", "v_prj"], None, "v_prj"),  # one typo among valid names: PEFT alone would drop it silently
    (["q_proj"], [7], "q_proj"),  # a layer the 2-layer model does not have
])
def test_lora_target_modules_that_match_nothing_are_refused(tok, out, targets, layers, unmatched):
    with pytest.raises(ValueError, match=rf"`lora_target_modules`.*\['{unmatched}'\] match no module"):
        _bridge(tok, out, lora_target_modules=targets, lora_layers_to_transform=layers)
    assert _untouched(out)


def test_sft_max_length_that_most_prompts_fill_is_refused(tok, out):
    rows = list(sft_dataset(6))  # a few such rows are dropped with a warning (tests/test_paper_recipe.py)
    for i in (1, 2, 4, 5):
        rows[i] = {"prompt": "What is " + " + ".join(["12"] * 40) + "?", "completion": " 480"}
    with pytest.raises(ValueError, match=r"4 of 6 traces \(rows \[1, 2, 4, 5\]\).*sft_max_length=32.*more than 50%"):
        _bridge(tok, out, sft=Dataset.from_list(rows), sft_max_length=32)
    assert _untouched(out)


@pytest.mark.parametrize("which", ["train_dataset", "sft_dataset"])
def test_conversational_data_without_chat_template_is_refused(tok, out, which):
    plain = make_tiny_tokenizer()
    plain.chat_template = None
    chat_rl = Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {i} + 1?"}], "answer": str(i + 1)}
                                 for i in range(8)])
    chat_sft = Dataset.from_list([{"messages": [{"role": "user", "content": f"What is {i} + 1?"},
                                                {"role": "assistant", "content": str(i + 1)}]} for i in range(8)])
    data = {"train_dataset": chat_rl} if which == "train_dataset" else {"sft": chat_sft}
    with pytest.raises(ValueError, match=rf"`{which}`.*conversational.*no chat template"):
        _bridge(tok, out, model=make_tiny_model(plain), processing_class=plain, **data)
    assert _untouched(out)


def test_reward_function_returning_nan_or_inf_is_refused_before_step_one(tok, out):
    def nan_reward(completions, **kwargs):
        return [math.nan] * len(completions)

    def inf_reward(completions, **kwargs):
        return [0.0] * (len(completions) - 1) + [math.inf]

    def none_reward(completions, **kwargs):
        return [None] * len(completions)

    for funcs, match in (([digit_reward, nan_reward], "'nan_reward' returned NaN for every one"),
                         ([inf_reward], "'inf_reward' returned an infinite reward"),
                         ([none_reward], "No reward function gave a reward")):
        trainer = _bridge(tok, out, reward_funcs=funcs, save_strategy="steps", save_steps=1)
        theta0 = base_state(trainer)
        with pytest.raises(ValueError, match=match):
            trainer.train()
        assert trainer.state.global_step == 0 and all(torch.equal(p, theta0[n]) for n, p in trainer.base_params)
        assert _untouched(out)
    _bridge(tok, out, reward_funcs=[digit_reward, none_reward]).train()  # None where it does not apply is fine
