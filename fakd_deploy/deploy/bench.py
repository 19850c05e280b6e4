"""Speed and accuracy of every model of a run on one table: checkpoints, ONNX models, engines.

Each row is one model on one backend, opened through `artifacts.open_predictor` and
scored by the shared `evaluate` on the same validation images at the export resolution,
then timed after a time-based warm-up. Host latency (copies and pre/post-processing
included) is measured for every row; GPU rows add GPU compute time (CUDA events around
the run, inputs already on the device), as trtexec reports both. A model that fails to
load or to evaluate becomes a row with its status and error, never a crash. Nothing here
imports torch unless a checkpoint row is asked for.
"""

from __future__ import annotations

import datetime
import gc
import logging
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fakd_deploy import __version__, optional
from fakd_deploy.artifacts import SUFFIXES, Artifact, resolve_recipe
from fakd_deploy.data.splits import ValBatches
from fakd_deploy.deploy.measure import PeakMemory, measure_gpu_compute, measure_latency
from fakd_deploy.deploy.rows import BenchReport, BenchRow, Latency, Status
from fakd_deploy.deploy.runtime import open_predictor
from fakd_deploy.errors import BadInput, DatasetError, FakdError, error_summary
from fakd_deploy.evaluate import evaluate
from fakd_deploy.predictor import FixedSizePredictor
from fakd_deploy.recipe import BenchConfig, Recipe
from fakd_deploy.runfolder import RunFolder
from fakd_deploy.utils import file_sha256

log = logging.getLogger(__name__)

PYTORCH = "pytorch"


@dataclass
class Candidate:
    """One row to measure: a model file on one backend."""

    model: str
    backend: str
    path: Path


def split_backends(names: list[str] | None) -> list[str] | None:
    """`["ort-int8,pytorch"]` or `["ort-int8", "pytorch"]` -> canonical names; None keeps all."""
    from fakd_deploy.deploy.backends import resolve_backend

    if not names:
        return None
    keys = [key.strip() for name in names for key in name.split(",") if key.strip()]
    return [key if key == PYTORCH else resolve_backend(key).name for key in keys]


def _source_sha(path: Path) -> str | None:
    """The checkpoint hash an artifact records, or None when it cannot be read."""
    try:
        return Artifact.open(path).source_sha256
    except FakdError:
        return None


def file_candidates(path: Path, model: str, backends: list[str] | None) -> list[Candidate]:
    """The rows one file gives: a checkpoint on PyTorch; an ONNX model or engine on every
    backend that runs that kind of artifact (only those usable here unless asked for)."""
    from fakd_deploy.deploy.backends import BACKENDS, runs_artifact
    from fakd_deploy.deploy.runtime import unavailable_reason

    if path.suffix in (".pt", ".pth"):
        return [Candidate(model, PYTORCH, path)] if backends is None or PYTORCH in backends else []
    rows = []
    for name, backend in BACKENDS.items():
        if not runs_artifact(backend, path):
            continue
        wanted = name in backends if backends is not None else unavailable_reason(backend) is None
        if wanted:
            rows.append(Candidate(model, name, path))
    return rows


def candidates(run: RunFolder, backends: list[str] | None = None) -> list[Candidate]:
    """Checkpoints first (teacher, students), then deploy artifacts named after their source."""
    checkpoints = run.checkpoints()
    by_sha = {file_sha256(path): name for name, path in checkpoints.items()}
    found = [c for name, path in checkpoints.items() for c in file_candidates(path, name, backends)]
    from fakd_deploy.deploy.backends import BACKENDS

    artifacts = sorted(p for p in run.deploy.glob("*") if p.suffix in SUFFIXES) if run.deploy.is_dir() else []
    deployed = [
        c
        for path in artifacts
        for c in file_candidates(path, by_sha.get(_source_sha(path) or "", path.name.split(".")[0]), backends)
    ]
    order = list(BACKENDS)
    return found + sorted(deployed, key=lambda c: (c.model, order.index(c.backend)))


def _size_mb(path: Path) -> float:
    return path.stat().st_size / 2**20


