"""TensorRT 10 engines from ONNX, and engines as Predictors.

An engine runs only on the GPU model and TensorRT version that built it. A JSON sidecar
(`X.fp16.engine.json`) records where it was built, so loading it elsewhere stops with a
message that names both machines instead of crashing or computing nonsense.

INT8 engines are built from an explicitly quantized (QDQ) ONNX model only: the
calibrator API is deprecated in TensorRT 10 and removed in TensorRT 11.

The pure-Python parts (flags, profile shapes, the compatibility check) need neither
TensorRT nor a GPU, so they are tested everywhere.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from fakd_deploy.deploy import BackendUnavailable
from fakd_deploy.deploy.shapes import run_fixed_batch
from fakd_deploy.utils import atomic_write, file_sha256, save_json

INSTALL_HINT = ("TensorRT is not installed: pip install 'fakd-deploy[gpu]' on a machine with an "
                "NVIDIA GPU")
PRECISIONS = ("fp32", "fp16", "int8")
TIMING_CACHE = "trt-timing.cache"
MAX_BATCH = 8
MATCH_KEYS = ("gpu", "compute_capability", "tensorrt")


class EngineMismatch(BackendUnavailable):
    """An engine built with another GPU or TensorRT version than this machine has."""


def import_tensorrt() -> ModuleType:
    """The `tensorrt` module, or `BackendUnavailable` saying what is missing."""
    try:
        import tensorrt
    except ImportError:
        raise BackendUnavailable(INSTALL_HINT) from None
    if not torch.cuda.is_available():
        raise BackendUnavailable("TensorRT needs a CUDA GPU and PyTorch sees none here "
                                 "(torch.cuda.is_available() is False)")
    return tensorrt


def builder_flags(precision: str) -> list[str]:
    """Names of the `trt.BuilderFlag`s for a precision.

    INT8 also enables FP16, so layers outside Q/DQ pairs (the float tail) run in FP16
    rather than FP32, as `trtexec --int8 --fp16` does.
    """
    flags = {"fp32": [], "fp16": ["FP16"], "int8": ["INT8", "FP16"]}
    if precision not in flags:
        raise ValueError(f"precision '{precision}' is not one of: {', '.join(PRECISIONS)}")
    return flags[precision]


def profile_shapes(shape: Sequence[int], opt_batch: int = 1, max_batch: int = MAX_BATCH
                   ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None:
    """(min, opt, max) shapes for an input with a dynamic (-1) batch; None when all static."""
    if all(dim > 0 for dim in shape):
        return None
    if any(dim <= 0 for dim in shape[1:]):
        raise ValueError(f"only the batch dimension may be dynamic, got input shape {list(shape)}")
    if not 1 <= opt_batch <= max_batch:
        raise ValueError(f"need 1 <= opt_batch ({opt_batch}) <= max_batch ({max_batch})")
    rest = tuple(shape[1:])
    return (1, *rest), (opt_batch, *rest), (max_batch, *rest)


def sidecar_path(engine: str | Path) -> Path:
    engine = Path(engine)
    return engine.with_name(engine.name + ".json")


def platform_info(trt: ModuleType) -> dict[str, str]:
    """What an engine is tied to: the GPU model and the TensorRT version."""
    major, minor = torch.cuda.get_device_capability()
    return {"gpu": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}",
            "tensorrt": trt.__version__}


def check_compatible(sidecar: dict[str, Any], here: dict[str, str], engine: str | Path) -> None:
    """Raise `EngineMismatch` unless the engine was built on this GPU model and TensorRT."""
    if all(sidecar.get(key) == here[key] for key in MATCH_KEYS):
        return
    raise EngineMismatch(
        f"{engine} was built with TensorRT {sidecar.get('tensorrt')} on {sidecar.get('gpu')} "
        f"(compute capability {sidecar.get('compute_capability')}), but this machine has "
        f"TensorRT {here['tensorrt']} on {here['gpu']} (compute capability "
        f"{here['compute_capability']}). Engines are not portable: rebuild it here from the "
        f"ONNX model with `fakd-deploy build {sidecar.get('onnx', 'MODEL.onnx')} --backend "
        f"trt-{sidecar.get('precision', 'fp16')}`.")


def _parse(trt: ModuleType, builder: Any, logger: Any, onnx_path: Path) -> Any:
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    return network, parser


def _tensors(tensors: list[Any]) -> list[dict[str, Any]]:
    return [{"name": t.name, "shape": list(t.shape), "dtype": str(t.dtype)} for t in tensors]


def _attach_timing_cache(config: Any, path: Path) -> None:
    """Reuse kernel timings across builds; a cache from another GPU/version is replaced."""
    cache = config.create_timing_cache(path.read_bytes() if path.exists() else b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)


def build_engine(onnx_path: str | Path, out: str | Path, precision: str = "fp16",
                 workspace_gb: float = 2.0, opt_batch: int = 1, max_batch: int = MAX_BATCH,
                 metadata: dict[str, Any] | None = None) -> Path:
    """Build and write an engine plus its sidecar; the timing cache lives beside them.

    `metadata` (class names, normalisation... from the ONNX model) is copied into the
    sidecar so the engine alone is enough to run `predict`.
    """
    flags = builder_flags(precision)
    trt = import_tensorrt()
    onnx_path, out = Path(onnx_path), Path(out)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network, _parser = _parse(trt, builder, logger, onnx_path)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 2**30))
    for flag in flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    profiles = {t.name: profile_shapes(tuple(t.shape), opt_batch, max_batch) for t in inputs}
    if any(profiles.values()):
        profile = builder.create_optimization_profile()
        for name, shapes in profiles.items():
            if shapes:
                profile.set_shape(name, *shapes)
        config.add_optimization_profile(profile)
    cache_path = out.parent / TIMING_CACHE
    out.parent.mkdir(parents=True, exist_ok=True)
    _attach_timing_cache(config, cache_path)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT could not build a {precision} engine from {onnx_path}; "
                           "the TensorRT log above says why")
    atomic_write(out, lambda tmp: tmp.write_bytes(serialized))
    timing = config.get_timing_cache().serialize()
    atomic_write(cache_path, lambda tmp: tmp.write_bytes(timing))
    save_json({**platform_info(trt), "precision": precision, "flags": flags,
               "workspace_gb": workspace_gb, "inputs": _tensors(inputs),
               "outputs": _tensors([network.get_output(i) for i in range(network.num_outputs)]),
               "profiles": {name: shapes for name, shapes in profiles.items() if shapes},
               "onnx": str(onnx_path), "onnx_sha256": file_sha256(onnx_path),
               "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "metadata": metadata or {}}, sidecar_path(out))
    return out


def load_sidecar(engine: str | Path) -> dict[str, Any]:
    path = sidecar_path(engine)
    if not path.exists():
        raise BackendUnavailable(f"{engine} has no sidecar {path.name}, so where it was built is "
                                 "unknown; rebuild it with `fakd-deploy build`")
    return json.loads(path.read_text())


def _torch_dtype(trt: ModuleType, dtype: Any) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
             trt.int64: torch.int64, trt.int8: torch.int8, trt.bool: torch.bool}
    return table[dtype]


class TrtPredictor:
    """A TensorRT engine as a Predictor, with torch CUDA tensors as its I/O buffers."""

    def __init__(self, engine_path: str | Path) -> None:
        trt = import_tensorrt()
        path = Path(engine_path)
        self.sidecar = load_sidecar(path)
        check_compatible(self.sidecar, platform_info(trt), path)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not load {path}; the TensorRT log above says why")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        modes = {name: self.engine.get_tensor_mode(name) for name in names}
        self.input_name = next(n for n in names if modes[n] == trt.TensorIOMode.INPUT)
        self.output_name = next(n for n in names if modes[n] == trt.TensorIOMode.OUTPUT)
        self.output_dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(self.output_name))
        shape = tuple(self.engine.get_tensor_shape(self.input_name))
        self.static_batch = shape[0] if shape[0] > 0 else None
        self.input_size = (shape[2], shape[3])
        _, _, largest = self.engine.get_tensor_profile_shape(self.input_name, 0)
        self.max_batch = self.static_batch or largest[0]

    def _run(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to("cuda", torch.float32).contiguous()
        self.context.set_input_shape(self.input_name, tuple(x.shape))
        out = torch.empty(tuple(self.context.get_tensor_shape(self.output_name)),
                          dtype=self.output_dtype, device="cuda")
        self.context.set_tensor_address(self.input_name, x.data_ptr())
        self.context.set_tensor_address(self.output_name, out.data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError("TensorRT execution failed; the TensorRT log above says why")
        out = out.cpu()  # waits for the stream
        return out.float() if out.is_floating_point() else out.long()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.static_batch:
            return run_fixed_batch(self._run, images, self.static_batch)
        return torch.cat([self._run(chunk) for chunk in images.split(self.max_batch)])
