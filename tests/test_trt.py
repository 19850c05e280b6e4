"""TensorRT: the pure-Python parts everywhere, engines only where a GPU and TensorRT exist."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from fakd_deploy.deploy import BackendUnavailable
from fakd_deploy.deploy.trt import (
    INSTALL_HINT,
    EngineMismatch,
    builder_flags,
    check_compatible,
    import_tensorrt,
    load_sidecar,
    profile_shapes,
    sidecar_path,
)

HAS_TRT = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()
ORIN = {"gpu": "Orin", "compute_capability": "8.7", "tensorrt": "10.3.0"}
H100 = {"gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "tensorrt": "10.8.0.43"}


def test_flags_per_precision() -> None:
    assert builder_flags("fp32") == []
    assert builder_flags("fp16") == ["FP16"]
    assert builder_flags("int8") == ["INT8", "FP16"]
    with pytest.raises(ValueError, match="bf8"):
        builder_flags("bf8")


def test_profile_for_dynamic_batch_only() -> None:
    assert profile_shapes((1, 3, 360, 480)) is None
    assert profile_shapes((-1, 3, 360, 480), opt_batch=2, max_batch=4) == (
        (1, 3, 360, 480), (2, 3, 360, 480), (4, 3, 360, 480))
    with pytest.raises(ValueError, match="only the batch"):
        profile_shapes((-1, 3, -1, 480))
    with pytest.raises(ValueError, match="opt_batch"):
        profile_shapes((-1, 3, 8, 8), opt_batch=9, max_batch=8)


def test_sidecar_accepts_the_same_machine() -> None:
    check_compatible({**ORIN, "precision": "fp16"}, ORIN, "m.fp16.engine")


@pytest.mark.parametrize("change", ["gpu", "compute_capability", "tensorrt"])
def test_sidecar_refuses_another_machine(change: str) -> None:
    here = {**ORIN, change: H100[change]}
    with pytest.raises(EngineMismatch) as error:
        check_compatible({**ORIN, "precision": "fp16", "onnx": "m.onnx"}, here, "m.fp16.engine")
    message = str(error.value)
    assert "m.fp16.engine" in message and "rebuild" in message
    for machine in (ORIN, here):  # both sides are named
        assert machine["gpu"] in message and machine["tensorrt"] in message
        assert machine["compute_capability"] in message
    assert "--backend trt-fp16" in message


def test_missing_sidecar_is_explained(tmp_path: Path) -> None:
    engine = tmp_path / "m.fp16.engine"
    assert sidecar_path(engine).name == "m.fp16.engine.json"
    with pytest.raises(BackendUnavailable, match="no sidecar"):
        load_sidecar(engine)


def test_missing_tensorrt_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails as if not installed
    with pytest.raises(BackendUnavailable) as error:
        import_tensorrt()
    assert str(error.value) == INSTALL_HINT


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TRT, reason="needs TensorRT and a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_matches_onnx_runtime(tmp_path: Path, precision: str) -> None:
    from fakd_deploy.deploy.build import build
    from fakd_deploy.deploy.export import export_onnx
    from fakd_deploy.deploy.ort import OrtPredictor
    from fakd_deploy.deploy.trt import TrtPredictor
    from tests.test_export import TinySegmenter

    onnx_path = tmp_path / "m.onnx"
    export_onnx(TinySegmenter(), onnx_path, 64, 96, dynamic=True)
    engine = build(onnx_path, f"trt-{precision}")
    assert sidecar_path(engine).exists()
    images = torch.randn(3, 3, 64, 96)
    expected = OrtPredictor(onnx_path, providers=["CPUExecutionProvider"])(images)
    actual = TrtPredictor(engine)(images)
    assert actual.shape == expected.shape
    agreement = (actual.argmax(1) == expected.argmax(1)).float().mean().item()
    assert agreement > (0.999 if precision == "fp32" else 0.98)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TRT, reason="needs TensorRT and a CUDA GPU")
def test_int8_engine_from_qdq(tmp_path: Path) -> None:
    from fakd_deploy.deploy.build import build
    from fakd_deploy.deploy.export import export_onnx
    from fakd_deploy.deploy.trt import TrtPredictor
    from tests.test_export import TinySegmenter

    onnx_path = tmp_path / "m.onnx"
    export_onnx(TinySegmenter(), onnx_path, 64, 96)
    engine = build(onnx_path, "trt-int8", calib_batches=[torch.randn(1, 3, 64, 96)] * 4)
    assert (tmp_path / "m.trt-int8.onnx").exists()
    assert TrtPredictor(engine)(torch.randn(2, 3, 64, 96)).shape == (2, 5, 64, 96)
