"""Grader tests: `verify_math` / `extract_final_answer` behaviour, and the oracle check that every benchmark's own
reference answers (and solutions, where they end in a marked answer) grade as correct while other rows' answers
grade as wrong. The oracle tests grade every row of every benchmark, so they need the full local files
(TRL_BRIDGE_DATA_DIR) and are skipped without them."""

import threading
import time

import pytest

from trl_bridge.tasks.benchmarks import (
    MATH_BENCHMARKS,
    clean_olympiad_answer,
    extract_choice,
    get_benchmark,
    grade_math,
    gsm8k_gold,
    oracle_completions,
)
from trl_bridge.tasks.grading import extract_boxed, extract_final_answer, verify_math

# ---------------------------------------------------------------------------------------------------------------------
# verify_math / extract_final_answer


@pytest.mark.parametrize(
    "completion, gold",
    [
        ("so the answer is \\boxed{\\frac12}.", "\\frac{1}{2}"),
        ("The final answer is 0.5", "\\frac{1}{2}"),
        ("\\boxed{(-\\infty, 3]}", "(-\\infty,3]"),
        ("\\boxed{x \\in [2, 5)}", "[2,5)"),
        ("\\boxed{3, 5}", "5, 3"),
        ("\\boxed{45^\\circ}", "45"),
        ("\\boxed{5 \\mathrm{~cm}}", "5"),
        ("\\boxed{1,000}", "1000"),
        ("\\boxed{\\dfrac{3}{4}}", "0.75"),
        ("first \\boxed{7}, then corrected: \\boxed{8}", "8"),
        ("\\boxed{104.}", "104"),
        ("\\boxed{\\textbf{(073)}}", "073"),
        ("\\fbox{12}", "12"),
    ],
)
def test_verify_math_accepts_equivalent_answers(completion, gold):
    assert verify_math(completion, gold) is True


@pytest.mark.parametrize(
    "completion, gold",
    [
        ("\\boxed{3}", "4"),
        ("first \\boxed{8}, then corrected: \\boxed{7}", "8"),  # only the last box counts
        ("\\boxed{\\frac{1}{3}}", "0.33"),
        ("\\boxed{(1, 2]}", "[1,2]"),
        ("no answer here", "5"),
    ],
)
def test_verify_math_rejects_wrong_answers(completion, gold):
    assert verify_math(completion, gold) is False


@pytest.mark.parametrize(
    "completion, gold",
    [(None, "1"), ("\\boxed{1}", None), (b"\\boxed{1}", "1"), (1, "1"), ("", "1"), ("\\boxed{1}", ""),
     ("\\boxed{1}", ["1"]), ("\\boxed{1}", True), ("\\boxed{", "1"), ("}}}}{{{{\\frac{", "1"), ("\x00\xff", "1")],
)
def test_verify_math_never_raises_on_garbage(completion, gold):
    assert verify_math(completion, gold) is False


def test_verify_math_accepts_numeric_gold():
    assert verify_math("\\boxed{27}", 27.0) is True
    assert verify_math("\\boxed{27}", 27) is True
    assert verify_math("\\boxed{2.5}", 2.5) is True
    assert verify_math("\\boxed{27}", 28.0) is False


def test_verify_math_works_outside_the_main_thread():
    results = []

    def worker():
        results.append((verify_math("\\boxed{\\frac{2}{4}}", "0.5"), verify_math("\\boxed{3}", "2")))

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(timeout=60)
    assert results == [(True, False)]


def test_verify_math_runtime_is_bounded_on_huge_input():
    nasty = "\\boxed{" + "(" * 5000 + "1" + ")" * 5000 + "} " + "x^" * 20000
    start = time.perf_counter()
    assert verify_math(nasty, "2") is False
    assert time.perf_counter() - start < 30


def test_extract_final_answer():
    assert extract_final_answer("a \\boxed{1} b \\boxed{\\frac{a}{b^{2}}} c") == "\\frac{a}{b^{2}}"
    assert extract_final_answer("\\boxed{\\{1, 2\\}}") == "\\{1, 2\\}"
    assert extract_final_answer("Therefore, the final answer is $42$.") == "42"
    assert extract_final_answer("") is None
    assert extract_final_answer(None) is None
    assert extract_boxed("\\boxed{unclosed") is None


