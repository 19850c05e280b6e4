"""bench + report: one row per model and artifact of a run, failures as rows (whose fault they
are), interleaved timing, warnings, the pick, report files."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import synthetic_recipe
from PIL import Image
from torch import nn

from fakd_deploy.deploy.bench import add_deltas, bench, bench_run, candidates, split_backends
from fakd_deploy.deploy.measure import PeakMemory
from fakd_deploy.deploy.pick import pareto_front
from fakd_deploy.deploy.report import (
    figure_of,
    keep_labels_apart,
    report_table,
    to_markdown,
    write_report,
)
from fakd_deploy.deploy.rows import BenchReport, BenchRow, Latency, Status
from fakd_deploy.errors import BadInput
from fakd_deploy.recipe import BenchConfig, parse_recipe
from fakd_deploy.runfolder import RunFolder

RECIPE = synthetic_recipe()
ROW_KEYS = {
    "model",
    "backend",
    "runtime",
    "precision",
    "status",
    "error",
    "miou",
    "delta_miou",
    "passed",
    "latency_ms",
    "gpu_compute_ms",
    "fps",
    "throughput",
    "size_mb",
    "peak_mem_mb",
    "speedup",
    "fault",
    "file",
    "per_class_iou",
    "confusion",
    "delta_teacher",
    "pareto",
    "picked",
    "warnings",
}
FAST = BenchConfig(threads=1, iters=3, warmup_s=0.0, batch=2, rounds=3, compare=2, pick=True)


def _checkpoint(recipe: Any, role: str, variant: str | None, path: Path) -> Path:
    from fakd_deploy.data.splits import dataset_info
    from fakd_deploy.models import Checkpoint, build_model

    num_classes, names = dataset_info(recipe.data)
    torch.manual_seed(0)
    model = build_model(num_classes=num_classes, **recipe.student.model.build_kwargs())
    return Checkpoint(
        model=model.state_dict(),
        arch=model.config,
        recipe=recipe.model_dump(mode="json"),
        class_names=names,
        role=role,
        variant=variant,
        seed=None if variant is None else 0,  # as a run stores them
        step=1,
    ).save(path)


class OneChannel(nn.Module):
    """A valid ONNX model that expects 1-channel images: it loads, but evaluation on RGB fails."""

    def __init__(self) -> None:
        super().__init__()
        self.classifier = nn.Conv2d(1, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fakd_deploy.data.splits import calibration_images
    from fakd_deploy.deploy.build import build
    from fakd_deploy.deploy.export import export_onnx

    root = tmp_path_factory.mktemp("bench") / "run"  # alone in its folder: no near names beside it
    root.mkdir()
    recipe = parse_recipe(RECIPE)
    (root / "recipe.yaml").write_text(recipe.to_yaml())
    _checkpoint(recipe, "teacher", None, root / "teacher" / "best.pt")
    student = _checkpoint(recipe, "student", "baseline", root / "students" / "baseline_s0" / "best.pt")
    onnx_path = root / "deploy" / "baseline.onnx"
    export_onnx(student, onnx_path, 64, 64)
    build(onnx_path, "ort-cpu-int8", calib_images=calibration_images(recipe.data, 4))
    (root / "deploy" / "broken.onnx").write_bytes(onnx_path.read_bytes()[:500])
    torch.onnx.export(
        OneChannel().eval(),
        (torch.randn(1, 1, 64, 64),),
        root / "deploy" / "gray.onnx",
        input_names=["images"],
        external_data=False,
        verbose=False,
    )
    return root


RUN_ROOT: list[Path] = []


@pytest.fixture(scope="module")
def result(run: Path) -> BenchReport:
    RUN_ROOT[:] = [run]
    return bench_run(parse_recipe(RECIPE), candidates(RunFolder(run)), FAST, title=str(run))


def _rows(result: BenchReport) -> list[dict[str, Any]]:
    """The rows as report.json holds them."""
    return result.to_dict()["rows"]


def _row(result: BenchReport, model: str, backend: str) -> dict[str, Any]:
    return next(r for r in _rows(result) if (r["model"], r["backend"]) == (model, backend))


def test_every_model_and_artifact_gets_a_row(result: BenchReport) -> None:
    keys = [(r["model"], r["backend"], r["precision"]) for r in _rows(result)]
    assert keys == [
        ("teacher", "pytorch", "fp32"),
        ("baseline_s0", "pytorch", "fp32"),
        ("baseline_s0", "ort-cpu-fp32", "fp32"),
        ("baseline_s0", "ort-cpu-int8", "int8"),
        ("broken", "ort-cpu-fp32", "fp32"),
        ("gray", "ort-cpu-fp32", "fp32"),
    ]
    for row in _rows(result):
        assert set(row) >= ROW_KEYS


def test_ok_rows_are_complete(result: BenchReport) -> None:
    for row in result.rows[:4]:
        assert row.status is Status.OK and row.error is None and row.fault is None
        assert row.miou is not None and 0 <= row.miou <= 100
        latency = row.latency_ms
        assert latency is not None and latency.rounds is not None and len(latency.rounds) == FAST.rounds
        medians = np.array(latency.rounds)
        spread = 100 * (medians.max() - medians.min()) / np.median(medians)
        assert latency.spread == pytest.approx(spread, abs=0.06)  # rounded to 0.1 %
        assert row.fps == pytest.approx(1000 / latency.mean, abs=0.006)
        assert row.throughput is not None and row.size_mb > 0 and row.gpu_compute_ms is None
        assert row.file is not None and (RUN_ROOT[0] / row.file).is_file()
    fp32 = _row(result, "baseline_s0", "ort-cpu-fp32")
    assert abs(fp32["delta_miou"]) < 0.01 and fp32["passed"] is True and fp32["reference"] == "pytorch"
    assert _row(result, "baseline_s0", "pytorch")["delta_miou"] == 0


def test_each_row_is_scored_from_its_own_confusion_matrix(result: BenchReport) -> None:
    """mIoU and per-class IoU recomputed here from the pixel counts the row carries; every row
    counts the same ground-truth pixels (its matrix rows sum to the same class totals)."""
    totals = None
    for row in result.rows[:4]:
        counts = np.array(row.confusion, dtype=np.float64)
        tp = np.diag(counts)
        union = counts.sum(0) + counts.sum(1) - tp
        present = union > 0
        assert row.miou == pytest.approx(100 * (tp[present] / union[present]).mean(), abs=1e-3)
        expected = [round(100 * t / u, 3) if u else None for t, u in zip(tp, union, strict=True)]
        assert row.per_class_iou == pytest.approx(expected, abs=1e-3)
        totals = counts.sum(1) if totals is None else totals
        np.testing.assert_array_equal(counts.sum(1), totals)
    assert totals is not None and totals.sum() == 8 * 64 * 64  # 8 val images of 64x64, nothing ignored


def test_peak_memory_of_a_row_is_what_its_model_holds(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in runtime that keeps 96 MiB while it is open reads as ~96 MB on its row."""
    from fakd_deploy.artifacts import ModelInfo
    from fakd_deploy.data.preprocess import Normalise
    from fakd_deploy.deploy import runtime

    def heavy(*args: Any, **kwargs: Any) -> tuple[Any, ModelInfo]:
        held = np.ones(96 * 2**20, dtype=np.uint8)  # touched, so resident

        def predictor(images: np.ndarray) -> np.ndarray:
            assert held[0] == 1
            return np.zeros((images.shape[0], 6, *images.shape[-2:]), np.float32)

        return predictor, ModelInfo(Normalise((0.0,) * 3, (1.0,) * 3))

    monkeypatch.setattr(runtime, "open_predictor", heavy)
    found = [
        c for c in candidates(RunFolder(run)) if c.backend == "ort-cpu-fp32" and c.model == "baseline_s0"
    ]
    report = bench_run(parse_recipe(RECIPE), found, FAST.model_copy(update={"compare": 0, "pick": False}))
    assert report.rows[0].peak_mem_mb == pytest.approx(96, abs=12)


