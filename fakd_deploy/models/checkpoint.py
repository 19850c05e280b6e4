"""Checkpoints: one typed format, saved atomically and loaded without running any code.

Loading uses `torch.load(weights_only=True)`: tensors and plain Python values only, so a
crafted file cannot execute anything; it is refused with a message naming it. Its fields
are checked as it is read, its weights before they become a model. A checkpoint
is a plain dict on disk (readable with `torch.load` elsewhere) and a `Checkpoint` here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, cast

import torch
from torch import Tensor, nn

from fakd_deploy.errors import BadInput, CheckpointError, WriteFailed
from fakd_deploy.inputs import MAX_CHANNELS, MAX_CLASSES, class_names_problem
from fakd_deploy.models.segmenter import Segmenter, build_model
from fakd_deploy.models.weights import first_unusable, read_tensors, unwrap_state
from fakd_deploy.recipe import SEED_LIMIT, Recipe, check_name, parse_recipe
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
        check_fields(path, known)
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
        check_state(self.model, model.state_dict(), source)
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


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# What each stored field must be, as a test and its description: a crafted file could
# otherwise crash a later step, or steer an output's name (variant, role, seed) elsewhere.
FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "model": (
        lambda v: (
            isinstance(v, dict) and all(isinstance(k, str) and isinstance(t, Tensor) for k, t in v.items())
        ),
        "a mapping of names to tensors",
    ),
    "arch": (lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v), "a mapping of names"),
    "recipe": (lambda v: v is None or isinstance(v, dict), "a mapping of recipe keys or null"),
    "class_names": (lambda v: v is None or isinstance(v, list), "a list of names or null"),
    "role": (lambda v: isinstance(v, str), "a name"),
    "variant": (lambda v: v is None or isinstance(v, str), "a name or null"),
    "seed": (
        lambda v: v is None or (_whole(v) and 0 <= v < SEED_LIMIT),
        f"a whole number in 0..{SEED_LIMIT - 1} or null",
    ),
    "step": (lambda v: _whole(v) and v >= 0, "a whole number"),
    "complete": (lambda v: isinstance(v, bool), "true or false"),
    "metrics": (lambda v: isinstance(v, dict), "a mapping"),
    "training": (lambda v: v is None or isinstance(v, dict), "a mapping or null"),
}


def check_fields(path: Path, fields: dict[str, Any]) -> None:
    """Each stored field of its type, checked where the file is read; `role` and `variant`,
    which name output files, plain names by the recipe's rule; the arch's sizes bounded."""
    for key, value in fields.items():
        test, expected = FIELDS[key]
        if not test(value):
            raise CheckpointError(f"{path}: '{key}' is not {expected}")
    names = fields.get("class_names")
    problem = None if names is None else class_names_problem(names)
    if problem:
        raise CheckpointError(f"{path}: 'class_names' {problem}")
    for key in ("role", "variant"):
        if fields.get(key) is not None:
            try:
                check_name(fields[key], f"'{key}'")
            except ValueError as error:
                raise CheckpointError(f"{path}: {error}") from None
    try:
        check_arch(fields["arch"])
    except BadInput as error:
        raise CheckpointError(f"{path}: 'arch' is not a zoo model: {error}") from None


def check_arch(arch: dict[str, Any]) -> None:
    """The types and sizes a stored `arch` asks for, checked before a model is allocated."""
    for key, limit in (("num_classes", MAX_CLASSES), ("channels", MAX_CHANNELS)):
        value = arch.get(key, 1)
        if not _whole(value) or not 1 <= value <= limit:
            raise BadInput(f"{key} {value!r} is outside 1..{limit}")
    for key, test, expected in (
        ("name", lambda v: isinstance(v, str), "text"),
        ("encoder", lambda v: isinstance(v, str), "text"),
        ("output_stride", _whole, "a whole number"),
        ("aux", lambda v: isinstance(v, bool), "true or false"),
    ):
        if key in arch and not test(arch[key]):
            raise BadInput(f"{key} must be {expected}, not a {type(arch[key]).__name__}")


def check_state(state: Mapping[str, Tensor], own: Mapping[str, Tensor], source: str) -> None:
    """Weights that would load without a word and predict nonsense: a non-finite value (or a
    negative BatchNorm variance), or a tensor whose values `load_state_dict` would silently
    cast to another kind (integers into a float parameter)."""
    problem = first_unusable(state)
    if problem:
        raise CheckpointError(
            f"{source}: weight {problem}; a model with such weights predicts NaN: retrain or re-import it"
        )
    for name, tensor in state.items():
        if name in own and _kind(tensor) != _kind(own[name]):
            raise CheckpointError(
                f"{source}: weight '{name}' is {tensor.dtype} where the model has {own[name].dtype}"
            )


def _kind(tensor: Tensor) -> str:
    return "complex" if tensor.is_complex() else "float" if tensor.is_floating_point() else "integer"


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
