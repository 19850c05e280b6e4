"""The tables a person reads after `evaluate` and `run`: per-class IoU, variants over seeds."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from rich.table import Table


def summarize_variants(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """mIoU mean, sample standard deviation, min and max over the seeds of each variant.

    A KD gain means something only against the spread of equally trained baselines.
    """
    groups: dict[str, list[float]] = {}
    for row in rows:
        groups.setdefault(row["variant"], []).append(row["miou"])
    summary = []
    for variant, values in groups.items():
        std = float(np.std(values, ddof=1)) if len(values) > 1 else None
        summary.append(
            {
                "variant": variant,
                "seeds": len(values),
                "mean": float(np.mean(values)),
                "std": std,
                "min": min(values),
                "max": max(values),
            }
        )
    return summary


def variant_table(rows: Sequence[dict[str, Any]]) -> Table:
    """Mean, spread and range of val mIoU per variant over its seeds."""
    table = Table(title=f"val mIoU by variant ({rows[0]['mode'] if rows else ''})")
    for name in ("variant", "seeds", "mean", "std", "min", "max"):
        table.add_column(name, justify="left" if name == "variant" else "right")
    for item in summarize_variants(rows):
        table.add_row(
            item["variant"],
            str(item["seeds"]),
            f"{item['mean']:.2f}",
            "-" if item["std"] is None else f"{item['std']:.2f}",
            f"{item['min']:.2f}",
            f"{item['max']:.2f}",
        )
    return table


def evaluation_headline(result: dict[str, Any]) -> str:
    """The numbers a person looks for first, and what was scored."""
    where = f"{result.get('dataset', '')} {result.get('split', '')}".strip()
    return (
        f"mIoU {result['miou']:.2f}  pixel acc {result['pixel_acc']:.2f}  mode {result['mode']}  "
        f"({result['images']} images{', ' + where if where else ''})"
    )


def evaluation_table(result: dict[str, Any], class_names: Sequence[str] | None = None) -> Table:
    """Per-class IoU."""
    table = Table()
    table.add_column("class")
    table.add_column("IoU", justify="right")
    names = class_names or [str(i) for i in range(len(result["per_class_iou"]))]
    for name, iou in zip(names, result["per_class_iou"], strict=True):
        table.add_row(name, "-" if iou is None else f"{iou:.2f}")
    return table
