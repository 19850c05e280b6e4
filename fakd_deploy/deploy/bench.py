"""Speed and accuracy of every model of a run on one table: checkpoints, ONNX models, engines.

Each row is scored by the shared `evaluate` on the same validation images at the
export resolution, and timed at batch 1 after a time-based warm-up. A model that fails
to load or to evaluate becomes a row with its status and error, never a crash.
"""

from __future__ import annotations

import datetime
import gc
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from fakd_deploy import __version__
from fakd_deploy.deploy import error_summary
from fakd_deploy.deploy.measure import PeakMemory, latency_stats, measure_latency
from fakd_deploy.deploy.shapes import FixedSizePredictor
from fakd_deploy.evaluate import EvalMode, Predictor, evaluate
from fakd_deploy.utils import file_sha256

STATUS_OK = "ok"
STATUS_EVAL_FAILED = "export ok, evaluation failed"
STATUS_FAILED = "failed"
ORDER = ("pytorch", "ort-fp32", "ort-int8", "trt-fp32", "trt-fp16", "trt-int8")


@dataclass
class Candidate:
    """One thing to benchmark: a checkpoint or a deploy artifact."""

    model: str
    backend: str  # pytorch | onnxruntime | tensorrt
    precision: str  # fp32 | fp16 | int8
    path: Path


@dataclass
class Loaded:
    predictor: Predictor
    params: float | None  # millions
    size_mb: float
    gpu: bool


def _checkpoint_names(run: Path) -> dict[Path, str]:
    names = {}
    if (run / "teacher" / "best.pt").exists():
        names[run / "teacher" / "best.pt"] = "teacher"
    for path in sorted((run / "students").glob("*/best.pt")):
        names[path] = path.parent.name
    return names


def _artifact_kind(path: Path) -> tuple[str, str] | None:
    """(backend, precision) from a deploy file name; intermediates such as X.trt-int8.onnx: None."""
    if path.suffix == ".engine":
        precision = path.suffixes[-2].lstrip(".") if len(path.suffixes) > 1 else None
        return ("tensorrt", precision) if precision in ("fp32", "fp16", "int8") else None
    if path.name.endswith(".int8.onnx"):
        return "onnxruntime", "int8"
    if path.suffix == ".onnx" and len(path.suffixes) == 1:
        return "onnxruntime", "fp32"
    return None


def _source_sha(path: Path) -> str | None:
    """The checkpoint hash an artifact records, or None when it cannot be read."""
    from fakd_deploy.deploy.export import read_metadata
    from fakd_deploy.deploy.trt import load_sidecar

    try:
        meta = load_sidecar(path)["metadata"] if path.suffix == ".engine" else read_metadata(path)
    except Exception:
        return None
    return meta.get("checkpoint_sha256")


def discover(run: str | Path) -> list[Candidate]:
    """Checkpoints first (teacher, students), then deploy artifacts named after their source."""
    run = Path(run)
    checkpoints = _checkpoint_names(run)
    by_sha = {file_sha256(path): name for path, name in checkpoints.items()}
    artifacts = []
    for path in sorted((run / "deploy").glob("*")):
        kind = _artifact_kind(path)
        if kind:
            model = by_sha.get(_source_sha(path) or "", path.name.split(".")[0])
            artifacts.append(Candidate(model, *kind, path))
    artifacts.sort(key=lambda c: (c.model, ORDER.index(backend_key(c))))
    return [Candidate(name, "pytorch", "fp32", path) for path, name in checkpoints.items()] + artifacts


def split_backends(names: list[str] | None) -> list[str] | None:
    """`["ort-int8,pytorch"]` or `["ort-int8", "pytorch"]` -> checked names; None keeps all."""
    if not names:
        return None
    keys = [key.strip() for name in names for key in name.split(",") if key.strip()]
    unknown = [key for key in keys if key not in ORDER]
    if unknown:
        raise ValueError(f"unknown backend(s) {', '.join(unknown)}; choose from: {', '.join(ORDER)}")
    return keys


