"""Signing bundles: a key pair made locally, the signature, and its check.

Two formats, chosen by the key:
- an ed25519 key (`keygen`, the default) signs the manifest in edgecds's own format
  (`signature.json`): only edgecds verifies it;
- an elliptic-curve key (`keygen --type ec`, P-256) writes an OpenSSF model signature (`model.sig`,
  the `model-signing` package's key-based format: a DSSE envelope over an in-toto statement that
  lists every file with its sha256), which any model_signing verifier checks, offline.
  `check_oms` is edgecds's own reader of it, so the device verifies it (an archive too, as it
  streams) with `cryptography` alone, without model-signing and Sigstore's dependencies.

Nothing here reaches a network: keys are files, and `verify --key` compares the signer with the
public key the clinic was given.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from edgecds.bundle.layout import MANIFEST, OMS_SIGNATURE, SIGNATURE, VerifyError
from edgecds.errors import InvalidInputError, UsageError

KEY_TYPES = ("ed25519", "ec")
IN_TOTO_PAYLOAD = "application/vnd.in-toto+json"
OMS_PREDICATE = "https://model_signing/signature/v1.0"  # model-signing 1.x's predicate type
PEM_PUBLIC = "-----BEGIN PUBLIC KEY-----"
EC_CURVES = ("secp256r1", "secp384r1", "secp521r1")  # the NIST curves model-signing signs with


def generate_key(private: Path, kind: str = "ed25519") -> Path:
    """A new key pair: the private key (PEM, mode 0600) and its public key beside it (.pub): for
    ed25519, 64 hex characters; for "ec" (P-256, what OpenSSF model signing takes), a PEM public key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if kind not in KEY_TYPES:
        raise UsageError(f"key type {kind!r}: use one of {', '.join(KEY_TYPES)}")
    if private.exists():
        raise UsageError(f"{private} exists; choose another path, a key is never overwritten")
    key = Ed25519PrivateKey.generate() if kind == "ed25519" else ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    private.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    public = private.with_name(private.name + ".pub")
    if isinstance(key, Ed25519PrivateKey):
        public.write_text(key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex() + "\n")
    else:
        public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return public


