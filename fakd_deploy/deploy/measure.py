"""Timing and memory measurement for the benchmark, free of any model or backend code.

Two latencies, as trtexec reports them: `measure_latency` and `time_interleaved` time
whole Predictor calls (host latency: host-to-device copy, compute, copy back; the call
returns host memory, so it has finished when it returns), and `measure_gpu_compute` asks a
`GpuTimed` predictor for CUDA-event timings of the compute alone. `time_interleaved` times
several predictors in rounds, each once per round, so that load from elsewhere on a shared
machine falls on all of them alike and shows as a spread between rounds. GPU memory is read with cuda-python's
`cudaMemGetInfo`, so no framework has to be imported to measure a runtime.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import math
import os
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

import numpy as np

MIN_ITERS = 20
Key = TypeVar("Key", bound=Hashable)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # no /proc (macOS): the process high-water mark is the best there is
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim`, looked up once (find_library runs ldconfig); None elsewhere."""
    libc = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None


def release_free_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc `malloc_trim`).

    Without it the RSS of a process that already ran one model hardly grows for the
    next: the allocator reuses the freed pages, and the growth reads as zero.
    """
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class PeakMemory:
    """Peak growth of process RSS (CPU) or of used GPU memory (GPU) while the block runs.

    Sampled by a thread, so memory allocated by ONNX Runtime or TensorRT counts too.
    Freed memory is returned to the OS first, so each block starts from what is live.
    """

    def __init__(self, interval_s: float = 0.005, gpu: bool | None = None) -> None:
        from fakd_deploy.deploy import cuda

        self.interval_s = interval_s
        self.gpu = cuda.no_gpu_reason() is None if gpu is None else gpu
        self.peak = {"cpu": 0, "gpu": 0}
        self._stop = threading.Event()

    def _used(self) -> dict[str, int]:
        used = {"cpu": _rss_bytes(), "gpu": 0}
        if self.gpu:
            from fakd_deploy.deploy.cuda import memory_used

            used["gpu"] = memory_used()
        return used

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            for key, value in self._used().items():
                self.peak[key] = max(self.peak[key], value)

    def __enter__(self) -> PeakMemory:
        release_free_memory()
        self.base = self._used()
        self.peak = dict(self.base)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        for key, value in self._used().items():
            self.peak[key] = max(self.peak[key], value)

    def mb(self, gpu: bool) -> float:
        key = "gpu" if gpu else "cpu"
        return max(self.peak[key] - self.base[key], 0) / 2**20


def measure_latency(
    predictor: Callable[[Any], Any],
    images: Any,
    warmup_s: float = 1.0,
    seconds: float = 3.0,
    iters: int | None = None,
    min_iters: int = MIN_ITERS,
    clock: Callable[[], float] = time.perf_counter,
) -> list[float]:
    """Milliseconds per call: time-based warm-up, then `iters` calls or `seconds` of calls.

    Predictors return host arrays, so a call has finished (device work and copies
    included) when it returns: no extra synchronisation is needed.
    """
    predictor(images)
    warm_until = clock() + warmup_s
    while clock() < warm_until:
        predictor(images)
    times: list[float] = []
    deadline = clock() + seconds
    while len(times) < iters if iters else len(times) < min_iters or clock() < deadline:
        start = clock()
        predictor(images)
        times.append(1000 * (clock() - start))
    return times


def time_interleaved(
    predictors: dict[Key, Callable[[Any], Any]],
    images: dict[Key, Any],
    rounds: int = 5,
    warmup_s: float = 1.0,
    seconds: float = 3.0,
    iters: int | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[Key, list[list[float]]]:
    """Milliseconds per call of every predictor, per round.

    Each predictor is warmed up once (`warmup_s`), then every round times each of them in
    turn for `seconds / rounds` (or `iters / rounds` calls, at least `MIN_ITERS / rounds`),
    after one untimed call that brings its caches back. The order rotates from round to
    round, so no predictor always follows the same neighbour.
    """
    keys = list(predictors)
    for key in keys:
        measure_latency(predictors[key], images[key], warmup_s, 0.0, iters=1, clock=clock)
    per_round_iters = math.ceil(iters / rounds) if iters else None
    floor = math.ceil(MIN_ITERS / rounds)
    times: dict[Key, list[list[float]]] = {key: [] for key in keys}
    for number in range(rounds):
        start = number % len(keys) if keys else 0
        for key in keys[start:] + keys[:start]:
            times[key].append(
                measure_latency(
                    predictors[key], images[key], 0.0, seconds / rounds, per_round_iters, floor, clock
                )
            )
    return times


def measure_gpu_compute(
    predictor: Any, images: np.ndarray, warmup_s: float = 1.0, seconds: float = 3.0, iters: int | None = None
) -> list[float] | None:
    """GPU compute milliseconds per run for a `GpuTimed` predictor; None for any other."""
    from fakd_deploy.predictor import GpuTimed

    if not isinstance(predictor, GpuTimed):
        return None
    return predictor.gpu_compute_ms(np.asarray(images, dtype=np.float32), warmup_s, seconds, iters)
