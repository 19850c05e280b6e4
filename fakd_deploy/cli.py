"""The `fakd-deploy` command line: each command parses, calls one library function, prints.

Failures the user can fix end with one line and the exit code of their `FakdError`
class (2 bad input, 1 a stage failed, 3 run folder busy, 130 interrupted); anything else
is a bug and shows its traceback. `--debug` shows tracebacks for everything. Imports of
the training stack happen inside the commands that train, so `build`, `bench`,
`evaluate` and `predict` on ONNX models and engines work where torch is not installed.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperCommand, TyperGroup

from fakd_deploy import __version__
from fakd_deploy.errors import BadInput, FakdError, Interrupted, StageFailed, out_of_memory, printable
from fakd_deploy.progress import console, setup_logging
from fakd_deploy.signals import Stopped, interrupt_on_signals

if TYPE_CHECKING:
    from fakd_deploy.deploy.rows import BenchReport


def _plain_flags(params: list[Any]) -> list[Any]:
    """On/off flags show no `<bool>` type in the help: the flag's name says it all."""
    for param in params:
        if getattr(param, "is_flag", False):
            param.metavar = ""
    return params


def check_set_options(args: list[str]) -> None:
    """`--set key value` (a space instead of `=`) is refused with the spelling that works,
    before click reports a bare "unexpected extra argument"."""
    for index, arg in enumerate(args):
        if arg not in ("--set", "-s"):
            continue
        value = args[index + 1] if index + 1 < len(args) else ""
        if "=" not in value:
            following = args[index + 2] if index + 2 < len(args) else ""
            example = (
                f"--set {value}={following}"
                if value and following and not following.startswith("-")
                else "--set student.train.steps=100"
            )
            raise typer.BadParameter(f"write key=value as one word, e.g. {example}", param_hint=f"'{arg}'")


class Command(TyperCommand):
    def get_params(self, ctx: Any) -> list[Any]:
        return _plain_flags(super().get_params(ctx))

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        check_set_options(args)
        return super().parse_args(ctx, args)


class Group(TyperGroup):
    def get_params(self, ctx: Any) -> list[Any]:
        return _plain_flags(super().get_params(ctx))


