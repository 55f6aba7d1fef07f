"""Paired drop statistics, McNemar p-values and the Pareto front, checked against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from calibration.errors import RqInputError
from quantize.measure.stats import (
    MIN_ROUNDS_FOR_INTERVAL,
    PairedDrop,
    clopper_pearson,
    counterbalanced_speed_ratio,
    paired_drop,
    pareto_front,
    speed_ratio_interval,
    tango_interval,
)


def _flipped_pair() -> tuple[list[bool], list[bool]]:
    """A right on 90/100; B loses 3 of those (T→F) and gains 1 of A's misses (F→T)."""
    a = [True] * 90 + [False] * 10
    b = list(a)
    b[0] = b[1] = b[2] = False
    b[95] = True
    return a, b


def _cp_3_of_4() -> tuple[float, float]:
    """Clopper–Pearson 95% for 3 successes of 4, solved from the closed-form binomial tails.

    Lower: P(X >= 3) = 4p³(1−p) + p⁴ = −3p⁴ + 4p³ = 0.025 (root in (0, 1));
    upper: P(X <= 3) = 1 − p⁴ = 0.025  →  p = 0.975^(1/4).
    """
    roots = np.roots([-3.0, 4.0, 0.0, 0.0, -0.025])
    real = [r.real for r in roots if abs(r.imag) < 1e-12 and 0 < r.real < 1]
    return min(real), 0.975**0.25


def test_closed_form_matches_published_interval():
    low, high = _cp_3_of_4()
    assert low == pytest.approx(0.1941, abs=1e-4)
    assert high == pytest.approx(0.9937, abs=1e-4)


def test_clopper_pearson_3_of_4():
    low, high = clopper_pearson(3, 4, 0.95)
    exp_low, exp_high = _cp_3_of_4()
    assert low == pytest.approx(exp_low, abs=1e-9)
    assert high == pytest.approx(exp_high, abs=1e-9)


def test_clopper_pearson_edges():
    # x = 0 of 10: upper bound solves (1 − p)^10 = 0.025.
    low, high = clopper_pearson(0, 10)
    assert low == 0.0
    assert high == pytest.approx(1 - 0.025**0.1, abs=1e-9)
    low, high = clopper_pearson(10, 10)
    assert low == pytest.approx(0.025**0.1, abs=1e-9)
    assert high == 1.0
    assert clopper_pearson(0, 0) == (0.0, 1.0)


def test_clopper_pearson_large_m_is_stable():
    # 12 345 of 50 000: the exact interval must be close to the normal approximation at this size.
    x, m = 12345, 50000
    low, high = clopper_pearson(x, m)
    p = x / m
    half = 1.959964 * math.sqrt(p * (1 - p) / m)
    assert low == pytest.approx(p - half, abs=2e-4)
    assert high == pytest.approx(p + half, abs=2e-4)
    assert low < p < high


def test_exact_paired_drop_hand_case():
    a, b = _flipped_pair()
    d = paired_drop(a, b, disagreements=6, method="exact")
    assert isinstance(d, PairedDrop)
    assert d.n == 100
    assert d.a_only == 3 and d.b_only == 1
    assert d.disagreements == 6
    assert d.top1_a == pytest.approx(90.0)
    assert d.top1_b == pytest.approx(88.0)
    assert d.drop_pt == pytest.approx(2.0)
    # m = 4 discordant of n = 100: drop = m/n · (2p − 1), in points.
    p_low, p_high = _cp_3_of_4()
    assert d.ci_low_pt == pytest.approx(100 * 4 / 100 * (2 * p_low - 1), abs=1e-7)
    assert d.ci_high_pt == pytest.approx(100 * 4 / 100 * (2 * p_high - 1), abs=1e-7)
    assert d.ci_low_pt < 0 < d.ci_high_pt
    assert d.significant is False
    assert d.method == "exact" and d.confidence == 0.95


def test_disagreements_default_is_discordant_count():
    a, b = _flipped_pair()
    assert paired_drop(a, b).disagreements == 4


