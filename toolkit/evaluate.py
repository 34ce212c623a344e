"""`edgecds eval`: clinical accuracy of every variant, and how far it drifted from the reference.

Scoring, per case:
- `loglik` (default; works for tiny models): each option's log-probability after the vignette
  and question, from the engine's own logits, summed and divided by the option's length in bytes
  (length-normalised, as lm-evaluation-harness's acc_norm). The vignette is evaluated once and
  its KV cache reused for every option.
- `generate`: the greedy answer to the case in the model's chat template, matched to the options
  and accepted synonyms after normalisation; an answer matching nothing is wrong, and counted.
- `topk`: the model lists k diagnoses; right if the answer is among them.

Per variant: accuracy with a Wilson interval, by specialty and incidence, errors split into
plausible differentials and off-topic answers; paired with the reference (the float variant):
flips, exact McNemar p-value and the accuracy difference with its interval; drift on a fixed
clinical text (mean KL divergence, top-1 agreement, perplexity), computed as llama.cpp's
perplexity tool does. Records go into results.json beside the profile's.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgecds.adopt import open_variants
from edgecds.atomic import atomic_path, folder_lock
from edgecds.cases import Case, CaseSet, drift_text, load_cases, prompt_for
from edgecds.digest import cache_key
from edgecds.drift import DRIFT_CTX, drift_against, drift_logprobs, log_softmax
from edgecds.engine import DEFAULT_CTX, EngineSettings, Picker, Runtime, argmax, generate_greedy, sampler
from edgecds.engine.factory import open_runtime
from edgecds.errors import InvalidInputError, UsageError
from edgecds.matcher import THINK_TOKENS, answer_line_done, answer_lines, mentions, names, split_reasoning, still_thinking
from edgecds.progress import Reporter
from edgecds.results import RESULTS_FILE, EvalRecord, ResultsFile, VariantRef, load_results
from edgecds.stats import paired_comparison, pass_at_k, wilson_interval
from edgecds.target import Target, resolve_target
from edgecds.variants import VariantRecord, VariantsFile, check_unchanged

MODES = ("loglik", "generate", "topk")
GENERATE_TOKENS = 32
PASS_AT = (1, 3, 5)
DRIFT_CACHE = ".edgecds-drift"


@dataclass(frozen=True)
class Sampling:
    """Seeded sampling for pass@k: `samples` replies a case, each with its own seed derived from
    the run's seed and the case id (so adding cases does not change another case's draws)."""

    samples: int = 0
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int = 0

    def seeds(self, case_id: str) -> list[int]:
        base = int(cache_key({"seed": self.seed, "case": case_id}, length=8), 16)
        return [base + i for i in range(self.samples)]


@dataclass(frozen=True)
class EvalConfig:
    variants: Path
    cases: Path | None = None  # None: the shipped case set
    mode: str = "loglik"
    k: int = 5  # for topk
    think_tokens: int = THINK_TOKENS  # reasoning allowed before the answer (generate/topk)
    sampling: Sampling = Sampling()  # pass@k, off unless samples > 0
    judge: Path | None = None  # a variant (GGUF file or ONNX folder) that grades the free-text answers
    types: tuple[str, ...] = ()
    limit: int | None = None  # the first N cases only
    n_ctx: int = DEFAULT_CTX
    threads: int | None = None
    drift: bool = True
    drift_chunks: int | None = None  # the first N chunks of the drift text (llama-perplexity --chunks); None: all
    force: bool = False
    output: Path | None = None
    root: Path = Path("/")  # where /proc and /sys are read for the host record (tests pass captured trees)
    device: str = "auto"  # the target whose host record the scores carry (edgecds.target)
    profiles_dirs: tuple[Path, ...] = ()


@dataclass(frozen=True)
class CaseResult:
    id: str
    correct: bool
    chosen: int | None  # option index; None: a generated answer that matched no option
    scores: list[float] = field(default_factory=list)  # loglik: summed log-probability of each option
    normalized_scores: list[float] = field(default_factory=list)  # divided by the option's bytes
    correct_normalized: bool | None = None
    answer: str = ""  # generate/topk: what the model said, its reasoning removed
    error: str | None = None  # plausible, off_topic, unmatched, no_answer, unlabelled (None when correct)
    specialty: str = ""
    incidence: str | None = None
    reasoning: str = ""  # a reasoning model's thinking, kept for review
    reasoning_chars: int = 0
    samples_correct: int | None = None  # pass@k: how many of the seeded samples were right
    sampled: list[str] = field(default_factory=list)  # pass@k: the seeded samples' answers, for review
    judge_correct: bool | None = None  # the local judge's grade (--judge), None when it did not grade




# --- scoring ------------------------------------------------------------------------------------


def option_logprobs(runtime: Runtime, case: Case, reuse_prefix: bool = True) -> tuple[list[float], list[int]]:
    """Each option's summed log-probability after the case's prompt, and its length in bytes.
    With `reuse_prefix` the prompt is evaluated once and the cache cut back to it for each option;
    without, each option is evaluated after the whole prompt from an empty cache."""
    prefix = runtime.tokenize(prompt_for(case))
    scores, lengths = [], []
    if reuse_prefix:
        runtime.reset()
        runtime.eval(prefix)
        first = log_softmax(runtime.logits())
    for option in case.options:
        text = " " + option.text
        tokens = runtime.tokenize(text, add_bos=False)
        if reuse_prefix:
            runtime.truncate(len(prefix))
        else:
            runtime.reset()
            runtime.eval(prefix)
            first = log_softmax(runtime.logits())
        total = float(first[tokens[0]])
        if len(tokens) > 1:
            rows = runtime.eval_logits(tokens[:-1])
            total += sum(float(log_softmax(rows[i])[tokens[i + 1]]) for i in range(len(tokens) - 1))
        scores.append(total)
        lengths.append(len(text.encode("utf-8")))
    return scores, lengths


def match_option(answer: str, case: Case) -> int | None:
    """The option a free-text answer names (the correct one by its text or any accepted synonym),
    by the matcher's rules; the longest name wins; None if it names none."""
    best = max(((mentions(answer, names(o.text, case.accepted_answers if i == case.answer_index else ())), i)
                for i, o in enumerate(case.options)), default=(0, -1))
    return best[1] if best[0] else None


