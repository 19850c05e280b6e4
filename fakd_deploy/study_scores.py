"""A study's scores as one small file, so that a study can span machines and sessions.

A study's run folder is large (a checkpoint per student) and lives where it ran; its
scores are a few kilobytes. `study/scores.json` holds, per student run, its val scores
(best and last checkpoints), its test score and its training time, under an *identity*:
the hash of everything the run depends on (data, evaluation, student model and schedule,
its loss terms, its seed) and of the teacher's weights, tensor by tensor (not the
teacher file, whose stored recipe differs between two shards of one study).

`fakd-deploy study ... --merge OTHER/study/scores.json` takes every run of that file whose
identity is this study's instead of training it: two machines can each run half the
seeds, or a later session can continue a study whose folder is gone, and the merged
study is exactly the one that would have run in one place, as long as the teacher
trains to the same weights there (same code, torch build and thread count). The file
records the teacher's thread count, so that a study told to merge it warns before its
teacher trains with another.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fakd_deploy.errors import BadInput
from fakd_deploy.inputs import parse_json, read_text
from fakd_deploy.models.weights import read_tensors, unwrap_state
from fakd_deploy.recipe import Recipe
from fakd_deploy.runfolder import encode, encoded_key

SCORES_LIMIT = 16 << 20  # a 10-seed, 12-variant study with 150 classes is well below 1 MiB
# mIoU points a score's miou may differ from the mean of its per_class_iou: the files carry full
# floats (the committed ones differ by < 1e-13), and values rounded to 2 decimals by hand still pass
MIOU_TOLERANCE = 0.02


Percent = Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)]


class Score(BaseModel):
    """One evaluation row; what the study's statistics read of it is checked, the rest kept."""

    model_config = ConfigDict(extra="allow", strict=True)  # JSON: true is not a number here
    miou: Percent
    per_class_iou: list[Percent | None]


class RecordedRun(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    variant: str
    seed: int
    identity: str
    teacher: str | None = None
    teacher_inputs: str | None = None
    teacher_threads: Annotated[int, Field(ge=1)] | None = None  # torch's thread count when it trained
    seconds: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    val_best: Score
    val_last: Score
    test_last: Score | None = None


class ScoresFile(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    format: int
    runs: list[RecordedRun]


FORMAT = 1


def weights_digest(checkpoint: Path) -> str:
    """sha256 over a checkpoint's tensors (name, dtype, shape, bytes), in name order."""
    state = unwrap_state(read_tensors(checkpoint))
    digest = hashlib.sha256()
    for name in sorted(state):
        value = state[name]
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous()
            digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            digest.update(f"{name}|{value!r}|".encode())
    return digest.hexdigest()


def run_identity(recipe: Recipe, variant: str, seed: int) -> str:
    """What one student run's scores depend on, besides its teacher's weights."""
    parts: list[Any] = [
        recipe.data,
        recipe.eval,
        recipe.student.model,
        recipe.student.train,
        [term.model_dump() for term in recipe.student.variants[variant]],
        seed,
    ]
    return encoded_key([encode(part) for part in parts])


def read_scores(path: Path, num_classes: int) -> list[RecordedRun]:
    """The runs of a scores file, checked; one line naming the file and key if it is wrong."""
    data = parse_json(read_text(path, "scores file", SCORES_LIMIT), f"scores file {path}")
    try:
        parsed = ScoresFile.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        key = ".".join(str(part) for part in first["loc"]) or "top level"
        raise BadInput(f"scores file {path}: '{key}': {first['msg']}") from None
    if parsed.format != FORMAT:
        raise BadInput(f"scores file {path} has format {parsed.format}; this version reads format {FORMAT}")
    for index, run in enumerate(parsed.runs):
        scores = {"val_best": run.val_best, "val_last": run.val_last, "test_last": run.test_last}
        for split, score in scores.items():
            if score is None:
                continue
            if len(score.per_class_iou) != num_classes:
                raise BadInput(
                    f"scores file {path}: 'runs.{index}.{split}.per_class_iou' has "
                    f"{len(score.per_class_iou)} classes; this study's dataset has {num_classes}"
                )
            mean = class_mean(score.per_class_iou)
            if mean is None or abs(score.miou - mean) > MIOU_TOLERANCE:
                found = "no class with an IoU" if mean is None else f"a mean of {mean:.4f}"
                raise BadInput(
                    f"scores file {path}: 'runs.{index}.{split}.miou' is {score.miou:.4f} but its "
                    f"per_class_iou has {found} (the two may differ by {MIOU_TOLERANCE} at most)"
                )
    return parsed.runs


def class_mean(per_class_iou: Sequence[float | None]) -> float | None:
    """The mIoU `evaluate` computes: the mean over the classes in truth or prediction (not None)."""
    present = [iou for iou in per_class_iou if iou is not None]
    return sum(present) / len(present) if present else None


def scores_document(runs: Sequence[RecordedRun]) -> dict[str, Any]:
    return ScoresFile(format=FORMAT, runs=list(runs)).model_dump(mode="json")
