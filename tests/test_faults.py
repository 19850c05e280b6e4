"""Hostile and unlucky input: each case ends in one line naming the file, key or option, with
the documented exit code (2 bad input, 1 a stage failed, 3 run folder busy), never a
traceback; nothing is written outside the run folder and nothing a user gave runs as code.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import signal_at_forward
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
        with pytest.raises(BadInput, match="leads outside the folder"):
            run.inside(*parts)
    with pytest.raises(BadInput, match="leads outside the folder"):
        run.student("../../outside", 0)
    (tmp_path / "run" / "link").symlink_to(tmp_path / "outside")
    with pytest.raises(BadInput, match="leads outside the folder"):
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
    manifest.finish("build:ort-cpu-int8", "key", {model: model}, 1.0)
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


@pytest.mark.parametrize(
    "key, value",
    [("outputs", [1]), ("outputs", "abc"), ("outputs", {"deploy/m.onnx": 5}), ("metrics", 5), ("inputs", [])],
)
def test_a_hand_edited_stage_entry_runs_again(
    tmp_path: Path, key: str, value: object, caplog: pytest.LogCaptureFixture
) -> None:
    """An entry whose mappings are not mappings is no record of a finished stage."""
    run = RunFolder(tmp_path / "a")
    (tmp_path / "a").mkdir()
    manifest = Manifest(run)
    manifest.finish("build:ort-cpu-int8", "key", {}, 1.0, {"miou": 1.0})
    manifest.finish("teacher", "key", {}, 1.0, {"miou": 2.0})
    data = json.loads(run.manifest.read_text())
    data["stages"]["build:ort-cpu-int8"][key] = value
    run.manifest.write_text(json.dumps(data))
    again = Manifest(run)
    assert again.entry("build:ort-cpu-int8") == {} and again.is_done("teacher", "key")
    assert f"stage build:ort-cpu-int8's '{key}' is not what this version writes; it runs again" in caplog.text


@pytest.mark.parametrize(
    "text", ["{broken", '{"version": 2, "stages": 3}', '{"version": 2, "stages": {"a": 1}}']
)
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
        "labels.png",
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


KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
from fakd_deploy.runfolder import RunFolder, RunLock
from fakd_deploy.utils import atomic_write, temporary_files_in
root = Path(sys.argv[1])
with RunLock(RunFolder(root)):
    (root / "students" / "kd_s0").mkdir(parents=True)
    def die(tmp):
        tmp.write_bytes(b"half a checkpoint")
        with temporary_files_in(root / "deploy" / ".tmp"):
            import tempfile
            Path(tempfile.mkdtemp(prefix="ort.quant.")).joinpath("augmented_model.onnx").write_bytes(b"20 MB")
            os.kill(os.getpid(), signal.SIGKILL)
    atomic_write(root / "students" / "kd_s0" / "last.pt", die)
"""


def test_leftovers_of_a_killed_writer_are_removed_by_the_next(tmp_path: Path) -> None:
    """What a writer killed by SIGKILL left (a half-written checkpoint, ONNX Runtime's scratch
    files) is removed by the next lock holder; what the user keeps there is not."""
    root = tmp_path / "run"
    root.mkdir()
    (root / "manifest.json").write_text('{"version": 2, "stages": {}}')
    mine = [root / ".notes.tmp", root / ".tmp" / "draft.txt", root / "students" / ".x.0123456789abcdef.tmp"]
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(root)], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    for path in mine:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("the user's")
    left = sorted(p.name for p in root.rglob("*") if p.name.startswith((".last.pt.", ".tmp.")))
    assert len(left) == 2, left  # the half checkpoint and the scratch folder
    with RunLock(RunFolder(root)):
        assert not [p for p in root.rglob("*") if p.name.startswith((".last.pt.", ".tmp."))]
    assert all(path.read_text() == "the user's" for path in mine)


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
    from fakd_deploy.utils import SCRATCH_NAME

    assert len(seen) == 1 and seen[0].parent == tmp_path / "deploy" and SCRATCH_NAME.match(seen[0].name)
    assert not seen[0].exists() and tempfile.gettempdir() != str(seen[0])


