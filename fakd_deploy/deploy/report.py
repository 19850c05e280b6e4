"""The benchmark as a table on screen and as report.{json,csv,md,png,html} beside the models.

The plots need matplotlib, which the deploy-only install may lack: then the PNG figures are
left out (with a note) and the other files are written as usual. Every mark a reader needs
is in the table itself, not only in a picture: the reference row of each model, the Pareto
rows, the picked row and the warnings.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any

from rich.table import Table

from fakd_deploy.deploy.pick import pareto_front
from fakd_deploy.deploy.report_html import Page, to_html
from fakd_deploy.deploy.rows import BenchReport, BenchRow
from fakd_deploy.figures import confusion_figure, has_matplotlib, png_bytes
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
    ("delta_teacher", "vs teacher"),
    ("passed", "pass"),
    ("latency_p50_ms", "p50 ms"),
    ("latency_p90_ms", "p90 ms"),
    ("latency_p99_ms", "p99 ms"),
    ("latency_spread", "spread %"),
    ("gpu_p50_ms", "GPU p50 ms"),
    ("speedup", "× ref"),
    ("fps", "FPS"),
    ("throughput", "img/s @B"),
    ("size_mb", "size MB"),
    ("peak_mem_mb", "peak mem MB"),
    ("status", "status"),
    ("notes", "notes"),
]
CSV_KEYS = [key for key, _ in COLUMNS] + [
    "latency_mean_ms",
    "gpu_mean_ms",
    "runtime",
    "reference",
    "fault",
    "file",
    "artifact",
    "error",
]
# The screen shows fewer columns than the files; device and versions are in the title.
SCREEN_SKIP = {"device", "peak_mem_mb", "fps", "latency_p90_ms", "passed"}
TEXT_COLUMNS = {"model", "backend", "precision", "device", "status", "notes"}
IMAGES = {"png": "report.png", "confusion": "report.confusion.png", "compare": "report.compare.png"}


def notes(row: BenchRow) -> str:
    """The marks a row carries: reference, Pareto front, picked, and its warnings in short."""
    marks = []
    if row.picked:
        marks.append("★ picked")
    if row.is_reference:
        marks.append("ref")
    if row.pareto:
        marks.append("Pareto")
    if any(w.startswith("unstable") for w in row.warnings):
        marks.append("⚠ unstable")
    if any(w.startswith("INT8 is no faster") for w in row.warnings):
        marks.append("⚠ INT8 not faster")
    return ", ".join(marks)


def status_text(row: BenchRow) -> str:
    return row.status.value + (f" ({row.fault})" if row.fault else "")


def flat(row: BenchRow) -> dict[str, Any]:
    """A row with the latency percentiles as plain columns, for CSV and tables."""
    skip = ("latency_ms", "gpu_compute_ms", "per_class_iou", "confusion", "warnings", "placement")
    out = {key: value for key, value in row.to_dict().items() if key not in skip}
    for prefix, stats in (("latency", row.latency_ms), ("gpu", row.gpu_compute_ms)):
        for name in ("mean", "p50", "p90", "p99"):
            out[f"{prefix}_{name}_ms"] = getattr(stats, name) if stats else None
    out["latency_spread"] = row.latency_ms.spread if row.latency_ms else None
    out["status"] = status_text(row)
    out["notes"] = notes(row)
    return out


def _cell(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def _title(header: dict[str, Any]) -> str:
    versions = header.get("versions", {})
    size = header.get("input_size")
    return (
        f"{header.get('dataset')} {header.get('split', 'val')} ({header.get('val_images')} images"
        f"{f', input {size[0]}x{size[1]}' if size else ''}) | CPU {header.get('cpu')}, "
        f"{header.get('threads')} threads | GPU {header.get('gpu') or 'none'} | batch "
        f"{header.get('batch')} | torch {versions.get('torch')}, onnxruntime "
        f"{versions.get('onnxruntime')}, TensorRT {versions.get('tensorrt')}"
    )


def legend_line(header: dict[str, Any]) -> str:
    """What the columns and marks mean, in one paragraph."""
    return (
        "Latency is host latency (one call at batch 1, copies and pre/post-processing "
        f"included), timed in {header.get('rounds', 1)} interleaved rounds; spread is the range "
        "of the per-round medians over the median (⚠ unstable above "
        f"{header.get('max_spread', 10):g} %). GPU p50 is GPU compute time (CUDA events, inputs "
        "on the device). × ref is the p50 speed-up over the row marked `ref`: each model's "
        "PyTorch row (its ONNX Runtime CPU FP32 row where there is none); ΔmIoU is against the "
        "same row; vs teacher is the mIoU gap to the teacher. Pareto: no other row is both "
        "faster and more accurate."
    )


def report_table(result: BenchReport) -> Table:
    """The rich table of the rows, with the columns that have a value somewhere."""
    rows = [flat(row) for row in result.rows]
    columns = [
        (key, title)
        for key, title in COLUMNS
        if key not in SCREEN_SKIP and any(row.get(key) not in (None, "") for row in rows)
    ]
    table = Table(title=_title(result.header), caption="× ref: p50 speed-up over the row marked ref")
    for key, title in columns:
        table.add_column(
            title,
            no_wrap=key in {"model", "backend", "precision"},
            justify="left" if key in TEXT_COLUMNS else "right",
        )
    for row, values in zip(result.rows, rows, strict=True):
        style = "bold" if row.picked else "yellow" if row.warnings else "dim" if not row.ok else ""
        table.add_row(*(_cell(values.get(key)) for key, _ in columns), style=style)
    return table


def row_errors(result: BenchReport) -> list[str]:
    """One line per row that did not run, with why and whose fault it was."""
    return [f"{row.label}: {status_text(row)}: {row.error}" for row in result.rows if row.error]


def class_deltas(result: BenchReport) -> list[tuple[BenchRow, BenchRow, list[float | None]]]:
    """(row, its reference, per-class IoU change) for every ok row that is not a reference."""
    by_key = {(r.model, r.backend): r for r in result.rows}
    out = []
    for row in result.rows:
        base = by_key.get((row.model, row.reference or ""))
        if row.timed and not row.is_reference and base and base.per_class_iou and row.per_class_iou:
            deltas = [
                None if a is None or b is None else round(a - b, 2)
                for a, b in zip(row.per_class_iou, base.per_class_iou, strict=True)
            ]
            out.append((row, base, deltas))
    return out


def class_names(result: BenchReport, count: int) -> list[str]:
    names = result.header.get("class_names") or []
    return [str(n) for n in names] if len(names) == count else [str(i) for i in range(count)]


def class_delta_table(result: BenchReport, limit: int = 10) -> Table | None:
    """The classes whose IoU moves most between a model's backends, worst first."""
    deltas = class_deltas(result)
    if not deltas:
        return None
    names = class_names(result, len(deltas[0][2]))

    def largest_drop(c: int) -> float:
        return min([v for _, _, d in deltas if (v := d[c]) is not None], default=0.0)

    worst = sorted(range(len(names)), key=largest_drop)[:limit]
    table = Table(title=f"per-class IoU change against each model's ref row (the {len(worst)} largest drops)")
    table.add_column("class")
    for row, base, _ in deltas:
        table.add_column(f"{row.label} vs {base.backend}", justify="right")
    for c in worst:
        table.add_row(names[c], *(_cell(d[c]) for _, _, d in deltas))
    return table


