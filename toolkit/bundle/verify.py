"""`edgecds verify`: a bundle (folder or archive) checked byte for byte against its manifest, and
its signature against a trusted key.

An archive came over a network or a USB stick. Its headers are read first, with the manifest it
carries: every member must be a plain file or folder inside one top folder, listed in the manifest
at the size the manifest gives (sparse members, size bombs and 100k-member archives are refused
there). Then each member is hashed as it streams out of the archive, never more than its declared
size: nothing is written, so verifying costs one read of the archive. `--into DIR` then unpacks a
verified archive (`safe_extract`: the same header checks, and the free disk, before a byte is
written). A folder's `manifest.json` and `signature.json` are read only when they are plain files
of a bounded size: a link, a FIFO or a device there is refused unopened.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tarfile
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any

from edgecds.bundle.layout import (
    ENGINE_CONFIG,
    MANIFEST,
    MAX_CONFIG_BYTES,
    OMS_SIGNATURE,
    SCHEMA_VERSION,
    SIGNATURE,
    BundleEngineConfig,
    VerifyError,
)
from edgecds.bundle.sign import PEM_PUBLIC, check_oms, check_signature
from edgecds.digest import sha256_file, sha256_stream
from edgecds.progress import Reporter, offset

# what reading a hostile archive raises: tarfile's own parser also raises ValueError (bad sparse
# maps) and RecursionError (chained long-name headers); none may become a traceback
ARCHIVE_ERRORS = (OSError, EOFError, ValueError, RecursionError, IndexError, zlib.error, tarfile.TarError)
MAX_MEMBERS = 4096  # a bundle holds a handful of files (an ONNX variant a dozen); more is an attack
MAX_MANIFEST_BYTES = 16 << 20
MAX_SIGNATURE_BYTES = 64 << 10
MAX_OMS_BYTES = 1 << 20  # model.sig lists every file with its digest: an ONNX bundle's few dozen files take a few KiB
DISK_MARGIN = 64 << 20
TRUSTED_KEY_ENV = "EDGECDS_TRUSTED_KEY"  # the signer a clinic device requires, when set
# a GNU long-name/long-link or pax header is read whole into memory by tarfile: bounded before
# that (a 1 MB gzip can declare a 1 GiB name); a bundle's longest name is well under this
MAX_EXTENDED_HEADER = 4 << 10  # x MAX_MEMBERS: at most 16 MiB of names held before the manifest check
SHOWN_NAME = 160  # characters of a hostile member name echoed in an error


def _shown(name: str) -> str:
    """A member name as an error shows it: quoted, and cut when long (it came from the archive)."""
    return repr(name) if len(name) <= SHOWN_NAME else repr(name[:SHOWN_NAME]) + f"... ({len(name)} characters)"


class _BoundedTarInfo(tarfile.TarInfo):
    """tarfile's header reader, refusing an extended header (GNU long name or link, pax) larger than
    MAX_EXTENDED_HEADER before tarfile reads it into memory (`_proc_member` is where it would)."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        extended = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)
        if self.type == tarfile.GNUTYPE_SPARSE:  # its map of holes is read (unbounded) before a sparse member could be refused
            raise VerifyError(f"{tarfile_.name!s}: a sparse file member (a size bomb); no bundle holds one; refused, nothing extracted")
        if self.type in extended and self.size > MAX_EXTENDED_HEADER:
            raise VerifyError(f"{tarfile_.name!s}: an extended header declares {self.size} bytes (a name or attributes that long "
                              "is a memory bomb); refused, nothing extracted")
        return super()._proc_member(tarfile_)  # type: ignore[misc]

    def _refuse_sparse(self, *args: object) -> None:
        raise VerifyError("a sparse file member (a size bomb: pax's GNU.sparse map); no bundle holds one; refused, nothing extracted")

    # pax's GNU sparse formats 0.0, 0.1 and 1.0 (1.0 reads its map from the data, unbounded)
    _proc_gnusparse_00 = _proc_gnusparse_01 = _proc_gnusparse_10 = _refuse_sparse


@dataclass(frozen=True)
class VerifyResult:
    bundle: str
    files: int
    signed: bool
    signer: str | None
    trusted_signer: bool
    signature_format: str | None = None  # "openssf-model-signing" (model.sig) or "edgecds-ed25519" (signature.json)
    notes: tuple[str, ...] = ()


