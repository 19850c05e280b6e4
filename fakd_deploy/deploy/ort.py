"""ONNX Runtime sessions as Predictors, on the execution provider they are asked for.

A Predictor takes (N, 3, H, W) float32 normalised images and returns logits (N, C, H, W)
float32 or labels (N, H, W) int64. The provider is always chosen explicitly, and what
ONNX Runtime makes of that choice is checked, never assumed:

- a session ONNX Runtime quietly moved to another provider (a missing CUDA or TensorRT
  library makes it fall back, in `InferenceSession.__init__` and again in `run`) is
  refused: fallback is switched off and the first provider checked;
- the TensorRT provider is listed by every onnxruntime-gpu build whether or not TensorRT
  loads (onnxruntime issue #13501), so `tensorrt_problem` loads it (the pip `tensorrt`
  wheel's libnvinfer is found only after `import tensorrt`, issue #18597) and checks its
  major against the one this onnxruntime build was made for;
- where the graph's nodes really ran (`get_providers()` lists registered providers only)
  is read from ONNX Runtime's profile of the first run: `placement`.

On a GPU the session runs on a stream of its own (`user_compute_stream`) with IO binding:
outputs stay on the device until copied back once, and `gpu_compute_ms` times the session
on device-resident inputs with CUDA events, as trtexec's "GPU compute" does.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from fakd_deploy import optional
from fakd_deploy.errors import ArtifactError, BackendUnavailable, error_summary
from fakd_deploy.predictor import as_prediction, pad_to_batch, run_fixed_batch
from fakd_deploy.utils import file_sha256

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
# onnxruntime-gpu on PyPI: up to 1.26 built for CUDA 12 and TensorRT 10, from 1.27 for CUDA 13
# and TensorRT 11 (the wheels' `cuda` extras name nvidia-*-cu12 up to 1.26, -cu13 from 1.27)
FIRST_ORT_FOR_TENSORRT_11 = (1, 27)
# Run option: return from `run` without cudaStreamSynchronize on the compute stream
# (onnxruntime_run_options_config_keys.h, kOrtRunOptionsConfigDisableSynchronizeExecutionProviders)
NO_SYNC = "disable_synchronize_execution_providers"

ProviderList = list[tuple[str, dict[str, str]]]


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("+")[0].split(".")[:2] if part.isdigit())


def tensorrt_major_for(ort_version: str) -> int:
    """The TensorRT major an onnxruntime-gpu release's TensorRT provider is built against."""
    return 11 if _version_tuple(ort_version) >= FIRST_ORT_FOR_TENSORRT_11 else 10


def tensorrt_problem(ort_version: str | None = None) -> str | None:
    """Why this onnxruntime's TensorRT provider cannot load TensorRT, or None when it can.

    `import tensorrt` first: the pip wheel puts libnvinfer where the provider finds it only
    once the module has loaded it. Then the library the provider links (libnvinfer.so.N)
    must load, and the `tensorrt` module, where installed, must be that major.
    """
    version = ort_version or ort.__version__
    major = tensorrt_major_for(version)
    module = optional.load("tensorrt")
    if module is not None:
        found = str(getattr(module, "__version__", "0"))
        if not found.startswith(f"{major}."):
            return (
                f"onnxruntime {version}'s TensorRT provider is built for TensorRT {major}, but "
                f"TensorRT {found} is installed; see the install matrix in docs/deploy.md"
            )
        return None
    library = f"libnvinfer.so.{major}"
    try:
        ctypes.CDLL(library)
    except OSError as error:
        return (
            f"onnxruntime {version}'s TensorRT provider needs TensorRT {major} ({library}), which "
            f"cannot be loaded ({error}); install the matching `tensorrt-cu*` wheel (docs/deploy.md)"
        )
    return None


