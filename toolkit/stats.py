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


def verdict_at(p_value: float, difference: float, alpha: float) -> str:
    """"better"/"worse at alpha" or "no difference shown"; never "equivalent" (no TOST is run)."""
    if p_value < alpha:
        return f"{'worse' if difference < 0 else 'better'} at {alpha:g}"
    return "no difference shown"


def paired_comparison(reference: list[bool], variant: list[bool], z: float = Z95) -> PairedComparison:
    """Flips, exact McNemar p-value, and the accuracy difference (variant - reference) with its 95%
    interval by Newcombe's hybrid score method for paired proportions (Stat Med 1998;17:2635,
    method 10): built from the two Wilson intervals and the correlation of the paired outcomes,
    it stays inside [-1, 1] and, unlike the Wald interval, is not zero-width when nothing flipped."""
    if len(reference) != len(variant):
        raise ValueError("paired results must cover the same cases")
    n = len(reference)
    if n == 0:
        return PairedComparison(0, 0, 0, 0.0, -1.0, 1.0, 1.0)
    pairs = list(zip(reference, variant, strict=True))
    both = sum(r and v for r, v in pairs)
    lost = sum(r and not v for r, v in pairs)
    gained = sum(v and not r for r, v in pairs)
    neither = n - both - lost - gained
    p_ref, p_var = (both + lost) / n, (both + gained) / n
    l_ref, u_ref = wilson_interval(both + lost, n, z)
    l_var, u_var = wilson_interval(both + gained, n, z)
    margins = (both + lost) * (gained + neither) * (both + gained) * (lost + neither)
    phi = (both * neither - lost * gained) / math.sqrt(margins) if margins else 0.0
    difference = p_var - p_ref
    below = math.sqrt(max(0.0, (p_var - l_var) ** 2 - 2 * phi * (p_var - l_var) * (u_ref - p_ref) + (u_ref - p_ref) ** 2))
    above = math.sqrt(max(0.0, (u_var - p_var) ** 2 - 2 * phi * (u_var - p_var) * (p_ref - l_ref) + (p_ref - l_ref) ** 2))
    return PairedComparison(n, lost, gained, difference, max(-1.0, difference - below), min(1.0, difference + above), mcnemar_exact(lost, gained))


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of Chen et al. (2021, "Evaluating Large Language Models Trained on
    Code"): with c of n samples correct, the chance that k drawn without replacement hold at least
    one correct, 1 - C(n-c, k) / C(n, k)."""
    if not 0 < k <= n or not 0 <= c <= n:
        raise ValueError(f"pass@{k} needs 0 < k <= n and 0 <= c <= n (n={n}, c={c})")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment (1979): the i-th smallest of m p-values times (m - i + 1), kept
    non-decreasing and capped at 1; comparing the adjusted values with alpha controls the chance of
    any false "better/worse" across all m comparisons at alpha."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def cohen_kappa(a: list[bool], b: list[bool], z: float = Z95) -> tuple[float, float, float]:
    """Cohen's kappa of two raters' yes/no grades on the same items, with its large-sample 95%
    interval (standard error sqrt(po (1 - po) / (n (1 - pe)^2)), Cohen 1960); (kappa, low, high)."""
    if len(a) != len(b):
        raise ValueError("both raters must grade the same items")
    n = len(a)
    if n == 0:
        return (0.0, -1.0, 1.0)
    po = sum(x == y for x, y in zip(a, b, strict=True)) / n
    pa, pb = sum(a) / n, sum(b) / n
    pe = pa * pb + (1 - pa) * (1 - pb)
    if pe >= 1.0:  # both raters constant and alike: agreement is total but kappa is undefined
        return (1.0 if po == 1.0 else 0.0, -1.0, 1.0)
    kappa = (po - pe) / (1 - pe)
    se = math.sqrt(po * (1 - po) / (n * (1 - pe) ** 2))
    return (kappa, max(-1.0, kappa - z * se), min(1.0, kappa + z * se))
