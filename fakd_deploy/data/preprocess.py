"""Validation preprocessing in numpy: resize, normalise, batch. No torch, so a deployed
model is scored where only numpy, PIL and its runtime are installed.

`resize_bilinear` is torch's `F.interpolate(mode="bilinear", align_corners=False)` (and
OpenCV's INTER_LINEAR) written out: half-pixel centres, no antialiasing. `resize_nearest`
is OpenCV's INTER_NEAREST (source index floor(i * in / out)), the rule the training
augmentation uses for masks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from fakd_deploy.data.base import SegmentationDataset

Batch = tuple[np.ndarray, np.ndarray]  # images (N, 3, H, W) float32, masks (N, H, W) int64


def _linear_taps(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices i0, i1 and weight of i1 for each output index (half-pixel centres)."""
    src = (np.arange(size_out, dtype=np.float64) + 0.5) * (size_in / size_out) - 0.5
    src = np.maximum(src, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), size_in - 1)
    i1 = np.minimum(i0 + 1, size_in - 1)
    return i0, i1, (src - i0).astype(np.float32)


def resize_bilinear(x: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Bilinear resize of the last two axes of a float array to `size` (h, w)."""
    (h_in, w_in), (h_out, w_out) = x.shape[-2:], (int(size[0]), int(size[1]))
    if (h_in, w_in) == (h_out, w_out):
        return x
    x = x.astype(np.float32, copy=False)
    r0, r1, rw = _linear_taps(h_in, h_out)
    rows = x[..., r0, :] * (1 - rw)[:, None] + x[..., r1, :] * rw[:, None]
    c0, c1, cw = _linear_taps(w_in, w_out)
    return rows[..., c0] * (1 - cw) + rows[..., c1] * cw


def resize_nearest(x: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resize of the last two axes: labels are never interpolated."""
    (h_in, w_in), (h_out, w_out) = x.shape[-2:], (int(size[0]), int(size[1]))
    rows = np.minimum(np.floor(np.arange(h_out) * (h_in / h_out)).astype(np.int64), h_in - 1)
    cols = np.minimum(np.floor(np.arange(w_out) * (w_in / w_out)).astype(np.int64), w_in - 1)
    return x[..., rows[:, None], cols[None, :]]


@dataclass(frozen=True)
class Normalise:
    """(x / pixel_scale - mean) / std per channel: what the model was trained on."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    pixel_scale: float = 255.0

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """An (H, W, 3) RGB array as a (3, H, W) float32 array."""
        x: np.ndarray = np.asarray(image, dtype=np.float32) / np.float32(self.pixel_scale)
        x = (x - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1))


@dataclass(frozen=True)
class ValTransform:
    """Optional resize (bilinear image, nearest mask), then normalisation."""

    normalise: Normalise
    resize: tuple[int, int] | None = None

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> Batch:
        if self.resize is not None:
            resized = resize_bilinear(image.transpose(2, 0, 1).astype(np.float32), self.resize)
            image = np.clip(np.rint(resized), 0, 255).astype(np.uint8).transpose(1, 2, 0)
            mask = resize_nearest(mask, self.resize)
        return self.normalise(image), mask.astype(np.int64)


def batches(
    dataset: SegmentationDataset, batch_size: int, max_images: int | None = None, start: int = 0
) -> Iterator[Batch]:
    """Consecutive images of a dataset whose transform gives arrays, stacked into batches.

    A batch ends early where the image size changes, so datasets of mixed sizes (ADE20K)
    are scored whole, without padding.
    """
    stop = len(dataset) if max_images is None else min(start + max_images, len(dataset))
    images: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    for index in range(start, stop):
        image, mask = dataset[index]
        if images and (len(images) == batch_size or image.shape != images[0].shape):
            yield np.stack(images), np.stack(masks)
            images, masks = [], []
        images.append(image)
        masks.append(mask)
    if images:
        yield np.stack(images), np.stack(masks)


def count_batches(dataset: SegmentationDataset, batch_size: int, max_images: int | None = None) -> int:
    """How many batches `batches` yields for a dataset of equal-sized images (for progress bars)."""
    count = len(dataset) if max_images is None else min(max_images, len(dataset))
    return -(-count // batch_size)
