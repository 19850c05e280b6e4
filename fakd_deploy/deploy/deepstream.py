"""A DeepStream `nvinfer` configuration for semantic segmentation, and the model it needs.

What nvinfer does, from DeepStream's documentation and sources (the facts this module
rests on; none can be run here):

- Preprocessing: every frame is scaled to the network size and turned into float planar
  RGB/BGR as `y = net-scale-factor * (x - offsets[c])` on 0-255 pixels (Gst-nvinfer
  documentation). One scale for all channels: ImageNet's per-channel std cannot be
  expressed, so a `float` model with per-channel std gets the normalisation put inside
  its graph (`pixels` input, net-scale-factor 1, offsets 0), never a config that would
  give wrong masks. Network inputs are bound as FP32 linear tensors
  (nvdsinfer_model_builder.cpp, `configCommonOptions`), so a `uint8` model's Cast and
  Transpose are taken off and it takes float pixels too.
- Segmentation output (`network-type=2`): for each pixel, the class whose output value is
  largest *and* above both -1 and `segmentation-threshold`
  (nvdsinfer_context_impl_output_parsing.cpp, `fillSegmentationOutput`: `max_prob` starts
  at -1). Raw logits below -1 would leave pixels unlabelled, so the model handed to
  nvinfer ends in a Softmax (`probabilities`, NCHW float): its argmax is the logits'
  argmax, and a threshold of 0 keeps every pixel. An argmax model's labels cannot be
  read by that parser, so its ArgMax is taken off first.
- INT8 (`network-mode=1`) needs a calibration table (`int8-calib-file`); without one
  nvinfer falls back to FP16 (nvdsinfer_model_builder.cpp). fakd-deploy's INT8 is a Q/DQ
  model, not a table, so an INT8 choice is configured as FP16 and says so.

`deepstream_model` builds that model from the exported FP32 model; `nvinfer_config`
writes the `[property]` group. Tests check every key against nvinfer's key list and the
formula numerically against the float model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from fakd_deploy.artifacts import ModelInfo
from fakd_deploy.deploy.inputs import add_normalisation, fold_normalisation, graph_input
from fakd_deploy.errors import BadInput

OUTPUT = "probabilities"
NETWORK_MODE = {"fp32": 0, "int8": 1, "fp16": 2}  # nvinfer's network-mode values
EQUAL_STD = 1e-6


@dataclass(frozen=True)
class NvinferInput:
    """nvinfer's preprocessing for a model: `y = scale * (x - offsets[c])`, x in 0-255."""

    scale: float
    offsets: tuple[float, float, float]
    note: str

    def apply(self, pixels: np.ndarray) -> np.ndarray:
        """nvinfer's formula on (N, 3, H, W) pixel values, in float32 as nvinfer computes it."""
        offsets = np.asarray(self.offsets, dtype=np.float32).reshape(1, 3, 1, 1)
        return (np.float32(self.scale) * (pixels.astype(np.float32) - offsets)).astype(np.float32)


def _logits_output(model: onnx.ModelProto) -> str:
    """The name of the logits, made the output of an argmax model (ArgMax and label Casts removed)."""
    argmax = next((node for node in model.graph.node if node.op_type == "ArgMax"), None)
    if argmax is None:
        return str(model.graph.output[0].name)
    logits = argmax.input[0]
    after = {argmax.output[0]}
    removed = [argmax]
    for node in model.graph.node:
        if node.op_type == "Cast" and node.input[0] in after:
            after.add(node.output[0])
            removed.append(node)
    for node in removed:
        model.graph.node.remove(node)
    return str(logits)


def _float_pixel_input(model: onnx.ModelProto) -> None:
    """Take the Cast and Transpose off a `uint8` model: it then takes float (N, 3, H, W) pixels."""
    nodes = {node.name: node for node in model.graph.node}
    cast, transpose = nodes.get("input_cast"), nodes.get("input_nchw")
    if cast is None or transpose is None:
        raise BadInput("the uint8 model has no input_cast/input_nchw nodes: re-export it with fakd-deploy")
    value = graph_input(model)
    n, h, w, c = (d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim)
    for node in model.graph.node:
        for index, used in enumerate(node.input):
            if used == transpose.output[0]:
                node.input[index] = value.name
    model.graph.node.remove(cast)
    model.graph.node.remove(transpose)
    value.CopyFrom(helper.make_tensor_value_info(value.name, TensorProto.FLOAT, [n, c, h, w]))


