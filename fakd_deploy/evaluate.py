"""One evaluation path for every backend: a Predictor, a loader, a confusion matrix.

A Predictor takes a normalised float32 batch (N, 3, H, W) on the CPU and returns
either logits (N, C, h, w) at any resolution or labels (N, H, W). The PyTorch model,
an ONNX Runtime session and a TensorRT engine all implement it, so the speed/accuracy
table compares like with like.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from fakd_deploy.progress import progress_bar


class Predictor(Protocol):
    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


class TorchPredictor:
    """A segmentation model as a Predictor: logits upsampled to the input size, as exported."""

    def __init__(self, model: nn.Module, device: torch.device | str = "cpu") -> None:
        self.model = model.eval().to(device)
        self.device = torch.device(device)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.model(images.to(self.device))
        logits = F.interpolate(logits, images.shape[-2:], mode="bilinear", align_corners=False)
        return logits.float().cpu()


class ConfusionMatrix:
    """Rows are ground truth, columns predictions; pixels with the ignore label are dropped."""

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, target: torch.Tensor, pred: torch.Tensor) -> None:
        n = self.num_classes
        target, pred = target.flatten().long(), pred.flatten().long()
        valid = target != self.ignore_index
        if bool(((target[valid] < 0) | (target[valid] >= n)).any()):
            bad = target[valid & ((target < 0) | (target >= n))][0].item()
            raise ValueError(f"label value {bad} is outside [0, {n}) and is not the ignore label")
        index = n * target[valid] + pred[valid].clamp(0, n - 1)
        self.mat += torch.bincount(index, minlength=n * n).reshape(n, n).cpu()

    def compute(self) -> dict[str, float | list[float | None]]:
        """IoU_c = TP / (TP + FP + FN); mIoU averages the classes that occur in GT or prediction."""
        mat = self.mat.double()
        tp = mat.diag()
        union = mat.sum(0) + mat.sum(1) - tp
        iou = tp / union.clamp(min=1)
        present = union > 0
        per_class = [100 * v if p else None
                     for v, p in zip(iou.tolist(), present.tolist(), strict=True)]
        return {
            "miou": float(100 * iou[present].mean()) if bool(present.any()) else float("nan"),
            "pixel_acc": float(100 * tp.sum() / mat.sum().clamp(min=1)),
            "per_class_iou": per_class,
        }


@dataclass
class EvalMode:
    """How a prediction is formed; recorded with every mIoU so numbers stay comparable."""

    name: str = "whole"  # whole | slide
    flip: bool = False
    scales: Sequence[float] = field(default_factory=lambda: (1.0,))
    window: tuple[int, int] | None = None  # sliding window size (h, w)
    stride: tuple[int, int] | None = None

    def describe(self) -> str:
        parts = [self.name if self.name != "slide" else f"slide{self.window}"]
        if self.flip:
            parts.append("flip")
        if tuple(self.scales) != (1.0,):
            parts.append("ms" + ",".join(f"{s:g}" for s in self.scales))
        return "+".join(parts)


def _logits(predictor: Predictor, images: torch.Tensor) -> torch.Tensor:
    out = predictor(images)
    if out.dim() != 4:
        raise ValueError("this evaluation mode needs a predictor that returns logits, not labels")
    return F.interpolate(out.float(), images.shape[-2:], mode="bilinear", align_corners=False)


def _slide(predictor: Predictor, images: torch.Tensor, window: tuple[int, int],
           stride: tuple[int, int]) -> torch.Tensor:
    """Average the logits of overlapping windows; the image is padded up to one window."""
    (h, w), (wh, ww), (sh, sw) = images.shape[-2:], window, stride
    pad_h, pad_w = max(wh - h, 0), max(ww - w, 0)
    padded = F.pad(images, (0, pad_w, 0, pad_h))
    ph, pw = padded.shape[-2:]
    total = count = None
    for top in sorted({*range(0, ph - wh + 1, sh), ph - wh}):
        for left in sorted({*range(0, pw - ww + 1, sw), pw - ww}):
            logits = _logits(predictor, padded[..., top:top + wh, left:left + ww])
            if total is None:
                total = logits.new_zeros(logits.shape[0], logits.shape[1], ph, pw)
                count = logits.new_zeros(1, 1, ph, pw)
            total[..., top:top + wh, left:left + ww] += logits
            count[..., top:top + wh, left:left + ww] += 1
    return (total / count)[..., :h, :w]


def predict_labels(predictor: Predictor, images: torch.Tensor, mode: EvalMode) -> torch.Tensor:
    """Labels at the input resolution under the given mode (softmax scores are averaged)."""
    if mode.name == "whole" and not mode.flip and tuple(mode.scales) == (1.0,):
        out = predictor(images)
        if out.dim() == 3:
            return out.long()
        return _logits(predictor, images) if out.shape[-2:] != images.shape[-2:] else out
    size = images.shape[-2:]
    score = 0.0
    for scale in mode.scales:
        scaled = images if scale == 1.0 else F.interpolate(
            images, scale_factor=scale, mode="bilinear", align_corners=False)
        for flip in (False, True) if mode.flip else (False,):
            x = scaled.flip(-1) if flip else scaled
            if mode.name == "slide":
                if mode.window is None:
                    raise ValueError("slide evaluation needs a window size")
                logits = _slide(predictor, x, mode.window, mode.stride or mode.window)
            else:
                logits = _logits(predictor, x)
            logits = logits.flip(-1) if flip else logits
            logits = F.interpolate(logits, size, mode="bilinear", align_corners=False)
            score = score + logits.softmax(1)
    return score


def evaluate(predictor: Predictor, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
             num_classes: int, ignore_index: int = 255, mode: EvalMode | None = None,
             description: str = "evaluate", total: int | None = None) -> dict:
    """mIoU, per-class IoU and pixel accuracy of a predictor over (image, mask) batches."""
    mode = mode or EvalMode()
    matrix = ConfusionMatrix(num_classes, ignore_index)
    with progress_bar() as progress:
        task = progress.add_task(description, total=total)
        for images, masks in batches:
            out = predict_labels(predictor, images, mode)
            if out.dim() == 4:
                if out.shape[-2:] != masks.shape[-2:]:
                    out = F.interpolate(out, masks.shape[-2:], mode="bilinear", align_corners=False)
                out = out.argmax(1)
            matrix.update(masks, out)
            progress.advance(task)
    return {**matrix.compute(), "mode": mode.describe(), "num_classes": num_classes}


def summarize_variants(rows: Sequence[dict]) -> list[dict]:
    """mIoU mean, sample standard deviation, min and max over the seeds of each variant.

    A KD gain means something only against the spread of equally trained baselines.
    """
    groups: dict[str, list[float]] = {}
    for row in rows:
        groups.setdefault(row["variant"], []).append(row["miou"])
    summary = []
    for variant, values in groups.items():
        scores = torch.tensor(values, dtype=torch.float64)
        std = float(scores.std()) if len(values) > 1 else None
        summary.append({"variant": variant, "seeds": len(values), "mean": float(scores.mean()),
                        "std": std, "min": min(values), "max": max(values)})
    return summary


def print_variant_summary(rows: Sequence[dict]) -> None:
    from rich.table import Table

    from fakd_deploy.progress import console

    table = Table(title=f"val mIoU by variant ({rows[0]['mode'] if rows else ''})")
    for name in ("variant", "seeds", "mean", "std", "min", "max"):
        table.add_column(name, justify="left" if name == "variant" else "right")
    for item in summarize_variants(rows):
        table.add_row(item["variant"], str(item["seeds"]), f"{item['mean']:.2f}",
                      "-" if item["std"] is None else f"{item['std']:.2f}",
                      f"{item['min']:.2f}", f"{item['max']:.2f}")
    console.print(table)


def print_evaluation(result: dict, class_names: Sequence[str] | None = None) -> None:
    """A rich table of per-class IoU under the headline numbers."""
    from rich.table import Table

    from fakd_deploy.progress import console

    console.print(f"mIoU {result['miou']:.2f}  pixel acc {result['pixel_acc']:.2f}  "
                  f"mode {result['mode']}", soft_wrap=True)
    table = Table()
    table.add_column("class")
    table.add_column("IoU", justify="right")
    names = class_names or [str(i) for i in range(len(result["per_class_iou"]))]
    for name, iou in zip(names, result["per_class_iou"], strict=True):
        table.add_row(name, "-" if iou is None else f"{iou:.2f}")
    console.print(table)