def test_other_ranks_follow_rank_zero_and_never_read_the_manifest(tmp_path: Path, monkeypatch) -> None:
    from fakd_deploy import session as engine
    from fakd_deploy.recipe import load_recipe

    monkeypatch.setattr(engine, "agree", lambda value: engine.Plan("resume"))  # what rank 0 broadcast
    session = engine.Session(
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
    session.stage("teacher", {"seed": 0}, lambda attempt: calls.append(attempt.resume) or ([], {}))
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


def test_a_bad_stored_recipe_names_the_model(tmp_path: Path, artifacts: dict[str, Path]) -> None:
    """The stored recipe is the model's, not a file the user wrote: the message names the model."""
    from fakd_deploy.deploy.onnx_meta import load_onnx, write_metadata

    model = load_onnx(artifacts["onnx"])
    write_metadata(model, {"recipe": "name: x\nseed: -1\n"})
    path = tmp_path / "stored.onnx"
    path.write_bytes(model.SerializeToString())
    refused(cli("evaluate", path), 2, "stored.onnx: its stored recipe cannot be used here", "--recipe")
    good = tmp_path / "good.onnx"
    good.write_bytes(artifacts["onnx"].read_bytes())
    result = cli("evaluate", good, "--set", "seed=-1")  # an override at fault: its key alone
    refused(result, 2, "recipe key 'seed'")
    assert "stored recipe" not in result.output


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


# --- Data outside the run folder -------------------------------------------------------


def test_a_lock_that_is_a_link_is_never_written_through(
    tmp_path: Path, tiny_recipe: Path, artifacts: dict[str, Path]
) -> None:
    """`.lock` pointing at a user's file: `run --out` and `bench RUN` refuse it; the file keeps
    its bytes (before: truncated to 0 bytes, exit 0)."""
    victim = tmp_path / "thesis.tex"
    victim.write_text("three years of work")
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(tiny_recipe.read_text())
    (run / "manifest.json").write_text('{"version": 2, "stages": {}}')
    (run / "students" / "kd_s0").mkdir(parents=True)
    (run / "students" / "kd_s0" / "best.pt").write_bytes(artifacts["checkpoint"].read_bytes())
    (run / ".lock").symlink_to(victim)
    refused(cli("run", tiny_recipe, "--out", run), 2, ".lock is a symbolic link")
    refused(cli("bench", run, "--backends", "pytorch"), 2, ".lock is a symbolic link")
    assert victim.read_text() == "three years of work"


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_a_lock_that_is_not_a_plain_file_is_refused(tmp_path: Path, kind: str) -> None:
    run = tmp_path / "run"
    run.mkdir()
    if kind == "fifo":
        os.mkfifo(run / ".lock")
    else:
        (run / ".lock").mkdir()
    with pytest.raises(BadInput, match=r"\.lock"):
        RunLock(RunFolder(run)).__enter__()


def test_an_out_folder_that_is_not_a_run_folder_is_refused_and_left_alone(
    tmp_path: Path, tiny_recipe: Path, artifacts: dict[str, Path]
) -> None:
    """`--out` on a dataset or home folder: refused naming it; its `.tmp/` folder and `*.tmp`
    files stay (before: deleted by the lock's clean-up)."""
    folder = tmp_path / "my-dataset"
    (folder / ".tmp").mkdir(parents=True)
    (folder / ".tmp" / "work.txt").write_text("mine")
    (folder / ".draft.tmp").write_text("mine too")
    (folder / "images").mkdir()
    teacher = ["--teacher", artifacts["checkpoint"]]
    for command in (["run"], ["train"], ["distill", *teacher], ["study", "--set", "study.lam0=[1]"]):
        result = cli(command[0], tiny_recipe, "--out", folder, *command[1:])
        refused(result, 2, "my-dataset", "not a fakd-deploy run folder")
    assert (folder / ".tmp" / "work.txt").read_text() == "mine"
    assert (folder / ".draft.tmp").read_text() == "mine too"
    assert sorted(p.name for p in folder.iterdir()) == [".draft.tmp", ".tmp", "images"]


@pytest.mark.parametrize(
    "marker",
    [
        '{"name": "ci pipeline", "stages": {"lint": {"cmd": "make lint"}}}',  # a CI file
        '{"name": "My PWA", "icons": []}',  # a web app's
        "[1, 2]",
    ],
)
def test_a_folder_marked_by_another_programs_manifest_is_refused_even_with_force(
    tmp_path: Path, tiny_recipe: Path, marker: str
) -> None:
    """Before: the CI file was replaced, the user's teacher/ moved to teacher.previous/ and
    deleted on the next redo; the web app's was refused with advice to use --force, which did
    the same."""
    folder = tmp_path / "project"
    (folder / "teacher").mkdir(parents=True)
    (folder / "teacher" / "notes.txt").write_text("mine")
    (folder / "manifest.json").write_text(marker)
    for force in ([], ["--force"]):
        result = cli("train", tiny_recipe, "--out", folder, "--role", "teacher", *force)
        refused(result, 2, "project", "its manifest.json is not one fakd-deploy writes")
        assert "--force" not in result.output
    assert (folder / "manifest.json").read_text() == marker
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) == [
        "manifest.json",
        "teacher",
        "teacher/notes.txt",
    ]


def test_a_damaged_manifest_of_a_run_folder_still_says_how_to_start_over(
    tmp_path: Path, tiny_recipe: Path
) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "manifest.json").write_text('{"version": 2, "stag')
    refused(cli("train", tiny_recipe, "--out", folder, "--role", "teacher"), 2, "not valid JSON", "--force")
    (folder / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    refused(
        cli("train", tiny_recipe, "--out", folder, "--role", "teacher"), 2, "it nests too deeply", "--force"
    )


def test_commands_writing_into_a_held_run_folder_wait_for_its_writer(
    tmp_path: Path, artifacts: dict[str, Path]
) -> None:
    """Before: `build`, `export`, `evaluate --json` and `predict --out` replaced or added the
    run's files (exit 0) while `run` or `bench` held the folder. A first run's folder holds
    no recipe.yaml yet: its manifest is what marks it."""
    import shutil

    run = tmp_path / "run"
    (run / "deploy").mkdir(parents=True)
    (run / "manifest.json").write_text('{"version": 2, "stages": {}}')
    model = Path(shutil.copy(artifacts["onnx"], run / "deploy" / "student.onnx"))
    image = tmp_path / "a.png"
    Image.new("RGB", (32, 32)).save(image)
    with RunLock(RunFolder(run)):
        refused(cli("build", model, "--backend", "ort-cpu-int8", "--calib", 2), 3, f"pid {os.getpid()}")
        refused(cli("export", artifacts["checkpoint"], "--out", run / "deploy" / "x.onnx"), 3, "run")
        json_out = run / "evaluation.json"
        refused(cli("evaluate", artifacts["onnx"], "--max-images", 1, "--json", json_out), 3, "run")
        refused(cli("predict", artifacts["onnx"], image, "--out", run), 3, "run")
        refused(cli("predict", artifacts["onnx"], image, "--out", run / "students"), 3, "run")
    assert sorted(p.name for p in run.rglob("*")) == [".lock", "deploy", "manifest.json", "student.onnx"]
    assert cli("build", model, "--backend", "ort-cpu-int8", "--calib", 2).exit_code == 0
    assert (run / "deploy" / "student.int8.onnx").is_file()
    assert cli("predict", artifacts["onnx"], image, "--out", run / "masks").exit_code == 0


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ('{"rows": [{"model": "x", "status": "weird"}]}', "'weird' is not a valid Status"),
        ('{"rows": [1]}', "is not a report fakd-deploy writes"),
        ("[1, 2]", "is not a report fakd-deploy writes"),
        ("[" * 100_000 + "]" * 100_000, "is not valid JSON (it nests too deeply)"),
    ],
)
def test_a_report_read_back_by_run_is_checked(tmp_path: Path, text: str, named: str) -> None:
    """What `run` reads back of its bench stage (the manifest's hash can be edited too).
    Before: ValueError and RecursionError tracebacks."""
    from fakd_deploy.pipeline import read_report

    path = tmp_path / "report.json"
    path.write_text(text)
    with pytest.raises(BadInput, match=re.escape(named)) as refused_with:
        read_report(path)
    assert str(path) in str(refused_with.value) and "\n" not in str(refused_with.value)


