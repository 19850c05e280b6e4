"""Datasets and loaders as a recipe describes them, shared by training, export and bench."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from fakd_deploy.data import build_dataset, build_transforms
from fakd_deploy.recipe import DataConfig


def dataset(cfg: DataConfig, split: str, train: bool) -> Dataset:
    """The split with the recipe's training augmentation (`train=True`) or its val transform."""
    transform = build_transforms(
        train=train, crop=cfg.crop, scale=cfg.scale, mean=cfg.mean, std=cfg.std,
        pixel_scale=cfg.pixel_scale, resize=None if train else cfg.val_resize,
        hflip=cfg.hflip, jitter=cfg.jitter, ignore_index=cfg.ignore_index)
    return build_dataset(cfg.name, cfg.root, split, transform=transform, **cfg.options)


def dataset_info(cfg: DataConfig) -> tuple[int, list[str]]:
    """Number of classes and their names, read from the validation split."""
    ds = build_dataset(cfg.name, cfg.root, cfg.val_split, **cfg.options)
    return ds.num_classes, list(ds.class_names)


def val_loader(cfg: DataConfig, batch_size: int | None = None,
               max_images: int | None = None) -> DataLoader:
    ds = dataset(cfg, cfg.val_split, train=False)
    if max_images is not None and max_images < len(ds):
        ds = Subset(ds, range(max_images))
    return DataLoader(ds, batch_size=batch_size or cfg.val_batch_size, shuffle=False,
                      num_workers=cfg.workers)


def calibration_batches(cfg: DataConfig, count: int) -> Iterator[torch.Tensor]:
    """Training images through the val transform, one at a time, for INT8 calibration."""
    ds = dataset(cfg, cfg.train_split, train=False)
    step = max(len(ds) // count, 1)
    for index in list(range(0, len(ds), step))[:count]:
        image, _ = ds[index]
        yield image.unsqueeze(0)
