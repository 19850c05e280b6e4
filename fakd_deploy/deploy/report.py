"""The benchmark as a table on screen and as report.{json,csv,md,png} beside the models.

The plot needs matplotlib, which the deploy-only install may lack: then report.png is
left out (with a note) and the other three files are written as usual.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any

from rich.table import Table

from fakd_deploy.deploy.rows import BenchReport, BenchRow
from fakd_deploy.utils import atomic_write, save_json, save_text

log = logging.getLogger(__name__)

# (key in the flat row, column title)
COLUMNS = [
    ("model", "model"),
    ("backend", "backend"),
    ("precision", "precision"),
    ("device", "device"),
    ("miou", "mIoU"),
    ("delta_miou", "ΔmIoU"),
    ("passed", "pass"),
    ("latency_p50_ms", "p50 ms"),
    ("latency_p90_ms", "p90 ms"),
    ("latency_p99_ms", "p99 ms"),
    ("gpu_p50_ms", "GPU p50 ms"),
    ("speedup", "× ref"),
    ("fps", "FPS"),
    ("throughput", "img/s @B"),
    ("size_mb", "size MB"),
    ("peak_mem_mb", "peak mem MB"),
    ("status", "status"),
]
CSV_KEYS = [key for key, _ in COLUMNS] + [
    "latency_mean_ms",
    "gpu_mean_ms",
    "runtime",
    "reference",
    "artifact",
    "error",
]
# The screen shows fewer columns than the files; device and versions are in the title.
SCREEN_SKIP = {"device", "peak_mem_mb"}
TEXT_COLUMNS = {"model", "backend", "precision", "device", "status"}


def flat(row: BenchRow) -> dict[str, Any]:
    """A row with the latency percentiles as plain columns, for CSV and tables."""
    out = {key: value for key, value in row.to_dict().items() if key not in ("latency_ms", "gpu_compute_ms")}
    for prefix, stats in (("latency", row.latency_ms), ("gpu", row.gpu_compute_ms)):
        for name in ("mean", "p50", "p90", "p99"):
            out[f"{prefix}_{name}_ms"] = getattr(stats, name) if stats else None
    return out


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def pareto_front(rows: list[BenchRow]) -> list[int]:
    """Indices of ok rows that no other ok row beats on both latency (p50) and mIoU."""
    points = [
        (i, row.latency_ms.p50, row.miou)
        for i, row in enumerate(rows)
        if row.ok and row.latency_ms is not None and row.miou is not None
    ]
    return [
        i
        for i, lat, miou in points
        if not any(l2 <= lat and m2 >= miou and (l2, m2) != (lat, miou) for _, l2, m2 in points)
    ]


def _title(header: dict[str, Any]) -> str:
    versions = header.get("versions", {})
    size = header.get("input_size")
    return (
        f"{header.get('dataset')} {header.get('split', 'val')} ({header.get('val_images')} images"
        f"{f', {size[0]}x{size[1]}' if size else ''}) | CPU {header.get('cpu')}, "
        f"{header.get('threads')} threads | GPU {header.get('gpu') or 'none'} | torch "
        f"{versions.get('torch')}, onnxruntime {versions.get('onnxruntime')}, TensorRT "
        f"{versions.get('tensorrt')}"
    )


def report_table(result: BenchReport) -> Table:
    """The rich table of the rows, with the columns that have a value somewhere."""
    rows = [flat(row) for row in result.rows]
    columns = [
        (key, title)
        for key, title in COLUMNS
        if key not in SCREEN_SKIP and any(row.get(key) is not None for row in rows)
    ]
    table = Table(title=_title(result.header))
    for key, title in columns:
        table.add_column(
            title,
            no_wrap=key in {"model", "backend", "precision"},
            justify="left" if key in TEXT_COLUMNS else "right",
        )
    for row in rows:
        table.add_row(*(_cell(row.get(key)) for key, _ in columns))
    return table


def row_errors(result: BenchReport) -> list[str]:
    """One line per row that did not run, with why."""
    return [f"{row.model} {row.backend}: {row.error}" for row in result.rows if row.error]


def to_csv(result: BenchReport) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_KEYS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(flat(row) for row in result.rows)
    return buffer.getvalue()


def to_markdown(result: BenchReport) -> str:
    header = result.header
    lines = [
        f"# Benchmark: {header.get('run')}",
        "",
        f"{_title(header)}",
        "",
        f"Measured {header.get('date')}; batch {header.get('batch')}; evaluation "
        f"{header.get('eval_mode')}. Latency is host latency (one call, copies and pre/post-"
        "processing included); GPU p50 is GPU compute time (CUDA events, inputs on the device); "
        "× ref is the p50 speed-up over the model's PyTorch row (or its ONNX Runtime CPU FP32 "
        "row where there is none).",
        "",
        "| " + " | ".join(title for _, title in COLUMNS) + " |",
        "|" + "|".join("---" if key in TEXT_COLUMNS else "---:" for key, _ in COLUMNS) + "|",
    ]
    for row in map(flat, result.rows):
        lines.append("| " + " | ".join(_cell(row.get(key)) for key, _ in COLUMNS) + " |")
    errors = [row for row in result.rows if row.error]
    if errors:
        lines += ["", "Errors:", ""]
        lines += [f"- {r.model} {r.backend}: `{r.error}`" for r in errors]
    return "\n".join(lines) + "\n"


def _p50(row: BenchRow) -> float:
    assert row.latency_ms is not None  # plotted rows are ok rows
    return row.latency_ms.p50


def _miou(row: BenchRow) -> float:
    assert row.miou is not None
    return row.miou


def plot(result: BenchReport, path: Path) -> Path:
    """report.png: the figure of `figure_of`, written atomically."""
    figure = figure_of(result)
    return atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=figure.dpi))


def figure_of(result: BenchReport) -> Any:
    """Latency p50 against mIoU, one labelled point per ok row, the Pareto front joined.

    Latency is in plain milliseconds on a log axis when the rows span more than 10x;
    labels sit beside their points and the legend goes where no point is.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator

    rows = result.rows
    ok = [row for row in rows if row.ok and row.latency_ms is not None and row.miou is not None]
    front = sorted((rows[i] for i in pareto_front(rows)), key=lambda r: _p50(r))
    figure = Figure(figsize=(8, 5.5), layout="constrained")
    axes = figure.subplots()
    mious = [_miou(row) for row in ok]
    near = 0.04 * (max(mious) - min(mious)) if len(mious) > 1 and max(mious) > min(mious) else 0.5
    clusters: list[tuple[float, float, list[str]]] = []  # points at (nearly) one place share a label
    for row in ok:
        x, y = _p50(row), _miou(row)
        axes.scatter(x, y, color="tab:blue", zorder=3)
        label = f"{row.model} {row.backend}"
        match = next((c for c in clusters if abs(x / c[0] - 1) < 0.08 and abs(y - c[1]) < near), None)
        if match:
            match[2].append(label)
        else:
            clusters.append((x, y, [label]))
    annotations = [
        axes.annotate(
            "\n".join(labels),
            (x, y),
            textcoords="offset points",
            xytext=(6, 4),
            fontsize=8,
            verticalalignment="bottom",
        )
        for x, y, labels in clusters
    ]
    if front:
        axes.plot(
            [_p50(r) for r in front],
            [_miou(r) for r in front],
            drawstyle="steps-post",
            color="tab:red",
            label="Pareto front",
            zorder=2,
        )
        axes.scatter(
            [_p50(r) for r in front],
            [_miou(r) for r in front],
            facecolors="none",
            edgecolors="tab:red",
            s=140,
            zorder=4,
        )
        axes.legend(loc="best", frameon=True, framealpha=0.9)
    latencies = [_p50(row) for row in ok]
    if latencies and max(latencies) > 10 * min(latencies):
        axes.set_xscale("log")
        axes.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        axes.xaxis.set_minor_locator(LogLocator(subs="auto"))
        axes.xaxis.set_minor_formatter(FuncFormatter(lambda value, _: ""))
    axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    if latencies:
        axes.set_xlim(min(latencies) / 1.3, max(latencies) * 1.6)  # room for the labels
    axes.set_xlabel("latency p50 (ms, batch 1, host)")
    axes.set_ylabel("mIoU (%)")
    axes.set_title(_title(result.header), fontsize=8)
    axes.grid(alpha=0.3)
    figure.set_dpi(120)
    keep_labels_apart(figure, annotations)
    return figure


