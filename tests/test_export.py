"""ONNX export: parity with PyTorch, static/dynamic batch, argmax, metadata, fallbacks."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers import TinySegmenter
from torch import nn

from fakd_deploy.deploy import export as export_module
from fakd_deploy.deploy.export import DeployModel, export_onnx
from fakd_deploy.deploy.onnx_meta import read_metadata
from fakd_deploy.deploy.ort import OrtPredictor
from fakd_deploy.errors import ExportError

CLASSES = 5


def randn(*shape: int) -> np.ndarray:
    return torch.randn(*shape).numpy()


def reference(model: nn.Module, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return DeployModel(model.eval(), tuple(images.shape[-2:]))(torch.from_numpy(images)).numpy()


def test_static_export_matches_pytorch(tmp_path: Path) -> None:
    model = TinySegmenter()
    images = [randn(1, 3, 64, 96) for _ in range(3)]
    report = export_onnx(model, tmp_path / "m.onnx", 64, 96, parity_batches=images)
    assert report["exporter"] == "dynamo" and report["simplified"]
    assert report["max_abs_diff"] <= 1e-4 and report["argmax_agreement"] > 0.999
    assert report["parity_images"] == 3
    onnx.checker.check_model(str(tmp_path / "m.onnx"), full_check=True)
    assert not list(tmp_path.glob("*.data")) and not list(tmp_path.glob(".*tmp"))
    predictor = OrtPredictor(tmp_path / "m.onnx")
    assert predictor.static_batch == 1 and predictor.input_size == (64, 96)
    x = randn(1, 3, 64, 96)
    np.testing.assert_allclose(predictor(x), reference(model, x), atol=1e-4, rtol=0)


def test_dynamic_batch_runs_at_1_and_3(tmp_path: Path) -> None:
    model = TinySegmenter()
    export_onnx(model, tmp_path / "d.onnx", 64, 96, dynamic=True, parity_batches=[randn(2, 3, 64, 96)])
    predictor = OrtPredictor(tmp_path / "d.onnx")
    assert predictor.static_batch is None
    for batch in (1, 3):
        x = randn(batch, 3, 64, 96)
        out = predictor(x)
        assert out.shape == (batch, CLASSES, 64, 96)
        np.testing.assert_allclose(out, reference(model, x), atol=1e-4, rtol=0)


def test_static_batch_is_split_and_padded(tmp_path: Path) -> None:
    model = TinySegmenter()
    export_onnx(model, tmp_path / "b2.onnx", 32, 32, batch=2, parity_batches=[randn(3, 3, 32, 32)])
    predictor = OrtPredictor(tmp_path / "b2.onnx")
    assert predictor.static_batch == 2
    x = randn(3, 3, 32, 32)
    np.testing.assert_allclose(predictor(x), reference(model, x), atol=1e-4, rtol=0)


def test_argmax_export_outputs_labels_and_checks_logits(tmp_path: Path) -> None:
    model = TinySegmenter()
    report = export_onnx(
        model, tmp_path / "a.onnx", 64, 96, argmax=True, parity_batches=[randn(1, 3, 64, 96)]
    )
    assert report["max_abs_diff"] <= 1e-4  # the logits before ArgMax were compared
    x = randn(1, 3, 64, 96)
    labels = OrtPredictor(tmp_path / "a.onnx")(x)
    assert labels.shape == (1, 64, 96) and labels.dtype == np.int64
    agreement = (labels == reference(model, x).argmax(1)).mean()
    assert agreement > 0.999
    assert read_metadata(tmp_path / "a.onnx")["output"] == "labels"


def test_metadata_round_trip(tmp_path: Path) -> None:
    names = [f"class {i}" for i in range(CLASSES)]
    export_onnx(
        TinySegmenter(),
        tmp_path / "m.onnx",
        32,
        48,
        metadata={"class_names": names, "mean": [0.5, 0.5, 0.5], "recipe": "name: t\n"},
        parity_batches=[randn(1, 3, 32, 48)],
    )
    meta = read_metadata(tmp_path / "m.onnx")
    assert meta["class_names"] == names and meta["mean"] == [0.5, 0.5, 0.5]
    assert meta["recipe"] == "name: t\n"  # kept as text
    assert meta["input_size"] == [32, 48] and meta["num_classes"] == CLASSES
    assert meta["argmax"] is False and meta["batch"] == 1 and meta["opset"] == 18


def test_sync_batchnorm_is_exported_as_batchnorm(tmp_path: Path) -> None:
    model = TinySegmenter(sync_bn=True)
    report = export_onnx(model, tmp_path / "s.onnx", 32, 32, parity_batches=[randn(1, 3, 32, 32)])
    assert report["max_abs_diff"] <= 1e-4
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())


def test_parity_failure_raises_and_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        export_module,
        "check_parity",
        lambda *args, **kwargs: {"max_abs_diff": 0.5, "argmax_agreement": 0.9, "parity_images": 1},
    )
    with pytest.raises(ExportError, match="tolerance"):
        export_onnx(TinySegmenter(), tmp_path / "m.onnx", 32, 32, parity_batches=[randn(1, 3, 32, 32)])
    assert list(tmp_path.iterdir()) == []


def test_dynamo_failure_falls_back_to_torchscript(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_export = torch.onnx.export

    def no_dynamo(*args, dynamo: bool = True, **kwargs):
        if dynamo:
            raise RuntimeError("unsupported operator for this test")
        return real_export(*args, dynamo=False, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", no_dynamo)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = export_onnx(
            TinySegmenter(), tmp_path / "m.onnx", 32, 32, dynamic=True, parity_batches=[randn(2, 3, 32, 32)]
        )
    assert report["exporter"] == "torchscript" and report["max_abs_diff"] <= 1e-4
    assert any("unsupported operator for this test" in str(w.message) for w in caught)
    assert OrtPredictor(tmp_path / "m.onnx")(randn(3, 3, 32, 32)).shape[0] == 3


@pytest.mark.slow
def test_deeplabv3_resnet18_os8_parity_at_360x480(tmp_path: Path) -> None:
    from fakd_deploy.models import build_model

    torch.manual_seed(0)
    model = build_model("deeplabv3", 11, "resnet18", output_stride=8).eval()
    images = [randn(1, 3, 360, 480) for _ in range(2)]
    report = export_onnx(model, tmp_path / "r18.onnx", 360, 480, parity_batches=images)
    assert report["max_abs_diff"] <= 1e-4
    assert report["argmax_agreement"] >= 0.999


def test_export_command_uses_the_recipes_export_settings(tmp_path: Path) -> None:
    """`export` and `run` export alike: opset, batch, dynamic, argmax come from deploy.export."""
    from helpers import synthetic_recipe

    from fakd_deploy.deploy.export import export_checkpoint
    from fakd_deploy.models import Checkpoint
    from fakd_deploy.recipe import parse_recipe

    raw = synthetic_recipe(
        deploy={"export": {"height": 32, "width": 48, "opset": 17, "batch": 2, "argmax": True}}
    )
    recipe = parse_recipe(raw)
    model = TinySegmenter(num_classes=6)
    checkpoint = Checkpoint(
        model=model.state_dict(),
        arch={"name": "fcn", "num_classes": 6, "encoder": "resnet10t", "channels": 8},
        recipe=recipe.model_dump(mode="json"),
    )
    from fakd_deploy.models import build_model

    zoo = build_model("fcn", 6, "resnet10t", channels=8)
    checkpoint.model, checkpoint.arch = zoo.state_dict(), zoo.config
    path = checkpoint.save(tmp_path / "best.pt")
    report = export_checkpoint(path, tmp_path / "out.onnx")
    meta = read_metadata(tmp_path / "out.onnx")
    assert (report["opset"], meta["batch"], meta["argmax"], meta["input_size"]) == (17, 2, True, [32, 48])
    report = export_checkpoint(
        path, tmp_path / "set.onnx", ["deploy.export.argmax=false", "deploy.export.batch=1"]
    )
    assert read_metadata(tmp_path / "set.onnx")["argmax"] is False and report["batch"] == 1
