"""Datasets for BRIDGE: RL prompts with gold answers, and SFT expert traces, in TRL's formats.

Two kinds of rows are produced:

- **RL rows** (for `BridgeTrainer`'s ``train_dataset``): TRL's prompt-only format, ``prompt`` plus the gold
  ``answer`` column that `trl_bridge.tasks.rewards.math_correctness_reward` receives.
- **SFT rows** (for ``sft_dataset``): TRL's prompt-completion format, ``prompt`` plus a step-by-step ``completion``
  that ends with ``\\boxed{answer}``. Row ``i`` of the SFT part is the trace for row ``i`` of the RL part.

With ``prompt_style="chat"`` prompts are ``[{"role": "user", "content": ...}]`` and completions
``[{"role": "assistant", "content": ...}]`` (TRL's conversational format; the model's chat template is applied by
TRL); with ``"plain"`` both are strings. Either way the question is followed by the paper's instruction
`REASONING_INSTRUCTION`.

Sources:

- `make_arithmetic_task`: seeded multi-step arithmetic word problems generated on the fly (the default task: easy
  enough that a 135M model visibly improves in minutes on CPU; knobs make it harder).
- `load_gsm8k`, `load_math`, `load_math_level3to5`: GSM8K, MATH train and the paper's MATH level 3-5 prompts, from
  their Hugging Face Hub datasets at pinned revisions (`BUILTIN_SOURCES`, the `HubSource` mechanism `trl-bridge
  eval` uses for benchmarks, columns mapped onto the local file format), or from local copies under the folder the
  user names (`data_dir` / ``$TRL_BRIDGE_DATA_DIR``; no other folder is ever looked for), or other paths / Hub names.
- `load_knights_knaves`: Knights-and-Knaves logic puzzles (``K-and-K/knights-and-knaves``, ``train`` config, one
  split per number of people), prompted and graded as the ``knights_knaves_Nppl`` benchmarks, with the dataset's
  step-by-step reasoning as SFT trace; same Hub / data-folder mechanism.
- `load_dataset_spec`: one entry point for the CLI: ``builtin:<name>``, a local jsonl/json/parquet/csv file or
  folder, or a Hub dataset name, with an optional column mapping; the result is validated. `dataset_source` says
  where a spec's rows come from (for a run's summary.json and model card).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset

from .benchmarks import HubSource, _field, _knights_knaves_from_hub, get_benchmark, knights_knaves_prompt, resolve_data_dir
from .grading import extract_boxed
from ..trainer.dataset_checks import MissingColumnsError, require_columns, validate_rl_dataset, validate_sft_dataset

logger = logging.getLogger(__name__)

#: The instruction appended to every question (the prompt used in the BRIDGE paper).
REASONING_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
PROMPT_STYLES = ("chat", "plain")
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}

__all__ = [
    "BUILTIN_SOURCES",
    "REASONING_INSTRUCTION",
    "MissingColumnsError",
    "dataset_source",
    "format_completion",
    "format_prompt",
    "gsm8k_gold_answer",
    "gsm8k_solution_to_trace",
    "load_dataset_spec",
    "load_gsm8k",
    "load_knights_knaves",
    "load_math",
    "load_math_level3to5",
    "make_arithmetic_task",
    "parse_column_map",
    "parse_people",
    "validate_rl_dataset",
    "validate_sft_dataset",
]


# --------------------------------------------------------------------------------------------------------------------
# Prompt / completion formatting
# --------------------------------------------------------------------------------------------------------------------


def _check_prompt_style(prompt_style: str) -> None:
    if prompt_style not in PROMPT_STYLES:
        raise ValueError(f"prompt_style must be one of {PROMPT_STYLES}, got {prompt_style!r}")


def format_prompt(question: str, prompt_style: str = "chat", instruction: str | None = REASONING_INSTRUCTION):
    """The question plus `instruction`, as a one-message user conversation (``"chat"``) or a string (``"plain"``).

    Plain prompts end with a newline so that a completion can follow directly.
    """
    _check_prompt_style(prompt_style)
    text = f"{question.strip()}\n{instruction}" if instruction else question.strip()
    if prompt_style == "chat":
        return [{"role": "user", "content": text}]
    return text + "\n"


def format_completion(trace: str, prompt_style: str = "chat"):
    """A solution trace as an assistant message list (``"chat"``) or a plain string (``"plain"``)."""
    _check_prompt_style(prompt_style)
    if prompt_style == "chat":
        return [{"role": "assistant", "content": trace}]
    return trace


def _rl_and_sft(questions, answers, traces, prompt_style: str, instruction: str | None) -> DatasetDict:
    prompts = [format_prompt(q, prompt_style, instruction) for q in questions]
    parts = {"rl": Dataset.from_dict({"prompt": prompts, "answer": list(answers)})}
    if traces is not None:
        completions = [format_completion(t, prompt_style) for t in traces]
        parts["sft"] = Dataset.from_dict({"prompt": prompts, "completion": completions})
    return DatasetDict(parts)


# --------------------------------------------------------------------------------------------------------------------
# Built-in arithmetic word problems
# --------------------------------------------------------------------------------------------------------------------

_PEOPLE = [
    ("Tom", "he"), ("Mia", "she"), ("Sam", "he"), ("Lily", "she"), ("Ben", "he"), ("Emma", "she"),
    ("Leo", "he"), ("Zoe", "she"), ("Max", "he"), ("Anna", "she"), ("Jack", "he"), ("Ella", "she"),
]  # fmt: skip
_ITEMS = ["apples", "books", "marbles", "stickers", "coins", "pencils", "cards", "shells", "toys", "cookies"]
_STEP_PHRASES = {
    "+": ["{pronoun} buys {n} more {item}", "{pronoun} finds {n} more {item}", "{pronoun} gets {n} more {item}"],
    "-": ["{pronoun} gives away {n} {item}", "{pronoun} loses {n} {item}", "{pronoun} sells {n} {item}"],
    "*": ["{pronoun} ends up with {n} times as many {item}"],
}
ARITHMETIC_OPERATIONS = tuple(_STEP_PHRASES)


def _apply(value: int, op: str, n: int) -> int:
    return value + n if op == "+" else value - n if op == "-" else value * n


def _random_arithmetic(rng: random.Random, num_steps, max_operand: int, operations, max_multiplier: int):
    """A random start value and list of ``(op, n)`` steps whose running value never goes negative."""
    start = value = rng.randint(1, max_operand)
    steps = []
    for _ in range(rng.randint(*num_steps)):
        op = rng.choice(operations)
        if op == "-" and value == 0:
            op = "+" if "+" in operations else "*"
        if op == "*":
            n = rng.randint(2, max_multiplier)
        else:
            n = rng.randint(1, min(value, max_operand) if op == "-" else max_operand)
        steps.append((op, n))
        value = _apply(value, op, n)
    return start, tuple(steps)


def _word_problem(rng: random.Random, start: int, steps) -> tuple[str, str, int]:
    """Question text, step-by-step trace ending in ``\\boxed{}``, and answer for one start value + steps."""
    name, pronoun = rng.choice(_PEOPLE)
    item = rng.choice(_ITEMS)
    sentences = [f"{name} has {start} {item}."]
    lines, value = [], start
    for op, n in steps:
        phrase = rng.choice(_STEP_PHRASES[op]).format(pronoun=pronoun, n=n, item=item)
        sentences.append(f"Then {phrase}.")
        result = _apply(value, op, n)
        lines.append(f"{value} {op} {n} = {result}")
        value = result
    sentences.append(f"How many {item} does {name} have now?")
    lines.append(f"The answer is \\boxed{{{value}}}.")
    return " ".join(sentences), "\n".join(lines), value


def make_arithmetic_task(
    num_train: int = 1000,
    num_test: int = 200,
    num_steps: int | tuple[int, int] = (1, 2),
    max_operand: int = 10,
    operations: Sequence[str] = ("+", "-"),
    max_multiplier: int = 3,
    seed: int = 0,
    prompt_style: str = "chat",
    instruction: str | None = REASONING_INSTRUCTION,
    num_validation: int = 0,
) -> DatasetDict:
    """Seeded multi-step arithmetic word problems with verifiable integer answers.

    Example (2 steps): "Mia has 7 stickers. Then she gives away 3 stickers. Then she buys 5 more stickers. How many
    stickers does Mia have now?" with the trace ``"7 - 3 = 4\\n4 + 5 = 9\\nThe answer is \\boxed{9}."``.

    Difficulty knobs: `num_steps` (an int or an inclusive ``(min, max)`` range), `max_operand` (start value and
    added/subtracted amounts are in ``1..max_operand``), `operations` (any of ``"+"``, ``"-"``, ``"*"``; ``"*"``
    multiplies by ``2..max_multiplier``). Answers are never negative. The defaults (1-2 steps of +/- with numbers
    up to 10) are meant for a 135M model trained for minutes on CPU.

    Returns a `DatasetDict` with ``"rl"`` (train prompts + gold ``answer``), ``"sft"`` (the same train prompts with
    the step-by-step trace as ``completion``, row-aligned with ``"rl"``) and ``"test"`` (held-out prompts + gold
    ``answer``). Each problem's arithmetic (start value and steps) is unique, so no test problem repeats a train one.
    With `num_validation` > 0 there is also ``"validation"`` (prompts + gold ``answer``, for choosing
    hyper-parameters without touching ``"test"``), drawn after train and test, so they are unchanged by it.
    """
    _check_prompt_style(prompt_style)
    counts = (("num_train", num_train), ("num_test", num_test), ("num_validation", num_validation), ("max_operand", max_operand))
    for name, value in counts:
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name in ("num_test", "num_validation") else 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(num_steps, int):
        num_steps = (num_steps, num_steps)
    num_steps = tuple(num_steps)
    if len(num_steps) != 2 or not 1 <= num_steps[0] <= num_steps[1]:
        raise ValueError(f"num_steps must be an int >= 1 or a (min, max) range with 1 <= min <= max, got {num_steps}")
    operations = tuple(operations)
    unknown = [op for op in operations if op not in ARITHMETIC_OPERATIONS]
    if not operations or unknown:
        raise ValueError(f"operations must be a non-empty subset of {ARITHMETIC_OPERATIONS}, got {operations}")
    if operations == ("-",):
        raise ValueError("operations=('-',) alone cannot keep answers non-negative; add '+' or '*'")
    if "*" in operations and max_multiplier < 2:
        raise ValueError(f"max_multiplier must be >= 2 when '*' is used, got {max_multiplier}")

    rng = random.Random(seed)
    wanted = num_train + num_test + num_validation
    seen: set = set()
    questions, traces, answers = [], [], []
    for _ in range(50 * wanted + 1000):
        if len(questions) == wanted:
            break
        start, steps = _random_arithmetic(rng, num_steps, max_operand, operations, max_multiplier)
        if (start, steps) in seen:
            continue
        seen.add((start, steps))
        question, trace, answer = _word_problem(rng, start, steps)
        questions.append(question)
        traces.append(trace)
        answers.append(str(answer))
    if len(questions) < wanted:
        raise ValueError(
            f"cannot generate {wanted} distinct problems with num_steps={num_steps}, max_operand={max_operand}, "
            f"operations={operations}; lower num_train/num_test/num_validation or widen the knobs"
        )

    train = _rl_and_sft(questions[:num_train], answers[:num_train], traces[:num_train], prompt_style, instruction)
    end = num_train + num_test
    test = _rl_and_sft(questions[num_train:end], answers[num_train:end], None, prompt_style, instruction)
    parts = {"rl": train["rl"], "sft": train["sft"], "test": test["rl"]}
    if num_validation:
        parts["validation"] = _rl_and_sft(questions[end:], answers[end:], None, prompt_style, instruction)["rl"]
    return DatasetDict(parts)


# --------------------------------------------------------------------------------------------------------------------
# GSM8K and MATH: Hugging Face Hub datasets at pinned revisions, or local copies in the user's data folder
# --------------------------------------------------------------------------------------------------------------------


def _simplerl_to_local(row: dict, index: int) -> dict:
    """A hkust-nlp/SimpleRL-Zoo-Data row (raw ``question``, gold ``gt_answer``) as a row of the local verl-format
    file: the question plus the paper's instruction as the user message, the gold as ``reward_model.ground_truth``.
    (The Hub file's own ``prompt`` holds the question inside Qwen chat markup, so it is not used.)"""
    where = "hkust-nlp/SimpleRL-Zoo-Data (Hub)"
    question, gold = _field(row, "question", where, index), _field(row, "gt_answer", where, index)
    return {"prompt": [{"role": "user", "content": f"{str(question).strip()}\n{REASONING_INSTRUCTION}"}],
            "reward_model": {"ground_truth": gold}, "extra_info": {"index": index}}


#: The pinned commit of ``K-and-K/knights-and-knaves`` (the ``knights_knaves_Nppl`` benchmarks read its ``test`` config
#: at this commit; ``builtin:knights_knaves`` its ``train`` config).
KNIGHTS_KNAVES_REVISION = get_benchmark("knights_knaves_3ppl").hub.revision
#: Numbers of people ``builtin:knights_knaves`` can load (the sizes the benchmark has, and the local copies hold).
KNIGHTS_KNAVES_PEOPLE = tuple(range(3, 8))

#: ``builtin:<name>`` -> split -> (its file under the data folder, the Hugging Face Hub dataset it is downloaded from
#: when no data folder is given). Revisions: see docs/data.md (``None``: not pinned, no commit could be verified).
BUILTIN_SOURCES: dict[str, dict[str, tuple[str, HubSource]]] = {
    "gsm8k": {
        "train": ("gsm8k/train.jsonl", dataclasses.replace(get_benchmark("gsm8k").hub, split="train")),
        "test": ("gsm8k/test.jsonl", get_benchmark("gsm8k").hub),
    },
    "math": {
        "train": ("math/train.jsonl", HubSource("DigitalLearningGmbH/MATH-lighteval", "train", config="default",
                                                revision="0530c78699ea5e8eb5530600900e1f328b48acad")),
        "test": ("math500/test.jsonl", get_benchmark("math500").hub),
    },
    "math_level3to5": {
        "train": ("math_level3to5/train.jsonl", HubSource("hkust-nlp/SimpleRL-Zoo-Data", "train",
                                                          data_files="simplelr_qwen_level3to5/train.parquet",
                                                          convert=_simplerl_to_local)),
    },
    # keys are the Hub splits of the ``train`` config (one per number of people), all training rows: ``split="train"``
    # of builtin:knights_knaves loads the ones `people` selects (``load_knights_knaves``)
    "knights_knaves": {
        f"{n}ppl": (f"knights_knaves/{n}ppl/train.jsonl",
                    HubSource("K-and-K/knights-and-knaves", f"{n}ppl", config="train", revision=KNIGHTS_KNAVES_REVISION,
                              convert=_knights_knaves_from_hub))
        for n in KNIGHTS_KNAVES_PEOPLE
    },
}


def _builtin_source(name: str, split: str) -> tuple[str, HubSource]:
    if name not in BUILTIN_SOURCES:
        raise ValueError(f"no data files for builtin:{name}; choose from {[f'builtin:{n}' for n in BUILTIN_SOURCES]}")
    if split not in BUILTIN_SOURCES[name]:
        raise ValueError(f"split must be one of {sorted(BUILTIN_SOURCES[name])} for builtin:{name}, got {split!r}")
    return BUILTIN_SOURCES[name][split]


def _load_source(path_or_name, name: str, split: str, data_dir=None, **hub_kwargs) -> Dataset:
    """One split of ``builtin:<name>``: `path_or_name` (a local file/folder or a Hub name) when given; else the local
    copy in the data folder (`data_dir`, else ``$TRL_BRIDGE_DATA_DIR``); else the pinned Hugging Face Hub dataset,
    its rows mapped onto the local file format. Without Hub access the error names the dataset and ``--data_dir``."""
    if path_or_name is not None:
        return _load_raw(path_or_name, split=split, **hub_kwargs)
    relative_path, hub = _builtin_source(name, split)
    root = resolve_data_dir(data_dir)
    if root is None:
        return Dataset.from_list(hub.load())
    path = root / relative_path
    if not path.is_file():
        raise FileNotFoundError(
            f"builtin:{name} (split {split!r}): {path} not found in the data folder given by --data_dir / "
            f"TRL_BRIDGE_DATA_DIR; put a local copy there as {relative_path!r}, or leave both unset to download "
            f"{hub.describe()} from the Hugging Face Hub"
        )
    return _load_raw(path, split=split)


def dataset_source(spec: str | os.PathLike, split: str = "train", data_dir: str | os.PathLike | None = None,
                   people: str | Sequence[int] | None = None) -> dict:
    """Where `load_dataset_spec(spec, split, data_dir=data_dir)` reads its rows: a dict for a run's summary.json and
    model card with ``spec``, ``source`` (``"hub"``, ``"local"`` or ``"generated"``), the Hub ``repo`` / ``config`` /
    ``data_files`` / ``split`` / ``revision`` (``None``: not pinned) or the local ``path``, and a ``description``.
    `people`: the Knights-and-Knaves sizes (``builtin:knights_knaves`` only; see `parse_people`)."""
    spec = os.fspath(spec).strip()
    if spec == "builtin:arithmetic":
        return {"spec": spec, "source": "generated", "description": "generated by trl-bridge (seeded)"}
    if spec == "builtin:knights_knaves":
        return _knights_knaves_source(spec, split, data_dir, people)
    if spec.startswith("builtin:"):
        name = spec.removeprefix("builtin:")
        relative_path, hub = _builtin_source(name, split)
        root = resolve_data_dir(data_dir)
        if root is None:
            return {"spec": spec, **hub.record()}
        path = str(root / relative_path)
        return {"spec": spec, "source": "local", "path": path, "description": f"local copy {path}"}
    if _looks_local(spec):
        path = str(Path(spec).expanduser().resolve())
        return {"spec": spec, "source": "local", "path": path, "description": f"local file or folder {path}"}
    hub = HubSource(spec, split)
    return {"spec": spec, **hub.record()}


def _limit(ds: Dataset, limit: int | None) -> Dataset:
    if limit is None:
        return ds
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    return ds.select(range(min(limit, len(ds))))


_CALCULATOR_RE = re.compile(r"<<[^<>]*>>")
_GSM8K_FINAL_RE = re.compile(r"\n?####\s*(.+?)\s*$", re.S)


def gsm8k_gold_answer(solution: str) -> str:
    """The number after ``#### `` in a GSM8K answer, thousands separators removed (``"1,080"`` -> ``"1080"``)."""
    match = _GSM8K_FINAL_RE.search(solution)
    if not match:
        raise ValueError(f"GSM8K 'answer' has no final '#### <number>' line: {solution[-80:]!r}")
    return match.group(1).replace(",", "").strip()


def gsm8k_solution_to_trace(solution: str) -> str:
    """A GSM8K worked answer as a trace: calculator annotations ``<<48/2=24>>`` removed, ``#### N`` -> ``\\boxed{N}``."""
    answer = gsm8k_gold_answer(solution)
    body = _CALCULATOR_RE.sub("", _GSM8K_FINAL_RE.sub("", solution)).strip()
    return f"{body}\nThe answer is \\boxed{{{answer}}}."


def load_gsm8k(
    path_or_name: str | os.PathLike | None = None,
    split: str = "train",
    prompt_style: str = "chat",
    limit: int | None = None,
    instruction: str | None = REASONING_INSTRUCTION,
    data_dir: str | os.PathLike | None = None,
) -> DatasetDict:
    """GSM8K as RL rows (prompt + gold ``answer``) and SFT rows (prompt + worked solution ending in ``\\boxed{}``).

    `path_or_name`: ``None`` for the builtin source (`BUILTIN_SOURCES`: ``gsm8k/{train,test}.jsonl`` under `data_dir`
    / ``$TRL_BRIDGE_DATA_DIR`` when one is set, else ``openai/gsm8k`` (``main``) from the Hub at a pinned revision),
    a local file or folder with ``question``/``answer`` columns, or a Hub name such as ``"openai/gsm8k"`` (config
    ``"main"``). Returns a `DatasetDict` with ``"rl"`` and ``"sft"`` (row-aligned); `limit` keeps the first rows.
    """
    _check_prompt_style(prompt_style)
    hub_kwargs = {"name": "main"} if path_or_name is not None and _is_hub_name(path_or_name) else {}
    raw = _load_source(path_or_name, "gsm8k", split, data_dir, **hub_kwargs)
    require_columns(raw, ["question", "answer"], "GSM8K data")
    raw = _limit(raw, limit)
    return _rl_and_sft(
        raw["question"],
        [gsm8k_gold_answer(s) for s in raw["answer"]],
        [gsm8k_solution_to_trace(s) for s in raw["answer"]],
        prompt_style,
        instruction,
    )


def load_math(
    path_or_name: str | os.PathLike | None = None,
    split: str = "train",
    prompt_style: str = "chat",
    limit: int | None = None,
    instruction: str | None = REASONING_INSTRUCTION,
    data_dir: str | os.PathLike | None = None,
) -> DatasetDict:
    """MATH as RL rows (prompt + gold ``answer``) and SFT rows (prompt + the reference solution as completion).

    `path_or_name`: ``None`` for the builtin source (`BUILTIN_SOURCES`; ``split="train"``: the 7500 MATH train
    problems, ``math/train.jsonl`` under `data_dir` / ``$TRL_BRIDGE_DATA_DIR`` when one is set, else
    ``DigitalLearningGmbH/MATH-lighteval`` from the Hub; ``split="test"``: MATH-500, ``math500/test.jsonl`` or
    ``HuggingFaceH4/MATH-500``), a local file/folder or a Hub name, with ``problem`` and ``solution`` columns. The
    gold answer is the ``answer`` column when present, else the last ``\\boxed{}`` of the solution; rows with neither
    are dropped (the number dropped is logged as a warning). `limit` applies after dropping.
    """
    _check_prompt_style(prompt_style)
    raw = _load_source(path_or_name, "math", split, data_dir)
    require_columns(raw, ["problem", "solution"], "MATH data")
    golds = raw["answer"] if "answer" in raw.column_names else [None] * len(raw)
    golds = [gold if gold not in (None, "") else extract_boxed(sol) for gold, sol in zip(golds, raw["solution"])]
    keep = [i for i, gold in enumerate(golds) if gold not in (None, "")]
    if len(keep) < len(raw):
        logger.warning("MATH: dropped %d of %d rows that have no final answer", len(raw) - len(keep), len(raw))
    if not keep:
        raise ValueError("MATH data has no row with an 'answer' or a \\boxed{} answer in 'solution'")
    raw = _limit(raw.select(keep), limit)
    golds = [golds[i] for i in keep][: len(raw)]
    return _rl_and_sft(raw["problem"], golds, raw["solution"], prompt_style, instruction)


def load_math_level3to5(
    path_or_name: str | os.PathLike | None = None,
    prompt_style: str = "chat",
    limit: int | None = None,
    data_dir: str | os.PathLike | None = None,
) -> DatasetDict:
    """The paper's MATH level 3-5 training prompts: RL rows only (there are no solutions).

    `path_or_name`: ``None`` for the builtin source (`BUILTIN_SOURCES`: ``math_level3to5/train.jsonl`` under
    `data_dir` / ``$TRL_BRIDGE_DATA_DIR`` when one is set, else ``simplelr_qwen_level3to5/train.parquet`` of
    ``hkust-nlp/SimpleRL-Zoo-Data`` from the Hub), or a local file/folder / Hub name in verl format. The stored user
    message already asks for a ``\\boxed{}`` answer (Hub rows: the question plus `REASONING_INSTRUCTION`), so it is
    used as is; the gold answer is ``reward_model.ground_truth``. Rows without one are dropped (the number dropped is
    logged as a warning); `limit` applies after dropping. Returns a `DatasetDict` with only ``"rl"``.
    """
    _check_prompt_style(prompt_style)
    raw = _load_source(path_or_name, "math_level3to5", "train", data_dir)
    require_columns(raw, ["prompt", "reward_model"], "MATH level 3-5 data")
    golds = [reward.get("ground_truth") if isinstance(reward, Mapping) else None for reward in raw["reward_model"]]
    keep = [i for i, gold in enumerate(golds) if gold not in (None, "")]
    if len(keep) < len(raw):
        logger.warning("MATH level 3-5: dropped %d of %d rows that have no gold answer", len(raw) - len(keep), len(raw))
    if not keep:
        raise ValueError("MATH level 3-5 data has no row with a 'reward_model.ground_truth' answer")
    raw = _limit(raw.select(keep), limit)
    questions = [_last_user_content(messages) for messages in raw["prompt"]]
    answers = [str(golds[i]) for i in keep[: len(raw)]]
    return _rl_and_sft(questions, answers, None, prompt_style, instruction=None)


def _last_user_content(messages) -> str:
    users = [m["content"] for m in messages if m.get("role") == "user"]
    if not users:
        raise ValueError(f"'prompt' has no user message: {messages!r}")
    return users[-1]


# --------------------------------------------------------------------------------------------------------------------
# Knights-and-Knaves logic puzzles


def parse_people(people: str | int | Sequence[int] | None) -> tuple[int, ...]:
    """Numbers of people for ``builtin:knights_knaves``: ``"3-5"`` (a range), ``"3,5,7"``, ``"4"``, an int or a list;
    ``None`` is all of `KNIGHTS_KNAVES_PEOPLE`. Each must be one of `KNIGHTS_KNAVES_PEOPLE`."""
    if people is None:
        return KNIGHTS_KNAVES_PEOPLE
    allowed = f"whole numbers from {KNIGHTS_KNAVES_PEOPLE[0]} to {KNIGHTS_KNAVES_PEOPLE[-1]}"
    error = ValueError(f"task_people must be a range like '3-5', a list like '3,5,7' or one number, {allowed}; "
                       f"got {people!r}")
    if isinstance(people, bool):
        raise error
    if isinstance(people, int):
        values = [people]
    elif isinstance(people, str):
        values = []
        for part in filter(None, (p.strip() for p in people.split(","))):
            low, dash, high = part.partition("-")
            if not low.strip().isdigit() or (dash and not high.strip().isdigit()):
                raise error
            values.extend(range(int(low), int(high) + 1) if dash else [int(low)])
    elif isinstance(people, Sequence) and all(isinstance(v, int) and not isinstance(v, bool) for v in people):
        values = list(people)
    else:
        raise error
    if not values or any(v not in KNIGHTS_KNAVES_PEOPLE for v in values):
        raise error
    return tuple(sorted(set(values)))


def knights_knaves_trace(row: Mapping) -> str:
    """The SFT trace of a K-and-K row: its step-by-step reasoning (``cot_head``, ``cot_repeat_steps``, ``cot_foot``)
    closing the ``<think>`` block the prompt opens, then ``<answer>`` with ``solution_text_format``, as the prompt
    asks for."""
    where = "Knights-and-Knaves data"
    index = row.get("index", "?")
    steps = _field(row, "cot_repeat_steps", where, index)
    if isinstance(steps, str) or not isinstance(steps, Sequence):
        raise TypeError(f"{where}: row {index} field 'cot_repeat_steps' must be a list of strings, got {steps!r}")
    reasoning = "\n".join([str(_field(row, "cot_head", where, index)), *map(str, steps), str(_field(row, "cot_foot", where, index))])
    return f" {reasoning}\n</think>\n<answer>\n{_field(row, 'solution_text_format', where, index)}\n</answer>"


def load_knights_knaves(
    people: str | Sequence[int] | None = None,
    prompt_style: str | None = "plain",
    limit: int | None = None,
    data_dir: str | os.PathLike | None = None,
) -> DatasetDict:
    """Knights-and-Knaves training puzzles as RL rows (prompt + gold ``answer``, the ``solution_text_format``
    statement list) and SFT rows (prompt + the dataset's step-by-step reasoning and the answer, `knights_knaves_trace`),
    row-aligned.

    The puzzles of each size in `people` (`parse_people`; default 3-7) are read from
    ``knights_knaves/<n>ppl/train.jsonl`` under `data_dir` / ``$TRL_BRIDGE_DATA_DIR`` when one is
    set (rows with the Hub dataset's columns ``quiz``, ``solution_text_format``, ``cot_head``, ``cot_repeat_steps``,
    ``cot_foot``; Logic-RL's verl-format files carry them too), else from the ``train`` config of
    ``K-and-K/knights-and-knaves`` on the Hub, split ``<n>ppl``, at `KNIGHTS_KNAVES_REVISION`; sizes are concatenated
    in increasing order, and `limit` keeps the first rows of the result. The prompt is the raw text the
    ``knights_knaves_Nppl`` benchmarks feed the model (`knights_knaves_prompt`: Logic-RL's Qwen chat markup, ending
    in ``<think>``), so it is a plain string and is never re-templated: `prompt_style` must be ``"plain"`` or ``None``.
    """
    if prompt_style not in (None, "plain"):
        raise ValueError(f"builtin:knights_knaves prompts already hold chat markup (the benchmark's raw prompt), so "
                         f"prompt_style must be 'plain', got {prompt_style!r}")
    parts = []
    for n in parse_people(people):
        parts.extend(_load_source(None, "knights_knaves", f"{n}ppl", data_dir))
    if not parts:
        raise ValueError("Knights-and-Knaves data has no rows")
    where = "Knights-and-Knaves data"
    prompts = [knights_knaves_prompt(str(_field(row, "quiz", where, i))) for i, row in enumerate(parts)]
    answers = [str(_field(row, "solution_text_format", where, i)) for i, row in enumerate(parts)]
    traces = [knights_knaves_trace(row) for row in parts]
    return DatasetDict({"rl": _limit(Dataset.from_dict({"prompt": prompts, "answer": answers}), limit),
                        "sft": _limit(Dataset.from_dict({"prompt": prompts, "completion": traces}), limit)})


def _knights_knaves_source(spec: str, split: str, data_dir, people) -> dict:
    if split != "train":
        raise ValueError(f"builtin:knights_knaves only has split 'train' (its test puzzles are the knights_knaves_Nppl "
                         f"benchmarks), got {split!r}")
    sizes = parse_people(people)
    splits = ", ".join(f"{n}ppl" for n in sizes)
    root = resolve_data_dir(data_dir)
    if root is None:
        hub = BUILTIN_SOURCES["knights_knaves"][f"{sizes[0]}ppl"][1]
        record = hub.record()
        description = f"Hugging Face Hub: {hub.repo} ({hub.config}), split(s) {splits}, revision {hub.revision}"
        return {"spec": spec, **record, "split": splits, "description": description}
    paths = [str(root / BUILTIN_SOURCES["knights_knaves"][f"{n}ppl"][0]) for n in sizes]
    return {"spec": spec, "source": "local", "path": ", ".join(paths), "description": f"local copies {', '.join(paths)}"}


# --------------------------------------------------------------------------------------------------------------------
# Generic loading: builtin names, local files and folders, Hub names
# --------------------------------------------------------------------------------------------------------------------


def _looks_local(path_or_name: str | os.PathLike) -> bool:
    text = os.fspath(path_or_name)
    return (
        isinstance(path_or_name, os.PathLike)
        or Path(text).exists()
        or text.startswith((".", "/", "~"))
        or Path(text).suffix.lower() in LOCAL_FORMATS
    )


def _is_hub_name(path_or_name: str | os.PathLike) -> bool:
    return not _looks_local(path_or_name)


def _local_format(path: Path) -> str:
    fmt = LOCAL_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"unsupported data file {path}: use one of {sorted(LOCAL_FORMATS)}")
    return fmt