def read_plain_file(path: Path, limit: int) -> bytes:
    """A file's bytes, only if it is a regular file (not a link, FIFO, device or folder) of at most
    `limit` bytes: it is checked before it is opened, and read no further than the limit."""
    try:
        mode = path.lstat()
    except FileNotFoundError:
        raise VerifyError(f"{path}: missing; this is not a complete edgecds bundle") from None
    if not stat.S_ISREG(mode.st_mode):
        raise VerifyError(f"{path}: not a plain file (a link, a folder or a special file); refused unopened")
    if mode.st_size > limit:
        raise VerifyError(f"{path}: {mode.st_size} bytes, more than the {limit} such a file can hold; refused")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as fh:
        return fh.read(limit + 1)[:limit]


def _member_path(archive: Path, m: tarfile.TarInfo) -> PurePosixPath:
    name = PurePosixPath(m.name)
    if m.name.startswith(("/", "\\")) or name.is_absolute() or ".." in name.parts or not name.parts or "\\" in m.name:
        raise VerifyError(f"{archive}: member {_shown(m.name)} points outside the bundle; refused, nothing extracted")
    if not (m.isfile() or m.isdir()):
        kind = "link" if (m.issym() or m.islnk()) else "device or special file"
        raise VerifyError(f"{archive}: member {_shown(m.name)} is a {kind}; refused, nothing extracted")
    if m.issparse():
        raise VerifyError(f"{archive}: member {_shown(m.name)} is a sparse file (a size bomb); refused, nothing extracted")
    return name


def _manifest_sizes(archive: Path, data: bytes) -> dict[str, int]:
    try:
        manifest = json.loads(data)
        files = manifest["files"]
        sizes = {str(k): int(v["size"]) for k, v in files.items() if isinstance(v, dict) and isinstance(v.get("size"), int)}
        if len(sizes) != len(files):
            raise ValueError("entries")
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise VerifyError(f"{archive}: its {MANIFEST} is not an edgecds manifest; refused, nothing extracted") from None
    return sizes


def _read_headers(tar: tarfile.TarFile, archive: Path) -> tuple[list[tuple[tarfile.TarInfo, PurePosixPath]], bytes]:
    """Every member's header, checked as it is read (count, kind, place), and the manifest's bytes."""
    members: list[tuple[tarfile.TarInfo, PurePosixPath]] = []
    seen: set[PurePosixPath] = set()
    manifest = b""
    for m in tar:
        if len(members) >= MAX_MEMBERS:
            raise VerifyError(f"{archive}: more than {MAX_MEMBERS} members; no bundle has that many; refused, nothing extracted")
        name = _member_path(archive, m)
        if name in seen:
            raise VerifyError(f"{archive}: member {_shown(m.name)} appears twice; refused, nothing extracted")
        seen.add(name)
        if len(name.parts) == 2 and name.parts[1] in (MANIFEST, SIGNATURE, OMS_SIGNATURE, ENGINE_CONFIG) and not m.isfile():
            raise VerifyError(f"{archive}: member {_shown(m.name)} is not a plain file; refused, nothing extracted")
        if m.isfile() and len(name.parts) == 2 and name.parts[1] == MANIFEST:
            if m.size > MAX_MANIFEST_BYTES:
                raise VerifyError(f"{archive}: its {MANIFEST} is {m.size} bytes; refused, nothing extracted")
            src = tar.extractfile(m)
            manifest = src.read(MAX_MANIFEST_BYTES) if src else b""
        members.append((m, name))
    return members, manifest


