"""Run the bundled segmentation model on an image or a folder of images; write colour masks.

    python infer.py IMAGE_OR_FOLDER --out DIR

Standalone: numpy, Pillow, and onnxruntime (for an .onnx model) or TensorRT with
cuda-python (for an engine). What to feed the model is in preprocess.json beside this
file, the class colours in palette.json. Per image it writes <stem>.labels.png (class
ids, palette-coloured) and <stem>.overlay.png (the image blended with the colours), both
at the image's size. Resizing is bilinear with half-pixel centres and no antialiasing, as
in training; logits are resized back bilinearly, labels by nearest neighbour.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}

Runner = Callable[[np.ndarray], np.ndarray]


def _taps(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    src = (np.arange(size_out, dtype=np.float64) + 0.5) * (size_in / size_out) - 0.5
    src = np.maximum(src, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), size_in - 1)
    i1 = np.minimum(i0 + 1, size_in - 1)
    return i0, i1, (src - i0).astype(np.float32)


def resize_bilinear(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of the last two axes (half-pixel centres, as torch's align_corners=False)."""
    (h_in, w_in), (h_out, w_out) = x.shape[-2:], size
    if (h_in, w_in) == (h_out, w_out):
        return x
    x = x.astype(np.float32, copy=False)
    r0, r1, rw = _taps(h_in, h_out)
    rows = x[..., r0, :] * (1 - rw)[:, None] + x[..., r1, :] * rw[:, None]
    c0, c1, cw = _taps(w_in, w_out)
    return rows[..., c0] * (1 - cw) + rows[..., c1] * cw


def resize_nearest(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    (h_in, w_in), (h_out, w_out) = x.shape[-2:], size
    rows = np.minimum(np.floor(np.arange(h_out) * (h_in / h_out)).astype(np.int64), h_in - 1)
    cols = np.minimum(np.floor(np.arange(w_out) * (w_in / w_out)).astype(np.int64), w_in - 1)
    return x[..., rows[:, None], cols[None, :]]


def prepare(image: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """An (H, W, 3) uint8 RGB image as the model takes it, batch of one, at its input size."""
    size = (int(spec["input_size"][0]), int(spec["input_size"][1]))
    if spec["input"] == "float":
        x = np.asarray(image, dtype=np.float32) / np.float32(spec["pixel_scale"])
        x = (x - np.asarray(spec["mean"], dtype=np.float32)) / np.asarray(spec["std"], dtype=np.float32)
        return resize_bilinear(np.ascontiguousarray(x.transpose(2, 0, 1))[None], size)
    pixels = resize_bilinear(np.asarray(image, dtype=np.float32).transpose(2, 0, 1)[None], size)
    if spec["input"] == "uint8":
        return np.ascontiguousarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1))
    return np.ascontiguousarray(pixels, dtype=np.float32)


def onnx_runner(path: Path, providers: list[str]) -> Runner:
    import onnxruntime as ort

    usable = [p for p in providers if p in ort.get_available_providers()] or ["CPUExecutionProvider"]
    session = ort.InferenceSession(str(path), providers=usable)
    name, output = session.get_inputs()[0].name, session.get_outputs()[0].name
    return lambda x: session.run([output], {name: x})[0]


def _cuda(result: Any) -> Any:
    error, *values = result
    if int(error) != 0:
        raise RuntimeError(f"CUDA error {getattr(error, 'name', error)}")
    return values[0] if values else None


def engine_runner(path: Path) -> Runner:
    import tensorrt as trt

    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        from cuda import cudart  # cuda-python 12.x before 12.6

    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        sys.exit(f"{path}: TensorRT could not load the engine (built for another GPU or TensorRT?)")
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    source = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
    target = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
    stream = _cuda(cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking))
    kinds = cudart.cudaMemcpyKind

    def run(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=trt.nptype(engine.get_tensor_dtype(source)))
        context.set_input_shape(source, x.shape)
        y = np.empty(tuple(context.get_tensor_shape(target)), trt.nptype(engine.get_tensor_dtype(target)))
        device_x, device_y = _cuda(cudart.cudaMalloc(x.nbytes)), _cuda(cudart.cudaMalloc(y.nbytes))
        try:
            context.set_tensor_address(source, device_x)
            context.set_tensor_address(target, device_y)
            _cuda(
                cudart.cudaMemcpyAsync(
                    device_x, x.ctypes.data, x.nbytes, kinds.cudaMemcpyHostToDevice, stream
                )
            )
            if not context.execute_async_v3(stream):
                raise RuntimeError("TensorRT execution failed")
            _cuda(
                cudart.cudaMemcpyAsync(
                    y.ctypes.data, device_y, y.nbytes, kinds.cudaMemcpyDeviceToHost, stream
                )
            )
            _cuda(cudart.cudaStreamSynchronize(stream))
        finally:
            cudart.cudaFree(device_x)
            cudart.cudaFree(device_y)
        return y

    return run


def predict(run: Runner, image: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """(H, W) class ids for an (H, W, 3) uint8 image."""
    x = prepare(image, spec)
    batch = spec.get("batch")
    if batch and batch > 1:  # a static batch takes exactly that many images
        x = np.concatenate([x, np.zeros((batch - 1, *x.shape[1:]), x.dtype)])
    out = run(x)[:1]
    size = image.shape[:2]
    if out.ndim == 4:
        return resize_bilinear(out.astype(np.float32), size).argmax(1)[0]
    return resize_nearest(out.astype(np.int64), size)[0]


def images_of(source: Path) -> list[Path]:
    if source.is_dir():
        return sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not source.is_file():
        sys.exit(f"{source}: no such image or folder")
    return [source]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Colour masks from the bundled segmentation model.")
    parser.add_argument("source", type=Path, help="an image, or a folder of images")
    parser.add_argument("--out", type=Path, default=Path("masks"), help="folder for the masks")
    parser.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the colours")
    args = parser.parse_args(argv)
    spec = json.loads((HERE / "preprocess.json").read_text())
    colours = np.zeros((256, 3), dtype=np.uint8)
    for entry in json.loads((HERE / "palette.json").read_text())["classes"]:
        colours[entry["id"]] = entry["rgb"]
    model = HERE / spec["model"]
    run = engine_runner(model) if spec["runtime"] == "tensorrt" else onnx_runner(model, spec["providers"])
    images = images_of(args.source)
    if len({p.stem for p in images}) != len(images):
        sys.exit("two images share a file name stem; their masks would overwrite each other")
    args.out.mkdir(parents=True, exist_ok=True)
    for path in images:
        image = Image.open(path).convert("RGB")
        labels = predict(run, np.asarray(image), spec)
        mask = Image.fromarray(labels.astype(np.uint8))
        mask.putpalette(colours.flatten().tolist())
        mask.save(args.out / f"{path.stem}.labels.png")
        Image.blend(image, Image.fromarray(colours[labels]), args.alpha).save(
            args.out / f"{path.stem}.overlay.png"
        )
        print(args.out / f"{path.stem}.labels.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