def bench_one(
    candidate: Candidate, data: ValBatches, ignore_index: int, size: tuple[int, int] | None, cfg: BenchConfig
) -> BenchRow:
    """One row; a load failure and a run failure each get their own status."""
    from fakd_deploy.deploy.backends import BACKENDS
    from fakd_deploy.deploy.runtime import unavailable_reason

    backend = BACKENDS.get(candidate.backend)
    row = BenchRow(
        model=candidate.model,
        backend=candidate.backend,
        runtime=backend.runtime if backend else PYTORCH,
        precision=backend.precision if backend else "fp32",
        artifact=candidate.path.name,
        size_mb=round(_size_mb(candidate.path), 3),
    )
    reason = unavailable_reason(backend) if backend else None
    if reason:
        row.status, row.error = Status.SKIPPED, reason
        return row
    gpu = bool(backend and backend.device == "cuda")
    with PeakMemory(gpu=gpu) as memory:
        try:
            predictor, _ = open_predictor(
                candidate.path, None if backend is None else backend.name, threads=cfg.threads
            )
        except FakdError as error:
            row.error = error_summary(error)
            return row
        row.device = "cuda" if gpu else "cpu"
        try:
            scored = FixedSizePredictor(predictor, size)
            result = evaluate(
                scored,
                data,
                data.num_classes,
                ignore_index,
                total=len(data),
                description=f"{candidate.model} {candidate.backend}",
            )
        except DatasetError:
            raise  # the data's fault, not the model's: no row, no report (the previous one stays)
        except Exception as error:  # a runtime's own exception types; the row says which
            row.status, row.error = Status.RUN_FAILED, error_summary(error)
            return row
    row.miou, row.peak_mem_mb = round(result["miou"], 3), round(memory.mb(gpu), 1)
    try:
        one = timing_images(data, 1, size)
        row.latency_ms = Latency.of(measure_latency(predictor, one, cfg.warmup_s, cfg.seconds, cfg.iters))
        row.fps = round(1000 / row.latency_ms.mean, 2)
        engine = getattr(predictor, "predictor", predictor)  # the runtime inside the resizing wrapper
        gpu_times = measure_gpu_compute(engine, one, cfg.warmup_s, cfg.seconds, cfg.iters)
        if gpu_times:
            row.gpu_compute_ms = Latency.of(gpu_times)
        if cfg.batch > 1:
            batched = measure_latency(
                predictor, timing_images(data, cfg.batch, size), cfg.warmup_s, cfg.seconds, cfg.iters
            )
            row.throughput = round(cfg.batch * 1000 / float(np.mean(batched)), 2)
    except Exception as error:  # as above
        row.status, row.error = Status.RUN_FAILED, error_summary(error)
        return row
    row.status = Status.OK
    return row


def timing_images(data: ValBatches, count: int, size: tuple[int, int] | None) -> np.ndarray:
    """`count` validation images at the model's input size, cycling if the split is smaller."""
    from fakd_deploy.data.preprocess import resize_bilinear

    images: list[np.ndarray] = []
    for batch, _ in data:
        images.extend(batch)
        if len(images) >= count:
            break
    stacked = np.stack([images[i % len(images)] for i in range(count)])
    return resize_bilinear(stacked, size) if size else stacked


def add_deltas(rows: list[BenchRow], tolerance: float) -> None:
    """mIoU change and p50 speed-up of each row against its model's reference row.

    The reference is the PyTorch row of the same model or, where there is none (an edge
    device without torch), its ONNX Runtime FP32 row on the CPU.
    """
    ok = [row for row in rows if row.ok and row.miou is not None and row.latency_ms is not None]
    reference: dict[str, BenchRow] = {}
    for preferred in (PYTORCH, "ort-cpu-fp32"):
        for row in ok:
            if row.backend == preferred:
                reference.setdefault(row.model, row)
    for row in ok:
        base = reference.get(row.model)
        if base is None:
            continue
        assert base.miou is not None and base.latency_ms is not None
        assert row.miou is not None and row.latency_ms is not None
        row.reference = base.backend
        row.delta_miou = round(row.miou - base.miou, 3)
        row.passed = abs(row.delta_miou) <= tolerance
        row.speedup = round(base.latency_ms.p50 / row.latency_ms.p50, 2)


