"""The one place optional dependencies are looked up.

The core install has no torch, no onnxruntime and no TensorRT; a Jetson has TensorRT but
maybe no onnxruntime; a `[train]` install has torch but maybe no runtime at all. Code that
only wants to know what is there (version reports, the benchmark header) asks here and
gets "not installed" instead of an ImportError.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from types import ModuleType

NOT_INSTALLED = "not installed"


def load(name: str) -> ModuleType | None:
    """The module `name`, or None when it (or a library it needs) cannot be imported."""
    try:
        return importlib.import_module(name)
    except (ImportError, OSError):  # OSError: a wheel whose shared libraries are missing
        return None


def version(name: str) -> str:
    """The module's `__version__`, or "not installed"."""
    module = load(name)
    return NOT_INSTALLED if module is None else str(getattr(module, "__version__", "installed"))


def versions(*names: str) -> dict[str, str]:
    return {name: version(name) for name in names}


def installed(*distributions: str) -> str:
    """The version of the first of these distributions that is installed, read from its
    metadata without importing it (recording versions must not load a runtime), or
    "not installed"."""
    for distribution in distributions:
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return NOT_INSTALLED
