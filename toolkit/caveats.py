"""What a reader must know before trusting accuracy figures, said the same way wherever the float
reference is named (eval's table, the bundle's card and output, the report): the reference is not
the original weights, or it answers no better than chance."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from edgecds.results import EvalRecord


def at_chance(metrics: dict[str, Any]) -> bool:
    """The 95% interval reaches what picking an option at random scores (loglik on options only)."""
    chance, low = metrics.get("chance"), metrics.get("low")
    return isinstance(chance, (int, float)) and isinstance(low, (int, float)) and low <= chance


def origin_caveat(record: EvalRecord) -> str:
    """The reference is not the original weights ('' when it is)."""
    if not record.reference_origin:
        return ""
    return (f"The reference {record.reference} was {record.reference_origin}: drift and flips against it show only what "
            "quantizing it again changed.")


def chance_caveat(record: EvalRecord) -> str:
    """The record's accuracy cannot be told from guessing ('' when it can)."""
    m = record.metrics
    if not at_chance(m):
        return ""
    role = "the reference " if record.paired is None else ""
    return (f"WARNING: {role}{record.variant.type} ({record.variant.format}) scores {m['accuracy']:.1%} on {record.cases['name']} "
            f"(95% interval from {m['low']:.1%}), no better than picking an option at random ({m['chance']:.1%}): "
            "its accuracy says nothing about clinical use.")


def record_caveats(record: EvalRecord) -> list[str]:
    """What limits one evaluation: its reference's origin, and whether it beats chance."""
    return [line for line in (origin_caveat(record), chance_caveat(record)) if line]


def reference_caveats(records: Sequence[EvalRecord]) -> list[str]:
    """The origin any record names, and the chance warning of every reference among them, once each."""
    lines = [origin_caveat(r) for r in records] + [chance_caveat(r) for r in records if r.paired is None]
    return list(dict.fromkeys(line for line in lines if line))