app = typer.Typer(
    cls=Group,
    help="Distil a segmentation teacher into a small student with FAKD, then export, build and benchmark it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
data_app = typer.Typer(cls=Group, help="Inspect datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
# Tables and paths go to stdout; into a file or pipe they keep a readable width.
results = Console(width=None if sys.stdout.isatty() else 160)
DEBUG = {"on": False}

RecipeArg = Annotated[
    Path, typer.Argument(metavar="RECIPE", help="Recipe YAML, e.g. recipes/quickstart.yaml.")
]
OutOpt = Annotated[
    Path | None, typer.Option("--out", "-o", metavar="DIR", help="Run folder (default: runs/<recipe name>).")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        metavar="KEY=VALUE",
        help="Override a recipe key, typed by the schema: --set student.train.steps=100 (repeatable).",
    ),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Redo stages even when up to date.")]
ModelArg = Annotated[
    Path, typer.Argument(metavar="MODEL", help="A checkpoint (.pt), ONNX model (.onnx) or engine (.engine).")
]
ModelRecipeOpt = Annotated[
    Path | None,
    typer.Option(metavar="FILE", help="Recipe for the data (default: the one stored in the model)."),
]
BackendOpt = Annotated[
    str | None,
    typer.Option(
        metavar="NAME",
        help="Runtime for an ONNX model, e.g. ort-cpu-fp32, ort-cuda-fp32, ort-trt-fp16 (default: ONNX "
        "Runtime on the CPU).",
    ),
]
ThreadsOpt = Annotated[int | None, typer.Option(min=1, metavar="N", help="CPU threads.")]


def say(message: str, style: str = "") -> None:
    """One line on stderr, printed as plain text (no rich markup is read from it)."""
    console.print(Text(message, style=style), soft_wrap=True)


@contextmanager
def reported() -> Iterator[None]:
    """Expected failures as one line and their exit code; bugs keep their traceback.

    SIGINT, SIGTERM and SIGHUP stop the command cleanly (its temporary files removed, its
    lock released) with exit 130. Control characters in a message (a file name holding a
    newline or an escape sequence) are printed escaped, so a message stays one line.
    """
    try:
        with interrupt_on_signals():
            yield
    except FakdError as error:
        if DEBUG["on"]:
            raise
        say(
            f"{'' if isinstance(error, Interrupted) else 'error: '}{printable(str(error))}",
            "yellow" if isinstance(error, Interrupted) else "red",
        )
        raise typer.Exit(error.exit_code) from None
    except OSError as error:
        if DEBUG["on"] or not error.filename:
            raise
        say(f"error: {printable(str(error.filename))}: {error.strerror}", "red")
        raise typer.Exit(BadInput.exit_code) from None
    except KeyboardInterrupt as error:
        say(f"interrupted: {error}" if isinstance(error, Stopped) else "interrupted", "yellow")
        raise typer.Exit(Interrupted.exit_code) from None
    except (MemoryError, RuntimeError) as error:
        message = out_of_memory(error)
        if DEBUG["on"] or message is None:
            raise
        say(f"error: {printable(message)}", "red")
        raise typer.Exit(StageFailed.exit_code) from None


def version_callback(value: bool) -> None:
    if value:
        results.print(f"fakd-deploy {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for every error.")] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=version_callback, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    DEBUG["on"] = debug
    setup_logging(debug)


@app.command(cls=Command)
def run(
    recipe: RecipeArg,
    out: OutOpt = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
    redo: Annotated[
        list[str] | None,
        typer.Option(
            metavar="STAGE",
            help="Redo this stage although it is up to date: bench, build, build:BACKEND, export, "
            "evaluate, teacher or student:VARIANT_sSEED (repeatable).",
        ),
    ] = None,
) -> None:
    """Run every stage of a recipe; finished stages are skipped, interrupted ones resume.

    Example: [bold]fakd-deploy run recipes/quickstart.yaml --out runs/quick --redo bench[/bold]
    """
    with reported():
        from fakd_deploy.pipeline import run as run_pipeline
        from fakd_deploy.tables import variant_table

        result = run_pipeline(recipe, out, set_, force, tuple(redo or ()))
        if result.evaluation:
            results.print(variant_table(result.evaluation))
        if result.bench:
            show_bench(result.bench)
        finish(result.folder, result.ran, result.skipped, result.written)


def finish(folder: Path, ran: list[str], skipped: list[str], written: list[Path]) -> None:
    """How every command that trains ends: what ran, what was up to date, the files written."""
    from fakd_deploy.progress import files_lines

    say(f"ran {len(ran)} stage(s), skipped {len(skipped)} up to date", "green")
    for line in files_lines(written, folder):
        say(line)
    say(f"done: {folder}", "green")


def show_bench(result: BenchReport) -> None:
    """The benchmark table and per-class changes on stdout; the pick, warnings and failed
    rows on stderr, where a person looks for what went wrong."""
    from fakd_deploy.deploy.report import class_delta_table, report_table, row_errors, summary_lines

    results.print(report_table(result))
    deltas = class_delta_table(result)
    if deltas is not None:
        results.print(deltas)
    for line in summary_lines(result):
        say(line, "yellow" if line.startswith("warning") else "green")
    for line in row_errors(result):
        say(line, "red")


RoleOpt = Annotated[
    str, typer.Option(metavar="ROLE", help="teacher, or baseline (the student without distillation).")
]


@app.command(cls=Command)
def train(
    recipe: RecipeArg,
    role: RoleOpt = "teacher",
    out: OutOpt = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
) -> None:
    """Train the recipe's teacher or its plain baseline student (ground truth only).

    Example: [bold]fakd-deploy train recipes/quickstart.yaml --role teacher[/bold]
    """
    with reported():
        from fakd_deploy.pipeline import train as train_role

        result = train_role(recipe, role, out, set_, force)
        results.print(f"checkpoint: {result.checkpoints[0]}")
        finish(result.folder, result.ran, result.skipped, result.written)


@app.command(cls=Command)
def distill(
    recipe: RecipeArg,
    variant: Annotated[
        list[str] | None,
        typer.Option(
            metavar="NAME", help="Variant(s) of student.variants to train (default: all with terms)."
        ),
    ] = None,
    teacher: Annotated[
        Path | None,
        typer.Option(
            metavar="FILE",
            help="Teacher checkpoint (default: teacher.checkpoint, else the run's teacher/best.pt).",
        ),
    ] = None,
    out: OutOpt = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
) -> None:
    """Train distilled students (KD, CWD, with or without FAKD) from a trained teacher.

    Example: [bold]fakd-deploy distill recipes/quickstart.yaml --variant fakd_kd[/bold]
    """
    with reported():
        from fakd_deploy.pipeline import distill as distill_students

        result = distill_students(recipe, variant, teacher, out, set_, force)
        for path in result.checkpoints:
            results.print(f"checkpoint: {path}")
        finish(result.folder, result.ran, result.skipped, result.written)


MergeOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--merge",
        metavar="SCORES",
        help="study/scores.json of another folder of this study (another machine's seeds, or "
        "an earlier session's): its runs with the same inputs and teacher weights are taken, "
        "not trained. Repeatable.",
    ),
]


