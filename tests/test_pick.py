"""Interleaved timing, the warnings a reader must not miss, the Pareto front and `--pick`,
on rows whose numbers are set by hand (no model runs here)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from fakd_deploy.deploy.bench import add_deltas, add_warnings
from fakd_deploy.deploy.measure import time_interleaved
from fakd_deploy.deploy.pick import choice_record, pareto_front, pick
from fakd_deploy.deploy.report import report_table, summary_lines, to_markdown, write_report
from fakd_deploy.deploy.rows import BenchReport, BenchRow, Latency, Status


def row(
    model: str,
    backend: str,
    miou: float,
    rounds: list[float],
    status: Status = Status.OK,
    device: str = "cpu",
    precision: str | None = None,
    runtime: str = "onnxruntime",
) -> BenchRow:
    latency = Latency.of_rounds([[value] for value in rounds])
    return BenchRow(
        model=model,
        backend=backend,
        runtime="pytorch" if backend == "pytorch" else runtime,
        precision=precision or ("int8" if "int8" in backend else "fp32"),
        artifact=f"{model}.onnx",
        size_mb=1.0,
        status=status,
        file=f"deploy/{model}.{backend}.onnx",
        device=device,
        miou=miou,
        latency_ms=latency,
    )


class FakeClock:
    """Time that moves only when a stand-in model runs: each call takes a set duration."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_rows_are_timed_in_interleaved_rounds_that_rotate() -> None:
    clock = FakeClock()
    calls: list[str] = []

    def model(name: str, seconds: float):  # type: ignore[no-untyped-def]
        def run(images: np.ndarray) -> np.ndarray:
            calls.append(name)
            clock.now += seconds
            return images

        return run

    predictors = {"a": model("a", 0.001), "b": model("b", 0.0015)}
    times = time_interleaved(
        predictors, dict.fromkeys(predictors, np.zeros(1)), rounds=4, warmup_s=0.0, iters=8, clock=clock
    )
    # warm-up: a first call and one timed call each; then per round one untimed call and two
    # timed ones per model, the order rotating from round to round
    expected = ["a", "a", "b", "b"]
    for number in range(4):
        order = ["a", "b"] if number % 2 == 0 else ["b", "a"]
        expected += [name for name in order for _ in range(3)]
    assert calls == expected
    assert [len(r) for r in times["a"]] == [2, 2, 2, 2]
    np.testing.assert_allclose(np.concatenate(times["a"]), 1.0, rtol=1e-9)
    np.testing.assert_allclose(np.concatenate(times["b"]), 1.5, rtol=1e-9)


def test_latency_statistics_against_numpy_written_out() -> None:
    """Percentiles by linear interpolation (numpy's default) computed by hand; the spread is
    the range of the round medians over their median."""
    rounds = [[1.0, 3.0, 2.0], [4.0, 5.0, 6.0], [10.0, 7.0, 8.0, 9.0]]
    stats = Latency.of_rounds(rounds)
    values = sorted(v for r in rounds for v in r)  # 1..10
    assert values == [float(v) for v in range(1, 11)]
    assert stats.mean == 5.5 and stats.p50 == 5.5  # halfway between the 5th and 6th values
    assert stats.p90 == pytest.approx(9.1) and stats.p99 == pytest.approx(9.91)  # 1 + 0.9 * 9, 1 + 0.99 * 9
    assert stats.rounds == [2.0, 5.0, 8.5]
    assert stats.spread == pytest.approx(round(100 * (8.5 - 2.0) / 5.0, 1))  # 130.0
    assert Latency.of_rounds([[1.0, 2.0]]).spread is None  # one round: no spread to speak of


def test_unstable_timing_and_int8_no_faster_than_fp32_are_flagged_everywhere(tmp_path: Path) -> None:
    rows = [
        row("m", "pytorch", 70.0, [10.0, 10.2, 9.9]),
        row("m", "ort-cpu-fp32", 70.0, [2.0, 2.0, 2.1]),
        row("m", "ort-cpu-int8", 69.9, [2.2, 3.0, 2.3]),  # slower than FP32, and 36 % spread
    ]
    add_deltas(rows, tolerance=1.0)
    warnings = add_warnings(rows, max_spread=10.0)
    assert rows[0].warnings == [] and rows[1].warnings == []
    assert rows[2].warnings[0].startswith("unstable timing: p50 moved 35 % between rounds")
    assert (
        rows[2].warnings[1].startswith("INT8 is no faster than FP32: p50 2.3 ms against 2 ms on ort-cpu-fp32")
    )
    assert warnings == [f"m ort-cpu-int8: {w}" for w in rows[2].warnings]
    report = BenchReport({"rounds": 3, "max_spread": 10.0}, rows, warnings)
    console = Console(file=io.StringIO(), width=250)
    console.print(report_table(report))
    screen = console.file.getvalue()  # type: ignore[attr-defined]
    assert "⚠ unstable, ⚠ INT8 not faster" in screen and "ref" in screen
    markdown = to_markdown(report)
    assert "⚠ unstable" in markdown and "- warning: m ort-cpu-int8: INT8 is no faster than FP32" in markdown
    write_report(report, tmp_path)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["warnings"] == warnings and saved["rows"][2]["warnings"] == rows[2].warnings