def test_failed_rows_say_whose_fault_it_was(result: BenchReport) -> None:
    broken = _row(result, "broken", "ort-cpu-fp32")
    assert broken["status"] == "load failed" and broken["fault"] == "model"
    assert "broken.onnx" in broken["error"] and broken["miou"] is None
    gray = _row(result, "gray", "ort-cpu-fp32")
    # a 1-channel input is refused when the model is opened, before any image is fed
    assert gray["status"] == "load failed" and gray["fault"] == "model"
    assert "has 1 channels" in gray["error"] and gray["size_mb"] > 0 and gray["miou"] is None


def test_a_model_for_other_classes_is_the_datas_fault_and_alone_refused(run: Path, tmp_path: Path) -> None:
    """Scored on data with another class count: a row saying so among others; alone, exit 2."""
    eight = {**RECIPE, "data": {**RECIPE["data"], "options": {**RECIPE["data"]["options"], "num_classes": 8}}}
    found = [c for c in candidates(RunFolder(run)) if c.backend == "ort-cpu-int8" or c.model == "broken"]
    mixed = bench_run(parse_recipe(eight), found, FAST.model_copy(update={"compare": 0}))
    rows = {(r.model, r.backend): r for r in mixed.rows}
    assert rows[("broken", "ort-cpu-fp32")].fault == "model"
    assert rows[("baseline_s0", "ort-cpu-int8")].fault == "data"
    assert "predicts 6 classes" in (rows[("baseline_s0", "ort-cpu-int8")].error or "")
    assert "has 8" in (rows[("baseline_s0", "ort-cpu-int8")].error or "")
    alone = [c for c in found if c.model == "baseline_s0"]
    with pytest.raises(BadInput, match=r"predicts 6 classes but the data .* has 8"):
        bench_run(parse_recipe(eight), alone, FAST)