@app.command(cls=Command)
def study(
    recipe: RecipeArg,
    out: OutOpt = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
    merge: MergeOpt = None,
) -> None:
    """Sweep a recipe's study section over seeds and FAKD settings, with paired statistics.

    The teacher is trained once, then every variant x seed x (lam0, bound) point of the
    recipe's `study` section; paired statistics against the baseline and each FAKD
    variant's plain loss, last and best checkpoints, held-out test scores, the
    pre-registered headline: study.{json,csv,md,png}, and every run's scores in
    study/scores.json, which `--merge` reads elsewhere.

    Example: [bold]fakd-deploy study recipes/camvid_study.yaml --out runs/study[/bold]
    """
    with reported():
        from fakd_deploy.study import run_study
        from fakd_deploy.study_report import headline_lines, study_table

        result = run_study(recipe, out, set_, force, merge or [])
        if "rows" in result:  # under torchrun, rank 0 scores and reports
            results.print(study_table(result))
            for line in headline_lines(result):
                results.print(f"headline: {line}", markup=False)
            if result["taken"]:
                results.print(f"taken from --merge: {len(result['taken'])} run(s)", markup=False)
            finish(result["folder"], result["ran"], result["skipped"], result["written"])
        else:
            say(f"done: {result['folder']}", "green")


@app.command("evaluate", cls=Command)
def evaluate_cmd(
    model: ModelArg,
    recipe: ModelRecipeOpt = None,
    set_: SetOpt = None,
    split: Annotated[
        str | None, typer.Option(metavar="NAME", help="Split to score (default: data.val_split).")
    ] = None,
    max_images: Annotated[
        int | None, typer.Option(min=1, metavar="N", help="Score only the first N images.")
    ] = None,
    backend: BackendOpt = None,
    threads: ThreadsOpt = None,
    json_out: Annotated[
        Path | None,
        typer.Option(
            "--json",
            metavar="FILE",
            help="Also write the result (mIoU, per-class IoU, confusion matrix) here, and the "
            "normalised confusion matrix as FILE's name with .confusion.png.",
        ),
    ] = None,
) -> None:
    """mIoU, per-class IoU and the confusion matrix of any model on its recipe's val split.

    Example: [bold]fakd-deploy evaluate runs/quickstart/deploy/fakd_kd.int8.onnx --json eval.json[/bold]
    """
    with reported():
        from fakd_deploy.commands import evaluate_file, most_confused
        from fakd_deploy.tables import evaluation_headline, evaluation_table

        result = evaluate_file(model, recipe, set_ or [], split, max_images, backend, threads, json_out)
        results.print(evaluation_headline(result), soft_wrap=True)
        results.print(evaluation_table(result, result.get("class_names")))
        for line in most_confused(result):
            results.print(line, soft_wrap=True)
        for path in result.get("written", []):
            say(f"wrote {path}")