def test_significant_drop():
    # 30 images lost, none gained, out of 1000: clearly a real drop.
    a = np.ones(1000, dtype=bool)
    b = a.copy()
    b[:30] = False
    d = paired_drop(a, b)
    assert d.drop_pt == pytest.approx(3.0)
    assert d.ci_low_pt > 0
    assert d.significant is True
    assert d.method == "score"
    # The conditional interval ends exactly at the measured m/n when every discordant pair goes one way
    # (p_high = 1); the score interval, which does not hold m fixed, reaches above it.
    assert paired_drop(a, b, method="exact").ci_high_pt == pytest.approx(3.0)
    assert d.ci_high_pt > 3.5


def test_identical_arrays_still_give_an_interval_by_default():
    """No image discordant on 100 is not proof of a zero drop: the score interval is ±z²/(n + z²)."""
    a = [True, False, True, True, False] * 20
    d = paired_drop(a, list(a))
    z2 = 1.959963984540054**2
    assert d.drop_pt == 0.0 and d.significant is False
    assert d.ci_low_pt == pytest.approx(-100 * z2 / (100 + z2), abs=1e-6)
    assert d.ci_high_pt == pytest.approx(100 * z2 / (100 + z2), abs=1e-6)


def test_tango_interval_matches_the_published_example():
    """Fagerland, Lydersen & Laake (Stat Med 2014), airway hyper-responsiveness data (n12 = 1, n21 = 7, N = 21): Tango's
    asymptotic score interval −0.517 to −0.026."""
    low, high = tango_interval(1, 7, 21)
    assert low == pytest.approx(-0.517, abs=5e-4) and high == pytest.approx(-0.026, abs=5e-4)
    # all pairs on one side: the bound on that side is the estimate itself (±1), the other one finite
    assert tango_interval(5, 0, 5)[1] == 1.0 and 0 < tango_interval(5, 0, 5)[0] < 1
    assert tango_interval(0, 3, 3)[0] == -1.0
    for bad in ((3, 3, 5), (-1, 0, 5)):
        with pytest.raises(RqInputError):
            tango_interval(*bad)


def test_score_interval_covers_a_real_drop_the_conditional_one_misses():
    """A true 3 pt drop on 100 images (4 % of images lost by INT8, 1 % gained): the default interval covers it
    close to its 95 % and almost never puts it under a 1 pt gate; the conditional one does neither."""
    rng = np.random.default_rng(0)
    covered = {"score": 0, "exact": 0}
    confirmed_under_1pt = {"score": 0, "exact": 0}
    trials = 1000
    for _ in range(trials):
        lost, gained, same = rng.multinomial(100, [0.04, 0.01, 0.95])
        a = np.array([True] * lost + [False] * gained + [True] * same)
        b = np.array([False] * lost + [True] * gained + [True] * same)
        for method in covered:
            d = paired_drop(a, b, method=method)
            covered[method] += d.ci_low_pt <= 3.0 <= d.ci_high_pt
            confirmed_under_1pt[method] += d.ci_high_pt <= 1.0
    assert covered["score"] / trials > 0.92 and covered["exact"] / trials < 0.85
    assert confirmed_under_1pt["score"] / trials < 0.005 < 0.02 < confirmed_under_1pt["exact"] / trials


def test_identical_arrays_give_zero_interval_with_the_conditional_methods():
    a = [True, False, True, True, False] * 20
    for method in ("exact", "bootstrap"):
        d = paired_drop(a, list(a), method=method)
        assert d.drop_pt == 0.0
        assert (d.ci_low_pt, d.ci_high_pt) == (0.0, 0.0)
        assert d.a_only == d.b_only == d.disagreements == 0
        assert d.significant is False


