"""Every CLI command's happy path on tiny settings, the end-to-end run, and its errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fakd_deploy.cli import app

ROOT = Path(__file__).resolve().parents[1]
QUICK = str(ROOT / "recipes" / "quickstart.yaml")
TINY = [
    "data.options.num_images=16", "data.batch_size=4", "data.val_batch_size=8",
    "teacher.train.steps=4", "teacher.train.eval_every=4",
    "student.train.steps=3", "student.train.eval_every=3",
    "deploy.calib=4", "bench.seconds=0.05", "bench.warmup_s=0", "bench.max_images=8",
]
runner = CliRunner()


def sets(*overrides: str) -> list[str]:
    return [arg for item in (*TINY, *overrides) for arg in ("--set", item)]


def invoke(*args: str) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The whole quickstart pipeline at toy size: the end-to-end test, shared by the others."""
    out = tmp_path_factory.mktemp("run") / "quick"
    invoke("run", QUICK, "--out", out, *sets())
    return out


def test_run_writes_every_artifact_and_a_consistent_report(tiny_run: Path) -> None:
    for name in ("recipe.yaml", "manifest.json", "evaluation.json", "teacher/best.pt",
                 "students/baseline_s0/best.pt", "students/kd_s0/best.pt",
                 "students/fakd_kd_s0/best.pt", "deploy/fakd_kd.onnx", "deploy/fakd_kd.int8.onnx",
                 "report.json", "report.md", "report.csv", "report.png"):
        assert (tiny_run / name).exists(), name
    rows = json.loads((tiny_run / "report.json").read_text())["rows"]
    for row in rows:
        assert {"model", "backend", "precision", "status", "miou", "latency_ms", "size_mb"} <= row.keys()
    fakd = {(r["backend"], r["precision"]): r for r in rows if r["model"] == "fakd_kd_s0"}
    assert fakd[("onnxruntime", "fp32")]["status"] == "ok"
    assert fakd[("onnxruntime", "fp32")]["miou"] == pytest.approx(fakd[("pytorch", "fp32")]["miou"],
                                                                  abs=0.1)
    assert ("onnxruntime", "int8") in fakd
    assert {r["model"] for r in rows} >= {"teacher", "baseline_s0", "kd_s0", "fakd_kd_s0"}
    evaluation = json.loads((tiny_run / "evaluation.json").read_text())
    assert {(r["variant"], r["seed"]) for r in evaluation} == {
        ("teacher", None), ("baseline", 0), ("kd", 0), ("fakd_kd", 0)}


def test_second_run_skips_every_stage(tiny_run: Path) -> None:
    before = json.loads((tiny_run / "manifest.json").read_text())["stages"]
    output = invoke("run", QUICK, "--out", tiny_run, *sets())
    after = json.loads((tiny_run / "manifest.json").read_text())["stages"]
    assert output.count("skip ") >= 7
    for name in before:
        assert before[name]["outputs"] == after[name]["outputs"], name


def test_changed_recipe_reruns_only_what_depends_on_it(tiny_run: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_run, copy)
    output = invoke("run", QUICK, "--out", copy, *sets("deploy.calib=2"))
    assert "skip teacher" in output and "skip export" in output
    assert "skip build:ort-int8" not in output


def test_train_distill_evaluate_export_build_bench_predict(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "steps"
    invoke("train", QUICK, "--out", out, "--role", "teacher", *sets())
    invoke("train", QUICK, "--out", out, "--role", "baseline", *sets())
    invoke("distill", QUICK, "--out", out, "--variant", "fakd_kd", *sets())
    checkpoint = out / "students" / "fakd_kd_s0" / "best.pt"
    assert "mIoU" in invoke("evaluate", checkpoint, "--max-images", "8")
    onnx = tmp_path / "student.onnx"
    invoke("export", checkpoint, "--out", onnx)
    assert "mIoU" in invoke("evaluate", onnx, "--max-images", "8")
    invoke("build", onnx, "--backend", "ort-int8", "--calib", "4")
    assert (tmp_path / "student.int8.onnx").exists()
    copy = shutil.copytree(tiny_run, tmp_path / "copy")  # bench rewrites the report it reads
    bench_out = invoke("bench", copy, "--backends", "pytorch,ort-int8", "--seconds", "0.05",
                       "--warmup", "0", "--max-images", "4")
    assert "onnxruntime" in bench_out and "int8" in bench_out and "fp32" in bench_out
    rows = json.loads((copy / "report.json").read_text())["rows"]
    assert {(r["backend"], r["precision"]) for r in rows} == {("pytorch", "fp32"), ("onnxruntime", "int8")}
    image = next((ROOT.parent / "shared" / "datasets" / "camvid" / "val").glob("*.png"), None)
    if image is None:
        from PIL import Image

        image = tmp_path / "image.png"
        Image.new("RGB", (80, 60), (120, 30, 200)).save(image)
    invoke("predict", onnx, image, "--out", tmp_path / "pred")
    assert any((tmp_path / "pred").iterdir())


def test_help_shows_an_example_for_every_command() -> None:
    for command in ("run", "train", "distill", "evaluate", "export", "build", "bench", "predict",
                    "models"):
        assert "Example:" in runner.invoke(app, [command, "--help"]).output, command


@pytest.mark.parametrize("override, message", [
    ("no.such.key=1", "no.such.key"),
    ("student.train.steps=lots", "student.train.steps"),
])
def test_bad_overrides_exit_2_and_write_nothing(tmp_path: Path, override: str, message: str) -> None:
    result = subprocess.run([sys.executable, str(ROOT / "cli.py"), "run", QUICK, "--out",
                             str(tmp_path / "never"), "--set", override],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert message in result.stdout + result.stderr
    assert not (tmp_path / "never").exists()


def test_missing_dataset_folder_exits_2(tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", QUICK, "--out", str(tmp_path / "r"), "--set",
                                 "data.name=camvid", "--set", "data.options={}",
                                 "--set", f"data.root={tmp_path / 'absent'}"])
    assert result.exit_code == 2
    assert str(tmp_path / "absent") in result.output


def test_corrupt_checkpoint_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    result = runner.invoke(app, ["evaluate", str(bad)])
    assert result.exit_code == 2
    assert "bad.pt" in result.output


def test_teacher_student_class_mismatch_exits_2(tiny_run: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["distill", QUICK, "--out", str(tmp_path / "m"), "--variant", "kd",
                                 "--teacher", str(tiny_run / "teacher" / "best.pt"),
                                 *sets("data.options.num_classes=6")])
    assert result.exit_code == 2
    assert "predicts 8 classes" in result.output and "has 6" in result.output
