"""Reading weight files without running code: the one leaf both checkpoints and encoders use.

`.pt`/`.pth`/`.bin` files load with `torch.load(weights_only=True)` (tensors and plain values
only; a file that pickles anything else is refused, naming the object), `.safetensors` files
with safetensors. `unwrap_state` finds the state dict inside the wrappers training frameworks
save ({"state_dict": ...}, {"model": ...}).
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import torch

from fakd_deploy.errors import CheckpointError
from fakd_deploy.inputs import open_regular
from fakd_deploy.utils import no_links

# Keys under which training frameworks commonly nest the state dict.
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")


def read_tensors(path: Path) -> Any:
    """A `.pt`/`.pth`/`.bin` file (tensors and plain values only) or a `.safetensors` file.

    Only a regular file is read (a FIFO or device would never end), never through a link
    inside a run folder that this process writes.
    """
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    if not os.path.lexists(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    with open_regular(no_links(path), "checkpoint", CheckpointError) as handle:
        return _load(path, handle)


def _load(path: Path, handle: IO[bytes]) -> Any:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load

            return load(handle.read())
        return torch.load(handle, map_location="cpu", weights_only=True)
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


def first_unusable(state: Mapping[str, Any]) -> str | None:
    """The first tensor of a state dict that no model should compute with, described: a NaN
    or infinite value anywhere, or a negative BatchNorm variance (its square root is NaN)."""
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            continue
        if not bool(torch.isfinite(tensor).all()):
            kind = "NaN" if bool(torch.isnan(tensor).any()) else "infinite values"
            return f"'{name}' holds {kind}"
        if name.endswith("running_var") and bool((tensor < 0).any()):
            return f"'{name}' holds a negative variance"
    return None
