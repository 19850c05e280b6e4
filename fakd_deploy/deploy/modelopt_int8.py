"""`X.qdq.onnx` made by NVIDIA Model Optimizer instead of fakd-deploy's own placement.

`deploy.quantizer: modelopt` runs `python -m modelopt.onnx.quantization` (nvidia-modelopt,
Apache-2.0; install it without its `[onnx]` extra, which would swap onnxruntime for
onnxruntime-gpu and pin an older onnx) on the CPU, in a process of its own: Model Optimizer
patches ONNX Runtime's quantizer classes when it runs, and those patches must not leak into
the project's own quantization. The remainder stays FP32 (`--high_precision_dtype=fp32`):
Model Optimizer's default FP16 remainder is mis-run by ONNX Runtime's CPU provider, so
that model could not be scored before a GPU runs it. Model Optimizer drops the model's
metadata; it is copied back, and the result is checked against TensorRT's rules like any
other `X.qdq.onnx`.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from fakd_deploy.deploy.onnx_meta import load_onnx, model_metadata, write_metadata
from fakd_deploy.errors import BackendUnavailable, BadInput, BuildError
from fakd_deploy.utils import SCRATCH, atomic_write, file_sha256

INSTALL_HINT = (
    "deploy.quantizer=modelopt needs NVIDIA Model Optimizer and what its ONNX quantizer imports: "
    "pip install 'fakd-deploy[modelopt]' (not nvidia-modelopt[onnx], see docs/deploy.md)"
)
# fakd-deploy's calibration methods as Model Optimizer names them (it has no percentile)
METHODS = {"minmax": "max", "entropy": "entropy"}


# what `modelopt.onnx` imports that `pip install nvidia-modelopt` alone does not bring
NEEDED = ("modelopt", "onnx_graphsurgeon", "onnxconverter_common", "polygraphy", "lief")


def available() -> str | None:
    """Why Model Optimizer cannot run here, or None when it and its ONNX dependencies are
    installed (without them it fails, asking for the `[onnx]` extra that must not be installed)."""
    missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
    return f"{INSTALL_HINT}; missing here: {', '.join(missing)}" if missing else None


def quantize_modelopt_int8(
    onnx_path: str | Path, out: str | Path, calib_images: Iterable[Any], method: str = "minmax"
) -> Path:
    """Model Optimizer's INT8 Q/DQ model of `onnx_path` (`X.qdq.onnx`), calibrated on
    `calib_images` and checked against TensorRT's rules; one line naming what failed otherwise."""
    from fakd_deploy.artifacts import ModelInfo
    from fakd_deploy.deploy.inputs import input_geometry, model_input
    from fakd_deploy.deploy.quantize import calibration_feeds, check_for_tensorrt

    if method not in METHODS:
        raise BadInput(
            f"calibration method '{method}' is not one Model Optimizer has: use {' or '.join(METHODS)}"
        )
    reason = available()
    if reason:
        raise BackendUnavailable(reason)
    onnx_path, out = Path(onnx_path), Path(out)
    source = load_onnx(onnx_path, load_external_data=False)
    batch, size = input_geometry(source)
    info = ModelInfo.from_metadata(model_metadata(source), size, onnx_path)
    feeds = [
        model_input(feed, info.input, info.normalise) for feed in calibration_feeds(calib_images, size, batch)
    ]
    scratch = out.parent / SCRATCH
    scratch.mkdir(parents=True, exist_ok=True)
    calib = scratch / f"{out.name}.calib.npy"
    result = scratch / f"{out.name}.modelopt.onnx"
    np.save(calib, np.concatenate(feeds))
    command = [
        sys.executable,
        "-m",
        "modelopt.onnx.quantization",
        f"--onnx_path={onnx_path}",
        "--quantize_mode=int8",
        f"--calibration_data_path={calib}",
        f"--calibration_method={METHODS[method]}",
        "--calibration_eps",
        "cpu",
        "--high_precision_dtype=fp32",
        f"--output_path={result}",
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0 or not result.is_file():
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise BuildError(f"Model Optimizer could not quantize {onnx_path}: {last}")
        quantized = check_for_tensorrt(onnx.load(str(result)))
        metadata: dict[str, Any] = {
            **model_metadata(source),
            "precision": "int8",
            "calib_method": method,
            "calib_images": int(sum(len(feed) for feed in feeds)),
            "source_sha256": file_sha256(onnx_path),
            "activations": "int8-symmetric",
            "quantizer": "modelopt",
        }
        write_metadata(quantized, metadata)
        return atomic_write(out, lambda tmp: onnx.save_model(quantized, str(tmp)))
    finally:
        calib.unlink(missing_ok=True)
        result.unlink(missing_ok=True)
