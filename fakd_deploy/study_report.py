"""A study's summary (`study.summarize`) as a terminal table, Markdown, CSV and a plot."""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.table import Table

from fakd_deploy.utils import atomic_write

log = logging.getLogger(__name__)

COLUMNS = [
    ("variant", "variant"),
    ("lam0", "lam0"),
    ("bound", "bound"),
    ("seeds", "seeds"),
    ("val_last", "val mIoU (last)"),
    ("val_best", "val mIoU (best on val)"),
    ("vs_baseline", "Δ vs baseline [95% CI]"),
    ("plain", "plain"),
    ("vs_plain", "Δ vs plain [95% CI]"),
    ("test_last", "test mIoU (last)"),
    ("test_vs_baseline", "test Δ vs baseline"),
    ("test_vs_plain", "test Δ vs plain"),
    ("seconds", "s per run"),
]
TEXT_COLUMNS = {"variant", "bound", "plain"}
COMPARISONS = ("vs_baseline", "vs_plain", "test_vs_baseline", "test_vs_plain")


def _pm(spread: Mapping[str, Any] | None) -> str:
    if not spread:
        return "-"
    return f"{spread['mean']:.2f}" + ("" if spread["std"] is None else f" ± {spread['std']:.2f}")


def _ci(diff: Mapping[str, Any] | None) -> str:
    if not diff:
        return "-"
    if diff["low"] is None:
        return f"{diff['mean']:+.2f}"
    return f"{diff['mean']:+.2f} [{diff['low']:+.2f}, {diff['high']:+.2f}]"


def _seeds(row: Mapping[str, Any]) -> str:
    missing = row["missing_seeds"]
    return str(row["seeds"]) + (f" (missing {', '.join(map(str, missing))})" if missing else "")


