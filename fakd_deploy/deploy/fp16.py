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
import onnx_graphsurgeon as gs
from onnx import shape_inference, version_converter

from fakd_deploy.deploy.onnx_meta import graph_to_model

FP16_MAX = float(np.finfo(np.float16).max)
QDQ_OPSET = 19
FLOAT16_TYPE = "tensor(float16)"


def _opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _accepts_fp16(node: gs.Node, index: int, opset: int) -> bool:
    """Whether the schema lets input `index` of `node` be float16."""
    domain = node.domain or ""
    if domain not in ("", "ai.onnx"):
        raise ValueError(
            f"cannot convert node {node.name or node.op} of domain '{domain}' to FP16: its types are unknown"
        )
    schema = onnx.defs.get_schema(node.op, opset, domain)
    formal = schema.inputs[min(index, len(schema.inputs) - 1)]
    constraints = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    return FLOAT16_TYPE in constraints.get(formal.type_str, {formal.type_str})


def _uses(tensor: gs.Tensor) -> list[tuple[gs.Node, int]]:
    return [(node, i) for node in tensor.outputs for i, used in enumerate(node.inputs) if used is tensor]


def _half(values: np.ndarray) -> np.ndarray:
    return np.clip(values, -FP16_MAX, FP16_MAX).astype(np.float16)


def _convert_constants(graph: gs.Graph, opset: int) -> None:
    """FP16 for every float initializer, Constant and Cast that feeds an FP16-capable input."""
    for tensor in list(graph.tensors().values()):
        if not (isinstance(tensor, gs.Constant) and tensor.dtype == np.float32):
            continue
        uses = _uses(tensor)
        half = [(node, i) for node, i in uses if _accepts_fp16(node, i, opset)]
        if half and len(half) == len(uses):
            tensor.values = _half(tensor.values)
        elif half:  # used both ways: an FP16 twin for the FP16 inputs
            twin = gs.Constant(f"{tensor.name}_fp16", _half(tensor.values))
            for node, i in half:
                node.inputs[i] = twin
    for node in graph.nodes:
        uses = _uses(node.outputs[0]) if node.outputs else []
        if not uses or not all(_accepts_fp16(user, i, opset) for user, i in uses):
            continue
        value = node.attrs.get("value")
        if node.op == "Constant" and isinstance(value, gs.Constant) and value.dtype == np.float32:
            node.attrs["value"] = gs.Constant(value.name, _half(value.values))
        if node.op == "Cast" and node.attrs.get("to") == onnx.TensorProto.FLOAT:
            node.attrs["to"] = onnx.TensorProto.FLOAT16


def _keep_float_io(graph: gs.Graph) -> None:
    """A Cast to FP16 after each float input and a Cast to FP32 before each float output."""
    for value in graph.inputs:
        if value.dtype == np.float32:
            half = gs.Variable(f"{value.name}_fp16", dtype=np.float16)
            for node, i in _uses(value):
                node.inputs[i] = half
            graph.nodes.insert(
                0, gs.Node("Cast", f"{value.name}_to_fp16", {"to": onnx.TensorProto.FLOAT16}, [value], [half])
            )
    for value in graph.outputs:
        if value.dtype == np.float32 and value.inputs:
            half = gs.Variable(f"{value.name}_fp16", dtype=np.float16)
            producer = value.inputs[0]
            producer.outputs[producer.outputs.index(value)] = half
            for node, i in _uses(value):
                node.inputs[i] = half
            graph.nodes.append(
                gs.Node("Cast", f"{value.name}_to_fp32", {"to": onnx.TensorProto.FLOAT}, [half], [value])
            )


def to_fp16(model: onnx.ModelProto, keep_io_types: bool = True) -> onnx.ModelProto:
    """An FP16 copy of `model`; with `keep_io_types` its float inputs and outputs stay FP32.

    Weights beyond the FP16 range are clipped to +-65504. Raises ValueError for nodes of
    custom domains, whose types cannot be read from a schema.
    """
    source = model
    if (
        any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)
        and _opset(model) < QDQ_OPSET
    ):
        source = version_converter.convert_version(model, QDQ_OPSET)
    graph = gs.import_onnx(source)
    _convert_constants(graph, _opset(source))
    if keep_io_types:
        _keep_float_io(graph)
    else:
        for value in [*graph.inputs, *graph.outputs]:
            if value.dtype == np.float32:
                value.dtype = np.float16
    converted = graph_to_model(graph, source)
    del converted.graph.value_info[:]  # the old types; inferred again below
    return shape_inference.infer_shapes(converted, check_type=True, strict_mode=True)