def grade(answer: str, case: Case) -> tuple[bool, int | None, str | None]:
    """(correct, option chosen, error kind) of one answer: MCQ answers are matched to the options,
    open answers to the reference and its synonyms. Error kinds as the studies count them:
    a plausible differential or an off-topic option (MCQ), a diagnosis matching nothing
    (`unmatched`), or no diagnosis at all (`no_answer`)."""
    if not answer.strip():
        return False, None, "no_answer"
    if case.is_open:
        right = mentions(answer, names(case.reference, case.accepted_answers)) > 0
        return right, None, None if right else "unmatched"
    chosen = match_option(answer, case)
    return chosen == case.answer_index, chosen, _error_kind(case, chosen)


@dataclass(frozen=True)
class Reply:
    answer: str
    reasoning: str


def _reply(runtime: Runtime, user_message: str, answer_tokens: int, think_tokens: int, one_line: bool,
           pick: Picker = argmax) -> Reply:
    """The model's reply in its own chat template, thinking set aside: up to `think_tokens` of
    reasoning may come first, then `answer_tokens` of answer (one line when `one_line`)."""
    prompt = runtime.chat_prompt(user_message)
    opened = "<think>" if prompt.rstrip().endswith("<think>") else ""  # templates that open the block themselves

    thought = [-1]  # tokens of reasoning, known once it has ended; then `answer_tokens` more are allowed

    def at_answer_end(out: list[int]) -> bool:
        text = opened + runtime.detokenize(out)
        if still_thinking(text):
            return False
        if thought[0] < 0 and re.search(r"</think>|<\|channel\|>final", text, re.IGNORECASE):
            thought[0] = len(out)  # reasoning ended here: the answer's own budget starts now
        return len(out) - max(thought[0], 0) >= answer_tokens or (one_line and answer_line_done(text))

    out = generate_greedy(runtime, runtime.tokenize(prompt), answer_tokens + think_tokens, at_answer_end, pick=pick)
    answer, reasoning = split_reasoning(opened + runtime.detokenize(out))
    lines = answer_lines(answer)
    return Reply(lines[0] if one_line and lines else answer, reasoning)


