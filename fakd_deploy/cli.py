"""The `fakd-deploy` command line: one command per stage, parsing only; the work is elsewhere."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from fakd_deploy.progress import console

app = typer.Typer(help="Distil a segmentation teacher into a small student with FAKD, then "
                       "export, build and benchmark it.", no_args_is_help=True,
                  pretty_exceptions_enable=False, rich_markup_mode="rich")
data_app = typer.Typer(help="Inspect datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")

RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML, e.g. recipes/quickstart.yaml.")]
OutOpt = Annotated[Path | None, typer.Option("--out", "-o",
                                             help="Run folder (default: runs/<recipe name>).")]
SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", "-s", help="Override a recipe key, typed by the schema: --set student.train.steps=100")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Redo stages even when up to date.")]

USER_ERRORS = (ValueError, FileNotFoundError, KeyError)


@contextmanager
def errors() -> Iterator[None]:
    """Print a failure as one readable line and exit non-zero: 2 for bad input, 1 otherwise."""
    from fakd_deploy.train import Interrupted

    try:
        yield
    except Interrupted as error:
        console.print(f"[yellow]{error}[/yellow]", soft_wrap=True)
        raise typer.Exit(130) from None
    except USER_ERRORS as error:
        console.print(f"[red]error:[/red] {error}", soft_wrap=True)
        raise typer.Exit(2) from None
    except RuntimeError as error:
        console.print(f"[red]error:[/red] {error}", soft_wrap=True)
        raise typer.Exit(1) from None


def _recipe_and_run(recipe_path: Path, out: Path | None, overrides: list[str] | None):
    from fakd_deploy.pipeline import prepare
    from fakd_deploy.recipe import load_recipe

    recipe = load_recipe(recipe_path, overrides or [])
    return recipe, prepare(recipe, out or Path("runs") / recipe.name)


@app.command()
def run(recipe: RecipeArg, out: OutOpt = None, set_: SetOpt = None, force: ForceOpt = False) -> None:
    """Run every stage of a recipe; finished stages are skipped, interrupted ones resume.

    Example: [bold]fakd-deploy run recipes/quickstart.yaml --out runs/quick[/bold]
    """
    with errors():
        from fakd_deploy.pipeline import run_recipe

        cfg, folder = _recipe_and_run(recipe, out, set_)
        run_recipe(cfg, folder.root, force)
        console.print(f"[green]done:[/green] {folder.root}")


RoleOpt = Annotated[str, typer.Option(help="teacher, or baseline (the student without distillation).")]


@app.command()
def train(recipe: RecipeArg, role: RoleOpt = "teacher", out: OutOpt = None, set_: SetOpt = None,
          force: ForceOpt = False) -> None:
    """Train the recipe's teacher or its plain baseline student (ground truth only).

    Example: [bold]fakd-deploy train recipes/quickstart.yaml --role teacher[/bold]
    """
    with errors():
        from fakd_deploy.pipeline import train_student, train_teacher

        cfg, folder = _recipe_and_run(recipe, out, set_)
        if role == "teacher":
            path = train_teacher(cfg, folder, force)
        elif role == "baseline":
            cfg.student.variants.setdefault("baseline", [])
            if cfg.student.variants["baseline"]:
                raise ValueError("student.variants.baseline must have no distillation terms")
            path = train_student(cfg, folder, "baseline", cfg.student.seeds[0], None, force)
        else:
            raise ValueError(f"--role must be 'teacher' or 'baseline', not '{role}'")
        console.print(f"[green]checkpoint:[/green] {path}")


@app.command()
def distill(recipe: RecipeArg,
            variant: Annotated[list[str] | None, typer.Option(
                help="Variant(s) of student.variants to train (default: all with terms).")] = None,
            teacher: Annotated[Path | None, typer.Option(
                help="Teacher checkpoint (default: the run's teacher/best.pt).")] = None,
            out: OutOpt = None, set_: SetOpt = None, force: ForceOpt = False) -> None:
    """Train distilled students (KD, CWD, with or without FAKD) from a trained teacher.

    Example: [bold]fakd-deploy distill recipes/quickstart.yaml --variant fakd_kd[/bold]
    """
    with errors():
        from fakd_deploy.pipeline import train_student

        cfg, folder = _recipe_and_run(recipe, out, set_)
        names = variant or [name for name, terms in cfg.student.variants.items() if terms]
        unknown = [name for name in names if name not in cfg.student.variants]
        if unknown:
            raise ValueError(f"unknown variant(s) {unknown}; the recipe has: "
                             f"{', '.join(cfg.student.variants)}")
        teacher_path = teacher or Path(cfg.teacher.checkpoint or folder.teacher / "best.pt")
        for name in names:
            for seed in cfg.student.seeds:
                path = train_student(cfg, folder, name, seed, teacher_path, force)
                console.print(f"[green]checkpoint:[/green] {path}")


@app.command("evaluate")
def evaluate_cmd(
    model: Annotated[Path, typer.Argument(help="A checkpoint (.pt), .onnx model or .engine.")],
    recipe: Annotated[Path | None, typer.Option(
        help="Recipe for the data (default: the one stored in the model).")] = None,
    set_: SetOpt = None,
    max_images: Annotated[int | None, typer.Option(help="Score only the first N images.")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads.")] = None,
) -> None:
    """mIoU, per-class IoU and pixel accuracy of any model on the recipe's val split.

    Example: [bold]fakd-deploy evaluate runs/quickstart/deploy/fakd_kd.int8.onnx[/bold]
    """
    with errors():
        from fakd_deploy.evaluate import print_evaluation
        from fakd_deploy.pipeline import evaluate_model

        result, class_names = evaluate_model(model, recipe, set_ or [], max_images, threads)
        print_evaluation(result, class_names)


@app.command()
def export(
    checkpoint: Annotated[Path, typer.Argument(help="Student checkpoint (.pt).")],
    out: Annotated[Path | None, typer.Option(help="ONNX file (default: beside the checkpoint).")] = None,
    height: Annotated[int | None, typer.Option(help="Input height (default: the recipe's).")] = None,
    width: Annotated[int | None, typer.Option(help="Input width (default: the recipe's).")] = None,
    batch: Annotated[int, typer.Option(help="Batch size in the graph.")] = 1,
    dynamic: Annotated[bool, typer.Option(help="Dynamic batch dimension.")] = False,
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = 18,
    argmax: Annotated[bool, typer.Option(help="Output labels instead of logits.")] = False,
    tolerance: Annotated[float, typer.Option(help="Max abs logit difference allowed.")] = 1e-4,
) -> None:
    """Export a student to ONNX (upsampling inside), check it, and verify parity on val images.

    Example: [bold]fakd-deploy export runs/quickstart/students/fakd_kd_s0/best.pt --out s.onnx[/bold]
    """
    with errors():
        from fakd_deploy import loaders
        from fakd_deploy.deploy.export import export_onnx
        from fakd_deploy.models import load_checkpoint
        from fakd_deploy.pipeline import export_size
        from fakd_deploy.recipe import parse_recipe

        cfg = parse_recipe(load_checkpoint(checkpoint)["recipe"])
        default_h, default_w = export_size(cfg)
        report = export_onnx(checkpoint, out or checkpoint.with_suffix(".onnx"),
                             height=height or default_h, width=width or default_w, batch=batch,
                             dynamic=dynamic, opset=opset, argmax=argmax,
                             parity_batches=loaders.val_loader(cfg.data, max_images=8),
                             tolerance=tolerance)
        console.print(report)


@app.command()
def build(
    onnx: Annotated[Path, typer.Argument(help="FP32 ONNX model from `export`.")],
    backend: Annotated[str, typer.Option(
        help="ort-fp32 | ort-int8 | trt-fp32 | trt-fp16 | trt-int8")] = "ort-int8",
    calib: Annotated[int, typer.Option(help="Calibration images for INT8.")] = 32,
    calib_method: Annotated[str, typer.Option(help="minmax | entropy | percentile")] = "minmax",
    recipe: Annotated[Path | None, typer.Option(
        help="Recipe for calibration data (default: the one stored in the model).")] = None,
) -> None:
    """Build an inference artifact for one backend from an exported ONNX model.

    Example: [bold]fakd-deploy build runs/quickstart/deploy/fakd_kd.onnx --backend ort-int8[/bold]
    """
    with errors():
        import yaml

        from fakd_deploy import loaders
        from fakd_deploy.deploy.build import build as build_artifact
        from fakd_deploy.deploy.export import read_metadata
        from fakd_deploy.recipe import load_recipe, parse_recipe

        cfg = (load_recipe(recipe) if recipe else
               parse_recipe(yaml.safe_load(read_metadata(onnx)["recipe"])))
        path = build_artifact(onnx, backend, calib_batches=loaders.calibration_batches(
            cfg.data, calib), calib_method=calib_method)
        console.print(f"[green]built:[/green] {path}")


@app.command("bench")
def bench_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A run folder written by `run`.")],
    backends: Annotated[list[str] | None, typer.Option(
        help="Only these rows: pytorch, ort-fp32, ort-int8, trt-fp32, trt-fp16, trt-int8 "
             "(repeat the option or separate with commas).")] = None,
    batch: Annotated[int, typer.Option(help="Batch size for throughput.")] = 1,
    threads: Annotated[int | None, typer.Option(help="CPU threads.")] = None,
    iters: Annotated[int | None, typer.Option(help="Timed iterations (default: --seconds).")] = None,
    seconds: Annotated[float, typer.Option(help="Seconds of timing per row.")] = 3.0,
    warmup: Annotated[float, typer.Option(help="Seconds of warm-up before timing.")] = 1.0,
    tolerance: Annotated[float, typer.Option(help="Allowed mIoU drop vs PyTorch FP32.")] = 1.0,
    max_images: Annotated[int | None, typer.Option(help="Score only the first N images.")] = None,
) -> None:
    """Latency and mIoU of every model and engine of a run, in one table (+ JSON, CSV, MD, PNG).

    Example: [bold]fakd-deploy bench runs/quickstart --threads 2[/bold]
    """
    with errors():
        from fakd_deploy.deploy.bench import bench_run, split_backends
        from fakd_deploy.deploy.report import print_report, write_report

        result = bench_run(run_dir, backends=split_backends(backends), batch=batch,
                           threads=threads, iters=iters, seconds=seconds, warmup_s=warmup,
                           tolerance=tolerance, max_images=max_images)
        write_report(result, run_dir)
        print_report(result)


@app.command()
def predict(
    model: Annotated[Path, typer.Argument(help="A checkpoint (.pt), .onnx model or .engine.")],
    images: Annotated[list[Path], typer.Argument(help="Image files.")],
    out: Annotated[Path, typer.Option(help="Folder for label PNGs and overlays.")] = Path("predictions"),
) -> None:
    """Label PNGs and colour overlays from any backend, to see what the engine sees.

    Example: [bold]fakd-deploy predict runs/quickstart/deploy/fakd_kd.int8.onnx img.png --out pred[/bold]
    """
    with errors():
        from fakd_deploy.deploy.predict import predict as run_predict

        for path in run_predict(model, images, out):
            console.print(str(path))


@app.command()
def models(
    size: Annotated[str, typer.Option(help="Input size HxW for GFLOPs.")] = "512x1024",
) -> None:
    """List the model zoo with parameters and GFLOPs.

    Example: [bold]fakd-deploy models --size 360x480[/bold]
    """
    with errors():
        from fakd_deploy.models.zoo import list_models, print_models

        height, width = (int(v) for v in size.lower().split("x"))
        print_models(list_models(input_size=(height, width)), console)


@data_app.command("check")
def data_check(
    name: Annotated[str, typer.Argument(help="camvid | cityscapes | ade20k | voc | folder | synthetic")],
    root: Annotated[Path, typer.Argument(help="Dataset root folder.")],
    max_images: Annotated[int | None, typer.Option(help="Scan only N images per split.")] = None,
) -> None:
    """Counts per split, image sizes and class pixel frequencies.

    Example: [bold]fakd-deploy data check camvid ../shared/datasets/camvid[/bold]
    """
    with errors():
        from fakd_deploy.data.check import print_summary, summarize

        print_summary(summarize(name, root, max_images=max_images), console)
