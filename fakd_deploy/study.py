"""`fakd-deploy study`: did distillation (and FAKD) help this student, beyond seed noise?

One teacher, then every variant for every seed, where each FAKD variant named in the
recipe's `study` section is multiplied into one variant per (lam0, bound) point. Every
student is scored three ways: its last checkpoint on the val split (the number the study
reports: no selection), its best-on-val checkpoint (shown beside it; optimistic, since it
was selected on the split it is scored on) and, when the dataset has `data.test_split`,
its last checkpoint on that held-out split, which took part in no selection. Gains are
paired per seed against the baseline and against plain KD, with 95 % t intervals.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from fakd_deploy.errors import BadInput
from fakd_deploy.recipe import BoundName, LossTerm, Recipe, load_recipe, parse_recipe
from fakd_deploy.stats import mean_std, paired_difference
from fakd_deploy.utils import atomic_write, save_json, save_text

log = logging.getLogger(__name__)


def point_name(variant: str, lam0: float, bound: str | None) -> str:
    return f"{variant}-lam{lam0:g}" + (f"-{bound}" if bound else "")


def swept(term: LossTerm, lam0: float, bound: str | None) -> LossTerm:
    """A FAKD term at one sweep point (the bound applies to KD terms only)."""
    update: dict[str, Any] = {"lam0": lam0}
    if bound and term.loss == "kd":
        update["bound"] = bound
    return LossTerm.model_validate({**term.model_dump(exclude_unset=True), **update})


def expand(recipe: Recipe) -> tuple[Recipe, dict[str, dict[str, Any]]]:
    """The recipe with each swept variant replaced by its points, and what each variant is.

    Returns (recipe, {variant: {"source", "lam0", "bound"}}).
    """
    cfg, variants = recipe.study, recipe.student.variants
    for role, name in (("study.baseline", cfg.baseline), ("study.kd", cfg.kd)):
        if name is not None and name not in variants:
            raise BadInput(f"{role} '{name}' is not one of the student variants: {', '.join(variants)}")
    if variants[cfg.baseline]:
        raise BadInput(f"study.baseline '{cfg.baseline}' must have no distillation terms")
    fakd_variants = [name for name, terms in variants.items() if any(t.lam0 > 0 for t in terms)]
    targets = cfg.variants if cfg.variants is not None else fakd_variants
    for name in targets:
        if name not in fakd_variants:
            raise BadInput(f"study.variants: '{name}' has no FAKD term (lam0 > 0) to sweep")
    if targets and not (cfg.lam0 or cfg.bounds):
        raise BadInput("the study sweeps nothing: give study.lam0 and/or study.bounds")
    points: dict[str, list[LossTerm]] = {}
    described: dict[str, dict[str, Any]] = {}
    for name, terms in variants.items():
        if name not in targets:
            points[name] = terms
            fakd_terms = [t for t in terms if t.lam0 > 0]
            described[name] = {
                "source": name,
                "lam0": fakd_terms[0].lam0 if fakd_terms else None,
                "bound": next((t.bound for t in fakd_terms if t.loss == "kd"), None),
            }
            continue
        own = next(t for t in terms if t.lam0 > 0)
        for lam0 in cfg.lam0 or [own.lam0]:
            bounds: Sequence[BoundName | None] = cfg.bounds or [own.bound if own.loss == "kd" else None]
            for bound in bounds:
                kd_bound = bound if any(t.loss == "kd" and t.lam0 > 0 for t in terms) else None
                point = point_name(name, lam0, kd_bound)
                if point in points:
                    continue
                points[point] = [swept(t, lam0, kd_bound) if t.lam0 > 0 else t for t in terms]
                described[point] = {"source": name, "lam0": lam0, "bound": kd_bound}
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


def by_seed(rows: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, Any]]]:
    table: dict[str, dict[int, dict[str, Any]]] = {}
    for row in rows:
        if row["variant"] != "teacher":
            table.setdefault(row["variant"], {})[row["seed"]] = row
    return table


def _spread(values: list[float]) -> dict[str, float | None]:
    mean, std = mean_std(values)
    return {"mean": mean, "std": std}


def summarize(
    recipe: Recipe,
    described: dict[str, dict[str, Any]],
    val_best: list[dict[str, Any]],
    val_last: list[dict[str, Any]],
    test_last: list[dict[str, Any]] | None,
    class_names: list[str] | None = None,
) -> dict[str, Any]:
    """Per variant: spreads over seeds, paired differences, per-class IoU deltas (val, last)."""
    cfg = recipe.study
    best, last = by_seed(val_best), by_seed(val_last)
    test = by_seed(test_last) if test_last is not None else None
    seeds = recipe.student.seeds

    def miou(table: dict[str, dict[int, dict[str, Any]]], variant: str) -> list[float]:
        return [table[variant][seed]["miou"] for seed in seeds]

    rows = []
    for variant, info in described.items():
        row: dict[str, Any] = {
            "variant": variant,
            **info,
            "seeds": len(seeds),
            "val_last": _spread(miou(last, variant)),
            "val_best": _spread(miou(best, variant)),
        }
        for label, reference in (("baseline", cfg.baseline), ("kd", cfg.kd)):
            if reference is not None and reference != variant:
                row[f"vs_{label}"] = paired_difference(miou(last, variant), miou(last, reference))
                if test is not None:
                    row[f"test_vs_{label}"] = paired_difference(miou(test, variant), miou(test, reference))
        if test is not None:
            row["test_last"] = _spread(miou(test, variant))
        if variant != cfg.baseline:
            per_class = [
                [
                    None if v is None or r is None else v - r
                    for v, r in zip(
                        last[variant][seed]["per_class_iou"],
                        last[cfg.baseline][seed]["per_class_iou"],
                        strict=True,
                    )
                ]
                for seed in seeds
            ]
            row["class_delta_vs_baseline"] = [
                None if any(d is None for d in column) else sum(column) / len(column)
                for column in zip(*per_class, strict=True)
            ]
        rows.append(row)
    teacher = [r for r in val_last if r["variant"] == "teacher"]
    return {
        "reported": "last checkpoint, val split" + (" and test split" if test is not None else ""),
        "dataset": recipe.data.name,
        "val_split": recipe.data.val_split,
        "test_split": recipe.data.test_split if test is not None else None,
        "seeds": seeds,
        "teacher": teacher[0]["miou"] if teacher else None,
        "class_names": class_names,
        "rows": rows,
    }


def _pm(spread: dict[str, Any] | None) -> str:
    if not spread:
        return "-"
    return f"{spread['mean']:.2f}" + ("" if spread["std"] is None else f" ± {spread['std']:.2f}")


def _ci(diff: dict[str, Any] | None) -> str:
    if not diff:
        return "-"
    if diff["low"] is None:
        return f"{diff['mean']:+.2f}"
    return f"{diff['mean']:+.2f} [{diff['low']:+.2f}, {diff['high']:+.2f}]"


COLUMNS = [
    ("variant", "variant"),
    ("lam0", "lam0"),
    ("bound", "bound"),
    ("val_last", "val mIoU (last)"),
    ("val_best", "val mIoU (best on val)"),
    ("vs_baseline", "Δ vs baseline [95% CI]"),
    ("vs_kd", "Δ vs KD [95% CI]"),
    ("test_last", "test mIoU (last)"),
    ("test_vs_baseline", "test Δ vs baseline"),
    ("test_vs_kd", "test Δ vs KD"),
]


def _cells(row: dict[str, Any]) -> list[str]:
    cells = []
    for key, _ in COLUMNS:
        value = row.get(key)
        if key in ("val_last", "val_best", "test_last"):
            cells.append(_pm(value))
        elif key.startswith(("vs_", "test_vs_")):
            cells.append(_ci(value))
        else:
            cells.append("-" if value is None else f"{value:g}" if isinstance(value, float) else str(value))
    return cells


def _columns(summary: dict[str, Any]) -> list[int]:
    """Indices of the columns that have a value in some row (no test columns without a test split)."""
    rows = summary["rows"]
    return [i for i, (key, _) in enumerate(COLUMNS) if any(row.get(key) is not None for row in rows)]


def study_table(summary: dict[str, Any]) -> Table:
    keep = _columns(summary)
    table = Table(
        title=f"{summary['dataset']}: mean ± std over seeds {summary['seeds']}; reported: "
        f"{summary['reported']}; teacher val {summary['teacher'] or 0:.2f}"
    )
    for i in keep:
        table.add_column(COLUMNS[i][1], justify="left" if i < 3 else "right")
    for row in summary["rows"]:
        cells = _cells(row)
        table.add_row(*(cells[i] for i in keep))
    return table


def to_markdown(summary: dict[str, Any]) -> str:
    keep = _columns(summary)
    lines = [
        f"# Study: {summary['dataset']}",
        "",
        f"Seeds {summary['seeds']}. Reported: {summary['reported']} (no checkpoint selection); "
        "'best on val' is the checkpoint selected on the val split itself, shown for comparison "
        "and optimistic by construction. Δ: mean paired difference (same seed) with a 95 % "
        f"Student-t interval. Teacher val mIoU {summary['teacher'] or 0:.2f}.",
        "",
        "| " + " | ".join(COLUMNS[i][1] for i in keep) + " |",
        "|" + "|".join("---" if i < 3 else "---:" for i in keep) + "|",
    ]
    for row in summary["rows"]:
        cells = _cells(row)
        lines.append("| " + " | ".join(cells[i] for i in keep) + " |")
    names = summary.get("class_names")
    deltas = [row for row in summary["rows"] if row.get("class_delta_vs_baseline")]
    if names and deltas:
        lines += [
            "",
            "Per-class IoU change against the baseline (val, last checkpoint, mean over seeds):",
            "",
            "| variant | " + " | ".join(names) + " |",
            "|---|" + "---:|" * len(names),
        ]
        for row in deltas:
            lines.append(
                f"| {row['variant']} | "
                + " | ".join("-" if d is None else f"{d:+.1f}" for d in row["class_delta_vs_baseline"])
                + " |"
            )
    return "\n".join(lines) + "\n"


def to_csv(summary: dict[str, Any]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(
        [
            "variant",
            "source",
            "lam0",
            "bound",
            "seeds",
            "val_last_mean",
            "val_last_std",
            "val_best_mean",
            "val_best_std",
            "vs_baseline",
            "vs_baseline_low",
            "vs_baseline_high",
            "vs_kd",
            "vs_kd_low",
            "vs_kd_high",
            "test_last_mean",
            "test_last_std",
        ]
    )
    fields = [
        ("val_last", "mean"),
        ("val_last", "std"),
        ("val_best", "mean"),
        ("val_best", "std"),
        ("vs_baseline", "mean"),
        ("vs_baseline", "low"),
        ("vs_baseline", "high"),
        ("vs_kd", "mean"),
        ("vs_kd", "low"),
        ("vs_kd", "high"),
        ("test_last", "mean"),
        ("test_last", "std"),
    ]
    for row in summary["rows"]:
        writer.writerow(
            [
                row["variant"],
                row["source"],
                row["lam0"],
                row["bound"],
                row["seeds"],
                *((row.get(key) or {}).get(field) for key, field in fields),
            ]
        )
    return buffer.getvalue()


def plot(summary: dict[str, Any], path: Path, baseline: str, kd: str | None) -> Path | None:
    """mIoU (val, last) against lam0 with std error bars, a line per bound, baseline and KD bands."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        log.info("study.png left out: matplotlib is not installed")
        return None
    rows = {row["variant"]: row for row in summary["rows"]}
    points = [row for row in summary["rows"] if row["lam0"] is not None]
    figure = Figure(figsize=(7.5, 5), layout="constrained")
    axes = figure.subplots()
    for name, colour in ((baseline, "tab:gray"), (kd, "tab:green")):
        if name in rows:
            spread = rows[name]["val_last"]
            std = spread["std"] or 0.0
            axes.axhspan(spread["mean"] - std, spread["mean"] + std, color=colour, alpha=0.2)
            axes.axhline(spread["mean"], color=colour, lw=1.5, label=f"{name} (mean ± std)")
    lines: dict[tuple[str, str | None], list[dict[str, Any]]] = {}
    for row in points:
        lines.setdefault((row["source"], row["bound"]), []).append(row)
    for (source, bound), members in lines.items():
        members.sort(key=lambda r: r["lam0"])
        axes.errorbar(
            [r["lam0"] for r in members],
            [r["val_last"]["mean"] for r in members],
            yerr=[r["val_last"]["std"] or 0.0 for r in members],
            marker="o",
            capsize=4,
            label=f"{source}, {bound}" if bound else source,
        )
    if points:
        axes.set_xscale("log")
        axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axes.set_xticks(sorted({r["lam0"] for r in points}))
    axes.set_xlabel("lam0 (FAKD strength at the end of training)")
    axes.set_ylabel("val mIoU, last checkpoint (%)")
    axes.set_title(f"{summary['dataset']}: mean ± std over {len(summary['seeds'])} seeds", fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(loc="best", fontsize=8)
    return atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=120))


