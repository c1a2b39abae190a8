"""Answer checking for math completions, built on Hugging Face `math-verify`.

`verify_math(completion, gold)` is the single source of truth for "is this completion's final answer right?" — the
BRIDGE reward function and the evaluator both use it. The completion's last `\\boxed{...}` is preferred; without one,
math-verify's own extraction (``final answer is ...``, last LaTeX / plain expression) is used. The gold string is
parsed as if it were boxed, so bare LaTeX such as ``\\frac{1}{2}`` or ``(-\\infty, 3]`` works.

Both functions never raise on bad input (non-strings, unparsable text, pathological LaTeX): they return ``False`` /
``None``. Runtime is bounded with math-verify's signal-based timeouts when called from the main thread; signals do
not work in other threads, so there the timeouts are switched off (math-verify's own advice) and the inputs are
length-capped instead.

Knights-and-Knaves answers are checked by `grade_knights_knaves_answer` (with `parse_knights_knaves`), the one
implementation behind both the ``knights_knaves`` benchmark grader and the ``knights_knaves`` reward.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from functools import lru_cache, wraps

# Imported eagerly on purpose: a missing or broken math-verify install must fail loudly here, not be swallowed by
# the never-raise guards below (which would silently grade every answer as wrong).
from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

__all__ = ["extract_boxed", "extract_final_answer", "format_number", "grade_answer", "grade_knights_knaves_answer",
           "math_verify_timeout", "parse_knights_knaves", "verify_math"]

#: Seconds math-verify may spend parsing / comparing one expression (main thread only).
TIMEOUT_SECONDS = 5
#: Completions are cut to their last this-many characters before parsing (the final answer is at the end).
MAX_COMPLETION_CHARS = 20_000
#: Gold answers longer than this are not parsed (no real benchmark answer is this long).
MAX_GOLD_CHARS = 2_000

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")

# math-verify logs a warning each time a timeout is disabled or hit; keep CLI/test output readable.
logging.getLogger("math_verify").setLevel(logging.ERROR)


def math_verify_timeout() -> int | None:
    """Timeout (seconds) to hand to math-verify: `TIMEOUT_SECONDS` in the main thread, ``None`` elsewhere.

    math-verify implements timeouts with ``signal.alarm``, which raises ``ValueError`` outside the main thread.
    """
    return TIMEOUT_SECONDS if threading.current_thread() is threading.main_thread() else None


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in `text`, braces balanced; ``None`` if absent."""
    if not isinstance(text, str):
        return None
    starts = [m.end() for m in _BOXED_RE.finditer(text)]
    for start in reversed(starts):
        depth, i = 1, start
        while i < len(text):
            ch = text[i]
            if ch == "\\":  # skip escaped characters such as \{ and \}
                i += 2
                continue
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i].strip()
            i += 1
    return None


_TEXTBF_RE = re.compile(r"\\(?:textbf|mathbf)\s*\{([^{}]*)\}")


def _clean_answer(answer: str) -> str:
    """Tidy a boxed answer before parsing: drop a trailing full stop and ``\\textbf{}`` wrappers (``\\textbf{(073)}``)."""
    answer = _TEXTBF_RE.sub(r"\1", answer).strip()
    while answer.endswith((".", "\\.")) and not answer.endswith("..."):
        answer = answer[:-1].rstrip("\\").rstrip()
    return answer


def _parse(text: str, timeout: int | None):
    return parse(
        text,
        extraction_config=[LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()],
        parsing_timeout=timeout,
    )


@lru_cache(maxsize=4096)
def _parse_gold(gold: str, timeout: int | None) -> tuple:
    parsed = _parse("\\boxed{" + _clean_answer(gold) + "}", timeout)
    if not parsed:
        parsed = _parse(gold, timeout)
    return tuple(parsed)


def _parse_completion(completion: str, timeout: int | None) -> tuple[list, str | None]:
    """math-verify parse of the completion's final answer, and that answer as text."""
    completion = completion[-MAX_COMPLETION_CHARS:]
    boxed = extract_boxed(completion)
    if boxed is not None:
        parsed = _parse("\\boxed{" + _clean_answer(boxed) + "}", timeout)
        if parsed:
            return parsed, boxed
    parsed = _parse(completion, timeout)
    if boxed is not None:
        return parsed, boxed
    if len(parsed) >= 2 and isinstance(parsed[-1], str):
        return parsed, parsed[-1].strip()
    return parsed, (str(parsed[0]) if parsed else None)


