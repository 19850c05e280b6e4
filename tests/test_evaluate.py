"""The confusion-matrix mIoU against an independent numpy computation, and the eval modes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fakd_deploy.data.preprocess import resize_bilinear
from fakd_deploy.errors import DatasetError
from fakd_deploy.evaluate import ConfusionMatrix, evaluate, predict_labels
from fakd_deploy.recipe import EvalConfig
from fakd_deploy.tables import summarize_variants


def miou_by_sets(target: np.ndarray, pred: np.ndarray, num_classes: int, ignore: int = 255) -> float:
    """IoU by set counting per class, averaged over classes that occur in GT or prediction."""
    valid = target != ignore
    ious = []
    for c in range(num_classes):
        t, p = (target == c) & valid, (pred == c) & valid
        union = np.logical_or(t, p).sum()
        if union:
            ious.append(np.logical_and(t, p).sum() / union)
    return 100 * float(np.mean(ious))


@pytest.mark.parametrize("seed", range(5))
def test_miou_matches_numpy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    num_classes = int(rng.integers(2, 12))
    target = rng.integers(0, num_classes, size=(3, 17, 23))
    target[rng.random(target.shape) < 0.2] = 255
    pred = np.where(rng.random(target.shape) < 0.6, target, rng.integers(0, num_classes, target.shape))
    pred[pred == 255] = 0
    matrix = ConfusionMatrix(num_classes)
    for t, p in zip(target, pred, strict=True):
        matrix.update(t, p)
    result = matrix.compute()
    assert result["miou"] == pytest.approx(miou_by_sets(target, pred, num_classes), abs=1e-9)
    valid = target != 255
    assert result["pixel_acc"] == pytest.approx(100 * (target == pred)[valid].mean(), abs=1e-9)


def test_absent_class_is_none_and_excluded() -> None:
    matrix = ConfusionMatrix(4)
    matrix.update(np.array([0, 0, 1, 1]), np.array([0, 0, 1, 0]))
    result = matrix.compute()
    assert result["per_class_iou"][2] is None and result["per_class_iou"][3] is None
    assert result["miou"] == pytest.approx(100 * (2 / 3 + 1 / 2) / 2)


def test_label_out_of_range_is_an_error() -> None:
    with pytest.raises(DatasetError, match="label value 7"):
        ConfusionMatrix(4).update(np.array([0, 7]), np.array([0, 1]))


def test_a_prediction_outside_the_classes_is_an_error_not_the_last_class() -> None:
    # before: clipped into class 3, scored as a confident (wrong) prediction, exit 0
    from fakd_deploy.errors import ArtifactError

    for wrong in (10, -1):
        with pytest.raises(ArtifactError, match=rf"the model predicts class {wrong}, outside the 4 classes"):
            ConfusionMatrix(4).update(np.array([0, 3, 255]), np.array([0, wrong, 9]))
    matrix = ConfusionMatrix(4)
    matrix.update(np.array([0, 3, 255]), np.array([0, 3, 9]))  # under the ignore label: never scored
    assert matrix.mat.sum() == 2


def _batches(n: int = 3) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [
        (rng.standard_normal((2, 3, 16, 20)).astype(np.float32), rng.integers(0, 3, (2, 16, 20)))
        for _ in range(n)
    ]


class ChannelPredictor:
    """Logits at half resolution that copy the first three input channels: mode-invariant.

    It counts its calls, so a test can see how often evaluation runs the model.
    """

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, images: np.ndarray) -> np.ndarray:
        self.calls += 1
        n, c, h, w = images.shape
        return images.reshape(n, c, h // 2, 2, w // 2, 2).mean((3, 5))


def test_labels_and_logits_predictors_agree() -> None:
    batches = _batches()
    logits = evaluate(ChannelPredictor(), batches, 3)

    def labels(images: np.ndarray) -> np.ndarray:
        return resize_bilinear(ChannelPredictor()(images), images.shape[-2:]).argmax(1)

    assert evaluate(labels, batches, 3)["miou"] == pytest.approx(logits["miou"])


def test_low_resolution_logits_run_the_model_once_per_batch() -> None:
    predictor = ChannelPredictor()
    images, _ = _batches(1)[0]
    labels = predict_labels(predictor, images)
    assert predictor.calls == 1 and labels.shape == (2, 16, 20)
    expected = (
        torch.nn.functional.interpolate(
            torch.from_numpy(ChannelPredictor()(images)), (16, 20), mode="bilinear", align_corners=False
        )
        .argmax(1)
        .numpy()
    )
    np.testing.assert_array_equal(labels, expected)


def test_flip_and_slide_modes_are_recorded_and_consistent() -> None:
    batches = _batches()
    whole = evaluate(ChannelPredictor(), batches, 3)
    slide = evaluate(
        ChannelPredictor(), batches, 3, mode=EvalConfig(mode="slide", window=(16, 16), stride=(8, 8))
    )
    flip = evaluate(ChannelPredictor(), batches, 3, mode=EvalConfig(flip=True))
    assert slide["mode"] == "slide[16, 16]" and flip["mode"] == "whole+flip"
    assert abs(slide["miou"] - whole["miou"]) < 5
    assert flip["miou"] == pytest.approx(whole["miou"])  # the predictor is flip-equivariant


def test_variant_summary_matches_numpy() -> None:
    rows = [
        {"variant": "kd", "miou": 40.0},
        {"variant": "baseline", "miou": 41.5},
        {"variant": "kd", "miou": 43.0},
        {"variant": "kd", "miou": 41.2},
        {"variant": "teacher", "miou": 51.0},
    ]
    summary = {item["variant"]: item for item in summarize_variants(rows)}
    kd = np.array([40.0, 43.0, 41.2])
    assert summary["kd"]["seeds"] == 3
    assert summary["kd"]["mean"] == pytest.approx(kd.mean(), abs=1e-12)
    assert summary["kd"]["std"] == pytest.approx(kd.std(ddof=1), abs=1e-12)
    assert (summary["kd"]["min"], summary["kd"]["max"]) == (40.0, 43.0)
    assert summary["teacher"]["std"] is None and summary["teacher"]["mean"] == 51.0


def test_a_split_without_a_labelled_pixel_is_an_error_not_nan() -> None:
    # before: "mIoU nan", exit 0, NaN written into the --json file and kept as a best score
    masks = np.full((2, 16, 20), 255)
    batches = [(np.zeros((2, 3, 16, 20), dtype=np.float32), masks)]
    with pytest.raises(DatasetError, match=r"every pixel of the 2 image\(s\) is the ignore label 255"):
        evaluate(lambda x: np.zeros((len(x), 3, 16, 20), dtype=np.float32), batches, num_classes=3)


def test_nothing_to_evaluate_is_an_error_not_nan() -> None:
    with pytest.raises(DatasetError, match="nothing to evaluate"):
        evaluate(ChannelPredictor(), [], 3)


def test_multi_scale_averages_softmax_over_scales() -> None:
    """Scales and flips: labels are the argmax of the mean softmax, computed here independently."""
    predictor = ChannelPredictor()
    images, _ = _batches(1)[0]
    mode = EvalConfig(scales=[0.5, 1.0], flip=True)

    def softmax(x: np.ndarray) -> np.ndarray:
        e = np.exp(x - x.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    total = 0.0
    for scale in (0.5, 1.0):
        x = torch.nn.functional.interpolate(
            torch.from_numpy(images), (int(16 * scale), int(20 * scale)), mode="bilinear", align_corners=False
        )
        for flip in (False, True):
            inp = x.flip(-1) if flip else x
            out = torch.from_numpy(predictor(inp.numpy().copy()))
            out = torch.nn.functional.interpolate(out, inp.shape[-2:], mode="bilinear", align_corners=False)
            out = out.flip(-1) if flip else out
            out = torch.nn.functional.interpolate(out, (16, 20), mode="bilinear", align_corners=False)
            total = total + softmax(out.numpy())
    np.testing.assert_array_equal(predict_labels(predictor, images, mode), np.asarray(total).argmax(1))


def test_confusion_matrix_counts_pixels_by_truth_and_prediction() -> None:
    """Entry (t, p) is the number of valid pixels of class t predicted as p, counted here one
    pixel at a time; ignored pixels count nowhere."""
    rng = np.random.default_rng(3)
    target = rng.integers(0, 4, (2, 9, 7))
    target[rng.random(target.shape) < 0.2] = 255
    pred = rng.integers(0, 4, target.shape)
    matrix = ConfusionMatrix(4)
    matrix.update(target, pred)
    expected = [[0] * 4 for _ in range(4)]
    for t, p in zip(target.ravel().tolist(), pred.ravel().tolist(), strict=True):
        if t != 255:
            expected[t][p] += 1
    assert matrix.compute()["confusion_matrix"] == expected


def test_normalised_rows_and_the_most_confused_pairs() -> None:
    from fakd_deploy.commands import most_confused
    from fakd_deploy.figures import normalised

    counts = [[8, 2, 0], [1, 1, 2], [0, 0, 0]]
    np.testing.assert_allclose(normalised(counts), [[0.8, 0.2, 0.0], [0.25, 0.25, 0.5], [0.0, 0.0, 0.0]])
    lines = most_confused({"confusion_matrix": counts, "class_names": ["road", "car", "sky"]})
    assert lines == [
        "most confused: car -> sky: 50.0 % of car's pixels",
        "most confused: car -> road: 25.0 % of car's pixels",
        "most confused: road -> car: 20.0 % of road's pixels",
    ]


def test_evaluate_writes_the_confusion_matrix_as_json_and_a_heat_map(
    artifacts: dict[str, Path], tmp_path: Path
) -> None:
    from PIL import Image

    from fakd_deploy.commands import evaluate_file

    out = tmp_path / "eval.json"
    result = evaluate_file(artifacts["onnx"], max_images=8, json_out=out)
    saved = json.loads(out.read_text())
    counts = np.array(saved["confusion_matrix"])
    assert counts.shape == (6, 6) and counts.sum() == 8 * 32 * 32
    assert saved["class_names"] == result["class_names"] and len(saved["per_class_iou"]) == 6
    tp, union = np.diag(counts), counts.sum(0) + counts.sum(1) - np.diag(counts)
    assert saved["miou"] == pytest.approx(100 * np.mean(tp[union > 0] / union[union > 0]), abs=1e-9)
    heat_map = Image.open(tmp_path / "eval.confusion.png")
    assert heat_map.format == "PNG" and min(heat_map.size) > 300
    assert result["written"] == [str(out), str(tmp_path / "eval.confusion.png")]
