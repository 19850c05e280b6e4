"""Checkpoints: atomic saves, loads that say what is wrong, and import of weights trained elsewhere."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fakd_deploy.models.segmenter import Segmenter, build_model
from fakd_deploy.utils import save_torch

REQUIRED_KEYS = ("model", "arch")
# Keys under which training frameworks commonly nest the state dict.
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
SHOWN = 20


class CheckpointError(ValueError):
    """A checkpoint or state dict that cannot be used; the message names the file and the problem."""


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Atomic, so a run killed mid-save keeps its previous checkpoint."""
    return save_torch(payload, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    checkpoint = _read(path)
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(
            f"{path} is not a fakd-deploy checkpoint: it lacks {missing} (it has {_shortlist(checkpoint)}); "
            "weights trained elsewhere are read by import_state_dict (teacher.weights in a recipe)")
    return checkpoint


def model_from_checkpoint(checkpoint: Mapping[str, Any] | str | Path) -> Segmenter:
    """The checkpoint's model with its weights, in eval mode."""
    source = "the checkpoint" if isinstance(checkpoint, Mapping) else str(checkpoint)
    if not isinstance(checkpoint, Mapping):
        checkpoint = load_checkpoint(checkpoint)
    model = build_model(**checkpoint["arch"])
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        raise CheckpointError(f"the weights of {source} do not fit its arch {checkpoint['arch']}: "
                              f"{error}") from None
    return model.eval()


def import_state_dict(model: nn.Module, path_or_state: str | Path | Mapping[str, Any],
                      strip_prefix: Iterable[str] = (), rename: Mapping[str, str] | None = None,
                      allow_missing: bool = False, allow_unexpected: bool = False) -> dict[str, list[str]]:
    """Load weights trained elsewhere into `model`; returns {missing, unexpected, loaded} key lists.

    Keys are mapped in two steps: each prefix of `strip_prefix` is removed in order (e.g.
    "module." left by DataParallel), then each `rename` item is a regular expression applied
    with `re.sub` in order (e.g. {"^backbone\\.": "encoder.body."}). Missing and unexpected keys
    are an error that lists them unless allowed; a shape mismatch always is.
    """
    source = "the state dict" if isinstance(path_or_state, Mapping) else str(path_or_state)
    state = _unwrap(path_or_state if isinstance(path_or_state, Mapping) else _read(Path(path_or_state)))
    mapped = _map_keys(state, tuple(strip_prefix), dict(rename or {}), source)
    own = model.state_dict()
    # BatchNorm step counters are not weights; old checkpoints lack them and torch tolerates that.
    missing = sorted(k for k in own if k not in mapped and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in mapped if k not in own)
    mismatched = [f"{k} {tuple(mapped[k].shape)} vs {tuple(own[k].shape)} in the model"
                  for k in sorted(own) if k in mapped and mapped[k].shape != own[k].shape]
    problems = []
    if missing and not allow_missing:
        problems.append(f"{len(missing)} missing keys: {_shortlist(missing)}")
    if unexpected and not allow_unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_shortlist(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches: {_shortlist(mismatched)}")
    if problems:
        raise CheckpointError(f"cannot import {source}: " + "; ".join(problems)
                              + " (map keys with strip_prefix/rename, or allow_missing/allow_unexpected)")
    loaded = {k: v for k, v in mapped.items() if k in own}
    model.load_state_dict(loaded, strict=False)
    return {"missing": missing, "unexpected": unexpected, "loaded": sorted(loaded)}


def _read(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # zip, pickle and EOF errors alike mean an unusable file
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?): "
                              f"{type(error).__name__}: {error}") from None


def _unwrap(state: Mapping[str, Any]) -> Mapping[str, Any]:
    for key in WRAPPER_KEYS:
        if isinstance(state.get(key), Mapping):
            return _unwrap(state[key])
    return state


def _map_keys(state: Mapping[str, Any], strip_prefix: tuple[str, ...], rename: dict[str, str],
              source: str) -> dict[str, Tensor]:
    mapped: dict[str, Tensor] = {}
    for original, value in state.items():
        key = original
        for prefix in strip_prefix:
            key = key.removeprefix(prefix)
        for pattern, replacement in rename.items():
            key = re.sub(pattern, replacement, key)
        if key in mapped:
            raise CheckpointError(f"cannot import {source}: two keys map to '{key}' (check rename)")
        mapped[key] = value
    return mapped


def _shortlist(keys: Iterable[str]) -> str:
    keys = list(keys)
    more = f" ... and {len(keys) - SHOWN} more" if len(keys) > SHOWN else ""
    return ", ".join(keys[:SHOWN]) + more
