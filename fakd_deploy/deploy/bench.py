"""Speed and accuracy of every model of a run on one table: checkpoints, ONNX models, engines.

Each row is one model on one backend, opened through `runtime.open_predictor` and scored
by the shared `evaluate` on the same validation images at the export resolution. The
validation data is read once before any model is opened, so a damaged image stops the
benchmark (exit 2) before anything is timed, and the previous report stays. Then every row
that ran is timed in interleaved rounds (each row once per round), so that load from
elsewhere on a shared machine hits all rows alike and shows as a spread between rounds.
Host latency (copies and pre/post-processing included) is measured for every row; GPU rows
add GPU compute time, as trtexec reports both. A model that fails to load or to run becomes
a row with its status, whose fault it was, and the error, never a crash. Nothing here
imports torch unless a checkpoint row is asked for.
"""

from __future__ import annotations

import datetime
import gc
import importlib.util
import logging
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from fakd_deploy import __version__, optional
from fakd_deploy.artifacts import SUFFIXES, Artifact, resolve_recipe
from fakd_deploy.data.splits import ValBatches
from fakd_deploy.deploy.compare import Sample, compare_grid
from fakd_deploy.deploy.measure import PeakMemory, measure_gpu_compute, measure_latency, time_interleaved
from fakd_deploy.deploy.pick import choice_record, pareto_front, pick
from fakd_deploy.deploy.rows import PYTORCH, BenchReport, BenchRow, Fault, Latency, Status
from fakd_deploy.errors import (
    ArtifactError,
    BackendUnavailable,
    BadInput,
    DatasetError,
    FakdError,
    error_summary,
)
from fakd_deploy.evaluate import evaluate, predict_labels
from fakd_deploy.predictor import FixedSizePredictor, Predictor
from fakd_deploy.recipe import BenchConfig, Recipe, updated
from fakd_deploy.runfolder import RunFolder
from fakd_deploy.suggest import path_hint
from fakd_deploy.utils import file_sha256

log = logging.getLogger(__name__)

# What each timing column measures (docs/deploy.md, "What the timing columns measure")
TIMING = {
    "latency_ms": (
        "host latency: wall-clock time of one Predictor call on a batch of host (numpy) images, "
        "host-to-device copy, compute and device-to-host copy included, the result back in host "
        "memory; resizing to a fixed model size is outside the call"
    ),
    "gpu_compute_ms": (
        "GPU compute (GPU rows only), as trtexec's GPU Compute Time: CUDA events recorded on the "
        "backend's own stream around each run, inputs already on the device, runs queued back to "
        "back with one in flight behind the timed one (ONNX Runtime: run option "
        "disable_synchronize_execution_providers=1), after a time-based warm-up"
    ),
    "spread": "range of the per-round medians over the overall median, in percent",
}
REFERENCES = (PYTORCH, "ort-cpu-fp32")  # a model's reference row, in order of preference


@dataclass
class Candidate:
    """One row to measure: a model file on one backend (`missing`: why there is no file)."""

    model: str
    backend: str
    path: Path
    file: str | None = None  # the path as the report names it
    missing: str | None = None
    by_folder: bool = False  # named after its run-folder folder, which its contents must match


def split_backends(names: list[str] | None) -> list[str] | None:
    """`["ort-int8,pytorch"]` or `["ort-int8", "pytorch"]` -> canonical names; None keeps all."""
    from fakd_deploy.deploy.backends import resolve_backend

    if not names:
        return None
    keys = [key.strip() for name in names for key in name.split(",") if key.strip()]
    return list(dict.fromkeys(key if key == PYTORCH else resolve_backend(key).name for key in keys))


def _source_sha(path: Path) -> str | None:
    """The checkpoint hash an artifact records, or None when it cannot be read."""
    try:
        return Artifact.open(path).source_sha256
    except FakdError:
        return None


