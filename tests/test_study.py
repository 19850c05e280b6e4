"""The study's sweep, pairing, statistics and headline on hand-made scores with known answers,
and its four renderers."""

from __future__ import annotations

import csv
import io
import math
import struct
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from fakd_deploy.cli import app
from fakd_deploy.errors import BadInput
from fakd_deploy.recipe import LossTerm, Recipe, parse_recipe
from fakd_deploy.study import expand, headline, plain_losses, reading, summarize
from fakd_deploy.study_report import comparison_lines, headline_lines, plot, study_table, to_csv, to_markdown

TINY = Path(__file__).resolve().parent / "recipes" / "tiny.yaml"
T975 = {1: 12.7062, 2: 4.3027}  # Student's t table, two-sided 95 %
KD, CWD = "fakd_kd-lam0.1-marginal", "fakd_cwd-lam0.1"


def study_recipe(*overrides: str, **study: Any) -> Recipe:
    """The tiny recipe with KD, CWD and FAKD on both, swept at lam0 0.1 and 1 (marginal bound)."""
    raw = yaml.safe_load(TINY.read_text())
    raw["student"]["variants"] = {
        "baseline": [],
        "kd": [{"loss": "kd"}],
        "fakd_kd": [{"loss": "kd", "lam0": 0.5}],
        "cwd": [{"loss": "cwd", "tau": 2.0}],
        "fakd_cwd": [{"loss": "cwd", "tau": 2.0, "lam0": 0.5}],
    }
    raw["student"]["seeds"] = [0, 1, 2]
    raw["study"] = {"lam0": [0.1, 1.0], "bounds": ["marginal"], **study}
    return parse_recipe(raw, list(overrides))


def terms(*specs: dict[str, Any]) -> list[LossTerm]:
    return [LossTerm.model_validate(spec) for spec in specs]


# --- the sweep and the pairing ---------------------------------------------------------


def test_expand_pairs_each_fakd_point_with_its_own_plain_loss() -> None:
    recipe, described = expand(study_recipe())
    assert list(described) == [
        "baseline",
        "kd",
        "fakd_kd-lam0.1-marginal",
        "fakd_kd-lam1-marginal",
        "cwd",
        "fakd_cwd-lam0.1",
        "fakd_cwd-lam1",
    ]
    assert list(recipe.student.variants) == list(described)
    assert described["baseline"] == {
        "source": "baseline",
        "kind": "baseline",
        "plain": None,
        "lam0": None,
        "bound": None,
    }
    assert described["cwd"] == {"source": "cwd", "kind": "plain", "plain": None, "lam0": None, "bound": None}
    assert described["fakd_kd-lam1-marginal"] == {
        "source": "fakd_kd",
        "kind": "fakd",
        "plain": "kd",
        "lam0": 1.0,
        "bound": "marginal",
    }
    assert described["fakd_cwd-lam0.1"] == {
        "source": "fakd_cwd",
        "kind": "fakd",
        "plain": "cwd",
        "lam0": 0.1,
        "bound": None,
    }
    point = recipe.student.variants["fakd_cwd-lam1"][0]
    assert (point.loss, point.tau, point.lam0) == ("cwd", 2.0, 1.0)


def test_an_unswept_fakd_variant_is_described_and_paired_too() -> None:
    recipe, described = expand(study_recipe(variants=["fakd_kd"]))
    assert described["fakd_cwd"] == {
        "source": "fakd_cwd",
        "kind": "fakd",
        "plain": "cwd",
        "lam0": 0.5,
        "bound": None,
    }
    assert recipe.student.variants["fakd_cwd"][0].lam0 == 0.5
    _, described = expand(
        study_recipe(
            "student.variants.fakd_kd=[{loss: kd, lam0: 0.5, bound: centred}]", variants=["fakd_cwd"]
        )
    )
    assert described["fakd_kd"] == {
        "source": "fakd_kd",
        "kind": "fakd",
        "plain": "kd",
        "lam0": 0.5,
        "bound": "centred",
    }


def test_the_swept_variant_is_exported_as_its_first_point() -> None:
    recipe, _ = expand(study_recipe())
    assert recipe.deploy.export.variant == "fakd_kd-lam0.1-marginal"
    recipe, _ = expand(study_recipe("deploy.export.variant=cwd"))
    assert recipe.deploy.export.variant == "cwd"


