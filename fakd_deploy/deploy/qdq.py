"""Where a TensorRT INT8 model gets Q/DQ, and the graph edits that finish it.

`tensorrt_placement` decides which nodes' inputs are quantized, by NVIDIA Model Optimizer's
rules for TensorRT (modelopt/onnx/quantization/int8.py `_find_nodes_to_quantize`,
partitioning.py, graph_utils.py, 0.47), ported for the operators a segmenter has:

- **Conv groups**: a Conv (Gemm, MatMul) and what TensorRT fuses after it (BatchNorm, Relu,
  MaxPool, pointwise ops on its output alone, the main-branch Add of a residual block) form
  one partition. The Conv's inputs are quantized; of the residual Add only the skip input.
  The classifier Conv is a Conv like the others; the graph output stays float.
- **Pooling** (MaxPool, AveragePool, GlobalAveragePool) outside a partition is quantized
  when a neighbour is.
- **Other INT8-capable ops** outside partitions: HardSwish, a Mul of two computed tensors
  (the gate of a squeeze-excite block), Resize, Add, Clip... (Model Optimizer's
  quantizable op types, `QUANTIZABLE`); pointwise ops with a constant operand are not.
- **Small convolutions** TensorRT has no fast INT8 kernel for stay float (fewer than 16
  input or output channels, unless the channel rules of `find_nodes_from_convs_to_exclude`
  allow them).

ONNX Runtime's quantizer then inserts the Q/DQ pairs (with the options Model Optimizer
passes it, see `quantize.py`); `drop_input_qdq` removes the pairs the rules keep float and
`share_concat_scales` gives Concat inputs one scale. The checks live in `qdq_rules`.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from fakd_deploy.deploy.onnx_meta import graph_to_model
from fakd_deploy.deploy.qdq_rules import (
    COPY,
    constant,
    float_source,
    fusible_backbone,
    producer,
    residual_main_inputs,
)

LINEAR = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# modelopt/onnx/op_types.py: is_unary_op and is_binary_op (fusible pointwise), is_pooling_or_window_op
POINTWISE = frozenset(
    (
        "Neg", "Sqrt", "Abs", "Log", "Exp", "Not", "Cast", "Floor", "Ceil", "Round", "Erf", "Gelu", "Sin",
        "Cos", "Atan", "Sign", "IsNaN", "IsInf", "LeakyRelu", "Elu", "Tanh", "Softmax", "Softplus",
        "InstanceNormalization", "CumSum", "Add", "Sub", "Mul", "Pow", "Div", "Min", "Max", "Greater",
        "GreaterOrEqual", "Less", "LessOrEqual", "Equal", "BitwiseOr", "BitwiseAnd", "BitwiseXor",
        "BitShift",
    )
)  # fmt: skip
POOLING = frozenset(
    (
        "AveragePool", "GlobalAveragePool", "MaxPool", "GlobalMaxPool", "GlobalLpPool", "LpPool",
    )
)  # fmt: skip
# Model Optimizer's default quantizable op types: ONNX Runtime's QDQ and QLinear registries
# plus HardSwish, BatchNormalization, ConvTranspose, LayerNormalization and LRN, minus copy,
# reduction and activation ops (ort_utils.py `configure_ort`, `get_quantizable_op_types`)
QUANTIZABLE = frozenset(
    (
        "Add", "AveragePool", "BatchNormalization", "Clip", "Conv", "ConvTranspose", "CumSum", "Flatten",
        "Gemm", "GlobalAveragePool", "HardSwish", "LRN", "LayerNormalization", "MatMul", "MaxPool", "Mul",
        "Resize", "TopK",
    )
)  # fmt: skip
# The ops whose output makes the next pointwise op worth quantizing (filter_quantizable_kgen_heads)
FEEDS_QUANTIZED = frozenset(["AveragePool", "BatchNormalization", "GlobalAveragePool", "MaxPool", "Mul"])


def _variable_inputs(node: gs.Node) -> list[gs.Tensor]:
    return [t for t in node.inputs if t.name and constant(t) is None]


def _children(node: gs.Node) -> list[gs.Node]:
    return [consumer for out in node.outputs for consumer in out.outputs]


def _parents(node: gs.Node) -> list[gs.Node]:
    return [p for t in _variable_inputs(node) if (p := producer(t)) is not None]


def _fusible_mul(node: gs.Node) -> bool:
    """A Mul of two computed tensors fuses only as the Conv-Sigmoid-Mul of SiLU; the gate of a
    squeeze-excite block (Mul of a HardSigmoid or Sigmoid output) does not (`_is_fusible_mul`)."""
    inputs = _variable_inputs(node)
    if len(inputs) <= 1:
        return True
    gates = [p for p in _parents(node) if p.op in ("Sigmoid", "HardSigmoid")]
    silu = any(
        (source := producer(gate.inputs[0])) is not None
        and (source.op in ("Conv", "Add") or (source.op == "BatchNormalization" and fusible_backbone(source)))
        for gate in gates
        if gate.op == "Sigmoid"
    )
    return silu or not gates


def _small_conv(node: gs.Node, graph_inputs: set[str]) -> bool:
    """A Conv TensorRT has no fast INT8 kernel for (`find_nodes_from_convs_to_exclude`, int8)."""
    weight = constant(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None:
        return True
    out_channels, in_channels = weight.shape[0], weight.shape[1]
    if out_channels >= 16 and in_channels >= 16:
        return False
    group = node.attrs.get("group", 1)
    kernel = list(node.attrs.get("kernel_shape", weight.shape[2:]))
    if group == 1:
        first = any(t.name in graph_inputs for t in node.inputs)
        return not (
            (out_channels % 8 == 0 or in_channels % 8 == 0)
            and (first or out_channels >= 16 or in_channels >= 16)
            and len(set(kernel)) == 1
        )
    return not (out_channels % 8 == 0 and all(k >= 3 for k in kernel))


class _Partitions:
    """Model Optimizer's fusible partitions: a root op and what TensorRT fuses after it."""

    def __init__(self, residual: dict[str, int]) -> None:
        self.residual = residual
        self.taken: set[str] = set()

    def grow(self, node: gs.Node, partition: list[gs.Node]) -> None:
        if node.op == "Mul" and not _fusible_mul(node):
            return
        partition.append(node)
        self.taken.add(node.name)
        if node.name in self.residual:  # the Add closing a residual block ends the partition
            return
        outputs = {out.name for member in partition for out in member.outputs}
        for child in _children(node):
            if child.name in self.taken:
                continue
            inside = all(t.name in outputs for t in _variable_inputs(child))
            on_main_branch = (
                child.name in self.residual and child.inputs[self.residual[child.name]] is node.outputs[0]
            )
            if (
                ((child.op in COPY or child.op in POINTWISE) and inside)
                or (child.op in ("BatchNormalization", "Relu", "MaxPool") and fusible_backbone(child))
                or on_main_branch
            ):
                self.grow(child, partition)

    def collect(self, nodes: Iterable[gs.Node], roots: Iterable[str]) -> list[list[gs.Node]]:
        found = []
        for node in nodes:
            if node.name not in self.taken and node.op in roots:
                partition: list[gs.Node] = []
                self.grow(node, partition)
                if partition:
                    found.append(partition)
        return found


