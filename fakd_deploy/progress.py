"""Where a command talks to a person: progress with ETA, log lines, and the lines that open
and close a command, on stderr.

Library code logs with `logging.getLogger(__name__)`; `setup_logging` (called by the CLI)
routes those records onto the same rich stderr console as the progress bars, so a bar and
a log line never garble each other. In a terminal, progress is a live rich bar; in a pipe
or a CI log, where a bar cannot redraw, it is one plain line at a steady interval (step,
rate, ETA). Results (tables) go to stdout.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from fakd_deploy.errors import printable

# In a terminal rich follows its width; into a file or pipe, lines and tables stay whole.
console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


class ConsoleHandler(logging.Handler):
    """Log records as whole lines on the rich console: above a live progress bar in a
    terminal, never wrapped in a log file; `warning:` / `error:` in front where it applies.
    Control characters are escaped: a file name cannot split a line or drive the terminal."""

    STYLES: ClassVar[dict[int, str]] = {logging.WARNING: "yellow", logging.ERROR: "red"}

    def emit(self, record: logging.LogRecord) -> None:
        message = printable(self.format(record))
        if record.levelno >= logging.WARNING:
            message = f"{record.levelname.lower()}: {message}"
        console.print(Text(message, style=self.STYLES.get(record.levelno, "")), soft_wrap=True)


def setup_logging(debug: bool = False) -> None:
    """Send fakd_deploy's log records (and Python warnings) to the stderr console."""
    handler = ConsoleHandler()
    logger = logging.getLogger("fakd_deploy")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    logger.propagate = False
    logging.captureWarnings(True)
    warnings_logger = logging.getLogger("py.warnings")
    warnings_logger.handlers[:] = [handler]
    warnings_logger.propagate = False


LINE_INTERVAL_S = 30.0  # seconds between two progress lines in a log


def _duration(seconds: float) -> str:
    whole = max(round(seconds), 0)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


class LineProgress:
    """The progress of a loop as plain lines for logs: at most one every `interval_s` seconds,
    each with the step, the rate and the ETA, and a last one when a task that printed any
    completes (a task shorter than the interval stays silent).

    It takes the calls of `rich.progress.Progress` the loops make (`add_task`, `advance`,
    `update`), so a loop does not know whether it runs in a terminal.
    """

    def __init__(
        self,
        fields: Sequence[str] = (),
        interval_s: float = LINE_INTERVAL_S,
        write: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.fields = list(fields)
        self.interval_s = interval_s
        self.write = write or (lambda line: console.print(Text(line), soft_wrap=True))
        self.clock = clock
        self.tasks: dict[TaskID, dict[str, Any]] = {}

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        return None

    def add_task(
        self,
        description: str,
        total: float | None = None,
        completed: float = 0,
        visible: bool = True,
        **fields: Any,
    ) -> TaskID:
        now = self.clock()
        task = TaskID(len(self.tasks))
        self.tasks[task] = {
            "description": description,
            "total": total,
            "completed": completed,
            "start": completed,
            "started": now,
            "last": now,
            "visible": visible,
            "fields": fields,
            "lines": 0,
            "finished": False,
        }
        return task

    def update(self, task: TaskID, advance: float = 0, **fields: Any) -> None:
        state = self.tasks[task]
        state["fields"].update({k: v for k, v in fields.items() if k in self.fields})
        state["completed"] += advance
        now = self.clock()
        done = state["total"] is not None and state["completed"] >= state["total"]
        due = now - state["last"] >= self.interval_s or (done and state["lines"])
        if state["visible"] and due and not state["finished"]:
            state["last"] = now
            state["lines"] += 1
            state["finished"] = done
            self.write(self.line(state, now))

    def advance(self, task: TaskID, advance: float = 1) -> None:
        self.update(task, advance=advance)

    def line(self, state: dict[str, Any], now: float) -> str:
        """`teacher: step 40/160 (25 %), 3.2 steps/s, elapsed 0:00:12, ETA 0:00:38, loss 0.41`."""
        done, total = state["completed"], state["total"]
        elapsed = now - state["started"]
        rate = (done - state["start"]) / elapsed if elapsed > 0 else math.nan
        parts = [
            f"{state['description']}: step {done:g}"
            + (f"/{total:g} ({100 * done / total:.0f} %)" if total else "")
        ]
        parts.append(f"{rate:.3g} steps/s" if math.isfinite(rate) else "rate -")
        parts.append(f"elapsed {_duration(elapsed)}")
        if total and math.isfinite(rate) and rate > 0:
            parts.append(f"ETA {_duration((total - done) / rate)}")
        parts += [f"{name} {value}" for name, value in state["fields"].items()]
        return ", ".join(parts)


def progress_bar(*fields: str) -> Progress | LineProgress:
    """A bar with count, elapsed time, ETA and optional live fields (e.g. ``loss``, ``lr``);
    plain lines at a steady interval where the console is not a terminal."""
    if not console.is_terminal:
        return LineProgress(fields)
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        *(TextColumn(f"{name} {{task.fields[{name}]}}") for name in fields),
    ]
    return Progress(*columns, console=console)


def start_line(command: str, folder: Path | str, run: Sequence[str], skip: Sequence[str]) -> str:
    """The line a command opens with: where it works, what it will do and what it will skip."""
    doing = ", ".join(run) or "nothing"
    skipping = f"; skips {', '.join(skip)} (up to date)" if skip else ""
    return f"{command} {folder}: runs {doing}{skipping}"


def files_lines(paths: Sequence[Path], root: Path | None = None) -> list[str]:
    """The lines a command ends with: every file it wrote, relative to its run folder."""

    def shown(path: Path) -> str:
        if root is not None and path.is_relative_to(root):
            return str(path.relative_to(root))
        return str(path)

    paths = list(dict.fromkeys(paths))  # a file two stages wrote (export, then its FP32 build) once
    if not paths:
        return ["wrote nothing"]
    where = f" in {root}" if root is not None else ""
    return [
        f"wrote {len(paths)} file{'s' if len(paths) != 1 else ''}{where}:",
        *(f"  {shown(p)}" for p in paths),
    ]