def _check_members(archive: Path, members: list[tuple[tarfile.TarInfo, PurePosixPath]], manifest: bytes) -> tuple[str, int]:
    """The one top folder; every file listed at its size; folders and files never sharing a name.
    Returns the top folder's name and the bytes its files hold."""
    tops = {name.parts[0] for _, name in members}
    if len(tops) != 1:
        raise VerifyError(f"{archive}: a bundle archive holds one folder, this holds {len(tops)} top-level entries; refused, nothing extracted")
    if not manifest:
        raise VerifyError(f"{archive}: no {MANIFEST} in its folder; not an edgecds bundle; refused, nothing extracted")
    if next(iter(tops)).startswith("."):  # a hidden name could pass for one of edgecds's own temporaries or locks
        raise VerifyError(f"{archive}: its folder {next(iter(tops))!r} is a hidden name; refused, nothing extracted")
    sizes = _manifest_sizes(archive, manifest)
    folders = {name for m, name in members if m.isdir()} | {p for _, name in members for p in name.parents if p != PurePosixPath(".")}
    total = 0
    for m, name in members:
        if not m.isfile():
            continue
        if name in folders:
            raise VerifyError(f"{archive}: {_shown(m.name)} is both a file and a folder; refused, nothing extracted")
        relative = PurePosixPath(*name.parts[1:]).as_posix()
        if relative not in (MANIFEST, SIGNATURE, OMS_SIGNATURE) and sizes.get(relative) != m.size:
            what = "not listed in the manifest" if relative not in sizes else f"{m.size} bytes, the manifest says {sizes[relative]}"
            raise VerifyError(f"{archive}: member {_shown(m.name)} is {what}; refused, nothing extracted")
        total += m.size
    return tops.pop(), total


def _open_archive(archive: Path) -> tarfile.TarFile:
    """An uncompressed tar, or the gzip one earlier versions wrote; nothing else is opened (other
    compressors can ask for unbounded decoder memory)."""
    with open(archive, "rb") as fh:
        gzipped = fh.read(2) == b"\x1f\x8b"
    return tarfile.open(archive, mode="r:gz" if gzipped else "r:", tarinfo=_BoundedTarInfo)


def safe_extract(archive: Path, into: Path, reporter: Reporter | None = None) -> Path:
    """Extract a bundle archive, refusing (not rewriting) any member that is not a plain file or
    folder inside the target (`..`, absolute names, links, devices, FIFOs, sparse files), any file
    the manifest does not list at that size, and an archive larger than the free disk; headers are
    checked before anything is written. Returns the bundle folder."""
    try:
        with _open_archive(archive) as tar:
            members, manifest = _read_headers(tar, archive)
            top, total = _check_members(archive, members, manifest)
            free = shutil.disk_usage(into).free
            if total + DISK_MARGIN > free:
                raise VerifyError(f"{archive}: unpacks to {total / 2**20:.0f} MiB but {into} has {free / 2**20:.0f} MiB free; "
                                  "free space or choose another folder; nothing extracted")
            done = 0
            if reporter:
                reporter.start("verify: extract", total)
            for m, name in members:
                target = into.joinpath(*name.parts)
                if m.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(m)
                if src is None:
                    raise VerifyError(f"{archive}: member {_shown(m.name)} cannot be read")
                with src, open(target, "wb") as dst:
                    _copy_at_most(src, dst, m.size)
                done += m.size
                if reporter:
                    reporter.advance_to(done)
            if reporter:
                reporter.finish()
    except ARCHIVE_ERRORS as exc:
        if isinstance(exc, OSError) and exc.filename and not str(exc.filename).startswith(str(archive)):
            raise VerifyError(f"{archive}: could not be extracted into {into.parent}: {exc.strerror}") from None
        raise VerifyError(f"{archive}: not a complete, readable bundle archive ({type(exc).__name__}: {exc}); fetch it again") from None
    return into / top


def _copy_at_most(src: Any, dst: Any, size: int) -> None:
    left = size
    while left > 0:
        chunk = src.read(min(left, 8 << 20))
        if not chunk:
            raise EOFError("the archive ends inside a member")
        dst.write(chunk)
        left -= len(chunk)


def _manifest_files(manifest_path: Path, data: bytes) -> dict[str, dict[str, Any]]:
    try:
        manifest = json.loads(data)
        files = manifest["files"]
        if manifest.get("schema_version") != SCHEMA_VERSION or not isinstance(files, dict):
            raise ValueError("schema")
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise VerifyError(f"{manifest_path}: not a manifest of schema_version {SCHEMA_VERSION}") from None
    for name, entry in files.items():
        relative = PurePosixPath(name)
        size = entry.get("size") if isinstance(entry, dict) else None
        if (not isinstance(entry, dict) or not isinstance(size, int) or isinstance(size, bool) or not 0 <= size < 2**63
                or not isinstance(entry.get("sha256"), str)):
            raise VerifyError(f"{manifest_path}: the entry for {name!r} is not {{\"sha256\": ..., \"size\": ...}} with a size a file can have")
        if relative.is_absolute() or ".." in relative.parts or not relative.parts:
            raise VerifyError(f"{manifest_path}: lists {name!r}, a path outside the bundle")
    if ENGINE_CONFIG not in files:
        raise VerifyError(f"{manifest_path}: does not list {ENGINE_CONFIG}; a bundle's model and settings must be covered by it")
    return files


