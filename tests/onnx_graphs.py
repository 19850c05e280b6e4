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
