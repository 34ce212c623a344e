"""Content hashes: what caching, resuming and verification compare, and the one cache key."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_folder(folder: Path) -> str:
    """One hash over every regular file's relative path and content, in sorted order."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    return digest_of_files({p.relative_to(folder).as_posix(): sha256_file(p) for p in files})


def digest_of_files(digests: dict[str, str]) -> str:
    """`sha256_folder` from per-file hashes already taken (relative path -> sha256)."""
    h = hashlib.sha256()
    for name in sorted(digests):
        h.update(name.encode() + b"\0")
        h.update(digests[name].encode() + b"\n")
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def cache_key(parts: Any, length: int = 64) -> str:
    """The key of a cached or recorded result: the sha256 of its inputs as canonical JSON (keys
    sorted), cut to `length` hex digits. Every cache and record key in edgecds is made here."""
    return sha256_text(json.dumps(parts, sort_keys=True))[:length]
