"""One way to open any model file: a checkpoint (.pt), an ONNX model (.onnx) or an engine (.engine).

`Artifact.open(path)` reads a file once and checks it: its kind, its metadata, its
precision (the one answer to "is this a Q/DQ model"), the recipe it was made from
(checkpoints store it, ONNX models carry it in their metadata, engines in their sidecar).
The value is passed on, so no later step parses the file again; `ModelInfo` says how to
feed the model. Running it is `deploy.runtime.open_predictor`. Only checkpoints import
torch, so ONNX models and engines open on a device without the training stack.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

from fakd_deploy.data.preprocess import Normalise
from fakd_deploy.errors import ArtifactError, BadInput, RecipeError
from fakd_deploy.inputs import MAX_BATCH, MAX_SIDE, class_names_problem, load_yaml
from fakd_deploy.recipe import IMAGENET_MEAN, IMAGENET_STD, InputMode, Recipe, load_recipe, parse_recipe
from fakd_deploy.suggest import path_hint
from fakd_deploy.utils import file_sha256

CHECKPOINT_SUFFIXES = (".pt", ".pth")
SUFFIXES = (*CHECKPOINT_SUFFIXES, ".onnx", ".engine")
MIN_OPSET = 13  # the oldest opset the quantizer, the FP16 conversion and TensorRT 10 all read
KNOWN_DOMAINS = ("", "ai.onnx", "com.microsoft")  # ONNX itself and ONNX Runtime's contrib ops
MAX_CLASSES = 1024
INPUT_MODES: tuple[str, ...] = get_args(InputMode)
ONNX_FLOAT, ONNX_UINT8 = 1, 2  # onnx.TensorProto.FLOAT and UINT8, without importing onnx here


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


@dataclass(frozen=True)
class Artifact:
    """A model file, read once: what it is, what it carries, what it was made from.

    `metadata` is an ONNX model's `metadata_props`, an engine sidecar's `metadata`, or a
    checkpoint's `arch`, `class_names`, `role`, `variant` and `seed`. `graph` is an ONNX
    model's graph without its weights; `source` the loaded `Checkpoint` or the engine's
    sidecar, so nothing has to read the file again to use it.
    """

    path: Path
    kind: str  # checkpoint | onnx | engine
    metadata: dict[str, Any]
    precision: str  # fp32 | fp16 | int8
    raw_recipe: dict[str, Any] | None
    graph: Any = field(default=None, repr=False, compare=False)
    source: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def open(cls, path: str | Path) -> Artifact:
        """Read and check a model file; one line naming the file when it cannot be used."""
        path = Path(path)
        kind = kind_of(path)
        if path.is_dir():
            raise ArtifactError(f"{path} is a directory, not a model file")
        if not path.exists():
            raise ArtifactError(f"model not found: {path}{path_hint(path)}")
        if kind == "checkpoint":
            return _open_checkpoint(path)
        if kind == "onnx":
            return _open_onnx(path)
        return _open_engine(path)

    @functools.cached_property
    def sha256(self) -> str:
        return file_sha256(self.path)

    @property
    def quantized(self) -> bool:
        return self.precision == "int8"

    @property
    def num_classes(self) -> int | None:
        value = self.metadata.get("num_classes", (self.metadata.get("arch") or {}).get("num_classes"))
        return value if isinstance(value, int) else None

    @property
    def source_sha256(self) -> str | None:
        """The checkpoint an exported model or engine was made from (its metadata says)."""
        value = self.metadata.get("checkpoint_sha256")
        return value if isinstance(value, str) else None

    def recipe(self, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
        """The recipe the artifact was made from, with `key=value` overrides."""
        if not isinstance(self.raw_recipe, dict):
            raise BadInput(
                f"{self.path} carries no recipe: pass --recipe to say which data and preprocessing to use"
            )
        try:
            return parse_recipe(self.raw_recipe, overrides)
        except RecipeError as error:
            if overrides and _parses(self.raw_recipe):
                raise  # an override is at fault, and the message names its key
            raise RecipeError(
                f"{self.path}: its stored recipe cannot be used here ({error}); "
                "pass --recipe to say which data and preprocessing to use"
            ) from None


def _parses(raw: dict[str, Any]) -> bool:
    try:
        parse_recipe(raw)
    except RecipeError:
        return False
    return True


def _open_checkpoint(path: Path) -> Artifact:
    checkpoint = training_stack(path).Checkpoint.load(path)
    metadata = {
        "arch": checkpoint.arch,
        "class_names": checkpoint.class_names,
        "role": checkpoint.role,
        "variant": checkpoint.variant,
        "seed": checkpoint.seed,
    }
    recipe = checkpoint.recipe if isinstance(checkpoint.recipe, dict) else None
    return Artifact(path, "checkpoint", metadata, "fp32", recipe, source=checkpoint)


def _stored_recipe(path: Path, metadata: dict[str, Any]) -> dict[str, Any] | None:
    text = metadata.get("recipe")
    if text is None:
        return None
    raw = load_yaml(text, f"{path}: its stored recipe", ArtifactError) if isinstance(text, str) else None
    if not isinstance(raw, dict):
        raise ArtifactError(f"{path}: its stored recipe is not a mapping of recipe keys")
    return raw


def onnx_precision(model: Any) -> str:
    """int8 for a Q/DQ model, fp16 for one with FP16 weights, fp32 otherwise."""
    from onnx import TensorProto

    if any(node.op_type == "QuantizeLinear" for node in model.graph.node):
        return "int8"
    if any(t.data_type == TensorProto.FLOAT16 for t in model.graph.initializer):
        return "fp16"
    return "fp32"


def input_mode(path: Path, metadata: dict[str, Any]) -> str:
    """The metadata's `input` (float when absent, as every model exported before it)."""
    mode = metadata.get("input", "float")
    if mode not in INPUT_MODES:
        raise ArtifactError(f"{path}: metadata 'input' must be one of {', '.join(INPUT_MODES)}, got {mode!r}")
    return str(mode)


