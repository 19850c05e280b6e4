"""The benchmark's results as types: one `BenchRow` per model and backend, one `BenchReport`.

Bench fills them, the report renders them, `run` reads them back from report.json; JSON
is `dataclasses.asdict` of these, so the file and the code cannot drift apart.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from typing import Any, Literal

import numpy as np

PYTORCH = "pytorch"

# Whose fault a row that did not run is: the model file (unreadable, or not fit for the
# data), the backend (its runtime is missing here, raised, or ran elsewhere), or the data.
Fault = Literal["model", "backend", "data"]


class Status(str, Enum):
    """What happened to a row; only `OK` rows have an mIoU and a latency that count."""

    OK = "ok"
    LOAD_FAILED = "load failed"
    RUN_FAILED = "loads, fails to run"
    SKIPPED = "not runnable here"
    OFF_PROVIDER = "ran off its provider"  # measured, but some nodes ran on another provider


@dataclass
class Latency:
    """Milliseconds per call over the timed calls.

    `rounds` holds the median of each timing round (rows are timed in interleaved rounds,
    so a burst of load hits every row alike); `spread` is their range over the overall
    median, in percent: how much the answer moved from round to round.
    """

    mean: float
    p50: float
    p90: float
    p99: float
    spread: float | None = None
    rounds: list[float] | None = None

    @classmethod
    def of(cls, times: list[float]) -> Latency:
        p50, p90, p99 = (round(float(v), 3) for v in np.percentile(times, [50, 90, 99]))
        return cls(round(float(np.mean(times)), 3), p50, p90, p99)

    @classmethod
    def of_rounds(cls, rounds: list[list[float]]) -> Latency:
        """Statistics of all calls, with each round's median and their spread."""
        stats = cls.of([t for times in rounds for t in times])
        medians = [round(float(np.median(times)), 3) for times in rounds]
        stats.rounds = medians
        if len(medians) > 1:
            stats.spread = round(100 * (max(medians) - min(medians)) / float(np.median(medians)), 1)
        return stats


@dataclass
class BenchRow:
    """One model on one backend: what it is, whether it ran, how accurate and how fast."""

    model: str
    backend: str
    runtime: str
    precision: str
    artifact: str
    size_mb: float
    status: Status = Status.LOAD_FAILED
    error: str | None = None
    fault: Fault | None = None  # whose fault a row that did not run is
    file: str | None = None  # the artifact's path, relative to the run folder where there is one
    device: str | None = None
    miou: float | None = None
    per_class_iou: list[float | None] | None = None
    confusion: list[list[int]] | None = None  # rows: ground truth, columns: prediction
    delta_miou: float | None = None
    passed: bool | None = None  # |delta_miou| within the tolerance
    reference: str | None = None  # the backend of the row the deltas are taken against
    speedup: float | None = None  # p50 of the reference row / p50 of this row
    delta_teacher: float | None = None  # mIoU minus the teacher's
    latency_ms: Latency | None = None  # host latency
    gpu_compute_ms: Latency | None = None  # GPU compute (GPU rows only)
    fps: float | None = None
    throughput: float | None = None
    peak_mem_mb: float | None = None
    placement: dict[str, float] | None = None  # share of graph nodes per execution provider
    pareto: bool = False  # no other row is both faster and more accurate
    picked: bool = False  # the row `--pick` chose for its device
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status is Status.OK

    @property
    def timed(self) -> bool:
        """An ok row with an mIoU and a latency: one that can be plotted and compared."""
        return self.ok and self.miou is not None and self.latency_ms is not None

    @property
    def is_reference(self) -> bool:
        return self.reference == self.backend

    @property
    def label(self) -> str:
        return f"{self.model} {self.backend}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "status": self.status.value}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BenchRow:
        known = {f.name for f in fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        values["status"] = Status(values.get("status", Status.LOAD_FAILED))
        for key in ("latency_ms", "gpu_compute_ms"):
            if isinstance(values.get(key), dict):
                values[key] = Latency(**values[key])
        return cls(**values)


@dataclass
class BenchReport:
    """Where and how the rows were measured (`header`), the rows, what a reader must not miss
    (`warnings`), the engine `--pick` chose per device (`choice`, as deploy/choice.json), and
    the comparison grid of `--compare` (a PIL image, written beside the report, not in JSON)."""

    header: dict[str, Any]
    rows: list[BenchRow] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    choice: dict[str, Any] | None = None
    compare: Any = field(default=None, repr=False, compare=False)  # the comparison grid (an image)

    def to_dict(self) -> dict[str, Any]:
        return {
            "header": self.header,
            "rows": [row.to_dict() for row in self.rows],
            "warnings": self.warnings,
            "choice": self.choice,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BenchReport:
        return cls(
            dict(data.get("header") or {}),
            [BenchRow.from_dict(row) for row in data.get("rows", [])],
            list(data.get("warnings") or []),
            data.get("choice"),
        )
