"""The one statistics rule of the project (DESIGN section 3, Statistics). Torch-free, stdlib only.

A method row is compared with a baseline row (the plain student) *paired by seed*: for every seed both rows have,
the difference row - baseline. The gain is the mean of those differences, with a 95% interval from Student's t
on them (n - 1 degrees of freedom): ``mean ± t(0.975, n - 1) * sd / sqrt(n)``.

- **significant**: the interval excludes 0 (None with fewer than two pairs: one difference has no spread);
- **meets a goal** of ``+x``: the mean gain is >= x *and* the interval excludes 0. A gain >= x whose interval
  includes 0 is "inside noise", never "met".

Used by the ablation bench, the studies' reports, the bench's other targets and (through the reports' JSON) the
web UI. scipy is not a dependency: the t quantile is found by bisection on Student's t distribution function,
written with the regularized incomplete beta function (Numerical Recipes' continued fraction).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

CONFIDENCE = 0.95
Verdict = Literal["met", "inside noise", "not met", "one pair"]


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    # The continued fraction converges fast only below its mean; above it, use the symmetry I_x(a,b) = 1 - I_1-x(b,a).
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t (0 < p < 1), by bisection on :func:`t_cdf` to 1e-10."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:  # t(0.975, 1) = 12.7; t(0.9995, 1) = 637: grow the bracket instead of guessing it
        lo, hi = hi, hi * 2.0
    while hi - lo > 1e-10 * max(1.0, hi):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Interval:
    """The mean of ``n`` values with its two-sided ``confidence`` interval from Student's t. With n < 2 there is no
    spread: ``std``, ``half_width``, ``low`` and ``high`` are None."""

    n: int
    mean: float | None
    std: float | None
    half_width: float | None
    low: float | None
    high: float | None
    confidence: float = CONFIDENCE

    @property
    def significant(self) -> bool | None:
        """The interval excludes 0; None without an interval (fewer than two values)."""
        if self.low is None or self.high is None:
            return None
        return self.low > 0.0 or self.high < 0.0

    def verdict(self, goal: float) -> Verdict:
        """Whether a gain meets ``goal`` (>= goal and the interval excludes 0): ``met``; ``inside noise`` (the mean
        reaches the goal but the interval includes 0); ``not met``; ``one pair`` (no interval to judge by)."""
        if self.significant is None:
            return "one pair"
        if self.mean is not None and self.mean >= goal:
            return "met" if self.significant else "inside noise"
        return "not met"

    def verdict_below(self, limit: float) -> Verdict:
        """For a target "under ``limit``" (a cost, an overhead): ``met`` when the whole interval lies below it,
        ``not met`` when the whole interval lies at or above it, ``inside noise`` when the interval straddles it."""
        if self.high is None or self.low is None:
            return "one pair"
        if self.high < limit:
            return "met"
        return "not met" if self.low >= limit else "inside noise"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "significant": self.significant}


def interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean, sample standard deviation and the t interval of ``values``."""
    n = len(values)
    if n == 0:
        return Interval(0, None, None, None, None, None, confidence)
    mean = statistics.fmean(values)
    if n == 1:
        return Interval(1, mean, None, None, None, None, confidence)
    std = statistics.stdev(values)
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * std / math.sqrt(n)
    return Interval(n, mean, std, half, mean - half, mean + half, confidence)


def paired(row: Mapping[int, float], base: Mapping[int, float], confidence: float = CONFIDENCE) -> Interval:
    """The gain of ``row`` over ``base`` (each: seed -> value), paired by seed over the seeds both have."""
    seeds = sorted(set(row) & set(base))
    return interval([row[s] - base[s] for s in seeds], confidence)


def summary(values: Sequence[float]) -> dict[str, Any]:
    """A row's own spread over seeds: mean, sample std (0 with one value) and n; None for no values."""
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}  # fmt: skip