def summary_lines(result: BenchReport) -> list[str]:
    """What a person must not miss, after the table: the pick and every warning."""
    lines = [f"warning: {w}" for w in result.warnings]
    choice = result.choice
    for record in [choice, *(choice or {}).get("other_devices", [])] if choice else []:
        lines.append(
            f"picked for {record['device']}: {record['model']} {record['backend']} "
            f"({record['file']}), mIoU {record['miou']:.2f}, p50 {record['latency_ms']['p50']:.3g} ms: "
            f"{record['why']}"
        )
        runner = record.get("runner_up")
        if runner:
            lines.append(f"  runner-up {runner['model']} {runner['backend']}: {runner['why_it_lost']}")
    return lines


def to_csv(result: BenchReport) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_KEYS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(flat(row) for row in result.rows)
    return buffer.getvalue()


def _md_table(titles: list[str], right: list[bool], lines: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(titles) + " |", "|" + "|".join("---:" if r else "---" for r in right) + "|"]
    return out + ["| " + " | ".join(line) + " |" for line in lines]


def to_markdown(result: BenchReport, images: dict[str, str] | None = None) -> str:
    """report.md: the table with its marks, the pick, the warnings, per-class deltas, figures."""
    header = result.header
    lines = [
        f"# Benchmark: {header.get('run')}",
        "",
        _title(header),
        "",
        f"Measured {header.get('date')}; evaluation {header.get('eval_mode')}. {legend_line(header)}",
        "",
    ]
    flats = [flat(row) for row in result.rows]
    lines += _md_table(
        [title for _, title in COLUMNS],
        [key not in TEXT_COLUMNS for key, _ in COLUMNS],
        [[_cell(row.get(key)).replace("|", "\\|") for key, _ in COLUMNS] for row in flats],
    )
    extra = summary_lines(result)
    if extra:
        lines += ["", "## Read before you ship", ""] + [f"- {line.strip()}" for line in extra]
    errors = [row for row in result.rows if row.error]
    if errors:
        lines += ["", "## Rows that did not run", ""]
        lines += [f"- {r.label}: {status_text(r)}: `{r.error}`" for r in errors]
    deltas = class_deltas(result)
    if deltas:
        names = class_names(result, len(deltas[0][2]))
        lines += ["", "## Per-class IoU change against the ref row", ""]
        lines += _md_table(
            ["class"] + [f"{row.label} vs {base.backend}" for row, base, _ in deltas],
            [False] + [True] * len(deltas),
            [[name] + [_cell(d[c]) for _, _, d in deltas] for c, name in enumerate(names)],
        )
    for key, title in (
        ("png", "Latency against mIoU"),
        ("compare", "Where backends disagree"),
        ("confusion", "Confusion matrix"),
    ):
        if images and key in images:
            lines += ["", f"## {title}", "", f"![{title}]({images[key]})"]
    return "\n".join(lines) + "\n"


