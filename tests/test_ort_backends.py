"""ONNX Runtime backends on CPU: provider choice and options, honest labels, numpy Predictors, timing."""

from __future__ import annotations

import typing
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper
from onnx import helper as oh

from fakd_deploy.deploy import backends, cuda
from fakd_deploy.deploy.backends import ALIASES, BACKENDS, resolve_backend
from fakd_deploy.deploy.measure import measure_gpu_compute, measure_latency
from fakd_deploy.deploy.ort import (
    CPU,
    CUDA,
    TENSORRT,
    OrtGpuPredictor,
    OrtPredictor,
    provider_options,
)
from fakd_deploy.deploy.quantize import quantize_ort_int8
from fakd_deploy.deploy.runtime import open_backend, unavailable_reason
from fakd_deploy.errors import BackendUnavailable, BadInput
from fakd_deploy.predictor import GpuTimed, run_fixed_batch
from fakd_deploy.recipe import BackendName

GPU_PROVIDERS = [TENSORRT, CUDA, CPU]


def _model(batch: int | str = 1, argmax: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal((4, 4, 1, 1)).astype(np.float32), "wc"),
        numpy_helper.from_array(np.zeros(4, np.float32), "b"),
    ]
    nodes = [
        oh.make_node("Conv", ["images", "w", "b"], ["features"], name="conv", pads=[1] * 4),
        oh.make_node("Conv", ["features", "wc", "b"], ["logits"], name="classifier"),
    ]
    output = oh.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 4, 8, 8])
    if argmax:
        nodes.append(oh.make_node("ArgMax", ["logits"], ["labels"], name="argmax", axis=1, keepdims=0))
        output = oh.make_tensor_value_info("labels", TensorProto.INT64, [batch, 8, 8])
    graph = oh.make_graph(
        nodes,
        "m",
        [oh.make_tensor_value_info("images", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [output],
        inits,
    )
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)], ir_version=10)


@pytest.fixture
def fp32(tmp_path: Path) -> Path:
    path = tmp_path / "m.onnx"
    onnx.save(_model(), str(path))
    return path


@pytest.fixture
def gpu_onnxruntime(monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime-gpu as it presents itself, and a visible GPU."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: list(GPU_PROVIDERS))
    monkeypatch.setattr(cuda, "no_gpu_reason", lambda: None)


def test_registry_matches_the_recipe_schema() -> None:
    assert set(typing.get_args(BackendName)) == set(BACKENDS) | set(ALIASES)


def test_unknown_backend_lists_the_choices() -> None:
    with pytest.raises(BadInput) as error:
        resolve_backend("ort-cuda-int8")
    assert all(name in str(error.value) for name in BACKENDS)


def test_provider_options_per_backend(tmp_path: Path) -> None:
    artifact = tmp_path / "m.qdq.onnx"
    assert provider_options(CPU, artifact) == [(CPU, {})]
    cuda_list = provider_options(CUDA, artifact, device_id=1, stream=1234)
    assert cuda_list == [(CUDA, {"device_id": "1", "user_compute_stream": "1234"}), (CPU, {})]
    trt_list = provider_options(TENSORRT, artifact, "int8", stream=99, workspace_gb=1.0)
    assert [name for name, _ in trt_list] == [TENSORRT, CUDA, CPU]
    options = trt_list[0][1]
    assert options["trt_engine_cache_enable"] == "True"
    assert Path(options["trt_engine_cache_path"]) == tmp_path / "m.qdq.onnx.ort-trt-cache"
    assert options["trt_timing_cache_path"] == options["trt_engine_cache_path"]
    assert (options["trt_int8_enable"], options["trt_fp16_enable"]) == ("True", "True")
    assert options["trt_max_workspace_size"] == str(2**30) and options["user_compute_stream"] == "99"
    fp16 = provider_options(TENSORRT, artifact, "fp16")[0][1]
    assert (fp16["trt_int8_enable"], fp16["trt_fp16_enable"]) == ("False", "True")


def test_cpu_backends_run_here_gpu_backends_say_why_not(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU])
    assert unavailable_reason("ort-cpu-fp32") is None and unavailable_reason("ort-int8") is None
    for name in ("ort-cuda-fp32", "ort-cuda-fp16", "ort-trt-fp16", "ort-trt-int8"):
        reason = unavailable_reason(name)
        assert reason and "onnxruntime-gpu" in reason
    monkeypatch.setattr(ort, "get_available_providers", lambda: list(GPU_PROVIDERS))
    monkeypatch.setattr(cuda, "no_gpu_reason", lambda: "no CUDA GPU is visible (test)")
    assert unavailable_reason("ort-cuda-fp32") == "no CUDA GPU is visible (test)"
    monkeypatch.setattr(cuda, "no_gpu_reason", lambda: None)
    assert unavailable_reason("ort-trt-int8") is None


def test_int8_model_is_never_opened_on_the_cuda_provider(
    fp32: Path, tmp_path: Path, gpu_onnxruntime: None
) -> None:
    rng = np.random.default_rng(1)
    int8 = quantize_ort_int8(
        fp32, tmp_path / "m.int8.onnx", [rng.standard_normal((1, 3, 8, 8)).astype(np.float32)]
    )
    for backend in ("ort-cuda-fp32", "ort-cuda-fp16"):
        with pytest.raises(BadInput, match="dequantize -> FP32"):
            open_backend(int8, backend)


