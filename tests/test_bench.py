"""bench + report: one row per model and artifact of a run, failures as rows, report files."""

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
from fakd_deploy.deploy.measure import PeakMemory, measure_latency
from fakd_deploy.deploy.report import (
    figure_of,
    keep_labels_apart,
    pareto_front,
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
}
FAST = BenchConfig(threads=1, iters=3, warmup_s=0.0, batch=2)


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

    root = tmp_path_factory.mktemp("run")
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


@pytest.fixture(scope="module")
def result(run: Path) -> BenchReport:
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
    for row in _rows(result)[:4]:
        assert row["status"] == "ok" and row["error"] is None
        assert 0 <= row["miou"] <= 100
        assert set(row["latency_ms"]) == {"mean", "p50", "p90", "p99"}
        assert row["latency_ms"]["p50"] <= row["latency_ms"]["p99"]
        assert row["fps"] > 0 and row["throughput"] > 0 and row["size_mb"] > 0
        assert row["peak_mem_mb"] >= 0 and row["gpu_compute_ms"] is None
    fp32 = _row(result, "baseline_s0", "ort-cpu-fp32")
    assert abs(fp32["delta_miou"]) < 0.01 and fp32["passed"] is True and fp32["reference"] == "pytorch"
    assert _row(result, "baseline_s0", "pytorch")["delta_miou"] == 0


def test_broken_artifacts_become_rows_not_crashes(result: BenchReport) -> None:
    broken = _row(result, "broken", "ort-cpu-fp32")
    assert broken["status"] == "load failed" and "broken.onnx" in broken["error"] and broken["miou"] is None
    gray = _row(result, "gray", "ort-cpu-fp32")
    assert gray["status"] == "loads, fails to run" and gray["error"]
    assert gray["size_mb"] > 0 and gray["miou"] is None


def test_header_names_the_machine(result: BenchReport) -> None:
    header = result.header
    assert header["cpu"] and header["threads"] == 1 and header["batch"] == 2
    assert header["input_size"] == [64, 64] and header["val_images"] == 8
    assert set(header["versions"]) >= {"torch", "onnxruntime", "tensorrt"}
    assert header["split"] == "val" and header["dataset"] == "synthetic"
    assert set(header["timing"]) == {"latency_ms", "gpu_compute_ms"}
    if not torch.cuda.is_available():
        assert header["gpu"] is None


def test_backend_filter_and_the_report_in_the_run_folder(run: Path) -> None:
    only, written = bench([run], ["ort-int8"], iters=2, warmup_s=0.0, max_images=4)
    assert [(r["backend"], r["precision"]) for r in _rows(only)] == [("ort-cpu-int8", "int8")]
    assert _rows(only)[0]["delta_miou"] is None  # neither a PyTorch nor an ORT FP32 row to compare with
    assert written["json"] == run / "report.json"


def test_model_files_are_benched_without_a_run_folder(run: Path, tmp_path: Path) -> None:
    """On a device without the training stack: the ONNX rows, ORT FP32 as the reference."""
    files = [run / "deploy" / "baseline.onnx", run / "deploy" / "baseline.int8.onnx"]
    result, written = bench(files, out=tmp_path / "report", iters=2, warmup_s=0.0, max_images=4)
    rows = {r["backend"]: r for r in _rows(result)}
    assert set(rows) == {"ort-cpu-fp32", "ort-cpu-int8"}
    assert rows["ort-cpu-int8"]["reference"] == "ort-cpu-fp32" and rows["ort-cpu-int8"]["speedup"] > 0
    assert written["md"] == tmp_path / "report" / "report.md"


def test_a_backend_that_cannot_run_here_is_a_row_that_says_why(run: Path) -> None:
    if not torch.cuda.is_available():
        only, _ = bench([run], ["trt-fp16", "ort-cuda-fp32"], out=run / "gpu-report", iters=2, warmup_s=0.0)
        # no engine files: one CUDA row per ONNX model, each saying why it cannot run
        assert {(r["backend"], r["status"]) for r in _rows(only)} == {("ort-cuda-fp32", "not runnable here")}
        assert len(_rows(only)) == 3 and all(r["error"] for r in _rows(only))


def test_backend_names_are_split_and_checked() -> None:
    assert split_backends(None) is None
    assert split_backends(["ort-int8,pytorch", " trt-fp16 "]) == ["ort-cpu-int8", "pytorch", "trt-fp16"]
    with pytest.raises(BadInput, match=r"unknown backend 'ort-fp8'.*choose from: ort-cpu-fp32"):
        split_backends(["ort-fp8"])


def test_report_files(result: BenchReport, tmp_path: Path) -> None:
    paths = write_report(result, tmp_path)
    assert {p.name for p in paths.values()} == {"report.json", "report.csv", "report.md", "report.png"}
    saved = json.loads((tmp_path / "report.json").read_text())
    assert set(saved) == {"header", "rows"} and len(saved["rows"]) == len(_rows(result))
    for row in saved["rows"]:
        assert {"model", "backend", "precision", "status", "miou", "latency_ms", "size_mb"} <= set(row)
        if row["status"] == "ok":
            assert {"p50", "p90", "p99"} <= set(row["latency_ms"])
    with open(tmp_path / "report.csv") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == len(_rows(result)) and "latency_p50_ms" in table[0]
    markdown = (tmp_path / "report.md").read_text()
    assert "| model |" in markdown and "broken" in markdown and "host latency" in markdown
    assert Image.open(tmp_path / "report.png").format == "PNG"
    assert report_table(result).row_count == len(_rows(result))


def test_latency_is_time_based_with_a_floor() -> None:
    calls = []
    times = measure_latency(
        lambda x: calls.append(1) or x, np.zeros(1), warmup_s=0.0, seconds=0.0, min_iters=7
    )
    assert len(times) == 7 and len(calls) == 8  # one warm-up call
    assert len(measure_latency(lambda x: x, np.zeros(1), 0.0, 10.0, iters=4)) == 4
    stats = Latency.of([1.0, 2.0, 3.0, 4.0])
    assert stats.p50 == 2.5 and stats.mean == 2.5


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