def _cell(row: Mapping[str, Any], key: str) -> str:
    value = row.get(key)
    if key == "seeds":
        return _seeds(row)
    if key in ("val_last", "val_best", "test_last"):
        return _pm(value)
    if key in COMPARISONS:
        return _ci(value)
    if key == "seconds":
        return "-" if value is None else f"{value['mean']:.0f}"
    if value is None:
        return "-"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _columns(summary: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The columns that have a value in some row (no test columns without a test split)."""
    rows = summary["rows"]
    return [(key, title) for key, title in COLUMNS if any(row.get(key) is not None for row in rows)]


def headline_lines(summary: Mapping[str, Any]) -> list[str]:
    """The pre-registered comparisons, one sentence each."""
    lines = []
    for found in summary["headline"]:
        difference = found["difference"]
        scored = (
            f"{_ci(difference)} ({difference['n']} seeds): {found['verdict']}" if difference else "not scored"
        )
        lines.append(
            f"FAKD over {found['plain']}: {found['chosen']}, chosen on val among "
            f"{len(found['candidates'])} points (mean val mIoU {found['chosen_val_mean']:.2f}), "
            f"minus {found['plain']} on {found['split']}: {scored}. Reading: {found['reading']}."
        )
    return lines


def comparison_lines(summary: Mapping[str, Any]) -> list[str]:
    """Every paired comparison in one line: the interval and whether it excludes zero."""
    splits = {"": summary["val_split"], "test_": summary["test_split"]}
    lines = []
    for row in summary["rows"]:
        for prefix, split in splits.items():
            for name, reference in (("vs_plain", row["plain"]), ("vs_baseline", summary["baseline"])):
                difference = row.get(prefix + name)
                if difference:
                    lines.append(
                        f"{row['variant']} − {reference}, {split}: {_ci(difference)} "
                        f"({difference['n']} seeds): {difference['verdict']}"
                    )
    return lines


def study_table(summary: Mapping[str, Any]) -> Table:
    columns = _columns(summary)
    table = Table(
        title=f"{summary['dataset']}: mean ± std over seeds; reported: {summary['reported']}; "
        f"teacher val {summary['teacher'] or 0:.2f}"
    )
    for key, title in columns:
        table.add_column(title, justify="left" if key in TEXT_COLUMNS else "right", no_wrap=key == "variant")
    for row in summary["rows"]:
        table.add_row(*(_cell(row, key) for key, _ in columns))
    return table


def _minutes(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds / 60:.1f} min"


def to_markdown(summary: Mapping[str, Any]) -> str:
    columns = _columns(summary)
    lines = [
        f"# Study: {summary['dataset']}",
        "",
        f"Seeds {summary['seeds']} ('seeds': how many each row has). Reported: {summary['reported']} "
        "(no checkpoint selection); 'best on val' is the checkpoint selected on the val split "
        "itself, shown for comparison and optimistic by construction. Δ: mean paired difference "
        "(same seed) with a 95 % Student-t interval; 'plain' is the loss a FAKD variant is "
        f"paired with (its own terms at lam0 = 0). Teacher val mIoU {summary['teacher'] or 0:.2f}.",
        "",
        "## Headline (pre-registered)",
        "",
        *(f"- {line}" for line in headline_lines(summary) or ["no FAKD variant with a plain loss to pair"]),
        "",
        "## Results",
        "",
        "| " + " | ".join(title for _, title in columns) + " |",
        "|" + "|".join("---" if key in TEXT_COLUMNS else "---:" for key, _ in columns) + "|",
        *("| " + " | ".join(_cell(row, key) for key, _ in columns) + " |" for row in summary["rows"]),
        "",
        "## Comparisons (does the 95 % interval exclude zero?)",
        "",
        *(f"- {line}" for line in comparison_lines(summary)),
        "",
        f"Wall time: teacher {_minutes(summary['teacher_seconds'])}, students "
        f"{_minutes(summary['student_seconds'])} in all ('s per run' above: mean training "
        "seconds per run; a run resumed after an interruption counts its last attempt).",
    ]
    names = summary.get("class_names")
    deltas = [row for row in summary["rows"] if row.get("class_delta_vs_baseline")]
    if names and deltas:
        lines += [
            "",
            "## Per-class IoU change against the baseline (val, last checkpoint, mean over seeds)",
            "",
            "| variant | " + " | ".join(names) + " |",
            "|---|" + "---:|" * len(names),
        ]
        for row in deltas:
            lines.append(
                f"| {row['variant']} | "
                + " | ".join("-" if d is None else f"{d:+.1f}" for d in row["class_delta_vs_baseline"])
                + " |"
            )
    return "\n".join(lines) + "\n"


CSV_TEXT = ["variant", "source", "kind", "plain", "lam0", "bound", "seeds"]
CSV_SPREADS = ["val_last", "val_best", "test_last"]


def to_csv(summary: Mapping[str, Any]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(
        [
            *CSV_TEXT,
            "missing_seeds",
            *(f"{key}_{field}" for key in CSV_SPREADS for field in ("mean", "std")),
            *(f"{key}{field}" for key in COMPARISONS for field in ("", "_low", "_high", "_n", "_verdict")),
            "seconds_mean",
            "seconds_total",
        ]
    )
    for row in summary["rows"]:
        writer.writerow(
            [
                *(row[key] for key in CSV_TEXT),
                " ".join(map(str, row["missing_seeds"])),
                *((row.get(key) or {}).get(field) for key in CSV_SPREADS for field in ("mean", "std")),
                *(
                    (row.get(key) or {}).get(field)
                    for key in COMPARISONS
                    for field in ("mean", "low", "high", "n", "verdict")
                ),
                *((row["seconds"] or {}).get(field) for field in ("mean", "total")),
            ]
        )
    return buffer.getvalue()


def plot(summary: Mapping[str, Any], path: Path) -> Path | None:
    """mIoU (last checkpoint) against lam0: a column per plain loss, a row per split.

    Each panel shows its FAKD points (mean ± std over seeds, a line per bound) over bands
    for the baseline and the plain loss (mean ± std).
    """
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        log.info("study.png left out: matplotlib is not installed")
        return None
    rows = {row["variant"]: row for row in summary["rows"]}
    families: dict[str, list[Mapping[str, Any]]] = {}
    for row in summary["rows"]:
        if row["kind"] == "fakd" and row["lam0"] is not None:
            families.setdefault(row["plain"] or row["source"], []).append(row)
    if not families:
        log.info("study.png left out: the study has no FAKD points to plot")
        return None
    splits = [("val_last", f"{summary['val_split']} mIoU, last checkpoint (%)")]
    if summary["test_split"]:
        splits.append(("test_last", f"{summary['test_split']} mIoU, last checkpoint (%)"))
    figure = Figure(figsize=(5.5 * len(families), 4.2 * len(splits)), layout="constrained")
    grid = figure.subplots(len(splits), len(families), sharey="row", squeeze=False)
    for r, (key, label) in enumerate(splits):
        for c, (family, members) in enumerate(families.items()):
            axes = grid[r][c]
            for name, colour in ((summary["baseline"], "tab:gray"), (family, "tab:green")):
                spread = rows[name][key] if name in rows else None
                if spread:
                    std = spread["std"] or 0.0
                    axes.axhspan(spread["mean"] - std, spread["mean"] + std, color=colour, alpha=0.15)
                    axes.axhline(spread["mean"], color=colour, lw=1.5, label=f"{name} (mean ± std)")
            lines: dict[tuple[str, str | None], list[Mapping[str, Any]]] = {}
            for row in members:
                if row.get(key):
                    lines.setdefault((row["source"], row["bound"]), []).append(row)
            for i, ((source, bound), points) in enumerate(lines.items()):
                points.sort(key=lambda row: row["lam0"])
                dodge = 1 + 0.03 * (i - (len(lines) - 1) / 2)  # side by side, so error bars stay apart
                axes.errorbar(
                    [row["lam0"] * dodge for row in points],
                    [row[key]["mean"] for row in points],
                    yerr=[row[key]["std"] or 0.0 for row in points],
                    marker="o",
                    capsize=4,
                    label=f"{source}, {bound}" if bound else source,
                )
            axes.set_xscale("log")
            axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
            axes.set_xticks(sorted({row["lam0"] for row in members}))
            axes.xaxis.set_minor_formatter(FuncFormatter(lambda value, _: ""))
            axes.set_title(f"FAKD on {family}", fontsize=10)
            if r == len(splits) - 1:
                axes.set_xlabel("lam0 (FAKD strength at the end of training)")
            if c == 0:
                axes.set_ylabel(label)
            axes.grid(alpha=0.3)
            if r == 0:
                axes.legend(loc="best", fontsize=7)
    figure.suptitle(
        f"{summary['dataset']}: mean ± std over the seeds each variant has (of {len(summary['seeds'])})",
        fontsize=10,
    )
    return atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110))
