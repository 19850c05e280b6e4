"""The procedural dataset: deterministic, split-aware, and not solvable from colour alone."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fakd_deploy.cli import app
from fakd_deploy.data import build_dataset
from fakd_deploy.data.synthetic import Synthetic
from fakd_deploy.errors import DatasetError

TINY = Path(__file__).resolve().parent / "recipes" / "tiny.yaml"


def digest(seed: int, index: int) -> str:
    image, mask = Synthetic(seed=seed)[index]
    return hashlib.sha256(image.tobytes() + mask.tobytes()).hexdigest()


def test_arrays_and_metadata() -> None:
    ds = build_dataset("synthetic", None, "train", size=(48, 80), num_images=5, num_classes=9)
    image, mask = ds[4]
    assert image.shape == (48, 80, 3) and image.dtype == np.uint8
    assert mask.shape == (48, 80) and mask.dtype == np.int64
    assert len(ds) == 5 and ds.num_classes == 9 == len(ds.class_names) and ds.ignore_index == 255
    assert ds.class_names[0] == "background" and len(set(ds.class_names)) == 9
    assert len(Synthetic(split="train")) == 512 and len(Synthetic(split="val")) == 128
    with pytest.raises(IndexError):
        ds[5]
    with pytest.raises(DatasetError, match="num_classes"):
        Synthetic(num_classes=5)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"size": True}, "data.options.size must be a whole number of pixels or"),
        ({"size": 32.5}, "data.options.size must be"),
        ({"size": "32"}, "data.options.size must be"),
        ({"size": [32, 0]}, "data.options.size must be"),
        ({"size": [32, 32, 3]}, "data.options.size must be"),
        ({"size": [10_000, 10_000]}, "at most 89,478,485 pixels"),
        ({"seed": 1.5}, "data.options.seed must be a whole number from 0, got 1.5"),
        ({"seed": -1}, "data.options.seed must be a whole number from 0, got -1"),
        ({"ignore_index": 0}, r"ignore_index 0 is a class id of the synthetic dataset \(0\.\.7\)"),
    ],
)
def test_options_that_are_not_sizes_seeds_or_free_ids_are_named(options: dict, message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        Synthetic(**options)


@pytest.mark.parametrize(
    "num_images, key",
    [
        ({1: 3}, "1"),
        ({True: 3}, "True"),
        ({None: 3}, "None"),
        ({"train": 4, 2.5: 1}, "2.5"),
        ({"tran": 3}, "tran"),
    ],
)
def test_a_num_images_key_that_is_no_split_is_named(num_images: dict, key: str) -> None:
    """YAML keys can be numbers, booleans or null: named, not a TypeError from sorting or joining them."""
    with pytest.raises(DatasetError, match=f"^data.options.num_images names no split {key}: the splits"):
        Synthetic(num_images=num_images)


def test_a_num_images_key_that_is_no_split_ends_the_command_in_one_line(tmp_path: Path) -> None:
    options = "data.options={size: 32, num_classes: 6, num_images: {1: 3}}"
    args = ["train", str(TINY), "--out", str(tmp_path / "run"), "--set", options]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "data.options.num_images names no split 1" in result.output


def test_same_seed_same_arrays_other_seed_other_arrays() -> None:
    a, b, c = Synthetic(seed=3), Synthetic(seed=3), Synthetic(seed=4)
    for x, y in zip(a[7], b[7], strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[7][0], c[7][0])
    assert not np.array_equal(a[7][0], a[8][0])


def test_same_arrays_in_another_process() -> None:
    code = "from tests.test_synthetic import digest; print(digest(11, 2))"
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert out.stdout.strip() == digest(11, 2)


def test_train_and_val_differ() -> None:
    train, val = Synthetic(split="train"), Synthetic(split="val")
    assert not any(np.array_equal(train[i][0], val[i][0]) for i in range(4))


def test_every_class_appears_in_a_few_images() -> None:
    ds = Synthetic(num_classes=8)
    present = set().union(*(np.unique(ds[i][1]).tolist() for i in range(8)))
    assert present == set(range(8))


def pixels(ds: Synthetic, count: int) -> tuple[np.ndarray, np.ndarray]:
    images, masks = zip(*(ds[i] for i in range(count)), strict=True)
    return (
        np.concatenate([i.reshape(-1, 3) for i in images]).astype(np.float32),
        np.concatenate([m.ravel() for m in masks]),
    )


def test_colour_alone_does_not_separate_classes() -> None:
    """A nearest-mean-colour classifier fitted on train scores well below 100% on val."""
    colours, labels = pixels(Synthetic(split="train"), 32)
    means = np.stack([colours[labels == c].mean(0) for c in range(8)])
    colours, labels = pixels(Synthetic(split="val"), 16)
    predicted = ((colours[:, None] - means[None]) ** 2).sum(-1).argmin(1)
    accuracy = (predicted == labels).mean()
    assert accuracy < 0.7, f"colour alone reaches {accuracy:.0%}"


def test_transform_gives_tensors() -> None:
    from fakd_deploy.data.transforms import TrainTransform

    transform = TrainTransform((32, 32), (0.5, 2.0), True, 0.2, (0.5,) * 3, (0.2,) * 3, 255.0, 255)
    ds = Synthetic(transform=transform)
    image, mask = ds[0]
    assert image.dtype == torch.float32 and image.shape == (3, 32, 32)
    assert mask.dtype == torch.int64 and mask.shape == (32, 32)