def check_graph(path: Path, model: Any, metadata: dict[str, Any] | None = None) -> None:
    """What every runtime here can read: a known opset, known operator domains, weights
    stored in the model's own folder, one image input of the kind its metadata declares."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or opset < MIN_OPSET:
        raise ArtifactError(
            f"{path} uses ONNX opset {opset}; fakd-deploy reads opset {MIN_OPSET} or newer "
            "(re-export it, or convert it with onnx.version_converter)"
        )
    for node in model.graph.node:
        if node.domain not in KNOWN_DOMAINS:
            raise ArtifactError(
                f"{path}: node '{node.name or node.op_type}' is a {node.op_type} of the custom "
                f"domain '{node.domain}', which no runtime here implements"
            )
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                location = Path(entry.value)
                inside = (path.parent / location).resolve().is_relative_to(path.parent.resolve())
                if location.is_absolute() or not inside:
                    raise ArtifactError(
                        f"{path}: the weights of '{tensor.name}' are stored at '{entry.value}', "
                        "outside the model's folder; external data must sit beside the model"
                    )
    inputs = [
        value for value in model.graph.input if value.name not in {t.name for t in model.graph.initializer}
    ]
    if len(inputs) != 1:
        raise ArtifactError(
            f"{path} has {len(inputs)} inputs; a segmentation model here takes one image batch"
        )
    check_input(path, inputs[0], input_mode(path, metadata or {}))
    if not model.graph.output:
        raise ArtifactError(f"{path} has no outputs; a segmentation model here gives logits or labels")
    output = model.graph.output[0]
    dims = [d.dim_value if d.HasField("dim_value") else None for d in output.type.tensor_type.shape.dim]
    declared = (metadata or {}).get("num_classes")
    if len(dims) == 4 and dims[1] is not None and isinstance(declared, int) and dims[1] != declared:
        raise ArtifactError(
            f"{path}: output '{output.name}' gives {dims[1]} class scores and metadata "
            f"'num_classes' is {declared}; the labels it predicts would name other classes"
        )


def check_input(path: Path, value: Any, mode: str) -> None:
    """The graph input agrees with the input mode its metadata declares, or one line saying how not."""
    tensor = value.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
    uint8 = mode == "uint8"
    expected = "uint8 (N, H, W, 3)" if uint8 else "float32 (N, 3, H, W)"
    channels = dims[3] if uint8 and len(dims) == 4 else dims[1] if len(dims) == 4 else None
    problem = None
    if len(dims) != 4:
        problem = f"has rank {len(dims)}"
    elif tensor.elem_type != (ONNX_UINT8 if uint8 else ONNX_FLOAT):
        problem = f"has element type {_type_name(tensor.elem_type)}"
    elif channels not in (None, 3):
        problem = f"has {channels} channels where the layout puts them"
    if problem:
        raise ArtifactError(
            f"{path}: input '{value.name}' {problem}, but metadata 'input' is {mode!r}, "
            f"which means {expected} images"
        )
    sides = dims[1:3] if uint8 else dims[2:]
    if dims[0] is not None and not 1 <= dims[0] <= MAX_BATCH:
        raise ArtifactError(f"{path}: input '{value.name}' has batch {dims[0]}; 1 to {MAX_BATCH} run here")
    if any(side is not None and not 1 <= side <= MAX_SIDE for side in sides):
        raise ArtifactError(
            f"{path}: input '{value.name}' is {sides[0]} x {sides[1]} pixels; 1 to {MAX_SIDE} a side run here"
        )


def _type_name(elem_type: int) -> str:
    from onnx import TensorProto

    return str(TensorProto.DataType.Name(elem_type)).lower()


def _open_onnx(path: Path) -> Artifact:
    from fakd_deploy.deploy.onnx_meta import load_onnx, model_metadata

    model = load_onnx(path, load_external_data=False)
    metadata = model_metadata(model, path)
    check_graph(path, model, metadata)
    return Artifact(
        path, "onnx", metadata, onnx_precision(model), _stored_recipe(path, metadata), graph=model
    )


def _open_engine(path: Path) -> Artifact:
    from fakd_deploy.deploy.trt import load_sidecar

    sidecar = load_sidecar(path)
    metadata = sidecar.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise ArtifactError(f"{path}: its sidecar's 'metadata' is not a mapping")
    precision = sidecar.get("precision")
    if precision not in ("fp32", "fp16", "int8"):
        raise ArtifactError(f"{path}: its sidecar names no precision (fp32, fp16 or int8): {precision!r}")
    return Artifact(path, "engine", metadata, precision, _stored_recipe(path, metadata), source=sidecar)


def resolve_recipe(
    model: Artifact | str | Path,
    recipe: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> Recipe:
    """`--recipe` when given, else the model's own; `--set` overrides apply either way."""
    if recipe:
        return load_recipe(recipe, overrides)
    artifact = model if isinstance(model, Artifact) else Artifact.open(model)
    return artifact.recipe(overrides)


