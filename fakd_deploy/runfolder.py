"""The run folder: its layout, its manifest of finished stages, and its one writer.

Everything a run writes lives under one root, at paths this module builds and checks:
nothing a recipe names (variant names, export names) can point outside it. The manifest
records, per stage, the key of its inputs and the sha256 of its outputs by their path
*relative to the root*, so a copied or moved folder is checked by the files it holds.
A lock file held with `flock` for the life of the process makes the folder single-writer;
the kernel releases it when the holder dies, even by kill -9, so it never goes stale.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import shutil
import socket
import sys
from pathlib import Path
from types import TracebackType
from typing import Any

from fakd_deploy.errors import BadInput, RunFolderBusy
from fakd_deploy.utils import SCRATCH, TMP_SUFFIX, file_sha256, save_json, text_sha256

MANIFEST_VERSION = 2


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
            raise BadInput(f"'{'/'.join(parts)}' would be written outside the run folder {self.root}")
        return path

    def student(self, variant: str, seed: int) -> Path:
        return self.inside("students", f"{variant}_s{seed}")

    def onnx(self, variant: str) -> Path:
        return self.inside("deploy", f"{variant}.onnx")

    def report(self, suffix: str) -> Path:
        return self.root / f"report.{suffix}"

    def checkpoints(self) -> dict[str, Path]:
        """The best checkpoint of the teacher and of every student, by the name rows show."""
        found = {}
        if (self.teacher / "best.pt").is_file():
            found["teacher"] = self.teacher / "best.pt"
        for path in sorted(self.students.glob("*/best.pt")):
            found[path.parent.name] = path
        return found

    def relative(self, path: Path) -> str:
        """A path as the manifest records it: relative to the root, with '/' separators."""
        return Path(os.path.relpath(path, self.root)).as_posix()

    def remove(self, path: Path) -> None:
        """Delete a file or folder of the run; never anything outside it."""
        if not path.resolve().is_relative_to(self.root.resolve()) or path.resolve() == self.root.resolve():
            raise BadInput(f"refusing to delete {path}: it is not inside the run folder {self.root}")
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()

    def remove_leftovers(self) -> list[Path]:
        """Temporary files a killed process left: hidden `.<name>.*.tmp` files of atomic writes
        and `.tmp` scratch folders (ONNX Runtime's calibration files)."""
        leftovers = [p for p in self.root.rglob(f".*{TMP_SUFFIX}") if p.is_file()]
        leftovers += [p for p in self.root.rglob(SCRATCH) if p.is_dir()]
        for path in sorted(leftovers, key=lambda p: len(p.parts), reverse=True):
            if path.exists():
                self.remove(path)
        return leftovers


def prepare_root(root: Path) -> None:
    """Create the run folder, or say in one line why it cannot be one."""
    if root.exists() and not root.is_dir():
        raise BadInput(f"--out {root} is a file; a run folder must be a directory")
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
    two runs resuming from each other's checkpoints or deleting what the other writes.
    """

    def __init__(self, run: RunFolder) -> None:
        self.run = run
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        prepare_root(self.run.root)
        path = self.run.lock_file
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as error:
            raise BadInput(f"cannot write to run folder {self.run.root}: {error.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 4096, 0).decode(errors="replace")
            os.close(fd)
            raise RunFolderBusy(
                f"run folder {self.run.root} is in use by {describe_holder(text)}; "
                "wait for it to finish or choose another --out"
            ) from None
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": " ".join(sys.argv),
            "since": datetime.datetime.now().isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self.fd = fd
        self.run.remove_leftovers()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def describe_holder(text: str) -> str:
    try:
        holder = json.loads(text)
        return f"pid {holder['pid']} on {holder['host']} (since {holder['since']}: {holder['command']})"
    except (ValueError, KeyError, TypeError):
        return "another process"


class Manifest:
    """Stage keys and output hashes, rewritten atomically after each stage.

    A manifest that cannot be read stops the run with its name; `fresh=True` (`--force`)
    ignores it and starts over.
    """

    def __init__(self, run: RunFolder, fresh: bool = False) -> None:
        self.run = run
        self.path = run.manifest
        self.data: dict[str, Any] = {"version": MANIFEST_VERSION, "stages": {}}
        if self.path.exists() and not fresh:
            self.data = read_manifest(self.path)

    def entry(self, name: str) -> dict[str, Any]:
        return self.data["stages"].get(name) or {}

    def is_done(self, name: str, key: str) -> bool:
        """Finished with this key, and every output present here with its recorded hash."""
        entry = self.entry(name)
        if entry.get("key") != key or not entry.get("done"):
            return False
        for relative, sha in entry.get("outputs", {}).items():
            path = self.run.root / relative
            if Path(relative).is_absolute() or not path.is_file() or file_sha256(path) != sha:
                return False
        return True

    def start(self, name: str, key: str) -> bool:
        """Mark a stage begun; True when an earlier attempt with the same key can be resumed."""
        resumable = self.entry(name).get("key") == key
        self.data["stages"][name] = {"key": key, "done": False}
        self.save()
        return resumable

    def finish(
        self,
        name: str,
        key: str,
        outputs: list[Path],
        seconds: float,
        metrics: dict[str, Any] | None = None,
        versions: dict[str, str] | None = None,
    ) -> None:
        self.data["stages"][name] = {
            "key": key,
            "done": True,
            "seconds": round(seconds, 2),
            "metrics": metrics or {},
            "outputs": {self.run.relative(p): file_sha256(p) for p in outputs},
        }
        if versions:
            self.data["versions"] = versions
        self.save()

    def save(self) -> None:
        save_json(self.data, self.path)


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest's data, or one line naming the file and what is wrong with it."""
    try:
        data = json.loads(path.read_text())
    except OSError as error:
        raise BadInput(f"cannot read {path}: {error.strerror}") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise BadInput(
            f"{path} is not valid JSON ({error}); rerun with --force to start the run folder over"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("stages"), dict):
        raise BadInput(
            f"{path} is not a fakd-deploy manifest (no 'stages' mapping); rerun with "
            "--force to start the run folder over"
        )
    if data.get("version") != MANIFEST_VERSION:
        data = {"version": MANIFEST_VERSION, "stages": {}}  # older layouts: every stage is checked again
    return data


def stage_key(*parts: Any) -> str:
    """Hash of config sections (pydantic models or plain data) and input files (Paths).

    Files count by name and content, not by where they are, so a moved run keeps its keys.
    """

    def encode(part: Any) -> Any:
        if isinstance(part, Path):
            return {"file": part.name, "sha256": file_sha256(part)}
        if hasattr(part, "model_dump"):
            return part.model_dump(mode="json")
        return part

    return text_sha256(json.dumps([encode(p) for p in parts], sort_keys=True, default=str))
