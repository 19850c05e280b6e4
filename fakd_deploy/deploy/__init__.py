"""Deployment: ONNX export, ONNX Runtime and TensorRT builds, benchmarks, reports, predictions.

Every backend is opened as a numpy `Predictor` (see `backends.py`), so the mIoU of an
engine is computed by the same code as the mIoU of the PyTorch model it came from.
"""
