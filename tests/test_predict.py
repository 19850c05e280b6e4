"""predict: label PNGs and overlays at the original image size, from any model file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_export import CLASSES, TinySegmenter

from fakd_deploy.deploy.export import export_onnx
from fakd_deploy.deploy.predict import ModelInfo, palette, predict, predictor_for


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "m.onnx"
    export_onnx(TinySegmenter(), path, 48, 64, parity_batches=[torch.randn(1, 3, 48, 64)],
                metadata={"mean": [0.4, 0.4, 0.4], "std": [0.2, 0.2, 0.2], "pixel_scale": 255.0,
                          "class_names": [f"c{i}" for i in range(CLASSES)]})
    return path


def test_predictor_for_onnx_reads_metadata(onnx_model: Path) -> None:
    predictor, info = predictor_for(onnx_model, device="cpu", threads=1)
    assert info.input_size == (48, 64) and info.num_classes == CLASSES
    assert info.mean == (0.4, 0.4, 0.4) and info.class_names[0] == "c0"
    out = predictor(torch.randn(2, 3, 30, 50))  # any size: resized in and back out
    assert out.shape == (2, CLASSES, 30, 50)


def test_predict_writes_pngs_of_the_original_size(onnx_model: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = []
    for name, (height, width) in {"wide": (40, 90), "tall": (70, 30)}.items():
        path = tmp_path / f"{name}.jpg"
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)
        images.append(path)
    written = predict(onnx_model, images, tmp_path / "out", device="cpu")
    assert [p.name for p in written] == ["wide.labels.png", "wide.overlay.png",
                                         "tall.labels.png", "tall.overlay.png"]
    for source, labels_png, overlay_png in zip(images, written[::2], written[1::2], strict=True):
        size = Image.open(source).size
        labels = Image.open(labels_png)
        assert labels.size == size and labels.mode == "P"
        assert np.asarray(labels).max() < CLASSES
        overlay = Image.open(overlay_png)
        assert overlay.size == size and overlay.mode == "RGB"


def test_normalise_and_palette() -> None:
    info = ModelInfo(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), pixel_scale=255.0)
    x = info.normalise(np.full((2, 3, 3), 255, dtype=np.uint8))
    assert x.shape == (1, 3, 2, 3) and torch.allclose(x, torch.ones_like(x))
    colours = palette()
    assert colours.shape == (256, 3) and len({tuple(c) for c in colours}) == 256


def test_unknown_model_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\.engine"):
        predictor_for(tmp_path / "model.tflite")
    with pytest.raises(FileNotFoundError):
        predictor_for(tmp_path / "missing.onnx")
