"""Reward functions for BRIDGE's RL part, in TRL's reward-function signature.

TRL calls each reward function as ``reward_func(prompts=..., completions=..., completion_ids=..., **columns)``,
where ``columns`` are the remaining dataset columns (here: the gold ``answer``). Completions are strings for
standard datasets and lists of ``{"role", "content"}`` messages for conversational ones.

- `math_correctness_reward`: 1.0 when the completion's final answer equals the gold answer (checked by
  `trl_bridge.tasks.grading.verify_math`, i.e. math-verify), else 0.0 — the binary outcome reward used in the paper.
- `knights_knaves_reward`: 1.0 when the completion's ``<answer>`` block gives every person the gold role (the check
  of the Knights-and-Knaves benchmark grader, `trl_bridge.tasks.grading.grade_knights_knaves_answer`), else 0.0.
- `boxed_format_reward`: 1.0 when the completion states a final ``\\boxed{...}`` answer, else 0.0.
- `with_reward_noise`: wraps a binary reward so each value is flipped 1<->0 with a given probability (seeded), for
  robustness experiments with noisy verifiers.
- `get_reward_funcs`: resolves registry names or dotted import paths (like ``trl grpo --reward_funcs``).
"""

from __future__ import annotations

import functools
import importlib
import random
from collections.abc import Callable, Sequence

from .grading import extract_boxed, grade_knights_knaves_answer, verify_math

__all__ = [
    "REWARD_REGISTRY",
    "boxed_format_reward",
    "completion_text",
    "get_reward_funcs",
    "knights_knaves_reward",
    "math_correctness_reward",
    "with_reward_noise",
]


