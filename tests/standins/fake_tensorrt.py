"""The slice of TensorRT's Python API fakd-deploy uses (10.x or 11.x), without TensorRT.

Built from TensorRT's own bindings (python/src/infer/pyCore.cpp, tags v10.3.0 and v11.1) and
headers (include/NvInfer.h, NvInferRuntime.h). The builder records what it is asked; an
"engine" is JSON naming the network's inputs and outputs, and running it writes, for each class
c, (c + 1) / C times the channel mean of the input into the output buffer (nearest-neighbour
resized to the output size), so copies, padding and batching can be checked with numpy.
"""

from __future__ import annotations

import ctypes
import json
import types
from typing import Any

import numpy as np
import onnx


class FakeTensorRT(types.ModuleType):
    """`import tensorrt` at `version`; `calls` records the builder's inputs.

    TensorRT 11 removed BuilderFlag FP16/INT8/BF16 (v11.1 pyCore.cpp lists no such values),
    so touching them raises AttributeError as the real module would.
    NetworkDefinitionCreationFlag.STRONGLY_TYPED is 1 on 10.x (after the deprecated
    kEXPLICIT_BATCH = 0) and 0 on 11.x, where it is deprecated and ignored (NvInfer.h).
    `cudart` is the CUDA runtime (a `FakeCudaRuntime`) the engines enqueue their work on;
    `work_ms` and `launch_ms` are the simulated GPU time of one run and the host time to
    issue it.
    """

    def __init__(
        self, version: str, cudart: Any = None, work_ms: float = 2.0, launch_ms: float = 0.5
    ) -> None:
        super().__init__("tensorrt")
        self.__version__ = version
        self.cudart, self.work_ms, self.launch_ms = cudart, work_ms, launch_ms
        major = int(version.split(".")[0])
        flags = ["TF32"] + (["FP16", "INT8", "BF16"] if major == 10 else [])
        self.BuilderFlag = types.SimpleNamespace(**{flag: flag for flag in flags})
        self.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1 if major == 10 else 0)
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
        self.TensorIOMode = types.SimpleNamespace(INPUT="TensorIOMode.INPUT", OUTPUT="TensorIOMode.OUTPUT")
        self.DataType = types.SimpleNamespace(FLOAT="DataType.FLOAT", HALF="DataType.HALF")
        self.calls: dict[str, Any] = {
            "set_flag": [],
            "clear_flag": [],
            "network_flags": None,
            "parsed": None,
            "profiles": [],
            "pool": None,
            "set_input_shape": [],
        }
        fake = self

        class Logger:
            WARNING = 2

            def __init__(self, severity: int) -> None:
                self.severity = severity

        class Tensor:
            def __init__(self, name: str, shape: list[int]) -> None:
                self.name, self.shape, self.dtype = name, shape, fake.DataType.FLOAT

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
            def __init__(self) -> None:
                self.profiles: dict[str, tuple] = {}

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
                self.profiles.update(profile.shapes)

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
                profiles = config.profiles
                io = {
                    "inputs": [(t.name, t.shape) for t in network.inputs],
                    "outputs": [(t.name, t.shape) for t in network.outputs],
                    "profiles": {name: [list(s) for s in shapes] for name, shapes in profiles.items()},
                }
                return json.dumps(io).encode()

        class Runtime:
            def __init__(self, logger: Logger) -> None:
                pass

            def deserialize_cuda_engine(self, data: bytes) -> Engine | None:
                try:
                    return Engine(json.loads(bytes(data)))
                except ValueError:
                    return None  # the real call logs and returns None for bytes it cannot read

        class Engine:
            def __init__(self, io: dict[str, Any]) -> None:
                self.shapes = {name: list(shape) for name, shape in io["inputs"] + io["outputs"]}
                self.modes = {name: fake.TensorIOMode.INPUT for name, _ in io["inputs"]}
                self.modes.update({name: fake.TensorIOMode.OUTPUT for name, _ in io["outputs"]})
                self.names = [name for name, _ in io["inputs"] + io["outputs"]]
                self.profiles = io["profiles"]

            num_io_tensors = property(lambda self: len(self.names))

            def get_tensor_name(self, index: int) -> str:
                return self.names[index]

            def get_tensor_mode(self, name: str) -> str:
                return self.modes[name]

            def get_tensor_shape(self, name: str) -> tuple:
                return tuple(self.shapes[name])

            def get_tensor_profile_shape(self, name: str, profile: int) -> list[tuple]:
                return [tuple(shape) for shape in self.profiles[name]]

            def get_tensor_dtype(self, name: str) -> str:
                return fake.DataType.FLOAT

            def create_execution_context(self) -> Context:
                return Context(self)

        class Context:
            def __init__(self, engine: Engine) -> None:
                self.engine = engine
                self.input_shapes: dict[str, tuple] = {}
                self.addresses: dict[str, int] = {}

            def set_input_shape(self, name: str, dims: tuple) -> bool:
                """False on a shape the engine cannot take, as IExecutionContext::setInputShape
                returns (NvInferRuntime.h, v10.3.0: "Each dimension must agree with the network
                dimension unless the latter was -1"; a dynamic dimension outside the
                optimisation profile is refused with "Runtime dimension does not satisfy any
                optimization profile")."""
                fake.calls["set_input_shape"].append((name, tuple(dims)))
                static = self.engine.shapes.get(name)
                if static is None or self.engine.modes[name] != fake.TensorIOMode.INPUT:
                    return False
                if len(dims) != len(static) or any(
                    s > 0 and s != d for s, d in zip(static, dims, strict=True)
                ):
                    return False
                if name in self.engine.profiles:
                    low, _, high = self.engine.profiles[name]
                    if any(not lo <= d <= hi for lo, d, hi in zip(low, dims, high, strict=True)):
                        return False
                self.input_shapes[name] = tuple(dims)
                return True

            def _batch(self) -> int:
                name = next(n for n, m in self.engine.modes.items() if m == fake.TensorIOMode.INPUT)
                shape = self.input_shapes.get(name, tuple(self.engine.shapes[name]))
                return shape[0]

            def get_tensor_shape(self, name: str) -> tuple:
                shape = tuple(self.engine.shapes[name])
                return (self._batch(), *shape[1:]) if shape[0] <= 0 else shape

            def set_tensor_address(self, name: str, ptr: int) -> bool:
                self.addresses[name] = ptr
                return True

            def execute_async_v3(self, stream_handle: int) -> bool:
                """Runs on the host now; its GPU time goes on `stream_handle` in the CUDA stand-in.
                False when a dynamic input shape was never set, as enqueueV3 fails then."""
                inputs = [n for n, m in self.engine.modes.items() if m == fake.TensorIOMode.INPUT]
                outputs = [n for n, m in self.engine.modes.items() if m == fake.TensorIOMode.OUTPUT]
                in_shape = self.input_shapes.get(inputs[0], tuple(self.engine.shapes[inputs[0]]))
                if any(d <= 0 for d in in_shape):
                    return False
                out_shape = self.get_tensor_shape(outputs[0])
                images = _view(self.addresses[inputs[0]], in_shape)
                _view(self.addresses[outputs[0]], out_shape)[:] = engine_output(images, out_shape)
                if fake.cudart is not None:
                    fake.cudart.enqueue(stream_handle, fake.work_ms, fake.launch_ms, what="execute")
                return True

        self.Logger, self.OnnxParser, self.Builder, self.Runtime = Logger, OnnxParser, Builder, Runtime

    def nptype(self, dtype: str) -> type:
        """tensorrt.nptype: the numpy type of a TensorRT DataType."""
        return {self.DataType.FLOAT: np.float32, self.DataType.HALF: np.float16}[dtype]


def _view(address: int, shape: tuple) -> np.ndarray:
    count = int(np.prod(shape))
    return np.ctypeslib.as_array((ctypes.c_float * count).from_address(address)).reshape(shape)


def engine_output(images: np.ndarray, out_shape: tuple) -> np.ndarray:
    """What a stand-in engine computes: class c gets (c + 1) / C times the channel mean."""
    classes, height, width = out_shape[1:]
    mean = images.mean(axis=1)
    rows = np.arange(height) * mean.shape[1] // height
    cols = np.arange(width) * mean.shape[2] // width
    mean = mean[:, rows][:, :, cols]
    scale = (np.arange(classes, dtype=np.float32) + 1) / classes
    return (mean[:, None] * scale[None, :, None, None]).astype(np.float32)