def _error_kind(case: Case, chosen: int | None) -> str | None:
    if chosen == case.answer_index:
        return None
    if chosen is None:
        return "unmatched"
    return case.options[chosen].kind or "unlabelled"


def _top_lines(answer: str, k: int) -> list[str]:
    return [re.sub(r"^\s*(\d+[.)]|[-*])\s*", "", line) for line in answer.splitlines() if line.strip()][:k]


def _ask(runtime: Runtime, case: Case, mode: str, k: int, think_tokens: int, pick: Picker = argmax) -> Reply:
    question = f"{case.vignette}\n{case.question}".strip()
    if mode == "generate":
        return _reply(runtime, f"{question}\nAnswer with the diagnosis only, in a few words.", GENERATE_TOKENS, think_tokens, True, pick)
    return _reply(runtime, f"{question}\nList the {k} most likely diagnoses, most likely first, one per line, without explanations.",
                  GENERATE_TOKENS * k, think_tokens, False, pick)


def grade_reply(reply: Reply, case: Case, mode: str, k: int) -> tuple[bool, int | None, str | None]:
    if mode == "generate":
        return grade(reply.answer, case)
    graded = [grade(line, case) for line in _top_lines(reply.answer, k)]
    if not graded:
        return False, None, "no_answer"
    right = next((g for g in graded if g[0]), None)
    return right or next((g for g in graded if g[1] is not None), graded[0])


def score_case(runtime: Runtime, case: Case, mode: str, k: int = 5, think_tokens: int = 0, sampling: Sampling | None = None) -> CaseResult:
    if mode == "loglik":
        if case.is_open:
            raise UsageError(f"case {case.id} is open-ended (no options): score it with --mode generate or --mode topk")
        scores, lengths = option_logprobs(runtime, case)
        normalized = [s / n for s, n in zip(scores, lengths, strict=True)]
        best = max(range(len(scores)), key=lambda i: scores[i])
        best_norm = max(range(len(normalized)), key=lambda i: normalized[i])
        return CaseResult(case.id, best == case.answer_index, best, [round(s, 5) for s in scores], [round(s, 6) for s in normalized],
                          best_norm == case.answer_index, "", _error_kind(case, best), case.specialty, case.incidence)
    reply = _ask(runtime, case, mode, k, think_tokens)
    correct, chosen, error = grade_reply(reply, case, mode, k)
    samples = [_ask(runtime, case, mode, k, think_tokens, sampler(seed, sampling.temperature, sampling.top_p))
               for seed in sampling.seeds(case.id)] if sampling is not None and sampling.samples else []
    return CaseResult(case.id, correct, chosen, answer=reply.answer, error=error, specialty=case.specialty, incidence=case.incidence,
                      reasoning=reply.reasoning, reasoning_chars=len(reply.reasoning),
                      samples_correct=sum(grade_reply(r, case, mode, k)[0] for r in samples) if samples else None,
                      sampled=[r.answer for r in samples])


# --- metrics ------------------------------------------------------------------------------------


def _share(results: list[CaseResult]) -> dict[str, Any]:
    n, right = len(results), sum(r.correct for r in results)
    low, high = wilson_interval(right, n)
    return {"n": n, "correct": right, "accuracy": round(right / n, 4) if n else 0.0, "low": round(low, 4), "high": round(high, 4)}


