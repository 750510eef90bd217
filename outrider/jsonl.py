"""Reading JSONL data files (tasks, preference pairs): one object per line, every problem a one-line error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from outrider.errors import OutriderError


def json_objects(path: str, field: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each non-blank line of the file that recipe field `field` names; a missing or
    non-UTF-8 file, a line that is not JSON and a line that is not an object are `OutriderError`s naming them."""
    p = Path(path)
    if not p.is_file():
        raise OutriderError(f"{field}: no such file '{path}'")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise OutriderError(f"{path}: not UTF-8 text (byte {e.start})") from None
    # split on "\n" only: str.splitlines() also breaks at U+2028, U+0085, ..., which JSON strings may contain
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise OutriderError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise OutriderError(f"{path}:{n}: expected an object, got {type(row).__name__}")
        yield n, row
