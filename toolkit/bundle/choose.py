"""Choosing the variant for a device: what `edgecds bundle` packs and `edgecds report` shows.

Choosing reads results.json files (profile measurements and eval scores), keeps only what was
measured on the target device, applies the constraints, and explains every rejection.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from edgecds.devices import DeviceProfile
from edgecds.errors import InvalidInputError
from edgecds.results import EvalRecord, HostFingerprint, MeasurementRecord, load_results
from edgecds.stats import paired_comparison

# A variant is significantly different from another when the exact McNemar p-value of their paired
# answers is below ALPHA (the usual 5%; the accuracy studies' stricter 1% is --alpha 0.01).
ALPHA = 0.05
# Mean KL divergence (nats a token) on the clinical text under which two variants count as equally
# faithful to the reference. llama.cpp's users call a quantization near-lossless below about 0.01;
# on the default model Q8_0 drifts 0.004 and Q6_K 0.010 from F16, while Q4_K_M drifts 0.057 and
# Q3_K_M 0.14: the band keeps Q8_0 level with F16 and sets the 4- and 3-bit types apart.
FIDELITY_BAND = 0.01
PREFERENCES = ("fidelity", "speed", "size")
RULE = ("a variant qualifies when it fits, meets every constraint and is not significantly worse than its reference "
        "(exact McNemar p below alpha, 0.05 unless --alpha says otherwise); a qualifier significantly better than its reference wins; "
        f"otherwise the most faithful (lowest drift on the clinical text; drifts within {FIDELITY_BAND} of the most faithful count as "
        "equal; the fewest flipped answers where drift was not measured), then the fastest (speeds within the runs' spread count as equal), then the smallest (--prefer changes the order)")


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
    allow_disturbed: bool = False  # apply --min-decode to speeds measured while other processes used the CPU
    prefer: str = "fidelity"  # among qualifiers: fidelity, speed or size first (PREFERENCES)
    alpha: float = ALPHA


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
    peak_bytes: int  # at the device's full context where that was measured (full_context), else the benchmark's
    reasons: tuple[str, ...] = ()
    full_context: bool = False
    disturbed: bool = False  # its speeds were measured while other processes used the CPU
    drift_kl: float | None = None  # mean KL from its reference on the clinical text
    flips: int | None = None  # answers that changed against its reference
    p_value: float | None = None  # McNemar against its reference
    difference: float | None = None  # accuracy minus its reference's
    decode_spread: float = 0.0  # the range of its measured decode speeds: differences within it are noise
    failed: str = ""  # why its measurement on the device failed, when it did (its figures are then only predicted)

    def better_than_reference(self, alpha: float) -> bool:
        return self.p_value is not None and self.difference is not None and self.difference > 0 and self.p_value < alpha


@dataclass(frozen=True)
class Choice:
    device: str
    chosen: Candidate | None
    rejected: tuple[Candidate, ...]
    constraints: Constraints
    advice: str = ""  # when nothing fits: what came closest and what to relax
    why: str = ""  # why the chosen one won

    def explanation(self) -> dict[str, Any]:
        def row(c: Candidate) -> dict[str, Any]:
            return {"variant": c.variant, "accuracy": c.accuracy, "accuracy_low": c.accuracy_low, "decode_tps": round(c.decode_tps, 2),
                    "peak_bytes": c.peak_bytes, "peak_at_full_context": c.full_context, "predicted_only": c.predicted_only,
                    "disturbed": c.disturbed, "drift_kl": c.drift_kl, "flips": c.flips, "p_value": c.p_value, "reasons": list(c.reasons)}

        return {"device": self.device, "chosen": row(self.chosen) if self.chosen else None, "rejected": [row(c) for c in self.rejected],
                "constraints": asdict(self.constraints), "advice": self.advice, "why": self.why, "rule": RULE}


def _predicted_now(ref: Any, folder: Path, device: DeviceProfile, n_ctx: int | None) -> dict[str, Any]:
    """The predictor's figures for a variant no record on the device holds (as `plan` gives them, at
    the device's full context), read from its file in `folder`; {} when the file is not there."""
    from edgecds.engine import settings_for
    from edgecds.formats.gguf_file import read_gguf
    from edgecds.hwbench.predict import predict
    from edgecds.variants import load_variants, variant_file

    variants = load_variants(folder) if ref.format == "gguf" else None
    record = next((v for v in variants.variants if v.sha256 == ref.sha256), None) if variants else None
    path = variant_file(folder, record) if record else None
    if path is None or not path.is_file():
        return {}
    p = predict(read_gguf(path), settings_for(device, n_ctx), device)  # as `plan` predicts it
    return {"peak_bytes": p.memory.peak_bytes, "decode_tps": round(p.speed.decode_tps, 2), "fits": p.fits, "n_ctx": p.settings.n_ctx,
            **({"why_not": p.why_not} if not p.fits else {})}