def key_type(key_path: Path) -> str:
    """"ed25519" or "ec": which signature a private key makes; anything else is an error saying what to do."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise InvalidInputError(f"{key_path}: not an unencrypted PEM private key ({exc}); make one with `edgecds keygen`") from None
    if isinstance(key, Ed25519PrivateKey):
        return "ed25519"
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name in EC_CURVES:
        return "ec"
    raise InvalidInputError(f"{key_path}: neither an ed25519 nor a P-256/384/521 key; make one with `edgecds keygen` (--type ec for "
                            "an OpenSSF model signature)")


def sign_oms(folder: Path, key_path: Path) -> None:
    """`folder/model.sig`: an OpenSSF model signature over every file of `folder`, made by the
    model-signing package itself (its key-based signer: nothing leaves the machine)."""
    try:
        from model_signing import hashing, signing
    except ImportError:
        raise UsageError("an elliptic-curve key makes an OpenSSF model signature, which needs the model-signing package "
                         "(pip install 'edgecds[build]'); an ed25519 key (`edgecds keygen`) signs without it") from None
    config = hashing.Config().set_ignored_paths(paths=[OMS_SIGNATURE], ignore_git_paths=False)
    try:
        signing.Config().use_elliptic_key_signer(private_key=key_path).set_hashing_config(config).sign(folder, folder / OMS_SIGNATURE)
    except ValueError as exc:
        raise InvalidInputError(f"{key_path}: model-signing refused the key ({exc})") from None


def check_oms(where: Path, raw: bytes, trusted_pem: str | None) -> tuple[str, dict[str, str]]:
    """An OpenSSF model signature (`model.sig`, read bounded by the caller): (its signer, the sha256
    it gives each file). With `trusted_pem` (the clinic's EC public key) the DSSE signature is
    checked with it; without, the signer is the key's hint, unchecked. The caller compares the
    digests with the files. Any damage is a VerifyError naming model.sig."""
    import base64
    import hashlib

    path = where / OMS_SIGNATURE

    def bad(why: str) -> VerifyError:
        return VerifyError(f"{path}: {why}")

    try:
        bundle = json.loads(raw.decode("utf-8"))
        envelope = bundle["dsseEnvelope"]
        payload = base64.b64decode(envelope["payload"], validate=True)
        payload_type = envelope["payloadType"]
        (entry,) = envelope["signatures"]
        signature = base64.b64decode(entry["sig"], validate=True)
        hint = str(bundle.get("verificationMaterial", {}).get("publicKey", {}).get("hint", ""))
        statement = json.loads(payload.decode("utf-8"))
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError, RecursionError):
        raise bad("not an OpenSSF model signature (a Sigstore bundle with one DSSE signature)") from None
    if payload_type != IN_TOTO_PAYLOAD:
        raise bad(f"payload type {str(payload_type)[:60]!r}, not an in-toto statement")
    signer = f"EC key sha256:{hint[:16]}"
    if trusted_pem is not None:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        key = serialization.load_pem_public_key(trusted_pem.encode())
        assert isinstance(key, ec.EllipticCurvePublicKey)  # trusted_public_key admits no other
        digest = {256: hashes.SHA256(), 384: hashes.SHA384(), 521: hashes.SHA512()}[key.curve.key_size]
        pae = b"DSSEv1 %d %b %d %b" % (len(IN_TOTO_PAYLOAD), IN_TOTO_PAYLOAD.encode(), len(payload), payload)
        try:
            key.verify(signature, pae, ec.ECDSA(digest))
        except InvalidSignature:
            raise bad("not signed by the trusted key (or damaged)") from None
        signer = f"EC key sha256:{hashlib.sha256(key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)).hexdigest()[:16]}"
    try:
        if statement["predicateType"] != OMS_PREDICATE:
            raise bad(f"predicate {str(statement['predicateType'])[:80]!r}; edgecds reads {OMS_PREDICATE}")
        serialization_args = statement["predicate"]["serialization"]
        if serialization_args.get("method") != "files" or serialization_args.get("hash_type") != "sha256":
            raise bad("not a per-file sha256 signature (model-signing's 'files' method with sha256), which is what edgecds writes")
        resources = {str(r["name"]): str(r["digest"]) for r in statement["predicate"]["resources"] if r["algorithm"] == "sha256"}
        if len(resources) != len(statement["predicate"]["resources"]):
            raise bad("a file is listed twice or with another hash")
        (subject,) = statement["subject"]
        root = hashlib.sha256(b"".join(bytes.fromhex(r["digest"]) for r in statement["predicate"]["resources"])).hexdigest()
        if subject["digest"]["sha256"] != root:
            raise bad("its subject's digest is not that of the files it lists (damaged)")
    except (KeyError, TypeError, AttributeError, ValueError):
        raise bad("its statement is not a model-signing v1.0 statement") from None
    return signer, resources


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
    """The public key that `value` names: the key itself, or the path of a file holding it
    (keygen's KEY.pem.pub, or a PEM public key). An ed25519 key comes back as 64 hex characters
    (lower case), an EC key (OpenSSF model signing) as its PEM text. Anything else is a UsageError
    that says what was expected: a wrong argument must never read as a wrong signer."""
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
    raise UsageError(f"{where} {path}: holds no public key (64 hex characters, or a PEM public key, as `edgecds keygen` writes to KEY.pem.pub)")


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
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = serialization.load_pem_public_key(raw)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"{where} {path}: not a readable PEM public key ({exc})") from None
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in EC_CURVES:
        return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    if not isinstance(key, Ed25519PublicKey):
        raise UsageError(f"{where} {path}: neither an ed25519 nor a P-256/384/521 key, the keys bundles are signed with (`edgecds keygen`)")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()