def test_an_out_that_is_a_dangling_link_is_named(tmp_path: Path, tiny_recipe: Path) -> None:
    (tmp_path / "out").symlink_to(tmp_path / "gone")
    refused(cli("run", tiny_recipe, "--out", tmp_path / "out"), 2, f"is a link to {tmp_path / 'gone'}")
    assert not (tmp_path / "gone").exists()


def test_a_hand_edited_lock_cannot_make_the_next_holder_delete_anything_else(tmp_path: Path) -> None:
    """Only recorded paths with the names this tool gives its temporary files are removed,
    and never through a link or outside the folder."""
    run = tmp_path / "run"
    (run / "students" / "kd_s0").mkdir(parents=True)
    (run / "manifest.json").write_text('{"version": 2, "stages": {}}')
    (tmp_path / "outside").mkdir()
    keep = {
        "best.pt": run / "students" / "kd_s0" / "best.pt",
        "outside": tmp_path / "outside" / ".x.0123456789abcdef.tmp",
        "via-link": tmp_path / "outside" / ".y.0123456789abcdef.tmp",
    }
    for path in keep.values():
        path.write_text("keep")
    (run / "link").symlink_to(tmp_path / "outside")
    recorded = [
        "students/kd_s0/best.pt",
        "../outside/.x.0123456789abcdef.tmp",
        "link/.y.0123456789abcdef.tmp",
    ]
    (run / ".lock").write_text('{"pid": 1}\n' + "".join(json.dumps(r) + "\n" for r in recorded))
    with RunLock(RunFolder(run)):
        pass
    assert all(path.read_text() == "keep" for path in keep.values())