def cache_dir(artifact: str | Path, sha256: str | None = None) -> Path:
    """Where the TensorRT execution provider keeps engines and timings for an artifact.

    The provider names a cached engine by a hash of the model's file name and tensor names
    (`TRTGenerateId`, tensorrt_execution_provider_utils.h), not of its weights or Q/DQ
    scales: a model rewritten in place would load the old engine. A folder per content
    hash makes a changed file a cache miss.
    """
    artifact = Path(artifact)
    digest = sha256 or file_sha256(artifact)
    return artifact.with_name(artifact.name + ".ort-trt-cache") / digest[:16]


def provider_options(
    provider: str,
    artifact: str | Path,
    precision: str = "fp32",
    device_id: int = 0,
    stream: int | None = None,
    workspace_gb: float = 2.0,
    sha256: str | None = None,
) -> ProviderList:
    """The provider list for one backend, most preferred first, with explicit options.

    TensorRT EP (onnxruntime TensorRT-ExecutionProvider docs, "Configurations"): engine and
    timing caches beside the artifact, in a folder keyed by its content (`cache_dir`), so a
    second session loads instead of rebuilding; `trt_fp16_enable` for FP16 and INT8 (layers
    outside Q/DQ pairs run in FP16); `trt_int8_enable` without a calibration table, so the
    Q/DQ scales of the model are used. The CUDA EP follows it for nodes TensorRT does not
    take; the CPU EP ends every GPU list for the nodes no GPU provider implements.
    """
    gpu = {"device_id": str(device_id)}
    if stream is not None:
        gpu["user_compute_stream"] = str(stream)
    if provider == CPU:
        return [(CPU, {})]
    if provider == CUDA:
        return [(CUDA, gpu), (CPU, {})]
    if provider == TENSORRT:
        cache = str(cache_dir(artifact, sha256))
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
    """Why this onnxruntime build cannot offer `provider`, or None when it can."""
    available = ort.get_available_providers()
    if provider not in available:
        hint = (
            "install onnxruntime-gpu instead of onnxruntime (pip uninstall onnxruntime; "
            "pip install 'fakd-deploy[gpu]')"
            if provider != CPU
            else "reinstall onnxruntime"
        )
        return f"onnxruntime {ort.__version__} has no {provider} (it offers {', '.join(available)}): {hint}"
    return tensorrt_problem() if provider == TENSORRT else None


def node_placement(profile: str | Path) -> dict[str, float]:
    """Share of the executed nodes per execution provider, from an ONNX Runtime profile.

    The profile is a JSON list of events; each node run is an event with `"cat": "Node"`
    whose `args.provider` names the provider that ran it (onnxruntime/core/common/profiler.cc,
    `EndProfiling`). A node that ran several times counts once.
    """
    events = json.loads(Path(profile).read_text())
    nodes = {
        event["name"]: event["args"]["provider"]
        for event in events
        if event.get("cat") == "Node" and "provider" in event.get("args", {})
    }
    counts = Counter(nodes.values())
    total = sum(counts.values())
    return {provider: round(count / total, 4) for provider, count in counts.most_common()} if total else {}


