"""Turn an exported FP32 ONNX model into any backend's artifact (see `backends.BACKENDS`).

Cheap checks run first (the input file, the TensorRT installation), so a build that
cannot succeed stops before minutes of calibration. Intermediate models a TensorRT build
needs (`X.qdq.onnx`, `X.fp16.onnx`, `X.qdq.fp16.onnx`) are written beside the export, so
the `trtexec` line in the engine's sidecar reproduces the engine from files that exist.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx

from fakd_deploy import optional
from fakd_deploy.artifacts import Artifact
from fakd_deploy.deploy.backends import Backend, artifact_path, model_stem, resolve_backend
from fakd_deploy.deploy.fp16 import to_fp16
from fakd_deploy.deploy.onnx_meta import load_onnx
from fakd_deploy.deploy.qdq_rules import check_tensorrt_qdq, fusion_advice
from fakd_deploy.errors import BackendUnavailable, BadInput
from fakd_deploy.utils import atomic_write

log = logging.getLogger(__name__)

CalibImages = Iterable[np.ndarray] | None
QUANTIZERS = ("ort", "modelopt")


def _need_calibration(images: CalibImages, backend: Backend) -> Iterable[np.ndarray]:
    if images is None:
        raise BadInput(
            f"{backend.name} needs calibration images: pass --recipe (its training "
            "split is read through the val transform) or --calib N with a recipe"
        )
    return images


def _refuse_quantized(model: Artifact, backend: Backend) -> None:
    if model.quantized:
        raise BadInput(
            f"{model.path} is already quantized; build {backend.name} from the exported "
            f"FP32 model {model_stem(model.path)}.onnx"
        )


def _usable_qdq(model: Artifact, backend: Backend) -> bool:
    """True when the input is a Q/DQ model TensorRT accepts; `BadInput` for one it rejects."""
    if not model.quantized:
        return False
    onnx_path = model.path
    problems = check_tensorrt_qdq(model.graph)
    if problems:
        fp32 = onnx_path.with_name(f"{model_stem(onnx_path)}.onnx")
        raise BadInput(
            f"{onnx_path} cannot be built for TensorRT: {problems[0]}"
            f"{f' (and {len(problems) - 1} more)' if len(problems) > 1 else ''}. "
            f"{model_stem(onnx_path)}.int8.onnx is the UINT8 model for ort-cpu-int8; build "
            f"{backend.name} from the FP32 export instead: `fakd-deploy build {fp32} --backend "
            f"{backend.name}` (it writes {model_stem(onnx_path)}.qdq.onnx for TensorRT)"
        )
    for advice in fusion_advice(model.graph):
        log.warning("%s: %s", onnx_path.name, advice)
    return True


def _copy(onnx_path: Path, target: Path) -> Path:
    if target.resolve() != onnx_path.resolve():
        atomic_write(target, lambda tmp: shutil.copyfile(onnx_path, tmp))
    return target


def write_fp16(onnx_path: Path, target: Path) -> Path:
    """FP16 copy of a model (plain or QDQ), FP32 inputs and outputs kept."""
    model = to_fp16(load_onnx(onnx_path))
    return atomic_write(target, lambda tmp: onnx.save_model(model, str(tmp)))


def _qdq(model: Artifact, backend: Backend, images: CalibImages, method: str, quantizer: str) -> Path:
    """`X.qdq.onnx`: the given model if it already is one TensorRT accepts, else quantized now
    by fakd-deploy's placement (`ort`) or NVIDIA Model Optimizer (`modelopt`)."""
    if _usable_qdq(model, backend):
        return model.path
    target = model.path.with_name(f"{model_stem(model.path)}.qdq.onnx")
    if quantizer == "modelopt":
        from fakd_deploy.deploy.modelopt_int8 import quantize_modelopt_int8

        return quantize_modelopt_int8(model.path, target, _need_calibration(images, backend), method)
    if optional.load("onnxruntime") is None:
        raise BackendUnavailable(
            f"making {target.name} (INT8 calibration) needs onnxruntime, which is not installed: "
            f"pip install 'fakd-deploy[cpu]', or build {target.name} on another machine "
            f"(`fakd-deploy build {model.path.name} --backend ort-trt-int8`) and build the engine from it"
        )
    from fakd_deploy.deploy.quantize import quantize_tensorrt_int8

    return quantize_tensorrt_int8(model.path, target, _need_calibration(images, backend), method)