def _load_raw(path_or_name: str | os.PathLike, split: str = "train", **hub_kwargs) -> Dataset:
    """Load one split of a local file (any split name reads the whole file), a local folder, or a Hub dataset.

    In a folder, ``<split>.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` is read when present; otherwise
    `datasets.load_dataset` infers the splits from the folder's file names.
    """
    if _looks_local(path_or_name):
        path = Path(os.fspath(path_or_name)).expanduser()
        if path.is_file():
            return load_dataset(_local_format(path), data_files=str(path), split="train")
        if path.is_dir():
            for suffix, fmt in LOCAL_FORMATS.items():
                candidate = path / f"{split}{suffix}"
                if candidate.is_file():
                    return load_dataset(fmt, data_files=str(candidate), split="train")
            try:
                return load_dataset(str(path), split=split)
            except ValueError as exc:
                raise ValueError(f"cannot read split {split!r} from folder {path}: {exc}") from exc
        where = "" if path.is_absolute() else f" (relative to {os.getcwd()})"
        raise FileNotFoundError(
            f"data file or folder not found: {path}{where}; give an existing .jsonl/.json/.parquet/.csv file or folder, "
            f"one of {[f'builtin:{n}' for n in BUILTIN_DATASETS]}, or a Hub dataset name"
        )
    try:
        return load_dataset(os.fspath(path_or_name), split=split, **hub_kwargs)
    except Exception as exc:  # offline mode, unknown repo, missing split... all surface as different types
        raise FileNotFoundError(
            f"{os.fspath(path_or_name)!r} is neither a local file/folder nor a loadable Hub dataset "
            f"(split={split!r}): {exc}"
        ) from exc


