"""Preprocessing: the training augmentation (tensors), and the numpy val transform checked
against torch's and OpenCV's resizes, which training and the exported graph use."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fakd_deploy.data.preprocess import Normalise, ValTransform, resize_bilinear, resize_nearest
from fakd_deploy.data.transforms import TrainTransform

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def blocks(height: int, width: int, labels: list[int]) -> np.ndarray:
    """A mask of vertical bands, one per label."""
    band = np.repeat(np.array(labels, dtype=np.int64), -(-width // len(labels)))[:width]
    return np.tile(band, (height, 1))


def sample(height: int = 64, width: int = 80) -> tuple[np.ndarray, np.ndarray]:
    image = np.random.default_rng(0).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return image, blocks(height, width, [0, 3, 7])


def train(
    crop: tuple[int, int] | None = (48, 56),
    scale: tuple[float, float] = (0.5, 2.0),
    hflip: bool = True,
    jitter: float = 0.2,
    ignore_index: int = 255,
) -> TrainTransform:
    return TrainTransform(crop, scale, hflip, jitter, MEAN, STD, 255.0, ignore_index)


@pytest.mark.parametrize("size", [(20, 24), (64, 80), (200, 150)])
def test_train_output_types_and_crop(size: tuple[int, int]) -> None:
    image, mask = sample(*size)
    out_image, out_mask = train()(image, mask)
    assert out_image.dtype == torch.float32 and out_image.shape == (3, 48, 56)
    assert out_mask.dtype == torch.int64 and out_mask.shape == (48, 56)
    assert set(out_mask.unique().tolist()) <= {0, 3, 7, 255}


def test_scaled_below_crop_pads_mask_with_ignore_and_image_with_zero() -> None:
    image, mask = sample(64, 64)
    out_image, out_mask = train((64, 64), (0.5, 0.5), hflip=False, jitter=0.0, ignore_index=250)(image, mask)
    padded = out_mask == 250
    assert int(padded.sum()) == 64 * 64 - 32 * 32
    zero = (0 - torch.tensor(MEAN)) / torch.tensor(STD)
    torch.testing.assert_close(out_image[:, padded], zero[:, None].expand(3, int(padded.sum())))


def test_reseeding_repeats_the_augmentation() -> None:
    image, mask = sample()
    pipeline = train((32, 32))
    pipeline.set_random_seed(5)
    first = pipeline(image, mask)
    pipeline.set_random_seed(5)
    second = pipeline(image, mask)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.parametrize(
    "size_in, size_out",
    [((64, 80), (37, 51)), ((45, 60), (360, 480)), ((360, 480), (120, 160)), ((7, 9), (7, 9))],
)
def test_bilinear_resize_is_torch_interpolate(size_in: tuple[int, int], size_out: tuple[int, int]) -> None:
    x = np.random.default_rng(1).standard_normal((2, 3, *size_in)).astype(np.float32)
    expected = F.interpolate(torch.from_numpy(x), size_out, mode="bilinear", align_corners=False).numpy()
    # torch computes the source positions in float32, these in float64: 1e-4 covers the rounding
    np.testing.assert_allclose(resize_bilinear(x, size_out), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("size_out", [(37, 51), (120, 160), (97, 203)])
def test_nearest_resize_is_opencv_inter_nearest(size_out: tuple[int, int]) -> None:
    mask = np.random.default_rng(2).integers(0, 12, size=(64, 80)).astype(np.uint8)
    expected = cv2.resize(mask, size_out[::-1], interpolation=cv2.INTER_NEAREST)
    np.testing.assert_array_equal(resize_nearest(mask, size_out), expected)


def test_val_resize_matches_opencv_within_one_grey_level() -> None:
    """The training augmentation resizes with OpenCV; validation must see the same pixels."""
    image, mask = sample(360, 480)
    normalise = Normalise(MEAN, STD)
    out_image, out_mask = ValTransform(normalise, (120, 160))(image, mask)
    reference = cv2.resize(image, (160, 120), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    ours = out_image.transpose(1, 2, 0) * np.float32(STD) + np.float32(MEAN)
    assert np.abs(ours * 255 - reference).max() <= 1.0 + 1e-3
    np.testing.assert_array_equal(
        out_mask, cv2.resize(mask.astype(np.uint8), (160, 120), interpolation=cv2.INTER_NEAREST)
    )


def test_val_without_resize_only_normalises() -> None:
    image, mask = sample()
    out_image, out_mask = ValTransform(Normalise(MEAN, STD))(image, mask)
    expected = (image.transpose(2, 0, 1) / 255.0 - np.array(MEAN)[:, None, None]) / np.array(STD)[
        :, None, None
    ]
    np.testing.assert_allclose(out_image, expected, atol=1e-5)
    assert out_image.dtype == np.float32 and out_mask.dtype == np.int64
    np.testing.assert_array_equal(out_mask, mask)
