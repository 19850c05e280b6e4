"""A study split across folders (machines, sessions) and merged by its scores file is the
study that one folder would have run; runs of another study or another teacher are not taken."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from fakd_deploy.cli import app
from fakd_deploy.errors import BadInput
from fakd_deploy.study_scores import MIOU_TOLERANCE, read_scores, weights_digest

TINY = str(Path(__file__).resolve().parent / "recipes" / "tiny.yaml")
SWEEP = ["--set", "study.lam0=[1.0]"]
runner = CliRunner()


def study(out: Path, seeds: str, *extra: object) -> str:
    args = ["study", TINY, "--out", out, *SWEEP, "--set", f"student.seeds={seeds}", *extra]
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return " ".join(re.sub("[│╭╮╰╯─]", " ", result.output).split())


def scores(folder: Path) -> dict[tuple[str, int], dict[str, Any]]:
    runs = json.loads((folder / "study" / "scores.json").read_text())["runs"]
    return {(run["variant"], run["seed"]): run for run in runs}


def timeless(row: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in row.items() if key != "seconds"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Seed 0 in one folder, seed 1 in another, and both seeds in a third, as references."""
    root = tmp_path_factory.mktemp("shards")
    folders = {"a": root / "a", "b": root / "b", "whole": root / "whole"}
    study(folders["a"], "[0]")
    study(folders["b"], "[1]")
    study(folders["whole"], "[0, 1]")
    return folders


@pytest.mark.slow
def test_two_shards_merged_are_the_study_run_in_one_folder(shards: dict[str, Path], tmp_path: Path) -> None:
    merged = tmp_path / "merged"
    output = study(
        merged,
        "[0, 1]",
        "--merge",
        shards["a"] / "study/scores.json",
        "--merge",
        shards["b"] / "study/scores.json",
    )
    assert (
        "will run: teacher, study:val-best, study:val-last; up to date: nothing; taken from --merge: "
        "baseline_s0, kd_s0, fakd_kd-lam1-marginal_s0, baseline_s1, kd_s1, fakd_kd-lam1-marginal_s1"
    ) in output
    assert "taken from --merge: 6 run(s)" in output
    assert "thread(s)" not in output  # the teacher trains here with the shards' thread count
    stages = json.loads((merged / "manifest.json").read_text())["stages"]
    assert not [name for name in stages if name.startswith("student:")]  # nothing trained here
    whole = json.loads((shards["whole"] / "study.json").read_text())["rows"]
    rows = json.loads((merged / "study.json").read_text())["rows"]
    assert [timeless(row) for row in rows] == [timeless(row) for row in whole]  # wall times aside
    assert {k: timeless(run) for k, run in scores(merged).items()} == {
        k: timeless(run) for k, run in scores(shards["whole"]).items()
    }  # the merged file carries on like the original
    assert [row["seconds"]["n"] for row in rows] == [2, 2, 2]
    again = study(merged, "[0, 1]", "--merge", shards["a"] / "study/scores.json")
    assert "taken from --merge: baseline_s0, kd_s0, fakd_kd-lam1-marginal_s0" in again
    assert "baseline_s1" in again.split("will run: ")[1].split(";")[0]  # not offered: trains


@pytest.mark.slow
def test_a_run_is_taken_only_with_its_inputs_and_its_teacher_weights(
    shards: dict[str, Path], tmp_path: Path
) -> None:
    recorded = scores(shards["a"])
    teacher = weights_digest(shards["a"] / "teacher" / "best.pt")
    assert recorded[("kd", 0)]["teacher"] == teacher and recorded[("baseline", 0)]["teacher"] is None
    assert recorded[("kd", 0)]["teacher_threads"] == torch.get_num_threads()
    assert recorded[("baseline", 0)]["teacher_threads"] is None
    assert recorded[("kd", 0)]["seconds"] > 0
    assert "confusion_matrix" not in recorded[("kd", 0)]["val_last"]  # the one thing not carried
    whole = {
        (r["variant"], r["seed"]): r["miou"]
        for r in json.loads((shards["a"] / "study/val_last.json").read_text())
    }
    assert recorded[("kd", 0)]["val_last"]["miou"] == whole[("kd", 0)]

    other_teacher = tmp_path / "other_teacher"
    output = study(
        other_teacher, "[0]", "--set", "teacher.train.lr=0.004", "--merge", shards["a"] / "study/scores.json"
    )
    assert re.search("taken from --merge: baseline_s0(?!,)", output)  # no student distilled from it
    assert "2 run(s) of" in output and "not taken: not this study's (other inputs or teacher)" in output

    other_student = tmp_path / "other_student"
    output = study(
        other_student, "[0]", "--set", "student.train.lr=0.004", "--merge", shards["a"] / "study/scores.json"
    )
    assert "taken from --merge" not in output and "3 run(s) of" in output


