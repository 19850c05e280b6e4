"""`fakd-deploy study`: did distillation (and FAKD) help this student, beyond seed noise?

One teacher, then every variant for every seed, where each FAKD variant named in the
recipe's `study` section is multiplied into one variant per (lam0, bound) point. Every
student is scored three ways: its last checkpoint on the val split (the number the study
reports: no selection), its best-on-val checkpoint (shown beside it; optimistic, since it
was selected on the split it is scored on) and, when the dataset has `data.test_split`,
its last checkpoint on that held-out split, which took part in no selection.

Each FAKD variant is paired per seed with its plain loss (the variant whose terms are the
same with lam0 = 0) and every variant with the baseline, with 95 % t intervals. The
headline, fixed before any result is seen, is per plain loss the FAKD point with the
highest mean val mIoU, scored against that plain loss on the test split. The tables and
the plot are drawn by `study_report`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fakd_deploy.data import splits
from fakd_deploy.distributed import leave_group
from fakd_deploy.errors import BadInput
from fakd_deploy.recipe import BoundName, LossTerm, Recipe, load_recipe, parse_recipe
from fakd_deploy.runfolder import stage_inputs
from fakd_deploy.stats import mean_std, paired_difference, verdict
from fakd_deploy.study_report import plot, to_csv, to_markdown
from fakd_deploy.study_scores import (
    RecordedRun,
    Score,
    read_scores,
    run_identity,
    scores_document,
    weights_digest,
)
from fakd_deploy.utils import save_json, save_text

FAKD_ONLY_FIELDS = {"lam0", "bound", "diagonal"}  # LossTerm fields that matter only with lam0 > 0

if TYPE_CHECKING:
    from fakd_deploy.session import Session

log = logging.getLogger(__name__)

Table = dict[str, dict[int, dict[str, Any]]]  # variant -> seed -> evaluation row


def point_name(variant: str, lam0: float, bound: str | None) -> str:
    return f"{variant}-lam{lam0:g}" + (f"-{bound}" if bound else "")


def swept(term: LossTerm, lam0: float, bound: str | None) -> LossTerm:
    """A FAKD term at one sweep point (the bound applies to KD terms only)."""
    update: dict[str, Any] = {"lam0": lam0}
    if bound and term.loss == "kd":
        update["bound"] = bound
    return LossTerm.model_validate({**term.model_dump(exclude_unset=True), **update})


def is_fakd(terms: Sequence[LossTerm]) -> bool:
    return any(t.lam0 > 0 for t in terms)


def fakd_bound(terms: Sequence[LossTerm]) -> BoundName | None:
    """The bound of a variant's FAKD-KD term; None when it has none (the other losses have one form)."""
    return next((t.bound for t in terms if t.loss == "kd" and t.lam0 > 0), None)


def without_fakd(terms: Sequence[LossTerm]) -> list[str]:
    """The terms as they are with lam0 = 0, in a form that compares equal for the same loss."""
    return sorted(json.dumps(t.model_dump(exclude=FAKD_ONLY_FIELDS)) for t in terms)


def plain_losses(variants: Mapping[str, Sequence[LossTerm]], fallback: str | None) -> dict[str, str | None]:
    """Each FAKD variant's plain loss: the first variant whose terms are its own with lam0 = 0.

    A FAKD variant with no such variant is paired with `fallback` (`study.kd`), if any.
    """
    plain = {name: without_fakd(terms) for name, terms in variants.items() if terms and not is_fakd(terms)}
    found: dict[str, str | None] = {}
    for name, terms in variants.items():
        if is_fakd(terms):
            own = without_fakd(terms)
            found[name] = next((p for p, key in plain.items() if key == own), fallback)
    return found


