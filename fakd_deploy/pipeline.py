"""The stages of a recipe, each reading and writing artifacts in one run folder.

Every stage names its inputs: the recipe sections it depends on and its input files.
`manifest.json` records them, their key and the hashes of the outputs of each finished
stage, so `fakd-deploy run` skips what is already done for the same inputs, resumes what
was interrupted (training continues from `last.pt`) and says what changed when it redoes
a stage (the rule is `session.Session.stage`). Under `torchrun` every rank trains; rank 0
alone holds the run folder's lock, decides what to skip or resume (and tells the others),
writes, and runs the stages after training.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from fakd_deploy.data import splits
from fakd_deploy.deploy.rows import BenchReport
from fakd_deploy.distill.distiller import Distiller
from fakd_deploy.distributed import leave_group
from fakd_deploy.errors import BadInput, FakdError, StageFailed
from fakd_deploy.evaluate import evaluate
from fakd_deploy.inputs import parse_json, read_text
from fakd_deploy.models import Checkpoint, Segmenter, TorchPredictor, build_model, import_state_dict
from fakd_deploy.recipe import DataConfig, Recipe, TrainConfig, load_recipe
from fakd_deploy.runfolder import MAX_MANIFEST_BYTES, RunFolder
from fakd_deploy.session import Attempt, Session, session
from fakd_deploy.train import Job, fit, resolve_workers, seed_everything
from fakd_deploy.utils import save_json

log = logging.getLogger(__name__)


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


def teacher_inputs(s: Session) -> dict[str, Any]:
    """What the teacher trained here depends on, by name; its key is the teacher stage's."""
    cfg = s.recipe.teacher
    assert cfg is not None
    inputs: dict[str, Any] = {
        "data": s.recipe.teacher_data(),
        "teacher.model": cfg.model,
        "teacher.train": cfg.train,
        "teacher.weights_import": cfg.weights_import,
        "seed": s.recipe.seed,
        "class names": s.class_names,
        "eval": s.recipe.eval,  # it picks the step best.pt holds
    }
    if cfg.weights:
        inputs["teacher.weights"] = Path(cfg.weights)
    return inputs


def train_teacher(s: Session) -> Path:
    """Train the teacher, or adopt one trained elsewhere (`checkpoint` or `weights`)."""
    cfg = s.recipe.teacher
    if cfg is None:
        raise BadInput("the recipe has no 'teacher' section")
    if cfg.checkpoint:
        return Path(cfg.checkpoint)

    def work(attempt: Attempt) -> tuple[list[Path], dict[str, Any]]:
        assert attempt.folder is not None
        seed_everything(s.recipe.seed)
        model = build_model(**cfg.model.build_kwargs(), num_classes=s.num_classes)
        job = _job(
            s,
            cfg.train,
            attempt.folder,
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
            metrics = fit(distiller, job, resume=attempt.resume)
        # a teacher's weights depend on the thread count: a study's scores file records it
        last = attempt.folder / "last.pt"  # a study scores it; adopted weights have none
        outputs = [attempt.folder / "best.pt", *([last] if last.is_file() else [])]
        return outputs, {**_summary(metrics), "threads": torch.get_num_threads()}

    s.stage("teacher", teacher_inputs(s), work, folder=s.run.teacher)
    return s.run.teacher / "best.pt"


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

    def work(attempt: Attempt) -> tuple[list[Path], dict[str, Any]]:
        assert attempt.folder is not None
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
            attempt.folder,
            seed,
            f"{variant} s{seed}",
            {"role": "student", "variant": variant, "seed": seed},
        )
        metrics = _summary(fit(distiller, job, resume=attempt.resume))
        return [attempt.folder / "best.pt", attempt.folder / "last.pt"], metrics  # a study scores last.pt

    s.stage(student_stage(variant, seed), student_inputs(s, variant, seed, teacher), work, folder=folder)
    return folder / "best.pt"