def _present_files(bundle: Path) -> set[str]:
    present = set()
    for path in sorted(bundle.rglob("*")):
        mode = path.lstat().st_mode
        if stat.S_ISLNK(mode):
            raise VerifyError(f"{path}: a symlink; bundles hold plain files only")
        if stat.S_ISDIR(mode):
            continue
        if not stat.S_ISREG(mode):
            raise VerifyError(f"{path}: not a plain file")
        present.add(path.relative_to(bundle).as_posix())
    return present


def _check_model_listed(where: Path, config: BundleEngineConfig, files: dict[str, dict[str, Any]]) -> None:
    """The model runtime.json names, and its draft model if it has one, are inside the bundle and
    covered by the manifest."""
    model = config.model_path(where).relative_to(where).as_posix()
    if model not in files and not any(name.startswith(model + "/") for name in files):
        raise VerifyError(f"{where / ENGINE_CONFIG}: its model {config.model!r} is not listed in the manifest")
    draft = config.draft_settings(where)
    if draft is not None and not draft.is_ngram and Path(draft.source).relative_to(where).as_posix() not in files:
        raise VerifyError(f"{where / ENGINE_CONFIG}: its draft model {draft.source!r} is not listed in the manifest")


# (size, sha256) of a present file, reporting bytes read to the progress callback
Digest = Callable[[str, Callable[[int], None] | None], tuple[int, str]]


@dataclass(frozen=True)
class _Contents:
    """A bundle as verify reads it, from its folder or straight from its archive."""

    where: Path  # how its files are named in messages: the folder, or ARCHIVE:TOP
    manifest: bytes
    signature: bytes | None
    present: list[str]  # the files it holds, relative, in the order they are best read (an archive's own)
    runtime: Callable[[], BundleEngineConfig]
    digest: Digest
    oms: bytes | None = None  # model.sig: an OpenSSF model signature


def _trusted(given: str | None) -> str | None:
    """The trusted signer, from --key (a key or a key file) or the environment: an ed25519 key as 64
    hex characters, an EC key (OpenSSF model signing) as its PEM text."""
    from edgecds.bundle.sign import trusted_public_key

    if given:
        return trusted_public_key(given)
    from_env = os.environ.get(TRUSTED_KEY_ENV, "").strip()
    return trusted_public_key(from_env, TRUSTED_KEY_ENV) if from_env else None


def verify_bundle(bundle: Path, trusted_key: str | None = None, reporter: Reporter | None = None,
                  require_signature: bool = False) -> VerifyResult:
    """Every byte against the manifest; raises VerifyError naming the file at fault. With
    `trusted_key` (the key in hex or a file holding it; default $EDGECDS_TRUSTED_KEY) the bundle must
    be signed by that key; with `require_signature`, by some key.
    Files are read in chunks: memory stays flat whatever the model's size; an archive is
    verified as it is read, without unpacking it."""
    trusted_key = _trusted(trusted_key)
    if bundle.is_file():
        try:
            with _open_archive(bundle) as tar:
                return _check(_archive_contents(bundle, tar), trusted_key, reporter, str(bundle), require_signature)
        except ARCHIVE_ERRORS as exc:
            raise VerifyError(f"{bundle}: not a complete, readable bundle archive ({type(exc).__name__}: {exc}); fetch it again") from None
    if not bundle.is_dir():
        raise VerifyError(f"{bundle}: no such bundle folder or archive")
    signed = os.path.lexists(bundle / SIGNATURE)

    def digest(name: str, progress: Callable[[int], None] | None) -> tuple[int, str]:
        path = bundle / name
        return path.stat().st_size, sha256_file(path, progress)

    contents = _Contents(bundle, read_plain_file(bundle / MANIFEST, MAX_MANIFEST_BYTES),
                         read_plain_file(bundle / SIGNATURE, MAX_SIGNATURE_BYTES) if signed else None,
                         sorted(_present_files(bundle)), lambda: BundleEngineConfig.read(bundle), digest,
                         read_plain_file(bundle / OMS_SIGNATURE, MAX_OMS_BYTES) if os.path.lexists(bundle / OMS_SIGNATURE) else None)
    return _check(contents, trusted_key, reporter, str(bundle), require_signature)