@pytest.mark.parametrize("link", ["teacher", "students", "manifest.json"])
def test_nothing_inside_the_run_folder_is_followed_through_a_link(
    tmp_path: Path, tiny_recipe: Path, link: str
) -> None:
    """A stage folder or the manifest that is a symbolic link to a place outside the run
    folder: refused by name, and nothing is written there."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "manifest.json").write_text('{"version": 2, "stages": {}}')
    run = tmp_path / "run"
    run.mkdir()
    if link != "manifest.json":
        (run / "manifest.json").write_text('{"version": 2, "stages": {}}')
    (run / link).symlink_to(outside / "manifest.json" if link == "manifest.json" else outside)
    result = cli("run", tiny_recipe, "--out", run)
    refused(result, 2, link)
    assert "is a symbolic link" in result.output or "leads outside the folder" in result.output
    assert [p.name for p in outside.iterdir()] == ["manifest.json"]
    assert (outside / "manifest.json").read_text() == '{"version": 2, "stages": {}}'


def test_a_checkpoint_that_is_a_link_is_not_resumed_from(
    tmp_path: Path, tiny_recipe: Path, monkeypatch
) -> None:
    out = tmp_path / "run"
    signal_at_forward(monkeypatch, 3, signal.SIGINT)
    assert cli("train", tiny_recipe, "--out", out).exit_code == 130
    monkeypatch.undo()
    elsewhere = tmp_path / "elsewhere.pt"
    (out / "teacher" / "last.pt").rename(elsewhere)
    (out / "teacher" / "last.pt").symlink_to(elsewhere)
    before = elsewhere.read_bytes()
    refused(cli("train", tiny_recipe, "--out", out), 2, "last.pt is a symbolic link")
    assert elsewhere.read_bytes() == before


def test_deletes_and_writes_refuse_a_link_on_the_way(tmp_path: Path) -> None:
    from fakd_deploy.utils import save_text

    run = RunFolder(tmp_path / "run")
    (tmp_path / "run" / "inner").mkdir(parents=True)
    (tmp_path / "run" / "alias").symlink_to(tmp_path / "run" / "inner")  # a link inside the folder
    (tmp_path / "run" / "manifest.json").write_text('{"version": 2, "stages": {}}')
    (tmp_path / "run" / "inner" / "x").write_text("x")
    with RunLock(run):
        with pytest.raises(BadInput, match="symbolic link"):
            run.remove(tmp_path / "run" / "alias" / "x")
        with pytest.raises(BadInput, match="symbolic link"):
            save_text("y", tmp_path / "run" / "alias" / "y")
    assert (tmp_path / "run" / "inner" / "x").exists() and not (tmp_path / "run" / "inner" / "y").exists()


def test_a_second_lock_in_the_same_process_is_refused(tmp_path: Path) -> None:
    from fakd_deploy.errors import RunFolderBusy

    with RunLock(RunFolder(tmp_path / "run")), pytest.raises(RunFolderBusy, match=f"pid {os.getpid()}"):
        RunLock(RunFolder(tmp_path / "run")).__enter__()


# --- A redone stage keeps the work it replaces ------------------------------------------


def test_a_redone_stage_keeps_the_work_it_replaces_until_done(
    tmp_path: Path, tiny_recipe: Path, monkeypatch
) -> None:
    """The teacher scenario: a teacher trained with overrides, then `run` without them,
    interrupted. The trained teacher stays in place, one line says what changed, `distill`
    agrees with `run` that it is not this recipe's teacher, recipe.yaml still describes the
    teacher that exists; finishing the redo swaps the folders and keeps the old one aside."""
    from fakd_deploy.models import Checkpoint

    out = tmp_path / "run"
    other = ["--set", "teacher.model.encoder=resnet18", "--set", "teacher.train.steps=2"]
    assert cli("train", tiny_recipe, "--out", out, *other).exit_code == 0
    trained = (out / "teacher" / "best.pt").read_bytes()
    described = (out / "recipe.yaml").read_text()
    assert "resnet18" in described

    refused(
        cli("distill", tiny_recipe, "--out", out, "--variant", "kd"),
        2,
        "not this recipe's",
        'teacher.model.encoder "resnet18" -> "resnet10t"',
        "teacher.train.steps 2 -> 4",
    )
    signal_at_forward(monkeypatch, 3, signal.SIGINT)
    result = cli("run", tiny_recipe, "--out", out)
    assert result.exit_code == 130, result.output
    lines = [line for line in result.output.splitlines() if "redo teacher" in line]
    assert len(lines) == 1 and 'teacher.model.encoder "resnet18" -> "resnet10t"' in lines[0]
    assert "teacher.previous" in lines[0]
    assert (out / "teacher" / "best.pt").read_bytes() == trained
    assert (out / "teacher.next" / "last.pt").is_file()
    assert (out / "recipe.yaml").read_text() == described

    monkeypatch.undo()
    result = cli("train", tiny_recipe, "--out", out)
    assert result.exit_code == 0, result.output
    assert "resuming teacher from" in result.output and "teacher.next" in result.output
    assert Checkpoint.load(out / "teacher" / "best.pt").arch["encoder"] == "resnet10t"
    assert (out / "teacher.previous" / "best.pt").read_bytes() == trained
    assert not (out / "teacher.next").exists() and "resnet18" not in (out / "recipe.yaml").read_text()
    assert "skip teacher" in cli("train", tiny_recipe, "--out", out).output


def test_a_swap_cut_short_is_finished_by_the_next_attempt(tmp_path: Path, monkeypatch) -> None:
    """Killed between moving the old folder aside and moving the new one in: the next
    attempt finds the complete new outputs in `<folder>.next` and finishes the swap."""
    from fakd_deploy import runfolder
    from fakd_deploy.recipe import load_recipe
    from fakd_deploy.session import Session

    recipe = load_recipe(Path(__file__).parent / "recipes" / "tiny.yaml")
    run = RunFolder(tmp_path / "run")
    stage = run.root / "stage"

    def session() -> Session:
        return Session(recipe, run, False, torch.device("cpu"), 6, [], Manifest(run))

    def work(content: str, seen: list) -> object:
        def write(attempt):
            seen.append(attempt)
            attempt.folder.mkdir(parents=True, exist_ok=True)
            if not (attempt.folder / "out").exists():
                (attempt.folder / "out").write_text(content)
            return [attempt.folder / "out"], {}

        return write

    run.root.mkdir()
    session().stage("s", {"v": 1}, work("one", []), folder=stage)
    renames = []
    real_rename = os.rename

    def killed_after_one(source, target):
        renames.append(target)
        if len(renames) == 2:
            raise KeyboardInterrupt  # what a kill between the two renames leaves
        real_rename(source, target)

    monkeypatch.setattr(runfolder.os, "rename", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        session().stage("s", {"v": 2}, work("two", []), folder=stage)
    monkeypatch.undo()
    assert not stage.exists() and (run.root / "stage.previous" / "out").read_text() == "one"
    seen: list = []
    session().stage("s", {"v": 2}, work("never written", seen), folder=stage)
    assert seen[0].resume and seen[0].folder == run.root / "stage.next"
    assert (stage / "out").read_text() == "two" and (run.root / "stage.previous" / "out").read_text() == "one"
    assert Manifest(run).is_done("s", Manifest(run).entry("s")["key"])


def test_a_resumed_stage_records_the_time_of_all_its_attempts(tmp_path: Path, monkeypatch) -> None:
    """A study reports each run's training time from the manifest: an attempt stopped by a
    signal counts, one for other inputs does not, and a redo starts the count again."""
    from fakd_deploy import session as session_module
    from fakd_deploy.recipe import load_recipe
    from fakd_deploy.session import Session

    recipe = load_recipe(Path(__file__).parent / "recipes" / "tiny.yaml")
    run = RunFolder(tmp_path / "run")
    run.root.mkdir()
    clock = [100.0]
    monkeypatch.setattr(session_module.time, "perf_counter", lambda: clock[0])

    def stage(inputs: dict, seconds: float, stop: bool = False) -> None:
        def work(attempt):
            clock[0] += seconds
            if stop:
                raise KeyboardInterrupt
            return [], {}

        Session(recipe, run, False, torch.device("cpu"), 6, [], Manifest(run)).stage("s", inputs, work)

    def recorded() -> float:
        return Manifest(run).entry("s")["seconds"]

    for seconds in (30.0, 12.5):
        with pytest.raises(KeyboardInterrupt):
            stage({"v": 1}, seconds, stop=True)
    stage({"v": 1}, 40.0)
    assert recorded() == 82.5
    with pytest.raises(KeyboardInterrupt):
        stage({"v": 2}, 7.0, stop=True)
    stage({"v": 2}, 5.0)
    assert recorded() == 12.0
    stage({"v": 3}, 3.0)
    assert recorded() == 3.0
    with pytest.raises(KeyboardInterrupt):
        stage({"v": 4}, 50.0, stop=True)
    manifest = Manifest(run)
    manifest.entry("s")["attempt"]["seconds"] = "soon"  # a hand-edited manifest counts nothing
    manifest.save()
    stage({"v": 4}, 2.0)
    assert recorded() == 2.0


def test_changes_name_the_keys_and_files_that_differ() -> None:
    from fakd_deploy.runfolder import changes

    before = {"teacher.train": {"steps": 150, "lr": 0.01}, "teacher": {"file": "best.pt", "sha256": "a"}}
    after = {"teacher.train": {"steps": 1000, "lr": 0.01}, "teacher": {"file": "best.pt", "sha256": "b"}}
    assert changes(before, after) == "teacher.train.steps 150 -> 1000, teacher (file best.pt) changed"
    assert changes({"seed": 0}, {"seed": 0, "split": "val"}) == 'split is new ("val")'
    one = {"checkpoint kd_s0": {"file": "last.pt", "sha256": "a"}}
    two = {**one, "checkpoint kd_s1": {"file": "last.pt", "sha256": "c"}}
    assert changes(one, two) == "checkpoint kd_s1 is new (file last.pt)"
    assert changes(two, one) == "checkpoint kd_s1 is gone (was file last.pt)"


# --- Non-finite values ------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["nan", "inf variance", "negative variance"])
def test_teacher_weights_that_are_not_finite_are_refused_before_training(
    tmp_path: Path, tiny_recipe: Path, damage: str
) -> None:
    from fakd_deploy.models import build_model
    from fakd_deploy.recipe import load_recipe

    recipe = load_recipe(tiny_recipe)
    state = build_model(num_classes=6, **recipe.teacher.model.build_kwargs()).state_dict()
    name = next(key for key in state if key.endswith("running_var"))
    if damage == "nan":
        name = next(key for key in state if key.endswith("weight"))
        state[name][0] = float("nan")
    else:
        state[name][0] = float("inf") if damage == "inf variance" else -1.0
    weights = tmp_path / "teacher.pth"
    torch.save(state, weights)
    result = cli("train", tiny_recipe, "--out", tmp_path / "r", "--set", f"teacher.weights={weights}")
    refused(result, 2, "teacher.pth", name)
    assert not (tmp_path / "r").exists()
    checkpoint = tmp_path / "teacher.pt"
    from fakd_deploy.models import Checkpoint

    Checkpoint(model=state, arch={**recipe.teacher.model.build_kwargs(), "num_classes": 6}).save(checkpoint)
    refused(cli("distill", tiny_recipe, "--out", tmp_path / "d", "--teacher", checkpoint), 2, name)
    assert not (tmp_path / "d").exists()


# --- Bad input: one line and exit 2 -----------------------------------------------------


@pytest.mark.parametrize(
    "override, names",
    [
        ("seed=[", ["--set seed", "not valid YAML"]),
        ("seed=!!python/object/apply:os.system ['touch pwned']", ["--set seed", "python/object"]),
        ("seed=-1", ["seed"]),
        ("seed=18446744073709551616", ["seed"]),
        ("student.seeds=[0, 4294967296]", ["student.seeds"]),
        ("data.options=" + "[" * 100 + "]" * 100, ["nest"]),
    ],
)
def test_an_override_that_is_not_plain_yaml_is_one_line(tmp_path: Path, tiny_recipe: Path, override, names):
    result = cli("run", tiny_recipe, "--out", tmp_path / "r", "--set", override)
    refused(result, 2, *names)
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists() and not Path("pwned").exists()


def test_an_alias_bomb_and_a_huge_recipe_are_refused_at_once(tmp_path: Path) -> None:
    import time

    bomb = tmp_path / "bomb.yaml"
    levels = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    levels += [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]" for i in range(8)]
    bomb.write_text("\n".join(levels) + "\ndata: {}\nstudent: {}\n")
    assert len(bomb.read_bytes()) < 600
    huge = tmp_path / "huge.yaml"
    huge.write_text("data: {}\nstudent: {}\n# " + "x" * 50_000_000 + "\n")
    started = time.perf_counter()
    refused(cli("train", bomb, "--out", tmp_path / "b"), 2, "bomb.yaml", "100,000 values")
    refused(cli("train", huge, "--out", tmp_path / "h"), 2, "huge.yaml", "1,000,000 bytes")
    assert time.perf_counter() - started < 30  # before: minutes and gigabytes


def test_a_checkpoint_asking_for_a_huge_model_is_refused_before_allocating(
    tmp_path: Path, artifacts: dict[str, Path]
) -> None:
    from fakd_deploy.models import Checkpoint

    real = Checkpoint.load(artifacts["checkpoint"])
    for arch, name in (({"num_classes": 400_000_000}, "num_classes"), ({"channels": 10**9}, "channels")):
        path = tmp_path / f"{name}.pt"
        Checkpoint(model=real.model, arch={**real.arch, **arch}, recipe=real.recipe).save(path)
        image = tmp_path / "image.png"
        Image.new("RGB", (32, 32)).save(image)
        refused(cli("predict", path, image, "--out", tmp_path / "p"), 2, f"{name}.pt", name, "outside 1..")
        refused(cli("evaluate", path), 2, f"{name}.pt")  # the class count, or the bound


def test_a_stored_checkpoint_never_fetches_weights(
    tmp_path: Path, artifacts: dict[str, Path], monkeypatch
) -> None:
    """`arch.pretrained` naming hub weights is ignored: the checkpoint holds its weights."""
    from fakd_deploy.models import Checkpoint, segmenter

    real = Checkpoint.load(artifacts["checkpoint"])
    path = tmp_path / "hub.pt"
    Checkpoint(
        model=real.model, arch={**real.arch, "pretrained": "resnet10t.c3_in1k"}, recipe=real.recipe
    ).save(path)

    def network(*args: object) -> None:
        raise AssertionError("a stored checkpoint asked for hub weights")

    monkeypatch.setattr(segmenter, "_hub_name", network)
    model = Checkpoint.load(path).build(str(path))
    for key, value in real.model.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert cli("evaluate", path, "--max-images", "2").exit_code == 0


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares a size and holds no pixels: enough for a reader to judge the size."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_image_modes_and_sizes_are_read_or_refused_by_name(
    tmp_path: Path, artifacts: dict[str, Path]
) -> None:
    """20000 x 20000 PNG: refused by its size before decoding (before: PIL's traceback); a
    16-bit image: refused naming the mode (before: read as all white)."""
    huge = tmp_path / "huge.png"
    huge.write_bytes(png_header(20000, 20000))
    deep = tmp_path / "deep.png"
    Image.fromarray(np.full((32, 32), 40000, np.uint16)).save(deep)
    refused(
        cli("predict", artifacts["onnx"], huge, "--out", tmp_path / "p"), 2, "huge.png", "89,478,485 pixels"
    )
    refused(cli("predict", artifacts["onnx"], deep, "--out", tmp_path / "p"), 2, "deep.png", "I;16")
    assert not (tmp_path / "p").exists() or not any((tmp_path / "p").iterdir())


def test_a_bad_label_in_a_loader_worker_is_one_line(tmp_path: Path, tiny_recipe: Path) -> None:
    """Before: 21 lines, the worker's traceback inside the message."""
    root = tmp_path / "data"
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        for index in range(4):
            Image.new("RGB", (32, 32)).save(root / "images" / split / f"{index}.png")
            Image.new("L", (32, 32), 9 if (split, index) == ("train", 2) else 1).save(
                root / "masks" / split / f"{index}.png"
            )
    (root / "classes.yaml").write_text("[a, b, c]\n")
    result = cli(
        "train",
        tiny_recipe,
        "--out",
        tmp_path / "r",
        *("--set", "data.name=folder", "--set", f"data.root={root}", "--set", "data.options={}"),
        *("--set", "data.workers=2", "--set", "data.batch_size=2"),
    )
    refused(result, 2, "2.png", "label value(s) 9")
    errors = [line for line in result.output.splitlines() if line.strip()]
    assert errors[-1].startswith("error:") and "DataLoader worker" not in result.output


def test_control_characters_in_a_message_are_escaped(tmp_path: Path) -> None:
    """A file name with a newline cannot add a line the attacker wrote; escape sequences do
    not reach the terminal."""
    for name in ("model\nerror: all good, exit 0.onnx", "model\x1b[2J.onnx", "model\u2028x.onnx"):
        result = cli("evaluate", tmp_path / name)
        refused(result, 2)
        assert len(result.output.strip().splitlines()) == 1, result.output
        assert "\x1b" not in result.output and "\u2028" not in result.output
    assert "model\\nerror: all good" in cli("evaluate", tmp_path / "model\nerror: all good.onnx").output


@pytest.mark.timeout(60)
@pytest.mark.parametrize("what", ["image", "recipe", "checkpoint", "dataset image", "split list"])
def test_special_files_are_refused_not_read(tmp_path: Path, artifacts: dict[str, Path], what: str) -> None:
    """A FIFO where a file is expected: refused at once (before: the reader blocked forever)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    if what == "image":
        result = cli("predict", artifacts["onnx"], fifo, "--out", tmp_path / "p")
    elif what == "recipe":
        result = cli("train", fifo, "--out", tmp_path / "r")
    elif what == "checkpoint":
        result = cli("evaluate", fifo.rename(tmp_path / "fifo.pt"))
    else:
        root = tmp_path / "camvid"
        root.mkdir()
        Image.new("RGB", (8, 8)).save(root / "a.png")
        Image.new("L", (8, 8)).save(root / "a_L.png")
        if what == "split list":
            fifo.rename(root / "train.txt")
        else:
            (root / "train.txt").write_text("/fifo.png /a_L.png\n")
            fifo.rename(root / "fifo.png")
        result = cli("data", "check", "camvid", root)
    refused(result, 2, "not a regular file")


def test_the_synthetic_dataset_has_three_splits(tmp_path: Path, artifacts: dict[str, Path]) -> None:
    refused(cli("evaluate", artifacts["onnx"], "--set", "data.val_split=tset"), 2, "no split 'tset'")


# --- Signals and processes --------------------------------------------------------------


def test_a_signal_outside_training_exits_130_and_leaves_no_temporary_files(
    tmp_path: Path, artifacts: dict[str, Path], monkeypatch
) -> None:
    """SIGTERM while a build writes (inside ONNX Runtime's calibration and an atomic write):
    exit 130 and nothing temporary left (before: exit 143, `.X.tmp` and `.tmp/` left)."""
    import signal

    from fakd_deploy.deploy import quantize

    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(artifacts["onnx"].read_bytes())
    real = quantize.quantize_static

    def terminated(*args: object, **kwargs: object) -> None:
        real(*args, **kwargs)
        signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(quantize, "quantize_static", terminated)
    result = cli("build", onnx, "--backend", "ort-cpu-int8", "--calib", "2")
    assert result.exit_code == 130, result.output
    assert "interrupted: stopped by SIGTERM" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored after the command


def test_a_signal_ignored_at_start_stays_ignored() -> None:
    import signal

    from fakd_deploy.signals import interrupt_on_signals

    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
    try:
        with interrupt_on_signals():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_IGN, signal.SIG_DFL)
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_a_dead_holder_is_told_from_a_live_one(tmp_path: Path) -> None:
    import socket

    from fakd_deploy.runfolder import busy_message

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    holder = {"pid": dead.pid, "host": socket.gethostname(), "since": "now", "command": "train"}
    assert "no longer running" in busy_message(tmp_path, json.dumps(holder))
    alive = {**holder, "pid": os.getpid()}
    assert "is in use by" in busy_message(tmp_path, json.dumps(alive))


def test_a_full_disk_while_saving_a_checkpoint_says_so(tmp_path: Path, artifacts: dict[str, Path]) -> None:
    """A real full file system (a 256 KB tmpfs): "No space left on device" and the path
    (before: torch's "unexpected pos ..."); nothing is left behind."""
    from fakd_deploy.errors import WriteFailed
    from fakd_deploy.models import Checkpoint

    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)]).returncode:
        pytest.skip("mounting a small tmpfs needs root; the simulated full disk is tested without it")
    try:
        with pytest.raises(WriteFailed, match=r"cannot write .*small/last\.pt: No space left on device"):
            Checkpoint.load(artifacts["checkpoint"]).save(mount / "last.pt")
        assert list(mount.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_seen_through_a_python_file_names_enospc(
    tmp_path: Path, artifacts: dict[str, Path], monkeypatch
):
    """The same without root: the file torch writes to raises the OS's ENOSPC."""
    import builtins

    from fakd_deploy.errors import WriteFailed
    from fakd_deploy.models import Checkpoint

    class Full:
        def __init__(self, handle) -> None:
            self.handle = handle

        def write(self, data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name: str):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc: object) -> None:
            self.handle.close()

    real_open = builtins.open
    monkeypatch.setattr(
        builtins,
        "open",
        lambda file, mode="r", *a, **k: (
            Full(real_open(file, mode, *a, **k)) if mode == "wb" else real_open(file, mode, *a, **k)
        ),
    )
    with pytest.raises(WriteFailed, match=r"cannot write .*last\.pt: No space left on device"):
        Checkpoint.load(artifacts["checkpoint"]).save(tmp_path / "last.pt")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def catches(pid: int, signum: int) -> bool:
    """Whether process `pid` has a handler installed for `signum` (its SigCgt mask)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


@pytest.mark.slow
def test_sigterm_during_bench_exits_130_and_keeps_the_report(
    tmp_path: Path, artifacts: dict[str, Path]
) -> None:
    """Before: killed by the signal (exit 143 in a shell), no message."""
    import signal
    import time

    report = tmp_path / "report"
    report.mkdir()
    (report / "report.md").write_text("the previous report")
    (report / "report.json").write_text('{"header": {}, "rows": []}')
    command = [
        sys.executable,
        str(Path(__file__).resolve().parents[1] / "cli.py"),
        "bench",
        artifacts["onnx"],
    ]
    options = ["--out", report, "--backends", "ort-cpu-fp32", "--seconds", "120", "--warmup", "0"]
    proc = subprocess.Popen([str(a) for a in command + options], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not catches(proc.pid, signal.SIGTERM) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(3)  # into the timing loop
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted: stopped by SIGTERM" in err and "Traceback" not in err
    assert sorted(p.name for p in report.iterdir()) == [".lock", "report.json", "report.md"]
    assert (report / "report.md").read_text() == "the previous report"


def test_recording_versions_imports_no_runtime() -> None:
    code = (
        "import sys; from fakd_deploy.session import versions; v = versions(); "
        "print('onnxruntime' in sys.modules, v['onnxruntime'])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out[0] == "False" and out[1] != "not installed"  # installed here, found without importing it


# --- Issue cases on the deploy side, and variants tried against the fixes -----------------


def damaged_folder_dataset(root: Path, classes: int = 6) -> None:
    """A folder dataset of two images, the second one truncated."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.yaml").write_text(json.dumps([f"c{i}" for i in range(classes)]))
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        image = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(image).save(root / "images" / f"{name}.png")
        mask = rng.integers(0, classes, (32, 32), dtype=np.uint8)
        Image.fromarray(mask).save(root / "masks" / f"{name}.png")
    damaged = root / "images" / "b.png"
    damaged.write_bytes(damaged.read_bytes()[:100])


