"""ONNX Runtime backends: provider choice and options, honest labels, numpy Predictors, timing.

The GPU cases run on the stand-ins of tests/standins/ (onnxruntime-gpu around a real CPU session,
cuda-python with a simulated clock); each test names the real behaviour it relies on.
"""

from __future__ import annotations

import json
import sys
import typing
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper
from onnx import helper as oh
from standins.fake_cuda import FakeCudaRuntime
from standins.fake_onnxruntime import GpuOnnxRuntime
from standins.fake_tensorrt import FakeTensorRT

from fakd_deploy.deploy import backends, cuda
from fakd_deploy.deploy import ort as ort_module
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
from fakd_deploy.deploy.rows import Status
from fakd_deploy.deploy.runtime import open_backend, placement_problem, unavailable_reason
from fakd_deploy.errors import BackendUnavailable, BadInput
from fakd_deploy.predictor import GpuTimed, run_fixed_batch
from fakd_deploy.recipe import BackendName

GPU_PROVIDERS = [TENSORRT, CUDA, CPU]


def _model(batch: int | str = 1, argmax: bool = False, seed: int = 0, width: int = 4) -> onnx.ModelProto:
    """images -> Conv (3 -> width) -> Relu -> 1x1 classifier (4 classes) [-> ArgMax]."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.standard_normal((width, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(np.zeros(width, np.float32), "bw"),
        numpy_helper.from_array(rng.standard_normal((4, width, 1, 1)).astype(np.float32), "wc"),
        numpy_helper.from_array(np.zeros(4, np.float32), "b"),
    ]
    nodes = [
        oh.make_node("Conv", ["images", "w", "bw"], ["features"], name="conv", pads=[1] * 4),
        oh.make_node("Relu", ["features"], ["relu"], name="relu"),
        oh.make_node("Conv", ["relu", "wc", "b"], ["logits"], name="classifier"),
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
        resolve_backend("ort-cpu-fp64")
    assert all(name in str(error.value) for name in BACKENDS)
    assert "did you mean 'ort-cpu-fp32'" in str(error.value)


def test_provider_options_per_backend(tmp_path: Path) -> None:
    artifact = tmp_path / "m.qdq.onnx"
    assert provider_options(CPU, artifact) == [(CPU, {})]
    cuda_list = provider_options(CUDA, artifact, device_id=1, stream=1234)
    assert cuda_list == [(CUDA, {"device_id": "1", "user_compute_stream": "1234"}), (CPU, {})]
    trt_list = provider_options(TENSORRT, artifact, "int8", stream=99, workspace_gb=1.0, sha256="ab" * 32)
    assert [name for name, _ in trt_list] == [TENSORRT, CUDA, CPU]
    options = trt_list[0][1]
    assert options["trt_engine_cache_enable"] == "True"
    assert Path(options["trt_engine_cache_path"]) == tmp_path / "m.qdq.onnx.ort-trt-cache" / ("ab" * 8)
    assert options["trt_timing_cache_path"] == options["trt_engine_cache_path"]
    assert (options["trt_int8_enable"], options["trt_fp16_enable"]) == ("True", "True")
    assert options["trt_max_workspace_size"] == str(2**30) and options["user_compute_stream"] == "99"
    fp16 = provider_options(TENSORRT, artifact, "fp16", sha256="cd" * 32)[0][1]
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
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT("10.3.0"))
    monkeypatch.setattr(ort, "__version__", "1.22.0")
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


def _gpu_onnxruntime(monkeypatch: pytest.MonkeyPatch, tensorrt: str | None = "10.3.0", **options: Any) -> Any:
    """onnxruntime-gpu (the stand-in) on one simulated GPU, with TensorRT `tensorrt` importable."""
    cudart = FakeCudaRuntime()
    monkeypatch.setattr(cuda, "runtime", lambda: cudart)
    fake = GpuOnnxRuntime(ort, cudart, **options)
    monkeypatch.setattr(ort_module, "ort", fake)
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT(tensorrt) if tensorrt else None)
    return fake


def test_a_listed_tensorrt_provider_is_probed_before_it_is_called_runnable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every onnxruntime-gpu build lists TensorrtExecutionProvider, loadable or not (onnxruntime
    #13501); its provider library links libnvinfer.so.10 up to 1.26 and .so.11 from 1.27."""
    fake = _gpu_onnxruntime(monkeypatch, tensorrt=None)
    assert TENSORRT in fake.get_available_providers()

    def no_library(name: str) -> None:
        raise OSError(f"{name}: cannot open shared object file: No such file or directory")

    monkeypatch.setattr(ort_module.ctypes, "CDLL", no_library)
    reason = unavailable_reason("ort-trt-fp16")
    assert reason is not None and "libnvinfer.so.10" in reason and "TensorRT 10" in reason
    assert unavailable_reason("ort-cuda-fp32") is None  # the CUDA provider needs no TensorRT
    _gpu_onnxruntime(monkeypatch, tensorrt="10.3.0", version="1.27.0")
    reason = unavailable_reason("ort-trt-int8")
    assert reason is not None and "TensorRT 11" in reason and "10.3.0" in reason
    _gpu_onnxruntime(monkeypatch, tensorrt="11.4.0.106", version="1.27.0")
    assert unavailable_reason("ort-trt-int8") is None


