"""Every deploy backend in one table: what runs it, where, in which precision, from which file.

Artifacts sit beside the exported model `X.onnx`:

| backend | runtime | device | provider | runs |
|---|---|---|---|---|
| ort-cpu-fp32 (ort-fp32) | onnxruntime | cpu | CPU | `X.onnx` |
| ort-cpu-int8 (ort-int8) | onnxruntime | cpu | CPU | `X.int8.onnx` (UINT8 asymmetric QDQ) |
| ort-cuda-fp32 | onnxruntime | cuda | CUDA | `X.onnx` |
| ort-cuda-fp16 | onnxruntime | cuda | CUDA | `X.fp16.onnx` (FP16 graph, FP32 IO) |
| ort-trt-fp16 | onnxruntime | cuda | TensorRT | `X.onnx` with `trt_fp16_enable` |
| ort-trt-int8 | onnxruntime | cuda | TensorRT | `X.qdq.onnx` (TensorRT-conformant INT8 QDQ) |
| trt-fp32 / trt-fp16 / trt-int8 | tensorrt | cuda | - | `X.fp32.engine` ... (+ `.engine.json`) |

There is no ort-cuda-int8: the CUDA provider runs a QDQ model as dequantize -> FP32, so a
row with that label would measure FP32 while calling it INT8. `open_backend` checks that
an artifact is what its backend says (quantized, FP16, conformant Q/DQ) before running it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import onnx

from fakd_deploy.deploy.onnx_meta import load_onnx
from fakd_deploy.errors import BadInput
from fakd_deploy.evaluate import Predictor

ONNX_SUFFIXES = (".int8", ".qdq", ".fp16")


@dataclass(frozen=True)
class Backend:
    """One way to run a model: runtime, device, ORT execution provider, precision, artifact."""

    name: str
    runtime: str  # onnxruntime | tensorrt
    device: str  # cpu | cuda
    precision: str  # fp32 | fp16 | int8
    suffix: str  # the artifact beside X.onnx: X<suffix>
    provider: str | None = None  # ONNX Runtime execution provider

    @property
    def engine(self) -> bool:
        return self.runtime == "tensorrt"


def _ort(name: str, device: str, precision: str, suffix: str, provider: str) -> Backend:
    return Backend(name, "onnxruntime", device, precision, suffix, provider)


BACKENDS: dict[str, Backend] = {
    backend.name: backend
    for backend in (
        _ort("ort-cpu-fp32", "cpu", "fp32", ".onnx", "CPUExecutionProvider"),
        _ort("ort-cpu-int8", "cpu", "int8", ".int8.onnx", "CPUExecutionProvider"),
        _ort("ort-cuda-fp32", "cuda", "fp32", ".onnx", "CUDAExecutionProvider"),
        _ort("ort-cuda-fp16", "cuda", "fp16", ".fp16.onnx", "CUDAExecutionProvider"),
        _ort("ort-trt-fp16", "cuda", "fp16", ".onnx", "TensorrtExecutionProvider"),
        _ort("ort-trt-int8", "cuda", "int8", ".qdq.onnx", "TensorrtExecutionProvider"),
        Backend("trt-fp32", "tensorrt", "cuda", "fp32", ".fp32.engine"),
        Backend("trt-fp16", "tensorrt", "cuda", "fp16", ".fp16.engine"),
        Backend("trt-int8", "tensorrt", "cuda", "int8", ".int8.engine"),
    )
}
ALIASES = {"ort-fp32": "ort-cpu-fp32", "ort-int8": "ort-cpu-int8"}


@runtime_checkable
class GpuTimed(Protocol):
    """A GPU Predictor that can also time its GPU work alone.

    `gpu_compute_ms` runs on inputs already on the device, on the predictor's own
    (non-default) stream, after `warmup_s` seconds of warm-up, and returns milliseconds
    per run from CUDA events: trtexec's "GPU compute". Calling the predictor itself is
    the end-to-end "host latency", copies from and to pinned host memory included.
    """

    def __call__(self, images: np.ndarray) -> np.ndarray: ...

    def gpu_compute_ms(
        self, images: np.ndarray, warmup_s: float = 1.0, seconds: float = 3.0, iters: int | None = None
    ) -> list[float]: ...


def resolve_backend(name: str | Backend) -> Backend:
    """The backend called `name` (aliases included); `BadInput` listing the choices otherwise."""
    if isinstance(name, Backend):
        return name
    key = ALIASES.get(name, name)
    if key not in BACKENDS:
        choices = ", ".join([*BACKENDS, *(f"{a} (= {b})" for a, b in ALIASES.items())])
        raise BadInput(f"unknown backend '{name}'; choose from: {choices}")
    return BACKENDS[key]


def model_stem(onnx_path: str | Path) -> str:
    """`kd` for kd.onnx, kd.int8.onnx, kd.qdq.onnx, kd.fp16.onnx or kd.qdq.fp16.onnx."""
    name = Path(onnx_path).name.removesuffix(".onnx")
    while name.endswith(ONNX_SUFFIXES):
        name = name.rsplit(".", 1)[0]
    return name


def artifact_path(onnx_path: str | Path, backend: str | Backend) -> Path:
    """Where `build` writes a backend's artifact for the exported model `onnx_path`."""
    return Path(onnx_path).with_name(model_stem(onnx_path) + resolve_backend(backend).suffix)


