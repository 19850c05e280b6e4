"""The run folder: its layout, its manifest of finished stages, and its one writer.

Everything a run writes lives under one root, at paths this module builds and checks:
nothing a recipe names (variant names, export names) can point outside it, and nothing
inside it is followed through a symbolic link. The manifest records, per stage, its inputs,
their key and the sha256 of its outputs by their path *relative to the root*, so a copied or
moved folder is checked by the files it holds. A lock file held with `flock` for the life
of the process makes the folder single-writer; the kernel releases it when the holder dies,
even by kill -9, so it never goes stale. The lock file also records the temporary files its
holder begins, so the next holder removes exactly those after a kill, and nothing a user put
there.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import math
import os
import shutil
import socket
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar

from fakd_deploy.errors import BadInput, RunFolderBusy
from fakd_deploy.inputs import load_yaml, parse_json, read_text
from fakd_deploy.utils import (
    SCRATCH_NAME,
    TEMPORARY_NAME,
    file_sha256,
    guarded,
    no_links,
    process_alive,
    save_json,
    text_sha256,
)

log = logging.getLogger(__name__)

MANIFEST_VERSION = 2
MAX_MANIFEST_BYTES = 64_000_000
ENTRY_MAPPINGS = ("outputs", "metrics", "inputs", "attempt")  # what a stage records as mappings
MAX_LOCK_BYTES = 16_000_000
# The suffixes of a redone stage's folders: the new outputs grow in `<folder>.next` while the
# previous ones stay in place; when complete they swap, and the previous go to `.previous`.
NEXT, PREVIOUS = ".next", ".previous"


class RunFolder:
    """Names of everything a run writes; the one place that knows the layout."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    recipe = property(lambda self: self.root / "recipe.yaml")
    manifest = property(lambda self: self.root / "manifest.json")
    teacher = property(lambda self: self.root / "teacher")
    students = property(lambda self: self.root / "students")
    evaluation = property(lambda self: self.root / "evaluation.json")
    deploy = property(lambda self: self.root / "deploy")
    lock_file = property(lambda self: self.root / ".lock")

    def inside(self, *parts: str) -> Path:
        """root/parts..., refused when it would leave the root (`..`, absolute parts, links)."""
        path = self.root.joinpath(*parts)
        root = self.root.resolve()
        if not path.resolve().is_relative_to(root) or any(Path(part).is_absolute() for part in parts):
            raise BadInput(f"'{'/'.join(parts)}' leads outside the folder {self.root}")
        return path

    def student(self, variant: str, seed: int) -> Path:
        return self.inside("students", f"{variant}_s{seed}")

    def onnx(self, variant: str) -> Path:
        return self.inside("deploy", f"{variant}.onnx")

    def report(self, suffix: str) -> Path:
        return self.root / f"report.{suffix}"

    def checkpoints(self) -> dict[str, Path]:
        """The best checkpoint of the teacher and of every student, by the name rows show; not
        those of a replaced (`.previous`) or unfinished (`.next`) training folder."""
        found = {}
        if (self.teacher / "best.pt").is_file():
            found["teacher"] = self.teacher / "best.pt"
        for path in sorted(self.students.glob("*/best.pt")):
            if not path.parent.name.endswith((NEXT, PREVIOUS)):
                found[path.parent.name] = path
        return found

    def relative(self, path: Path) -> str:
        """A path as the manifest records it: relative to the root, with '/' separators."""
        return Path(os.path.relpath(path, self.root)).as_posix()

    def remove(self, path: Path) -> None:
        """Delete a file or folder of the run; never anything outside it, nor through a link
        (a link itself is removed, not what it points to)."""
        # A link at the end is the link itself, removed wherever it points.
        where = path.parent.resolve() / path.name if path.is_symlink() else path.resolve()
        if not where.is_relative_to(self.root.resolve()) or where == self.root.resolve():
            raise BadInput(f"refusing to delete {path}: it is not inside the run folder {self.root}")
        no_links(path.parent)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()

    def remove_leftovers(self, recorded: list[str]) -> list[Path]:
        """The temporary files and scratch folders a killed holder recorded (and only those
        whose names have the forms this tool gives them) that are still there."""
        removed = []
        for relative in recorded:
            path = self.root / relative
            named = TEMPORARY_NAME.match(path.name) or SCRATCH_NAME.match(path.name)
            if named and not Path(relative).is_absolute() and ".." not in Path(relative).parts:
                with contextlib.suppress(BadInput, OSError):  # a link on the way: left alone
                    if os.path.lexists(path):
                        self.remove(path)
                        removed.append(path)
        return removed

    def next_folder(self, folder: Path) -> Path:
        return folder.with_name(folder.name + NEXT)

    def previous_folder(self, folder: Path) -> Path:
        return folder.with_name(folder.name + PREVIOUS)

    def replace_folder(self, folder: Path, new: Path) -> None:
        """Put `new` in place of `folder`; the folder it replaces is kept as `<folder>.previous`
        (which replaces the one kept before)."""
        if folder.exists() or folder.is_symlink():
            previous = self.previous_folder(folder)
            if previous.exists() or previous.is_symlink():
                self.remove(previous)
            os.rename(folder, previous)
        os.rename(new, folder)


