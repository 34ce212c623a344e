"""`edgecds tune`: llama.cpp's runtime settings searched on the device, kept only if the clinical
answers stay.

For each variant: llama.cpp's defaults as `profile` runs them are the baseline. One knob at a time
(threads, batch and micro-batch, flash attention, the K and V cache types, on a GPU the layers
offloaded), each candidate is first checked against the predictor (one that cannot fit the device
is pruned, not run), then measured in fresh processes as `profile` measures, then gated: its
next-token distributions on the drift text must stay within `max_kl` of the baseline's and no more
than `max_flip_share` of the case answers may change. The best candidate that passes, by the
objective, becomes the knob's value and the search moves to the next knob; a knob whose
candidates all lose is left as it was. The search stops after `max_candidates` measurements.
The chosen settings are measured and recorded in results.json as the variant's newest measurement
on the device (so `bundle` writes them into runtime.json and `run`/`serve` use them), with the
whole search beside it (`tunings`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgecds.adopt import open_variants
from edgecds.atomic import folder_lock
from edgecds.errors import UsageError
from edgecds.hwbench.measure import TIMEOUT_SECONDS
from edgecds.profile import engine_has_gpu
from edgecds.progress import Reporter
from edgecds.results import RESULTS_FILE, MeasurementRecord, ResultsFile, TuningRecord, VariantRef, load_results
from edgecds.target import AUTO, Target, resolve_target
from edgecds.variants import VariantRecord, check_unchanged

OBJECTIVES = ("decode", "ttft", "memory")  # fastest decode, lowest time to first token, least memory (at --min-decode)
KNOBS = ("threads", "batch", "flash", "cache", "gpu_layers")
CACHE_PAIRS = (("f16", "f16"), ("q8_0", "q8_0"), ("q8_0", "q4_0"), ("q4_0", "q4_0"))
BATCHES = ((512, 512), (256, 256), (1024, 512), (2048, 512))
MIN_GAIN = 1.03  # a candidate must beat the current choice by 3%: less is within these machines' noise


@dataclass(frozen=True)
class TuneConfig:
    variants: Path
    device: str = AUTO
    types: tuple[str, ...] = ()
    objective: str = "decode"
    min_decode: float = 0.0  # memory objective: tokens/s a setting must keep
    knobs: tuple[str, ...] = KNOBS
    max_kl: float = 0.002  # mean KL divergence from the baseline's next-token distributions
    max_flip_share: float = 0.02  # share of case answers allowed to change
    cases: Path | None = None
    case_limit: int | None = 40  # the first N cases gate each candidate; None: all
    drift_chunks: int | None = None  # the first N chunks of the drift text gate each candidate; None: all
    max_candidates: int = 16
    repeats: int = 2
    prompt_tokens: int = 256
    decode_tokens: int = 64
    n_ctx: int | None = None
    timeout: float = TIMEOUT_SECONDS
    measure_anyway: bool = False
    output: Path | None = None
    root: Path = Path("/")


@dataclass
class Candidate:
    settings: dict[str, Any]  # the engine settings (EngineSettings' fields)
    changed: str  # the knob this candidate moved ("baseline", "chosen")
    status: str = ""  # accepted, rejected, pruned, failed, worse
    reason: str = ""
    decode_tps: float | None = None
    ttft_seconds: float | None = None
    peak_rss_bytes: int | None = None
    prompt_tps: float | None = None
    kl_mean: float | None = None
    flip_share: float | None = None


def _score(candidate: Candidate, objective: str, min_decode: float) -> float | None:
    """Higher is better; None when the candidate does not meet the objective's floor."""
    if objective == "decode":
        return candidate.decode_tps
    if objective == "ttft":
        return -candidate.ttft_seconds if candidate.ttft_seconds is not None else None
    if candidate.peak_rss_bytes is None or (candidate.decode_tps or 0) < min_decode:
        return None
    return -float(candidate.peak_rss_bytes)