def test_header_names_the_machine(result: BenchReport) -> None:
    header = result.header
    assert header["cpu"] and header["threads"] == 1 and header["batch"] == 2 and header["rounds"] == 3
    assert header["input_size"] == [64, 64] and header["val_images"] == 8
    assert set(header["versions"]) >= {"torch", "onnxruntime", "tensorrt"}
    assert header["split"] == "val" and header["dataset"] == "synthetic" and len(header["class_names"]) == 6
    assert set(header["timing"]) == {"latency_ms", "gpu_compute_ms", "spread"}
    if not torch.cuda.is_available():
        assert header["gpu"] is None


def test_backend_filter_keeps_each_models_reference_row(run: Path) -> None:
    """`--backends ort-int8` still measures the PyTorch row it is compared with: `× ref` and
    ΔmIoU mean the same whatever is selected."""
    only, written = bench([run], ["ort-int8"], iters=2, warmup_s=0.0, max_images=4, rounds=2)
    assert [(r.model, r.backend, r.status) for r in only.rows] == [
        ("baseline_s0", "pytorch", Status.OK),
        ("baseline_s0", "ort-cpu-int8", Status.OK),
        ("broken", "ort-cpu-int8", Status.SKIPPED),  # exported models without an INT8 build
        ("gray", "ort-cpu-int8", Status.SKIPPED),
    ]
    int8 = only.rows[1]
    assert int8.reference == "pytorch" and only.rows[0].is_reference
    assert int8.speedup == pytest.approx(only.rows[0].latency_ms.p50 / int8.latency_ms.p50, abs=0.006)  # type: ignore[union-attr]
    assert written["json"] == run / "report.json"


def test_model_files_are_benched_without_a_run_folder(run: Path, tmp_path: Path) -> None:
    """On a device without the training stack: the ONNX rows, ORT FP32 as the reference."""
    files = [run / "deploy" / "baseline.onnx", run / "deploy" / "baseline.int8.onnx"]
    result, written = bench(files, out=tmp_path / "report", iters=2, warmup_s=0.0, max_images=4)
    rows = {r["backend"]: r for r in _rows(result)}
    assert set(rows) == {"ort-cpu-fp32", "ort-cpu-int8"}
    assert rows["ort-cpu-int8"]["reference"] == "ort-cpu-fp32" and rows["ort-cpu-int8"]["speedup"] > 0
    assert written["md"] == tmp_path / "report" / "report.md"


def test_a_backend_asked_for_without_its_file_is_a_row_that_says_why(run: Path) -> None:
    """`--backends trt-fp16` with no engine built: a row per exported model naming the missing
    file and the build command (and, without TensorRT, why it could not run here anyway),
    instead of "nothing to benchmark"."""
    only, _ = bench([run], ["trt-fp16"], out=run / "gpu-report", iters=2, warmup_s=0.0)
    assert [(r.model, r.backend, r.status, r.fault) for r in only.rows] == [
        ("baseline_s0", "trt-fp16", Status.SKIPPED, "backend"),
        ("broken", "trt-fp16", Status.SKIPPED, "backend"),
        ("gray", "trt-fp16", Status.SKIPPED, "backend"),
    ]
    error = only.rows[0].error or ""
    assert error.startswith("no deploy/baseline.fp16.engine: build it with ")
    assert "`fakd-deploy build deploy/baseline.onnx --backend trt-fp16`" in error
    if not torch.cuda.is_available():
        assert "TensorRT is not installed" in error or "no CUDA GPU" in error


