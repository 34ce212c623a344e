"""`edgecds profile`: measure every variant on the device it will run on.

For each variant of a variants.json: predict its memory at the device's context and skip it if it
cannot fit; otherwise measure it in a fresh process (hwbench/measure.py) with the device's
settings, and record the outcome, failures included, in results.json after each variant, so an
interrupted run resumes where it stopped.
"""

from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgecds import __version__
from edgecds.atomic import folder_lock
from edgecds.devices import HOST_ID, DeviceProfile, find_profile, load_profiles
from edgecds.errors import EngineError, InvalidInputError, UsageError, WrongDeviceError
from edgecds.host import HostInfo, HostMatch, detect_host, host_profile, nearest_profile
from edgecds.progress import Reporter
from edgecds.results import (
    RESULTS_FILE,
    HostFingerprint,
    Measured,
    ProfileRecord,
    ResultsFile,
    Stat,
    VariantRef,
    load_results,
)
from edgecds.variants import VARIANTS_FILE, VariantRecord, open_variants, variant_digest, variant_file

AUTO = "auto"


@dataclass(frozen=True)
class ProfileConfig:
    variants: Path  # a variants.json or its folder
    device: str = AUTO  # a profile id, "auto" (the detected one) or "host"
    profiles_dirs: tuple[Path, ...] = ()
    types: tuple[str, ...] = ()  # only these variants; empty: all
    n_ctx: int | None = None  # None: the device's default context
    threads: int | None = None  # None: the device's cores
    n_gpu_layers: int | None = None  # None: every layer on a GPU device, none on a CPU one
    cache_type: str = "f16"
    flash_attn: bool = False
    prompt_tokens: int = 512  # llama-bench's pp512
    decode_tokens: int = 128  # llama-bench's tg128
    repeats: int = 3
    timeout: float = 600.0  # seconds a variant may take before it is killed and recorded as failed
    measure_anyway: bool = False  # measure on a host that is not the device; marked so
    force: bool = False  # measure again what is already recorded
    output: Path | None = None  # default: results.json beside variants.json
    root: Path = Path("/")  # where /proc and /sys are read (tests pass captured trees)
    accuracy: bool = True  # then score the measured variants' clinical accuracy (edgecds eval)
    cases: Path | None = None  # for the accuracy: None is the shipped case set


@dataclass(frozen=True)
class Outcome:
    record: ProfileRecord
    reused: bool


@dataclass(frozen=True)
class ProfileResult:
    results_file: str
    device: str
    on_target: bool
    host: HostFingerprint
    differences: tuple[str, ...]
    outcomes: tuple[Outcome, ...]
    notes: tuple[str, ...] = field(default_factory=tuple)
    evaluation: Any = None  # an evaluate.EvalResult when accuracy was scored

    def to_dict(self) -> dict[str, Any]:
        return {"results_file": self.results_file, "device": self.device, "on_target": self.on_target,
                "host": asdict(self.host), "differences": list(self.differences), "notes": list(self.notes),
                "records": [dict(asdict(o.record), reused=o.reused) for o in self.outcomes],
                "accuracy": self.evaluation.to_dict() if self.evaluation else None}


def _llama_version() -> str:
    from importlib.metadata import version

    return version("llama_cpp_python")


def fingerprint(host: HostInfo, match: HostMatch) -> HostFingerprint:
    gpus = [g.name + (f" {g.memory_gib:g} GiB" if g.memory_gib else "") for g in host.gpus]
    values: dict[str, Any] = {
        "detected_profile": match.profile.id, "cpu": host.cpu_model, "cpu_cores": host.cpu_cores, "cpu_isa": host.cpu_isa,
        "ram_gib": host.ram_gib, "machine": host.machine, "gpus": gpus, "gpu_driver": host.gpus[0].driver if host.gpus else None,
        "jetson": host.jetson_model, "l4t_release": host.l4t_release, "os": f"{platform.system()} {platform.release()}",
        "versions": {"edgecds": __version__, "llama_cpp_python": _llama_version(), "python": platform.python_version()},
    }
    return HostFingerprint(id=HostFingerprint.make_id(values), **values)


def _resolve_device(config: ProfileConfig, match: HostMatch) -> tuple[str, DeviceProfile, bool]:
    """(the device id results are recorded for, the profile settings come from, measured on it?)"""
    detected = match.profile
    if config.device in (AUTO, HOST_ID):
        # the settings follow this very machine (its cores, memory); the record names its profile
        return (detected.id if config.device == AUTO else HOST_ID), host_profile(match), True
    target = find_profile(config.device, config.profiles_dirs)
    if target.id == detected.id:
        return target.id, host_profile(match) if match.differences else target, True
    if not config.measure_anyway:
        gpu = f", GPU {match.host.gpus[0].name}" if match.host.gpus else ""
        raise WrongDeviceError(
            f"this machine is not a {target.id}: detected {detected.id} (CPU {match.host.cpu_model}, "
            f"{match.host.cpu_cores} cores, {match.host.ram_gib:g} GiB{gpu}). Run `edgecds profile` on the device itself, "
            f"or add --measure-anyway to measure here; such results are marked as measured on {detected.id} and never count for {target.id}"
        )
    return target.id, target, False


