"""The quickstart and CamVid students export in every input mode with parity on their validation
images, through the `export` command; CamVid's bundle passes nvinfer's formula on real images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fakd_deploy.cli import app
from fakd_deploy.data.splits import ValBatches, dataset_info
from fakd_deploy.models import Checkpoint, build_model
from fakd_deploy.recipe import Recipe, load_recipe

ROOT = Path(__file__).resolve().parents[1]
MODES = ("float", "pixels", "uint8")


def student_checkpoint(recipe: Recipe, path: Path) -> Path:
    """The recipe's student, untrained (seeded), saved as `run` would save it."""
    num_classes, names = dataset_info(recipe.data)
    torch.manual_seed(0)
    model = build_model(num_classes=num_classes, **recipe.student.model.build_kwargs())
    return Checkpoint(
        model=model.state_dict(),
        arch=model.config,
        recipe=recipe.model_dump(mode="json"),
        class_names=names,
        variant="fakd_kd",
        seed=0,
    ).save(path)


def export_command(checkpoint: Path, out: Path, mode: str, *extra: str) -> tuple[str, dict]:
    report = out.with_suffix(".json")
    args = ["export", str(checkpoint), "--out", str(out), "--input", mode, "--json", str(report), *extra]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.output, json.loads(report.read_text())


@pytest.mark.parametrize("mode", MODES)
def test_quickstart_student_exports_each_input_mode_with_parity(mode: str, tmp_path: Path) -> None:
    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml", ["data.options.num_images=8"])
    checkpoint = student_checkpoint(recipe, tmp_path / "best.pt")
    output, report = export_command(checkpoint, tmp_path / f"{mode}.onnx", mode, "--argmax")
    assert report["input"] == mode and report["labels"] == "int32" and report["parity_images"] == 8
    assert report["max_abs_diff"] <= 1e-4 and report["argmax_agreement"] > 0.999
    lines = output.splitlines()  # stdout and the log on stderr, mixed by the test runner
    assert f"exported {tmp_path / mode}.onnx" in output and "{" not in output
    assert any(line.split()[:1] == ["parity"] and "8 images: max" in line for line in lines)
    if mode != "float":
        assert "folded into the first convolution" in report["normalisation"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mode", "output"),
    [
        ("float", ()),
        ("pixels", ("--argmax", "--labels", "int32")),
        ("uint8", ("--argmax", "--labels", "uint8")),
    ],
)
def test_camvid_student_exports_each_input_mode_with_parity(
    mode: str, output: tuple[str, ...], camvid: Path, tmp_path: Path
) -> None:
    """Each input mode and each output type on real CamVid validation images (the parity check's 8);
    the full mode x output grid is tests/test_input_modes.py."""
    recipe = load_recipe(ROOT / "recipes" / "camvid_cpu.yaml", [f"data.root={camvid}"])
    checkpoint = student_checkpoint(recipe, tmp_path / "best.pt")
    _, report = export_command(checkpoint, tmp_path / f"{mode}.onnx", mode, *output)
    assert report["input_size"] == [120, 160] and report["parity_images"] == 8
    assert report["labels"] == (output[-1] if output else None)
    assert report["max_abs_diff"] <= 1e-4 and report["argmax_agreement"] > 0.999


@pytest.mark.slow
def test_camvid_bundle_nvinfer_formula_matches_the_float_model(camvid: Path, tmp_path: Path) -> None:
    """Real CamVid validation images: nvinfer's y = net-scale-factor * (x - offsets), then the
    DeepStream model, against the float model's softmax."""
    from test_package import float_model_probabilities, nvinfer_then_model

    from fakd_deploy.deploy.export import export_onnx
    from fakd_deploy.deploy.package import package
    from fakd_deploy.utils import file_sha256

    recipe = load_recipe(ROOT / "recipes" / "camvid_cpu.yaml", [f"data.root={camvid}"])
    run = tmp_path / "run"
    (run / "deploy").mkdir(parents=True)
    (run / "recipe.yaml").write_text(recipe.to_yaml())
    checkpoint = student_checkpoint(recipe, tmp_path / "best.pt")
    export_onnx(
        checkpoint, run / "deploy/s.onnx", 120, 160, parity_batches=ValBatches(recipe.data, max_images=2)
    )
    choice = {
        "file": "deploy/s.onnx",
        "backend": "ort-cpu-fp32",
        "sha256": file_sha256(run / "deploy/s.onnx"),
    }
    (run / "deploy/choice.json").write_text(json.dumps(choice))
    bundle = Path(package(run)["out"])
    images = np.concatenate([b for b, _ in ValBatches(recipe.data, max_images=8)])
    mean = np.reshape(recipe.data.mean, (1, 3, 1, 1))
    std = np.reshape(recipe.data.std, (1, 3, 1, 1))
    pixels = np.rint((images * std + mean) * 255).astype(np.float32)
    want = float_model_probabilities(bundle / "s.onnx", images)
    got = nvinfer_then_model(bundle / "deepstream/config_infer_s.txt", pixels)
    assert (got.argmax(1) == want.argmax(1)).mean() > 0.9999
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
