"""Tests for `trl-bridge eval`: metric math, the generation and --completions paths, output files, the training
callback and bad-input errors. Generation uses the tiny 2-layer model (seconds on CPU); benchmark rows come from the
small data folder shipped in tests/fixtures/data_dir (`fixture_data_dir`), so these tests run on any machine."""

import itertools
import json
import math

import pytest
import torch

from trl_bridge.tasks.benchmarks import build_prompt, get_benchmark
from trl_bridge.evaluation.evaluate import (
    BenchmarkEvalCallback,
    HFGenerator,
    compute_metrics,
    evaluate,
    format_table,
    grade_completions_file,
    main,
    parse_per_benchmark,
    pass_at_k,
    write_outputs,
)
from trl_bridge.tiny import make_tiny_model, make_tiny_tokenizer


@pytest.fixture(scope="module")
def tiny():
    tok = make_tiny_tokenizer()
    return make_tiny_model(tok), tok


@pytest.fixture(scope="module")
def tiny_dir(tiny, tmp_path_factory):
    """The tiny model saved as a local folder, as a user would pass it to --model."""
    path = tmp_path_factory.mktemp("tiny_model")
    model, tok = tiny
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# metrics


def _brute_force_pass_at_k(outcomes, k):
    """Fraction of all k-subsets of the samples that contain at least one correct sample."""
    subsets = list(itertools.combinations(range(len(outcomes)), k))
    return sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_pass_at_k_matches_brute_force(n):
    for outcomes in itertools.product([False, True], repeat=n):
        for k in range(1, n + 1):
            assert pass_at_k(n, sum(outcomes), k) == pytest.approx(_brute_force_pass_at_k(outcomes, k))


def test_pass_at_k_rejects_bad_arguments():
    with pytest.raises(ValueError, match="c <= n"):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(4, 1, 8)
    with pytest.raises(TypeError):
        pass_at_k(4.0, 1, 1)


