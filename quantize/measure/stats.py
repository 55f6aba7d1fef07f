"""Paired statistics for FP32-vs-INT8 accuracy, and the accuracy/speed Pareto front.

Why *paired*: FP32 and INT8 are evaluated on the very same images, and they agree on almost all of them.
The only images that carry information about the difference are the *discordant* ones: A (FP32) right and
B (INT8) wrong, or the reverse. With the 1300-image validation sets rq typically uses, one flipped
prediction moves top-1 by 1/1300 = 0.077 percentage points. Treating the two accuracies as independent
samples throws the pairing away: each accuracy alone has a 95% interval of about ±2.2 pt (top-1 near
80%), and an unpaired interval for their difference is wider still (about ±3.1 pt) — far too wide to say
anything about a 0.5 pt quantization budget. A paired interval, built on the discordant pairs, has a width
that scales with √(discordant)/n: 20 discordant images out of 1300 give roughly ±0.7 pt.

Three interval methods are offered by :func:`paired_drop`:

``"score"`` (default)
    Tango's asymptotic score interval for the difference of paired proportions (Tango 1998; recommended by
    Fagerland, Lydersen & Laake, Stat Med 2014 for its coverage at small and zero discordant counts). The drop Δ is
    in the interval when the score statistic ``(a_only − b_only − nΔ) / √(n(2·p̃ + Δ(1 − Δ)))``, with p̃
    the maximum-likelihood share of B-only images under Δ, stays within ±z. The number of discordant
    images is *not* held fixed: with none at all on n images the interval is still about ±z²/n, not
    [0, 0], and with one it does not end at the measured drop. Bounds by bisection, no scipy.

``"exact"``
    McNemar-style, conditional: with m = a_only + b_only discordant images, a_only ~ Binomial(m, p) given m,
    and the Clopper–Pearson interval for p is mapped to the drop, ``drop = m/n · (2p − 1)``. Exact *given
    m*, but m is itself random: when few images are discordant this interval is far too narrow ([0, 0] with
    none; with one, its upper bound is the measured drop), so it is kept for comparison only.

``"bootstrap"``
    Paired bootstrap over images: resample the n images with replacement, recompute the drop, take the
    percentile interval. Because only the four cell counts (both right, A only, B only, both wrong) matter,
    a resample is one multinomial draw of those counts, so 10 000 resamples cost milliseconds. Like the
    conditional interval it collapses to [0, 0] when no image is discordant.

:func:`pareto_front` picks the variants not dominated in (speedup, top-1).

:func:`speed_ratio_interval` is the speed side: a bootstrap interval for the ratio of two models' median
latencies, resampling the interleaved rounds of one benchmark run as wholes.

:func:`agreement` is the label-free side: the share of images where INT8 predicts FP32's class, with an exact
interval; :func:`images_to_confirm` says roughly how many images a gate would need before the drop's
interval can fall under it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from calibration.errors import RqInputError

METHODS = ("score", "exact", "bootstrap")


@dataclass(frozen=True)
class PairedDrop:
    """Top-1 drop from A (FP32) to B (INT8) on the same images, with a confidence interval.

    Accuracies and the drop are in percent / percentage points: ``drop_pt = top1_a - top1_b``, so a
    positive drop means B (INT8) lost accuracy.
    """

    top1_a: float  # percent
    top1_b: float  # percent
    drop_pt: float  # top1_a - top1_b, percentage points
    ci_low_pt: float
    ci_high_pt: float
    confidence: float  # e.g. 0.95
    n: int  # images
    a_only: int  # images A got right and B got wrong
    b_only: int  # images B got right and A got wrong
    disagreements: int  # images where A and B predicted different classes (>= a_only + b_only)
    method: str  # "score", "exact" or "bootstrap"
    significant: bool  # the interval excludes 0
    # Top-1 agreement with A (FP32): share of images where both predicted the same class, percent. Derived
    # from n and disagreements (the value passed in is ignored: it cannot disagree with the counts).
    agreement_pct: float | None = None

    def __post_init__(self) -> None:
        value = 100.0 * (self.n - self.disagreements) / self.n if self.n else 0.0
        object.__setattr__(self, "agreement_pct", value)

    def to_dict(self) -> dict:
        """JSON-friendly dict of all fields (plain Python numbers)."""
        return asdict(self)


def _as_correct(values, name: str) -> np.ndarray:
    """A 1-D boolean array from booleans or 0/1 numbers; anything else is an :class:`RqInputError`."""
    try:
        arr = np.asarray(values)
    except (TypeError, ValueError) as exc:
        raise RqInputError(f"{name} is not an array of booleans: {exc}") from None
    if arr.ndim != 1:
        raise RqInputError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.dtype == np.bool_:
        return arr
    if arr.dtype.kind in "iuf":
        # 0/1 numbers are accepted (e.g. a correctness vector built with `==` then cast); anything else
        # (2, 0.5, NaN) means the caller passed labels or scores by mistake.
        if arr.size and not np.all((arr == 0) | (arr == 1)):
            raise RqInputError(f"{name} must hold booleans (True/False or 0/1), found other values")
        return arr.astype(bool)
    raise RqInputError(f"{name} must hold booleans (True/False or 0/1), got dtype {arr.dtype}")


def _check_count(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise RqInputError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _log_binom_coeffs(m: int) -> np.ndarray:
    """log C(m, k) for k = 0..m, via log-gamma (exact binomials would overflow floats past m ≈ 1000)."""
    head = math.lgamma(m + 1)
    return np.array([head - math.lgamma(k + 1) - math.lgamma(m - k + 1) for k in range(m + 1)])


def _log_sum_exp(terms: np.ndarray) -> float:
    top = float(np.max(terms))
    if top == -math.inf:
        return -math.inf
    return top + math.log(float(np.sum(np.exp(terms - top))))


def _log_binom_tail(log_c: np.ndarray, lo: int, hi: int, p: float) -> float:
    """log P(lo <= X <= hi) for X ~ Binomial(m, p), 0 < p < 1, summed directly (no 1 − CDF cancellation)."""
    m = len(log_c) - 1
    k = np.arange(lo, hi + 1, dtype=np.float64)
    terms = log_c[lo : hi + 1] + k * math.log(p) + (m - k) * math.log1p(-p)
    return _log_sum_exp(terms)


def _bisect_increasing(f, target: float, lo: float = 0.0, hi: float = 1.0) -> float:
    """The x in (lo, hi) with f(x) = target, for f increasing in x; bisection to float resolution."""
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:  # interval cannot shrink further in floating point
            break
        if f(mid) < target:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-15:
            break
    return 0.5 * (lo + hi)


def clopper_pearson(x: int, m: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper–Pearson) two-sided interval for a binomial proportion, x successes out of m.

    The lower bound solves P(X ≥ x; p) = α/2 and the upper bound P(X ≤ x; p) = α/2 (the beta-quantile
    definition, computed here without scipy). x = 0 gives lower bound 0 and x = m upper bound 1. m = 0
    carries no information and gives (0, 1).
    """
    x = _check_count(x, "x")
    m = _check_count(m, "m")
    if x > m:
        raise RqInputError(f"x ({x}) cannot exceed m ({m})")
    _check_confidence(confidence)
    if m == 0:
        return 0.0, 1.0
    log_half_alpha = math.log((1.0 - confidence) / 2.0)
    log_c = _log_binom_coeffs(m)
    # P(X >= x; p) increases with p; P(X <= x; p) decreases, so its negation is bisected.
    low = 0.0 if x == 0 else _bisect_increasing(lambda p: _log_binom_tail(log_c, x, m, p), log_half_alpha)
    high = 1.0 if x == m else _bisect_increasing(lambda p: -_log_binom_tail(log_c, 0, x, p), -log_half_alpha)
    return low, high