def test_a_mistyped_run_folder_gets_the_near_names(run: Path) -> None:
    misspelt = run.with_name(run.name[:-1])
    with pytest.raises(BadInput, match=rf"{misspelt} does not exist; did you mean {run}"):
        bench([misspelt])


def test_backend_names_are_split_and_checked() -> None:
    assert split_backends(None) is None
    assert split_backends(["ort-int8,pytorch", " trt-fp16 "]) == ["ort-cpu-int8", "pytorch", "trt-fp16"]
    with pytest.raises(BadInput, match=r"unknown backend 'ort-fp8'.*choose from: ort-cpu-fp32"):
        split_backends(["ort-fp8"])
    with pytest.raises(BadInput, match=r"there is no ort-cuda-int8: .* ort-trt-int8 .* or trt-int8"):
        split_backends(["ort-cuda-int8"])


def test_report_files(result: BenchReport, tmp_path: Path) -> None:
    paths = write_report(result, tmp_path)
    assert {p.name for p in paths.values()} == {
        "choice.json",
        "report.json",
        "report.csv",
        "report.md",
        "report.png",
        "report.confusion.png",
        "report.compare.png",
        "report.html",
    }
    saved = json.loads((tmp_path / "report.json").read_text())
    assert set(saved) == {"header", "rows", "warnings", "choice"} and len(saved["rows"]) == len(_rows(result))
    assert BenchReport.from_dict(saved).rows[0].latency_ms == result.rows[0].latency_ms
    with open(tmp_path / "report.csv") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == len(_rows(result)) and "latency_p50_ms" in table[0] and "latency_spread" in table[0]
    markdown = (tmp_path / "report.md").read_text()
    assert "| model |" in markdown and "broken" in markdown and "host latency" in markdown
    assert "load failed (model)" in markdown and "![Where backends disagree](report.compare.png)" in markdown
    assert "## Per-class IoU change against the ref row" in markdown
    for name in ("report.png", "report.confusion.png", "report.compare.png"):
        assert Image.open(tmp_path / name).format == "PNG"
    assert report_table(result).row_count == len(_rows(result))


def test_the_comparison_grid_marks_exactly_the_pixels_that_differ(run: Path, result: BenchReport) -> None:
    """Columns: image, ground truth, the model's PyTorch row (its reference), its ONNX FP32 and
    INT8 rows. In the INT8 column of each image, the magenta pixels are exactly those where
    the INT8 model's labels differ from the checkpoint's, both predicted again here."""
    from fakd_deploy.data.splits import ValBatches
    from fakd_deploy.deploy.runtime import open_predictor
    from fakd_deploy.evaluate import predict_labels

    grid = np.asarray(result.compare)
    images, _ = next(iter(ValBatches(parse_recipe(RECIPE).data, max_images=2)))
    labels = {}
    for name, path in (("ref", "students/baseline_s0/best.pt"), ("int8", "deploy/baseline.int8.onnx")):
        predictor, _ = open_predictor(run / path, device="cpu", threads=1)
        labels[name] = predict_labels(predictor, images)
    scale, title = 3, 34  # 64-pixel images drawn 3x (at least 160 pixels), 34-pixel title bands
    cell = 64 * scale
    assert grid.shape[1] >= 5 * cell
    for line in range(2):
        top = title + line * (cell + title)
        pixels = grid[top : top + cell : scale, 4 * cell : 5 * cell : scale]
        magenta = (pixels == [255, 0, 255]).all(-1)
        np.testing.assert_array_equal(magenta, labels["int8"][line] != labels["ref"][line])
        reference = grid[top : top + cell : scale, 2 * cell : 3 * cell : scale]
        assert not (reference == [255, 0, 255]).all(-1).any()


def test_which_file_each_backend_runs() -> None:
    from fakd_deploy.deploy.backends import BACKENDS, runs_artifact

    def runners(name: str) -> set[str]:
        return {b for b in BACKENDS if runs_artifact(b, Path(name))}

    assert runners("m.onnx") == {"ort-cpu-fp32", "ort-cuda-fp32", "ort-trt-fp16"}
    assert runners("m.int8.onnx") == {"ort-cpu-int8"}
    assert runners("m.qdq.onnx") == {"ort-trt-int8"}
    assert runners("m.fp16.engine") == {"trt-fp16"}
    assert runners("m.fp16.engine.json") == runners("m.int4.engine") == set()