def file_candidates(
    path: Path, model: str, backends: list[str] | None, file: str | None = None
) -> list[Candidate]:
    """The rows one file gives: a checkpoint on PyTorch; an ONNX model or engine on every
    backend that runs that kind of artifact (only those usable here unless asked for)."""
    from fakd_deploy.deploy.backends import BACKENDS, runs_artifact
    from fakd_deploy.deploy.runtime import unavailable_reason

    file = file or str(path)
    if path.suffix in (".pt", ".pth"):
        wanted = backends is None or PYTORCH in backends
        return [Candidate(model, PYTORCH, path, file)] if wanted else []
    rows = []
    for name, backend in BACKENDS.items():
        if not runs_artifact(backend, path):
            continue
        wanted = name in backends if backends is not None else unavailable_reason(backend) is None
        if wanted:
            rows.append(Candidate(model, name, path, file))
    return rows


def _torch_installed() -> bool:
    return importlib.util.find_spec("torch") is not None


def _missing_reason(onnx: str, backend: str, shown: str) -> str:
    """Why a backend asked for by name has no row: its file was never built (and maybe
    its runtime is missing here too)."""
    from fakd_deploy.deploy.runtime import unavailable_reason

    reason = f"no {shown}: build it with `fakd-deploy build {onnx} --backend {backend}`"
    unavailable = unavailable_reason(backend)
    return f"{reason}; and {unavailable}" if unavailable else reason


def candidates(run: RunFolder, backends: list[str] | None = None) -> list[Candidate]:
    """Checkpoints first (teacher, students), then deploy artifacts named after their source.

    With `backends`, each model keeps its reference row (its PyTorch checkpoint, or its
    ONNX Runtime CPU FP32 model where torch is missing) so `× ref` means the same whatever
    is selected, and a backend asked for whose file was never built gets a row saying so.
    """
    from fakd_deploy.deploy.backends import BACKENDS, artifact_path, model_stem

    checkpoints = run.checkpoints()
    by_sha = {file_sha256(path): name for name, path in checkpoints.items()}
    artifacts = sorted(p for p in run.deploy.glob("*") if p.suffix in SUFFIXES) if run.deploy.is_dir() else []
    names = {path: by_sha.get(_source_sha(path) or "", path.name.split(".")[0]) for path in artifacts}
    deployed = [
        c for path in artifacts for c in file_candidates(path, names[path], backends, run.relative(path))
    ]
    wanted = {name: backends for name in checkpoints}
    if backends is not None:
        for model in {c.model for c in deployed}:
            if model in checkpoints and _torch_installed():
                wanted[model] = [*backends, PYTORCH]
            elif "ort-cpu-fp32" not in backends:
                deployed += [
                    c
                    for path in artifacts
                    if names[path] == model
                    for c in file_candidates(path, model, ["ort-cpu-fp32"], run.relative(path))
                ]
        for backend in [b for b in backends if b != PYTORCH]:
            for onnx in [p for p in artifacts if p.name == f"{model_stem(p)}.onnx"]:
                if not any(c.model == names[onnx] and c.backend == backend for c in deployed):
                    expected = artifact_path(onnx, backend)
                    shown = run.relative(expected)
                    why = _missing_reason(run.relative(onnx), backend, shown)
                    deployed.append(Candidate(names[onnx], backend, expected, shown, why))
    found = [
        replace(c, by_folder=True)
        for name, path in checkpoints.items()
        for c in file_candidates(path, name, wanted[name], run.relative(path))
    ]
    order = list(BACKENDS)
    return found + sorted(deployed, key=lambda c: (c.model, order.index(c.backend)))


def _size_mb(path: Path) -> float:
    return round(path.stat().st_size / 2**20, 3) if path.is_file() else 0.0


def read_data(data: ValBatches, count: int) -> Sample:
    """Read every validation image once, before any model is opened, and keep the first `count`.

    A damaged image or label is the data's fault, not a model's: it stops the benchmark
    here (exit 2), before anything is timed or written.
    """
    images: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    try:
        for batch, mask in data:
            if len(images) < count:
                images.extend(batch)
                masks.extend(mask)
    except DatasetError as error:
        raise DatasetError(
            f"the validation data cannot be read: {error}; nothing was benchmarked and the "
            "previous report is kept"
        ) from None
    if not images:
        raise DatasetError("nothing to benchmark on: the split (or --max-images) gives no images")
    return Sample(np.stack(images[:count]), np.stack(masks[:count]))