def test_bootstrap_reproducible_and_contains_estimate():
    rng = np.random.default_rng(1)
    a = rng.random(1300) < 0.78
    b = a.copy()
    flip = rng.choice(1300, size=40, replace=False)
    b[flip] = ~b[flip]
    d1 = paired_drop(a, b, method="bootstrap", seed=7)
    d2 = paired_drop(a, b, method="bootstrap", seed=7)
    assert d1 == d2
    assert d1.method == "bootstrap"
    assert d1.ci_low_pt <= d1.drop_pt <= d1.ci_high_pt
    # Same data, default method: the two intervals should broadly agree (both are ≈ ±2·√m/n).
    e = paired_drop(a, b)
    assert e.drop_pt == d1.drop_pt
    assert abs((d1.ci_high_pt - d1.ci_low_pt) - (e.ci_high_pt - e.ci_low_pt)) < 1.5


def test_accepts_zero_one_numbers():
    a, b = _flipped_pair()
    d = paired_drop(np.array(a, dtype=np.int64), np.array(b, dtype=np.float32))
    assert d.a_only == 3 and d.b_only == 1


def test_to_dict_round_trip():
    a, b = _flipped_pair()
    d = paired_drop(a, b, disagreements=5)
    assert PairedDrop(**d.to_dict()) == d
    assert set(d.to_dict()) >= {"drop_pt", "ci_low_pt", "ci_high_pt", "disagreements", "significant"}


@pytest.mark.parametrize(
    ("a", "b", "kwargs", "match"),
    [
        ([True, False], [True], {}, "differ in length"),
        ([], [], {}, "empty"),
        ([1, 2], [1, 0], {}, "booleans"),
        (["x", "y"], ["x", "y"], {}, "booleans"),
        ([[True]], [[True]], {}, "one-dimensional"),
        ([True, False], [False, True], {"disagreements": 1}, "disagreements"),
        ([True, False], [False, True], {"disagreements": 3}, "disagreements"),
        ([True], [True], {"method": "normal"}, "unknown interval method"),
        ([True], [True], {"confidence": 1.5}, "confidence"),
        ([True], [True], {"method": "bootstrap", "n_boot": 0}, "n_boot"),
    ],
)
def test_bad_input(a, b, kwargs, match):
    with pytest.raises(RqInputError, match=match) as info:
        paired_drop(a, b, **kwargs)
    assert "\n" not in str(info.value)


def test_pareto_front_basic():
    points = [
        (1.0, 76.1),  # FP32: most accurate → front
        (1.8, 75.9),  # front
        (1.5, 75.0),  # dominated by (1.8, 75.9)
        (2.1, 70.0),  # fastest → front
        (1.8, 75.5),  # dominated by (1.8, 75.9): same x, lower y
    ]
    assert pareto_front(points) == [0, 1, 3]


def test_pareto_front_ties_and_nan():
    points = [(1.8, 75.9), (1.8, 75.9), (1.0, 75.9), (float("nan"), 99.0), (2.0, 70.0)]
    # Equal points are both on the front; (1.0, 75.9) is dominated (same y, slower); NaN is excluded and
    # must not knock out anything.
    assert pareto_front(points) == [0, 1, 4]
    assert pareto_front([]) == []
    assert pareto_front([(1.0, 1.0)]) == [0]
    with pytest.raises(RqInputError):
        pareto_front([(1.0,)])


def test_speed_interval_resamples_rounds_as_wholes():
    """Load shared by both models within a round cancels: a model exactly twice as fast in every round has
    the interval [2, 2] however much the rounds differ. Resampling the two lists apart would not give that."""
    load = np.random.default_rng(1).uniform(1.0, 3.0, 40)  # the neighbours' load, round by round
    reference = 10.0 * load
    assert speed_ratio_interval(reference, reference / 2) == pytest.approx((2.0, 2.0))


