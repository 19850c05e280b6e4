"""Segmentation heads: each turns the encoder's pyramid into the features the classifier reads.

Every head receives the four pyramid levels of `Encoder` (nominal strides 4, 8, 16 and 32;
the last two are dilated down to the output stride) and returns one feature map. The model's
1x1 classifier comes after the head, so a head never predicts classes itself: that keeps the
classifier the last op of every model, which FAKD's closed form relies on.

Adding a head is one `Head` subclass plus one line in `HEADS`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

STRIDE4, STRIDE8, STAGE3, LAST = range(4)


def conv_bn_relu(
    in_channels: int, out_channels: int, kernel_size: int = 1, dilation: int = 1
) -> nn.Sequential:
    padding = dilation * (kernel_size - 1) // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def upsample_to(x: Tensor, like: Tensor) -> Tensor:
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


def aspp_rates(output_stride: int) -> tuple[int, ...]:
    """The paper's rates (6, 12, 18) at output stride 16, scaled so they cover the same context."""
    return tuple(rate * 16 // output_stride for rate in (6, 12, 18))


class Head(nn.Module):
    """Base class: `decode` builds the features; dropout comes last so that the classifier reads
    exactly what `forward` returns (dropout is the identity in eval mode)."""

    default_channels: ClassVar[int] = 256

    def __init__(self, channels: int, out_channels: int, dropout: float) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels
        self.dropout = nn.Dropout2d(dropout)

    def decode(self, features: Sequence[Tensor]) -> Tensor:
        raise NotImplementedError

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        return self.dropout(self.decode(features))


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: parallel dilated convs plus image pooling, then a 1x1 fuse."""

    def __init__(self, in_channels: int, channels: int, rates: Sequence[int]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [conv_bn_relu(in_channels, channels)]
            + [conv_bn_relu(in_channels, channels, 3, dilation=rate) for rate in rates]
        )
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), conv_bn_relu(in_channels, channels))
        self.project = conv_bn_relu(channels * (len(rates) + 2), channels)

    def forward(self, x: Tensor) -> Tensor:
        pooled = self.pool(x).expand(-1, -1, *x.shape[-2:])
        return self.project(torch.cat([branch(x) for branch in self.branches] + [pooled], dim=1))


class DeepLabV3Head(Head):
    """ASPP on the last level, then a 3x3 conv (as torchvision's DeepLabHead)."""

    def __init__(
        self,
        in_channels: Sequence[int],
        output_stride: int,
        channels: int,
        dropout: float = 0.1,
        rates: Sequence[int] | None = None,
    ) -> None:
        super().__init__(channels, channels, dropout)
        self.aspp = ASPP(in_channels[LAST], channels, rates or aspp_rates(output_stride))
        self.conv = conv_bn_relu(channels, channels, 3)

    def decode(self, features: Sequence[Tensor]) -> Tensor:
        return self.conv(self.aspp(features[LAST]))


class DeepLabV3PlusHead(Head):
    """ASPP, upsampled to stride 4 and fused with projected stride-4 features (output at 1/4)."""

    def __init__(
        self,
        in_channels: Sequence[int],
        output_stride: int,
        channels: int,
        dropout: float = 0.1,
        rates: Sequence[int] | None = None,
        low_channels: int = 48,
    ) -> None:
        super().__init__(channels, channels, dropout)
        self.aspp = ASPP(in_channels[LAST], channels, rates or aspp_rates(output_stride))
        self.low = conv_bn_relu(in_channels[STRIDE4], low_channels)
        self.fuse = nn.Sequential(
            conv_bn_relu(channels + low_channels, channels, 3), conv_bn_relu(channels, channels, 3)
        )

    def decode(self, features: Sequence[Tensor]) -> Tensor:
        low = self.low(features[STRIDE4])
        return self.fuse(torch.cat([upsample_to(self.aspp(features[LAST]), low), low], dim=1))


class PSPHead(Head):
    """Pyramid pooling module: pooled context at several grid sizes, concatenated with the input.

    Each pooling branch gets `channels / len(bins)` channels, as in the PSPNet paper where the
    branches together match the width of the fused output.
    """

    default_channels = 512

    def __init__(
        self,
        in_channels: Sequence[int],
        output_stride: int,
        channels: int,
        dropout: float = 0.1,
        bins: Sequence[int] = (1, 2, 3, 6),
    ) -> None:
        super().__init__(channels, channels, dropout)
        width = channels // len(bins)
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(size), conv_bn_relu(in_channels[LAST], width)) for size in bins
        )
        self.bottleneck = conv_bn_relu(in_channels[LAST] + width * len(bins), channels, 3)

    def decode(self, features: Sequence[Tensor]) -> Tensor:
        x = features[LAST]
        return self.bottleneck(torch.cat([x] + [upsample_to(stage(x), x) for stage in self.stages], dim=1))


class FCNHead(Head):
    """One 3x3 conv on the last level: the simplest baseline (torchvision's FCNHead body)."""

    def __init__(
        self, in_channels: Sequence[int], output_stride: int, channels: int, dropout: float = 0.1
    ) -> None:
        super().__init__(channels, channels, dropout)
        self.conv = conv_bn_relu(in_channels[LAST], channels, 3)

    def decode(self, features: Sequence[Tensor]) -> Tensor:
        return self.conv(features[LAST])


class LRASPPHead(Head):
    """Lite R-ASPP (MobileNetV3 paper), output at stride 8.

    The original sums two 1x1 classifiers, one over the gated last level and one over the raw
    stride-8 features. A sum of two 1x1 convs equals one 1x1 conv over their concatenation, so
    here the features are `cat(gated, stride8)` and the model's single classifier reads them:
    the same function, with the classifier as the last op.
    """

    default_channels = 128

    def __init__(
        self, in_channels: Sequence[int], output_stride: int, channels: int, dropout: float = 0.1
    ) -> None:
        super().__init__(channels, channels + in_channels[STRIDE8], dropout)
        self.cbr = conv_bn_relu(in_channels[LAST], channels)
        self.scale = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels[LAST], channels, 1, bias=False), nn.Sigmoid()
        )

    def decode(self, features: Sequence[Tensor]) -> Tensor:
        x, low = features[LAST], features[STRIDE8]
        return torch.cat([upsample_to(self.cbr(x) * self.scale(x), low), low], dim=1)


class HeadClass(Protocol):
    """What `build_model` needs of a head class: its default width and this constructor
    (a head's own options, such as `rates` or `bins`, come as further keywords)."""

    @property
    def default_channels(self) -> int: ...

    def __call__(self, in_channels: Sequence[int], output_stride: int, channels: int) -> Head: ...


HEADS: dict[str, HeadClass] = {
    "deeplabv3": DeepLabV3Head,
    "deeplabv3plus": DeepLabV3PlusHead,
    "pspnet": PSPHead,
    "fcn": FCNHead,
    "lraspp": LRASPPHead,
}
