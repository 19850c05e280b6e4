"""Paired statistics for comparing training variants over seeds, in plain Python.

A variant and its reference trained with the same seed share data order and
initialisation, so their per-seed differences are the fair comparison: the mean
difference with a Student-t 95 % confidence interval says whether a gain exceeds the
seed-to-seed noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def _beta_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for numerator in (
            m * (b - m) * x / ((qam + m2) * (a + m2)),
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularised incomplete beta function."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom."""
    tail = 0.5 * incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: int) -> float:
    """The t with P(T <= t) = p, by bisection on the CDF (monotone, so always found)."""
    low, high = -1e3, 1e3
    for _ in range(200):
        mid = 0.5 * (low + high)
        if t_cdf(mid, df) < p:
            low = mid
        else:
            high = mid
    return 0.5 * (low + high)


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def paired_difference(
    values: Sequence[float], reference: Sequence[float], level: float = 0.95
) -> dict[str, float | int | None]:
    """Mean of `values[i] - reference[i]` with its two-sided t confidence interval.

    With one pair there is no spread, so the interval is None.
    """
    if len(values) != len(reference) or not values:
        raise ValueError("paired differences need the same, non-zero number of values on each side")
    differences = [v - r for v, r in zip(values, reference, strict=True)]
    mean, std = mean_std(differences)
    if std is None:
        return {"mean": mean, "low": None, "high": None, "n": 1}
    half = t_quantile(0.5 + level / 2, len(differences) - 1) * std / math.sqrt(len(differences))
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": len(differences)}