def _choices_rows() -> list[BenchRow]:
    rows = [
        row("m", "pytorch", 70.0, [9.0, 9.0, 9.0]),
        row("m", "ort-cpu-fp32", 70.0, [2.0, 2.1, 2.0]),
        row("m", "ort-cpu-int8", 69.5, [1.0, 1.1, 1.0]),
        row("f", "ort-cpu-int8", 70.0, [0.5, 0.5, 0.5], status=Status.RUN_FAILED),  # failed: no mIoU counts
        row("o", "ort-cuda-fp32", 70.0, [0.3, 0.3, 0.3], status=Status.OFF_PROVIDER, device="cuda"),
        row("q", "ort-cpu-int8", 60.0, [0.4, 0.4, 0.4]),  # far off its reference
        row("q", "ort-cpu-fp32", 70.0, [3.0, 3.0, 3.0]),
    ]
    rows[3].fault = "backend"
    rows[3].miou = None
    rows[4].fault = "backend"
    add_deltas(rows, tolerance=1.0)
    return rows


def test_pick_takes_the_fastest_row_within_tolerance_and_says_what_it_passed_over() -> None:
    rows = _choices_rows()
    (choice,) = pick(rows, tolerance=1.0)  # the off-provider CUDA row leaves nothing for cuda
    assert (choice.device, choice.row.model, choice.row.backend) == ("cpu", "m", "ort-cpu-int8")
    assert choice.decided and choice.row.picked and sum(r.picked for r in rows) == 1
    assert choice.runner_up is rows[1]
    assert (
        choice.runner_up_lost == "slower: p50 2 ms against 1 ms; m ort-cpu-int8 was faster in 3 of 3 rounds"
    )
    rejected = {(r.model, r.backend): why for r, why in choice.rejected}
    assert rejected == {
        ("f", "ort-cpu-int8"): "loads, fails to run (backend)",
        ("q", "ort-cpu-int8"): "mIoU -10.00 against its reference, outside the tolerance 1",
    }
    record = choice_record(choice, 1.0, "ab" * 32)
    assert record["file"] == "deploy/m.ort-cpu-int8.onnx" and record["sha256"] == "ab" * 32
    assert record["runner_up"]["backend"] == "ort-cpu-fp32" and record["decided"] is True
    assert record["latency_ms"] == {"p50": 1.0, "p99": pytest.approx(1.098), "spread": 10.0}
    assert {r["model"] for r in record["rejected"]} == {"f", "q"}


def test_a_row_off_its_provider_is_never_picked_even_alone() -> None:
    lonely = [
        row("o", "ort-cuda-fp32", 70.0, [0.3, 0.3], status=Status.OFF_PROVIDER, device="cuda"),
        row("o", "pytorch", 70.0, [5.0, 5.0], device="cuda"),
    ]
    add_deltas(lonely, tolerance=1.0)
    assert pick(lonely, tolerance=1.0) == []


def test_a_tie_inside_the_noise_is_called_a_tie_and_the_more_accurate_row_is_taken() -> None:
    rows = [
        row("m", "pytorch", 70.0, [9.0, 9.0, 9.0, 9.0]),
        row("m", "ort-cpu-int8", 69.6, [1.0, 1.3, 1.0, 1.3]),
        row("m", "ort-cpu-fp32", 70.0, [1.2, 1.1, 1.2, 1.1]),  # faster in 2 of 4 rounds only
    ]
    add_deltas(rows, tolerance=1.0)
    (choice,) = pick(rows, tolerance=1.0)
    assert not choice.decided and choice.row.backend == "ort-cpu-fp32"
    assert choice.why.startswith("a tie: m ort-cpu-int8, m ort-cpu-fp32 are inside the timing noise")
    assert choice.runner_up is rows[1]
    assert choice.runner_up_lost is not None and "inside the timing noise" in choice.runner_up_lost
    report = BenchReport({}, rows, choice=choice_record(choice, 1.0, None) | {"other_devices": []})
    assert any("a tie" in line for line in summary_lines(report))


def test_one_choice_per_device_the_gpu_first() -> None:
    rows = [
        row("m", "pytorch", 70.0, [9.0, 9.0]),
        row("m", "ort-cpu-int8", 69.8, [1.0, 1.0]),
        row("m", "trt-fp16", 70.0, [0.2, 0.2], device="cuda", runtime="tensorrt", precision="fp16"),
    ]
    add_deltas(rows, tolerance=1.0)
    choices = pick(rows, tolerance=1.0)
    assert [(c.device, c.row.backend) for c in choices] == [("cuda", "trt-fp16"), ("cpu", "ort-cpu-int8")]
    assert all(c.decided and c.runner_up is None for c in choices)


def test_pareto_front_against_a_brute_force_definition() -> None:
    """A row is on the front unless another is at least as fast and as accurate, and better
    in one; checked on random rows, ties included, failed rows never on it."""
    rng = np.random.default_rng(0)
    for _ in range(50):
        count = int(rng.integers(1, 9))
        latencies = rng.integers(1, 5, count).astype(float)
        mious = rng.integers(60, 64, count).astype(float)
        statuses = [Status.OK if rng.random() < 0.8 else Status.RUN_FAILED for _ in range(count)]
        rows = [
            row(f"r{i}", "ort-cpu-fp32", mious[i], [latencies[i]], status=statuses[i]) for i in range(count)
        ]
        ok = [i for i in range(count) if statuses[i] is Status.OK]
        expected = [
            i
            for i in ok
            if not any(
                latencies[j] <= latencies[i]
                and mious[j] >= mious[i]
                and (latencies[j] < latencies[i] or mious[j] > mious[i])
                for j in ok
            )
        ]
        assert pareto_front(rows) == expected