def test_bench_on_data_it_cannot_read_is_exit_2_and_keeps_the_report(
    tmp_path: Path, artifacts: dict[str, Path]
) -> None:
    """Before: exit 0, every row "loads, fails to run", the good report overwritten. The data
    is at fault, not the model: one line naming the image, before anything is timed."""
    damaged_folder_dataset(tmp_path / "data")
    report = tmp_path / "report"
    report.mkdir()
    (report / "report.md").write_text("the previous report")
    (report / "report.json").write_text('{"header": {}, "rows": []}')
    result = cli(
        "bench", artifacts["onnx"], "--out", report, "--backends", "ort-cpu-fp32",
        "--set", "data.name=folder", "--set", "data.options={}", "--set", f"data.root={tmp_path / 'data'}",
        "--seconds", "0.1",
    )  # fmt: skip
    refused(result, 2, "b.png")
    assert sorted(p.name for p in report.iterdir()) == [".lock", "report.json", "report.md"]
    assert (report / "report.md").read_text() == "the previous report"


def test_a_lock_that_is_a_hard_link_is_refused_and_left_alone(tmp_path: Path) -> None:
    """A variant of the linked lock: a hard link is a regular file that O_NOFOLLOW opens, and
    truncating it would truncate the user's file under its other name."""
    victim = tmp_path / "thesis.tex"
    victim.write_text("three years of work")
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text('{"version": 2, "stages": {}}')
    os.link(victim, run / ".lock")
    with pytest.raises(BadInput, match=r"\.lock has 2 names"):
        RunLock(RunFolder(run)).__enter__()
    assert victim.read_text() == "three years of work"


