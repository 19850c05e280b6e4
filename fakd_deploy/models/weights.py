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
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import torch

from fakd_deploy.errors import CheckpointError
from fakd_deploy.inputs import open_regular
from fakd_deploy.utils import no_links

# Keys under which training frameworks commonly nest the state dict.
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")

# torch stores its archive's entries uncompressed, so a checkpoint unpacks to about its size
# on disk. A compressed entry may unpack to more, but not without bound: a few megabytes of
# deflated zeros ("a zip bomb") would otherwise take gigabytes before anything could refuse.
MAX_UNPACK_RATIO = 4
UNPACK_SLACK = 64 << 20


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
        check_unpacked_size(path, handle)
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


def check_unpacked_size(path: Path, handle: IO[bytes]) -> None:
    """Refuse an archive whose entries claim far more bytes than the file holds: torch
    allocates each entry's claimed size before it unpacks it."""
    on_disk = os.fstat(handle.fileno()).st_size
    try:
        if not zipfile.is_zipfile(handle):
            return
        with zipfile.ZipFile(handle) as archive:
            unpacked = sum(entry.file_size for entry in archive.infolist())
    except (zipfile.BadZipFile, ValueError, EOFError):
        return  # torch.load names a corrupt archive
    finally:
        handle.seek(0)
    if unpacked > max(MAX_UNPACK_RATIO * on_disk, on_disk + UNPACK_SLACK):
        raise CheckpointError(
            f"{path} unpacks to {unpacked / 2**20:.0f} MiB from {on_disk / 2**20:.1f} MiB on disk, "
            f"more than {MAX_UNPACK_RATIO}x; refusing to unpack it (torch saves checkpoints "
            "uncompressed, so this is not one)"
        )


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
