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

from fakd_deploy import optional
from fakd_deploy.artifacts import Artifact, ModelInfo
from fakd_deploy.data.preprocess import Normalise
from fakd_deploy.deploy.backends import (
    BACKENDS,
    Backend,
    artifact_path,
    model_stem,
    resolve_backend,
    runs_artifact,
)
from fakd_deploy.deploy.inputs import feed
from fakd_deploy.errors import BackendUnavailable, BadInput
from fakd_deploy.inputs import MAX_THREADS
from fakd_deploy.predictor import FixedSizePredictor, Predictor
from fakd_deploy.recipe import IMAGENET_MEAN, IMAGENET_STD


def unavailable_reason(backend: str | Backend) -> str | None:
    """Why `backend` cannot run on this machine, or None when it can.

    Asks only what is installed: on a device without onnxruntime (a Jetson with JetPack's
    TensorRT) the ONNX Runtime backends say so instead of failing to import.
    """
    spec = resolve_backend(backend)
    from fakd_deploy.deploy import cuda

    if spec.engine:
        from fakd_deploy.deploy.trt import import_tensorrt

        try:
            import_tensorrt()
        except BackendUnavailable as error:
            return str(error)
        return None
    if optional.load("onnxruntime") is None:
        extra = "gpu" if spec.device == "cuda" else "cpu"
        return f"onnxruntime is not installed: pip install 'fakd-deploy[{extra}]'"
    from fakd_deploy.deploy.ort import missing_provider

    return missing_provider(spec.provider or "") or (cuda.no_gpu_reason() if spec.device == "cuda" else None)


def placement_problem(backend: str | Backend, placement: dict[str, float] | None) -> str | None:
    """Why a row labelled `backend` does not measure its execution provider alone, or None.

    `placement` is the share of the executed graph nodes per provider (ONNX Runtime's
    profile of the first run). Any node on another provider means the row would time a mix
    under one label (a TensorRT row that ran half its nodes on CUDA, a CUDA row with CPU
    nodes and the copies between them), so such a row is marked `Status.OFF_PROVIDER`.
    """
    provider = resolve_backend(backend).provider
    elsewhere = {name: share for name, share in (placement or {}).items() if name != provider}
    if provider is None or not elsewhere:
        return None
    shares = ", ".join(f"{name} {share:.1%}" for name, share in elsewhere.items())
    return f"nodes ran off {provider}: {shares}"


def backend_for(artifact: Artifact, requested: str | None = None) -> Backend:
    """The backend asked for, else the natural one for the file: an engine by its precision,
    an ONNX model on ONNX Runtime (CPU for FP32 and INT8 models, CUDA for FP16 ones)."""
    if requested is not None:
        return resolve_backend(requested)
    if artifact.kind == "engine":
        return BACKENDS[f"trt-{artifact.precision}"]
    return BACKENDS["ort-cuda-fp16" if artifact.precision == "fp16" else f"ort-cpu-{artifact.precision}"]


def _has_fp16(artifact: Artifact) -> bool:
    from onnx import TensorProto

    graph = artifact.graph.graph
    return any(t.data_type == TensorProto.FLOAT16 for t in graph.initializer) or any(
        a.name == "to" and a.i == TensorProto.FLOAT16
        for node in graph.node
        if node.op_type == "Cast"
        for a in node.attribute
    )


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
    if artifact.quantized and spec.device == "cpu" and _has_fp16(artifact):
        raise BadInput(
            f"{path} is a Q/DQ model with an FP16 remainder, which ONNX Runtime's CPU provider "
            "mis-runs (it loses accuracy the GPU runtimes keep): score "
            f"{model_stem(path)}.qdq.onnx on the CPU, run this one with trt-int8 or ort-trt-int8"
        )
    if artifact.precision != expected:
        right = artifact_path(path, spec)
        exported = path.with_name(model_stem(path) + ".onnx")
        if right.exists():
            how = f"open {right.name} instead"
        elif right == exported:  # the backend runs the exported model itself: nothing to build
            how = (
                f"{right.name} is the exported model: export it from its checkpoint with `fakd-deploy export`"
            )
        else:
            how = f"build it with `fakd-deploy build {exported} --backend {spec.name}`"
        runs_this = [b.name for b in BACKENDS.values() if runs_artifact(b, path)]
        if runs_this:
            how += f"; {path.name} itself runs on {' or '.join(runs_this)}"
        raise BadInput(
            f"{path} is an {artifact.precision.upper()} model but {spec.name} runs "
            f"{expected.upper()} models ({right.name}); {how}"
        )
    if spec.name == "ort-trt-int8":
        from fakd_deploy.deploy.qdq_rules import check_tensorrt_qdq

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
        spec.provider or "",
        artifact.path,
        spec.precision,
        device_id,
        stream.ptr,
        workspace_gb,
        artifact.sha256,
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
    The Predictor takes normalised images whatever the model takes (`ModelInfo.input`):
    a `pixels` or `uint8` model gets them as pixels (`deploy.inputs.feed`).
    """
    if threads is not None and not 1 <= threads <= MAX_THREADS:
        raise BadInput(f"--threads {threads}: give 1 to {MAX_THREADS}")
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
        return feed(predictor, info.input, info.normalise, info.input_size), info
    return FixedSizePredictor(predictor, info.input_size), info