def has_content(folder: Path) -> bool:
    """A folder that holds something (a link counts: it is never written through)."""
    return folder.is_symlink() or (folder.is_dir() and any(folder.iterdir()))


# What marks a folder as a run folder: `run`, `train`, `distill` and `study` write into a new,
# empty or manifest-holding folder; `bench` also accepts a folder holding only a recipe.yaml.
RUN_MARKS = ("manifest.json", "recipe.yaml")


# The fields each marker has as fakd-deploy writes it: a folder whose marker is some other
# program's `manifest.json` (a web app's, a CI file) is not a run folder to write into.
MARK_FIELDS = {
    "manifest.json": ("version", "stages"),
    "recipe.yaml": ("name", "data", "student"),
    "report.json": ("header", "rows"),
}


def written_here(mark: Path) -> bool:
    """Whether a marker file reads as the one fakd-deploy writes. One that is not a plain
    file or does not parse at all counts as ours, damaged: its reader names what is wrong
    (a link, a folder, a FIFO, broken JSON) and how to start over."""
    if not stat.S_ISREG(os.lstat(mark).st_mode):
        return True
    text = read_text(mark, "marker file", MAX_MANIFEST_BYTES)
    try:
        data = load_yaml(text, str(mark)) if mark.suffix == ".yaml" else parse_json(text, str(mark))
    except BadInput:
        return True
    return isinstance(data, dict) and all(key in data for key in MARK_FIELDS[mark.name])


def enclosing_run(path: Path, itself: bool = False) -> Path | None:
    """The run folder that `path` lies inside (or is, with `itself`), if any: a folder whose
    `manifest.json` fakd-deploy wrote, from the moment a run starts."""
    resolved = path.resolve()
    for folder in [resolved, *resolved.parents] if itself else resolved.parents:
        if (folder / "manifest.json").is_file() and written_here(folder / "manifest.json"):
            return folder
    return None


@contextlib.contextmanager
def held_around(path: Path, itself: bool = False) -> Iterator[None]:
    """Hold the run folder `path` is written into, when it lies inside one (`export --out
    runs/q/deploy/x.onnx`, a build beside a run's model, with `itself` a folder `predict`
    writes into): one writer per run folder."""
    around = enclosing_run(path, itself)
    with RunLock(RunFolder(around)) if around is not None else contextlib.nullcontext():
        yield


def prepare_root(root: Path, marks: tuple[str, ...] = RUN_MARKS) -> None:
    """Create the run folder, or say in one line why it cannot be one.

    An existing folder that holds files but none of `marks` is someone else's (a dataset, a
    home folder): it is refused, so that nothing of it is overwritten or removed.
    """
    if root.is_symlink() and not root.exists():
        raise BadInput(f"--out {root} is a link to {os.readlink(root)}, which does not exist")
    if root.exists() and not root.is_dir():
        raise BadInput(f"--out {root} is a file; a run folder must be a directory")
    if root.is_dir():
        entries = [entry for entry in os.listdir(root) if entry != ".lock"]
        present = [mark for mark in marks if os.path.lexists(root / mark)]
        if entries and not present:
            raise BadInput(
                f"--out {root} already holds files and is not a fakd-deploy run folder (it has no "
                f"{' or '.join(marks)}); give a new or empty folder"
            )
        foreign = [mark for mark in present if not written_here(root / mark)]
        if entries and foreign == present:
            raise BadInput(
                f"--out {root} already holds files and is not a folder fakd-deploy wrote: its "
                f"{foreign[0]} is not one fakd-deploy writes (a mapping with "
                f"{', '.join(MARK_FIELDS[foreign[0]])}); give a new or empty folder"
            )
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BadInput(f"cannot create run folder {root}: {error.strerror}") from None
    if not writable(root):
        raise BadInput(f"cannot write to run folder {root}: permission denied")


def writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)


class RunLock:
    """Exclusive use of a run folder for one process (under torchrun: rank 0's).

    A second writer is refused at once with the holder's pid, host and command, instead of
    two runs resuming from each other's checkpoints or deleting what the other writes. The
    lock file is opened without following a link, and a child process forked while it is
    held (a data loader worker) closes its copy at once, so the lock goes with its holder.
    """

    HELD: ClassVar[dict[int, RunLock]] = {}  # by file descriptor: what a forked child closes

    def __init__(self, run: RunFolder, marks: tuple[str, ...] = RUN_MARKS) -> None:
        self.run = run
        self.marks = marks
        self.fd: int | None = None
        self.guard: contextlib.AbstractContextManager[None] | None = None

    def __enter__(self) -> RunLock:
        prepare_root(self.run.root, self.marks)
        fd = open_lock(self.run.lock_file)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 4096, 0).decode(errors="replace")
            os.close(fd)
            raise RunFolderBusy(busy_message(self.run.root, text)) from None
        recorded = recorded_paths(os.pread(fd, MAX_LOCK_BYTES, 0).decode(errors="replace"))
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": " ".join(sys.argv),
            "since": datetime.datetime.now().isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self.fd = fd
        RunLock.HELD[fd] = self
        self.run.remove_leftovers(recorded)
        self.guard = guarded(self.run.root, self.record)
        self.guard.__enter__()
        return self

    def record(self, path: Path) -> None:
        """Note a temporary path before it is created (one JSON string per line)."""
        if self.fd is not None:
            os.lseek(self.fd, 0, os.SEEK_END)
            os.write(self.fd, (json.dumps(self.run.relative(path)) + "\n").encode())

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self.guard is not None:
            self.guard.__exit__(kind, error, trace)
            self.guard = None
        if self.fd is not None:
            RunLock.HELD.pop(self.fd, None)
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    @staticmethod
    def forget_in_child() -> None:
        """After a fork, in the child: close the copies of held locks (the parent keeps them)."""
        for fd, lock in list(RunLock.HELD.items()):
            with contextlib.suppress(OSError):
                os.close(fd)
            lock.fd = None
        RunLock.HELD.clear()


os.register_at_fork(after_in_child=RunLock.forget_in_child)


