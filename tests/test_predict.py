"""predict and `open_predictor`: label PNGs and overlays at the original image size, from any model file."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TinySegmenter
from PIL import Image

from fakd_deploy.artifacts import ModelInfo
from fakd_deploy.data.preprocess import Normalise
from fakd_deploy.deploy.export import export_onnx
from fakd_deploy.deploy.predict import palette, predict
from fakd_deploy.deploy.runtime import open_predictor
from fakd_deploy.errors import ArtifactError, BadInput

CLASSES = 5


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "m.onnx"
    export_onnx(
        TinySegmenter(CLASSES),
        path,
        48,
        64,
        parity_batches=[torch.randn(1, 3, 48, 64).numpy()],
        metadata={
            "mean": [0.4, 0.4, 0.4],
            "std": [0.2, 0.2, 0.2],
            "pixel_scale": 255.0,
            "class_names": [f"c{i}" for i in range(CLASSES)],
        },
    )
    return path


def test_open_predictor_reads_onnx_metadata(onnx_model: Path) -> None:
    predictor, info = open_predictor(onnx_model, threads=1)
    assert info.input_size == (48, 64) and info.num_classes == CLASSES
    assert info.normalise.mean == (0.4, 0.4, 0.4) and info.class_names[0] == "c0"
    out = predictor(np.random.default_rng(0).standard_normal((2, 3, 30, 50)).astype(np.float32))
    assert out.shape == (2, CLASSES, 30, 50)  # any size: resized in and back out


def test_checkpoint_and_its_onnx_export_predict_alike(tmp_path: Path) -> None:
    """One opening path: a checkpoint and its export give the same logits and the same feed."""
    from helpers import synthetic_recipe

    from fakd_deploy.models import Checkpoint, build_model
    from fakd_deploy.recipe import parse_recipe

    recipe = parse_recipe(
        synthetic_recipe(data={"name": "synthetic", "mean": [0.3, 0.4, 0.5], "std": [0.2, 0.25, 0.3]})
    )
    torch.manual_seed(0)
    model = build_model("fcn", 6, "resnet10t", channels=8).eval()
    checkpoint = Checkpoint(
        model=model.state_dict(),
        arch=model.config,
        recipe=recipe.model_dump(mode="json"),
        class_names=[str(i) for i in range(6)],
    ).save(tmp_path / "best.pt")
    export_onnx(
        checkpoint, tmp_path / "best.onnx", 32, 32, parity_batches=[np.zeros((1, 3, 32, 32), np.float32)]
    )
    images = np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype(np.float32)
    torch_predictor, torch_info = open_predictor(checkpoint, device="cpu")
    onnx_predictor, onnx_info = open_predictor(tmp_path / "best.onnx")
    np.testing.assert_allclose(torch_predictor(images), onnx_predictor(images), atol=1e-4, rtol=0)
    assert torch_info.normalise == onnx_info.normalise == Normalise((0.3, 0.4, 0.5), (0.2, 0.25, 0.3))
    assert torch_info.class_names == onnx_info.class_names


def test_predict_writes_pngs_of_the_original_size(onnx_model: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = []
    for name, (height, width) in {"wide": (40, 90), "tall": (70, 30)}.items():
        path = tmp_path / f"{name}.jpg"
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)
        images.append(path)
    written = predict(onnx_model, images, tmp_path / "out")
    assert [p.name for p in written] == [
        "wide.labels.png",
        "wide.overlay.png",
        "tall.labels.png",
        "tall.overlay.png",
    ]
    for source, labels_png, overlay_png in zip(images, written[::2], written[1::2], strict=True):
        size = Image.open(source).size
        labels = Image.open(labels_png)
        assert labels.size == size and labels.mode == "P"
        assert np.asarray(labels).max() < CLASSES
        overlay = Image.open(overlay_png)
        assert overlay.size == size and overlay.mode == "RGB"


def test_two_images_with_one_name_are_refused_before_anything_runs(onnx_model: Path, tmp_path: Path) -> None:
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / folder / "x.png")
    with pytest.raises(BadInput, match=r"would both write x\.labels\.png"):
        predict(onnx_model, [tmp_path / "a/x.png", tmp_path / "b/x.png"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("how", ["same folder", "linked --out", "hard link", "link to an input"])
def test_predict_never_overwrites_its_inputs(onnx_model: Path, tmp_path: Path, how: str) -> None:
    """Whatever the output names: an image called `x.labels.png` beside `x.png`, a --out that
    is a link to the images' folder, an old output that is a (hard) link to an input."""
    images = tmp_path / "images"
    images.mkdir()
    for name in ("x.png", "x.labels.png"):
        Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(images / name)
    before = (images / "x.labels.png").read_bytes()
    given = [images / "x.png", images / "x.labels.png"]
    out = tmp_path / "out"
    if how == "same folder":
        out = images
    elif how == "linked --out":
        out.symlink_to(images)
    else:
        out.mkdir()
        target = out / "x.overlay.png"  # a hand-made link where an output goes
        if how == "hard link":
            os.link(images / "x.labels.png", target)
        else:
            target.symlink_to(images / "x.labels.png")
    with pytest.raises(BadInput, match=r"would overwrite the input .*x\.labels\.png"):
        predict(onnx_model, given, out)
    assert (images / "x.labels.png").read_bytes() == before
    assert sorted(p.name for p in images.iterdir()) == ["x.labels.png", "x.png"]


def test_normalise_and_palette() -> None:
    info = ModelInfo(Normalise((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))
    x = info.normalise(np.full((2, 3, 3), 255, dtype=np.uint8))
    assert x.shape == (3, 2, 3) and np.allclose(x, 1.0)
    colours = palette()
    assert colours.shape == (256, 3) and len({tuple(c) for c in colours}) == 256


def test_unknown_missing_and_broken_model_files(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match=r"\.engine"):
        open_predictor(tmp_path / "model.tflite")
    with pytest.raises(ArtifactError, match="model not found"):
        open_predictor(tmp_path / "missing.onnx")
    (tmp_path / "dir.onnx").mkdir()
    with pytest.raises(ArtifactError, match="is a directory"):
        open_predictor(tmp_path / "dir.onnx")
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(ArtifactError, match="empty"):
        open_predictor(tmp_path / "empty.onnx")
    (tmp_path / "random.onnx").write_bytes(np.random.default_rng(0).bytes(4000))
    with pytest.raises(ArtifactError, match=r"random\.onnx"):
        open_predictor(tmp_path / "random.onnx")