def _archive_contents(archive: Path, tar: tarfile.TarFile) -> _Contents:
    """The archive's bundle, its headers checked first; the small files read bounded, the rest
    hashed as they stream out of it."""
    members, manifest = _read_headers(tar, archive)
    top, _total = _check_members(archive, members, manifest)
    files = {PurePosixPath(*name.parts[1:]).as_posix(): m for m, name in members if m.isfile()}

    def read_small(name: str, limit: int) -> bytes | None:
        member = files.get(name)
        if member is None:
            return None
        if member.size > limit:
            raise VerifyError(f"{archive}:{top}/{name}: {member.size} bytes, more than the {limit} such a file can hold; refused")
        src = tar.extractfile(member)
        return src.read(limit) if src else b""

    hashed_runtime: list[bytes] = []

    def digest(name: str, progress: Callable[[int], None] | None) -> tuple[int, str]:
        member = files[name]
        src = tar.extractfile(member)
        if src is None:
            raise VerifyError(f"{archive}: member {member.name!r} cannot be read")
        with src:
            if name == ENGINE_CONFIG and member.size <= MAX_CONFIG_BYTES:  # kept: the settings checked are the bytes hashed
                raw = src.read(member.size)
                hashed_runtime.append(raw)
                return len(raw), hashlib.sha256(raw).hexdigest()
            return member.size, sha256_stream(src, member.size, progress)

    def runtime() -> BundleEngineConfig:
        where = Path(f"{archive}:{top}") / ENGINE_CONFIG
        if not hashed_runtime:
            raise VerifyError(f"{where}: missing, or too large for runtime settings; this is not an edgecds bundle")
        return BundleEngineConfig.parse(hashed_runtime[0], where)

    # in the archive's own order: one pass forward through it (a gzip archive cannot seek back cheaply)
    return _Contents(Path(f"{archive}:{top}"), manifest, read_small(SIGNATURE, MAX_SIGNATURE_BYTES), list(files), runtime, digest,
                     read_small(OMS_SIGNATURE, MAX_OMS_BYTES))


def _signer(c: _Contents, trusted_key: str | None, require_signature: bool) -> tuple[str | None, str | None, dict[str, str] | None, list[str]]:
    """Who signed, in which format, and (OpenSSF) the digests the signature gives each file; checked
    against the trusted key when there is one. Refuses what the options require and is not there."""
    notes: list[str] = []
    trusted_ec = trusted_key if trusted_key is not None and trusted_key.startswith(PEM_PUBLIC) else None
    if c.oms is not None:
        signer, resources = check_oms(c.where, c.oms, trusted_ec)
        if trusted_key is not None and trusted_ec is None:
            raise VerifyError(f"{c.where / OMS_SIGNATURE}: an OpenSSF model signature by an EC key ({signer}), not by the trusted ed25519 key")
        if trusted_key is None and require_signature:
            raise VerifyError(f"{c.where / OMS_SIGNATURE}: an OpenSSF model signature is checked with its signer's public key, and none "
                              "was given; pass --key KEY.pem.pub (or $EDGECDS_TRUSTED_KEY)")
        return signer, "openssf-model-signing", resources, notes
    if c.signature is not None:
        signer = check_signature(c.where, c.manifest, c.signature)
        notes.append("signed in edgecds's own format (ed25519, signature.json), which only edgecds verifies; a bundle signed with an EC "
                     "key (`edgecds keygen --type ec`) carries an OpenSSF model signature (model.sig) any model_signing verifier checks")
        if trusted_key is not None and signer != trusted_key:
            raise VerifyError(f"{c.where / SIGNATURE}: signed by {signer}, not by the trusted key")
        return signer, "edgecds-ed25519", None, notes
    if trusted_key is not None:
        raise VerifyError(f"{c.where / SIGNATURE}: the bundle is not signed")
    if require_signature:
        raise VerifyError(f"{c.where / SIGNATURE}: the bundle is not signed, and a signature was required; ask its maker for a bundle "
                          "made with `edgecds bundle --sign KEY.pem`")
    return None, None, None, notes


