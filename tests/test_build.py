"""build: the backend registry, the INT8 and FP16 artifacts, and INT8 accuracy through `evaluate`."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper
from torch import nn

from fakd_deploy.artifacts import Artifact
from fakd_deploy.deploy.backends import ALIASES, BACKENDS, artifact_path, resolve_backend
from fakd_deploy.deploy.build import build
from fakd_deploy.deploy.export import export_onnx
from fakd_deploy.deploy.onnx_meta import read_metadata
from fakd_deploy.deploy.ort import OrtPredictor
from fakd_deploy.deploy.qdq_rules import check_tensorrt_qdq, fusion_advice
from fakd_deploy.deploy.quantize import tail_nodes
from fakd_deploy.errors import BackendUnavailable, BadInput

CLASSES = 5


class ResidualSegmenter(nn.Module):
    """Logits at 1/4 resolution with what INT8 placement must handle: a residual Add, a Concat."""

    def __init__(self, num_classes: int = CLASSES, width: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1), nn.BatchNorm2d(width), nn.ReLU())
        self.block = nn.Sequential(
            nn.Conv2d(width, width, 3, 2, 1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, 1, 1),
            nn.BatchNorm2d(width),
        )
        self.shortcut = nn.Sequential(nn.Conv2d(width, width, 1, 2), nn.BatchNorm2d(width))
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Conv2d(width, width // 2, k, 1, k // 2), nn.ReLU()) for k in (1, 3)
        )
        self.project = nn.Sequential(nn.Conv2d(width, width, 1), nn.ReLU())
        self.classifier = nn.Conv2d(width, num_classes, 1)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(self.block(x) + self.shortcut(x))
        x = self.project(torch.cat([branch(x) for branch in self.branches], 1))
        return self.classifier(x)


def _calibration(count: int = 4) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [rng.standard_normal((1, 3, 32, 48)).astype(np.float32) for _ in range(count)]


@pytest.fixture(scope="module")
def fp32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("build") / "m.onnx"
    export_onnx(
        ResidualSegmenter(),
        path,
        32,
        48,
        parity_batches=[torch.randn(1, 3, 32, 48)],
        metadata={"class_names": [f"c{i}" for i in range(CLASSES)]},
    )
    return path


def test_artifact_names_follow_the_run_layout() -> None:
    names = {backend: artifact_path("deploy/kd.onnx", backend).name for backend in BACKENDS}
    assert names == {
        "ort-cpu-fp32": "kd.onnx",
        "ort-cpu-int8": "kd.int8.onnx",
        "ort-cuda-fp32": "kd.onnx",
        "ort-cuda-fp16": "kd.fp16.onnx",
        "ort-trt-fp16": "kd.onnx",
        "ort-trt-int8": "kd.qdq.onnx",
        "trt-fp32": "kd.fp32.engine",
        "trt-fp16": "kd.fp16.engine",
        "trt-int8": "kd.int8.engine",
    }
    for derived in ("kd.int8.onnx", "kd.qdq.onnx", "kd.qdq.fp16.onnx"):
        assert artifact_path(f"deploy/{derived}", "trt-int8").name == "kd.int8.engine"
    assert {a: resolve_backend(a).name for a in ALIASES} == {
        "ort-fp32": "ort-cpu-fp32",
        "ort-int8": "ort-cpu-int8",
    }


def test_the_registry_says_what_each_backend_is() -> None:
    assert "ort-cuda-int8" not in BACKENDS  # a QDQ model on the CUDA EP runs in FP32
    for backend in BACKENDS.values():
        assert backend.runtime in ("onnxruntime", "tensorrt") and backend.device in ("cpu", "cuda")
        assert (backend.provider is None) == backend.engine
        assert backend.name.endswith(backend.precision)


def test_bad_requests_are_refused(fp32: Path, tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="ort-cpu-int8"):
        build(fp32, "ort-int4")
    with pytest.raises(BadInput, match="not found"):
        build(tmp_path / "missing.onnx", "ort-int8")
    with pytest.raises(BadInput, match="--recipe"):
        build(fp32, "ort-cpu-int8")  # INT8 without calibration images
    with pytest.raises(BadInput, match="percentile"):
        build(
            fp32,
            "ort-int8",
            calib_images=_calibration(),
            calib_method="histogram",
            out=tmp_path / "x.int8.onnx",
        )


def test_ort_fp32_keeps_or_copies(fp32: Path, tmp_path: Path) -> None:
    assert build(fp32, "ort-fp32") == fp32
    copy = build(fp32, "ort-cpu-fp32", out=tmp_path / "copy.onnx")
    assert copy.read_bytes() == fp32.read_bytes()


def test_tensorrt_backends_fail_before_calibrating(fp32: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)

    def untouched() -> Iterator[np.ndarray]:
        raise AssertionError("calibration images were read")
        yield  # a generator

    for backend in ("trt-fp32", "trt-fp16", "trt-int8"):
        with pytest.raises(BackendUnavailable, match="TensorRT is not installed"):
            build(fp32, backend, calib_images=untouched())


def test_ort_int8_is_uint8_asymmetric(fp32: Path, tmp_path: Path) -> None:
    out = build(fp32, "ort-int8", calib_images=_calibration(), out=tmp_path / "m.int8.onnx")
    model = onnx.load(str(out))
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    zero_points = [values[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert zero_points and all(z.dtype == np.uint8 for z in zero_points)
    meta = read_metadata(out)
    assert meta["precision"] == "int8" and meta["calib_images"] == 4
    assert meta["activations"] == "uint8-asymmetric" and meta["class_names"][0] == "c0"


def test_tensorrt_int8_model_parses_by_tensorrts_rules(fp32: Path) -> None:
    """The model trt-int8 and ort-trt-int8 run: no INT32 bias DQ, INT8, zero point 0, fusable."""
    qdq = build(fp32, "ort-trt-int8", calib_images=_calibration())
    assert qdq.name == "m.qdq.onnx"
    model = onnx.load(str(qdq))
    assert check_tensorrt_qdq(model) == [] and fusion_advice(model) == []
    bias_dqs = [
        n
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0].endswith("_quantized") and "bias" in n.input[0]
    ]
    assert bias_dqs == []
    assert read_metadata(qdq)["activations"] == "int8-symmetric"


def test_trt_int8_refuses_the_onnx_runtime_model_before_any_gpu(
    fp32: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uint8 = build(fp32, "ort-int8", calib_images=_calibration(), out=tmp_path / "m.int8.onnx")
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BadInput) as error:
        build(uint8, "trt-int8")
    message = str(error.value)
    assert "UINT8" in message and "ort-cpu-int8" in message
    assert f"fakd-deploy build {tmp_path / 'm.onnx'} --backend trt-int8" in message
    assert "m.qdq.onnx" in message


def test_quantized_input_is_refused_for_float_backends(fp32: Path, tmp_path: Path) -> None:
    out = build(fp32, "ort-int8", out=tmp_path / "m.int8.onnx", calib_images=_calibration())
    for backend in ("ort-int8", "ort-cuda-fp16", "ort-cpu-fp32"):
        with pytest.raises(BadInput, match="already quantized"):
            build(out, backend, out=tmp_path / "again.onnx", calib_images=_calibration())


def test_fp16_artifact_keeps_fp32_io_and_agrees(fp32: Path, tmp_path: Path) -> None:
    half = build(fp32, "ort-cuda-fp16", out=tmp_path / "m.fp16.onnx")
    model = onnx.load(str(half))
    assert any(t.data_type == TensorProto.FLOAT16 for t in model.graph.initializer)
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    x = _calibration(1)[0]
    expected, actual = OrtPredictor(fp32)(x), OrtPredictor(half)(x)
    assert actual.dtype == np.float32 and actual.shape == expected.shape
    assert float(np.abs(actual - expected).max()) < 0.01 * float(np.ptp(expected))


def test_int8_keeps_the_logits_in_float(fp32: Path, tmp_path: Path) -> None:
    """ONNX Runtime's UINT8 model keeps the classifier and what follows in float; TensorRT's
    quantizes the classifier's inputs as Model Optimizer does, never its output (the logits)."""
    model = onnx.load(str(fp32))
    tail = [node.op_type for node in model.graph.node if node.name in tail_nodes(model)]
    assert tail.count("Resize") == 1 and tail.count("Conv") == 1
    for backend, name in (("ort-int8", "t.int8.onnx"), ("ort-trt-int8", "t.qdq.onnx")):
        quantized = onnx.load(str(build(fp32, backend, calib_images=_calibration(), out=tmp_path / name)))
        producers = {o: n for n in quantized.graph.node for o in n.output}
        last = producers[quantized.graph.output[0].name]
        assert last.op_type == "Resize"
        classifier = producers[last.input[0]]
        assert classifier.op_type == "Conv"  # the logits come straight from it: never quantized
        weight = producers.get(classifier.input[1])
        assert (weight is not None and weight.op_type == "DequantizeLinear") == (backend == "ort-trt-int8")
        assert Artifact.open(tmp_path / name).quantized


