"""Where a command talks to a person: rich progress bars with ETA, and log lines, on stderr.

Library code logs with `logging.getLogger(__name__)`; `setup_logging` (called by the CLI)
routes those records onto the same rich stderr console as the progress bars, so a bar and
a log line never garble each other. Results (tables) go to stdout.
"""

from __future__ import annotations

import logging
import sys
from typing import ClassVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
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


def progress_bar(*fields: str) -> Progress:
    """A bar with count, elapsed time, ETA and optional live fields (e.g. ``loss``, ``lr``)."""
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        *(TextColumn(f"{name} {{task.fields[{name}]}}") for name in fields),
    ]
    # A bar cannot redraw in a log file or pipe: there it is off, and the loops' own log
    # lines (validation scores, resume notices) are what the log shows.
    return Progress(*columns, console=console, disable=not console.is_terminal)