def _engine(
    model: Artifact,
    backend: Backend,
    target: Path,
    images: CalibImages,
    method: str,
    workspace_gb: float,
    quantizer: str,
) -> Path:
    from fakd_deploy.deploy.trt import build_engine, build_plan, import_tensorrt

    onnx_path = model.path
    if backend.precision != "int8":
        _refuse_quantized(model, backend)
    elif not _usable_qdq(model, backend):  # refuses the UINT8 model before any GPU is touched
        _need_calibration(images, backend)
    trt = import_tensorrt()  # fail before spending minutes on calibration
    plan = build_plan(trt.__version__, backend.precision)
    stem = model_stem(onnx_path)
    source = onnx_path
    if plan.source == "fp16":
        source = write_fp16(onnx_path, onnx_path.with_name(f"{stem}.fp16.onnx"))
    elif plan.source.startswith("qdq"):
        source = _qdq(model, backend, images, method, quantizer)
        if plan.source == "qdq-fp16":
            source = write_fp16(source, onnx_path.with_name(f"{stem}.qdq.fp16.onnx"))
    fp32 = onnx_path.with_name(f"{stem}.onnx")
    metadata = Artifact.open(fp32).metadata if fp32.exists() and fp32 != onnx_path else model.metadata
    return build_engine(
        source,
        target,
        plan,
        workspace_gb,
        metadata=metadata,
        source_onnx=fp32 if fp32.exists() else onnx_path,
    )


def build(
    onnx_model: Artifact | str | Path,
    backend: str | Backend,
    calib_images: CalibImages = None,
    calib_method: str = "minmax",
    out: str | Path | None = None,
    workspace_gb: float = 2.0,
    quantizer: str = "ort",
) -> Path:
    """Build the artifact of one backend from an exported ONNX model and return its path.

    `calib_images` are (1, 3, H, W) float32 normalised training images, read only by
    INT8 builds (which refuse to run without them). `quantizer` makes TensorRT's Q/DQ model
    with fakd-deploy's placement (`ort`) or NVIDIA Model Optimizer (`modelopt`).
    """
    if quantizer not in QUANTIZERS:
        raise BadInput(f"quantizer '{quantizer}' is not one of: {', '.join(QUANTIZERS)}")
    spec = resolve_backend(backend)
    if quantizer == "modelopt" and spec.precision == "int8":
        from fakd_deploy.deploy.modelopt_int8 import available

        reason = available()
        if reason:
            raise BackendUnavailable(reason)
    model = onnx_model if isinstance(onnx_model, Artifact) else Artifact.open(onnx_model)
    if model.kind != "onnx":
        raise BadInput(f"build takes an ONNX model from `export`; {model.path} is not one")
    onnx_path = model.path
    target = Path(out) if out else artifact_path(onnx_path, spec)
    if spec.engine:
        return _engine(model, spec, target, calib_images, calib_method, workspace_gb, quantizer)
    if spec.suffix == ".qdq.onnx":
        source = _qdq(model, spec, calib_images, calib_method, quantizer)
        return _copy(source, target)
    _refuse_quantized(model, spec)
    if spec.suffix == ".int8.onnx":
        from fakd_deploy.deploy.quantize import quantize_ort_int8

        return quantize_ort_int8(onnx_path, target, _need_calibration(calib_images, spec), calib_method)
    if spec.suffix == ".fp16.onnx":
        return write_fp16(onnx_path, target)
    return _copy(onnx_path, target)