_TRAINED: dict[str, object] = {}


def _trained_student() -> tuple[object, nn.Module]:
    """ResidualSegmenter fitted for seconds to the synthetic training split (no augmentation)."""
    if not _TRAINED:
        from fakd_deploy.data.splits import val_dataset
        from fakd_deploy.recipe import DataConfig

        data = DataConfig(
            name="synthetic", options={"num_images": 32, "size": 64, "num_classes": 6}, crop=(64, 64)
        )
        train = val_dataset(data, data.train_split)
        pairs = [train[i] for i in range(len(train))]
        images = torch.from_numpy(np.stack([image for image, _ in pairs]))
        masks = torch.from_numpy(np.stack([mask for _, mask in pairs])).long()
        model = ResidualSegmenter(num_classes=6, width=16).train()  # 16 channels: INT8 by the rules
        optimiser = torch.optim.Adam(model.parameters(), lr=0.01)
        for _ in range(12):
            for start in range(0, len(images), 8):
                logits = nn.functional.interpolate(
                    model(images[start : start + 8]), masks.shape[-2:], mode="bilinear", align_corners=False
                )
                loss = nn.functional.cross_entropy(logits, masks[start : start + 8], ignore_index=255)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
        _TRAINED.update(data=data, model=model.eval())
    return _TRAINED["data"], _TRAINED["model"]


