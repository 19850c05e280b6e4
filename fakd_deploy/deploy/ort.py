"""ONNX Runtime sessions as Predictors (FP32 and QDQ INT8 models alike)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from fakd_deploy.deploy.shapes import run_fixed_batch

PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")


def default_providers(device: str = "auto") -> list[str]:
    """CUDA first where this onnxruntime build has it, CPU always as the fallback."""
    available = ort.get_available_providers()
    wanted = ["CPUExecutionProvider"] if device == "cpu" else PREFERRED_PROVIDERS
    return [name for name in wanted if name in available]


class OrtPredictor:
    """An ONNX model as a Predictor: logits (N, C, H, W) or, for argmax exports, labels (N, H, W)."""

    def __init__(self, model: str | Path | bytes, providers: list[str] | None = None,
                 threads: int | None = None) -> None:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        source = model if isinstance(model, bytes) else str(model)
        self.session = ort.InferenceSession(source, options,
                                            providers=providers or default_providers())
        first = self.session.get_inputs()[0]
        self.input_name = first.name
        self.output_name = self.session.get_outputs()[0].name
        self.static_batch = first.shape[0] if isinstance(first.shape[0], int) else None
        height, width = first.shape[2:]
        self.input_size = ((height, width) if isinstance(height, int) and isinstance(width, int)
                           else None)

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def _run(self, images: torch.Tensor) -> torch.Tensor:
        feed = {self.input_name: np.ascontiguousarray(images.numpy(), dtype=np.float32)}
        (out,) = self.session.run([self.output_name], feed)
        return torch.from_numpy(out)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return run_fixed_batch(self._run, images.detach().float().cpu(), self.static_batch)