# ---------------------------------------------------------------------------------------------------------------------
# benchmark-specific answer handling


def test_gold_normalisation():
    assert clean_olympiad_answer(["$69$,$84$"]) == "69, 84"
    assert clean_olympiad_answer(["$(-\\infty, 0) \\cup\\{1\\}$."]) == "(-\\infty, 0) \\cup\\{1\\}"
    assert gsm8k_gold("so 1,200 - 5 = 1195\n#### 1,195") == "1195"
    with pytest.raises(ValueError, match="####"):
        gsm8k_gold("no marker")


def test_gsm8k_grader_uses_boxed_or_last_number():
    bench = get_benchmark("gsm8k")
    rows = [{"gold": "1195"}] * 4
    grades = bench.grade(rows, ["It costs $1,195.", "\\boxed{1195} dollars, 7 items", "1195 then 12", "nothing"])
    assert [g["correct"] for g in grades] == [True, True, False, False]
    assert grades[0]["extracted"] == "1195"


def test_multiple_choice_extraction():
    assert extract_choice("blah\nANSWER: c") == "C"
    assert extract_choice("The answer is (B).") == "B"
    assert extract_choice("so \\boxed{D}") == "D"
    assert extract_choice("\\boxed{\\text{(A)}}") == "A"
    assert extract_choice(" 3 ") == "3"
    assert extract_choice("I cannot decide") is None
    bench = get_benchmark("arc_challenge")
    grades = bench.grade([{"gold": "2"}, {"gold": "B"}, {"gold": "C"}], ["ANSWER: 2", "ANSWER: 2", "ANSWER: B"])
    assert [g["correct"] for g in grades] == [True, True, False]  # 1-4 and A-D labels are the same options


def test_olympiad_multiple_answers_in_any_order(benchmarks_dir):
    rows = [r for r in get_benchmark("olympiadbench").load(benchmarks_dir) if r["gold"] == "69, 84"]
    assert rows, "OlympiadBench row with final answer $69$,$84$ not found"
    grades = get_benchmark("olympiadbench").grade(rows * 3, ["\\boxed{84, 69}", "\\boxed{69,84}", "\\boxed{69}"])
    assert [g["correct"] for g in grades] == [True, True, False]


# ---------------------------------------------------------------------------------------------------------------------
# oracle: reference answers must grade as correct, other rows' answers as wrong


def _rate(grades):
    return sum(g["correct"] for g in grades) / len(grades)


ORACLE_BENCHMARKS = (*MATH_BENCHMARKS, "gsm8k")
# Reference solutions that end in a marked final answer (\boxed / \framebox / ####). OlympiadBench solutions are
# proofs without a marked answer and AMC23 has none, so those two are covered by the gold-answer oracle only.
REFERENCE_SOLUTION_BENCHMARKS = ("math500", "aime24", "minerva_math", "gsm8k")


@pytest.fixture(scope="module")
def oracle_results(benchmarks_dir):
    """Grade every row of the six math sets three ways: its own gold answer boxed ("gold"), the next row's gold answer
    boxed ("shuffled") and its own reference solution ("reference"). All math-verify work goes through one `grade_math` call (one worker pool)."""
    jobs = []  # (benchmark, kind, rows, completions)
    for name in ORACLE_BENCHMARKS:
        bench = get_benchmark(name)
        rows = bench.load(benchmarks_dir)
        kinds = ("gold", "shuffled", "reference") if name in REFERENCE_SOLUTION_BENCHMARKS else ("gold", "shuffled")
        jobs += [(name, kind, rows, oracle_completions(bench, rows, kind)) for kind in kinds]
    math_jobs = [job for job in jobs if get_benchmark(job[0]).grader is grade_math]
    flat = grade_math([r for job in math_jobs for r in job[2]], [c for job in math_jobs for c in job[3]])
    results, pos = {}, 0
    for name, kind, rows, completions in jobs:
        if get_benchmark(name).grader is grade_math:
            grades, pos = flat[pos : pos + len(rows)], pos + len(rows)
        else:
            grades = get_benchmark(name).grade(rows, completions)
        results.setdefault(name, {"rows": rows})[kind] = grades
    return results


