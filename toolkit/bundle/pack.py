"""Writing a bundle: the chosen variant's file, manifest.json, runtime.json, MODEL_CARD.md and the
model's licence in a folder, and a reproducible, uncompressed .tar of it.

The manifest records every file's sha256 and size, the versions, the device, the measurements,
the scores, the constraints and the choice; `sign` signs it when a key is given.
"""

from __future__ import annotations

import json
import shutil
import tarfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from edgecds import __version__
from edgecds.atomic import atomic_path, folder_lock, remove_stale_temporaries, require_free
from edgecds.bundle.choose import Choice
from edgecds.bundle.layout import (
    ARCHIVE_SUFFIX,
    ENGINE_CONFIG,
    MANIFEST,
    ML_BOM,
    MODEL_CARD,
    MODEL_DIR,
    SCHEMA_VERSION,
    SIGNATURE,
    BundleEngineConfig,
    VerifyError,
)
from edgecds.bundle.mlbom import ml_bom
from edgecds.bundle.sign import key_type, sign_manifest, sign_oms
from edgecds.caveats import chance_caveat, record_caveats
from edgecds.devices import DeviceProfile
from edgecds.digest import HashingWriter, Progress, copy_hashed, folder_digest_of, sha256_file
from edgecds.engine.speculative import DEFAULT_DRAFT_MAX, DEFAULT_P_MIN, NGRAM
from edgecds.errors import InvalidInputError, UsageError
from edgecds.formats.gguf_file import read_gguf
from edgecds.progress import Reporter, lazy_step, offset
from edgecds.results import DraftMeasured, EvalRecord

COPY_CHUNK = 8 << 20  # tarfile copies 16 KiB at a time by default: slow for gigabytes


def _validation_lines(e: EvalRecord) -> list[str]:
    """The card's validation: accuracy with its interval, against the reference, drift, caveats."""
    m = e.metrics
    lines = [f"- Case set: {e.cases['name']} ({e.cases['n']} cases, sha256 {e.cases['sha256'][:16]}), scored by {e.mode}.",
              f"- Accuracy: {m['accuracy']:.1%} (95% Wilson interval {m['low']:.1%} to {m['high']:.1%});"
              f" wrong answers: {m['errors'].get('plausible', 0)} plausible differentials, {m['errors'].get('off_topic', 0)} off-topic."]
    if e.paired:
        p = e.paired
        lines.append(f"- Against {e.reference} ({'the float reference' if e.reference_origin else 'unquantized'}): {p['verdict']}; "
                     f"difference {p['difference']:+.1%} "
                     f"(95% interval {p['low']:+.1%} to {p['high']:+.1%}), {p['lost']} cases lost and {p['gained']} gained, McNemar p = {p['p_value']:.3f}.")
    if e.drift:
        tail = f" (99.9th percentile {e.drift['kl_p999']:.3f})" if "kl_p999" in e.drift else ""
        lines.append(f"- Drift from the reference on a clinical text: KL divergence {e.drift['kl_mean']:.4f}{tail}, "
                     f"top-1 agreement {e.drift['top1_agreement']:.1%}.")
    lines += [f"- {line}" for line in record_caveats(e)]
    lines.append("- By specialty: " + ", ".join(f"{k} {v['accuracy']:.0%} (n={v['n']})" for k, v in m["by_specialty"].items()) + ".")
    return lines


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
    lines += _validation_lines(e) if e is not None else ["- No clinical accuracy was measured for this variant."]
    if c.measurement and c.measurement.measured:
        pm = c.measurement.measured
        full = (f"{pm.full_context_peak_bytes / 2**20:.0f} MiB with its {pm.full_context_tokens + 1}-token context filled, "
                f"{pm.peak_rss_bytes.high / 2**20:.0f} MiB" if pm.full_context_peak_bytes is not None
                else f"{pm.peak_rss_bytes.high / 2**20:.0f} MiB (measured at the benchmark's tokens only, not with the context filled)")
        lines += ["", "## On this device", "",
                  f"- Peak memory {full} at the benchmark's {c.measurement.settings.get('prompt_tokens')} tokens; "
                  f"budget {manifest['device']['budget_gib']:g} GiB.",
                  f"- Decode {pm.decode_tps.median:.1f} tokens/s, prompt {pm.prompt_tps.median:.0f} tokens/s, measured on "
                  f"{c.host.detected_profile if c.host else 'unknown'}."]
        if pm.disturbance.get("disturbed"):
            lines.append(f"- **Speeds measured while other processes used the CPU** (up to {max(pm.disturbance['others_cpu_cores']):.2f} "
                         "cores): not trustworthy; profile again on a quiet device.")
    elif c.predicted_only and c.peak_bytes:
        lines += ["", "## On this device (PREDICTED, not measured)", "",
                  f"- Predicted peak memory {c.peak_bytes / 2**20:.0f} MiB at the device's full context; budget "
                  f"{manifest['device']['budget_gib']:g} GiB.",
                  f"- Predicted decode {c.decode_tps:.1f} tokens/s: edgecds's predictor, from the file's header and the device profile."]
    fit = manifest["model"].get("fit")
    if fit:
        target = ", ".join(f"{k} {v}" for k, v in fit["target"].items())
        lines += ["", "## Quantization", "",
                  f"- Per-tensor types fitted to a budget ({target}) by measured drift: "
                  + ", ".join(f"{group.removesuffix('.weight')} {kind}" for group, kind in fit["groups"].items()) + ".",
                  f"- Mean KL from the float model on the drift text: {fit['measured']['kl_mean']:.4f} measured "
                  f"({fit['predicted_kl']:.4f} predicted from the probes), 99.9th percentile {fit['measured']['kl_p999']:.3f}."]
    lines += _draft_lines(manifest)
    template = manifest["model"].get("chat_template_sha256")
    lines += ["", "## Chat template", "",
              f"- The model's own, sha256 {template}: checked when this bundle was made (no Python internals, no loaded templates, and "
              "the turns the device renders, each within the sandbox's time and size bounds)." if template else
              "- The model has no chat template: turns are written as plain text."]
    lines += ["", "## Known limits and failure modes", "",
              "- Accuracy on a small case set has a wide interval; a variant 'not significantly different' from the reference is not shown to be equivalent.",
              "- The model can be confidently wrong, can invent findings, and was not trained on your population or guidelines.",
              "- Quantization changes answers on some cases even when the overall accuracy is similar (see the flips above).",
              "- Small models score near chance on hard cases; do not deploy one whose lower bound is below what your clinicians accept.",
              "", "## Choice", "", f"Rule: {choice.explanation()['rule']}.", "", f"{c.variant} was chosen: {choice.why}.", ""]
    for r in choice.rejected:
        lines.append(f"- {r.variant} not chosen: {'; '.join(r.reasons)}")
    lines += ["", f"Licence: {manifest['model'].get('licence') or 'see the licence files in this bundle'}.", ""]
    return "\n".join(lines)


