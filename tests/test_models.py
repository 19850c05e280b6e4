"""The model contract: shapes, classifier last, aux head, config round trip, SyncBN, weights, zoo."""

from __future__ import annotations

import copy
import socket
from pathlib import Path

import huggingface_hub.constants
import pytest
import timm
import torch
from rich.console import Console
from safetensors.torch import save_file
from torch import nn

from fakd_deploy.errors import BadInput
from fakd_deploy.models import ENCODERS, HEADS, Encoder, build_model, list_models, models_table
from fakd_deploy.models.zoo import count_flops

SIZE = 64
CLASSES = 5


def head_stride(name: str, output_stride: int) -> int:
    return {"deeplabv3plus": 4, "lraspp": 8}.get(name, output_stride)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize(
    ("encoder", "output_stride"),
    [("resnet10t", 8), ("mobilenetv3_small_050", 8), ("mobilenetv3_small_050", 16)],
)
@pytest.mark.parametrize("name", list(HEADS))
def test_head_shapes_and_classifier_last(name: str, encoder: str, output_stride: int) -> None:
    model = build_model(name, CLASSES, encoder, output_stride, aux=True, channels=16)
    x = torch.randn(2, 3, SIZE, SIZE)
    out = model.forward_train(x)
    side = SIZE // head_stride(name, output_stride)
    aux_side = SIZE // min(16, output_stride)
    assert out.logits.shape == (2, CLASSES, side, side)
    assert out.features.shape == (2, model.feat_dim, side, side)
    assert out.aux_logits is not None and out.aux_logits.shape == (2, CLASSES, aux_side, aux_side)
    assert torch.allclose(out.logits, model.classifier(out.features), atol=1e-6)

    model.eval()
    with torch.no_grad():
        out = model.forward_train(x)
        logits = model(x)
    assert torch.allclose(logits, out.logits, atol=1e-6)
    assert torch.allclose(logits, model.classifier(out.features), atol=1e-6)


def test_classifier_is_a_plain_1x1_conv() -> None:
    model = build_model("lraspp", CLASSES, "mobilenetv3_small_050", channels=16)
    conv = model.classifier
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.bias is not None
    assert (conv.in_channels, conv.out_channels) == (model.feat_dim, model.num_classes)


def test_no_aux_head_unless_asked() -> None:
    model = build_model("fcn", CLASSES, "resnet10t", channels=16)
    assert model.forward_train(torch.randn(2, 3, SIZE, SIZE)).aux_logits is None


@pytest.mark.parametrize("output_stride", [8, 16, 32])
@pytest.mark.parametrize("encoder", ENCODERS)
def test_every_zoo_encoder_builds_at_output_stride(encoder: str, output_stride: int) -> None:
    with torch.device("meta"):
        pyramid = Encoder(encoder, output_stride)(torch.zeros(1, 3, SIZE, SIZE))
    strides = (4, 8, min(16, output_stride), min(32, output_stride))
    assert [level.shape[-1] for level in pyramid] == [SIZE // s for s in strides]


def test_config_rebuilds_the_same_model() -> None:
    model = build_model(
        "deeplabv3plus",
        CLASSES,
        "resnet10t",
        16,
        aux=True,
        channels=24,
        rates=(2, 4, 6),
        low_channels=8,
        dropout=0.2,
    ).eval()
    rebuilt = build_model(**model.config).eval()
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, SIZE, SIZE)
    assert rebuilt.config == model.config
    assert torch.equal(rebuilt(x), model(x))


def test_default_channels_are_recorded() -> None:
    assert build_model("pspnet", CLASSES, "resnet10t").config["channels"] == HEADS["pspnet"].default_channels


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "unet", "encoder": "resnet18"}, "unknown model 'unet'"),
        ({"name": "fcn", "encoder": "resnet9000"}, "unknown timm encoder"),
        ({"name": "fcn", "encoder": "ghostnet_100"}, "output_stride=8"),
    ],
)
def test_bad_names_are_value_errors(kwargs: dict[str, str], message: str) -> None:
    with pytest.raises(BadInput, match=message):
        build_model(num_classes=CLASSES, **kwargs)


