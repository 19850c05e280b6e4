"""TensorRT's rules for explicitly quantized (Q/DQ) ONNX models, checked without touching the graph.

`check_tensorrt_qdq` lists what TensorRT's ONNX parser rejects or would run differently
from the ONNX semantics; `fusion_advice` lists placements TensorRT accepts but cannot
fuse into INT8 kernels (slower, not wrong). Every INT8 model built for TensorRT is
checked before any GPU is touched: an error is a `BuildError`, advice is logged.

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

import numpy as np
import onnx
import onnx_graphsurgeon as gs

WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")
QDQ = ("QuantizeLinear", "DequantizeLinear")
# modelopt/onnx/op_types.py get_copy_ops: ops that move data without computing
COPY = frozenset(
    (
        "Flatten", "Transpose", "Concat", "Split", "Squeeze", "Expand", "ReverseSequence", "Reshape",
        "Tile", "Gather", "Slice", "GatherElements", "GatherND", "ScatterElements", "ScatterND", "OneHot",
    )
)  # fmt: skip
# What TensorRT fuses into the Conv before it, read upwards from the last op
# (graph_utils.py get_fusible_backbone; `?` marks the optional bias Add and scale Mul)
FUSIBLE_PATHS = (
    ("BiasAdd?", "ConstMul?"),
    ("Relu", "BiasAdd?", "ConstMul?"),
    ("BatchNormalization", "BiasAdd?"),
    ("Relu", "BatchNormalization", "BiasAdd?"),
    ("MaxPool", "Relu", "BatchNormalization", "BiasAdd?"),
    ("Mul", "Sigmoid", "BatchNormalization"),
)


def constant(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of an initializer or of a Constant node's output; None for a computed tensor."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    if tensor.inputs and tensor.inputs[0].op == "Constant":
        value = tensor.inputs[0].attrs.get("value")
        return np.asarray(value.values if isinstance(value, gs.Constant) else value)
    return None


def producer(tensor: gs.Tensor, op: str | None = None) -> gs.Node | None:
    """The node that computes `tensor` (if it is an `op`), or None."""
    node = tensor.inputs[0] if tensor.inputs else None
    return node if node is not None and (op is None or node.op == op) else None


def float_source(tensor: gs.Tensor) -> gs.Tensor:
    """The float tensor behind a Q/DQ pair, or `tensor` itself."""
    dq = producer(tensor, "DequantizeLinear")
    q = producer(dq.inputs[0], "QuantizeLinear") if dq is not None else None
    return q.inputs[0] if q is not None else tensor


def label(node: gs.Node) -> str:
    return f"{node.op} '{node.name or node.outputs[0].name}'"


def _zero_point(node: gs.Node) -> np.ndarray | None:
    return constant(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None


def _quantized_dtype(node: gs.Node) -> np.dtype | None:
    """The integer type a Q produces or a DQ reads, from its zero point (None: none given)."""
    zero_point = _zero_point(node)
    if zero_point is not None:
        return zero_point.dtype
    if node.op == "DequantizeLinear":
        data = constant(node.inputs[0])
        return data.dtype if data is not None else None
    output_dtype = node.attrs.get("output_dtype", 0)
    return onnx.helper.tensor_dtype_to_np_dtype(output_dtype) if output_dtype else None


def _check_types(node: gs.Node) -> list[str]:
    data = constant(node.inputs[0]) if node.op == "DequantizeLinear" else None
    if data is not None and data.dtype == np.int32:
        return [
            f"int8: {label(node)} dequantizes an INT32 tensor '{node.inputs[0].name}' (a quantized "
            "bias); TensorRT accepts only activation types there: keep biases in float "
            "(QuantizeBias=False)"
        ]
    dtype = _quantized_dtype(node)
    if dtype is None:
        return [
            f"zero-point: {label(node)} has no zero point, which ONNX reads as UINT8 while TensorRT "
            "computes INT8: give an INT8 zero point of 0"
        ]
    if dtype != np.int8:
        return [
            f"int8: {label(node)} quantizes to {dtype.name.upper()}; TensorRT's explicit "
            "quantization takes INT8 (symmetric, zero point 0), not the UINT8 form made for "
            "ONNX Runtime on CPU"
        ]
    zero_point = _zero_point(node)
    if zero_point is not None and zero_point.any():
        return [
            f"zero-point: {label(node)} has a non-zero zero point; TensorRT supports symmetric "
            "quantization only (zero point 0)"
        ]
    return []


def _weight_axis(consumer: gs.Node, index: int, rank: int) -> int | None:
    """The output-channel axis of the weight at input `index` of `consumer` (None: not a weight)."""
    if consumer.op in ("Conv", "ConvTranspose") and index == 1:
        return 0 if consumer.op == "Conv" else 1
    if consumer.op == "Gemm" and index == 1:
        return 0 if consumer.attrs.get("transB", 0) else 1
    if consumer.op == "MatMul" and index == 1:
        return rank - 1
    return None


def _dequantized_source(dq: gs.Node) -> gs.Tensor | None:
    """The constant a DQ ultimately reads: its own input, or its Q's input."""
    if constant(dq.inputs[0]) is not None:
        return dq.inputs[0]
    q = producer(dq.inputs[0], "QuantizeLinear")
    return q.inputs[0] if q is not None else None


