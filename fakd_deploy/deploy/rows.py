"""The benchmark's results as types: one `BenchRow` per model and backend, one `BenchReport`.

Bench fills them, the report renders them, `run` reads them back from report.json; JSON
is `dataclasses.asdict` of these, so the file and the code cannot drift apart.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from typing import Any

import numpy as np


class Status(str, Enum):
    """What happened to a row; only `OK` rows have an mIoU and a latency."""

    OK = "ok"
    LOAD_FAILED = "load failed"
    RUN_FAILED = "loads, fails to run"
    SKIPPED = "not runnable here"


@dataclass
class Latency:
    """Milliseconds per call over the timed calls."""

    mean: float
    p50: float
    p90: float
    p99: float

    @classmethod
    def of(cls, times: list[float]) -> Latency:
        p50, p90, p99 = np.percentile(times, [50, 90, 99])
        return cls(*(round(float(v), 3) for v in (np.mean(times), p50, p90, p99)))


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
    device: str | None = None
    miou: float | None = None
    delta_miou: float | None = None
    passed: bool | None = None  # |delta_miou| within the tolerance
    reference: str | None = None  # the backend of the row the deltas are taken against
    speedup: float | None = None  # p50 of the reference row / p50 of this row
    latency_ms: Latency | None = None  # host latency
    gpu_compute_ms: Latency | None = None  # GPU compute (GPU rows only)
    fps: float | None = None
    throughput: float | None = None
    peak_mem_mb: float | None = None
    placement: dict[str, float] | None = None  # share of graph nodes per execution provider

    @property
    def ok(self) -> bool:
        return self.status is Status.OK

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
    """Where and how the rows were measured (`header`), and the rows."""

    header: dict[str, Any]
    rows: list[BenchRow] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"header": self.header, "rows": [row.to_dict() for row in self.rows]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BenchReport:
        return cls(dict(data.get("header") or {}), [BenchRow.from_dict(row) for row in data.get("rows", [])])
