"""Datasets by name: readers that give numpy (image, mask) pairs, and a summary of a dataset."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Protocol

from fakd_deploy.data.base import IGNORE, MissingSplit, SegmentationDataset, Transform
from fakd_deploy.data.datasets import ADE20K, CamVid, Cityscapes, Folder, PascalVOC
from fakd_deploy.data.synthetic import Synthetic
from fakd_deploy.errors import DatasetError


class DatasetClass(Protocol):
    """How `build_dataset` makes a dataset; each may take options of its own as further keywords."""

    def __call__(
        self, root: str | Path | None, split: str, transform: Transform | None, ignore_index: int
    ) -> SegmentationDataset | Synthetic: ...


DATASETS: dict[str, DatasetClass] = {
    "synthetic": Synthetic,
    "camvid": CamVid,
    "cityscapes": Cityscapes,
    "ade20k": ADE20K,
    "voc": PascalVOC,
    "folder": Folder,
}
FIXED_ARGUMENTS = {"root", "split", "transform", "ignore_index"}


def build_dataset(
    name: str,
    root: str | Path | None,
    split: str,
    transform: Transform | None = None,
    ignore_index: int = IGNORE,
    **options: Any,
) -> SegmentationDataset | Synthetic:
    """`ds[i]` is (image, mask): uint8 HxWx3 and int64 HxW, or what `transform` makes of them."""
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset '{name}'; choose one of: {', '.join(DATASETS)}")
    accepted = set(inspect.signature(DATASETS[name]).parameters) - FIXED_ARGUMENTS
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise DatasetError(
            f"dataset '{name}' has no option {', '.join(unknown)}; "
            f"its options are: {', '.join(sorted(accepted)) or 'none'}"
        )
    return DATASETS[name](root, split=split, transform=transform, ignore_index=ignore_index, **options)


__all__ = [
    "DATASETS",
    "IGNORE",
    "DatasetError",
    "MissingSplit",
    "SegmentationDataset",
    "Synthetic",
    "Transform",
    "build_dataset",
]