def parse_column_map(column_map: str | Mapping[str, str] | None) -> dict[str, str]:
    """``"question->prompt,answer->answer"`` (or a dict) to ``{"question": "prompt", "answer": "answer"}``.

    Source names may be dotted paths into nested columns, e.g. ``"reward_model.ground_truth->answer"``.
    """
    if column_map is None:
        return {}
    if isinstance(column_map, Mapping):
        pairs = list(column_map.items())
    elif isinstance(column_map, str):
        pairs = []
        for item in filter(None, (part.strip() for part in column_map.split(","))):
            source, arrow, target = item.partition("->")
            if not arrow or not source.strip() or not target.strip():
                raise ValueError(f"column_map entry {item!r} must look like 'source->target'")
            pairs.append((source.strip(), target.strip()))
    else:
        raise ValueError(f"column_map must be a dict or a 'source->target,...' string, got {type(column_map).__name__}")
    mapping = {}
    for source, target in pairs:
        if not isinstance(source, str) or not isinstance(target, str):
            raise ValueError(f"column_map names must be strings, got {source!r} -> {target!r}")
        mapping[source] = target
    targets = list(mapping.values())
    duplicates = sorted({t for t in targets if targets.count(t) > 1})
    if duplicates:
        raise ValueError(f"column_map maps several columns onto {duplicates}")
    return mapping


