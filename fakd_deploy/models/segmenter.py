"""Every model of the zoo: a timm encoder, a head from `HEADS`, and one 1x1 classifier."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeGuard, cast

import timm
import torch
from timm.models import FeatureInfo
from torch import Tensor, nn

from fakd_deploy.errors import BadInput
from fakd_deploy.inputs import MAX_CHANNELS, MAX_CLASSES
from fakd_deploy.models.heads import HEADS, STAGE3, Head, conv_bn_relu

# The four deepest levels of every timm encoder: nominal strides 4, 8, 16 and 32.
PYRAMID = (-4, -3, -2, -1)
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


@dataclass
class ModelOutput:
    """What training needs: logits, the classifier's input `features`, and the aux head's logits."""

    logits: Tensor
    features: Tensor
    aux_logits: Tensor | None = None


class SegmentationModel(Protocol):
    """The model contract (docs/architecture.md) that training, distillation and prediction rely on.

    `Segmenter` meets it; so does any nn.Module with these members. `training` and the
    methods after `forward_train` are plain nn.Module members that those stages use.
    """

    num_classes: int
    feat_dim: int  # channels of the classifier's input, the `features` of `forward_train`
    classifier: nn.Conv2d  # the last op: logits = classifier(features)
    config: dict[str, Any]  # `build_model(**config)` rebuilds the model
    training: bool

    def __call__(self, x: Tensor) -> Tensor: ...

    def forward_train(self, x: Tensor) -> ModelOutput: ...

    def train(self, mode: bool = True) -> SegmentationModel: ...

    def eval(self) -> SegmentationModel: ...

    def requires_grad_(self, requires_grad: bool = True) -> SegmentationModel: ...

    def to(self, device: torch.device) -> SegmentationModel: ...

    def state_dict(self, *, prefix: str = "") -> dict[str, Any]: ...


class Encoder(nn.Module):
    """A timm backbone as a four-level pyramid, dilated so its last level is at `output_stride`."""

    def __init__(
        self, name: str, output_stride: int = 8, pretrained: bool | str | Path | None = None
    ) -> None:
        super().__init__()
        if not timm.is_model(name):
            raise BadInput(
                f"unknown timm encoder '{name}' (`fakd-deploy models` lists the zoo; "
                "timm.list_models() lists every timm name)"
            )
        self.body = _create_encoder(name, output_stride, pretrained)
        info = cast(FeatureInfo, self.body.feature_info)  # every features_only timm model has one
        self.channels: list[int] = info.channels()
        if info.reduction()[-1] != output_stride:
            raise BadInput(f"encoder '{name}' cannot run at output_stride={output_stride}")

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.body(x)


class Segmenter(nn.Module):
    """logits = classifier(head(encoder(x))) at the head's resolution, never upsampled here.

    The classifier is the last op, so `forward_train(x).features` are exactly what it reads;
    distillation losses on features (FAKD) depend on that.
    """

    def __init__(
        self, encoder: Encoder, head: Head, num_classes: int, aux: bool, config: dict[str, Any]
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.classifier = nn.Conv2d(head.out_channels, num_classes, kernel_size=1, bias=True)
        self.aux_classifier = _aux_classifier(encoder.channels[STAGE3], head, num_classes) if aux else None
        self.num_classes = num_classes
        self.feat_dim: int = head.out_channels
        self.config = config

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.head(self.encoder(x)))

    def forward_train(self, x: Tensor) -> ModelOutput:
        pyramid = self.encoder(x)
        features = self.head(pyramid)
        aux_logits = self.aux_classifier(pyramid[STAGE3]) if self.aux_classifier is not None else None
        return ModelOutput(self.classifier(features), features, aux_logits)


def _aux_classifier(in_channels: int, head: Head, num_classes: int) -> nn.Sequential:
    """An FCN head on the stage-3 features, as wide as the main head; it only adds a training loss."""
    return nn.Sequential(
        conv_bn_relu(in_channels, head.channels, 3),
        nn.Dropout2d(head.dropout.p),
        nn.Conv2d(head.channels, num_classes, kernel_size=1),
    )


def build_model(
    name: str,
    num_classes: int,
    encoder: str,
    output_stride: int = 8,
    aux: bool = False,
    pretrained: bool | str | Path | None = None,
    **head_kwargs: Any,
) -> Segmenter:
    """A zoo model. `pretrained`: None (random), a local timm weights file, or True / a timm name
    such as 'resnet18.a1_in1k' to download ImageNet weights.

    `head_kwargs` go to the head (`channels`, `dropout`, `rates`, ...); `model.config` records
    them with the resolved `channels`, so `build_model(**model.config)` rebuilds the model.
    """
    if name not in HEADS:
        raise BadInput(f"unknown model '{name}'; choose one of: {', '.join(HEADS)}")
    head_cls = HEADS[name]
    head_kwargs["channels"] = head_kwargs.get("channels") or head_cls.default_channels
    if not 1 <= num_classes <= MAX_CLASSES or not 1 <= head_kwargs["channels"] <= MAX_CHANNELS:
        raise BadInput(
            f"a model of {num_classes} classes and {head_kwargs['channels']} channels is outside the "
            f"bounds (1..{MAX_CLASSES} classes, 1..{MAX_CHANNELS} channels)"
        )
    body = Encoder(encoder, output_stride, pretrained)
    head = head_cls(body.channels, output_stride, **head_kwargs)
    config = {
        "name": name,
        "num_classes": num_classes,
        "encoder": encoder,
        "output_stride": output_stride,
        "aux": aux,
        **head_kwargs,
    }
    return Segmenter(body, head, num_classes, aux, config)


def _create_encoder(name: str, output_stride: int, pretrained: bool | str | Path | None) -> nn.Module:
    if not pretrained:
        return _features_only(name, output_stride)
    if _is_file(pretrained):
        path = _checked_weights_file(name, Path(pretrained))
        return _features_only(
            name, output_stride, pretrained=True, pretrained_cfg_overlay={"file": str(path)}
        )
    hub_name = _hub_name(name, pretrained)
    try:
        return _features_only(hub_name, output_stride, pretrained=True)
    except OSError as error:
        raise BadInput(
            f"could not download ImageNet weights for '{hub_name}' (offline?): download them elsewhere "
            f"and pass pretrained=/path/to/{name}.pth (a timm state dict, e.g. the model.safetensors "
            f"of huggingface.co/{timm.models.get_pretrained_cfg_value(hub_name, 'hf_hub_id')})"
        ) from error


def _features_only(name: str, output_stride: int, **weights: Any) -> nn.Module:
    try:
        return timm.create_model(
            name, features_only=True, output_stride=output_stride, out_indices=PYRAMID, **weights
        )
    except (AssertionError, TypeError) as error:
        raise BadInput(f"encoder '{name}' cannot run at output_stride={output_stride}: {error}") from None


def _is_file(pretrained: bool | str | Path) -> TypeGuard[str | Path]:
    """A path names a file; a bare word such as 'resnet18.a1_in1k' names timm weights on the hub."""
    if isinstance(pretrained, bool):
        return False
    return isinstance(pretrained, Path) or Path(pretrained).suffix in WEIGHT_SUFFIXES or "/" in pretrained


def _checked_weights_file(name: str, path: Path) -> Path:
    """timm loads weights into a features-only encoder non-strictly, silently keeping random
    layers when keys differ; check the file against the full architecture first."""
    from fakd_deploy.models.weights import read_tensors, unwrap_state

    if not path.is_file():
        raise BadInput(f"encoder weights not found: {path}")
    state = unwrap_state(read_tensors(path))
    with torch.device("meta"):
        reference = timm.create_model(name, num_classes=0)
    pretrained_cfg = cast(dict[str, Any], reference.pretrained_cfg)  # every timm model has one
    classifier = f"{pretrained_cfg.get('classifier')}."
    state = {key: value for key, value in state.items() if not key.startswith(classifier)}
    own = reference.state_dict()
    missing = [key for key in own if key not in state]
    unexpected = [key for key in state if key not in own]
    reshaped = [key for key in own if key in state and state[key].shape != own[key].shape]
    if missing or unexpected or reshaped:
        raise BadInput(
            f"{path} does not hold timm '{name}' weights: {len(missing)} missing keys "
            f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, "
            f"{len(reshaped)} of another shape {reshaped[:3]}"
        )
    return path


def _hub_name(name: str, pretrained: bool | str | Path) -> str:
    """True means timm's default weights of `name`; a string picks a tag, e.g. 'resnet18.a1_in1k'."""
    hub_name = name if pretrained is True else str(pretrained)
    tags = timm.list_pretrained(name)
    if not tags or hub_name not in (name, *tags):
        raise BadInput(
            f"pretrained='{hub_name}' is neither a weights file nor timm weights of encoder "
            f"'{name}' (timm has: {', '.join(tags) or 'none'})"
        )
    return hub_name
