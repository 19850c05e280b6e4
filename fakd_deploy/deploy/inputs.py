"""What a model takes as input, and the one conversion to it from normalised images.

An exported model takes one of three inputs (`deploy.export.input`, recorded in its
metadata as `input`):

| mode | input | normalisation |
|---|---|---|
| `float` | float32 (N, 3, H, W), normalised: `(x / pixel_scale - mean) / std` | outside the graph |
| `pixels` | float32 (N, 3, H, W), RGB pixel values 0-255 | inside the graph |
| `uint8` | uint8 (N, H, W, 3), RGB, as cameras and decoders deliver it | inside: Cast, Transpose, normalise |

Every caller in fakd-deploy keeps the Predictor contract (normalised float images);
`PixelFeed` turns them back into pixels for a `pixels` or `uint8` model, here and
nowhere else. Pixel values recovered from normalised images are snapped to whole numbers
where they are within `SNAP` of one (the float error of normalising and undoing it), so
an 8-bit image reaches the model exactly as a camera would deliver it.

Inside the graph the normalisation is `(x - pixel_scale * mean) * (1 / (pixel_scale *
std))`. `fold_normalisation` moves the multiplication into the weights of the first
convolution (exact: a per-input-channel scale). The subtraction folds into its bias only
when that convolution pads nothing: with zero padding, a border pixel of the normalised
image is 0, i.e. the mean colour, and a folded bias would treat it as black. So a padded
first convolution keeps one Sub in front of it, costing one elementwise op.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fakd_deploy.data.preprocess import Normalise
from fakd_deploy.predictor import FixedSizePredictor, Predictor

MODES = ("float", "pixels", "uint8")
LABEL_TYPES = {"int32": TensorProto.INT32, "uint8": TensorProto.UINT8}
SNAP = 1e-3


def pixels_from_normalised(images: np.ndarray, normalise: Normalise) -> np.ndarray:
    """(N, 3, H, W) normalised images as float32 pixel values, whole where they were whole."""
    std = np.asarray(normalise.std, dtype=np.float64).reshape(1, 3, 1, 1)
    mean = np.asarray(normalise.mean, dtype=np.float64).reshape(1, 3, 1, 1)
    pixels = (np.asarray(images, dtype=np.float64) * std + mean) * normalise.pixel_scale
    whole = np.rint(pixels)
    return np.where(np.abs(pixels - whole) < SNAP, whole, pixels).astype(np.float32)


def layout(pixels: np.ndarray, mode: str) -> np.ndarray:
    """Pixel values (N, 3, H, W) as the model takes them: float32, or uint8 (N, H, W, 3)."""
    if mode == "uint8":
        return np.ascontiguousarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1))
    return np.ascontiguousarray(pixels, dtype=np.float32)


def model_input(images: np.ndarray, mode: str, normalise: Normalise) -> np.ndarray:
    """Normalised (N, 3, H, W) images as a model of input `mode` takes them."""
    if mode == "float":
        return np.ascontiguousarray(images, dtype=np.float32)
    return layout(pixels_from_normalised(images, normalise), mode)


class _Layout:
    """Pixel values (N, 3, H, W) in, the model's own layout and type to `predictor`."""

    def __init__(self, predictor: Predictor, mode: str) -> None:
        self.predictor, self.mode = predictor, mode

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return self.predictor(layout(pixels, self.mode))


class PixelFeed:
    """A `pixels` or `uint8` model as a Predictor of normalised images.

    Images are turned into pixel values first, then resized to the model's fixed size (if
    any) in pixel space, as a camera pipeline or the bundle's `infer.py` would do it.
    """

    def __init__(
        self, predictor: Predictor, mode: str, normalise: Normalise, size: tuple[int, int] | None
    ) -> None:
        self.predictor = predictor  # the runtime, for GPU timing
        self.normalise = normalise
        self.fitted = FixedSizePredictor(_Layout(predictor, mode), size)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.fitted(pixels_from_normalised(images, self.normalise))


