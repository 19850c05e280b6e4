"""`from cuda.bindings import runtime` in a subprocess: one simulated GPU (tests/standins/fake_cuda.py)."""

import sys

from fake_cuda import FakeCudaRuntime

sys.modules[__name__] = FakeCudaRuntime()