def _rate(count: int, n: int) -> dict[str, Any]:
    low, high = wilson_interval(count, n)
    return {"n": count, "rate": round(count / n, 4) if n else 0.0, "low": round(low, 4), "high": round(high, 4)}


def metrics(cases: list[Case], results: list[CaseResult], n_samples: int = 0, mode: str = "loglik") -> dict[str, Any]:
    by_id = {c.id: c for c in cases}
    groups: dict[str, dict[str, list[CaseResult]]] = {"specialty": {}, "incidence": {}}
    for r in results:
        case = by_id[r.id]
        groups["specialty"].setdefault(case.specialty or "unspecified", []).append(r)
        groups["incidence"].setdefault(case.incidence or "unspecified", []).append(r)
    errors: dict[str, int] = {}
    for r in results:
        if r.error:
            errors[r.error] = errors.get(r.error, 0) + 1
    # loglik picks one option: what picking at random scores, to tell a model from a guess
    options = [len(by_id[r.id].options) for r in results if by_id[r.id].options]
    chance = ({"chance": round(sum(1 / k for k in options) / len(options), 4)}
              if mode == "loglik" and results and len(options) == len(results) else {})
    out = {**_share(results), **chance, "errors": errors, "error_rates": {kind: _rate(count, len(results)) for kind, count in sorted(errors.items())},
           "by_specialty": {k: _share(v) for k, v in sorted(groups["specialty"].items())},
           "by_incidence": {k: _share(v) for k, v in sorted(groups["incidence"].items())}}
    if results and results[0].samples_correct is not None and n_samples:
        out["pass_at"] = {str(k): round(sum(pass_at_k(n_samples, r.samples_correct or 0, k) for r in results) / len(results), 4)
                          for k in PASS_AT if k <= n_samples}
        out["samples"] = n_samples
    if any(r.reasoning_chars for r in results):
        out["reasoning_chars_median"] = sorted(r.reasoning_chars for r in results)[len(results) // 2]
    if results and results[0].correct_normalized is not None:
        right = sum(bool(r.correct_normalized) for r in results)
        low, high = wilson_interval(right, len(results))
        out["normalized"] = {"correct": right, "accuracy": round(right / len(results), 4), "low": round(low, 4), "high": round(high, 4)}
    return out


def paired(reference: list[CaseResult], variant: list[CaseResult]) -> dict[str, Any]:
    c = paired_comparison([r.correct for r in reference], [v.correct for v in variant])
    return {"n": c.n, "lost": c.lost, "gained": c.gained, "flip_rate": round(c.flip_rate, 4), "difference": round(c.difference, 4),
            "low": round(c.low, 4), "high": round(c.high, 4), "p_value": round(c.p_value, 6), "verdict": c.verdict}


# --- drift --------------------------------------------------------------------------------------


def _drift_cache(folder: Path, reference: VariantRecord, text: str, chunks: int | None) -> Path:
    return folder / DRIFT_CACHE / f"{reference.sha256[:16]}-{cache_key(text, length=12)}-ctx{DRIFT_CTX}{f'-c{chunks}' if chunks else ''}.npz"


def _save_reference(path: Path, logprobs: Any, targets: Any) -> None:
    import numpy as np

    with atomic_path(path) as tmp, open(tmp, "wb") as fh:  # float16: 2 bytes a vocabulary entry and position
        np.savez(fh, logprobs=logprobs.astype(np.float16), targets=targets)


def _load_reference(path: Path) -> tuple[Any, Any] | None:
    import numpy as np

    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as data:
        return data["logprobs"].astype(np.float32), data["targets"]


# --- the pipeline -------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalOutcome:
    record: EvalRecord
    reused: bool


@dataclass(frozen=True)
class EvalResult:
    results_file: str
    cases: str
    mode: str
    reference: str
    outcomes: tuple[EvalOutcome, ...]
    review_file: str | None = None  # the unmatched answers, as CSV (generate/topk)

    def to_dict(self) -> dict[str, Any]:
        return {"results_file": self.results_file, "cases": self.cases, "mode": self.mode, "reference": self.reference,
                "review_file": self.review_file, "evaluations": [dict(asdict(o.record), reused=o.reused) for o in self.outcomes]}


def reference_of(records: list[VariantRecord]) -> VariantRecord:
    from edgecds.formats.types import QUANT_TYPE_BY_NAME

    floats = [v for v in records if v.type in QUANT_TYPE_BY_NAME and QUANT_TYPE_BY_NAME[v.type].is_float]
    if not floats:
        adopted = any(v.options.get("adopted") for v in records)
        raise UsageError("no float variant (F16, BF16 or F32) to compare with; " + (
            "eval pairs each variant with the same model unquantized: give the folder holding both GGUF files (the model's F16 "
            "GGUF beside this one)" if adopted else "run `edgecds quantize` with F16 among --types"))
    return max(floats, key=lambda v: v.file_size)


def _with_references(variants: VariantsFile, folder: Path, types: tuple[str, ...]) -> tuple[dict[str, VariantRecord], list[VariantRecord]]:
    """The float reference of each format, and the variants to score, each format's reference
    first. Each format is paired with its own reference (F16 GGUF, fp32 ONNX): the engines differ,
    so a flip across formats would mix quantization with engine differences."""
    picked = variants.select(types, folder)
    references: dict[str, VariantRecord] = {}
    chosen: list[VariantRecord] = []
    for fmt in sorted({v.format for v in variants.variants}, key=lambda f: f != "gguf"):
        wanted = [v for v in picked if v.format == fmt]
        if not wanted:
            continue
        reference = reference_of([v for v in variants.variants if v.format == fmt])  # always scored: flips need it
        references[fmt] = reference
        chosen += [reference] + [v for v in wanted if v is not reference]
    return references, chosen


def run_eval(config: EvalConfig, reporter: Reporter | None = None, target: Target | None = None) -> EvalResult:
    """Score the variants; `target` is the caller's resolved target (profile passes its own, so
    both record the same host), resolved from the config when not given."""
    from edgecds.judge import variant_identity

    if config.mode not in MODES:
        raise UsageError(f"unknown mode {config.mode!r}; known: {', '.join(MODES)}")
    folder, variants = open_variants(config.variants)
    case_set = load_cases(config.cases)
    cases = list(case_set.cases[: config.limit] if config.limit else case_set.cases)
    if config.mode == "loglik" and any(c.is_open for c in cases):
        raise UsageError(f"{case_set.name} has open-ended cases (no options): score them with --mode generate or --mode topk")
    if config.judge is not None and config.mode == "loglik":
        raise UsageError("the judge grades free-text answers: use it with --mode generate or --mode topk")
    if config.sampling.samples and config.mode == "loglik":
        raise UsageError("pass@k samples answers: use it with --mode generate or --mode topk")
    references, chosen = _with_references(variants, folder, config.types)
    fp = (target or resolve_target(config.device, config.profiles_dirs, config.root)).fingerprint
    settings = EngineSettings(n_ctx=max(config.n_ctx, DRIFT_CTX), threads=config.threads)
    text = drift_text()
    output = config.output or folder / RESULTS_FILE
    spec = {"cases": case_set.name, "cases_sha256": case_set.sha256, "n_cases": len(cases), "mode": config.mode,
            "k": config.k if config.mode == "topk" else None, "drift": config.drift, "settings": asdict(settings),
            **({"drift_chunks": config.drift_chunks} if config.drift and config.drift_chunks else {}),
            **({"think_tokens": config.think_tokens, "sampling": asdict(config.sampling)} if config.mode != "loglik" else {}),
            **({"judge": variant_identity(config.judge)} if config.judge is not None else {})}
    with folder_lock(output.parent):
        results = load_results(output) or ResultsFile()
        results.hosts[fp.id] = fp
        done: list[EvalOutcome] = []
        per_case: dict[str, list[CaseResult]] = {}
        for n, variant in enumerate(chosen, 1):
            label = f"[{n}/{len(chosen)}] {variant.type}"
            key = EvalRecord.make_key(variant.sha256, spec, fp.id)
            previous = next((e for e in results.evaluations if e.key == key), None)
            if previous is not None and not config.force:
                if reporter:
                    reporter.note(f"{label}: already evaluated on these cases on this host, reused")
                per_case[variant.type] = [CaseResult(**{k: v for k, v in c.items() if k != "flipped"}) for c in previous.per_case]
                done.append(EvalOutcome(previous, True))
                continue
            record, per_case[variant.type] = _evaluate(folder, variant, references[variant.format], cases, case_set, config, settings, spec,
                                                       key, fp.id, text, reporter, label)
            record = replace(record, reference_origin=variants.source.origin)
            results.evaluations = [e for e in results.evaluations if e.key != key] + [record]
            results.save(output)
            done.append(EvalOutcome(record, False))
        final = [_paired_outcome(outcome, references, per_case, results) for outcome in done]
        results.save(output)
        review = _write_unmatched(output, final, cases) if config.mode != "loglik" else None
    return EvalResult(str(output), case_set.name, config.mode, ", ".join(r.type for r in references.values()), tuple(final),
                      str(review) if review else None)


def _cell(text: str) -> str:
    # model output opened in a spreadsheet: a leading =, +, - or @ would be read as a formula
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def _write_unmatched(output: Path, outcomes: list[EvalOutcome], cases: list[Case]) -> Path | None:
    """The answers that matched nothing, for a clinician to read: beside results.json, as CSV."""
    import csv
    import io

    by_id = {c.id: c for c in cases}
    rows = [[_cell(text) for text in (o.record.variant.type, o.record.variant.format, o.record.mode, c["id"], by_id[c["id"]].specialty,
                                       by_id[c["id"]].incidence or "", by_id[c["id"]].diagnosis, c["answer"], str(c.get("reasoning_chars", 0)))]
            for o in outcomes for c in o.record.per_case if c.get("error") in ("unmatched", "no_answer")]  # case files are untrusted too
    path = output.with_name(f"{output.stem}-unmatched.csv")
    if not rows:
        path.unlink(missing_ok=True)  # an earlier run's list would read as this run's
        return None
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["variant", "format", "mode", "case", "specialty", "incidence", "reference", "answer", "reasoning_chars"])
    writer.writerows(rows)
    with atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue(), encoding="utf-8")
    return path