def run_study(
    recipe_path: Path, out: Path | None = None, overrides: list[str] | None = None, force: bool = False
) -> dict[str, Any]:
    """Train and score every (variant, seed) of the expanded recipe; write study.{json,csv,md,png}."""
    from fakd_deploy.pipeline import evaluate_checkpoints, session, train_student, train_teacher

    recipe, described = expand(load_recipe(recipe_path, overrides or []))
    if recipe.teacher is None:
        raise BadInput("a study distils from a teacher: the recipe needs a 'teacher' section")
    with session(recipe, out, force) as s:
        teacher = train_teacher(s)
        best, last = {"teacher": teacher}, {"teacher": teacher}
        for seed in recipe.student.seeds:  # seed by seed: a study stopped early has every variant
            for variant in recipe.student.variants:
                best[f"{variant}_s{seed}"] = train_student(s, variant, seed, teacher)
                last[f"{variant}_s{seed}"] = best[f"{variant}_s{seed}"].with_name("last.pt")
        if s.rank != 0:
            return {"folder": s.run.root}
        folder = s.run.root / "study"
        val_best = evaluate_checkpoints(s, best, name="study:val-best", out=folder / "val_best.json")
        val_last = evaluate_checkpoints(s, last, name="study:val-last", out=folder / "val_last.json")
        test_last = None
        if recipe.data.test_split:
            test_last = evaluate_checkpoints(
                s, last, split=recipe.data.test_split, name="study:test-last", out=folder / "test_last.json"
            )
        summary = summarize(recipe, described, val_best, val_last, test_last, s.class_names)
        save_json(summary, s.run.root / "study.json")
        save_text(to_csv(summary), s.run.root / "study.csv")
        save_text(to_markdown(summary), s.run.root / "study.md")
        plot(summary, s.run.root / "study.png", recipe.study.baseline, recipe.study.kd)
        return {**summary, "folder": s.run.root}