class OrtPredictor:
    """An ONNX model in an ONNX Runtime session, as a Predictor.

    `providers` is a provider list from `provider_options` (default: CPU only); the
    session must end up on its first provider. With `profile_first_run`, the first run is
    profiled and `placement` says which provider ran which share of the nodes.
    """

    def __init__(
        self,
        model: str | Path | bytes,
        providers: ProviderList | None = None,
        threads: int | None = None,
        profile_first_run: bool = False,
    ) -> None:
        providers = providers or [(CPU, {})]
        wanted = providers[0][0]
        if wanted == TENSORRT:
            optional.load("tensorrt")  # puts the wheel's libnvinfer where the provider finds it
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        self._profile_dir: Path | None = None
        if profile_first_run:
            self._profile_dir = Path(tempfile.mkdtemp(prefix="fakd-ort-profile-"))
            options.enable_profiling = True
            options.profile_file_prefix = str(self._profile_dir / "ort")
        source = model if isinstance(model, bytes) else str(model)
        try:
            self.session = ort.InferenceSession(
                source,
                options,
                providers=[name for name, _ in providers],
                provider_options=[opts for _, opts in providers],
                enable_fallback=0,  # never retry quietly on other providers
            )
        except Exception as error:  # onnxruntime's own types (InvalidProtobuf, Fail, ...)
            self._drop_profile()
            if wanted != CPU:  # the model was read and checked before: the provider failed
                raise BackendUnavailable(
                    f"ONNX Runtime could not start {wanted}: {error_summary(error)}"
                ) from None
            where = "the model" if isinstance(model, bytes) else model
            raise ArtifactError(f"ONNX Runtime cannot load {where}: {error_summary(error)}") from None
        if self.session.get_providers()[0] != wanted:
            self._drop_profile()
            raise BackendUnavailable(
                f"ONNX Runtime could not start {wanted} and fell back to "
                f"{self.session.get_providers()[0]}; check that the CUDA, cuDNN "
                "and TensorRT libraries it needs are installed"
            )
        self.provider = wanted
        self.placement: dict[str, float] | None = None
        first = self.session.get_inputs()[0]
        self.input_name = first.name
        self.output_name = self.session.get_outputs()[0].name
        self.static_batch = first.shape[0] if isinstance(first.shape[0], int) else None
        self.input_dtype = np.uint8 if first.type == "tensor(uint8)" else np.float32  # deploy.inputs
        height, width = first.shape[1:3] if self.input_dtype == np.uint8 else first.shape[2:]
        self.input_size = (height, width) if isinstance(height, int) and isinstance(width, int) else None

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def _drop_profile(self) -> None:
        if self._profile_dir is not None:
            shutil.rmtree(self._profile_dir, ignore_errors=True)
            self._profile_dir = None

    def _end_profile(self) -> None:
        """Read the placement from the first run's profile; ONNX Runtime stops profiling then."""
        if self._profile_dir is None:
            return
        try:
            self.placement = node_placement(self.session.end_profiling())
        finally:
            self._drop_profile()

    def _run(self, images: np.ndarray) -> np.ndarray:
        (out,) = self.session.run([self.output_name], {self.input_name: images})
        return as_prediction(out)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = np.ascontiguousarray(images, dtype=self.input_dtype)
        out = run_fixed_batch(self._run, images, self.static_batch)
        self._end_profile()
        return out

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._drop_profile()


class OrtGpuPredictor(OrtPredictor):
    """A session on the CUDA or TensorRT provider, fed through IO binding on its own stream.

    `stream` is the `cuda.Stream` whose pointer the provider options carry
    (`user_compute_stream`), so the CUDA events of `gpu_compute_ms` time the session's work.
    The first run is profiled for `placement`.
    """

    def __init__(
        self, model: str | Path | bytes, providers: ProviderList, stream: Any, threads: int | None = None
    ) -> None:
        super().__init__(model, providers, threads, profile_first_run=True)
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
        """trtexec's GPU compute time per run, inputs and outputs kept on the device.

        `run` synchronises the compute stream before returning unless the run option
        `disable_synchronize_execution_providers` is set; with it, runs queue back to back
        on the predictor's stream and the CUDA events time the GPU work, not the host's.
        A static-batch model is timed at its batch, the images zero-padded up to it.
        """
        from fakd_deploy.deploy.cuda import time_on_stream

        feed = pad_to_batch(np.ascontiguousarray(images, dtype=self.input_dtype), self.static_batch)
        if self.static_batch:
            feed = feed[: self.static_batch]
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(
            self.input_name, ort.OrtValue.ortvalue_from_numpy(feed, "cuda", self.device_id)
        )
        binding.bind_output(self.output_name, "cuda", self.device_id)
        binding.synchronize_inputs()
        options = ort.RunOptions()
        options.add_run_config_entry(NO_SYNC, "1")
        return time_on_stream(
            self.stream, lambda: self.session.run_with_iobinding(binding, options), warmup_s, seconds, iters
        )