def _licence_files(source_path: str) -> list[Path]:
    folder = Path(source_path).parent if Path(source_path).is_file() else Path(source_path)
    # the registry keeps terms under their own names (LICENSE, NOTICE.md, GEMMA_TERMS.html)
    marks = ("LICENSE", "LICENCE", "NOTICE", "COPYING", "TERMS")
    return sorted(p for p in folder.glob("*") if p.is_file() and any(m in p.name.upper() for m in marks))


@dataclass(frozen=True)
class BundleResult:
    folder: str
    archive: str
    archive_sha256: str
    choice: dict[str, Any]
    signed: bool
    warnings: tuple[str, ...] = field(default_factory=tuple)


def _draft_lines(manifest: dict[str, Any]) -> list[str]:
    """The card's "Speculative decoding" section: the draft shipped and what it measured, or the one
    asked for and why it was left out."""
    draft, left_out = manifest.get("draft"), manifest.get("draft_not_shipped")
    if draft is not None:
        m = draft["measured"]
        what = "n-gram prompt lookup (no second model)" if draft["type"] == NGRAM else f"the {draft['type']} variant of the same model ({draft['model']})"
        rate = f"{m['acceptance_rate']:.0%}" if m["acceptance_rate"] is not None else "none"
        return ["", "## Speculative decoding", "",
                f"- Drafted by {what}, at most {draft['settings']['max_tokens']} tokens a step: decode {m['decode_tps']:.1f} -> "
                f"{m['decode_tps_with_draft']:.1f} tokens/s ({m['speedup']:.2f}x, faster in every measured run), {rate} of drafted tokens "
                f"kept, peak {m['peak_rss_bytes'] / 2**20:.0f} MiB with both loaded.",
                "- Every answer token is the model's own choice: a drafted token is kept only where the model would have chosen it. "
                "The profiled answer was identical with and without the draft; `edgecds run --draft none` turns it off."]
    if left_out is not None:
        return ["", "## Speculative decoding", "", f"- The {left_out['draft']} draft was asked for and not shipped: {left_out['why']}."]
    return []