def _fail(row: BenchRow, status: Status, fault: Fault, error: BaseException | str) -> BenchRow:
    row.status, row.fault = status, fault
    row.error = error if isinstance(error, str) else error_summary(error)
    return row


def _misfit(artifact: Artifact, data: ValBatches, dataset: str) -> tuple[Fault, str] | None:
    """Why the model cannot be scored on this data, and whose fault that is; None when it can.

    A model that predicts another number of classes was given the wrong data. (One that takes
    other than RGB images is refused when it is opened: `artifacts.check_graph`.)
    """
    if artifact.num_classes is not None and artifact.num_classes != data.num_classes:
        return "data", (
            f"{artifact.path.name} predicts {artifact.num_classes} classes but the data "
            f"({dataset} {data.split}) has {data.num_classes}"
        )
    return None


def _misplaced(artifact: Artifact, candidate: Candidate) -> tuple[Fault, str] | None:
    """A checkpoint whose stored role, variant and seed are not its folder's: a copied or
    rearranged run folder is checked by what is in it, not by where it lies."""
    if not candidate.by_folder or artifact.kind != "checkpoint":
        return None
    role, variant, seed = (artifact.metadata.get(key) for key in ("role", "variant", "seed"))
    if role != "teacher" and (variant is None or seed is None):
        return None  # saved by hand, without the fields to check
    holds = "teacher" if role == "teacher" else f"{variant}_s{seed}"
    if holds == candidate.model:
        return None
    return "model", f"{candidate.file} holds {holds}, not {candidate.model}: put it back in its own folder"


def score_row(
    candidate: Candidate,
    data: ValBatches,
    recipe: Recipe,
    size: tuple[int, int] | None,
    cfg: BenchConfig,
    sample: Sample,
) -> tuple[BenchRow, Predictor | None, np.ndarray | None]:
    """One row's accuracy: (row, its open predictor to time, its labels of the sample images).

    A failure leaves the row with its status and whose fault it was; the predictor is None.
    """
    from fakd_deploy.deploy.backends import BACKENDS
    from fakd_deploy.deploy.runtime import open_predictor, unavailable_reason

    backend = BACKENDS.get(candidate.backend)
    row = BenchRow(
        model=candidate.model,
        backend=candidate.backend,
        runtime=backend.runtime if backend else PYTORCH,
        precision=backend.precision if backend else "fp32",
        artifact=candidate.path.name,
        size_mb=_size_mb(candidate.path),
        file=candidate.file,
        device=backend.device if backend else "cpu",
    )
    if candidate.missing:
        return _fail(row, Status.SKIPPED, "backend", candidate.missing), None, None
    reason = unavailable_reason(backend) if backend else None
    if reason:
        return _fail(row, Status.SKIPPED, "backend", reason), None, None
    gpu = row.device == "cuda"
    with PeakMemory(gpu=gpu) as memory:
        try:
            artifact = Artifact.open(candidate.path)
            predictor, _ = open_predictor(
                artifact, None if backend is None else backend.name, threads=cfg.threads
            )
        except BackendUnavailable as error:
            return _fail(row, Status.SKIPPED, "backend", error), None, None
        except FakdError as error:
            return _fail(row, Status.LOAD_FAILED, "model", error), None, None
        misfit = _misfit(artifact, data, recipe.data.name) or _misplaced(artifact, candidate)
        if misfit:
            return _fail(row, Status.RUN_FAILED, *misfit), None, None
        scored = FixedSizePredictor(predictor, size)
        try:
            result = evaluate(
                scored,
                data,
                data.num_classes,
                recipe.data.ignore_index,
                total=len(data),
                description=f"{candidate.model} {candidate.backend}",
            )
            labels = predict_labels(scored, sample.images) if cfg.compare else None
        except (DatasetError, ArtifactError) as error:  # the model's output does not fit the data
            return _fail(row, Status.RUN_FAILED, "model", error), None, None
        except Exception as error:  # a runtime's own exception types: the backend raised
            return _fail(row, Status.RUN_FAILED, "backend", error), None, None
    row.miou = round(result["miou"], 3)
    row.per_class_iou = [None if v is None else round(v, 3) for v in result["per_class_iou"]]
    row.confusion = result["confusion_matrix"]
    row.peak_mem_mb = round(memory.mb(gpu), 1)
    row.status = Status.OK
    return row, scored, labels


