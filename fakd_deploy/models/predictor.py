"""A segmentation model as a Predictor: numpy in, numpy out, like every other backend."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from fakd_deploy.models.segmenter import SegmentationModel


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` is CUDA when torch sees a GPU, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class TorchPredictor:
    """Logits upsampled to the input size inside, as the exported graph does.

    `threads` sets torch's CPU threads for the calls only; the process setting is restored.
    """

    def __init__(
        self, model: SegmentationModel, device: torch.device | str = "cpu", threads: int | None = None
    ) -> None:
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.threads = threads

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        previous = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(self.device)
            logits = F.interpolate(self.model(x), x.shape[-2:], mode="bilinear", align_corners=False)
            return logits.float().cpu().numpy()
        finally:
            torch.set_num_threads(previous)
