"""TensorRT's rules for explicitly quantized (Q/DQ) ONNX models, and the graph edits that meet them.

`check_tensorrt_qdq` lists what TensorRT's ONNX parser rejects or would run differently
from the ONNX semantics; `fusion_advice` lists placements TensorRT accepts but cannot
fuse into INT8 kernels (slower, not wrong). Every INT8 model built for TensorRT is
checked before any GPU is touched: an error is a `BuildError`, advice is printed.

Sources: TensorRT developer guide, "Working with Quantized Types" (explicit
quantization, Q/DQ layer-placement recommendations); the TensorRT operator reference
for Quantize/Dequantize ("the scale tensor must be a build-time constant", "zero_point
must only contain zero-valued coefficients"); onnx-tensorrt's `QuantDequantLinearHelper`
in onnxOpImporters.cpp (UINT8 refused, "Scale coefficients must all be positive",
"Activations-quantization does not support per-axis quantization", the number of scales
equal to the output channels); NVIDIA Model Optimizer's ONNX PTQ for TensorRT
(modelopt/onnx/quantization/ort_utils.py `configure_ort`: `QuantizeBias: False`, inputs
quantized, outputs not; graph_utils.py `build_non_residual_input_map`: the residual
input of an Add is quantized, the convolution's own output is not).

| rule | level | what it refuses |
|---|---|---|
| `int8` | error | a quantized type other than INT8 (UINT8, INT32 bias, INT16...) |
| `zero-point` | error | a zero point that is missing (ONNX then means UINT8) or not all zeros |
| `scale` | error | a scale that is not a constant, or not finite and positive |
| `per-tensor-activation` | error | more than one scale on an activation |
| `weight-axis` | error | per-channel weight scales on another axis than the output channels |
| `unpaired` | error | a QuantizeLinear whose output reaches anything but DequantizeLinear |
| `float-output` | error | a graph output produced by QuantizeLinear or DequantizeLinear |
| `residual-add` | perf | a residual Add whose skip input is float: the Add cannot fuse into the Conv |
| `concat-scales` | perf | Concat inputs quantized with different scales: requantization |
| `partial` | perf | a Conv/Gemm/MatMul with some inputs quantized and others float |
"""

from __future__ import annotations

from collections import deque
from typing import TypeGuard

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")
QDQ = ("QuantizeLinear", "DequantizeLinear")


class Graph:
    """Producers, consumers and constants of a model, looked up by tensor name."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.nodes = list(model.graph.node)
        self.producer = {out: node for node in self.nodes for out in node.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.nodes:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.constants = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        for node in self.nodes:
            if node.op_type == "Constant":
                value = next((a.t for a in node.attribute if a.name == "value"), None)
                if value is not None:
                    self.constants[node.output[0]] = numpy_helper.to_array(value)
        self.outputs = {output.name for output in model.graph.output}

    def constant(self, name: str) -> np.ndarray | None:
        return self.constants.get(name)

    def input_of(self, name: str, op_type: str) -> onnx.NodeProto | None:
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type else None


def _all_found(nodes: list[onnx.NodeProto | None]) -> TypeGuard[list[onnx.NodeProto]]:
    """Whether every `Graph.input_of` lookup found its node (it gives None where not)."""
    return all(nodes)


def _label(node: onnx.NodeProto) -> str:
    return f"{node.op_type} '{node.name or node.output[0]}'"


def _axis(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 1)


def _quantized_dtype(graph: Graph, node: onnx.NodeProto) -> np.dtype | None:
    """The integer type a Q produces or a DQ reads, from its zero point (None: none given)."""
    zero_point = graph.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if zero_point is not None:
        return zero_point.dtype
    if node.op_type == "DequantizeLinear":
        data = graph.constant(node.input[0])
        return data.dtype if data is not None else None
    output_dtype = next((a.i for a in node.attribute if a.name == "output_dtype"), 0)
    return onnx.helper.tensor_dtype_to_np_dtype(output_dtype) if output_dtype else None


def _check_types(graph: Graph, node: onnx.NodeProto) -> list[str]:
    label = _label(node)
    data = graph.constant(node.input[0]) if node.op_type == "DequantizeLinear" else None
    if data is not None and data.dtype == np.int32:
        return [
            f"int8: {label} dequantizes an INT32 tensor '{node.input[0]}' (a quantized bias); "
            "TensorRT accepts only activation types there: keep biases in float "
            "(QuantizeBias=False)"
        ]
    dtype = _quantized_dtype(graph, node)
    if dtype is None:
        return [
            f"zero-point: {label} has no zero point, which ONNX reads as UINT8 while TensorRT "
            "computes INT8: give an INT8 zero point of 0"
        ]
    if dtype != np.int8:
        return [
            f"int8: {label} quantizes to {dtype.name.upper()}; TensorRT's explicit "
            "quantization takes INT8 (symmetric, zero point 0), not the UINT8 form made for "
            "ONNX Runtime on CPU"
        ]
    zero_point = graph.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if zero_point is not None and zero_point.any():
        return [
            f"zero-point: {label} has a non-zero zero point; TensorRT supports symmetric "
            "quantization only (zero point 0)"
        ]
    return []


def _weight_axis(consumer: onnx.NodeProto, index: int, rank: int) -> int | None:
    """The output-channel axis of the weight at input `index` of `consumer` (None: not a weight)."""
    if consumer.op_type in ("Conv", "ConvTranspose") and index == 1:
        return 0 if consumer.op_type == "Conv" else 1
    if consumer.op_type == "Gemm" and index == 1:
        trans_b = next((a.i for a in consumer.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    if consumer.op_type == "MatMul" and index == 1:
        return rank - 1
    return None


def _check_scale(graph: Graph, node: onnx.NodeProto) -> list[str]:
    label = _label(node)
    scale = graph.constant(node.input[1])
    if scale is None:
        return [
            f"scale: {label} takes its scale from a computed tensor; TensorRT needs a build-time constant"
        ]
    if not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
        return [f"scale: {label} has a scale that is not finite and positive (min {float(np.min(scale)):g})"]
    if scale.size == 1:
        return []
    data_name = node.input[0] if node.op_type == "QuantizeLinear" else _dequantized_source(graph, node)
    weight = graph.constant(data_name) if data_name else None
    if weight is None:
        return [
            f"per-tensor-activation: {label} has {scale.size} scales on an activation; "
            "TensorRT quantizes activations per tensor"
        ]
    axis = _axis(node) % weight.ndim
    problems = []
    for consumer, index in _weight_uses(graph, node):
        expected = _weight_axis(consumer, index, weight.ndim)
        if expected is not None and axis != expected:
            problems.append(
                f"weight-axis: {label} scales weight '{data_name}' of {_label(consumer)} "
                f"per channel on axis {axis}; TensorRT wants the output-channel axis "
                f"{expected}"
            )
    if weight.shape[axis] != scale.size:
        problems.append(
            f"scale: {label} has {scale.size} scales for {weight.shape[axis]} channels on axis {axis}"
        )
    return problems


def _dequantized_source(graph: Graph, dq: onnx.NodeProto) -> str | None:
    """The float or integer constant a DQ ultimately reads: its own input, or its Q's input."""
    if graph.constant(dq.input[0]) is not None:
        return dq.input[0]
    q = graph.input_of(dq.input[0], "QuantizeLinear")
    return q.input[0] if q is not None else None


