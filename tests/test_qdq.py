"""TensorRT's Q/DQ rules, Model Optimizer's placement, the INT8 model for TensorRT, and the FP16
converter (no torch, no GPU)."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper
from onnx import helper as oh
from onnx_graphs import onnx_mobile_segmenter, onnx_segmenter

from fakd_deploy.deploy import modelopt_int8
from fakd_deploy.deploy.fp16 import to_fp16
from fakd_deploy.deploy.qdq import share_concat_scales, tensorrt_placement
from fakd_deploy.deploy.qdq_rules import check_tensorrt_qdq, fusion_advice, residual_main_inputs
from fakd_deploy.deploy.quantize import quantize_ort_int8, quantize_tensorrt_int8
from fakd_deploy.errors import BackendUnavailable

SIZE = (32, 48)
RNG = np.random.default_rng(0)


def images(count: int, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((1, 3, *SIZE)).astype(np.float32) for _ in range(count)]


def run(model: onnx.ModelProto | Path, x: np.ndarray) -> np.ndarray:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, {"images": x})[0]


def quantized_inputs(model: onnx.ModelProto) -> Counter[tuple[str, tuple[int, ...]]]:
    """(op type, indices of inputs read through a Q -> DQ pair) for every node that has any."""
    producers = {out: node for node in model.graph.node for out in node.output}

    def through_qdq(name: str) -> bool:
        dq = producers.get(name)
        q = producers.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        return q is not None and q.op_type == "QuantizeLinear"

    found: Counter[tuple[str, tuple[int, ...]]] = Counter()
    for node in model.graph.node:
        indices = tuple(i for i, name in enumerate(node.input) if through_qdq(name))
        if indices and node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            found[(node.op_type, indices)] += 1
    return found


@pytest.fixture(scope="module")
def fp32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("qdq") / "m.onnx"
    onnx.save(onnx_segmenter(channels=16), str(path))
    return path


@pytest.fixture(scope="module")
def tensorrt_qdq(fp32: Path) -> onnx.ModelProto:
    return onnx.load(str(quantize_tensorrt_int8(fp32, fp32.with_name("m.qdq.onnx"), images(4))))


def _producer(model: onnx.ModelProto, tensor: str) -> onnx.NodeProto | None:
    return next((n for n in model.graph.node if tensor in n.output), None)


def test_tensorrt_model_meets_every_rule(tensorrt_qdq: onnx.ModelProto) -> None:
    assert check_tensorrt_qdq(tensorrt_qdq) == []
    assert fusion_advice(tensorrt_qdq) == []
    values = {t.name: numpy_helper.to_array(t) for t in tensorrt_qdq.graph.initializer}
    for node in tensorrt_qdq.graph.node:
        if node.op_type == "DequantizeLinear":
            assert values.get(node.input[0], np.zeros(1, np.int8)).dtype != np.int32  # no int32 bias
        if node.op_type == "QuantizeLinear":
            zero_point = values[node.input[2]]
            assert zero_point.dtype == np.int8 and not zero_point.any()
    nodes = {n.name: n for n in tensorrt_qdq.graph.node}
    assert all(nodes[name].input[2] in values for name in ("b1", "b2", "proj"))  # float biases
    add = nodes["res"]
    assert _producer(tensorrt_qdq, add.input[0]).op_type == "Conv"  # main branch: fused into b2
    assert _producer(tensorrt_qdq, add.input[1]).op_type == "DequantizeLinear"  # residual: INT8
    upsample = _producer(tensorrt_qdq, "logits")
    assert upsample.op_type == "Resize" and _producer(tensorrt_qdq, upsample.input[0]).op_type == "Conv"
    classifier = nodes["classifier"]  # quantized inputs, as Model Optimizer does; float logits
    assert _producer(tensorrt_qdq, classifier.input[0]).op_type == "DequantizeLinear"
    metadata = {p.key: p.value for p in tensorrt_qdq.metadata_props}
    assert metadata["activations"] == '"int8-symmetric"' and metadata["calib_images"] == "4"


def test_tensorrt_model_runs_close_to_fp32_on_cpu(fp32: Path, tensorrt_qdq: onnx.ModelProto) -> None:
    x = images(1, seed=7)[0]
    expected, actual = run(fp32, x), run(tensorrt_qdq, x)
    assert (expected.argmax(1) == actual.argmax(1)).mean() > 0.95


# What Model Optimizer's rules give the MobileNetV3-like block of onnx_mobile_segmenter, worked
# out by hand: every Conv (the depthwise one and the classifier too), the HardSwish, the
# squeeze-excite Mul (both inputs), the MaxPool beside a quantized Conv and the inner Resize;
# of the residual Add only the skip input (index 1); never the Relu/HardSigmoid fused or left
# float, nor the Resize that produces the logits.
MOBILE_NODES = {"stem", "dw", "se.fc1", "se.fc2", "project", "res", "head", "classifier", "hs", "se.mul"}
MOBILE_NODES |= {"pool", "up"}
MOBILE_INPUTS = Counter(
    {
        ("Conv", (0, 1)): 7,
        ("HardSwish", (0,)): 1,
        ("Mul", (0, 1)): 1,
        ("ReduceMean", (0,)): 1,  # reads the Mul's quantized input: one Q/DQ pair feeds both
        ("Add", (1,)): 1,
        ("MaxPool", (0,)): 1,
        ("Resize", (0,)): 1,
    }
)


def test_placement_follows_model_optimizers_rules(tmp_path: Path) -> None:
    model = onnx_mobile_segmenter()
    nodes, keep_float = tensorrt_placement(model)
    assert set(nodes) == MOBILE_NODES and keep_float == {"res": {0}}
    onnx.save(model, str(tmp_path / "mobile.onnx"))
    qdq = onnx.load(
        str(quantize_tensorrt_int8(tmp_path / "mobile.onnx", tmp_path / "mobile.qdq.onnx", images(2)))
    )
    assert quantized_inputs(qdq) == MOBILE_INPUTS
    assert check_tensorrt_qdq(qdq) == [] and fusion_advice(qdq) == []


def test_convolutions_too_small_for_int8_kernels_stay_float() -> None:
    """8-channel convolutions (other than the first layer) get no fast INT8 kernel; nor then does
    the residual Add whose skip input a float convolution also reads."""
    nodes, keep_float = tensorrt_placement(onnx_segmenter(channels=8))
    assert nodes == ["stem"]
    assert keep_float["res"] == {0, 1} and keep_float["b1"] == {0, 1, 2}


def _modelopt(source: Path, calib: np.ndarray) -> onnx.ModelProto:
    np.save(source.with_suffix(".npy"), calib)
    out = source.with_name(source.stem + ".modelopt.onnx")
    command = [
        sys.executable, "-m", "modelopt.onnx.quantization", f"--onnx_path={source}", "--quantize_mode=int8",
        f"--calibration_data_path={source.with_suffix('.npy')}", "--calibration_eps", "cpu",
        "--high_precision_dtype=fp32", "--calibration_method=max", f"--output_path={out}",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return onnx.load(str(out))


def test_model_optimizer_without_its_onnx_dependencies_is_named_before_it_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without them Model Optimizer fails asking for its [onnx] extra, which would replace
    onnxruntime; the error names the extra to install instead and what is missing."""
    installed = {"modelopt", "onnx_graphsurgeon", "onnxconverter_common", "polygraphy"}
    monkeypatch.setattr(
        modelopt_int8.importlib.util, "find_spec", lambda name: object() if name in installed else None
    )
    with pytest.raises(BackendUnavailable) as error:
        modelopt_int8.quantize_modelopt_int8(tmp_path / "m.onnx", tmp_path / "m.qdq.onnx", [])
    message = str(error.value)
    assert "pip install 'fakd-deploy[modelopt]'" in message and message.endswith("missing here: lief")
    assert not (tmp_path / "m.qdq.onnx").exists()