def recipe_of(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """The recipe stored in a checkpoint, ONNX model or engine, with `key=value` overrides."""
    return Artifact.open(path).recipe(overrides)


def _numbers(path: Path, key: str, value: Any, count: int, positive: bool = False) -> tuple[float, ...]:
    """`count` finite numbers from the metadata field `key` (positive ones if asked)."""
    values = value if isinstance(value, list) else None
    ok = (
        values is not None
        and len(values) == count
        and all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values)
        and (not positive or all(v > 0 for v in values))
    )
    if not ok:
        kind = "positive numbers" if positive else "numbers"
        raise ArtifactError(
            f"{path}: metadata '{key}' must be a list of {count} finite {kind}, got {value!r}"
        )
    return tuple(float(v) for v in values)  # type: ignore[union-attr]  # checked above


@dataclass
class ModelInfo:
    """How to feed a model: normalisation, input mode, fixed input size (if any), its classes.

    `input` is what the model itself takes (`deploy.inputs`); the Predictor `open_predictor`
    returns always takes normalised images, whatever `input` is.
    """

    normalise: Normalise
    input_size: tuple[int, int] | None = None
    num_classes: int | None = None
    class_names: list[str] | None = None
    input: str = "float"

    @classmethod
    def from_metadata(
        cls, meta: dict[str, Any], input_size: tuple[int, int] | None, path: Path = Path("the model")
    ) -> ModelInfo:
        """Read and check the fields a runtime needs; a bad one is named with its file."""
        mean = _numbers(path, "mean", meta.get("mean", list(IMAGENET_MEAN)), 3)
        std = _numbers(path, "std", meta.get("std", list(IMAGENET_STD)), 3, positive=True)
        (scale,) = _numbers(path, "pixel_scale", [meta.get("pixel_scale", 255.0)], 1, positive=True)
        num_classes = meta.get("num_classes")
        if num_classes is not None and not (
            isinstance(num_classes, int)
            and not isinstance(num_classes, bool)
            and 1 <= num_classes <= MAX_CLASSES
        ):
            raise ArtifactError(
                f"{path}: metadata 'num_classes' must be a whole number from 1 to {MAX_CLASSES}, "
                f"got {num_classes!r}"
            )
        names = meta.get("class_names")
        problem = None if names is None else class_names_problem(names)
        if problem:
            raise ArtifactError(f"{path}: metadata 'class_names' {problem}")
        if names is not None and num_classes is not None and len(names) != num_classes:
            raise ArtifactError(
                f"{path}: metadata 'class_names' names {len(names)} classes "
                f"and 'num_classes' is {num_classes}"
            )
        mode = input_mode(path, meta)
        declared = meta.get("input_size")
        if declared is not None and (mode != "float" or input_size is None):
            # the runtime reads (H, W) from an NCHW input; a uint8 model is NHWC
            height, width = _numbers(path, "input_size", declared, 2, positive=True)
            input_size = (int(height), int(width))
        if mode != "float" and input_size is None:
            raise ArtifactError(f"{path}: a model with metadata 'input' {mode!r} needs 'input_size'")
        return cls(Normalise(mean, std, scale), input_size, num_classes, names, mode)
