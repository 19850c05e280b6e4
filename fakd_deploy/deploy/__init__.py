"""Deployment: ONNX export, ONNX Runtime and TensorRT builds, benchmarks and reports.

Every backend is wrapped as a `fakd_deploy.evaluate.Predictor`, so the mIoU of an
engine is computed by the same code as the mIoU of the PyTorch model it came from.
"""

from __future__ import annotations


class BackendUnavailable(RuntimeError):
    """A backend cannot run on this machine (library or GPU missing, engine built elsewhere)."""


class ExportError(RuntimeError):
    """An exported model does not reproduce the PyTorch model within tolerance."""


def error_summary(error: BaseException) -> str:
    """The error's type and first line: enough for a table cell or a warning."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"