@pytest.mark.slow
@pytest.mark.skipif(modelopt_int8.available() is not None, reason=str(modelopt_int8.available()))
@pytest.mark.parametrize(
    "graph",
    [
        onnx_mobile_segmenter,
        lambda: onnx_segmenter(channels=16),
        lambda: onnx_segmenter(channels=16, downsample_shortcut=True),
        onnx_segmenter,
    ],
    ids=["mobile", "residual", "downsampling", "small-convs"],
)
def test_placement_matches_model_optimizer(tmp_path: Path, graph: object) -> None:
    """Model Optimizer 0.47 and fakd-deploy quantize the same inputs of the same op types."""
    source = tmp_path / "m.onnx"
    onnx.save(graph(), str(source))  # type: ignore[operator]
    ours = onnx.load(str(quantize_tensorrt_int8(source, tmp_path / "m.qdq.onnx", images(4))))
    theirs = _modelopt(source, np.concatenate(images(4)))
    assert quantized_inputs(ours) == quantized_inputs(theirs)
    assert check_tensorrt_qdq(theirs) == []


def test_onnx_runtime_uint8_model_is_refused(fp32: Path, tmp_path: Path) -> None:
    model = onnx.load(str(quantize_ort_int8(fp32, tmp_path / "m.int8.onnx", images(4))))
    problems = check_tensorrt_qdq(model)
    assert any(p.startswith("int8:") and "UINT8" in p for p in problems)
    assert any(p.startswith("int8:") and "INT32" in p and "bias" in p for p in problems)


