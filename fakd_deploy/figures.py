"""Figures shared by `evaluate` and `bench`: the normalised confusion matrix, and PNG bytes.

Matplotlib comes with the training install, not the deploy-only one: callers ask
`has_matplotlib()` and leave a figure out (with a note) where it is missing.
"""

from __future__ import annotations

import importlib.util
import io
from collections.abc import Sequence
from typing import Any

import numpy as np

ANNOTATE_UP_TO = 25  # classes: beyond this the cells are too small to print numbers in


def has_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def normalised(matrix: Sequence[Sequence[int]]) -> np.ndarray:
    """Each ground-truth row divided by its pixel count: the share of a class's pixels that
    went to each prediction (rows of absent classes stay zero)."""
    counts = np.asarray(matrix, dtype=np.float64)
    totals = counts.sum(1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def confusion_figure(matrix: Sequence[Sequence[int]], class_names: Sequence[str], title: str) -> Any:
    """Heat map of the row-normalised confusion matrix, class names on both axes."""
    from matplotlib.figure import Figure

    shares = normalised(matrix)
    count = len(shares)
    side = min(max(4.0, 0.45 * count + 2.0), 24.0)
    figure = Figure(figsize=(side + 1.2, side), layout="constrained")
    axes = figure.subplots()
    image = axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="share of the true class's pixels")
    names = list(class_names) if len(class_names) == count else [str(i) for i in range(count)]
    small = 7 if count > 12 else 9
    axes.set_xticks(range(count), names, rotation=60, ha="right", fontsize=small)
    axes.set_yticks(range(count), names, fontsize=small)
    axes.set_xlabel("predicted")
    axes.set_ylabel("ground truth")
    axes.set_title(title, fontsize=9)
    if count <= ANNOTATE_UP_TO:
        for row in range(count):
            for column in range(count):
                value = shares[row, column]
                if value >= 0.005:
                    axes.text(
                        column,
                        row,
                        f"{100 * value:.0f}",
                        ha="center",
                        va="center",
                        fontsize=small - 1,
                        color="white" if value > 0.5 else "black",
                    )
    return figure


def png_bytes(figure: Any, dpi: int = 110) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()
