"""Statistics for accuracy on small case sets: intervals and paired tests that stay honest at n=150.

Plain formulas, no dependency: each is a few lines and is checked against hand-computed values in
tests/test_stats.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Z95 = 1.959963984540054  # the standard normal's 97.5th percentile


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion: unlike the normal approximation it stays inside
    [0, 1] and keeps its coverage when the accuracy is near 0 or 1 or n is small."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: under no difference the b + c discordant cases split as a
    fair coin, so p = 2 * P(X <= min(b, c)) for X ~ Binomial(b + c, 1/2), capped at 1."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


@dataclass(frozen=True)
class PairedComparison:
    """A variant against the reference on the same cases."""

    n: int
    lost: int  # right with the reference, wrong with the variant
    gained: int  # wrong with the reference, right with the variant
    difference: float  # variant accuracy - reference accuracy
    low: float
    high: float
    p_value: float  # exact McNemar

    @property
    def flip_rate(self) -> float:
        return (self.lost + self.gained) / self.n if self.n else 0.0

    @property
    def verdict(self) -> str:
        """Never "equivalent": a test that finds no difference has not shown there is none."""
        if self.p_value < 0.05:
            return "significantly worse" if self.difference < 0 else "significantly better"
        return "not significantly different"


def paired_comparison(reference: list[bool], variant: list[bool], z: float = Z95) -> PairedComparison:
    """Flips, exact McNemar p-value, and the accuracy difference with its 95% interval (the Wald
    interval for paired proportions: d +/- z * sqrt(b + c - (c - b)^2 / n) / n)."""
    if len(reference) != len(variant):
        raise ValueError("paired results must cover the same cases")
    n = len(reference)
    lost = sum(r and not v for r, v in zip(reference, variant, strict=True))
    gained = sum(v and not r for r, v in zip(reference, variant, strict=True))
    if n == 0:
        return PairedComparison(0, 0, 0, 0.0, 0.0, 0.0, 1.0)
    difference = (gained - lost) / n
    half = z * math.sqrt(max(0.0, lost + gained - (gained - lost) ** 2 / n)) / n
    return PairedComparison(n, lost, gained, difference, difference - half, difference + half, mcnemar_exact(lost, gained))
