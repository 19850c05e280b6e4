"""What every file-backed dataset shares: (image, label) pairs, label checks, an optional transform."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

IGNORE = 255


class DatasetError(ValueError):
    """A dataset that cannot be read as asked; the message names the file and the value."""


def find_root(root: str | Path | None, dataset: str) -> Path:
    """The dataset folder, or an error that names what was looked for."""
    if root is None:
        raise DatasetError(f"dataset '{dataset}' needs a root folder")
    return require(Path(root), f"{dataset} root")


def require(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: looked for {path}")
    return path


def read_rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def read_indices(path: Path) -> np.ndarray:
    """Class ids of a label PNG; palette PNGs give their indices, never their colours."""
    image = Image.open(path)
    if image.mode in ("RGB", "RGBA"):
        channels = np.asarray(image)[..., :3]
        if (channels != channels[..., :1]).any():
            raise DatasetError(f"{path}: the label is a colour image; save class ids as a "
                               f"single-channel or palette PNG")
        return channels[..., 0].astype(np.int64)
    return np.asarray(image).astype(np.int64)


def check_labels(mask: np.ndarray, num_classes: int, source: Any) -> None:
    """Labels must be class ids in [0, num_classes) or the ignore label."""
    bad = (mask != IGNORE) & ((mask < 0) | (mask >= num_classes))
    if bad.any():
        values = ", ".join(str(v) for v in np.unique(mask[bad])[:8])
        raise DatasetError(f"{source}: label value(s) {values} outside [0, {num_classes}) "
                           f"and not the ignore label {IGNORE}")


def apply(transform: Any, image: np.ndarray, mask: np.ndarray) -> tuple[Any, Any]:
    """(image, mask) as arrays, or through an albumentations-style transform as tensors."""
    if transform is None:
        return image, mask
    out = transform(image=image, mask=mask)
    return torch.as_tensor(out["image"]).float(), torch.as_tensor(out["mask"], dtype=torch.int64)


class SegmentationDataset(Dataset):
    """Pairs of image and label files; subclasses find the pairs and say how labels map to ids.

    Without a transform `ds[i]` is (HxWx3 uint8 RGB, HxW int64 with ignore 255); with an
    albumentations transform it is (3xHxW float32 tensor, HxW int64 tensor).
    """

    ignore_index = IGNORE

    def __init__(self, files: list[tuple[Path, Path]], class_names: list[str],
                 transform: Any = None) -> None:
        if not files:
            raise DatasetError(f"{type(self).__name__}: no image/label pairs were found")
        self.files = files
        self.class_names = list(class_names)
        self.transform = transform

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.files)

    def read_mask(self, path: Path) -> np.ndarray:
        """Train ids of one label file (ignore = 255); datasets with other label values override."""
        return read_indices(path)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image_path, label_path = self.files[index]
        image, mask = read_rgb(image_path), self.read_mask(label_path)
        check_labels(mask, self.num_classes, label_path)
        if image.shape[:2] != mask.shape:
            raise DatasetError(f"{label_path}: label size {mask.shape} differs from the size "
                               f"{image.shape[:2]} of its image {image_path}")
        return image, mask

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        return apply(self.transform, *self.load(index))