def _measured_variant(choice: Choice, variants_dir: Path | None) -> tuple[Any, Any, Path]:
    """(variants.json, the chosen variant's record, its file or folder), found in `variants_dir`
    or beside the results file. Its hash is checked as it is copied into the bundle (`_fill`)."""
    from edgecds.variants import load_variants, variant_file

    c = choice.chosen
    if c is None:
        raise UsageError(choice.advice or "no variant to bundle")
    results_path = Path(c.results_file)
    folder = variants_dir or results_path.parent
    variants = load_variants(folder)
    if variants is None:
        raise InvalidInputError(f"{folder} holds no variants.json (the results in {results_path} came from elsewhere?): "
                                "pass the variants folder with --variants DIR")
    record = next((v for v in variants.variants if v.sha256 == c.sha256), None)
    if record is None:
        raise InvalidInputError(f"{folder / 'variants.json'} does not list the measured {c.variant} (sha256 {c.sha256[:12]}): "
                                "pass the folder it was measured from with --variants DIR, or quantize and profile again")
    path = variant_file(folder, record)
    if not (path.is_dir() if record.format == "onnx" else path.is_file()):
        raise InvalidInputError(f"{path} is missing; run `edgecds quantize` again to rebuild it")
    return variants, record, path


@dataclass(frozen=True)
class ShippedDraft:
    """The speculative draft a bundle ships beside its model (`bundle --draft`)."""

    name: str  # the draft variant's type, or "ngram"
    path: Path | None  # the draft's GGUF on the build machine; None for ngram
    sha256: str | None
    measured: DraftMeasured

    @property
    def bundled_model(self) -> str:
        return NGRAM if self.path is None else f"{MODEL_DIR}/{self.path.name}"

    def runtime_entry(self) -> dict[str, Any]:
        settings = self.measured.settings
        return {"model": self.bundled_model, "max_tokens": int(settings.get("max_tokens", DEFAULT_DRAFT_MAX)),
                "p_min": float(settings.get("p_min", DEFAULT_P_MIN))}

    def manifest_entry(self) -> dict[str, Any]:
        m = self.measured
        return {"type": self.name, "sha256": self.sha256, "model": self.bundled_model, "settings": self.runtime_entry(),
                "measured": {"decode_tps": m.plain_tps.median, "decode_tps_with_draft": m.draft_tps.median, "speedup": round(m.speedup, 3),
                             "acceptance_rate": m.acceptance_rate, "identical_answers": m.identical, "peak_rss_bytes": m.peak_rss_bytes}}


def draft_for(choice: Choice, device: DeviceProfile, variants: Any, folder: Path, name: str) -> tuple[ShippedDraft | None, str]:
    """The draft `bundle --draft NAME` ships with the chosen variant, or None and why not. It ships
    when the chosen variant was profiled with it on the device and, there: it was faster in every
    run than the fastest without it, both together peaked within the budget, and its answers were
    the variant's own (the accuracy was measured without a draft)."""
    from edgecds.variants import variant_file

    c = choice.chosen
    assert c is not None
    spec = c.measurement.measured.speculative if c.measurement and c.measurement.measured else None
    if spec is None or spec.draft.upper() != name.upper():
        raise UsageError(f"{c.variant} was not profiled with the {name} draft on {device.id}: run `edgecds profile ... --types {c.variant} "
                         f"--draft {name}` there first, then bundle again")
    budget = int(device.budget_gib * 2**30)
    figures = f"{spec.plain_tps.median:.1f} -> {spec.draft_tps.median:.1f} tokens/s, peak {spec.peak_rss_bytes / 2**20:.0f} MiB"
    if not spec.pays:
        return None, f"the {spec.draft} draft is not faster than {c.variant} alone by more than the runs' spread ({figures})"
    if spec.peak_rss_bytes > budget:
        return None, f"{c.variant} with the {spec.draft} draft peaks over the {device.budget_gib:g} GiB budget ({figures})"
    if not spec.identical:
        return None, (f"with the {spec.draft} draft, {c.variant}'s answer differed from its own (llama.cpp's batched verification "
                      "rounds differently), and its accuracy was measured without a draft")
    if spec.draft == NGRAM:
        return ShippedDraft(NGRAM, None, None, spec), ""
    record = next((v for v in variants.variants if v.sha256 == spec.draft_sha256), None)
    if record is None:
        raise InvalidInputError(f"{folder / 'variants.json'} does not list the {spec.draft} draft that was profiled (sha256 "
                                f"{(spec.draft_sha256 or '')[:12]}); pass the folder it was profiled from with --variants DIR")
    return ShippedDraft(record.type, variant_file(folder, record), record.sha256, spec), ""


