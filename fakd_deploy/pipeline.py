"""The stages of a recipe, each reading and writing artifacts in one run folder.

Every stage has a key: the hash of the recipe sections it depends on and of its input
files. `manifest.json` records the key and the hashes of the outputs of each finished
stage, so `fakd-deploy run` skips what is already done for the same inputs and resumes
what was interrupted (training continues from `last.pt`).
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from fakd_deploy import __version__, loaders
from fakd_deploy.distill.distiller import Distiller
from fakd_deploy.evaluate import EvalMode, TorchPredictor, evaluate, print_variant_summary
from fakd_deploy.models import (
    build_model,
    import_state_dict,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from fakd_deploy.progress import console
from fakd_deploy.recipe import Recipe, TrainConfig
from fakd_deploy.train import Job, fit, init_distributed, rank_and_world
from fakd_deploy.utils import (
    file_sha256,
    resolve_device,
    save_json,
    save_text,
    seed_everything,
    text_sha256,
)


class PipelineError(ValueError):
    """The run cannot go on with these inputs (missing teacher, class mismatch...)."""


class RunFolder:
    """Names of everything a run writes; the one place that knows the layout."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    recipe = property(lambda self: self.root / "recipe.yaml")
    manifest = property(lambda self: self.root / "manifest.json")
    teacher = property(lambda self: self.root / "teacher")
    evaluation = property(lambda self: self.root / "evaluation.json")
    deploy = property(lambda self: self.root / "deploy")

    def student(self, variant: str, seed: int) -> Path:
        return self.root / "students" / f"{variant}_s{seed}"

    def onnx(self, variant: str) -> Path:
        return self.deploy / f"{variant}.onnx"


class Manifest:
    """Stage keys and output hashes, rewritten atomically after each stage."""

    def __init__(self, run: RunFolder) -> None:
        self.path = run.manifest
        self.data: dict[str, Any] = (json.loads(self.path.read_text()) if self.path.exists()
                                     else {"stages": {}})

    def is_done(self, name: str, key: str) -> bool:
        entry = self.data["stages"].get(name)
        if not entry or entry.get("key") != key or not entry.get("done"):
            return False
        outputs = entry.get("outputs", {})
        return all(Path(p).exists() and file_sha256(p) == h for p, h in outputs.items())

    def start(self, name: str, key: str) -> bool:
        """Mark a stage begun; True when an earlier attempt with the same key can be resumed."""
        entry = self.data["stages"].get(name, {})
        resumable = entry.get("key") == key
        self.data["stages"][name] = {"key": key, "done": False}
        self.save()
        return resumable

    def finish(self, name: str, key: str, outputs: list[Path], seconds: float,
               metrics: dict[str, Any] | None = None) -> None:
        self.data["stages"][name] = {
            "key": key, "done": True, "seconds": round(seconds, 2), "metrics": metrics or {},
            "outputs": {str(p): file_sha256(p) for p in outputs},
        }
        self.data["versions"] = versions()
        self.save()

    def save(self) -> None:
        if rank_and_world()[0] == 0:
            save_json(self.data, self.path)


