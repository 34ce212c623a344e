"""`results.json`: what `edgecds profile` measured and `edgecds eval` scored, read back by `bundle` and `report`.

One dataclass per record is the single definition of its fields. The file holds the hosts that
measured (fingerprints) and one record per variant, device, settings and host, so results from
several machines can live side by side and a record measured on another host never passes for
the target. It is validated when read: later steps trust it.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from edgecds.atomic import write_json
from edgecds.digest import cache_key
from edgecds.errors import InvalidInputError
from edgecds.variants import VariantRecord, dataclass_from_dict, read_record_file

SCHEMA_VERSION = 1
RESULTS_FILE = "results.json"
MAX_RESULTS_BYTES = 64 << 20
STATUSES = ("measured", "failed", "skipped")


@dataclass(frozen=True)
class Stat:
    """Repeated measurements of one figure: median and range, with every sample."""

    median: float
    low: float
    high: float
    samples: list[float]
    resolution: float = 0.0  # the smallest difference the measurement can tell apart

    @classmethod
    def of(cls, samples: list[float], resolution: float = 0.0) -> Stat:
        if not samples:
            raise ValueError("no samples")
        rounded = [round(s, 6) for s in samples]
        return cls(round(statistics.median(samples), 6), min(rounded), max(rounded), rounded, resolution)

    @property
    def spread(self) -> float:
        """The range of the repeats, or the resolution if that is wider: the noise to allow for."""
        return max(self.high - self.low, self.resolution)


@dataclass(frozen=True)
class DraftMeasured:
    """`profile --draft`: the clinical answer decoded without and with a draft in the same
    processes (hwbench/measure.py `_time_drafted`)."""

    draft: str  # the draft variant's type, or "ngram"
    draft_sha256: str | None  # None for ngram
    settings: dict[str, Any]  # engine.speculative.DraftSettings as used, its source by name
    tokens: int  # answer tokens decoded each way, a repeat
    plain_tps: Stat  # decode without the draft: answer tokens after the first, per second
    draft_tps: Stat  # the same answer with the draft
    acceptance_rate: float | None  # drafted tokens the target kept
    identical: bool  # every repeat's answer with the draft equals the one without
    peak_rss_bytes: int  # the highest VmHWM with the target at its full context and the draft loaded

    @property
    def speedup(self) -> float:
        return self.draft_tps.median / self.plain_tps.median if self.plain_tps.median else 0.0

    @property
    def pays(self) -> bool:
        """Faster by more than the runs' spread: the slowest run with the draft beats the fastest without."""
        return self.draft_tps.low > self.plain_tps.high

    @property
    def verdict(self) -> str:
        if self.pays:
            return "faster in every run"
        return "slower in every run" if self.draft_tps.high < self.plain_tps.low else "within the runs' spread"


@dataclass(frozen=True)
class HostFingerprint:
    """The machine that measured, and the software it ran; `id` hashes the rest."""

    id: str
    detected_profile: str
    cpu: str
    cpu_cores: int
    cpu_isa: str | None
    ram_gib: float
    machine: str
    gpus: list[str]
    gpu_driver: str | None
    jetson: str | None
    l4t_release: str | None
    os: str
    versions: dict[str, str]  # edgecds, llama-cpp-python, python
    cpu_features: list[str] = field(default_factory=list)  # the flags that change the engine's path (host.ENGINE_CPU_FEATURES)
    llama_extra_buffers: bool | None = None  # whether llama.cpp repacks GGUF weights here (engine/cpu_paths.py); None: not known

    @staticmethod
    def make_id(fields: dict[str, Any]) -> str:
        return cache_key(fields, length=16)


@dataclass(frozen=True)
class VariantRef:
    name: str
    type: str
    format: str
    path: str  # relative to the variants folder
    sha256: str
    file_size: int

    @classmethod
    def of(cls, variant: VariantRecord) -> VariantRef:
        """How a results record names the variant it measured or scored."""
        return cls(variant.name, variant.type, variant.format, variant.path, variant.sha256, variant.file_size)


@dataclass(frozen=True)
class Measured:
    """One variant's figures over `repeats` fresh processes (see hwbench/measure.py)."""

    load_seconds: Stat
    peak_rss_bytes: Stat  # each process's own peak (VmHWM); budgets compare with `.high`
    prompt_tps: Stat  # pp: `prompt_tokens` from an empty cache
    decode_tps: Stat  # tg: `decode_tokens` one at a time from an empty cache
    ttft_seconds: Stat | None  # a clinical prompt in the chat template, to the first token
    ttft_prompt_tokens: int
    gpu_peak_bytes: int | None  # the highest over the repeats
    unified_peak_bytes: int | None
    engine_buffers_mib: dict[str, float]
    notes: list[str] = field(default_factory=list)
    # the peak with the device's whole context filled once (the figure a budget is checked against),
    # beside peak_rss_bytes, the peak at the benchmark's few hundred tokens
    full_context_peak_bytes: int | None = None
    full_context_tokens: int = 0
    # other processes' CPU use during the timed work: cores per kept run, the threshold, reruns, verdict
    disturbance: dict[str, Any] = field(default_factory=dict)
    speculative: DraftMeasured | None = None  # profile --draft