def expand(recipe: Recipe) -> tuple[Recipe, dict[str, dict[str, Any]]]:
    """The recipe with each swept variant replaced by its points, and what each variant is.

    Returns (recipe, {variant: {"source", "kind", "plain", "lam0", "bound"}}): `kind` is
    baseline, plain or fakd; `plain` is the variant a FAKD variant is paired with.
    """
    cfg, variants = recipe.study, recipe.student.variants
    for role, name in (("study.baseline", cfg.baseline), ("study.kd", cfg.kd)):
        if name is not None and name not in variants:
            raise BadInput(f"{role} '{name}' is not one of the student variants: {', '.join(variants)}")
    if variants[cfg.baseline]:
        raise BadInput(f"study.baseline '{cfg.baseline}' must have no distillation terms")
    if cfg.kd is not None and (not variants[cfg.kd] or is_fakd(variants[cfg.kd])):
        raise BadInput(
            f"study.kd '{cfg.kd}' must be a plain distillation variant (terms, none with lam0 > 0)"
        )
    for key, values in (("study.lam0", cfg.lam0), ("study.bounds", cfg.bounds)):
        repeated = next((v for i, v in enumerate(values) if v in values[:i]), None)
        if repeated is not None:
            raise BadInput(f"{key} lists {repeated} twice: each value is one sweep point")
    fakd_variants = [name for name, terms in variants.items() if is_fakd(terms)]
    targets = cfg.variants if cfg.variants is not None else fakd_variants
    for name in targets:
        if name not in fakd_variants:
            raise BadInput(f"study.variants: '{name}' has no FAKD term (lam0 > 0) to sweep")
    if targets and not (cfg.lam0 or cfg.bounds):
        raise BadInput("the study sweeps nothing: give study.lam0 and/or study.bounds")
    plains = plain_losses(variants, cfg.kd)

    def describe(name: str, lam0: float | None, bound: str | None) -> dict[str, Any]:
        kind = "baseline" if name == cfg.baseline else "fakd" if name in plains else "plain"
        return {"source": name, "kind": kind, "plain": plains.get(name), "lam0": lam0, "bound": bound}

    points: dict[str, list[LossTerm]] = {}
    described: dict[str, dict[str, Any]] = {}

    def add(point: str, point_terms: list[LossTerm], info: dict[str, Any]) -> None:
        """A point whose name is taken would replace or be replaced by another: refuse it."""
        if point in points:
            raise BadInput(collision(point, described[point], info))
        points[point], described[point] = point_terms, info

    for name, terms in variants.items():
        own = [t for t in terms if t.lam0 > 0]
        if name not in targets:
            add(name, terms, describe(name, own[0].lam0 if own else None, fakd_bound(terms)))
            continue
        # Unswept, the bound is the first FAKD term's (none if that is not KD): the point names,
        # and so the students' run folders, stay those of earlier studies. A variant without a
        # FAKD-KD term has one point per lam0, whatever the bounds.
        own_bound = own[0].bound if own[0].loss == "kd" else None
        bounds: Sequence[BoundName | None] = (cfg.bounds or [own_bound]) if fakd_bound(terms) else [None]
        for lam0 in cfg.lam0 or [own[0].lam0]:
            for bound in bounds:
                point_terms = [swept(t, lam0, bound) if t.lam0 > 0 else t for t in terms]
                add(point_name(name, lam0, bound), point_terms, describe(name, lam0, fakd_bound(point_terms)))
    raw = recipe.model_dump(mode="json")
    raw["student"]["variants"] = {
        name: [t.model_dump(mode="json") for t in terms] for name, terms in points.items()
    }
    exported = recipe.deploy.export.variant
    if exported in targets:  # a swept variant is exported as its first point
        raw["deploy"]["export"]["variant"] = next(
            p for p, info in described.items() if info["source"] == exported
        )
    return parse_recipe(raw), described


def collision(point: str, first: Mapping[str, Any], second: Mapping[str, Any]) -> str:
    """Why two variants of the expanded study have one name; `source` says which made each."""
    swept_points = [info for info in (first, second) if info["source"] != point]
    if len(swept_points) == 2 and first["source"] == second["source"]:
        return (
            f"study.lam0 {first['lam0']} and {second['lam0']} give the same point name {point} "
            "(names show lam0 to 6 significant digits): sweep values that differ there"
        )
    if len(swept_points) == 1:
        info = swept_points[0]
        return (
            f"student.variants.{point} is also the name of a sweep point of {info['source']} "
            f"(lam0 {info['lam0']}): rename the variant"
        )
    return f"variants {first['source']} and {second['source']} both give the study point {point}"