def runs_artifact(backend: str | Backend, path: str | Path) -> bool:
    """True when `path` is the very file `backend` runs (X.onnx for ort-cpu-fp32, X.qdq.onnx
    for ort-trt-int8, ...): how a benchmark finds the rows a deploy folder holds."""
    suffix = resolve_backend(backend).suffix
    name = Path(path).name
    base = name[: -len(suffix)] if name.endswith(suffix) else ""
    return bool(base) and model_stem(base + ".onnx") == base


def backend_for_file(path: str | Path, requested: str | None = None) -> Backend:
    """The backend asked for, else the natural one for the file: an engine by its precision,
    an ONNX model on ONNX Runtime (CPU for FP32 and INT8 models, CUDA for FP16 ones)."""
    path = Path(path)
    if requested is not None:
        return resolve_backend(requested)
    if path.suffix == ".engine":
        precision = path.suffixes[-2].lstrip(".") if len(path.suffixes) > 1 else ""
        return resolve_backend(f"trt-{precision}") if f"trt-{precision}" in BACKENDS else BACKENDS["trt-fp32"]
    precision = _model_precision(path)
    return BACKENDS["ort-cuda-fp16" if precision == "fp16" else f"ort-cpu-{precision}"]


def unavailable_reason(backend: str | Backend) -> str | None:
    """Why `backend` cannot run on this machine, or None when it can."""
    spec = resolve_backend(backend)
    from fakd_deploy.deploy import cuda
    from fakd_deploy.errors import BackendUnavailable

    if spec.engine:
        from fakd_deploy.deploy.trt import import_tensorrt

        try:
            import_tensorrt()
        except BackendUnavailable as error:
            return str(error)
        return None
    from fakd_deploy.deploy.ort import missing_provider

    return missing_provider(spec.provider or "") or (cuda.no_gpu_reason() if spec.device == "cuda" else None)


def build(
    onnx_path: str | Path,
    backend: str | Backend,
    calib_images: Iterable[np.ndarray] | None = None,
    calib_method: str = "minmax",
    out: str | Path | None = None,
    workspace_gb: float = 2.0,
) -> Path:
    """Build `backend`'s artifact from an exported model; see `fakd_deploy.deploy.build.build`."""
    from fakd_deploy.deploy.build import build as build_artifact

    return build_artifact(onnx_path, backend, calib_images, calib_method, out, workspace_gb)


def _model_precision(path: Path) -> str:
    """int8 for a QDQ model, fp16 for one with FP16 weights, fp32 otherwise."""
    model = load_onnx(path, load_external_data=False)
    if any(node.op_type == "QuantizeLinear" for node in model.graph.node):
        return "int8"
    if any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer):
        return "fp16"
    return "fp32"


def check_artifact(path: str | Path, backend: str | Backend) -> None:
    """`BadInput` unless the ONNX file at `path` is the kind of model `backend` claims to run."""
    spec, path = resolve_backend(backend), Path(path)
    precision = _model_precision(path)
    expected = "fp32" if spec.name == "ort-trt-fp16" else spec.precision
    if precision == "int8" and spec.provider == "CUDAExecutionProvider":
        raise BadInput(
            f"{path} is an INT8 (QDQ) model: the CUDA execution provider would run it "
            "as dequantize -> FP32, so it is not opened there; use ort-trt-int8 "
            "(TensorRT execution provider) or trt-int8"
        )
    if precision != expected:
        right = artifact_path(path, spec).name
        raise BadInput(
            f"{path} is an {precision.upper()} model but {spec.name} runs "
            f"{expected.upper()} ({right}); build it with `fakd-deploy build "
            f"{model_stem(path)}.onnx --backend {spec.name}`"
        )
    if spec.name == "ort-trt-int8":
        from fakd_deploy.deploy.qdq import check_tensorrt_qdq

        problems = check_tensorrt_qdq(load_onnx(path, load_external_data=False))
        if problems:
            raise BadInput(
                f"{path} is not a Q/DQ model TensorRT accepts ({problems[0]}); "
                f"ort-trt-int8 runs {model_stem(path)}.qdq.onnx from `fakd-deploy build "
                f"{model_stem(path)}.onnx --backend ort-trt-int8`"
            )


def open_backend(
    path: str | Path,
    backend: str | Backend,
    threads: int | None = None,
    device_id: int = 0,
    workspace_gb: float = 2.0,
) -> Predictor:
    """A Predictor running the artifact at `path` exactly as `backend` says, or an error saying why not.

    GPU predictors also satisfy `GpuTimed`.
    """
    spec, path = resolve_backend(backend), Path(path)
    if not path.exists():
        raise BadInput(f"model not found: {path}")
    if spec.engine:
        from fakd_deploy.deploy.trt import TrtPredictor

        predictor: Any = TrtPredictor(path)
        built = predictor.sidecar.get("precision")
        if built != spec.precision:
            raise BadInput(
                f"{path} is a TensorRT {built} engine, not {spec.precision}: open it as trt-{built}"
            )
        return predictor
    check_artifact(path, spec)
    from fakd_deploy.deploy import ort

    if spec.device == "cpu":
        return ort.OrtPredictor(path, ort.provider_options(ort.CPU, path), threads)
    reason = unavailable_reason(spec)
    if reason:
        from fakd_deploy.errors import BackendUnavailable

        raise BackendUnavailable(f"{spec.name}: {reason}")
    from fakd_deploy.deploy.cuda import Stream

    stream = Stream()
    providers = ort.provider_options(
        spec.provider or "", path, spec.precision, device_id, stream.ptr, workspace_gb
    )
    return ort.OrtGpuPredictor(path, providers, stream, threads)