def completion_text(completion) -> str:
    """The generated text of one completion: the string itself, or the last message's content for chat data.

    Message content given as a list of parts (``[{"type": "text", "text": ...}]``) is joined.
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    if isinstance(completion, (list, tuple)):
        if not completion:
            return ""
        content = completion[-1].get("content", "") if isinstance(completion[-1], dict) else completion[-1]
        if isinstance(content, (list, tuple)):
            return "".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)
        return "" if content is None else str(content)
    raise TypeError(
        "completions must be strings or lists of {'role', 'content'} messages, "
        f"got an element of type {type(completion).__name__}"
    )


def math_correctness_reward(completions: Sequence, answer: Sequence | None = None, **kwargs) -> list[float]:
    """1.0 for each completion whose final answer matches the gold `answer` (math-verify), else 0.0.

    `answer` is the dataset's gold-answer column, passed by TRL as a keyword argument; a missing gold (``None``)
    scores 0.0.
    """
    if answer is None:
        raise ValueError(
            "math_correctness_reward needs the gold answers in a dataset column named 'answer' "
            f"(columns passed: {sorted(kwargs) or 'none'})"
        )
    if isinstance(answer, (str, int, float)):
        answer = [answer] * len(completions)
    if len(answer) != len(completions):
        raise ValueError(f"got {len(completions)} completions but {len(answer)} values in column 'answer'")
    return [
        float(gold is not None and verify_math(completion_text(completion), gold))
        for completion, gold in zip(completions, answer)
    ]


def knights_knaves_reward(completions: Sequence, answer: Sequence | None = None, **kwargs) -> list[float]:
    """1.0 for each completion whose ``<answer>`` block (else its whole text) gives every person in the gold `answer`
    (``"(1) Amelia is a knight\\n(2) Ben is a knave"``, the ``builtin:knights_knaves`` answer column) the gold role,
    else 0.0 — the same check as the Knights-and-Knaves benchmark grader."""
    if answer is None:
        raise ValueError(
            "knights_knaves_reward needs the gold assignments in a dataset column named 'answer' "
            f"(columns passed: {sorted(kwargs) or 'none'})"
        )
    if isinstance(answer, str):
        answer = [answer] * len(completions)
    if len(answer) != len(completions):
        raise ValueError(f"got {len(completions)} completions but {len(answer)} values in column 'answer'")
    return [float(grade_knights_knaves_answer(completion_text(c), gold)[0]) for c, gold in zip(completions, answer)]


def boxed_format_reward(completions: Sequence, **kwargs) -> list[float]:
    """1.0 for each completion that ends with a final answer in ``\\boxed{...}`` (non-empty), else 0.0."""
    return [float(bool(extract_boxed(completion_text(completion)))) for completion in completions]


def with_reward_noise(reward_func: Callable, flip_prob: float, seed: int = 0) -> Callable:
    """Wrap a binary (0/1) reward function so each reward flips 1<->0 with probability `flip_prob`.

    One random draw is made per completion from a `random.Random(seed)` owned by the wrapper, so the noise is
    deterministic given the seed and the order of calls. Inside a Trainer (TRL passes `trainer_state`) the stream is
    instead keyed by (seed, global step, call number at that step), so that a run resumed from a checkpoint flips the
    same rewards as the uninterrupted run. ``None`` rewards (TRL's "not applicable") pass through
    unchanged; non-binary rewards raise ``ValueError``. The wrapper is named ``noisy_<name>`` so TRL logs it apart;
    called by a TRL trainer (with its ``log_metric`` hook), it also logs the batch's mean reward before the flips as
    ``rewards/<name>/clean_mean``.
    """
    if not callable(reward_func):
        raise TypeError(f"reward_func must be callable, got {type(reward_func).__name__}")
    if isinstance(flip_prob, bool) or not isinstance(flip_prob, (int, float)) or not 0.0 <= flip_prob <= 1.0:
        raise ValueError(f"flip_prob must be a number in [0, 1], got {flip_prob!r}")
    rng = random.Random(seed)
    calls_at_step: dict[int, int] = {}
    base_name = getattr(reward_func, "__name__", type(reward_func).__name__)

    @functools.wraps(reward_func)
    def noisy_reward(*args, **kwargs):
        rewards = reward_func(*args, **kwargs)
        draw, state = rng.random, kwargs.get("trainer_state")
        if state is not None:
            step = state.global_step
            calls_at_step[step] = calls_at_step.get(step, -1) + 1
            draw = random.Random(f"{seed}:{step}:{calls_at_step[step]}").random
        clean = [r for r in rewards if r is not None]
        if clean and callable(kwargs.get("log_metric")):  # TRL's per-batch metric hook: the reward before the flips
            kwargs["log_metric"](f"rewards/{base_name}/clean_mean", sum(clean) / len(clean))
        noisy = []
        for reward in rewards:
            flip = draw() < flip_prob
            if reward is None:
                noisy.append(None)
                continue
            if reward not in (0, 1):
                raise ValueError(f"with_reward_noise needs 0/1 rewards, but {base_name} returned {reward!r}")
            noisy.append(float(1 - reward) if flip else float(reward))
        return noisy

    noisy_reward.__name__ = noisy_reward.__qualname__ = f"noisy_{base_name}"
    noisy_reward.flip_prob = flip_prob
    noisy_reward.seed = seed
    return noisy_reward


def _code_execution_reward():
    from .humaneval import code_execution_reward

    return code_execution_reward


#: Registry name -> zero-argument loader (lazy, so optional modules are imported only when asked for).
REWARD_REGISTRY: dict[str, Callable[[], Callable]] = {
    "math_correctness": lambda: math_correctness_reward,
    "boxed_format": lambda: boxed_format_reward,
    "knights_knaves": lambda: knights_knaves_reward,
    "code_execution": _code_execution_reward,
}


def _import_dotted(path: str) -> Callable:
    module_name, _, attr = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"reward function {path!r}: cannot import module {module_name!r} ({exc})") from exc
    try:
        func = getattr(module, attr)
    except AttributeError as exc:
        raise ValueError(f"reward function {path!r}: module {module_name!r} has no attribute {attr!r}") from exc
    if not callable(func):
        raise TypeError(f"reward function {path!r} is a {type(func).__name__}, not a callable")
    return func


def get_reward_funcs(names: Sequence[str | Callable] | str) -> list[Callable]:
    """Resolve reward functions by registry name (see `REWARD_REGISTRY`) or dotted path ``pkg.module.func``.

    `names` is a list, or one comma-separated string (``"math_correctness,boxed_format"``). Callables are passed
    through. Unknown names raise ``ValueError`` listing the valid registry names.
    """
    if isinstance(names, str):
        names = [name.strip() for name in names.split(",") if name.strip()]
    if not names:
        raise ValueError(f"no reward functions given; choose from {sorted(REWARD_REGISTRY)} or a dotted path")
    funcs = []
    for name in names:
        if callable(name):
            funcs.append(name)
        elif not isinstance(name, str):
            raise TypeError(f"reward function names must be strings, got {type(name).__name__}")
        elif name in REWARD_REGISTRY:
            funcs.append(REWARD_REGISTRY[name]())
        elif "." in name:
            funcs.append(_import_dotted(name))
        else:
            raise ValueError(
                f"unknown reward function {name!r}; valid names are {sorted(REWARD_REGISTRY)} "
                "or a dotted import path such as 'my_pkg.my_module.my_reward'"
            )
    return funcs