def _qdq_conv(
    *,
    act_dtype: type = np.int8,
    zero_point: int = 0,
    scale: float | list[float] = 0.05,
    weight_axis: int = 0,
    bias_int32: bool = False,
    scale_from_input: bool = False,
    output_qdq: bool = False,
    unpaired: bool = False,
    no_zero_point: bool = False,
) -> onnx.ModelProto:
    """x -> Q -> DQ -> Conv(DQ(int8 weight), bias) -> Relu -> y, with one thing made wrong."""
    nodes: list = []
    weight = RNG.integers(-100, 100, (4, 4, 3, 3)).astype(np.int8)
    channels = weight.shape[weight_axis]
    inits = [
        numpy_helper.from_array(np.asarray(scale, np.float32), "s"),
        numpy_helper.from_array(np.asarray(zero_point, act_dtype), "zp"),
        numpy_helper.from_array(weight, "wq"),
        numpy_helper.from_array(np.full(channels, 0.01, np.float32), "ws"),
        numpy_helper.from_array(np.zeros(channels, np.int8), "wzp"),
    ]
    inputs = [oh.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])]
    scale_name = "s"
    if scale_from_input:
        inputs.append(oh.make_tensor_value_info("runtime_scale", TensorProto.FLOAT, []))
        scale_name = "runtime_scale"
    q_inputs = ["x", scale_name] if no_zero_point else ["x", scale_name, "zp"]
    nodes += [
        oh.make_node("QuantizeLinear", q_inputs, ["xq"], name="q_x"),
        oh.make_node("DequantizeLinear", ["xq", scale_name, *q_inputs[2:]], ["xd"], name="dq_x"),
        oh.make_node("DequantizeLinear", ["wq", "ws", "wzp"], ["w"], name="dq_w", axis=weight_axis),
    ]
    bias = "b"
    if bias_int32:
        inits += [
            numpy_helper.from_array(np.arange(4, dtype=np.int32), "bq"),
            numpy_helper.from_array(np.full(4, 5e-4, np.float32), "bs"),
        ]
        nodes.append(oh.make_node("DequantizeLinear", ["bq", "bs"], ["b"], name="dq_b", axis=0))
    else:
        inits.append(numpy_helper.from_array(np.zeros(4, np.float32), "b"))
    nodes += [
        oh.make_node("Conv", ["xd", "w", bias], ["c"], name="conv", pads=[1] * 4),
        oh.make_node("Relu", ["c"], ["r"], name="relu"),
    ]
    output = "r"
    if output_qdq:
        nodes += [
            oh.make_node("QuantizeLinear", ["r", "s", "zp"], ["rq"], name="q_out"),
            oh.make_node("DequantizeLinear", ["rq", "s", "zp"], ["y"], name="dq_out"),
        ]
        output = "y"
    if unpaired:
        nodes.append(oh.make_node("QuantizeLinear", ["r", "s", "zp"], ["lonely"], name="q_lonely"))
        nodes.append(oh.make_node("Cast", ["lonely"], ["y2"], name="cast", to=TensorProto.FLOAT))
    outputs = [oh.make_tensor_value_info(output, TensorProto.FLOAT, None)]
    if unpaired:
        outputs.append(oh.make_tensor_value_info("y2", TensorProto.FLOAT, None))
    graph = oh.make_graph(nodes, "qdq", inputs, outputs, inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 19)])


def test_a_conformant_hand_made_graph_passes() -> None:
    assert check_tensorrt_qdq(_qdq_conv()) == []


@pytest.mark.parametrize(
    ("change", "rule", "words"),
    [
        ({"act_dtype": np.uint8, "zero_point": 128}, "int8", "UINT8"),
        ({"zero_point": 3}, "zero-point", "non-zero"),
        ({"no_zero_point": True}, "zero-point", "no zero point"),
        ({"scale": 0.0}, "scale", "positive"),
        ({"scale": -0.1}, "scale", "positive"),
        ({"scale": float("nan")}, "scale", "positive"),
        ({"scale": float("inf")}, "scale", "positive"),
        ({"scale_from_input": True}, "scale", "constant"),
        ({"scale": [0.1, 0.2, 0.3, 0.4]}, "per-tensor-activation", "activation"),
        ({"weight_axis": 1}, "weight-axis", "axis 1"),
        ({"bias_int32": True}, "int8", "INT32"),
        ({"output_qdq": True}, "float-output", "graph output"),
        ({"unpaired": True}, "unpaired", "q_lonely"),
    ],
)
def test_each_rule_names_the_rule_and_the_node(change: dict, rule: str, words: str) -> None:
    problems = check_tensorrt_qdq(_qdq_conv(**change))
    assert problems, f"{change} passed"
    assert any(p.startswith(f"{rule}:") and words in p for p in problems), problems
    assert all("'" in p for p in problems)  # every line names a node or tensor