def _engine_config(choice: Choice, device: DeviceProfile, record: Any, model_path: Path) -> BundleEngineConfig:
    """The settings the variant was measured with on the device (the clinic's context if it asked
    for one), so the device runs it as it was measured."""
    c = choice.chosen
    assert c is not None
    settings = dict(c.measurement.settings) if c.measurement else {}
    return BundleEngineConfig(
        format=record.format, model=f"{MODEL_DIR}/{model_path.name}",
        n_ctx=choice.constraints.n_ctx or settings.get("n_ctx") or device.default_ctx, threads=settings.get("threads") or device.cpu_cores,
        n_gpu_layers=settings.get("n_gpu_layers", 0), type_k=settings.get("type_k", "f16"), type_v=settings.get("type_v", "f16"),
        flash_attn=settings.get("flash_attn", False), n_batch=settings.get("n_batch", 512), n_ubatch=settings.get("n_ubatch"),
    )


def _manifest(choice: Choice, device: DeviceProfile, variants: Any, record: Any) -> dict[str, Any]:
    c = choice.chosen
    assert c is not None
    manifest: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "bundle": f"{variants.source.name}-{record.type}-{device.id}",
        "created_by": f"edgecds {__version__}",
        "predicted_only": c.predicted_only,
        "model": {"name": variants.source.name, "architecture": variants.source.architecture, "source_sha256": variants.source.sha256,
                  "type": record.type, "format": record.format, "bits_per_weight": record.bits_per_weight,
                  "licence": _licence_id(variants.source.path),
                  # a fitted GGUF (quantize --fit): the type each tensor group got, and what it was fitted to
                  **({"fit": {k: record.options["fit"][k] for k in ("target", "groups", "predicted_kl", "measured")}}
                     if "fit" in record.options else {})},
        "tools": record.tools,
        "minimum_runtime": {"llama_cpp_python": record.tools.get("llama_cpp_python", ""), "edgecds": __version__},
        "device": device.to_dict(),
        "measurements": ({"record": asdict(c.measurement), "host": asdict(c.host) if c.host else None} if c.measurement else None),
        "accuracy": ({k: getattr(c.evaluation, k) for k in ("cases", "mode", "metrics", "reference", "paired", "drift")} if c.evaluation else None),
        "constraints": asdict(choice.constraints),
        "choice": choice.explanation(),
        "files": {},
    }
    manifest["device"].pop("path", None)  # where the profile lay on the build machine says nothing to the clinic
    return manifest


def _template_of(model_path: Path) -> tuple[str | None, str, str, list[str]]:
    """The variant's own chat template as its engine reads it, its BOS and EOS texts, and problems
    in reading it: a GGUF's `tokenizer.chat_template` (the reader refuses a key given twice), or
    an ONNX folder's, whose tokenizer_config.json must not give a key twice either."""
    if model_path.is_dir():
        from edgecds.engine.onnx_runtime import chat_template_of
        from edgecds.jsonfile import duplicate_keys

        config = model_path / "tokenizer_config.json"
        problems = [f"tokenizer_config.json gives {key!r} twice" for key in duplicate_keys(config)] if config.is_file() else []
        template, bos, eos = chat_template_of(model_path)
        return template, bos or "", eos or "", problems
    meta = read_gguf(model_path).metadata
    tokens = meta.get("tokenizer.ggml.tokens") or []

    def text(key: str) -> str:
        index = meta.get(key)
        return tokens[index] if isinstance(index, int) and 0 <= index < len(tokens) else ""

    template = meta.get("tokenizer.chat_template")
    return (template if isinstance(template, str) else None), text("tokenizer.ggml.bos_token_id"), text("tokenizer.ggml.eos_token_id"), []