def student_inputs(s: Session, variant: str, seed: int, teacher: Path | None) -> dict[str, Any]:
    """What one student depends on, by name; its key is the student stage's."""
    cfg = s.recipe.student
    terms = cfg.variants[variant]
    inputs: dict[str, Any] = {
        "data": s.recipe.data,
        "student.model": cfg.model,
        "student.train": cfg.train,
        f"student.variants.{variant}": [t.model_dump() for t in terms],
        "seed": seed,
        "eval": s.recipe.eval,  # it picks the step best.pt holds
    }
    if terms and teacher:
        inputs["teacher"] = teacher
    return inputs


def planned_teacher(s: Session) -> Path | None:
    """Where the teacher's checkpoint is (or will be) before it is trained."""
    cfg = s.recipe.teacher
    if cfg is None:
        return None
    return Path(cfg.checkpoint) if cfg.checkpoint else s.run.teacher / "best.pt"


RUNS, FOLLOWS, UP_TO_DATE = "runs", "follows", "up to date"  # what the plan line says of a stage


def training_stages(
    s: Session, teacher: Path | None, students: list[tuple[str, int]], with_teacher: bool
) -> dict[str, str]:
    """Before anything runs: each training stage by the name a person knows it by, and
    whether it runs, follows (runs if the teacher it distils from comes out changed) or is
    up to date."""
    recipe, stages = s.recipe, dict[str, str]()
    if with_teacher and recipe.teacher is not None and not recipe.teacher.checkpoint:
        stages["teacher"] = RUNS if s.would_run("teacher", lambda: teacher_inputs(s)) else UP_TO_DATE
    for variant, seed in students:
        terms = recipe.student.variants[variant]
        if s.would_run(student_stage(variant, seed), partial(student_inputs, s, variant, seed, teacher)):
            stages[f"{variant}_s{seed}"] = RUNS
        else:
            stages[f"{variant}_s{seed}"] = FOLLOWS if terms and stages.get("teacher") == RUNS else UP_TO_DATE
    return stages


Later = dict[str, tuple[Callable[[], dict[str, Any]], list[str] | None]]


def later_stages(s: Session, stages: dict[str, str], named: Later) -> dict[str, str]:
    """Stages after training, in order; `named` gives each one's inputs (computed when asked)
    and the stages it reads from (None: all before it). A stage runs if its inputs changed,
    follows if one it reads from runs or follows."""
    for name, (inputs, reads) in named.items():
        upstream = [stages[n] for n in reads] if reads is not None else list(stages.values())
        if s.would_run(name, inputs):
            stages[name] = RUNS
        else:
            stages[name] = FOLLOWS if any(state != UP_TO_DATE for state in upstream) else UP_TO_DATE
    return stages


def plan_line(stages: dict[str, str], force: bool = False, taken: list[str] | None = None) -> str:
    """The one line every command starts with: what will run, what runs only if what it
    reads comes out changed (a retrained model can be bit for bit the same), what is up to date."""

    def named(state: str) -> str:
        return listed([name for name, value in stages.items() if value == state])

    line = f"will run: {named(RUNS) or 'nothing'}{' (--force)' if force else ''}"
    if named(FOLLOWS):
        line += f"; then, if what they read changes: {named(FOLLOWS)}"
    line += f"; up to date: {named(UP_TO_DATE) or 'nothing'}"
    if taken:
        line += f"; taken from --merge: {listed(taken)}"
    return line


def listed(names: list[str], most: int = 12) -> str:
    """Names joined, a study's hundred runs shortened to their first and last few and a count."""
    if len(names) <= most:
        return ", ".join(names)
    return f"{', '.join(names[:4])}, ..., {', '.join(names[-2:])} ({len(names)} in all)"


