"""Static INT8 quantization with ONNX Runtime's quantizer: one flavour per runtime.

Both write QDQ models calibrated on training images, with INT8 weights scaled per output
channel (per-tensor weight scales lose accuracy on depthwise and dilated convolutions for
no speed gain). The 1x1 classifier and what follows it (logit upsampling, argmax) stay in
float: INT8 logits would be rounded to 256 levels before the argmax picks a class.

- `quantize_ort_int8` (`X.int8.onnx`, backend ort-cpu-int8): UINT8 activations with a zero
  point. ONNX Runtime then folds each ReLU into the quantization range; measured 2x faster
  on x86 than symmetric INT8, where every ReLU stays a float op between Q/DQ pairs.
  TensorRT cannot use this model (see `qdq.check_tensorrt_qdq`).
- `quantize_tensorrt_int8` (`X.qdq.onnx`, backends trt-int8 and ort-trt-int8): the form
  TensorRT's explicit quantization takes, placed by NVIDIA Model Optimizer's rules
  (`qdq.tensorrt_placement`) and made with the options Model Optimizer passes to this same
  quantizer (modelopt/onnx/quantization/ort_utils.py `configure_ort`): symmetric INT8, zero
  point 0, `QuantizeBias: False` (onnx-tensorrt rejects a DequantizeLinear of an INT32
  bias), Q/DQ on inputs and never on outputs, per-channel weights on the output-channel
  axis. Residual Adds keep a Q/DQ on the skip input only, so TensorRT can fuse the Add into
  the Conv; Concat inputs that are quantized share a scale. `deploy.quantizer: modelopt`
  runs Model Optimizer itself instead (`modelopt_int8.py`), where it is installed.

No `quant_pre_process`: the exported graph is already folded by onnxslim, and the
pre-processing changed neither the graph nor the speed while adding seconds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)

from fakd_deploy.artifacts import ModelInfo
from fakd_deploy.data.preprocess import resize_bilinear
from fakd_deploy.deploy.inputs import input_geometry, model_input
from fakd_deploy.deploy.onnx_meta import load_onnx, model_metadata, write_metadata
from fakd_deploy.deploy.qdq import drop_input_qdq, share_concat_scales, tensorrt_placement
from fakd_deploy.deploy.qdq_rules import check_tensorrt_qdq, fusion_advice
from fakd_deploy.errors import BadInput, BuildError
from fakd_deploy.utils import SCRATCH, atomic_write, file_sha256, temporary_files_in

log = logging.getLogger(__name__)

METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}


# ORT advises `quant_pre_process` unless a model carries this tag. The exported graph is
# already folded (exporter + onnxslim) and pre-processing measurably changed nothing, so the
# copy being quantized is tagged for the call and the tag is dropped from the result.
PRE_PROCESSED = "onnx.quant.pre_process"


class ImageReader(CalibrationDataReader):
    """Hands ORT's calibrator one input feed at a time."""

    def __init__(self, input_name: str, batches: list[np.ndarray]) -> None:
        self.input_name = input_name
        self.batches = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {self.input_name: batch}


