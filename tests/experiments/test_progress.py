"""Progress lines of `compare` and `bench`: a run's step and s/step read from its growing train.log, the overall line
(done/total, reused, elapsed, remaining) and the bench lines, on a fake clock; the progress thread ends with its block."""

import threading

import pytest

from trl_bridge.experiments.progress import BenchProgress, CompareProgress, LogFollower, format_duration, resume_marker, stage_marker


class Clock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


def bar(n, total):  # the Trainer's tqdm bar as it lands in a file: redrawn with \r, no description before the %
    return f"\r{100 * n // total:3d}%|{'█' * n}{' ' * (total - n)}| {n}/{total} [00:0{n}<00:00,  1.00s/it]"


def test_format_duration():
    assert [format_duration(s) for s in (None, 0, 44.6, 60, 723, 3600 + 5 * 60 + 9)] == \
        ["?", "0s", "45s", "1m00s", "12m03s", "1h05m"]


def test_follower_reads_the_step_and_seconds_per_step_from_a_growing_log(tmp_path):
    log = tmp_path / "train.log"
    log.write_text("an earlier attempt\nstep 9/10 | reward 0.5 | 1.0 s/step\n")  # not this invocation's: skipped
    clock = Clock()
    f = LogFollower(str(log), offset=log.stat().st_size, total=10, stage_steps=10, clock=clock)

    def write(text, dt):
        with open(log, "a") as out:
            out.write(text)
        clock.t += dt
        return f.poll()

    assert write("Loading weights: 100%|██| 27/27 [00:00<00:00]\n[trl-bridge] held-out accuracy before ...\n", 5) is None
    assert f.describe() == "step 0/10 (starting)"
    assert write(stage_marker(1, 1, "bridge", 0, 10, 10) + "\n", 0) == 0
    assert write(bar(0, 10), 1) == 0  # training starts (time 1006)
    assert f.seconds_per_step is None and f.describe() == "step 0/10, ? s/step"
    assert write(bar(1, 10) + "\r    \rstep 1/10 | reward 0.000 | λ 1.00 | 4.0 s/step\n", 4) == 1  # seen at 1010
    assert f.seconds_per_step == pytest.approx(4.0)
    assert write(bar(1, 10) + bar(2, 10), 4) == 2  # the bar alone, its line not ended yet (1014)
    assert write(bar(3, 10) + "\r 50%|█████| 2/4 [00:01<00:01]", 8) == 3  # an evaluation loop's bar (of 4) is no step
    assert f.seconds_per_step == pytest.approx((1022 - 1006) / 3)
    assert f.describe() == "step 3/10, 5.33 s/step"
    assert f.remaining_seconds() == pytest.approx(7 * 16 / 3)
    write("\rdone: 10 steps | 1m02s | train_loss 0.1\n", 1)
    assert f.step == 10 and f.describe().endswith(" s/step, training done (evaluating, saving)")


def test_follower_places_the_second_stage_after_the_first(tmp_path):
    """cold_start: stage 1 trains steps 1..2, stage 2 steps 3..4 of 4; loading stage 2 is not counted as a step."""
    log = tmp_path / "train.log"
    clock = Clock()
    f = LogFollower(str(log), total=4, stage_steps=2, clock=clock)
    text = [
        (stage_marker(1, 2, "sft", 0, 2, 4) + "\n" + bar(0, 2), 2),
        (bar(1, 2) + "\nstep 1/2 | sft_loss 6.0 | 2.0 s/step\n", 2),
        (bar(2, 2) + "\ndone: 2 steps | 4.0s\n", 2),
        (stage_marker(2, 2, "grpo", 2, 2, 4) + "\n" + bar(0, 2), 30),  # export, then stage 2 loads for a long time
    ]
    for chunk, dt in text:
        log.open("a").write(chunk)
        clock.t += dt
        f.poll()
    assert f.step == 2 and f.total == 4 and f.seconds_per_step == pytest.approx(2.0)  # the first stage's until measured
    log.open("a").write(bar(1, 2) + "\nstep 1/2 | reward 0.0 | 3.0 s/step\n")
    clock.t += 3
    assert f.poll() == 3 and f.seconds_per_step == pytest.approx(3.0)
    assert f.describe() == "step 3/4, 3.00 s/step"


def test_follower_does_not_count_a_resumed_runs_jump_to_its_checkpoint(tmp_path):
    """A run resumed from checkpoint-16: the bar shows 0/40, then 17/40 after one real step; s/step is that step's."""
    log = tmp_path / "train.log"
    clock = Clock()
    f = LogFollower(str(log), total=40, stage_steps=40, clock=clock)
    resumed = resume_marker("runs/grpo/seed5", "runs/grpo/seed5/checkpoint-16")
    for chunk, dt in [(stage_marker(1, 1, "grpo", 0, 40, 40) + "\n" + resumed + "\n" + bar(0, 40), 1), (bar(17, 40), 14),
                      (bar(18, 40), 14), (bar(19, 40), 16)]:
        log.open("a").write(chunk)
        clock.t += dt
        f.poll()
    assert f.step == 19 and f.seconds_per_step == pytest.approx(15.0)
    assert f.remaining_seconds() == pytest.approx(21 * 15.0)


