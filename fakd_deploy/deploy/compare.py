"""The comparison grid of `bench --compare N`: where each backend disagrees with its reference.

One line per validation image: the image, its ground truth, the model's reference row
(PyTorch, or ONNX Runtime FP32), then every other backend of that model with the pixels
that differ from the reference in magenta and the rest faded, so a user sees where INT8
disagrees before shipping. PIL and numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from fakd_deploy.deploy.rows import BenchRow
from fakd_deploy.palette import _font, beside, legend, palette_for, present_classes
from fakd_deploy.recipe import Recipe

HIGHLIGHT = np.array([255, 0, 255], dtype=np.uint8)
MIN_CELL = 160  # pixels: small images are enlarged (nearest neighbour for masks)
TITLE = 34


@dataclass
class Sample:
    """The validation images every row is timed and compared on."""

    images: np.ndarray  # (N, 3, H, W) normalised
    masks: np.ndarray  # (N, H, W)


def columns(rows: list[BenchRow], labelled: set[int]) -> list[tuple[int, int | None]]:
    """(row index, index of the row it is compared with) per column: for each model with more
    than one labelled row, its reference row first, then its other rows against it."""
    by_model: dict[str, list[int]] = {}
    for index in sorted(labelled):
        by_model.setdefault(rows[index].model, []).append(index)
    grouped = [indices for indices in by_model.values() if len(indices) > 1]
    if not grouped:
        return [(index, None) for index in sorted(labelled)]
    out: list[tuple[int, int | None]] = []
    for indices in grouped:
        reference = next((i for i in indices if rows[i].is_reference), indices[0])
        out.append((reference, None))
        out += [(i, reference) for i in indices if i != reference]
    return out


def _rgb(image: np.ndarray, recipe: Recipe) -> np.ndarray:
    """A normalised (3, H, W) image back to (H, W, 3) uint8."""
    data = recipe.data
    x = image.transpose(1, 2, 0) * np.asarray(data.std) + np.asarray(data.mean)
    return np.clip(np.rint(x * data.pixel_scale), 0, 255).astype(np.uint8)


def _cell(pixels: np.ndarray, scale: int) -> Image.Image:
    image = Image.fromarray(pixels)
    return (
        image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
        if scale > 1
        else image
    )


def compare_grid(
    rows: list[BenchRow],
    labels: dict[int, np.ndarray],
    sample: Sample,
    recipe: Recipe,
    class_names: list[str] | None = None,
) -> Image.Image | None:
    """The grid image, or None when no row has predictions to show."""
    chosen = columns(rows, set(labels))
    if not chosen:
        return None
    images, masks = sample.images, sample.masks
    count = len(next(iter(labels.values())))
    height, width = masks.shape[-2:]
    scale = max(1, -(-MIN_CELL // width))
    cell_w, cell_h = width * scale, height * scale
    colours = palette_for(recipe.data.name, 256)
    titles = ["image", "ground truth"] + [
        f"{rows[i].model}\n{rows[i].backend}" + (" (ref)" if ref is None and len(chosen) > 1 else "")
        for i, ref in chosen
    ]
    grid = Image.new("RGB", (cell_w * len(titles), TITLE + (cell_h + TITLE) * count), "white")
    draw = ImageDraw.Draw(grid)
    font = _font(12)
    for column, title in enumerate(titles):
        draw.multiline_text((column * cell_w + 4, 3), title, fill=(0, 0, 0), font=font, spacing=2)
    ignore = recipe.data.ignore_index
    shown: list[np.ndarray] = []
    for line in range(count):
        top = TITLE + line * (cell_h + TITLE)
        mask = masks[line]
        truth = colours[np.where(mask == ignore, 0, mask)].copy()
        truth[mask == ignore] = 0
        cells = [_rgb(images[line], recipe), truth]
        captions = ["", ""]
        shown.append(mask[mask != ignore])
        for index, ref in chosen:
            predicted = labels[index][line]
            shown.append(predicted.reshape(-1))
            painted = colours[predicted]
            if ref is not None:
                differ = predicted != labels[ref][line]
                painted = np.where(
                    differ[..., None], HIGHLIGHT, (painted * 0.35 + 255 * 0.65).astype(np.uint8)
                )
                captions.append(f"differs on {100 * differ.mean():.2f} %")
            else:
                captions.append("")
            cells.append(painted)
        for column, (pixels, caption) in enumerate(zip(cells, captions, strict=True)):
            grid.paste(_cell(pixels, scale), (column * cell_w, top))
            if caption:
                draw.text((column * cell_w + 4, top + cell_h + 4), caption, fill=(0, 0, 0), font=font)
    present = np.concatenate(shown) if shown else np.zeros(0, dtype=np.int64)
    key = legend([*present_classes(present, colours, class_names), ("differs from ref", (255, 0, 255))])
    return beside(grid, key)
