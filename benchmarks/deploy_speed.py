"""PyTorch eager FP32 vs ONNX Runtime FP32 vs ONNX Runtime INT8, measured in one run.

    python benchmarks/deploy_speed.py                       # random-weight DeepLabV3-R18, 360x480
    python benchmarks/deploy_speed.py runs/camvid_cpu/students/fakd_kd_s0/best.pt \
        --recipe recipes/camvid_cpu.yaml --max-images 50    # a trained student, with mIoU

Batch 1, `--threads` CPU threads for both runtimes, latency p50 after a time-based
warm-up. INT8 is the ONNX Runtime flavour `fakd-deploy build --backend ort-int8` makes.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fakd_deploy.deploy.export import export_onnx, load_student
from fakd_deploy.deploy.measure import measure_latency
from fakd_deploy.deploy.ort import OrtPredictor
from fakd_deploy.deploy.quantize import quantize_ort_int8
from fakd_deploy.deploy.rows import Latency
from fakd_deploy.evaluate import evaluate
from fakd_deploy.models import TorchPredictor
from fakd_deploy.predictor import FixedSizePredictor, Predictor


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "checkpoint",
        nargs="?",
        type=Path,
        help="student checkpoint (default: random-weight DeepLabV3-R18, OS 8)",
    )
    parser.add_argument(
        "--recipe",
        type=Path,
        help="recipe whose val split gives mIoU and whose training images calibrate INT8",
    )
    parser.add_argument("--height", type=int, default=360)
    parser.add_argument("--width", type=int, default=480)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--calib", type=int, default=16, help="calibration images")
    parser.add_argument("--max-images", type=int, help="score only the first N val images")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        help="recipe override, e.g. --set data.val_resize=null",
    )
    return parser.parse_args()


def load_model(checkpoint: Path | None) -> nn.Module:
    if checkpoint:
        return load_student(checkpoint)[0].eval()
    from fakd_deploy.models import build_model

    torch.manual_seed(0)
    return build_model("deeplabv3", 11, "resnet18", output_stride=8).eval()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    size = (args.height, args.width)
    recipe = None
    if args.recipe:
        from fakd_deploy.recipe import load_recipe

        recipe = load_recipe(args.recipe, args.overrides)
    model = load_model(args.checkpoint)
    rng = np.random.default_rng(0)
    if recipe:
        from fakd_deploy.data.splits import calibration_images

        calib = list(calibration_images(recipe.data, args.calib))
    else:
        calib = [rng.standard_normal((1, 3, *size), dtype=np.float32) for _ in range(args.calib)]

    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "model.onnx"
        export = export_onnx(
            model, fp32, *size, parity_batches=[rng.standard_normal((1, 3, *size), dtype=np.float32)]
        )
        int8 = quantize_ort_int8(fp32, Path(tmp) / "model.int8.onnx", calib, "minmax")
        predictors: dict[str, Predictor] = {
            "pytorch eager fp32": TorchPredictor(model, "cpu", args.threads),
            "onnxruntime fp32": OrtPredictor(fp32, threads=args.threads),
            "onnxruntime int8": OrtPredictor(int8, threads=args.threads),
        }
        images = rng.standard_normal((1, 3, *size), dtype=np.float32)
        p50 = {
            name: Latency.of(measure_latency(p, images, args.warmup, args.seconds)).p50
            for name, p in predictors.items()
        }
        probe = rng.standard_normal((2, 3, *size), dtype=np.float32)
        agreement = float(
            (
                predictors["onnxruntime int8"](probe).argmax(1)
                == predictors["onnxruntime fp32"](probe).argmax(1)
            ).mean()
        )
        miou = {}
        if recipe:
            from fakd_deploy.data.splits import ValBatches, dataset_info

            num_classes, _ = dataset_info(recipe.data)
            for name, predictor in predictors.items():
                data = ValBatches(recipe.data, max_images=args.max_images)
                miou[name] = evaluate(
                    FixedSizePredictor(predictor, size),
                    data,
                    num_classes,
                    recipe.data.ignore_index,
                    description=name,
                    total=len(data),
                )["miou"]

    source = args.checkpoint or "DeepLabV3-R18 OS8, random weights"
    print(
        f"{source} at {size[0]}x{size[1]}, batch 1, {args.threads} threads, torch "
        f"{torch.__version__}; export parity max |Δ| {export['max_abs_diff']:.1e}"
    )
    for name, value in p50.items():
        extra = f"  mIoU {miou[name]:.2f}" if name in miou else ""
        print(f"  {name:20s} p50 {value:8.1f} ms{extra}")
    eager, ort_fp32, ort_int8 = p50.values()
    print(
        f"  speed-up vs eager: onnxruntime fp32 {eager / ort_fp32:.2f}x, "
        f"onnxruntime int8 {eager / ort_int8:.2f}x; int8 vs fp32 onnxruntime "
        f"{ort_fp32 / ort_int8:.2f}x; int8/fp32 argmax agreement {100 * agreement:.2f} %"
    )


if __name__ == "__main__":
    main()
