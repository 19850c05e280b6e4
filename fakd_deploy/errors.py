"""The errors fakd-deploy reports to its users, and the exit code each one ends a command with.

Anything raised from this hierarchy is an expected failure: the CLI prints its message (one
line naming the file, key or option and what is wrong) and exits with its code. Anything
else is a bug and shows its traceback. `fakd-deploy --debug ...` shows tracebacks for all.

| code | class | meaning |
|---:|---|---|
| 2 | `BadInput` | fix the command, the recipe or the files it names |
| 1 | `StageFailed` | the input was accepted but a stage could not finish (diverged, parity, disk full) |
| 3 | `RunFolderBusy` | another process holds the run folder; wait for it or pick another `--out` |
| 130 | `Interrupted` | Ctrl-C or SIGTERM; the state was saved and the same command resumes |
"""

from __future__ import annotations

import os
import re
from pathlib import Path


class FakdError(Exception):
    """Base of every error the CLI turns into a message and an exit code."""

    exit_code = 1


class BadInput(FakdError):
    """A recipe, option or file that cannot be used as given."""

    exit_code = 2


class StageFailed(FakdError):
    """Accepted input, failed work: training diverged, an export missed its tolerance..."""

    exit_code = 1


class RunFolderBusy(FakdError):
    """Another process is writing the run folder."""

    exit_code = 3


class Interrupted(FakdError):
    """SIGINT or SIGTERM arrived; a checkpoint was saved and the run can resume."""

    exit_code = 130


class RecipeError(BadInput):
    """A recipe or override that does not fit the schema; the message names the key."""


class DatasetError(BadInput):
    """A dataset that cannot be read as asked; the message names the file and the value."""


class ArtifactError(BadInput):
    """A checkpoint, ONNX model or engine that cannot be used; the message names the file."""


class CheckpointError(ArtifactError):
    """A checkpoint or state dict that cannot be used; the message names the file and the problem."""


class TrainingError(StageFailed):
    """Training stopped for a reason the user must see (a non-finite loss or weight)."""


class ExportError(StageFailed):
    """An exported model does not reproduce the PyTorch model within tolerance."""


class BuildError(StageFailed):
    """A backend could not build its artifact from a valid model."""


class BackendUnavailable(StageFailed):
    """A backend cannot run on this machine (library or GPU missing, engine built elsewhere)."""


class WriteFailed(StageFailed):
    """An output could not be written (disk full, permissions changed mid-run)."""


def unreadable(path: str | Path, error: OSError, what: str = "file") -> BadInput:
    """A user's file that the OS refuses to read, as one line naming it."""
    reason = error.strerror or type(error).__name__
    if isinstance(error, IsADirectoryError) or Path(path).is_dir():
        reason = "it is a directory, not a file"
    return BadInput(f"cannot read {what} {path}: {reason}")


def unwritable(path: str | Path, error: OSError) -> WriteFailed:
    """An output the OS refuses to write, as one line naming it."""
    reason = error.strerror or os.strerror(error.errno or 0) or type(error).__name__
    return WriteFailed(f"cannot write {path}: {reason}")


# C0 and C1 controls, DEL, and the Unicode line and paragraph separators and bidi controls
# that could split a message into lines or reorder what a terminal shows.
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """`text` with every control character escaped (`\\n`, `\\x1b`, `\\u2028`), so a file name
    can neither break a one-line message in two nor send escape sequences to a terminal."""

    def escape(match: re.Match[str]) -> str:
        char = match.group()
        return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(char) or (
            f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"
        )

    return CONTROL.sub(escape, text)


def error_summary(error: BaseException) -> str:
    """The error's type and first line: enough for a table cell or a warning."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


# How the runtimes say an allocation failed: torch (CPU and CUDA), ONNX Runtime, numpy.
OUT_OF_MEMORY = ("can't allocate memory", "not enough memory", "out of memory", "failed to allocate memory")


def out_of_memory(error: BaseException) -> str | None:
    """One line for an allocation that failed, or None for any other error. A batch, an image
    or a model too large for this machine is no bug: the remedy is a smaller one."""
    first = (str(error).splitlines() or [""])[0]
    if isinstance(error, MemoryError) or any(words in first.lower() for words in OUT_OF_MEMORY):
        shown = first if len(first) <= 200 else first[:197] + "..."
        return (
            f"out of memory ({shown or type(error).__name__}): lower data.val_batch_size / "
            "data.batch_size, the image size (data.val_resize, data.crop) or --threads"
        )
    return None