def _weight_uses(node: gs.Node) -> list[tuple[gs.Node, int]]:
    """(consumer, input index) pairs that take the dequantized tensor of a Q or DQ node."""
    dqs = [node] if node.op == QDQ[1] else [c for c in node.outputs[0].outputs if c.op == QDQ[1]]
    return [
        (consumer, index)
        for dq in dqs
        for consumer in dq.outputs[0].outputs
        for index, tensor in enumerate(consumer.inputs)
        if tensor is dq.outputs[0]
    ]


def _check_scale(node: gs.Node) -> list[str]:
    scale = constant(node.inputs[1])
    if scale is None:
        return [
            f"scale: {label(node)} takes its scale from a computed tensor; "
            "TensorRT needs a build-time constant"
        ]
    if not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
        return [
            f"scale: {label(node)} has a scale that is not finite and positive (min {float(np.min(scale)):g})"
        ]
    if scale.size == 1:
        return []
    source = node.inputs[0] if node.op == "QuantizeLinear" else _dequantized_source(node)
    weight = constant(source) if source is not None else None
    if source is None or weight is None:
        return [
            f"per-tensor-activation: {label(node)} has {scale.size} scales on an activation; "
            "TensorRT quantizes activations per tensor"
        ]
    axis = node.attrs.get("axis", 1) % weight.ndim
    problems = []
    for consumer, index in _weight_uses(node):
        expected = _weight_axis(consumer, index, weight.ndim)
        if expected is not None and axis != expected:
            problems.append(
                f"weight-axis: {label(node)} scales weight '{source.name}' of {label(consumer)} "
                f"per channel on axis {axis}; TensorRT wants the output-channel axis {expected}"
            )
    if weight.shape[axis] != scale.size:
        problems.append(
            f"scale: {label(node)} has {scale.size} scales for {weight.shape[axis]} channels on axis {axis}"
        )
    return problems


def _check_pairing(node: gs.Node, outputs: set[str]) -> list[str]:
    out = node.outputs[0]
    if out.name in outputs:
        return [
            f"float-output: {label(node)} produces the graph output '{out.name}'; leave the "
            "network output unquantized"
        ]
    if node.op == "QuantizeLinear":
        others = [c for c in out.outputs if c.op != "DequantizeLinear"]
        if others or not out.outputs:
            return [
                f"unpaired: {label(node)} feeds {', '.join(label(c) for c in others) or 'nothing'}; "
                "every QuantizeLinear must be followed by DequantizeLinear"
            ]
    elif constant(node.inputs[0]) is None and producer(node.inputs[0], "QuantizeLinear") is None:
        return [
            f"unpaired: {label(node)} reads '{node.inputs[0].name}', which is neither a QuantizeLinear "
            "output nor a constant"
        ]
    return []


def check_tensorrt_qdq(model: onnx.ModelProto | gs.Graph) -> list[str]:
    """One line per rule TensorRT's parser or builder enforces and `model` breaks (empty: fine)."""
    graph = model if isinstance(model, gs.Graph) else gs.import_onnx(model)
    outputs = {tensor.name for tensor in graph.outputs}
    problems: list[str] = []
    for node in graph.nodes:
        if node.op in QDQ:
            problems += _check_types(node) or _check_scale(node)
            problems += _check_pairing(node, outputs)
    return problems


def _parents(node: gs.Node) -> list[gs.Node]:
    """The nodes computing `node`'s non-constant inputs, looking through Q/DQ pairs."""
    found = []
    for tensor in node.inputs:
        source = producer(float_source(tensor))
        if source is not None and constant(tensor) is None:
            found.append(source)
    return found


