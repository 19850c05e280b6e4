"""TensorRT 10 and 11 engines from ONNX, and engines as Predictors.

The two majors build precision differently (NVIDIA's "TensorRT 10.x to 11.x" migration
guide; the strong-typing migration notes in NVIDIA/TensorRT):

| precision | TensorRT 10 (weakly typed network) | TensorRT 11 (strongly typed network) |
|---|---|---|
| fp32 | `X.onnx`, TF32 off | `X.onnx`, TF32 off |
| fp16 | `X.onnx` + `BuilderFlag.FP16` | `X.fp16.onnx` (FP16 graph, FP32 IO) |
| int8 | `X.qdq.onnx` + `BuilderFlag.INT8` + `FP16` | `X.qdq.fp16.onnx` (Q/DQ, FP16 remainder) |

TensorRT 11 removed `BuilderFlag.FP16`/`INT8` and the calibrators; its networks are
always strongly typed (`NetworkDefinitionCreationFlag.STRONGLY_TYPED` is accepted and
ignored), so the precision is in the ONNX graph. TensorRT 10 builds the Q/DQ model
weakly typed with INT8 and FP16 enabled, as NVIDIA's own engine-explorer ResNet example
does (`--best` = FP32+FP16+INT8, tools/experimental/trt-engine-explorer, v10.3.0). Only
API present in 10.3 (JetPack 6) is used on the 10.x path.

An engine runs only on the GPU model and TensorRT version that built it. A JSON sidecar
(`X.fp16.engine.json`) records where and how it was built (with the equivalent `trtexec`
command line and the ONNX metadata), so loading it elsewhere stops with a message naming
both machines. GPU memory, the stream and the copies go through cuda-python.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from fakd_deploy.deploy import cuda
from fakd_deploy.errors import ArtifactError, BackendUnavailable, BuildError
from fakd_deploy.inputs import parse_json, read_bounded
from fakd_deploy.predictor import as_prediction, pad_to_batch, run_fixed_batch
from fakd_deploy.utils import atomic_write, file_sha256, save_json

INSTALL_HINT = (
    "TensorRT is not installed: pip install 'fakd-deploy[gpu]' on a machine with an "
    "NVIDIA GPU (on a Jetson, use JetPack's TensorRT; see docs/deploy.md)"
)
PRECISIONS = ("fp32", "fp16", "int8")
MAJORS = (10, 11)
TIMING_CACHE = "trt-timing.cache"
MAX_BATCH = 8
MATCH_KEYS = ("gpu", "compute_capability", "tensorrt")
MAX_SIDECAR_BYTES = 2**20
# The (min, opt, max) shapes of one input's optimisation profile
ShapeProfile = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


class EngineMismatch(BackendUnavailable):
    """An engine built with another GPU or TensorRT version than this machine has."""


@dataclass(frozen=True)
class BuildPlan:
    """How one TensorRT major builds one precision: network mode, flags and the ONNX it parses."""

    major: int
    precision: str
    strongly_typed: bool
    flags: tuple[str, ...]  # BuilderFlag names to set
    cleared: tuple[str, ...]  # BuilderFlag names to clear
    source: str  # which ONNX: "fp32" (X.onnx), "fp16", "qdq" or "qdq-fp16"

    @property
    def mode(self) -> str:
        return "strongly typed" if self.strongly_typed else "builder flags"


def major_version(version: str) -> int:
    return int(version.split(".", 1)[0])


def build_plan(version: str, precision: str) -> BuildPlan:
    """The build recipe for `precision` under TensorRT `version` (10.x or 11.x)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision '{precision}' is not one of: {', '.join(PRECISIONS)}")
    major = major_version(version)
    if major not in MAJORS:
        raise BackendUnavailable(
            f"TensorRT {version} is not supported: fakd-deploy builds with TensorRT 10.x or 11.x"
        )
    cleared = ("TF32",) if precision == "fp32" else ()  # an FP32 row means FP32, not TF32
    if major == 10:
        flags = {"fp32": (), "fp16": ("FP16",), "int8": ("INT8", "FP16")}[precision]
        source = "qdq" if precision == "int8" else "fp32"
        return BuildPlan(major, precision, False, flags, cleared, source)
    source = {"fp32": "fp32", "fp16": "fp16", "int8": "qdq-fp16"}[precision]
    return BuildPlan(major, precision, True, (), cleared, source)


