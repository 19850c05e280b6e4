"""Input modes (float, pixels, uint8) and label types: export parity, folding, feeding, refusals."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers import TinySegmenter
from onnx import TensorProto
from onnx import helper as oh
from torch import nn

from fakd_deploy.artifacts import Artifact
from fakd_deploy.data.preprocess import Normalise
from fakd_deploy.deploy.export import DeployModel, export_onnx
from fakd_deploy.deploy.inputs import model_input, pixels_from_normalised
from fakd_deploy.deploy.onnx_meta import read_metadata, write_metadata
from fakd_deploy.deploy.ort import OrtPredictor
from fakd_deploy.deploy.runtime import open_predictor
from fakd_deploy.errors import ArtifactError, ExportError

IMAGENET = Normalise((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
MODES = ("float", "pixels", "uint8")
SIZE = (32, 48)


def eight_bit_images(count: int, size: tuple[int, int] = SIZE, seed: int = 0) -> np.ndarray:
    """Normalised images made from whole 0-255 pixels, as every dataset here gives them."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (count, *size, 3), dtype=np.uint8)
    return np.stack([IMAGENET(p) for p in pixels])


def reference_logits(model: nn.Module, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return DeployModel(model.eval(), images.shape[-2:])(torch.from_numpy(images)).numpy()


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, bool, str], Path]:
    """The tiny model exported in every combination of input mode and argmax label type."""
    folder = tmp_path_factory.mktemp("modes")
    model = TinySegmenter()
    batches = [eight_bit_images(2)]
    paths = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for mode in MODES:
            for argmax, labels in ((False, "int32"), (True, "int32"), (True, "uint8")):
                path = folder / f"{mode}-{argmax}-{labels}.onnx"
                export_onnx(
                    model, path, *SIZE, argmax=argmax, input=mode, labels=labels, parity_batches=batches
                )
                paths[mode, argmax, labels] = path
    return paths


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("argmax", "labels"), [(False, "int32"), (True, "int32"), (True, "uint8")])
def test_every_mode_and_label_type_matches_the_float_model(
    exports: dict, mode: str, argmax: bool, labels: str
) -> None:
    """Fed what its metadata says, each export gives the float PyTorch model's logits or classes."""
    path = exports[mode, argmax, labels]
    graph = onnx.load(str(path))
    wanted_input = TensorProto.UINT8 if mode == "uint8" else TensorProto.FLOAT
    assert graph.graph.input[0].type.tensor_type.elem_type == wanted_input
    dims = [d.dim_value for d in graph.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ([1, *SIZE, 3] if mode == "uint8" else [1, 3, *SIZE])
    wanted_output = {"int32": TensorProto.INT32, "uint8": TensorProto.UINT8}[labels] if argmax else 1
    assert graph.graph.output[0].type.tensor_type.elem_type == wanted_output
    meta = read_metadata(path)
    assert meta["input"] == mode and meta["labels"] == (labels if argmax else None)

    images = eight_bit_images(3, seed=5)
    expected = reference_logits(TinySegmenter(), images)
    feed = model_input(images, mode, IMAGENET)
    if mode == "uint8":  # the same pixels, independently: NHWC bytes of the 8-bit images
        pixels = np.rint(
            (images * np.reshape(IMAGENET.std, (1, 3, 1, 1)) + np.reshape(IMAGENET.mean, (1, 3, 1, 1))) * 255
        )
        np.testing.assert_array_equal(feed, pixels.transpose(0, 2, 3, 1).astype(np.uint8))
    out = OrtPredictor(path)(feed)
    if argmax:
        assert (out == expected.argmax(1)).mean() > 0.999
    else:
        np.testing.assert_allclose(out, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("mode", MODES)
def test_open_predictor_feeds_any_mode_normalised_images(exports: dict, mode: str) -> None:
    """Callers keep passing normalised images of any size; the model gets what it takes."""
    predictor, info = open_predictor(exports[mode, False, "int32"])
    assert info.input == mode and info.input_size == SIZE
    images = eight_bit_images(2, (40, 30), seed=3)
    reference, _ = open_predictor(exports["float", False, "int32"])
    np.testing.assert_allclose(predictor(images), reference(images), atol=2e-3, rtol=0)
    same = eight_bit_images(2, seed=4)  # at the model's size: no resizing on either side
    np.testing.assert_allclose(predictor(same), reference(same), atol=1e-4, rtol=0)


def test_normalisation_is_folded_into_the_first_convolution(exports: dict) -> None:
    """No Mul or Div left; the first convolution pads, so exactly one Sub (the mean) stays before it."""
    for mode in ("pixels", "uint8"):
        graph = onnx.load(str(exports[mode, False, "int32"])).graph
        ops = [node.op_type for node in graph.node]
        assert "Div" not in ops and "Mul" not in ops
        assert ops.count("Sub") == 1
        sub = next(node for node in graph.node if node.op_type == "Sub")
        first_conv = next(node for node in graph.node if node.op_type == "Conv")
        assert first_conv.input[0] == sub.output[0]
        assert ops[: ops.index("Sub")] == (["Cast", "Transpose"] if mode == "uint8" else [])


def test_an_unpadded_first_convolution_takes_the_mean_into_its_bias(tmp_path: Path) -> None:
    model = TinySegmenter()
    model.features[0].padding = (0, 0)
    images = eight_bit_images(2)
    report = export_onnx(model, tmp_path / "p.onnx", *SIZE, input="pixels", parity_batches=[images])
    assert "no Sub or Mul left" in report["normalisation"]
    ops = [node.op_type for node in onnx.load(str(tmp_path / "p.onnx")).graph.node]
    assert ops[0] == "Conv" and "Sub" not in ops and "Mul" not in ops
    pixels = pixels_from_normalised(images, IMAGENET)
    np.testing.assert_allclose(
        OrtPredictor(tmp_path / "p.onnx")(pixels), reference_logits(model, images), atol=1e-4, rtol=0
    )


def test_export_refuses_nan_weights_naming_the_tensor(tmp_path: Path) -> None:
    model = TinySegmenter()
    with torch.no_grad():
        model.features[0].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ArtifactError, match=r"weight 'features\.0\.weight' has 1 non-finite"):
        export_onnx(model, tmp_path / "n.onnx", *SIZE, parity_batches=[eight_bit_images(1)])
    model = TinySegmenter()
    model.features[1].running_var[0] = -1.0
    with pytest.raises(
        ArtifactError, match=r"features\.1\.running_var' \(a BatchNorm variance\) has negative"
    ):
        export_onnx(model, tmp_path / "v.onnx", *SIZE, parity_batches=[eight_bit_images(1)])
    assert list(tmp_path.iterdir()) == []


def test_parity_fails_on_non_finite_logits_even_when_both_sides_agree(tmp_path: Path) -> None:
    """Finite weights that overflow: PyTorch and ONNX Runtime both give inf/NaN, which used to pass
    as a difference of 0 with 100 % agreement."""
    model = TinySegmenter()
    with torch.no_grad():
        for conv in (model.features[0], model.features[3], model.classifier):
            conv.weight.mul_(1e20)
    with pytest.raises(ExportError, match="non-finite logit"):
        export_onnx(model, tmp_path / "o.onnx", *SIZE, parity_batches=[eight_bit_images(1)])
    assert list(tmp_path.iterdir()) == []


def test_uint8_labels_need_argmax_and_fit_256_classes() -> None:
    from helpers import synthetic_recipe

    from fakd_deploy.errors import RecipeError
    from fakd_deploy.recipe import parse_recipe

    with pytest.raises(RecipeError, match="needs argmax: true"):
        parse_recipe(synthetic_recipe(deploy={"export": {"labels": "uint8"}}))
    with pytest.raises(RecipeError, match=r"deploy\.export\.input"):
        parse_recipe(synthetic_recipe(deploy={"export": {"input": "bgr"}}))


def _graph(elem_type: int, dims: list, metadata: dict | None, path: Path) -> Path:
    weight = onnx.numpy_helper.from_array(np.ones((2, 3, 1, 1), np.float32), "w")
    node = oh.make_node("Identity", ["images"], ["out"])
    graph = oh.make_graph(
        [node],
        "g",
        [oh.make_tensor_value_info("images", elem_type, dims)],
        [oh.make_tensor_value_info("out", elem_type, dims)],
        [weight],
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)])
    if metadata:
        write_metadata(model, metadata)
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize(
    ("elem_type", "dims", "metadata", "message"),
    [
        (
            TensorProto.UINT8,
            [1, 8, 8, 3],
            None,
            r"'images' has element type uint8, but metadata 'input' is 'float'",
        ),
        (
            TensorProto.FLOAT,
            [1, 3, 8, 8],
            {"input": "uint8"},
            r"element type float, but metadata 'input' is 'uint8'",
        ),
        (TensorProto.FLOAT, [1, 64], None, r"'images' has rank 2, but metadata 'input' is 'float'"),
        (TensorProto.UINT8, [1, 3, 8, 8], {"input": "uint8"}, r"has 8 channels"),
        (
            TensorProto.FLOAT,
            [1, 3, 8, 8],
            {"input": "bgr"},
            r"metadata 'input' must be one of float, pixels, uint8",
        ),
    ],
)
def test_a_graph_input_must_match_its_declared_mode(
    tmp_path: Path, elem_type: int, dims: list, metadata: dict | None, message: str
) -> None:
    path = _graph(elem_type, dims, metadata, tmp_path / "m.onnx")
    with pytest.raises(ArtifactError, match=message) as caught:
        Artifact.open(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_int8_calibration_feeds_a_uint8_model_what_it_takes(exports: dict, tmp_path: Path) -> None:
    """Calibration images arrive normalised; a uint8 model is calibrated on its own bytes."""
    from fakd_deploy.deploy.build import build

    source = tmp_path / "u.onnx"
    source.write_bytes(exports["uint8", False, "int32"].read_bytes())
    calibration = [eight_bit_images(1, seed=s) for s in range(6)]
    int8 = build(source, "ort-cpu-int8", calib_images=calibration)
    images = eight_bit_images(2, seed=9)
    expected = reference_logits(TinySegmenter(), images).argmax(1)
    predictor, info = open_predictor(int8)
    assert info.input == "uint8"
    assert (predictor(images).argmax(1) == expected).mean() > 0.9


def test_fp16_conversion_keeps_uint8_input_and_labels(exports: dict, tmp_path: Path) -> None:
    """The FP16 model of a uint8-in, uint8-labels export still takes bytes and gives the classes."""
    from fakd_deploy.deploy.build import write_fp16

    half = write_fp16(exports["uint8", True, "uint8"], tmp_path / "u.fp16.onnx")
    graph = onnx.load(str(half)).graph
    assert graph.input[0].type.tensor_type.elem_type == TensorProto.UINT8
    assert graph.output[0].type.tensor_type.elem_type == TensorProto.UINT8
    images = eight_bit_images(2, seed=6)
    labels = OrtPredictor(half)(model_input(images, "uint8", IMAGENET))
    assert (labels == reference_logits(TinySegmenter(), images).argmax(1)).mean() > 0.99
