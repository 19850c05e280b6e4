"""A segmenter in miniature built with onnx.helper (no torch): what quantization and TensorRT must handle."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper
from onnx import helper as oh


def onnx_segmenter(
    batch: int | str = 1,
    size: tuple[int, int] = (32, 48),
    classes: int = 5,
    channels: int = 8,
    aspp: bool = True,
    downsample_shortcut: bool = False,
) -> onnx.ModelProto:
    """Stem conv, a residual block, optionally an ASPP-like concat, a 1x1 classifier, x2 resize.

    `downsample_shortcut` puts a 1x1 conv on the residual's shortcut, so both Add inputs are convs.
    """
    rng = np.random.default_rng(0)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def conv(name: str, x: str, cin: int, cout: int, k: int = 3, stride: int = 1) -> str:
        weight = rng.standard_normal((cout, cin, k, k)).astype(np.float32) * (2 / (cin * k * k)) ** 0.5
        inits.append(numpy_helper.from_array(weight, f"{name}.w"))
        inits.append(numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32) * 0.1, f"{name}.b"))
        nodes.append(
            oh.make_node(
                "Conv",
                [x, f"{name}.w", f"{name}.b"],
                [name],
                name=name,
                kernel_shape=[k, k],
                pads=[k // 2] * 4,
                strides=[stride, stride],
            )
        )
        return name

    def relu(x: str) -> str:
        nodes.append(oh.make_node("Relu", [x], [f"{x}.relu"], name=f"{x}.relu"))
        return f"{x}.relu"

    width = channels
    stem = relu(conv("stem", "images", 3, width, stride=2))
    body = conv("b2", relu(conv("b1", stem, width, width)), width, width)
    skip = conv("down", stem, width, width, k=1) if downsample_shortcut else stem
    nodes.append(oh.make_node("Add", [body, skip], ["res"], name="res"))
    head = relu("res")
    if aspp:
        branches = [relu(conv(f"aspp{k}", head, width, width // 2, k=k)) for k in (1, 3)]
        nodes.append(oh.make_node("Concat", branches, ["cat"], name="cat", axis=1))
        head = relu(conv("proj", "cat", width, width, k=1))
    conv("classifier", head, width, classes, k=1)
    inits.append(numpy_helper.from_array(np.array([], np.float32), "roi"))
    inits.append(numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"))
    nodes.append(
        oh.make_node("Resize", ["classifier", "roi", "scales"], ["logits"], name="upsample", mode="linear")
    )
    graph = oh.make_graph(
        nodes,
        "segmenter",
        [oh.make_tensor_value_info("images", TensorProto.FLOAT, [batch, 3, *size])],
        [oh.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes, *size])],
        inits,
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    return model


def onnx_mobile_segmenter(
    size: tuple[int, int] = (32, 48), classes: int = 5, width: int = 16
) -> onnx.ModelProto:
    """A MobileNetV3-like block with the ops INT8 placement treats one by one.

    stem Conv -> HardSwish -> depthwise Conv -> Relu -> squeeze-excite (ReduceMean, 1x1 Conv,
    Relu, 1x1 Conv, HardSigmoid, Mul) -> 1x1 projection + residual Add (skip: the HardSwish)
    -> MaxPool -> Conv -> Relu -> Resize x2 -> classifier -> Resize x2 (the logits).
    """
    rng = np.random.default_rng(1)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def conv(name: str, x: str, cin: int, cout: int, k: int = 1, stride: int = 1, group: int = 1) -> str:
        shape = (cout, cin // group, k, k)
        weight = rng.standard_normal(shape).astype(np.float32) * (2 / (shape[1] * k * k)) ** 0.5
        inits.append(numpy_helper.from_array(weight, f"{name}.w"))
        inits.append(numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32) * 0.1, f"{name}.b"))
        attrs = {"kernel_shape": [k, k], "pads": [k // 2] * 4, "strides": [stride, stride], "group": group}
        nodes.append(oh.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [name], name=name, **attrs))
        return name

    def unary(op: str, x: str, name: str) -> str:
        nodes.append(oh.make_node(op, [x], [name], name=name))
        return name

    def resize(x: str, name: str) -> str:
        nodes.append(oh.make_node("Resize", [x, "roi", "scales"], [name], name=name, mode="linear"))
        return name

    inits += [
        numpy_helper.from_array(np.array([], np.float32), "roi"),
        numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
        numpy_helper.from_array(np.array([2, 3], np.int64), "axes"),
    ]
    hs = unary("HardSwish", conv("stem", "images", 3, width, k=3, stride=2), "hs")
    dw = unary("Relu", conv("dw", hs, width, width, k=3, group=width), "dw.relu")
    nodes.append(oh.make_node("ReduceMean", [dw, "axes"], ["se.pool"], name="se.pool", keepdims=1))
    fc1 = unary("Relu", conv("se.fc1", "se.pool", width, width), "se.fc1.relu")
    gate = unary("HardSigmoid", conv("se.fc2", fc1, width, width), "se.gate")
    nodes.append(oh.make_node("Mul", [dw, gate], ["se.mul"], name="se.mul"))
    nodes.append(oh.make_node("Add", [conv("project", "se.mul", width, width), hs], ["res"], name="res"))
    nodes.append(oh.make_node("MaxPool", ["res"], ["pool"], name="pool", kernel_shape=[2, 2], strides=[2, 2]))
    up = resize(unary("Relu", conv("head", "pool", width, width, k=3), "head.relu"), "up")
    resize(conv("classifier", up, width, classes), "logits")
    graph = oh.make_graph(
        nodes,
        "mobile",
        [oh.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, *size])],
        [oh.make_tensor_value_info("logits", TensorProto.FLOAT, [1, classes, *size])],
        inits,
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    return model
