"""Signing bundles: an ed25519 key pair made locally, the manifest's signature, and its check.

Nothing here reaches a network: keys are files, and `verify --key` compares the signer with the
public key the clinic was given.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from edgecds.bundle.layout import MANIFEST, SIGNATURE, VerifyError
from edgecds.errors import InvalidInputError, UsageError


def generate_key(private: Path) -> Path:
    """A new ed25519 key pair: the private key (PEM, mode 0600) and its public key beside it (.pub)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if private.exists():
        raise UsageError(f"{private} exists; choose another path, a key is never overwritten")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    private.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    public = private.with_name(private.name + ".pub")
    public.write_text(key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex() + "\n")
    return public


def sign_manifest(manifest_bytes: bytes, key_path: Path) -> dict[str, str]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise InvalidInputError(f"{key_path}: not an unencrypted PEM private key ({exc}); make one with `edgecds keygen`") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise InvalidInputError(f"{key_path}: not an ed25519 key; make one with `edgecds keygen`")
    public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()
    return {"algorithm": "ed25519", "signed_file": MANIFEST, "public_key": public, "signature": key.sign(manifest_bytes).hex()}


def check_signature(bundle: Path, manifest_bytes: bytes, signature_bytes: bytes) -> str:
    """The signer's public key (hex) when `signature_bytes` (the bundle's signature.json, read by
    the caller with its checks) sign `manifest_bytes`; a VerifyError naming the file otherwise."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    path = bundle / SIGNATURE
    try:
        sig = json.loads(signature_bytes.decode("utf-8"))
        public = Ed25519PublicKey.from_public_bytes(bytes.fromhex(sig["public_key"]))
        signature = bytes.fromhex(sig["signature"])
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError, RecursionError):
        raise VerifyError(f"{path}: not an edgecds signature") from None
    try:
        public.verify(signature, manifest_bytes)
    except InvalidSignature:
        # Either file may be the damaged one; name both so the clinic knows what to re-fetch.
        raise VerifyError(f"{bundle / MANIFEST}: does not match {SIGNATURE} (the manifest changed after signing, or the signature is damaged)") from None
    return str(sig["public_key"]).lower()


MAX_KEY_FILE_BYTES = 4096  # a .pub file holds 65 bytes, a PEM public key about 113


def trusted_public_key(value: str, where: str = "--key") -> str:
    """The ed25519 public key (64 hex characters, lower case) that `value` names: the key itself,
    or the path of a file holding it (keygen's KEY.pem.pub, or a PEM public key). Anything else is
    a UsageError that says what was expected: a wrong argument must never read as a wrong signer."""
    text = value.strip()
    if _is_hex_key(text):
        return text.lower()
    path = Path(value).expanduser()
    if not path.exists():
        shown = text if len(text) <= 80 else text[:77] + "..."
        raise UsageError(f"{where} {shown!r}: neither a public key (64 hex characters, as in KEY.pem.pub) nor a file holding one")
    raw = _small_file(path, where)
    content = raw.decode("utf-8", "replace").strip()
    if _is_hex_key(content):
        return content.lower()
    if "PRIVATE KEY" in content:
        raise UsageError(f"{where} {path}: this is a private key; give the device its public key ({path.name}.pub), never the private one")
    if "BEGIN PUBLIC KEY" in content:
        return _pem_public_key(path, raw, where)
    raise UsageError(f"{where} {path}: holds no ed25519 public key (64 hex characters, as `edgecds keygen` writes to KEY.pem.pub)")


def _small_file(path: Path, where: str) -> bytes:
    """A key file's bytes: opened first (a link is followed, as a user expects), then checked to be
    a regular file no larger than a key file can be, so a FIFO or a device never blocks the read."""
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise UsageError(f"{where} {path}: cannot be read ({exc.strerror})") from None
    info = os.fstat(fd)  # before fdopen, which refuses a folder with an error of its own
    if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_KEY_FILE_BYTES:
        os.close(fd)
        raise UsageError(f"{where} {path}: " + ("not a plain file" if not stat.S_ISREG(info.st_mode) else f"{info.st_size} bytes, too large")
                         + "; give the public key or the file keygen wrote it to (KEY.pem.pub)")
    with os.fdopen(fd, "rb") as fh:
        return fh.read(MAX_KEY_FILE_BYTES)


def _is_hex_key(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdefABCDEF" for c in text)


def _pem_public_key(path: Path, raw: bytes, where: str) -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = serialization.load_pem_public_key(raw)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"{where} {path}: not a readable PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise UsageError(f"{where} {path}: not an ed25519 key; bundles are signed with ed25519 (`edgecds keygen`)")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()
