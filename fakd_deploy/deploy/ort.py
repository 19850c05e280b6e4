"""ONNX Runtime sessions as Predictors, on the execution provider they are asked for.

A Predictor takes (N, 3, H, W) float32 normalised images and returns logits (N, C, H, W)
float32 or labels (N, H, W) int64. The provider is always chosen explicitly: a session
that ONNX Runtime quietly moved to another provider (a missing CUDA or TensorRT library
makes it fall back to CPU) is refused, so a row labelled CUDA never measures the CPU.

On a GPU the session runs on a stream of its own (`user_compute_stream`) with IO binding:
outputs stay on the device until copied back once, and `gpu_compute_ms` times the session
on device-resident inputs with CUDA events, as trtexec's "GPU compute" does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from fakd_deploy.errors import ArtifactError, BackendUnavailable, error_summary
from fakd_deploy.predictor import as_prediction, run_fixed_batch

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"

ProviderList = list[tuple[str, dict[str, str]]]


def cache_dir(artifact: str | Path) -> Path:
    """Where the TensorRT execution provider keeps engines and timings for an artifact."""
    artifact = Path(artifact)
    return artifact.with_name(artifact.name + ".ort-trt-cache")


def provider_options(
    provider: str,
    artifact: str | Path,
    precision: str = "fp32",
    device_id: int = 0,
    stream: int | None = None,
    workspace_gb: float = 2.0,
) -> ProviderList:
    """The provider list for one backend, most preferred first, with explicit options.

    TensorRT EP (onnxruntime TensorRT-ExecutionProvider docs, "Configurations"): engine and
    timing caches beside the artifact, so a second session loads instead of rebuilding;
    `trt_fp16_enable` for FP16 and INT8 (layers outside Q/DQ pairs run in FP16);
    `trt_int8_enable` without a calibration table, so the Q/DQ scales of the model are used.
    The CUDA EP follows it for nodes TensorRT does not take; the CPU EP ends every GPU list
    for the nodes no GPU provider implements (shape arithmetic).
    """
    gpu = {"device_id": str(device_id)}
    if stream is not None:
        gpu["user_compute_stream"] = str(stream)
    if provider == CPU:
        return [(CPU, {})]
    if provider == CUDA:
        return [(CUDA, gpu), (CPU, {})]
    if provider == TENSORRT:
        cache = str(cache_dir(artifact))
        trt = {
            **gpu,
            "trt_engine_cache_enable": "True",
            "trt_engine_cache_path": cache,
            "trt_timing_cache_enable": "True",
            "trt_timing_cache_path": cache,
            "trt_fp16_enable": str(precision in ("fp16", "int8")),
            "trt_int8_enable": str(precision == "int8"),
            "trt_max_workspace_size": str(int(workspace_gb * 2**30)),
        }
        return [(TENSORRT, trt), (CUDA, gpu), (CPU, {})]
    raise ValueError(f"unknown execution provider {provider}")


def missing_provider(provider: str) -> str | None:
    """Why this onnxruntime build cannot offer `provider`, or None when it lists it."""
    available = ort.get_available_providers()
    if provider in available:
        return None
    hint = (
        "install onnxruntime-gpu instead of onnxruntime (pip uninstall onnxruntime; "
        "pip install 'fakd-deploy[gpu]')"
        if provider != CPU
        else "reinstall onnxruntime"
    )
    return f"onnxruntime {ort.__version__} has no {provider} (it offers {', '.join(available)}): {hint}"


class OrtPredictor:
    """An ONNX model in an ONNX Runtime session, as a Predictor.

    `providers` is a provider list from `provider_options` (default: CPU only); the
    session must end up on its first provider.
    """

    def __init__(
        self, model: str | Path | bytes, providers: ProviderList | None = None, threads: int | None = None
    ) -> None:
        providers = providers or [(CPU, {})]
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        source = model if isinstance(model, bytes) else str(model)
        try:
            self.session = ort.InferenceSession(
                source,
                options,
                providers=[name for name, _ in providers],
                provider_options=[opts for _, opts in providers],
            )
        except Exception as error:  # onnxruntime's own types (InvalidProtobuf, Fail, ...)
            where = "the model" if isinstance(model, bytes) else model
            raise ArtifactError(f"ONNX Runtime cannot load {where}: {error_summary(error)}") from None
        wanted = providers[0][0]
        if self.session.get_providers()[0] != wanted:
            raise BackendUnavailable(
                f"ONNX Runtime could not start {wanted} and fell back to "
                f"{self.session.get_providers()[0]}; check that the CUDA, cuDNN "
                "and TensorRT libraries it needs are installed"
            )
        self.provider = wanted
        first = self.session.get_inputs()[0]
        self.input_name = first.name
        self.output_name = self.session.get_outputs()[0].name
        self.static_batch = first.shape[0] if isinstance(first.shape[0], int) else None
        height, width = first.shape[2:]
        self.input_size = (height, width) if isinstance(height, int) and isinstance(width, int) else None

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def _run(self, images: np.ndarray) -> np.ndarray:
        (out,) = self.session.run([self.output_name], {self.input_name: images})
        return as_prediction(out)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = np.ascontiguousarray(images, dtype=np.float32)
        return run_fixed_batch(self._run, images, self.static_batch)


class OrtGpuPredictor(OrtPredictor):
    """A session on the CUDA or TensorRT provider, fed through IO binding on its own stream.

    `stream` is the `cuda.Stream` whose pointer the provider options carry
    (`user_compute_stream`), so the CUDA events of `gpu_compute_ms` time the session's work.
    """

    def __init__(
        self, model: str | Path | bytes, providers: ProviderList, stream: Any, threads: int | None = None
    ) -> None:
        super().__init__(model, providers, threads)
        self.device_id = int(providers[0][1].get("device_id", 0))
        self.stream = stream

    def _run(self, images: np.ndarray) -> np.ndarray:
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.input_name, images)
        binding.bind_output(self.output_name, "cuda", self.device_id)
        self.session.run_with_iobinding(binding)
        return as_prediction(binding.copy_outputs_to_cpu()[0])

    def gpu_compute_ms(
        self, images: np.ndarray, warmup_s: float = 1.0, seconds: float = 3.0, iters: int | None = None
    ) -> list[float]:
        """Milliseconds of GPU time per run, inputs and outputs kept on the device."""
        from fakd_deploy.deploy.cuda import time_on_stream

        feed = np.ascontiguousarray(images, dtype=np.float32)
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(
            self.input_name, ort.OrtValue.ortvalue_from_numpy(feed, "cuda", self.device_id)
        )
        binding.bind_output(self.output_name, "cuda", self.device_id)
        return time_on_stream(
            self.stream, lambda: self.session.run_with_iobinding(binding), warmup_s, seconds, iters
        )