def backend_key(candidate: Candidate) -> str:
    """The name `backends=` filters on: pytorch, ort-fp32, ort-int8, trt-fp16..."""
    if candidate.backend == "pytorch":
        return "pytorch"
    prefix = "ort" if candidate.backend == "onnxruntime" else "trt"
    return f"{prefix}-{candidate.precision}"


def _load_pytorch(path: Path, threads: int | None) -> Loaded:
    from fakd_deploy.evaluate import TorchPredictor
    from fakd_deploy.models import model_from_checkpoint
    from fakd_deploy.utils import resolve_device

    model = model_from_checkpoint(path)
    device = resolve_device("auto")
    tensors = [*model.parameters(), *model.buffers()]
    size = sum(t.numel() * t.element_size() for t in tensors) / 2**20
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return Loaded(TorchPredictor(model, device), params, size, device.type == "cuda")


def _onnx_params(path: Path) -> float:
    model = onnx.load(str(path))
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer) / 1e6


def _load_onnxruntime(path: Path, threads: int | None) -> Loaded:
    from fakd_deploy.deploy.ort import OrtPredictor

    predictor = OrtPredictor(path, threads=threads)
    gpu = predictor.providers[0] == "CUDAExecutionProvider"
    return Loaded(FixedSizePredictor(predictor, predictor.input_size), _onnx_params(path),
                  path.stat().st_size / 2**20, gpu)


def _load_tensorrt(path: Path, threads: int | None) -> Loaded:
    from fakd_deploy.deploy.trt import TrtPredictor

    predictor = TrtPredictor(path)
    source = Path(predictor.sidecar["onnx"])
    params = _onnx_params(source) if source.exists() else None
    return Loaded(FixedSizePredictor(predictor, predictor.input_size), params,
                  path.stat().st_size / 2**20, True)


LOADERS: dict[str, Callable[[Path, int | None], Loaded]] = {
    "pytorch": _load_pytorch, "onnxruntime": _load_onnxruntime, "tensorrt": _load_tensorrt}


@dataclass
class BenchData:
    """The validation data every row sees, and how each row is timed."""

    batches: Callable[[], Any]  # a fresh loader of (images, masks)
    total: int  # batches per pass
    images: int
    num_classes: int
    ignore_index: int
    size: tuple[int, int] | None
    batch: int
    threads: int | None
    iters: int | None
    seconds: float
    warmup_s: float

    def timing_images(self, count: int) -> torch.Tensor:
        images = []
        for batch, _ in self.batches():
            images.append(batch)
            if sum(len(x) for x in images) >= count:
                break
        stacked = torch.cat(images)
        stacked = stacked[torch.arange(count) % len(stacked)]
        if self.size and tuple(stacked.shape[-2:]) != self.size:
            stacked = F.interpolate(stacked, self.size, mode="bilinear", align_corners=False)
        return stacked


def bench_one(candidate: Candidate, data: BenchData) -> dict[str, Any]:
    """One row; load failures give status `failed`, evaluation failures the middle status."""
    row: dict[str, Any] = {
        "model": candidate.model, "backend": candidate.backend, "precision": candidate.precision,
        "artifact": candidate.path.name, "status": STATUS_FAILED, "error": None, "miou": None,
        "delta_miou": None, "pass": None, "latency_ms": None, "fps": None, "throughput": None,
        "size_mb": None, "params": None, "peak_mem_mb": None, "device": None, "speedup": None}
    with PeakMemory() as memory:
        try:
            loaded = LOADERS[candidate.backend](candidate.path, data.threads)
        except Exception as error:
            return {**row, "error": error_summary(error)}
        row.update(size_mb=round(loaded.size_mb, 3), device="cuda" if loaded.gpu else "cpu",
                   params=None if loaded.params is None else round(loaded.params, 4))
        try:
            predictor = FixedSizePredictor(loaded.predictor, data.size)
            result = evaluate(predictor, data.batches(), data.num_classes, data.ignore_index,
                              mode=EvalMode(), total=data.total,
                              description=f"{candidate.model} {backend_key(candidate)}")
        except Exception as error:
            return {**row, "status": STATUS_EVAL_FAILED, "error": error_summary(error)}
    row.update(miou=round(result["miou"], 3), peak_mem_mb=round(memory.mb(loaded.gpu), 1))
    try:
        times = measure_latency(loaded.predictor, data.timing_images(1), data.warmup_s,
                                data.seconds, data.iters)
        stats = latency_stats(times)
        row.update(latency_ms=stats, fps=round(1000 / stats["mean"], 2))
        if data.batch > 1:
            batched = measure_latency(loaded.predictor, data.timing_images(data.batch),
                                      data.warmup_s, data.seconds, data.iters)
            row["throughput"] = round(data.batch * 1000 / float(np.mean(batched)), 2)
    except Exception as error:
        return {**row, "status": STATUS_EVAL_FAILED, "error": error_summary(error)}
    return {**row, "status": STATUS_OK}