def by_seed(rows: Sequence[Mapping[str, Any]]) -> Table:
    table: Table = {}
    for row in rows:
        table.setdefault(row["variant"], {})[row["seed"]] = dict(row)
    return table


def spread(values: Sequence[float]) -> dict[str, Any] | None:
    """Mean and standard deviation over seeds, with how many seeds; None for none."""
    if not values:
        return None
    mean, std = mean_std(values)
    return {"mean": mean, "std": std, "n": len(values)}


def compare(table: Table, variant: str, reference: str | None) -> dict[str, Any] | None:
    """`variant` minus `reference` over the seeds both have, with its 95 % interval."""
    if reference is None or reference == variant:
        return None
    ours, theirs = table.get(variant, {}), table.get(reference, {})
    seeds = sorted(ours.keys() & theirs.keys())
    if not seeds:
        return None
    difference = paired_difference([ours[s]["miou"] for s in seeds], [theirs[s]["miou"] for s in seeds])
    return {**difference, "verdict": verdict(difference)}


def class_deltas(table: Table, variant: str, reference: str) -> list[float | None] | None:
    """Per class, the mean IoU change against `reference` over the seeds both have."""
    seeds = sorted(table.get(variant, {}).keys() & table.get(reference, {}).keys())
    if variant == reference or not seeds:
        return None
    columns = zip(
        *(
            zip(table[variant][s]["per_class_iou"], table[reference][s]["per_class_iou"], strict=True)
            for s in seeds
        ),
        strict=True,
    )
    deltas: list[float | None] = []
    for column in columns:
        if any(v is None or r is None for v, r in column):
            deltas.append(None)
        else:
            deltas.append(sum(v - r for v, r in column) / len(column))
    return deltas


def summarize(
    recipe: Recipe,
    described: Mapping[str, Mapping[str, Any]],
    val_best: Sequence[Mapping[str, Any]],
    val_last: Sequence[Mapping[str, Any]],
    test_last: Sequence[Mapping[str, Any]] | None,
    class_names: list[str] | None = None,
    seconds: Mapping[str, Mapping[int, float]] | None = None,
    teacher_seconds: float | None = None,
) -> dict[str, Any]:
    """Per variant: spreads over the seeds it has, paired differences against its plain loss
    and the baseline (val, and test when scored), wall time, per-class deltas; the headline.

    `seconds` is the training wall time per variant and seed. A variant missing some seeds
    (a study stopped early) is summarised over the seeds it has; each pairing uses the
    seeds both sides have.
    """
    baseline = recipe.study.baseline
    best, last = by_seed(val_best), by_seed(val_last)
    test = by_seed(test_last) if test_last is not None else None
    seconds = seconds or {}

    def scores(table: Table, variant: str) -> list[float]:
        return [row["miou"] for _, row in sorted(table.get(variant, {}).items())]

    rows = []
    for variant, info in described.items():
        have = sorted(last.get(variant, {}))
        times = list(seconds.get(variant, {}).values())
        row: dict[str, Any] = {
            "variant": variant,
            **info,
            "seeds": len(have),
            "missing_seeds": [s for s in recipe.student.seeds if s not in have],
            "val_last": spread(scores(last, variant)),
            "val_best": spread(scores(best, variant)),
            "vs_baseline": compare(last, variant, baseline),
            "vs_plain": compare(last, variant, info["plain"]),
            "seconds": {"mean": sum(times) / len(times), "total": sum(times), "n": len(times)}
            if times
            else None,
            "class_delta_vs_baseline": class_deltas(last, variant, baseline),
        }
        if test is not None:
            row["test_last"] = spread(scores(test, variant))
            row["test_vs_baseline"] = compare(test, variant, baseline)
            row["test_vs_plain"] = compare(test, variant, info["plain"])
        rows.append(row)
    teacher = [r for r in val_last if r["variant"] == "teacher"]
    student_seconds = [row["seconds"]["total"] for row in rows if row["seconds"]]
    return {
        "reported": "last checkpoint, val split" + (" and test split" if test is not None else ""),
        "dataset": recipe.data.name,
        "val_split": recipe.data.val_split,
        "test_split": recipe.data.test_split if test is not None else None,
        "seeds": list(recipe.student.seeds),
        "baseline": baseline,
        "teacher": teacher[0]["miou"] if teacher else None,
        "teacher_seconds": teacher_seconds,
        "student_seconds": sum(student_seconds) if student_seconds else None,
        "class_names": class_names,
        "rows": rows,
        "headline": headline(rows, tested=test is not None),
    }


