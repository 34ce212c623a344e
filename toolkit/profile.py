"""`edgecds profile`: measure every variant on the device it will run on.

For each variant of a variants.json: predict its memory at the device's context and skip it if it
cannot fit; otherwise measure it in a fresh process (hwbench/measure.py) with the device's
settings, and record the outcome, failures included, in results.json after each variant, so an
interrupted run resumes where it stopped.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgecds.adopt import open_variants
from edgecds.atomic import folder_lock
from edgecds.devices import DeviceProfile
from edgecds.engine import device_backend, settings_for
from edgecds.engine.speculative import DEFAULT_DRAFT_MAX, DEFAULT_P_MIN, NGRAM, DraftSettings
from edgecds.errors import EngineError, InvalidInputError, UsageError
from edgecds.host import HostInfo
from edgecds.hwbench.measure import TIMEOUT_SECONDS
from edgecds.progress import Reporter, lazy_step
from edgecds.results import (
    RESULTS_FILE,
    DraftMeasured,
    HostFingerprint,
    Measured,
    MeasurementRecord,
    ResultsFile,
    Stat,
    VariantRef,
    load_results,
)
from edgecds.target import AUTO, Target, resolve_target
from edgecds.variants import VariantRecord, check_unchanged

# A measured decode speed this many times off the prediction, either way, is flagged with both
# figures: the predictor lands within about 20% on a quiet device (bench_predict), so 3x is a
# disturbed run, a throttled device or a profile that does not describe it.
SPEED_FLAG_RATIO = 3.0


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
    timeout: float = TIMEOUT_SECONDS  # seconds a variant may take before it is killed and recorded as failed
    measure_anyway: bool = False  # measure on a host that is not the device; marked so
    force: bool = False  # measure again what is already recorded
    output: Path | None = None  # default: results.json beside variants.json
    root: Path = Path("/")  # where /proc and /sys are read (tests pass captured trees)
    accuracy: bool = True  # then score the measured variants' clinical accuracy (edgecds eval)
    cases: Path | None = None  # for the accuracy: None is the shipped case set
    drift_chunks: int | None = None  # for the accuracy's drift: the first N chunks of the text; None: all
    draft: str | None = None  # a variant's type, or "ngram": each variant's answer also decoded with it (speculative decoding)
    draft_max: int = DEFAULT_DRAFT_MAX
    draft_p_min: float = DEFAULT_P_MIN


@dataclass(frozen=True)
class ProfileDraft:
    """The draft `profile --draft` decodes with: by name and hash in the records, by file for the engine."""

    name: str  # a variant's type, or "ngram"
    sha256: str | None
    settings: DraftSettings  # source: the draft's file, or "ngram"

    @property
    def recorded(self) -> dict[str, Any]:
        return {**asdict(self.settings), "source": self.name, "sha256": self.sha256}


def profile_draft(config: ProfileConfig, folder: Path, variants: Any) -> ProfileDraft | None:
    """The draft named by --draft: n-gram lookup, or a GGUF variant of the same variants.json."""
    if config.draft is None:
        return None
    if config.draft.lower() == NGRAM:
        return ProfileDraft(NGRAM, None, DraftSettings(NGRAM, config.draft_max, config.draft_p_min))
    (record,) = variants.select((config.draft,), folder)
    if record.format != "gguf":
        raise UsageError(f"--draft {record.type}: a draft model must be a GGUF variant (or --draft ngram)")
    path = check_unchanged(folder, record)
    return ProfileDraft(record.type, record.sha256, DraftSettings(str(path), config.draft_max, config.draft_p_min))


@dataclass(frozen=True)
class Outcome:
    record: MeasurementRecord
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


def _settings(config: ProfileConfig, device: DeviceProfile, host: HostInfo, on_target: bool, notes: list[str]) -> Any:
    threads = config.threads or device.cpu_cores
    if not on_target and threads > host.cpu_cores and config.threads is None:
        notes.append(f"{device.id} has {device.cpu_cores} cores, this machine {host.cpu_cores}: measured with {host.cpu_cores} threads")
        threads = host.cpu_cores
    n_gpu_layers = config.n_gpu_layers
    if n_gpu_layers is None:
        n_gpu_layers = 0 if device_backend(device) == "cpu" else -1
    if n_gpu_layers != 0 and not engine_has_gpu():
        notes.append("this llama.cpp build has no GPU backend: every layer ran on the CPU (recorded as 0 GPU layers)")
        n_gpu_layers = 0
    # GGUF weights load as this host's probe decided: the prediction leaves out repacked copies when they are not made
    return settings_for(device, config.n_ctx, threads=threads, n_gpu_layers=n_gpu_layers, type_k=config.cache_type.lower(),
                        type_v=config.cache_type.lower(), flash_attn=config.flash_attn, prompt_tokens=config.prompt_tokens,
                        decode_tokens=config.decode_tokens, extra_buffers=_extra_buffers())


def _extra_buffers() -> bool | None:
    """This host's repacking verdict; None where llama.cpp cannot run at all (each GGUF load then
    says why, and ONNX variants are still measured)."""
    from edgecds.engine.cpu_paths import resolve

    try:
        return resolve().extra_buffers
    except EngineError:
        return None


def engine_has_gpu() -> bool:
    """Whether this llama.cpp build can offload layers (tune asks the same)."""
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


def _check_options(config: ProfileConfig) -> None:
    from edgecds.hwbench.predict import cache_type

    if cache_type(config.cache_type).block_size > 1 and not config.flash_attn:  # unknown types fail here too
        raise UsageError(f"a quantized KV cache ({config.cache_type}) needs --flash-attn: llama.cpp refuses a quantized V cache without it")
    if config.repeats < 1 or config.prompt_tokens < 1 or config.decode_tokens < 1:
        raise UsageError("--repeats, --prompt-tokens and --decode-tokens must be at least 1")
    if config.accuracy:
        from edgecds.cases import load_cases

        if any(c.is_open for c in load_cases(config.cases).cases):  # a bad case file stops the run now, not after the measurements
            raise UsageError(f"{config.cases}: open-ended cases need a free-text mode; score them with "
                             "`edgecds eval --mode generate` (profile's accuracy step scores options, loglik)")


def run_profile(config: ProfileConfig, reporter: Reporter | None = None) -> ProfileResult:
    from edgecds.hwbench.measure import Workload

    folder, variants = open_variants(config.variants)
    chosen = variants.select(config.types, folder)
    _check_options(config)
    target = resolve_target(config.device, config.profiles_dirs, config.root)
    target.require_here(config.measure_anyway)
    notes: list[str] = []
    settings = _settings(config, target.settings_profile, target.host, target.here, notes)
    if settings.effective_prompt_tokens > settings.n_ctx or settings.decode_tokens > settings.n_ctx:
        raise UsageError(f"--prompt-tokens {config.prompt_tokens} and --decode-tokens {config.decode_tokens} must fit the context {settings.n_ctx}")
    draft = profile_draft(config, folder, variants)
    # `repeats` fresh processes, each warmed up and timed once (measure.measure_repeated)
    recorded_settings = {**asdict(settings), **asdict(Workload(repeats=1)), "repeats": config.repeats, "repeated": "fresh processes"}
    if draft is not None:
        recorded_settings["draft"] = draft.recorded
    output = config.output or folder / RESULTS_FILE
    output.parent.mkdir(parents=True, exist_ok=True)
    with folder_lock(output.parent):
        results = load_results(output) or ResultsFile()
        results.hosts[target.fingerprint.id] = target.fingerprint
        outcomes = []
        for n, variant in enumerate(chosen, 1):
            label = f"[{n}/{len(chosen)}] {variant.type}"
            outcome = _measure_or_reuse(folder, variant, target, settings, recorded_settings, config, results, reporter, label, draft)
            if not outcome.reused:
                results.upsert(outcome.record)
                results.save(output)  # after every variant: an interrupted run keeps what it measured
            outcomes.append(outcome)
        results.save(output)
    evaluation = None
    measured = tuple(o.record.variant.type for o in outcomes if o.record.status == "measured")
    if config.accuracy and measured:
        from edgecds.evaluate import EvalConfig, run_eval

        # on the device's settings, on the same target (same host record); the float reference is
        # scored too, for the paired statistics
        evaluation = run_eval(EvalConfig(variants=folder, cases=config.cases, types=measured, threads=settings.threads,
                                         drift_chunks=config.drift_chunks, output=output, root=config.root,
                                         profiles_dirs=config.profiles_dirs), reporter, target)
    return ProfileResult(str(output), target.id, target.here, target.fingerprint, target.match.differences, tuple(outcomes), tuple(notes),
                         evaluation)


def _measure_or_reuse(folder: Path, variant: VariantRecord, target: Target, settings: Any, recorded_settings: dict[str, Any],
                      config: ProfileConfig, results: ResultsFile, reporter: Reporter | None, label: str,
                      draft: ProfileDraft | None = None) -> Outcome:
    key = MeasurementRecord.make_key(variant.sha256, target.id, recorded_settings, target.fingerprint.id)
    previous = results.by_key().get(key)
    if previous is not None and previous.status == "measured" and not config.force:
        if reporter:
            reporter.note(f"{label}: already measured with these settings on this host, reused (--force measures again)")
        return Outcome(previous, True)
    if reporter:
        with_draft = f", the answer without and with the {draft.name} draft" if draft is not None else ""
        reporter.note(f"{label}: {config.repeats} fresh processes, each: load, warm-up, "
                      f"pp{settings.effective_prompt_tokens}, tg{settings.decode_tokens}, time to first token{with_draft}")
    try:
        record = profile_one(folder, variant, target, settings, recorded_settings, key, config,
                              lazy_step(reporter, f"{label}: profile", config.repeats, "processes"), draft)
    finally:
        if reporter:
            reporter.finish()
    if reporter and record.status != "measured":
        reporter.note(f"{label}: {record.status}: {record.reason}")
    return Outcome(record, False)


def profile_one(folder: Path, variant: VariantRecord, target: Target, settings: Any, recorded_settings: dict[str, Any], key: str,
                 config: ProfileConfig, on_repeat: Callable[[int], None] | None = None,
                 draft: ProfileDraft | None = None) -> MeasurementRecord:
    """One variant measured as `profile` measures it (`tune` measures its choice with it too); with
    a `draft`, its answer decoded without and with it too (a variant is no draft of itself)."""
    from edgecds.hwbench.measure import measure_repeated

    start = time.perf_counter()
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    device = target.settings_profile

    def record(status: str, reason: str = "", predicted: dict[str, Any] | None = None, measured: Measured | None = None) -> MeasurementRecord:
        return MeasurementRecord(VariantRef.of(variant), target.id, target.here, target.fingerprint.id, recorded_settings, status, reason,
                                 predicted or {}, measured, key, created, round(time.perf_counter() - start, 3))

    if variant.format not in device.formats:
        return record("skipped", f"{device.id} runs {', '.join(device.formats)}, not {variant.format}")
    if draft is not None and draft.sha256 == variant.sha256:
        draft = None  # a variant is no draft of itself
    try:
        path = check_unchanged(folder, variant)  # the results will name this variant by its hash
        predicted = _prediction(path, variant, settings, device, draft)
    except InvalidInputError as exc:
        return record("failed", str(exc))
    if predicted and not predicted["fits"]:
        return record("skipped", f"predicted not to fit: {predicted['why_not']}", predicted)
    unified = device.memory_kind == "unified" and device.device_class == "jetson"
    try:
        runs = measure_repeated(path, settings, config.repeats, timeout=config.timeout, unified_memory=unified,
                                gpu=settings.n_gpu_layers != 0, fill_context=True, on_repeat=on_repeat,
                                draft=asdict(draft.settings) if draft is not None else None)
    except (EngineError, UsageError) as exc:
        return record("failed", str(exc), predicted)
    return record("measured", "", predicted, _summary(runs, predicted, draft))


def _prediction(path: Path, variant: VariantRecord, settings: Any, device: DeviceProfile, draft: ProfileDraft | None = None) -> dict[str, Any]:
    """The predictor's figures at the full context the device runs (not just the benchmark's few
    hundred tokens), with a draft model's beside it too; none for ONNX, whose graphs are measured
    only (the predictor models llama.cpp)."""
    from edgecds.formats.gguf_file import read_gguf
    from edgecds.hwbench.predict import predict

    if variant.format != "gguf":
        return {}
    info = read_gguf(path)
    full = replace(settings, prompt_tokens=None, decode_tokens=1)
    prediction = predict(info, full, device)
    with_draft = {}
    if draft is not None and not draft.settings.is_ngram:
        with_draft = {"peak_bytes_with_draft": predict(info, full, device, draft=read_gguf(Path(draft.settings.source))).memory.peak_bytes}
    benchmark = predict(info, settings, device)  # the speed the timed work itself should show
    mismatch = _uncalibrated_cpu(device)
    return {**({"calibrated_on": mismatch} if mismatch else {}), "peak_bytes": prediction.memory.peak_bytes, "budget_bytes": prediction.budget_bytes,
            "gpu_layers": prediction.memory.gpu_layers, "decode_tps": round(prediction.speed.decode_tps, 2),
            "benchmark_decode_tps": round(benchmark.speed.decode_tps, 2),
            "n_ctx": settings.n_ctx, "fits": prediction.fits, **({"why_not": prediction.why_not} if not prediction.fits else {}), **with_draft}


def _uncalibrated_cpu(device: DeviceProfile) -> str | None:
    """When `device` is this machine running on its CPU and no calibration was measured on a CPU
    with its features: where the constants in use come from; else None."""
    from edgecds.hwbench.predict import calibrated_for_cpu, calibration_for, host_cpu_features

    features = host_cpu_features(device)
    if features is None or device_backend(device) != "cpu":
        return None
    calibration = calibration_for("cpu", cpu_features=features)
    if calibrated_for_cpu(calibration, features):
        return None
    measured_on = ", ".join(calibration.source.get("cpu_features") or ["unrecorded"])
    return f"the constants were measured on {calibration.source.get('host', 'another host')} with {measured_on}; this CPU has {', '.join(features)}"


def _drafted(runs: list[Any], draft: ProfileDraft) -> DraftMeasured:
    """The with- and without-draft answers over the processes: each process's speeds, the tally summed."""
    from edgecds.engine.speculative import DraftStats

    tally = DraftStats()
    for m in runs:
        tally.add(DraftStats(**{k: v for k, v in m.speculative["stats"].items() if k != "acceptance_rate"}))

    def tps(key: str) -> Stat:
        return Stat.of([(m.speculative["tokens"] - 1) / s for m in runs for s in m.speculative[key] if s > 0])

    return DraftMeasured(draft.name, draft.sha256, draft.recorded, runs[0].speculative["tokens"], tps("plain_seconds"),
                         tps("draft_seconds"), tally.acceptance_rate, all(m.speculative["identical"] for m in runs),
                         max(m.speculative["peak_rss_bytes"] for m in runs))