def _candidates(results_files: list[Path], device: DeviceProfile, constraints: Constraints,
                variants_dir: Path | None = None) -> list[Candidate]:
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
        failed: dict[str, str] = {}
        for r in results.records:
            if r.device != device.id:
                continue
            if r.status == "failed" and r.on_target:
                failed[r.variant.sha256] = r.reason
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
            prediction = _predicted_now(ref, variants_dir or path.parent, device, constraints.n_ctx) \
                if record is None or not (record.measured or record.predicted) else None
            candidate = _candidate(ref, str(path), record, evaluation, results.hosts.get(record.host) if record else None, prediction)
            found.append(replace(candidate, failed=failed[sha]) if candidate.predicted_only and sha in failed else candidate)
    return found


def _candidate(ref: Any, results_file: str, record: MeasurementRecord | None, evaluation: EvalRecord | None,
               host: HostFingerprint | None, prediction: dict[str, Any] | None = None) -> Candidate:
    metrics = evaluation.metrics if evaluation else {}
    paired = (evaluation.paired or {}) if evaluation else {}
    drift = (evaluation.drift or {}) if evaluation else {}
    if record and record.measured:
        m = record.measured
        decode, only_predicted, spread = m.decode_tps.median, False, m.decode_tps.spread
        full = m.full_context_peak_bytes is not None
        peak = int(m.full_context_peak_bytes) if m.full_context_peak_bytes is not None else int(m.peak_rss_bytes.high)
        disturbed = bool(m.disturbance.get("disturbed"))
    else:
        figures = prediction if prediction is not None else record.predicted if record else {}
        decode = float(figures.get("decode_tps", 0.0))
        peak = int(figures.get("peak_bytes", 0))
        only_predicted, full, disturbed, spread = True, bool(figures), False, 0.0  # the predictor's peak is at the device's full context
    reference = evaluation is not None and evaluation.reference == ref.type
    return Candidate(ref.type, ref.format, ref.sha256, ref.file_size, results_file, record if record and record.measured else None, evaluation,
                     host, only_predicted, metrics.get("accuracy"), metrics.get("low"), decode, peak, (), full, disturbed,
                     0.0 if reference else drift.get("kl_mean"), 0 if reference else (paired["lost"] + paired["gained"] if paired else None),
                     paired.get("p_value"), paired.get("difference"), decode_spread=spread)


