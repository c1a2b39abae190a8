"""One reader for the JSON-lines files the package reads (benchmarks, completions, HumanEval's `.jsonl.gz`)."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path


def iter_jsonl(path: str | Path, what: str = "file") -> Iterator[tuple[int, dict]]:
    """Yield `(line_number, object)` for each non-blank line; `.gz` files are decompressed.

    Raises `FileNotFoundError` naming `what` when the file is missing, and `ValueError` with `path:line` when a line
    is not valid JSON or not a JSON object.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} not found")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{what} {path}:{line_no} is not valid JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise ValueError(f"{what} {path}:{line_no} must be a JSON object, got {type(row).__name__}")
            yield line_no, row