def profile_shapes(
    shape: Sequence[int], opt_batch: int = 1, max_batch: int = MAX_BATCH
) -> ShapeProfile | None:
    """(min, opt, max) shapes for an input with a dynamic (-1) batch; None when all static."""
    if all(dim > 0 for dim in shape):
        return None
    if any(dim <= 0 for dim in shape[1:]):
        raise ValueError(f"only the batch dimension may be dynamic, got input shape {list(shape)}")
    if not 1 <= opt_batch <= max_batch:
        raise ValueError(f"need 1 <= opt_batch ({opt_batch}) <= max_batch ({max_batch})")
    rest = tuple(shape[1:])
    return (1, *rest), (opt_batch, *rest), (max_batch, *rest)


def trtexec_command(
    plan: BuildPlan,
    onnx_path: str | Path,
    engine: str | Path,
    workspace_gb: float,
    timing_cache: str | Path,
    profiles: dict[str, ShapeProfile],
) -> str:
    """The `trtexec` line that builds the same engine (flags as in trtexec's --help for 10.3/11.1).

    On 11.x networks are strongly typed by default and `--stronglyTyped` is a deprecated
    no-op, so neither it nor a precision flag appears.
    """
    parts = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine}"]
    parts += [f"--{flag.lower()}" for flag in plan.flags]
    if "TF32" in plan.cleared:
        parts.append("--noTF32")
    parts += [f"--memPoolSize=workspace:{round(workspace_gb * 1024)}M", f"--timingCacheFile={timing_cache}"]
    for key, index in (("minShapes", 0), ("optShapes", 1), ("maxShapes", 2)):
        if profiles:
            spec = ",".join(
                f"{name}:{'x'.join(map(str, shapes[index]))}" for name, shapes in profiles.items()
            )
            parts.append(f"--{key}={spec}")
    return " ".join(parts)


def import_tensorrt() -> ModuleType:
    """The `tensorrt` module when it and a CUDA GPU are usable, else `BackendUnavailable`."""
    try:
        import tensorrt
    except ImportError:
        raise BackendUnavailable(INSTALL_HINT) from None
    reason = cuda.no_gpu_reason()
    if reason:
        raise BackendUnavailable(f"TensorRT needs a CUDA GPU: {reason}")
    if major_version(tensorrt.__version__) not in MAJORS:
        raise BackendUnavailable(
            f"TensorRT {tensorrt.__version__} is not supported: install TensorRT 10.x or 11.x"
        )
    return tensorrt


def sidecar_path(engine: str | Path) -> Path:
    engine = Path(engine)
    return engine.with_name(engine.name + ".json")


def platform_info(trt: ModuleType) -> dict[str, str]:
    """What an engine is tied to: the GPU model, its compute capability and the TensorRT version."""
    return {**cuda.device_info(), "tensorrt": trt.__version__}


def check_compatible(sidecar: dict[str, Any], here: dict[str, str], engine: str | Path) -> None:
    """Raise `EngineMismatch` unless the engine was built on this GPU model and TensorRT."""
    if all(sidecar.get(key) == here[key] for key in MATCH_KEYS):
        return
    raise EngineMismatch(
        f"{engine} was built with TensorRT {sidecar.get('tensorrt')} on {sidecar.get('gpu')} "
        f"(compute capability {sidecar.get('compute_capability')}), but this machine has "
        f"TensorRT {here['tensorrt']} on {here['gpu']} (compute capability "
        f"{here['compute_capability']}). Engines are not portable: rebuild it here from the "
        f"ONNX model with `fakd-deploy build {sidecar.get('source_onnx', 'MODEL.onnx')} --backend "
        f"trt-{sidecar.get('precision', 'fp16')}`."
    )


def _tensors(tensors: list[Any]) -> list[dict[str, Any]]:
    return [{"name": t.name, "shape": list(t.shape), "dtype": str(t.dtype)} for t in tensors]


def _attach_timing_cache(config: Any, path: Path) -> None:
    """Reuse kernel timings across builds; a cache from another GPU/version is replaced."""
    cache = config.create_timing_cache(path.read_bytes() if path.exists() else b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)


def _network(trt: ModuleType, builder: Any, plan: BuildPlan) -> Any:
    if plan.strongly_typed:
        return builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    return builder.create_network(0)  # explicit batch is the only mode since TensorRT 10