def _violations(c: Candidate, device: DeviceProfile, k: Constraints) -> list[str]:
    budget = int(device.budget_gib * 1024**3)
    out = []
    if c.format not in device.formats:  # a prediction or an evaluation elsewhere must not ship what the device cannot run
        out.append(f"{device.id} runs {', '.join(device.formats)}, not {c.format}")
    elif c.format not in k.formats:
        out.append(f"format {c.format} not allowed")
    if c.predicted_only and not c.peak_bytes and not c.failed:
        out.append("no figures for this device: neither measured there nor predicted (its file was not found: pass --variants DIR)")
    if c.failed:
        out.append(f"its measurement on {device.id} failed ({c.failed}); a prediction does not stand in for it")
    elif c.predicted_only and not k.allow_predicted:
        out.append("not measured on the device")
    if c.peak_bytes and c.peak_bytes > budget:
        out.append(f"too big by {(c.peak_bytes - budget) / 2**20:.0f} MB over the {device.budget_gib:g} GiB budget")
    if c.measurement is not None and c.measurement.predicted and not c.measurement.predicted.get("fits", True):
        out.append("predicted not to fit the budget at the device's context")
    if k.n_ctx and c.measurement is not None and c.measurement.settings.get("n_ctx", 0) < k.n_ctx:
        out.append(f"measured at context {c.measurement.settings.get('n_ctx')}, below the {k.n_ctx} asked for")
    if k.min_decode_tps is not None and c.disturbed and not k.allow_disturbed:
        out.append("decode speed measured while other processes used the CPU: not trusted for --min-decode; profile again on a "
                   "quiet device, or pass --allow-disturbed")
    elif k.min_decode_tps is not None and c.decode_tps < k.min_decode_tps:
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
            if k.max_drop is not None and -paired["low"] > k.max_drop:
                out.append(f"may drop up to {-paired['low']:.1%} against {c.evaluation.reference} (95% lower bound of the difference), "
                           f"more than {k.max_drop:.1%}")
            if k.max_flip_rate is not None and paired["flip_rate"] > k.max_flip_rate:
                out.append(f"flip rate {paired['flip_rate']:.1%} above {k.max_flip_rate:.1%}")
            if paired["difference"] < 0 and paired["p_value"] < k.alpha and not k.allow_significantly_worse:
                out.append(f"significantly worse than {c.evaluation.reference} (McNemar p = {paired['p_value']:.3f})")
    return out


def _pairwise(a: Candidate, b: Candidate) -> Any:
    """McNemar between two variants' answers on the cases both were scored on; None without both."""
    if a.evaluation is None or b.evaluation is None:
        return None
    mine = {c["id"]: c["correct"] for c in a.evaluation.per_case}
    theirs = {c["id"]: c["correct"] for c in b.evaluation.per_case}
    common = sorted(mine.keys() & theirs.keys())
    return paired_comparison([theirs[i] for i in common], [mine[i] for i in common]) if common else None


def _keep(pool: list[Candidate], criterion: str) -> list[Candidate]:
    """Those of `pool` that no other beats on `criterion` beyond what measurement can tell apart:
    drift within FIDELITY_BAND of the most faithful; decode speed within the measured spread of the
    fastest; the smallest file."""
    if criterion == "fidelity":
        best = min((c.drift_kl for c in pool if c.drift_kl is not None), default=None)
        if best is not None:
            return [c for c in pool if c.drift_kl is not None and c.drift_kl <= best + FIDELITY_BAND]
        fewest = min((c.flips for c in pool if c.flips is not None), default=None)  # no drift measured (eval --no-drift)
        return pool if fewest is None else [c for c in pool if c.flips == fewest]
    if criterion == "speed":
        fastest = max(pool, key=lambda c: c.decode_tps)
        return [c for c in pool if c.decode_tps >= fastest.decode_tps - max(fastest.decode_spread, c.decode_spread)]
    smallest = min(c.file_size for c in pool)
    return [c for c in pool if c.file_size == smallest]


