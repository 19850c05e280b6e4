"""Every CLI command on the tiny recipe: the end-to-end run, its skips and resumes, and each stage."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from fakd_deploy.cli import app
from fakd_deploy.pipeline import FOLLOWS, RUNS, UP_TO_DATE, plan_line
from fakd_deploy.runfolder import Manifest, RunFolder

ROOT = Path(__file__).resolve().parents[1]
TINY = str(Path(__file__).resolve().parent / "recipes" / "tiny.yaml")
ALL = (
    "teacher, baseline_s0, kd_s0, fakd_kd_s0, evaluate, export, build:ort-cpu-fp32, build:ort-cpu-int8, bench"
)
runner = CliRunner()


def invoke(*args: object) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The whole pipeline on the tiny recipe: the end-to-end test, shared by the others."""
    out = tmp_path_factory.mktemp("run") / "tiny"
    invoke("run", TINY, "--out", out)
    return out


@pytest.mark.slow
def test_run_writes_every_artifact_and_a_consistent_report(tiny_run: Path) -> None:
    for name in (
        "recipe.yaml",
        "manifest.json",
        "evaluation.json",
        "teacher/best.pt",
        "students/baseline_s0/best.pt",
        "students/kd_s0/best.pt",
        "students/fakd_kd_s0/best.pt",
        "deploy/fakd_kd.onnx",
        "deploy/fakd_kd.int8.onnx",
        "report.json",
        "report.md",
        "report.csv",
        "report.png",
    ):
        assert (tiny_run / name).exists(), name
    rows = json.loads((tiny_run / "report.json").read_text())["rows"]
    for row in rows:
        assert {"model", "backend", "precision", "status", "miou", "latency_ms", "size_mb"} <= row.keys()
    fakd = {row["backend"]: row for row in rows if row["model"] == "fakd_kd_s0"}
    assert fakd["ort-cpu-fp32"]["status"] == "ok"
    assert fakd["ort-cpu-fp32"]["miou"] == pytest.approx(fakd["pytorch"]["miou"], abs=0.1)
    assert fakd["ort-cpu-int8"]["status"] == "ok"
    assert {r["model"] for r in rows} >= {"teacher", "baseline_s0", "kd_s0", "fakd_kd_s0"}
    evaluation = json.loads((tiny_run / "evaluation.json").read_text())
    assert {(r["variant"], r["seed"]) for r in evaluation} == {
        ("teacher", None),
        ("baseline", 0),
        ("kd", 0),
        ("fakd_kd", 0),
    }
    assert all(r["split"] == "val" and r["dataset"] == "synthetic" for r in evaluation)
    assert not (tiny_run / ".lock").read_text()  # released


@pytest.mark.slow
def test_second_run_skips_every_stage_bench_included(tiny_run: Path) -> None:
    before = json.loads((tiny_run / "manifest.json").read_text())["stages"]
    output = invoke("run", TINY, "--out", tiny_run)
    after = json.loads((tiny_run / "manifest.json").read_text())["stages"]
    assert "skip bench" in output and output.count("skip ") == len(before)
    for name in before:
        assert before[name]["outputs"] == after[name]["outputs"], name
    lines = output.splitlines()
    assert f"run folder {tiny_run}: {len(before)} stage(s) done before" in output
    assert f"will run: nothing; up to date: {ALL}" in lines
    assert f"ran 0 stage(s), skipped {len(before)} up to date" in output and "wrote nothing" in lines