def _guarded(default):
    """Run a grading function, turning any error or math-verify timeout into `default` (Ctrl-C still stops)."""

    def wrap(func):
        @wraps(func)
        def call(*args):
            try:
                return func(*args)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException:  # noqa: BLE001 - math-verify's TimeoutException derives from BaseException
                return default

        return call

    return wrap


@_guarded((False, None))
def grade_answer(completion: str, gold: str) -> tuple[bool, str | None]:
    """``(correct, extracted)``: `verify_math`'s verdict and `extract_final_answer`'s text, from one parse.

    Never raises; bad input gives ``(False, None)``.
    """
    if isinstance(gold, bool) or not isinstance(gold, (str, int, float)) or not isinstance(completion, str):
        return False, None
    if not completion.strip():
        return False, None
    timeout = math_verify_timeout()
    pred_parsed, extracted = _parse_completion(completion, timeout)
    if isinstance(gold, float):
        gold = format_number(gold)
    gold = str(gold).strip()
    if not gold or len(gold) > MAX_GOLD_CHARS or not pred_parsed:
        return False, extracted
    gold_parsed = list(_parse_gold(gold, timeout))
    if not gold_parsed:
        return False, extracted
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout)), extracted


@_guarded(None)
def extract_final_answer(completion: str) -> str | None:
    """The final answer written in `completion` as a string, or ``None`` when there is none.

    The last ``\\boxed{}`` content when present; otherwise the text math-verify extracts (e.g. after
    "The final answer is", or the last expression). Never raises.
    """
    if not isinstance(completion, str) or not completion.strip():
        return None
    boxed = extract_boxed(completion[-MAX_COMPLETION_CHARS:])
    if boxed is not None:
        return boxed
    return _parse_completion(completion, math_verify_timeout())[1]


def verify_math(completion: str, gold: str) -> bool:
    """True when the final answer in `completion` is mathematically equivalent to `gold` (checked by math-verify).

    Never raises: non-string input, empty strings, unparsable text and timeouts all give ``False``.
    Numbers given as floats/ints for `gold` (e.g. AMC's ``27.0``) are accepted and formatted first.
    """
    return grade_answer(completion, gold)[0]


def format_number(value: float) -> str:
    """``27.0`` -> ``"27"``, ``0.5`` -> ``"0.5"``: integral floats lose their ``.0`` so they read as integers."""
    if math.isfinite(value) and value == int(value):
        return str(int(value))
    return repr(value)


# --------------------------------------------------------------------------------------------------------------------
# Knights-and-Knaves

_KK_STATEMENT_RE = re.compile(r"\b([A-Z][a-zA-Z]+)\s+is\s+(?:a\s+)?(knight|knave)\b", re.IGNORECASE)
_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.DOTALL | re.IGNORECASE)


def parse_knights_knaves(text: str) -> dict[str, str]:
    """``{name: "knight" | "knave"}`` from statements like ``(1) Amelia is a knight`` (last statement per name wins)."""
    return {name: role.lower() for name, role in _KK_STATEMENT_RE.findall(text or "")}


def grade_knights_knaves_answer(completion: str, gold: str) -> tuple[bool, str | None]:
    """(correct, extracted) for one Knights-and-Knaves completion: every person in the `gold` statement list (e.g.
    ``"(1) Amelia is a knight\n(2) Ben is a knave"``) must have the same role in the completion's last
    ``<answer>...</answer>`` block (the whole completion when there is no such block). Never raises."""
    completion = completion if isinstance(completion, str) else ""
    tagged = _ANSWER_TAG_RE.findall(completion)
    predicted = parse_knights_knaves(tagged[-1] if tagged else completion)
    expected = parse_knights_knaves(gold if isinstance(gold, str) else "")
    correct = bool(expected) and all(predicted.get(name) == role for name, role in expected.items())
    return correct, "; ".join(f"{n} is a {r}" for n, r in predicted.items()) or None
