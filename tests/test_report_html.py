"""report.html in a real headless browser: a static page, opened from disk, whose table and
figures render (checked on a screenshot, by colours only each of them contains)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fakd_deploy.deploy.bench import add_deltas, add_warnings
from fakd_deploy.deploy.pick import choice_record, pick
from fakd_deploy.deploy.report import write_report
from fakd_deploy.deploy.rows import BenchReport, BenchRow, Latency, Status

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
HEADER_BACKGROUND = (232, 238, 247)  # th
PICKED_BACKGROUND = (255, 243, 176)  # tr.picked
LOST_FIVE = (255, 115, 115)  # a class that lost 5 IoU points: the reddest delta cell
GOLD = (255, 215, 0)  # the picked row's star in the plot
MAGENTA = (255, 0, 255)  # pixels that differ, in the comparison grid
DARKEST_BLUE = (8, 48, 107)  # a confusion-matrix cell at 100 % (matplotlib's Blues)


def _row(backend: str, miou: float, rounds: list[float], classes: list[float]) -> BenchRow:
    return BenchRow(
        model="m",
        backend=backend,
        runtime="pytorch" if backend == "pytorch" else "onnxruntime",
        precision="int8" if "int8" in backend else "fp32",
        artifact="m.onnx",
        size_mb=1.0,
        status=Status.OK,
        file=f"deploy/m.{backend}.onnx",
        device="cpu",
        miou=miou,
        per_class_iou=classes,
        confusion=[[50, 0, 0], [0, 30, 10], [5, 5, 40]],
        latency_ms=Latency.of_rounds([[v] for v in rounds]),
    )


@pytest.fixture
def report_dir(tmp_path: Path) -> Path:
    rows = [
        _row("pytorch", 70.0, [9.0, 9.1, 9.0], [80.0, 60.0, 70.0]),
        _row("ort-cpu-fp32", 70.0, [2.0, 2.0, 2.1], [80.0, 60.0, 70.0]),
        _row("ort-cpu-int8", 69.0, [1.0, 1.4, 1.0], [80.0, 55.0, 72.0]),
        BenchRow(
            "m", "trt-fp16", "tensorrt", "fp16", "m.fp16.engine", 0.0, Status.SKIPPED, "no engine", "backend"
        ),
    ]
    add_deltas(rows, tolerance=1.0)
    warnings = add_warnings(rows, max_spread=10.0)
    choices = pick(rows, tolerance=1.0)
    grid = np.full((120, 200, 3), 255, np.uint8)
    grid[40:80, 80:120] = MAGENTA
    header = {"run": "runs/q", "class_names": ["road", "car", "sky"], "rounds": 3, "max_spread": 10.0}
    report = BenchReport(
        header,
        rows,
        warnings,
        {"version": 1, **choice_record(choices[0], 1.0, None), "other_devices": []},
        Image.fromarray(grid),
    )
    write_report(report, tmp_path)
    return tmp_path


def test_the_page_is_one_static_file(report_dir: Path) -> None:
    html = (report_dir / "report.html").read_text()
    assert "<script" not in html.lower()
    sources = re.findall(r'src="([^"]*)"', html)
    assert len(sources) == 3 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "href=" not in html  # nothing to fetch, nothing to follow
    assert html.count('<tr class="picked">') == 1 and "not runnable here (backend)" in html


def _present(pixels: np.ndarray, colour: tuple[int, int, int], tolerance: int = 2) -> np.ndarray:
    return (np.abs(pixels.astype(int) - colour) <= tolerance).all(-1)


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (Debian: apt-get install chromium)")
def test_the_page_renders_its_table_and_figures_in_a_browser(report_dir: Path) -> None:
    shot = report_dir / "shot.png"
    subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1400,4200",
            f"--screenshot={shot}",
            (report_dir / "report.html").as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    header = _present(pixels, HEADER_BACKGROUND)
    assert header.sum(1).max() > 600  # a header row across the table
    assert _present(pixels, PICKED_BACKGROUND).sum() > 2000  # the picked row
    assert _present(pixels, LOST_FIVE).sum() > 200  # the per-class delta cell of the INT8 row
    assert _present(pixels, GOLD, tolerance=8).sum() > 100  # the plot, with the pick's star
    assert _present(pixels, DARKEST_BLUE, tolerance=6).sum() > 500  # the confusion matrix
    magenta = _present(pixels, MAGENTA)
    assert magenta.sum() >= 0.9 * 40 * 40  # the grid, its 40x40 differing block drawn whole