def test_redo_bench_redoes_the_bench_alone_and_lists_what_it_wrote(tiny_run: Path) -> None:
    """A loaded machine's timings are redone without `--force` on everything."""
    before = json.loads((tiny_run / "manifest.json").read_text())["stages"]
    output = invoke("run", TINY, "--out", tiny_run, "--redo", "bench")
    assert "redo bench: --redo bench" in output and "skip bench" not in output
    assert f"will run: bench; up to date: {ALL.removesuffix(', bench')}" in output.splitlines()
    retrain = invoke("run", TINY, "--out", tiny_run, "--redo", "student:kd_s0", "--redo", "bench")
    assert (
        "will run: kd_s0, bench; then, if what they read changes: evaluate; up to date: teacher, "
        "baseline_s0, fakd_kd_s0, export, build:ort-cpu-fp32, build:ort-cpu-int8"
    ) in retrain.splitlines()
    rows = json.loads((tiny_run / "report.json").read_text())["rows"]
    assert (tiny_run / "students" / "kd_s0.previous").is_dir()
    assert not [row for row in rows if row["model"].endswith(".previous")]  # the kept folder is no model
    teacher = invoke("run", TINY, "--out", tiny_run, "--redo", "teacher", "--redo", "export")
    assert (
        "will run: teacher, export; then, if what they read changes: kd_s0, fakd_kd_s0, evaluate, "
        "build:ort-cpu-fp32, build:ort-cpu-int8, bench; up to date: baseline_s0"
    ) in teacher.splitlines()
    assert "skip student:kd_s0" in teacher and "skip build:ort-cpu-int8" in teacher  # same bytes: no retrain
    assert output.count("skip ") == len(before) - 1 and "; redo: bench" in output
    assert f"ran 1 stage(s), skipped {len(before) - 1} up to date" in output
    assert f"wrote 6 files in {tiny_run}:" in output and "  report.html" in output.splitlines()
    for asked in ("bnech", "student:../x", "student:", "build:nope", "student:kd_s9"):
        refused(["run", TINY, "--out", tiny_run, "--redo", asked], f"--redo {asked}: not a stage of this run")