def reading(difference: dict[str, Any] | None) -> str:
    """The pre-registered reading of a headline interval (docs/fakd.md)."""
    if difference is None:
        return "no seed scored on both sides: no reading"
    where = verdict(difference)
    if where == "excludes zero (above)":
        return "FAKD helped in this setting"
    if where == "excludes zero (below)":
        return "FAKD hurt in this setting"
    if difference["low"] is None:
        return "one seed, no interval: no reading"
    half = (difference["high"] - difference["low"]) / 2
    return f"no effect detected; the smallest effect this study could have seen is {half:.2f} points"


def headline(rows: Sequence[Mapping[str, Any]], tested: bool) -> list[dict[str, Any]]:
    """The pre-registered comparisons, one per plain loss.

    Of the FAKD points paired with a plain loss, the one with the highest mean val mIoU
    (last checkpoint) is chosen on val (the first in recipe order on a tie); its paired
    difference against the plain loss on the test split is the headline. Without a test
    split it is the val difference, chosen on the same split and so optimistic.
    """
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        if row["kind"] == "fakd" and row["plain"] is not None and row["val_last"] is not None:
            groups.setdefault(row["plain"], []).append(row)
    found = []
    for plain, candidates in groups.items():
        chosen = max(candidates, key=lambda row: row["val_last"]["mean"])
        difference = chosen["test_vs_plain"] if tested else chosen["vs_plain"]
        found.append(
            {
                "plain": plain,
                "chosen": chosen["variant"],
                "candidates": [row["variant"] for row in candidates],
                "chosen_val_mean": chosen["val_last"]["mean"],
                "split": "test" if tested else "val (chosen on the same split: optimistic)",
                "difference": difference,
                "verdict": verdict(difference) if difference else None,
                "reading": reading(difference),
            }
        )
    return found


Offer = tuple[RecordedRun, Path]  # a run recorded in a scores file, and that file


def run_study(
    recipe_path: Path,
    out: Path | None = None,
    overrides: list[str] | None = None,
    force: bool = False,
    merge: Sequence[Path] = (),
) -> dict[str, Any]:
    """Train and score every (variant, seed) of the expanded recipe, or take its scores from a
    `merge` file (`study_scores`); write study.{json,csv,md,png} and study/scores.json."""
    from fakd_deploy.pipeline import evaluate_checkpoints, session, train_student, train_teacher

    recipe, described = expand(load_recipe(recipe_path, overrides or []))
    if recipe.teacher is None:
        raise BadInput("a study distils from a teacher: the recipe needs a 'teacher' section")
    scores = read_merged(recipe, merge)  # a bad file is refused before the run folder is touched
    with session(recipe, out, force) as s:
        taken = announce_study(s, scores)
        teacher = train_teacher(s)
        digest = weights_digest(teacher)
        taken = same_teacher(taken, digest, recipe)
        best, last = {"teacher": teacher}, {"teacher": teacher}
        for seed in recipe.student.seeds:  # seed by seed: a study stopped early has every variant
            for variant in recipe.student.variants:
                name = f"{variant}_s{seed}"
                if name not in taken:
                    best[name] = train_student(s, variant, seed, teacher)
                    last[name] = best[name].with_name("last.pt")
        leave_group()
        if s.rank != 0 or s.manifest is None:
            return {"folder": s.run.root}
        folder = s.run.root / "study"
        scored = {
            "val_best": evaluate_checkpoints(s, best, name="study:val-best", out=folder / "val_best.json"),
            "val_last": evaluate_checkpoints(s, last, name="study:val-last", out=folder / "val_last.json"),
        }
        if recipe.data.test_split:
            scored["test_last"] = evaluate_checkpoints(
                s, last, split=recipe.data.test_split, name="study:test-last", out=folder / "test_last.json"
            )
        offers = list(taken.values())
        runs = recorded_here(s, scored, digest) + [run for run, _ in offers]
        for split, rows in scored.items():
            rows += [{**getattr(run, split).model_dump(), **origin(run, source)} for run, source in offers]
        seconds: dict[str, dict[int, float]] = {}
        for run in runs:
            if run.seconds is not None:
                seconds.setdefault(run.variant, {})[run.seed] = run.seconds
        summary = summarize(
            recipe,
            described,
            scored["val_best"],
            scored["val_last"],
            scored.get("test_last"),
            s.class_names,
            seconds,
            None if recipe.teacher.checkpoint else s.manifest.entry("teacher").get("seconds"),
        )
        root = s.run.root
        for written in (
            save_json(scores_document(runs), folder / "scores.json"),
            save_json(summary, root / "study.json"),
            save_text(to_csv(summary), root / "study.csv"),
            save_text(to_markdown(summary), root / "study.md"),
            plot(summary, root / "study.png"),
        ):
            if written is not None:
                s.written.append(written)
        outcome = {"ran": s.ran, "skipped": s.skipped, "written": s.written, "taken": list(taken)}
        return {**summary, "folder": root, **outcome}


