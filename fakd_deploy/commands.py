"""What the `evaluate` and `build` commands do, as library functions.

Each resolves its files and recipe once (`Artifact.open`, the stored or given recipe with
`--set` applied), checks what can be checked before work starts, and calls the part that
does the work. They sit above `deploy/`, `models/` and `evaluate`, which never import them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fakd_deploy.artifacts import Artifact, resolve_recipe
from fakd_deploy.data.splits import ValBatches, calibration_images
from fakd_deploy.deploy.backends import resolve_backend
from fakd_deploy.deploy.build import build
from fakd_deploy.deploy.runtime import open_predictor
from fakd_deploy.errors import BadInput
from fakd_deploy.evaluate import evaluate
from fakd_deploy.figures import confusion_figure, has_matplotlib, normalised, png_bytes
from fakd_deploy.recipe import EvalConfig
from fakd_deploy.runfolder import held_around
from fakd_deploy.utils import atomic_write, not_an_input, save_json


def check_classes(artifact: Artifact, data: ValBatches, dataset: str) -> None:
    """A model scored on a dataset with another class count would give a meaningless mIoU."""
    if artifact.num_classes is not None and artifact.num_classes != data.num_classes:
        raise BadInput(
            f"{artifact.path} predicts {artifact.num_classes} classes but the dataset '{dataset}' "
            f"({data.split} split) has {data.num_classes}; score it on the data it was trained for"
        )


def check_json_target(path: Path | None, model: Path) -> None:
    """A `--json` file name that is not a folder and not the model it reports on."""
    if path is not None and (str(path) in ("", ".") or path.is_dir()):
        raise BadInput(f"--json '{path}' is a folder; give a file name, e.g. --json eval.json")
    if path is not None:
        not_an_input(path, [model], "--json")


def evaluate_file(
    model: Path,
    recipe: Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    split: str | None = None,
    max_images: int | None = None,
    backend: str | None = None,
    threads: int | None = None,
    json_out: Path | None = None,
) -> dict[str, Any]:
    """Score any model file on a split of its recipe's dataset (or `recipe`'s), `--set` applied.

    The result names the dataset, its root and the split that were scored, so an override
    that changed them is visible in the answer. With `json_out`, the result (per-class IoU
    and the confusion matrix included) is written there, and the row-normalised confusion
    matrix as a heat map with class names beside it (`<name>.confusion.png`).
    """
    check_json_target(json_out, model)
    artifact = Artifact.open(model)
    cfg = resolve_recipe(artifact, recipe, overrides)
    data = ValBatches(cfg.data, split, max_images=max_images)
    check_classes(artifact, data, cfg.data.name)
    predictor, _ = open_predictor(artifact, backend, cfg.device, threads)
    mode = cfg.eval if artifact.kind == "checkpoint" else EvalConfig()
    result = evaluate(
        predictor,
        data,
        data.num_classes,
        cfg.data.ignore_index,
        mode,
        description=f"evaluate {model.name}",
        total=len(data),
    )
    result = {
        "model": str(model),
        "dataset": cfg.data.name,
        "root": cfg.data.root,
        "split": data.split,
        **result,
        "class_names": data.class_names,
    }
    if json_out is not None:
        with held_around(json_out):
            written = [save_json(result, json_out)]
            if has_matplotlib():
                title = f"{model.name}: confusion matrix, rows normalised ({cfg.data.name} {data.split})"
                figure = confusion_figure(result["confusion_matrix"], data.class_names, title)
                picture = png_bytes(figure)
                written.append(atomic_write(confusion_png(json_out), lambda tmp: tmp.write_bytes(picture)))
        result["written"] = [str(path) for path in written]
    return result


def confusion_png(json_out: Path) -> Path:
    """eval.json -> eval.confusion.png, beside it."""
    return json_out.with_name(f"{json_out.stem}.confusion.png")


def most_confused(result: dict[str, Any], count: int = 3) -> list[str]:
    """The largest off-diagonal shares of the confusion matrix, as lines a person reads:
    `Pole -> Building: 38.2 % of Pole's pixels`."""
    shares = normalised(result["confusion_matrix"])
    names = result.get("class_names") or [str(i) for i in range(len(shares))]
    np.fill_diagonal(shares, 0.0)
    order = np.argsort(shares, axis=None)[::-1][:count]
    pairs = [np.unravel_index(int(i), shares.shape) for i in order]
    return [
        f"most confused: {names[t]} -> {names[p]}: {100 * shares[t, p]:.1f} % of {names[t]}'s pixels"
        for t, p in pairs
        if shares[t, p] > 0
    ]


def build_file(
    onnx_path: Path, backend: str, recipe: Path | None = None, overrides: list[str] | None = None
) -> Path:
    """The `build` command: calibration images (INT8 only) come from the model's stored recipe,
    or `recipe`, with `--set` overrides; FP32 and FP16 builds need no recipe at all."""
    spec = resolve_backend(backend)
    artifact = Artifact.open(onnx_path)
    if spec.precision != "int8" and (recipe is not None or overrides):
        raise BadInput(f"{spec.name} needs no data: --recipe and --set apply to INT8 builds only")
    with held_around(onnx_path):  # the build is written beside the model
        if spec.precision != "int8":
            return build(artifact, spec)
        cfg = resolve_recipe(artifact, recipe, overrides or [])
        return build(
            artifact,
            spec,
            calibration_images(cfg.data, cfg.deploy.calib),
            cfg.deploy.calib_method,
            quantizer=cfg.deploy.quantizer,
        )