def test_a_bound_reaches_the_kd_term_only_and_plain_terms_stay_plain() -> None:
    """A variant with FAKD on KD and CWD, and one with plain KD beside FAKD on CWD."""
    recipe, described = expand(
        study_recipe(
            "student.variants.both=[{loss: cwd, lam0: 0.5}, {loss: kd, lam0: 0.5}]",
            "student.variants.mixed=[{loss: kd}, {loss: cwd, lam0: 0.5}]",
            variants=["both", "mixed"],
            bounds=["centred"],
        )
    )
    cwd, kd = recipe.student.variants["both-lam1-centred"]
    assert (cwd.loss, cwd.lam0, cwd.bound) == ("cwd", 1.0, "marginal")
    assert (kd.loss, kd.lam0, kd.bound) == ("kd", 1.0, "centred")
    assert described["both-lam1-centred"]["bound"] == "centred"
    plain, fakd = recipe.student.variants["mixed-lam1"]  # no FAKD-KD term: no bound in the name
    assert (plain.loss, plain.lam0, plain.bound) == ("kd", 0.0, "marginal")
    assert (fakd.loss, fakd.lam0) == ("cwd", 1.0)
    assert described["mixed-lam1"] == {
        "source": "mixed",
        "kind": "fakd",
        "plain": "kd",
        "lam0": 1.0,
        "bound": None,
    }
    assert [v for v in described if v.startswith(("both", "mixed"))] == [
        "both-lam0.1-centred",
        "both-lam1-centred",
        "mixed-lam0.1",
        "mixed-lam1",
    ]


def test_an_unswept_bound_keeps_the_point_names_of_earlier_studies() -> None:
    """FAKD on CWD listed before FAKD on KD, no bounds swept: the name carries no bound (as the
    students' run folders of earlier studies do), the KD term keeps its own bound and the
    description says which it is."""
    recipe, described = expand(
        study_recipe(
            "student.variants.both=[{loss: cwd, lam0: 0.5}, {loss: kd, lam0: 0.5, bound: centred}]",
            variants=["both"],
            bounds=[],
        )
    )
    assert [v for v in described if v.startswith("both")] == ["both-lam0.1", "both-lam1"]
    cwd, kd = recipe.student.variants["both-lam1"]
    assert (cwd.lam0, kd.lam0, kd.bound) == (1.0, 1.0, "centred")
    assert described["both-lam1"]["bound"] == "centred"


@pytest.mark.parametrize(
    "study, points",
    [
        (
            {"bounds": []},
            ["fakd_kd-lam0.1-centred", "fakd_kd-lam1-centred", "fakd_cwd-lam0.1", "fakd_cwd-lam1"],
        ),
        ({"lam0": []}, ["fakd_kd-lam0.5-marginal", "fakd_kd-lam0.5-centred", "fakd_cwd-lam0.5"]),
        (
            {"lam0": [], "bounds": ["centred", "marginal"]},
            ["fakd_kd-lam0.5-centred", "fakd_kd-lam0.5-marginal", "fakd_cwd-lam0.5"],
        ),
    ],
)
def test_an_empty_sweep_list_keeps_the_variant_own_value(study: dict[str, Any], points: list[str]) -> None:
    """FAKD-KD here is plain CWD beside FAKD on KD (centred): its own lam0 and bound come from that term."""
    sweep = {"lam0": [0.1, 1.0], "bounds": ["marginal", "centred"], **study}
    recipe, described = expand(
        study_recipe(
            "student.variants.fakd_kd=[{loss: cwd, tau: 2.0}, {loss: kd, lam0: 0.5, bound: centred}]",
            "student.variants.kd=[{loss: cwd, tau: 2.0}, {loss: kd}]",
            **sweep,
        )
    )
    assert [v for v in described if v.startswith("fakd")] == points
    for point in points:
        terms = recipe.student.variants[point]
        assert terms[-1].lam0 == described[point]["lam0"] and (len(terms) == 1 or terms[0].lam0 == 0)
        assert described[point]["plain"] == ("kd" if point.startswith("fakd_kd") else "cwd")