@pytest.mark.slow
def test_a_moved_copy_resumes_and_rebuilds_only_what_is_damaged(tiny_run: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(tiny_run, tmp_path / "moved" / "copy")
    (copy / "deploy" / "fakd_kd.int8.onnx").write_bytes(b"damaged in the copy")
    (copy / "students" / "kd_s0" / "best.pt").unlink()  # last.pt is complete: recovered, not retrained
    output = invoke("run", TINY, "--out", copy, "--set", "deploy.calib=2")
    assert "skip teacher" in output and "skip export" in output and "skip build:ort-cpu-fp32" in output
    assert "skip build:ort-cpu-int8" not in output and "best.pt was missing" in output
    assert (copy / "students" / "kd_s0" / "best.pt").exists()
    manifest = Manifest(RunFolder(copy))
    assert manifest.is_done("build:ort-cpu-int8", manifest.entry("build:ort-cpu-int8")["key"])


@pytest.mark.slow
def test_a_replaced_or_damaged_checkpoint_is_never_adopted(tiny_run: Path, tmp_path: Path) -> None:
    """Before: a best.pt copied over from another student, or a truncated one, was kept by a
    resume at the final step and recorded as the stage's output (a wrong mIoU with exit 0, or
    exit 2 on every later rerun)."""
    from fakd_deploy.models import Checkpoint
    from fakd_deploy.study_scores import weights_digest

    copy = shutil.copytree(tiny_run, tmp_path / "copy")
    students = copy / "students"
    shutil.copy(students / "baseline_s0" / "best.pt", students / "kd_s0" / "best.pt")
    last = students / "fakd_kd_s0" / "last.pt"
    last.write_bytes(last.read_bytes()[:100_000])
    output = invoke("run", TINY, "--out", copy)
    assert (
        "redo student:kd_s0: students/kd_s0/best.pt is missing or not the file it wrote; recovered" in output
    )
    assert "redo student:fakd_kd_s0: an output is missing or damaged" in output
    assert Checkpoint.load(students / "kd_s0" / "best.pt").variant == "kd"
    # training is deterministic: fakd_kd_s0 retrained to the files of the first run (kd_s0's best.pt
    # is its final weights now, as for a deleted best.pt)
    for file in ("students/fakd_kd_s0/best.pt", "students/fakd_kd_s0/last.pt", "students/kd_s0/last.pt"):
        assert weights_digest(copy / file) == weights_digest(tiny_run / file)
    again = invoke("run", TINY, "--out", copy)
    assert "ran 0 stage(s)" in again


@pytest.mark.slow
def test_another_evaluation_mode_retrains_what_it_chose_the_best_step_of(
    tiny_run: Path, tmp_path: Path
) -> None:
    """Before: "up to date", keeping best.pt files chosen under the earlier `eval`."""
    copy = shutil.copytree(tiny_run, tmp_path / "copy")
    output = invoke("train", TINY, "--out", copy, "--role", "teacher", "--set", "eval.flip=true")
    assert "redo teacher: eval.flip false -> true" in output


@pytest.mark.slow
def test_train_distill_evaluate_export_build_bench_predict(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "steps"
    teacher = invoke("train", TINY, "--out", out, "--role", "teacher").splitlines()
    assert teacher[:2] == [f"run folder {out}: new", "will run: teacher; up to date: nothing"]
    assert teacher[-5:] == [
        "ran 1 stage(s), skipped 0 up to date",
        f"wrote 2 files in {out}:",
        "  teacher/best.pt",
        "  teacher/last.pt",  # recorded too: a study scores it, and a damaged one is retrained
        f"done: {out}",
    ]
    baseline = invoke("train", TINY, "--out", out, "--role", "baseline").splitlines()
    assert "will run: baseline_s0; up to date: nothing" in baseline
    distilled = invoke("distill", TINY, "--out", out, "--variant", "fakd_kd").splitlines()
    assert (
        "will run: fakd_kd_s0; up to date: nothing" in distilled
        and "  students/fakd_kd_s0/best.pt" in distilled
    )
    again = invoke("distill", TINY, "--out", out).splitlines()
    assert (
        "will run: kd_s0; up to date: fakd_kd_s0" in again and "ran 1 stage(s), skipped 1 up to date" in again
    )
    checkpoint = out / "students" / "fakd_kd_s0" / "best.pt"
    assert "mIoU" in invoke("evaluate", checkpoint, "--max-images", "8")
    onnx = tmp_path / "student.onnx"
    invoke("export", checkpoint, "--out", onnx)
    assert "mIoU" in invoke("evaluate", onnx, "--max-images", "8")
    invoke("build", onnx, "--backend", "ort-int8", "--calib", "4")
    assert (tmp_path / "student.int8.onnx").exists()
    copy = shutil.copytree(tiny_run, tmp_path / "copy")  # bench rewrites the report it reads
    bench_out = invoke(
        "bench",
        copy,
        "--backends",
        "pytorch,ort-int8",
        "--seconds",
        "0.05",
        "--warmup",
        "0",
        "--max-images",
        "4",
    )
    assert "ort-cpu-int8" in bench_out and "pytorch" in bench_out
    assert f"bench {copy}: 5 row(s): teacher on pytorch, baseline_s0 on pytorch," in bench_out  # said first
    rows = json.loads((copy / "report.json").read_text())["rows"]
    assert {r["backend"] for r in rows} == {"pytorch", "ort-cpu-int8"}
    from PIL import Image

    image = tmp_path / "image.png"
    Image.new("RGB", (80, 60), (120, 30, 200)).save(image)
    invoke("predict", onnx, image, "--out", tmp_path / "pred")
    assert any((tmp_path / "pred").iterdir())


@pytest.mark.slow
def test_study_on_a_dataset_with_a_test_split(tmp_path: Path) -> None:
    """Teacher once, baseline + KD + CWD, FAKD-KD at 2 x 2 and FAKD-CWD at 2 (lam0, bound)
    points, 2 seeds; each point paired with its own plain loss; test split scored."""
    out = tmp_path / "study"
    sets = [
        "student.seeds=[0, 1]",
        "student.variants.cwd=[{loss: cwd}]",
        "student.variants.fakd_cwd=[{loss: cwd, lam0: 0.5}]",
        "data.test_split=test",
        "study.lam0=[0.1, 1.0]",
        "study.bounds=[marginal, centred]",
        "student.train.eval_every=1",
    ]
    output = invoke("study", TINY, "--out", out, *[arg for item in sets for arg in ("--set", item)])
    summary = json.loads((out / "study.json").read_text())
    variants = {row["variant"]: row for row in summary["rows"]}
    assert set(variants) == {
        "baseline",
        "kd",
        "fakd_kd-lam0.1-marginal",
        "fakd_kd-lam0.1-centred",
        "fakd_kd-lam1-marginal",
        "fakd_kd-lam1-centred",
        "cwd",
        "fakd_cwd-lam0.1",
        "fakd_cwd-lam1",
    }
    point = variants["fakd_kd-lam1-centred"]
    assert (point["lam0"], point["bound"], point["seeds"], point["plain"]) == (1.0, "centred", 2, "kd")
    assert variants["fakd_cwd-lam1"]["plain"] == "cwd"

    def scores(split: str) -> dict[tuple[str, int], float]:
        rows = json.loads((out / "study" / f"{split}_last.json").read_text())
        return {(r["variant"], r["seed"]): r["miou"] for r in rows}

    def expected(split: str, variant: str, reference: str) -> tuple[float, float, float]:
        """Mean and 95 % interval of two paired differences: mean -/+ t(0.975, 1) |d0 - d1| / 2."""
        d = [scores(split)[(variant, s)] - scores(split)[(reference, s)] for s in (0, 1)]
        half = 12.7062 * abs(d[0] - d[1]) / 2
        return (d[0] + d[1]) / 2, (d[0] + d[1]) / 2 - half, (d[0] + d[1]) / 2 + half

    for key, split, variant, reference in (
        ("vs_baseline", "val", "fakd_kd-lam1-centred", "baseline"),
        ("vs_plain", "val", "fakd_cwd-lam1", "cwd"),
        ("test_vs_plain", "test", "fakd_kd-lam0.1-marginal", "kd"),
        ("test_vs_baseline", "test", "cwd", "baseline"),
    ):
        diff = variants[variant][key]
        assert (diff["mean"], diff["low"], diff["high"]) == pytest.approx(
            expected(split, variant, reference), abs=1e-3
        )
    stages = json.loads((out / "manifest.json").read_text())["stages"]
    assert point["seconds"]["total"] == pytest.approx(
        sum(stages[f"student:fakd_kd-lam1-centred_s{s}"]["seconds"] for s in (0, 1))
    )
    assert summary["teacher_seconds"] == stages["teacher"]["seconds"]
    assert [h["plain"] for h in summary["headline"]] == ["kd", "cwd"]
    chosen = max(
        (v for v in variants if v.startswith("fakd_cwd")), key=lambda v: variants[v]["val_last"]["mean"]
    )
    assert summary["headline"][1]["chosen"] == chosen
    assert summary["headline"][1]["difference"] == variants[chosen]["test_vs_plain"]
    assert "headline: FAKD over kd:" in output and "headline: FAKD over cwd:" in output
    assert point["test_last"]["mean"] is not None and summary["test_split"] == "test"
    assert len(point["class_delta_vs_baseline"]) == 6
    for name in ("study.csv", "study.md", "study.png"):
        assert (out / name).exists()
    text = (out / "study.md").read_text()
    assert "best on val" in text and "## Headline (pre-registered)" in text
    assert "fakd_cwd-lam1 − cwd, val:" in text
    again = invoke("study", TINY, "--out", out, *[arg for item in sets for arg in ("--set", item)])
    assert "skip study:test-last" in again and "skip student:" in again  # resumable like run
    plan = [line for line in output.splitlines() if line.startswith("will run: ")]
    assert plan[0].startswith("will run: teacher, baseline_s0, kd_s0, fakd_kd-lam0.1-marginal_s0,")
    assert plan[0].endswith("study:val-last, study:test-last (22 in all); up to date: nothing")
    replan = [line for line in again.splitlines() if line.startswith("will run: ")]
    assert replan[0].startswith("will run: nothing; up to date: teacher, baseline_s0,")
    assert "  study/scores.json" in output.splitlines() and "wrote 5 files in" in again  # the reports
    assert json.loads((out / "study.json").read_text())["rows"] == summary["rows"]


def test_help_shows_an_example_for_every_command() -> None:
    for command in (
        "run",
        "train",
        "distill",
        "study",
        "evaluate",
        "export",
        "build",
        "bench",
        "predict",
        "models",
    ):
        assert "Example:" in runner.invoke(app, [command, "--help"]).output, command


@pytest.mark.parametrize(
    "override, message",
    [
        ("no.such.key=1", "no.such.key"),
        ("student.train.steps=lots", "student.train.steps"),
    ],
)
def test_bad_overrides_exit_2_and_write_nothing(tmp_path: Path, override: str, message: str) -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "cli.py"),
            "run",
            TINY,
            "--out",
            str(tmp_path / "never"),
            "--set",
            override,
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert message in result.stdout + result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "never").exists()