def feed(predictor: Predictor, mode: str, normalise: Normalise, size: tuple[int, int] | None) -> Predictor:
    """A Predictor of normalised images, whatever the model takes, resized to its fixed size."""
    if mode == "float":
        return FixedSizePredictor(predictor, size)
    return PixelFeed(predictor, mode, normalise, size)


@dataclass(frozen=True)
class InputSpec:
    """The graph input a mode gives: element type and layout."""

    elem_type: int
    channels_last: bool

    @classmethod
    def of(cls, mode: str) -> InputSpec:
        return cls(TensorProto.UINT8, True) if mode == "uint8" else cls(TensorProto.FLOAT, False)

    def describe(self) -> str:
        kind = "uint8" if self.elem_type == TensorProto.UINT8 else "float32"
        return f"{kind} {'(N, H, W, 3)' if self.channels_last else '(N, 3, H, W)'}"


def graph_input(model: onnx.ModelProto) -> onnx.ValueInfoProto:
    initializers = {t.name for t in model.graph.initializer}
    return next(v for v in model.graph.input if v.name not in initializers)


def input_geometry(model: onnx.ModelProto) -> tuple[int | None, tuple[int, int]]:
    """Static batch (None when dynamic) and (H, W) of a model's image input, either layout."""
    value = graph_input(model)
    dims = [d.dim_value or None for d in value.type.tensor_type.shape.dim]
    channels_last = value.type.tensor_type.elem_type == TensorProto.UINT8
    height, width = (dims[1], dims[2]) if channels_last else (dims[2], dims[3])
    return dims[0], (int(height or 0), int(width or 0))


