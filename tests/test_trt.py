"""TensorRT builds and engines on CPU, through stand-ins for `tensorrt` (10.x, 11.x) and cuda-python.

The stand-ins (tests/standins/) follow TensorRT's Python bindings (python/src/infer/pyCore.cpp,
v10.3.0 and v11.1), its headers and cuda-python's runtime module; each test says which
behaviour of the real library it relies on and where that behaviour is written down.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper
from onnx import helper as oh
from standins.fake_cuda import FakeCudaRuntime, cudaError_t
from standins.fake_tensorrt import FakeTensorRT, engine_output

from fakd_deploy.artifacts import Artifact
from fakd_deploy.deploy import cuda
from fakd_deploy.deploy import trt as trt_module
from fakd_deploy.deploy.build import build
from fakd_deploy.deploy.onnx_meta import write_metadata
from fakd_deploy.deploy.trt import (
    INSTALL_HINT,
    EngineMismatch,
    TrtPredictor,
    build_plan,
    check_compatible,
    import_tensorrt,
    load_sidecar,
    profile_shapes,
    sidecar_path,
)
from fakd_deploy.errors import ArtifactError, BackendUnavailable
from fakd_deploy.utils import file_sha256

H100 = {"gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
ORIN = {"gpu": "Orin", "compute_capability": "8.7", "tensorrt": "10.3.0"}


def _model(batch: int | str = 1) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((16, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(np.zeros(16, np.float32), "b1"),
        numpy_helper.from_array(rng.standard_normal((3, 16, 1, 1)).astype(np.float32), "w2"),
        numpy_helper.from_array(np.zeros(3, np.float32), "b2"),
    ]
    nodes = [
        oh.make_node("Conv", ["images", "w1", "b1"], ["c1"], name="c1", pads=[1] * 4),
        oh.make_node("Relu", ["c1"], ["r1"], name="r1"),
        oh.make_node("Conv", ["r1", "w2", "b2"], ["logits"], name="classifier"),
    ]
    graph = oh.make_graph(
        nodes,
        "m",
        [oh.make_tensor_value_info("images", TensorProto.FLOAT, [batch, 3, 16, 16])],
        [oh.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 3, 16, 16])],
        inits,
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)], ir_version=10)
    write_metadata(model, {"class_names": ["a", "b", "c"], "recipe": "name: t\n", "mean": [0.5] * 3})
    return model


@pytest.fixture
def fp32(tmp_path: Path) -> Path:
    path = tmp_path / "m.onnx"
    onnx.save(_model(), str(path))
    return path


def _calibration() -> list[np.ndarray]:
    rng = np.random.default_rng(2)
    return [rng.standard_normal((1, 3, 16, 16)).astype(np.float32) for _ in range(3)]


def _install(
    monkeypatch: pytest.MonkeyPatch, version: str, machine: dict[str, str] = H100, **cudart: Any
) -> FakeTensorRT:
    """The TensorRT stand-in as `import tensorrt`, on one simulated GPU of `machine`."""
    major, minor = machine["compute_capability"].split(".")
    runtime = FakeCudaRuntime(gpu=machine["gpu"], capability=(int(major), int(minor)), **cudart)
    fake = FakeTensorRT(version, cudart=runtime)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(cuda, "runtime", lambda: runtime)
    return fake


@pytest.mark.parametrize(
    ("version", "precision", "strongly_typed", "flags", "source"),
    [
        ("10.3.0", "fp32", False, (), "fp32"),
        ("10.3.0", "fp16", False, ("FP16",), "fp32"),
        ("10.3.0", "int8", False, ("INT8", "FP16"), "qdq"),
        ("11.4.0.106", "fp32", True, (), "fp32"),
        ("11.4.0.106", "fp16", True, (), "fp16"),
        ("11.4.0.106", "int8", True, (), "qdq-fp16"),
    ],
)
def test_build_plan_per_major(
    version: str, precision: str, strongly_typed: bool, flags: tuple[str, ...], source: str
) -> None:
    plan = build_plan(version, precision)
    assert (plan.strongly_typed, plan.flags, plan.source) == (strongly_typed, flags, source)
    assert plan.cleared == (("TF32",) if precision == "fp32" else ())


def test_unsupported_versions_and_precisions() -> None:
    with pytest.raises(BackendUnavailable, match=r"10\.x or 11\.x"):
        build_plan("9.3.0", "fp16")
    with pytest.raises(ValueError, match="bf8"):
        build_plan("10.3.0", "bf8")


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_tensorrt_10_sets_builder_flags_on_a_weakly_typed_network(
    fp32: Path, monkeypatch: pytest.MonkeyPatch, precision: str
) -> None:
    fake = _install(monkeypatch, "10.3.0")
    engine = build(fp32, f"trt-{precision}", calib_images=_calibration())
    assert engine.name == f"m.{precision}.engine" and json.loads(engine.read_bytes())["inputs"]
    assert fake.calls["network_flags"] == 0
    parsed = Path(fake.calls["parsed"])
    if precision == "int8":
        assert fake.calls["set_flag"] == ["INT8", "FP16"] and parsed.name == "m.qdq.onnx"
    else:
        assert fake.calls["set_flag"] == ["FP16"] and parsed.name == "m.onnx"
    sidecar = load_sidecar(engine)
    assert sidecar["mode"] == "builder flags" and sidecar["tensorrt"] == "10.3.0"
    flags = "--int8 --fp16" if precision == "int8" else "--fp16"
    assert sidecar["trtexec"] == (
        f"trtexec --onnx={parsed} --saveEngine={engine} {flags} "
        f"--memPoolSize=workspace:2048M "
        f"--timingCacheFile={engine.parent / 'trt-timing.cache'}"
    )
    assert fake.calls["pool"] == ("WORKSPACE", 2 * 2**30)


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_tensorrt_11_builds_strongly_typed_from_typed_onnx(
    fp32: Path, monkeypatch: pytest.MonkeyPatch, precision: str
) -> None:
    """NvInfer.h v11.1: kSTRONGLY_TYPED = 0 (deprecated, always on), so the flags are 1 << 0."""
    fake = _install(monkeypatch, "11.4.0.106")
    engine = build(fp32, f"trt-{precision}", calib_images=_calibration())
    assert fake.calls["set_flag"] == []  # FP16/INT8 flags do not exist in 11
    assert fake.calls["network_flags"] == 1 << 0
    parsed = Path(fake.calls["parsed"])
    assert parsed.name == {"fp32": "m.onnx", "fp16": "m.fp16.onnx", "int8": "m.qdq.fp16.onnx"}[precision]
    model = onnx.load(str(parsed))
    has_fp16 = any(t.data_type == TensorProto.FLOAT16 for t in model.graph.initializer)
    assert has_fp16 == (precision != "fp32")
    assert (precision == "int8") == any(n.op_type == "QuantizeLinear" for n in model.graph.node)
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT  # FP32 IO kept
    sidecar = load_sidecar(engine)
    assert sidecar["mode"] == "strongly typed"
    command = sidecar["trtexec"]
    assert "--fp16" not in command and "--int8" not in command and f"--onnx={parsed}" in command
    assert ("--noTF32" in command) == (precision == "fp32")
    assert fake.calls["clear_flag"] == (["TF32"] if precision == "fp32" else [])


def test_sidecar_records_where_how_and_what(fp32: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _install(monkeypatch, "10.8.0.43")
    engine = build(fp32, "trt-fp16")
    sidecar = json.loads(sidecar_path(engine).read_text())
    assert sidecar["gpu"] == H100["gpu"] and sidecar["compute_capability"] == "9.0"
    assert sidecar["precision"] == "fp16" and sidecar["tensorrt"] == "10.8.0.43"
    assert sidecar["inputs"] == [{"name": "images", "shape": [1, 3, 16, 16], "dtype": "DataType.FLOAT"}]
    assert sidecar["outputs"][0]["name"] == "logits"
    assert sidecar["onnx_sha256"] == file_sha256(fp32) and sidecar["source_onnx"] == str(fp32)
    assert sidecar["metadata"]["class_names"] == ["a", "b", "c"]
    assert sidecar["metadata"]["recipe"] == "name: t\n"
    assert (engine.parent / "trt-timing.cache").read_bytes() == b"timings"


def test_dynamic_batch_gets_a_profile_and_shape_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = _install(monkeypatch, "11.4.0.106")
    onnx.save(_model("batch"), str(tmp_path / "d.onnx"))
    engine = build(tmp_path / "d.onnx", "trt-fp32")
    assert fake.calls["profiles"] == [{"images": ((1, 3, 16, 16), (1, 3, 16, 16), (8, 3, 16, 16))}]
    command = load_sidecar(engine)["trtexec"]
    assert "--minShapes=images:1x3x16x16 --optShapes=images:1x3x16x16 --maxShapes=images:8x3x16x16" in command


def test_an_engine_from_another_machine_is_refused_naming_both(
    fp32: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _install(monkeypatch, "10.8.0.43")
    engine = build(fp32, "trt-fp16")
    _install(monkeypatch, ORIN["tensorrt"], {k: ORIN[k] for k in ("gpu", "compute_capability")})
    with pytest.raises(EngineMismatch) as error:
        TrtPredictor(engine)
    message = str(error.value)
    for text in (
        "10.8.0.43",
        H100["gpu"],
        "9.0",
        "10.3.0",
        "Orin",
        "8.7",
        "rebuild",
        f"fakd-deploy build {fp32} --backend trt-fp16",
    ):
        assert text in message


@pytest.mark.parametrize("change", ["gpu", "compute_capability", "tensorrt"])
def test_compatibility_needs_all_three(change: str) -> None:
    check_compatible({**ORIN, "precision": "fp16"}, ORIN, "m.fp16.engine")
    here = {**ORIN, change: "other"}
    with pytest.raises(EngineMismatch, match="rebuild"):
        check_compatible({**ORIN, "precision": "fp16", "source_onnx": "m.onnx"}, here, "m.fp16.engine")


def test_profile_for_dynamic_batch_only() -> None:
    assert profile_shapes((1, 3, 360, 480)) is None
    assert profile_shapes((-1, 3, 360, 480), opt_batch=2, max_batch=4) == (
        (1, 3, 360, 480),
        (2, 3, 360, 480),
        (4, 3, 360, 480),
    )
    with pytest.raises(ValueError, match="only the batch"):
        profile_shapes((-1, 3, -1, 480))
    with pytest.raises(ValueError, match="opt_batch"):
        profile_shapes((-1, 3, 8, 8), opt_batch=9, max_batch=8)


def test_missing_sidecar_is_explained(tmp_path: Path) -> None:
    engine = tmp_path / "m.fp16.engine"
    assert sidecar_path(engine).name == "m.fp16.engine.json"
    with pytest.raises(BackendUnavailable, match="no sidecar"):
        load_sidecar(engine)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("{not json", "not valid JSON"),
        ('["fp16"]', "JSON list, not an object"),
        ('{"precision": "fp16", "metadata": "class_names=a,b"}', "field 'metadata' must be a mapping"),
        ('{"precision": "fp64"}', "field 'precision'"),
        ('{"precision": "fp16", "gpu": 7}', "field 'gpu' must be text"),
        ("\udcff".encode("utf-8", "surrogateescape").decode("latin-1"), "not valid JSON"),
    ],
)
def test_a_damaged_sidecar_is_one_line_naming_file_and_field(tmp_path: Path, text: str, words: str) -> None:
    """A sidecar is a user's file: bad JSON, a JSON list or string metadata is exit code 2 with
    one line naming the file and what is wrong, whether the engine is opened to run or to read."""
    engine = tmp_path / "m.fp16.engine"
    engine.write_bytes(b"engine")
    sidecar_path(engine).write_bytes(text.encode("latin-1"))
    for opening in (load_sidecar, Artifact.open):
        with pytest.raises(ArtifactError) as error:
            opening(engine)
        message = str(error.value)
        assert error.value.exit_code == 2 and "\n" not in message
        assert str(sidecar_path(engine)) in message and words in message


def test_missing_tensorrt_or_gpu_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails as if not installed
    with pytest.raises(BackendUnavailable) as error:
        import_tensorrt()
    assert str(error.value) == INSTALL_HINT
    _install(monkeypatch, "10.3.0", devices=0)
    with pytest.raises(BackendUnavailable, match="needs a CUDA GPU: no CUDA GPU is visible"):
        import_tensorrt()
    _install(monkeypatch, "12.0.0")
    with pytest.raises(BackendUnavailable, match=r"12\.0\.0 is not supported"):
        trt_module.import_tensorrt()


def test_a_driver_too_old_for_cuda_python_13_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """cuda-bindings 13 needs a CUDA 13 driver (>= 580.65): with an older one, or none,
    cudaGetDeviceCount fails with cudaErrorInsufficientDriver alike; cudaDriverGetVersion tells
    the two apart (measured with cuda-bindings 13.5 on a machine without a driver: (35, None)
    and (0, 0))."""
    old = FakeCudaRuntime(driver=12040, runtime_version=13000)
    assert old.cudaGetDeviceCount() == (cudaError_t.cudaErrorInsufficientDriver, None)
    monkeypatch.setattr(cuda, "runtime", lambda: old)
    monkeypatch.setattr(cuda, "bindings_version", lambda: "13.0.3")
    reason = cuda.no_gpu_reason()
    assert reason is not None
    assert "CUDA 12.4" in reason and "580.65" in reason and "cuda-python>=12.3,<13" in reason
    monkeypatch.setattr(cuda, "runtime", lambda: FakeCudaRuntime(driver=0))
    assert (
        cuda.no_gpu_reason() == "no NVIDIA driver is loaded (cudaGetDeviceCount: cudaErrorInsufficientDriver)"
    )
    assert cuda.versions()["cuda_driver"] == "no driver"


def _engine(tmp_path: Path, batch: int | str, monkeypatch: pytest.MonkeyPatch, **cudart: Any) -> Path:
    """An engine built by the stand-in from a model with a static (int) or dynamic (str) batch."""
    _install(monkeypatch, "10.3.0", **cudart)
    onnx.save(_model(batch), str(tmp_path / "m.onnx"))
    return build(tmp_path / "m.onnx", "trt-fp16")


def _images(count: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((count, 3, 16, 16)).astype(np.float32)


def test_engine_runs_on_a_non_blocking_stream_of_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every copy, the execution, the synchronisation and the timing events use one stream, never 0."""
    engine = _engine(tmp_path, "batch", monkeypatch)
    cudart = cuda.runtime()
    predictor = TrtPredictor(engine)
    images = np.concatenate([_images(8), _images(8)])[:10]
    expected = engine_output(images, (10, 3, 16, 16))
    np.testing.assert_allclose(predictor(images), expected, rtol=1e-6)  # batches of 8, then 2
    assert cudart.calls[0] == ("create stream", FakeCudaRuntime.cudaStreamNonBlocking)
    work = cudart.calls[1:]
    assert [kind for kind, _ in work].count("execute") == 2
    assert [kind for kind, _ in work].count("H2D") == [kind for kind, _ in work].count("D2H") == 2
    assert {stream for kind, stream in work if kind != "wait event"} == {predictor.stream.handle}
    assert predictor.stream.handle != FakeCudaRuntime.DEFAULT_STREAM