class _Guarded:
    """A predictor that remembers its first exception instead of raising it, so one row that
    fails while being timed does not stop the rounds of the others."""

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor
        self.error: Exception | None = None

    def __call__(self, images: np.ndarray) -> np.ndarray | None:
        if self.error is None:
            try:
                return self.predictor(images)
            except Exception as error:  # a runtime's own exception types
                self.error = error
        return None


def time_rows(rows: list[tuple[BenchRow, Predictor]], sample: Sample, cfg: BenchConfig) -> None:
    """Host latency of every row in interleaved rounds, then GPU compute and throughput; a GPU
    row some of whose nodes ran on another provider than its label says is marked so."""
    from fakd_deploy.deploy.backends import BACKENDS
    from fakd_deploy.deploy.runtime import placement_problem

    one = sample.images[:1]
    guarded: dict[int, Callable[[Any], Any]] = {
        i: _Guarded(predictor) for i, (_, predictor) in enumerate(rows)
    }
    times = time_interleaved(
        guarded, dict.fromkeys(guarded, one), cfg.rounds, cfg.warmup_s, cfg.seconds, cfg.iters
    )
    for index, (row, predictor) in enumerate(rows):
        failure = guarded[index].error  # type: ignore[attr-defined]
        if failure is not None:
            _fail(row, Status.RUN_FAILED, "backend", failure)
            continue
        row.latency_ms = Latency.of_rounds(times[index])
        row.fps = round(1000 / row.latency_ms.mean, 2)
        try:
            engine = getattr(predictor, "predictor", predictor)  # the runtime inside the resizing wrapper
            engine = getattr(engine, "predictor", engine)
            gpu_times = measure_gpu_compute(engine, one, cfg.warmup_s, cfg.seconds, cfg.iters)
            if gpu_times:
                row.gpu_compute_ms = Latency.of(gpu_times)
            if cfg.batch > 1:
                batch = np.stack([sample.images[i % len(sample.images)] for i in range(cfg.batch)])
                batched = measure_latency(predictor, batch, cfg.warmup_s, cfg.seconds, cfg.iters)
                row.throughput = round(cfg.batch * 1000 / float(np.mean(batched)), 2)
        except Exception as error:  # as above
            _fail(row, Status.RUN_FAILED, "backend", error)
            continue
        row.placement = getattr(engine, "placement", None)  # ONNX Runtime GPU rows: where nodes ran
        backend = BACKENDS.get(row.backend)
        problem = placement_problem(backend, row.placement) if backend else None
        if problem:
            _fail(row, Status.OFF_PROVIDER, "backend", problem)


def add_deltas(rows: list[BenchRow], tolerance: float) -> None:
    """mIoU change and p50 speed-up of each row against its model's reference row, and the
    mIoU gap to the teacher.

    The reference is the PyTorch row of the same model or, where there is none (an edge
    device without torch), its ONNX Runtime FP32 row on the CPU.
    """
    reference: dict[str, BenchRow] = {}
    for preferred in REFERENCES:
        for row in rows:
            if row.timed and row.backend == preferred:
                reference.setdefault(row.model, row)
    teacher = reference.get("teacher")
    for row in rows:
        base = reference.get(row.model)
        if not row.timed or base is None:
            continue
        assert base.miou is not None and base.latency_ms is not None
        assert row.miou is not None and row.latency_ms is not None
        row.reference = base.backend
        row.delta_miou = round(row.miou - base.miou, 3)
        row.passed = abs(row.delta_miou) <= tolerance
        row.speedup = round(base.latency_ms.p50 / row.latency_ms.p50, 2)
        if teacher is not None and teacher.miou is not None and row.model != "teacher":
            row.delta_teacher = round(row.miou - teacher.miou, 3)