@pytest.mark.parametrize("name", ["teacher.next", "teacher.previous"])
def test_a_link_where_a_redo_keeps_its_work_is_removed_not_followed(tmp_path: Path, name: str) -> None:
    """`teacher.next` or `teacher.previous` planted as a link to a user's folder: the link is
    removed, what it points to is kept (before: refused as outside the run folder)."""
    from fakd_deploy.recipe import load_recipe
    from fakd_deploy.session import Session

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    run = RunFolder(tmp_path / "run")
    run.root.mkdir()
    stage = run.root / "teacher"
    recipe = load_recipe(Path(__file__).parent / "recipes" / "tiny.yaml")

    def work(content: str):
        def write(attempt):
            attempt.folder.mkdir(parents=True, exist_ok=True)
            (attempt.folder / "out").write_text(content)
            return [attempt.folder / "out"], {}

        return write

    session = Session(recipe, run, False, torch.device("cpu"), 6, [], Manifest(run))
    session.stage("teacher", {"v": 1}, work("one"), folder=stage)
    (run.root / name).symlink_to(outside)
    session = Session(recipe, run, False, torch.device("cpu"), 6, [], Manifest(run))
    session.stage("teacher", {"v": 2}, work("two"), folder=stage)
    assert (stage / "out").read_text() == "two"
    assert (run.root / "teacher.previous" / "out").read_text() == "one"
    assert not (run.root / "teacher.previous").is_symlink()
    assert sorted(p.name for p in outside.iterdir()) == ["keep.txt"]
    assert (outside / "keep.txt").read_text() == "mine"