def audited_template(model_path: Path) -> str | None:
    """The chat template checked as the device will run it, before anything is written: a template
    the run-time sandbox would refuse is refused here, with the reason. Its sha256 (None: the model
    has none, and plain turns are used) goes in the manifest and on the card."""
    from edgecds.engine.chat_template import audit_template

    template, bos, eos, problems = _template_of(model_path)
    if template is None and not problems:
        return None
    audit = audit_template(template, bos, eos) if template is not None else None
    problems += list(audit.problems) if audit else []
    if problems:
        raise InvalidInputError(f"{model_path.name}: its chat template would be refused on the device: " + "; ".join(problems)
                                + ". Nothing was bundled: fix the template (tokenizer.chat_template) or choose another model")
    assert audit is not None
    return audit.sha256


def write_bundle(choice: Choice, device: DeviceProfile, output: Path, sign_key: Path | None = None,
                 variants_dir: Path | None = None, reporter: Reporter | None = None, draft: str | None = None) -> BundleResult:
    """The bundle folder and its archive beside it. Both are built under temporary names and
    published folder first, archive last, after the old archive is removed: an interruption leaves
    the old pair, or the new folder without an archive, never a folder and an archive that differ.
    One run at a time writes into a folder; what a killed run left there is removed first.

    The model is read twice in all: copied into the folder with its hash taken on the way (the
    check that it is still what was measured), then streamed into the archive, hashed as written.
    Nothing is compressed: quantized weights do not compress, and the time would be wasted."""
    variants, record, model_path = _measured_variant(choice, variants_dir)
    if sign_key is not None:
        key_type(sign_key)  # a key that cannot sign fails now, before gigabytes are copied
    template_sha256 = audited_template(model_path)
    warnings: list[str] = []
    licences = _licence_files(variants.source.path)
    if not licences:
        warnings.append(f"no licence file found beside the source model {variants.source.path}; add the model's licence before shipping")
    evaluation = choice.chosen.evaluation if choice.chosen else None
    chance = chance_caveat(evaluation) if evaluation else ""
    warnings += [chance.removeprefix("WARNING: ")] if chance else []
    if choice.constraints.min_accuracy is None:
        warnings.append("no --min-accuracy was set: a variant is chosen however few cases it answers right; set the least your clinicians accept")
    engine = _engine_config(choice, device, record, model_path)
    manifest = _manifest(choice, device, variants, record)
    manifest["model"]["chat_template_sha256"] = template_sha256
    shipped, why_not = draft_for(choice, device, variants, variants_dir or Path(choice.chosen.results_file).parent, draft) \
        if draft is not None and choice.chosen is not None else (None, "")
    if why_not:
        warnings.append(f"no draft shipped: {why_not}")
        manifest["draft_not_shipped"] = {"draft": draft, "why": why_not}
    if shipped is not None:
        engine = replace(engine, draft=shipped.runtime_entry())
        manifest["draft"] = shipped.manifest_entry()
    model_bytes = sum(p.stat().st_size for p in _model_files(model_path)) + sum(p.stat().st_size for p in licences)
    model_bytes += shipped.path.stat().st_size if shipped is not None and shipped.path is not None else 0
    output.parent.mkdir(parents=True, exist_ok=True)
    archive = output.with_name(output.name + ARCHIVE_SUFFIX)
    with folder_lock(output.parent):
        remove_stale_temporaries(output.parent)  # before the disk check: a killed run's files are not in the way
        require_free(output.parent, 2 * model_bytes, f"the bundle (its folder and its archive, {model_bytes / 2**20:.0f} MiB each)",
                     "free space or choose another --output")
        try:
            # the inner (folder) is published on leaving before the outer (archive)
            with atomic_path(archive) as packed, atomic_path(output, directory=True) as folder:
                _fill(folder, model_path, record, licences, engine, choice, manifest, sign_key,
                      lazy_step(reporter, "bundle: copy and hash", model_bytes), shipped)
                archive_sha256 = write_reproducible_tar(folder, packed, output.name, lazy_step(reporter, "bundle: archive", model_bytes))
                for old in (archive, output.with_name(output.name + ".tar.gz")):  # .tar.gz: what earlier versions wrote
                    old.unlink(missing_ok=True)  # from here on, no archive until this folder's is published
        finally:
            if reporter:
                reporter.finish()
    return BundleResult(str(output), str(archive), archive_sha256, choice.explanation(), sign_key is not None, tuple(warnings))