def tensorrt_placement(model: onnx.ModelProto) -> tuple[list[str], dict[str, set[int]]]:
    """The nodes whose inputs get Q/DQ, and for some of them the input indices that stay float."""
    graph = gs.import_onnx(model)
    graph.toposort()
    nodes = list(graph.nodes)
    graph_inputs = {t.name for t in graph.inputs}
    small = {n.name for n in nodes if n.op == "Conv" and _small_conv(n, graph_inputs)}
    partitions = _Partitions(residual_main_inputs(graph))
    partitions.taken |= small
    conv_groups = partitions.collect(nodes, LINEAR)
    pointwise_groups = partitions.collect(nodes, POINTWISE)

    quantize: list[gs.Node] = []
    keep_float: dict[str, set[int]] = {}
    in_groups = {member.name for group in conv_groups for member in group}
    for group in conv_groups:
        outputs = {out.name for member in group for out in member.outputs}
        for member in group:
            inputs = _variable_inputs(member)
            inside = [i for i, t in enumerate(member.inputs) if t.name in outputs]
            if any(t.name not in outputs for t in inputs):
                quantize.append(member)
                if inside:  # the residual Add: its skip input only
                    keep_float.setdefault(member.name, set()).update(inside)

    group_ends = {group[-1].outputs[0].name for group in conv_groups}
    heads = [group[0] for group in pointwise_groups]
    heads += [n for n in nodes if n.op in ("Resize", "Upsample") and n.inputs[0].name in group_ends]
    for head in heads:
        if head.op not in QUANTIZABLE or any(constant(t) is not None for t in head.inputs if t.name):
            continue
        feeding = [p.name in in_groups or p.op in FEEDS_QUANTIZED for p in _parents(head)]
        if any(feeding):
            quantize.append(head)
            if head.op == "Add":  # an input from elsewhere stays float unless quantized anyway
                lonely = [i for i, fed in enumerate(feeding) if not fed and len(head.inputs[i].outputs) == 1]
                keep_float.setdefault(head.name, set()).update(lonely)

    chosen = {n.name for n in quantize}
    pooling = []
    for node in nodes:
        if node.name in partitions.taken or node.op not in QUANTIZABLE:
            continue
        if node.op in POOLING:
            pooling.append(node)
        elif not (node.op in POINTWISE and any(constant(t) is not None for t in node.inputs if t.name)):
            quantize.append(node)
            chosen.add(node.name)
    quantize += [p for p in pooling if any(n.name in chosen for n in _children(p) + _parents(p))]

    by_name = {n.name: n for n in nodes}
    for name in small:  # their inputs stay float even where a quantized neighbour shares them
        keep_float[name] = set(range(len(by_name[name].inputs)))
    # An Add keeping one input float keeps float any other input that a float consumer reads too
    # (remove_partial_input_qdq: no Q/DQ on one branch of a residual whose other branch is float)
    floats = {by_name[name].inputs[i].name for name, kept in keep_float.items() for i in kept}
    for name, kept in keep_float.items():
        if by_name[name].op == "Add" and kept:
            kept.update(i for i, t in enumerate(by_name[name].inputs) if t.name in floats)
    outputs = {t.name for t in graph.outputs}
    skipped = {n.name for n in nodes if n.op not in LINEAR and any(o.name in outputs for o in n.outputs)}
    skipped -= set(keep_float)
    skipped |= {  # every input kept float: nothing left to quantize
        name for name, kept in keep_float.items() if kept >= set(range(len(by_name[name].inputs)))
    }
    names = list(dict.fromkeys(n.name for n in quantize if n.name not in skipped))
    return names, keep_float