def test_the_plain_loss_is_the_same_terms_with_lam0_zero_in_any_order() -> None:
    variants = {
        "base": [],
        "kd_cwd": terms({"loss": "kd"}, {"loss": "cwd", "tau": 4.0}),
        "kd_hot": terms({"loss": "kd", "tau": 2.0}),
        "fakd_both": terms(
            {"loss": "cwd", "tau": 4.0, "lam0": 1.0}, {"loss": "kd", "lam0": 0.3, "bound": "centred"}
        ),
        "fakd_hot": terms({"loss": "kd", "tau": 2.0, "lam0": 0.3, "diagonal": False}),
        "fakd_heavy": terms({"loss": "kd", "weight": 2.0, "lam0": 0.3}),
    }
    assert plain_losses(variants, None) == {"fakd_both": "kd_cwd", "fakd_hot": "kd_hot", "fakd_heavy": None}
    assert plain_losses(variants, "kd_hot")["fakd_heavy"] == "kd_hot"  # study.kd when nothing matches


def test_the_first_matching_plain_variant_wins() -> None:
    variants = {
        "kd_a": terms({"loss": "kd"}),
        "kd_b": terms({"loss": "kd"}),
        "fakd": terms({"loss": "kd", "lam0": 1.0}),
    }
    assert plain_losses(variants, None) == {"fakd": "kd_a"}


def test_study_kd_is_the_fallback_and_null_leaves_a_point_unpaired() -> None:
    raw_cwd = ["student.variants.cwd=[{loss: cwd, tau: 4.0}]"]  # no longer fakd_cwd's plain loss
    _, described = expand(study_recipe(*raw_cwd))
    assert described["fakd_cwd-lam1"]["plain"] == "kd" and described["fakd_kd-lam1-marginal"]["plain"] == "kd"
    _, described = expand(study_recipe(*raw_cwd, kd=None))
    assert described["fakd_cwd-lam1"]["plain"] is None and described["fakd_kd-lam1-marginal"]["plain"] == "kd"


@pytest.mark.parametrize(
    "study, message",
    [
        (
            {"baseline": "nope"},
            "study.baseline 'nope' is not one of the student variants: baseline, kd, fakd_kd, cwd, fakd_cwd",
        ),
        (
            {"kd": "nope"},
            "study.kd 'nope' is not one of the student variants: baseline, kd, fakd_kd, cwd, fakd_cwd",
        ),
        ({"baseline": "kd"}, "study.baseline 'kd' must have no distillation terms"),
        (
            {"kd": "baseline"},
            r"study.kd 'baseline' must be a plain distillation variant \(terms, none with lam0 > 0\)",
        ),
        ({"kd": "fakd_cwd"}, "study.kd 'fakd_cwd' must be a plain distillation variant"),
        ({"variants": ["kd"]}, r"study.variants: 'kd' has no FAKD term \(lam0 > 0\) to sweep"),
        ({"lam0": [], "bounds": []}, "the study sweeps nothing: give study.lam0 and/or study.bounds"),
        (
            {"variants": ["fakd_kd"], "lam0": [0.1, 0.1000001]},
            r"study.lam0 0.1 and 0.1000001 give the same point name fakd_kd-lam0.1-marginal",
        ),
        ({"lam0": [0.3, 0.3]}, "study.lam0 lists 0.3 twice"),
        ({"bounds": ["marginal", "centred", "marginal"]}, "study.bounds lists marginal twice"),
    ],
)
def test_a_study_that_cannot_be_expanded_is_refused(study: dict[str, Any], message: str) -> None:
    with pytest.raises(BadInput, match=f"^{message}"):
        expand(study_recipe(**study))


@pytest.mark.parametrize("first", [True, False])
def test_a_variant_named_like_a_sweep_point_is_refused_wherever_it_stands(first: bool) -> None:
    """Before or after the variant swept into that name, neither may replace the other."""
    raw = yaml.safe_load(TINY.read_text())
    clash = {"fakd_kd-lam0.1-marginal": [{"loss": "kd", "tau": 4.0}]}
    variants = raw["student"]["variants"]
    raw["student"]["variants"] = {**clash, **variants} if first else {**variants, **clash}
    raw["study"] = {"lam0": [0.1]}
    message = (
        "student.variants.fakd_kd-lam0.1-marginal is also the name of a sweep point of fakd_kd "
        r"\(lam0 0.1\): rename the variant"
    )
    with pytest.raises(BadInput, match=f"^{message}$"):
        expand(parse_recipe(raw))