def deepstream_model(source: onnx.ModelProto, info: ModelInfo) -> tuple[onnx.ModelProto, NvinferInput]:
    """The model nvinfer runs, and the preprocessing it is configured with.

    Float pixels (or normalised floats where one scale expresses the std) in, softmax
    probabilities (N, C, H, W) out.
    """
    model = copy.deepcopy(source)
    logits = _logits_output(model)
    normalise = info.normalise
    ps = normalise.pixel_scale
    if info.input == "float":
        std = np.asarray(normalise.std, dtype=np.float64)
        if np.all(np.abs(std - std[0]) <= EQUAL_STD * std[0]):
            offsets = (ps * normalise.mean[0], ps * normalise.mean[1], ps * normalise.mean[2])
            scale = 1.0 / (ps * float(std[0]))
            prep = NvinferInput(scale, offsets, "the model takes normalised images: nvinfer normalises")
        else:
            add_normalisation(model, normalise, "pixels")
            folded = fold_normalisation(model)
            note = (
                "per-channel std cannot be expressed by net-scale-factor, so the normalisation "
                f"is inside this model ({folded})"
            )
            prep = NvinferInput(1.0, (0.0, 0.0, 0.0), note)
    else:
        if info.input == "uint8":
            _float_pixel_input(model)
        prep = NvinferInput(1.0, (0.0, 0.0, 0.0), "the model normalises inside: nvinfer passes pixels")
    model.graph.node.append(helper.make_node("Softmax", [logits], [OUTPUT], name="probabilities", axis=1))
    batch = graph_input(model).type.tensor_type.shape.dim[0]
    height, width = info.input_size or (0, 0)
    shape = [batch.dim_param or batch.dim_value, info.num_classes or 0, height, width]
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, shape))
    onnx.checker.check_model(model)
    return model, prep


@dataclass(frozen=True)
class NvinferSettings:
    """What the `[property]` group says about one model."""

    onnx_file: str
    batch: int
    precision: str
    num_classes: int
    input_size: tuple[int, int]
    labels: str
    prep: NvinferInput


def engine_name(onnx_file: str, batch: int, precision: str) -> str:
    """The engine file nvinfer writes after building one (`<onnx>_b<batch>_gpu0_<mode>.engine`,
    nvdsinfer_model_builder.cpp), so the next start loads it instead of rebuilding."""
    return f"{onnx_file}_b{batch}_gpu0_{precision}.engine"


def nvinfer_config(settings: NvinferSettings) -> str:
    """The nvinfer configuration file (GKeyFile `[property]` group)."""
    precision = "fp16" if settings.precision == "int8" else settings.precision
    height, width = settings.input_size
    prep = settings.prep
    comments = [
        "# nvinfer configuration for semantic segmentation, written by fakd-deploy package.",
        f"# Preprocessing: y = net-scale-factor * (x - offsets); {prep.note}.",
        f"# Output: softmax '{OUTPUT}' (N, C, H, W); segmentation-threshold 0 labels every pixel.",
    ]
    if settings.precision == "int8":
        comments.append(
            "# INT8 in nvinfer needs an int8-calib-file; this model's INT8 is Q/DQ (see README), "
            "so nvinfer runs FP16."
        )
    properties = {
        "gpu-id": "0",
        "net-scale-factor": repr(prep.scale),
        "offsets": ";".join(repr(o) for o in prep.offsets),
        "model-color-format": "0",
        "onnx-file": settings.onnx_file,
        "model-engine-file": engine_name(settings.onnx_file, settings.batch, precision),
        "labelfile-path": settings.labels,
        "batch-size": str(settings.batch),
        "network-mode": str(NETWORK_MODE[precision]),
        "network-type": "2",
        "num-detected-classes": str(settings.num_classes),
        "segmentation-threshold": "0.0",
        "segmentation-output-order": "0",
        "output-blob-names": OUTPUT,
        "infer-dims": f"3;{height};{width}",
        "network-input-order": "0",
        "maintain-aspect-ratio": "0",
        "scaling-filter": "1",
        "process-mode": "1",
        "gie-unique-id": "1",
        "interval": "0",
    }
    body = "\n".join(f"{key}={value}" for key, value in properties.items())
    return "\n".join(comments) + "\n[property]\n" + body + "\n"
