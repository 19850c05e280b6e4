"""The stages of a recipe, each reading and writing artifacts in one run folder.

Every stage has a key: the hash of the recipe sections it depends on and of its input
files. `manifest.json` records the key and the hashes of the outputs of each finished
stage, so `fakd-deploy run` skips what is already done for the same inputs and resumes
what was interrupted (training continues from `last.pt`). Under `torchrun` every rank
trains; rank 0 alone holds the run folder's lock, decides what to skip or resume (and
tells the others), writes, and runs the stages after training.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from fakd_deploy import __version__, optional
from fakd_deploy.data import splits
from fakd_deploy.deploy.rows import BenchReport
from fakd_deploy.distill.distiller import Distiller
from fakd_deploy.errors import BadInput, FakdError, StageFailed
from fakd_deploy.evaluate import evaluate
from fakd_deploy.models import Checkpoint, Segmenter, TorchPredictor, build_model, import_state_dict
from fakd_deploy.models.predictor import resolve_device
from fakd_deploy.recipe import DataConfig, Recipe, TrainConfig, load_recipe
from fakd_deploy.runfolder import Manifest, RunFolder, RunLock, stage_key
from fakd_deploy.train import Job, fit, init_distributed, rank_and_world, resolve_workers, seed_everything
from fakd_deploy.utils import save_json, save_text

log = logging.getLogger(__name__)

Work = Callable[[bool], tuple[list[Path], dict[str, Any]]]


def versions() -> dict[str, str]:
    return {
        "fakd_deploy": __version__,
        "python": platform.python_version(),
        **optional.versions("torch", "onnxruntime"),
    }


def agree(value: Any) -> Any:
    """Rank 0's value on every rank (unchanged outside torch.distributed)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@dataclass
class Session:
    """One recipe's work in one run folder: its lock, manifest, device and data facts."""

    recipe: Recipe
    run: RunFolder
    force: bool
    device: torch.device
    num_classes: int
    class_names: list[str]
    manifest: Manifest | None = None  # rank 0 only
    rank: int = 0

    def stage(self, name: str, key: str, work: Work) -> dict[str, Any]:
        """Run `work(resume)` unless the stage is done for this key; returns its metrics."""
        decision = None
        if self.rank == 0:
            assert self.manifest is not None
            if not self.force and self.manifest.is_done(name, key):
                decision = "skip"
            else:
                decision = "resume" if self.manifest.start(name, key) and not self.force else "fresh"
        decision = agree(decision)
        if decision == "skip":
            log.info(f"skip {name}: outputs are up to date")
            return self.manifest.entry(name)["metrics"] if self.manifest else {}
        started = time.perf_counter()
        outputs, metrics = work(decision == "resume")
        if self.manifest is not None:
            self.manifest.finish(name, key, outputs, time.perf_counter() - started, metrics, versions())
        return metrics

    def clear(self, folder: Path, resume: bool) -> None:
        """Remove a stage's earlier outputs before it starts afresh (rank 0; the others wait)."""
        if not resume and self.rank == 0 and folder.exists():
            self.run.remove(folder)
        barrier()