def apply_column_map(ds: Dataset, column_map: str | Mapping[str, str] | None) -> Dataset:
    """Rename columns per `column_map` (see `parse_column_map`); an existing column with a target's name is replaced."""
    mapping = parse_column_map(column_map)
    if not mapping:
        return ds
    if any(source not in ds.column_names and "." in source for source in mapping):
        ds = ds.flatten()
    missing = [source for source in mapping if source not in ds.column_names]
    if missing:
        raise ValueError(f"column_map source column(s) {missing} not in the dataset; found columns {ds.column_names}")
    replaced = [t for t in mapping.values() if t in ds.column_names and t not in mapping]
    if replaced:
        ds = ds.remove_columns(replaced)
    return ds.rename_columns({source: target for source, target in mapping.items() if source != target})


def _format_string_columns(ds: Dataset, prompt_style: str, instruction: str | None) -> Dataset:
    """Turn raw question strings in ``prompt`` (and answer strings in ``completion``) into `prompt_style` rows."""
    _check_prompt_style(prompt_style)
    if not len(ds):
        return ds

    def convert(row):
        out = {}
        if isinstance(row.get("prompt"), str):
            out["prompt"] = format_prompt(row["prompt"], prompt_style, instruction)
        if isinstance(row.get("completion"), str):
            out["completion"] = format_completion(row["completion"], prompt_style)
        return out

    columns = [c for c in ("prompt", "completion") if c in ds.column_names and isinstance(ds[0][c], str)]
    return ds.map(convert) if columns else ds


