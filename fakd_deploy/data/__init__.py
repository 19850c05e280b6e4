"""Datasets by name, their augmentation pipelines and a summary of what a dataset holds."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from fakd_deploy.data.base import IGNORE, DatasetError, SegmentationDataset
from fakd_deploy.data.datasets import ADE20K, CamVid, Cityscapes, Folder, PascalVOC
from fakd_deploy.data.synthetic import Synthetic
from fakd_deploy.data.transforms import build_transforms

DATASETS: dict[str, type[Dataset]] = {
    "synthetic": Synthetic,
    "camvid": CamVid,
    "cityscapes": Cityscapes,
    "ade20k": ADE20K,
    "voc": PascalVOC,
    "folder": Folder,
}


def build_dataset(name: str, root: str | Path | None, split: str, transform: Any = None,
                  **options: Any) -> Dataset:
    """`ds[i]` is (image, mask): uint8 HxWx3 and int64 HxW, or tensors through `transform`."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset '{name}'; choose one of: {', '.join(DATASETS)}")
    accepted = set(inspect.signature(DATASETS[name]).parameters) - {"root", "split", "transform"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"dataset '{name}' has no option {', '.join(unknown)}; "
                         f"its options are: {', '.join(sorted(accepted)) or 'none'}")
    return DATASETS[name](root, split=split, transform=transform, **options)


__all__ = ["DATASETS", "IGNORE", "DatasetError", "SegmentationDataset", "Synthetic", "build_dataset",
           "build_transforms"]
