"""The benchmark as a table on screen and as report.{json,csv,md,png} in the run folder."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from rich.console import Console
from rich.table import Table

from fakd_deploy.utils import atomic_write, save_json, save_text

# (key in the flat row, column title)
COLUMNS = [
    ("model", "model"), ("backend", "backend"), ("precision", "precision"),
    ("device", "device"), ("miou", "mIoU"), ("delta_miou", "ΔmIoU"), ("pass", "pass"),
    ("latency_p50_ms", "p50 ms"), ("latency_p90_ms", "p90 ms"), ("latency_p99_ms", "p99 ms"),
    ("speedup", "× torch"), ("fps", "FPS"), ("throughput", "img/s @B"), ("size_mb", "size MB"),
    ("params", "params M"), ("peak_mem_mb", "peak mem MB"), ("status", "status"),
]
CSV_KEYS = [key for key, _ in COLUMNS] + ["latency_mean_ms", "artifact", "error"]
# The screen shows fewer columns than the files; device and versions are in the title.
SCREEN_SKIP = {"device", "params", "peak_mem_mb"}


def flat(row: dict[str, Any]) -> dict[str, Any]:
    """A row with the latency percentiles as plain columns, for CSV and tables."""
    latency = row.get("latency_ms") or {}
    out = {key: value for key, value in row.items() if key != "latency_ms"}
    for name in ("mean", "p50", "p90", "p99"):
        out[f"latency_{name}_ms"] = latency.get(name)
    return out


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def pareto_front(rows: list[dict[str, Any]]) -> list[int]:
    """Indices of ok rows that no other ok row beats on both latency (p50) and mIoU."""
    points = [(i, row["latency_ms"]["p50"], row["miou"]) for i, row in enumerate(rows)
              if row["status"] == "ok"]
    return [i for i, lat, miou in points
            if not any(l2 <= lat and m2 >= miou and (l2, m2) != (lat, miou)
                       for _, l2, m2 in points)]


def _title(header: dict[str, Any]) -> str:
    versions = header.get("versions", {})
    size = header.get("input_size")
    return (f"{header.get('dataset')} val ({header.get('val_images')} images"
            f"{f', {size[0]}x{size[1]}' if size else ''}) | CPU {header.get('cpu')}, "
            f"{header.get('threads')} threads | GPU {header.get('gpu') or 'none'} | torch "
            f"{versions.get('torch')}, onnxruntime {versions.get('onnxruntime')}, TensorRT "
            f"{versions.get('tensorrt')}")


def print_report(result: dict[str, Any], console: Console | None = None) -> None:
    """The rich table, then one line per failed row with its error."""
    from fakd_deploy.progress import console as default_console

    console = console or default_console
    rows = [flat(row) for row in result["rows"]]
    columns = [(key, title) for key, title in COLUMNS if key not in SCREEN_SKIP
               and any(row.get(key) is not None for row in rows)]
    table = Table(title=_title(result["header"]))
    for key, title in columns:
        table.add_column(title, no_wrap=key in {"model", "backend", "precision"},
                         justify="left" if key in {"model", "backend", "precision", "status"}
                         else "right")
    for row in rows:
        table.add_row(*(_cell(row.get(key)) for key, _ in columns))
    console.print(table)
    for row in result["rows"]:
        if row.get("error"):
            console.print(f"[red]{row['model']} {row['backend']} {row['precision']}:[/red] "
                          f"{row['error']}")


def to_csv(result: dict[str, Any]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_KEYS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(flat(row) for row in result["rows"])
    return buffer.getvalue()


def to_markdown(result: dict[str, Any]) -> str:
    header = result["header"]
    lines = [f"# Benchmark: {header.get('run')}", "", f"{_title(header)}", "",
             f"Measured {header.get('date')}; batch {header.get('batch')}; evaluation "
             f"{header.get('eval_mode')}; CUDA {header.get('versions', {}).get('cuda')}.", "",
             "| " + " | ".join(title for _, title in COLUMNS) + " |",
             "|" + "|".join("---" if key in {"model", "backend", "precision", "device", "status"}
                            else "---:" for key, _ in COLUMNS) + "|"]
    for row in map(flat, result["rows"]):
        lines.append("| " + " | ".join(_cell(row.get(key)) for key, _ in COLUMNS) + " |")
    errors = [row for row in result["rows"] if row.get("error")]
    if errors:
        lines += ["", "Errors:", ""]
        lines += [f"- {r['model']} {r['backend']} {r['precision']}: `{r['error']}`" for r in errors]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> Path:
    """Latency p50 against mIoU, one labelled point per ok row, the Pareto front joined."""
    rows = result["rows"]
    ok = [row for row in rows if row["status"] == "ok"]
    front = sorted((rows[i] for i in pareto_front(rows)), key=lambda r: r["latency_ms"]["p50"])
    figure = Figure(figsize=(8, 5.5), layout="constrained")
    axes = figure.subplots()
    for row in ok:
        x, y = row["latency_ms"]["p50"], row["miou"]
        axes.scatter(x, y, color="tab:blue", zorder=3)
        axes.annotate(f"{row['model']} {row['backend']} {row['precision']}", (x, y),
                      textcoords="offset points", xytext=(5, 4), fontsize=8)
    if front:
        axes.plot([r["latency_ms"]["p50"] for r in front], [r["miou"] for r in front],
                  drawstyle="steps-post", color="tab:red", label="Pareto front", zorder=2)
        axes.scatter([r["latency_ms"]["p50"] for r in front], [r["miou"] for r in front],
                     facecolors="none", edgecolors="tab:red", s=140, zorder=4)
        axes.legend(loc="lower right")
    latencies = [row["latency_ms"]["p50"] for row in ok]
    if latencies and max(latencies) > 10 * min(latencies):
        axes.set_xscale("log")
    axes.set_xlabel("latency p50 (ms, batch 1)")
    axes.set_ylabel("mIoU (%)")
    axes.set_title(_title(result["header"]), fontsize=8)
    axes.grid(alpha=0.3)
    return atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=120))


def write_report(result: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """report.json, report.csv, report.md and report.png in `out_dir`."""
    out_dir = Path(out_dir)
    return {"json": save_json(result, out_dir / "report.json"),
            "csv": save_text(to_csv(result), out_dir / "report.csv"),
            "md": save_text(to_markdown(result), out_dir / "report.md"),
            "png": plot(result, out_dir / "report.png")}