def _check_confidence(confidence: float) -> None:
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
        raise RqInputError(f"confidence must be between 0 and 1 (exclusive), got {confidence!r}")


def paired_drop(
    correct_a,
    correct_b,
    *,
    disagreements: int | None = None,
    confidence: float = 0.95,
    method: str = "score",
    n_boot: int = 10000,
    seed: int | None = 0,
) -> PairedDrop:
    """Top-1 drop from A to B on the same images, with a paired confidence interval.

    ``correct_a`` / ``correct_b``: per-image correctness (booleans or 0/1) of A (FP32) and B (INT8), in the
    same image order. ``disagreements``: images where the two predicted *different classes*; it cannot be
    derived from correctness alone (two wrong predictions may differ), so the caller passes it. When
    omitted it defaults to a_only + b_only, which is only a lower bound.

    ``method="score"`` (default): Tango's score interval (see the module docstring); it accounts for how many
    images are discordant, so few or no discordant images give a wide interval, not a narrow one.

    ``method="exact"``: conditional Clopper–Pearson interval on the discordant pairs, [0, 0] when there are
    none; too narrow when few images are discordant (module docstring).

    ``method="bootstrap"``: paired percentile bootstrap with ``n_boot`` resamples from a seeded
    ``numpy.random.Generator`` (``seed``), so reruns give the same interval.
    """
    a = _as_correct(correct_a, "correct_a")
    b = _as_correct(correct_b, "correct_b")
    if a.size != b.size:
        raise RqInputError(f"correct_a and correct_b differ in length ({a.size} vs {b.size})")
    n = int(a.size)
    if n == 0:
        raise RqInputError("correct_a and correct_b are empty: no images to compare")
    _check_confidence(confidence)
    if method not in METHODS:
        raise RqInputError(f"unknown interval method {method!r} (choose from {', '.join(METHODS)})")

    both = int(np.count_nonzero(a & b))
    a_only = int(np.count_nonzero(a & ~b))
    b_only = int(np.count_nonzero(~a & b))
    neither = n - both - a_only - b_only
    m = a_only + b_only

    if disagreements is None:
        disagreements = m
    disagreements = _check_count(disagreements, "disagreements")
    if not m <= disagreements <= n:
        # An image one model got right and the other wrong necessarily has two different predictions.
        raise RqInputError(
            f"disagreements ({disagreements}) must lie between the discordant images ({m}) and "
            f"the image count ({n})"
        )

    top1_a = 100.0 * (both + a_only) / n
    top1_b = 100.0 * (both + b_only) / n
    drop = 100.0 * (a_only - b_only) / n

    if method == "score":
        low, high = (100.0 * v for v in tango_interval(a_only, b_only, n, confidence))
    elif method == "exact":
        if m == 0:
            low = high = 0.0
        else:
            p_low, p_high = clopper_pearson(a_only, m, confidence)
            scale = 100.0 * m / n
            low = scale * (2.0 * p_low - 1.0)
            high = scale * (2.0 * p_high - 1.0)
    else:
        if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
            raise RqInputError(f"n_boot must be a positive integer, got {n_boot!r}")
        rng = np.random.default_rng(seed)
        cells = np.array([both, a_only, b_only, neither], dtype=np.float64) / n
        # Resampling n images with replacement = one multinomial draw of the four cell counts.
        counts = rng.multinomial(n, cells, size=int(n_boot))
        drops = 100.0 * (counts[:, 1] - counts[:, 2]) / n
        alpha = 1.0 - confidence
        low, high = (float(v) for v in np.quantile(drops, [alpha / 2.0, 1.0 - alpha / 2.0]))

    low, high = float(low), float(high)
    return PairedDrop(
        top1_a=top1_a,
        top1_b=top1_b,
        drop_pt=drop,
        ci_low_pt=low,
        ci_high_pt=high,
        confidence=float(confidence),
        n=n,
        a_only=a_only,
        b_only=b_only,
        disagreements=disagreements,
        method=method,
        significant=bool(low > 0.0 or high < 0.0),
    )