def add_warnings(rows: list[BenchRow], max_spread: float) -> list[str]:
    """Flag rows a reader must not take at face value; the report-level list, row by row."""
    for row in rows:
        latency = row.latency_ms
        if row.timed and latency is not None and latency.spread is not None and latency.spread > max_spread:
            row.warnings.append(
                f"unstable timing: p50 moved {latency.spread:.0f} % between rounds (over "
                f"{max_spread:g} %); the machine was busy, rerun on an idle one or with more --rounds"
            )
        if row.timed and row.precision == "int8":
            fp32 = [
                r
                for r in rows
                if r.timed
                and r.model == row.model
                and r.device == row.device
                and r.precision == "fp32"
                and r.runtime != PYTORCH
            ]
            for other in fp32:
                assert other.latency_ms is not None and latency is not None
                if latency.p50 >= other.latency_ms.p50:
                    row.warnings.append(
                        f"INT8 is no faster than FP32: p50 {latency.p50:.3g} ms against "
                        f"{other.latency_ms.p50:.3g} ms on {other.backend}"
                    )
    return [f"{row.label}: {warning}" for row in rows for warning in row.warnings]


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
        "class_names": data.class_names,
        "eval_mode": "whole",
        "rounds": cfg.rounds,
        "max_spread": cfg.max_spread,
        "tolerance": cfg.tolerance,
        "reference": "each model's pytorch row (its ort-cpu-fp32 row where there is none)",
        "timing": TIMING,
        "versions": {
            "fakd_deploy": __version__,
            "python": platform.python_version(),
            **optional.versions("torch", "onnxruntime", "tensorrt"),
        },
    }


def _choice(choices: list[Any], cfg: BenchConfig, paths: dict[int, Path]) -> dict[str, Any] | None:
    """deploy/choice.json: the first device's choice at the top, the others after it."""
    if not choices:
        return None
    records = [choice_record(c, cfg.tolerance, file_sha256(paths[id(c.row)])) for c in choices]
    return {"version": 1, **records[0], "other_devices": records[1:]}


def bench_run(recipe: Recipe, found: list[Candidate], cfg: BenchConfig, title: str = "") -> BenchReport:
    """Benchmark candidates on the recipe's val split."""
    export = recipe.deploy.export
    data = ValBatches(recipe.data, max_images=cfg.max_images)
    sample = read_data(data, max(cfg.compare, 1))
    size = (export.height, export.width) if export.height and export.width else None
    # Each runtime is imported before the first row that needs it is measured, so that row's
    # peak memory is the model's and not also the library's.
    from fakd_deploy.deploy.backends import BACKENDS

    for backend in {c.backend for c in found if not c.missing}:
        optional.load("torch" if backend == PYTORCH else BACKENDS[backend].runtime)
    rows: list[BenchRow] = []
    open_rows: list[tuple[BenchRow, Predictor]] = []
    labels: dict[int, np.ndarray] = {}
    for candidate in found:
        row, predictor, predicted = score_row(candidate, data, recipe, size, cfg, sample)
        rows.append(row)
        if predictor is not None:
            open_rows.append((row, predictor))
        if predicted is not None:
            labels[len(rows) - 1] = predicted
        gc.collect()
    unfit = [row for row in rows if row.fault == "data"]
    if unfit and len(unfit) == len(rows):
        raise BadInput(f"{unfit[0].error}; score these models on the data they were trained for (--recipe)")
    if open_rows:
        time_rows(open_rows, sample, cfg)
    del open_rows
    gc.collect()
    add_deltas(rows, cfg.tolerance)
    warnings = add_warnings(rows, cfg.max_spread)
    for index in pareto_front(rows):
        rows[index].pareto = True
    timed_size = size or (int(sample.images.shape[-2]), int(sample.images.shape[-1]))
    report = BenchReport(header(title, recipe, data, cfg, timed_size), rows, warnings)
    if cfg.pick:
        choices = pick(rows, cfg.tolerance)
        report.choice = _choice(choices, cfg, {id(row): c.path for row, c in zip(rows, found, strict=True)})
        if not choices:
            report.warnings.append(
                f"--pick found nothing to pick: no ONNX model or engine row ran within "
                f"{cfg.tolerance:g} mIoU of its reference"
            )
        report.warnings += [f"--pick on {c.device}: {c.why}" for c in choices if not c.decided]
    if cfg.compare:
        report.compare = compare_grid(rows, labels, sample, recipe, data.class_names)
    return report