def _p50(row: BenchRow) -> float:
    assert row.latency_ms is not None  # plotted rows are ok rows
    return row.latency_ms.p50


def _miou(row: BenchRow) -> float:
    assert row.miou is not None
    return row.miou


def figure_of(result: BenchReport) -> Any:
    """Latency p50 against mIoU, one labelled point per ok row, the Pareto front joined.

    Latency is in plain milliseconds on a log axis when the rows span more than 10x;
    labels sit beside their points and the legend goes where no point is.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator

    rows = result.rows
    ok = [row for row in rows if row.timed]
    front = sorted((rows[i] for i in pareto_front(rows)), key=lambda r: _p50(r))
    figure = Figure(figsize=(8, 5.5), layout="constrained")
    axes = figure.subplots()
    mious = [_miou(row) for row in ok]
    near = 0.04 * (max(mious) - min(mious)) if len(mious) > 1 and max(mious) > min(mious) else 0.5
    clusters: list[tuple[float, float, list[str]]] = []  # points at (nearly) one place share a label
    for row in ok:
        x, y = _p50(row), _miou(row)
        rounds = row.latency_ms.rounds if row.latency_ms else None
        if rounds and len(rounds) > 1:  # the range of the per-round medians: the timing noise
            axes.plot([min(rounds), max(rounds)], [y, y], color="tab:blue", alpha=0.35, lw=3, zorder=2)
        axes.scatter(x, y, color="tab:orange" if row.warnings else "tab:blue", zorder=3)
        if row.picked:
            axes.scatter(x, y, marker="*", s=420, color="gold", edgecolors="black", zorder=5, label="picked")
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
    if front or any(row.picked for row in ok):
        axes.legend(loc="best", frameon=True, framealpha=0.9)
    latencies = [
        v for row in ok for v in [_p50(row), *(row.latency_ms.rounds or [] if row.latency_ms else [])]
    ]
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
    axes.set_title(_title(result.header).replace(" | GPU", "\nGPU", 1), fontsize=8)
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


def confusion_row(result: BenchReport) -> BenchRow | None:
    """The row whose confusion matrix the report shows: the pick, else the first row of the
    model with the most rows (the deployed one), else the first row that ran."""
    ran = [row for row in result.rows if row.timed and row.confusion]
    picked = [row for row in ran if row.picked]
    if picked:
        return picked[0]
    counts = {row.model: sum(r.model == row.model for r in ran) for row in ran}
    return max(ran, key=lambda row: counts[row.model], default=None)


def figures(result: BenchReport) -> dict[str, bytes]:
    """PNG bytes of every figure: the plot and the confusion matrix (with matplotlib), the grid."""
    out: dict[str, bytes] = {}
    if result.compare is not None:
        buffer = io.BytesIO()
        result.compare.save(buffer, format="PNG")
        out["compare"] = buffer.getvalue()
    if not has_matplotlib():
        log.info("report.png and report.confusion.png left out: matplotlib is not installed")
        return out
    plot = figure_of(result)
    out["png"] = png_bytes(plot, int(plot.dpi))
    row = confusion_row(result)
    if row is not None and row.confusion:
        names = class_names(result, len(row.confusion))
        title = f"{row.label}: confusion matrix, rows normalised ({result.header.get('split')} split)"
        out["confusion"] = png_bytes(confusion_figure(row.confusion, names, title))
    return out


def _writer(data: bytes) -> Any:
    return lambda tmp: tmp.write_bytes(data)


def choice_path(out_dir: Path) -> Path:
    """deploy/choice.json in a run folder, choice.json beside the report elsewhere."""
    return out_dir / "deploy" / "choice.json" if (out_dir / "deploy").is_dir() else out_dir / "choice.json"


def page(result: BenchReport) -> Page:
    """The HTML page's content, as the other files say it."""
    header = result.header
    deltas = class_deltas(result)
    names = class_names(result, len(deltas[0][2])) if deltas else []

    def css(row: BenchRow) -> str:
        return "picked" if row.picked else "warn" if row.warnings else "" if row.ok else "failed"

    return Page(
        title=f"Benchmark: {header.get('run')}",
        meta=[_title(header), f"Measured {header.get('date')}. {legend_line(header)}"],
        notes=summary_lines(result) + row_errors(result),
        columns=[(title, key not in TEXT_COLUMNS) for key, title in COLUMNS],
        rows=[(css(row), [_cell(flat(row).get(key)) for key, _ in COLUMNS]) for row in result.rows],
        delta_columns=[f"{row.label} vs {base.backend}" for row, base, _ in deltas],
        deltas=[(name, [d[c] for _, _, d in deltas]) for c, name in enumerate(names)],
    )


def write_report(result: BenchReport, out_dir: str | Path) -> dict[str, Path]:
    """report.json, .csv, .md, .html and the figures (report.png, report.confusion.png,
    report.compare.png) in `out_dir`; the pick, if any, as deploy/choice.json."""
    out_dir = Path(out_dir)
    pictures = figures(result)
    written = {
        "json": save_json(result.to_dict(), out_dir / "report.json"),
        "csv": save_text(to_csv(result), out_dir / "report.csv"),
        "md": save_text(to_markdown(result, {k: IMAGES[k] for k in pictures}), out_dir / "report.md"),
    }
    for key, data in pictures.items():
        written[key] = atomic_write(out_dir / IMAGES[key], _writer(data))
    written["html"] = save_text(to_html(page(result), pictures), out_dir / "report.html")
    if result.choice is not None:
        written["choice"] = save_json(result.choice, choice_path(out_dir))
    return written