def _distances(node: gs.Node) -> dict[str, int]:
    """Nodes above `node` (itself included) and their distance from it, in nodes."""
    distance = {node.name: 0}
    frontier = [node]
    while frontier:
        upper = []
        for current in frontier:
            for parent in _parents(current):
                if parent.name not in distance:
                    distance[parent.name] = distance[current.name] + 1
                    upper.append(parent)
        frontier = upper
    return distance


def _kind(node: gs.Node) -> str:
    """The op type, with Add and Mul of a constant read as the bias and scale TensorRT folds."""
    if node.op in ("Add", "Mul") and any(constant(t) is not None for t in node.inputs if t.name):
        return "BiasAdd" if node.op == "Add" else "ConstMul"
    return node.op


def _conv_at_end(node: gs.Node, path: tuple[str, ...]) -> gs.Node | None:
    """The Conv reached by walking up from `node` through `path` (steps ending in `?` are
    optional, copy ops are skipped), as Model Optimizer's `has_path_type` matches it."""
    if node.op in COPY:
        return next((c for p in _parents(node) if (c := _conv_at_end(p, path))), None)
    if not path:
        return node if node.op in ("Conv", "ConvTranspose") else None
    step, optional = path[0].rstrip("?"), path[0].endswith("?")
    if _kind(node) == step:
        return next((c for p in _parents(node) if (c := _conv_at_end(p, path[1:]))), None)
    return _conv_at_end(node, path[1:]) if optional else None


def fusible_backbone(node: gs.Node) -> gs.Node | None:
    """The Conv a node's output comes from through ops TensorRT fuses into it, by the paths of
    Model Optimizer's `get_fusible_backbone` (graph_utils.py)."""
    return next((conv for path in FUSIBLE_PATHS if (conv := _conv_at_end(node, path))), None)


def residual_main_inputs(model: onnx.ModelProto | gs.Graph) -> dict[str, int]:
    """For each residual Add, the index of its main-branch input (the Conv it can fuse into).

    Model Optimizer's `build_non_residual_input_map` (graph_utils.py): an Add of two computed
    tensors where one comes from a Conv through fusible ops; when both do (a downsampling
    shortcut), the main branch is the one farther from their lowest common ancestor. An Add
    whose Conv is itself that ancestor is no residual Add. Works on float and Q/DQ models.
    """
    graph = model if isinstance(model, gs.Graph) else gs.import_onnx(model)
    mains: dict[str, int] = {}
    for node in graph.nodes:
        if node.op != "Add" or len(node.inputs) != 2 or any(constant(t) is not None for t in node.inputs):
            continue
        sources = [producer(float_source(tensor)) for tensor in node.inputs]
        if sources[0] is None or sources[1] is None:
            continue
        backbones = [fusible_backbone(source) for source in sources]
        first, second = _distances(sources[0]), _distances(sources[1])
        common = set(first) & set(second)
        lowest = min(common, key=lambda name: (first[name], second[name])) if common else None
        if backbones[0] is not None and backbones[1] is not None:
            if backbones[0] is not backbones[1] and lowest is not None:
                mains[node.name] = 0 if first[lowest] > second[lowest] else 1
        else:
            index = 0 if backbones[0] is not None else 1
            backbone = backbones[index]
            if backbone is not None and lowest != backbone.name:
                mains[node.name] = index
    return mains


def fusion_advice(model: onnx.ModelProto | gs.Graph) -> list[str]:
    """Placements TensorRT accepts but runs slower than it could, each prefixed `perf:`."""
    graph = model if isinstance(model, gs.Graph) else gs.import_onnx(model)
    residual = residual_main_inputs(graph)
    advice: list[str] = []
    for node in graph.nodes:
        dqs = [producer(tensor, "DequantizeLinear") for tensor in node.inputs]
        if node.name in residual and dqs[1 - residual[node.name]] is None:
            skip = node.inputs[1 - residual[node.name]].name
            advice.append(
                f"perf: residual-add: {label(node)} adds float '{skip}' to the Conv output; "
                "quantize the residual input so TensorRT fuses the Add into the Conv"
            )
        if node.op == "Concat" and len(dqs) > 1 and all(dqs):
            scales = {
                float(np.max(scale))
                for dq in dqs
                if dq is not None and (scale := constant(dq.inputs[1])) is not None
            }
            if len(scales) > 1:
                advice.append(
                    f"perf: concat-scales: {label(node)} joins inputs with {len(scales)} "
                    "different scales; one shared scale lets TensorRT concatenate in INT8"
                )
        if node.op in WEIGHTED and any(dqs[:2]) and not all(dqs[:2]):
            advice.append(f"perf: partial: {label(node)} has quantized and float inputs; it runs in float")
    return advice
