"""The session engine: one recipe's work in one run folder, stage by stage.

`session()` checks everything it can before the folder is touched (`preflight`), then holds
the folder's lock (rank 0) for the life of the command. `Session.stage` is the one rule every
command follows for every stage:

- a stage done for the same inputs (and whose outputs are intact) is skipped;
- an interrupted attempt with the same inputs resumes;
- otherwise the stage is redone, with one line naming what changed (recipe keys, or an
  input file). A stage that writes a folder grows its new outputs in `<folder>.next` while
  the previous ones stay in place; when complete, the two swap and the previous outputs are
  kept as `<folder>.previous`. A stage that writes files replaces each atomically.

The manifest records each stage's inputs, so the line can name them; the folder's
`recipe.yaml` is written when the command has finished, so it describes what the folder
holds, never what an interrupted command meant to make.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fakd_deploy import __version__, optional
from fakd_deploy.data import splits
from fakd_deploy.distributed import agree, barrier, init_distributed, rank_and_world, rank_failures_reported
from fakd_deploy.errors import BadInput
from fakd_deploy.models import Checkpoint
from fakd_deploy.models.predictor import resolve_device
from fakd_deploy.models.weights import first_unusable, read_tensors, unwrap_state
from fakd_deploy.recipe import Recipe
from fakd_deploy.runfolder import Manifest, RunFolder, RunLock, changes, has_content, stage_inputs
from fakd_deploy.utils import no_links, save_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Attempt:
    """How a stage's work runs: `resume` an earlier attempt with the same inputs, and the
    `folder` to write (the stage's own, or `<folder>.next` while the previous outputs stay)."""

    resume: bool
    folder: Path | None = None


Work = Callable[[Attempt], tuple[list[Path], dict[str, Any]]]


@dataclass(frozen=True)
class Plan:
    """Rank 0's decision for a stage, which every rank follows."""

    action: str  # "skip", "resume" or "fresh"
    staging: bool = False


def versions() -> dict[str, str]:
    """What the manifest records: torch (imported already) and the runtime's installed
    version, looked up without importing it."""
    return {
        "fakd_deploy": __version__,
        "python": platform.python_version(),
        **optional.versions("torch"),
        "onnxruntime": optional.installed("onnxruntime", "onnxruntime-gpu"),
    }


@dataclass
class Session:
    """One recipe's work in one run folder: its lock, manifest, device and data facts."""

    recipe: Recipe
    run: RunFolder
    force: bool
    device: torch.device
    num_classes: int
    class_names: list[str]
    manifest: Manifest | None = None  # rank 0 only
    rank: int = 0
    redo: tuple[str, ...] = ()  # stages to redo although up to date (`run --redo bench`)
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)

    def redoes(self, name: str) -> bool:
        """`--redo build` names every `build:*` stage; `--redo build:ort-cpu-int8` one of them."""
        return any(name == asked or name.startswith(f"{asked}:") for asked in self.redo)

    def stage(
        self, name: str, inputs: dict[str, Any], work: Work, folder: Path | None = None
    ) -> dict[str, Any]:
        """Run `work` unless the stage is done for these named inputs; returns its metrics.

        `inputs` are recipe sections, values and files (Paths) by the name a person knows
        them by; their key is `stage_key` of the values in order. `folder` is where a
        training stage writes; see the module's docstring for what happens to it.
        """
        key, record, plan = "", dict[str, Any](), None
        if self.manifest is not None:
            key, record = stage_inputs(inputs)
            plan = self.plan(name, key, record, folder)
        plan = agree(plan)
        assert plan is not None
        if plan.action == "skip":
            log.info(f"skip {name}: outputs are up to date")
            self.skipped.append(name)
            return self.manifest.entry(name)["metrics"] if self.manifest else {}
        self.ran.append(name)
        where = self.run.next_folder(folder) if folder is not None and plan.staging else folder
        started = time.perf_counter()
        try:
            outputs, metrics = work(Attempt(plan.action == "resume", where))
        except BaseException:
            if self.manifest is not None:
                with suppress(OSError):  # the error that stopped it is the one to show
                    self.manifest.stopped(name, time.perf_counter() - started)
            raise
        if self.manifest is not None:
            seconds = time.perf_counter() - started + self.manifest.spent(name, key)
            final = {final_path(path, where, folder): path for path in outputs}
            self.manifest.finish(name, key, final, seconds, metrics, versions(), record)
            self.written.extend(final)
            if folder is not None and where is not None and plan.staging:
                self.run.replace_folder(folder, where)
                self.manifest.settle(name)
        if plan.staging:
            barrier()  # the other ranks read the outputs at their final paths
        return metrics

    def plan(self, name: str, key: str, record: dict[str, Any], folder: Path | None) -> Plan:
        """Skip, resume or redo (rank 0, which alone reads the manifest)."""
        assert self.manifest is not None
        manifest, entry = self.manifest, self.manifest.entry(name)
        if folder is not None:
            no_links(folder)
        redone = self.force or self.redoes(name)
        finished = bool(entry.get("done")) and entry.get("key") == key and not redone
        damaged = manifest.damaged(name) if finished else []  # each output hashed once
        if not redone:
            if finished and not damaged:
                return Plan("skip")
            attempt = manifest.attempt(name)
            if attempt is not None and attempt[0] == key:
                staged = folder is not None and self.run.next_folder(folder).is_dir()
                if staged or not attempt[1]:
                    return Plan("resume", staging=staged)
            if finished and self.recovers(name, folder, damaged):
                return Plan("resume")
        # Any other output that is missing or not the file the stage wrote (a damaged last.pt,
        # another run's best.pt) means the stage is redone from its start: resumed from last.pt,
        # training would keep whatever best.pt holds.
        staging = folder is not None and has_content(folder)
        if entry:
            why = "an output is missing or damaged" if finished else self.why(entry, record, name)
            log.info(self.redo_line(name, why, folder if staging else None))
        if folder is not None:
            for leftover in (self.run.next_folder(folder), *([] if staging else [folder])):
                if os.path.lexists(leftover):
                    self.run.remove(leftover)
        manifest.begin(name, key, record, staging)
        return Plan("fresh", staging)

    def recovers(self, name: str, folder: Path | None, damaged: list[str]) -> bool:
        """A training stage whose only missing or changed output is `best.pt`, beside its
        `last.pt`: the final weights are scored and saved as `best.pt` again (a changed one is
        removed first, never kept), and nothing retrains."""
        if folder is None or not damaged or not (folder / "last.pt").is_file():
            return False
        if any(Path(relative).name != "best.pt" for relative in damaged):
            return False
        log.info(
            f"redo {name}: {', '.join(damaged)} is missing or not the file it wrote; recovered from last.pt"
        )
        for relative in damaged:
            if os.path.lexists(self.run.root / relative):
                self.run.remove(self.run.root / relative)
        return True

    def redo_line(self, name: str, why: str, kept: Path | None) -> str:
        """One line: why the stage is redone, and where its previous outputs are meanwhile."""
        line = f"redo {name}: {why}"
        if kept is not None:
            line += (
                f"; the previous outputs stay in {self.run.relative(kept)}/ until the new ones are "
                f"complete, then move to {self.run.relative(self.run.previous_folder(kept))}/"
            )
        return line

    def why(self, entry: dict[str, Any], record: dict[str, Any], name: str = "") -> str:
        if self.force:
            return "--force"
        if self.redoes(name):
            return f"--redo {name}"
        before = entry.get("inputs")
        if not isinstance(before, dict):
            return "its inputs changed (the run that made it did not record which)"
        return changes(before, record) or "its inputs changed"

    def would_run(self, name: str, inputs: Callable[[], dict[str, Any]]) -> bool:
        """Whether `stage(name, inputs(), ...)` would run now (rank 0's answer); an input file
        that cannot be read yet (made by an earlier stage) means it would."""
        answer = True
        if self.manifest is not None and not (self.force or self.redoes(name)):
            try:
                key, _ = stage_inputs(inputs())
            except OSError:
                key = ""
            answer = not (key and self.manifest.is_done(name, key))
        return bool(agree(answer))

    def changed_since(self, name: str, inputs: dict[str, Any]) -> str | None:
        """None when the stage is done for these inputs; else what differs (rank 0's answer)."""
        answer = None
        if self.manifest is not None:
            key, record = stage_inputs(inputs)
            entry = self.manifest.entry(name)
            if self.manifest.is_done(name, key):
                answer = None
            elif not entry.get("done"):
                answer = "it never finished here"
            elif entry.get("key") == key:
                answer = "an output is missing or damaged"
            else:
                answer = self.why(entry, record)
        return agree(answer)