BUILTIN_DATASETS = ("arithmetic", "gsm8k", "knights_knaves", "math", "math_level3to5")
DATASET_KINDS = ("rl", "sft")


def _load_builtin(name, split, kind, prompt_style, limit, instruction, data_dir=None, **task_kwargs) -> Dataset:
    style = prompt_style or "chat"
    if name == "arithmetic":
        task = make_arithmetic_task(prompt_style=style, instruction=instruction, **task_kwargs)
        if split not in ("train", "test", "validation"):
            raise ValueError(f"builtin:arithmetic has splits 'train', 'test' and 'validation', got {split!r}")
        if split != "train" and kind == "sft":
            raise ValueError("builtin:arithmetic has SFT traces only for split 'train'")
        if split == "validation" and "validation" not in task:
            raise ValueError("builtin:arithmetic has a 'validation' split only with num_validation > 0 (task_num_validation)")
        return _limit(task[split] if split != "train" else task[kind], limit)
    if name == "knights_knaves":
        unexpected = sorted(set(task_kwargs) - {"people"})
        if unexpected:
            raise ValueError(f"builtin:knights_knaves does not take {unexpected}")
        if split != "train":
            raise ValueError(f"builtin:knights_knaves only has split 'train' (its test puzzles are the "
                             f"knights_knaves_Nppl benchmarks), got {split!r}")
        return load_knights_knaves(task_kwargs.get("people"), prompt_style, limit, data_dir)[kind]
    unexpected = sorted(set(task_kwargs) - {"path"})
    if unexpected:
        raise ValueError(f"builtin:{name} does not take {unexpected}")
    path = task_kwargs.get("path")
    if name == "gsm8k":
        return load_gsm8k(path, split, style, limit, instruction, data_dir)[kind]
    if name == "math":
        return load_math(path, split, style, limit, instruction, data_dir)[kind]
    if kind == "sft":
        raise ValueError("builtin:math_level3to5 has no solutions, so it cannot be an SFT dataset; use builtin:math")
    if split != "train":
        raise ValueError(f"builtin:math_level3to5 only has split 'train', got {split!r}")
    return load_math_level3to5(path, style, limit, data_dir)["rl"]