def test_peak_memory_sees_each_block_even_after_a_freed_one() -> None:
    """A block that allocates what an earlier one freed still reads ~200 MB, not ~0.

    A small object kept alive above the freed heap pages stops glibc from returning them
    on its own: only `release_free_memory` (malloc_trim) lets the second block be seen.
    """
    pins = []
    for _ in range(2):
        with PeakMemory(gpu=False) as memory:
            chunks = [bytearray(4096) for _ in range(50_000)]
            pins.append(bytearray(4096))
        del chunks
        assert 180 <= memory.mb(gpu=False) <= 260


def _fake(model: str, backend: str, miou: float, p50: float, status: Status = Status.OK) -> BenchRow:
    return BenchRow(
        model=model,
        backend=backend,
        runtime="onnxruntime",
        precision="fp32",
        artifact=f"{model}.onnx",
        size_mb=1.0,
        status=status,
        miou=miou,
        latency_ms=Latency(p50, p50, p50, p50),
    )


def test_pareto_front_and_deltas() -> None:
    rows = [
        _fake("a", "pytorch", 70.0, 100.0),
        _fake("a", "ort-cpu-fp32", 69.5, 40.0),
        _fake("a", "trt-fp16", 60.0, 50.0),
        _fake("b", "pytorch", 75.0, 300.0),
        _fake("c", "ort-cpu-fp32", 0.0, 0.0, status=Status.RUN_FAILED),
    ]
    assert pareto_front(rows) == [0, 1, 3]
    add_deltas(rows, tolerance=1.0)
    assert rows[1].delta_miou == -0.5 and rows[1].passed is True
    assert rows[1].speedup == 2.5 and rows[2].speedup == 2.0 and rows[0].speedup == 1.0
    assert rows[2].passed is False and rows[4].delta_miou is None
    assert "| a |" in to_markdown(BenchReport({}, rows))


def test_plot_labels_do_not_cover_each_other() -> None:
    """An FP32 and an INT8 row at one mIoU, a few ms apart: their labels are moved apart."""
    rows = [
        _fake("fakd_kd_s0", "ort-cpu-int8", 68.0, 1.3),
        _fake("fakd_kd_s0", "ort-cpu-fp32", 68.0, 3.2),
        _fake("fakd_kd_s0", "pytorch", 68.0, 8.2),
        _fake("kd_s0", "pytorch", 67.6, 8.2),
        _fake("teacher", "pytorch", 75.2, 13.0),
    ]
    figure = figure_of(BenchReport({}, rows))
    (axes,) = figure.axes
    boxes = [text.get_window_extent() for text in axes.texts]
    assert len(boxes) == len(rows)
    assert not any(box.overlaps(axes.get_legend().get_window_extent()) for box in boxes)
    overlapping = [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1 :] if a.overlaps(b)]
    assert not overlapping


def test_a_label_under_the_legend_is_moved_out() -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4, 3), dpi=100)
    axes = figure.subplots()
    axes.plot([0, 1], [0, 1], label="Pareto front")
    axes.legend(loc="upper right")
    axes.scatter([0.8], [0.97])
    note = axes.annotate("a label under the legend", (0.8, 0.97), textcoords="offset points", xytext=(6, 4))
    figure.draw_without_rendering()
    legend = axes.get_legend()
    assert note.get_window_extent().overlaps(legend.get_window_extent())  # the case is real
    keep_labels_apart(figure, [note])
    assert not note.get_window_extent().overlaps(legend.get_window_extent())


def test_pick_writes_the_choice_with_the_files_hash(run: Path, result: BenchReport, tmp_path: Path) -> None:
    from fakd_deploy.utils import file_sha256

    choice = result.choice
    assert choice is not None and choice["version"] == 1
    picked = [row for row in result.rows if row.picked]
    assert len(picked) == 1 and picked[0].model == "baseline_s0" and picked[0].runtime == "onnxruntime"
    assert (choice["model"], choice["backend"], choice["file"]) == (
        picked[0].model,
        picked[0].backend,
        picked[0].file,
    )
    assert choice["sha256"] == file_sha256(run / choice["file"])
    assert {"miou", "latency_ms", "runner_up", "why", "decided", "tolerance", "other_devices"} <= set(choice)
    (tmp_path / "deploy").mkdir()
    assert write_report(result, tmp_path)["choice"] == tmp_path / "deploy" / "choice.json"
    assert json.loads((tmp_path / "deploy" / "choice.json").read_text()) == choice