def final_path(path: Path, where: Path | None, folder: Path | None) -> Path:
    """Where an output written into `<folder>.next` will be once the folders swap."""
    if where is None or folder is None or where == folder or not path.is_relative_to(where):
        return path
    return folder / path.relative_to(where)


def check_device(name: str) -> torch.device:
    device = resolve_device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BadInput(
            f"device '{name}' asks for CUDA, but torch sees no GPU here "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'})"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise BadInput(f"device '{name}' asks for Apple's MPS, which this machine does not have")
    return device


def check_teacher(path: Path, num_classes: int, dataset: str) -> None:
    """A teacher must predict the dataset's classes with usable weights; found before anything trains."""
    checkpoint = Checkpoint.load(path)
    arch = checkpoint.arch
    if arch.get("num_classes") != num_classes:
        raise BadInput(
            f"teacher {path} predicts {arch.get('num_classes')} classes but the dataset "
            f"'{dataset}' has {num_classes}"
        )
    check_weights(checkpoint.model, f"teacher {path}")


def check_weights(state: Any, source: str) -> None:
    problem = first_unusable(unwrap_state(state))
    if problem:
        raise BadInput(f"{source}: {problem}; a model cannot be trained or distilled from it")


def preflight(recipe: Recipe, teacher: Path | None = None) -> tuple[int, list[str]]:
    """Everything that can be checked before a run folder is touched: data, models, teacher."""
    import timm

    num_classes, class_names = splits.dataset_info(recipe.data)
    splits.train_dataset(recipe.data)
    if recipe.teacher is not None and recipe.teacher.data:
        teacher_classes, _ = splits.dataset_info(recipe.teacher_data())
        splits.train_dataset(recipe.teacher_data())
        if teacher_classes != num_classes:
            raise BadInput(
                f"teacher.data gives {teacher_classes} classes but the student's data has {num_classes}"
            )
    for where, model in (
        ("student.model", recipe.student.model),
        ("teacher.model", recipe.teacher.model if recipe.teacher else None),
    ):
        if model is not None and not timm.is_model(model.encoder):
            raise BadInput(
                f"{where}.encoder '{model.encoder}' is not a timm encoder "
                "(`fakd-deploy models` lists the zoo)"
            )
        if (
            model is not None
            and model.pretrained
            and "/" in model.pretrained
            and not Path(model.pretrained).is_file()
        ):
            raise BadInput(f"{where}.pretrained: weights file not found: {model.pretrained}")
    cfg = recipe.teacher
    for path in (teacher, Path(cfg.checkpoint) if cfg and cfg.checkpoint else None):
        if path is not None:
            check_teacher(path, num_classes, recipe.data.name)
    if cfg and cfg.weights:
        if not os.path.lexists(cfg.weights):
            raise BadInput(f"teacher.weights: file not found: {cfg.weights}")
        check_weights(read_tensors(Path(cfg.weights)), f"teacher.weights {cfg.weights}")
    return num_classes, class_names


@contextmanager
def session(
    recipe: Recipe,
    out: Path | None,
    force: bool = False,
    teacher: Path | None = None,
    redo: tuple[str, ...] = (),
) -> Iterator[Session]:
    """Check the recipe, then hold the run folder (rank 0); the resolved recipe is saved in it
    when the command has finished."""
    device = init_distributed(check_device(recipe.device))
    num_classes, class_names = preflight(recipe, teacher)
    run = RunFolder(out or Path("runs") / recipe.name)
    rank, _ = rank_and_world()
    with rank_failures_reported():
        if rank != 0:
            yield Session(recipe, run, force, device, num_classes, class_names, rank=rank, redo=redo)
            return
        with RunLock(run, marks=("manifest.json",)):
            manifest = Manifest(run, fresh=force)
            done = sum(1 for entry in manifest.data["stages"].values() if entry.get("done"))
            log.info(
                f"run folder {run.root}: "
                + (
                    f"{done} stage(s) done before, each skipped while its inputs are unchanged"
                    if done
                    else "new"
                )
                + (f"; redo: {', '.join(redo)}" if redo else "")
                + ("; --force: every stage is redone" if force else "")
            )
            manifest.save()  # marks the folder as a run folder from the start
            yield Session(recipe, run, force, device, num_classes, class_names, manifest, redo=redo)
            save_text(recipe.to_yaml(), run.recipe)