def test_a_stored_recipe_and_metadata_are_bounded(tmp_path: Path, artifacts: dict[str, Path]) -> None:
    """The YAML bounds hold for a recipe carried in an ONNX model's metadata, and each
    metadata value is bounded before it is decoded."""
    from fakd_deploy.deploy.onnx_meta import load_onnx, write_metadata

    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
        for i in range(12)
    )
    for value, message in ((bomb, "expands to more than"), ("x" * 2_000_001, "the limit is")):
        model = load_onnx(artifacts["onnx"])
        write_metadata(model, {"recipe": value})
        path = tmp_path / "m.onnx"
        path.write_bytes(model.SerializeToString())
        refused(cli("evaluate", path), 2, "m.onnx", message)


TENSOR = {"name": "images", "dtype": "DataType.FLOAT", "shape": [1, 3, 32, 32]}


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        "[1, 2]",
        '"just text"',
        json.dumps({"precision": "fp16", "inputs": [{"dtype": "FLOAT", "shape": [1, 3, 32, 32]}]}),
        json.dumps({"precision": "fp16", "inputs": [{**TENSOR, "shape": ["a"]}]}),
        json.dumps({"precision": "fp16", "inputs": [{**TENSOR, "shape": 5}]}),
        json.dumps({"precision": "fp16", "inputs": [TENSOR], "outputs": {"name": "logits"}}),
    ],
)
def test_an_engine_sidecar_that_is_not_a_json_object_is_one_line(tmp_path: Path, text: str) -> None:
    from fakd_deploy.deploy.trt import sidecar_path

    engine = tmp_path / "m.engine"
    engine.write_bytes(b"not an engine")
    sidecar_path(engine).write_text(text)
    refused(cli("evaluate", engine), 2, sidecar_path(engine).name)


