"""Static INT8 quantization with ONNX Runtime: one QDQ model for ORT and TensorRT alike.

Choices, and why (numbers in docs/deploy.md):
- QDQ format, weights INT8 symmetric per channel (per-tensor scales lose accuracy on
  depthwise and dilated convolutions for no speed gain).
- Two flavours of activations. `symmetric=False` (ONNX Runtime): UINT8 with a zero
  point, which lets ORT fold each ReLU into the quantization range; measured 2x faster
  on x86 than symmetric INT8, where every ReLU stays as a float op between Q/DQ pairs.
  `symmetric=True` (TensorRT): INT8 with zero point 0, the only explicit quantization
  TensorRT accepts; it fuses the ReLUs itself.
- The 1x1 classifier and what follows it (logit upsampling, argmax) stay in float: INT8
  logits would be rounded to 256 levels before the argmax decides between classes.
- No `quant_pre_process`: the exported graph is already folded by onnxslim, and the
  pre-processing changed neither the graph nor the speed while adding seconds.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)

from fakd_deploy.deploy.export import read_metadata, write_metadata
from fakd_deploy.utils import atomic_write, file_sha256

METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}


class _NoPreprocessHint(logging.Filter):
    """Drops ORT's advice to run `quant_pre_process`, which measurably does nothing here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing" not in record.getMessage()


class ImageReader(CalibrationDataReader):
    """Hands ORT's calibrator one input feed at a time."""

    def __init__(self, input_name: str, batches: list[np.ndarray]) -> None:
        self.input_name = input_name
        self.batches = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {self.input_name: batch}


def calibration_feeds(images: Iterable[torch.Tensor], size: tuple[int, int],
                      batch: int | None) -> list[np.ndarray]:
    """Calibration images resized to the model input and grouped to its batch size.

    A static batch larger than the image count is filled by cycling through the images.
    """
    resized = [F.interpolate(x.float(), size, mode="bilinear", align_corners=False)
               if tuple(x.shape[-2:]) != tuple(size) else x.float() for x in images]
    if not resized:
        raise ValueError("INT8 calibration needs at least one image")
    stacked = torch.cat(resized)
    step = batch or 1
    total = -(-stacked.shape[0] // step) * step
    stacked = stacked[torch.arange(total) % stacked.shape[0]]
    return [stacked[i:i + step].numpy() for i in range(0, total, step)]


def tail_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the classifier (the last Conv) and the nodes after it (resize, argmax).

    Excluding the Resize alone is not enough: ORT would still quantize the Conv output.
    """
    producers = {out: node for node in model.graph.node for out in node.output}
    pending = [output.name for output in model.graph.output]
    tail: list[str] = []
    while pending:
        node = producers.get(pending.pop())
        if node is None or node.name in tail:
            continue
        tail.append(node.name)
        if node.op_type != "Conv":
            pending.extend(node.input)
    return tail


def _input_shape(model: onnx.ModelProto) -> tuple[int | None, tuple[int, int]]:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    batch = dims[0].dim_value or None
    return batch, (dims[2].dim_value, dims[3].dim_value)


def _name_nodes(model: onnx.ModelProto) -> None:
    """Exclusion lists refer to node names; give unnamed nodes one."""
    for index, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{index}"


def quantize_int8(onnx_path: str | Path, out: str | Path, calib_images: Iterable[torch.Tensor],
                  method: str = "minmax", symmetric: bool = False,
                  exclude: list[str] | None = None) -> Path:
    """Write a QDQ INT8 copy of an FP32 ONNX model, calibrated on `calib_images`.

    `symmetric=True` gives the INT8/zero-point-0 form TensorRT needs; `exclude` adds node
    names to keep in float beyond the default tail.
    """
    if method not in METHODS:
        raise ValueError(f"calibration method '{method}' is not one of: {', '.join(METHODS)}")
    onnx_path, out = Path(onnx_path), Path(out)
    model = onnx.load(str(onnx_path))
    _name_nodes(model)
    batch, size = _input_shape(model)
    feeds = calibration_feeds(calib_images, size, batch)
    metadata: dict[str, Any] = {
        **read_metadata(onnx_path), "precision": "int8", "calib_method": method,
        "calib_images": sum(len(feed) for feed in feeds), "source_sha256": file_sha256(onnx_path),
        "activations": "int8-symmetric" if symmetric else "uint8-asymmetric"}
    hint = _NoPreprocessHint()

    def write(tmp: Path) -> None:
        logging.getLogger().addFilter(hint)
        try:
            quantize_static(model, tmp, ImageReader(model.graph.input[0].name, feeds),
                            quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
                            weight_type=QuantType.QInt8,
                            nodes_to_exclude=tail_nodes(model) + list(exclude or []),
                            calibrate_method=METHODS[method],
                            extra_options={"ActivationSymmetric": symmetric,
                                           "WeightSymmetric": True})
        finally:
            logging.getLogger().removeFilter(hint)
        quantized = onnx.load(str(tmp))
        write_metadata(quantized, metadata)
        onnx.save_model(quantized, str(tmp))

    return atomic_write(out, write)


def is_quantized(onnx_path: str | Path) -> bool:
    """True for a QDQ model (the form TensorRT builds INT8 engines from)."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    return any(node.op_type == "QuantizeLinear" for node in model.graph.node)