def open_lock(path: Path) -> int:
    """The lock file's descriptor: a regular file, never followed through a link."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as error:
        if os.path.islink(path):
            raise BadInput(
                f"{path} is a symbolic link; a run folder's lock must be a plain file "
                "(remove the link; nothing is written through it)"
            ) from None
        raise BadInput(f"cannot open the run folder's lock {path}: {error.strerror}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise BadInput(f"{path} is not a regular file; remove it so the run folder can be locked")
    if info.st_nlink > 1:  # a hard link: truncating it would truncate a file elsewhere
        os.close(fd)
        raise BadInput(
            f"{path} has {info.st_nlink} names (a hard link to another file); a run folder's lock "
            "must be its own file (remove it; nothing is written to it)"
        )
    return fd


def recorded_paths(text: str) -> list[str]:
    """The temporary paths a holder recorded: every line after the first that is a JSON string."""
    paths = []
    for line in text.splitlines()[1:]:
        with contextlib.suppress(ValueError):
            value = json.loads(line)
            if isinstance(value, str):
                paths.append(value)
    return paths


def busy_message(root: Path, text: str) -> str:
    """Who holds the folder, and whether that process is still running."""
    try:
        holder = json.loads(text.split("\n", 1)[0])
        who = f"pid {holder['pid']} on {holder['host']} (since {holder['since']}: {holder['command']})"
        dead = holder["host"] == socket.gethostname() and not process_alive(int(holder["pid"]))
    except (ValueError, KeyError, TypeError):
        who, dead = "another process", False
    if dead:
        return (
            f"run folder {root} is still locked by the child processes of {who}, which is no "
            "longer running; they end within seconds: run the command again then"
        )
    return f"run folder {root} is in use by {who}; wait for it to finish or choose another --out"


def encode(part: Any) -> Any:
    """A stage input as the manifest records it: a config section as its values, a file by
    name and content, anything else as it is."""
    if isinstance(part, Path):
        return {"file": part.name, "sha256": file_sha256(part)}
    if hasattr(part, "model_dump"):
        return part.model_dump(mode="json")
    return part


def stage_key(*parts: Any) -> str:
    """Hash of config sections (pydantic models or plain data) and input files (Paths).

    Files count by name and content, not by where they are, so a moved run keeps its keys.
    """
    return encoded_key([encode(p) for p in parts])


def encoded_key(encoded: list[Any]) -> str:
    return text_sha256(json.dumps(encoded, sort_keys=True, default=str))


def stage_inputs(inputs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The key of named stage inputs (`stage_key` of their values, in order) and the inputs
    as plain JSON, which the manifest keeps to say later which of them changed."""
    encoded = {name: encode(part) for name, part in inputs.items()}
    return encoded_key(list(encoded.values())), json.loads(json.dumps(encoded, default=str))


def changes(old: dict[str, Any], new: dict[str, Any], shown: int = 6) -> str:
    """What differs between two recorded inputs, e.g. `teacher.train.steps 150 -> 1000`."""
    before, after = flatten(old), flatten(new)
    found = []
    for key in [*after, *(k for k in before if k not in after)]:
        if before.get(key) == after.get(key):
            continue
        if key not in before:
            found.append(f"{key} is new ({short(after[key])})")
        elif key not in after:
            found.append(f"{key} is gone (was {short(before[key])})")
        elif is_file(after[key]):
            found.append(f"{key} (file {after[key].get('file')}) changed")
        else:
            found.append(f"{key} {short(before[key])} -> {short(after[key])}")
    more = f" and {len(found) - shown} more" if len(found) > shown else ""
    return ", ".join(found[:shown]) + more


