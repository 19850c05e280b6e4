"""Distil segmentation models with FAKD and deploy them to ONNX Runtime and TensorRT."""

__version__ = "0.2.0"