@dataclass(frozen=True)
class Agreement:
    """Top-1 agreement of B with A (no labels needed): ``agreement_pct`` with an exact interval."""

    n: int
    disagreements: int
    agreement_pct: float
    ci_low_pct: float
    ci_high_pct: float
    confidence: float

    def to_dict(self) -> dict:
        return asdict(self)


def agreement(predictions_a, predictions_b, *, confidence: float = 0.95) -> Agreement:
    """Share of images where A and B predict the same class, with a Clopper–Pearson interval (percent).

    Each image is a Bernoulli trial "B agrees with A"; the agreeing count is Binomial(n, p), so the exact
    binomial interval of p applies directly (unlike the drop, no conditioning on discordant pairs is needed).
    """
    a = np.asarray(predictions_a)
    b = np.asarray(predictions_b)
    if a.ndim != 1 or b.ndim != 1:
        raise RqInputError("predictions must be one-dimensional arrays of class indices")
    if a.size != b.size:
        raise RqInputError(f"predictions differ in length ({a.size} vs {b.size})")
    if a.size == 0:
        raise RqInputError("no predictions to compare")
    _check_confidence(confidence)
    n = int(a.size)
    same = int(np.count_nonzero(a == b))
    low, high = clopper_pearson(same, n, confidence)
    return Agreement(
        n=n,
        disagreements=n - same,
        agreement_pct=100.0 * same / n,
        ci_low_pct=100.0 * low,
        ci_high_pct=100.0 * high,
        confidence=float(confidence),
    )