def test_speed_interval_contains_the_ratio_and_narrows_with_rounds():
    rng = np.random.default_rng(2)
    widths = []
    for rounds in (20, 400):
        reference = 10.0 + rng.normal(0, 0.5, rounds)
        model = 5.0 + rng.normal(0, 0.5, rounds)
        low, high = speed_ratio_interval(reference, model)
        assert low <= np.median(reference) / np.median(model) <= high
        assert low < 2.0 < high
        widths.append(high - low)
    assert widths[1] < widths[0] / 2
    # The same input gives the same interval (seeded).
    assert speed_ratio_interval(reference, model) == speed_ratio_interval(reference, model)


def test_speed_interval_needs_enough_equal_rounds():
    few = [1.0] * (MIN_ROUNDS_FOR_INTERVAL - 1)
    assert speed_ratio_interval(few, few) is None
    with pytest.raises(RqInputError, match="equally long"):
        speed_ratio_interval([1.0] * 12, [1.0] * 11)


def _phase(rng, rounds: int, level: float, speedup: float) -> tuple[list[float], list[float]]:
    """One interleaved phase: a reference around `level` ms under a round-to-round load, the model `speedup`×
    faster in every round (its own jitter of ±1 % on top)."""
    load = rng.uniform(1.0, 1.3, rounds)
    reference = level * load
    model = reference / speedup * rng.uniform(0.99, 1.01, rounds)
    return list(reference), list(model)


def test_counterbalanced_ratio_is_the_geometric_mean_of_the_phases():
    rng = np.random.default_rng(1)
    forward, reverse = _phase(rng, 40, 10.0, 1.10), _phase(rng, 40, 10.0, 0.90)
    point, (low, high) = counterbalanced_speed_ratio([forward, reverse])
    per_phase = [np.median(a) / np.median(b) for a, b in (forward, reverse)]
    assert point == pytest.approx(math.sqrt(per_phase[0] * per_phase[1]))
    assert low <= point <= high
    # one phase: the same figures as speed_ratio_interval
    single, interval = counterbalanced_speed_ratio([forward])
    assert single == pytest.approx(per_phase[0])
    assert interval == pytest.approx(speed_ratio_interval(*forward))


def test_counterbalanced_ratio_does_not_depend_on_how_loaded_a_phase_was():
    """A phase run under three times the load moves neither the point nor the interval (a median over the two
    phases' pooled rounds can: 0.78× in a loaded run whose phases gave 0.99× and 0.97×)."""
    rng = np.random.default_rng(2)
    forward, reverse = _phase(rng, 40, 10.0, 1.02), _phase(rng, 40, 10.0, 0.97)
    loaded = ([3 * t for t in reverse[0]], [3 * t for t in reverse[1]])
    point, interval = counterbalanced_speed_ratio([forward, reverse])
    point_loaded, interval_loaded = counterbalanced_speed_ratio([forward, loaded])
    assert point_loaded == pytest.approx(point) and interval_loaded == pytest.approx(interval)


def test_counterbalanced_ratio_keeps_rounds_paired_within_a_phase():
    """Exactly 2× faster in every round, whatever the load of each round and phase: exactly [2, 2]."""
    rng = np.random.default_rng(3)
    phases = []
    for level in (5.0, 15.0):
        reference = list(level * rng.uniform(1.0, 3.0, 30))
        phases.append((reference, [t / 2 for t in reference]))
    point, interval = counterbalanced_speed_ratio(phases)
    assert point == pytest.approx(2.0) and interval == pytest.approx((2.0, 2.0))


def test_counterbalanced_ratio_bad_input_and_short_phases():
    short = ([10.0] * (MIN_ROUNDS_FOR_INTERVAL - 1), [5.0] * (MIN_ROUNDS_FOR_INTERVAL - 1))
    full = ([10.0] * MIN_ROUNDS_FOR_INTERVAL, [5.0] * MIN_ROUNDS_FOR_INTERVAL)
    assert counterbalanced_speed_ratio([full, short]) == (pytest.approx(2.0), None)
    for phases in ([], [([1.0, 2.0], [1.0])], [([0.0], [1.0])]):
        with pytest.raises(RqInputError):
            counterbalanced_speed_ratio(phases)
