"""`package`: the bundle's files, Triton's schema, nvinfer's keys and formula, infer.py against predict."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import types
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from conftest import TINY
from google.protobuf import text_format
from helpers import TinySegmenter
from PIL import Image

from fakd_deploy.artifacts import Artifact
from fakd_deploy.data.splits import ValBatches
from fakd_deploy.deploy.build import build
from fakd_deploy.deploy.export import export_onnx
from fakd_deploy.deploy.ort import OrtPredictor
from fakd_deploy.deploy.package import package
from fakd_deploy.deploy.predict import predict
from fakd_deploy.deploy.runtime import open_predictor
from fakd_deploy.errors import BadInput
from fakd_deploy.recipe import load_recipe
from fakd_deploy.utils import file_sha256

CLASSES = 6  # tests/recipes/tiny.yaml
NAMES = [f"class {i}" for i in range(CLASSES)]

# Every key gst-nvinfer reads from its [property] group: gstnvinfer_property_parser.h of DeepStream
# (https://docs.nvidia.com/metropolis/deepstream/7.0/sdk-api/gstnvinfer__property__parser_8h_source.html),
# whose CONFIG_GROUP_INFER_* names the Gst-nvinfer documentation's property table lists
# (https://docs.nvidia.com/metropolis/deepstream/dev-guide/text/DS_plugin_gst-nvinfer.html).
NVINFER_KEYS = {
    "gie-unique-id", "process-mode", "interval", "labelfile-path", "gpu-id", "secondary-reinfer-interval",
    "output-tensor-meta", "enable-dla", "use-dla-core", "batch-size", "tensor-meta-pool-size",
    "network-mode", "model-engine-file", "int8-calib-file", "workspace-size", "output-blob-names",
    "is-classifier", "network-type", "force-implicit-batch-dim", "infer-dims", "output-io-formats",
    "layer-device-precision", "model-color-format", "net-scale-factor", "offsets", "mean-file",
    "maintain-aspect-ratio", "symmetric-padding", "scaling-filter", "scaling-compute-hw",
    "network-input-order", "input-tensor-from-meta", "custom-lib-path", "parse-bbox-func-name",
    "parse-bbox-instance-mask-func-name", "engine-create-func-name", "parse-classifier-func-name",
    "custom-network-config", "model-file", "proto-file", "uff-file", "uff-input-order", "input-dims",
    "uff-input-dims", "uff-input-blob-name", "tlt-encoded-model", "tlt-model-key", "onnx-file",
    "num-detected-classes", "enable-dbscan", "cluster-mode", "classifier-type", "classifier-threshold",
    "classifier-async-mode", "segmentation-threshold", "segmentation-output-order", "output-instance-mask",
    "input-object-min-width", "input-object-min-height", "input-object-max-width",
    "input-object-max-height", "operate-on-gie-id", "operate-on-class-ids", "filter-out-class-ids",
}  # fmt: skip
# What the issue asks every segmentation config to carry.
REQUIRED = {
    "network-type", "num-detected-classes", "segmentation-threshold", "onnx-file", "model-engine-file",
    "network-mode", "infer-dims", "model-color-format", "net-scale-factor", "offsets", "labelfile-path",
    "batch-size", "output-blob-names",
}  # fmt: skip


def make_run(folder: Path, mode: str, argmax: bool = False, metadata: dict | None = None) -> Path:
    """A run folder with the tiny recipe, an export of the tiny model and no choice yet."""
    recipe = load_recipe(TINY)
    (folder / "deploy").mkdir(parents=True)
    (folder / "recipe.yaml").write_text(recipe.to_yaml())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(
            TinySegmenter(CLASSES),
            folder / "deploy" / "tiny.onnx",
            32,
            32,
            argmax=argmax,
            input=mode,
            metadata={"class_names": NAMES, **(metadata or {})},
            parity_batches=ValBatches(recipe.data, max_images=4),
        )
    return folder


def choose(run: Path, file: str, backend: str) -> None:
    sha = file_sha256(run / file)
    (run / "deploy" / "choice.json").write_text(json.dumps({"file": file, "backend": backend, "sha256": sha}))


def sample_images(folder: Path) -> list[Path]:
    """Two images of other sizes than the model's, so both resize paths are taken."""
    rng = np.random.default_rng(7)
    folder.mkdir()
    paths = []
    for name, size in (("wide", (24, 44)), ("tall", (41, 29))):
        path = folder / f"{name}.png"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A bundle per input mode of the run's FP32 export, chosen through deploy/choice.json."""
    found = {}
    for mode in ("float", "pixels", "uint8"):
        run = make_run(tmp_path_factory.mktemp(f"run-{mode}"), mode)
        choose(run, "deploy/tiny.onnx", "ort-cpu-fp32")
        found[mode] = Path(package(run)["out"])
    return found


@pytest.mark.parametrize("mode", ["float", "pixels", "uint8"])
def test_bundle_holds_every_file_and_nothing_else(bundles: dict[str, Path], mode: str) -> None:
    bundle = bundles[mode]
    files = sorted(str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file())
    assert files == sorted(
        [
            "README.md",
            "bundle.json",
            "deepstream/config_infer_tiny.txt",
            "deepstream/tiny.deepstream.onnx",
            "infer.py",
            "labels.txt",
            "palette.json",
            "preprocess.json",
            "tiny.onnx",
            "triton/tiny/1/model.onnx",
            "triton/tiny/config.pbtxt",
        ]
    )
    assert not list(bundle.parent.glob(".bundle*"))  # no staging folder left
    assert (bundle / "labels.txt").read_text().splitlines() == NAMES
    spec = json.loads((bundle / "preprocess.json").read_text())
    assert spec["input"] == mode and spec["input_size"] == [32, 32] and spec["model"] == "tiny.onnx"
    assert spec["layout"] == ("NHWC" if mode == "uint8" else "NCHW")
    manifest = json.loads((bundle / "bundle.json").read_text())
    assert manifest["chosen_by"].endswith("choice.json")
    assert all(file_sha256(bundle / path) == sha for path, sha in manifest["files"].items())