def _const(name: str, values: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(values.astype(np.float32).reshape(1, 3, 1, 1), name)


def add_normalisation(model: onnx.ModelProto, normalise: Normalise, mode: str) -> None:
    """Make a `float` model take `mode` input: Cast/Transpose (uint8), Sub and Mul in front."""
    if mode == "float":
        return
    value = graph_input(model)
    name = value.name
    inner = f"{name}_normalised"
    for node in model.graph.node:
        for index, used in enumerate(node.input):
            if used == name:
                node.input[index] = inner
    scale = normalise.pixel_scale
    mean = np.asarray(normalise.mean, dtype=np.float64) * scale
    factor = 1.0 / (np.asarray(normalise.std, dtype=np.float64) * scale)
    nodes = []
    source = name
    if mode == "uint8":
        nodes += [
            helper.make_node("Cast", [name], [f"{name}_float"], name="input_cast", to=TensorProto.FLOAT),
            helper.make_node(
                "Transpose", [f"{name}_float"], [f"{name}_nchw"], name="input_nchw", perm=[0, 3, 1, 2]
            ),
        ]
        source = f"{name}_nchw"
    nodes += [
        helper.make_node("Sub", [source, "input_mean"], [f"{name}_centred"], name="input_mean_sub"),
        helper.make_node("Mul", [f"{name}_centred", "input_scale"], [inner], name="input_scale_mul"),
    ]
    model.graph.initializer.extend([_const("input_mean", mean), _const("input_scale", factor)])
    for node in reversed(nodes):
        model.graph.node.insert(0, node)
    if mode == "uint8":
        n, c, h, w = (d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim)
        value.CopyFrom(helper.make_tensor_value_info(name, TensorProto.UINT8, [n, h, w, c]))


def _consumers(model: onnx.ModelProto, name: str) -> list[onnx.NodeProto]:
    return [node for node in model.graph.node if name in node.input]


def _attribute(node: onnx.NodeProto, key: str, default: Any) -> Any:
    for attribute in node.attribute:
        if attribute.name == key:
            return helper.get_attribute_value(attribute)
    return default


def _pads_nothing(node: onnx.NodeProto) -> bool:
    auto_pad = _attribute(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    return auto_pad == "VALID" or (auto_pad == "NOTSET" and not any(_attribute(node, "pads", [])))


def fold_normalisation(model: onnx.ModelProto) -> str:
    """Fold the input Mul (and, where exact, the Sub) into the first convolution(s).

    Returns one line saying what was folded, or why not.
    """
    nodes = {node.name: node for node in model.graph.node}
    mul, sub = nodes.get("input_scale_mul"), nodes.get("input_mean_sub")
    if mul is None or sub is None:
        return "no normalisation in the graph (input float)"
    weights = {t.name: t for t in model.graph.initializer}
    convs = _consumers(model, mul.output[0])
    foldable = all(
        conv.op_type == "Conv"
        and conv.input[0] == mul.output[0]
        and conv.input[1] in weights
        and _attribute(conv, "group", 1) == 1
        for conv in convs
    )
    if not convs or not foldable:
        kinds = ", ".join(sorted({c.op_type for c in convs})) or "nothing"
        return f"not folded: the normalised input feeds {kinds}, not only ungrouped convolutions"
    scale = numpy_helper.to_array(weights["input_scale"]).reshape(-1)
    mean = numpy_helper.to_array(weights["input_mean"]).reshape(-1)
    fold_mean = all(_pads_nothing(conv) for conv in convs)
    for index, conv in enumerate(convs):
        kernel = numpy_helper.to_array(weights[conv.input[1]]).astype(np.float64)
        kernel = kernel * scale.reshape(1, -1, *([1] * (kernel.ndim - 2)))
        kernel_name = f"{conv.input[1]}_input_scaled_{index}"
        model.graph.initializer.append(numpy_helper.from_array(kernel.astype(np.float32), kernel_name))
        conv.input[1] = kernel_name
        conv.input[0] = sub.input[0] if fold_mean else sub.output[0]
        if fold_mean:
            shift = (kernel * mean.reshape(1, -1, *([1] * (kernel.ndim - 2)))).sum(
                axis=tuple(range(1, kernel.ndim))
            )
            old = numpy_helper.to_array(weights[conv.input[2]]) if len(conv.input) > 2 else 0.0
            bias_name = f"{conv.name or 'conv'}_bias_input_centred_{index}"
            bias = (np.asarray(old, dtype=np.float64) - shift).astype(np.float32)
            model.graph.initializer.append(numpy_helper.from_array(bias, bias_name))
            if len(conv.input) > 2:
                conv.input[2] = bias_name
            else:
                conv.input.append(bias_name)
    model.graph.node.remove(mul)
    if fold_mean:
        model.graph.node.remove(sub)
    _drop_unused_initializers(model)
    names = ", ".join(conv.name or conv.output[0] for conv in convs)
    if fold_mean:
        return f"folded into the first convolution ({names}): no Sub or Mul left"
    return (
        f"scale folded into the first convolution ({names}); the mean stays one Sub in front of it "
        "(the convolution pads with zeros, which a folded bias would not reproduce at the border)"
    )


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {name for node in model.graph.node for name in node.input}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def cast_labels(model: onnx.ModelProto, labels: str) -> None:
    """Give an argmax model's label output `labels` type (int32 or uint8) instead of int64.

    uint8 goes through float: TensorRT converts to uint8 only from float32/float16
    (`tensorrt.DataType.UINT8`), exact for class ids below 256.
    """
    output = model.graph.output[0]
    if output.type.tensor_type.elem_type != TensorProto.INT64:
        return
    name = output.name
    raw = f"{name}_int64"
    for node in model.graph.node:
        for index, used in enumerate(node.output):
            if used == name:
                node.output[index] = raw
    steps = [(TensorProto.FLOAT, f"{name}_float")] if labels == "uint8" else []
    steps.append((LABEL_TYPES[labels], name))
    source = raw
    for index, (to, target) in enumerate(steps):
        model.graph.node.append(
            helper.make_node("Cast", [source], [target], name=f"labels_cast_{index}", to=to)
        )
        source = target
    output.type.tensor_type.elem_type = LABEL_TYPES[labels]