def recorded_validation(checkpoint: Checkpoint, recipe: Recipe, split: str) -> dict[str, Any] | None:
    """The validation a student checkpoint recorded of its own weights while training, when it
    is exactly what evaluating it here would compute; None otherwise.

    Training validates with the same `evaluate` call on the same split, so the numbers are
    the same; scoring a study's students again would repeat that work for every checkpoint.
    Only taken when the checkpoint's recipe has the same data and evaluation sections (a
    teacher, which may train on its own data, is always evaluated).
    """
    metrics, stored = checkpoint.metrics or {}, checkpoint.recipe or {}
    if (
        checkpoint.role != "student"
        or split != recipe.data.val_split
        or metrics.get("step") != checkpoint.step
        or "per_class_iou" not in metrics
        or stored.get("data") != recipe.data.model_dump(mode="json")
        or stored.get("eval") != recipe.eval.model_dump(mode="json")
    ):
        return None
    return {key: value for key, value in metrics.items() if key not in ("step", "terms")}


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

    def work(attempt: Attempt) -> tuple[list[Path], dict[str, Any]]:
        data = splits.ValBatches(recipe.data, split)
        rows = []
        for label, path in checkpoints.items():
            checkpoint = Checkpoint.load(path)
            result = recorded_validation(checkpoint, recipe, split) or evaluate(
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

    s.stage(name, evaluation_inputs(s, checkpoints, split), work)
    return read_json(out)


def evaluation_inputs(s: Session, checkpoints: dict[str, Path], split: str | None = None) -> dict[str, Any]:
    recipe = s.recipe
    inputs = {"data": recipe.data, "eval": recipe.eval, "split": split or recipe.data.val_split}
    return inputs | {f"checkpoint {label}": path for label, path in checkpoints.items()}


def read_json(path: Path) -> Any:
    """A file a stage of this run wrote, read like a user's: the folder may have been edited."""
    return parse_json(read_text(path, "run file", MAX_MANIFEST_BYTES), str(path))


def read_report(path: Path) -> BenchReport:
    """The report the bench stage wrote, or one line naming it when it is not one."""
    data = read_json(path)
    try:
        return BenchReport.from_dict(data)
    except (AttributeError, TypeError, ValueError) as error:
        raise BadInput(
            f"{path} is not a report fakd-deploy writes ({error}); time the run again with --redo bench"
        ) from None


def export_path(s: Session) -> Path:
    return s.run.onnx(s.recipe.export_variant())


def deployed_student(s: Session) -> Path:
    """The checkpoint `run` exports: the recipe's export variant, first seed."""
    return s.run.student(s.recipe.export_variant(), s.recipe.student.seeds[0]) / "best.pt"


def export_student(s: Session, checkpoint: Path) -> Path:
    from fakd_deploy.deploy.export import PARITY_IMAGES, export_onnx, export_size

    recipe = s.recipe
    cfg = recipe.deploy.export
    out = export_path(s)
    height, width = export_size(recipe)

    def work(attempt: Attempt) -> tuple[list[Path], dict[str, Any]]:
        report = export_onnx(
            checkpoint,
            out,
            height,
            width,
            **cfg.model_dump(exclude={"variant", "height", "width"}),
            parity_batches=splits.ValBatches(recipe.data, max_images=PARITY_IMAGES),
        )
        return [out], {k: v for k, v in report.items() if k != "path"}

    s.stage("export", export_inputs(s, checkpoint), work)
    return out


def export_inputs(s: Session, checkpoint: Path) -> dict[str, Any]:
    from fakd_deploy.deploy.export import export_size

    height, width = export_size(s.recipe)
    cfg = s.recipe.deploy.export
    return {"deploy.export": cfg, "height": height, "width": width, "checkpoint": checkpoint}


def build_backends(s: Session, onnx: Path) -> list[Path]:
    """Build every backend the recipe lists; any that fails fails the stage (after the others)."""
    from fakd_deploy.deploy.build import build

    recipe = s.recipe
    artifacts, failures = [], []
    for name in backend_names(s):

        def work(attempt: Attempt, backend: str = name) -> tuple[list[Path], dict[str, Any]]:
            calib = splits.calibration_images(recipe.data, recipe.deploy.calib)
            path = build(
                onnx,
                backend,
                calib_images=calib,
                calib_method=recipe.deploy.calib_method,
                quantizer=recipe.deploy.quantizer,
            )
            return [path], {"path": s.run.relative(path)}

        try:
            metrics = s.stage(f"build:{name}", build_inputs(s, name, onnx), work)
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


def backend_names(s: Session) -> list[str]:
    from fakd_deploy.deploy.backends import resolve_backend

    return list(dict.fromkeys(resolve_backend(b).name for b in s.recipe.deploy.backends))


def build_inputs(s: Session, name: str, onnx: Path) -> dict[str, Any]:
    from fakd_deploy.deploy.backends import resolve_backend

    recipe = s.recipe
    inputs: dict[str, Any] = {"backend": name, "onnx": onnx}
    if resolve_backend(name).precision == "int8":
        calibration = (recipe.deploy.calib, recipe.deploy.calib_method, recipe.data)
        inputs |= dict(zip(("deploy.calib", "deploy.calib_method", "data"), calibration, strict=True))
        if recipe.deploy.quantizer != "ort":  # keys of ort-made models unchanged
            inputs["deploy.quantizer"] = recipe.deploy.quantizer
    return inputs


def bench_inputs(s: Session, found: list[Any]) -> dict[str, Any]:
    inputs = {"bench": s.recipe.bench, "data": s.recipe.data}
    return inputs | {f"row {i + 1} ({c.model} on {c.backend})": c.path for i, c in enumerate(found)}


def bench_stage(s: Session) -> BenchReport:
    """Every model and artifact of the run on one table; redone only when one of them changed."""
    from fakd_deploy.deploy.bench import bench_run, candidates
    from fakd_deploy.deploy.report import write_report

    found = candidates(s.run)

    def work(attempt: Attempt) -> tuple[list[Path], dict[str, Any]]:
        result = bench_run(s.recipe, found, s.recipe.bench, title=str(s.run.root))
        return list(write_report(result, s.run.root).values()), {"rows": len(result.rows)}

    s.stage("bench", bench_inputs(s, found), work)
    return read_report(s.run.report("json"))


@dataclass
class RunResult:
    """What a command leaves for a person to read: the stages it ran and skipped, the files
    it wrote, and (`run`) the evaluation rows and the benchmark or (`train`, `distill`) the
    checkpoints."""

    folder: Path
    evaluation: list[dict[str, Any]] = field(default_factory=list)
    bench: BenchReport | None = None
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)
    checkpoints: list[Path] = field(default_factory=list)

    @classmethod
    def of(cls, s: Session, checkpoints: list[Path]) -> RunResult:
        return cls(s.run.root, ran=s.ran, skipped=s.skipped, written=s.written, checkpoints=checkpoints)


