"""Progress where no bar can redraw (a pipe, a CI log): a plain line at a steady interval."""

from __future__ import annotations

from pathlib import Path

from fakd_deploy.progress import LineProgress, files_lines, start_line


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_line_every_interval_with_step_rate_and_eta() -> None:
    clock, lines = Clock(), []
    progress = LineProgress(["loss"], interval_s=30.0, write=lines.append, clock=clock)
    with progress:
        task = progress.add_task("teacher", total=160, completed=40, loss="-")
        for _ in range(120):
            clock.now += 0.5  # two steps a second
            progress.advance(task)
            if progress.tasks[task]["completed"] == 90:
                progress.update(task, loss="0.4123")
    # 60 s of steps: a line at 30 s and at 60 s (the end); resumed at 40, so the rate counts 120 steps
    assert lines == [
        "teacher: step 100/160 (62 %), 2 steps/s, elapsed 0:00:30, ETA 0:00:30, loss 0.4123",
        "teacher: step 160/160 (100 %), 2 steps/s, elapsed 0:01:00, ETA 0:00:00, loss 0.4123",
    ]


def test_a_short_task_stays_silent_and_an_unknown_total_has_no_eta() -> None:
    clock, lines = Clock(), []
    progress = LineProgress(interval_s=10.0, write=lines.append, clock=clock)
    short = progress.add_task("evaluate", total=3)
    for _ in range(3):
        clock.now += 1.0
        progress.advance(short)
    assert lines == []
    open_ended = progress.add_task("scan", total=None)
    clock.now += 12.0
    progress.advance(open_ended, 6)
    assert lines == ["scan: step 6, 0.5 steps/s, elapsed 0:00:12"]
    hidden = progress.add_task("rank 1", total=2, visible=False)
    clock.now += 60.0
    progress.advance(hidden, 2)
    assert len(lines) == 1


def test_the_lines_that_open_and_close_a_command() -> None:
    assert start_line("run", "runs/q", ["bench"], ["teacher", "export"]) == (
        "run runs/q: runs bench; skips teacher, export (up to date)"
    )
    assert start_line("run", "runs/q", [], ["bench"]) == "run runs/q: runs nothing; skips bench (up to date)"
    root = Path("runs/q")
    assert files_lines([root / "report.json", root / "deploy" / "choice.json"], root) == [
        "wrote 2 files in runs/q:",
        "  report.json",
        "  deploy/choice.json",
    ]
    assert files_lines([]) == ["wrote nothing"]