def load_dataset_spec(
    spec: str,
    split: str = "train",
    column_map: str | Mapping[str, str] | None = None,
    kind: str = "rl",
    prompt_style: str | None = None,
    limit: int | None = None,
    instruction: str | None = REASONING_INSTRUCTION,
    required: Sequence[str] | None = None,
    column_map_option: str = "column_map",
    data_dir: str | os.PathLike | None = None,
    **task_kwargs,
) -> Dataset:
    """Load and validate an RL (``kind="rl"``) or SFT (``kind="sft"``) dataset from a spec string.

    `spec` is one of:

    - ``builtin:arithmetic`` (generated; `task_kwargs` go to `make_arithmetic_task`), ``builtin:gsm8k``,
      ``builtin:math``, ``builtin:math_level3to5`` (RL only), ``builtin:knights_knaves`` (``people=`` selects the
      sizes, see `load_knights_knaves`) — downloaded from their Hugging Face Hub datasets at
      pinned revisions (`BUILTIN_SOURCES`), or read from the local copies in `data_dir` (else
      ``$TRL_BRIDGE_DATA_DIR``) when one is given, or from ``path=...``. `prompt_style` defaults to ``"chat"``.
    - a local ``.jsonl``/``.json``/``.parquet``/``.csv`` file, or a folder (``<split>.<ext>`` inside it);
    - a Hub dataset name (`datasets.load_dataset`, ``name=`` for a config).

    For files and Hub data, `column_map` renames non-standard columns (``"question->prompt,answer->answer"``;
    dotted sources reach into nested columns), and with `prompt_style` set, string prompts (and string completions)
    are wrapped in the chat/plain format with `instruction` appended. The result is checked with
    `validate_rl_dataset` (``required`` columns; default ``("prompt",)``) or `validate_sft_dataset`; a missing column
    raises `MissingColumnsError` (a `ValueError`) whose message points to `column_map_option` (the name of the option
    that renames columns where the caller takes it, e.g. the CLI's ``dataset_column_map``).
    """
    if not isinstance(spec, (str, os.PathLike)) or not os.fspath(spec).strip():
        raise ValueError(f"dataset spec must be a non-empty string, got {spec!r}")
    if kind not in DATASET_KINDS:
        raise ValueError(f"kind must be one of {DATASET_KINDS}, got {kind!r}")
    spec = os.fspath(spec).strip()
    if spec.startswith("builtin:"):
        name = spec.removeprefix("builtin:")
        if name not in BUILTIN_DATASETS:
            raise ValueError(f"unknown builtin dataset {spec!r}; choose from {[f'builtin:{n}' for n in BUILTIN_DATASETS]}")
        if column_map:
            raise ValueError(f"column_map does not apply to builtin datasets ({spec!r} already has standard columns)")
        ds = _load_builtin(name, split, kind, prompt_style, limit, instruction, data_dir, **task_kwargs)
    else:
        ds = apply_column_map(_load_raw(spec, split=split, **task_kwargs), column_map)
        if prompt_style is not None:
            ds = _format_string_columns(ds, prompt_style, instruction)
        ds = _limit(ds, limit)
    example = "question->prompt,solution->completion" if kind == "sft" else "question->prompt,final->answer"
    try:
        if kind == "sft":
            return validate_sft_dataset(ds, name=f"SFT dataset {spec!r}")
        return validate_rl_dataset(ds, required=required or ("prompt",), name=f"RL dataset {spec!r}")
    except MissingColumnsError as err:
        if spec.startswith("builtin:"):
            raise
        raise MissingColumnsError(f"{err}; map your columns onto these names with {column_map_option}, e.g. "
                                  f"{column_map_option}: \"{example}\"") from err
