"""`edgecds verify`: a bundle (folder, or an archive extracted safely) checked byte for byte
against its manifest, and its signature against a trusted key."""

from __future__ import annotations

import json
import shutil
import stat
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from edgecds.bundle.layout import MANIFEST, SCHEMA_VERSION, SIGNATURE, VerifyError
from edgecds.bundle.sign import check_signature
from edgecds.digest import sha256_file


@dataclass(frozen=True)
class VerifyResult:
    bundle: str
    files: int
    signed: bool
    signer: str | None
    trusted_signer: bool


def safe_extract(archive: Path, into: Path) -> Path:
    """Extract a bundle archive, refusing (not rewriting) any member that is not a plain file or
    folder inside the target: `..`, absolute names, links, devices and fifos. Returns the bundle folder."""
    try:
        tar = tarfile.open(archive, mode="r:gz")
    except (OSError, tarfile.TarError) as exc:
        raise VerifyError(f"{archive}: not a readable .tar.gz ({exc})") from None
    with tar:
        members = tar.getmembers()
        tops = set()
        for m in members:
            parts = Path(m.name).parts
            if m.name.startswith(("/", "\\")) or Path(m.name).is_absolute() or ".." in parts or not parts:
                raise VerifyError(f"{archive}: member {m.name!r} points outside the bundle; refused, nothing extracted")
            if not (m.isfile() or m.isdir()):
                kind = "link" if (m.issym() or m.islnk()) else "device or special file"
                raise VerifyError(f"{archive}: member {m.name!r} is a {kind}; refused, nothing extracted")
            tops.add(parts[0])
        if len(tops) != 1:
            raise VerifyError(f"{archive}: a bundle archive holds one folder, this holds {len(tops)} top-level entries")
        for m in members:
            target = into / m.name
            if m.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(m)
            assert src is not None
            with src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    return into / tops.pop()


def verify_bundle(bundle: Path, trusted_key: str | None = None) -> VerifyResult:
    """Every byte against the manifest; raises VerifyError naming the file at fault."""
    if bundle.is_file():
        with tempfile.TemporaryDirectory(prefix="edgecds-verify-") as tmp:
            folder = safe_extract(bundle, Path(tmp))
            result = verify_bundle(folder, trusted_key)
            return VerifyResult(str(bundle), result.files, result.signed, result.signer, result.trusted_signer)
    if not bundle.is_dir():
        raise VerifyError(f"{bundle}: no such bundle folder or archive")
    manifest_path = bundle / MANIFEST
    if manifest_path.is_symlink() or not manifest_path.is_file():
        raise VerifyError(f"{manifest_path}: missing (or not a plain file); this is not an edgecds bundle")
    manifest_bytes = manifest_path.read_bytes()
    signer, signed = None, (bundle / SIGNATURE).exists()
    if signed:
        signer = check_signature(bundle, manifest_bytes)
    if trusted_key is not None and signer != trusted_key.strip().lower():
        raise VerifyError(f"{bundle / SIGNATURE}: " + ("the bundle is not signed" if not signed else f"signed by {signer}, not by the trusted key"))
    try:
        manifest = json.loads(manifest_bytes)
        files = manifest["files"]
        if manifest.get("schema_version") != SCHEMA_VERSION or not isinstance(files, dict):
            raise ValueError("schema")
    except (ValueError, KeyError, TypeError):
        raise VerifyError(f"{manifest_path}: not a manifest of schema_version {SCHEMA_VERSION}") from None
    expected = set(files) | {MANIFEST} | ({SIGNATURE} if signed else set())
    present = set()
    for path in sorted(bundle.rglob("*")):
        name = path.relative_to(bundle).as_posix()
        mode = path.lstat().st_mode
        if stat.S_ISLNK(mode):
            raise VerifyError(f"{path}: a symlink; bundles hold plain files only")
        if stat.S_ISDIR(mode):
            continue
        if not stat.S_ISREG(mode):
            raise VerifyError(f"{path}: not a plain file")
        present.add(name)
    for name in sorted(present - expected):
        raise VerifyError(f"{bundle / name}: not listed in the manifest (an extra file)")
    for name in sorted(expected - present):
        raise VerifyError(f"{bundle / name}: listed in the manifest but missing")
    for name, entry in sorted(files.items()):
        path = bundle / name
        if path.stat().st_size != entry.get("size") or sha256_file(path) != entry.get("sha256"):
            raise VerifyError(f"{path}: does not match the manifest (size or sha256 differs)")
    return VerifyResult(str(bundle), len(files), signed, signer, trusted_key is not None)