def test_a_static_batch_engine_pads_one_image_to_its_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """IExecutionContext::setInputShape returns False for a shape the engine cannot take
    ("Each dimension must agree with the network dimension unless the latter was -1",
    NvInferRuntime.h v10.3.0), so a batch-2 engine is fed two images, the second zeros, both
    when predicting and when timing."""
    engine = _engine(tmp_path, 2, monkeypatch)
    fake: Any = sys.modules["tensorrt"]
    predictor = TrtPredictor(engine)
    one = _images(1)
    np.testing.assert_allclose(predictor(one), engine_output(one, (1, 3, 16, 16)), rtol=1e-6)
    times = predictor.gpu_compute_ms(one, warmup_s=0.0, seconds=0.0, iters=3)
    assert len(times) == 3
    assert all(shape[0] == 2 for _, shape in fake.calls["set_input_shape"])


def test_a_refused_input_shape_stops_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An engine whose profile starts at batch 2 (trtexec --minShapes=images:2x3x16x16) refuses
    batch 1: setInputShape returns False ("Runtime dimension does not satisfy any optimization
    profile") and the run must stop instead of executing on the shape set before."""
    engine = _engine(tmp_path, "batch", monkeypatch)
    built = json.loads(engine.read_bytes())
    built["profiles"]["images"][0][0] = 2
    engine.write_bytes(json.dumps(built).encode())
    predictor = TrtPredictor(engine)
    with pytest.raises(RuntimeError, match=r"refused input shape \[1, 3, 16, 16\]"):
        predictor(_images(1))


def test_gpu_compute_keeps_one_run_in_flight_behind_the_timed_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """trtexec's GPU compute time (samples/common/sampleInference.cpp, `Iteration`: two event
    sets, the next iteration enqueued before the previous one is waited for): each run starts
    as soon as the GPU is free, so the host's 0.5 ms to issue a run is not in the 2 ms of GPU
    work each one takes. Synchronising after every run would time 2.5 ms."""
    engine = _engine(tmp_path, 1, monkeypatch)
    predictor = TrtPredictor(engine)
    cudart = cuda.runtime()
    cudart.calls.clear()
    times = predictor.gpu_compute_ms(_images(1), warmup_s=0.0, seconds=0.0, iters=6)
    assert times == pytest.approx([2.0] * 6)
    log = [kind for kind, _ in cudart.calls if kind in ("execute", "wait event")]
    timed = log[log.index("execute", 1) :]  # after the untimed warm-up run
    assert timed[:3] == ["execute", "execute", "wait event"]  # run 2 issued before run 1 is awaited
    events = {stream for kind, stream in cudart.calls if kind == "event"}
    assert events == {predictor.stream.handle}


def test_host_latency_waits_for_the_copy_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Calling the predictor (host latency) returns after the stream is synchronised, so the
    copies and the GPU work are all in it: 2 ms of work plus 2 x 0.05 ms of copies here."""
    engine = _engine(tmp_path, 1, monkeypatch)
    predictor = TrtPredictor(engine)
    cudart = cuda.runtime()
    before = cudart.host_ms
    predictor(_images(1))
    assert cudart.host_ms - before == pytest.approx(0.5 + 2.0 + 0.05, abs=1e-9)  # launch, work, copy back