def _weight_uses(graph: Graph, node: onnx.NodeProto) -> list[tuple[onnx.NodeProto, int]]:
    """(consumer, input index) pairs that take the dequantized tensor of a Q or DQ node."""
    dqs = (
        [node]
        if node.op_type == "DequantizeLinear"
        else [c for c in graph.consumers.get(node.output[0], []) if c.op_type == "DequantizeLinear"]
    )
    return [
        (consumer, index)
        for dq in dqs
        for consumer in graph.consumers.get(dq.output[0], [])
        for index, name in enumerate(consumer.input)
        if name == dq.output[0]
    ]


def _check_pairing(graph: Graph, node: onnx.NodeProto) -> list[str]:
    label = _label(node)
    if node.output[0] in graph.outputs:
        return [
            f"float-output: {label} produces the graph output '{node.output[0]}'; leave the "
            "network output unquantized"
        ]
    if node.op_type == "QuantizeLinear":
        others = [c for c in graph.consumers.get(node.output[0], []) if c.op_type != "DequantizeLinear"]
        if others or not graph.consumers.get(node.output[0]):
            return [
                f"unpaired: {label} feeds {', '.join(_label(c) for c in others) or 'nothing'}; "
                "every QuantizeLinear must be followed by DequantizeLinear"
            ]
    elif graph.constant(node.input[0]) is None and graph.input_of(node.input[0], "QuantizeLinear") is None:
        return [
            f"unpaired: {label} reads '{node.input[0]}', which is neither a QuantizeLinear output "
            "nor a constant"
        ]
    return []


def check_tensorrt_qdq(model: onnx.ModelProto) -> list[str]:
    """One line per rule TensorRT's parser or builder enforces and `model` breaks (empty: fine)."""
    graph = Graph(model)
    problems: list[str] = []
    for node in graph.nodes:
        if node.op_type in QDQ:
            found = _check_types(graph, node)
            problems += found or _check_scale(graph, node)
            problems += _check_pairing(graph, node)
    return problems


def _ancestors(graph: Graph, name: str) -> dict[str, int]:
    """Distance (in nodes) from tensor `name` up to every node that produced one of its ancestors."""
    distance: dict[str, int] = {}
    queue = deque([(name, 0)])
    while queue:
        tensor, depth = queue.popleft()
        node = graph.producer.get(tensor)
        if node is None or node.name in distance:
            continue
        distance[node.name] = depth
        queue.extend((parent, depth + 1) for parent in node.input if parent)
    return distance


