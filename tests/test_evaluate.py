"""The confusion-matrix mIoU against an independent numpy computation, and the eval modes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fakd_deploy.evaluate import ConfusionMatrix, EvalMode, evaluate, summarize_variants


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
        matrix.update(torch.from_numpy(t), torch.from_numpy(p))
    result = matrix.compute()
    assert result["miou"] == pytest.approx(miou_by_sets(target, pred, num_classes), abs=1e-9)
    valid = target != 255
    assert result["pixel_acc"] == pytest.approx(100 * (target == pred)[valid].mean(), abs=1e-9)


def test_absent_class_is_none_and_excluded() -> None:
    matrix = ConfusionMatrix(4)
    matrix.update(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 1, 0]))
    result = matrix.compute()
    assert result["per_class_iou"][2] is None and result["per_class_iou"][3] is None
    assert result["miou"] == pytest.approx(100 * (2 / 3 + 1 / 2) / 2)


def test_label_out_of_range_is_an_error() -> None:
    with pytest.raises(ValueError, match="label value 7"):
        ConfusionMatrix(4).update(torch.tensor([0, 7]), torch.tensor([0, 1]))


def _batches(n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(2, 3, 16, 20, generator=gen),
             torch.randint(0, 3, (2, 16, 20), generator=gen)) for _ in range(n)]


class ChannelPredictor:
    """Logits at half resolution that copy the first three input channels: mode-invariant."""

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(images, 2)


def test_labels_and_logits_predictors_agree() -> None:
    batches = _batches()
    logits = evaluate(ChannelPredictor(), batches, 3)

    def labels(images: torch.Tensor) -> torch.Tensor:
        out = torch.nn.functional.interpolate(ChannelPredictor()(images), images.shape[-2:],
                                              mode="bilinear", align_corners=False)
        return out.argmax(1)

    assert evaluate(labels, batches, 3)["miou"] == pytest.approx(logits["miou"])


def test_flip_and_slide_modes_are_recorded_and_consistent() -> None:
    batches = _batches()
    whole = evaluate(ChannelPredictor(), batches, 3)
    slide = evaluate(ChannelPredictor(), batches, 3,
                     mode=EvalMode(name="slide", window=(16, 16), stride=(8, 8)))
    flip = evaluate(ChannelPredictor(), batches, 3, mode=EvalMode(flip=True))
    assert slide["mode"] == "slide(16, 16)" and flip["mode"] == "whole+flip"
    assert abs(slide["miou"] - whole["miou"]) < 5
    assert flip["miou"] == pytest.approx(whole["miou"])  # the predictor is flip-equivariant


def test_variant_summary_matches_numpy() -> None:
    rows = [{"variant": "kd", "miou": 40.0}, {"variant": "baseline", "miou": 41.5},
            {"variant": "kd", "miou": 43.0}, {"variant": "kd", "miou": 41.2},
            {"variant": "teacher", "miou": 51.0}]
    summary = {item["variant"]: item for item in summarize_variants(rows)}
    kd = np.array([40.0, 43.0, 41.2])
    assert summary["kd"]["seeds"] == 3
    assert summary["kd"]["mean"] == pytest.approx(kd.mean(), abs=1e-12)
    assert summary["kd"]["std"] == pytest.approx(kd.std(ddof=1), abs=1e-12)
    assert (summary["kd"]["min"], summary["kd"]["max"]) == (40.0, 43.0)
    assert summary["teacher"]["std"] is None and summary["teacher"]["mean"] == 51.0