def test_missing_dataset_folder_exits_2(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        [
            "train",
            TINY,
            "--out",
            str(tmp_path / "r"),
            "--set",
            "data.name=camvid",
            "--set",
            "data.options={}",
            "--set",
            f"data.root={tmp_path / 'absent'}",
        ],
    )
    assert result.exit_code == 2
    assert str(tmp_path / "absent") in result.output
    assert not (tmp_path / "r").exists()


def test_version() -> None:
    from fakd_deploy import __version__

    assert __version__ in invoke("--version")


def test_a_teacher_checkpoint_is_used_as_it_is(tmp_path: Path, artifacts: dict[str, Path]) -> None:
    """`teacher.checkpoint`: no teacher stage; the student distils from the given file."""
    teacher = artifacts["checkpoint"]
    out = tmp_path / "run"
    invoke("distill", TINY, "--out", out, "--variant", "kd", "--set", f"teacher.checkpoint={teacher}")
    stages = json.loads((out / "manifest.json").read_text())["stages"]
    assert set(stages) == {"student:kd_s0"} and not (out / "teacher").exists()
    from fakd_deploy.models import Checkpoint

    assert Checkpoint.load(out / "students" / "kd_s0" / "best.pt").variant == "kd"


def test_teacher_weights_trained_elsewhere_are_imported_scored_and_saved(tmp_path: Path) -> None:
    """`teacher.weights`: a plain state dict with DataParallel's `module.` prefix, as
    .pth and as .safetensors; `best.pt` holds exactly those weights and their val score."""
    import torch
    from safetensors.torch import save_file

    from fakd_deploy.models import Checkpoint, build_model
    from fakd_deploy.recipe import load_recipe

    recipe = load_recipe(TINY)
    torch.manual_seed(3)
    model = build_model(num_classes=6, **recipe.teacher.model.build_kwargs())
    state = {f"module.{key}": value for key, value in model.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 12}, tmp_path / "elsewhere.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "elsewhere.safetensors")
    for name in ("elsewhere.pth", "elsewhere.safetensors"):
        out = tmp_path / name.replace(".", "_")
        output = invoke("train", TINY, "--out", out, "--set", f"teacher.weights={tmp_path / name}")
        assert f"imported {len(model.state_dict())} tensors" in output
        saved = Checkpoint.load(out / "teacher" / "best.pt")
        assert saved.role == "teacher" and 0 <= saved.metrics["miou"] <= 100
        for key, value in model.state_dict().items():
            assert torch.equal(saved.model[key], value), key


