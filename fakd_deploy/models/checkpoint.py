"""Checkpoints: one typed format, saved atomically and loaded without running any code.

Loading uses `torch.load(weights_only=True)`: tensors and plain Python values only, so a
crafted file cannot execute anything; it is refused with a message naming it. A checkpoint
is a plain dict on disk (readable with `torch.load` elsewhere) and a `Checkpoint` here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, cast

import torch
from torch import Tensor, nn

from fakd_deploy.errors import BadInput, CheckpointError, WriteFailed
from fakd_deploy.inputs import MAX_CHANNELS, MAX_CLASSES
from fakd_deploy.models.segmenter import Segmenter, build_model
from fakd_deploy.models.weights import read_tensors, unwrap_state
from fakd_deploy.recipe import Recipe, parse_recipe
from fakd_deploy.utils import atomic_write

FORMAT = "fakd-deploy checkpoint"
SHOWN = 20


@dataclass
class Checkpoint:
    """A model's weights, how to rebuild it, and where it came from.

    `best.pt` holds the student at its best validation; `last.pt` adds `training` (the
    distiller's adapters and FAKD estimators, optimiser, scheduler, grad scaler, RNG state,
    best metrics) so that an interrupted run resumes where it stopped.
    """

    model: dict[str, Tensor]
    arch: dict[str, Any]
    recipe: dict[str, Any] | None = None
    class_names: list[str] | None = None
    role: str = "student"
    variant: str | None = None
    seed: int | None = None
    step: int = 0
    complete: bool = True
    metrics: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] | None = None

    def save(self, path: str | Path) -> Path:
        """Atomic, so a run killed mid-save keeps its previous checkpoint."""
        payload = {"format": FORMAT, **asdict(self)}

        def write(tmp: Path) -> None:
            # Through a Python file, so that a full disk is the OS's ENOSPC (which atomic_write
            # names) rather than the zip writer's "unexpected pos" that replaces it.
            with open(tmp, "wb") as handle:
                stream = ErrorKeeping(handle)
                try:
                    torch.save(payload, cast(BinaryIO, stream))
                except RuntimeError as error:
                    if stream.error is not None:
                        raise stream.error from None
                    raise WriteFailed(f"cannot write {path}: {error} (is the disk full?)") from None

        return atomic_write(path, write)

    @classmethod
    def load(cls, path: str | Path) -> Checkpoint:
        path = Path(path)
        raw = read_tensors(path)
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path} holds a {type(raw).__name__}, not a checkpoint dict")
        missing = [key for key in ("model", "arch") if key not in raw]
        if missing:
            raise CheckpointError(
                f"{path} is not a fakd-deploy checkpoint: it lacks {missing} (it has {_shortlist(raw)}); "
                "weights trained elsewhere are read by import_state_dict (teacher.weights in a recipe)"
            )
        known = {name: raw[name] for name in cls.__dataclass_fields__ if name in raw}
        if not isinstance(known["arch"], dict) or not isinstance(known["model"], dict):
            raise CheckpointError(f"{path}: 'arch' and 'model' must be mappings")
        return cls(**known)

    def recipe_config(self) -> Recipe | None:
        """The stored recipe, validated (the one parse of a checkpoint's recipe)."""
        return parse_recipe(self.recipe) if self.recipe else None

    def build(self, source: str = "the checkpoint") -> Segmenter:
        """The model with these weights, in eval mode.

        The weights are the checkpoint's own: nothing is downloaded, whatever `arch` says, and
        the sizes it asks for are bounded before anything is allocated.
        """
        arch = {**self.arch, "pretrained": None}
        try:
            check_arch(arch)
            model = build_model(**arch)
        except (TypeError, BadInput) as error:
            raise CheckpointError(f"the arch of {source} is not a zoo model: {error}") from None
        try:
            model.load_state_dict(self.model)
        except RuntimeError as error:
            raise CheckpointError(
                f"the weights of {source} do not fit its arch {self.arch}: {error}"
            ) from None
        return model.eval()


class ErrorKeeping:
    """A file for `torch.save` that keeps the OS error a write met: torch's zip writer
    reports its own "unexpected pos" instead."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.handle.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.handle.flush()


def check_arch(arch: dict[str, Any]) -> None:
    """The sizes a stored `arch` asks for, checked before a model of that size is allocated."""
    for key, limit in (("num_classes", MAX_CLASSES), ("channels", MAX_CHANNELS)):
        value = arch.get(key, 1)
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limit:
            raise BadInput(f"{key} {value!r} is outside 1..{limit}")


def load_model(path: str | Path) -> Segmenter:
    """The model of a checkpoint file, in eval mode."""
    return Checkpoint.load(path).build(str(path))


def import_state_dict(
    model: nn.Module,
    path_or_state: str | Path | Mapping[str, Any],
    strip_prefix: Iterable[str] = (),
    rename: Mapping[str, str] | None = None,
    allow_missing: bool = False,
    allow_unexpected: bool = False,
) -> dict[str, list[str]]:
    """Load weights trained elsewhere into `model`; returns {missing, unexpected, loaded} key lists.

    Keys are mapped in two steps: each prefix of `strip_prefix` is removed in order (e.g.
    "module." left by DataParallel), then each `rename` item is a regular expression applied
    with `re.sub` in order (e.g. {"^backbone\\.": "encoder.body."}). Missing and unexpected keys
    are an error that lists them unless allowed; a shape mismatch always is.
    """
    source = "the state dict" if isinstance(path_or_state, Mapping) else str(path_or_state)
    state = unwrap_state(
        path_or_state if isinstance(path_or_state, Mapping) else read_tensors(Path(path_or_state))
    )
    tensors = {key: value for key, value in state.items() if isinstance(value, Tensor)}
    mapped = _map_keys(tensors, tuple(strip_prefix), dict(rename or {}), source)
    own = model.state_dict()
    # BatchNorm step counters are not weights; old checkpoints lack them and torch tolerates that.
    missing = sorted(k for k in own if k not in mapped and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in mapped if k not in own)
    mismatched = [
        f"{k} {tuple(mapped[k].shape)} vs {tuple(own[k].shape)} in the model"
        for k in sorted(own)
        if k in mapped and mapped[k].shape != own[k].shape
    ]
    problems = []
    if missing and not allow_missing:
        problems.append(f"{len(missing)} missing keys: {_shortlist(missing)}")
    if unexpected and not allow_unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_shortlist(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches: {_shortlist(mismatched)}")
    if problems:
        raise CheckpointError(
            f"cannot import {source}: "
            + "; ".join(problems)
            + " (map keys with strip_prefix/rename, or allow_missing/allow_unexpected)"
        )
    loaded = {k: v for k, v in mapped.items() if k in own}
    model.load_state_dict(loaded, strict=False)
    return {"missing": missing, "unexpected": unexpected, "loaded": sorted(loaded)}


def _map_keys(
    state: Mapping[str, Any], strip_prefix: tuple[str, ...], rename: dict[str, str], source: str
) -> dict[str, Tensor]:
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