def keep_labels_apart(figure: Any, annotations: list[Any]) -> None:
    """Move each label, left to right, above or below its point until it overlaps no earlier
    one and not the legend.

    Points at one mIoU but different latencies (an FP32 and an INT8 row of one model) would
    otherwise print their labels over each other.
    """
    figure.draw_without_rendering()  # lays the figure out, so the text extents are final
    legend = figure.axes[0].get_legend()
    placed: list[Any] = [legend.get_window_extent()] if legend else []
    for note in sorted(annotations, key=lambda a: a.xy[0]):
        height = note.get_window_extent().height * 72 / figure.dpi + 2  # points
        for step in range(len(annotations) + 1):
            for sign in (1, -1):
                dy = sign * (4 + step * height)
                note.set_position((6, dy))
                note.set_verticalalignment("bottom" if sign > 0 else "top")
                box = note.get_window_extent()
                if not any(box.overlaps(other) for other in placed):
                    break
            else:
                continue
            break
        placed.append(note.get_window_extent())


def write_report(result: BenchReport, out_dir: str | Path) -> dict[str, Path]:
    """report.json, report.csv, report.md and (with matplotlib) report.png in `out_dir`."""
    out_dir = Path(out_dir)
    written = {
        "json": save_json(result.to_dict(), out_dir / "report.json"),
        "csv": save_text(to_csv(result), out_dir / "report.csv"),
        "md": save_text(to_markdown(result), out_dir / "report.md"),
    }
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log.info("report.png left out: matplotlib is not installed")
        return written
    written["png"] = plot(result, out_dir / "report.png")
    return written
