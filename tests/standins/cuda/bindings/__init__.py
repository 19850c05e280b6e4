"""`cuda.bindings` of cuda-python, replaced by stand-ins."""

__version__ = "12.9.0"