@app.command(cls=Command)
def export(
    checkpoint: Annotated[Path, typer.Argument(metavar="CHECKPOINT", help="Student checkpoint (.pt).")],
    out: Annotated[
        Path | None, typer.Option(metavar="FILE", help="ONNX file (default: beside the checkpoint).")
    ] = None,
    set_: SetOpt = None,
    height: Annotated[
        int | None, typer.Option(min=1, metavar="N", help="Input height (deploy.export.height).")
    ] = None,
    width: Annotated[
        int | None, typer.Option(min=1, metavar="N", help="Input width (deploy.export.width).")
    ] = None,
    batch: Annotated[int | None, typer.Option(min=1, metavar="N", help="Batch size in the graph.")] = None,
    dynamic: Annotated[bool | None, typer.Option(help="Dynamic batch dimension.")] = None,
    opset: Annotated[int | None, typer.Option(metavar="N", help="ONNX opset (13-23).")] = None,
    argmax: Annotated[bool | None, typer.Option(help="Output labels instead of logits.")] = None,
    input_mode: Annotated[
        str | None,
        typer.Option(
            "--input",
            metavar="MODE",
            help="What the model takes: float (normalised), pixels (0-255, normalised inside) or "
            "uint8 (N, H, W, 3) (deploy.export.input).",
        ),
    ] = None,
    labels: Annotated[
        str | None, typer.Option(metavar="TYPE", help="Label type of an --argmax model: int32 or uint8.")
    ] = None,
    tolerance: Annotated[
        float | None, typer.Option(metavar="X", help="Max abs logit difference allowed.")
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", metavar="FILE", help="Also write the report here.")
    ] = None,
) -> None:
    """Export a student to ONNX and check it against PyTorch on validation images.

    The graph holds the upsampling to the input size; the recipe's deploy.export settings
    apply, and each option overrides one of them.

    Example: [bold]fakd-deploy export runs/quickstart/students/fakd_kd_s0/best.pt --out s.onnx[/bold]
    """
    with reported():
        from fakd_deploy.commands import check_json_target
        from fakd_deploy.deploy.export import export_checkpoint, export_summary
        from fakd_deploy.utils import save_json

        check_json_target(json_out, checkpoint)
        options = {
            "height": height,
            "width": width,
            "batch": batch,
            "dynamic": dynamic,
            "opset": opset,
            "argmax": argmax,
            "input": input_mode,
            "labels": labels,
            "tolerance": tolerance,
        }
        overrides = [
            *(set_ or []),
            *(
                f"deploy.export.{key}={json.dumps(value)}"
                for key, value in options.items()
                if value is not None
            ),
        ]
        report = export_checkpoint(checkpoint, out, overrides)
        for line in export_summary(report):
            results.print(line, soft_wrap=True, highlight=False, markup=False)
        if json_out is not None:
            save_json(report, json_out)


@app.command(cls=Command)
def build(
    onnx: Annotated[Path, typer.Argument(metavar="ONNX", help="FP32 ONNX model from `export`.")],
    backend: Annotated[
        str,
        typer.Option(
            metavar="NAME",
            help="ort-cpu-fp32 | ort-cpu-int8 | ort-cuda-fp32 | ort-cuda-fp16 | ort-trt-fp16 | "
            "ort-trt-int8 | trt-fp32 | trt-fp16 | trt-int8 (ort-fp32, ort-int8: the CPU ones).",
        ),
    ] = "ort-cpu-int8",
    calib: Annotated[
        int | None, typer.Option(min=1, metavar="N", help="INT8 calibration images (deploy.calib).")
    ] = None,
    calib_method: Annotated[
        str | None,
        typer.Option(metavar="NAME", help="minmax | entropy | percentile (deploy.calib_method)."),
    ] = None,
    recipe: Annotated[
        Path | None,
        typer.Option(
            metavar="FILE", help="Recipe for calibration data (default: the one stored in the model)."
        ),
    ] = None,
    set_: SetOpt = None,
) -> None:
    """Build an inference artifact for one backend from an exported ONNX model.

    Example: [bold]fakd-deploy build runs/quickstart/deploy/fakd_kd.onnx --backend ort-cpu-int8[/bold]
    """
    with reported():
        from fakd_deploy.commands import build_file

        overrides = [
            *(set_ or []),
            *([f"deploy.calib={calib}"] if calib else []),
            *([f"deploy.calib_method={calib_method}"] if calib_method else []),
        ]
        results.print(f"built: {build_file(onnx, backend, recipe, overrides)}")


