"""Feed models whose input shape is fixed at export: split/pad batches, resize images."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from fakd_deploy.evaluate import Predictor


def run_fixed_batch(run: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                    batch: int | None) -> torch.Tensor:
    """Call `run` on chunks of exactly `batch` images; the last chunk is zero-padded and trimmed.

    A static-batch engine rejects any other batch size, yet evaluation and
    benchmarks hand it whatever the loader yields.
    """
    count = images.shape[0]
    if batch is None or count == batch:
        return run(images)
    outputs = []
    for start in range(0, count, batch):
        chunk = images[start:start + batch]
        real = chunk.shape[0]
        if real < batch:
            chunk = torch.cat([chunk, chunk.new_zeros(batch - real, *chunk.shape[1:])])
        outputs.append(run(chunk)[:real])
    return torch.cat(outputs)


class FixedSizePredictor:
    """Resize images to the model's input size and its output back to the image size.

    Logits are resized bilinearly (as the exported graph does), labels by nearest neighbour.
    """

    def __init__(self, predictor: Predictor, size: tuple[int, int] | None) -> None:
        self.predictor = predictor
        self.size = tuple(size) if size else None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        original = tuple(images.shape[-2:])
        if self.size is None or original == self.size:
            return self.predictor(images)
        resized = F.interpolate(images, self.size, mode="bilinear", align_corners=False)
        out = self.predictor(resized)
        if out.dim() == 4:
            return F.interpolate(out.float(), original, mode="bilinear", align_corners=False)
        labels = F.interpolate(out[:, None].float(), original, mode="nearest")
        return labels[:, 0].long()
