"""What `edgecds tune` measures and checks each candidate with: the predictor's pruning, the same
fresh-process measurement `profile` runs, and the accuracy gate against the baseline settings
(next-token distributions on the drift text, and each case's chosen option)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgecds.errors import EngineError
from edgecds.results import MeasurementRecord
from edgecds.target import Target
from edgecds.variants import VariantRecord


def _engine(settings: dict[str, Any]) -> Any:
    from edgecds.engine import EngineSettings

    return EngineSettings(**settings)


def _answers_and_drift(path: Path, settings: dict[str, Any], cases: list[Any], chunks: int | None) -> tuple[list[int | None], Any, Any]:
    from edgecds.cases import drift_text
    from edgecds.drift import DRIFT_CTX, drift_logprobs
    from edgecds.engine.factory import open_runtime
    from edgecds.evaluate import score_case

    engine = _engine({**settings, "n_ctx": max(settings["n_ctx"], DRIFT_CTX)})
    runtime = open_runtime(path, engine)
    try:
        answers = [score_case(runtime, case, "loglik").chosen for case in cases]
        logprobs, targets = drift_logprobs(runtime, drift_text(), max_chunks=chunks)
    finally:
        runtime.close()
    return answers, logprobs, targets


@dataclass
class Gate:
    """The baseline's answers and distributions, and the limits a candidate must keep to."""

    cases: list[Any]
    answers: list[int | None]
    logprobs: Any
    targets: Any
    max_kl: float
    max_flip_share: float
    cases_name: str = ""
    drift_chunks: int | None = None

    @property
    def n_cases(self) -> int:
        return len(self.cases)

    @property
    def drift_tokens(self) -> int:
        return int(len(self.targets))

    @classmethod
    def of(cls, path: Path, baseline: dict[str, Any], config: Any) -> Gate:
        from edgecds.cases import load_cases

        case_set = load_cases(config.cases)
        closed = [c for c in case_set.cases if not c.is_open]
        cases = closed[: config.case_limit] if config.case_limit else closed
        answers, logprobs, targets = _answers_and_drift(path, baseline, cases, config.drift_chunks)
        return cls(cases, answers, logprobs, targets, config.max_kl, config.max_flip_share, f"{case_set.name} ({case_set.sha256[:12]})",
                   config.drift_chunks)

    def prune(self, path: Path, settings: Any, target: Target) -> str:
        """The predictor's reason this candidate cannot fit the device at its whole context, or ''."""
        from dataclasses import replace

        from edgecds.formats.gguf_file import read_gguf
        from edgecds.hwbench.predict import predict

        prediction = predict(read_gguf(path), replace(settings, prompt_tokens=None, decode_tokens=1), target.settings_profile)
        return "" if prediction.fits else f"predicted not to fit: {prediction.why_not}"

    def check(self, candidate: Any, path: Path) -> None:
        """Reject the candidate when its distributions or answers moved past the limits."""
        from edgecds.drift import drift_against

        try:
            answers, logprobs, _ = _answers_and_drift(path, candidate.settings, self.cases, self.drift_chunks)
        except EngineError as exc:
            candidate.status, candidate.reason = "failed", str(exc)
            return
        candidate.kl_mean = drift_against(self.logprobs, logprobs, self.targets)["kl_mean"]
        flips = sum(a != b for a, b in zip(self.answers, answers, strict=True))
        candidate.flip_share = round(flips / len(self.cases), 4) if self.cases else 0.0
        if candidate.kl_mean > self.max_kl or candidate.flip_share > self.max_flip_share:
            candidate.status = "rejected"
            candidate.reason = (f"accuracy gate: KL {candidate.kl_mean:.4g} (limit {self.max_kl:g}), {flips} of {len(self.cases)} "
                                f"answers changed (limit {self.max_flip_share:.0%})")


def measure_candidate(candidate: Any, path: Path, settings: Any, config: Any) -> None:
    """Speed, time to first token and peak memory in fresh processes, as `profile` measures."""
    import statistics

    from edgecds.hwbench.measure import measure_repeated

    try:
        runs = measure_repeated(path, settings, config.repeats, timeout=config.timeout, gpu=settings.n_gpu_layers != 0)
    except EngineError as exc:
        candidate.status, candidate.reason = "failed", str(exc)
        return
    candidate.decode_tps = round(statistics.median(m.decode_tps for m in runs), 3)
    candidate.prompt_tps = round(statistics.median(m.prompt_tps for m in runs), 3)
    ttfts = [s for m in runs for s in m.ttft_seconds]
    candidate.ttft_seconds = round(statistics.median(ttfts), 5) if ttfts else None
    candidate.peak_rss_bytes = max(m.peak_rss_bytes for m in runs)


def chosen_measurement(best: Any, variant: VariantRecord, folder: Path, target: Target, config: Any, tuning_key: str) -> MeasurementRecord:
    """The chosen settings measured as `profile` measures (fresh processes, the context filled once,
    the predictor's figures beside them): the variant's newest record on the device, so `bundle`
    runs it with them and checks them against the budget as it checks any."""
    from edgecds.engine import RunSettings
    from edgecds.hwbench.measure import Workload
    from edgecds.profile import ProfileConfig, profile_one

    settings = RunSettings(**best.settings, prompt_tokens=config.prompt_tokens, decode_tokens=config.decode_tokens)
    recorded = {**asdict(settings), **asdict(Workload(repeats=1)), "repeats": config.repeats, "repeated": "fresh processes",
                "tuned": tuning_key}
    key = MeasurementRecord.make_key(variant.sha256, target.id, recorded, target.fingerprint.id)
    profile = ProfileConfig(variants=folder, device=target.id, repeats=config.repeats, timeout=config.timeout, accuracy=False)
    return profile_one(folder, variant, target, settings, recorded, key, profile)