def _paired_outcome(outcome: EvalOutcome, references: dict[str, VariantRecord], per_case: dict[str, list[CaseResult]],
                    results: ResultsFile) -> EvalOutcome:
    """The outcome paired with its reference, now that both are scored on the same cases; the
    record in `results` is replaced when the pairing changed it."""
    rec = outcome.record
    reference = references[rec.variant.format]
    reference_correct = {c.id: c.correct for c in per_case[reference.type]}
    pairing = None if rec.variant.type == reference.type else paired(per_case[reference.type], per_case[rec.variant.type])
    # each case says whether it flipped against the reference, so a reviewer sees which
    cases_flipped = [{**c, "flipped": c["correct"] != reference_correct[c["id"]]} for c in rec.per_case]
    if pairing != rec.paired or cases_flipped != rec.per_case:
        rec = replace(rec, paired=pairing, reference=reference.type, per_case=cases_flipped)
        results.evaluations = [e for e in results.evaluations if e.key != rec.key] + [rec]
    return EvalOutcome(rec, outcome.reused)


def _evaluate(folder: Path, variant: VariantRecord, reference: VariantRecord, cases: list[Case], case_set: CaseSet, config: EvalConfig,
              settings: EngineSettings, spec: dict[str, Any], key: str, host_id: str, text: str, reporter: Reporter | None,
              label: str) -> tuple[EvalRecord, list[CaseResult]]:
    from edgecds.formats.gguf_file import read_gguf

    start = time.perf_counter()
    path = check_unchanged(folder, variant)
    if variant.format == "gguf":
        read_gguf(path)  # the bounded header check, before the engine sees the file (ONNX: the runtime checks its folder)
    runtime = open_runtime(path, settings)
    try:
        results: list[CaseResult] = []
        if reporter:
            reporter.start(f"{label}: {len(cases)} cases ({config.mode})", len(cases), "cases")
        for i, case in enumerate(cases):
            results.append(score_case(runtime, case, config.mode, config.k, config.think_tokens, config.sampling))
            if reporter:
                reporter.advance_to(i + 1)
        if reporter:
            reporter.finish()
        drift = _drift(folder, runtime, variant, reference, text, config.drift_chunks, reporter, label) if config.drift else None
    finally:
        runtime.close()
    judged = _judge(config, cases, results, settings, reporter, label) if config.judge is not None else None
    record = EvalRecord(
        variant=VariantRef.of(variant), host=host_id, cases={"name": case_set.name, "sha256": case_set.sha256, "n": len(cases), "style": case_set.imported_from},
        mode=config.mode, spec=spec, metrics=dict(metrics(cases, results, config.sampling.samples, config.mode), **({"judge": judged} if judged else {})), reference=reference.type, paired=None, drift=drift,
        per_case=[asdict(r) for r in results], key=key, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        seconds=round(time.perf_counter() - start, 2),
    )
    return record, results