def stage_names(recipe: Recipe) -> list[str]:
    """The stages of `run` for this recipe, by the names `--redo` takes."""
    from fakd_deploy.deploy.backends import resolve_backend

    teacher = ["teacher"] if recipe.teacher and not recipe.teacher.checkpoint else []
    students = [student_stage(variant, seed) for variant, seed in every_student(recipe)]
    builds = list(dict.fromkeys(f"build:{resolve_backend(b).name}" for b in recipe.deploy.backends))
    return [*teacher, *students, "evaluate", "export", *builds, "bench"]


def run_recipe(
    recipe: Recipe, out: Path | None = None, force: bool = False, redo: tuple[str, ...] = ()
) -> RunResult:
    """Every stage in order: teacher, students, evaluation, export, builds, bench.

    `redo` names stages to redo although they are up to date (`bench`, `build`, or one
    `build:<backend>` or `student:<variant>_s<seed>`); the stages after them follow only
    if their inputs changed.
    """
    names = stage_names(recipe)
    unknown = [asked for asked in redo if not any(n == asked or n.startswith(f"{asked}:") for n in names)]
    if unknown:
        raise BadInput(f"--redo {', '.join(unknown)}: not a stage of this run, which has {listed(names)}")
    with session(recipe, out, force, redo=redo) as s:
        announce(s, run_stages(s))  # every rank: the answers are agreed
        teacher = train_teacher(s) if recipe.teacher else None
        checkpoints = {"teacher": teacher} if teacher else {}
        for variant in recipe.student.variants:
            for seed in recipe.student.seeds:
                checkpoints[f"{variant}_s{seed}"] = train_student(s, variant, seed, teacher)
        leave_group()
        if s.rank != 0:
            return RunResult(s.run.root)
        rows = evaluate_checkpoints(s, checkpoints)
        onnx = export_student(s, deployed_student(s))
        build_backends(s, onnx)
        report = bench_stage(s)
        return RunResult(s.run.root, rows, report, s.ran, s.skipped, s.written)