def versions() -> dict[str, str]:
    import onnxruntime

    return {"fakd_deploy": __version__, "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__}


def stage_key(*parts: Any) -> str:
    """Hash of config sections (pydantic models or plain data) and input files (Paths)."""
    def encode(part: Any) -> Any:
        if isinstance(part, Path):
            return {"file": part.name, "sha256": file_sha256(part)}
        if hasattr(part, "model_dump"):
            return part.model_dump(mode="json")
        return part
    return text_sha256(json.dumps([encode(p) for p in parts], sort_keys=True, default=str))


def run_stage(manifest: Manifest, name: str, key: str, force: bool,
              work: Callable[[bool], tuple[list[Path], dict[str, Any]]]) -> dict[str, Any]:
    """Run `work(resume)` unless the stage is done for this key; returns the stage's metrics."""
    if not force and manifest.is_done(name, key):
        console.print(f"[dim]skip {name}: outputs are up to date[/dim]")
        return manifest.data["stages"][name]["metrics"]
    resume = manifest.start(name, key) and not force
    started = time.perf_counter()
    outputs, metrics = work(resume)
    manifest.finish(name, key, outputs, time.perf_counter() - started, metrics)
    return metrics


def eval_mode(recipe: Recipe) -> EvalMode:
    cfg = recipe.eval
    return EvalMode(name=cfg.mode, flip=cfg.flip, scales=tuple(cfg.scales),
                    window=cfg.window, stride=cfg.stride)


def prepare(recipe: Recipe, out: Path) -> RunFolder:
    """Create the run folder and save the resolved recipe in it."""
    run = RunFolder(out)
    run.root.mkdir(parents=True, exist_ok=True)
    if rank_and_world()[0] == 0:
        save_text(recipe.to_yaml(), run.recipe)
    return run


def _job(recipe: Recipe, train_cfg: TrainConfig, out_dir: Path, seed: int, description: str,
         payload: dict[str, Any]) -> Job:
    data = recipe.data
    num_classes, class_names = loaders.dataset_info(data)
    return Job(
        out_dir=out_dir, num_classes=num_classes, cfg=train_cfg, seed=seed,
        train_set=loaders.dataset(data, data.train_split, train=True),
        val_set=loaders.dataset(data, data.val_split, train=False),
        batch_size=data.batch_size, val_batch_size=data.val_batch_size, workers=data.workers,
        device=init_distributed(resolve_device(recipe.device)), ignore_index=data.ignore_index,
        description=description,
        payload={"recipe": recipe.model_dump(mode="json"), "class_names": class_names, **payload},
    )


def _clear(folder: Path, resume: bool) -> None:
    if not resume and folder.exists() and rank_and_world()[0] == 0:
        shutil.rmtree(folder)


def train_teacher(recipe: Recipe, run: RunFolder, force: bool = False) -> Path:
    """Train the teacher, or adopt one trained elsewhere (`checkpoint` or `weights`)."""
    cfg = recipe.teacher
    if cfg is None:
        raise PipelineError("the recipe has no 'teacher' section")
    if cfg.checkpoint:
        return Path(cfg.checkpoint)
    best = run.teacher / "best.pt"
    num_classes, class_names = loaders.dataset_info(recipe.data)

    def work(resume: bool) -> tuple[list[Path], dict[str, Any]]:
        _clear(run.teacher, resume)
        seed_everything(recipe.seed)
        model = build_model(**cfg.model.build_kwargs(), num_classes=num_classes)
        job = _job(recipe, cfg.train, run.teacher, recipe.seed, "teacher",
                   {"role": "teacher", "variant": None})
        if cfg.weights:
            metrics = adopt_weights(model, job, cfg.weights, cfg.weights_import.model_dump())
        else:
            distiller = Distiller(model, None, [], num_classes, recipe.data.ignore_index,
                                  aux_weight=cfg.train.aux_weight)
            metrics = fit(distiller, job, resume=resume)
        return [best], _summary(metrics)

    run_stage(Manifest(run), "teacher", stage_key(recipe.data, cfg, recipe.seed, class_names),
              force, work)
    return best


def adopt_weights(model: torch.nn.Module, job: Job, weights: str,
                  mapping: dict[str, Any]) -> dict[str, Any]:
    """Import a state dict trained elsewhere, score it, and save it as this run's teacher."""
    report = import_state_dict(model, weights, **mapping)
    console.print(f"imported {len(report['loaded'])} tensors from {weights}")
    loader = DataLoader(job.val_set, batch_size=job.val_batch_size, num_workers=job.workers)
    metrics = evaluate(TorchPredictor(model, job.device), loader, job.num_classes,
                       job.ignore_index, description="evaluate imported teacher",
                       total=len(loader))
    save_checkpoint(job.out_dir / "best.pt", {**(job.payload or {}), "model": model.state_dict(),
                                              "arch": model.config, "step": 0, "complete": True,
                                              "metrics": metrics})
    return metrics


def train_student(recipe: Recipe, run: RunFolder, variant: str, seed: int,
                  teacher: Path | None, force: bool = False) -> Path:
    """Train one student variant; distillation terms come from `student.variants[variant]`."""
    cfg = recipe.student
    terms = cfg.variants[variant]
    folder = run.student(variant, seed)
    num_classes, _ = loaders.dataset_info(recipe.data)
    if terms and (teacher is None or not teacher.exists()):
        raise PipelineError(f"variant '{variant}' distils from a teacher, but no teacher "
                            f"checkpoint was found at {teacher}")

    def work(resume: bool) -> tuple[list[Path], dict[str, Any]]:
        _clear(folder, resume)
        seed_everything(seed)
        student = build_model(**cfg.model.build_kwargs(), num_classes=num_classes)
        teacher_model = None
        if terms:
            teacher_model = model_from_checkpoint(teacher)
            if teacher_model.num_classes != num_classes:
                raise PipelineError(
                    f"teacher {teacher} predicts {teacher_model.num_classes} classes but the "
                    f"dataset '{recipe.data.name}' has {num_classes}")
        distiller = Distiller(student, teacher_model, terms, num_classes,
                              recipe.data.ignore_index, aux_weight=cfg.train.aux_weight)
        job = _job(recipe, cfg.train, folder, seed, f"{variant} s{seed}",
                   {"role": "student", "variant": variant, "seed": seed})
        metrics = fit(distiller, job, resume=resume)
        return [folder / "best.pt"], _summary(metrics)

    inputs = [recipe.data, cfg.model, cfg.train, [t.model_dump() for t in terms], seed]
    if terms:
        inputs.append(teacher)
    run_stage(Manifest(run), f"student:{variant}_s{seed}", stage_key(*inputs), force, work)
    return folder / "best.pt"


def _summary(metrics: dict[str, Any]) -> dict[str, Any]:
    return {"miou": metrics.get("miou"), "step": metrics.get("step")}


def evaluate_checkpoints(recipe: Recipe, run: RunFolder, checkpoints: dict[str, Path],
                         force: bool = False) -> list[dict[str, Any]]:
    """Score every checkpoint with the recipe's evaluation mode; rows go to evaluation.json."""
    mode = eval_mode(recipe)

    def work(resume: bool) -> tuple[list[Path], dict[str, Any]]:
        loader = loaders.val_loader(recipe.data)
        num_classes, _ = loaders.dataset_info(recipe.data)
        device = resolve_device(recipe.device)
        rows = []
        for name, path in checkpoints.items():
            checkpoint = load_checkpoint(path)
            result = evaluate(TorchPredictor(model_from_checkpoint(checkpoint), device), loader,
                              num_classes, recipe.data.ignore_index, mode,
                              description=f"evaluate {name}", total=len(loader))
            rows.append({"model": name, "variant": checkpoint.get("variant") or "teacher",
                         "seed": checkpoint.get("seed"), "checkpoint": str(path), **result})
        save_json(rows, run.evaluation)
        return [run.evaluation], {"rows": len(rows)}

    run_stage(Manifest(run), "evaluate", stage_key(recipe.data, recipe.eval,
                                                   *checkpoints.values()), force, work)
    rows = json.loads(run.evaluation.read_text())
    print_variant_summary(rows)
    return rows


def export_size(recipe: Recipe) -> tuple[int, int]:
    """The recipe's export size, or the size of the validation images as the val transform gives."""
    cfg = recipe.deploy.export
    if cfg.height and cfg.width:
        return cfg.height, cfg.width
    image, _ = loaders.dataset(recipe.data, recipe.data.val_split, train=False)[0]
    return int(image.shape[-2]), int(image.shape[-1])


def export_student(recipe: Recipe, run: RunFolder, checkpoint: Path, force: bool = False) -> Path:
    from fakd_deploy.deploy.export import export_onnx

    cfg = recipe.deploy.export
    out = run.onnx(recipe.export_variant())
    height, width = export_size(recipe)

    def work(resume: bool) -> tuple[list[Path], dict[str, Any]]:
        report = export_onnx(checkpoint, out, height=height, width=width, batch=cfg.batch,
                             dynamic=cfg.dynamic, opset=cfg.opset, argmax=cfg.argmax,
                             parity_batches=loaders.val_loader(recipe.data, max_images=8),
                             tolerance=cfg.tolerance)
        return [out], {k: v for k, v in report.items() if k != "path"}

    run_stage(Manifest(run), "export", stage_key(cfg, height, width, checkpoint), force, work)
    return out


def build_backends(recipe: Recipe, run: RunFolder, onnx: Path, force: bool = False) -> list[Path]:
    """Build every backend the recipe lists; a backend that cannot be built here is reported."""
    from fakd_deploy.deploy.build import build

    artifacts = []
    for backend in recipe.deploy.backends:
        def work(resume: bool, backend: str = backend) -> tuple[list[Path], dict[str, Any]]:
            calib = loaders.calibration_batches(recipe.data, recipe.deploy.calib)
            path = build(onnx, backend, calib_batches=calib,
                         calib_method=recipe.deploy.calib_method)
            return [path], {"path": str(path)}

        key = stage_key(backend, recipe.deploy.calib, recipe.deploy.calib_method, onnx)
        try:
            metrics = run_stage(Manifest(run), f"build:{backend}", key, force, work)
            artifacts.append(Path(metrics["path"]))
        except Exception as error:
            console.print(f"[red]build {backend} failed:[/red] {error}")
    return artifacts


def bench(recipe: Recipe, run: RunFolder) -> dict[str, Any]:
    from fakd_deploy.deploy.bench import bench_run
    from fakd_deploy.deploy.report import print_report, write_report

    cfg = recipe.bench
    result = bench_run(run.root, batch=cfg.batch, threads=cfg.threads, iters=cfg.iters,
                       seconds=cfg.seconds, warmup_s=cfg.warmup_s, tolerance=cfg.tolerance,
                       max_images=cfg.max_images)
    write_report(result, run.root)
    print_report(result)
    return result


def run_recipe(recipe: Recipe, out: Path, force: bool = False) -> dict[str, Any]:
    """Every stage in order: teacher, students, evaluation, export, builds, bench."""
    run = prepare(recipe, out)
    rank, _ = rank_and_world()
    teacher = train_teacher(recipe, run, force) if recipe.teacher else None
    checkpoints = {"teacher": teacher} if teacher else {}
    for variant in recipe.student.variants:
        for seed in recipe.student.seeds:
            checkpoints[f"{variant}_s{seed}"] = train_student(recipe, run, variant, seed,
                                                              teacher, force)
    if rank != 0:
        return {}
    evaluate_checkpoints(recipe, run, checkpoints, force)
    deployed = run.student(recipe.export_variant(), recipe.student.seeds[0]) / "best.pt"
    onnx = export_student(recipe, run, deployed, force)
    build_backends(recipe, run, onnx, force)
    return bench(recipe, run)


def stored_recipe(model_path: Path) -> Recipe:
    """The recipe saved inside a checkpoint, an ONNX model's metadata or an engine's sidecar."""
    import yaml

    from fakd_deploy.recipe import parse_recipe

    if model_path.suffix == ".onnx":
        from fakd_deploy.deploy.export import read_metadata

        text = read_metadata(model_path).get("recipe")
    elif model_path.suffix == ".engine":
        from fakd_deploy.deploy.trt import load_sidecar

        text = load_sidecar(model_path).get("metadata", {}).get("recipe")
    else:
        from fakd_deploy.models import load_checkpoint

        return parse_recipe(load_checkpoint(model_path)["recipe"])
    if not text:
        raise PipelineError(f"{model_path} carries no recipe: pass --recipe to say which data to use")
    return parse_recipe(yaml.safe_load(text))


def evaluate_model(model_path: Path, recipe_path: Path | None, overrides: list[str],
                   max_images: int | None = None, threads: int | None = None
                   ) -> tuple[dict[str, Any], list[str]]:
    """Score any model file on its recipe's val split through the shared `evaluate`."""
    from fakd_deploy.deploy.predict import predictor_for
    from fakd_deploy.recipe import load_recipe

    if not model_path.exists():
        raise FileNotFoundError(f"model not found: {model_path}")
    recipe = load_recipe(recipe_path, overrides) if recipe_path else stored_recipe(model_path)
    predictor, _ = predictor_for(model_path, device=recipe.device, threads=threads)
    loader = loaders.val_loader(recipe.data, max_images=max_images)
    num_classes, class_names = loaders.dataset_info(recipe.data)
    mode = eval_mode(recipe) if model_path.suffix in (".pt", ".pth") else EvalMode()
    result = evaluate(predictor, loader, num_classes, recipe.data.ignore_index, mode,
                      description=f"evaluate {model_path.name}", total=len(loader))
    return result, class_names
