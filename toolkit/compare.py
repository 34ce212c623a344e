"""`edgecds compare`: evaluated variants, of one model or of several, tested against each other.

Every pair of evaluations found in the results files is paired on the cases both scored (by case
id): exact McNemar on the discordant cases, the accuracy difference (second minus first) with
Newcombe's interval, and the p-values adjusted by Holm across every comparison in the run (and,
separately, across every subgroup comparison: by specialty and by incidence). A verdict is
"better/worse at alpha" or "no difference shown", never "equivalent": failing to find a
difference on 100 cases does not show there is none.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

from edgecds.errors import InvalidInputError, UsageError
from edgecds.results import EvalRecord, load_results
from edgecds.stats import holm, paired_comparison, verdict_at

DEFAULT_ALPHA = 0.01  # the distill-vs-base study's threshold


@dataclass(frozen=True)
class Scored:
    """One evaluation: a variant on a case set in one mode, its per-case outcome."""

    label: str
    source: str  # the results file it came from
    correct: dict[str, bool]
    groups: dict[str, dict[str, str]]  # case id -> {"specialty": ..., "incidence": ...}


@dataclass
class Comparison:
    first: str
    second: str
    group: str  # "all", or "specialty: cardiology", "incidence: rare"
    n: int
    first_correct: int
    second_correct: int
    lost: int  # right with the first, wrong with the second
    gained: int
    difference: float  # second - first
    low: float
    high: float
    p_value: float
    p_holm: float = 1.0
    verdict: str = ""


@dataclass
class CompareResult:
    alpha: float
    evaluations: list[str]
    comparisons: list[Comparison] = field(default_factory=list)
    subgroups: list[Comparison] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "evaluations": self.evaluations, "correction": "Holm",
                "comparisons": [asdict(c) for c in self.comparisons], "subgroups": [asdict(c) for c in self.subgroups]}


def _label(record: EvalRecord) -> str:
    k = f" k={record.spec['k']}" if record.spec.get("k") else ""
    think = f" think={record.spec['think_tokens']}" if record.spec.get("think_tokens") is not None else ""
    return f"{record.variant.name} [{record.mode}{k}{think}, {record.cases['name']}]"


def load_scored(paths: list[Path]) -> list[Scored]:
    """Every evaluation in the files, the latest of each (variant, mode, cases) kept."""
    latest: dict[tuple[str, ...], tuple[EvalRecord, str]] = {}
    for path in paths:
        results = load_results(path)
        if results is None:
            raise InvalidInputError(f"{path}: no such results file; run `edgecds eval` first")
        for record in results.evaluations:
            key = (record.variant.sha256, record.mode, str(record.spec.get("k")), str(record.spec.get("think_tokens")), record.cases["sha256"])
            if key not in latest or record.created > latest[key][0].created:
                latest[key] = (record, str(path))
    labels = [_label(r) for r, _ in latest.values()]
    # two builds of one name, or an edited case file of one name: told apart by their hashes
    labels = [f"{label} (variant {r.variant.sha256[:8]}, cases {r.cases['sha256'][:8]})" if labels.count(label) > 1 else label
              for label, (r, _) in zip(labels, latest.values(), strict=True)]
    return [Scored(label, source, {c["id"]: bool(c["correct"]) for c in r.per_case},
                   {c["id"]: {"specialty": c.get("specialty") or "unspecified", "incidence": c.get("incidence") or "unspecified"}
                    for c in r.per_case})
            for label, (r, source) in zip(labels, latest.values(), strict=True)]


def _compare(a: Scored, b: Scored, ids: list[str], group: str) -> Comparison:
    first, second = [a.correct[i] for i in ids], [b.correct[i] for i in ids]
    c = paired_comparison(first, second)
    return Comparison(a.label, b.label, group, c.n, sum(first), sum(second), c.lost, c.gained, round(c.difference, 4), round(c.low, 4),
                      round(c.high, 4), c.p_value)


def _adjust(comparisons: list[Comparison], alpha: float) -> None:
    for c, p in zip(comparisons, holm([c.p_value for c in comparisons]), strict=True):
        c.p_holm = round(p, 6)
        c.verdict = verdict_at(p, c.difference, alpha)


def compare(paths: list[Path], alpha: float = DEFAULT_ALPHA) -> CompareResult:
    scored = load_scored(paths)
    if len(scored) < 2:
        raise UsageError(f"{len(scored)} evaluation(s) found; compare needs two or more (run `edgecds eval` on the variants first)")
    result = CompareResult(alpha, [s.label for s in scored])
    for a, b in combinations(scored, 2):
        shared = sorted(set(a.correct) & set(b.correct))
        if not shared:
            continue
        result.comparisons.append(_compare(a, b, shared, "all"))
        for kind in ("specialty", "incidence"):
            for value in sorted({a.groups[i][kind] for i in shared}):
                ids = [i for i in shared if a.groups[i][kind] == value]
                result.subgroups.append(_compare(a, b, ids, f"{kind}: {value}"))
    if not result.comparisons:
        raise UsageError("the evaluations share no case: evaluate the variants on the same case file (`edgecds eval --cases ...`)")
    _adjust(result.comparisons, alpha)
    _adjust(result.subgroups, alpha)
    return result