def _alternatives(knob: str, current: dict[str, Any], target: Target) -> list[dict[str, Any]]:
    cores = target.settings_profile.cpu_cores
    if knob == "threads":
        values = sorted({cores, max(1, cores - 1), max(1, cores // 2)} - {current["threads"]}, reverse=True)
        return [{"threads": v} for v in values]
    if knob == "batch":
        return [{"n_batch": b, "n_ubatch": u} for b, u in BATCHES if (b, u) != (current["n_batch"], current["n_ubatch"])]
    if knob == "flash":
        return [{"flash_attn": not current["flash_attn"]}]
    if knob == "cache":  # a quantized V cache needs flash attention in llama.cpp
        return [{"type_k": k, "type_v": v, **({"flash_attn": True} if v != "f16" else {})} for k, v in CACHE_PAIRS
                if (k, v) != (current["type_k"], current["type_v"])]
    if knob == "gpu_layers" and current["n_gpu_layers"] != 0:
        return [{"n_gpu_layers": n} for n in (-1, 24, 16, 8) if n != current["n_gpu_layers"]]
    return []


@dataclass
class _Search:
    config: TuneConfig
    target: Target
    folder: Path
    variant: VariantRecord
    path: Path
    gate: Any  # tune_gate.Gate
    measured: int = 0
    candidates: list[Candidate] = field(default_factory=list)

    def run_settings(self, settings: dict[str, Any]) -> Any:
        from edgecds.engine import RunSettings

        return RunSettings(**settings, prompt_tokens=self.config.prompt_tokens, decode_tokens=self.config.decode_tokens)

    def try_(self, settings: dict[str, Any], changed: str) -> Candidate:
        from edgecds.tune_gate import measure_candidate

        candidate = Candidate(settings, changed)
        self.candidates.append(candidate)
        why_not = self.gate.prune(self.path, self.run_settings(settings), self.target)
        if why_not:
            candidate.status, candidate.reason = "pruned", why_not
            return candidate
        self.measured += 1
        measure_candidate(candidate, self.path, self.run_settings(settings), self.config)
        if candidate.status != "failed" and changed != "baseline":
            self.gate.check(candidate, self.path)
        return candidate


def run_tune(config: TuneConfig, reporter: Reporter | None = None) -> list[TuningRecord]:
    if config.objective not in OBJECTIVES:
        raise UsageError(f"unknown objective {config.objective!r}; choose from {', '.join(OBJECTIVES)}")
    unknown = sorted(set(config.knobs) - set(KNOBS))
    if unknown:
        raise UsageError(f"unknown knob(s) {', '.join(unknown)}; known: {', '.join(KNOBS)}")
    folder, variants = open_variants(config.variants)
    chosen = [v for v in variants.select(config.types, folder) if v.format == "gguf"]
    if not chosen:
        raise UsageError("tune searches llama.cpp's settings: choose GGUF variants with --types")
    target = resolve_target(config.device, (), config.root)
    target.require_here(config.measure_anyway)
    output = config.output or folder / RESULTS_FILE
    records = []
    with folder_lock(output.parent):
        for variant in chosen:
            record, measurement = _tune_one(config, target, folder, variant, reporter)
            results = load_results(output) or ResultsFile()
            results.hosts[target.fingerprint.id] = target.fingerprint
            results.tunings = [t for t in results.tunings if t.key != record.key] + [record]
            results.upsert(measurement)
            results.save(output)
            records.append(record)
    return records


def _tune_one(config: TuneConfig, target: Target, folder: Path, variant: VariantRecord,
              reporter: Reporter | None) -> tuple[TuningRecord, MeasurementRecord]:
    from edgecds.tune_gate import Gate

    start = time.perf_counter()
    path = check_unchanged(folder, variant)
    baseline_settings = {k: v for k, v in asdict(target.engine_settings(config.n_ctx)).items()
                         if k not in ("prompt_tokens", "decode_tokens", "fuse_attention")}
    if baseline_settings["n_gpu_layers"] != 0 and not engine_has_gpu():  # as profile records it: every layer on the CPU
        baseline_settings["n_gpu_layers"] = 0
    if reporter:
        reporter.note(f"{variant.type}: baseline (llama.cpp's defaults on {target.id}), then the gate's reference answers")
    gate = Gate.of(path, baseline_settings, config)
    search = _Search(config, target, folder, variant, path, gate)
    baseline = search.try_(baseline_settings, "baseline")
    best = baseline
    for knob in config.knobs:
        for change in _alternatives(knob, best.settings, target):
            if search.measured >= config.max_candidates:
                break
            candidate = search.try_({**best.settings, **change}, knob)
            _judge(candidate, best, config, reporter, variant.type)
        best = max([best] + [c for c in search.candidates if c.status == "accepted" and c.changed == knob], key=lambda c: _ranked(c, config))
    return _record(config, target, variant, search, baseline, best, time.perf_counter() - start)


def _ranked(candidate: Candidate, config: TuneConfig) -> float:
    score = _score(candidate, config.objective, config.min_decode)
    return float("-inf") if score is None else score


def _judge(candidate: Candidate, best: Candidate, config: TuneConfig, reporter: Reporter | None, label: str) -> None:
    if candidate.status not in ("pruned", "failed", "rejected"):
        new, old = _score(candidate, config.objective, config.min_decode), _score(best, config.objective, config.min_decode)
        better = new is not None and (old is None or (new * MIN_GAIN > old if new < 0 else new > old * MIN_GAIN))
        candidate.status = "accepted" if better else "worse"
        if candidate.status == "worse":
            candidate.reason = (f"below --min-decode {config.min_decode:g}" if new is None
                                else f"not {MIN_GAIN - 1:.0%} better on {config.objective} than the current choice")
    if reporter:
        reporter.note(f"{label}: {candidate.changed} {settings_text(candidate.settings)}: {candidate.status}"
                      + (f" ({candidate.reason})" if candidate.reason else ""))


def settings_text(settings: dict[str, Any]) -> str:
    """One candidate's settings in a line (progress notes and the tune table)."""
    return (f"threads {settings['threads']}, batch {settings['n_batch']}/{settings['n_ubatch']}, fa {'on' if settings['flash_attn'] else 'off'}, "
            f"K {settings['type_k']} V {settings['type_v']}, ngl {settings['n_gpu_layers']}")


def _record(config: TuneConfig, target: Target, variant: VariantRecord, search: _Search, baseline: Candidate, best: Candidate,
            seconds: float) -> tuple[TuningRecord, MeasurementRecord]:
    from edgecds.tune_gate import chosen_measurement

    base, top = _score(baseline, config.objective, config.min_decode), _score(best, config.objective, config.min_decode)
    ratio = (top / base if config.objective == "decode" else base / top) if base and top else None
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    gate = {"max_kl": config.max_kl, "max_flip_share": config.max_flip_share, "cases": search.gate.n_cases,
            "drift_tokens": search.gate.drift_tokens}
    spec = {"objective": config.objective, "min_decode": config.min_decode, "knobs": list(config.knobs), "gate": gate,
            "n_ctx": baseline.settings["n_ctx"], "cases": search.gate.cases_name, "case_limit": config.case_limit,
            "workload": {"prompt_tokens": config.prompt_tokens, "decode_tokens": config.decode_tokens, "repeats": config.repeats}}
    key = TuningRecord.make_key(variant.sha256, target.id, spec, target.fingerprint.id)
    # always: a search that keeps the defaults must also replace what an earlier tune chose
    measurement = chosen_measurement(best, variant, search.folder, target, config, key)
    record = TuningRecord(VariantRef.of(variant), target.id, target.here, target.fingerprint.id, spec, baseline.settings, best.settings,
                          round(ratio, 4) if ratio else None, search.measured, [asdict(c) for c in search.candidates], key, created,
                          round(seconds, 3))
    return record, measurement