def _float_source(graph: Graph, name: str) -> str:
    """The float tensor behind a Q/DQ pair, or `name` itself."""
    dq = graph.input_of(name, "DequantizeLinear")
    q = graph.input_of(dq.input[0], "QuantizeLinear") if dq is not None else None
    return q.input[0] if q is not None else name


def residual_main_inputs(model: onnx.ModelProto) -> dict[str, int]:
    """For each residual Add, the index of its main-branch input (the Conv it can fuse into).

    An Add of two computed tensors where at least one comes straight from a Conv. When
    both do (a downsampling shortcut), the main branch is the longer path from their
    lowest common ancestor, as in NVIDIA Model Optimizer's `build_non_residual_input_map`.
    """
    graph = Graph(model)
    mains: dict[str, int] = {}
    for node in graph.nodes:
        if node.op_type != "Add" or len(node.input) != 2:
            continue
        sources = [_float_source(graph, name) for name in node.input]
        if any(graph.constant(s) is not None or s not in graph.producer for s in sources):
            continue
        convs = [graph.producer[s].op_type in ("Conv", "ConvTranspose") for s in sources]
        if not any(convs):
            continue
        if convs[0] != convs[1]:
            mains[node.name] = convs.index(True)
            continue
        first, second = (_ancestors(graph, s) for s in sources)
        common = set(first) & set(second)
        if not common:
            continue
        lowest = min(common, key=lambda name: first[name] + second[name])
        mains[node.name] = 0 if first[lowest] >= second[lowest] else 1
    return mains


def fusion_advice(model: onnx.ModelProto) -> list[str]:
    """Placements TensorRT accepts but runs slower than it could, each prefixed `perf:`."""
    graph = Graph(model)
    advice: list[str] = []
    for name, main in residual_main_inputs(model).items():
        node = next(n for n in graph.nodes if n.name == name)
        skip = node.input[1 - main]
        if graph.input_of(skip, "DequantizeLinear") is None:
            advice.append(
                f"perf: residual-add: {_label(node)} adds float '{skip}' to the Conv output; "
                "quantize the residual input so TensorRT fuses the Add into the Conv"
            )
    for node in graph.nodes:
        dqs = [graph.input_of(name, "DequantizeLinear") for name in node.input]
        if node.op_type == "Concat" and _all_found(dqs) and len(dqs) > 1:
            scales = {
                float(np.max(scale)) for dq in dqs if (scale := graph.constant(dq.input[1])) is not None
            }
            if len(scales) > 1:
                advice.append(
                    f"perf: concat-scales: {_label(node)} joins inputs with {len(scales)} "
                    "different scales; one shared scale lets TensorRT concatenate in INT8"
                )
        if node.op_type in WEIGHTED and any(dqs[:2]) and not all(dqs[:2]):
            advice.append(f"perf: partial: {_label(node)} has quantized and float inputs; it runs in float")
    return advice


def drop_input_qdq(model: onnx.ModelProto, inputs: dict[str, int]) -> None:
    """Feed input `index` of each named node from the float tensor behind its Q/DQ pair.

    Q/DQ nodes left without consumers are removed with their scale and zero point.
    """
    graph = Graph(model)
    for node in graph.nodes:
        if node.name in inputs:
            index = inputs[node.name]
            node.input[index] = _float_source(graph, node.input[index])
    _prune(model)


def _prune(model: onnx.ModelProto) -> None:
    while True:
        graph = Graph(model)
        dead = [
            n
            for n in graph.nodes
            if n.op_type in QDQ and n.output[0] not in graph.outputs and not graph.consumers.get(n.output[0])
        ]
        if not dead:
            break
        for node in dead:
            model.graph.node.remove(node)
    used = {name for node in model.graph.node for name in node.input}
    for tensor in [t for t in model.graph.initializer if t.name not in used]:
        model.graph.initializer.remove(tensor)


def share_concat_scales(model: onnx.ModelProto) -> None:
    """Give the quantized inputs of each Concat one scale, the largest, so no range is clipped."""
    graph = Graph(model)
    initializers = {t.name: t for t in model.graph.initializer}
    for node in graph.nodes:
        dqs = [graph.input_of(name, "DequantizeLinear") for name in node.input]
        if node.op_type != "Concat" or len(dqs) < 2 or not _all_found(dqs):
            continue
        names = set()
        for dq in dqs:
            names.add(dq.input[1])
            q = graph.input_of(dq.input[0], "QuantizeLinear")
            if q is not None:
                names.add(q.input[1])
        if not all(
            name in initializers
            and initializers[name].data_type == TensorProto.FLOAT
            and graph.constants[name].size == 1
            for name in names
        ):
            continue
        shared = max(float(graph.constants[name]) for name in names)
        for name in names:
            value = np.asarray(shared, dtype=np.float32).reshape(graph.constants[name].shape)
            initializers[name].CopyFrom(numpy_helper.from_array(value, name))
