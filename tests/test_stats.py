"""Statistics against hand-computed values."""

from __future__ import annotations

import pytest

from edgecds.stats import cohen_kappa, holm, mcnemar_exact, paired_comparison, pass_at_k, verdict_at, wilson_interval


@pytest.mark.parametrize("k, n, low, high", [
    (5, 10, 0.2366, 0.7634),  # symmetric around 0.5
    (0, 10, 0.0, 0.2775),  # 3.8415 / 13.8415: never below 0, unlike the normal interval
    (10, 10, 0.7225, 1.0),
    (81, 100, 0.7222, 0.8749),  # centre (0.81 + 0.019208) / 1.038415 = 0.7985, half 0.0763
])
def test_wilson_interval(k: int, n: int, low: float, high: float) -> None:
    got = wilson_interval(k, n)
    assert got == pytest.approx((low, high), abs=1e-4)


@pytest.mark.parametrize("b, c, p", [
    (0, 0, 1.0),
    (1, 9, 2 * (1 + 10) / 1024),  # 2 * P(X <= 1), X ~ Bin(10, 1/2) = 0.021484375
    (0, 5, 2 / 32),  # 2 * P(X = 0) with 5 discordant cases
    (3, 3, 1.0),  # 2 * P(X <= 3) with n = 6 is 1.3125: capped at 1
    (2, 8, 2 * (1 + 10 + 45) / 1024),  # 0.109375
])
def test_exact_mcnemar(b: int, c: int, p: float) -> None:
    assert mcnemar_exact(b, c) == pytest.approx(p, abs=1e-12)
    assert mcnemar_exact(c, b) == pytest.approx(p, abs=1e-12)  # two-sided: symmetric


def test_paired_comparison_hand_computed() -> None:
    # 20 cases: 12 right with both, 1 lost (ref right, variant wrong), 5 gained, 2 wrong with both
    reference = [True] * 12 + [True] * 1 + [False] * 5 + [False] * 2
    variant = [True] * 12 + [False] * 1 + [True] * 5 + [False] * 2
    c = paired_comparison(reference, variant)
    assert (c.n, c.lost, c.gained) == (20, 1, 5)
    assert c.flip_rate == pytest.approx(6 / 20)
    assert c.difference == pytest.approx(4 / 20)
    # Newcombe's method 10, by hand: Wilson(17/20) = (0.63960, 0.94765), Wilson(13/20) = (0.43286, 0.81882),
    # phi = (12*2 - 1*5) / sqrt(13*7*17*3) = 0.27890;
    # below = sqrt(0.21040^2 - 2*0.27890*0.21040*0.16882 + 0.16882^2) = 0.23012
    # above = sqrt(0.09765^2 - 2*0.27890*0.09765*0.21714 + 0.21714^2) = 0.21180
    assert (c.low, c.high) == pytest.approx((0.2 - 0.23012, 0.2 + 0.21180), abs=2e-4)
    assert c.p_value == pytest.approx(2 * (1 + 6) / 64)  # 0.21875
    assert c.verdict == "not significantly different"
    worse = paired_comparison([True] * 12, [False] * 12)
    assert worse.p_value == pytest.approx(2 / 4096) and worse.verdict == "significantly worse"
    assert worse.difference == -1.0 and worse.low == -1.0 and worse.high < -0.5
    # nothing flipped: no difference found, but the interval is not zero-width (the Wald one would be)
    same = paired_comparison([True] * 10 + [False] * 30, [True] * 10 + [False] * 30)
    assert same.difference == 0 and same.low < -0.03 and same.high > 0.03 and same.verdict == "not significantly different"


def test_pass_at_k_hand_computed() -> None:
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)  # 1 - C(3,1)/C(5,1) = 1 - 3/5
    assert pass_at_k(5, 2, 3) == pytest.approx(0.9)  # 1 - C(3,3)/C(5,3) = 1 - 1/10
    assert pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 3, 3) == 1.0  # 2 wrong cannot fill 3 draws
    assert pass_at_k(10, 4, 1) == pytest.approx(0.4)  # pass@1 is the share correct
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 5)


def test_holm_hand_computed() -> None:
    # sorted: 0.005 x4 = 0.02; 0.01 x3 = 0.03; 0.03 x2 = 0.06; 0.04 x1 = 0.04 -> kept at 0.06 (monotone)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([]) == []


def test_cohen_kappa_hand_computed() -> None:
    a = [True, True, True, False, False, False, True, False, True, True]
    b = [True, True, False, False, False, True, True, False, True, False]
    kappa, low, high = cohen_kappa(a, b)
    # po = 7/10, pe = 0.6 x 0.5 + 0.4 x 0.5 = 0.5 -> kappa 0.4; se = sqrt(0.7 x 0.3 / (10 x 0.25)) = 0.289828
    assert kappa == pytest.approx(0.4)
    assert (low, high) == (pytest.approx(0.4 - 1.959964 * 0.289828, abs=1e-5), pytest.approx(0.4 + 1.959964 * 0.289828, abs=1e-5))
    assert cohen_kappa(a, a)[0] == pytest.approx(1.0)


def test_verdicts_never_say_equivalent() -> None:
    assert verdict_at(0.004, -0.1, 0.01) == "worse at 0.01" and verdict_at(0.004, 0.1, 0.01) == "better at 0.01"
    assert verdict_at(0.02, -0.1, 0.01) == "no difference shown"
