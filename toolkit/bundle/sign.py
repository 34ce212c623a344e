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
