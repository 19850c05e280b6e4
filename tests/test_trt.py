"""TensorRT builds on CPU: a stand-in `tensorrt` module (10.x, 11.x) records what the builder is asked."""

from __future__ import annotations

import ctypes
import json
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper
from onnx import helper as oh

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
from fakd_deploy.errors import BackendUnavailable
from fakd_deploy.utils import file_sha256

H100 = {"gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
ORIN = {"gpu": "Orin", "compute_capability": "8.7", "tensorrt": "10.3.0"}


class FakeTensorRT(types.ModuleType):
    """The slice of the TensorRT Python API fakd-deploy uses, recording every call.

    Under 11.x, `BuilderFlag` has no FP16/INT8 (removed in TensorRT 11), so touching them
    raises AttributeError as the real module would.
    """

    def __init__(self, version: str) -> None:
        super().__init__("tensorrt")
        self.__version__ = version
        flags = ["TF32"] + (["FP16", "INT8", "BF16"] if version.startswith("10.") else [])
        self.BuilderFlag = types.SimpleNamespace(**{flag: flag for flag in flags})
        self.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
        self.calls: dict[str, Any] = {
            "set_flag": [],
            "clear_flag": [],
            "network_flags": None,
            "parsed": None,
            "profiles": [],
            "pool": None,
        }
        fake = self

        class Logger:
            WARNING = 2

            def __init__(self, severity: int) -> None:
                self.severity = severity

        class Tensor:
            def __init__(self, name: str, shape: list[int]) -> None:
                self.name, self.shape, self.dtype = name, shape, "DataType.FLOAT"

        class Network:
            def __init__(self) -> None:
                self.inputs: list[Tensor] = []
                self.outputs: list[Tensor] = []

            num_inputs = property(lambda self: len(self.inputs))
            num_outputs = property(lambda self: len(self.outputs))

            def get_input(self, index: int) -> Tensor:
                return self.inputs[index]

            def get_output(self, index: int) -> Tensor:
                return self.outputs[index]

        class OnnxParser:
            def __init__(self, network: Network, logger: Logger) -> None:
                self.network = network
                self.num_errors = 0

            def parse_from_file(self, path: str) -> bool:
                fake.calls["parsed"] = path
                graph = onnx.load(path, load_external_data=False).graph
                for values, target in (
                    (graph.input, self.network.inputs),
                    (graph.output, self.network.outputs),
                ):
                    for value in values:
                        dims = [d.dim_value or -1 for d in value.type.tensor_type.shape.dim]
                        target.append(Tensor(value.name, dims))
                return True

        class Cache:
            def serialize(self) -> bytes:
                return b"timings"

        class Config:
            def set_memory_pool_limit(self, pool: str, size: int) -> None:
                fake.calls["pool"] = (pool, size)

            def set_flag(self, flag: str) -> None:
                fake.calls["set_flag"].append(flag)

            def clear_flag(self, flag: str) -> None:
                fake.calls["clear_flag"].append(flag)

            def create_timing_cache(self, data: bytes) -> Cache:
                return Cache()

            def set_timing_cache(self, cache: Cache, ignore_mismatch: bool) -> bool:
                return True

            def get_timing_cache(self) -> Cache:
                return Cache()

            def add_optimization_profile(self, profile: Any) -> None:
                fake.calls["profiles"].append(profile.shapes)

        class Profile:
            def __init__(self) -> None:
                self.shapes: dict[str, tuple] = {}

            def set_shape(self, name: str, low: tuple, opt: tuple, high: tuple) -> None:
                self.shapes[name] = (low, opt, high)

        class Builder:
            def __init__(self, logger: Logger) -> None:
                self.logger = logger

            def create_network(self, flags: int = 0) -> Network:
                fake.calls["network_flags"] = flags
                return Network()

            def create_builder_config(self) -> Config:
                return Config()

            def create_optimization_profile(self) -> Profile:
                return Profile()

            def build_serialized_network(self, network: Network, config: Config) -> bytes:
                return b"engine"

        self.Logger, self.OnnxParser, self.Builder = Logger, OnnxParser, Builder


def _model(dynamic: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    batch: Any = "batch" if dynamic else 1
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(np.zeros(4, np.float32), "b1"),
        numpy_helper.from_array(rng.standard_normal((3, 4, 1, 1)).astype(np.float32), "w2"),
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


def _install(monkeypatch: pytest.MonkeyPatch, version: str, machine: dict[str, str] = H100) -> FakeTensorRT:
    fake = FakeTensorRT(version)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(cuda, "no_gpu_reason", lambda: None)
    monkeypatch.setattr(cuda, "device_info", lambda device=0: dict(machine))
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
    assert engine.name == f"m.{precision}.engine" and engine.read_bytes() == b"engine"
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
    fake = _install(monkeypatch, "11.4.0.106")
    engine = build(fp32, f"trt-{precision}", calib_images=_calibration())
    assert fake.calls["set_flag"] == []  # FP16/INT8 flags do not exist in 11
    assert fake.calls["network_flags"] == 1 << 1  # 1 << STRONGLY_TYPED
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
    onnx.save(_model(dynamic=True), str(tmp_path / "d.onnx"))
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


def test_missing_tensorrt_or_gpu_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails as if not installed
    with pytest.raises(BackendUnavailable) as error:
        import_tensorrt()
    assert str(error.value) == INSTALL_HINT
    _install(monkeypatch, "10.3.0")
    monkeypatch.setattr(cuda, "no_gpu_reason", lambda: "no CUDA GPU is visible (test)")
    with pytest.raises(BackendUnavailable, match="needs a CUDA GPU: no CUDA GPU is visible"):
        import_tensorrt()
    monkeypatch.setattr(cuda, "no_gpu_reason", lambda: None)
    monkeypatch.setattr(sys.modules["tensorrt"], "__version__", "12.0.0")
    with pytest.raises(BackendUnavailable, match=r"12\.0\.0 is not supported"):
        trt_module.import_tensorrt()


class FakeCudaRuntime:
    """cuda-python's runtime on host memory: 'device' buffers are ctypes buffers, calls are logged."""

    cudaStreamNonBlocking = 1
    cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice="H2D", cudaMemcpyDeviceToHost="D2H")
    STREAM = 0x5000  # the legacy default stream is 0

    def __init__(self) -> None:
        self.buffers: dict[int, Any] = {}
        self.calls: list[tuple] = []

    def _alloc(self, nbytes: int) -> tuple[int, int]:
        buffer = ctypes.create_string_buffer(nbytes)
        self.buffers[ctypes.addressof(buffer)] = buffer
        return 0, ctypes.addressof(buffer)

    cudaMalloc = cudaMallocHost = _alloc

    def cudaFree(self, ptr: int) -> tuple[int]:
        self.buffers.pop(ptr, None)
        return (0,)

    cudaFreeHost = cudaFree

    def cudaStreamCreateWithFlags(self, flags: int) -> tuple[int, int]:
        self.calls.append(("create stream", flags))
        return 0, self.STREAM

    def cudaStreamDestroy(self, stream: int) -> tuple[int]:
        return (0,)

    def cudaMemcpyAsync(self, dst: int, src: int, nbytes: int, kind: str, stream: int) -> tuple[int]:
        self.calls.append((kind, stream))
        ctypes.memmove(dst, src, nbytes)
        return (0,)

    def cudaStreamSynchronize(self, stream: int) -> tuple[int]:
        self.calls.append(("sync", stream))
        return (0,)

    def cudaEventCreate(self) -> tuple[int, str]:
        return 0, "event"

    def cudaEventRecord(self, event: str, stream: int) -> tuple[int]:
        self.calls.append(("event", stream))
        return (0,)

    def cudaEventSynchronize(self, event: str) -> tuple[int]:
        return (0,)

    def cudaEventElapsedTime(self, start: str, end: str) -> tuple[int, float]:
        return 0, 1.5

    def cudaEventDestroy(self, event: str) -> tuple[int]:
        return (0,)


def _add_engine_runtime(fake: FakeTensorRT, cudart: FakeCudaRuntime, max_batch: int) -> None:
    """An engine with a dynamic batch (1..max_batch) whose output is twice its input."""
    shape = (3, 16, 16)
    fake.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
    fake.nptype = lambda dtype: np.float32

    class Context:
        def __init__(self) -> None:
            self.batch, self.addresses = 0, {}

        def set_input_shape(self, name: str, dims: tuple) -> None:
            self.batch = dims[0]

        def get_tensor_shape(self, name: str) -> tuple:
            return (self.batch, *shape)

        def set_tensor_address(self, name: str, ptr: int) -> None:
            self.addresses[name] = ptr

        def execute_async_v3(self, stream: int) -> bool:
            cudart.calls.append(("execute", stream))
            count = self.batch * int(np.prod(shape))
            source = np.ctypeslib.as_array((ctypes.c_float * count).from_address(self.addresses["images"]))
            target = np.ctypeslib.as_array((ctypes.c_float * count).from_address(self.addresses["logits"]))
            target[:] = 2 * source
            return True

    class Engine:
        num_io_tensors = 2

        def get_tensor_name(self, index: int) -> str:
            return ("images", "logits")[index]

        def get_tensor_mode(self, name: str) -> str:
            return "in" if name == "images" else "out"

        def get_tensor_shape(self, name: str) -> tuple:
            return (-1, *shape)

        def get_tensor_profile_shape(self, name: str, profile: int) -> list[tuple]:
            return [(1, *shape), (1, *shape), (max_batch, *shape)]

        def get_tensor_dtype(self, name: str) -> str:
            return "DataType.FLOAT"

        def create_execution_context(self) -> Context:
            return Context()

    class Runtime:
        def __init__(self, logger: Any) -> None:
            pass

        def deserialize_cuda_engine(self, data: bytes) -> Engine:
            return Engine()

    fake.Runtime = Runtime


def test_engine_runs_on_a_non_blocking_stream_of_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every copy, the execution, the synchronisation and the timing events use one stream, never 0."""
    fake = _install(monkeypatch, "10.3.0")
    cudart = FakeCudaRuntime()
    monkeypatch.setattr(cuda, "runtime", lambda: cudart)
    _add_engine_runtime(fake, cudart, max_batch=2)
    engine = tmp_path / "m.fp16.engine"
    engine.write_bytes(b"engine")
    sidecar_path(engine).write_text(json.dumps({**H100, "tensorrt": "10.3.0"}))

    predictor = TrtPredictor(engine)
    images = np.random.default_rng(0).standard_normal((5, 3, 16, 16)).astype(np.float32)
    np.testing.assert_array_equal(predictor(images), 2 * images)  # 5 images in batches of 2, 2, 1
    assert cudart.calls[0] == ("create stream", FakeCudaRuntime.cudaStreamNonBlocking)
    work = cudart.calls[1:]
    assert [kind for kind, _ in work].count("execute") == 3
    assert [kind for kind, _ in work].count("H2D") == [kind for kind, _ in work].count("D2H") == 3
    assert {stream for _, stream in work} == {FakeCudaRuntime.STREAM}

    cudart.calls.clear()
    assert predictor.gpu_compute_ms(images, warmup_s=0.0, seconds=0.0, iters=4) == [1.5] * 4
    events = [stream for kind, stream in cudart.calls if kind == "event"]
    assert events == [FakeCudaRuntime.STREAM] * 8