def test_colliding_sweep_points_end_the_study_in_one_line_before_its_folder(tmp_path: Path) -> None:
    out = tmp_path / "study"
    args = ["study", str(TINY), "--out", str(out), "--set", "study.lam0=[0.1, 0.1000001]"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "give the same point name" in result.output
    assert not out.exists()


# --- hand-made scores ------------------------------------------------------------------

# val mIoU of the last checkpoint per seed 0, 1, 2 (None: that seed never finished)
VAL = {
    "baseline": [60.0, 62.0, 61.0],
    "kd": [63.0, 64.0, 66.0],
    "fakd_kd-lam0.1-marginal": [64.0, 65.0, 66.0],  # mean 65: chosen on val
    "fakd_kd-lam1-marginal": [63.0, 66.0, 65.0],  # mean 64.67, though the best on test
    "cwd": [61.0, 63.0, 62.0],
    "fakd_cwd-lam0.1": [62.0, 64.0, 62.0],  # mean 62.67
    "fakd_cwd-lam1": [63.0, 64.0, None],  # mean 63.5 over the two seeds it has: chosen
}
TEST = {
    "baseline": [66.0, 68.0, 67.0],
    "kd": [69.0, 71.0, 72.0],
    "fakd_kd-lam0.1-marginal": [70.0, 71.0, 75.0],
    "fakd_kd-lam1-marginal": [75.0, 76.0, 77.0],
    "cwd": [66.0, 69.0, 70.0],
    "fakd_cwd-lam0.1": [67.0, 68.0, 69.0],
    "fakd_cwd-lam1": [68.0, 72.0, None],
}
SECONDS = {
    variant: {seed: 30.0 + seed for seed in range(3) if VAL[variant][seed] is not None} for variant in VAL
}


def rows(scores: dict[str, list[float | None]], shift: float = 0.0) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = [
        {"variant": "teacher", "seed": None, "miou": 80.0, "per_class_iou": [80.0] * 3}
    ]
    for variant, values in scores.items():
        for seed, value in enumerate(values):
            if value is not None:
                per_class = [value, value - 10.0, None if variant == "kd" and seed == 1 else value + 5.0]
                found.append(
                    {"variant": variant, "seed": seed, "miou": value + shift, "per_class_iou": per_class}
                )
    return found


def interval(differences: list[float]) -> tuple[float, float, float]:
    """Mean and 95 % t interval by the textbook formula, from the t table."""
    n = len(differences)
    mean = sum(differences) / n
    s = math.sqrt(sum((d - mean) ** 2 for d in differences) / (n - 1))
    half = T975[n - 1] * s / math.sqrt(n)
    return mean, mean - half, mean + half


def check(diff: dict[str, Any] | None, differences: list[float]) -> None:
    assert diff is not None
    mean, low, high = interval(differences)
    assert diff["n"] == len(differences)
    assert (diff["mean"], diff["low"], diff["high"]) == pytest.approx((mean, low, high), abs=2e-3)


@pytest.fixture
def summary() -> dict[str, Any]:
    recipe, described = expand(study_recipe("data.test_split=test"))
    return summarize(
        recipe, described, rows(VAL, 0.5), rows(VAL), rows(TEST), ["a", "b", "c"], SECONDS, 125.0
    )


def test_each_row_has_its_spreads_seeds_and_wall_time(summary: dict[str, Any]) -> None:
    row = {r["variant"]: r for r in summary["rows"]}
    kd = row["kd"]
    assert (kd["seeds"], kd["missing_seeds"]) == (3, [])
    assert kd["val_last"] == pytest.approx({"mean": 193 / 3, "std": math.sqrt(7 / 3), "n": 3})
    assert kd["val_best"]["mean"] == pytest.approx(193 / 3 + 0.5)
    assert kd["test_last"] == pytest.approx({"mean": 212 / 3, "std": math.sqrt(7 / 3), "n": 3})
    assert kd["seconds"] == pytest.approx({"mean": 31.0, "total": 93.0, "n": 3})
    cut = row["fakd_cwd-lam1"]
    assert (cut["seeds"], cut["missing_seeds"]) == (2, [2])
    assert cut["val_last"] == pytest.approx({"mean": 63.5, "std": math.sqrt(0.5), "n": 2})
    assert cut["seconds"] == pytest.approx({"mean": 30.5, "total": 61.0, "n": 2})
    assert summary["teacher"] == 80.0 and summary["teacher_seconds"] == 125.0
    assert summary["reported"] == "last checkpoint, val split and test split"
    assert summary["class_names"] == ["a", "b", "c"] and summary["seeds"] == [0, 1, 2]
    assert summary["student_seconds"] == pytest.approx(6 * 93.0 + 61.0)
    assert (summary["val_split"], summary["test_split"], summary["baseline"]) == ("val", "test", "baseline")


def test_fakd_points_pair_with_their_plain_loss_and_everything_with_the_baseline(
    summary: dict[str, Any],
) -> None:
    row = {r["variant"]: r for r in summary["rows"]}
    check(row[KD]["vs_plain"], [1.0, 1.0, 0.0])
    check(row[KD]["vs_baseline"], [4.0, 3.0, 5.0])
    check(row[KD]["test_vs_plain"], [1.0, 0.0, 3.0])
    check(row[CWD]["vs_plain"], [1.0, 1.0, 0.0])  # against CWD, not KD
    check(row[CWD]["test_vs_plain"], [1.0, -1.0, -1.0])
    check(row["kd"]["vs_baseline"], [3.0, 2.0, 5.0])
    check(row["cwd"]["test_vs_baseline"], [0.0, 1.0, 3.0])
    check(row["fakd_cwd-lam1"]["vs_plain"], [2.0, 1.0])  # the two seeds both sides have
    check(row["fakd_cwd-lam1"]["test_vs_baseline"], [2.0, 4.0])
    assert row[KD]["vs_plain"]["verdict"] == "includes zero"
    assert row[KD]["vs_baseline"]["verdict"] == "excludes zero (above)"
    for variant in ("kd", "cwd"):
        assert row[variant]["plain"] is None and row[variant]["vs_plain"] is None
    assert all(row["baseline"][key] is None for key in ("vs_baseline", "vs_plain", "test_vs_plain"))


def test_pairs_are_matched_by_seed_whatever_the_order_and_the_gaps() -> None:
    """A variant missing its middle seed, and rows in reverse order: seed 2 pairs with seed 2."""
    recipe, described = expand(study_recipe())
    scores = {**VAL, "fakd_cwd-lam0.1": [62.0, None, 60.0]}  # against cwd 61, 62: 1 and -2
    result = summarize(recipe, described, rows(scores), rows(scores)[::-1], None)
    row = {r["variant"]: r for r in result["rows"]}
    check(row[CWD]["vs_plain"], [1.0, -2.0])
    check(row[CWD]["vs_baseline"], [2.0, -1.0])
    check(row["kd"]["vs_baseline"], [3.0, 2.0, 5.0])
    assert row[CWD]["val_last"]["mean"] == 61.0 and row[CWD]["missing_seeds"] == [1]


def test_class_deltas_are_means_over_seeds_and_unknown_where_a_seed_has_none(summary: dict[str, Any]) -> None:
    row = {r["variant"]: r for r in summary["rows"]}
    assert row[KD]["class_delta_vs_baseline"] == pytest.approx([4.0, 4.0, 4.0])
    assert row["fakd_cwd-lam1"]["class_delta_vs_baseline"] == pytest.approx([2.5, 2.5, 2.5])
    assert row["kd"]["class_delta_vs_baseline"] == [pytest.approx(10 / 3), pytest.approx(10 / 3), None]
    assert row["baseline"]["class_delta_vs_baseline"] is None


def test_the_headline_is_chosen_on_val_and_scored_on_test(summary: dict[str, Any]) -> None:
    kd, cwd = summary["headline"]
    assert kd["plain"] == "kd" and kd["chosen"] == KD  # not lam1, which is better on test
    assert kd["candidates"] == [KD, "fakd_kd-lam1-marginal"] and kd["split"] == "test"
    assert kd["chosen_val_mean"] == pytest.approx(65.0)
    check(kd["difference"], [1.0, 0.0, 3.0])
    assert kd["verdict"] == "includes zero"
    half = (interval([1.0, 0.0, 3.0])[2] - interval([1.0, 0.0, 3.0])[1]) / 2
    assert (
        kd["reading"]
        == f"no effect detected; the smallest effect this study could have seen is {half:.2f} points"
    )
    assert cwd["plain"] == "cwd" and cwd["chosen"] == "fakd_cwd-lam1"  # 63.5 over its two seeds
    check(cwd["difference"], [2.0, 3.0])


def test_without_a_test_split_the_headline_is_the_val_difference_marked_optimistic() -> None:
    recipe, described = expand(study_recipe("data.test_split=test"))  # a test split, not scored (yet)
    result = summarize(recipe, described, rows(VAL), rows(VAL), None)
    assert "test_last" not in result["rows"][0] and result["test_split"] is None
    assert result["reported"] == "last checkpoint, val split" and result["class_names"] is None
    kd = result["headline"][0]
    assert kd["chosen"] == KD and kd["split"].startswith("val (chosen on the same split")
    check(kd["difference"], [1.0, 1.0, 0.0])
    assert result["teacher_seconds"] is None and result["student_seconds"] is None
    assert all(row["seconds"] is None for row in result["rows"])


def test_a_study_stopped_after_one_seed_still_summarises() -> None:
    recipe, described = expand(study_recipe())
    first = {variant: values[:1] for variant, values in VAL.items()}
    result = summarize(recipe, described, rows(first), rows(first), rows(first))
    row = {r["variant"]: r for r in result["rows"]}
    assert row["kd"]["seeds"] == 1 and row["kd"]["missing_seeds"] == [1, 2]
    assert row["kd"]["val_last"] == {"mean": 63.0, "std": None, "n": 1}
    assert row[KD]["vs_plain"] == {
        "mean": 1.0,
        "low": None,
        "high": None,
        "n": 1,
        "verdict": "no interval (one seed)",
    }
    assert [h["reading"] for h in result["headline"]] == ["one seed, no interval: no reading"] * 2
    assert result["headline"][1]["chosen"] == "fakd_cwd-lam1"  # 63 against 62 at seed 0


def test_a_variant_with_no_seed_at_all_has_no_numbers_and_no_say_in_the_headline() -> None:
    recipe, described = expand(study_recipe())
    scores = {**VAL, "fakd_kd-lam0.1-marginal": [None, None, None], "cwd": [None, None, None]}
    result = summarize(recipe, described, rows(scores), rows(scores)[1:], None)  # and no teacher row
    row = {r["variant"]: r for r in result["rows"]}
    assert (row[KD]["seeds"], row[KD]["missing_seeds"], row[KD]["val_last"]) == (0, [0, 1, 2], None)
    assert row[KD]["vs_plain"] is None and row[KD]["vs_baseline"] is None
    assert row[KD]["class_delta_vs_baseline"] is None
    assert row[CWD]["vs_plain"] is None and row[CWD]["vs_baseline"] is not None  # its plain loss never ran
    assert result["headline"][0]["chosen"] == "fakd_kd-lam1-marginal" and result["teacher"] is None


def fakd_row(
    variant: str, plain: str | None, val: float, test: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "variant": variant,
        "kind": "fakd",
        "plain": plain,
        "val_last": {"mean": val},
        "vs_plain": {"mean": val},
        "test_vs_plain": test,
    }


def test_a_tie_on_val_goes_to_the_first_point_and_unpaired_points_are_left_out() -> None:
    found = headline(
        [
            {"variant": "kd", "kind": "plain", "plain": None, "val_last": {"mean": 99.0}},
            fakd_row("a", "kd", 60.0),
            fakd_row("b", "kd", 61.0),
            fakd_row("c", "kd", 61.0),
            fakd_row("d", None, 70.0),
        ],
        tested=True,
    )
    assert len(found) == 1 and found[0]["chosen"] == "b" and found[0]["candidates"] == ["a", "b", "c"]
    assert found[0]["difference"] is None and found[0]["verdict"] is None
    assert found[0]["reading"] == "no seed scored on both sides: no reading"


@pytest.mark.parametrize(
    "low, high, expected",
    [
        (0.2, 1.0, "FAKD helped in this setting"),
        (-1.0, -0.2, "FAKD hurt in this setting"),
        (-0.25, 1.0, "no effect detected; the smallest effect this study could have seen is 0.62 points"),
    ],
)
def test_the_reading_follows_the_pre_registered_rule(low: float, high: float, expected: str) -> None:
    assert reading({"mean": (low + high) / 2, "low": low, "high": high, "n": 10}) == expected


# --- the renderers ---------------------------------------------------------------------


def test_markdown_has_the_headline_the_table_and_one_line_per_comparison(summary: dict[str, Any]) -> None:
    text = to_markdown(summary)
    assert (
        f"- FAKD over kd: {KD}, chosen on val among 2 points (mean val mIoU 65.00), minus kd on test: "
        "+1.33 [-2.46, +5.13] (3 seeds): includes zero. Reading: no effect detected; the smallest "
        "effect this study could have seen is 3.79 points."
    ) in text
    assert "| fakd_cwd-lam1 | 1 | - | 2 (missing 2) | 63.50 ± 0.71 | 64.00 ± 0.71 |" in text
    assert "| kd | - | - | 3 | 64.33 ± 1.53 |" in text
    lines = comparison_lines(summary)
    assert len(lines) == 2 * 2 + 4 * 4  # kd and cwd against the baseline; each point twice more
    assert sum(line.endswith("excludes zero (above)") for line in lines) >= 1
    assert all(f"- {line}" in text for line in lines)
    assert "fakd_cwd-lam1 − cwd, val: +1.50 [-4.85, +7.85] (2 seeds): includes zero" in lines
    assert "Wall time: teacher 2.1 min, students 10.3 min in all" in text
    assert "| kd | +3.3 | +3.3 | - |" in text


def test_csv_has_a_row_per_variant_with_every_number(summary: dict[str, Any]) -> None:
    table = list(csv.DictReader(io.StringIO(to_csv(summary))))
    assert [row["variant"] for row in table] == [row["variant"] for row in summary["rows"]]
    row = next(r for r in table if r["variant"] == "fakd_cwd-lam1")
    assert (row["source"], row["kind"], row["plain"], row["lam0"], row["seeds"]) == (
        "fakd_cwd",
        "fakd",
        "cwd",
        "1.0",
        "2",
    )
    assert row["missing_seeds"] == "2" and float(row["val_last_mean"]) == pytest.approx(63.5)
    assert float(row["test_vs_plain"]) == pytest.approx(2.5) and row["test_vs_plain_n"] == "2"
    assert float(row["vs_plain_low"]) == pytest.approx(interval([2.0, 1.0])[1], abs=2e-3)
    assert row["vs_baseline_verdict"] == "includes zero"  # 3 and 2: +2.50 [-3.85, +8.85]
    assert float(row["seconds_total"]) == 61.0
    baseline = next(r for r in table if r["variant"] == "baseline")
    assert baseline["vs_plain"] == "" and baseline["missing_seeds"] == ""


def test_the_terminal_table_and_the_headline_sentences(summary: dict[str, Any]) -> None:
    from rich.console import Console

    console = Console(width=400, record=True)
    console.print(study_table(summary))
    text = console.export_text()
    assert "2 (missing 2)" in text and "test Δ vs plain" in text and "s per run" in text
    assert headline_lines(summary)[1].startswith("FAKD over cwd: fakd_cwd-lam1, chosen on val among 2 points")


def test_columns_without_values_are_left_out() -> None:
    recipe, described = expand(study_recipe())
    result = summarize(recipe, described, rows(VAL), rows(VAL), None)
    header = to_markdown(result).split("## Results")[1].split("\n")[2]
    assert header.startswith("| variant |") and "test" not in header and "s per run" not in header


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


def test_the_plot_has_a_column_per_plain_loss_and_a_row_per_split(
    summary: dict[str, Any], tmp_path: Path
) -> None:
    pytest.importorskip("matplotlib", reason="the plot needs matplotlib (the train extra)")
    width, height = png_size(plot(summary, tmp_path / "both.png") or tmp_path / "missing")
    recipe, described = expand(study_recipe("student.variants.fakd_cwd=[{loss: kd, lam0: 0.2}]"))
    val_only = summarize(recipe, described, rows(VAL), rows(VAL), None)
    narrow, low = png_size(plot(val_only, tmp_path / "one.png") or tmp_path / "missing")
    assert width > 1.8 * narrow and height > 1.8 * low  # two families x two splits against one x one


def test_no_plot_without_fakd_points(tmp_path: Path) -> None:
    recipe, described = expand(
        study_recipe(
            "student.variants={baseline: [], kd: [{loss: kd}]}",
            "deploy.export.variant=kd",
            lam0=[],
            bounds=[],
        )
    )
    result = summarize(
        recipe, described, rows({"baseline": VAL["baseline"], "kd": VAL["kd"]}), rows(VAL), None
    )
    assert plot(result, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()
