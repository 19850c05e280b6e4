"""cuda-python's runtime module (`cuda.bindings.runtime`) on a machine without a GPU.

"Device" and pinned memory are host buffers, so copies and kernels really move data. Time is
simulated: the host has a clock (`host_ms`), each stream the time at which the work queued on
it ends. As in CUDA (runtime API reference, cudaEventRecord / cudaStreamSynchronize /
cudaEventSynchronize), work on a stream runs in order and starts no earlier than it was issued,
an event completes when the work queued before it has, and only synchronisation makes the
host wait. Every call returns `(error, *values)`, as cuda-python's do.
"""

from __future__ import annotations

import ctypes
import enum
import types
from typing import Any


class cudaError_t(enum.IntEnum):  # the name cuda-python gives it
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorInsufficientDriver = 35
    cudaErrorNoDevice = 100


class FakeCudaRuntime(types.ModuleType):
    """The runtime calls fakd-deploy makes, with a log (`calls`) of what ran on which stream.

    `driver` and `runtime_version` are CUDA versions encoded as cudaDriverGetVersion does
    (12040 = 12.4); `driver=0` is a machine without an NVIDIA driver. With no driver, or a
    driver older than the runtime, cudaGetDeviceCount fails with cudaErrorInsufficientDriver
    (measured with cuda-bindings 13.5 on a machine without a driver: (35, None), and
    cudaDriverGetVersion gives (0, 0)).
    """

    cudaError_t = cudaError_t
    cudaStreamNonBlocking = 1
    cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice="H2D", cudaMemcpyDeviceToHost="D2H")
    DEFAULT_STREAM = 0

    def __init__(
        self,
        devices: int = 1,
        driver: int = 12080,
        runtime_version: int = 12060,
        gpu: str = "NVIDIA H100 80GB HBM3",
        capability: tuple[int, int] = (9, 0),
        copy_ms: float = 0.05,
    ) -> None:
        super().__init__("cuda.bindings.runtime")
        self.devices, self.driver, self.runtime_version = devices, driver, runtime_version
        self.gpu, self.capability, self.copy_ms = gpu, capability, copy_ms
        self.host_ms = 0.0
        self.queued: dict[int, float] = {self.DEFAULT_STREAM: 0.0}  # when each stream's work ends
        self.events: dict[int, float] = {}
        self.buffers: dict[int, Any] = {}
        self.calls: list[tuple[str, int]] = []
        self.used_bytes = 0

    # Work on a stream (called by the TensorRT and ONNX Runtime stand-ins too)
    def enqueue(self, stream: int, work_ms: float, launch_ms: float = 0.0, what: str = "kernel") -> None:
        """The host spends `launch_ms` issuing `work_ms` of GPU work, which runs after what is queued."""
        self.host_ms += launch_ms
        start = max(self.queued.setdefault(stream, 0.0), self.host_ms)
        self.queued[stream] = start + work_ms
        self.calls.append((what, stream))

    def wait_for(self, stream: int) -> None:
        self.host_ms = max(self.host_ms, self.queued.setdefault(stream, 0.0))

    # Devices
    def cudaGetDeviceCount(self) -> tuple[cudaError_t, int | None]:
        if not self.driver or self.driver < self.runtime_version // 1000 * 1000:
            return cudaError_t.cudaErrorInsufficientDriver, None
        if not self.devices:
            return cudaError_t.cudaErrorNoDevice, 0
        return cudaError_t.cudaSuccess, self.devices

    def cudaDriverGetVersion(self) -> tuple[cudaError_t, int]:
        return cudaError_t.cudaSuccess, self.driver

    def cudaRuntimeGetVersion(self) -> tuple[cudaError_t, int]:
        return cudaError_t.cudaSuccess, self.runtime_version

    def cudaGetDeviceProperties(self, device: int) -> tuple[cudaError_t, Any]:
        major, minor = self.capability
        name = self.gpu.encode() + b"\0" * 8
        return cudaError_t.cudaSuccess, types.SimpleNamespace(name=name, major=major, minor=minor)

    def cudaSetDevice(self, device: int) -> tuple[cudaError_t]:
        return (cudaError_t.cudaSuccess,)

    def cudaMemGetInfo(self) -> tuple[cudaError_t, int, int]:
        total = 80 * 2**30
        return cudaError_t.cudaSuccess, total - self.used_bytes, total

    # Memory
    def _alloc(self, nbytes: int) -> tuple[cudaError_t, int]:
        buffer = ctypes.create_string_buffer(nbytes)
        self.buffers[ctypes.addressof(buffer)] = buffer
        self.used_bytes += nbytes
        return cudaError_t.cudaSuccess, ctypes.addressof(buffer)

    def cudaMalloc(self, nbytes: int) -> tuple[cudaError_t, int]:
        return self._alloc(nbytes)

    def cudaMallocHost(self, nbytes: int) -> tuple[cudaError_t, int]:
        return self._alloc(nbytes)

    def cudaFree(self, ptr: int) -> tuple[cudaError_t]:
        buffer = self.buffers.pop(ptr, None)
        self.used_bytes -= len(buffer) if buffer is not None else 0
        return (cudaError_t.cudaSuccess,)

    cudaFreeHost = cudaFree

    def cudaMemcpyAsync(self, dst: int, src: int, nbytes: int, kind: str, stream: int) -> tuple[cudaError_t]:
        ctypes.memmove(dst, src, nbytes)
        self.enqueue(stream, self.copy_ms, what=kind)
        return (cudaError_t.cudaSuccess,)

    # Streams and events
    def cudaStreamCreateWithFlags(self, flags: int) -> tuple[cudaError_t, int]:
        handle = 0x5000 + 0x10 * len(self.queued)
        self.queued[handle] = self.host_ms
        self.calls.append(("create stream", flags))
        return cudaError_t.cudaSuccess, handle

    def cudaStreamDestroy(self, stream: int) -> tuple[cudaError_t]:
        return (cudaError_t.cudaSuccess,)

    def cudaStreamSynchronize(self, stream: int) -> tuple[cudaError_t]:
        self.wait_for(stream)
        self.calls.append(("sync", stream))
        return (cudaError_t.cudaSuccess,)

    def cudaEventCreate(self) -> tuple[cudaError_t, int]:
        handle = 0x9000 + len(self.events)
        self.events[handle] = 0.0
        return cudaError_t.cudaSuccess, handle

    def cudaEventRecord(self, event: int, stream: int) -> tuple[cudaError_t]:
        self.events[event] = max(self.queued.setdefault(stream, 0.0), self.host_ms)
        self.calls.append(("event", stream))
        return (cudaError_t.cudaSuccess,)

    def cudaEventSynchronize(self, event: int) -> tuple[cudaError_t]:
        self.host_ms = max(self.host_ms, self.events[event])
        self.calls.append(("wait event", event))
        return (cudaError_t.cudaSuccess,)

    def cudaEventElapsedTime(self, start: int, end: int) -> tuple[cudaError_t, float]:
        return cudaError_t.cudaSuccess, self.events[end] - self.events[start]

    def cudaEventDestroy(self, event: int) -> tuple[cudaError_t]:
        return (cudaError_t.cudaSuccess,)