@pytest.mark.slow
def test_a_teacher_that_trains_to_other_weights_leaves_its_students_to_train_here(
    shards: dict[str, Path], tmp_path: Path
) -> None:
    """Same inputs, other weights (another torch build or thread count): told, and trained;
    a teacher recorded with another thread count is named before this one trains."""
    forged = json.loads((shards["a"] / "study/scores.json").read_text())
    elsewhere = torch.get_num_threads() + 3
    for run in forged["runs"]:
        if run["teacher"]:
            run["teacher"], run["teacher_threads"] = "0" * 64, elsewhere
    path = tmp_path / "scores.json"
    path.write_text(json.dumps(forged))
    output = study(tmp_path / "elsewhere", "[0]", "--merge", path)
    assert "taken from --merge: baseline_s0, kd_s0, fakd_kd-lam1-marginal_s0" in output  # by inputs
    warned = f"teacher trained with {elsewhere} thread(s) and this one trains with {torch.get_num_threads()}"
    assert warned in output and f"run with OMP_NUM_THREADS={elsewhere}" in output
    assert output.index(warned) < output.index("will run: teacher")  # before the teacher trains
    retrained = "train 2 run(s) here (kd_s0, fakd_kd-lam1-marginal_s0):"
    assert retrained in output and "whose weights differ" in output
    stages = json.loads((tmp_path / "elsewhere" / "manifest.json").read_text())["stages"]
    assert {n for n in stages if n.startswith("student:")} == {
        "student:kd_s0",
        "student:fakd_kd-lam1-marginal_s0",
    }


def test_the_weights_digest_is_the_tensors_not_the_file(tmp_path: Path) -> None:
    state = {"b": torch.arange(4, dtype=torch.float32), "a": torch.ones(2, 2, dtype=torch.bfloat16)}
    torch.save({"model": state, "recipe": {"seeds": [0]}}, tmp_path / "one.pt")
    torch.save({"model": dict(reversed(state.items())), "recipe": {"seeds": [1]}}, tmp_path / "two.pt")
    assert weights_digest(tmp_path / "one.pt") == weights_digest(tmp_path / "two.pt")
    for changed in (
        {**state, "b": torch.tensor([0.0, 1.0, 2.0, 3.5])},  # a value
        {**state, "a": torch.ones(4, dtype=torch.bfloat16)},  # a shape, same bytes
        {**state, "a": torch.ones(2, 2, dtype=torch.float16)},  # a dtype
        {"c": state["b"], "a": state["a"]},  # a name
    ):
        torch.save({"model": changed}, tmp_path / "three.pt")
        assert weights_digest(tmp_path / "three.pt") != weights_digest(tmp_path / "one.pt")


GOOD_RUN = {
    "variant": "kd",
    "seed": 0,
    "identity": "x",
    "val_best": {"miou": 1.0, "per_class_iou": [1.0] * 6},
    "val_last": {"miou": 1.0, "per_class_iou": [1.0] * 6},
}