def test_compare_progress_lines_and_remaining_time(tmp_path):
    clock, printed = Clock(), []
    p = CompareProgress(total=5, reused=1, jobs=2, interval=30, clock=clock, print_fn=printed.append)
    logs = {k: tmp_path / f"{k}.log" for k in ("a", "b")}
    for k, log in logs.items():
        log.write_text(stage_marker(1, 1, k, 0, 10, 10) + "\n" + bar(0, 10))
        p.started(k, f"{k} seed 0", 10, LogFollower(str(log), total=10, stage_steps=10, clock=clock))
    p.poll()
    assert p.lines()[0] == "[trl-bridge compare] runs 1/5 done (1 reused), 2 running, 2 waiting | elapsed 0s | remaining ?"
    clock.t += 20
    logs["a"].open("a").write(bar(2, 10))
    logs["b"].open("a").write(bar(1, 10))
    p.poll()
    lines = p.lines()
    # a: 8 steps left at 10 s, b: 9 at 20 s; the two waiting runs take 10 × the mean 15 s/step each, on free slots
    assert lines[0] == "[trl-bridge compare] runs 1/5 done (1 reused), 2 running, 2 waiting | elapsed 20s | remaining ~5m30s"
    assert lines[1:] == ["[trl-bridge compare]   a seed 0: step 2/10, 10.0 s/step, running 20s",
                         "[trl-bridge compare]   b seed 0: step 1/10, 20.0 s/step, running 20s"]
    clock.t += 80
    logs["a"].open("a").write(bar(10, 10) + "\ndone: 10 steps\n")
    line = p.finished("a")
    assert line.startswith("[trl-bridge compare] a seed 0: done in 1m40s (step 10/10, ")
    assert "runs 2/5 done (1 reused), 1 running, 2 waiting | elapsed 1m40s | remaining ~" in line
    assert p.finished("b", "exit code 1; see b.log").startswith("[trl-bridge compare] b seed 0: FAILED (1m40s): exit code 1")
    assert p.waiting == 2 and "1 failed" in p.overall()
    assert p.eta() == pytest.approx(100.0)  # two waiting runs of the mean 100 s, side by side


def test_compare_progress_thread_prints_and_ends_with_its_block(tmp_path):
    printed = []
    log = tmp_path / "train.log"
    log.write_text(stage_marker(1, 1, "grpo", 0, 3, 3) + "\n" + bar(1, 3))
    with CompareProgress(total=1, reused=0, jobs=1, interval=0.02, print_fn=printed.append, poll_seconds=0.01) as p:
        p.started("grpo/seed0", "grpo seed 0", 3, LogFollower(str(log), total=3, stage_steps=3))
        for _ in range(500):  # at most 5 s
            if printed:
                break
            threading.Event().wait(0.01)
        p.emit(p.finished("grpo/seed0"))
    assert not any(t.name == "trl-bridge-progress" for t in threading.enumerate())
    assert "runs 0/1 done, 1 running, 0 waiting" in printed[0] and "grpo seed 0: step 1/3" in printed[0]
    assert printed[-1].startswith("[trl-bridge compare] grpo seed 0: done in ") and "runs 1/1 done" in printed[-1]
    with CompareProgress(total=1, reused=1, jobs=1, interval=0):  # 0: no thread at all
        assert not any(t.name == "trl-bridge-progress" for t in threading.enumerate())


def test_bench_progress_lines():
    clock, printed = Clock(), []
    p = BenchProgress(["grpo", "bridge"], steps=4, warmup=1, interval=30, clock=clock, print_fn=printed.append)
    clock.t += 2
    assert p.step("grpo", 2.0) == "[trl-bridge bench] variant 1/2 grpo: step 1/4 (warmup), 2.00 s/step | elapsed 2s | remaining ?"
    clock.t += 4
    assert p.step("bridge", 4.0).endswith("variant 2/2 bridge: step 1/4 (warmup), 4.00 s/step | elapsed 6s | remaining ~18s")
    clock.t += 4
    assert p.step("bridge", 4.0) is None  # not due yet
    clock.t += 30
    assert p.step("grpo", 3.0) == ("[trl-bridge bench] variant 1/2 grpo: step 2/4 (measured), 2.50 s/step | "
                                   "elapsed 40s | remaining ~13s")
    for v in ("grpo", "bridge", "grpo", "bridge"):
        p.step(v, 1.0)
    assert printed[-1].startswith("[trl-bridge bench] variant 2/2 bridge: step 4/4 (measured)")
    assert printed[-1].endswith("remaining ~0s") and len(printed) == 4
