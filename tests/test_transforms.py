"""Augmentation pipelines: tensor types and shapes, ignore padding, label-preserving resize."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fakd_deploy.data import build_transforms

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def blocks(height: int, width: int, labels: list[int]) -> np.ndarray:
    """A mask of vertical bands, one per label."""
    band = np.repeat(np.array(labels, dtype=np.int64), -(-width // len(labels)))[:width]
    return np.tile(band, (height, 1))


def sample(height: int = 64, width: int = 80) -> tuple[np.ndarray, np.ndarray]:
    image = np.random.default_rng(0).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return image, blocks(height, width, [0, 3, 7])


@pytest.mark.parametrize("size", [(20, 24), (64, 80), (200, 150)])
def test_train_output_types_and_crop(size: tuple[int, int]) -> None:
    image, mask = sample(*size)
    out = build_transforms(True, (48, 56))(image=image, mask=mask)
    assert out["image"].dtype == torch.float32 and out["image"].shape == (3, 48, 56)
    assert out["mask"].dtype == torch.int64 and out["mask"].shape == (48, 56)
    assert set(out["mask"].unique().tolist()) <= {0, 3, 7, 255}


def test_scaled_below_crop_pads_mask_with_ignore_and_image_with_zero() -> None:
    image, mask = sample(64, 64)
    pipeline = build_transforms(True, (64, 64), scale=(0.5, 0.5), hflip=False, jitter=0.0,
                                ignore_index=250)
    out = pipeline(image=image, mask=mask)
    padded = out["mask"] == 250
    assert int(padded.sum()) == 64 * 64 - 32 * 32
    zero = (0 - torch.tensor(MEAN)) / torch.tensor(STD)
    torch.testing.assert_close(out["image"][:, padded], zero[:, None].expand(3, int(padded.sum())))


def test_val_resize_is_nearest_for_the_mask() -> None:
    image, mask = sample(64, 80)
    mask[:5] = 255
    out = build_transforms(False, None, resize=(37, 51))(image=image, mask=mask)
    assert out["image"].shape == (3, 37, 51) and out["mask"].shape == (37, 51)
    assert set(out["mask"].unique().tolist()) == {0, 3, 7, 255}


def test_val_without_resize_only_normalises() -> None:
    image, mask = sample()
    out = build_transforms(False, None, pixel_scale=255.0)(image=image, mask=mask)
    expected = (torch.from_numpy(image).permute(2, 0, 1) / 255.0 - torch.tensor(MEAN)[:, None, None]) \
        / torch.tensor(STD)[:, None, None]
    torch.testing.assert_close(out["image"], expected.float(), atol=1e-5, rtol=1e-5)
    assert torch.equal(out["mask"], torch.from_numpy(mask))


def test_reseeding_repeats_the_augmentation() -> None:
    image, mask = sample()
    pipeline = build_transforms(True, (32, 32))
    pipeline.set_random_seed(5)
    first = pipeline(image=image, mask=mask)
    pipeline.set_random_seed(5)
    second = pipeline(image=image, mask=mask)
    assert torch.equal(first["image"], second["image"]) and torch.equal(first["mask"], second["mask"])