def _settings(config: ProfileConfig, device: DeviceProfile, host: HostInfo, on_target: bool, notes: list[str]) -> Any:
    from edgecds.hwbench.predict import backend_for, settings_for

    threads = config.threads or device.cpu_cores
    if not on_target and threads > host.cpu_cores and config.threads is None:
        notes.append(f"{device.id} has {device.cpu_cores} cores, this machine {host.cpu_cores}: measured with {host.cpu_cores} threads")
        threads = host.cpu_cores
    n_gpu_layers = config.n_gpu_layers
    if n_gpu_layers is None:
        n_gpu_layers = 0 if backend_for(device) == "cpu" else -1
    if n_gpu_layers != 0 and not _engine_has_gpu():
        notes.append("this llama.cpp build has no GPU backend: every layer ran on the CPU (recorded as 0 GPU layers)")
        n_gpu_layers = 0
    return settings_for(device, config.n_ctx, threads=threads, n_gpu_layers=n_gpu_layers, type_k=config.cache_type.lower(),
                        type_v=config.cache_type.lower(), flash_attn=config.flash_attn, prompt_tokens=config.prompt_tokens,
                        decode_tokens=config.decode_tokens)


def _engine_has_gpu() -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


def _ref(variant: VariantRecord) -> VariantRef:
    return VariantRef(variant.name, variant.type, variant.format, variant.path, variant.sha256, variant.file_size)


def run_profile(config: ProfileConfig, reporter: Reporter | None = None) -> ProfileResult:
    from edgecds.hwbench.measure import Workload
    from edgecds.hwbench.predict import cache_type

    folder, variants = open_variants(config.variants)
    if cache_type(config.cache_type).block_size > 1 and not config.flash_attn:  # unknown types fail here too
        raise UsageError(f"a quantized KV cache ({config.cache_type}) needs --flash-attn: llama.cpp refuses a quantized V cache without it")
    if config.repeats < 1 or config.prompt_tokens < 1 or config.decode_tokens < 1:
        raise UsageError("--repeats, --prompt-tokens and --decode-tokens must be at least 1")
    chosen = list(variants.variants)
    if config.types:
        wanted = {t.upper() for t in config.types}
        unknown = sorted(wanted - {v.type for v in chosen})
        if unknown:
            raise UsageError(f"{folder / VARIANTS_FILE} has no variant(s) {', '.join(unknown)}; it has {', '.join(v.type for v in chosen)}")
        chosen = [v for v in chosen if v.type in wanted]

    if config.accuracy:
        from edgecds.cases import load_cases

        load_cases(config.cases)  # a bad case file stops the run now, not after the measurements
    host = detect_host(config.root)
    match = nearest_profile(host, load_profiles(config.profiles_dirs))
    device_id, device, on_target = _resolve_device(config, match)
    notes: list[str] = []
    settings = _settings(config, device, host, on_target, notes)
    if settings.effective_prompt_tokens > settings.n_ctx or settings.decode_tokens > settings.n_ctx:
        raise UsageError(f"--prompt-tokens {config.prompt_tokens} and --decode-tokens {config.decode_tokens} must fit the context {settings.n_ctx}")
    # `repeats` fresh processes, each warmed up and timed once (measure.measure_repeated)
    recorded_settings = {**asdict(settings), **asdict(Workload(repeats=1)), "repeats": config.repeats, "repeated": "fresh processes"}
    fp = fingerprint(host, match)
    output = config.output or folder / RESULTS_FILE
    output.parent.mkdir(parents=True, exist_ok=True)
    with folder_lock(output.parent):
        results = load_results(output) or ResultsFile()
        results.hosts[fp.id] = fp
        outcomes = []
        for n, variant in enumerate(chosen, 1):
            key = ProfileRecord.make_key(variant.sha256, device_id, recorded_settings, fp.id)
            previous = results.by_key().get(key)
            if previous is not None and previous.status == "measured" and not config.force:
                if reporter:
                    reporter.note(f"[{n}/{len(chosen)}] {variant.type}: already measured with these settings on this host, reused (--force measures again)")
                outcomes.append(Outcome(previous, True))
                continue
            if reporter:
                reporter.note(f"[{n}/{len(chosen)}] {variant.type}: {config.repeats} fresh processes, each: load, warm-up, "
                              f"pp{settings.effective_prompt_tokens}, tg{settings.decode_tokens}, time to first token")
            record = _profile_one(folder, variant, device_id, device, on_target, settings, recorded_settings, key, fp, config)
            results.upsert(record)
            results.save(output)  # after every variant: an interrupted run keeps what it measured
            if reporter and record.status != "measured":
                reporter.note(f"[{n}/{len(chosen)}] {variant.type}: {record.status}: {record.reason}")
            outcomes.append(Outcome(record, False))
        results.save(output)
    evaluation = None
    measured = tuple(o.record.variant.type for o in outcomes if o.record.status == "measured")
    if config.accuracy and measured:
        from edgecds.evaluate import EvalConfig, run_eval

        # on the device's settings; the float reference is scored too, for the paired statistics
        evaluation = run_eval(EvalConfig(variants=folder, cases=config.cases, types=measured, threads=settings.threads,
                                         output=output, root=config.root), reporter)
    return ProfileResult(str(output), device_id, on_target, fp, match.differences, tuple(outcomes), tuple(notes), evaluation)