def _concat_of_quantized(scales: tuple[float, float]) -> onnx.ModelProto:
    nodes, inits = [], []
    for index, scale in enumerate(scales):
        inits += [
            numpy_helper.from_array(np.asarray(scale, np.float32), f"s{index}"),
            numpy_helper.from_array(np.asarray(0, np.int8), f"z{index}"),
        ]
        nodes += [
            oh.make_node(
                "QuantizeLinear", [f"x{index}", f"s{index}", f"z{index}"], [f"q{index}"], name=f"q{index}"
            ),
            oh.make_node(
                "DequantizeLinear", [f"q{index}", f"s{index}", f"z{index}"], [f"d{index}"], name=f"dq{index}"
            ),
        ]
    nodes.append(oh.make_node("Concat", ["d0", "d1"], ["y"], name="cat", axis=1))
    graph = oh.make_graph(
        nodes,
        "cat",
        [oh.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, [1, 2, 4, 4]) for i in range(2)],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])],
        inits,
    )
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 19)])


def test_concat_scales_are_advice_and_get_shared() -> None:
    model = _concat_of_quantized((0.1, 0.3))
    assert check_tensorrt_qdq(model) == []  # TensorRT accepts it, with a requantization
    assert any(a.startswith("perf: concat-scales") for a in fusion_advice(model))
    model = share_concat_scales(model)
    values = {
        t.name: float(numpy_helper.to_array(t)) for t in model.graph.initializer if t.name.startswith("s")
    }
    assert values == {"s0": pytest.approx(0.3), "s1": pytest.approx(0.3)}
    assert fusion_advice(model) == []


def test_residual_add_with_float_skip_is_advice(fp32: Path) -> None:
    model = onnx.load(str(fp32))
    advice = fusion_advice(model)
    assert check_tensorrt_qdq(model) == []
    assert any(a.startswith("perf: residual-add") and "'res'" in a for a in advice)


def test_downsampling_shortcut_keeps_the_longer_branch_as_main() -> None:
    model = onnx_segmenter(downsample_shortcut=True)
    assert residual_main_inputs(model) == {"res": 0}  # b2 (two convs deep), not the 1x1 shortcut
    swapped = onnx_segmenter(downsample_shortcut=True)
    add = next(n for n in swapped.graph.node if n.name == "res")
    add.input[0], add.input[1] = add.input[1], add.input[0]
    assert residual_main_inputs(swapped) == {"res": 1}


def test_tensorrt_model_with_downsampling_shortcut(tmp_path: Path) -> None:
    onnx.save(onnx_segmenter(channels=16, downsample_shortcut=True), str(tmp_path / "d.onnx"))
    model = onnx.load(str(quantize_tensorrt_int8(tmp_path / "d.onnx", tmp_path / "d.qdq.onnx", images(2))))
    assert check_tensorrt_qdq(model) == [] and fusion_advice(model) == []


@pytest.mark.parametrize("quantized", [False, True])
def test_fp16_keeps_float_io_and_agrees_with_fp32(
    fp32: Path, tensorrt_qdq: onnx.ModelProto, quantized: bool
) -> None:
    source = tensorrt_qdq if quantized else onnx.load(str(fp32))
    half = to_fp16(source)
    onnx.checker.check_model(half, full_check=True)
    for value in [*half.graph.input, *half.graph.output]:
        assert value.type.tensor_type.elem_type == TensorProto.FLOAT
    floats = [t for t in half.graph.initializer if t.data_type == TensorProto.FLOAT]
    assert [t.name for t in floats] == ["scales"]  # Resize's scales must stay FP32 by its schema
    if quantized:
        assert half.opset_import[0].version >= 19  # FP16 Q/DQ scales need opset 19
    x = images(1, seed=3)[0]
    expected, actual = run(source, x), run(half, x)
    assert actual.dtype == np.float32
    # FP16 rounding: logits within 1 % of their range; a QDQ model may also flip a rounding step
    tolerance = 0.01 * float(np.ptp(expected)) * (10 if quantized else 1)
    assert float(np.abs(actual - expected).max()) < tolerance
    assert (actual.argmax(1) == expected.argmax(1)).mean() > 0.97


def test_fp16_refuses_custom_domains() -> None:
    model = onnx_segmenter()
    model.graph.node[0].domain = "com.example"
    with pytest.raises(ValueError, match=r"com\.example"):
        to_fp16(model)