def test_compute_metrics():
    correct = [[True, False, False, False], [True, True, True, True], [False] * 4]
    m = compute_metrics(correct)
    assert m["n_problems"] == 3 and m["n_samples"] == 12 and m["samples_per_problem"] == 4
    assert m["pass@1"] == pytest.approx((0.25 + 1 + 0) / 3)
    assert m["avg@4"] == m["pass@1"]
    assert m["pass@2"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert m["pass@4"] == pytest.approx(2 / 3)
    assert "pass@8" not in m
    greedy = compute_metrics([[True], [False], [True], [True]])
    assert greedy["pass@1"] == 0.75 and "avg@1" not in greedy and "pass@2" not in greedy
    with pytest.raises(ValueError):
        compute_metrics([])


def test_parse_per_benchmark():
    names = ["math500", "aime24"]
    assert parse_per_benchmark("1,aime24=8", names, int) == {"math500": 1, "aime24": 8}
    assert parse_per_benchmark("aime24=8", names, int) == {"math500": 1, "aime24": 8}
    assert parse_per_benchmark("0.6", names, float) == {"math500": 0.6, "aime24": 0.6}
    assert parse_per_benchmark(4, names, int) == {"math500": 4, "aime24": 4}
    with pytest.raises(ValueError, match="gsm8k"):
        parse_per_benchmark("1,gsm8k=4", names, int, "samples_per_problem")
    with pytest.raises(ValueError, match="samples_per_problem"):
        parse_per_benchmark("many", names, int, "samples_per_problem")


# ---------------------------------------------------------------------------------------------------------------------
# prompts


def test_prompts(tiny, fixture_data_dir):
    _, tok = tiny
    math500 = get_benchmark("math500")
    row = math500.load(fixture_data_dir, limit=1)[0]
    boxed = build_prompt(math500, row, "default", tok)
    assert boxed.startswith("<|im_start|>user\n" + row["problem"])
    assert "put your final answer within \\boxed{}" in boxed and boxed.endswith("<|im_start|>assistant\n")
    assert build_prompt(math500, row, "plain", tok, "off") == row["problem"] + "\n"
    gpqa = get_benchmark("gpqa_diamond")
    grow = gpqa.load(fixture_data_dir, limit=1)[0]
    native = build_prompt(gpqa, grow, "default", tok)
    assert native.startswith("<|im_start|>system\n") and "ANSWER: $LETTER" in native
    kk = get_benchmark("knights_knaves_3ppl")
    krow = kk.load(fixture_data_dir, limit=1)[0]
    assert build_prompt(kk, krow, "default", tok) == krow["raw_prompt"]  # already holds chat markup
    with pytest.raises(ValueError, match="prompt template"):
        build_prompt(math500, row, "fancy", tok)


# ---------------------------------------------------------------------------------------------------------------------
# generation path


def test_hf_generator_batches_and_samples(tiny):
    model, tok = tiny
    gen = HFGenerator(model, tok, batch_size=4, max_new_tokens=5)
    prompts = ["What is 1 + 1?", "Compute 3 * 4 - 5 please, step by step.", "Hi"]
    greedy = gen(prompts, 1, 0.0)
    assert [len(c) for c in greedy] == [1, 1, 1]
    # batching and left padding must not change greedy outputs
    single = [HFGenerator(model, tok, batch_size=1, max_new_tokens=5)([p], 1, 0.0)[0] for p in prompts]
    assert greedy == single
    torch.manual_seed(0)
    sampled = gen(prompts, 3, 1.0)
    assert [len(c) for c in sampled] == [3, 3, 3]
    assert gen.generated_tokens > 0
    for training in (True, False):  # generation switches to eval mode and restores the caller's mode
        model.train(training)
        gen(prompts[:1], 1, 0.0)
        assert model.training is training


def test_evaluate_end_to_end_with_an_oracle_generator(fixture_data_dir):
    """A generator that answers with the gold answer (math sets) or wrongly (GSM8K) gives pass@1 1 and 0."""
    loaded = {}

    def generator(prompts, n, temperature):
        rows = loaded["rows"]
        return [[f"\\boxed{{{r['gold']}}}"] * n for r in rows] if loaded["good"] else [["\\boxed{-1}"] * n for r in rows]

    out = {}
    for name, good in [("math500", True), ("gsm8k", False)]:
        loaded["rows"], loaded["good"] = get_benchmark(name).load(fixture_data_dir, limit=3), good
        out[name] = evaluate(generator, None, name, fixture_data_dir, limit=3, samples_per_problem=2, temperature=0.7)
    assert out["math500"].metrics["math500"]["pass@1"] == 1.0
    assert out["math500"].metrics["math500"]["pass@2"] == 1.0
    assert out["math500"].summary["math_avg"]["pass@1"] == 1.0
    assert out["gsm8k"].metrics["gsm8k"]["pass@1"] == 0.0
    assert "math_avg" not in out["gsm8k"].summary
    assert len(out["math500"].samples) == 6 and all(s["correct"] for s in out["math500"].samples)


def test_cli_generates_and_writes_outputs(tiny_dir, fixture_data_dir, tmp_path, capsys):
    out_dir = tmp_path / "out"
    rc = main([
        "--model", str(tiny_dir), "--benchmarks", "math500,amc23", "--limit", "2", "--max_new_tokens", "4",
        "--samples_per_problem", "1,amc23=2", "--temperature", "0,amc23=1.0", "--batch_size", "4",
        "--data_dir", str(fixture_data_dir), "--output_dir", str(out_dir), "--seed", "1",
    ])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| math500 | 2 | 1 |" in printed and "| amc23 | 2 | 2 |" in printed and "samples/s" in printed
    summary = json.loads((out_dir / "summary.json").read_text())
    assert set(summary["benchmarks"]) == {"math500", "amc23"}
    assert summary["benchmarks"]["amc23"]["samples_per_problem"] == 2 and "pass@2" in summary["benchmarks"]["amc23"]
    assert summary["math_avg"]["benchmarks"] == ["math500", "amc23"] and summary["math_avg"]["complete"] is False
    assert summary["throughput"]["n_samples"] == 6 and summary["throughput"]["samples_per_second"] > 0
    assert summary["settings"]["model"] == str(tiny_dir) and summary["settings"]["max_new_tokens"] == 4
    samples = [json.loads(line) for line in (out_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6
    assert set(samples[0]) >= {"benchmark", "id", "sample", "problem", "completion", "extracted", "gold", "correct"}
    assert [s["sample"] for s in samples if s["benchmark"] == "amc23"] == [0, 1, 0, 1]
    assert (out_dir / "results.md").read_text() in printed


# ---------------------------------------------------------------------------------------------------------------------
# --completions path


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_completions_file_is_graded(fixture_data_dir, tmp_path, capsys):
    math_rows = get_benchmark("math500").load(fixture_data_dir, limit=3)
    gpqa_rows = get_benchmark("gpqa_diamond").load(fixture_data_dir, limit=2)
    lines = []
    # math500: problem 0 right twice, problem 1 right once of two, problem 2 wrong twice
    for row, verdicts in zip(math_rows, [(True, True), (True, False), (False, False)]):
        for ok in verdicts:
            lines.append({"benchmark": "math500", "id": row["id"], "completion": f"\\boxed{{{row['gold'] if ok else 'zzz'}}}"})
    lines.append({"benchmark": "gpqa_diamond", "id": int(gpqa_rows[0]["id"]), "completion": f"ANSWER: {gpqa_rows[0]['gold']}"})
    lines.append({"benchmark": "gpqa_diamond", "id": gpqa_rows[1]["id"], "completion": "no idea"})
    path = _write_jsonl(tmp_path / "completions.jsonl", lines)

    result = grade_completions_file(path, data_dir=fixture_data_dir)
    m = result.metrics["math500"]
    assert m["n_problems"] == 3 and m["samples_per_problem"] == 2
    assert m["pass@1"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert m["pass@2"] == pytest.approx(2 / 3)
    assert result.metrics["gpqa_diamond"]["pass@1"] == 0.5
    assert [s["correct"] for s in result.samples if s["benchmark"] == "math500"] == [True, True, True, False, False, False]

    out_dir = tmp_path / "graded"
    assert main(["--completions", str(path), "--data_dir", str(fixture_data_dir), "--output_dir", str(out_dir)]) == 0
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["benchmarks"]["math500"]["pass@1"] == pytest.approx(0.5)
    assert len((out_dir / "samples.jsonl").read_text().splitlines()) == len(lines)
    assert "| gpqa_diamond | 2 | 1 | 50.0 |" in capsys.readouterr().out
    # --benchmarks and --limit restrict what is graded
    only = grade_completions_file(path, benchmarks="math500", data_dir=fixture_data_dir, limit=1)
    assert list(only.metrics) == ["math500"] and only.metrics["math500"]["n_problems"] == 1


def test_completions_for_a_problem_graded_from_neither_source_are_refused(fixture_data_dir, tmp_path):
    """OlympiadBench id 1965 is in the local file (tests/fixtures/data_dir) but not on the Hub: it is graded from
    neither, and a completions file written for the 675-row local set says so instead of "not a row id"."""
    lines = [{"benchmark": "olympiadbench", "id": 1606, "completion": "\\boxed{2}"},
             {"benchmark": "olympiadbench", "id": 1965, "completion": "\\boxed{f(x)=x}"}]
    path = _write_jsonl(tmp_path / "c.jsonl", lines)
    with pytest.raises(ValueError, match=r"c.jsonl:2 id '1965' of olympiadbench is graded from neither data source"):
        grade_completions_file(path, data_dir=fixture_data_dir)
    result = grade_completions_file(_write_jsonl(tmp_path / "ok.jsonl", lines[:1]), data_dir=fixture_data_dir)
    assert result.metrics["olympiadbench"]["n_problems"] == 1 and result.metrics["olympiadbench"]["pass@1"] == 1.0


def test_write_outputs_and_table(fixture_data_dir, tmp_path):
    rows = get_benchmark("aime24").load(fixture_data_dir, limit=2)
    path = _write_jsonl(tmp_path / "c.jsonl", [{"benchmark": "aime24", "id": r["id"], "completion": "\\boxed{0}"} for r in rows])
    result = grade_completions_file(path, data_dir=fixture_data_dir)
    paths = write_outputs(result, tmp_path / "o")
    assert json.loads(paths["summary"].read_text())["benchmarks"]["aime24"]["pass@1"] == 0.0
    table = format_table(result.summary)
    assert table == paths["table"].read_text() and "| aime24 | 2 | 1 | 0.0 |" in table
    assert "math avg (1 of 5)" in table


def test_oracle_option_checks_the_grader(fixture_data_dir, tmp_path, capsys):
    common = ["--benchmarks", "math500,gsm8k,gpqa_diamond,knights_knaves_4ppl", "--limit", "6",
              "--data_dir", str(fixture_data_dir)]
    assert main(["--oracle", "gold", *common, "--output_dir", str(tmp_path / "gold")]) == 0
    gold = json.loads((tmp_path / "gold" / "summary.json").read_text())
    assert {name: m["pass@1"] for name, m in gold["benchmarks"].items()} == dict.fromkeys(
        ["math500", "gsm8k", "gpqa_diamond", "knights_knaves_4ppl"], 1.0)
    assert main(["--oracle", "shuffled", *common, "--output_dir", str(tmp_path / "shuffled")]) == 0
    shuffled = json.loads((tmp_path / "shuffled" / "summary.json").read_text())
    assert all(m["pass@1"] == 0.0 for m in shuffled["benchmarks"].values())
    capsys.readouterr()
    assert "amc23" in _error(capsys, ["--oracle", "reference", "--benchmarks", "amc23", "--data_dir", str(fixture_data_dir)])


# ---------------------------------------------------------------------------------------------------------------------
# bad input


def _error(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    return err


def test_unknown_benchmark_lists_the_valid_ones(capsys, tiny_dir, fixture_data_dir):
    err = _error(capsys, ["--model", str(tiny_dir), "--benchmarks", "math500,mmlu", "--data_dir", str(fixture_data_dir)])
    assert "'mmlu'" in err and "math500" in err and "olympiadbench" in err and "gpqa_diamond" in err
    with pytest.raises(ValueError, match="valid benchmarks"):
        get_benchmark("nope")


def test_missing_data_dir(capsys, tiny_dir, tmp_path):
    err = _error(capsys, ["--model", str(tiny_dir), "--data_dir", str(tmp_path / "nowhere")])
    assert "data_dir" in err and "nowhere" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    err = _error(capsys, ["--model", str(tiny_dir), "--benchmarks", "math500", "--data_dir", str(empty)])
    assert "math500" in err and "test.jsonl" in err and "not found" in err


def test_missing_model_and_conflicting_options(capsys, tmp_path, fixture_data_dir):
    assert "--model" in _error(capsys, ["--benchmarks", "math500", "--data_dir", str(fixture_data_dir)])
    path = _write_jsonl(tmp_path / "c.jsonl", [{"benchmark": "math500", "id": "x", "completion": ""}])
    assert "not both --model and --completions" in _error(capsys, ["--model", "m", "--completions", str(path)])
    assert "temperature" in _error(
        capsys, ["--model", "m", "--benchmarks", "aime24", "--samples_per_problem", "8", "--data_dir", str(fixture_data_dir)]
    )


@pytest.mark.parametrize(
    "content, expected",
    [
        ("not json\n", [":1", "valid JSON"]),
        ('{"benchmark": "math500", "completion": "x"}\n', ["'id'", ":1"]),
        ('{"benchmark": "math500", "id": "test/x.json"}\n', ["'completion'"]),
        ('{"benchmark": "math500", "id": "test/x.json", "completion": 5}\n', ["'completion'", "string"]),
        ('{"benchmark": "mmlu", "id": "1", "completion": "x"}\n', ["'mmlu'", "valid benchmarks"]),
        ('{"benchmark": "math500", "id": "no-such-row", "completion": "x"}\n', ["'no-such-row'", "math500"]),
        ("[1, 2]\n", ["JSON object"]),
        ("\n", ["no completions"]),
    ],
)
def test_malformed_completions_file(capsys, tmp_path, fixture_data_dir, content, expected):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    err = _error(capsys, ["--completions", str(path), "--data_dir", str(fixture_data_dir), "--output_dir", str(tmp_path)])
    for fragment in expected:
        assert fragment in err


def test_missing_completions_file(capsys, tmp_path, fixture_data_dir):
    err = _error(capsys, ["--completions", str(tmp_path / "none.jsonl"), "--data_dir", str(fixture_data_dir)])
    assert "none.jsonl" in err and "not found" in err


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for option in ["--model", "--benchmarks", "--data_dir", "--samples_per_problem", "--temperature", "--top_p",
                   "--max_new_tokens", "--prompt_template", "--chat_template", "--batch_size", "--limit",
                   "--output_dir", "--seed", "--backend", "--dtype", "--device", "--completions", "--oracle"]:
        assert option in text


# ---------------------------------------------------------------------------------------------------------------------
# vLLM backend


def test_vllm_backend_missing_gives_a_clear_error(monkeypatch):
    import sys

    from trl_bridge.evaluation.evaluate import VLLMGenerator

    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` fail even where it is installed
    with pytest.raises(ImportError, match="pip install 'trl-bridge\\[vllm\\]'"):
        VLLMGenerator("some/model")


@pytest.mark.gpu
def test_vllm_backend_generates(tiny_dir):
    pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        pytest.skip("vLLM needs a CUDA GPU")
    from trl_bridge.evaluation.evaluate import VLLMGenerator

    gen = VLLMGenerator(str(tiny_dir), max_new_tokens=4, gpu_memory_utilization=0.2)
    out = gen(["What is 1 + 1?", "Hi"], 2, 1.0)
    assert [len(c) for c in out] == [2, 2] and all(isinstance(t, str) for c in out for t in c)


# ---------------------------------------------------------------------------------------------------------------------
# training callback


def test_callback_evaluates_every_n_steps(tiny, fixture_data_dir):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    model, tok = tiny
    logged = []
    cb = BenchmarkEvalCallback(["math500", "gsm8k"], fixture_data_dir, limit=2, every_n_steps=2, max_new_tokens=3,
                               log_fn=logged.append)
    state, control = TrainerState(), TrainerControl()
    args = TrainingArguments(output_dir="unused", report_to=[])
    for step in range(1, 5):
        state.global_step = step
        cb.on_step_end(args, state, control, model=model, processing_class=tok)
    assert [h["step"] for h in cb.history] == [2, 4]
    assert len(logged) == 2
    assert {"eval/math500/pass@1", "eval/gsm8k/pass@1", "eval/math_avg/pass@1"} <= set(logged[0])
    assert all(0.0 <= logged[0][k] <= 1.0 for k in logged[0] if "pass@" in k)


def test_callback_logs_through_a_real_trainer(tiny, fixture_data_dir, tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model, tok = tiny
    enc = tok(["What is 12 + 7? 19", "Compute 3 * 4 - 5. 7"] * 2)
    data = Dataset.from_dict({"input_ids": enc["input_ids"], "labels": enc["input_ids"]})
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=1, report_to=[],
                             use_cpu=True, logging_steps=100, save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=data, processing_class=tok)
    cb = BenchmarkEvalCallback("math500", fixture_data_dir, limit=1, every_n_steps=1, max_new_tokens=2).attach(trainer)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "eval/math500/pass@1" in entry]
    assert [entry["step"] for entry in logged] == [1, 2]
    assert len(cb.history) == 2


def test_callback_rejects_bad_arguments(fixture_data_dir, tmp_path):
    with pytest.raises(ValueError, match="every_n_steps"):
        BenchmarkEvalCallback("math500", fixture_data_dir, every_n_steps=0)
    with pytest.raises(ValueError, match="valid benchmarks"):
        BenchmarkEvalCallback("nope", fixture_data_dir)
    with pytest.raises(FileNotFoundError, match="data_dir"):
        BenchmarkEvalCallback("math500", tmp_path / "missing")


def test_math_avg_uses_the_five_math_benchmarks(fixture_data_dir, tmp_path):
    lines = []
    for name, ok in [("math500", True), ("aime24", False), ("gsm8k", True)]:
        row = get_benchmark(name).load(fixture_data_dir, limit=1)[0]
        lines.append({"benchmark": name, "id": row["id"], "completion": f"\\boxed{{{row['gold'] if ok else '-1'}}}"})
    result = grade_completions_file(_write_jsonl(tmp_path / "c.jsonl", lines), data_dir=fixture_data_dir)
    assert result.summary["math_avg"]["benchmarks"] == ["math500", "aime24"]  # gsm8k is not one of the five
    assert math.isclose(result.summary["math_avg"]["pass@1"], 0.5)
    assert result.flat_metrics()["eval/math_avg/pass@1"] == 0.5
