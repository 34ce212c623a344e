"""Variant files by content: the build machine offers files by sha256, a node fetches what it does
not already hold, and checks the hash before anything loads.

A node keeps what it received under $EDGECDS_HOME/fleet/blobs/<sha256>, so a second variant task,
or a second run, does not move the same bytes again; a kept file is hashed again before each use.
What it keeps is only a copy of the build machine's files, so when a new file does not fit (the
disk, or the store's size limit, $EDGECDS_FLEET_STORE_GIB, set by `fleet join --store-gib`), the
least recently used files the task does not need are deleted, with their links in the workspaces.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from edgecds.atomic import DISK_MARGIN, require_free
from edgecds.digest import sha256_file
from edgecds.errors import InvalidInputError, NotEnoughDiskError
from edgecds.home import edgecds_home

CHUNK = 16 << 20  # bytes per object-store transfer: large enough to stream, small enough to hold a few
IN_FLIGHT = 3
STORE_ENV = "EDGECDS_FLEET_STORE_GIB"  # the most a node's store of received files may hold


@dataclass(frozen=True)
class FileSpec:
    relpath: str  # where the file goes in the node's workspace, relative to it
    sha256: str
    size: int


class FileServer:
    """A Ray actor on the build machine: reads the files it was given, by hash, and nothing else."""

    def __init__(self, files: dict[str, str]) -> None:
        self.files = dict(files)  # sha256 -> path on the build machine

    def read(self, sha256: str, offset: int, length: int) -> bytes:
        path = self.files.get(sha256)
        if path is None:
            raise InvalidInputError(f"the build machine does not offer {sha256[:16]}")
        with open(path, "rb") as handle:
            handle.seek(offset)
            return handle.read(min(length, CHUNK))


def start_server(ray: Any, files: dict[str, str]) -> Any:
    """The server, pinned to this (the driver's) node, where the files are."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    actor = ray.remote(num_cpus=0, max_concurrency=4)(FileServer)
    return actor.options(scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)).remote(files)


SHA256 = re.compile(r"[0-9a-f]{64}")


def check_sha256(value: object, what: str) -> str:
    """A sha256 from the cluster or a variants.json: it names files, so it must be one."""
    if not isinstance(value, str) or not SHA256.fullmatch(value):
        raise InvalidInputError(f"{what}: {str(value)[:80]!r} is not a sha256 (64 hex digits); refused")
    return value


def blobs_dir() -> Path:
    return edgecds_home() / "fleet" / "blobs"


def valid_gib(gib: float) -> bool:
    """A store size limit `fleet join --store-gib` and the node's tasks both accept."""
    return 0 < gib < 2**20  # false for nan; inf is over the bound


def store_limit() -> int | None:
    """The store's size limit in bytes ($EDGECDS_FLEET_STORE_GIB), or None: only the disk limits it."""
    text = os.environ.get(STORE_ENV, "").strip()
    if not text:
        return None
    try:
        gib = float(text)
    except ValueError:
        gib = -1.0
    if not valid_gib(gib):
        raise InvalidInputError(f"${STORE_ENV}={text[:40]!r}: expected the store's size limit in GiB, e.g. 20")
    return int(gib * 2**30)


@dataclass(frozen=True)
class Eviction:
    files: int
    bytes: int


def make_room(store: Path, needed: int, keep: Iterable[str], limit: int | None) -> Eviction:
    """Delete the least recently used files of `store` (none in `keep`) until `needed` more bytes
    fit under `limit` and on the disk; refuse, deleting nothing, when even that would not do.
    Their hard links in the workspaces go too, or no space would come back; a task that needs one
    later receives it again."""
    keep = set(keep)
    held = []
    for path in store.iterdir():
        if SHA256.fullmatch(path.name):
            try:
                info = path.stat()
            except FileNotFoundError:  # deleted meanwhile by a node sharing this home
                continue
            if stat.S_ISREG(info.st_mode):
                held.append((path, info))
    held.sort(key=lambda entry: entry[1].st_atime)  # used files have their access time set (fetch)
    total = sum(info.st_size for _, info in held)
    evictable = [(path, info) for path, info in held if path.name not in keep]
    kept = total - sum(info.st_size for _, info in evictable)
    if limit is not None and kept + needed > limit:
        raise NotEnoughDiskError(f"this task's files need {(kept + needed) / 2**20:.0f} MiB of this node's store, over its limit "
                                 f"(${STORE_ENV} = {limit / 2**20:.0f} MiB): raise it (`fleet join --store-gib`); nothing was deleted")
    free = shutil.disk_usage(store).free
    if free + sum(info.st_size for _, info in evictable) < needed + DISK_MARGIN:
        raise NotEnoughDiskError(f"receiving a {needed / 2**20:.0f} MiB file: {store} has {free / 2**20:.0f} MiB free, too little even "
                                 "without the files kept there for other variants; free space on this node, or point EDGECDS_HOME "
                                 "elsewhere; nothing was deleted")
    evicted = Eviction(0, 0)
    for blob, info in evictable:
        within = limit is None or total + needed <= limit
        if within and shutil.disk_usage(store).free >= needed + DISK_MARGIN:
            break
        _unlink_with_links(blob, info)
        total -= info.st_size
        evicted = Eviction(evicted.files + 1, evicted.bytes + info.st_size)
    return evicted


