"""Checks of the datasets BridgeTrainer is given, before anything is built: RL prompts in a form GRPOTrainer takes,
expert traces in one of TRL's SFT formats. Each failure names the dataset, the column and what was found."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from datasets import Dataset, DatasetDict

SFT_FORMATS = "'prompt' + 'completion', 'messages', or 'text'"


class MissingColumnsError(ValueError):
    """A dataset lacks columns the RL or SFT format needs (a `ValueError`)."""


def require_columns(ds: Dataset, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise MissingColumnsError(f"{what} is missing column(s) {missing}; found columns {ds.column_names}")


def _value_kind(value) -> str | None:
    """``"text"`` for a string, ``"messages"`` for a non-empty list of {role, content} dicts, else ``None``."""
    if isinstance(value, str):
        return "text"
    if isinstance(value, (list, tuple)) and value and all(
        isinstance(m, Mapping) and "role" in m and "content" in m for m in value
    ):
        return "messages"
    return None


def _describe(value) -> str:
    return f"{type(value).__name__} {value!r}"[:120]


def _check_dataset(ds, name: str) -> None:
    if isinstance(ds, DatasetDict):
        raise ValueError(f"{name} is a DatasetDict with splits {list(ds)}; pass one split, e.g. ds['train']")
    if not isinstance(ds, Dataset):
        raise ValueError(f"{name} must be a datasets.Dataset, got {type(ds).__name__}")
    if len(ds) == 0:
        raise ValueError(f"{name} is empty (0 rows)")


def validate_rl_dataset(ds: Dataset, required: Sequence[str] = ("prompt",), name: str = "RL dataset") -> Dataset:
    """Check an RL dataset for TRL's GRPO: a non-empty `Dataset` with the `required` columns, and a ``prompt`` that
    is a string or a list of ``{"role", "content"}`` messages (checked on the first row). Returns `ds`.

    Raises ``ValueError`` naming the missing column, the empty dataset or the wrong type.
    """
    _check_dataset(ds, name)
    require_columns(ds, list(required), name)
    if "prompt" in ds.column_names and _value_kind(ds[0]["prompt"]) is None:
        raise ValueError(
            f"{name}: column 'prompt' must hold strings or lists of {{'role', 'content'}} messages, "
            f"got {_describe(ds[0]['prompt'])}"
        )
    return ds


def validate_sft_dataset(ds: Dataset, name: str = "SFT dataset") -> Dataset:
    """Check an SFT dataset is in one of TRL's SFT formats: ``prompt`` + ``completion`` (both strings or both
    message lists), ``messages`` (a conversation), or ``text`` (a string); checked on the first row. Returns `ds`.

    Raises ``ValueError`` naming the missing column, the empty dataset or the wrong type.
    """
    _check_dataset(ds, name)
    columns, row = ds.column_names, ds[0]
    if "prompt" in columns or "completion" in columns:
        require_columns(ds, ["prompt", "completion"], f"{name} (prompt-completion format)")
        kinds = {c: _value_kind(row[c]) for c in ("prompt", "completion")}
        for column, found in kinds.items():
            if found is None:
                raise ValueError(
                    f"{name}: column {column!r} must hold a string or a list of {{'role', 'content'}} messages, "
                    f"got {_describe(row[column])}"
                )
        if kinds["prompt"] != kinds["completion"]:
            raise ValueError(
                f"{name}: 'prompt' is {kinds['prompt']} but 'completion' is {kinds['completion']}; use the same "
                "format for both (strings, or message lists)"
            )
    elif "messages" in columns:
        if _value_kind(row["messages"]) != "messages":
            raise ValueError(
                f"{name}: column 'messages' must hold lists of {{'role', 'content'}} messages, "
                f"got {_describe(row['messages'])}"
            )
    elif "text" in columns:
        if not isinstance(row["text"], str):
            raise ValueError(f"{name}: column 'text' must hold strings, got {_describe(row['text'])}")
    else:
        raise MissingColumnsError(f"{name} must be in a TRL SFT format: {SFT_FORMATS}; found columns {columns}")
    return ds