def test_a_tensorrt_session_never_falls_back_quietly(fp32: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With fallback on (the default), a TensorRT session whose provider cannot start is recreated
    on CUDA + CPU with a print (onnxruntime_inference_collection.py); the row would measure CUDA."""
    _gpu_onnxruntime(monkeypatch, libnvinfer=False)
    with pytest.raises(BackendUnavailable, match="could not start TensorrtExecutionProvider"):
        open_backend(fp32, "ort-trt-fp16")


def test_a_model_rewritten_in_place_does_not_load_a_stale_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The TensorRT provider names cached engines by file name and tensor names, not weights
    (`TRTGenerateId`): re-exporting X.onnx in place must not run the engine of the old file."""
    fake = _gpu_onnxruntime(monkeypatch)
    path = tmp_path / "m.onnx"
    x = np.random.default_rng(4).standard_normal((1, 3, 8, 8)).astype(np.float32)
    for seed in (0, 1):
        onnx.save(_model(seed=seed), str(path))
        np.testing.assert_allclose(open_backend(path, "ort-trt-fp16")(x), OrtPredictor(path)(x), rtol=1e-5)
    assert len(fake.engines_built) == 2 and len(set(fake.engines_built)) == 2
    open_backend(path, "ort-trt-fp16")(x)
    assert len(fake.engines_built) == 2  # the same file again: the cached engine is loaded


def test_a_static_batch_model_is_timed_at_its_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch-2 model refuses one image ("Got invalid dimensions for input", as ONNX Runtime's
    CPU session itself says here), under IO binding too: the image is padded to two."""
    _gpu_onnxruntime(monkeypatch)
    onnx.save(_model(batch=2), str(tmp_path / "b2.onnx"))
    predictor = open_backend(tmp_path / "b2.onnx", "ort-cuda-fp32")
    one = np.zeros((1, 3, 8, 8), np.float32)
    assert predictor(one).shape == (1, 4, 8, 8)
    assert len(measure_gpu_compute(predictor, one, warmup_s=0.0, seconds=0.0, iters=3) or []) == 3


def test_gpu_compute_is_not_the_hosts_run_time(fp32: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`run` synchronises the compute stream before returning unless the run option
    disable_synchronize_execution_providers=1 is set (onnxruntime_run_options_config_keys.h):
    with it, runs queue back to back and the events time the 2 ms of GPU work each run takes,
    not the 1 ms the host spends issuing it on an idle GPU (3 ms)."""
    fake = _gpu_onnxruntime(monkeypatch)
    predictor = open_backend(fp32, "ort-cuda-fp32")
    image = np.zeros((1, 3, 8, 8), np.float32)
    predictor(image)
    fake.cudart.calls.clear()
    times = measure_gpu_compute(predictor, image, warmup_s=0.0, seconds=0.0, iters=5)
    assert times == pytest.approx([2.0] * 5)
    assert ("sync", predictor.stream.handle) not in fake.cudart.calls[:-1]  # only the final one


def test_placement_says_where_the_nodes_ran(fp32: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`get_providers()` lists the TensorRT provider although the Relu ran on CUDA; the profile
    of the first run says so (one fused TensorRT node, one CUDA node), and profiling stops."""
    _gpu_onnxruntime(monkeypatch, cuda_ops=("Relu",))
    engine = open_backend(fp32, "ort-trt-fp16")
    assert engine.providers[0] == TENSORRT and engine.placement is None
    image = np.zeros((1, 3, 8, 8), np.float32)
    engine(image)
    assert engine.placement == {TENSORRT: 0.5, CUDA: 0.5}
    assert placement_problem("ort-trt-fp16", engine.placement) == (
        "nodes ran off TensorrtExecutionProvider: CUDAExecutionProvider 50.0%"
    )
    engine(image)
    assert engine.placement == {TENSORRT: 0.5, CUDA: 0.5} and engine.session.profile is None
    assert placement_problem("ort-cuda-fp32", {CUDA: 1.0}) is None


def test_a_bench_row_whose_nodes_left_its_provider_is_marked(
    artifacts: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CUDA row whose Resize ran on the CPU keeps its numbers and placement but is not `ok`,
    so no delta, Pareto front or pick uses it; with every node on CUDA the row is `ok`."""
    from fakd_deploy.deploy.bench import bench

    model = tmp_path / "student.onnx"
    model.write_bytes(artifacts["onnx"].read_bytes())
    rows = {}
    for cpu_ops in ((), ("Resize",)):
        _gpu_onnxruntime(monkeypatch, cpu_ops=cpu_ops)
        report, _ = bench([model], ["ort-cuda-fp32"], out=tmp_path / f"report{len(cpu_ops)}", seconds=0.0)
        rows[cpu_ops] = report.rows[0]
    clean, mixed = rows[()], rows[("Resize",)]
    assert clean.status is Status.OK and clean.placement == {CUDA: 1.0} and clean.gpu_compute_ms is not None
    assert mixed.status is Status.OFF_PROVIDER and not mixed.ok
    assert mixed.placement is not None and mixed.placement[CPU] > 0 and mixed.latency_ms is not None
    assert "nodes ran off CUDAExecutionProvider: CPUExecutionProvider" in (mixed.error or "")
    saved = json.loads((tmp_path / "report1" / "report.json").read_text())["rows"][0]
    assert saved["status"] == "ran off its provider" and saved["placement"] == mixed.placement


def test_no_fp16_qdq_model_is_scored_on_the_cpu(fp32: Path, tmp_path: Path) -> None:
    """ONNX Runtime's CPU provider mis-runs Q/DQ models with an FP16 remainder (Model Optimizer's
    default output scored 64.85 against 68.03 mIoU for the same model with
    session.disable_quant_qdq=1): such a model, X.qdq.fp16.onnx included, is refused there."""
    from fakd_deploy.deploy.build import write_fp16
    from fakd_deploy.deploy.quantize import quantize_tensorrt_int8

    rng = np.random.default_rng(1)
    wide = tmp_path / "w.onnx"
    onnx.save(_model(width=16), str(wide))  # 16 channels: the placement rules quantize it
    calibration = [rng.standard_normal((1, 3, 8, 8)).astype(np.float32) for _ in range(2)]
    qdq = quantize_tensorrt_int8(wide, tmp_path / "w.qdq.onnx", calibration)
    half = write_fp16(qdq, tmp_path / "w.qdq.fp16.onnx")
    open_backend(qdq, "ort-cpu-int8")(np.zeros((1, 3, 8, 8), np.float32))  # the FP32 remainder runs
    with pytest.raises(BadInput, match=r"FP16 remainder.*w\.qdq\.onnx on the CPU"):
        open_backend(half, "ort-cpu-int8")