@dataclass(frozen=True)
class MeasurementRecord:
    variant: VariantRef
    device: str  # the device profile the user measured for
    on_target: bool  # False: measured on another machine (`host`), so it never counts for `device`
    host: str  # HostFingerprint.id
    settings: dict[str, Any]  # engine settings, workload size and repeats: everything used
    status: str  # measured, failed or skipped
    reason: str  # why failed or skipped
    predicted: dict[str, Any]  # the predictor's figures at the device's context, for comparison
    measured: Measured | None
    key: str  # variant, device, settings and host: a re-run with the same key reuses the record
    created: str
    seconds: float

    @staticmethod
    def make_key(variant_sha256: str, device: str, settings: dict[str, Any], host_id: str) -> str:
        return cache_key({"variant": variant_sha256, "device": device, "settings": settings, "host": host_id})


@dataclass(frozen=True)
class EvalRecord:
    """One variant scored on one case set (edgecds eval); per_case keeps every answer and score."""

    variant: VariantRef
    host: str
    cases: dict[str, Any]  # name, sha256, n, style
    mode: str
    spec: dict[str, Any]  # everything that decides the scores: cases, mode, engine settings
    metrics: dict[str, Any]  # accuracy with its Wilson interval, by specialty and incidence, errors
    reference: str  # the reference variant's type
    paired: dict[str, Any] | None  # against the reference: flips, McNemar p, difference with interval
    drift: dict[str, Any] | None  # KL divergence, top-1 agreement, perplexity on the drift text
    per_case: list[dict[str, Any]]
    key: str
    created: str
    seconds: float
    reference_origin: str = ""  # SourceRecord.origin: the reference is not the original weights

    @staticmethod
    def make_key(variant_sha256: str, spec: dict[str, Any], host_id: str) -> str:
        return cache_key({"variant": variant_sha256, "spec": spec, "host": host_id})


@dataclass(frozen=True)
class TuningRecord:
    """One `edgecds tune` search for one variant on one device: every candidate, and the choice."""

    variant: VariantRef
    device: str
    on_target: bool
    host: str
    spec: dict[str, Any]  # objective, knobs, the accuracy gate's limits, the workload
    baseline: dict[str, Any]  # llama.cpp's defaults as profile runs them (EngineSettings' fields)
    chosen: dict[str, Any]
    ratio: float | None  # chosen / baseline on the objective (> 1: better); None when nothing was measured
    measured: int  # candidates measured (pruned ones are not)
    candidates: list[dict[str, Any]]
    key: str
    created: str
    seconds: float

    @staticmethod
    def make_key(variant_sha256: str, device: str, spec: dict[str, Any], host_id: str) -> str:
        return cache_key({"variant": variant_sha256, "device": device, "tune": spec, "host": host_id})


@dataclass
class ResultsFile:
    hosts: dict[str, HostFingerprint] = field(default_factory=dict)
    records: list[MeasurementRecord] = field(default_factory=list)
    evaluations: list[EvalRecord] = field(default_factory=list)
    tunings: list[TuningRecord] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION

    def by_key(self) -> dict[str, MeasurementRecord]:
        return {r.key: r for r in self.records}

    def upsert(self, record: MeasurementRecord) -> None:
        self.records = [r for r in self.records if r.key != record.key] + [record]

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": self.schema_version, "hosts": {k: asdict(v) for k, v in self.hosts.items()},
                "records": [asdict(r) for r in self.records], "evaluations": [asdict(e) for e in self.evaluations],
                "tunings": [asdict(t) for t in self.tunings]}

    def save(self, path: Path) -> None:
        write_json(path, self.to_dict())


def _stat(data: Any, where: str) -> Stat:
    stat = dataclass_from_dict(Stat, data, where)
    if not isinstance(stat.samples, list) or not all(isinstance(s, (int, float)) for s in stat.samples):
        raise InvalidInputError(f"{where}: samples must be a list of numbers")
    return stat