def test_help_shows_no_type_placeholders_and_one_line_summaries() -> None:
    """Flags show no `<bool>`; each command's summary is one line, so the command list wraps
    evenly."""
    import typer.main

    group = typer.main.get_command(app)
    for name, command in group.commands.items():  # type: ignore[attr-defined]
        output = runner.invoke(app, [name, "--help"], env={"COLUMNS": "100"}).output
        assert "<bool>" not in output and "<list[str]>" not in output, name
        assert "\n" not in (command.help or "").strip().split("\n\n")[0], name
    assert "<bool>" not in runner.invoke(app, ["--help"]).output


def refused(args: list[object], *expected: str) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    text = " ".join(re.sub("[│╭╮╰╯─]", " ", result.output).split())  # the words, whatever the wrapping
    for part in expected:
        assert part in text, (part, text)
    return text


def test_messages_suggest_the_fix(tmp_path: Path, artifacts: dict[str, Path]) -> None:
    typo = tmp_path / "typo.yaml"
    typo.write_text(Path(TINY).read_text().replace("student:", "studnt:", 1))
    refused(
        ["run", typo, "--out", tmp_path / "r"],
        "unknown recipe key 'studnt'",
        "did you mean 'student'",
        "allowed here:",
    )
    refused(
        ["run", TINY, "--set", "teacher.train.steps", "100"],
        "write key=value as one word, e.g. --set teacher.train.steps=100",
    )
    refused(
        ["run", TINY, "--out", tmp_path / "r", "--set", "student.seeds=0,1"],
        "write a list in brackets: student.seeds=[0,1]",
    )
    refused(
        ["evaluate", artifacts["int8"], "--backend", "ort-cuda-int8"],
        "there is no ort-cuda-int8",
        "ort-trt-int8",
    )
    refused(
        ["run", ROOT / "recipes" / "quickstrt.yaml"],
        "did you mean 'quickstart.yaml'",
        "recipes in",
        "camvid_cpu.yaml",
    )
    student = tmp_path / "run" / "students" / "fakd_kd_s0"
    student.mkdir(parents=True)
    shutil.copy(artifacts["checkpoint"], student / "best.pt")
    guess = tmp_path / "run" / "students" / "fakd_kd" / "best.pt"
    refused(["evaluate", guess], f"model not found: {guess}", f"did you mean {student / 'best.pt'}?")
    refused(
        ["bench", tmp_path / "rn"], f"{tmp_path / 'rn'} does not exist", f"did you mean {tmp_path / 'run'}"
    )
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(artifacts["int8"], alone / "student.int8.onnx")
    refused(
        ["evaluate", alone / "student.int8.onnx", "--backend", "ort-cpu-fp32"],
        "student.onnx is the exported model: export it from its checkpoint",
        "student.int8.onnx itself runs on ort-cpu-int8",
    )
    refused(
        ["evaluate", artifacts["int8"], "--backend", "ort-cpu-fp32"],
        f"open {artifacts['onnx'].name} instead",
    )