@pytest.mark.parametrize("mode", ["float", "pixels", "uint8"])
def test_triton_config_parses_against_tritons_schema_and_matches_the_model(
    bundles: dict[str, Path], mode: str
) -> None:
    from tritonclient.grpc import model_config_pb2

    bundle = bundles[mode]
    config = text_format.Parse(
        (bundle / "triton/tiny/config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    graph = onnx.load(str(bundle / "triton/tiny/1/model.onnx")).graph
    types = {1: model_config_pb2.TYPE_FP32, 2: model_config_pb2.TYPE_UINT8, 6: model_config_pb2.TYPE_INT32}
    assert config.name == "tiny" and config.backend == "onnxruntime"
    assert config.max_batch_size == 0  # static batch 1: the batch is part of dims
    for declared, value in ((config.input[0], graph.input[0]), (config.output[0], graph.output[0])):
        assert declared.name == value.name
        assert declared.data_type == types[value.type.tensor_type.elem_type]
        assert list(declared.dims) == [d.dim_value for d in value.type.tensor_type.shape.dim]
    assert len(config.input) == len(config.output) == 1
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert not config.optimization.execution_accelerators.gpu_execution_accelerator
    assert (bundle / "triton/tiny/1/model.onnx").read_bytes() == (bundle / "tiny.onnx").read_bytes()


def test_triton_config_for_a_dynamic_batch_on_the_tensorrt_provider(tmp_path: Path) -> None:
    from tritonclient.grpc import model_config_pb2

    from fakd_deploy.deploy.backends import resolve_backend
    from fakd_deploy.deploy.triton import MAX_BATCH, Tensor, config_pbtxt

    text = config_pbtxt(
        "m",
        resolve_backend("ort-trt-int8"),
        Tensor("images", "uint8", (-1, 64, 96, 3)),
        Tensor("labels", "int32", (-1, 64, 96)),
    )
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert config.max_batch_size == MAX_BATCH and config.HasField("dynamic_batching")
    assert list(config.input[0].dims) == [64, 96, 3] and list(config.output[0].dims) == [64, 96]
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt" and accelerator.parameters["precision_mode"] == "INT8"
    engine = config_pbtxt(
        "m",
        resolve_backend("trt-fp16"),
        Tensor("images", "float32", (1, 3, 8, 8)),
        Tensor("o", "float32", (1, 2, 8, 8)),
    )
    parsed = text_format.Parse(engine, model_config_pb2.ModelConfig())
    assert (
        parsed.backend == "tensorrt"
        and not parsed.optimization.execution_accelerators.gpu_execution_accelerator
    )


def read_nvinfer(path: Path) -> dict[str, str]:
    lines = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
    assert lines[0] == "[property]"
    return dict(line.split("=", 1) for line in lines[1:])


@pytest.mark.parametrize("mode", ["float", "pixels", "uint8"])
def test_deepstream_config_uses_only_nvinfer_keys_and_says_what_the_model_is(
    bundles: dict[str, Path], mode: str
) -> None:
    bundle = bundles[mode]
    keys = read_nvinfer(bundle / "deepstream/config_infer_tiny.txt")
    assert set(keys) <= NVINFER_KEYS and set(keys) >= REQUIRED
    model = onnx.load(str(bundle / "deepstream" / keys["onnx-file"])).graph
    dims = [d.dim_value for d in model.input[0].type.tensor_type.shape.dim]
    assert model.input[0].type.tensor_type.elem_type == 1 and dims[1] == 3  # float NCHW, as nvinfer binds it
    assert keys["infer-dims"] == f"3;{dims[2]};{dims[3]}" and keys["batch-size"] == str(dims[0])
    assert keys["output-blob-names"] == model.output[0].name == "probabilities"
    assert keys["num-detected-classes"] == str(CLASSES) and keys["network-type"] == "2"
    assert keys["network-mode"] == "0" and keys["model-color-format"] == "0"  # FP32, RGB
    assert (bundle / "deepstream" / keys["labelfile-path"]).resolve() == (bundle / "labels.txt").resolve()
    # ImageNet's per-channel std cannot be one net-scale-factor: every mode ships a pixels model
    assert keys["net-scale-factor"] == "1.0" and keys["offsets"] == "0.0;0.0;0.0"


def nvinfer_then_model(config: Path, pixels: np.ndarray) -> np.ndarray:
    """What nvinfer computes: y = net-scale-factor * (x - offsets[c]) on RGB pixels, then the model."""
    keys = read_nvinfer(config)
    scale = float(keys["net-scale-factor"])
    offsets = np.array([float(v) for v in keys["offsets"].split(";")], np.float32).reshape(1, 3, 1, 1)
    return OrtPredictor(config.parent / keys["onnx-file"])((scale * (pixels - offsets)).astype(np.float32))


def float_model_probabilities(onnx_path: Path, images: np.ndarray) -> np.ndarray:
    predictor, _ = open_predictor(onnx_path)
    logits = predictor(images)
    shifted = np.exp(logits - logits.max(1, keepdims=True))
    return shifted / shifted.sum(1, keepdims=True)


def test_nvinfer_formula_then_the_deepstream_model_equals_the_float_model(bundles: dict[str, Path]) -> None:
    """On the synthetic validation images (CamVid: the slow test below)."""
    recipe = load_recipe(TINY)
    images = np.concatenate([b for b, _ in ValBatches(recipe.data, max_images=8)])
    mean = np.reshape((0.485, 0.456, 0.406), (1, 3, 1, 1))
    std = np.reshape((0.229, 0.224, 0.225), (1, 3, 1, 1))
    pixels = np.rint((images * std + mean) * 255).astype(np.float32)
    for mode, bundle in bundles.items():
        want = float_model_probabilities(bundle / "tiny.onnx", images)
        got = nvinfer_then_model(bundle / "deepstream/config_infer_tiny.txt", pixels)
        assert (got.argmax(1) == want.argmax(1)).all(), mode
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_uniform_std_is_expressed_by_net_scale_factor_and_offsets(tmp_path: Path) -> None:
    """A float model whose std is one number needs no change: nvinfer normalises it."""
    meta = {"mean": [0.5, 0.4, 0.3], "std": [0.25, 0.25, 0.25]}
    run = make_run(tmp_path / "run", "float", argmax=True, metadata=meta)
    choose(run, "deploy/tiny.onnx", "ort-cpu-fp32")
    bundle = Path(package(run, tmp_path / "b")["out"])
    keys = read_nvinfer(bundle / "deepstream/config_infer_tiny.txt")
    assert float(keys["net-scale-factor"]) == pytest.approx(1 / (255 * 0.25))
    assert [float(v) for v in keys["offsets"].split(";")] == pytest.approx([127.5, 102.0, 76.5])
    ds = onnx.load(str(bundle / "deepstream" / keys["onnx-file"])).graph
    assert [n.op_type for n in ds.node].count("ArgMax") == 0  # nvinfer reads probabilities, not labels
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (2, 3, 32, 32)).astype(np.float32)
    images = (pixels / 255 - np.reshape(meta["mean"], (1, 3, 1, 1))) / 0.25
    labels, _ = open_predictor(bundle / "tiny.onnx")
    got = nvinfer_then_model(bundle / "deepstream/config_infer_tiny.txt", pixels)
    assert (got.argmax(1) == labels(images.astype(np.float32))).mean() > 0.999


def load_infer(bundle: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(f"infer_{bundle.name}", bundle / "infer.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("mode", ["float", "pixels", "uint8"])
def test_bundle_infer_reproduces_predict_pixel_for_pixel(
    bundles: dict[str, Path], mode: str, tmp_path: Path
) -> None:
    """`python infer.py FOLDER --out DIR` from the bundle folder, in a clean interpreter that cannot
    import fakd_deploy, against `fakd-deploy predict` on the same model."""
    bundle = bundles[mode]
    images = sample_images(tmp_path / "images")
    result = subprocess.run(
        [sys.executable, "-I", "infer.py", str(tmp_path / "images"), "--out", str(tmp_path / "infer")],
        cwd=bundle,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    predict(bundle / "tiny.onnx", images, tmp_path / "predict")
    for image in images:
        for kind in ("labels", "overlay"):
            ours = np.asarray(Image.open(tmp_path / "infer" / f"{image.stem}.{kind}.png").convert("RGB"))
            (named,) = (tmp_path / "predict").glob(f"{image.stem}.tiny.*.{kind}.png")
            theirs = np.asarray(Image.open(named).convert("RGB"))
            # predict's overlay carries a legend to the right of the image (white below a short one)
            np.testing.assert_array_equal(ours, theirs[: ours.shape[0], : ours.shape[1]])
        labels = np.asarray(Image.open(tmp_path / "infer" / f"{image.stem}.labels.png"))
        assert labels.shape == Image.open(image).size[::-1] and len(np.unique(labels)) > 1


def test_bundle_infer_imports_nothing_of_fakd_deploy(bundles: dict[str, Path]) -> None:
    import ast

    tree = ast.parse((bundles["float"] / "infer.py").read_text())
    modules = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    modules |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    top = {m.split(".")[0] for m in modules}
    allowed = {"__future__", "argparse", "json", "os", "re", "stat", "sys", "warnings", "collections"}
    allowed |= {"pathlib", "signal", "typing"}
    assert top <= allowed | {"numpy", "PIL", "onnxruntime", "tensorrt", "cuda"}


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares a size and holds no pixels: enough for a reader to judge the size."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def crafted_image(folder: Path, case: str) -> Path:
    """One image of each kind `predict` reads or refuses (fakd_deploy.data.base.open_image)."""
    rng = np.random.default_rng(3)
    colours = rng.integers(0, 256, (40, 40, 4), dtype=np.uint8)
    path = folder / {"cmyk": "cmyk.jpg", "stack": "stack.tif", "noise": "noise.jpg"}.get(case, f"{case}.png")
    if case == "sixteen_bit":
        Image.fromarray(np.full((32, 32), 40000, np.uint16)).save(path)
    elif case == "cmyk":
        Image.fromarray(colours, "CMYK").save(path)
    elif case in ("transparent", "opaque_rgba"):
        colours[..., 3] = 255
        colours[5, 7, 3] = 254 if case == "transparent" else 255
        Image.fromarray(colours, "RGBA").save(path)
    elif case == "palette_transparency":
        image = Image.fromarray(colours[..., 0] % 4, "L").convert("P")
        image.save(path, transparency=2)
    elif case == "grey":
        Image.fromarray(colours[..., 0], "L").save(path)
    elif case == "truncated":
        Image.fromarray(colours[..., :3]).save(path)
        path.write_bytes(path.read_bytes()[:-600])
    elif case == "noise":
        path.write_bytes(rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())
    elif case == "bomb":
        path.write_bytes(png_header(20000, 20000))
    elif case == "warned":  # PIL only warns between 89.5 and 179 million pixels
        path.write_bytes(png_header(10000, 10000))
    elif case == "stack":
        frames = [Image.fromarray(colours[..., :3]), Image.fromarray(colours[..., 1:])]
        frames[0].save(path, save_all=True, append_images=frames[1:])
    elif case == "fifo":
        os.mkfifo(path)
    return path


REFUSED = ["sixteen_bit", "cmyk", "transparent", "palette_transparency", "truncated", "noise", "bomb"]
REFUSED += ["warned", "stack", "fifo"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", [*REFUSED, "grey", "opaque_rgba"])
def test_bundle_infer_reads_and_refuses_images_as_predict_does(
    bundles: dict[str, Path], case: str, tmp_path: Path
) -> None:
    """infer.py cannot import fakd_deploy, so it carries a copy of predict's image rules; both
    must give the same answer for each crafted image: masks, or one line naming the image
    with exit 2 (before: masks of a 16-bit, CMYK or transparent image, a traceback for a
    truncated file or a bomb, a hang on a FIFO)."""
    (tmp_path / "images").mkdir()
    image = crafted_image(tmp_path / "images", case)
    bundle = bundles["float"]
    result = subprocess.run(
        [sys.executable, "-I", "infer.py", str(image), "--out", str(tmp_path / "infer")],
        cwd=bundle,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if case in REFUSED:
        with pytest.raises(BadInput) as refused:
            predict(bundle / "tiny.onnx", [image], tmp_path / "predict")
        assert result.returncode == 2, result.stderr
        assert result.stderr == f"error: {refused.value}\n" and str(image) in result.stderr
        assert not list((tmp_path / "infer").glob("*")) and not list((tmp_path / "predict").glob("*"))
    else:
        assert result.returncode == 0, result.stderr
        predict(bundle / "tiny.onnx", [image], tmp_path / "predict")
        ours = np.asarray(Image.open(tmp_path / "infer" / f"{case}.labels.png"))
        (theirs,) = (tmp_path / "predict").glob(f"{case}.tiny.*.labels.png")
        np.testing.assert_array_equal(ours, np.asarray(Image.open(theirs)))


def test_bundle_infer_reads_the_suffixes_and_limit_of_fakd_deploy(bundles: dict[str, Path]) -> None:
    from fakd_deploy.data.base import ALPHA, COLOUR
    from fakd_deploy.data.datasets import IMAGE_SUFFIXES
    from fakd_deploy.inputs import MAX_IMAGE_PIXELS

    infer = load_infer(bundles["float"])
    assert infer.IMAGE_SUFFIXES == IMAGE_SUFFIXES and infer.MAX_IMAGE_PIXELS == MAX_IMAGE_PIXELS
    assert infer.COLOUR == COLOUR and infer.ALPHA == ALPHA


def test_bundle_infer_never_overwrites_its_inputs(bundles: dict[str, Path], tmp_path: Path) -> None:
    """`--out` the images' folder, holding an image named street.labels.png: refused before
    anything is written (before: infer.py wrote street.png's mask over it), as predict refuses;
    two images of one stem, a folder without images and an --out that is a file: one line, exit 2."""
    images = sample_images(tmp_path / "images")
    victim = tmp_path / "images" / "wide.labels.png"
    victim.write_bytes(images[0].read_bytes())
    before = {p.name: p.read_bytes() for p in (tmp_path / "images").iterdir()}

    def infer(*args: Path | str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-I", "infer.py", *map(str, args)]
        return subprocess.run(command, cwd=bundles["float"], capture_output=True, text=True, check=False)

    result = infer(tmp_path / "images", "--out", tmp_path / "images")
    assert result.returncode == 2 and result.stderr == (
        f"error: writing {victim} would overwrite the input {victim}; choose another --out\n"
    )
    assert {p.name: p.read_bytes() for p in (tmp_path / "images").iterdir()} == before
    (tmp_path / "images" / "wide.jpg").write_bytes(images[0].read_bytes())
    result = infer(tmp_path / "images", "--out", tmp_path / "masks")
    assert result.returncode == 2 and "wide.jpg and " in result.stderr
    assert "wide.png would both write wide.labels.png" in result.stderr
    (tmp_path / "empty").mkdir()
    result = infer(tmp_path / "empty", "--out", tmp_path / "masks")
    assert result.returncode == 2 and result.stderr.startswith(f"error: {tmp_path / 'empty'} holds no image")
    result = infer(images[1], "--out", images[0])
    assert result.returncode == 2
    assert result.stderr == f"error: --out {images[0]} is a file; masks go into a folder\n"
    for alpha in ("nan", "1.5", "-0.1"):
        result = infer(images[1], "--out", tmp_path / "masks", "--alpha", alpha)
        refusal = f"error: --alpha {alpha} is not an opacity from 0 to 1\n"
        assert (result.returncode, result.stderr) == (2, refusal)
    assert not (tmp_path / "masks").exists()


def test_bundle_infer_never_writes_through_a_link_out_of_its_out_folder(
    bundles: dict[str, Path], tmp_path: Path
) -> None:
    """`--out DIR` holding wide.labels.png, a link to a file outside DIR: refused in one line,
    in predict's words, for predict's layout too (before: infer.py wrote the PNG through the
    link, over the file, exit 0). A link to a file inside DIR is replaced, its target kept."""
    bundle = bundles["float"]
    (image, _) = sample_images(tmp_path / "images")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "blink"
    out.mkdir()
    (out / "wide.labels.png").symlink_to(victim)

    def infer() -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-I", "infer.py", str(image), "--out", str(out)]
        return subprocess.run(command, cwd=bundle, capture_output=True, text=True, check=False)

    result = infer()
    assert (result.returncode, result.stderr) == (
        2,
        f"error: 'wide.labels.png' leads outside the folder {out}\n",
    )
    (out / "wide.tiny.ort-cpu-fp32.labels.png").symlink_to(victim)
    with pytest.raises(
        BadInput, match=re.escape(f"'wide.tiny.ort-cpu-fp32.labels.png' leads outside the folder {out}")
    ):
        predict(bundle / "tiny.onnx", [image], out)
    assert victim.read_text() == "precious" and len(list(out.iterdir())) == 2
    for link in out.iterdir():
        link.unlink()
    (out / "mine.txt").write_text("mine")
    (out / "wide.labels.png").symlink_to(out / "mine.txt")
    result = infer()
    assert result.returncode == 0, result.stderr
    assert not (out / "wide.labels.png").is_symlink() and (out / "mine.txt").read_text() == "mine"
    assert Image.open(out / "wide.labels.png").size == Image.open(image).size


def test_bundle_infer_writes_each_mask_atomically_and_stops_on_sigterm(
    bundles: dict[str, Path], tmp_path: Path
) -> None:
    """SIGTERM while infer.py writes a mask (the PNG written, not yet in place): exit 130 with
    one line, the previous mask kept whole and no temporary file left (before: the process
    died by the signal, the mask already replaced in place)."""
    (image, _) = sample_images(tmp_path / "images")
    out = tmp_path / "masks"
    out.mkdir()
    (out / "wide.labels.png").write_bytes(b"the previous mask")
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import os, runpy, signal, sys\n"
        "from PIL import Image\n"
        "real = Image.Image.save\n"
        "def save(self, fp, *args, **kwargs):\n"
        "    real(self, fp, *args, **kwargs)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "Image.Image.save = save\n"
        "sys.argv = ['infer.py', *sys.argv[1:]]\n"
        "runpy.run_path('infer.py', run_name='__main__')\n"
    )
    command = [sys.executable, "-I", str(driver), str(image), "--out", str(out)]
    result = subprocess.run(command, cwd=bundles["float"], capture_output=True, text=True, check=False)
    assert (result.returncode, result.stderr) == (130, "interrupted: stopped by SIGTERM\n")
    assert [p.name for p in out.iterdir()] == ["wide.labels.png"]
    assert (out / "wide.labels.png").read_bytes() == b"the previous mask"


def wide_model(path: Path, like: Path, classes: int) -> Path:
    """A float model of `classes` classes with `like`'s metadata (its input and normalisation):
    class 7 wins everywhere but where the red channel is bright, where the last class wins."""
    from onnx import TensorProto, numpy_helper
    from onnx import helper as oh

    weight = np.zeros((classes, 3, 1, 1), np.float32)
    weight[-1, 0] = 1.0
    bias = np.zeros(classes, np.float32)
    bias[7] = 1.0
    graph = oh.make_graph(
        [oh.make_node("Conv", ["images", "weight", "bias"], ["logits"])],
        "wide",
        [oh.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 32, 32])],
        [oh.make_tensor_value_info("logits", TensorProto.FLOAT, [1, classes, 32, 32])],
        [numpy_helper.from_array(weight, "weight"), numpy_helper.from_array(bias, "bias")],
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)], ir_version=10)
    meta = {prop.key: prop.value for prop in onnx.load(like).metadata_props}
    meta |= {"num_classes": str(classes), "class_names": json.dumps([f"class {i}" for i in range(classes)])}
    oh.set_model_props(model, meta)
    onnx.save(model, path)
    return path


def test_bundle_infer_refuses_a_class_id_an_8_bit_png_cannot_hold_as_predict_does(tmp_path: Path) -> None:
    """A model of 300 classes (up to 1024 are allowed): infer.py failed with an IndexError on
    its palette, and would have wrapped class 299 to 43. Now an image whose ids fit is written
    as predict writes it, and one where class 299 wins is refused in one line, in predict's
    words; the bundle's README says so."""
    run = make_run(tmp_path / "run", "float")
    model = wide_model(run / "deploy" / "wide.onnx", run / "deploy" / "tiny.onnx", 300)
    bundle = Path(package(run, tmp_path / "b", model=model)["out"])
    assert "This model has 300 classes" in (bundle / "README.md").read_text()
    (tmp_path / "images").mkdir()
    for name, value in (("dark", 0), ("bright", 255)):
        Image.fromarray(np.full((20, 30, 3), value, np.uint8)).save(tmp_path / "images" / f"{name}.png")

    def infer(name: str) -> subprocess.CompletedProcess[str]:
        command = [
            sys.executable,
            "-I",
            "infer.py",
            str(tmp_path / "images" / name),
            "--out",
            str(tmp_path / "infer"),
        ]
        return subprocess.run(command, cwd=bundle, capture_output=True, text=True, check=False)

    result = infer("dark.png")
    assert result.returncode == 0, result.stderr
    predict(model, [tmp_path / "images" / "dark.png"], tmp_path / "predict")
    (theirs,) = (tmp_path / "predict").glob("dark.wide.*.labels.png")
    ours = Image.open(tmp_path / "infer" / "dark.labels.png")
    assert (np.asarray(ours) == 7).all()
    np.testing.assert_array_equal(
        np.asarray(ours.convert("RGB")), np.asarray(Image.open(theirs).convert("RGB"))
    )
    result = infer("bright.png")
    assert (result.returncode, result.stderr) == (2, "error: class id 299 does not fit an 8-bit label PNG\n")
    assert not list((tmp_path / "infer").glob("bright.*"))
    with pytest.raises(BadInput, match=r"^class id 299 does not fit an 8-bit label PNG$"):
        predict(model, [tmp_path / "images" / "bright.png"], tmp_path / "predict")


class FakeEngine:
    """A TensorRT engine stand-in that runs the bundle's ONNX model with ONNX Runtime on the
    'device' buffers of FakeCudaRuntime: infer.py's buffers, copies, shapes and types are real."""

    def __init__(self, onnx_path: Path, cudart: Any) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        first, out = self.session.get_inputs()[0], self.session.get_outputs()[0]
        self.names = (first.name, out.name)
        self.dtypes = {first.name: first.type, out.name: out.type}
        self.shapes = {first.name: tuple(first.shape), out.name: tuple(out.shape)}
        self.num_io_tensors = 2
        self.cudart = cudart

    def get_tensor_name(self, index: int) -> str:
        return self.names[index]

    def get_tensor_mode(self, name: str) -> str:
        return "in" if name == self.names[0] else "out"

    def get_tensor_dtype(self, name: str) -> str:
        return self.dtypes[name]

    def create_execution_context(self) -> Any:
        engine = self

        class Context:
            def __init__(self) -> None:
                self.addresses: dict[str, int] = {}

            def set_input_shape(self, name: str, shape: tuple) -> None:
                assert tuple(shape) == engine.shapes[name]

            def get_tensor_shape(self, name: str) -> tuple:
                return engine.shapes[name]

            def set_tensor_address(self, name: str, ptr: int) -> None:
                self.addresses[name] = ptr

            def execute_async_v3(self, stream: int) -> bool:
                import ctypes

                source, target = engine.names
                x_type, y_type = (NPTYPES[engine.dtypes[n]] for n in engine.names)
                count = int(np.prod(engine.shapes[source]))
                raw = (ctypes.c_byte * (count * np.dtype(x_type).itemsize)).from_address(
                    self.addresses[source]
                )
                x = np.frombuffer(raw, x_type).reshape(engine.shapes[source])
                (y,) = engine.session.run([target], {source: x})
                y = np.ascontiguousarray(y, y_type)
                ctypes.memmove(self.addresses[target], y.ctypes.data, y.nbytes)
                engine.cudart.calls.append(("execute", stream))
                return True

        return Context()


NPTYPES = {"tensor(float)": np.float32, "tensor(uint8)": np.uint8, "tensor(int32)": np.int32}


def test_bundle_infer_runs_an_engine_through_tensorrt_and_cuda_python(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An engine choice: Triton gets the tensorrt backend and model.plan; infer.py takes its
    TensorRT path (stand-ins from tests/test_trt.py) and gives the ONNX model's masks."""
    from test_trt import FakeCudaRuntime, FakeTensorRT

    run = make_run(tmp_path / "run", "uint8", argmax=True)
    onnx_path = run / "deploy" / "tiny.onnx"
    engine = run / "deploy" / "tiny.fp16.engine"
    engine.write_bytes(onnx_path.read_bytes())  # the stand-in engine runs these bytes
    sidecar = {
        "gpu": "Orin",
        "compute_capability": "8.7",
        "tensorrt": "10.3.0",
        "precision": "fp16",
        "inputs": [{"name": "images", "shape": [1, 32, 32, 3], "dtype": "DataType.UINT8"}],
        "outputs": [{"name": "labels", "shape": [1, 32, 32], "dtype": "DataType.INT32"}],
        "metadata": Artifact.open(onnx_path).metadata,
    }
    engine.with_name(engine.name + ".json").write_text(json.dumps(sidecar))
    choose(run, "deploy/tiny.fp16.engine", "trt-fp16")
    bundle = Path(package(run, tmp_path / "bundle")["out"])

    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse(
        (bundle / "triton/tiny/config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    assert config.backend == "tensorrt" and (bundle / "triton/tiny/1/model.plan").is_file()
    assert config.input[0].data_type == model_config_pb2.TYPE_UINT8
    assert config.output[0].data_type == model_config_pb2.TYPE_INT32
    assert (
        "trtexec --onnx=tiny.onnx --saveEngine=tiny.fp16.engine --fp16" in (bundle / "README.md").read_text()
    )
    assert read_nvinfer(bundle / "deepstream/config_infer_tiny.txt")["network-mode"] == "2"

    fake, cudart = FakeTensorRT("10.3.0"), FakeCudaRuntime()
    fake.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
    fake.nptype = lambda dtype: NPTYPES[dtype]
    fake.Runtime = lambda logger: types.SimpleNamespace(
        deserialize_cuda_engine=lambda data: FakeEngine(bundle / "tiny.fp16.engine", cudart)
    )
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = cudart  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setitem(sys.modules, "cuda", types.ModuleType("cuda"))
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", cudart)
    images = sample_images(tmp_path / "images")
    assert load_infer(bundle).main([str(tmp_path / "images"), "--out", str(tmp_path / "trt")]) == 0
    kinds = [call[0] for call in cudart.calls]
    assert kinds.count("execute") == kinds.count("H2D") == kinds.count("D2H") == len(images)
    predict(bundle / "tiny.onnx", images, tmp_path / "predict")
    for image in images:
        ours = np.asarray(Image.open(tmp_path / "trt" / f"{image.stem}.labels.png"))
        (named,) = (tmp_path / "predict").glob(f"{image.stem}.tiny.*.labels.png")
        theirs = np.asarray(Image.open(named))
        np.testing.assert_array_equal(ours, theirs)


def test_int8_choice_ships_the_qdq_model_and_configures_deepstream_in_fp16(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", "pixels")
    recipe = load_recipe(TINY)
    from fakd_deploy.data.splits import calibration_images

    qdq = build(run / "deploy/tiny.onnx", "ort-trt-int8", calib_images=calibration_images(recipe.data, 4))
    choose(run, f"deploy/{qdq.name}", "ort-trt-int8")
    bundle = Path(package(run, tmp_path / "b")["out"])
    assert (bundle / "tiny.qdq.onnx").is_file() and (bundle / "tiny.onnx").is_file()
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse(
        (bundle / "triton/tiny/config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.parameters["precision_mode"] == "INT8"
    text = (bundle / "deepstream/config_infer_tiny.txt").read_text()
    assert "network-mode=2" in text and "int8-calib-file" in text.split("[property]")[0]


def test_package_without_a_choice_or_with_a_changed_file_says_what_to_do(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", "float")
    with pytest.raises(
        BadInput, match=r"no deploy/choice\.json: pick the model with `fakd-deploy bench .* --pick`"
    ):
        package(run)
    choose(run, "deploy/tiny.onnx", "ort-cpu-fp32")
    (run / "deploy/tiny.onnx").write_bytes((run / "deploy/tiny.onnx").read_bytes() + b"\0")
    with pytest.raises(BadInput, match="changed since it was picked"):
        package(run)
    (run / "deploy/choice.json").write_text(
        json.dumps({"file": "../../etc/passwd", "backend": "ort-cpu-fp32"})
    )
    with pytest.raises(BadInput, match=r"choice\.json: '\.\./\.\./etc/passwd' leads outside the folder"):
        package(run)
    (run / "deploy/linked.onnx").symlink_to(tmp_path)
    (run / "deploy/choice.json").write_text(
        json.dumps({"file": "deploy/linked.onnx", "backend": "ort-cpu-fp32"})
    )
    with pytest.raises(BadInput, match=r"choice\.json: 'deploy/linked\.onnx' leads outside the folder"):
        package(run)
    (run / "deploy/choice.json").write_text(json.dumps({"file": "deploy/tiny.onnx", "backend": "bogus"}))
    with pytest.raises(BadInput, match=r"choice\.json: .*bogus"):
        package(run)
    (run / "deploy/choice.json").write_text("[" * 100_000 + "]" * 100_000)  # before: RecursionError
    with pytest.raises(BadInput, match=r"choice\.json is not valid JSON \(it nests too deeply\); pick again"):
        package(run)
    assert not (run / "bundle").exists()


def test_package_writes_only_its_own_folder(tmp_path: Path) -> None:
    """An existing folder that is not a bundle, a link, or a place inside the run: refused, untouched."""
    run = make_run(tmp_path / "run", "float")
    choose(run, "deploy/tiny.onnx", "ort-cpu-fp32")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(BadInput, match="exists and is not a bundle"):
        package(run, mine)
    assert (mine / "notes.txt").read_text() == "keep me" and len(list(mine.iterdir())) == 1
    (tmp_path / "link").symlink_to(mine)
    with pytest.raises(BadInput, match="symbolic link"):
        package(run, tmp_path / "link")
    with pytest.raises(BadInput, match="inside the run folder"):
        package(run, run / "deploy")
    with pytest.raises(BadInput, match="holds the run folder"):
        package(run, tmp_path)
    first = Path(package(run, tmp_path / "b")["out"])
    (first / "labels.txt").unlink()  # one of its own files gone: nothing of the user's is lost
    again = Path(package(run, tmp_path / "b")["out"])  # an earlier bundle is replaced whole
    assert again == first and (again / "labels.txt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "link", "mine", "run"]
    assert (Path(package(run)["out"])) == run / "bundle"


def planted(bundle: Path, case: str) -> str:
    """Put into a bundle what a user could have there; the entry `package` must name."""
    if case == "masks":  # the README's `python infer.py street.png --out masks`
        (street, _) = sample_images(bundle.parent / "images")
        result = subprocess.run(
            [sys.executable, "-I", "infer.py", str(street), "--out", "masks"],
            cwd=bundle,
            capture_output=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        return "masks"
    if case == "engine":  # what nvinfer writes beside its config on the first start
        (bundle / "deepstream" / "tiny.deepstream.onnx_b1_gpu0_fp32.engine").write_bytes(b"plan")
        return "deepstream/tiny.deepstream.onnx_b1_gpu0_fp32.engine"
    if case == "edited":
        with (bundle / "triton/tiny/config.pbtxt").open("a") as config:
            config.write("# tuned by hand\n")
        return "triton/tiny/config.pbtxt"
    if case == "link":
        (bundle / "labels.txt").unlink()
        (bundle / "labels.txt").symlink_to(bundle.parent / "mine.txt")
        return "labels.txt"
    (bundle / "notes").mkdir()  # even an empty folder is the user's
    return "notes"


def contents(folder: Path) -> list[tuple[str, bool | bytes]]:
    return sorted((str(p.relative_to(folder)), p.is_dir() or p.read_bytes()) for p in folder.rglob("*"))


@pytest.mark.parametrize("case", ["masks", "engine", "edited", "link", "folder"])
def test_package_never_replaces_a_bundle_holding_what_it_did_not_write(tmp_path: Path, case: str) -> None:
    """Replacing an earlier bundle deletes it whole, so it must hold nothing but the unchanged
    files its bundle.json lists (before: masks infer.py wrote into it, the engine nvinfer built
    and hand edits were deleted with it). Refused in one line naming the first such entry."""
    run = make_run(tmp_path / "run", "float")
    choose(run, "deploy/tiny.onnx", "ort-cpu-fp32")
    (tmp_path / "mine.txt").write_text("keep me")
    bundle = Path(package(run, tmp_path / "b")["out"])
    entry = planted(bundle, case)
    before = contents(bundle)
    why = "which changed since the bundle wrote it" if case == "edited" else "which the bundle did not write"
    with pytest.raises(BadInput, match=re.escape(f"--out {bundle} holds {entry}, {why}: move it")):
        package(run, tmp_path / "b")
    assert contents(bundle) == before
    assert not list(tmp_path.glob(".b.*"))  # no staging folder or set-aside bundle left


@pytest.mark.parametrize(
    "manifest",
    ["{}", "not json", '{"files": {"precious.txt": 1}}', "[]", "[" * 100_000 + "]" * 100_000],
)
def test_package_never_replaces_a_folder_whose_bundle_json_it_did_not_write(
    tmp_path: Path, manifest: str
) -> None:
    """Any file called bundle.json used to make a folder replaceable: `echo {} > bundle.json`
    and everything beside it was deleted. Now only the fields `package` writes count."""
    run = make_run(tmp_path / "run", "float")
    choose(run, "deploy/tiny.onnx", "ort-cpu-fp32")
    mine = tmp_path / "mine"
    (mine / "photos").mkdir(parents=True)
    (mine / "bundle.json").write_text(manifest)
    (mine / "precious.txt").write_text("keep me")
    with pytest.raises(BadInput, match=re.escape(f"--out {mine} is not a bundle: its bundle.json is not")):
        package(run, mine)
    assert sorted(p.name for p in mine.iterdir()) == ["bundle.json", "photos", "precious.txt"]
    assert (mine / "precious.txt").read_text() == "keep me"


def test_a_file_put_into_the_bundle_while_it_is_rebuilt_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The old bundle is checked again after it is moved aside, before it is deleted: a file
    written into it during the build (nvinfer starting on it) is kept and named."""
    import fakd_deploy.deploy.package as packaging

    run = make_run(tmp_path / "run", "float")
    choose(run, "deploy/tiny.onnx", "ort-cpu-fp32")
    bundle = Path(package(run, tmp_path / "b")["out"])
    check = packaging.check_deepstream

    def while_building(*args: Any) -> dict[str, float]:
        (bundle / "late.txt").write_text("written during the build")
        return check(*args)

    monkeypatch.setattr(packaging, "check_deepstream", while_building)
    with pytest.raises(BadInput, match=r"holds late\.txt, which the bundle did not write"):
        package(run, tmp_path / "b")
    assert (bundle / "late.txt").read_text() == "written during the build"
    assert (bundle / "bundle.json").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["b", "run"]


def test_package_command_prints_the_bundle_or_one_line_why_not(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fakd_deploy.cli import app

    run = make_run(tmp_path / "run", "pixels")
    result = CliRunner().invoke(app, ["package", str(run)])
    assert result.exit_code == 2 and "no deploy/choice.json" in result.output
    assert len(result.output.strip().splitlines()) == 1
    model = run / "deploy" / "tiny.onnx"
    args = ["package", str(run), "--model", str(model), "--out", str(tmp_path / "b")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"bundle: {tmp_path / 'b'} (tiny.onnx, ort-cpu-fp32)" in result.output
    assert "  infer.py" in result.output.splitlines()
    assert json.loads((tmp_path / "b" / "bundle.json").read_text())["chosen_by"] == "--model"


@pytest.mark.parametrize("when", ["checking", "swapping"])
def test_a_signal_while_a_bundle_is_replaced_leaves_the_previous_one_at_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """SIGTERM while `package` replaces an earlier bundle: as the old one is checked, or between
    setting it aside and renaming the new one in. Exit 130, the previous bundle at --out as it
    was and nothing beside it (before: --out missing, the old bundle left at .b.XXXX.tmp.old)."""
    import signal

    from typer.testing import CliRunner

    import fakd_deploy.deploy.package as packaging
    from fakd_deploy.cli import app

    run = make_run(tmp_path / "run", "float")
    choose(run, "deploy/tiny.onnx", "ort-cpu-fp32")
    bundle = Path(package(run, tmp_path / "b")["out"])
    before = contents(bundle)
    if when == "checking":  # the first check is before the build, the second at the swap
        check, calls = packaging.check_replaceable, []

        def checked(folder: Path, out: Path) -> None:
            calls.append(folder)
            if len(calls) == 2:
                signal.raise_signal(signal.SIGTERM)
            check(folder, out)

        monkeypatch.setattr(packaging, "check_replaceable", checked)
    else:
        rename = Path.rename

        def renamed(self: Path, target: Any) -> Path:
            if Path(target) == bundle and self.name.endswith(".tmp"):  # the new bundle, moving in
                signal.raise_signal(signal.SIGTERM)
            return rename(self, target)

        monkeypatch.setattr(Path, "rename", renamed)
    result = CliRunner().invoke(app, ["package", str(run), "--out", str(bundle)])
    assert result.exit_code == 130 and "interrupted: stopped by SIGTERM" in result.output, result.output
    assert contents(bundle) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "run"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_file_written_between_the_check_and_the_swap_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The old bundle is hashed before anything moves; a file written into it after that
    (nvinfer starting on it) is seen when it has been set aside, and the old bundle goes back
    to --out, named in one line (before: checked, then deleted with the file)."""
    import fakd_deploy.deploy.package as packaging

    run = make_run(tmp_path / "run", "float")
    choose(run, "deploy/tiny.onnx", "ort-cpu-fp32")
    bundle = Path(package(run, tmp_path / "b")["out"])
    check, calls = packaging.check_replaceable, []

    def then_written(folder: Path, out: Path) -> None:
        check(folder, out)
        calls.append(folder)
        if len(calls) == 2:
            (folder / "late.txt").write_text("written after the check")

    monkeypatch.setattr(packaging, "check_replaceable", then_written)
    with pytest.raises(BadInput, match=r"holds late\.txt, which the bundle did not write"):
        package(run, bundle)
    assert (bundle / "late.txt").read_text() == "written after the check"
    assert (bundle / "bundle.json").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["b", "run"]


def test_a_bundle_a_kill_left_set_aside_is_put_back_or_removed_by_the_next_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kill -9 between the two renames of a replace leaves --out missing and the previous
    bundle at .b.XXXXXXXX.tmp.old: the next `package` puts it back first, so its own failure
    still leaves it at --out. Set-aside bundles beside a present --out are removed once the new
    bundle is in place, but one holding a file the bundle did not write is kept."""
    import fakd_deploy.deploy.package as packaging
    from fakd_deploy.errors import StageFailed

    run = make_run(tmp_path / "run", "float")
    choose(run, "deploy/tiny.onnx", "ort-cpu-fp32")
    bundle = Path(package(run, tmp_path / "b")["out"])
    before = contents(bundle)
    bundle.rename(tmp_path / ".b.k1ll3d_9.tmp.old")

    def fails(*args: Any) -> None:
        raise StageFailed("the DeepStream check failed")

    with monkeypatch.context() as patch:
        patch.setattr(packaging, "check_deepstream", fails)
        with pytest.raises(StageFailed):
            package(run, bundle)
    assert contents(bundle) == before and sorted(p.name for p in tmp_path.iterdir()) == ["b", "run"]
    for name in (".b.k1ll3d_1.tmp.old", ".b.k1ll3d_2.tmp.old"):
        shutil.copytree(bundle, tmp_path / name)
    (tmp_path / ".b.k1ll3d_2.tmp.old" / "notes.txt").write_text("mine")
    (tmp_path / ".bb.k1ll3d_3.tmp.old").mkdir()  # another --out's: not this one's to remove
    package(run, bundle)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".b.k1ll3d_2.tmp.old",
        ".bb.k1ll3d_3.tmp.old",
        "b",
        "run",
    ]
    assert (tmp_path / ".b.k1ll3d_2.tmp.old" / "notes.txt").read_text() == "mine"