def test_torch_sync_batchnorm_conversion_keeps_the_model() -> None:
    model = build_model("deeplabv3", CLASSES, "resnet10t", aux=True, channels=16).eval()
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model)).eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    assert any(isinstance(m, nn.SyncBatchNorm) for m in synced.modules())
    assert synced.state_dict().keys() == model.state_dict().keys()
    assert synced.config == model.config
    assert torch.allclose(synced(x), model(x), atol=1e-6)


def test_timm_sync_batchnorm_conversion_keeps_fused_activations() -> None:
    """MobileNet/EfficientNet encoders fuse BN and activation (BatchNormAct2d); torch's converter
    would drop the activation, timm's keeps it."""
    model = build_model("lraspp", CLASSES, "mobilenetv3_small_050", channels=16).eval()
    synced = timm.layers.convert_sync_batchnorm(copy.deepcopy(model)).eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    assert any(isinstance(m, nn.SyncBatchNorm) for m in synced.modules())
    assert torch.allclose(synced(x), model(x), atol=1e-6)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No network and an empty hub cache, whatever the machine has."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    def refuse(*args: object) -> None:
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.mark.parametrize("pretrained", [True, "resnet10t.c3_in1k"])
def test_hub_weights_offline_fail_with_a_way_out(offline: None, pretrained: bool | str) -> None:
    with pytest.raises(
        BadInput,
        match=r"could not download ImageNet weights for 'resnet10t.*"
        r"\(offline\?\).*pretrained=/path/to/resnet10t\.pth",
    ):
        build_model("fcn", CLASSES, "resnet10t", pretrained=pretrained)


def test_hub_name_of_another_model_is_refused() -> None:
    with pytest.raises(
        BadInput,
        match=r"neither a weights file nor timm weights of encoder 'resnet10t' "
        r"\(timm has: resnet10t\.c3_in1k\)",
    ):
        build_model("fcn", CLASSES, "resnet10t", pretrained="resnet18.a1_in1k")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_encoder_weights_load(tmp_path: Path, suffix: str) -> None:
    state = timm.create_model("resnet10t").state_dict()
    path = tmp_path / f"resnet10t{suffix}"
    if suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save(state, path)
    model = build_model("fcn", CLASSES, "resnet10t", pretrained=str(path), channels=16)
    loaded = model.encoder.body.state_dict()
    assert torch.equal(loaded["layer4.0.conv1.weight"], state["layer4.0.conv1.weight"])
    assert all(torch.equal(loaded[key], state[key]) for key in loaded)
    assert "pretrained" not in model.config


def test_local_weights_of_another_encoder_are_listed(tmp_path: Path) -> None:
    path = tmp_path / "wrong.pth"
    torch.save(timm.create_model("resnet10t").state_dict(), path)
    with pytest.raises(
        BadInput,
        match=r"wrong\.pth does not hold timm 'mobilenetv3_small_050' weights: "
        r"\d+ missing keys \['conv_stem.weight'",
    ):
        build_model("fcn", CLASSES, "mobilenetv3_small_050", pretrained=path)


def test_missing_or_corrupt_local_weights_file(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match=r"nothing\.pth"):
        build_model("fcn", CLASSES, "resnet10t", pretrained=str(tmp_path / "nothing.pth"))
    (tmp_path / "garbage.pth").write_bytes(b"not weights")
    with pytest.raises(BadInput, match=r"garbage\.pth is not a readable checkpoint"):
        build_model("fcn", CLASSES, "resnet10t", pretrained=str(tmp_path / "garbage.pth"))


def test_list_models_rows_match_a_real_build() -> None:
    rows = list_models((SIZE, SIZE), heads=["deeplabv3", "lraspp"], encoders=["resnet10t"])
    assert [(r["name"], r["encoder"]) for r in rows] == [("deeplabv3", "resnet10t"), ("lraspp", "resnet10t")]
    model = build_model("deeplabv3", 19, "resnet10t").eval()
    assert rows[0]["params_m"] == pytest.approx(sum(p.numel() for p in model.parameters()) / 1e6)
    assert rows[0]["gflops"] == pytest.approx(count_flops(model, (SIZE, SIZE)) / 1e9)
    assert rows[0]["gflops"] > rows[1]["gflops"] > 0

    console = Console(record=True, width=200)
    console.print(models_table(rows))
    text = console.export_text()
    assert "resnet10t" in text and "GFLOPs @ 64x64" in text and "2 x MACs" in text