def test_export_prints_what_it_wrote_not_raw_json(tmp_path: Path, artifacts: dict[str, Path]) -> None:
    output = invoke("export", artifacts["checkpoint"], "--out", tmp_path / "s.onnx")
    lines = output.splitlines()
    (line,) = [line for line in lines if line.startswith("exported")]
    assert line.startswith(f"exported {tmp_path / 's.onnx'} (") and "{" not in output
    assert "  input          images float32, normalised (1, 3, 32, 32)" in lines
    assert "  output         logits float32 (1, 6, 32, 32), 6 classes" in lines
    (parity,) = [line for line in lines if line.startswith("  parity")]
    assert "max |Δ logit|" in parity and "argmax agreement 100.000 %" in parity


def test_a_students_recorded_validation_is_what_evaluating_it_gives(tiny_run: Path) -> None:
    """Scoring a student on val again repeats its training's last validation: the recorded
    numbers are taken only when they are exactly what `evaluate` computes here."""
    from fakd_deploy.data.splits import ValBatches
    from fakd_deploy.evaluate import evaluate
    from fakd_deploy.models import Checkpoint
    from fakd_deploy.models.predictor import TorchPredictor
    from fakd_deploy.pipeline import recorded_validation
    from fakd_deploy.recipe import load_recipe

    recipe = load_recipe(Path(TINY))
    for path in sorted((tiny_run / "students").glob("*/best.pt")):
        checkpoint = Checkpoint.load(path)
        data = ValBatches(recipe.data)
        fresh = evaluate(
            TorchPredictor(checkpoint.build(str(path)), "cpu"),
            data,
            data.num_classes,
            recipe.data.ignore_index,
            recipe.eval,
        )
        recorded = recorded_validation(checkpoint, recipe, recipe.data.val_split)
        assert recorded is not None, path
        assert recorded["miou"] == pytest.approx(fresh["miou"], abs=1e-6), path
        assert recorded["per_class_iou"] == pytest.approx(fresh["per_class_iou"], abs=1e-6), path
        flipped = recipe.model_copy(update={"eval": recipe.eval.model_copy(update={"flip": True})})
        assert recorded_validation(checkpoint, flipped, recipe.data.val_split) is None
        assert recorded_validation(checkpoint, recipe, "train") is None
    teacher = Checkpoint.load(tiny_run / "teacher" / "best.pt")
    assert recorded_validation(teacher, recipe, recipe.data.val_split) is None


def test_the_plan_line_shortens_a_study_of_many_runs() -> None:
    runs = [f"kd_s{seed}" for seed in range(13)]
    stages = {"teacher": UP_TO_DATE, **dict.fromkeys(runs, RUNS), "study:val-last": FOLLOWS}
    assert plan_line(stages, taken=runs[:12]) == (
        "will run: kd_s0, kd_s1, kd_s2, kd_s3, ..., kd_s11, kd_s12 (13 in all); then, if what they "
        "read changes: study:val-last; up to date: teacher; taken from --merge: " + ", ".join(runs[:12])
    )


