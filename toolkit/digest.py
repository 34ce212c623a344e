"""Content hashes: what caching, resuming and verification compare, and the one cache key."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

_CHUNK = 8 << 20  # large enough that the per-call cost vanishes, small enough to keep memory flat
Progress = Callable[[int], None]  # called with the bytes handled so far


def sha256_file(path: Path, progress: Progress | None = None) -> str:
    """The file's sha256, read in chunks: memory stays at one chunk whatever the file's size."""
    h = hashlib.sha256()
    buffer = bytearray(_CHUNK)
    view, done = memoryview(buffer), 0
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buffer):
            h.update(view[:n])
            done += n
            if progress is not None:
                progress(done)
    return h.hexdigest()


def sha256_stream(stream: BinaryIO, size: int, progress: Progress | None = None) -> str:
    """The sha256 of exactly `size` bytes read from `stream` (an archive member), in chunks; a
    stream that ends early raises EOFError."""
    h, done = hashlib.sha256(), 0
    while done < size:
        chunk = stream.read(min(_CHUNK, size - done))
        if not chunk:
            raise EOFError("the archive ends inside a member")
        h.update(chunk)
        done += len(chunk)
        if progress is not None:
            progress(done)
    return h.hexdigest()


def copy_hashed(source: Path, target: Path, progress: Progress | None = None) -> str:
    """Copy `source` to `target` and return the sha256 of the bytes written, in one pass: a copy
    and its hash cost one read, not two."""
    h = hashlib.sha256()
    buffer = bytearray(_CHUNK)
    view, done = memoryview(buffer), 0
    # a buffered writer writes every byte or raises (a raw one may write fewer on a full disk)
    with open(source, "rb", buffering=0) as src, open(target, "wb") as dst:
        while n := src.readinto(buffer):
            h.update(view[:n])
            dst.write(view[:n])
            done += n
            if progress is not None:
                progress(done)
    return h.hexdigest()


class HashingWriter:
    """A write-only file that hashes and counts what passes through it to `raw`."""

    def __init__(self, raw: BinaryIO, progress: Progress | None = None) -> None:
        self._raw, self._progress = raw, progress
        self._hash = hashlib.sha256()
        self.written = 0

    def write(self, data: bytes) -> int:
        self._hash.update(data)
        n = self._raw.write(data)
        self.written += len(data)
        if self._progress is not None:
            self._progress(self.written)
        return n if n is not None else len(data)

    def tell(self) -> int:  # tarfile asks where it starts; the writer starts a fresh file
        return self.written

    def flush(self) -> None:
        self._raw.flush()

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def sha256_folder(folder: Path) -> str:
    """One hash over every regular file's relative path and content, in sorted order (hidden
    files are left out)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    return digest_of_files({p.relative_to(folder).as_posix(): sha256_file(p) for p in files})


def folder_digest_of(hashes: dict[Path, str], folder: Path) -> str:
    """`sha256_folder` of `folder` from the hashes of its files already taken (path -> sha256)."""
    return digest_of_files({p.relative_to(folder).as_posix(): h for p, h in hashes.items() if not p.name.startswith(".")})


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
