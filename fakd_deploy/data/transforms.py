"""Albumentations pipelines as the segmentation literature uses them.

Train: random scale, pad with the ignore label, random crop, horizontal flip, colour jitter.
Val: an optional resize (nearest for the mask, so no label is invented). Both end in
normalisation, a 3xHxW float32 image tensor and an HxW int64 mask tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import albumentations as A
import cv2
import torch
from albumentations.pytorch import ToTensorV2


def mask_to_int64(mask: torch.Tensor, **params: object) -> torch.Tensor:
    """Albumentations hands integer masks back as int32; losses index with int64."""
    return mask.long()


def train_steps(crop: Sequence[int] | None, scale: Sequence[float], hflip: bool, jitter: float,
                ignore_index: int) -> list[A.BasicTransform]:
    # RandomScale's limits are relative to 1: a factor in [0.5, 2.0] is the limit (-0.5, 1.0).
    steps: list[A.BasicTransform] = [
        A.RandomScale(scale_limit=(scale[0] - 1, scale[1] - 1), interpolation=cv2.INTER_LINEAR,
                      mask_interpolation=cv2.INTER_NEAREST, p=1.0)]
    if crop:
        steps += [A.PadIfNeeded(min_height=crop[0], min_width=crop[1],
                                border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=ignore_index),
                  A.RandomCrop(height=crop[0], width=crop[1])]
    if hflip:
        steps.append(A.HorizontalFlip(p=0.5))
    if jitter:
        steps.append(A.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter,
                                   hue=min(jitter / 4, 0.5), p=1.0))
    return steps


def build_transforms(train: bool, crop: Sequence[int] | None = None,
                     scale: Sequence[float] = (0.5, 2.0),
                     mean: Sequence[float] = (0.485, 0.456, 0.406),
                     std: Sequence[float] = (0.229, 0.224, 0.225), pixel_scale: float = 255.0,
                     resize: Sequence[int] | None = None, hflip: bool = True, jitter: float = 0.2,
                     ignore_index: int = 255) -> A.Compose:
    """The train or val pipeline; `crop` and `resize` are (height, width).

    Padding uses 0 for the image and `ignore_index` for the mask, so padded pixels add
    nothing to the loss. The pipeline draws from its own random state; training reseeds it
    per sample with `set_random_seed` so a run does not depend on the number of workers.
    """
    if train:
        steps = train_steps(crop, scale, hflip, jitter, ignore_index)
    elif resize:
        steps = [A.Resize(height=resize[0], width=resize[1], interpolation=cv2.INTER_LINEAR,
                          mask_interpolation=cv2.INTER_NEAREST)]
    else:
        steps = []
    steps += [A.Normalize(mean=mean, std=std, max_pixel_value=pixel_scale), ToTensorV2(),
              A.Lambda(name="mask_to_int64", mask=mask_to_int64)]
    return A.Compose(steps)