def _unlink_with_links(blob: Path, info: os.stat_result) -> None:
    work = blob.parent.parent / "work"
    if work.is_dir():
        for folder, _, names in os.walk(work):
            for name in names:
                path = Path(folder) / name
                try:
                    other = path.stat(follow_symlinks=False)
                except OSError:
                    continue
                if (other.st_ino, other.st_dev) == (info.st_ino, info.st_dev):
                    path.unlink(missing_ok=True)
    blob.unlink(missing_ok=True)


IN_USE = ".in-use."  # a marker per running task: the hashes of the files it uses


@contextlib.contextmanager
def in_use(hashes: Iterable[str]) -> Iterator[None]:
    """Mark the files a task uses while it runs, so that no task (of this node, or of another node
    sharing this home) deletes them to make room."""
    store = blobs_dir()
    store.mkdir(parents=True, exist_ok=True)
    marker = store / f"{IN_USE}{os.getpid()}.{secrets.token_hex(4)}"
    text = "\n".join(check_sha256(h, "a file in use") for h in hashes)
    with _store_lock(store):  # whole, and not while another task is choosing what to delete
        partial = marker.with_name(f".part{marker.name}")
        partial.write_text(text, encoding="ascii")
        os.replace(partial, marker)
    try:
        yield
    finally:
        marker.unlink(missing_ok=True)


@contextlib.contextmanager
def _store_lock(store: Path) -> Iterator[None]:
    """One task at a time chooses what to delete, marks what it uses, or receives (nodes may share a home)."""
    import fcntl

    with open(store / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _used(store: Path) -> set[str]:
    used: set[str] = set()
    for marker in store.glob(f"{IN_USE}*"):
        pid = marker.name[len(IN_USE):].split(".")[0]
        if not pid.isdigit() or not _alive(int(pid)):
            marker.unlink(missing_ok=True)  # its task's process is gone
            continue
        try:
            used.update(line for line in marker.read_text(encoding="ascii").split() if SHA256.fullmatch(line))
        except (OSError, UnicodeDecodeError):
            continue
    return used


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # asks only whether the process exists
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def safe_relpath(relpath: str) -> PurePosixPath:
    path = PurePosixPath(relpath)
    if not isinstance(relpath, str) or not relpath or path.is_absolute() or ".." in path.parts or "\\" in relpath or "//" in relpath:
        raise InvalidInputError(f"refused a file path {relpath!r} from the cluster: it must stay inside the workspace")
    return path


@dataclass(frozen=True)
class Arrival:
    received_bytes: int
    reused: bool
    evicted: Eviction = Eviction(0, 0)


def fetch(ray: Any, server: Any, spec: FileSpec) -> tuple[Path, Arrival]:
    """The file in this node's store, fetched from `server` unless already held (and still intact).
    Files marked `in_use` are never deleted to make room for it."""
    check_sha256(spec.sha256, spec.relpath)
    safe_relpath(spec.relpath)
    store = blobs_dir()
    store.mkdir(parents=True, exist_ok=True)
    kept = store / spec.sha256
    if kept.is_file():
        info = kept.stat()
        if info.st_size == spec.size and sha256_file(kept) == spec.sha256:
            # used now: the last to be deleted. The access time only: a changed modification time
            # would make engines that key caches on it (ONNX's compiled graph) build them again
            os.utime(kept, ns=(time.time_ns(), info.st_mtime_ns))
            return kept, Arrival(0, True)
        kept.unlink()  # damaged since it arrived: fetched again
    with _store_lock(store):
        evicted = make_room(store, spec.size, _used(store) | {spec.sha256}, store_limit())
        require_free(store, spec.size, f"receiving {spec.relpath}", "free space on this node, or point EDGECDS_HOME elsewhere")
        return kept, Arrival(_receive(ray, server, spec, store, kept), False, evicted)


def _receive(ray: Any, server: Any, spec: FileSpec, store: Path, kept: Path) -> int:
    partial = store / f".{spec.sha256}.{os.getpid()}.part"  # two nodes may share a home
    digest = hashlib.sha256()
    received = 0
    try:
        with open(partial, "wb") as out:
            # a few chunks in flight: the next ones cross the network while this one is written
            offsets = list(range(0, spec.size, CHUNK))
            inflight = [server.read.remote(spec.sha256, o, CHUNK) for o in offsets[:IN_FLIGHT]]
            for n in range(len(offsets)):
                block = ray.get(inflight.pop(0))
                if n + IN_FLIGHT < len(offsets):
                    inflight.append(server.read.remote(spec.sha256, offsets[n + IN_FLIGHT], CHUNK))
                if not block:
                    break
                digest.update(block)
                out.write(block)
                received += len(block)
            out.flush()
            os.fsync(out.fileno())
        if received != spec.size or digest.hexdigest() != spec.sha256:
            raise InvalidInputError(
                f"{spec.relpath} arrived as {received} bytes with sha256 {digest.hexdigest()[:16]}..., not the {spec.size} bytes "
                f"with {spec.sha256[:16]}... variants.json records: refused before loading. The build machine's copy changed "
                "since `edgecds quantize` recorded it, or it was altered on the way; quantize again there")
        os.replace(partial, kept)
    finally:
        partial.unlink(missing_ok=True)
    return received


def place(blob: Path, workspace: Path, relpath: str) -> Path:
    """The blob at its place in the workspace: a hard link (no second copy), else a copy."""
    target = workspace / safe_relpath(relpath)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and os.path.samefile(target, blob):
        return target
    target.unlink(missing_ok=True)
    try:
        os.link(blob, target)
    except OSError:
        shutil.copyfile(blob, target)
    return target
