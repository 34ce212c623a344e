"""`edgecds bundle` and `edgecds verify`: choose the variant for a device, pack it, check it there.

Choosing reads results.json files (profile measurements and eval scores), keeps only what was
measured on the target device, applies the constraints, and explains every rejection. The
bundle is a folder and a reproducible .tar.gz: the model file, manifest.json (every file's sha256
and size, versions, the device, the measurements, the scores, the constraints and the choice),
runtime.json, MODEL_CARD.md and the model's licence, optionally signed with a local ed25519 key.
`verify` checks a bundle (or an archive, extracted safely) byte for byte against its manifest.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import stat
import tarfile
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgecds import __version__
from edgecds.atomic import atomic_path
from edgecds.devices import DeviceProfile
from edgecds.digest import sha256_file
from edgecds.errors import EdgecdsError, InvalidInputError, UsageError
from edgecds.results import EvalRecord, HostFingerprint, ProfileRecord, load_results

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SIGNATURE = "signature.json"
RUNTIME = "runtime.json"
MODEL_CARD = "MODEL_CARD.md"
MODEL_DIR = "model"
SYSTEM_PROMPT = (
    "You are a clinical decision-support assistant for a qualified clinician. Suggest differential diagnoses and next steps "
    "with their reasoning. You do not diagnose; the clinician decides."
)


class VerifyError(EdgecdsError):
    """A bundle that does not match its manifest, or an archive that must not be extracted."""


@dataclass(frozen=True)
class Constraints:
    min_accuracy: float | None = None  # a fraction; compared with the interval's lower bound unless on_point
    on_point: bool = False
    max_drop: float | None = None  # fraction of accuracy lost against the reference, at most
    max_flip_rate: float | None = None
    min_decode_tps: float | None = None
    n_ctx: int | None = None  # the context the clinic needs; measurements at a shorter one do not count
    formats: tuple[str, ...] = ("gguf", "onnx")
    allow_significantly_worse: bool = False
    allow_predicted: bool = False  # use the predictor where nothing was measured on the device


@dataclass(frozen=True)
class Candidate:
    variant: str  # type
    format: str
    sha256: str
    file_size: int
    results_file: str
    profile: ProfileRecord | None
    evaluation: EvalRecord | None
    host: HostFingerprint | None
    predicted_only: bool
    accuracy: float | None
    accuracy_low: float | None
    decode_tps: float
    peak_bytes: int
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True)
class Choice:
    device: str
    chosen: Candidate | None
    rejected: tuple[Candidate, ...]
    constraints: Constraints
    advice: str = ""  # when nothing fits: what came closest and what to relax

    def explanation(self) -> dict[str, Any]:
        def row(c: Candidate) -> dict[str, Any]:
            return {"variant": c.variant, "accuracy": c.accuracy, "accuracy_low": c.accuracy_low, "decode_tps": round(c.decode_tps, 2),
                    "peak_bytes": c.peak_bytes, "predicted_only": c.predicted_only, "reasons": list(c.reasons)}

        return {"device": self.device, "chosen": row(self.chosen) if self.chosen else None, "rejected": [row(c) for c in self.rejected],
                "constraints": asdict(self.constraints), "advice": self.advice,
                "rule": "the most accurate variant meeting every constraint; ties go to the faster, then the smaller"}


def _candidates(results_files: list[Path], device: DeviceProfile, constraints: Constraints) -> list[Candidate]:
    found: list[Candidate] = []
    for path in results_files:
        results = load_results(path)
        if results is None:
            raise InvalidInputError(f"{path} does not exist; run `edgecds profile` on the device first")
        evaluations: dict[str, EvalRecord] = {}
        for e in results.evaluations:  # the latest evaluation of each file counts
            if e.mode == "loglik" and (e.variant.sha256 not in evaluations or e.created >= evaluations[e.variant.sha256].created):
                evaluations[e.variant.sha256] = e
        measured: dict[str, ProfileRecord] = {}
        predicted: dict[str, ProfileRecord] = {}
        for r in results.records:
            if r.device != device.id:
                continue
            if r.status == "measured" and r.on_target:
                if r.variant.sha256 not in measured or r.created >= measured[r.variant.sha256].created:
                    measured[r.variant.sha256] = r
            elif r.predicted:
                predicted.setdefault(r.variant.sha256, r)
        shas = set(measured) | (set(predicted) | set(evaluations) if constraints.allow_predicted else set())
        for sha in sorted(shas):
            record = measured.get(sha) or predicted.get(sha)
            evaluation = evaluations.get(sha)
            ref = record.variant if record else evaluation.variant if evaluation else None
            if ref is None:
                continue
            metrics = evaluation.metrics if evaluation else {}
            if record and record.measured:
                decode, peak, only_predicted = record.measured.decode_tps.median, int(record.measured.peak_rss_bytes.high), False
            else:
                decode = float(record.predicted.get("decode_tps", 0.0)) if record else 0.0
                peak = int(record.predicted.get("peak_bytes", 0)) if record else 0
                only_predicted = True
            found.append(Candidate(ref.type, ref.format, sha, ref.file_size, str(path), record if record and record.measured else None, evaluation,
                                   results.hosts.get(record.host) if record else None, only_predicted,
                                   metrics.get("accuracy"), metrics.get("low"), decode, peak))
    return found


def _violations(c: Candidate, device: DeviceProfile, k: Constraints) -> list[str]:
    budget = int(device.budget_gib * 1024**3)
    out = []
    if c.format not in k.formats:
        out.append(f"format {c.format} not allowed")
    if c.predicted_only and not k.allow_predicted:
        out.append("not measured on the device")
    if c.peak_bytes and c.peak_bytes > budget:
        out.append(f"too big by {(c.peak_bytes - budget) / 2**20:.0f} MB over the {device.budget_gib:g} GiB budget")
    if c.profile is not None and c.profile.predicted and not c.profile.predicted.get("fits", True):
        out.append("predicted not to fit the budget at the device's context")
    if k.n_ctx and c.profile is not None and c.profile.settings.get("n_ctx", 0) < k.n_ctx:
        out.append(f"measured at context {c.profile.settings.get('n_ctx')}, below the {k.n_ctx} asked for")
    if k.min_decode_tps is not None and c.decode_tps < k.min_decode_tps:
        out.append(f"too slow: {c.decode_tps:.1f} < {k.min_decode_tps:g} tokens/s")
    if c.evaluation is None:
        if k.min_accuracy is not None or k.max_drop is not None or k.max_flip_rate is not None:
            out.append("no accuracy measured (run `edgecds eval`)")
    else:
        figure = c.accuracy if k.on_point else c.accuracy_low
        if k.min_accuracy is not None and (figure or 0.0) < k.min_accuracy:
            which = "accuracy" if k.on_point else "accuracy's lower 95% bound"
            out.append(f"{which} {figure:.1%} below the minimum {k.min_accuracy:.1%}")
        paired = c.evaluation.paired
        if paired:
            if k.max_drop is not None and -paired["difference"] > k.max_drop:
                out.append(f"drops {-paired['difference']:.1%} against {c.evaluation.reference}, more than {k.max_drop:.1%}")
            if k.max_flip_rate is not None and paired["flip_rate"] > k.max_flip_rate:
                out.append(f"flip rate {paired['flip_rate']:.1%} above {k.max_flip_rate:.1%}")
            if paired["verdict"] == "significantly worse" and not k.allow_significantly_worse:
                out.append(f"significantly worse than {c.evaluation.reference} (McNemar p = {paired['p_value']:.3f})")
    return out


def choose(results_files: list[Path], device: DeviceProfile, constraints: Constraints) -> Choice:
    candidates = _candidates(results_files, device, constraints)
    if not candidates:
        raise InvalidInputError(
            f"no variant was measured on {device.id} in {', '.join(map(str, results_files))}; run `edgecds profile --device {device.id}` "
            "on the device (or pass --allow-predicted to choose from predictions, which the bundle will say)"
        )
    judged = [Candidate(**{**c.__dict__, "reasons": tuple(_violations(c, device, constraints))}) for c in candidates]
    fitting = [c for c in judged if not c.reasons]
    fitting.sort(key=lambda c: (-(c.accuracy if c.accuracy is not None else -1.0), -c.decode_tps, c.file_size))
    chosen = fitting[0] if fitting else None
    rejected = tuple(sorted((c for c in judged if c is not chosen), key=lambda c: c.variant))
    for c in fitting[1:]:
        idx = rejected.index(c)
        better = "less accurate" if (c.accuracy or 0) < (chosen.accuracy or 0) else "as accurate but slower or larger"  # type: ignore[union-attr]
        rejected = rejected[:idx] + (Candidate(**{**c.__dict__, "reasons": (f"{better} than {chosen.variant}",)}),) + rejected[idx + 1:]  # type: ignore[union-attr]
    advice = ""
    if chosen is None:
        closest = min(judged, key=lambda c: (len(c.reasons), c.peak_bytes))
        advice = f"nothing meets every constraint; closest: {closest.variant} ({'; '.join(closest.reasons)}): relax that constraint"
    return Choice(device.id, chosen, rejected, constraints, advice)


# --- writing the bundle -------------------------------------------------------------------------


def _model_card(choice: Choice, manifest: dict[str, Any]) -> str:
    c = choice.chosen
    assert c is not None
    e = c.evaluation
    lines = [f"# {manifest['model']['name']} ({c.variant}) for {choice.device}", ""]
    if c.predicted_only:
        lines += ["> **Chosen from predicted figures, not from measurements on the device.** Profile it on the device before clinical use.", ""]
    lines += [
        "## Intended use",
        "",
        "Decision support for a qualified clinician: it suggests differential diagnoses and next steps for the clinician to weigh.",
        "It does not make a diagnosis, must not be used by patients, and every suggestion must be checked against the history,",
        "the examination and the investigations. It runs offline on this device; no patient data leaves it.",
        "",
        "## Validation",
        "",
    ]
    if e is not None:
        m = e.metrics
        lines += [f"- Case set: {e.cases['name']} ({e.cases['n']} cases, sha256 {e.cases['sha256'][:16]}), scored by {e.mode}.",
                  f"- Accuracy: {m['accuracy']:.1%} (95% Wilson interval {m['low']:.1%} to {m['high']:.1%});"
                  f" wrong answers: {m['errors'].get('plausible', 0)} plausible differentials, {m['errors'].get('off_topic', 0)} off-topic."]
        if e.paired:
            p = e.paired
            lines.append(f"- Against {e.reference} (unquantized): {p['verdict']}; difference {p['difference']:+.1%} "
                         f"(95% interval {p['low']:+.1%} to {p['high']:+.1%}), {p['lost']} cases lost and {p['gained']} gained, McNemar p = {p['p_value']:.3f}.")
        if e.drift:
            lines.append(f"- Drift from the reference on a clinical text: KL divergence {e.drift['kl_mean']:.4f}, top-1 agreement {e.drift['top1_agreement']:.1%}.")
        lines.append("- By specialty: " + ", ".join(f"{k} {v['accuracy']:.0%} (n={v['n']})" for k, v in m["by_specialty"].items()) + ".")
    else:
        lines.append("- No clinical accuracy was measured for this variant.")
    if c.profile and c.profile.measured:
        pm = c.profile.measured
        lines += ["", "## On this device", "",
                  f"- Peak memory {pm.peak_rss_bytes.high / 2**20:.0f} MiB of a {manifest['device']['budget_gib']:g} GiB budget; "
                  f"decode {pm.decode_tps.median:.1f} tokens/s, prompt {pm.prompt_tps.median:.0f} tokens/s, measured on {c.host.detected_profile if c.host else 'unknown'}."]
    lines += ["", "## Known limits and failure modes", "",
              "- Accuracy on a small case set has a wide interval; a variant 'not significantly different' from the reference is not shown to be equivalent.",
              "- The model can be confidently wrong, can invent findings, and was not trained on your population or guidelines.",
              "- Quantization changes answers on some cases even when the overall accuracy is similar (see the flips above).",
              "- Small models score near chance on hard cases; do not deploy one whose lower bound is below what your clinicians accept.",
              "", "## Choice", "", f"Rule: {choice.explanation()['rule']}.", ""]
    for r in choice.rejected:
        lines.append(f"- {r.variant} not chosen: {'; '.join(r.reasons)}")
    lines += ["", f"Licence: {manifest['model'].get('licence') or 'see the licence files in this bundle'}.", ""]
    return "\n".join(lines)


def _licence_files(source_path: str) -> list[Path]:
    folder = Path(source_path).parent if Path(source_path).is_file() else Path(source_path)
    return sorted(p for p in folder.glob("*") if p.is_file() and p.name.upper().startswith(("LICENSE", "LICENCE", "NOTICE", "COPYING")))


@dataclass(frozen=True)
class BundleResult:
    folder: str
    archive: str
    archive_sha256: str
    choice: dict[str, Any]
    signed: bool
    warnings: tuple[str, ...] = field(default_factory=tuple)


def write_bundle(choice: Choice, device: DeviceProfile, output: Path, sign_key: Path | None = None) -> BundleResult:
    from edgecds.variants import load_variants, variant_file

    c = choice.chosen
    if c is None:
        raise UsageError(choice.advice or "no variant to bundle")
    results_path = Path(c.results_file)
    variants = load_variants(results_path.parent)
    if variants is None:
        raise InvalidInputError(f"{results_path.parent} holds no variants.json beside {results_path.name}: bundle from the variants folder")
    record = next((v for v in variants.variants if v.sha256 == c.sha256), None)
    if record is None:
        raise InvalidInputError(f"{results_path.parent}/variants.json no longer lists the measured {c.variant} (sha256 {c.sha256[:12]})")
    model_path = variant_file(results_path.parent, record)
    if sha256_file(model_path) != record.sha256:
        raise InvalidInputError(f"{model_path} changed since it was measured; quantize and profile again")
    warnings: list[str] = []
    licences = _licence_files(variants.source.path)
    if not licences:
        warnings.append(f"no licence file found beside the source model {variants.source.path}; add the model's licence before shipping")
    settings = dict(c.profile.settings) if c.profile else {}
    runtime = {
        "format": record.format, "model": f"{MODEL_DIR}/{model_path.name}",
        "n_ctx": (choice.constraints.n_ctx or settings.get("n_ctx") or device.default_ctx), "threads": settings.get("threads") or device.cpu_cores,
        "n_gpu_layers": settings.get("n_gpu_layers", 0), "type_k": settings.get("type_k", "f16"), "type_v": settings.get("type_v", "f16"),
        "flash_attn": settings.get("flash_attn", False), "n_batch": settings.get("n_batch", 512),
        "sampling": {"temperature": 0.0, "top_p": 1.0, "max_tokens": 512, "seed": 0},
        "chat_template": "the model's own, from the GGUF's tokenizer.chat_template, applied by llama-cpp-python's Jinja2 formatter",
        "system_prompt": SYSTEM_PROMPT,
    }
    manifest: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "bundle": f"{variants.source.name}-{record.type}-{device.id}",
        "created_by": f"edgecds {__version__}",
        "predicted_only": c.predicted_only,
        "model": {"name": variants.source.name, "architecture": variants.source.architecture, "source_sha256": variants.source.sha256,
                  "type": record.type, "format": record.format, "bits_per_weight": record.bits_per_weight,
                  "licence": _licence_id(variants.source.path)},
        "tools": record.tools,
        "minimum_runtime": {"llama_cpp_python": record.tools.get("llama_cpp_python", ""), "edgecds": __version__},
        "device": device.to_dict(),
        "measurements": ({"record": asdict(c.profile), "host": asdict(c.host) if c.host else None} if c.profile else None),
        "accuracy": ({k: getattr(c.evaluation, k) for k in ("cases", "mode", "metrics", "reference", "paired", "drift")} if c.evaluation else None),
        "constraints": asdict(choice.constraints),
        "choice": choice.explanation(),
        "files": {},
    }
    manifest["device"].pop("path", None)  # where the profile lay on the build machine says nothing to the clinic
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(output, directory=True) as folder:
        (folder / MODEL_DIR).mkdir()
        shutil.copyfile(model_path, folder / MODEL_DIR / model_path.name)
        for lic in licences:
            shutil.copyfile(lic, folder / lic.name)
        (folder / RUNTIME).write_text(json.dumps(runtime, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        (folder / MODEL_CARD).write_text(_model_card(choice, manifest), encoding="utf-8")
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            manifest["files"][path.relative_to(folder).as_posix()] = {"sha256": sha256_file(path), "size": path.stat().st_size}
        manifest_bytes = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8")
        (folder / MANIFEST).write_bytes(manifest_bytes)
        if sign_key is not None:
            (folder / SIGNATURE).write_text(json.dumps(_sign(manifest_bytes, sign_key), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    archive = output.with_name(output.name + ".tar.gz")
    with atomic_path(archive) as tmp:
        write_reproducible_tar(output, tmp)
    return BundleResult(str(output), str(archive), sha256_file(archive), choice.explanation(), sign_key is not None, tuple(warnings))


def _licence_id(source_path: str) -> str | None:
    from edgecds.models import MODELS

    parts = Path(source_path).parts
    for model in MODELS:  # a registry model: its file, or the Hugging Face folder built from it in its store folder
        if Path(source_path).name == model.filename or model.id in parts:
            return model.licence
    return None


def write_reproducible_tar(folder: Path, target: Path) -> None:
    """Same folder contents, same bytes: sorted entries, time 0, owner 0, fixed modes, gzip time 0."""
    buffer_name = folder.name
    with open(target, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        entries = sorted(folder.rglob("*"), key=lambda p: p.relative_to(folder).as_posix())
        for path in [folder, *entries]:
            name = buffer_name if path == folder else f"{buffer_name}/{path.relative_to(folder).as_posix()}"
            info = tarfile.TarInfo(name)
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            if path.is_symlink():
                raise VerifyError(f"{path}: a symlink has no place in a bundle")
            if path.is_dir():
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = path.stat().st_size, 0o644
                with open(path, "rb") as fh:
                    tar.addfile(info, fh)


# --- signing ------------------------------------------------------------------------------------


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


def _sign(manifest_bytes: bytes, key_path: Path) -> dict[str, str]:
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


# --- verifying ----------------------------------------------------------------------------------


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
        signer = _check_signature(bundle, manifest_bytes)
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


def _check_signature(bundle: Path, manifest_bytes: bytes) -> str:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    path = bundle / SIGNATURE
    try:
        sig = json.loads(path.read_text(encoding="utf-8"))
        public = Ed25519PublicKey.from_public_bytes(bytes.fromhex(sig["public_key"]))
        signature = bytes.fromhex(sig["signature"])
    except (ValueError, KeyError, TypeError):
        raise VerifyError(f"{path}: not an edgecds signature") from None
    try:
        public.verify(signature, manifest_bytes)
    except InvalidSignature:
        # Either file may be the damaged one; name both so the clinic knows what to re-fetch.
        raise VerifyError(f"{bundle / MANIFEST}: does not match {SIGNATURE} (the manifest changed after signing, or the signature is damaged)") from None
    return str(sig["public_key"]).lower()


def run_prompt(bundle: Path, prompt: str, max_tokens: int | None = None, verify: bool = True) -> str:
    """Answer one prompt with the bundle's model and runtime config, offline."""
    import numpy as np

    from edgecds.runtime import EngineSettings, open_runtime

    if verify:
        verify_bundle(bundle)
    config = json.loads((bundle / RUNTIME).read_text(encoding="utf-8"))
    settings = EngineSettings(n_ctx=int(config["n_ctx"]), n_batch=int(config.get("n_batch", 512)), n_ubatch=int(config.get("n_batch", 512)),
                              threads=config.get("threads"), n_gpu_layers=int(config.get("n_gpu_layers", 0)),
                              type_k=config.get("type_k", "f16"), type_v=config.get("type_v", "f16"), flash_attn=bool(config.get("flash_attn")))
    runtime = open_runtime(bundle / config["model"], settings)
    try:
        text = runtime.chat_prompt(prompt, system=config.get("system_prompt") or None)
        runtime.eval(runtime.tokenize(text))
        out: list[int] = []
        for _ in range(max_tokens or int(config["sampling"]["max_tokens"])):
            token = int(np.argmax(runtime.logits()))  # temperature 0: greedy, as the config says
            if runtime.is_end(token):
                break
            out.append(token)
            runtime.eval([token])
        return runtime.detokenize(out).strip()
    finally:
        runtime.close()