def _folder_run(root: Path, artifacts: dict[str, Path], tiny_recipe: Path) -> Path:
    """A run folder on a user's image folder (3 images of 32x32, 6 classes) with one ONNX model."""
    import shutil

    import yaml

    data = root / "data"
    for sub in ("images", "masks"):
        (data / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(3):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
            data / "images" / f"{index}.png"
        )
        Image.fromarray(rng.integers(0, 6, (32, 32), dtype=np.uint8)).save(data / "masks" / f"{index}.png")
    (data / "classes.yaml").write_text(yaml.safe_dump([f"c{i}" for i in range(6)]))
    run = root / "run"
    (run / "deploy").mkdir(parents=True)
    shutil.copy(artifacts["onnx"], run / "deploy" / "student.onnx")
    recipe = yaml.safe_load(tiny_recipe.read_text())
    recipe["data"] = {
        "name": "folder",
        "root": str(data),
        "crop": [32, 32],
        "val_batch_size": 2,
        "workers": 0,
    }
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return run


def test_a_damaged_validation_image_stops_bench_before_timing_and_keeps_the_report(
    tmp_path: Path, artifacts: dict[str, Path], tiny_recipe: Path
) -> None:
    from typer.testing import CliRunner

    from fakd_deploy.cli import app

    run = _folder_run(tmp_path, artifacts, tiny_recipe)
    good, _ = bench([run], iters=1, warmup_s=0.0, rounds=1)
    assert [r.status for r in good.rows] == [Status.OK]
    before = (run / "report.json").read_bytes()
    damaged = tmp_path / "data" / "images" / "1.png"
    damaged.write_bytes(damaged.read_bytes()[:60])
    outcome = CliRunner().invoke(app, ["bench", str(run), "--iters", "1", "--warmup", "0"])
    assert outcome.exit_code == 2, outcome.output
    assert "the validation data cannot be read" in outcome.output and "1.png" in outcome.output
    assert "previous report is kept" in outcome.output and "Traceback" not in outcome.output
    assert (run / "report.json").read_bytes() == before


def test_a_report_inside_a_run_folder_waits_for_that_folders_writer(run: Path, tmp_path: Path) -> None:
    """`bench ... --out runs/q/cpu-report`: the run folder around the report keeps one writer."""
    import os

    from fakd_deploy.errors import RunFolderBusy
    from fakd_deploy.runfolder import RunFolder, RunLock

    around = tmp_path / "q"
    around.mkdir()
    (around / "recipe.yaml").write_text((run / "recipe.yaml").read_text())
    (around / "manifest.json").write_text('{"version": 2, "stages": {}}')
    files = [run / "deploy" / "baseline.onnx"]
    with RunLock(RunFolder(around)), pytest.raises(RunFolderBusy, match=f"{around}.*pid {os.getpid()}"):
        bench(files, out=around / "cpu-report", iters=2, warmup_s=0.0, max_images=4)
    _, written = bench(files, out=around / "cpu-report", iters=2, warmup_s=0.0, max_images=4)
    assert written["json"] == around / "cpu-report" / "report.json"


def test_checkpoints_swapped_between_folders_are_rows_that_say_so(run: Path, tmp_path: Path) -> None:
    """Before: each row was labelled by its folder, so the teacher's mIoU showed as the student's."""
    import shutil

    swapped = tmp_path / "swapped"
    (swapped / "teacher").mkdir(parents=True)
    (swapped / "students" / "baseline_s0").mkdir(parents=True)
    shutil.copy(run / "recipe.yaml", swapped / "recipe.yaml")
    shutil.copy(run / "teacher" / "best.pt", swapped / "students" / "baseline_s0" / "best.pt")
    shutil.copy(run / "students" / "baseline_s0" / "best.pt", swapped / "teacher" / "best.pt")
    result, _ = bench([swapped], ["pytorch"], iters=2, warmup_s=0.0, max_images=4)
    rows = {row.model: row for row in result.rows}
    assert rows["teacher"].status == rows["baseline_s0"].status == Status.RUN_FAILED
    assert rows["teacher"].miou is None and rows["teacher"].fault == "model"
    assert (
        rows["teacher"].error
        == "teacher/best.pt holds baseline_s0, not teacher: put it back in its own folder"
    )
    assert rows["baseline_s0"].error == (
        "students/baseline_s0/best.pt holds teacher, not baseline_s0: put it back in its own folder"
    )
    in_place, _ = bench([run], ["pytorch"], out=tmp_path / "report", iters=2, warmup_s=0.0, max_images=4)
    assert all(row.status == Status.OK for row in in_place.rows)
