"""What every runtime shares: the Predictor protocol and the numpy helpers around it.

A Predictor takes a batch of normalised float32 images (N, 3, H, W) as a numpy array and
returns logits (N, C, h, w) float32 at any resolution, or labels (N, H, W) int64. The
PyTorch model, an ONNX Runtime session and a TensorRT engine all implement it, so one
evaluation and one benchmark serve every backend. This module needs numpy alone: it is
the leaf the runtimes (ONNX Runtime, TensorRT, torch) build on, never the other way round.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import numpy as np

from fakd_deploy.data.preprocess import resize_bilinear, resize_nearest


class Predictor(Protocol):
    def __call__(self, images: np.ndarray, /) -> np.ndarray: ...


@runtime_checkable
class GpuTimed(Protocol):
    """A GPU Predictor that can also time its GPU work alone.

    `gpu_compute_ms` runs on inputs already on the device, on the predictor's own
    (non-default) stream, after `warmup_s` seconds of warm-up, and returns milliseconds
    per run from CUDA events: trtexec's "GPU compute". Calling the predictor itself is
    the end-to-end "host latency", copies from and to pinned host memory included.
    """

    def __call__(self, images: np.ndarray) -> np.ndarray: ...

    def gpu_compute_ms(
        self, images: np.ndarray, warmup_s: float = 1.0, seconds: float = 3.0, iters: int | None = None
    ) -> list[float]: ...


def pad_to_batch(images: np.ndarray, batch: int | None) -> np.ndarray:
    """`images` zero-padded to `batch` images (unchanged when `batch` is None or reached)."""
    missing = (batch or 0) - images.shape[0]
    if missing <= 0:
        return images
    return np.concatenate([images, np.zeros((missing, *images.shape[1:]), images.dtype)])


def run_fixed_batch(
    run: Callable[[np.ndarray], np.ndarray], images: np.ndarray, batch: int | None
) -> np.ndarray:
    """Call `run` on chunks of exactly `batch` images; the last chunk is zero-padded and trimmed.

    A static-batch model rejects any other batch size, yet evaluation and benchmarks
    hand it whatever the loader yields.
    """
    count = images.shape[0]
    if batch is None or count == batch:
        return run(images)
    outputs = []
    for start in range(0, count, batch):
        chunk = images[start : start + batch]
        outputs.append(run(pad_to_batch(chunk, batch))[: chunk.shape[0]])
    return np.concatenate(outputs)


def as_prediction(out: np.ndarray) -> np.ndarray:
    """Logits as float32, labels as int64: what every Predictor returns."""
    return (
        out.astype(np.float32, copy=False)
        if np.issubdtype(out.dtype, np.floating)
        else out.astype(np.int64, copy=False)
    )


class FixedSizePredictor:
    """Resize images to a model's fixed input size and its output back to the image size.

    Logits are resized bilinearly (as the exported graph does), labels by nearest neighbour.
    """

    def __init__(self, predictor: Predictor, size: tuple[int, int] | None) -> None:
        self.predictor = predictor
        self.size = size

    def __call__(self, images: np.ndarray) -> np.ndarray:
        original = tuple(images.shape[-2:])
        if self.size is None or original == tuple(self.size):
            return self.predictor(images)
        out = self.predictor(resize_bilinear(images, self.size))
        return resize_bilinear(out, original) if out.ndim == 4 else resize_nearest(out, original)