def check_device(name: str) -> torch.device:
    device = resolve_device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BadInput(
            f"device '{name}' asks for CUDA, but torch sees no GPU here "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'})"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise BadInput(f"device '{name}' asks for Apple's MPS, which this machine does not have")
    return device


def check_teacher_classes(path: Path, num_classes: int, dataset: str) -> None:
    """A teacher must predict the dataset's classes; found before anything trains."""
    arch = Checkpoint.load(path).arch
    if arch.get("num_classes") != num_classes:
        raise BadInput(
            f"teacher {path} predicts {arch.get('num_classes')} classes but the dataset "
            f"'{dataset}' has {num_classes}"
        )


def preflight(recipe: Recipe, teacher: Path | None = None) -> tuple[int, list[str]]:
    """Everything that can be checked before a run folder is touched: data, models, teacher."""
    import timm

    num_classes, class_names = splits.dataset_info(recipe.data)
    splits.train_dataset(recipe.data)
    if recipe.teacher is not None and recipe.teacher.data:
        teacher_classes, _ = splits.dataset_info(recipe.teacher_data())
        splits.train_dataset(recipe.teacher_data())
        if teacher_classes != num_classes:
            raise BadInput(
                f"teacher.data gives {teacher_classes} classes but the student's data has {num_classes}"
            )
    for where, model in (
        ("student.model", recipe.student.model),
        ("teacher.model", recipe.teacher.model if recipe.teacher else None),
    ):
        if model is not None and not timm.is_model(model.encoder):
            raise BadInput(
                f"{where}.encoder '{model.encoder}' is not a timm encoder "
                "(`fakd-deploy models` lists the zoo)"
            )
        if (
            model is not None
            and model.pretrained
            and "/" in model.pretrained
            and not Path(model.pretrained).is_file()
        ):
            raise BadInput(f"{where}.pretrained: weights file not found: {model.pretrained}")
    cfg = recipe.teacher
    for path in (teacher, Path(cfg.checkpoint) if cfg and cfg.checkpoint else None):
        if path is not None:
            check_teacher_classes(path, num_classes, recipe.data.name)
    if cfg and cfg.weights and not Path(cfg.weights).is_file():
        raise BadInput(f"teacher.weights: file not found: {cfg.weights}")
    return num_classes, class_names


@contextmanager
def session(
    recipe: Recipe, out: Path | None, force: bool = False, teacher: Path | None = None
) -> Iterator[Session]:
    """Check the recipe, then hold the run folder (rank 0) with the resolved recipe saved in it."""
    device = init_distributed(check_device(recipe.device))
    num_classes, class_names = preflight(recipe, teacher)
    run = RunFolder(out or Path("runs") / recipe.name)
    rank, _ = rank_and_world()
    if rank != 0:
        yield Session(recipe, run, force, device, num_classes, class_names, rank=rank)
        return
    with RunLock(run):
        manifest = Manifest(run, fresh=force)
        save_text(recipe.to_yaml(), run.recipe)
        yield Session(recipe, run, force, device, num_classes, class_names, manifest)


def _job(
    s: Session,
    train_cfg: TrainConfig,
    out_dir: Path,
    seed: int,
    description: str,
    meta: dict[str, Any],
    data: DataConfig | None = None,
) -> Job:
    data = data or s.recipe.data
    return Job(
        out_dir=out_dir,
        num_classes=s.num_classes,
        cfg=train_cfg,
        seed=seed,
        train_set=splits.train_dataset(data),
        val_batches=splits.ValBatches(data),
        batch_size=data.batch_size,
        workers=resolve_workers(data.workers),
        device=s.device,
        ignore_index=data.ignore_index,
        eval=s.recipe.eval,
        description=description,
        meta={"recipe": s.recipe.model_dump(mode="json"), "class_names": s.class_names, **meta},
    )


def _summary(metrics: dict[str, Any]) -> dict[str, Any]:
    return {"miou": metrics.get("miou"), "step": metrics.get("step")}


def train_teacher(s: Session) -> Path:
    """Train the teacher, or adopt one trained elsewhere (`checkpoint` or `weights`)."""
    cfg = s.recipe.teacher
    if cfg is None:
        raise BadInput("the recipe has no 'teacher' section")
    if cfg.checkpoint:
        return Path(cfg.checkpoint)
    best = s.run.teacher / "best.pt"

    def work(resume: bool) -> tuple[list[Path], dict[str, Any]]:
        s.clear(s.run.teacher, resume)
        seed_everything(s.recipe.seed)
        model = build_model(**cfg.model.build_kwargs(), num_classes=s.num_classes)
        job = _job(
            s,
            cfg.train,
            s.run.teacher,
            s.recipe.seed,
            "teacher",
            {"role": "teacher", "variant": None, "seed": s.recipe.seed},
            s.recipe.teacher_data(),
        )
        if cfg.weights:
            metrics = adopt_weights(model, job, cfg.weights, cfg.weights_import.model_dump())
        else:
            distiller = Distiller(
                model, None, [], s.num_classes, s.recipe.data.ignore_index, aux_weight=cfg.train.aux_weight
            )
            metrics = fit(distiller, job, resume=resume)
        return [best], _summary(metrics)

    weights = [Path(cfg.weights)] if cfg.weights else []
    s.stage(
        "teacher",
        stage_key(
            s.recipe.teacher_data(),
            cfg.model,
            cfg.train,
            cfg.weights_import,
            s.recipe.seed,
            s.class_names,
            *weights,
        ),
        work,
    )
    return best


def adopt_weights(model: Segmenter, job: Job, weights: str, mapping: dict[str, Any]) -> dict[str, Any]:
    """Import a state dict trained elsewhere, score it, and save it as this run's teacher."""
    report = import_state_dict(model, weights, **mapping)
    log.info(f"imported {len(report['loaded'])} tensors from {weights}")
    metrics = evaluate(
        TorchPredictor(model, job.device),
        job.val_batches,
        job.num_classes,
        job.ignore_index,
        job.eval,
        description="evaluate imported teacher",
        total=len(job.val_batches),
    )
    Checkpoint(model=model.state_dict(), arch=model.config, metrics=metrics, **job.meta).save(
        job.out_dir / "best.pt"
    )
    return metrics


def student_stage(variant: str, seed: int) -> str:
    """The manifest's name for one student's training stage."""
    return f"student:{variant}_s{seed}"


def train_student(s: Session, variant: str, seed: int, teacher: Path | None) -> Path:
    """Train one student variant; distillation terms come from `student.variants[variant]`."""
    cfg = s.recipe.student
    terms = cfg.variants[variant]
    folder = s.run.student(variant, seed)
    if terms and (teacher is None or not teacher.is_file()):
        raise BadInput(
            f"variant '{variant}' distils from a teacher, but no teacher checkpoint was found at {teacher}"
        )

    def work(resume: bool) -> tuple[list[Path], dict[str, Any]]:
        s.clear(folder, resume)
        seed_everything(seed)
        student = build_model(**cfg.model.build_kwargs(), num_classes=s.num_classes)
        teacher_model = Checkpoint.load(teacher).build(str(teacher)) if terms and teacher else None
        distiller = Distiller(
            student,
            teacher_model,
            terms,
            s.num_classes,
            s.recipe.data.ignore_index,
            aux_weight=cfg.train.aux_weight,
        )
        job = _job(
            s,
            cfg.train,
            folder,
            seed,
            f"{variant} s{seed}",
            {"role": "student", "variant": variant, "seed": seed},
        )
        return [folder / "best.pt"], _summary(fit(distiller, job, resume=resume))

    inputs: list[Any] = [s.recipe.data, cfg.model, cfg.train, [t.model_dump() for t in terms], seed]
    if terms and teacher:
        inputs.append(teacher)
    s.stage(student_stage(variant, seed), stage_key(*inputs), work)
    return folder / "best.pt"


def evaluate_checkpoints(
    s: Session,
    checkpoints: dict[str, Path],
    split: str | None = None,
    name: str = "evaluate",
    out: Path | None = None,
) -> list[dict[str, Any]]:
    """Score checkpoints on a split (val by default) in the recipe's evaluation mode.

    Rows (mIoU, per-class IoU, what was scored) go to `out` (evaluation.json by default).
    """
    recipe, out = s.recipe, out or s.run.evaluation
    split = split or recipe.data.val_split

    def work(resume: bool) -> tuple[list[Path], dict[str, Any]]:
        data = splits.ValBatches(recipe.data, split)
        rows = []
        for label, path in checkpoints.items():
            checkpoint = Checkpoint.load(path)
            result = evaluate(
                TorchPredictor(checkpoint.build(str(path)), s.device),
                data,
                s.num_classes,
                recipe.data.ignore_index,
                recipe.eval,
                description=f"evaluate {label} ({split})",
                total=len(data),
            )
            rows.append(
                {
                    "model": label,
                    "variant": checkpoint.variant or "teacher",
                    "seed": checkpoint.seed if checkpoint.variant else None,
                    "step": checkpoint.step,
                    "checkpoint": s.run.relative(path),
                    "dataset": recipe.data.name,
                    "root": recipe.data.root,
                    "split": split,
                    **result,
                }
            )
        save_json(rows, out)
        return [out], {"rows": len(rows)}

    s.stage(name, stage_key(recipe.data, recipe.eval, split, *checkpoints.values()), work)
    return read_json(out)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def export_student(s: Session, checkpoint: Path) -> Path:
    from fakd_deploy.deploy.export import PARITY_IMAGES, export_onnx, export_size

    recipe = s.recipe
    cfg = recipe.deploy.export
    out = s.run.onnx(recipe.export_variant())
    height, width = export_size(recipe)

    def work(resume: bool) -> tuple[list[Path], dict[str, Any]]:
        report = export_onnx(
            checkpoint,
            out,
            height,
            width,
            **cfg.model_dump(exclude={"variant", "height", "width"}),
            parity_batches=splits.ValBatches(recipe.data, max_images=PARITY_IMAGES),
        )
        return [out], {k: v for k, v in report.items() if k != "path"}

    s.stage("export", stage_key(cfg, height, width, checkpoint), work)
    return out


def build_backends(s: Session, onnx: Path) -> list[Path]:
    """Build every backend the recipe lists; any that fails fails the stage (after the others)."""
    from fakd_deploy.deploy.backends import resolve_backend
    from fakd_deploy.deploy.build import build

    recipe = s.recipe
    artifacts, failures = [], []
    for name in dict.fromkeys(resolve_backend(b).name for b in recipe.deploy.backends):

        def work(resume: bool, backend: str = name) -> tuple[list[Path], dict[str, Any]]:
            calib = splits.calibration_images(recipe.data, recipe.deploy.calib)
            path = build(
                onnx,
                backend,
                calib_images=calib,
                calib_method=recipe.deploy.calib_method,
                quantizer=recipe.deploy.quantizer,
            )
            return [path], {"path": s.run.relative(path)}

        calibration: list[object] = (
            [recipe.deploy.calib, recipe.deploy.calib_method, recipe.data]
            if resolve_backend(name).precision == "int8"
            else []
        )
        if calibration and recipe.deploy.quantizer != "ort":  # keys of ort-made models unchanged
            calibration.append(recipe.deploy.quantizer)
        key = stage_key(name, onnx, *calibration)
        try:
            metrics = s.stage(f"build:{name}", key, work)
            artifacts.append(s.run.root / metrics["path"])
        except FakdError as error:
            log.error(f"build {name} failed: {error}")
            failures.append(name)
    if failures:
        raise StageFailed(
            f"could not build {', '.join(failures)} (the reasons are above); the "
            f"other artifacts are in {s.run.deploy}"
        )
    return artifacts


def bench_stage(s: Session) -> BenchReport:
    """Every model and artifact of the run on one table; redone only when one of them changed."""
    from fakd_deploy.deploy.bench import bench_run, candidates
    from fakd_deploy.deploy.report import write_report

    found = candidates(s.run)
    outputs = [s.run.report(suffix) for suffix in ("json", "csv", "md", "png")]

    def work(resume: bool) -> tuple[list[Path], dict[str, Any]]:
        result = bench_run(s.recipe, found, s.recipe.bench, title=str(s.run.root))
        written = write_report(result, s.run.root)
        return [p for p in outputs if p in written.values()], {"rows": len(result.rows)}

    s.stage("bench", stage_key(s.recipe.bench, s.recipe.data, *[c.path for c in found]), work)
    return BenchReport.from_dict(read_json(s.run.report("json")))


@dataclass
class RunResult:
    """What `run` leaves for a person to read: the evaluation rows and the benchmark."""

    folder: Path
    evaluation: list[dict[str, Any]] = field(default_factory=list)
    bench: BenchReport | None = None


def run_recipe(recipe: Recipe, out: Path | None = None, force: bool = False) -> RunResult:
    """Every stage in order: teacher, students, evaluation, export, builds, bench."""
    with session(recipe, out, force) as s:
        teacher = train_teacher(s) if recipe.teacher else None
        checkpoints = {"teacher": teacher} if teacher else {}
        for variant in recipe.student.variants:
            for seed in recipe.student.seeds:
                checkpoints[f"{variant}_s{seed}"] = train_student(s, variant, seed, teacher)
        if s.rank != 0:
            return RunResult(s.run.root)
        rows = evaluate_checkpoints(s, checkpoints)
        deployed = s.run.student(recipe.export_variant(), recipe.student.seeds[0]) / "best.pt"
        onnx = export_student(s, deployed)
        build_backends(s, onnx)
        return RunResult(s.run.root, rows, bench_stage(s))


def run(
    recipe_path: Path, out: Path | None = None, overrides: list[str] | None = None, force: bool = False
) -> RunResult:
    return run_recipe(load_recipe(recipe_path, overrides or []), out, force)


def train(
    recipe_path: Path,
    role: str,
    out: Path | None = None,
    overrides: list[str] | None = None,
    force: bool = False,
) -> Path:
    """The teacher, or the plain baseline student (ground truth only) of the recipe's first seed."""
    recipe = load_recipe(recipe_path, overrides or [])
    if role not in ("teacher", "baseline"):
        raise BadInput(f"--role must be 'teacher' or 'baseline', not '{role}'")
    if role == "baseline" and recipe.student.variants.get("baseline") != []:
        raise BadInput(
            "--role baseline trains student.variants.baseline, which must exist with no "
            "distillation terms (baseline: [])"
        )
    with session(recipe, out, force) as s:
        if role == "teacher":
            return train_teacher(s)
        return train_student(s, "baseline", recipe.student.seeds[0], None)


def distill(
    recipe_path: Path,
    variants: list[str] | None = None,
    teacher: Path | None = None,
    out: Path | None = None,
    overrides: list[str] | None = None,
    force: bool = False,
) -> list[Path]:
    """Distilled students (every variant with terms by default) for every seed of the recipe."""
    recipe = load_recipe(recipe_path, overrides or [])
    names = variants or [name for name, terms in recipe.student.variants.items() if terms]
    unknown = [name for name in names if name not in recipe.student.variants]
    if unknown:
        raise BadInput(
            f"unknown variant(s) {', '.join(unknown)}; the recipe has: {', '.join(recipe.student.variants)}"
        )
    if not names:
        raise BadInput(
            "no variant of the recipe has distillation terms; `train --role baseline` "
            "trains the plain student"
        )
    if recipe.teacher is None:
        raise BadInput("distill needs a 'teacher' section in the recipe")
    run = RunFolder(out or Path("runs") / recipe.name)
    teacher_path = teacher or (
        Path(recipe.teacher.checkpoint) if recipe.teacher.checkpoint else run.teacher / "best.pt"
    )
    if not teacher_path.is_file():
        raise BadInput(
            f"no teacher checkpoint at {teacher_path}: train it first (`fakd-deploy train "
            f"{recipe_path} --role teacher`) or pass --teacher"
        )
    with session(recipe, out, force, teacher=teacher_path) as s:
        return [train_student(s, name, seed, teacher_path) for name in names for seed in recipe.student.seeds]
