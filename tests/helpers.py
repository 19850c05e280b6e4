"""What several test files share: one tiny model that follows the model contract, and small recipes."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from torch import nn


class TinySegmenter(nn.Module):
    """The model contract in miniature: logits at 1/stride, the pre-classifier features, an
    optional aux head, and a 1x1 classifier as the last op. BatchNorm statistics are
    non-trivial, so export's folding is exercised."""

    def __init__(
        self,
        num_classes: int = 5,
        feat_dim: int = 16,
        stride: int = 4,
        aux: bool = False,
        sync_bn: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        norm = nn.SyncBatchNorm if sync_bn else nn.BatchNorm2d
        self.features = nn.Sequential(
            nn.Conv2d(3, feat_dim, 3, stride=2, padding=1),
            norm(feat_dim),
            nn.ReLU(),
            nn.Conv2d(feat_dim, feat_dim, 3, stride=stride // 2, padding=1),
            norm(feat_dim),
            nn.ReLU(),
        )
        self.classifier = nn.Conv2d(feat_dim, num_classes, 1)
        self.aux_classifier = nn.Conv2d(feat_dim, num_classes, 1) if aux else None
        self.num_classes, self.feat_dim = num_classes, feat_dim
        self.config = {"name": "tiny", "num_classes": num_classes}
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d | nn.SyncBatchNorm):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
        self.eval()

    def forward_train(self, x: torch.Tensor) -> SimpleNamespace:
        features = self.features(x)
        aux = self.aux_classifier(features) if self.aux_classifier is not None else None
        return SimpleNamespace(logits=self.classifier(features), features=features, aux_logits=aux)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def synthetic_recipe(**sections: Any) -> dict[str, Any]:
    """A raw recipe on 64x64 synthetic data with a tiny zoo student; sections replace the defaults."""
    raw: dict[str, Any] = {
        "name": "t",
        "data": {
            "name": "synthetic",
            "options": {"num_images": 8, "size": 64, "num_classes": 6},
            "crop": [64, 64],
            "batch_size": 4,
            "val_batch_size": 4,
            "workers": 0,
        },
        "student": {
            "model": {
                "name": "deeplabv3",
                "encoder": "mobilenetv3_small_050",
                "output_stride": 8,
                "channels": 16,
            },
            "variants": {"baseline": []},
        },
        "deploy": {"export": {"height": 64, "width": 64}},
    }
    raw.update(sections)
    return raw


def signal_at_forward(monkeypatch: Any, call: int, signum: int) -> None:
    """Send `signum` to this process at the `call`-th forward pass of any Distiller: a stop
    arriving in the middle of training, as a Ctrl-C, a scheduler or a closed terminal does."""
    import signal

    from fakd_deploy.distill.distiller import Distiller

    original = Distiller.forward
    calls = {"n": 0}

    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == call:
            signal.raise_signal(signum)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Distiller, "forward", forward)