def _rank(qualifiers: list[Candidate], k: Constraints) -> tuple[Candidate, dict[str, str], str]:
    """The chosen qualifier, the criterion each other one lost on, and why the chosen one won.
    Criteria are applied in turn (`--prefer` first), each keeping only the qualifiers that are
    best on it within what measurement can tell apart, so noise never decides."""
    better = [c for c in qualifiers if c.better_than_reference(k.alpha)]
    if better:
        chosen = max(better, key=lambda c: (c.accuracy or 0.0, -c.file_size))
        lost = {c.sha256: "better" for c in qualifiers if c is not chosen}
        return chosen, lost, f"significantly better than its reference (p={chosen.p_value:.3f})"
    pool, lost = list(qualifiers), {}
    for criterion in [k.prefer, *(p for p in PREFERENCES if p != k.prefer)]:
        kept = _keep(pool, criterion)
        lost.update({c.sha256: criterion for c in pool if c not in kept})
        pool = kept
    chosen = min(pool, key=lambda c: c.variant)  # equal on every criterion: by name, so the choice is repeatable
    lost.update({c.sha256: "name" for c in pool if c is not chosen})
    drift = f"drift {chosen.drift_kl:.4f}" if chosen.drift_kl is not None else "drift not measured"
    return chosen, lost, (f"no qualifier differs significantly from its reference; by {k.prefer} first: {drift}, "
                          f"{chosen.decode_tps:.1f} tokens/s, a {chosen.file_size / 2**20:.0f} MiB file")


def _passed_over(c: Candidate, chosen: Candidate, criterion: str, k: Constraints) -> str:
    """Which rule put `c` behind the chosen variant, with the evidence."""
    test = _pairwise(c, chosen)
    said = ""
    if test is not None:
        kind = "not different from" if test.p_value >= k.alpha else ("worse than" if test.difference < 0 else "better than")
        said = f"accuracy {kind} {chosen.variant} (p={test.p_value:.2f}); "
    if criterion == "better":
        return f"{said}{chosen.variant} is significantly better than its reference (p={chosen.p_value:.3f})"
    if criterion == "fidelity":
        ours = f"{c.drift_kl:.4f}" if c.drift_kl is not None else "not measured"
        flips = f", {c.flips} vs {chosen.flips} flipped answers" if c.flips is not None and chosen.flips is not None else ""
        return f"{said}less faithful: drift {ours} vs {chosen.drift_kl if chosen.drift_kl is not None else 0:.4f}{flips}"
    same = "as faithful (drift within the band), " if k.prefer == "fidelity" else ""
    if criterion == "speed":
        return f"{said}{same}slower: {c.decode_tps:.1f} vs {chosen.decode_tps:.1f} tokens/s, beyond the runs' spread"
    if criterion == "size":
        return f"{said}{same}as fast within the runs' spread, larger file: {c.file_size / 2**20:.0f} vs {chosen.file_size / 2**20:.0f} MiB"
    return f"{said}equal on every rule; {chosen.variant} comes first by name"


def choose(results_files: list[Path], device: DeviceProfile, constraints: Constraints, variants_dir: Path | None = None) -> Choice:
    if constraints.prefer not in PREFERENCES:
        raise InvalidInputError(f"unknown preference {constraints.prefer!r}; known: {', '.join(PREFERENCES)}")
    candidates = _candidates(results_files, device, constraints, variants_dir)
    if not candidates:
        raise InvalidInputError(
            f"no variant was measured on {device.id} in {', '.join(map(str, results_files))}; run `edgecds profile --device {device.id}` "
            "on the device (or pass --allow-predicted to choose from predictions, which the bundle will say)"
        )
    judged = [replace(c, reasons=tuple(_violations(c, device, constraints))) for c in candidates]
    qualifiers = [c for c in judged if not c.reasons]
    if not qualifiers:
        closest = min(judged, key=lambda c: (len(c.reasons), c.peak_bytes))
        advice = f"nothing meets every constraint; closest: {closest.variant} ({'; '.join(closest.reasons)}): relax that constraint"
        return Choice(device.id, None, tuple(sorted(judged, key=lambda c: c.variant)), constraints, advice)
    chosen, lost, why = _rank(qualifiers, constraints)
    rejected = tuple(sorted((replace(c, reasons=(_passed_over(c, chosen, lost[c.sha256], constraints),)) if not c.reasons else c
                             for c in judged if c is not chosen), key=lambda c: c.variant))
    return Choice(device.id, chosen, rejected, constraints, "", why)