def build_engine(
    onnx_path: str | Path,
    out: str | Path,
    plan: BuildPlan,
    workspace_gb: float = 2.0,
    opt_batch: int = 1,
    max_batch: int = MAX_BATCH,
    metadata: dict[str, Any] | None = None,
    source_onnx: str | Path | None = None,
) -> Path:
    """Build and write an engine from the ONNX model `plan` asks for, plus its sidecar.

    `source_onnx` is the exported FP32 model the user rebuilds from; `metadata` (class
    names, normalisation, recipe... of that model) goes into the sidecar so the engine
    alone is enough to run `predict`. The timing cache lives beside the engine.
    """
    trt = import_tensorrt()
    onnx_path, out = Path(onnx_path), Path(out)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = _network(trt, builder, plan)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"TensorRT {trt.__version__} could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 2**30))
    for flag in plan.flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    for flag in plan.cleared:
        config.clear_flag(getattr(trt.BuilderFlag, flag))
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    shapes = {t.name: profile_shapes(tuple(t.shape), opt_batch, max_batch) for t in inputs}
    profiles = {name: value for name, value in shapes.items() if value}
    if profiles:
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in profiles.items():
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)
    cache_path = out.parent / TIMING_CACHE
    out.parent.mkdir(parents=True, exist_ok=True)
    _attach_timing_cache(config, cache_path)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError(
            f"TensorRT {trt.__version__} could not build a {plan.precision} engine "
            f"from {onnx_path}; the TensorRT log above says why"
        )
    atomic_write(out, lambda tmp: tmp.write_bytes(bytes(serialized)))
    timing = bytes(config.get_timing_cache().serialize())
    atomic_write(cache_path, lambda tmp: tmp.write_bytes(timing))
    save_json(
        {
            **platform_info(trt),
            "precision": plan.precision,
            "mode": plan.mode,
            "plan": asdict(plan),
            "workspace_gb": workspace_gb,
            "inputs": _tensors(inputs),
            "outputs": _tensors([network.get_output(i) for i in range(network.num_outputs)]),
            "profiles": profiles,
            "onnx": str(onnx_path),
            "onnx_sha256": file_sha256(onnx_path),
            "source_onnx": str(source_onnx or onnx_path),
            "trtexec": trtexec_command(plan, onnx_path, out, workspace_gb, cache_path, profiles),
            "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "metadata": metadata or {},
        },
        sidecar_path(out),
    )
    return out


def load_sidecar(engine: str | Path) -> dict[str, Any]:
    """The engine's sidecar, checked: a JSON object whose `precision` is one TensorRT builds,
    whose platform fields are text and whose `metadata` is a mapping. One line naming the
    file and the field otherwise (a sidecar is a user's file like any other)."""
    path = sidecar_path(engine)
    if not path.exists():
        raise BackendUnavailable(
            f"{engine} has no sidecar {path.name}, so where it was built is "
            "unknown; rebuild it with `fakd-deploy build`"
        )
    data = read_bounded(path, "engine sidecar", MAX_SIDECAR_BYTES, ArtifactError)  # a regular file only
    sidecar = parse_json(data, str(path), ArtifactError, remedy=": rebuild the engine")
    if not isinstance(sidecar, dict):
        raise ArtifactError(
            f"{path} holds a JSON {type(sidecar).__name__}, not an object: rebuild the engine"
        )
    for key in MATCH_KEYS:
        if key in sidecar and not isinstance(sidecar[key], str):
            raise ArtifactError(f"{path}: field '{key}' must be text, got {sidecar[key]!r}")
    if sidecar.get("precision") not in PRECISIONS:
        raise ArtifactError(
            f"{path}: field 'precision' must be one of {', '.join(PRECISIONS)}, "
            f"got {sidecar.get('precision')!r}"
        )
    if not isinstance(sidecar.get("metadata", {}), dict):
        raise ArtifactError(
            f"{path}: field 'metadata' must be a mapping of the ONNX model's metadata, "
            f"got {type(sidecar['metadata']).__name__}"
        )
    for key in ("inputs", "outputs"):
        if key in sidecar and not _tensor_list(sidecar[key]):
            raise ArtifactError(
                f"{path}: field '{key}' must be a list of tensors, each with a text 'name' and "
                "'dtype' and a 'shape' of whole numbers (-1 for dynamic): rebuild the engine"
            )
    return sidecar


