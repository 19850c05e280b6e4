"""The splits a recipe's `data` section describes, shared by every stage.

Everything here but `train_dataset` is numpy only: evaluation, calibration and the
benchmark read data the same way with or without torch installed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from fakd_deploy.data import build_dataset
from fakd_deploy.data.preprocess import Batch, Normalise, ValTransform, batches, count_batches
from fakd_deploy.recipe import DataConfig


def normaliser(cfg: DataConfig) -> Normalise:
    return Normalise(tuple(cfg.mean), tuple(cfg.std), cfg.pixel_scale)


def val_dataset(cfg: DataConfig, split: str | None = None) -> Any:
    """A split (the val split by default) through the val transform: arrays, no augmentation."""
    return build_dataset(
        cfg.name,
        cfg.root,
        split or cfg.val_split,
        transform=ValTransform(normaliser(cfg), cfg.val_resize),
        ignore_index=cfg.ignore_index,
        **cfg.options,
    )


def train_dataset(cfg: DataConfig) -> Any:
    """The training split with the recipe's augmentation, as tensors (needs torch)."""
    from fakd_deploy.data.transforms import TrainTransform

    transform = TrainTransform(
        cfg.crop, cfg.scale, cfg.hflip, cfg.jitter, cfg.mean, cfg.std, cfg.pixel_scale, cfg.ignore_index
    )
    return build_dataset(
        cfg.name, cfg.root, cfg.train_split, transform=transform, ignore_index=cfg.ignore_index, **cfg.options
    )


def dataset_info(cfg: DataConfig) -> tuple[int, list[str]]:
    """Number of classes and their names, read from the validation split."""
    ds = build_dataset(cfg.name, cfg.root, cfg.val_split, ignore_index=cfg.ignore_index, **cfg.options)
    return ds.num_classes, list(ds.class_names)


class ValBatches:
    """Re-iterable (images, masks) batches of one split, with its length for progress bars."""

    def __init__(
        self,
        cfg: DataConfig,
        split: str | None = None,
        batch_size: int | None = None,
        max_images: int | None = None,
    ) -> None:
        self.dataset = val_dataset(cfg, split)
        self.split = split or cfg.val_split
        self.batch_size = batch_size or cfg.val_batch_size
        self.max_images = max_images
        self.images = len(self.dataset) if max_images is None else min(max_images, len(self.dataset))
        self.num_classes: int = self.dataset.num_classes
        self.class_names: list[str] = list(self.dataset.class_names)

    def __iter__(self) -> Iterator[Batch]:
        return batches(self.dataset, self.batch_size, self.max_images)

    def __len__(self) -> int:
        return count_batches(self.dataset, self.batch_size, self.max_images)


def calibration_images(cfg: DataConfig, count: int) -> Iterator[np.ndarray]:
    """`count` training images spread over the split, through the val transform: (1, 3, H, W)."""
    ds = val_dataset(cfg, cfg.train_split)
    step = max(len(ds) // count, 1)
    for index in list(range(0, len(ds), step))[:count]:
        image, _ = ds[index]
        yield image[None]