def flatten(inputs: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections as dotted keys; a file stays one value."""
    flat: dict[str, Any] = {}
    for key, value in inputs.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and not is_file(value):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def is_file(value: Any) -> bool:
    """A recorded input file: its name and hash, compared as one value."""
    return isinstance(value, dict) and "sha256" in value


def short(value: Any, limit: int = 40) -> str:
    if is_file(value):
        return f"file {value.get('file')}"
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Manifest:
    """Per stage: its inputs, their key, its outputs' hashes; rewritten atomically.

    An entry is a stage's last *finished* record (`done: true`), with the attempt in progress
    under `attempt` when one with other inputs has begun; or, before a stage ever finished,
    its attempt itself (`done: false`). Keeping the finished record while another attempt
    runs is what lets a folder go back to the inputs it holds without redoing anything.
    A manifest that cannot be read stops the run with its name; `fresh=True` (`--force`)
    ignores it and starts over.
    """

    def __init__(self, run: RunFolder, fresh: bool = False) -> None:
        self.run = run
        self.path = run.manifest
        self.data: dict[str, Any] = {"version": MANIFEST_VERSION, "stages": {}}
        if os.path.lexists(self.path) and not fresh:
            self.data = read_manifest(self.path)

    def entry(self, name: str) -> dict[str, Any]:
        return self.data["stages"].get(name) or {}

    def is_done(self, name: str, key: str) -> bool:
        """Finished with this key, and every output present here with its recorded hash."""
        entry = self.entry(name)
        return entry.get("key") == key and bool(entry.get("done")) and not self.damaged(name)

    def damaged(self, name: str) -> list[str]:
        """The recorded outputs of a stage that are missing here or not the files it wrote."""
        found = []
        for relative, sha in self.entry(name).get("outputs", {}).items():
            outside = Path(relative).is_absolute() or ".." in Path(relative).parts
            path = self.run.root / relative
            if outside or not no_links(path).is_file() or file_sha256(path) != sha:
                found.append(relative)
        return found

    def attempt(self, name: str) -> tuple[str, bool] | None:
        """The unfinished attempt's key and whether it works in `<folder>.next`, if any."""
        pending = self.pending(name)
        return (pending["key"], bool(pending.get("staging"))) if pending is not None else None

    def pending(self, name: str) -> dict[str, Any] | None:
        entry = self.entry(name)
        if entry.get("done"):
            pending = entry.get("attempt")
            return pending if isinstance(pending, dict) and "key" in pending else None
        return entry if "key" in entry else None

    def stopped(self, name: str, seconds: float) -> None:
        """An attempt ended unfinished (a signal, an error): its time counts when it resumes."""
        pending = self.pending(name)
        if pending is not None:
            pending["seconds"] = round(self.spent(name, pending["key"]) + seconds, 2)
            self.save()

    def spent(self, name: str, key: str) -> float:
        """Seconds the stopped attempts with this key worked (a SIGKILLed one's time is lost);
        0 for a fresh attempt, whose record `begin` started without any."""
        pending = self.pending(name)
        seconds = pending.get("seconds") if pending is not None and pending["key"] == key else None
        if isinstance(seconds, int | float) and math.isfinite(seconds) and seconds >= 0:
            return float(seconds)
        return 0.0

    def begin(self, name: str, key: str, inputs: dict[str, Any], staging: bool) -> None:
        attempt = {"key": key, "inputs": inputs, "staging": staging}
        entry = self.entry(name)
        if entry.get("done"):
            self.data["stages"][name] = {**entry, "attempt": attempt}
        else:
            self.data["stages"][name] = {**attempt, "done": False}
        self.save()

    def finish(
        self,
        name: str,
        key: str,
        outputs: dict[Path, Path],
        seconds: float,
        metrics: dict[str, Any] | None = None,
        versions: dict[str, str] | None = None,
        inputs: dict[str, Any] | None = None,
    ) -> None:
        """Record a finished stage. `outputs` maps each output's final path to the file that
        holds it now (the same path, or its copy in `<folder>.next` before the swap)."""
        entry: dict[str, Any] = {
            "key": key,
            "done": True,
            "seconds": round(seconds, 2),
            "metrics": metrics or {},
            "outputs": {self.run.relative(final): file_sha256(now) for final, now in outputs.items()},
        }
        if inputs is not None:
            entry["inputs"] = inputs
        pending = self.attempt(name)
        if pending is not None and pending[1]:  # until the swap is done, a rerun resumes there
            entry["attempt"] = {"key": key, "staging": True}
        self.data["stages"][name] = entry
        if versions:
            self.data["versions"] = versions
        self.save()

    def settle(self, name: str) -> None:
        """The swap of a redone stage's folder is done: forget its attempt."""
        if self.entry(name).pop("attempt", None) is not None:
            self.save()

    def save(self) -> None:
        save_json(self.data, self.path)


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest's data, or one line naming the file and what is wrong with it."""
    text = read_text(no_links(path), "manifest", MAX_MANIFEST_BYTES)
    data = parse_json(text, str(path), remedy="; rerun with --force to start the run folder over")
    if not isinstance(data, dict) or not isinstance(data.get("stages"), dict):
        raise BadInput(
            f"{path} is not a fakd-deploy manifest (no 'stages' mapping); rerun with "
            "--force to start the run folder over"
        )
    if data.get("version") != MANIFEST_VERSION:
        data = {"version": MANIFEST_VERSION, "stages": {}}  # older layouts: every stage is checked again
    if not all(isinstance(entry, dict) for entry in data["stages"].values()):
        raise BadInput(f"{path} has a stage that is not a mapping; rerun with --force to start over")
    for name, entry in list(data["stages"].items()):
        wrong = [key for key in ENTRY_MAPPINGS if key in entry and not isinstance(entry[key], dict)]
        outputs = entry.get("outputs", {})
        if not wrong and not all(isinstance(sha, str) for sha in outputs.values()):
            wrong = ["outputs"]
        if wrong:
            log.warning(f"{path}: stage {name}'s '{wrong[0]}' is not what this version writes; it runs again")
            del data["stages"][name]
    return data