def add_deltas(rows: list[dict[str, Any]], tolerance: float) -> None:
    """mIoU change and p50 speed-up of each row against the PyTorch FP32 row of the same model."""
    reference = {row["model"]: row for row in rows
                 if row["backend"] == "pytorch" and row["status"] == STATUS_OK}
    for row in rows:
        base = reference.get(row["model"])
        if row["status"] != STATUS_OK or base is None:
            continue
        row["delta_miou"] = round(row["miou"] - base["miou"], 3)
        row["pass"] = abs(row["delta_miou"]) <= tolerance
        row["speedup"] = round(base["latency_ms"]["p50"] / row["latency_ms"]["p50"], 2)


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


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "not installed"


def header(run: Path, data: BenchData, dataset: str) -> dict[str, Any]:
    """Where and how the numbers were measured."""
    return {
        "run": str(run), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"),
        "cpu": _cpu_name(), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available()
        else None, "threads": data.threads or torch.get_num_threads(), "batch": data.batch,
        "input_size": list(data.size) if data.size else None, "dataset": dataset,
        "val_images": data.images, "eval_mode": EvalMode().describe(),
        "versions": {"fakd_deploy": __version__, "python": platform.python_version(),
                     "torch": torch.__version__, "onnxruntime": _version("onnxruntime"),
                     "tensorrt": _version("tensorrt"), "cuda": torch.version.cuda or "none"}}


def bench_run(run_dir: str | Path, backends: list[str] | None = None, batch: int = 1,
              threads: int | None = None, iters: int | None = None, seconds: float = 3.0,
              warmup_s: float = 1.0, tolerance: float = 1.0,
              max_images: int | None = None) -> dict[str, Any]:
    """Benchmark every checkpoint and artifact of a run folder: `{"header": ..., "rows": [...]}`.

    `backends` keeps only rows whose key (pytorch, ort-fp32, ort-int8, trt-fp16, ...) is listed.
    """
    from fakd_deploy.loaders import dataset_info, val_loader
    from fakd_deploy.recipe import load_recipe

    run = Path(run_dir)
    if not (run / "recipe.yaml").exists():
        raise FileNotFoundError(f"{run} has no recipe.yaml; is it a run folder written by `run`?")
    recipe = load_recipe(run / "recipe.yaml")
    num_classes, _ = dataset_info(recipe.data)
    export = recipe.deploy.export
    candidates = [c for c in discover(run) if backends is None or backend_key(c) in backends]

    def batches() -> Any:
        return val_loader(recipe.data, batch_size=recipe.data.val_batch_size, max_images=max_images)

    loader = batches()
    data = BenchData(batches, len(loader), len(loader.dataset), num_classes,
                     recipe.data.ignore_index,
                     (export.height, export.width) if export.height and export.width else None,
                     batch, threads, iters, seconds, warmup_s)
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        rows = []
        for candidate in candidates:
            rows.append(bench_one(candidate, data))
            gc.collect()
    finally:
        torch.set_num_threads(previous_threads)
    add_deltas(rows, tolerance)
    return {"header": header(run, data, recipe.data.name), "rows": rows}