def parse_measurement(data: Any, where: str) -> MeasurementRecord:
    """A measurement record read from JSON (a results file, or a fleet node's report), validated."""
    record = dataclass_from_dict(MeasurementRecord, data, where)
    if record.status not in STATUSES:
        raise InvalidInputError(f"{where}: status {record.status!r} is not one of {', '.join(STATUSES)}")
    measured = None
    if record.measured is not None:
        raw = dataclass_from_dict(Measured, record.measured, f"{where}.measured")
        ttft = raw.ttft_seconds
        stats: dict[str, Stat | None] = {name: _stat(getattr(raw, name), f"{where}.measured.{name}") for name in ("load_seconds", "peak_rss_bytes", "prompt_tps", "decode_tps")}
        stats["ttft_seconds"] = _stat(ttft, f"{where}.measured.ttft_seconds") if ttft is not None else None
        spec = raw.speculative
        if spec is not None:
            spec = dataclass_from_dict(DraftMeasured, spec, f"{where}.measured.speculative")
            spec = DraftMeasured(**{**spec.__dict__, **{name: _stat(getattr(spec, name), f"{where}.measured.speculative.{name}")
                                                        for name in ("plain_tps", "draft_tps")}})
        measured = Measured(**{**raw.__dict__, **stats, "speculative": spec})
    if record.status == "measured" and measured is None:
        raise InvalidInputError(f"{where}: a measured record without measurements")
    return MeasurementRecord(**{**record.__dict__, "variant": dataclass_from_dict(VariantRef, record.variant, f"{where}.variant"),
                            "measured": measured})


def parse_host(data: Any, where: str) -> HostFingerprint:
    return dataclass_from_dict(HostFingerprint, data, where)  # type: ignore[no-any-return]


def load_results(path: Path) -> ResultsFile | None:
    """The results file, or None when there is none yet; a malformed one is an error naming what."""
    if not path.exists():
        return None
    data = read_record_file(path, SCHEMA_VERSION, "move it away to start a new results file", "use a matching edgecds", MAX_RESULTS_BYTES)
    hosts, records = data.get("hosts"), data.get("records")
    if not isinstance(hosts, dict) or not isinstance(records, list):
        raise InvalidInputError(f"{path}: 'hosts' must be an object and 'records' a list")
    parsed_hosts = {k: parse_host(v, f"{path}: hosts.{k}") for k, v in hosts.items()}
    parsed = [parse_measurement(r, f"{path}: records[{i}]") for i, r in enumerate(records)]
    raw_evaluations = data.get("evaluations", [])
    if not isinstance(raw_evaluations, list):
        raise InvalidInputError(f"{path}: 'evaluations' must be a list")
    evaluations = [parse_evaluation(e, f"{path}: evaluations[{i}]") for i, e in enumerate(raw_evaluations)]
    raw_tunings = data.get("tunings", [])
    if not isinstance(raw_tunings, list):
        raise InvalidInputError(f"{path}: 'tunings' must be a list")
    tunings = [_tuning(t, f"{path}: tunings[{i}]") for i, t in enumerate(raw_tunings)]
    unknown = sorted(({r.host for r in parsed} | {e.host for e in evaluations} | {t.host for t in tunings}) - parsed_hosts.keys())
    if unknown:
        raise InvalidInputError(f"{path}: records name host(s) {', '.join(unknown)} that 'hosts' does not describe")
    return ResultsFile(parsed_hosts, parsed, evaluations, tunings)


def _tuning(data: Any, where: str) -> TuningRecord:
    record = dataclass_from_dict(TuningRecord, data, where)
    if record.ratio is not None and (isinstance(record.ratio, bool) or not isinstance(record.ratio, (int, float))):
        raise InvalidInputError(f"{where}.ratio must be a number")
    return replace(record, variant=dataclass_from_dict(VariantRef, record.variant, f"{where}.variant"))


# The figures `bundle` and `report` compute with: each must be a number where it is present.
EVAL_FIGURES = {
    "metrics": ("accuracy", "low", "high", "n", "correct"),
    "paired": ("n", "lost", "gained", "flip_rate", "difference", "low", "high", "p_value"),
    "drift": ("kl_mean", "kl_median", "kl_p99", "kl_p999", "kl_max", "top1_agreement", "delta_p_mean", "delta_p_rms", "perplexity",
              "reference_perplexity"),
}


def _check_figures(record: EvalRecord, where: str) -> None:
    for group, names in EVAL_FIGURES.items():
        values = getattr(record, group)
        if values is None:
            continue
        required = {"metrics": ("accuracy", "low", "high"), "paired": ("lost", "gained", "difference", "low", "p_value"),
                    "drift": ("kl_mean", "top1_agreement", "perplexity", "reference_perplexity")}[group]
        for name in names:
            value = values.get(name)
            if (value is None and name in required) or (value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)))):
                raise InvalidInputError(f"{where}.{group}.{name} must be a number, not {value!r}")


def parse_evaluation(data: Any, where: str) -> EvalRecord:
    """An evaluation record read from JSON, validated."""
    record = dataclass_from_dict(EvalRecord, data, where)
    _check_figures(record, where)
    if not all(isinstance(c, dict) and isinstance(c.get("id"), str) and isinstance(c.get("correct"), bool) for c in record.per_case):
        raise InvalidInputError(f"{where}: per_case entries need an 'id' and a boolean 'correct'")
    return replace(record, variant=dataclass_from_dict(VariantRef, record.variant, f"{where}.variant"))