@app.command("bench", cls=Command)
def bench_cmd(
    paths: Annotated[
        list[Path],
        typer.Argument(metavar="RUN_OR_MODELS", help="A run folder written by `run`, or model files."),
    ],
    backends: Annotated[
        list[str] | None,
        typer.Option(
            metavar="NAMES",
            help="Only these rows: pytorch and backend names, e.g. pytorch,ort-cpu-int8,trt-fp16 "
            "(repeat the option or separate with commas). Each model keeps its reference row.",
        ),
    ] = None,
    recipe: ModelRecipeOpt = None,
    set_: SetOpt = None,
    out: Annotated[
        Path | None,
        typer.Option(
            metavar="DIR", help="Folder for the report files (default: the run folder, else ./bench)."
        ),
    ] = None,
    batch: Annotated[int | None, typer.Option(min=1, metavar="N", help="Batch size for throughput.")] = None,
    threads: ThreadsOpt = None,
    iters: Annotated[
        int | None, typer.Option(min=1, metavar="N", help="Timed calls per row (default: --seconds).")
    ] = None,
    seconds: Annotated[
        float | None,
        typer.Option(min=0.0, metavar="S", help="Seconds of timing per row, all rounds together."),
    ] = None,
    rounds: Annotated[
        int | None,
        typer.Option(
            min=1, metavar="N", help="Interleaved timing rounds: every row once per round (bench.rounds)."
        ),
    ] = None,
    max_spread: Annotated[
        float | None,
        typer.Option(
            min=0.0, metavar="PCT", help="Flag rows whose median moves more than this between rounds."
        ),
    ] = None,
    warmup: Annotated[
        float | None, typer.Option(min=0.0, metavar="S", help="Seconds of warm-up before timing.")
    ] = None,
    tolerance: Annotated[
        float | None, typer.Option(min=0.0, metavar="MIOU", help="Allowed mIoU change against the reference.")
    ] = None,
    max_images: Annotated[
        int | None, typer.Option(min=1, metavar="N", help="Score only the first N images.")
    ] = None,
    pick: Annotated[
        bool | None,
        typer.Option(
            "--pick",
            help="Choose the fastest ONNX model or engine within --tolerance per device: "
            "deploy/choice.json (bench.pick).",
        ),
    ] = None,
    compare: Annotated[
        int | None,
        typer.Option(
            min=0,
            metavar="N",
            help="Draw N validation images per backend, pixels that differ from the reference "
            "highlighted: report.compare.png (bench.compare).",
        ),
    ] = None,
) -> None:
    """Latency and mIoU of every model and engine of a run, in one table and report.html.

    Rows are timed in interleaved rounds; unstable timings, INT8 rows no faster than FP32
    and ties inside the noise are flagged. Files: report.json, .csv, .md, .html, .png,
    report.confusion.png, report.compare.png (--compare), deploy/choice.json (--pick).

    Example: [bold]fakd-deploy bench runs/quickstart --pick --compare 4[/bold]
    """
    with reported():
        from fakd_deploy.deploy.bench import bench
        from fakd_deploy.progress import files_lines

        result, written = bench(
            paths,
            backends,
            recipe,
            set_,
            out,
            batch=batch,
            threads=threads,
            iters=iters,
            seconds=seconds,
            rounds=rounds,
            max_spread=max_spread,
            warmup_s=warmup,
            tolerance=tolerance,
            max_images=max_images,
            pick=pick,
            compare=compare,
        )
        show_bench(result)
        root = paths[0] if len(paths) == 1 and paths[0].is_dir() else None
        for line in files_lines(list(written.values()), root):
            say(line)


