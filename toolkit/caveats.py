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


def record_caveats(record: EvalRecord) -> list[str]:
    """What limits one evaluation: its reference's origin, and whether it beats chance."""
    lines = []
    if record.reference_origin:
        lines.append(f"The reference {record.reference} was {record.reference_origin}: drift and flips against it show only what "
                     "quantizing it again changed.")
    m = record.metrics
    if at_chance(m):
        role = "the reference " if record.paired is None else ""
        lines.append(f"WARNING: {role}{record.variant.type} ({record.variant.format}) scores {m['accuracy']:.1%} on {record.cases['name']} "
                     f"(95% interval from {m['low']:.1%}), no better than picking an option at random ({m['chance']:.1%}): "
                     "its accuracy says nothing about clinical use.")
    return lines


def reference_caveats(records: Sequence[EvalRecord]) -> list[str]:
    """The caveats of every reference among the records (and the origin any record names), once each."""
    lines = [line for r in records if r.paired is None for line in record_caveats(r)]
    lines += [line for r in records if r.paired is not None for line in record_caveats(r) if not line.startswith("WARNING")]
    return list(dict.fromkeys(lines))
