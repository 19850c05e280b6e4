"""The training augmentation, with albumentations as the segmentation literature uses it.

Random scale, pad with the ignore label, random crop, horizontal flip, colour jitter, then
normalisation into a 3xHxW float32 tensor and an HxW int64 tensor. Validation does not come
through here: it is the numpy `preprocess.ValTransform`, so deployed models are scored
without torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import albumentations as A
import cv2
import numpy as np
import torch


class TrainTransform:
    """(image, mask) arrays -> augmented (image, mask) tensors, reseedable per sample.

    Padding uses 0 for the image and `ignore_index` for the mask, so padded pixels add
    nothing to the loss. Training reseeds the pipeline per sample with `set_random_seed`,
    so a run does not depend on the number of loader workers or on where it resumed.
    """

    def __init__(
        self,
        crop: Sequence[int] | None,
        scale: Sequence[float],
        hflip: bool,
        jitter: float,
        mean: Sequence[float],
        std: Sequence[float],
        pixel_scale: float,
        ignore_index: int,
    ) -> None:
        # RandomScale's limits are relative to 1: a factor in [0.5, 2.0] is the limit (-0.5, 1.0).
        steps: list[A.BasicTransform] = [
            A.RandomScale(
                scale_limit=(scale[0] - 1, scale[1] - 1),
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST,
                p=1.0,
            )
        ]
        if crop:
            steps += [
                A.PadIfNeeded(
                    min_height=crop[0],
                    min_width=crop[1],
                    border_mode=cv2.BORDER_CONSTANT,
                    fill=0,
                    fill_mask=ignore_index,
                ),
                A.RandomCrop(height=crop[0], width=crop[1]),
            ]
        if hflip:
            steps.append(A.HorizontalFlip(p=0.5))
        if jitter:
            steps.append(
                A.ColorJitter(
                    brightness=jitter, contrast=jitter, saturation=jitter, hue=min(jitter / 4, 0.5), p=1.0
                )
            )
        steps.append(A.Normalize(mean=mean, std=std, max_pixel_value=pixel_scale))
        self.pipeline = A.Compose(steps)

    def set_random_seed(self, seed: int) -> None:
        self.pipeline.set_random_seed(seed)

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.pipeline(image=image, mask=mask)
        image_t = torch.from_numpy(np.ascontiguousarray(out["image"].transpose(2, 0, 1)))
        return image_t.float(), torch.from_numpy(np.asarray(out["mask"], dtype=np.int64))