def read_merged(recipe: Recipe, merge: Sequence[Path]) -> dict[Path, list[RecordedRun]]:
    """The runs of each `--merge` file, checked against the recipe's dataset."""
    if not merge:
        return {}
    num_classes, _ = splits.dataset_info(recipe.data)
    return {path: read_scores(path, num_classes) for path in merge}


def announce_study(s: Session, scores: Mapping[Path, list[RecordedRun]]) -> dict[str, Offer]:
    """Log the plan line (what will train, what is up to date, what is taken from the merged
    `scores`) and return the runs to take."""
    from fakd_deploy.pipeline import (
        RUNS,
        UP_TO_DATE,
        Later,
        announce,
        evaluation_inputs,
        later_stages,
        planned_teacher,
        training_stages,
    )

    recipe = s.recipe
    teacher = planned_teacher(s)
    assert teacher is not None
    students = [(variant, seed) for seed in recipe.student.seeds for variant in recipe.student.variants]
    stages = training_stages(s, teacher, students, with_teacher=True)
    offered = offered_runs(s, scores, teacher_trains=stages.get("teacher") == RUNS)
    taken = {name: offered[name] for name in stages if name in offered and stages[name] != UP_TO_DATE}
    training = {name: runs for name, runs in stages.items() if name not in taken}
    checkpoints = {
        name: s.run.student(variant, seed) / "best.pt"
        for variant, seed in students
        if (name := f"{variant}_s{seed}") not in taken
    }
    best = {"teacher": teacher, **checkpoints}
    last = {"teacher": teacher, **{name: path.with_name("last.pt") for name, path in checkpoints.items()}}
    evaluations: Later = {
        "study:val-best": (partial(evaluation_inputs, s, best), None),
        "study:val-last": (partial(evaluation_inputs, s, last), list(training)),
    }
    if recipe.data.test_split:
        evaluations["study:test-last"] = (
            partial(evaluation_inputs, s, last, recipe.data.test_split),
            list(training),
        )
    announce(s, later_stages(s, training, evaluations), list(taken))
    return taken