@pytest.mark.parametrize(
    "method",
    [
        "minmax",
        pytest.param("entropy", marks=pytest.mark.slow),
        pytest.param("percentile", marks=pytest.mark.slow),
    ],
)
def test_int8_miou_close_to_fp32_through_evaluate(tmp_path: Path, method: str) -> None:
    """Both INT8 flavours, run by ONNX Runtime on CPU, keep the FP32 mIoU of a trained student."""
    from fakd_deploy.data.splits import ValBatches, calibration_images, dataset_info
    from fakd_deploy.evaluate import evaluate

    data, model = _trained_student()
    onnx_path = tmp_path / "s.onnx"
    export_onnx(model, onnx_path, 64, 64, parity_batches=[torch.randn(1, 3, 64, 64)])
    calib = list(calibration_images(data, 8))
    artifacts = {
        "fp32": onnx_path,
        "ort-uint8": build(onnx_path, "ort-cpu-int8", calib, method),
        "tensorrt-qdq": build(onnx_path, "ort-trt-int8", calib, method),
    }
    num_classes, _ = dataset_info(data)

    def torch_predictor(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(x)).numpy()

    score = {"torch": evaluate(torch_predictor, ValBatches(data), num_classes)["miou"]}
    score |= {
        name: evaluate(OrtPredictor(path), ValBatches(data), num_classes)["miou"]
        for name, path in artifacts.items()
    }
    assert score["torch"] > 40  # it learned something, so the comparison means something
    assert abs(score["fp32"] - score["torch"]) < 0.01
    assert abs(score["ort-uint8"] - score["fp32"]) < 1.0
    assert abs(score["tensorrt-qdq"] - score["fp32"]) < 1.0
