"""Rich progress bars with ETA, shared by training, evaluation and benchmarking."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

# In a terminal rich follows its width; into a file or pipe, lines and tables stay whole.
console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


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
    # A bar cannot redraw in a log file or pipe: there it is off, and the loops' own lines
    # (validation scores, resume notices) are what the log shows.
    return Progress(*columns, console=console, disable=not console.is_terminal)
