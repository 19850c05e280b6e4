"""Label PNGs and colour overlays from any model file, to see what the engine sees.

Masks are coloured with the model's dataset's own palette (`fakd_deploy.palette`), each
overlay carries a legend of the classes present, and outputs are named by image, model and
backend, so predictions of two backends sit side by side instead of overwriting each other.
Nothing is written over an input. Numpy and PIL only (torch is needed for a `.pt`
checkpoint alone), so it runs on the edge device next to the engine.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from fakd_deploy.artifacts import Artifact
from fakd_deploy.data.base import open_image
from fakd_deploy.data.datasets import IMAGE_SUFFIXES
from fakd_deploy.deploy.runtime import backend_for, open_predictor
from fakd_deploy.errors import BadInput
from fakd_deploy.palette import beside, legend, palette_for, present_classes
from fakd_deploy.runfolder import RunFolder, held_around
from fakd_deploy.suggest import path_hint
from fakd_deploy.utils import atomic_write


def _save_png(image: Image.Image, path: Path) -> Path:
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def image_files(paths: list[Path]) -> list[Path]:
    """The images to predict: files as given, and the image files (regular files only) of
    each folder, sorted by name."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            inside = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not inside:
                raise BadInput(f"{path} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
            files += inside
        elif not path.exists():
            raise BadInput(f"image not found: {path}{path_hint(path)}")
        elif not path.is_file():
            raise BadInput(f"{path} is not a regular file; give image files or folders of them")
        else:
            files.append(path)
    return files


def model_name(artifact: Artifact) -> str:
    """How outputs name a model: a checkpoint by its variant and seed (or role), an exported
    model or engine by its file name up to the first dot (kd.int8.onnx -> kd).

    A checkpoint's names are plain names and its seed a whole number (`Checkpoint.load`
    checks them), so none of them can lead out of `--out`."""
    meta = artifact.metadata
    if artifact.kind == "checkpoint" and meta.get("variant"):
        seed = meta.get("seed")
        return f"{meta['variant']}_s{seed}" if seed is not None else str(meta["variant"])
    if artifact.kind == "checkpoint" and meta.get("role"):
        return str(meta["role"])
    return artifact.path.name.split(".")[0]


def output_names(images: list[Path], out_dir: Path, tag: str) -> list[tuple[Path, Path]]:
    """(labels, overlay) paths per image: `<stem>.<tag>.labels.png`, `<stem>.<tag>.overlay.png`.

    Two images with one stem would overwrite each other; that is refused up front, and so is
    a name that would lead out of `out_dir`.
    """
    stems: dict[str, Path] = {}
    for image in images:
        if image.stem in stems:
            raise BadInput(
                f"{stems[image.stem]} and {image} would both write {image.stem}.{tag}.labels.png; "
                "rename one or predict them into different --out folders"
            )
        stems[image.stem] = image
    folder = RunFolder(out_dir)
    return [
        (folder.inside(f"{stem}.{tag}.labels.png"), folder.inside(f"{stem}.{tag}.overlay.png"))
        for stem in stems
    ]


def check_no_input_is_overwritten(outputs: list[Path], inputs: list[Path]) -> None:
    """Refuse before anything runs when an output would replace one of the inputs (the same
    file, through any name, link or hard link)."""
    for output in outputs:
        if not output.exists():
            continue
        for source in inputs:
            if os.path.samefile(output, source):
                raise BadInput(f"writing {output} would overwrite the input {source}; choose another --out")


def colours_of(artifact: Artifact, count: int = 256) -> np.ndarray:
    """The palette of the dataset the model was trained on (its recipe in the metadata)."""
    data = (artifact.raw_recipe or {}).get("data")
    dataset = data.get("name") if isinstance(data, dict) else None
    return palette_for(dataset if isinstance(dataset, str) else None, count)


def predict(
    model_path: Path,
    images: list[Path],
    out_dir: Path,
    backend: str | None = None,
    device: str = "auto",
    threads: int | None = None,
    alpha: float = 0.5,
    overlay: bool = True,
) -> list[Path]:
    """Per image, `<stem>.<model>.<backend>.labels.png` (class ids in the dataset's palette,
    at the image's size) and, with `overlay`, `<stem>.<model>.<backend>.overlay.png` (the
    colours blended over the image, a legend of the classes present to its right)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise BadInput(f"--out {out_dir} is a file; predictions go into a folder")
    files = image_files(images)
    artifact = Artifact.open(model_path)
    runtime = "pytorch" if artifact.kind == "checkpoint" else backend_for(artifact, backend).name
    names = output_names(files, out_dir, f"{model_name(artifact)}.{runtime}")
    outputs = [path for pair in names for path in (pair if overlay else pair[:1])]
    check_no_input_is_overwritten(outputs, [*files, model_path])
    predictor, info = open_predictor(artifact, backend, device, threads)
    colours = colours_of(artifact)
    written = []
    with held_around(out_dir, itself=True):  # predictions written into a run folder: its one writer
        for image_path, (labels_path, overlay_path) in zip(files, names, strict=True):
            image = open_image(image_path).convert("RGB")
            out = predictor(info.normalise(np.asarray(image))[None])
            labels = (out.argmax(1) if out.ndim == 4 else out)[0]
            if labels.max() > 255:
                raise BadInput(f"class id {labels.max()} does not fit an 8-bit label PNG")
            label_png = Image.fromarray(labels.astype(np.uint8))  # "L"; the palette makes it "P"
            label_png.putpalette(colours.flatten().tolist())
            written.append(_save_png(label_png, labels_path))
            if overlay:
                blended = Image.blend(image, Image.fromarray(colours[labels]), alpha)
                key = legend(present_classes(labels, colours, info.class_names))
                written.append(_save_png(beside(blended, key), overlay_path))
    return written
