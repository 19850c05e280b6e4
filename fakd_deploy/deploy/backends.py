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
row with that label would measure FP32 while calling it INT8. This module is the table and
the file names; `runtime` opens an artifact on a backend after checking that it is what the
backend says (quantized, FP16, conformant Q/DQ).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fakd_deploy.errors import BadInput
from fakd_deploy.suggest import did_you_mean

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
# Names a person may expect that do not exist, and why.
MISSING = {
    "ort-cuda-int8": "there is no ort-cuda-int8: ONNX Runtime's CUDA provider runs a Q/DQ model as "
    "dequantize -> FP32, so the row would measure FP32 while calling it INT8; INT8 on a GPU is "
    "ort-trt-int8 (TensorRT provider) or trt-int8",
}


def resolve_backend(name: str | Backend) -> Backend:
    """The backend called `name` (aliases included); `BadInput` listing the choices otherwise."""
    if isinstance(name, Backend):
        return name
    key = ALIASES.get(name, name)
    if key in MISSING:
        raise BadInput(MISSING[key])
    if key not in BACKENDS:
        choices = ", ".join([*BACKENDS, *(f"{a} (= {b})" for a, b in ALIASES.items())])
        raise BadInput(
            f"unknown backend '{name}'{did_you_mean(name, [*BACKENDS, *ALIASES])}; choose from: {choices}"
        )
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
