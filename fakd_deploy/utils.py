"""Small helpers shared by every stage: atomic writes with the umask's mode, hashing, pids.

While a process holds a run folder (`runfolder.RunLock`), the folder is *guarded*: every
write below it refuses a symbolic link on the way (a stage folder, a checkpoint, the
manifest), and every temporary file or scratch folder is recorded before it is created,
so that after a kill the next holder removes exactly what this tool made and nothing else.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fakd_deploy.errors import BadInput, unwritable

TMP_SUFFIX = ".tmp"
SCRATCH = ".tmp"  # a folder for the temporary files of libraries (ONNX Runtime's calibration)
# What atomic_write and temporary_files_in name their files and folders: `.<name>.<hex>.tmp`
# and `<scratch>.<hex>`. The next lock holder removes a leftover only when it was recorded
# *and* its name has this form.
TEMPORARY_NAME = re.compile(rf"^\..+\.[0-9a-f]{{16}}{re.escape(TMP_SUFFIX)}$")
SCRATCH_NAME = re.compile(rf"^{re.escape(SCRATCH)}\.[0-9a-f]{{16}}$")


@dataclass(frozen=True)
class Guard:
    """A folder one process writes: `record(path)` is called before each temporary path
    below it is created."""

    root: str  # absolute, as given (not resolved: a link *to* the root is the user's choice)
    record: Callable[[Path], None]


GUARDS: list[Guard] = []


@contextmanager
def guarded(root: Path, record: Callable[[Path], None]) -> Iterator[None]:
    """Guard writes below `root` for a while (see the module's docstring)."""
    guard = Guard(os.path.abspath(root), record)
    GUARDS.append(guard)
    try:
        yield
    finally:
        GUARDS.remove(guard)


def guard_of(path: str | Path) -> tuple[Guard, list[str]] | None:
    """The guard whose root holds `path` (by its letters, no link followed) and the path's
    parts below that root."""
    absolute = os.path.normpath(os.path.abspath(path))
    for guard in reversed(GUARDS):
        if absolute == guard.root or absolute.startswith(guard.root.rstrip(os.sep) + os.sep):
            return guard, [part for part in absolute[len(guard.root) :].split(os.sep) if part]
    return None


def no_links(path: str | Path) -> Path:
    """`path`, after checking that no folder or file on its way down from a guarded root is
    a symbolic link (a path outside every guarded folder is the user's own and not checked)."""
    path = Path(path)
    found = guard_of(path)
    if found is None:
        return path
    guard, parts = found
    current = guard.root
    for part in parts:
        current = os.path.join(current, part)
        if os.path.islink(current):
            raise BadInput(
                f"{current} is a symbolic link; nothing inside the run folder {guard.root} is "
                "followed through a link (replace it with a real file or folder)"
            )
    return path


def not_an_input(output: Path, inputs: list[Path], option: str) -> None:
    """Refuse an output that is one of the command's inputs, through any name or link."""
    for source in inputs:
        if os.path.exists(output) and os.path.exists(source) and os.path.samefile(output, source):
            raise BadInput(f"{option} {output} is the input {source}: choose another file to write")


def make_folders(folder: Path) -> None:
    """`mkdir -p`, refusing links inside a guarded root."""
    no_links(folder)
    folder.mkdir(parents=True, exist_ok=True)


def temporary_path(folder: Path, stem: str, suffix: str) -> Path:
    """A fresh name in `folder`, recorded by the folder's guard before anything is created."""
    path = folder / f"{stem}{secrets.token_hex(8)}{suffix}"
    found = guard_of(path)
    if found is not None:
        found[0].record(path)
    return path


@functools.cache
def file_mode() -> int:
    """The mode a plain `open(path, "w")` would give a new file under this process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Write through a temporary file in the same folder and rename it into place.

    A crash mid-write leaves the previous file intact, never a truncated one; a kill -9
    can leave the hidden `.<name>.<hex>.tmp` file, which the next holder of the run folder's
    lock removes. The file gets the umask's mode, as any other new file would. OS errors
    (disk full, read-only folder) become one `WriteFailed` line naming the file.
    """
    path = Path(path)
    tmp: Path | None = None
    try:
        make_folders(path.parent)
        no_links(path)
        if os.path.exists(path) and not os.path.isfile(path):
            raise BadInput(f"{path} exists and is not a regular file: nothing is written over it")
        tmp = temporary_path(path.parent, f".{path.name}.", TMP_SUFFIX)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, file_mode()))
        write(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except OSError as error:
        raise unwritable(path, error) from None
    finally:
        if tmp is not None and os.path.lexists(tmp):
            os.remove(tmp)
    return path


@contextmanager
def temporary_files_in(folder: Path) -> Iterator[None]:
    """Point Python's temporary files (those of libraries we call) into a fresh scratch
    folder beside `folder`'s name (`<folder>.<hex>`) for a while, then remove it.

    A process killed meanwhile leaves it beside its outputs, where the run folder's next
    lock holder removes it (it was recorded), rather than in /tmp for good. A folder of
    that name that a user made is never touched.
    """
    make_folders(folder.parent)
    scratch = temporary_path(folder.parent, f"{folder.name}.", "")
    scratch.mkdir()
    previous = tempfile.tempdir
    tempfile.tempdir = str(scratch)
    try:
        yield
    finally:
        tempfile.tempdir = previous
        shutil.rmtree(scratch, ignore_errors=True)


def save_json(obj: Any, path: str | Path) -> Path:
    text = json.dumps(obj, indent=2, default=str)
    return atomic_write(path, lambda tmp: tmp.write_text(text + "\n"))


def save_text(text: str, path: str | Path) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def process_alive(pid: int) -> bool:
    """Whether `pid` runs on this host (a zombie, dead but not yet reaped, counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return status.rsplit(")", 1)[-1].split()[0] != "Z"