def test_artifacts_must_be_what_the_backend_says(fp32: Path, tmp_path: Path, gpu_onnxruntime: None) -> None:
    with pytest.raises(BadInput, match="FP32 model but ort-cpu-int8 runs INT8"):
        open_backend(fp32, "ort-cpu-int8")
    with pytest.raises(BadInput, match=r"m\.fp16\.onnx"):
        open_backend(fp32, "ort-cuda-fp16")
    rng = np.random.default_rng(1)
    int8 = quantize_ort_int8(
        fp32, tmp_path / "m.int8.onnx", [rng.standard_normal((1, 3, 8, 8)).astype(np.float32)]
    )
    with pytest.raises(BadInput, match=r"not a Q/DQ model TensorRT accepts.*m\.qdq\.onnx"):
        open_backend(int8, "ort-trt-int8")
    with pytest.raises(BadInput, match="not found"):
        open_backend(tmp_path / "nothing.onnx", "ort-cpu-fp32")


@pytest.mark.skipif(
    CUDA in ort.get_available_providers(),
    reason="this onnxruntime has a CUDA provider; the fallback checked here is the CPU build's",
)
def test_a_session_that_fell_back_to_cpu_is_refused(fp32: Path) -> None:
    """The CPU build of onnxruntime drops an unknown CUDA provider with a warning; we do not."""
    with (
        pytest.warns(UserWarning, match="CUDAExecutionProvider"),
        pytest.raises(BackendUnavailable, match="could not start CUDAExecutionProvider"),
    ):
        OrtPredictor(fp32, provider_options(CUDA, fp32))


def test_gpu_backends_stop_where_they_cannot_run(fp32: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU])
    with pytest.raises(BackendUnavailable, match=r"ort-cuda-fp32: .*onnxruntime-gpu"):
        open_backend(fp32, "ort-cuda-fp32")


def test_cpu_predictor_is_numpy_in_numpy_out(fp32: Path, tmp_path: Path) -> None:
    predictor = open_backend(fp32, "ort-fp32", threads=1)
    out = predictor(np.zeros((1, 3, 8, 8), np.float32))
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (1, 4, 8, 8)
    assert not isinstance(predictor, GpuTimed)
    assert measure_gpu_compute(predictor, np.zeros((1, 3, 8, 8), np.float32)) is None
    onnx.save(_model(argmax=True), str(tmp_path / "a.onnx"))
    labels = open_backend(tmp_path / "a.onnx", "ort-cpu-fp32")(np.zeros((2, 3, 8, 8), np.float32))
    assert labels.dtype == np.int64 and labels.shape == (2, 8, 8)


def test_static_batch_is_split_and_padded(tmp_path: Path) -> None:
    onnx.save(_model(batch=2), str(tmp_path / "b2.onnx"))
    predictor = OrtPredictor(tmp_path / "b2.onnx")
    x = np.random.default_rng(3).standard_normal((3, 3, 8, 8)).astype(np.float32)
    onnx.save(_model(batch="n"), str(tmp_path / "dyn.onnx"))
    expected = OrtPredictor(tmp_path / "dyn.onnx")(x)
    assert predictor.static_batch == 2
    np.testing.assert_allclose(predictor(x), expected, atol=1e-5)


def test_run_fixed_batch_pads_with_zeros_and_trims() -> None:
    seen: list[tuple[int, ...]] = []

    def run(chunk: np.ndarray) -> np.ndarray:
        seen.append(chunk.shape)
        assert chunk.shape[0] == 2
        return chunk.sum(axis=(1, 2, 3))

    out = run_fixed_batch(run, np.ones((3, 1, 2, 2), np.float32), 2)
    assert seen == [(2, 1, 2, 2), (2, 1, 2, 2)] and out.tolist() == [4.0, 4.0, 4.0]


def test_gpu_predictors_offer_gpu_compute_timing() -> None:
    assert issubclass(OrtGpuPredictor, OrtPredictor)
    assert hasattr(OrtGpuPredictor, "gpu_compute_ms")

    class Stub:
        def __call__(self, images: np.ndarray) -> np.ndarray:
            return images

        def gpu_compute_ms(
            self, images: np.ndarray, warmup_s: float = 1.0, seconds: float = 3.0, iters: int | None = None
        ) -> list[float]:
            return [1.5] * (iters or 1)

    assert isinstance(Stub(), GpuTimed)
    assert measure_gpu_compute(Stub(), np.zeros((1, 3, 4, 4)), iters=3) == [1.5, 1.5, 1.5]


def test_host_latency_needs_no_framework() -> None:
    calls: list[int] = []
    times = measure_latency(
        lambda x: calls.append(1) or x, np.zeros(1), warmup_s=0.0, seconds=0.0, min_iters=5
    )
    assert len(times) == 5 and len(calls) == 6  # one untimed first call
    assert len(measure_latency(lambda x: x, np.zeros(1), 0.0, 10.0, iters=4)) == 4


def test_backend_table_in_the_module_doc_lists_every_backend() -> None:
    assert all(name in (backends.__doc__ or "") for name in BACKENDS)