def _judge(config: EvalConfig, cases: list[Case], results: list[CaseResult], settings: EngineSettings, reporter: Reporter | None,
           label: str) -> dict[str, Any]:
    """The judge's grade of every answer it can grade (an empty answer is not graded), in place,
    and its agreement with the matcher."""
    from edgecds.judge import Judge, agreement

    assert config.judge is not None
    judge = Judge.open(config.judge, settings)
    by_id = {c.id: c for c in cases}
    try:
        if reporter:
            reporter.start(f"{label}: judged by {config.judge.name}", len(results), "answers")
        for i, r in enumerate(results):
            if r.answer.strip():
                case = by_id[r.id]
                results[i] = replace(r, judge_correct=judge.grade(case.diagnosis, case.accepted_answers, r.answer, config.mode))
            if reporter:
                reporter.advance_to(i + 1)
        if reporter:
            reporter.finish()
        graded = [r for r in results if r.judge_correct is not None]
        return dict(judge.identity(config.mode), **agreement([r.correct for r in graded], [bool(r.judge_correct) for r in graded]))
    finally:
        judge.close()


def _drift(folder: Path, runtime: Runtime, variant: VariantRecord, reference: VariantRecord, text: str, chunks: int | None,
           reporter: Reporter | None, label: str) -> dict[str, Any] | None:
    """The variant's drift from its reference on the first `chunks` chunks of `text` (None: all)."""

    def on_chunk(done: int, total: int) -> None:
        if reporter:
            if done == 0:
                reporter.start(f"{label}: drift on the clinical text", total, "chunks")
            reporter.advance_to(done)

    try:
        logprobs, targets = drift_logprobs(runtime, text, on_chunk, chunks)
    finally:
        if reporter:
            reporter.finish()
    cache = _drift_cache(folder, reference, text, chunks)
    if variant.sha256 == reference.sha256:
        _save_reference(cache, logprobs, targets)
        base = _load_reference(cache)  # compare with what later variants will read: float16 on disk
    else:
        base = _load_reference(cache)
        if base is None:  # cannot happen in one run (the reference goes first); a deleted cache
            raise InvalidInputError(f"{cache} is missing; run `edgecds eval --force` to score the reference again")
    assert base is not None
    return drift_against(base[0], logprobs, base[1])
