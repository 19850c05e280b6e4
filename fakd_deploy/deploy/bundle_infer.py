"""Run the bundled segmentation model on an image or a folder of images; write colour masks.

    python infer.py IMAGE_OR_FOLDER --out DIR

Standalone: numpy, Pillow, and onnxruntime (for an .onnx model) or TensorRT with
cuda-python (for an engine). What to feed the model is in preprocess.json beside this
file, the class colours in palette.json. Per image it writes <stem>.labels.png (class
ids, palette-coloured) and <stem>.overlay.png (the image blended with the colours), both
at the image's size. Resizing is bilinear with half-pixel centres and no antialiasing, as
in training; logits are resized back bilinearly, labels by nearest neighbour.

Images are read under the rules of `fakd-deploy predict`, so both give the same answer
for every file: regular files only, at most MAX_IMAGE_PIXELS pixels, fully decoded, one
frame, 8-bit colours (grey, palette, bilevel and YCbCr are converted; an alpha band must be
opaque; 16-bit, float and CMYK images are refused). An image it cannot use, an output
that would replace an input or lead out of --out (a link there), or a class id that an 8-bit
PNG cannot hold, is one line on stderr naming it, and exit code 2. Each PNG is written to a
hidden temporary file beside it and renamed into place; Ctrl-C, SIGTERM or SIGHUP removes
that file and exits 130.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import stat
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

HERE = Path(__file__).resolve().parent
# The rules of fakd_deploy.data (datasets.IMAGE_SUFFIXES, inputs.MAX_IMAGE_PIXELS and
# base.COLOUR/ALPHA), copied because the bundle runs without fakd-deploy;
# tests/test_package.py checks that both refuse the same images with the same words.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MAX_IMAGE_PIXELS = 89_478_485
COLOUR = {"RGB", "L", "1", "P", "YCbCr"}
ALPHA = {"RGBA": "RGB", "LA": "L", "PA": "P", "RGBa": "RGB", "La": "L"}
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

Runner = Callable[[np.ndarray], np.ndarray]


class Refused(Exception):
    """An input infer.py cannot use: main prints it as one line and exits 2, as fakd-deploy does."""


def open_regular(path: Path) -> Any:
    """`path` opened for reading if it is a regular file, checked on the open descriptor so
    a FIFO cannot hang the read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise Refused(f"image not found: {path}") from None
    except OSError as failure:
        raise Refused(f"cannot read image {path}: {failure.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file (a FIFO, socket or device)"
        raise Refused(f"image {path} is {kind}; only regular files are read")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def decode(path: Path) -> Image.Image:
    """The image fully decoded, its size checked before decoding (a bomb is refused, not
    just warned about)."""
    with open_regular(path) as handle:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(handle)
                if image.width * image.height > MAX_IMAGE_PIXELS:
                    raise Image.DecompressionBombError(f"{image.width}x{image.height}")
                image.load()
                frames = getattr(image, "n_frames", 1)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise Refused(
                f"{path} has more than {MAX_IMAGE_PIXELS:,} pixels, the limit for an image "
                "(decoding it could take gigabytes)"
            ) from None
        except UnidentifiedImageError:  # its message names the file descriptor, not the file
            raise Refused(f"{path} is not a readable image: no image format Pillow reads") from None
        except (OSError, SyntaxError, ValueError) as error:
            raise Refused(f"{path} is not a readable image (truncated or corrupt?): {error}") from None
    if frames > 1:
        raise Refused(f"{path} holds {frames} frames (an animation or a stack); give one image per file")
    return image


def open_image(path: Path) -> Image.Image:
    """The image as 8-bit RGB; a transparent pixel, or a 16-bit, float or CMYK image, has no
    one conversion to it, so it is refused rather than guessed."""
    image = decode(path)
    if image.mode == "PA" or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")  # a palette's transparent entry: colours with alpha
    if image.mode in ALPHA:
        if (np.asarray(image.getchannel("A")) != 255).any():
            raise Refused(
                f"{path} is a {image.mode} image with transparent pixels, whose colour or class is "
                "undefined; save it without an alpha channel"
            )
        image = image.convert(ALPHA[image.mode])
    if image.mode not in COLOUR:
        raise Refused(
            f"{path} is a {image.mode} image; images are read as 8-bit RGB: convert it "
            "(16-bit, float and CMYK images have no single conversion)"
        )
    return image.convert("RGB")


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
    """The image given, or the image files (regular files only) of a folder, sorted by name."""
    if source.is_dir():
        inside = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not inside:
            raise Refused(f"{source} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
        return inside
    if not source.exists():
        raise Refused(f"image not found: {source}")
    if not source.is_file():
        raise Refused(f"{source} is not a regular file; give image files or folders of them")
    return [source]


def inside(out: Path, name: str) -> Path:
    """out/name, refused when it leads out of `out` (a link there to elsewhere): the rule of
    `fakd-deploy predict` (RunFolder.inside), in its words."""
    path = out / name
    if not path.resolve().is_relative_to(out.resolve()):
        raise Refused(f"'{name}' leads outside the folder {out}")
    return path


def outputs_of(images: list[Path], out: Path, inputs: list[Path]) -> list[tuple[Path, Path]]:
    """(labels, overlay) per image, refused up front when two images share a stem, an output
    leads out of `out`, or it would replace an input (the same file, through any name or link)."""
    stems: dict[str, Path] = {}
    for image in images:
        if image.stem in stems:
            raise Refused(
                f"{stems[image.stem]} and {image} would both write {image.stem}.labels.png; "
                "rename one or run them into different --out folders"
            )
        stems[image.stem] = image
    pairs = [(inside(out, f"{stem}.labels.png"), inside(out, f"{stem}.overlay.png")) for stem in stems]
    for output in (path for pair in pairs for path in pair if path.exists()):
        for source in inputs:
            if os.path.samefile(output, source):
                raise Refused(f"writing {output} would overwrite the input {source}; choose another --out")
    return pairs


def save_png(image: Image.Image, path: Path) -> None:
    """Write `path` through a hidden temporary file beside it, renamed into place: a failure
    or a signal leaves the previous file (or none), never a truncated one, and a link at
    `path` is replaced, not written through."""
    tmp = path.with_name(f".{path.name}.{os.urandom(8).hex()}.tmp")
    try:
        with open(tmp, "xb") as handle:  # O_EXCL: never an existing file or link
            image.save(handle, format="PNG")
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def stop(signum: int, frame: Any) -> None:
    """SIGTERM or SIGHUP as Ctrl-C: raised, so the temporary file being written is removed;
    later signals are ignored while that happens."""
    for sig in STOP_SIGNALS:
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, signal.SIG_IGN)
    raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Colour masks from the bundled segmentation model.")
    parser.add_argument("source", type=Path, help="an image, or a folder of images")
    parser.add_argument("--out", type=Path, default=Path("masks"), help="folder for the masks")
    parser.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the colours")
    args = parser.parse_args(argv)
    try:
        masks(args.source, args.out, args.alpha)
    except Refused as error:
        print(f"error: {CONTROL.sub(lambda m: ascii(m.group())[1:-1], str(error))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stopped:
        print(f"interrupted: {stopped}" if str(stopped) else "interrupted", file=sys.stderr)
        return 130
    return 0


def masks(source: Path, out: Path, alpha: float) -> None:
    """Per image of `source`, its labels and overlay PNGs in `out`."""
    if not 0 <= alpha <= 1:
        raise Refused(f"--alpha {alpha} is not an opacity from 0 to 1")
    if out.exists() and not out.is_dir():
        raise Refused(f"--out {out} is a file; masks go into a folder")
    spec = json.loads((HERE / "preprocess.json").read_text())
    classes = json.loads((HERE / "palette.json").read_text())["classes"]
    colours = np.zeros((max([256, *(entry["id"] + 1 for entry in classes)]), 3), dtype=np.uint8)
    for entry in classes:
        colours[entry["id"]] = entry["rgb"]
    model = HERE / spec["model"]
    images = images_of(source)
    outputs = outputs_of(images, out, [*images, model])
    run = engine_runner(model) if spec["runtime"] == "tensorrt" else onnx_runner(model, spec["providers"])
    out.mkdir(parents=True, exist_ok=True)
    for path, (labels_path, overlay_path) in zip(images, outputs, strict=True):
        image = open_image(path)
        labels = predict(run, np.asarray(image), spec)
        if labels.max() > 255:  # a model of more than 256 classes: no wrapped ids
            raise Refused(f"class id {labels.max()} does not fit an 8-bit label PNG")
        mask = Image.fromarray(labels.astype(np.uint8))
        mask.putpalette(colours[:256].flatten().tolist())
        save_png(mask, labels_path)
        save_png(Image.blend(image, Image.fromarray(colours[labels]), alpha), overlay_path)
        print(labels_path)


if __name__ == "__main__":
    for sig in STOP_SIGNALS:
        if signal.getsignal(sig) is not signal.SIG_IGN:  # one ignored at start (nohup) stays so
            signal.signal(sig, stop)
    sys.exit(main())
