"""The little CUDA the deploy path needs, through cuda-python instead of torch.

Device queries (name, compute capability, memory in use), device buffers, pinned host
buffers, one dedicated stream per predictor, and CUDA-event timing. cuda-python moved its
runtime module between releases: `cuda.bindings.runtime` (12.6 and later, the only one in
13.x) and `cuda.cudart` (12.x before that); both are accepted.

Every cuda-python call returns `(error, *values)`; `check` turns a non-success error into
an exception that names the call, so no error code is silently ignored.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import time
import weakref
from collections import deque
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np

from fakd_deploy import optional
from fakd_deploy.errors import BackendUnavailable

INSTALL_HINT = "cuda-python is not installed: pip install 'fakd-deploy[gpu]'"
MIN_ITERS = 20
IN_FLIGHT = 2  # trtexec's default: one iteration queued behind the one running
# The CUDA version a driver must support for each cuda-python major (13.x needs driver >= 580.65)
DRIVER_FOR_BINDINGS = {12: 12000, 13: 13000}
INSUFFICIENT_DRIVER = 35  # cudaErrorInsufficientDriver


def runtime() -> ModuleType:
    """The CUDA runtime bindings, or `BackendUnavailable` when cuda-python is missing."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python 12.x before the cuda.bindings layout
        except ImportError:
            raise BackendUnavailable(INSTALL_HINT) from None
    return cudart


