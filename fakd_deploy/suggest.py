"""Did-you-mean hints for names and paths a person mistyped: a message that suggests the fix."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path


def close_names(name: str, choices: Iterable[str], count: int = 3) -> list[str]:
    """Choices that start with `name` (fakd_kd -> fakd_kd_s0), then those spelled nearly alike."""
    choices = sorted(set(choices))
    extended = [c for c in choices if c.startswith(name) and c != name]
    similar = difflib.get_close_matches(name, choices, count, cutoff=0.6)
    return list(dict.fromkeys([*extended, *similar]))[:count]


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """`; did you mean 'x'?` (or 'x' or 'y'), or nothing when no choice is close."""
    close = close_names(name, choices)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def _entries(folder: Path) -> list[str]:
    try:
        return [p.name for p in folder.iterdir()]
    except OSError:
        return []


def near_paths(path: Path) -> list[Path]:
    """Existing paths that differ from a missing `path` in the one component that is missing.

    `runs/q/students/fakd_kd/best.pt`, when the folder is `fakd_kd_s0`, gives
    `runs/q/students/fakd_kd_s0/best.pt`.
    """
    parts = path.parts
    for depth in range(1, len(parts) + 1):
        if not Path(*parts[:depth]).exists():
            parent = Path(*parts[: depth - 1]) if depth > 1 else Path(".")
            rest = parts[depth:]
            found = [parent.joinpath(name, *rest) for name in close_names(parts[depth - 1], _entries(parent))]
            return [p for p in found if p.exists()]
    return []


def path_hint(path: Path) -> str:
    """`; did you mean X?` for a missing path with an existing near namesake, else nothing."""
    near = near_paths(path)
    return f"; did you mean {' or '.join(str(p) for p in near)}?" if near else ""