def offered_runs(
    s: Session, scores: Mapping[Path, list[RecordedRun]], teacher_trains: bool
) -> dict[str, Offer]:
    """The merged runs that are this study's: the same identity and, as far as can be told
    before the teacher trains (by its inputs), the same teacher weights."""
    from fakd_deploy.pipeline import planned_teacher

    recipe, found = s.recipe, dict[str, Offer]()
    if not scores:
        return found
    assert recipe.teacher is not None
    teacher = planned_teacher(s)
    digest = weights_digest(teacher) if teacher and teacher.is_file() and not teacher_trains else None
    inputs_key = teacher_key(s)
    for path, runs in scores.items():
        ignored, threads = 0, set()
        for run in runs:
            name = f"{run.variant}_s{run.seed}"
            ours = run.variant in recipe.student.variants and run.seed in recipe.student.seeds
            ours = ours and (run.test_last is not None or not recipe.data.test_split)
            if not ours or name in found or run.identity != run_identity(recipe, run.variant, run.seed):
                ignored += 1
            elif not recipe.student.variants[run.variant] or (
                run.teacher == digest
                if digest
                else inputs_key is not None and run.teacher_inputs == inputs_key
            ):
                found[name] = (run, path)
                if run.teacher_threads is not None:
                    threads.add(run.teacher_threads)
            else:
                ignored += 1
        if ignored:
            why = "not this study's (other inputs or teacher) or given twice"
            log.info(f"{ignored} run(s) of {path} not taken: {why}")
        here = torch.get_num_threads()
        if teacher_trains and threads - {here}:
            log.warning(
                f"{path}'s teacher trained with {', '.join(map(str, sorted(threads)))} thread(s) and this "
                f"one trains with {here}: it will likely train to other weights, and then every distilled "
                f"run of that file trains here; to take them, run with OMP_NUM_THREADS={min(threads)}"
            )
    return found


def same_teacher(taken: dict[str, Offer], digest: str, recipe: Recipe) -> dict[str, Offer]:
    """The offers whose teacher has the weights of the one trained here; the others train."""
    from fakd_deploy.pipeline import listed

    kept, retrained = {}, dict[Path, list[str]]()
    for name, (run, source) in taken.items():
        if recipe.student.variants[run.variant] and run.teacher != digest:
            retrained.setdefault(source, []).append(name)
        else:
            kept[name] = (run, source)
    for source, names in retrained.items():
        log.info(
            f"train {len(names)} run(s) here ({listed(names)}): {source} scored them with a teacher "
            "whose weights differ from this study's (other code, torch build or thread count)"
        )
    return kept


def recorded_here(s: Session, scored: Mapping[str, list[dict[str, Any]]], digest: str) -> list[RecordedRun]:
    """The students trained in this folder, as a scores file records them."""
    from fakd_deploy.pipeline import student_stage

    assert s.manifest is not None and s.recipe.teacher is not None
    inputs_key = teacher_key(s)
    threads = teacher_threads(s)
    rows = {split: {row["model"]: row for row in found} for split, found in scored.items()}
    runs = []
    for name, row in rows["val_last"].items():
        if row["variant"] == "teacher":
            continue
        variant, seed = row["variant"], row["seed"]
        distils = bool(s.recipe.student.variants[variant])
        runs.append(
            RecordedRun(
                variant=variant,
                seed=seed,
                identity=run_identity(s.recipe, variant, seed),
                teacher=digest if distils else None,
                teacher_inputs=inputs_key if distils else None,
                teacher_threads=threads if distils else None,
                seconds=s.manifest.entry(student_stage(variant, seed)).get("seconds"),
                val_best=carried(rows["val_best"][name]),
                val_last=carried(row),
                test_last=carried(rows["test_last"][name]) if "test_last" in rows else None,
            )
        )
    return runs


def teacher_threads(s: Session) -> int | None:
    """The thread count the teacher trained with here, as its manifest entry records it."""
    assert s.manifest is not None
    metrics = s.manifest.entry("teacher").get("metrics")
    threads = metrics.get("threads") if isinstance(metrics, dict) else None
    return threads if isinstance(threads, int) and threads >= 1 else None  # the manifest may be edited


def carried(row: Mapping[str, Any]) -> Score:
    """An evaluation row as a scores file carries it: all but the confusion matrix, which
    the study does not read and which would be most of the file."""
    return Score.model_validate({key: value for key, value in row.items() if key != "confusion_matrix"})


def teacher_key(s: Session) -> str | None:
    """The key of the teacher stage's inputs; None for a teacher trained elsewhere."""
    from fakd_deploy.pipeline import teacher_inputs

    assert s.recipe.teacher is not None
    return None if s.recipe.teacher.checkpoint else stage_inputs(teacher_inputs(s))[0]


def origin(run: RecordedRun, source: Path) -> dict[str, Any]:
    return {
        "model": f"{run.variant}_s{run.seed}",
        "variant": run.variant,
        "seed": run.seed,
        "from": str(source),
    }
