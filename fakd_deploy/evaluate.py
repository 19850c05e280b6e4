"""One evaluation path for every backend: a Predictor, batches, a confusion matrix.

Any `predictor.Predictor` (the PyTorch model, an ONNX Runtime session, a TensorRT engine)
is scored here by the same code on the same images, so the speed/accuracy table compares
like with like. This module is numpy only: a deployed model is scored on a device without
torch by exactly the code that scored its checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from fakd_deploy.data.preprocess import resize_bilinear
from fakd_deploy.errors import ArtifactError, DatasetError
from fakd_deploy.predictor import Predictor
from fakd_deploy.progress import progress_bar
from fakd_deploy.recipe import EvalConfig


class ConfusionMatrix:
    """Rows are ground truth, columns predictions; pixels with the ignore label are dropped."""

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.mat = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, target: np.ndarray, pred: np.ndarray) -> None:
        n = self.num_classes
        target, pred = target.reshape(-1).astype(np.int64), pred.reshape(-1).astype(np.int64)
        valid = target != self.ignore_index
        target, pred = target[valid], pred[valid]
        outside = (target < 0) | (target >= n)
        if outside.any():
            raise DatasetError(
                f"label value {target[outside][0]} is outside [0, {n}) and is not the "
                f"ignore label {self.ignore_index}"
            )
        wrong = (pred < 0) | (pred >= n)
        if wrong.any():
            raise ArtifactError(
                f"the model predicts class {pred[wrong][0]}, outside the {n} classes of the data "
                f"(0 to {n - 1}): the model and the dataset do not match"
            )
        self.mat += np.bincount(n * target + pred, minlength=n * n).reshape(n, n)

    def compute(self) -> dict[str, Any]:
        """IoU_c = TP / (TP + FP + FN); mIoU averages the classes that occur in GT or prediction.

        `confusion_matrix` holds the pixel counts themselves (rows: ground truth, columns:
        prediction), so any other metric can be computed from the result.
        """
        mat = self.mat.astype(np.float64)
        tp = np.diag(mat)
        union = mat.sum(0) + mat.sum(1) - tp
        present = union > 0
        iou = tp / np.maximum(union, 1)
        return {
            "miou": float(100 * iou[present].mean()) if present.any() else math.nan,
            "pixel_acc": float(100 * tp.sum() / max(mat.sum(), 1)),
            "per_class_iou": [float(100 * v) if p else None for v, p in zip(iou, present, strict=True)],
            "confusion_matrix": self.mat.tolist(),
        }


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(1, keepdims=True))
    return shifted / shifted.sum(1, keepdims=True)


def _logits(predictor: Predictor, images: np.ndarray) -> np.ndarray:
    """Logits at the input resolution (a predictor may return them smaller)."""
    out = predictor(images)
    if out.ndim != 4:
        raise DatasetError(
            "flip, multi-scale and sliding-window evaluation need a model that returns "
            "logits; this one returns labels (exported with --argmax)"
        )
    return resize_bilinear(out, images.shape[-2:])


def _slide(
    predictor: Predictor, images: np.ndarray, window: tuple[int, int], stride: tuple[int, int]
) -> np.ndarray:
    """Average the logits of overlapping windows; the image is padded up to one window."""
    (h, w), (wh, ww), (sh, sw) = images.shape[-2:], window, stride
    padded = np.pad(images, ((0, 0), (0, 0), (0, max(wh - h, 0)), (0, max(ww - w, 0))))
    ph, pw = padded.shape[-2:]
    total: np.ndarray | None = None
    count = np.zeros((1, 1, ph, pw), dtype=np.float32)
    for top in sorted({*range(0, ph - wh + 1, sh), ph - wh}):
        for left in sorted({*range(0, pw - ww + 1, sw), pw - ww}):
            logits = _logits(predictor, padded[..., top : top + wh, left : left + ww])
            if total is None:
                total = np.zeros((logits.shape[0], logits.shape[1], ph, pw), dtype=np.float32)
            total[..., top : top + wh, left : left + ww] += logits
            count[..., top : top + wh, left : left + ww] += 1
    assert total is not None
    return (total / count)[..., :h, :w]


def predict_labels(predictor: Predictor, images: np.ndarray, mode: EvalConfig | None = None) -> np.ndarray:
    """Class ids (N, H, W) at the input resolution; flip and scales average softmax scores."""
    mode = mode or EvalConfig()
    if mode.mode == "whole" and not mode.flip and mode.scales == [1.0]:
        out = predictor(images)
        if out.ndim == 3:
            return out.astype(np.int64)
        return resize_bilinear(out, images.shape[-2:]).argmax(1)
    size = images.shape[-2:]
    score: np.ndarray | float = 0.0
    for scale in mode.scales:
        scaled_size = (max(int(size[0] * scale), 1), max(int(size[1] * scale), 1))
        scaled = resize_bilinear(images, scaled_size)
        for flip in (False, True) if mode.flip else (False,):
            x = scaled[..., ::-1] if flip else scaled
            if mode.mode == "slide":
                assert mode.window is not None  # the schema requires it
                logits = _slide(predictor, np.ascontiguousarray(x), mode.window, mode.stride or mode.window)
            else:
                logits = _logits(predictor, np.ascontiguousarray(x))
            logits = logits[..., ::-1] if flip else logits
            score = score + softmax(resize_bilinear(logits, size))
    assert isinstance(score, np.ndarray)
    return score.argmax(1)


def evaluate(
    predictor: Predictor,
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
    num_classes: int,
    ignore_index: int = 255,
    mode: EvalConfig | None = None,
    description: str = "evaluate",
    total: int | None = None,
) -> dict[str, Any]:
    """mIoU, per-class IoU, pixel accuracy and the confusion matrix of a predictor over
    (images, masks) batches."""
    mode = mode or EvalConfig()
    matrix = ConfusionMatrix(num_classes, ignore_index)
    images_seen = 0
    with progress_bar() as progress:
        task = progress.add_task(description, total=total)
        for images, masks in batches:
            labels = predict_labels(predictor, images, mode)
            if labels.shape[-2:] != masks.shape[-2:]:
                raise DatasetError(
                    f"predictions of size {labels.shape[-2:]} do not match masks of size {masks.shape[-2:]}"
                )
            matrix.update(masks, labels)
            images_seen += len(images)
            progress.advance(task)
    if images_seen == 0:
        raise DatasetError("nothing to evaluate: the split (or --max-images) gives no images")
    if matrix.mat.sum() == 0:  # an mIoU of NaN would be kept as a score, and is not JSON
        raise DatasetError(
            f"nothing to evaluate: every pixel of the {images_seen} image(s) is the ignore label "
            f"{ignore_index}, so no class can be scored"
        )
    return {**matrix.compute(), "mode": mode.describe(), "num_classes": num_classes, "images": images_seen}