def every_student(recipe: Recipe) -> list[tuple[str, int]]:
    return [(variant, seed) for variant in recipe.student.variants for seed in recipe.student.seeds]


def run_stages(s: Session) -> dict[str, str]:
    """Every stage of `run`, in order, and whether it will run."""
    teacher = planned_teacher(s)
    stages = training_stages(s, teacher, every_student(s.recipe), with_teacher=True)
    checkpoints = {"teacher": teacher} if teacher else {}
    checkpoints |= {f"{v}_s{n}": s.run.student(v, n) / "best.pt" for v, n in every_student(s.recipe)}
    onnx, deployed = export_path(s), f"{s.recipe.export_variant()}_s{s.recipe.student.seeds[0]}"
    later: Later = {
        "evaluate": (lambda: evaluation_inputs(s, checkpoints), None),
        "export": (lambda: export_inputs(s, deployed_student(s)), [deployed]),
    }
    for name in backend_names(s):
        later[f"build:{name}"] = (partial(build_inputs, s, name, onnx), ["export"])
    later["bench"] = (lambda: bench_inputs(s, bench_candidates(s)), None)
    return later_stages(s, stages, later)


def bench_candidates(s: Session) -> list[Any]:
    from fakd_deploy.deploy.bench import candidates

    return candidates(s.run)


def announce(s: Session, stages: dict[str, str], taken: list[str] | None = None) -> None:
    if s.rank == 0:
        log.info(plan_line(stages, s.force, taken))


def run(
    recipe_path: Path,
    out: Path | None = None,
    overrides: list[str] | None = None,
    force: bool = False,
    redo: tuple[str, ...] = (),
) -> RunResult:
    return run_recipe(load_recipe(recipe_path, overrides or []), out, force, redo)


def train(
    recipe_path: Path,
    role: str,
    out: Path | None = None,
    overrides: list[str] | None = None,
    force: bool = False,
) -> RunResult:
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
            announce(s, training_stages(s, None, [], with_teacher=True))
            return RunResult.of(s, [train_teacher(s)])
        announce(s, training_stages(s, None, [("baseline", recipe.student.seeds[0])], with_teacher=False))
        return RunResult.of(s, [train_student(s, "baseline", recipe.student.seeds[0], None)])


def distill(
    recipe_path: Path,
    variants: list[str] | None = None,
    teacher: Path | None = None,
    out: Path | None = None,
    overrides: list[str] | None = None,
    force: bool = False,
) -> RunResult:
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
        if teacher is None and not recipe.teacher.checkpoint:
            require_current_teacher(s, recipe_path)
        students = [(name, seed) for name in names for seed in recipe.student.seeds]
        announce(s, training_stages(s, teacher_path, students, with_teacher=False))
        return RunResult.of(s, [train_student(s, name, seed, teacher_path) for name, seed in students])


def require_current_teacher(s: Session, recipe_path: Path) -> None:
    """The run folder's teacher must be the one this recipe describes, as `run` would judge
    it; otherwise distilling from it would mix two recipes without saying so."""
    changed = s.changed_since("teacher", teacher_inputs(s))
    if changed:
        raise BadInput(
            f"the teacher in {s.run.teacher} is not this recipe's ({changed}); train it with this "
            f"recipe first (`fakd-deploy train {recipe_path} --role teacher`), or pass --teacher"
        )
