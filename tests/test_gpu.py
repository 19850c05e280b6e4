"""On a CUDA machine: TensorRT engines and ONNX Runtime GPU backends against ONNX Runtime on CPU.

Every test is marked `gpu` and skips (saying why) without TensorRT, onnxruntime-gpu or a
visible GPU. The fixtures live here: the models are built with onnx.helper, so no other
test module is imported.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx_graphs import onnx_segmenter

from fakd_deploy.deploy import cuda
from fakd_deploy.deploy.build import build
from fakd_deploy.deploy.measure import measure_gpu_compute, measure_latency
from fakd_deploy.deploy.ort import OrtPredictor
from fakd_deploy.deploy.rows import Latency
from fakd_deploy.deploy.runtime import open_backend, unavailable_reason
from fakd_deploy.deploy.trt import EngineMismatch, TrtPredictor, load_sidecar, sidecar_path

pytestmark = pytest.mark.gpu
NO_GPU = cuda.no_gpu_reason()
NO_TRT = "tensorrt is not installed" if importlib.util.find_spec("tensorrt") is None else NO_GPU
needs_trt = pytest.mark.skipif(NO_TRT is not None, reason=f"needs TensorRT and a GPU: {NO_TRT}")
SIZE = (64, 96)


def _images(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 3, *SIZE)).astype(np.float32)


@pytest.fixture(params=[2, "batch"], ids=["static-batch-2", "dynamic-batch"])
def fp32(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    path = tmp_path / "m.onnx"
    onnx.save(onnx_segmenter(request.param, SIZE, channels=16, aspp=False), str(path))
    return path


def _calibration() -> list[np.ndarray]:
    return [image[None] for image in _images(8, seed=1)]


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.argmax(1) == b.argmax(1)).mean())


@needs_trt
@pytest.mark.parametrize(("precision", "minimum"), [("fp32", 0.999), ("fp16", 0.98)])
def test_engines_match_onnx_runtime_on_cpu(fp32: Path, precision: str, minimum: float) -> None:
    engine = build(fp32, f"trt-{precision}")
    sidecar = load_sidecar(engine)
    assert sidecar["precision"] == precision and sidecar["trtexec"].startswith("trtexec --onnx=")
    images = _images(3)
    expected = OrtPredictor(fp32)(images)
    actual = open_backend(engine, f"trt-{precision}")(images)
    assert actual.shape == expected.shape and actual.dtype == np.float32
    assert _agreement(actual, expected) > minimum


@needs_trt
def test_int8_engine_runs_its_qdq_model_as_onnx_runtime_does(fp32: Path) -> None:
    engine = build(fp32, "trt-int8", calib_images=_calibration())
    qdq = fp32.with_name("m.qdq.onnx")
    images = _images(3, seed=5)
    on_cpu = OrtPredictor(qdq)(images)
    on_gpu = TrtPredictor(engine)(images)
    assert _agreement(on_gpu, on_cpu) > 0.97
    assert _agreement(on_gpu, OrtPredictor(fp32)(images)) > 0.95


@needs_trt
def test_engine_from_another_gpu_is_refused(fp32: Path) -> None:
    engine = build(fp32, "trt-fp16")
    sidecar = json.loads(sidecar_path(engine).read_text())
    sidecar.update(gpu="Orin", compute_capability="8.7")
    sidecar_path(engine).write_text(json.dumps(sidecar))
    with pytest.raises(EngineMismatch, match="Orin"):
        TrtPredictor(engine)


@needs_trt
def test_tensorrt_bench_numbers_gpu_compute_below_host_latency(fp32: Path) -> None:
    predictor = TrtPredictor(build(fp32, "trt-fp16"))
    image = _images(1)
    host = Latency.of(measure_latency(predictor, image, warmup_s=0.2, seconds=0.5))
    compute = measure_gpu_compute(predictor, image, warmup_s=0.2, seconds=0.5)
    assert compute is not None and min(compute) > 0
    assert Latency.of(compute).p50 <= host.p50


@pytest.mark.parametrize("backend", ["ort-cuda-fp32", "ort-cuda-fp16", "ort-trt-fp16", "ort-trt-int8"])
def test_onnx_runtime_gpu_backends_run_what_they_say(fp32: Path, backend: str) -> None:
    reason = unavailable_reason(backend)
    if reason:
        pytest.skip(reason)
    artifact = build(fp32, backend, calib_images=_calibration())
    predictor = open_backend(artifact, backend)
    expected = "TensorrtExecutionProvider" if backend.startswith("ort-trt") else "CUDAExecutionProvider"
    assert predictor.providers[0] == expected
    images = _images(3, seed=2)
    assert _agreement(predictor(images), OrtPredictor(fp32)(images)) > 0.95
    compute = measure_gpu_compute(predictor, images[:1], warmup_s=0.1, seconds=0.2)
    assert compute is not None and min(compute) > 0
