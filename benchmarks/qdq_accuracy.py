"""FP32 vs TensorRT INT8 model (run by ONNX Runtime on CPU) vs ONNX Runtime UINT8 model: mIoU and latency.

    python benchmarks/qdq_accuracy.py runs/camvid_cpu/students/fakd_kd_s0/best.pt \
        --recipe recipes/camvid_cpu.yaml
    python benchmarks/qdq_accuracy.py runs/camvid_cpu/deploy/fakd_kd.onnx --recipe recipes/camvid_cpu.yaml

The TensorRT model (`X.qdq.onnx`: symmetric INT8, Q/DQ placed for TensorRT's fusions) is
what trt-int8 and ort-trt-int8 build from; running it in ONNX Runtime on CPU shows its
accuracy without a GPU. A checkpoint is exported first (this needs torch); everything
after the export is numpy, onnx and onnxruntime. Scores come from the shared `evaluate`
on the recipe's val split; latency is the p50 at batch 1 on `--threads` CPU threads.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from fakd_deploy.data import splits
from fakd_deploy.data.preprocess import resize_bilinear
from fakd_deploy.deploy.measure import measure_latency
from fakd_deploy.deploy.ort import OrtPredictor
from fakd_deploy.deploy.quantize import quantize_ort_int8, quantize_tensorrt_int8
from fakd_deploy.deploy.rows import Latency
from fakd_deploy.evaluate import evaluate
from fakd_deploy.recipe import Recipe, load_recipe


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="student checkpoint (.pt) or exported FP32 .onnx")
    parser.add_argument(
        "--recipe",
        type=Path,
        required=True,
        help="recipe whose val split is scored and whose training images calibrate",
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="recipe override key=value (repeatable)"
    )
    parser.add_argument("--calib", type=int, default=32, help="calibration images")
    parser.add_argument("--method", default="minmax", choices=("minmax", "entropy", "percentile"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-images", type=int, help="score only the first N val images")
    parser.add_argument("--seconds", type=float, default=3.0, help="timing per model")
    return parser.parse_args()


def export(checkpoint: Path, recipe: Recipe, folder: Path) -> Path:
    """The checkpoint as ONNX at the recipe's export size (or its first val image's size)."""
    from fakd_deploy.deploy.export import export_onnx

    cfg = recipe.deploy.export
    height, width = cfg.height, cfg.width
    if height is None or width is None:
        image, _ = splits.val_dataset(recipe.data)[0]
        height, width = image.shape[-2:]
    out = folder / f"{checkpoint.parent.name or 'model'}.onnx"
    export_onnx(checkpoint, out, int(height), int(width))
    return out


class FixedSize:
    """Feed a fixed-size model images of any size; `evaluate` resizes the logits back."""

    def __init__(self, predictor: OrtPredictor) -> None:
        self.predictor = predictor

    def __call__(self, images: np.ndarray) -> np.ndarray:
        size = self.predictor.input_size
        if size and tuple(images.shape[-2:]) != tuple(size):
            images = resize_bilinear(images, size).astype(np.float32)
        return self.predictor(images)


def main() -> None:
    args = parse_args()
    recipe = load_recipe(args.recipe, args.overrides)
    with tempfile.TemporaryDirectory(prefix="qdq-accuracy-") as tmp:
        folder = Path(tmp)
        fp32 = args.model if args.model.suffix == ".onnx" else export(args.model, recipe, folder)
        stem = fp32.name.removesuffix(".onnx")
        calib = list(splits.calibration_images(recipe.data, args.calib))
        models = {
            "FP32 (X.onnx)": fp32,
            "TensorRT INT8 (X.qdq.onnx)": quantize_tensorrt_int8(
                fp32, folder / f"{stem}.qdq.onnx", calib, args.method
            ),
            "ORT UINT8 (X.int8.onnx)": quantize_ort_int8(
                fp32, folder / f"{stem}.int8.onnx", calib, args.method
            ),
        }
        num_classes, _ = splits.dataset_info(recipe.data)
        batches = splits.ValBatches(recipe.data, max_images=args.max_images)
        rows = []
        for name, path in models.items():
            predictor = OrtPredictor(path, threads=args.threads)
            miou = evaluate(
                FixedSize(predictor),
                batches,
                num_classes,
                recipe.data.ignore_index,
                description=name,
                total=len(batches),
            )["miou"]
            image = (
                np.zeros((1, 3, *predictor.input_size), np.float32)
                if predictor.input_size
                else next(iter(batches))[0][:1]
            )
            p50 = Latency.of(measure_latency(predictor, image, 1.0, args.seconds)).p50
            rows.append((name, miou, p50))
    reference = rows[0][1]
    print(
        f"{batches.images} val images, {args.calib} calibration images ({args.method}), "
        f"{args.threads} threads"
    )
    print("| model | mIoU | ΔmIoU vs FP32 | p50 ms (ORT CPU) |\n|---|---:|---:|---:|")
    for name, miou, p50 in rows:
        print(f"| {name} | {miou:.2f} | {miou - reference:+.2f} | {p50:.2f} |")


if __name__ == "__main__":
    main()