@app.command(cls=Command)
def package(
    run_folder: Annotated[Path, typer.Argument(help="A run folder written by `run`.")],
    out: Annotated[
        Path | None, typer.Option(help="Bundle folder (default: RUN/bundle); replaced if it is a bundle.")
    ] = None,
    model: Annotated[
        Path | None,
        typer.Option(help="Ship this .onnx or .engine instead of the run's deploy/choice.json."),
    ] = None,
    backend: Annotated[
        str | None,
        typer.Option(help="With --model: the backend it is shipped for (default: its natural one)."),
    ] = None,
) -> None:
    """A folder a Jetson or a Triton server runs as is, for the chosen model.

    It holds the model, labels, palette, preprocessing, infer.py, a Triton model folder and a
    DeepStream nvinfer configuration.

    Example: [bold]fakd-deploy package runs/quickstart --out bundle[/bold]
    """
    with reported():
        from fakd_deploy.deploy.package import package as write_bundle

        result = write_bundle(run_folder, out, model, backend)
        results.print(f"bundle: {result['out']} ({result['model']}, {result['backend']})", markup=False)
        for path in result["files"]:
            results.print(f"  {path}", markup=False, highlight=False)


@app.command(cls=Command)
def predict(
    model: ModelArg,
    images: Annotated[
        list[Path], typer.Argument(metavar="IMAGES", help="Image files, or folders of images.")
    ],
    out: Annotated[Path, typer.Option(metavar="DIR", help="Folder for label PNGs and overlays.")] = Path(
        "predictions"
    ),
    backend: BackendOpt = None,
    threads: ThreadsOpt = None,
    overlay: Annotated[
        bool,
        typer.Option(
            "--overlay/--no-overlay",
            help="Also write the mask blended over the image, with a legend of the classes present.",
        ),
    ] = True,
) -> None:
    """Label PNGs and colour overlays from any backend, to see what the engine sees.

    Outputs are named <image>.<model>.<backend>.labels.png and .overlay.png, in the colours
    of the model's dataset; nothing is ever written over an input.

    Example: [bold]fakd-deploy predict runs/quickstart/deploy/fakd_kd.int8.onnx images/ --out pred[/bold]
    """
    with reported():
        from fakd_deploy.deploy.predict import predict as run_predict

        for path in run_predict(model, images, out, backend, threads=threads, overlay=overlay):
            results.print(str(path))


def parse_size(size: str) -> tuple[int, int]:
    parts = size.lower().split("x")
    if len(parts) != 2 or not all(part.isdigit() and int(part) > 0 for part in parts):
        raise BadInput(f"--size must look like HxW, e.g. 512x1024, not '{size}'")
    return int(parts[0]), int(parts[1])


@app.command(cls=Command)
def models(
    size: Annotated[str, typer.Option(metavar="HxW", help="Input size for GFLOPs.")] = "512x1024",
) -> None:
    """List the model zoo with parameters and GFLOPs.

    Example: [bold]fakd-deploy models --size 360x480[/bold]
    """
    with reported():
        from fakd_deploy.models.zoo import list_models, models_table

        results.print(models_table(list_models(input_size=parse_size(size))))


@data_app.command("check", cls=Command)
def data_check(
    name: Annotated[
        str, typer.Argument(metavar="DATASET", help="camvid | cityscapes | ade20k | voc | folder | synthetic")
    ],
    root: Annotated[
        Path | None, typer.Argument(metavar="ROOT", help="Dataset root folder (none for synthetic).")
    ] = None,
    max_images: Annotated[
        int | None, typer.Option(min=1, metavar="N", help="Scan only N images per split.")
    ] = None,
) -> None:
    """Counts per split, image sizes and class pixel frequencies.

    Example: [bold]fakd-deploy data check camvid ../shared/datasets/camvid[/bold]
    """
    with reported():
        from fakd_deploy.data.check import summarize, summary_tables

        for table in summary_tables(summarize(name, root, max_images=max_images)):
            results.print(table)