def check(result: Any, call: str = "CUDA call") -> Any:
    """The values of a cuda-python result tuple; `RuntimeError` naming the CUDA error otherwise."""
    error, *values = result if isinstance(result, tuple) else (result,)
    if int(error) != 0:
        name = getattr(error, "name", str(int(error)))
        raise RuntimeError(f"{call} failed: {name}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def cuda_version(encoded: int) -> str:
    """12040 -> "12.4", as cudaDriverGetVersion and cudaRuntimeGetVersion encode it."""
    return f"{encoded // 1000}.{encoded % 1000 // 10}"


def bindings_version() -> str:
    """The installed cuda-python (cuda-bindings) version, or "not installed"."""
    found = optional.version("cuda.bindings")
    if found[:1].isdigit():
        return found
    for dist in ("cuda-bindings", "cuda-python"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return optional.NOT_INSTALLED


def versions() -> dict[str, str]:
    """Driver CUDA version, runtime CUDA version and cuda-python version, as far as they load."""
    try:
        cudart = runtime()
    except BackendUnavailable:
        return {"cuda_driver": "unknown", "cuda_runtime": "unknown", "cuda_python": optional.NOT_INSTALLED}
    driver = cudart.cudaDriverGetVersion()
    found = cudart.cudaRuntimeGetVersion()
    return {
        "cuda_driver": cuda_version(int(driver[1])) if int(driver[0]) == 0 and driver[1] else "no driver",
        "cuda_runtime": cuda_version(int(found[1])) if int(found[0]) == 0 else "unknown",
        "cuda_python": bindings_version(),
    }


def _driver_reason(cudart: Any, status: Any) -> str:
    """What a failed cudaGetDeviceCount means: no GPU, no driver, or a driver too old.

    With no driver, and with a driver older than the runtime, the call fails with
    cudaErrorInsufficientDriver alike; cudaDriverGetVersion tells them apart (0: no driver).
    """
    name = getattr(status, "name", str(int(status)))
    if int(status) != INSUFFICIENT_DRIVER:
        return f"no CUDA GPU is visible (cudaGetDeviceCount: {name})"
    error, driver = cudart.cudaDriverGetVersion()
    if int(error) != 0 or not driver:
        return f"no NVIDIA driver is loaded (cudaGetDeviceCount: {name})"
    bindings = bindings_version()
    major = int(bindings.split(".")[0]) if bindings[:1].isdigit() else 0
    needed = DRIVER_FOR_BINDINGS.get(major, int(driver) + 1)
    return (
        f"the NVIDIA driver supports CUDA {cuda_version(int(driver))}, but cuda-python {bindings} "
        f"needs CUDA {cuda_version(needed)}"
        + (" (driver >= 580.65)" if major == 13 else "")
        + ": install 'cuda-python>=12.3,<13' with TensorRT 10 (the `gpu` extra) or update the driver"
    )


def no_gpu_reason() -> str | None:
    """Why no CUDA GPU can be used here, or None when at least one is visible."""
    try:
        cudart = runtime()
    except BackendUnavailable as error:
        return str(error)
    status, count = cudart.cudaGetDeviceCount()
    if int(status) != 0:
        return _driver_reason(cudart, status)
    return None if count > 0 else "no CUDA GPU is visible (cudaGetDeviceCount: 0 devices)"


def device_info(device: int = 0) -> dict[str, str]:
    """GPU name and compute capability, the two things an engine is tied to."""
    prop = check(runtime().cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = prop.name.split(b"\0", 1)[0].decode() if isinstance(prop.name, bytes) else str(prop.name)
    return {"gpu": name, "compute_capability": f"{prop.major}.{prop.minor}"}


def memory_used(device: int = 0) -> int:
    """Bytes of GPU memory in use on the device, by any process (cudaMemGetInfo)."""
    cudart = runtime()
    check(cudart.cudaSetDevice(device), "cudaSetDevice")
    free, total = check(cudart.cudaMemGetInfo(), "cudaMemGetInfo")
    return int(total) - int(free)


class DeviceBuffer:
    """`nbytes` of device memory, freed with the object."""

    def __init__(self, nbytes: int) -> None:
        cudart = runtime()
        self.nbytes = max(int(nbytes), 1)
        self.ptr = int(check(cudart.cudaMalloc(self.nbytes), "cudaMalloc"))
        weakref.finalize(self, cudart.cudaFree, self.ptr)


class PinnedArray:
    """A numpy array in page-locked host memory, so copies to and from the GPU run async."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype | type) -> None:
        cudart = runtime()
        dtype = np.dtype(dtype)
        nbytes = max(int(np.prod(shape)) * dtype.itemsize, 1)
        self.ptr = int(check(cudart.cudaMallocHost(nbytes), "cudaMallocHost"))
        weakref.finalize(self, cudart.cudaFreeHost, self.ptr)
        raw = (ctypes.c_uint8 * nbytes).from_address(self.ptr)
        self.array = np.frombuffer(  # type: ignore[call-overload]  # stubs omit ctypes arrays (buffers)
            raw, dtype=dtype, count=int(np.prod(shape))
        ).reshape(shape)


class Stream:
    """A non-blocking stream of its own: work never waits on the legacy default stream."""

    def __init__(self) -> None:
        self.cudart = runtime()
        self.handle = check(
            self.cudart.cudaStreamCreateWithFlags(self.cudart.cudaStreamNonBlocking),
            "cudaStreamCreateWithFlags",
        )
        weakref.finalize(self, self.cudart.cudaStreamDestroy, self.handle)

    @property
    def ptr(self) -> int:
        """The raw `cudaStream_t`, as TensorRT's `execute_async_v3` and ORT's options want it."""
        return int(self.handle)

    def to_device(self, dst: int, host: np.ndarray) -> None:
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        check(
            self.cudart.cudaMemcpyAsync(dst, host.ctypes.data, host.nbytes, kind, self.handle),
            "cudaMemcpyAsync (host to device)",
        )

    def to_host(self, host: np.ndarray, src: int) -> None:
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        check(
            self.cudart.cudaMemcpyAsync(host.ctypes.data, src, host.nbytes, kind, self.handle),
            "cudaMemcpyAsync (device to host)",
        )

    def synchronize(self) -> None:
        check(self.cudart.cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")


def time_on_stream(
    stream: Stream,
    enqueue: Callable[[], None],
    warmup_s: float = 1.0,
    seconds: float = 3.0,
    iters: int | None = None,
    min_iters: int = MIN_ITERS,
) -> list[float]:
    """Milliseconds of GPU time per `enqueue()`, as trtexec measures "GPU Compute Time".

    Each run is enqueued between two CUDA events of its own on `stream`, and the next run
    is enqueued before the previous one is waited for (trtexec's `Iteration` keeps two in
    flight, samples/common/sampleInference.cpp), so a run starts as soon as the GPU is
    free, not after the host has seen the previous one finish: launch gaps are not timed.
    `enqueue` must not synchronise the stream. Inputs are already on the device; the
    warm-up is time-based and runs in the same pipeline, as trtexec's does.
    """
    cudart = stream.cudart
    slots = [
        (
            check(cudart.cudaEventCreate(), "cudaEventCreate"),
            check(cudart.cudaEventCreate(), "cudaEventCreate"),
        )
        for _ in range(IN_FLIGHT)
    ]
    pending: deque[tuple[Any, Any]] = deque()
    times: list[float] = []

    def finish_oldest() -> None:
        start, end = pending.popleft()
        check(cudart.cudaEventSynchronize(end), "cudaEventSynchronize")
        times.append(float(check(cudart.cudaEventElapsedTime(start, end), "cudaEventElapsedTime")))

    try:
        warm_until = time.perf_counter() + warmup_s
        enqueue()
        while time.perf_counter() < warm_until:
            enqueue()
        # no synchronisation here: the first timed run queues behind the last warm-up run
        deadline = time.perf_counter() + seconds
        issued = 0
        while issued < iters if iters else issued < min_iters or time.perf_counter() < deadline:
            start, end = slots[issued % IN_FLIGHT]
            check(cudart.cudaEventRecord(start, stream.handle), "cudaEventRecord")
            enqueue()
            check(cudart.cudaEventRecord(end, stream.handle), "cudaEventRecord")
            pending.append((start, end))
            issued += 1
            if len(pending) == IN_FLIGHT:
                finish_oldest()
        while pending:
            finish_oldest()
        return times
    finally:
        stream.synchronize()
        for start, end in slots:
            cudart.cudaEventDestroy(start)
            cudart.cudaEventDestroy(end)
