"""Writes that an interruption cannot leave half-done.

Every file edgecds produces is written under a temporary name in the destination folder,
fsynced, then renamed over the final name (shared/THREAT-MODEL.md). A kill or a full disk leaves
only a temporary, which the next run removes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TEMP_MARK = ".edgecds-tmp"


def temp_name_for(final: Path) -> Path:
    """A fresh temporary path beside `final`, recognisable as ours by its name."""
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=TEMP_MARK, dir=final.parent)
    os.close(fd)
    os.chmod(name, 0o666 & ~_umask())  # mkstemp makes 0600; published files get the usual mode
    return Path(name)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(temp: Path, final: Path) -> None:
    """Make `temp` durable and move it to `final` in one step."""
    if temp.is_dir():
        for child in temp.rglob("*"):
            if child.is_file():
                fsync_path(child)
        if final.exists():
            # A directory cannot be replaced atomically while it exists; move the old one aside first.
            old = temp_name_for(final)
            old.unlink()
            os.replace(final, old)
            os.replace(temp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(temp, final)
    else:
        fsync_path(temp)
        os.replace(temp, final)
    fsync_path(final.parent)


@contextlib.contextmanager
def atomic_path(final: Path, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; on success it becomes `final`, on any failure it is removed."""
    final.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_name_for(final)
    if directory:
        temp.unlink()
        temp.mkdir(mode=0o777 & ~_umask())
    try:
        yield temp
        publish(temp, final)
    except BaseException:
        if temp.is_dir():
            shutil.rmtree(temp, ignore_errors=True)
        else:
            temp.unlink(missing_ok=True)
        raise


def write_json(final: Path, data: Any) -> None:
    with atomic_path(final) as temp:
        temp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete temporaries an earlier, interrupted run left in `folder`; return what was removed."""
    removed = []
    if folder.is_dir():
        for leftover in folder.glob(f".*{TEMP_MARK}"):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
            removed.append(leftover)
    return removed


def write_limit_reached(path: Path) -> str | None:
    """Why writing `path` may have failed: a full disk or the file-size limit (`ulimit -f`), or None."""
    import resource

    try:
        written = path.stat().st_size
    except FileNotFoundError:
        written = 0
    soft, _hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY and written >= soft - (1 << 20):
        return f"the file-size limit (ulimit -f, {soft / 2**20:.0f} MiB) was reached"
    free = shutil.disk_usage(path.parent).free
    if free < (64 << 20):
        return f"the disk holding {path.parent} is full ({free / 2**20:.0f} MiB free)"
    return None


@contextlib.contextmanager
def waiting_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on `folder`, waiting for another run that holds it (a shared cache:
    the second run then finds what the first one made)."""
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".edgecds.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on `folder` so two runs never write (or clean) it at once."""
    import fcntl

    from edgecds.errors import EdgecdsError

    with open(folder / ".edgecds.lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise EdgecdsError(f"another edgecds run is writing to {folder}; wait for it to finish or choose another folder") from None
        yield


DISK_MARGIN = 64 << 20  # room left for logs, temporaries and the file system's own needs


def require_free(folder: Path, needed: int, what: str, advice: str) -> None:
    """Refuse, before a byte is written, work that needs more of `folder`'s disk than is free:
    a full disk found halfway wastes the time spent and can leave other programs short."""
    from edgecds.errors import NotEnoughDiskError

    probe = folder
    while not probe.exists() and probe != probe.parent:  # the nearest folder that exists is on the same disk
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed + DISK_MARGIN > free:
        raise NotEnoughDiskError(f"{what}: about {needed / 2**20:.0f} MiB needed, but {probe} has {free / 2**20:.0f} MiB free; "
                                 f"{advice}; nothing was written")
