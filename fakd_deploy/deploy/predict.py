"""Label PNGs and colour overlays from any model file, to see what the engine sees.

Numpy and PIL only (torch is needed for a `.pt` checkpoint alone), so it runs on the
edge device next to the engine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from fakd_deploy.data.base import open_image
from fakd_deploy.deploy.runtime import open_predictor
from fakd_deploy.errors import BadInput
from fakd_deploy.utils import atomic_write


def palette(count: int = 256) -> np.ndarray:
    """The Pascal VOC colour map: fixed, and distinct for neighbouring class ids."""
    colours = np.zeros((count, 3), dtype=np.uint8)
    for index in range(count):
        value, rgb = index, [0, 0, 0]
        for bit in range(7, -1, -1):
            for channel in range(3):
                rgb[channel] |= ((value >> channel) & 1) << bit
            value >>= 3
        colours[index] = rgb
    return colours


def _save_png(image: Image.Image, path: Path) -> Path:
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def output_names(images: list[Path], out_dir: Path) -> list[tuple[Path, Path]]:
    """(labels, overlay) paths per image: `<stem>.labels.png`, `<stem>.overlay.png` in `out_dir`.

    Two images with one stem would overwrite each other; that is refused up front.
    """
    stems: dict[str, Path] = {}
    for image in images:
        if image.stem in stems:
            raise BadInput(
                f"{stems[image.stem]} and {image} would both write {image.stem}.labels.png; "
                "rename one or predict them into different --out folders"
            )
        stems[image.stem] = image
    return [(out_dir / f"{stem}.labels.png", out_dir / f"{stem}.overlay.png") for stem in stems]


def refuse_overwriting(inputs: list[Path], outputs: list[Path]) -> None:
    """An output may never replace an input (an image, the model), whatever the names: the
    same path, a path through a linked folder, a link or a hard link to the input."""

    def identity(path: Path) -> tuple[int, int] | None:
        try:
            info = path.stat()
        except OSError:
            return None
        return info.st_dev, info.st_ino

    given = {path.resolve(): path for path in inputs}
    files = {identity(path): path for path in inputs}
    files.pop(None, None)
    for output in outputs:
        found = given.get(output.resolve()) or files.get(identity(output))
        if found is not None:
            raise BadInput(
                f"predicting would overwrite the input {found} (as {output}); choose another --out folder"
            )


def predict(
    model_path: Path,
    images: list[Path],
    out_dir: Path,
    backend: str | None = None,
    device: str = "auto",
    threads: int | None = None,
    alpha: float = 0.5,
) -> list[Path]:
    """Write `<stem>.labels.png` (class ids, palette-coloured) and `<stem>.overlay.png` per image.

    Both have the size of the original image.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise BadInput(f"--out {out_dir} is a file; predictions go into a folder")
    names = output_names(images, out_dir)
    refuse_overwriting([model_path, *images], [path for pair in names for path in pair])
    predictor, info = open_predictor(model_path, backend, device, threads)
    colours = palette()
    written = []
    for image_path, (labels_path, overlay_path) in zip(images, names, strict=True):
        image = open_image(image_path).convert("RGB")
        out = predictor(info.normalise(np.asarray(image))[None])
        labels = (out.argmax(1) if out.ndim == 4 else out)[0]
        if labels.max() > 255:
            raise BadInput(f"class id {labels.max()} does not fit an 8-bit label PNG")
        label_png = Image.fromarray(labels.astype(np.uint8))  # "L"; the palette makes it "P"
        label_png.putpalette(colours.flatten().tolist())
        overlay = Image.blend(image, Image.fromarray(colours[labels]), alpha)
        written.append(_save_png(label_png, labels_path))
        written.append(_save_png(overlay, overlay_path))
    return written