def _model_files(model_path: Path) -> list[Path]:
    """The variant's file, or an ONNX variant's files: those its hash covers (hidden files are not
    part of a variant, so none is shipped unchecked)."""
    if not model_path.is_dir():
        return [model_path]
    return sorted(p for p in model_path.rglob("*") if (p.is_file() or p.is_symlink()) and not p.name.startswith("."))


def _fill(folder: Path, model_path: Path, record: Any, licences: list[Path], engine: BundleEngineConfig, choice: Choice,
          manifest: dict[str, Any], sign_key: Path | None, progress: Progress | None, draft: ShippedDraft | None = None) -> None:
    """Write the bundle's files into `folder`, the manifest (every file's hash) last but the signature.
    The model is copied and hashed in one pass; a model that changed since it was measured is refused."""
    (folder / MODEL_DIR).mkdir()
    target = folder / MODEL_DIR / model_path.name
    sources = _model_files(model_path)
    copied: dict[Path, str] = {}  # bundle path -> sha256 of the bytes written there
    done = 0
    for source in sources:  # an ONNX variant: its folder, every file listed and hashed
        if source.is_symlink():
            raise InvalidInputError(f"{source}: a symlink in a variant's folder; bundles hold plain files only")
        dest = target / source.relative_to(model_path) if model_path.is_dir() else target
        dest.parent.mkdir(parents=True, exist_ok=True)
        copied[dest] = copy_hashed(source, dest, offset(progress, done))
        done += dest.stat().st_size
    digest = folder_digest_of(copied, target) if model_path.is_dir() else copied[target]
    if digest != record.sha256:
        raise InvalidInputError(f"{model_path} changed since `edgecds quantize` recorded it (sha256 differs); run quantize again")
    if draft is not None and draft.path is not None:  # the draft's GGUF, checked as the model is
        dest = folder / draft.bundled_model
        if dest.exists():
            raise UsageError(f"the draft {draft.path.name} has the model's own file name; it cannot be its own draft")
        copied[dest] = copy_hashed(draft.path, dest, offset(progress, done))
        if copied[dest] != draft.sha256:
            raise InvalidInputError(f"{draft.path} changed since it was profiled as the draft (sha256 differs); profile it again")
    for lic in licences:
        shutil.copyfile(lic, folder / lic.name)
    (folder / ENGINE_CONFIG).write_text(engine.to_json(), encoding="utf-8")
    (folder / MODEL_CARD).write_text(_model_card(choice, manifest), encoding="utf-8")
    (folder / ML_BOM).write_text(json.dumps(ml_bom(manifest, record.sha256, record.options), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        manifest["files"][path.relative_to(folder).as_posix()] = {"sha256": copied.get(path) or sha256_file(path), "size": path.stat().st_size}
    manifest_bytes = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8")
    (folder / MANIFEST).write_bytes(manifest_bytes)
    if sign_key is not None and key_type(sign_key) == "ec":
        sign_oms(folder, sign_key)  # last: it covers every file, the manifest included
    elif sign_key is not None:
        (folder / SIGNATURE).write_text(json.dumps(sign_manifest(manifest_bytes, sign_key), indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _licence_id(source_path: str) -> str | None:
    from edgecds.models import MODELS

    parts = Path(source_path).parts
    for model in MODELS:  # a registry model: its file, or the Hugging Face folder built from it in its store folder
        if Path(source_path).name == model.filename or model.id in parts:
            return model.licence
    return None


def write_reproducible_tar(folder: Path, target: Path, name: str | None = None, progress: Progress | None = None) -> str:
    """Same folder contents, same bytes: sorted entries, time 0, owner 0, fixed modes, no
    compression (weights do not compress; the archive costs what copying does). `name` is the
    folder's name inside the archive (default: its own). Returns the archive's sha256, taken as it
    is written."""
    buffer_name = name or folder.name
    with open(target, "wb") as raw:
        hashed = HashingWriter(raw, progress)
        with tarfile.open(fileobj=hashed, mode="w", format=tarfile.PAX_FORMAT, copybufsize=COPY_CHUNK) as tar:  # type: ignore[call-overload]
            entries = sorted(folder.rglob("*"), key=lambda p: p.relative_to(folder).as_posix())
            for path in [folder, *entries]:
                member = buffer_name if path == folder else f"{buffer_name}/{path.relative_to(folder).as_posix()}"
                info = tarfile.TarInfo(member)
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
    return hashed.hexdigest()