def _cpu_name() -> str:
    for path, key in (("/proc/cpuinfo", "model name"), ("/proc/device-tree/model", "")):
        try:
            text = Path(path).read_text(errors="ignore").replace("\x00", "")
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith(key):
                return line.split(":", 1)[-1].strip()
    return platform.processor() or platform.machine()


def _gpu_name() -> str | None:
    from fakd_deploy.deploy import cuda

    return None if cuda.no_gpu_reason() else cuda.device_info()["gpu"]


def header(
    title: str, recipe: Recipe, data: ValBatches, cfg: BenchConfig, size: tuple[int, int] | None
) -> dict[str, Any]:
    """Where and how the numbers were measured."""
    return {
        "run": title,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": _cpu_name(),
        "gpu": _gpu_name(),
        "threads": cfg.threads or os.cpu_count(),
        "batch": cfg.batch,
        "input_size": list(size) if size else None,
        "dataset": recipe.data.name,
        "root": recipe.data.root,
        "split": data.split,
        "val_images": data.images,
        "eval_mode": "whole",
        "timing": {
            "latency_ms": "host latency: one call, copies and pre/post-processing included",
            "gpu_compute_ms": "GPU compute: CUDA events around the run, inputs on the device",
        },
        "versions": {
            "fakd_deploy": __version__,
            "python": platform.python_version(),
            **optional.versions("torch", "onnxruntime", "tensorrt"),
        },
    }


def bench_run(recipe: Recipe, found: list[Candidate], cfg: BenchConfig, title: str = "") -> BenchReport:
    """Benchmark candidates on the recipe's val split."""
    export = recipe.deploy.export
    size = (export.height, export.width) if export.height and export.width else None
    data = ValBatches(recipe.data, max_images=cfg.max_images)
    rows = []
    for candidate in found:
        rows.append(bench_one(candidate, data, recipe.data.ignore_index, size, cfg))
        gc.collect()
    add_deltas(rows, cfg.tolerance)
    return BenchReport(header(title, recipe, data, cfg, size), rows)


def bench(
    paths: list[Path],
    backends: list[str] | None = None,
    recipe: Path | None = None,
    overrides: list[str] | None = None,
    out: Path | None = None,
    **options: Any,
) -> tuple[BenchReport, dict[str, Path]]:
    """The `bench` command: a run folder (every model in it), or model files given one by one.

    `options` override the recipe's `bench` section (threads, seconds, iters, ...). The
    report goes to `out`, else into the run folder (holding its lock), else `./bench`.
    """
    from fakd_deploy.deploy.report import write_report
    from fakd_deploy.runfolder import RunLock

    if not paths:
        raise BadInput("bench needs a run folder or model files")
    wanted = split_backends(backends)
    if len(paths) == 1 and paths[0].is_dir():
        run = RunFolder(paths[0])
        if not run.recipe.is_file():
            raise BadInput(f"{run.root} has no recipe.yaml; is it a run folder written by `run`?")
        from fakd_deploy.recipe import load_recipe

        cfg_recipe = load_recipe(recipe or run.recipe, overrides or [])
        found, title = candidates(run, wanted), str(run.root)
    else:
        for path in paths:
            if path.is_dir():
                raise BadInput(f"{path} is a folder: give one run folder, or model files")
        cfg_recipe = resolve_recipe(paths[0], recipe, overrides or [])
        found = [c for path in paths for c in file_candidates(path, path.name.split(".")[0], wanted)]
        title = ", ".join(str(p) for p in paths)
    cfg = cfg_recipe.bench.model_copy(update={k: v for k, v in options.items() if v is not None})
    if not found:
        raise BadInput(
            "nothing to benchmark: no model file matches the requested backends "
            f"({', '.join(wanted) if wanted else 'all usable here'})"
        )
    if out is None and len(paths) == 1 and paths[0].is_dir():
        with RunLock(RunFolder(paths[0])):
            result = bench_run(cfg_recipe, found, cfg, title)
            return result, write_report(result, paths[0])
    result = bench_run(cfg_recipe, found, cfg, title)
    return result, write_report(result, out or Path("bench"))
