"""Reading weight files without running code: the one leaf both checkpoints and encoders use.

`.pt`/`.pth`/`.bin` files load with `torch.load(weights_only=True)` (tensors and plain values
only; a file that pickles anything else is refused, naming the object), `.safetensors` files
with safetensors. `unwrap_state` finds the state dict inside the wrappers training frameworks
save ({"state_dict": ...}, {"model": ...}).
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fakd_deploy.errors import CheckpointError

# Keys under which training frameworks commonly nest the state dict.
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")


def read_tensors(path: Path) -> Any:
    """A `.pt`/`.pth`/`.bin` file (tensors and plain values only) or a `.safetensors` file."""
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        if found is None:
            raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?)") from None
        raise CheckpointError(
            f"{path} holds Python objects other than tensors and plain values "
            f"({found.group(1)}); refusing to unpickle it, since that could run "
            "code. Save a plain state dict instead."
        ) from None
    except OSError as error:
        raise CheckpointError(f"cannot read {path}: {error.strerror or error}") from None
    except Exception as error:  # zip, pickle and EOF errors alike mean an unusable file
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated or corrupt?): "
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        ) from None


def unwrap_state(state: Any) -> Mapping[str, Any]:
    """The state dict inside common wrappers ({"state_dict": ...}, {"model": ...})."""
    if not isinstance(state, Mapping):
        raise CheckpointError(f"expected a state dict, found a {type(state).__name__}")
    for key in WRAPPER_KEYS:
        if isinstance(state.get(key), Mapping):
            return unwrap_state(state[key])
    return state