def drop_input_qdq(model: onnx.ModelProto, inputs: dict[str, set[int]]) -> onnx.ModelProto:
    """Feed the listed inputs of each named node from the float tensor behind its Q/DQ pair.

    Q/DQ nodes left without consumers are removed with their scales and zero points.
    """
    graph = gs.import_onnx(model)
    for node in graph.nodes:
        for index in inputs.get(node.name, ()):
            if index < len(node.inputs):
                node.inputs[index] = float_source(node.inputs[index])
    return graph_to_model(graph, model)


def share_concat_scales(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give the quantized inputs of each Concat one scale, the largest, so no range is clipped."""
    graph = gs.import_onnx(model)
    for node in graph.nodes:
        dqs = [producer(tensor, "DequantizeLinear") for tensor in node.inputs]
        if node.op != "Concat" or len(dqs) < 2 or not all(dqs):
            continue
        scales = [dq.inputs[1] for dq in dqs if dq is not None]
        scales += [
            q.inputs[1] for dq in dqs if dq is not None and (q := producer(dq.inputs[0], "QuantizeLinear"))
        ]
        if all(isinstance(s, gs.Constant) and s.values.size == 1 and s.dtype == np.float32 for s in scales):
            shared = max(float(np.asarray(s.values)) for s in scales)
            for scale in scales:
                scale.values = np.full(scale.shape, shared, dtype=np.float32)
    return graph_to_model(graph, model)