def calibration_feeds(images: Iterable[Any], size: tuple[int, int], batch: int | None) -> list[np.ndarray]:
    """Calibration images resized to the model input and grouped to its batch size.

    Each item is a (N, 3, H, W) float array (or anything `np.asarray` takes). A static
    batch larger than the image count is filled by cycling through the images.
    """
    resized = [resize_bilinear(np.asarray(x, dtype=np.float32), size).astype(np.float32) for x in images]
    if not resized:
        raise BadInput("INT8 calibration needs at least one image")
    stacked = np.concatenate(resized)
    step = batch or 1
    total = -(-stacked.shape[0] // step) * step
    stacked = stacked[np.arange(total) % stacked.shape[0]]
    return [np.ascontiguousarray(stacked[i : i + step]) for i in range(0, total, step)]


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


def _name_nodes(model: onnx.ModelProto) -> None:
    """Exclusion lists refer to node names; give unnamed nodes one."""
    for index, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{index}"


def _quantize(
    onnx_path: Path,
    out: Path,
    calib_images: Iterable[Any],
    method: str,
    flavour: str,
    options: dict[str, Any],
    finish: Callable[[onnx.ModelProto], onnx.ModelProto] | None = None,
) -> Path:
    """Calibrate, quantize, post-process (`finish(model)`) and annotate; the file appears whole."""
    if method not in METHODS:
        raise BadInput(f"calibration method '{method}' is not one of: {', '.join(METHODS)}")
    model = load_onnx(onnx_path)
    _name_nodes(model)
    batch, size = input_geometry(model)
    info = ModelInfo.from_metadata(model_metadata(model), size, onnx_path)
    feeds = [
        model_input(feed, info.input, info.normalise) for feed in calibration_feeds(calib_images, size, batch)
    ]
    metadata: dict[str, Any] = {
        **model_metadata(model),
        "precision": "int8",
        "calib_method": method,
        "calib_images": sum(len(feed) for feed in feeds),
        "source_sha256": file_sha256(onnx_path),
        "activations": flavour,
    }
    onnx.helper.set_model_props(
        model, {**{p.key: p.value for p in model.metadata_props}, PRE_PROCESSED: "onnxruntime.quant"}
    )

    def write(tmp: Path) -> None:
        with temporary_files_in(out.parent / SCRATCH):  # ORT's calibration files, kept with the run
            quantize_static(
                model,
                tmp,
                ImageReader(model.graph.input[0].name, feeds),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                weight_type=QuantType.QInt8,
                calibrate_method=METHODS[method],
                **options,
            )
        quantized = onnx.load(str(tmp))
        kept = [p for p in quantized.metadata_props if p.key != PRE_PROCESSED]
        del quantized.metadata_props[:]
        quantized.metadata_props.extend(kept)
        if finish is not None:
            quantized = finish(quantized)
        write_metadata(quantized, metadata)
        onnx.save_model(quantized, str(tmp))

    return atomic_write(out, write)


def quantize_ort_int8(
    onnx_path: str | Path,
    out: str | Path,
    calib_images: Iterable[Any],
    method: str = "minmax",
    exclude: list[str] | None = None,
) -> Path:
    """UINT8-activation QDQ model for ONNX Runtime on CPU (`X.int8.onnx`)."""
    model = load_onnx(onnx_path, load_external_data=False)
    _name_nodes(model)
    options = {
        "activation_type": QuantType.QUInt8,
        "nodes_to_exclude": tail_nodes(model) + list(exclude or []),
        "extra_options": {"ActivationSymmetric": False, "WeightSymmetric": True},
    }
    return _quantize(Path(onnx_path), Path(out), calib_images, method, "uint8-asymmetric", options)


def check_for_tensorrt(model: onnx.ModelProto) -> onnx.ModelProto:
    """`BuildError` when the model breaks a TensorRT rule; placements TensorRT cannot fuse are logged."""
    problems = check_tensorrt_qdq(model)
    if problems:
        raise BuildError(
            f"the INT8 model for TensorRT breaks {len(problems)} rule(s): " + "; ".join(problems)
        )
    for advice in fusion_advice(model):
        log.warning("%s", advice)
    return model


def quantize_tensorrt_int8(
    onnx_path: str | Path,
    out: str | Path,
    calib_images: Iterable[Any],
    method: str = "minmax",
    exclude: list[str] | None = None,
) -> Path:
    """TensorRT-conformant INT8 QDQ model (`X.qdq.onnx`); `BuildError` if a TensorRT rule fails."""
    model = load_onnx(onnx_path, load_external_data=False)
    _name_nodes(model)
    nodes, keep_float = tensorrt_placement(model)
    nodes = [name for name in nodes if name not in set(exclude or [])]
    if not nodes:
        raise BuildError(
            f"no layer of {onnx_path} gets INT8 by TensorRT's placement rules (convolutions with "
            "fewer than 16 channels have no fast INT8 kernel); an INT8 engine would run it in FP16: "
            "build trt-fp16 instead"
        )
    by_name = {node.name: node.op_type for node in model.graph.node}
    options = {
        "activation_type": QuantType.QInt8,
        "op_types_to_quantize": sorted({by_name[name] for name in nodes}),
        "nodes_to_quantize": nodes,
        "extra_options": {
            "ActivationSymmetric": True,
            "WeightSymmetric": True,
            "QuantizeBias": False,
            "AddQDQPairToWeight": True,
            "DedicatedQDQPair": False,
            "ForceQuantizeNoInputCheck": True,
            "OpTypesToExcludeOutputQuantization": sorted(set(by_name.values())),
            "QDQOpTypePerChannelSupportToAxis": {"Conv": 0, "ConvTranspose": 1},
        },
    }

    def finish(quantized: onnx.ModelProto) -> onnx.ModelProto:
        return check_for_tensorrt(share_concat_scales(drop_input_qdq(quantized, keep_float)))

    return _quantize(Path(onnx_path), Path(out), calib_images, method, "int8-symmetric", options, finish)
