"""Small helpers shared by every stage: atomic writes with the umask's mode, and hashing."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fakd_deploy.errors import unwritable

TMP_SUFFIX = ".tmp"
SCRATCH = ".tmp"  # a folder for the temporary files of libraries (ONNX Runtime's calibration)


@functools.cache
def file_mode() -> int:
    """The mode a plain `open(path, "w")` would give a new file under this process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Write through a temporary file in the same folder and rename it into place.

    A crash mid-write leaves the previous file intact, never a truncated one; a kill -9
    can leave the hidden `.<name>.*.tmp` file, which the next holder of the run folder's
    lock removes. The file gets the umask's mode, as any other new file would. OS errors
    (disk full, read-only folder) become one `WriteFailed` line naming the file.
    """
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
        os.close(fd)
        write(Path(tmp))
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except OSError as error:
        raise unwritable(path, error) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
    return path


@contextmanager
def temporary_files_in(folder: Path) -> Iterator[None]:
    """Point Python's temporary files (those of libraries we call) into `folder` for a while.

    A process killed meanwhile leaves them beside its outputs, where the run folder's next
    lock holder removes them, rather than in /tmp for good.
    """
    folder.mkdir(parents=True, exist_ok=True)
    previous = tempfile.tempdir
    tempfile.tempdir = str(folder)
    try:
        yield
    finally:
        tempfile.tempdir = previous
        with contextlib.suppress(OSError):
            folder.rmdir()  # only when empty


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
