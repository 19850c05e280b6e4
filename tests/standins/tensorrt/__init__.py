"""`import tensorrt` in a subprocess: the stand-in at $FAKE_TENSORRT_VERSION (default 10.3.0)."""

import os
import sys

from cuda.bindings import runtime as _cudart
from fake_tensorrt import FakeTensorRT

sys.modules[__name__] = FakeTensorRT(os.environ.get("FAKE_TENSORRT_VERSION", "10.3.0"), cudart=_cudart)
