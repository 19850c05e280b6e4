"""build: the backend registry, INT8 quantization and its accuracy through `evaluate`."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from test_export import TinySegmenter

from fakd_deploy.deploy import BackendUnavailable
from fakd_deploy.deploy.build import BACKENDS, artifact_path, build
from fakd_deploy.deploy.export import export_onnx, read_metadata
from fakd_deploy.deploy.ort import OrtPredictor
from fakd_deploy.deploy.quantize import is_quantized, quantize_int8, tail_nodes
from fakd_deploy.evaluate import TorchPredictor, evaluate


@pytest.fixture(scope="module")
def fp32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("build") / "m.onnx"
    export_onnx(TinySegmenter(), path, 32, 48, parity_batches=[torch.randn(1, 3, 32, 48)])
    return path


def _calibration(count: int = 4) -> list[torch.Tensor]:
    torch.manual_seed(1)
    return [torch.randn(1, 3, 32, 48) for _ in range(count)]


def test_artifact_names_follow_the_run_layout() -> None:
    names = {backend: artifact_path("deploy/kd.onnx", backend).name for backend in BACKENDS}
    assert names == {"ort-fp32": "kd.onnx", "ort-int8": "kd.int8.onnx",
                     "trt-fp32": "kd.fp32.engine", "trt-fp16": "kd.fp16.engine",
                     "trt-int8": "kd.int8.engine"}
    assert artifact_path("deploy/kd.int8.onnx", "trt-int8").name == "kd.int8.engine"


def test_bad_requests_are_refused(fp32: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ort-int8"):
        build(fp32, "ort-int4")
    with pytest.raises(FileNotFoundError):
        build(tmp_path / "missing.onnx", "ort-int8")


def test_ort_fp32_keeps_or_copies(fp32: Path, tmp_path: Path) -> None:
    assert build(fp32, "ort-fp32") == fp32
    copy = build(fp32, "ort-fp32", out=tmp_path / "copy.onnx")
    assert copy.read_bytes() == fp32.read_bytes()


def test_tensorrt_backends_fail_before_calibrating(fp32: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)

    def untouched() -> Iterator[torch.Tensor]:
        raise AssertionError("calibration images were read")
        yield  # a generator

    for backend in ("trt-fp32", "trt-fp16", "trt-int8"):
        with pytest.raises(BackendUnavailable, match="TensorRT is not installed"):
            build(fp32, backend, calib_batches=untouched())


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.mark.parametrize("symmetric", [False, True])
def test_int8_flavours(fp32: Path, tmp_path: Path, symmetric: bool) -> None:
    out = quantize_int8(fp32, tmp_path / "q.onnx", _calibration(), "minmax", symmetric=symmetric)
    assert is_quantized(out) and not is_quantized(fp32)
    model = onnx.load(str(out))
    values = _initializers(model)
    activation_zero_points = [values[n.input[2]] for n in model.graph.node
                              if n.op_type == "QuantizeLinear"]
    assert activation_zero_points
    for zero_point in activation_zero_points:
        if symmetric:  # what TensorRT accepts: int8 with zero point 0
            assert zero_point.dtype == np.int8 and not zero_point.any()
        else:
            assert zero_point.dtype == np.uint8
    meta = read_metadata(out)
    assert meta["precision"] == "int8" and meta["calib_method"] == "minmax"
    assert meta["num_classes"] == 5 and meta["calib_images"] == 4


def test_int8_keeps_the_logit_tail_in_float(fp32: Path, tmp_path: Path) -> None:
    model = onnx.load(str(fp32))
    tail = [node.op_type for node in model.graph.node if node.name in tail_nodes(model)]
    assert tail.count("Resize") == 1 and tail.count("Conv") == 1
    out = quantize_int8(fp32, tmp_path / "q.onnx", _calibration(), "minmax")
    quantized = onnx.load(str(out))
    producers = {o: n for n in quantized.graph.node for o in n.output}
    last = producers[quantized.graph.output[0].name]
    assert last.op_type == "Resize"
    classifier = producers[last.input[0]]
    assert classifier.op_type == "Conv"  # float logits, no Q/DQ pair between
    assert classifier.input[1] not in producers  # float weights straight from an initializer


def test_quantized_input_is_refused_for_ort(fp32: Path, tmp_path: Path) -> None:
    out = build(fp32, "ort-int8", out=tmp_path / "m.int8.onnx", calib_batches=_calibration())
    with pytest.raises(ValueError, match="already quantized"):
        build(out, "ort-int8", out=tmp_path / "again.int8.onnx", calib_batches=_calibration())


def test_unknown_calibration_method(fp32: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="percentile"):
        quantize_int8(fp32, tmp_path / "q.onnx", _calibration(), "histogram")


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_int8_miou_close_to_fp32_through_evaluate(tmp_path: Path, method: str) -> None:
    """Trained-for-seconds student on the synthetic data; every backend scored by `evaluate`."""
    from fakd_deploy.loaders import calibration_batches, dataset_info, val_loader

    data, model = _trained_student()
    onnx_path = tmp_path / "s.onnx"
    export_onnx(model, onnx_path, 64, 64, parity_batches=val_loader(data, max_images=4))
    int8 = build(onnx_path, "ort-int8", calib_batches=calibration_batches(data, 8),
                 calib_method=method)
    num_classes, _ = dataset_info(data)
    score = {name: evaluate(predictor, val_loader(data), num_classes)["miou"] for name, predictor
             in {"torch": TorchPredictor(model), "fp32": OrtPredictor(onnx_path),
                 "int8": OrtPredictor(int8)}.items()}
    assert abs(score["fp32"] - score["torch"]) < 0.01
    assert score["torch"] > 40  # it learned something, so the comparison means something
    assert abs(score["int8"] - score["fp32"]) < 3.0
    images, _ = next(iter(val_loader(data)))
    agreement = (OrtPredictor(int8)(images).argmax(1)
                 == OrtPredictor(onnx_path)(images).argmax(1)).float().mean().item()
    assert agreement > 0.97


_TRAINED: dict[str, object] = {}


def _trained_student() -> tuple[object, torch.nn.Module]:
    """A tiny student fitted to the synthetic training split (no augmentation: deterministic)."""
    if not _TRAINED:
        from fakd_deploy.loaders import dataset, dataset_info
        from fakd_deploy.recipe import parse_recipe

        data = parse_recipe({"name": "t", "data": {
            "name": "synthetic", "options": {"num_images": 32, "size": 64, "num_classes": 6},
            "crop": [64, 64], "batch_size": 8, "val_batch_size": 8}}).data
        num_classes, _ = dataset_info(data)
        torch.manual_seed(0)
        model = TinySegmenter(num_classes).train()
        optimiser = torch.optim.Adam(model.parameters(), lr=0.01)
        loader = torch.utils.data.DataLoader(dataset(data, data.train_split, train=False),
                                             batch_size=8, shuffle=True)
        for _ in range(20):
            for images, masks in loader:
                logits = torch.nn.functional.interpolate(model(images), masks.shape[-2:],
                                                         mode="bilinear", align_corners=False)
                loss = torch.nn.functional.cross_entropy(logits, masks, ignore_index=255)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
        _TRAINED.update(data=data, model=model.eval())
    return _TRAINED["data"], _TRAINED["model"]
