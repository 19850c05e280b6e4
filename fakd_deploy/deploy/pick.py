"""Which rows are worth shipping: the Pareto front, and the engine `--pick` chooses per device.

A pick is only as good as the timing under it. Rows are timed in interleaved rounds, so
two rows can be compared round by round: the fastest row wins outright only when it was
faster than the runner-up in every round; otherwise the two are inside the noise, the
choice says so, and the more accurate of them is taken. Only rows that ran as labelled
(status ok) on a deployable artifact (an ONNX model or an engine, not a checkpoint), with
an mIoU within the tolerance of their model's reference row, can be picked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fakd_deploy.deploy.rows import PYTORCH, BenchRow

# cuda first: on a machine with a GPU, the engine to ship is the GPU's
DEVICE_ORDER = ("cuda", "cpu")


def _p50(row: BenchRow) -> float:
    assert row.latency_ms is not None
    return row.latency_ms.p50


def _miou(row: BenchRow) -> float:
    assert row.miou is not None
    return row.miou


def pareto_front(rows: list[BenchRow]) -> list[int]:
    """Indices of timed rows that no other timed row beats on both latency (p50) and mIoU."""
    points = [(i, _p50(row), _miou(row)) for i, row in enumerate(rows) if row.timed]
    return [
        i
        for i, lat, miou in points
        if not any(l2 <= lat and m2 >= miou and (l2, m2) != (lat, miou) for _, l2, m2 in points)
    ]


def rounds_faster(a: BenchRow, b: BenchRow) -> tuple[int, int]:
    """In how many timing rounds `a` was faster than `b`, out of how many both had."""
    ra = a.latency_ms.rounds if a.latency_ms and a.latency_ms.rounds else []
    rb = b.latency_ms.rounds if b.latency_ms and b.latency_ms.rounds else []
    pairs = list(zip(ra, rb, strict=False))
    return sum(x < y for x, y in pairs), len(pairs)


def clearly_faster(a: BenchRow, b: BenchRow) -> bool:
    """`a` beat `b` in every one of at least two shared rounds: a margin outside the noise."""
    wins, total = rounds_faster(a, b)
    return total >= 2 and wins == total


def why_not(row: BenchRow, tolerance: float) -> str | None:
    """Why a row cannot be picked, or None when it can."""
    if not row.ok:
        return f"{row.status.value}" + (f" ({row.fault})" if row.fault else "")
    if row.runtime == PYTORCH:
        return "a PyTorch checkpoint, not a deployable engine"
    if row.miou is None or row.latency_ms is None:
        return "no mIoU or latency"
    if row.delta_miou is None:
        return "no reference row to check its mIoU against"
    if abs(row.delta_miou) > tolerance:
        return f"mIoU {row.delta_miou:+.2f} against its reference, outside the tolerance {tolerance:g}"
    return None


@dataclass
class Choice:
    """The row picked for one device, the runner-up and why it lost, and the faster rows
    that could not be picked."""

    device: str
    row: BenchRow
    decided: bool
    why: str
    runner_up: BenchRow | None = None
    runner_up_lost: str | None = None
    rejected: list[tuple[BenchRow, str]] = field(default_factory=list)


def _versus(winner: BenchRow, other: BenchRow) -> str:
    wins, total = rounds_faster(winner, other)
    return (
        f"p50 {_p50(other):.3g} ms against {_p50(winner):.3g} ms; "
        f"{winner.label} was faster in {wins} of {total} rounds"
    )


def pick_device(rows: list[BenchRow], device: str, tolerance: float) -> Choice | None:
    """The fastest eligible row of one device; among rows inside the noise of the fastest,
    the most accurate one, said to be a tie."""
    on_device = sorted((r for r in rows if r.device == device and r.latency_ms is not None), key=_p50)
    eligible = [r for r in on_device if why_not(r, tolerance) is None]
    if not eligible:
        return None
    fastest = eligible[0]
    tied = [fastest] + [r for r in eligible[1:] if not clearly_faster(fastest, r)]
    decided = len(tied) == 1
    row = max(tied, key=lambda r: (r.miou, -_p50(r)))
    rejected = [(r, why) for r in on_device if _p50(r) < _p50(row) and (why := why_not(r, tolerance))]
    others = [r for r in eligible if r is not row]
    runner_up = others[0] if others else None
    if decided:
        why = f"the fastest row within {tolerance:g} mIoU of its reference" + (
            ", faster than the runner-up in every round" if runner_up else ""
        )
    else:
        why = (
            f"a tie: {', '.join(r.label for r in tied)} are inside the timing noise of each "
            f"other (none was faster in every round); {row.label} is taken for its higher mIoU"
        )
    if runner_up is None:
        lost = None
    elif runner_up in tied:
        lost = (
            f"inside the timing noise ({_versus(row, runner_up)}); mIoU {runner_up.miou:.2f} "
            f"against the pick's {row.miou:.2f}"
        )
    else:
        lost = f"slower: {_versus(row, runner_up)}"
    return Choice(device, row, decided, why, runner_up, lost, rejected)


def pick(rows: list[BenchRow], tolerance: float) -> list[Choice]:
    """One choice per device that has an eligible row, GPU first; each picked row is marked."""
    choices = [c for device in DEVICE_ORDER if (c := pick_device(rows, device, tolerance))]
    for choice in choices:
        choice.row.picked = True
    return choices


def _row_summary(row: BenchRow) -> dict[str, Any]:
    latency = row.latency_ms
    return {
        "model": row.model,
        "backend": row.backend,
        "runtime": row.runtime,
        "precision": row.precision,
        "device": row.device,
        "file": row.file,
        "miou": row.miou,
        "delta_miou": row.delta_miou,
        "reference": row.reference,
        "latency_ms": None
        if latency is None
        else {"p50": latency.p50, "p99": latency.p99, "spread": latency.spread},
    }


def choice_record(choice: Choice, tolerance: float, sha256: str | None) -> dict[str, Any]:
    """One device's choice as deploy/choice.json holds it."""
    return {
        **_row_summary(choice.row),
        "sha256": sha256,
        "tolerance": tolerance,
        "decided": choice.decided,
        "why": choice.why,
        "runner_up": None
        if choice.runner_up is None
        else {**_row_summary(choice.runner_up), "why_it_lost": choice.runner_up_lost},
        "rejected": [{"model": r.model, "backend": r.backend, "why": why} for r, why in choice.rejected],
    }
