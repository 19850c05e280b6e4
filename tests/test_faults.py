"""Hostile and unlucky input: each case ends in one line naming the file, key or option, with
the documented exit code (2 bad input, 1 a stage failed, 3 run folder busy), never a
traceback; nothing is written outside the run folder and nothing a user gave runs as code.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner, Result

from fakd_deploy.cli import app
from fakd_deploy.errors import ArtifactError, BadInput, BuildError, StageFailed
from fakd_deploy.runfolder import Manifest, RunFolder, RunLock

runner = CliRunner()


def cli(*args: object) -> Result:
    return runner.invoke(app, [str(a) for a in args])


def refused(result: Result, code: int, *names: str) -> None:
    """The command ended with `code`, one message naming each of `names`, and no traceback."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    for name in names:
        assert name in result.output, (name, result.output)


class Payload:
    """Unpickling this runs a shell command: what a crafted checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


def crafted(tmp_path: Path, artifacts: dict[str, Path]) -> tuple[Path, Path]:
    """A checkpoint with a valid model inside and a payload beside it."""
    from fakd_deploy.models import Checkpoint

    real = Checkpoint.load(artifacts["checkpoint"])
    marker, path = tmp_path / "code-ran", tmp_path / "crafted.pt"
    torch.save({"model": real.model, "arch": real.arch, "recipe": real.recipe, "x": Payload(marker)}, path)
    return path, marker


def test_a_crafted_checkpoint_is_refused_everywhere_and_never_runs(
    tmp_path: Path, artifacts: dict[str, Path], tiny_recipe: Path
) -> None:
    path, marker = crafted(tmp_path, artifacts)
    image = tmp_path / "image.png"
    Image.new("RGB", (32, 32)).save(image)
    for args in (
        ["evaluate", path],
        ["export", path],
        ["predict", path, image, "--out", tmp_path / "p"],
        ["run", tiny_recipe, "--out", tmp_path / "a", "--set", f"teacher.checkpoint={path}"],
        ["distill", tiny_recipe, "--out", tmp_path / "b", "--teacher", path],
        ["train", tiny_recipe, "--out", tmp_path / "c", "--set", f"teacher.weights={path}"],
    ):
        refused(cli(*args), 2, "crafted.pt", "refusing to unpickle")
    assert not marker.exists()
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_bench_discovers_a_crafted_checkpoint_as_a_failed_row(
    tmp_path: Path, artifacts: dict[str, Path], tiny_recipe: Path
) -> None:
    from fakd_deploy.deploy.bench import bench

    path, marker = crafted(tmp_path, artifacts)
    run = tmp_path / "run"
    (run / "students" / "evil_s0").mkdir(parents=True)
    path.rename(run / "students" / "evil_s0" / "best.pt")
    (run / "recipe.yaml").write_text(tiny_recipe.read_text())
    result, _ = bench([run], ["pytorch"], iters=1, warmup_s=0.0, max_images=2)
    row = result.rows[0]
    assert row.status == "load failed" and row.error and "refusing to unpickle" in row.error
    assert not marker.exists()


def test_a_variant_name_cannot_reach_outside_the_run_folder(tmp_path: Path, tiny_recipe: Path) -> None:
    out = tmp_path / "runs" / "x"
    result = cli("run", tiny_recipe, "--out", out, "--set", 'student.variants={"../../../victim": []}')
    refused(result, 2, "variant name", "../../../victim")
    assert not (tmp_path / "victim").exists() and not out.exists()


def test_run_folder_paths_and_deletes_stay_inside(tmp_path: Path) -> None:
    run = RunFolder(tmp_path / "run")
    (tmp_path / "run").mkdir()
    (tmp_path / "outside").mkdir()
    for parts in (("..", "outside"), ("/etc",), ("students", "..", "..", "outside")):
        with pytest.raises(BadInput, match="outside the run folder"):
            run.inside(*parts)
    with pytest.raises(BadInput, match="outside the run folder"):
        run.student("../../outside", 0)
    (tmp_path / "run" / "link").symlink_to(tmp_path / "outside")
    with pytest.raises(BadInput, match="outside the run folder"):
        run.inside("link", "x")
    with pytest.raises(BadInput, match="not inside the run folder"):
        run.remove(tmp_path / "outside")
    with pytest.raises(BadInput, match="not inside the run folder"):
        run.remove(tmp_path / "run" / "link" / "..")
    assert (tmp_path / "outside").is_dir()


def test_a_second_writer_is_refused_at_once_naming_the_holder(tmp_path: Path, tiny_recipe: Path) -> None:
    folder = tmp_path / "run"
    code = (
        "import sys, time; from fakd_deploy.runfolder import RunFolder, RunLock; "
        "lock = RunLock(RunFolder(sys.argv[1])).__enter__(); print('held', flush=True); time.sleep(120)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        result = cli("run", tiny_recipe, "--out", folder)
        refused(result, 3, "is in use by", f"pid {holder.pid}")
    finally:
        holder.kill()
        holder.wait()
    with RunLock(RunFolder(folder)):  # a killed holder leaves no stale lock behind
        pass


def test_the_manifest_checks_the_files_of_a_copied_folder(tmp_path: Path) -> None:
    import shutil

    run = RunFolder(tmp_path / "a")
    (tmp_path / "a" / "deploy").mkdir(parents=True)
    model = tmp_path / "a" / "deploy" / "m.int8.onnx"
    model.write_bytes(b"model bytes")
    manifest = Manifest(run)
    manifest.finish("build:ort-cpu-int8", "key", [model], 1.0)
    assert list(json.loads(run.manifest.read_text())["stages"]["build:ort-cpu-int8"]["outputs"]) == [
        "deploy/m.int8.onnx"
    ]
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    copy = RunFolder(tmp_path / "b")
    assert Manifest(copy).is_done("build:ort-cpu-int8", "key")
    (tmp_path / "b" / "deploy" / "m.int8.onnx").write_bytes(b"corrupted in the copy")
    assert not Manifest(copy).is_done("build:ort-cpu-int8", "key")
    assert Manifest(run).is_done("build:ort-cpu-int8", "key")
    shutil.rmtree(tmp_path / "a")
    assert not Manifest(copy).is_done("build:ort-cpu-int8", "key")  # the original's files do not count


@pytest.mark.parametrize("text", ["{broken", "[1, 2]", '{"stages": 3}'])
def test_a_broken_manifest_is_named_and_force_starts_over(
    tmp_path: Path, tiny_recipe: Path, text: str
) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "manifest.json").write_text(text)
    refused(cli("run", tiny_recipe, "--out", folder), 2, "manifest.json", "--force")
    assert Manifest(RunFolder(folder), fresh=True).data["stages"] == {}


@pytest.mark.parametrize("command", ["evaluate", "build", "predict", "bench"])
@pytest.mark.parametrize("damage", ["truncated", "random", "empty", "directory"])
def test_a_damaged_onnx_model_is_one_line(
    tmp_path: Path, artifacts: dict[str, Path], command: str, damage: str
) -> None:
    path = tmp_path / "model.onnx"
    if damage == "directory":
        path.mkdir()
    else:
        data = artifacts["onnx"].read_bytes()
        path.write_bytes(
            {
                "truncated": data[: len(data) // 2],
                "random": np.random.default_rng(0).bytes(9000),
                "empty": b"",
            }[damage]
        )
    image = tmp_path / "image.png"
    Image.new("RGB", (32, 32)).save(image)
    args = {
        "evaluate": ["evaluate", path],
        "build": ["build", path, "--backend", "ort-cpu-fp32"],
        "predict": ["predict", path, image, "--out", tmp_path / "out"],
        "bench": ["bench", path, "--out", tmp_path / "report"],
    }[command]
    refused(cli(*args), 2, "model.onnx")  # in a run folder, bench makes it a failed row instead


def test_a_truncated_image_is_named(tmp_path: Path, artifacts: dict[str, Path]) -> None:
    image = tmp_path / "street.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(image)
    image.write_bytes(image.read_bytes()[:200])
    refused(cli("predict", artifacts["onnx"], image, "--out", tmp_path / "out"), 2, "street.png")


def test_a_full_disk_is_one_line_with_exit_1(tmp_path: Path, artifacts: dict[str, Path], monkeypatch) -> None:
    image = tmp_path / "image.png"
    Image.new("RGB", (32, 32)).save(image)

    def no_space(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", no_space)
    refused(
        cli("predict", artifacts["onnx"], image, "--out", tmp_path / "out"),
        1,
        "cannot write",
        "image.labels.png",
        "No space left on device",
    )


def test_a_full_disk_while_saving_a_checkpoint_names_it(
    tmp_path: Path, artifacts: dict[str, Path], monkeypatch
) -> None:
    from fakd_deploy.errors import WriteFailed
    from fakd_deploy.models import Checkpoint

    def full(*args: object, **kwargs: object) -> None:
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 30771712 vs 30771600")

    checkpoint = Checkpoint.load(artifacts["checkpoint"])
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(WriteFailed, match=r"cannot write .*last\.pt: .*is the disk full"):
        checkpoint.save(tmp_path / "last.pt")
    assert list(tmp_path.iterdir()) == []


def test_an_output_folder_that_cannot_be_written(tmp_path: Path, tiny_recipe: Path, monkeypatch) -> None:
    monkeypatch.setattr("fakd_deploy.runfolder.writable", lambda folder: False)
    refused(cli("run", tiny_recipe, "--out", tmp_path / "ro"), 2, "cannot write to run folder", "ro")


def test_out_pointing_at_a_file(tmp_path: Path, tiny_recipe: Path) -> None:
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    refused(cli("run", tiny_recipe, "--out", target), 2, "notes.txt is a file")
    assert target.read_text() == "mine"


def test_an_unusable_device_is_refused_before_the_run_folder_exists(
    tmp_path: Path, tiny_recipe: Path
) -> None:
    refused(
        cli("run", tiny_recipe, "--out", tmp_path / "a", "--set", "device=banana"),
        2,
        "'banana' is not a device",
    )
    if not torch.cuda.is_available():
        refused(cli("run", tiny_recipe, "--out", tmp_path / "b", "--set", "device=cuda"), 2, "sees no GPU")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    "args, names",
    [
        (["evaluate", "{onnx}", "--max-images", "0"], ["max-images"]),
        (["export", "{checkpoint}", "--height", "-8"], ["height"]),
        (["models", "--size", "abc"], ["--size", "abc"]),
        (["build", "{onnx}", "--backend", "ort-fp8"], ["unknown backend 'ort-fp8'"]),
        (["bench", "{onnx}", "--backends", "ort-fp8"], ["unknown backend 'ort-fp8'"]),
        (["evaluate", "{onnx}", "--set", "data.nosuchkey=1"], ["data.nosuchkey"]),
        (
            [
                "evaluate",
                "{onnx}",
                "--split",
                "test",
                "--set",
                "data.name=camvid",
                "--set",
                "data.options={}",
                "--set",
                "data.root=/nonexistent",
            ],
            ["/nonexistent"],
        ),
    ],
)
def test_bad_option_values_are_named_with_exit_2(
    artifacts: dict[str, Path], args: list[str], names: list[str]
) -> None:
    filled = [str(artifacts[arg[1:-1]]) if arg in ("{onnx}", "{checkpoint}") else arg for arg in args]
    result = cli(*filled)
    assert result.exit_code == 2, result.output
    for name in names:
        assert name in result.output


def test_a_teacher_of_other_classes_is_found_before_any_training(
    tmp_path: Path, tiny_recipe: Path, artifacts: dict[str, Path]
) -> None:
    result = cli(
        "run",
        tiny_recipe,
        "--out",
        tmp_path / "r",
        "--set",
        f"teacher.checkpoint={artifacts['checkpoint']}",
        "--set",
        "data.options.num_classes=8",
    )
    refused(result, 2, "predicts 6 classes", "has 8")
    assert not (tmp_path / "r").exists()


def test_distill_needs_a_trained_teacher(tmp_path: Path, tiny_recipe: Path) -> None:
    refused(
        cli("distill", tiny_recipe, "--out", tmp_path / "r"), 2, "no teacher checkpoint", "train it first"
    )
    no_teacher = tmp_path / "plain.yaml"
    no_teacher.write_text("data: {name: synthetic}\nstudent: {variants: {baseline: []}}\n")
    refused(
        cli("distill", no_teacher, "--out", tmp_path / "p"), 2, "no variant of the recipe has distillation"
    )


def test_leftovers_of_a_killed_writer_are_removed_by_the_next(tmp_path: Path) -> None:
    run = RunFolder(tmp_path / "run")
    (tmp_path / "run" / "students" / "kd_s0").mkdir(parents=True)
    partial = tmp_path / "run" / "students" / "kd_s0" / ".last.pt.x1y2.tmp"
    partial.write_bytes(b"half a checkpoint")
    scratch = tmp_path / "run" / "deploy" / ".tmp" / "ort.quant.abc"
    scratch.mkdir(parents=True)
    (scratch / "augmented_model.onnx").write_bytes(b"20 MB of calibration graph")
    keep = tmp_path / "run" / "students" / "kd_s0" / "last.pt"
    keep.write_bytes(b"kept")
    with RunLock(run):
        assert not partial.exists() and not (tmp_path / "run" / "deploy" / ".tmp").exists()
        assert keep.exists()


def test_quantization_keeps_its_temporary_files_beside_the_model(
    tmp_path: Path, artifacts: dict[str, Path], monkeypatch
) -> None:
    import tempfile

    from fakd_deploy.data.splits import calibration_images
    from fakd_deploy.deploy import quantize
    from fakd_deploy.recipe import load_recipe

    seen = []
    real = quantize.quantize_static

    def spy(*args: object, **kwargs: object) -> None:
        seen.append(Path(tempfile.gettempdir()))
        real(*args, **kwargs)

    monkeypatch.setattr(quantize, "quantize_static", spy)
    data = load_recipe(Path(__file__).parent / "recipes" / "tiny.yaml").data
    out = tmp_path / "deploy" / "m.int8.onnx"
    quantize.quantize_ort_int8(artifacts["onnx"], out, calibration_images(data, 2))
    assert seen == [tmp_path / "deploy" / ".tmp"]
    assert not (tmp_path / "deploy" / ".tmp").exists() and tempfile.gettempdir() != str(seen[0])


def test_other_ranks_follow_rank_zero_and_never_read_the_manifest(tmp_path: Path, monkeypatch) -> None:
    from fakd_deploy import pipeline
    from fakd_deploy.recipe import load_recipe

    monkeypatch.setattr(pipeline, "agree", lambda value: "resume")  # what rank 0 broadcast
    session = pipeline.Session(
        load_recipe(Path(__file__).parent / "recipes" / "tiny.yaml"),
        RunFolder(tmp_path),
        False,
        torch.device("cpu"),
        6,
        [],
        manifest=None,
        rank=1,
    )
    calls = []
    session.stage("teacher", "key", lambda resume: calls.append(resume) or ([], {}))
    assert calls == [True] and not (tmp_path / "manifest.json").exists()


def test_a_failed_build_fails_the_stage_after_building_the_others(
    tmp_path: Path, artifacts: dict[str, Path], monkeypatch
) -> None:
    from fakd_deploy import pipeline
    from fakd_deploy.deploy import build as deploy_build
    from fakd_deploy.recipe import load_recipe

    recipe = load_recipe(
        Path(__file__).parent / "recipes" / "tiny.yaml", ["deploy.backends=[trt-fp16, ort-cpu-fp32]"]
    )
    run = RunFolder(tmp_path)
    (tmp_path / "deploy").mkdir()
    onnx = tmp_path / "deploy" / "student.onnx"
    onnx.write_bytes(artifacts["onnx"].read_bytes())
    real = deploy_build.build

    def build(path: Path, backend: str, **kwargs: object) -> Path:
        if backend == "trt-fp16":
            raise BuildError("TensorRT could not build it")
        return real(path, backend, **kwargs)

    monkeypatch.setattr(deploy_build, "build", build)
    session = pipeline.Session(recipe, run, False, torch.device("cpu"), 6, [], Manifest(run))
    with pytest.raises(StageFailed, match="could not build trt-fp16"):
        pipeline.build_backends(session, onnx)
    assert Manifest(run).entry("build:ort-cpu-fp32")["done"]


def test_evaluate_applies_overrides_to_the_stored_recipe_and_says_what_it_scored(
    tmp_path: Path, artifacts: dict[str, Path]
) -> None:
    out = tmp_path / "result.json"
    result = cli(
        "evaluate",
        artifacts["onnx"],
        "--set",
        "data.val_split=train",
        "--set",
        "data.options.num_images=4",
        "--json",
        out,
    )
    assert result.exit_code == 0, result.output
    scored = json.loads(out.read_text())
    assert (scored["dataset"], scored["split"], scored["images"]) == ("synthetic", "train", 4)
    assert "synthetic train" in result.output


def test_build_applies_overrides_to_the_stored_recipe(tmp_path: Path, artifacts: dict[str, Path]) -> None:
    from fakd_deploy.deploy.onnx_meta import read_metadata

    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(artifacts["onnx"].read_bytes())
    assert cli("build", onnx, "--backend", "ort-cpu-int8", "--set", "deploy.calib=3").exit_code == 0
    assert read_metadata(tmp_path / "m.int8.onnx")["calib_images"] == 3
    refused(cli("build", onnx, "--backend", "ort-cpu-fp32", "--calib", "3"), 2, "INT8 builds only")


def test_build_of_an_onnx_model_without_a_recipe(tmp_path: Path) -> None:
    from helpers import TinySegmenter

    from fakd_deploy.deploy.export import export_onnx

    onnx = tmp_path / "bare.onnx"
    export_onnx(TinySegmenter(), onnx, 32, 32, parity_batches=[np.zeros((1, 3, 32, 32), np.float32)])
    assert cli("build", onnx, "--backend", "ort-cpu-fp32").exit_code == 0
    refused(cli("build", onnx, "--backend", "ort-cpu-int8"), 2, "carries no recipe", "--recipe")


def test_debug_shows_tracebacks_and_messages_are_not_markup(tmp_path: Path) -> None:
    missing = tmp_path / "m[gpu].onnx"
    result = cli("evaluate", missing)
    refused(result, 2, "m[gpu].onnx")
    debug = runner.invoke(app, ["--debug", "evaluate", str(missing)])
    assert isinstance(debug.exception, ArtifactError)


def test_a_bug_keeps_its_traceback(tmp_path: Path, monkeypatch, artifacts: dict[str, Path]) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr("fakd_deploy.commands.evaluate", broken)
    result = cli("evaluate", artifacts["onnx"])
    assert isinstance(result.exception, ZeroDivisionError) and result.exit_code == 1