def _paired_counts(a_only, b_only, n, confidence: float, unit: str) -> tuple[int, int, int]:
    """The discordant counts and the total, checked (whole, non-negative, fitting in n), and the confidence."""
    a_only = _check_count(a_only, "a_only")
    b_only = _check_count(b_only, "b_only")
    n = _check_count(n, "n")
    _check_confidence(confidence)
    if n == 0 or a_only + b_only > n:
        raise RqInputError(f"counts a_only={a_only}, b_only={b_only} do not fit n={n} {unit}")
    return a_only, b_only, n


def tango_interval(a_only: int, b_only: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Tango's score interval for Δ = (a_only − b_only)/n, the difference of two paired proportions (fractions).

    a_only / b_only: pairs where only the first / only the second is a success, of n pairs. The statistic
    T(Δ) = (a_only − b_only − nΔ) / √(n(2·p̃(Δ) + Δ(1 − Δ))) falls as Δ grows, with p̃(Δ) the constrained
    maximum-likelihood probability of a b_only pair: (√(B² − 4AC) − B) / 2A, A = 2n,
    B = −a_only − b_only + (2n − a_only + b_only)Δ, C = −b_only·Δ(1 − Δ) (Fagerland, Lydersen & Laake, Stat Med 2014).
    The interval is every Δ with |T(Δ)| ≤ z; each end found by bisection (`_bisect_increasing`).
    """
    a_only, b_only, n = _paired_counts(a_only, b_only, n, confidence, "pairs")
    z = _normal_quantile(0.5 + confidence / 2.0)

    def score(delta: float) -> float:
        quad_a = 2.0 * n
        quad_b = -a_only - b_only + (2.0 * n - a_only + b_only) * delta
        quad_c = -b_only * delta * (1.0 - delta)
        p21 = (math.sqrt(max(quad_b * quad_b - 4.0 * quad_a * quad_c, 0.0)) - quad_b) / (2.0 * quad_a)
        variance = n * (2.0 * p21 + delta * (1.0 - delta))
        difference = a_only - b_only - n * delta
        if variance <= 0.0:  # only at Δ = ±1 with every pair on that side: no evidence against it
            return 0.0 if difference == 0 else math.copysign(math.inf, difference)
        return difference / math.sqrt(variance)

    estimate = (a_only - b_only) / n
    # score falls as Δ grows: bisect its negative, which rises.
    low = -1.0 if score(-1.0) <= z else _bisect_increasing(lambda d: -score(d), -z, -1.0, estimate)
    high = 1.0 if score(1.0) >= -z else _bisect_increasing(lambda d: -score(d), z, estimate, 1.0)
    return low, high


def _upper_pt(a_only: int, b_only: int, n: int, confidence: float) -> float:
    """Upper bound (pt) of the interval :func:`paired_drop` gives by default for these counts."""
    return 100.0 * tango_interval(a_only, b_only, n, confidence)[1]


def images_to_confirm(
    a_only: int, b_only: int, n: int, max_drop_pt: float, *, confidence: float = 0.95
) -> int | None:
    """Roughly how many images it would take for the drop's upper bound to fall to ``max_drop_pt``.

    Assumption: more images of the same kind show the same rates, i.e. the discordant counts grow in
    proportion (``a_only · N/n`` and ``b_only · N/n``). Under that assumption the question has an answer
    only when the observed drop is below the gate; otherwise (drop ≥ gate) no number of images confirms it
    and None is returned.

    The formula: with d = (a_only + b_only)/n the discordance rate and δ = (a_only − b_only)/n the drop (as
    fractions), the paired (McNemar) estimate of the drop has variance (d − δ²)/N on N images, so the upper
    bound is about δ + z·√((d − δ²)/N). It reaches the gate G when

        N ≈ z² · (d − δ²) / (G − δ)²

    That normal approximation is the starting point; the answer is then refined by searching the smallest N
    whose score bound (:func:`tango_interval`, the interval rq reports), with the counts scaled to N, is
    within G (with few or no discordant images the normal formula says almost nothing; the search decides).
    The result is rounded up to a multiple of 10: it is an order of size, not a promise — the next images
    will not show exactly these rates.
    """
    a_only, b_only, n = _paired_counts(a_only, b_only, n, confidence, "images")
    gate = float(max_drop_pt) / 100.0
    d = (a_only + b_only) / n
    delta = (a_only - b_only) / n
    if delta >= gate:
        return None
    z = _normal_quantile(0.5 + confidence / 2.0)
    normal = z * z * max(d - delta * delta, 0.0) / (gate - delta) ** 2

    def fits(count: int) -> bool:
        scale = count / n
        return _upper_pt(round(a_only * scale), round(b_only * scale), count, confidence) <= max_drop_pt

    low = max(1, int(normal) // 2)
    if fits(low):
        return max(10, -(-low // 10) * 10)
    high = max(low + 1, math.ceil(normal))
    while not fits(high):
        low, high = high, high * 2
        if high > 10**9:
            return None
    while high - low > 1:
        mid = (low + high) // 2
        if fits(mid):
            high = mid
        else:
            low = mid
    return -(-high // 10) * 10


def _normal_quantile(p: float) -> float:
    """Standard normal quantile by bisection on math.erf (no scipy): z with Φ(z) = p."""
    lo, hi = -10.0, 10.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if 0.5 * (1.0 + math.erf(mid / math.sqrt(2.0))) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices (ascending) of the points not dominated when maximizing both coordinates.

    Used with x = speedup vs FP32 and y = top-1. Point j dominates point i when it is at least as good in
    both coordinates and strictly better in one. Consequently equal points never dominate each other and
    are all on the front together. A point with a NaN coordinate is never on the front and never
    dominates another (an unmeasured variant must not push measured ones off).
    """
    pts: list[tuple[float, float]] = []
    for i, p in enumerate(points):
        try:
            x, y = p
            pts.append((float(x), float(y)))
        except (TypeError, ValueError):
            raise RqInputError(f"point {i} is not an (x, y) pair of numbers: {p!r}") from None
    valid = [not (math.isnan(x) or math.isnan(y)) for x, y in pts]
    front: list[int] = []
    for i, (xi, yi) in enumerate(pts):
        if not valid[i]:
            continue
        dominated = any(
            valid[j] and xj >= xi and yj >= yi and (xj > xi or yj > yi)
            for j, (xj, yj) in enumerate(pts)
            if j != i
        )
        if not dominated:
            front.append(i)
    return front


#: Fewer timed rounds than this give no speed interval: the median of a handful of resampled rounds takes only a
#: few values, and a percentile interval over them covers less than it claims.
MIN_ROUNDS_FOR_INTERVAL = 20


def speed_ratio_interval(
    reference_ms: Sequence[float],
    model_ms: Sequence[float],
    *,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float] | None:
    """Bootstrap interval of median(reference) / median(model): the speedup of `model` over `reference`.

    The two lists are one interleaved benchmark: element k of each was timed in round k. Rounds are
    resampled as wholes, so a round the machine's neighbours slowed down slows both models in the resample
    too, as it did in the run. Percentile interval; None with fewer than ``MIN_ROUNDS_FOR_INTERVAL`` rounds.
    Noise shared by all rounds (a machine busy for the whole run) is not in it: it says how well *this* run
    pins the ratio down, not how the ratio moves between runs.
    """
    _check_confidence(confidence)
    a = np.asarray(reference_ms, dtype=np.float64)
    b = np.asarray(model_ms, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise RqInputError(
            f"speed_ratio_interval needs two equally long lists of rounds, got {a.shape} and {b.shape}"
        )
    if len(a) < MIN_ROUNDS_FOR_INTERVAL or not (np.all(a > 0) and np.all(b > 0)):
        return None
    rounds = np.random.default_rng(seed).integers(0, len(a), size=(resamples, len(a)))
    ratios = np.median(a[rounds], axis=1) / np.median(b[rounds], axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(ratios, [tail, 1.0 - tail])
    return float(low), float(high)


def counterbalanced_speed_ratio(
    phases: Sequence[tuple[Sequence[float], Sequence[float]]],
    *,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, tuple[float, float] | None]:
    """The speedup of a model over a reference measured in several phases (the same benchmark repeated with the
    sessions compiled in another order): the geometric mean of each phase's median(reference) / median(model),
    and its bootstrap interval, rounds resampled as wholes *within* each phase.

    Each phase is (reference_ms, model_ms), one element per interleaved round. Pooling the phases' rounds into
    one list would let a phase that ran under heavier load put the pooled medians of the two models on different
    sides of the gap between phases; a ratio per phase does not depend on how loaded the phase was. Interval:
    None unless every phase has ``MIN_ROUNDS_FOR_INTERVAL`` rounds.
    """
    _check_confidence(confidence)
    if not phases:
        raise RqInputError("counterbalanced_speed_ratio needs at least one phase")
    pairs = []
    for reference_ms, model_ms in phases:
        a = np.asarray(reference_ms, dtype=np.float64)
        b = np.asarray(model_ms, dtype=np.float64)
        if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
            raise RqInputError(
                f"counterbalanced_speed_ratio needs two equally long lists of rounds per phase, got {a.shape} "
                f"and {b.shape}"
            )
        if not (np.all(a > 0) and np.all(b > 0)):
            raise RqInputError("counterbalanced_speed_ratio needs positive times")
        pairs.append((a, b))
    point = float(np.exp(np.mean([np.log(np.median(a) / np.median(b)) for a, b in pairs])))
    if any(len(a) < MIN_ROUNDS_FOR_INTERVAL for a, _ in pairs):
        return point, None
    rng = np.random.default_rng(seed)
    log_ratios = np.zeros(resamples)
    for a, b in pairs:
        rounds = rng.integers(0, len(a), size=(resamples, len(a)))
        log_ratios += np.log(np.median(a[rounds], axis=1) / np.median(b[rounds], axis=1))
    ratios = np.exp(log_ratios / len(pairs))
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(ratios, [tail, 1.0 - tail])
    return point, (float(low), float(high))
