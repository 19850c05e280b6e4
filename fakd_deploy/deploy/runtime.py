"""Running a model file: any `Artifact` as a Predictor, on the backend asked for.

`backends.BACKENDS` says what each backend is; this module turns an `Artifact` into a
running Predictor on one of them, after checking that the machine has the runtime and the
device, and that the file is the kind of model the backend runs (a row labelled INT8 must
run an INT8 model, a CUDA row must run on CUDA). `open_predictor` is the one way every
command opens a model: checkpoints on PyTorch, ONNX models and engines on their backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fakd_deploy.artifacts import Artifact, ModelInfo
from fakd_deploy.data.preprocess import Normalise
from fakd_deploy.deploy.backends import BACKENDS, Backend, artifact_path, model_stem, resolve_backend
from fakd_deploy.errors import BackendUnavailable, BadInput
from fakd_deploy.predictor import FixedSizePredictor, Predictor
from fakd_deploy.recipe import IMAGENET_MEAN, IMAGENET_STD


def unavailable_reason(backend: str | Backend) -> str | None:
    """Why `backend` cannot run on this machine, or None when it can."""
    spec = resolve_backend(backend)
    from fakd_deploy.deploy import cuda

    if spec.engine:
        from fakd_deploy.deploy.trt import import_tensorrt

        try:
            import_tensorrt()
        except BackendUnavailable as error:
            return str(error)
        return None
    from fakd_deploy.deploy.ort import missing_provider

    return missing_provider(spec.provider or "") or (cuda.no_gpu_reason() if spec.device == "cuda" else None)


def backend_for(artifact: Artifact, requested: str | None = None) -> Backend:
    """The backend asked for, else the natural one for the file: an engine by its precision,
    an ONNX model on ONNX Runtime (CPU for FP32 and INT8 models, CUDA for FP16 ones)."""
    if requested is not None:
        return resolve_backend(requested)
    if artifact.kind == "engine":
        return BACKENDS[f"trt-{artifact.precision}"]
    return BACKENDS["ort-cuda-fp16" if artifact.precision == "fp16" else f"ort-cpu-{artifact.precision}"]


def check_artifact(artifact: Artifact, backend: str | Backend) -> None:
    """`BadInput` unless the ONNX model is the kind of model `backend` claims to run."""
    spec, path = resolve_backend(backend), artifact.path
    expected = "fp32" if spec.name == "ort-trt-fp16" else spec.precision
    if artifact.quantized and spec.provider == "CUDAExecutionProvider":
        raise BadInput(
            f"{path} is an INT8 (QDQ) model: the CUDA execution provider would run it "
            "as dequantize -> FP32, so it is not opened there; use ort-trt-int8 "
            "(TensorRT execution provider) or trt-int8"
        )
    if artifact.precision != expected:
        right = artifact_path(path, spec)
        how = (
            f"open {right.name} instead"
            if right.exists()
            else f"build it with `fakd-deploy build {path.with_name(model_stem(path) + '.onnx')} "
            f"--backend {spec.name}`"
        )
        raise BadInput(
            f"{path} is an {artifact.precision.upper()} model but {spec.name} runs "
            f"{expected.upper()} models ({right.name}); {how}"
        )
    if spec.name == "ort-trt-int8":
        from fakd_deploy.deploy.qdq import check_tensorrt_qdq

        problems = check_tensorrt_qdq(artifact.graph)
        if problems:
            raise BadInput(
                f"{path} is not a Q/DQ model TensorRT accepts ({problems[0]}); "
                f"ort-trt-int8 runs {model_stem(path)}.qdq.onnx from `fakd-deploy build "
                f"{model_stem(path)}.onnx --backend ort-trt-int8`"
            )


def open_backend(
    model: Artifact | str | Path,
    backend: str | Backend,
    threads: int | None = None,
    device_id: int = 0,
    workspace_gb: float = 2.0,
) -> Predictor:
    """A Predictor running the artifact exactly as `backend` says, or an error saying why not.

    GPU predictors also satisfy `predictor.GpuTimed`.
    """
    spec = resolve_backend(backend)
    artifact = model if isinstance(model, Artifact) else Artifact.open(model)
    if spec.engine:
        if artifact.kind != "engine":
            raise BadInput(f"{spec.name} runs TensorRT engines; {artifact.path} is not one")
        from fakd_deploy.deploy.trt import TrtPredictor

        if artifact.precision != spec.precision:
            raise BadInput(
                f"{artifact.path} is a TensorRT {artifact.precision} engine, not {spec.precision}: "
                f"open it as trt-{artifact.precision}"
            )
        return TrtPredictor(artifact.path)
    if artifact.kind != "onnx":
        raise BadInput(f"{spec.name} runs ONNX models; {artifact.path} is not one")
    check_artifact(artifact, spec)
    from fakd_deploy.deploy import ort

    if spec.device == "cpu":
        return ort.OrtPredictor(artifact.path, ort.provider_options(ort.CPU, artifact.path), threads)
    reason = unavailable_reason(spec)
    if reason:
        raise BackendUnavailable(f"{spec.name}: {reason}")
    from fakd_deploy.deploy.cuda import Stream

    stream = Stream()
    providers: Any = ort.provider_options(
        spec.provider or "", artifact.path, spec.precision, device_id, stream.ptr, workspace_gb
    )
    return ort.OrtGpuPredictor(artifact.path, providers, stream, threads)


def _open_checkpoint_predictor(
    artifact: Artifact, device: str, threads: int | None
) -> tuple[Predictor, ModelInfo]:
    from fakd_deploy.models.predictor import TorchPredictor, resolve_device

    checkpoint = artifact.source
    model = checkpoint.build(str(artifact.path))
    recipe = checkpoint.recipe_config()
    data = recipe.data if recipe else None
    normalise = (
        Normalise(tuple(data.mean), tuple(data.std), data.pixel_scale)
        if data
        else Normalise(IMAGENET_MEAN, IMAGENET_STD)
    )
    info = ModelInfo(normalise, None, model.num_classes, checkpoint.class_names)
    return TorchPredictor(model, resolve_device(device), threads), info


def open_predictor(
    model: Artifact | str | Path, backend: str | None = None, device: str = "auto", threads: int | None = None
) -> tuple[Predictor, ModelInfo]:
    """A Predictor for a checkpoint, ONNX model or engine, and how to feed it.

    `backend` picks the runtime for an ONNX model (default: ONNX Runtime on the CPU);
    `device` the torch device for a checkpoint. Models with a fixed input size get images
    resized to it and predictions resized back, so the Predictor takes any image size.
    """
    artifact = model if isinstance(model, Artifact) else Artifact.open(model)
    if artifact.kind == "checkpoint":
        if backend not in (None, "pytorch"):
            raise BadInput(
                f"--backend {backend} runs ONNX models and engines; {artifact.path} is a checkpoint"
            )
        predictor, info = _open_checkpoint_predictor(artifact, device, threads)
    else:
        predictor = open_backend(artifact, backend_for(artifact, backend), threads=threads)
        size = getattr(predictor, "input_size", None)
        info = ModelInfo.from_metadata(artifact.metadata, size, artifact.path)
    return FixedSizePredictor(predictor, info.input_size), info
