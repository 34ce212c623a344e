"""Choosing the variant for a device: what `edgecds bundle` packs and `edgecds report` shows.

Choosing reads results.json files (profile measurements and eval scores), keeps only what was
measured on the target device, applies the constraints, and explains every rejection.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgecds.devices import DeviceProfile
from edgecds.errors import InvalidInputError
from edgecds.results import EvalRecord, HostFingerprint, MeasurementRecord, load_results


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
    measurement: MeasurementRecord | None  # measured on the device; None when only predicted
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
        measured: dict[str, MeasurementRecord] = {}
        predicted: dict[str, MeasurementRecord] = {}
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
    if c.measurement is not None and c.measurement.predicted and not c.measurement.predicted.get("fits", True):
        out.append("predicted not to fit the budget at the device's context")
    if k.n_ctx and c.measurement is not None and c.measurement.settings.get("n_ctx", 0) < k.n_ctx:
        out.append(f"measured at context {c.measurement.settings.get('n_ctx')}, below the {k.n_ctx} asked for")
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