def _summary(runs: list[Any], predicted: dict[str, Any], draft: ProfileDraft | None = None) -> Measured:
    """Each figure's median and range over the fresh processes; memory peaks at the highest; how
    much other processes disturbed the runs; a speed far from the prediction flagged with both."""
    from edgecds.hwbench.measure import DISTURBED_CORES, PEAK_RSS_RESOLUTION

    def highest(values: list[int | None]) -> int | None:
        present = [v for v in values if v is not None]
        return max(present) if present else None

    others = [max(m.others_cpu_cores) for m in runs if m.others_cpu_cores]
    disturbance = {"others_cpu_cores": others, "threshold_cores": DISTURBED_CORES, "reruns": sum(m.reruns for m in runs),
                   "disturbed": any(m.disturbed for m in runs)} if others else {}
    notes = {note for m in runs for note in m.notes}
    decode = Stat.of([m.decode_tps for m in runs])
    expected = predicted.get("benchmark_decode_tps")
    if expected and decode.median and not 1 / SPEED_FLAG_RATIO <= decode.median / expected <= SPEED_FLAG_RATIO:
        why = (f"no calibration for this CPU ({predicted['calibrated_on']}); measure one with python -m edgecds.hwbench.bench.calibrate "
               "MODEL.gguf --write" if predicted.get("calibrated_on") else "disturbed, throttled, or a device unlike its profile")
        notes.add(f"decode {decode.median:.1f} tokens/s is {decode.median / expected:.2g}x the predicted {expected:.1f}: {why}")
    if disturbance.get("disturbed"):
        notes.add(f"disturbed: other processes used up to {max(others):.2f} CPU cores during the timed work "
                  f"(threshold {DISTURBED_CORES}); speeds are not trusted")
    return Measured(
        load_seconds=Stat.of([m.load_seconds for m in runs]), peak_rss_bytes=Stat.of([float(m.peak_rss_bytes) for m in runs], PEAK_RSS_RESOLUTION),
        prompt_tps=Stat.of([m.prompt_tps for m in runs]), decode_tps=decode,
        ttft_seconds=Stat.of([s for m in runs for s in m.ttft_seconds]) if runs[0].ttft_seconds else None,
        ttft_prompt_tokens=runs[0].ttft_prompt_tokens, gpu_peak_bytes=highest([m.gpu_peak_bytes for m in runs]),
        unified_peak_bytes=highest([m.unified_peak_bytes for m in runs]), engine_buffers_mib=runs[0].llama_buffers_mib,
        notes=sorted(notes), full_context_peak_bytes=highest([m.full_context_peak_bytes for m in runs]),
        full_context_tokens=max(m.full_context_tokens for m in runs), disturbance=disturbance,
        speculative=_drafted(runs, draft) if draft is not None and runs[0].speculative else None,
    )
