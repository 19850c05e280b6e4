"""Paired statistics against textbook values: Student's t table and Student's sleep data."""

from __future__ import annotations

import math

import pytest

from fakd_deploy.stats import mean_std, paired_difference, verdict

# Student's (1908) sleep data: extra hours of sleep of ten patients under two drugs.
DRUG_1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
DRUG_2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]


def test_two_pairs_use_the_t_quantile_of_one_degree_of_freedom() -> None:
    """Differences 0 and 2: mean 1, standard error 1, so the half-width is t(0.975, 1) = 12.706."""
    result = paired_difference([5.0, 9.0], [5.0, 7.0])
    assert result["n"] == 2 and result["mean"] == pytest.approx(1.0, abs=1e-12)
    assert result["low"] == pytest.approx(1.0 - 12.7062, abs=1e-4)
    assert result["high"] == pytest.approx(1.0 + 12.7062, abs=1e-4)


def test_ten_pairs_reproduce_the_textbook_interval_of_the_sleep_data() -> None:
    """By hand: differences 1.2 2.4 1.3 1.3 0 1 1.8 0.8 4.6 1.4, mean 1.58, s = 1.2300,
    t(0.975, 9) = 2.262, half-width 2.262 * 1.2300 / sqrt(10) = 0.880; R's
    `t.test(extra ~ group, data = sleep, paired = TRUE)` gives [0.7001, 2.4599]."""
    result = paired_difference(DRUG_2, DRUG_1)
    assert result["n"] == 10 and result["mean"] == pytest.approx(1.58, abs=1e-12)
    assert result["low"] == pytest.approx(0.7001142, abs=1e-6)
    assert result["high"] == pytest.approx(2.4598858, abs=1e-6)
    s = math.sqrt(sum((d - 1.58) ** 2 for d in (1.2, 2.4, 1.3, 1.3, 0, 1, 1.8, 0.8, 4.6, 1.4)) / 9)
    assert result["high"] - 1.58 == pytest.approx(2.2622 * s / math.sqrt(10), abs=1e-4)


def test_the_difference_is_values_minus_reference() -> None:
    result = paired_difference(DRUG_1, DRUG_2)
    assert result["mean"] == pytest.approx(-1.58, abs=1e-12)
    assert (result["low"], result["high"]) == pytest.approx((-2.4598858, -0.7001142), abs=1e-6)


def test_the_level_sets_the_quantile() -> None:
    """90 %: t(0.95, 9) = 1.833 from the table, so the half-width is 1.833 * s / sqrt(10)."""
    result = paired_difference(DRUG_2, DRUG_1, level=0.90)
    half = 1.8331 * 1.2299955 / math.sqrt(10)
    assert (result["low"], result["high"]) == pytest.approx((1.58 - half, 1.58 + half), abs=1e-4)


@pytest.mark.filterwarnings("error")  # answered without scipy's zero-variance warning
def test_one_pair_has_no_interval_and_identical_differences_one_of_no_width() -> None:
    assert paired_difference([3.0], [1.0]) == {"mean": 2.0, "low": None, "high": None, "n": 1}
    assert paired_difference([3.0, 5.0, 4.0], [1.0, 3.0, 2.0]) == {
        "mean": 2.0,
        "low": 2.0,
        "high": 2.0,
        "n": 3,
    }


@pytest.mark.parametrize("values, reference", [([1.0, 2.0], [1.0]), ([], [])])
def test_unpaired_or_empty_values_are_refused(values: list[float], reference: list[float]) -> None:
    with pytest.raises(
        ValueError, match=r"^paired differences need the same, non-zero number of values on each side$"
    ):
        paired_difference(values, reference)


def test_mean_and_sample_standard_deviation() -> None:
    mean, std = mean_std([1.0, 2.0, 3.0, 4.0])
    assert mean == pytest.approx(2.5, abs=1e-12) and std == pytest.approx(math.sqrt(5 / 3), abs=1e-12)
    assert mean_std([7.0]) == (7.0, None)
    with pytest.raises(ValueError, match=r"^a mean needs at least one value$"):
        mean_std([])


@pytest.mark.parametrize(
    "low, high, expected",
    [
        (0.1, 2.0, "excludes zero (above)"),
        (0.0, 2.0, "includes zero"),
        (-1.0, 1.0, "includes zero"),
        (-2.0, 0.0, "includes zero"),
        (-2.0, -0.1, "excludes zero (below)"),
        (None, None, "no interval (one seed)"),
    ],
)
def test_verdict_says_where_the_interval_lies(low: float | None, high: float | None, expected: str) -> None:
    assert verdict({"mean": 0.5, "low": low, "high": high, "n": 3}) == expected