@pytest.mark.parametrize(
    "variant", ["manifest is a folder", "manifest is a FIFO", "file where a stage folder goes"]
)
def test_a_run_folder_of_the_wrong_kinds_of_file(tmp_path: Path, tiny_recipe: Path, variant: str) -> None:
    """Variants: special files where the run folder's own files or folders go are named,
    never read (a FIFO would hang) and never followed."""
    run = tmp_path / "run"
    run.mkdir()
    if variant == "manifest is a folder":
        (run / "manifest.json").mkdir()
        refused(cli("train", tiny_recipe, "--out", run), 2, "manifest.json", "directory")
    elif variant == "manifest is a FIFO":
        os.mkfifo(run / "manifest.json")
        refused(cli("train", tiny_recipe, "--out", run), 2, "manifest.json", "not a regular file")
    else:
        (run / "manifest.json").write_text('{"version": 2, "stages": {}}')
        (run / "teacher").write_text("a file the user put here")
        (run / "students").symlink_to(tmp_path)
        refused(cli("run", tiny_recipe, "--out", run), 2, "students/baseline_s0", "leads outside the folder")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.parametrize(
    "text",
    ["[" * 100_000 + "]" * 100_000, "\x00\xff\xfe garbage", "data: {name: synthetic}\n" * 60_000],
)
def test_garbage_recipes_are_one_line(tmp_path: Path, text: str) -> None:
    """Variants of the bounded recipe: nesting deep enough to exhaust the parser's stack,
    bytes that are not text, a file just over the size bound."""
    path = tmp_path / "recipe.yaml"
    path.write_bytes(text.encode("latin-1"))
    result = cli("train", path, "--out", tmp_path / "run")
    refused(result, 2, "recipe.yaml")
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_evaluate_refuses_another_class_count_and_a_json_folder(
    tmp_path: Path, artifacts: dict[str, Path]
) -> None:
    """Before: exit 0 with a meaningless mIoU; `--json DIR` and `--json ""` exit 1 "Device or
    resource busy"."""
    wrong = ["--set", "data.options.num_classes=11"]
    refused(cli("evaluate", artifacts["onnx"], *wrong), 2, "classes", "has 11")
    for target in (tmp_path, ""):
        refused(cli("evaluate", artifacts["onnx"], "--json", target), 2, "--json", "folder")


def _hostile_onnx(tmp_path: Path, source: Path, case: str) -> Path:
    """The exported tiny model, changed the way a hostile or foreign ONNX file would be."""
    import onnx
    from onnx import helper

    model = onnx.load(str(source))
    if case == "opset 7":
        model.opset_import[0].version = 7
    elif case == "custom domain":
        model.graph.node[0].domain = "com.example.evil"
    elif case == "external data outside":
        weight = model.graph.initializer[0]
        weight.ClearField("raw_data")
        weight.data_location = onnx.TensorProto.EXTERNAL
        weight.external_data.add(key="location", value="../../etc/passwd")
    elif case == "rank 2 input":
        dims = model.graph.input[0].type.tensor_type.shape.dim
        del dims[2:]
    elif case == "two inputs":
        model.graph.input.append(helper.make_tensor_value_info("extra", onnx.TensorProto.FLOAT, [1]))
    elif case in ("batch 0", "batch 100000", "0 x 0 pixels", "200000 pixels high"):
        dims = model.graph.input[0].type.tensor_type.shape.dim
        edits = {
            "batch 0": {0: 0},
            "batch 100000": {0: 100_000},
            "0 x 0 pixels": {2: 0, 3: 0},
            "200000 pixels high": {2: 200_000},
        }[case]
        for index, size in edits.items():
            dims[index].dim_value = size
    elif case == "no outputs":
        del model.graph.output[:]
    else:
        key, value = {
            "mean of two": ("mean", "[0.5, 0.5]"),
            "huge class count": ("num_classes", "400000000"),
            "unknown input mode": ("input", '"bgr"'),
            "escape in a class name": ("class_names", json.dumps(["a", "b\x1b[2J", "c", "d", "e", "f"])),
            "class names of another count": ("class_names", json.dumps(["a", "b", "c"])),
            "another class count": ("num_classes", "7"),
            "deeply nested metadata": ("class_names", "[" * 100_000 + "]" * 100_000),
        }[case]
        entries = {p.key: p for p in model.metadata_props}
        if key in entries:
            entries[key].value = value
        else:
            model.metadata_props.add(key=key, value=value)
    path = tmp_path / "hostile.onnx"
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize(
    ("case", "named"),
    [
        ("opset 7", "opset 7"),
        ("custom domain", "custom domain 'com.example.evil'"),
        ("external data outside", "outside the model's folder"),
        ("rank 2 input", "has rank 2"),
        ("two inputs", "has 2 inputs"),
        ("batch 0", "input 'images' has batch 0; 1 to 1024 run here"),
        ("batch 100000", "input 'images' has batch 100000"),
        ("0 x 0 pixels", "input 'images' is 0 x 0 pixels; 1 to 8192 a side run here"),
        ("200000 pixels high", "input 'images' is 200000 x 32 pixels"),
        ("no outputs", "has no outputs"),
        ("mean of two", "'mean'"),
        ("huge class count", "400000000"),
        ("unknown input mode", "metadata 'input'"),
        ("escape in a class name", "metadata 'class_names' has 'b\\x1b[2J' at 1"),
        ("class names of another count", "metadata 'class_names' names 3 classes and 'num_classes' is 6"),
        ("another class count", "output 'logits' gives 6 class scores and metadata 'num_classes' is 7"),
        ("deeply nested metadata", "metadata 'class_names'"),
    ],
)
def test_a_foreign_onnx_model_is_refused_in_one_line_before_any_runtime(
    tmp_path: Path, artifacts: dict[str, Path], case: str, named: str
) -> None:
    """Read once by `Artifact.open`: nothing is loaded by a runtime or read outside its folder."""
    path = _hostile_onnx(tmp_path, artifacts["onnx"], case)
    image = tmp_path / "image.png"
    Image.new("RGB", (32, 32)).save(image)
    for args in (["evaluate", path], ["predict", path, image, "--out", tmp_path / "out"]):
        result = cli(*args)
        refused(result, 2, "hostile.onnx", named)
        assert len(result.output.strip().splitlines()) == 1, result.output
