"""One entry point that turns an exported FP32 ONNX model into any backend's artifact.

Artifacts sit beside the ONNX model, named after it: `X.onnx` -> `X.int8.onnx`,
`X.fp16.engine` (+ `X.fp16.engine.json`), ...
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from fakd_deploy.deploy.export import read_metadata
from fakd_deploy.deploy.quantize import is_quantized, quantize_int8
from fakd_deploy.utils import atomic_write

CALIB_IMAGES = 32


@dataclass
class BuildJob:
    """Inputs shared by every builder; calibration images are only read when INT8 needs them."""

    onnx: Path
    out: Path
    calib_batches: Iterable[torch.Tensor] | None
    calib_method: str
    workspace_gb: float

    def calibration(self) -> Iterable[torch.Tensor]:
        """The given images, or `CALIB_IMAGES` training images of the recipe stored in the model."""
        if self.calib_batches is not None:
            return self.calib_batches
        import yaml

        from fakd_deploy.loaders import calibration_batches
        from fakd_deploy.recipe import parse_recipe

        recipe_text = read_metadata(self.onnx).get("recipe")
        if not recipe_text:
            raise ValueError(f"{self.onnx} stores no recipe, so INT8 calibration needs images "
                             "(calib_batches)")
        return calibration_batches(parse_recipe(yaml.safe_load(recipe_text)).data, CALIB_IMAGES)


def _ort_fp32(job: BuildJob) -> None:
    if job.out.resolve() != job.onnx.resolve():
        atomic_write(job.out, lambda tmp: shutil.copyfile(job.onnx, tmp))


def _ort_int8(job: BuildJob) -> None:
    quantize_int8(job.onnx, job.out, job.calibration(), job.calib_method, symmetric=False)


def _trt(precision: str) -> Callable[[BuildJob], None]:
    def make(job: BuildJob) -> None:
        from fakd_deploy.deploy.trt import build_engine, import_tensorrt

        import_tensorrt()  # fail before spending minutes on calibration
        source = job.onnx
        if precision == "int8" and not is_quantized(source):
            source = job.out.with_name(f"{_stem(job.onnx)}.trt-int8.onnx")
            quantize_int8(job.onnx, source, job.calibration(), job.calib_method, symmetric=True)
        build_engine(source, job.out, precision, job.workspace_gb, metadata=read_metadata(source))
    return make


@dataclass(frozen=True)
class Backend:
    suffix: str
    make: Callable[[BuildJob], None]


BACKENDS: dict[str, Backend] = {
    "ort-fp32": Backend(".onnx", _ort_fp32),
    "ort-int8": Backend(".int8.onnx", _ort_int8),
    "trt-fp32": Backend(".fp32.engine", _trt("fp32")),
    "trt-fp16": Backend(".fp16.engine", _trt("fp16")),
    "trt-int8": Backend(".int8.engine", _trt("int8")),
}


def _stem(onnx_path: Path) -> str:
    return onnx_path.name.removesuffix(".onnx").removesuffix(".int8")


def artifact_path(onnx_path: str | Path, backend: str) -> Path:
    """Where `build` writes a backend's artifact by default."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(_stem(onnx_path) + BACKENDS[backend].suffix)


def build(onnx_path: str | Path, backend: str, out: str | Path | None = None,
          calib_batches: Iterable[torch.Tensor] | None = None, calib_method: str = "minmax",
          workspace_gb: float = 2) -> Path:
    """Build the artifact of one backend from an exported ONNX model and return its path."""
    if backend not in BACKENDS:
        raise ValueError(f"backend '{backend}' is not one of: {', '.join(BACKENDS)}")
    onnx_path = Path(onnx_path)
    if not onnx_path.exists():
        raise FileNotFoundError(f"ONNX model not found: {onnx_path}")
    if backend != "trt-int8" and is_quantized(onnx_path):
        raise ValueError(f"{onnx_path} is already quantized; build {backend} from the FP32 model")
    target = Path(out) if out else artifact_path(onnx_path, backend)
    BACKENDS[backend].make(BuildJob(onnx_path, target, calib_batches, calib_method, workspace_gb))
    return target