def _run_folder(path: Path) -> RunFolder:
    """The run folder at `path`, or one line saying why it is not one (and what was meant)."""
    if not path.exists():
        raise BadInput(f"{path} does not exist{path_hint(path)}")
    run = RunFolder(path)
    if not run.recipe.is_file():
        inside = sorted(p.name for p in path.iterdir() if (p / "recipe.yaml").is_file())
        hint = f"; run folders in it: {', '.join(inside)}" if inside else ""
        raise BadInput(f"{run.root} has no recipe.yaml; is it a run folder written by `run`?{hint}")
    return run


REPORT_MARKS = ("report.json",)


def bench(
    paths: list[Path],
    backends: list[str] | None = None,
    recipe: Path | None = None,
    overrides: list[str] | None = None,
    out: Path | None = None,
    **options: Any,
) -> tuple[BenchReport, dict[str, Path]]:
    """The `bench` command: a run folder (every model in it), or model files given one by one.

    `options` override the recipe's `bench` section (threads, seconds, iters, rounds, pick,
    compare, ...). The report goes to `out`, else into the run folder (holding its lock),
    else `./bench`.
    """
    from fakd_deploy.deploy.report import write_report
    from fakd_deploy.runfolder import RunLock, held_around

    if not paths:
        raise BadInput("bench needs a run folder or model files")
    wanted = split_backends(backends)
    folder = len(paths) == 1 and (paths[0].is_dir() or not paths[0].suffix)
    if folder:
        run = _run_folder(paths[0])
        from fakd_deploy.recipe import load_recipe

        cfg_recipe = load_recipe(recipe or run.recipe, overrides or [])
        found, title, root = candidates(run, wanted), str(run.root), run.root
    else:
        for path in paths:
            if path.is_dir():
                raise BadInput(f"{path} is a folder: give one run folder, or model files")
            if not path.exists():
                raise BadInput(f"model not found: {path}{path_hint(path)}")
        cfg_recipe = resolve_recipe(paths[0], recipe, overrides or [])
        found = [c for path in paths for c in file_candidates(path, path.name.split(".")[0], wanted)]
        for backend in [b for b in wanted or [] if b != PYTORCH]:
            if not any(c.backend == backend for c in found):
                found += [
                    Candidate(
                        path.name.split(".")[0],
                        backend,
                        path,
                        str(path),
                        f"{path.name} does not run on {backend}",
                    )
                    for path in paths
                ]
        title, root = ", ".join(str(p) for p in paths), None
    cfg = updated(cfg_recipe.bench, "bench", options)
    if not found:
        raise BadInput(
            "nothing to benchmark: no checkpoint or model file in "
            f"{', '.join(str(p) for p in paths)} runs on {', '.join(wanted or ['any backend usable here'])}"
        )
    log.info(f"bench {title}: {len(found)} row(s): {', '.join(f'{c.model} on {c.backend}' for c in found)}")
    if out is None and root is not None:
        with RunLock(RunFolder(root)):
            result = bench_run(cfg_recipe, found, cfg, title)
            return result, write_report(result, root)
    out = out or Path("bench")
    # a report folder, or a new or empty one; inside a run folder, that folder is held too
    with held_around(out), RunLock(RunFolder(out), marks=REPORT_MARKS):
        result = bench_run(cfg_recipe, found, cfg, title)
        return result, write_report(result, out)