@pytest.mark.parametrize("name", ORACLE_BENCHMARKS)
def test_oracle_own_gold_answer_is_correct(oracle_results, name):
    res = oracle_results[name]
    failing = [(row["id"], row["gold"]) for row, g in zip(res["rows"], res["gold"]) if not g["correct"]]
    assert _rate(res["gold"]) >= 0.99, f"{name}: {len(failing)} rows fail with their own gold answer: {failing[:20]}"


@pytest.mark.parametrize("name", ORACLE_BENCHMARKS)
def test_oracle_other_rows_answer_is_wrong(oracle_results, name):
    res = oracle_results[name]
    passing = [row["id"] for row, g in zip(res["rows"], res["shuffled"]) if g["correct"]]
    assert _rate(res["shuffled"]) <= 0.02, f"{name}: {len(passing)} rows accept another row's answer: {passing[:20]}"


@pytest.mark.parametrize("name", REFERENCE_SOLUTION_BENCHMARKS)
def test_oracle_reference_solution_is_correct(oracle_results, name):
    res = oracle_results[name]
    failing = [(row["id"], row["gold"], g["extracted"]) for row, g in zip(res["rows"], res["reference"]) if not g["correct"]]
    assert _rate(res["reference"]) >= 0.99, f"{name}: reference solutions failing: {failing[:20]}"


def test_oracle_amc_float_gold(benchmarks_dir):
    """AMC23 stores answers as floats (27.0); a model writing 27 or 27.0 is right."""
    bench = get_benchmark("amc23")
    rows = bench.load(benchmarks_dir)
    assert rows and all(not r["gold"].endswith(".0") for r in rows)
    assert _rate(bench.grade(rows, [f"\\boxed{{{float(r['gold'])}}}" for r in rows])) == 1.0


@pytest.mark.parametrize("name", ["gpqa_diamond", "arc_challenge"])
def test_oracle_multiple_choice(benchmarks_dir, name):
    bench = get_benchmark(name)
    rows = bench.load(benchmarks_dir)
    shift = {"A": "B", "B": "C", "C": "D", "D": "A", "1": "2", "2": "3", "3": "4", "4": "1"}
    assert _rate(bench.grade(rows, oracle_completions(bench, rows, "gold"))) == 1.0
    assert _rate(bench.grade(rows, [f"so \\boxed{{{r['gold']}}}" for r in rows])) == 1.0
    assert _rate(bench.grade(rows, [f"Reasoning.\nANSWER: {shift[r['gold']]}" for r in rows])) == 0.0
    assert _rate(bench.grade(rows, oracle_completions(bench, rows, "shuffled"))) == 0.0


@pytest.mark.parametrize("people", [3, 5, 7])
def test_oracle_knights_knaves(benchmarks_dir, people):
    bench = get_benchmark(f"knights_knaves_{people}ppl")
    rows = bench.load(benchmarks_dir)
    assert all(r["gold"].count("\n") == people - 1 for r in rows)

    def flip_last(gold):
        head, _, last = gold.rpartition("\n")
        swapped = last.replace("knight", "knave") if "knight" in last else last.replace("knave", "knight")
        return f"{head}\n{swapped}"

    one_wrong = [f"<think>reasoning</think>\n<answer>\n{flip_last(r['gold'])}\n</answer>" for r in rows]
    partial = [f"<answer>{r['gold'].split(chr(10))[0]}</answer>" for r in rows]
    assert _rate(bench.grade(rows, oracle_completions(bench, rows, "gold"))) == 1.0
    assert _rate(bench.grade(rows, oracle_completions(bench, rows, "shuffled"))) == 0.0
    assert _rate(bench.grade(rows, one_wrong)) == 0.0
    assert _rate(bench.grade(rows, partial)) == 0.0