FORGED = {"miou": 99.0, "per_class_iou": [0.0] * 6}  # a miou its classes do not give


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "is not valid JSON (Expecting property name"),
        ("[" * 100_000 + "]" * 100_000, "is not valid JSON (it nests too deeply)"),
        (json.dumps({"format": 1}), "'runs': Field required"),
        (json.dumps({"format": 2, "runs": []}), "has format 2; this version reads format 1"),
        (json.dumps({"format": 1, "runs": [{**GOOD_RUN, "seed": "zero"}]}), "'runs.0.seed'"),
        (json.dumps({"format": 1, "runs": [{**GOOD_RUN, "extra": 1}]}), "'runs.0.extra'"),
        (
            json.dumps({"format": 1, "runs": [{**GOOD_RUN, "seed": True}]}),
            "'runs.0.seed': Input should be a valid integer",
        ),
        (
            json.dumps(
                {"format": 1, "runs": [{**GOOD_RUN, "val_best": {"miou": True, "per_class_iou": [1] * 6}}]}
            ),
            "'runs.0.val_best.miou': Input should be a valid number",
        ),
        (json.dumps({"format": True, "runs": []}), "'format': Input should be a valid integer"),
        (
            json.dumps({"format": 1, "runs": [{**GOOD_RUN, "val_last": {"miou": 1, "per_class_iou": [1]}}]}),
            "'runs.0.val_last.per_class_iou' has 1 classes; this study's dataset has 6",
        ),
        (
            json.dumps(
                {"format": 1, "runs": [{**GOOD_RUN, "val_best": {"miou": math.nan, "per_class_iou": []}}]}
            ),
            "'runs.0.val_best.miou'",
        ),
        (
            json.dumps(
                {"format": 1, "runs": [{**GOOD_RUN, "val_last": {"miou": 101, "per_class_iou": [1] * 6}}]}
            ),
            "'runs.0.val_last.miou': Input should be less than or equal to 100",
        ),
        (
            json.dumps(
                {
                    "format": 1,
                    "runs": [{**GOOD_RUN, "val_best": {"miou": 1, "per_class_iou": [1, 1, -3, 1, 1, 1]}}],
                }
            ),
            "'runs.0.val_best.per_class_iou.2",
        ),
        (json.dumps({"format": 1, "runs": [{**GOOD_RUN, "seconds": -1}]}), "'runs.0.seconds'"),
        (
            json.dumps({"format": 1, "runs": [{**GOOD_RUN, "seconds": math.inf}]}),
            "'runs.0.seconds'",
        ),
        (
            json.dumps({"format": 1, "runs": [GOOD_RUN, {**GOOD_RUN, "val_last": FORGED}]}),
            "'runs.1.val_last.miou' is 99.0000 but its per_class_iou has a mean of 0.0000",
        ),
        (
            json.dumps(
                {"format": 1, "runs": [{**GOOD_RUN, "test_last": {"miou": 1.0, "per_class_iou": [None] * 6}}]}
            ),
            "'runs.0.test_last.miou' is 1.0000 but its per_class_iou has no class with an IoU",
        ),
    ],
)
def test_a_bad_scores_file_is_refused_in_one_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "scores.json"
    path.write_text(content)
    args = ["study", TINY, "--out", tmp_path / "s", *SWEEP, "--merge", path]
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and f"scores file {path}" in result.output
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "s").exists()  # refused before the run folder was touched


def test_a_miou_is_checked_against_the_classes_present_within_the_tolerance(tmp_path: Path) -> None:
    """Classes absent from truth and prediction (None) are out of the mean, as in evaluate; the
    committed studies' files still read."""
    ok = {"miou": 60.0 + MIOU_TOLERANCE / 2, "per_class_iou": [50.0, None, 70.0, None, 60.0, 60.0]}
    path = tmp_path / "scores.json"
    path.write_text(json.dumps({"format": 1, "runs": [{**GOOD_RUN, "val_best": ok, "val_last": ok}]}))
    assert read_scores(path, 6)[0].val_last.miou == ok["miou"]
    for committed in sorted((Path(__file__).resolve().parents[1] / "docs" / "studies").glob("*.scores.json")):
        assert len(read_scores(committed, 8)) == 120, committed
    off = {**ok, "miou": 60.0 + 2 * MIOU_TOLERANCE}
    path.write_text(json.dumps({"format": 1, "runs": [{**GOOD_RUN, "val_best": off}]}))
    with pytest.raises(BadInput, match=r"'runs.0.val_best.miou' is 60.0400 but its per_class_iou has a mean"):
        read_scores(path, 6)