def _tensor_list(value: Any) -> bool:
    """What `build` records of the engine's input and output tensors (`_tensors`)."""
    return isinstance(value, list) and all(
        isinstance(tensor, dict)
        and isinstance(tensor.get("name"), str)
        and isinstance(tensor.get("dtype"), str)
        and isinstance(tensor.get("shape"), list)
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= -1 for d in tensor["shape"])
        for tensor in value
    )


class TrtPredictor:
    """A TensorRT engine as a Predictor: pinned host buffers, device buffers, a stream of its own."""

    def __init__(self, engine_path: str | Path) -> None:
        trt = import_tensorrt()
        path = Path(engine_path)
        self.path = path
        self.sidecar = load_sidecar(path)
        check_compatible(self.sidecar, platform_info(trt), path)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise BackendUnavailable(f"TensorRT could not load {path}; the TensorRT log above says why")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        modes = {name: self.engine.get_tensor_mode(name) for name in names}
        self.input_name = next(n for n in names if modes[n] == trt.TensorIOMode.INPUT)
        self.output_name = next(n for n in names if modes[n] == trt.TensorIOMode.OUTPUT)
        shape = tuple(self.engine.get_tensor_shape(self.input_name))
        self.static_batch = shape[0] if shape[0] > 0 else None
        self.input_size = (shape[2], shape[3])
        self.max_batch = self.static_batch or self.engine.get_tensor_profile_shape(self.input_name, 0)[2][0]
        self.stream = cuda.Stream()
        self.batch = 0
        self._set_batch(self.max_batch)
        out_shape = tuple(self.context.get_tensor_shape(self.output_name))
        in_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.input_name)))
        out_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.output_name)))
        self.host_in = cuda.PinnedArray((self.max_batch, *shape[1:]), in_dtype)
        self.host_out = cuda.PinnedArray(out_shape, out_dtype)
        self.device_in = cuda.DeviceBuffer(self.host_in.array.nbytes)
        self.device_out = cuda.DeviceBuffer(self.host_out.array.nbytes)
        self.context.set_tensor_address(self.input_name, self.device_in.ptr)
        self.context.set_tensor_address(self.output_name, self.device_out.ptr)

    def _set_batch(self, count: int) -> None:
        """Tell the context the batch size; TensorRT returns False (and only logs) on a shape
        the engine cannot take, which would otherwise run on stale shapes."""
        if count == self.batch:
            return
        shape = (count, *self.engine.get_tensor_shape(self.input_name)[1:])
        if not self.context.set_input_shape(self.input_name, shape):
            raise RuntimeError(
                f"TensorRT refused input shape {list(shape)} for {self.path} (batch 1..{self.max_batch})"
            )
        self.batch = count

    def _enqueue(self, count: int) -> None:
        self._set_batch(count)
        if not self.context.execute_async_v3(self.stream.ptr):
            raise RuntimeError("TensorRT execution failed; the TensorRT log above says why")

    def _load(self, images: np.ndarray) -> int:
        count = images.shape[0]
        self.host_in.array[:count] = images
        self.stream.to_device(self.device_in.ptr, self.host_in.array[:count])
        return count

    def _run(self, images: np.ndarray) -> np.ndarray:
        count = self._load(images)
        self._enqueue(count)
        out = self.host_out.array[:count]
        self.stream.to_host(out, self.device_out.ptr)
        self.stream.synchronize()
        return as_prediction(out.copy())

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images, dtype=np.float32)
        if self.static_batch:
            return run_fixed_batch(self._run, images, self.static_batch)
        return np.concatenate(
            [self._run(images[i : i + self.max_batch]) for i in range(0, images.shape[0], self.max_batch)]
        )

    def gpu_compute_ms(
        self, images: np.ndarray, warmup_s: float = 1.0, seconds: float = 3.0, iters: int | None = None
    ) -> list[float]:
        """trtexec's GPU compute time per `execute_async_v3`, inputs already on the device.

        A static-batch engine is timed at its batch, the images zero-padded up to it.
        """
        images = pad_to_batch(np.asarray(images, dtype=np.float32)[: self.max_batch], self.static_batch)
        count = self._load(images)
        self.stream.synchronize()
        return cuda.time_on_stream(self.stream, lambda: self._enqueue(count), warmup_s, seconds, iters)
