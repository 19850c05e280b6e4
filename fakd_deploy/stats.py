"""Paired statistics for comparing training variants over seeds, through scipy.

A variant and its reference trained with the same seed share data order and
initialisation, so their per-seed differences are the fair comparison: the mean
difference with a Student-t 95 % confidence interval says whether a gain exceeds the
seed-to-seed noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    if not values:
        raise ValueError("a mean needs at least one value")
    mean = float(np.mean(values))
    return mean, float(np.std(values, ddof=1)) if len(values) > 1 else None


def paired_difference(
    values: Sequence[float], reference: Sequence[float], level: float = 0.95
) -> dict[str, Any]:
    """Mean of `values[i] - reference[i]` with its two-sided t confidence interval.

    With one pair there is no spread, so the interval is None; with identical differences
    it has no width (scipy would warn about the zero variance, so that case is answered here).
    """
    if len(values) != len(reference) or not values:
        raise ValueError("paired differences need the same, non-zero number of values on each side")
    differences = np.subtract(values, reference)
    mean, n = float(differences.mean()), len(differences)
    if n == 1:
        return {"mean": mean, "low": None, "high": None, "n": 1}
    if np.ptp(differences) == 0:
        return {"mean": mean, "low": mean, "high": mean, "n": n}
    interval = stats.ttest_rel(values, reference).confidence_interval(confidence_level=level)
    return {"mean": mean, "low": float(interval.low), "high": float(interval.high), "n": n}


def verdict(difference: dict[str, Any]) -> str:
    """Whether a paired interval excludes zero, and on which side."""
    if difference["low"] is None:
        return "no interval (one seed)"
    if difference["low"] > 0:
        return "excludes zero (above)"
    if difference["high"] < 0:
        return "excludes zero (below)"
    return "includes zero"
