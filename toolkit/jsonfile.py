"""JSON files edgecds reads from untrusted places (a model folder, a config, a cache): read with a
size bound, parsed, and checked to be an object; anything else is a clear InvalidInputError."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgecds.errors import InvalidInputError

DEFAULT_LIMIT = 16 << 20  # configs and records are kilobytes; a tokenizer.json passes its own larger limit


def read_json(path: Path, limit: int = DEFAULT_LIMIT, pairs: Callable[[list[tuple[str, Any]]], Any] | None = None) -> Any:
    """`path` parsed as JSON, at most `limit` bytes; never a traceback. `pairs`: json's
    object_pairs_hook, to see every key as written."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(limit + 1)
    except OSError as exc:
        raise InvalidInputError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if len(raw) > limit:
        raise InvalidInputError(f"{path}: larger than {limit >> 20} MiB; this is not a {path.name} edgecds can read")
    try:
        return json.loads(raw, object_pairs_hook=pairs)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InvalidInputError(f"{path}: not valid JSON ({type(exc).__name__}: {exc})"[:300]) from None


def read_json_object(path: Path, limit: int = DEFAULT_LIMIT) -> dict[str, Any]:
    data = read_json(path, limit)
    if not isinstance(data, dict):
        raise InvalidInputError(f"{path}: not a JSON object")
    return data


def duplicate_keys(path: Path, limit: int = DEFAULT_LIMIT) -> list[str]:
    """Keys `path` gives twice at one level: readers differ on which one wins (Python's and
    transformers' take the last), so a file that says two things is refused, not guessed at."""
    dupes: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        names = [key for key, _ in items]
        dupes.extend(sorted({key for key in names if names.count(key) > 1}))
        return dict(items)

    read_json(path, limit, pairs)
    return dupes
