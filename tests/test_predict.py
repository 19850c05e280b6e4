"""predict and `open_predictor`: label PNGs in the dataset's colours, overlays with a legend,
outputs named by model and backend, folders as input, and never an input overwritten."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TinySegmenter
from PIL import Image
from typer.testing import CliRunner

from fakd_deploy.artifacts import ModelInfo
from fakd_deploy.cli import app
from fakd_deploy.data.preprocess import Normalise
from fakd_deploy.deploy.export import export_onnx
from fakd_deploy.deploy.predict import output_names, predict
from fakd_deploy.deploy.runtime import open_predictor
from fakd_deploy.errors import ArtifactError, BadInput
from fakd_deploy.palette import CAMVID, CITYSCAPES, TAB10, palette_for, voc_colours

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
            "recipe": "name: m\ndata: {name: cityscapes}\nstudent: {}\n",
        },
    )
    return path


def _images(folder: Path, sizes: dict[str, tuple[int, int]], suffix: str = ".jpg") -> list[Path]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, (height, width) in sizes.items():
        path = folder / f"{name}{suffix}"
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


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


def test_predict_writes_labels_in_the_datasets_colours_and_overlays_with_a_legend(
    onnx_model: Path, tmp_path: Path
) -> None:
    images = _images(tmp_path, {"wide": (40, 90), "tall": (70, 30)})
    written = predict(onnx_model, images, tmp_path / "out")
    assert [p.name for p in written] == [
        "wide.m.ort-cpu-fp32.labels.png",
        "wide.m.ort-cpu-fp32.overlay.png",
        "tall.m.ort-cpu-fp32.labels.png",
        "tall.m.ort-cpu-fp32.overlay.png",
    ]
    for source, labels_png, overlay_png in zip(images, written[::2], written[1::2], strict=True):
        size = Image.open(source).size
        labels = Image.open(labels_png)
        assert labels.size == size and labels.mode == "P"
        ids = np.asarray(labels)
        assert ids.max() < CLASSES
        colours = np.asarray(labels.getpalette()[: 3 * CLASSES]).reshape(-1, 3)
        np.testing.assert_array_equal(colours, np.asarray(CITYSCAPES[:CLASSES]))  # the model's dataset
        overlay = np.asarray(Image.open(overlay_png))
        assert overlay.shape[0] >= size[1] and overlay.shape[1] > size[0]  # the legend to the right
        legend = overlay[:, size[0] :]
        for class_id in np.unique(ids):  # every class present has its swatch in the legend
            assert (legend == CITYSCAPES[class_id]).all(-1).any(), class_id
        for class_id in set(range(CLASSES)) - set(np.unique(ids).tolist()):
            assert not (legend == CITYSCAPES[class_id]).all(-1).any(), class_id


def test_a_folder_of_images_and_two_backends_side_by_side(onnx_model: Path, tmp_path: Path) -> None:
    """A folder gives its image files (sorted, nothing else); a second backend writes beside
    the first instead of over it."""
    from fakd_deploy.deploy.build import build

    folder = tmp_path / "images"
    _images(folder, {"b": (20, 20), "a": (24, 16)}, ".png")
    (folder / "notes.txt").write_text("not an image")
    (folder / "sub.png").mkdir()
    build(onnx_model, "ort-cpu-fp32")
    first = predict(onnx_model, [folder], tmp_path / "out", overlay=False)
    assert [p.name for p in first] == ["a.m.ort-cpu-fp32.labels.png", "b.m.ort-cpu-fp32.labels.png"]
    int8 = build(onnx_model, "ort-cpu-int8", calib_images=[np.zeros((1, 3, 48, 64), np.float32)])
    second = predict(int8, [folder], tmp_path / "out", overlay=False)
    assert [p.name for p in second] == ["a.m.ort-cpu-int8.labels.png", "b.m.ort-cpu-int8.labels.png"]
    assert all(p.exists() for p in first + second)


def test_predict_never_overwrites_its_own_inputs(onnx_model: Path, tmp_path: Path) -> None:
    """Images named like the outputs of other images, predicted into their own folder: refused
    before anything runs, every input left as it was."""
    folder = tmp_path / "images"
    inputs = _images(folder, {"a": (16, 16)}, ".png")
    for name in ("a.labels", "a.overlay", "a.m.ort-cpu-fp32.labels", "a.m.ort-cpu-fp32.overlay"):
        inputs += _images(folder, {name: (16, 16)}, ".png")
    before = {path: path.read_bytes() for path in inputs}
    with pytest.raises(BadInput, match=r"would overwrite the input .*a\.m\.ort-cpu-fp32\.labels\.png"):
        predict(onnx_model, inputs, folder)
    with pytest.raises(BadInput, match="would overwrite the input"):
        predict(onnx_model, [folder], folder)  # the folder form: same names, same refusal
    assert {path: path.read_bytes() for path in inputs} == before
    hard = tmp_path / "elsewhere.png"
    hard.hardlink_to(inputs[0])  # another name for the same file
    out = tmp_path / "out"
    out.mkdir()
    (out / "elsewhere.m.ort-cpu-fp32.labels.png").hardlink_to(inputs[0])
    with pytest.raises(BadInput, match="would overwrite the input"):
        predict(onnx_model, [hard], out)
    assert inputs[0].read_bytes() == before[inputs[0]]


def test_two_images_with_one_name_are_refused_before_anything_runs(onnx_model: Path, tmp_path: Path) -> None:
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / folder / "x.png")
    with pytest.raises(BadInput, match=r"would both write x\.m\.ort-cpu-fp32\.labels\.png"):
        predict(onnx_model, [tmp_path / "a/x.png", tmp_path / "b/x.png"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_normalise() -> None:
    info = ModelInfo(Normalise((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))
    x = info.normalise(np.full((2, 3, 3), 255, dtype=np.uint8))
    assert x.shape == (3, 2, 3) and np.allclose(x, 1.0)


def test_each_dataset_has_its_own_palette() -> None:
    """Known colours of each dataset (CamVid's road, Cityscapes' car, VOC's person, ADE20K's
    wall), every palette distinct within its classes, and ids beyond it in VOC's colours."""
    assert tuple(palette_for("camvid", 11)[3]) == (128, 64, 128) == CAMVID[3]  # Road
    assert tuple(palette_for("cityscapes", 19)[13]) == (0, 0, 142)  # car
    assert tuple(palette_for("voc", 21)[15]) == (192, 128, 128)  # person
    assert tuple(palette_for("ade20k", 150)[0]) == (120, 120, 120)  # wall
    assert tuple(palette_for("synthetic", 8)[0]) == TAB10[0]
    for name, count in (("camvid", 11), ("cityscapes", 19), ("voc", 21), ("synthetic", 10)):
        assert len({tuple(c) for c in palette_for(name, count)}) == count, name
    ade = [tuple(c) for c in palette_for("ade20k", 150)]
    assert len(set(ade)) == 149 and ade[6] == ade[48] == (140, 140, 140)  # as published: road, skyscraper
    np.testing.assert_array_equal(palette_for("camvid", 256)[11:], voc_colours(256)[11:])
    np.testing.assert_array_equal(palette_for("folder", 256), voc_colours(256))
    colours = voc_colours()
    assert colours.shape == (256, 3) and len({tuple(c) for c in colours}) == 256
    assert tuple(colours[1]) == (128, 0, 0) and tuple(colours[2]) == (0, 128, 0)  # the devkit's map


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