def test_an_output_that_is_an_input_or_not_a_file_is_refused(
    tmp_path: Path, artifacts: dict[str, Path]
) -> None:
    """`--json` or `--out` naming the model itself (by any name or link), or a device or FIFO,
    would destroy it: refused before anything is written."""
    model = tmp_path / "model.pt"
    shutil.copy(artifacts["checkpoint"], model)
    (tmp_path / "link.json").symlink_to(model)
    os.mkfifo(tmp_path / "fifo.json")
    original = model.read_bytes()
    refused(["evaluate", model, "--max-images", 1, "--json", model], f"--json {model} is the input {model}")
    refused(["evaluate", model, "--max-images", 1, "--json", tmp_path / "link.json"], f"is the input {model}")
    refused(["export", model, "--out", model], f"--out {model} is the input {model}")
    refused(["export", model, "--out", tmp_path / "m.onnx", "--json", model], f"--json {model} is the input")
    refused(
        ["evaluate", model, "--max-images", 1, "--json", tmp_path / "fifo.json"],
        f"{tmp_path / 'fifo.json'} exists and is not a regular file",
    )
    assert model.read_bytes() == original and stat.S_ISFIFO(os.stat(tmp_path / "fifo.json").st_mode)


def test_runaway_options_are_refused_before_anything_runs(tmp_path: Path, artifacts: dict[str, Path]) -> None:
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    refused(["predict", artifacts["onnx"], image, "--threads", 100000], "--threads 100000: give 1 to 512")
    refused(["evaluate", artifacts["checkpoint"], "--threads", 513], "--threads 513: give 1 to 512")
    bench = ["bench", artifacts["onnx"], "--rounds", 1, "--max-images", 1, "--out", tmp_path / "b"]
    refused([*bench, "--seconds", "inf"], "recipe key 'bench.seconds': Input should be a finite number")
    refused([*bench, "--warmup", "inf"], "recipe key 'bench.warmup_s': Input should be a finite number")
    assert not (tmp_path / "b").exists()


def test_bench_writes_its_report_only_into_a_new_empty_or_report_folder(
    tmp_path: Path, artifacts: dict[str, Path]
) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.md").write_text("my notes")
    bench = ["bench", artifacts["onnx"], "--rounds", 1, "--seconds", 0.01, "--warmup", 0, "--max-images", 1]
    refused([*bench, "--out", mine], f"--out {mine} already holds files", "no report.json")
    (mine / "report.json").write_text('{"quarter": "Q3"}')  # another program's report
    refused(
        [*bench, "--out", mine], f"--out {mine} already holds files", "report.json is not one fakd-deploy"
    )
    assert (mine / "report.md").read_text() == "my notes"
    assert (mine / "report.json").read_text() == '{"quarter": "Q3"}'
    invoke(*bench, "--out", tmp_path / "report")
    invoke(*bench, "--out", tmp_path / "report")  # its own report, written again
    assert (tmp_path / "report" / "report.json").is_file()


@pytest.mark.parametrize(
    "allocate, shown",
    [
        (lambda: torch.empty(10**13), "DefaultCPUAllocator: can't allocate memory"),
        (lambda: np.empty(10**14), "Unable to allocate 728. TiB"),
    ],
)
def test_an_allocation_that_fails_is_one_line_with_the_remedy(
    monkeypatch: pytest.MonkeyPatch, allocate: Any, shown: str
) -> None:
    """Too large for this machine is no bug: exit 1 and what to lower, not a traceback."""
    monkeypatch.setattr("fakd_deploy.commands.evaluate_file", lambda *args, **kwargs: allocate())
    result = runner.invoke(app, ["evaluate", "model.pt"])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "error: out of memory (" in result.output and shown in result.output
    assert "lower data.val_batch_size" in result.output


def test_any_other_runtime_error_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    def bug(*args: object, **kwargs: object) -> None:
        raise RuntimeError("shape mismatch in a bug")

    monkeypatch.setattr("fakd_deploy.commands.evaluate_file", bug)
    result = runner.invoke(app, ["evaluate", "model.pt"])
    assert isinstance(result.exception, RuntimeError) and "out of memory" not in result.output
