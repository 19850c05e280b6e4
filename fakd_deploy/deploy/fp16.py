"""Convert an FP32 ONNX model (plain or QDQ) to FP16, keeping FP32 inputs and outputs.

Strongly typed TensorRT (11, and 10 with the flag) runs a network in exactly the types
its graph declares, so an FP16 engine needs an FP16 graph; ONNX Runtime's CUDA provider
likewise runs FP16 kernels only for an FP16 graph. Callers keep feeding FP32 images and
reading FP32 logits: a Cast sits at each float input and output.

Which inputs may become FP16 is read from the ONNX operator schemas, not from a list:
an input whose type constraint allows `tensor(float16)` follows the data, any other float
input (Resize's `scales`, for example) stays FP32. A QDQ model is first moved to opset 19,
the first opset whose QuantizeLinear/DequantizeLinear take FP16 scales, so the
dequantized tensors feed FP16 layers directly.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, shape_inference, version_converter

FP16_MAX = float(np.finfo(np.float16).max)
QDQ_OPSET = 19
FLOAT16_TYPE = "tensor(float16)"


def _opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _accepts_fp16(node: onnx.NodeProto, index: int, opset: int) -> bool:
    """Whether the schema lets input `index` of `node` be float16."""
    if node.domain not in ("", "ai.onnx"):
        raise ValueError(
            f"cannot convert node {node.name or node.op_type} of domain "
            f"'{node.domain}' to FP16: its types are unknown"
        )
    schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
    formal = schema.inputs[min(index, len(schema.inputs) - 1)]
    constraints = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    return FLOAT16_TYPE in constraints.get(formal.type_str, {formal.type_str})


def _float_initializers(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in graph.initializer if t.data_type == TensorProto.FLOAT}


def _to_half(tensor: onnx.TensorProto, name: str) -> onnx.TensorProto:
    values = np.clip(numpy_helper.to_array(tensor), -FP16_MAX, FP16_MAX).astype(np.float16)
    return numpy_helper.from_array(values, name)


def _convert_constants(graph: onnx.GraphProto, opset: int) -> None:
    """FP16 for every float initializer, Constant and Cast that feeds an FP16-capable input."""
    floats = _float_initializers(graph)
    slots: dict[str, set[bool]] = {}
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name:
                slots.setdefault(name, set()).add(_accepts_fp16(node, index, opset))
    for name, tensor in floats.items():
        kinds = slots.get(name, set())
        if kinds == {True}:
            tensor.CopyFrom(_to_half(tensor, name))
        elif kinds == {True, False}:  # used both ways: an FP16 twin for the FP16 inputs
            graph.initializer.append(_to_half(tensor, f"{name}_fp16"))
            for node in graph.node:
                for index, used in enumerate(node.input):
                    if used == name and _accepts_fp16(node, index, opset):
                        node.input[index] = f"{name}_fp16"
    for node in graph.node:
        if not node.output or slots.get(node.output[0], {True}) != {True}:
            continue
        for attribute in node.attribute:
            if (
                node.op_type == "Constant"
                and attribute.name == "value"
                and attribute.t.data_type == TensorProto.FLOAT
            ):
                attribute.t.CopyFrom(_to_half(attribute.t, attribute.t.name))
            if node.op_type == "Cast" and attribute.name == "to" and attribute.i == TensorProto.FLOAT:
                attribute.i = TensorProto.FLOAT16


def _rename_use(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name == old:
                node.input[index] = new


def _keep_float_io(graph: onnx.GraphProto) -> None:
    """A Cast to FP16 after each float input and a Cast to FP32 before each float output."""
    casts_in = []
    for value in graph.input:
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            _rename_use(graph, value.name, f"{value.name}_fp16")
            casts_in.append(
                helper.make_node(
                    "Cast",
                    [value.name],
                    [f"{value.name}_fp16"],
                    name=f"{value.name}_to_fp16",
                    to=TensorProto.FLOAT16,
                )
            )
    for value in graph.output:
        if value.type.tensor_type.elem_type != TensorProto.FLOAT:
            continue
        half = f"{value.name}_fp16"
        for node in graph.node:
            for index, name in enumerate(node.output):
                if name == value.name:
                    node.output[index] = half
        _rename_use(graph, value.name, half)
        graph.node.append(
            helper.make_node("Cast", [half], [value.name], name=f"{value.name}_to_fp32", to=TensorProto.FLOAT)
        )
    for index, cast in enumerate(casts_in):
        graph.node.insert(index, cast)


def to_fp16(model: onnx.ModelProto, keep_io_types: bool = True) -> onnx.ModelProto:
    """An FP16 copy of `model`; with `keep_io_types` its float inputs and outputs stay FP32.

    Weights beyond the FP16 range are clipped to +-65504. Raises ValueError for nodes of
    custom domains, whose types cannot be read from a schema.
    """
    converted = onnx.ModelProto()
    converted.CopyFrom(model)
    if (
        any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in converted.graph.node)
        and _opset(converted) < QDQ_OPSET
    ):
        converted = version_converter.convert_version(converted, QDQ_OPSET)
    graph = converted.graph
    _convert_constants(graph, _opset(converted))
    if keep_io_types:
        _keep_float_io(graph)
    else:
        for value in [*graph.input, *graph.output]:
            if value.type.tensor_type.elem_type == TensorProto.FLOAT:
                value.type.tensor_type.elem_type = TensorProto.FLOAT16
    del graph.value_info[:]
    return shape_inference.infer_shapes(converted, check_type=True, strict_mode=True)