@pytest.fixture
def student(tmp_path: Path) -> Path:
    """A small zoo checkpoint with the synthetic recipe it is evaluated on."""
    from helpers import synthetic_recipe

    from fakd_deploy.models import Checkpoint, build_model
    from fakd_deploy.recipe import parse_recipe

    torch.manual_seed(0)
    model = build_model("fcn", 6, "resnet10t", channels=8)
    return Checkpoint(
        model=model.state_dict(),
        arch=model.config,
        recipe=parse_recipe(synthetic_recipe()).model_dump(mode="json"),
        variant="kd",
        seed=0,
    ).save(tmp_path / "kd.pt")


def resaved(path: Path, **fields: object) -> Path:
    """The checkpoint at `path` with some stored fields replaced, as a hand-made file holds them."""
    out = path.with_name("crafted.pt")
    torch.save({**torch.load(path, weights_only=True), **fields}, out)
    return out


def refused_in_one_line(args: list[object], *names: str) -> None:
    result = CliRunner().invoke(app, [str(arg) for arg in args])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    for name in names:
        assert name in result.output, (name, result.output)


@pytest.mark.parametrize(
    "fields, key",
    [
        ({"variant": "x/../../victim/PWNED"}, "'variant'"),
        ({"variant": None, "role": "x/../../victim/PWNED"}, "'role'"),
        ({"seed": "0/../../victim/PWNED"}, "'seed'"),
        ({"class_names": 5}, "'class_names'"),
    ],
)
def test_a_crafted_checkpoint_cannot_steer_predict_or_crash_it(
    student: Path, tmp_path: Path, fields: dict, key: str
) -> None:
    """Its names went into the output file names unchecked: `..` led out of --out."""
    (image,) = _images(tmp_path / "images", {"rgb": (32, 32)}, ".png")
    (tmp_path / "victim").mkdir()
    refused_in_one_line(
        ["predict", resaved(student, **fields), image, "--out", tmp_path / "out"], "crafted.pt", key
    )
    assert list((tmp_path / "victim").iterdir()) == [] and not (tmp_path / "out").exists()


def test_output_names_never_lead_out_of_the_folder(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="outside"):
        output_names([tmp_path / "a.png"], tmp_path / "out", "x/../../victim")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.m.labels.png").symlink_to(tmp_path / "elsewhere.png")
    with pytest.raises(BadInput, match="outside"):
        output_names([tmp_path / "a.png"], tmp_path / "out", "m")


@pytest.mark.parametrize("damage", ["nan", "int64"])
def test_evaluate_and_predict_refuse_weights_that_predict_nonsense(
    student: Path, tmp_path: Path, damage: str
) -> None:
    """As export does: before, both ran and exited 0 with NaN logits or truncated weights."""
    state = torch.load(student, weights_only=True)["model"]
    damaged = resaved(
        student,
        model={
            key: (value * float("nan") if damage == "nan" else value.to(torch.int64))
            if value.is_floating_point()
            else value
            for key, value in state.items()
        },
    )
    (image,) = _images(tmp_path / "images", {"rgb": (32, 32)}, ".png")
    refused_in_one_line(["evaluate", damaged, "--max-images", "2"], "crafted.pt: weight '")
    refused_in_one_line(["predict", damaged, image, "--out", tmp_path / "out"], "crafted.pt: weight '")
    assert not (tmp_path / "out").exists()