def _profile_one(folder: Path, variant: VariantRecord, device_id: str, device: DeviceProfile, on_target: bool, settings: Any,
                 recorded_settings: dict[str, Any], key: str, fp: HostFingerprint, config: ProfileConfig) -> ProfileRecord:
    from edgecds.hwbench.measure import PEAK_RSS_RESOLUTION, measure_repeated
    from edgecds.hwbench.predict import predict
    from edgecds.quant.gguf_file import read_gguf

    start = time.perf_counter()
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")

    def record(status: str, reason: str = "", predicted: dict[str, Any] | None = None, measured: Measured | None = None) -> ProfileRecord:
        return ProfileRecord(_ref(variant), device_id, on_target, fp.id, recorded_settings, status, reason, predicted or {},
                             measured, key, created, round(time.perf_counter() - start, 3))

    if variant.format not in device.formats:
        return record("skipped", f"{device.id} runs {', '.join(device.formats)}, not {variant.format}")
    path = variant_file(folder, variant)
    # the results will name this variant by its hash: it must still be what quantize recorded
    if not (path.is_dir() if variant.format == "onnx" else path.is_file()):
        return record("failed", f"{path} is missing; run `edgecds quantize` again to rebuild it")
    if variant_digest(path) != variant.sha256:
        return record("failed", f"{path} changed since `edgecds quantize` recorded it (sha256 differs); run quantize again")
    predicted: dict[str, Any] = {}
    if variant.format == "gguf":  # the predictor models llama.cpp's buffers; ONNX graphs are measured only
        # predicted at the full context the device runs, not just the benchmark's few hundred tokens
        at_context = replace(settings, prompt_tokens=None, decode_tokens=1)
        try:
            prediction = predict(read_gguf(path), at_context, device)
        except InvalidInputError as exc:
            return record("failed", str(exc))
        predicted = {"peak_bytes": prediction.memory.peak_bytes, "budget_bytes": prediction.budget_bytes,
                     "gpu_layers": prediction.memory.gpu_layers, "decode_tps": round(prediction.speed.decode_tps, 2),
                     "n_ctx": settings.n_ctx, "fits": prediction.fits}
        if not prediction.fits:
            return record("skipped", f"predicted not to fit: {prediction.why_not}", predicted)
    unified = device.memory_kind == "unified" and device.device_class == "jetson"
    try:
        runs = measure_repeated(path, settings, config.repeats, timeout=config.timeout, unified_memory=unified,
                                gpu=settings.n_gpu_layers != 0)
    except EngineError as exc:
        return record("failed", str(exc), predicted)

    def highest(values: list[int | None]) -> int | None:
        present = [v for v in values if v is not None]
        return max(present) if present else None

    measured = Measured(
        load_seconds=Stat.of([m.load_seconds for m in runs]), peak_rss_bytes=Stat.of([float(m.peak_rss_bytes) for m in runs], PEAK_RSS_RESOLUTION),
        prompt_tps=Stat.of([m.prompt_tps for m in runs]), decode_tps=Stat.of([m.decode_tps for m in runs]),
        ttft_seconds=Stat.of([s for m in runs for s in m.ttft_seconds]) if runs[0].ttft_seconds else None,
        ttft_prompt_tokens=runs[0].ttft_prompt_tokens, gpu_peak_bytes=highest([m.gpu_peak_bytes for m in runs]),
        unified_peak_bytes=highest([m.unified_peak_bytes for m in runs]), engine_buffers_mib=runs[0].llama_buffers_mib,
        notes=sorted({note for m in runs for note in m.notes}),
    )
    return record("measured", "", predicted, measured)
