"""Any model file as a Predictor, and label PNGs + colour overlays to see what it sees."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from fakd_deploy.deploy.shapes import FixedSizePredictor
from fakd_deploy.evaluate import Predictor
from fakd_deploy.recipe import IMAGENET_MEAN, IMAGENET_STD
from fakd_deploy.utils import atomic_write


@dataclass
class ModelInfo:
    """How to feed a model: normalisation, fixed input size (if any) and classes."""

    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    pixel_scale: float = 255.0
    input_size: tuple[int, int] | None = None
    num_classes: int | None = None
    class_names: list[str] | None = None

    @classmethod
    def from_metadata(cls, meta: dict[str, Any], input_size: tuple[int, int] | None) -> ModelInfo:
        return cls(mean=tuple(meta.get("mean", IMAGENET_MEAN)),
                   std=tuple(meta.get("std", IMAGENET_STD)),
                   pixel_scale=float(meta.get("pixel_scale", 255.0)), input_size=input_size,
                   num_classes=meta.get("num_classes"), class_names=meta.get("class_names"))

    def normalise(self, image: np.ndarray) -> torch.Tensor:
        """An (H, W, 3) uint8 RGB array as the (1, 3, H, W) float batch the model was trained on."""
        x = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1) / self.pixel_scale
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return ((x - mean) / std).unsqueeze(0)


def _checkpoint(path: Path, device: str, threads: int | None) -> tuple[Predictor, ModelInfo]:
    from fakd_deploy.evaluate import TorchPredictor
    from fakd_deploy.models import load_checkpoint, model_from_checkpoint
    from fakd_deploy.recipe import parse_recipe
    from fakd_deploy.utils import resolve_device

    if threads:
        torch.set_num_threads(threads)
    checkpoint = load_checkpoint(path)
    model = model_from_checkpoint(checkpoint)
    info = ModelInfo(num_classes=getattr(model, "num_classes", None),
                     class_names=checkpoint.get("class_names"))
    if checkpoint.get("recipe"):
        data = parse_recipe(checkpoint["recipe"]).data
        info.mean, info.std, info.pixel_scale = data.mean, data.std, data.pixel_scale
    return TorchPredictor(model, resolve_device(device)), info


def _onnx(path: Path, device: str, threads: int | None) -> tuple[Predictor, ModelInfo]:
    from fakd_deploy.deploy.export import read_metadata
    from fakd_deploy.deploy.ort import OrtPredictor, default_providers

    predictor = OrtPredictor(path, providers=default_providers(device), threads=threads)
    return predictor, ModelInfo.from_metadata(read_metadata(path), predictor.input_size)


def _engine(path: Path, device: str, threads: int | None) -> tuple[Predictor, ModelInfo]:
    from fakd_deploy.deploy.trt import TrtPredictor

    predictor = TrtPredictor(path)
    return predictor, ModelInfo.from_metadata(predictor.sidecar["metadata"], predictor.input_size)


LOADERS: dict[str, Callable[[Path, str, int | None], tuple[Predictor, ModelInfo]]] = {
    ".pt": _checkpoint, ".pth": _checkpoint, ".onnx": _onnx, ".engine": _engine}


def predictor_for(path: str | Path, device: str = "auto",
                  threads: int | None = None) -> tuple[Predictor, ModelInfo]:
    """A Predictor for a checkpoint, ONNX model or engine, and how to feed it.

    Models with a fixed input size get images resized to it and predictions resized back,
    so the Predictor accepts any image size.
    """
    path = Path(path)
    if path.suffix not in LOADERS:
        raise ValueError(f"{path}: expected a checkpoint (.pt), an ONNX model (.onnx) or a "
                         "TensorRT engine (.engine)")
    if not path.exists():
        raise FileNotFoundError(f"model not found: {path}")
    predictor, info = LOADERS[path.suffix](path, device, threads)
    return FixedSizePredictor(predictor, info.input_size), info


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


@torch.inference_mode()
def predict(model_path: str | Path, images: list[Path], out_dir: str | Path,
            device: str = "auto", threads: int | None = None, alpha: float = 0.5) -> list[Path]:
    """Write `<stem>.labels.png` (class ids, palette-coloured) and `<stem>.overlay.png` per image.

    Both have the size of the original image.
    """
    predictor, info = predictor_for(model_path, device, threads)
    out_dir = Path(out_dir)
    colours = palette()
    written = []
    for image_path in images:
        image = Image.open(image_path).convert("RGB")
        out = predictor(info.normalise(np.asarray(image)))
        labels = (out.argmax(1) if out.dim() == 4 else out)[0].numpy()
        if labels.max() > 255:
            raise ValueError(f"class id {labels.max()} does not fit an 8-bit label PNG")
        label_png = Image.fromarray(labels.astype(np.uint8))  # "L"; the palette makes it "P"
        label_png.putpalette(colours.flatten().tolist())
        overlay = Image.blend(image, Image.fromarray(colours[labels]), alpha)
        stem = Path(image_path).stem
        written.append(_save_png(label_png, out_dir / f"{stem}.labels.png"))
        written.append(_save_png(overlay, out_dir / f"{stem}.overlay.png"))
    return written
