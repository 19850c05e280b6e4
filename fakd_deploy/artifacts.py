"""One way to open any model file: a checkpoint (.pt), an ONNX model (.onnx) or an engine (.engine).

`recipe_of(path)` recovers the recipe an artifact was made from (checkpoints store it,
ONNX models carry it in their metadata, engines in their sidecar); `open_predictor(path)`
gives a Predictor and the `ModelInfo` that says how to feed it. Only the checkpoint path
imports torch, so ONNX models and engines open on a device without the training stack.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fakd_deploy.data.preprocess import Normalise, resize_bilinear, resize_nearest
from fakd_deploy.errors import ArtifactError, BadInput
from fakd_deploy.evaluate import Predictor
from fakd_deploy.recipe import IMAGENET_MEAN, IMAGENET_STD, Recipe, load_recipe, parse_recipe

CHECKPOINT_SUFFIXES = (".pt", ".pth")
SUFFIXES = (*CHECKPOINT_SUFFIXES, ".onnx", ".engine")


@dataclass
class ModelInfo:
    """How to feed a model: normalisation, fixed input size (if any) and its classes."""

    normalise: Normalise
    input_size: tuple[int, int] | None = None
    num_classes: int | None = None
    class_names: list[str] | None = None

    @classmethod
    def from_metadata(cls, meta: dict[str, Any], input_size: tuple[int, int] | None) -> ModelInfo:
        normalise = Normalise(
            tuple(meta.get("mean", IMAGENET_MEAN)),
            tuple(meta.get("std", IMAGENET_STD)),
            float(meta.get("pixel_scale", 255.0)),
        )
        return cls(normalise, input_size, meta.get("num_classes"), meta.get("class_names"))


class FixedSizePredictor:
    """Resize images to a model's fixed input size and its output back to the image size.

    Logits are resized bilinearly (as the exported graph does), labels by nearest neighbour.
    """

    def __init__(self, predictor: Predictor, size: tuple[int, int] | None) -> None:
        self.predictor = predictor
        self.size = size

    def __call__(self, images: np.ndarray) -> np.ndarray:
        original = tuple(images.shape[-2:])
        if self.size is None or original == tuple(self.size):
            return self.predictor(images)
        out = self.predictor(resize_bilinear(images, self.size))
        return resize_bilinear(out, original) if out.ndim == 4 else resize_nearest(out, original)


def kind_of(path: Path) -> str:
    """checkpoint, onnx or engine, from the file name; anything else is refused."""
    if path.suffix in CHECKPOINT_SUFFIXES:
        return "checkpoint"
    if path.suffix in (".onnx", ".engine"):
        return path.suffix[1:]
    raise BadInput(
        f"{path}: expected a checkpoint (.pt), an ONNX model (.onnx) or a TensorRT engine (.engine)"
    )


def training_stack(path: Path) -> Any:
    """The `models` package, or a message that a checkpoint needs torch (the deploy-only
    install opens ONNX models and engines, not checkpoints)."""
    try:
        from fakd_deploy import models
    except ImportError as error:
        raise BadInput(
            f"{path} is a PyTorch checkpoint, and this install has no {error.name or 'torch'}: "
            "pip install 'fakd-deploy[train]', or use its exported .onnx model"
        ) from None
    return models


def stored_metadata(path: Path) -> dict[str, Any]:
    """The metadata of an ONNX model or the `metadata` of an engine's sidecar."""
    if kind_of(path) == "onnx":
        from fakd_deploy.deploy.onnx_meta import read_metadata

        return read_metadata(path)
    from fakd_deploy.deploy.trt import load_sidecar

    return dict(load_sidecar(path).get("metadata") or {})


def raw_recipe_of(path: Path) -> dict[str, Any]:
    """The resolved recipe an artifact was made from, as a plain dict."""
    if not path.exists():
        raise ArtifactError(f"model not found: {path}")
    if kind_of(path) == "checkpoint":
        raw = training_stack(path).Checkpoint.load(path).recipe
    else:
        text = stored_metadata(path).get("recipe")
        try:
            raw = yaml.safe_load(text) if text else None
        except yaml.YAMLError:
            raise ArtifactError(f"{path}: its stored recipe is not valid YAML") from None
    if not isinstance(raw, dict):
        raise BadInput(f"{path} carries no recipe: pass --recipe to say which data and preprocessing to use")
    return raw


def recipe_of(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """The recipe stored in a checkpoint, ONNX model or engine, with `key=value` overrides."""
    return parse_recipe(raw_recipe_of(Path(path)), overrides)


def resolve_recipe(
    model: str | Path, recipe: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> Recipe:
    """`--recipe` when given, else the model's own; `--set` overrides apply either way."""
    return load_recipe(recipe, overrides) if recipe else recipe_of(model, overrides)


def _open_checkpoint(path: Path, device: str, threads: int | None) -> tuple[Predictor, ModelInfo]:
    models = training_stack(path)
    from fakd_deploy.models.predictor import TorchPredictor, resolve_device

    checkpoint = models.Checkpoint.load(path)
    model = checkpoint.build(str(path))
    recipe = checkpoint.recipe_config()
    data = recipe.data if recipe else None
    normalise = (
        Normalise(tuple(data.mean), tuple(data.std), data.pixel_scale)
        if data
        else Normalise(IMAGENET_MEAN, IMAGENET_STD)
    )
    info = ModelInfo(normalise, None, model.num_classes, checkpoint.class_names)
    return TorchPredictor(model, resolve_device(device), threads), info


def _open_deployed(path: Path, backend: str | None, threads: int | None) -> tuple[Predictor, ModelInfo]:
    from fakd_deploy.deploy.backends import backend_for_file, open_backend

    chosen = backend_for_file(path, backend)
    predictor = open_backend(path, chosen, threads=threads)
    return predictor, ModelInfo.from_metadata(stored_metadata(path), getattr(predictor, "input_size", None))


def open_predictor(
    path: str | Path, backend: str | None = None, device: str = "auto", threads: int | None = None
) -> tuple[Predictor, ModelInfo]:
    """A Predictor for a checkpoint, ONNX model or engine, and how to feed it.

    `backend` picks the runtime for an ONNX model (default: ONNX Runtime on the CPU);
    `device` the torch device for a checkpoint. Models with a fixed input size get images
    resized to it and predictions resized back, so the Predictor takes any image size.
    """
    path = Path(path)
    kind = kind_of(path)
    if not path.exists():
        raise ArtifactError(f"model not found: {path}")
    if path.is_dir():
        raise ArtifactError(f"{path} is a directory, not a model file")
    if kind == "checkpoint":
        if backend not in (None, "pytorch"):
            raise BadInput(f"--backend {backend} runs ONNX models and engines; {path} is a checkpoint")
        predictor, info = _open_checkpoint(path, device, threads)
    else:
        predictor, info = _open_deployed(path, backend, threads)
    return FixedSizePredictor(predictor, info.input_size), info