def _check(c: _Contents, trusted_key: str | None, reporter: Reporter | None, shown: str, require_signature: bool = False) -> VerifyResult:
    """The checks a folder and an archive share: signature, the trusted signer, the manifest's
    entries, no extra or missing file, every file's size and hash, the model listed. An OpenSSF
    signature's digests must be those of every file: the manifest's, which are then checked
    against the bytes, and the manifest's own."""
    signer, kind, resources, notes = _signer(c, trusted_key, require_signature)
    files = _manifest_files(c.where / MANIFEST, c.manifest)
    expected = set(files) | {MANIFEST} | ({SIGNATURE} if c.signature is not None else set()) | ({OMS_SIGNATURE} if c.oms is not None else set())
    for name in sorted(set(c.present) - expected):
        raise VerifyError(f"{c.where / name}: not listed in the manifest (an extra file)")
    for name in sorted(expected - set(c.present)):
        raise VerifyError(f"{c.where / name}: listed in the manifest but missing")
    if resources is not None:
        own = {MANIFEST: hashlib.sha256(c.manifest).hexdigest(), **{n: str(e["sha256"]) for n, e in files.items()}}
        if c.signature is not None:
            own[SIGNATURE] = hashlib.sha256(c.signature).hexdigest()
        for name in sorted(set(own) | set(resources)):
            if name not in resources:
                raise VerifyError(f"{c.where / OMS_SIGNATURE}: does not cover {name} (added after signing)")
            if name not in own:
                raise VerifyError(f"{c.where / OMS_SIGNATURE}: covers {name}, which the bundle does not hold")
            if own[name] != resources[name]:
                raise VerifyError(f"{c.where / name}: does not match {OMS_SIGNATURE} (changed after signing)")
    total, done = sum(int(e["size"]) for e in files.values()), 0
    if reporter:
        reporter.start("verify: sha256", total)
    try:
        for name in (n for n in c.present if n in files):  # in the order they are best read
            entry = files[name]
            size, sha = c.digest(name, offset(reporter.advance_to if reporter else None, done))
            if size != entry["size"] or sha != entry["sha256"]:
                raise VerifyError(f"{c.where / name}: does not match the manifest (size or sha256 differs)")
            done += entry["size"]
    finally:
        if reporter:
            reporter.finish()
    _check_model_listed(c.where, c.runtime(), files)
    return VerifyResult(shown, len(files), signer is not None, signer, trusted_key is not None, kind, tuple(notes))  # a trusted key with no signer was refused


def unpack_bundle(archive: Path, into: Path, trusted_key: str | None = None, reporter: Reporter | None = None,
                  require_signature: bool = False) -> tuple[VerifyResult, Path]:
    """Unpack an archive into `into` as its top folder. The archive is verified first as it is read
    (signature and trusted signer included: nothing is written for a bundle that fails); then it is
    extracted (`safe_extract`: headers and the free disk checked first), the unpacked files are
    verified again (the archive could change between the two reads), made durable, and the folder
    gets its final name only then. An interruption, or a failure, leaves nothing but a temporary
    the next run removes."""
    from edgecds.atomic import TEMP_MARK, folder_lock, fsync_path, remove_stale_temporaries

    verify_bundle(archive, trusted_key, reporter, require_signature)
    into.mkdir(parents=True, exist_ok=True)
    with folder_lock(into):
        remove_stale_temporaries(into)
        staging = Path(tempfile.mkdtemp(prefix=".unpacking.", suffix=TEMP_MARK, dir=into))
        try:
            folder = safe_extract(archive, staging, reporter)
            target = into / folder.name
            try:
                result = verify_bundle(folder, trusted_key, reporter, require_signature)
            except VerifyError as exc:  # name the archive, not a temporary folder that is about to go
                raise VerifyError(str(exc).replace(str(folder), f"{archive}:{folder.name}")) from None
            for path in [*sorted(folder.rglob("*")), folder]:
                fsync_path(path)
            if os.path.lexists(target):  # checked after the long part, just before the rename
                raise VerifyError(f"{target} already exists; remove it or unpack into another folder")
            try:
                os.rename(folder, target)  # within one folder: one step
            except OSError as exc:
                raise VerifyError(f"{target}: could not be created ({exc.strerror}); remove what is there or unpack elsewhere") from None
            fsync_path(into)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return replace(result, bundle=str(target)), target
