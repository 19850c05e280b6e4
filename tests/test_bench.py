"""bench + report: one row per model and artifact of a run, failures as rows, report files."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from torch import nn

from fakd_deploy.deploy.bench import _artifact_kind, add_deltas, bench_run, split_backends
from fakd_deploy.deploy.measure import PeakMemory, latency_stats, measure_latency
from fakd_deploy.deploy.report import pareto_front, print_report, to_markdown, write_report

RECIPE = {
    "name": "t",
    "data": {"name": "synthetic", "options": {"num_images": 8, "size": 64, "num_classes": 6},
             "crop": [64, 64], "val_batch_size": 4},
    "student": {"model": {"name": "deeplabv3", "encoder": "mobilenetv3_small_050",
                          "output_stride": 8, "channels": 16},
                "variants": {"baseline": []}},
    "deploy": {"export": {"height": 64, "width": 64}},
}
ROW_KEYS = {"model", "backend", "precision", "status", "error", "miou", "delta_miou", "pass",
            "latency_ms", "fps", "throughput", "size_mb", "params", "peak_mem_mb", "speedup"}


def _checkpoint(recipe: Any, role: str, variant: str | None, path: Path) -> Path:
    from fakd_deploy.loaders import dataset_info
    from fakd_deploy.models import build_model

    num_classes, names = dataset_info(recipe.data)
    torch.manual_seed(0)
    model = build_model(num_classes=num_classes, **recipe.student.model.build_kwargs())
    path.parent.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "arch": model.config,
                "recipe": recipe.model_dump(mode="json"), "class_names": names, "role": role,
                "variant": variant, "step": 1, "complete": True, "metrics": {}}, path)
    return path


class OneChannel(nn.Module):
    """A valid ONNX model that expects 1-channel images: it loads, but evaluation on RGB fails."""

    def __init__(self) -> None:
        super().__init__()
        self.classifier = nn.Conv2d(1, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fakd_deploy.deploy.build import build
    from fakd_deploy.deploy.export import export_onnx
    from fakd_deploy.loaders import calibration_batches
    from fakd_deploy.recipe import parse_recipe

    root = tmp_path_factory.mktemp("run")
    recipe = parse_recipe(RECIPE)
    (root / "recipe.yaml").write_text(recipe.to_yaml())
    _checkpoint(recipe, "teacher", None, root / "teacher" / "best.pt")
    student = _checkpoint(recipe, "student", "baseline", root / "students" / "baseline_s0" / "best.pt")
    onnx_path = root / "deploy" / "baseline.onnx"
    export_onnx(student, onnx_path, 64, 64)
    build(onnx_path, "ort-int8", calib_batches=calibration_batches(recipe.data, 4))
    (root / "deploy" / "broken.onnx").write_bytes(onnx_path.read_bytes()[:500])
    torch.onnx.export(OneChannel().eval(), (torch.randn(1, 1, 64, 64),), root / "deploy" / "gray.onnx",
                      input_names=["images"], external_data=False, verbose=False)
    return root


@pytest.fixture(scope="module")
def result(run: Path) -> dict[str, Any]:
    return bench_run(run, threads=1, iters=3, warmup_s=0.0, batch=2)


def _row(result: dict[str, Any], model: str, backend: str, precision: str) -> dict[str, Any]:
    return next(r for r in result["rows"] if (r["model"], r["backend"], r["precision"])
                == (model, backend, precision))


def test_every_model_and_artifact_gets_a_row(result: dict[str, Any]) -> None:
    keys = [(r["model"], r["backend"], r["precision"]) for r in result["rows"]]
    assert keys == [("teacher", "pytorch", "fp32"), ("baseline_s0", "pytorch", "fp32"),
                    ("baseline_s0", "onnxruntime", "fp32"), ("baseline_s0", "onnxruntime", "int8"),
                    ("broken", "onnxruntime", "fp32"), ("gray", "onnxruntime", "fp32")]
    for row in result["rows"]:
        assert set(row) >= ROW_KEYS


def test_ok_rows_are_complete(result: dict[str, Any]) -> None:
    for row in result["rows"][:4]:
        assert row["status"] == "ok" and row["error"] is None
        assert 0 <= row["miou"] <= 100
        assert set(row["latency_ms"]) == {"mean", "p50", "p90", "p99"}
        assert row["latency_ms"]["p50"] <= row["latency_ms"]["p99"]
        assert row["fps"] > 0 and row["throughput"] > 0 and row["size_mb"] > 0
        assert row["params"] > 0 and row["peak_mem_mb"] >= 0
    fp32 = _row(result, "baseline_s0", "onnxruntime", "fp32")
    assert abs(fp32["delta_miou"]) < 0.01 and fp32["pass"] is True
    assert _row(result, "baseline_s0", "pytorch", "fp32")["delta_miou"] == 0


def test_broken_artifacts_become_rows_not_crashes(result: dict[str, Any]) -> None:
    broken = _row(result, "broken", "onnxruntime", "fp32")
    assert broken["status"] == "failed" and broken["error"] and broken["miou"] is None
    gray = _row(result, "gray", "onnxruntime", "fp32")
    assert gray["status"] == "export ok, evaluation failed" and gray["error"]
    assert gray["size_mb"] > 0 and gray["miou"] is None


def test_header_names_the_machine(result: dict[str, Any]) -> None:
    header = result["header"]
    assert header["cpu"] and header["threads"] == 1 and header["batch"] == 2
    assert header["input_size"] == [64, 64] and header["val_images"] == 8
    assert set(header["versions"]) >= {"torch", "onnxruntime", "tensorrt", "cuda"}
    if not torch.cuda.is_available():
        assert header["gpu"] is None


def test_backend_filter(run: Path) -> None:
    only = bench_run(run, backends=["ort-int8"], iters=2, warmup_s=0.0, max_images=4)
    assert [(r["backend"], r["precision"]) for r in only["rows"]] == [("onnxruntime", "int8")]
    assert only["rows"][0]["delta_miou"] is None  # no PyTorch row to compare with


def test_backend_names_are_split_and_checked() -> None:
    assert split_backends(None) is None
    assert split_backends(["ort-int8,pytorch", " trt-fp16 "]) == ["ort-int8", "pytorch", "trt-fp16"]
    with pytest.raises(ValueError, match=r"unknown backend.*ort-fp8.*choose from: pytorch"):
        split_backends(["ort-fp8"])


def test_report_files(result: dict[str, Any], tmp_path: Path) -> None:
    paths = write_report(result, tmp_path)
    assert {p.name for p in paths.values()} == {"report.json", "report.csv", "report.md",
                                                "report.png"}
    saved = json.loads((tmp_path / "report.json").read_text())
    assert set(saved) == {"header", "rows"} and len(saved["rows"]) == len(result["rows"])
    for row in saved["rows"]:
        assert {"model", "backend", "precision", "status", "miou", "latency_ms", "size_mb"} <= set(row)
        if row["status"] == "ok":
            assert {"p50", "p90", "p99"} <= set(row["latency_ms"])
    with open(tmp_path / "report.csv") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == len(result["rows"]) and "latency_p50_ms" in table[0]
    markdown = (tmp_path / "report.md").read_text()
    assert "| model |" in markdown and "broken" in markdown
    assert Image.open(tmp_path / "report.png").format == "PNG"
    print_report(result)


def test_latency_is_time_based_with_a_floor() -> None:
    calls = []
    times = measure_latency(lambda x: calls.append(1) or x, torch.zeros(1), warmup_s=0.0,
                            seconds=0.0, min_iters=7)
    assert len(times) == 7 and len(calls) == 8  # one warm-up call
    assert len(measure_latency(lambda x: x, torch.zeros(1), 0.0, 10.0, iters=4)) == 4
    stats = latency_stats([1.0, 2.0, 3.0, 4.0])
    assert stats["p50"] == 2.5 and stats["mean"] == 2.5


def test_artifact_names() -> None:
    assert _artifact_kind(Path("m.onnx")) == ("onnxruntime", "fp32")
    assert _artifact_kind(Path("m.int8.onnx")) == ("onnxruntime", "int8")
    assert _artifact_kind(Path("m.fp16.engine")) == ("tensorrt", "fp16")
    assert _artifact_kind(Path("m.trt-int8.onnx")) is None
    assert _artifact_kind(Path("m.fp16.engine.json")) is None
    assert _artifact_kind(Path("m.int4.engine")) is None


def test_peak_memory_sees_each_block_even_after_a_freed_one() -> None:
    """A block that allocates what an earlier one freed still reads ~200 MB, not ~0.

    A small object kept alive above the freed heap pages stops glibc from returning them
    on its own: only `release_free_memory` (malloc_trim) lets the second block be seen.
    """
    pins = []
    for _ in range(2):
        with PeakMemory() as memory:
            chunks = [bytearray(4096) for _ in range(50_000)]
            pins.append(bytearray(4096))
        del chunks
        assert 180 <= memory.mb(gpu=False) <= 260


def _fake(model: str, backend: str, miou: float, p50: float, status: str = "ok") -> dict[str, Any]:
    return {"model": model, "backend": backend, "precision": "fp32", "status": status,
            "miou": miou, "latency_ms": {"p50": p50}, "delta_miou": None, "pass": None}


def test_pareto_front_and_deltas() -> None:
    rows = [_fake("a", "pytorch", 70.0, 100.0), _fake("a", "onnxruntime", 69.5, 40.0),
            _fake("a", "tensorrt", 60.0, 50.0), _fake("b", "pytorch", 75.0, 300.0),
            _fake("c", "onnxruntime", 0.0, 0.0, status="failed")]
    assert pareto_front(rows) == [0, 1, 3]
    add_deltas(rows, tolerance=1.0)
    assert rows[1]["delta_miou"] == -0.5 and rows[1]["pass"] is True
    assert rows[1]["speedup"] == 2.5 and rows[2]["speedup"] == 2.0 and rows[0]["speedup"] == 1.0
    assert rows[2]["pass"] is False and rows[4]["delta_miou"] is None
    assert "| a |" in to_markdown({"header": {}, "rows": rows})
