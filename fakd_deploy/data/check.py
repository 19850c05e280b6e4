"""What a dataset holds: images per split, their sizes and how often each class is labelled.

Reading every label once is the quickest way to catch a wrong root, a wrong label mapping
(a class that never appears, a large ignore fraction) or a mixed-size split before training.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from fakd_deploy.data import MissingSplit, build_dataset
from fakd_deploy.errors import DatasetError
from fakd_deploy.progress import progress_bar


def scan_split(dataset: Any, count: int, label: str) -> dict[str, Any]:
    """Sizes and per-class pixel counts of the first `count` images of one split."""
    sizes: Counter[tuple[int, int]] = Counter()
    pixels = np.zeros(dataset.num_classes + 1, dtype=np.int64)
    with progress_bar() as progress:
        task = progress.add_task(f"scan {label}", total=count)
        for index in range(count):
            _, mask = dataset[index]
            sizes[mask.shape] += 1
            labelled = mask[mask != dataset.ignore_index]
            pixels[:-1] += np.bincount(labelled.ravel(), minlength=dataset.num_classes)
            pixels[-1] += mask.size - labelled.size
            progress.advance(task)
    total, labelled_total = int(pixels.sum()), int(pixels[:-1].sum())
    return {
        "count": len(dataset),
        "scanned": count,
        "sizes": dict(sizes.most_common()),
        "classes": {
            name: float(n) / max(labelled_total, 1)
            for name, n in zip(dataset.class_names, pixels[:-1], strict=True)
        },
        "ignore": float(pixels[-1]) / max(total, 1),
    }


def summarize(
    name: str,
    root: str | Path | None,
    splits: tuple[str, ...] = ("train", "val", "test"),
    max_images: int | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Per split that exists: image count, {(h, w): count} and class pixel frequencies.

    Class frequencies are fractions of the labelled pixels; `ignore` is the fraction of all
    pixels that carry the ignore label. Splits whose folder or list is absent are left out;
    any other problem (a missing mask, a bad label) is reported as training would report it.
    """
    summary: dict[str, Any] = {"name": name, "root": None if root is None else str(root), "splits": {}}
    for split in splits:
        try:
            dataset = build_dataset(name, root, split, **options)
        except MissingSplit:
            continue
        summary["class_names"] = list(dataset.class_names)
        count = len(dataset) if max_images is None else min(max_images, len(dataset))
        summary["splits"][split] = scan_split(dataset, count, f"{name} {split}")
    if not summary["splits"]:
        raise DatasetError(f"no split of {', '.join(splits)} found for dataset '{name}' under {root}")
    return summary


def summary_tables(summary: dict[str, Any]) -> list[Table]:
    """One table of splits (count, sizes), one of class frequencies per split."""
    splits = summary["splits"]
    overview = Table(title=f"{summary['name']} at {summary['root'] or '(generated)'}")
    for column in ("split", "images", "scanned", "sizes (h x w: images)", "ignored pixels"):
        overview.add_column(column)
    for split, info in splits.items():
        sizes = ", ".join(f"{h}x{w}: {n}" for (h, w), n in info["sizes"].items())
        overview.add_row(split, str(info["count"]), str(info["scanned"]), sizes, f"{info['ignore']:.1%}")

    classes = Table(title="class pixel frequency (of labelled pixels)")
    classes.add_column("id", justify="right")
    classes.add_column("class")
    for split in splits:
        classes.add_column(split, justify="right")
    for index, name in enumerate(summary["class_names"]):
        classes.add_row(str(index), name, *(frequency(info["classes"][name]) for info in splits.values()))
    return [overview, classes]


def frequency(value: float) -> str:
    """Absent classes stand out in red: usually a wrong label mapping or too few images."""
    return "[red]0[/red]" if value == 0 else f"{value:.2%}"
