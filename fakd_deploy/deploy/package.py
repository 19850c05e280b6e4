"""`fakd-deploy package RUN --out DIR`: one folder that a Jetson or a Triton server runs as is.

The bundle holds the chosen model (by default the one `bench --pick` wrote to
`deploy/choice.json`; `--model FILE` names another), the exported FP32 model it was made
from (and, for INT8, the Q/DQ model a TensorRT engine is rebuilt from on the target),
`labels.txt`, `palette.json`, `preprocess.json` (what the model takes), `infer.py` (a
standalone script: numpy, Pillow, onnxruntime or TensorRT), a Triton model folder
(`triton.py`) and a DeepStream nvinfer configuration with the model it needs
(`deepstream.py`), and a README. `bundle.json` records what was packaged from where.

The folder is built beside `--out` and renamed into place, so a failure leaves no half
bundle; nothing is written outside it. An existing `--out` is replaced only when it is
empty or holds nothing but an earlier bundle: its `bundle.json` as `package` writes it and
the files that lists, unchanged. Anything else in it (masks `infer.py` wrote there, the
engine nvinfer built beside its config, an edited file) is the user's, so the folder is
refused by name instead. The earlier bundle is checked before anything moves; then it is
set aside (`.NAME.<random>.tmp.old`) and the new one renamed in, and any failure or signal
puts it back. One a kill -9 left set aside is put back by the next `package` when `--out`
is missing, and removed once a new bundle is in place. Inside the run folder the bundle
goes to `RUN/bundle`, under the run folder's lock.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import onnx

from fakd_deploy import __version__
from fakd_deploy.artifacts import Artifact, ModelInfo
from fakd_deploy.data.preprocess import resize_bilinear
from fakd_deploy.deploy import deepstream, triton
from fakd_deploy.deploy.backends import Backend, model_stem, resolve_backend, runs_artifact
from fakd_deploy.deploy.inputs import graph_input, pixels_from_normalised
from fakd_deploy.deploy.onnx_meta import load_onnx
from fakd_deploy.deploy.predict import colours_of
from fakd_deploy.errors import ArtifactError, BadInput, StageFailed
from fakd_deploy.inputs import MAX_YAML_BYTES, parse_json, read_text
from fakd_deploy.runfolder import RunFolder, RunLock
from fakd_deploy.utils import file_sha256, no_links

MARKER = "bundle.json"
MANIFEST_KEYS = ("fakd_deploy_version", "run", "model", "backend", "chosen_by", "checks", "files")
CHOICE = "choice.json"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
CHECK_IMAGES = 4
PROBABILITY_TOLERANCE = 1e-4
ONNX_TYPES = {1: "float32", 10: "float16", 2: "uint8", 6: "int32", 7: "int64"}
TRT_TYPES = {"FLOAT": "float32", "HALF": "float16", "UINT8": "uint8", "INT32": "int32", "INT64": "int64"}
INFER_TEMPLATE = Path(__file__).with_name("bundle_infer.py")
PNG_CLASSES = 256  # what an 8-bit label PNG (infer.py's, predict's) can hold

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Picked:
    """The model to ship, the backend it was chosen for, and who chose it."""

    path: Path
    backend: Backend
    how: str


def read_choice(run: RunFolder) -> Picked:
    """`deploy/choice.json` as `bench --pick` writes it: `file` (relative to the run folder),
    `backend` and `sha256` of the chosen model; the file must still be that file."""
    path = run.deploy / CHOICE
    remedy = f"; pick again with `fakd-deploy bench {run.root} --pick`"
    choice = parse_json(read_text(no_links(path), "choice", MAX_YAML_BYTES), str(path), remedy=remedy)
    if not isinstance(choice, dict) or not isinstance(choice.get("file"), str):
        raise BadInput(f"{path}: expected a mapping with 'file', 'backend' and 'sha256'")
    try:
        model = run.inside(*Path(choice["file"]).parts)
        backend = resolve_backend(str(choice.get("backend")))
    except BadInput as error:
        raise BadInput(f"{path}: {error}; pick again with `fakd-deploy bench {run.root} --pick`") from None
    if not model.is_file():
        raise BadInput(f"{path} names {choice['file']}, which is not in {run.root}")
    sha = choice.get("sha256")
    if sha is not None and sha != file_sha256(model):
        raise BadInput(
            f"{model} changed since it was picked ({path} records another sha256): pick again with "
            f"`fakd-deploy bench {run.root} --pick`"
        )
    return Picked(model, backend, str(path))


def pick(run: RunFolder, model: Path | None, backend: str | None) -> Picked:
    """`--model` (with `--backend`, else the backend natural for the file), else the run's choice."""
    if model is not None:
        from fakd_deploy.deploy.runtime import backend_for

        return Picked(model, backend_for(Artifact.open(model), backend), "--model")
    if backend is not None:
        raise BadInput("--backend goes with --model; without it the run's choice decides")
    if not (run.deploy / CHOICE).is_file():
        raise BadInput(
            f"{run.root} has no deploy/{CHOICE}: pick the model with `fakd-deploy bench {run.root} --pick`, "
            "or name one with --model FILE"
        )
    return read_choice(run)


def source_stem(path: Path) -> str:
    """`kd` for kd.onnx, kd.int8.onnx, kd.qdq.onnx, kd.fp16.engine: the export everything came from."""
    if path.name.endswith(".engine"):
        return model_stem(path.name.removesuffix(".engine").rsplit(".", 1)[0] + ".onnx")
    return model_stem(path)


def _tensor_from_graph(value: Any) -> triton.Tensor:
    tensor = value.type.tensor_type
    dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim)
    return triton.Tensor(value.name, ONNX_TYPES.get(tensor.elem_type, "float32"), dims)


def io_tensors(artifact: Artifact) -> tuple[triton.Tensor, triton.Tensor]:
    """The image input and the output of an ONNX model (its graph) or engine (its sidecar)."""
    if artifact.kind == "onnx":
        return _tensor_from_graph(graph_input(artifact.graph)), _tensor_from_graph(
            artifact.graph.graph.output[0]
        )
    entries = [artifact.source.get(key) for key in ("inputs", "outputs")]
    if not all(isinstance(e, list) and e and isinstance(e[0], dict) for e in entries):
        raise ArtifactError(f"{artifact.path}: its sidecar lists no 'inputs' and 'outputs'")
    found = []
    for entry in (entries[0][0], entries[1][0]):
        dtype = TRT_TYPES.get(str(entry.get("dtype", "")).rsplit(".", 1)[-1])
        if dtype is None:
            raise ArtifactError(f"{artifact.path}: its sidecar gives tensor type {entry.get('dtype')!r}")
        found.append(triton.Tensor(str(entry["name"]), dtype, tuple(int(d) for d in entry["shape"])))
    return found[0], found[1]


def check_out(out: Path, run: RunFolder) -> bool:
    """Refuse an --out that would overwrite something else; True when it is inside the run."""
    if out.is_symlink():
        raise BadInput(f"--out {out} is a symbolic link; give the folder itself")
    target, root = out.resolve(), run.root.resolve()
    inside = target.is_relative_to(root)
    if inside and target != (root / "bundle"):
        raise BadInput(
            f"--out {out} is inside the run folder {run.root}; a bundle there goes to {run.root}/bundle"
        )
    if root.is_relative_to(target):
        raise BadInput(f"--out {out} holds the run folder {run.root}; give a folder of its own")
    if out.exists():
        if not out.is_dir():
            raise BadInput(f"--out {out} is a file; a bundle is a folder")
        check_replaceable(out, out)
    return inside


def written_files(marker: Path, out: Path) -> dict[str, str]:
    """The files (relative path: sha256) that a `bundle.json` as `package` writes lists."""
    text = read_text(marker, "bundle manifest", MAX_YAML_BYTES)
    try:
        manifest = parse_json(text, str(marker))
    except BadInput:  # not the JSON `package` writes, said below
        manifest = None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if (
        not isinstance(manifest, dict)
        or not all(key in manifest for key in MANIFEST_KEYS)
        or not isinstance(files, dict)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items())
    ):
        raise BadInput(
            f"--out {out} is not a bundle: its {MARKER} is not the JSON `package` writes "
            f"(a mapping with {', '.join(MANIFEST_KEYS)}); give a new or empty folder"
        )
    return files


def check_replaceable(folder: Path, out: Path) -> None:
    """Refuse to replace `folder` (named `out` to the user) unless it is empty or holds only
    the files its bundle.json lists, unchanged, and the folders they are in: replacing it
    deletes everything in it."""
    if not any(folder.iterdir()):
        return
    marker = folder / MARKER
    if marker.is_symlink() or not marker.is_file():
        raise BadInput(f"--out {out} exists and is not a bundle (no {MARKER}); give a new or empty folder")
    files = written_files(marker, out)
    parents = {str(p) for path in files for p in PurePosixPath(path).parents} - {"."}
    entries = []
    for root, dirs, names in os.walk(folder):
        base = PurePosixPath(Path(root).relative_to(folder).as_posix())
        entries += [str(base / name) for name in [*dirs, *names]]
        dirs[:] = [d for d in dirs if str(base / d) in parents]
    for entry in sorted(entries):
        path = folder / entry
        if entry == MARKER or (entry in parents and path.is_dir() and not path.is_symlink()):
            continue
        if entry not in files or path.is_symlink() or not path.is_file():
            raise BadInput(
                f"--out {out} holds {entry}, which the bundle did not write: move it or choose another --out"
            )
        if file_sha256(path) != files[entry]:
            raise BadInput(
                f"--out {out} holds {entry}, which changed since the bundle wrote it: "
                "move it or choose another --out"
            )


def listing(folder: Path) -> dict[str, tuple[int, int]]:
    """Every entry below `folder` with its size and modification time: cheap to compare, so a
    file written after the (hashing) check is seen without hashing again."""
    found = {}
    for root, dirs, names in os.walk(folder):
        for name in [*dirs, *names]:
            info = os.lstat(os.path.join(root, name))
            found[os.path.relpath(os.path.join(root, name), folder)] = (info.st_size, info.st_mtime_ns)
    return found


def set_aside(out: Path) -> list[Path]:
    """Earlier bundles that a killed `package` left beside `out` (`staged`'s `.old` names)."""
    name = re.compile(rf"^\.{re.escape(out.name)}\.[a-z0-9_]{{8}}\.tmp\.old$")
    found = (path for path in out.parent.iterdir() if name.match(path.name))
    return sorted(path for path in found if path.is_dir() and not path.is_symlink())


def recover(out: Path) -> list[Path]:
    """Put back the bundle a kill left set aside when `out` is missing (so that a failure of
    this run still leaves it at `out`); the set-aside bundles left when `out` is there."""
    found = set_aside(out)
    if not found or os.path.lexists(out):
        return found
    if len(found) > 1:
        raise BadInput(
            f"--out {out} is missing and interrupted runs left {len(found)} earlier bundles beside it "
            f"({', '.join(p.name for p in found)}): rename the one to keep to {out.name}"
        )
    found[0].rename(out)
    return []


def remove_set_aside(found: list[Path], out: Path) -> None:
    """Delete the bundles a kill left set aside, now that a new one is at `out`; one holding
    anything the bundle did not write is the user's, and kept."""
    for path in found:
        try:
            check_replaceable(path, out)
        except BadInput as why:
            log.warning("%s was kept: %s", path, why)
            continue
        shutil.rmtree(path)


@contextlib.contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A new folder beside `out`, renamed to `out` when the block succeeds, removed otherwise.

    An existing `out` is checked (hashed) before anything moves, so the swap itself is two
    renames, and any failure or signal (`Stopped`, `Interrupted`) puts it back. If anything
    was written into it between the check and the swap, it is checked again and, unless
    still replaceable, put back, so nothing written into it while the bundle was built is lost."""
    out.parent.mkdir(parents=True, exist_ok=True)
    found = recover(out)
    stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    old = Path(f"{stage}.old")
    try:
        yield stage
        checked = None
        if out.exists():
            checked = listing(out)  # taken first: what is written while it is hashed shows too
            check_replaceable(out, out)
            out.rename(old)
        stage.rename(out)
        if checked is not None and listing(old) != checked:
            try:
                check_replaceable(old, out)
            except BadInput:
                out.rename(stage)
                raise
    finally:
        if old.exists() and not os.path.lexists(out):
            old.rename(out)  # any failure or signal: the previous bundle back at --out
        if stage.exists():
            shutil.rmtree(stage)
    if old.exists():
        shutil.rmtree(old)
    remove_set_aside(found, out)


def _copy(source: Path, stage: Path, *parts: str) -> str:
    target = stage.joinpath(*parts)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return "/".join(parts)


def _providers(backend: Backend, model: Path) -> list[str]:
    if backend.engine:
        return []
    from fakd_deploy.deploy.ort import provider_options

    return [name for name, _ in provider_options(backend.provider or "", model, backend.precision)]


def preprocess_spec(
    model_name: str, picked: Picked, info: ModelInfo, inputs: triton.Tensor, output: triton.Tensor, meta: dict
) -> dict[str, Any]:
    """preprocess.json: everything infer.py, Triton clients and DeepStream need to feed the model."""
    normalise = info.normalise
    batch = inputs.shape[0] if inputs.shape[0] > 0 else None
    return {
        "model": model_name,
        "runtime": "tensorrt" if picked.backend.engine else "onnxruntime",
        "backend": picked.backend.name,
        "providers": _providers(picked.backend, picked.path),
        "precision": picked.backend.precision,
        "input": info.input,
        "input_name": inputs.name,
        "input_dtype": inputs.dtype,
        "input_shape": list(inputs.shape),
        "layout": "NHWC" if info.input == "uint8" else "NCHW",
        "channel_order": "RGB",
        "input_size": list(info.input_size or ()),
        "batch": batch,
        "pixel_scale": normalise.pixel_scale,
        "mean": list(normalise.mean),
        "std": list(normalise.std),
        "normalisation": (
            "(x / pixel_scale - mean) / std per channel, before the model"
            if info.input == "float"
            else "inside the model: feed RGB pixel values 0-255"
        ),
        "resize": "bilinear, half-pixel centres (align_corners=False), no antialiasing",
        "output": meta.get("output", "logits"),
        "output_name": output.name,
        "output_dtype": output.dtype,
        "output_shape": list(output.shape),
        "num_classes": info.num_classes,
    }


def check_deepstream(
    model: onnx.ModelProto,
    prep: deepstream.NvinferInput,
    reference: Path,
    images: np.ndarray,
    size: tuple[int, int],
) -> dict[str, float]:
    """nvinfer's formula then the DeepStream model, against the exported model on the same images.

    `images` are normalised (N, 3, H, W) validation images; both sides see them at the
    model's input size. Fails unless the classes agree and the probabilities match the
    softmax of the exported model's logits within `PROBABILITY_TOLERANCE`.
    """
    from fakd_deploy.deploy.ort import OrtPredictor
    from fakd_deploy.deploy.runtime import open_predictor

    images = resize_bilinear(images, size)
    expected, info = open_predictor(reference)
    want = expected(images)
    got = OrtPredictor(model.SerializeToString())(prep.apply(pixels_from_normalised(images, info.normalise)))
    labels = want if want.ndim == 3 else want.argmax(1)
    agreement = float((got.argmax(1) == labels).mean())
    report = {"argmax_agreement": agreement, "images": float(len(images))}
    if want.ndim == 4:
        shifted = np.exp(want - want.max(1, keepdims=True))
        report["max_probability_diff"] = float(np.abs(shifted / shifted.sum(1, keepdims=True) - got).max())
    if agreement < 0.999 or report.get("max_probability_diff", 0.0) > PROBABILITY_TOLERANCE:
        raise StageFailed(
            f"the DeepStream model does not reproduce {reference.name} under nvinfer's preprocessing "
            f"(agreement {100 * agreement:.3f} %, {report}); no bundle was written"
        )
    return report


TRTEXEC_FLAGS = {"fp32": "--noTF32", "fp16": "--fp16", "int8": "--int8 --fp16"}


def _readme(
    name: str, spec: dict[str, Any], picked: Picked, shipped: dict[str, str], notes: list[str], streams: bool
) -> str:
    """The bundle's README: what each file is and how to run it, with this model's values."""
    model = spec["model"]
    lines = [
        f"# {name}: a segmentation model bundle",
        "",
        f"Written by fakd-deploy {__version__} `package` from `{picked.path.name}` "
        f"(backend `{picked.backend.name}`, {picked.backend.precision.upper()}; chosen by {picked.how}).",
        "",
        "| file | what it is |",
        "|---|---|",
        *(f"| `{path}` | {what} |" for path, what in shipped.items()),
        "",
        "## Run it",
        "",
        "```bash",
        "python infer.py IMAGE_OR_FOLDER --out masks   # numpy, Pillow and "
        + ("TensorRT + cuda-python" if spec["runtime"] == "tensorrt" else "onnxruntime"),
        "```",
        "",
        f"The model takes `{spec['input_name']}`: {spec['input_dtype']} {spec['layout']} "
        f"{spec['input_shape']} (-1: any batch), RGB; {spec['normalisation']}. It returns "
        f"`{spec['output_name']}` ({spec['output']}, {spec['output_dtype']}, {spec['output_shape']}). "
        "`preprocess.json` has every number.",
        "",
        "## Triton",
        "",
        "```bash",
        "tritonserver --model-repository $PWD/triton",
        "```",
        "",
        f"`triton/{name}/config.pbtxt` declares the inputs, outputs, types, dims and batching of "
        f"`triton/{name}/1/{triton.model_file(picked.backend)}`.",
    ]
    if picked.backend.engine:
        lines += [
            "",
            "A TensorRT engine runs only on the GPU model and TensorRT version that built it "
            f"(`{model}.json` says which). Elsewhere, rebuild it from the ONNX model beside it, e.g.",
            "",
            "```bash",
            f"trtexec --onnx={spec['rebuild_from']} --saveEngine={model} "
            f"{TRTEXEC_FLAGS[picked.backend.precision]}",
            "```",
        ]
    lines += ["", "## DeepStream", ""]
    if streams:
        lines += [
            "```bash",
            "gst-launch-1.0 filesrc location=video.mp4 ! qtdemux ! h264parse ! nvv4l2decoder ! m.sink_0 \\",
            "  nvstreammux name=m batch-size=1 width=1280 height=720 ! \\",
            f"  nvinfer config-file-path=deepstream/config_infer_{name}.txt ! \\",
            "  nvsegvisual width=1280 height=720 ! nv3dsink",
            "```",
            "",
            "nvinfer builds its engine from the ONNX model on the first start and writes it beside the "
            "config (`model-engine-file`), so later starts load it.",
        ]
    lines += ["", "## Notes", "", *(f"- {note}" for note in notes), ""]
    return "\n".join(lines)


def package(
    run_dir: Path, out: Path | None = None, model: Path | None = None, backend: str | None = None
) -> dict[str, Any]:
    """Write the bundle of a run's chosen model (or `model`) to `out` (default RUN/bundle)."""
    run = RunFolder(run_dir)
    if not run.recipe.is_file():
        raise BadInput(f"{run.root} has no recipe.yaml; is it a run folder written by `run`?")
    out = out or run.root / "bundle"
    picked = pick(run, model, backend)
    inside = check_out(out, run)
    with RunLock(run) if inside else contextlib.nullcontext():
        return _write_bundle(run, picked, out)


def _write_bundle(run: RunFolder, picked: Picked, out: Path) -> dict[str, Any]:
    from fakd_deploy.data.splits import ValBatches
    from fakd_deploy.recipe import load_recipe

    artifact = Artifact.open(picked.path)
    if artifact.kind == "checkpoint":
        raise BadInput(f"{picked.path} is a checkpoint: package ships exported models (.onnx, .engine)")
    if not runs_artifact(picked.backend, picked.path):
        raise BadInput(f"{picked.path.name} is not the file {picked.backend.name} runs")
    name = source_stem(picked.path)
    if not NAME.match(name):
        raise BadInput(
            f"model name '{name}' (from {picked.path.name}) must be letters, digits, '_', '.', '+' or '-'"
        )
    info = ModelInfo.from_metadata(artifact.metadata, None, picked.path)
    inputs, output = io_tensors(artifact)
    fp32 = picked.path.with_name(f"{name}.onnx")
    qdq = picked.path.with_name(f"{name}.qdq.onnx")
    spec = preprocess_spec(picked.path.name, picked, info, inputs, output, artifact.metadata)
    notes: list[str] = []
    recipe = load_recipe(run.recipe)
    with staged(out) as stage:
        shipped = {_copy(picked.path, stage, picked.path.name): f"the model ({picked.backend.name})"}
        if artifact.kind == "engine":
            sidecar = picked.path.with_name(picked.path.name + ".json")
            shipped[_copy(sidecar, stage, sidecar.name)] = "where and how the engine was built"
        rebuild = qdq if picked.backend.precision == "int8" and qdq.is_file() else fp32
        for extra, what in (
            (fp32, "the exported FP32 model"),
            (qdq, "the INT8 Q/DQ model TensorRT builds from"),
        ):
            if (
                extra.is_file()
                and extra != picked.path
                and (extra == fp32 or picked.backend.precision == "int8")
            ):
                shipped[_copy(extra, stage, extra.name)] = what
        spec["rebuild_from"] = rebuild.name if rebuild.is_file() else None
        names = info.class_names or [f"class_{i}" for i in range(info.num_classes or 0)]
        if len(names) > PNG_CLASSES:
            notes.append(
                f"This model has {len(names)} classes; `infer.py` (like `fakd-deploy predict`) writes "
                f"8-bit label PNGs, so an image where a class id above {PNG_CLASSES - 1} wins is refused "
                "(exit 2) rather than written wrong."
            )
        colours = colours_of(artifact, max(len(names), 1))
        (stage / "labels.txt").write_text("".join(f"{n}\n" for n in names))
        shipped["labels.txt"] = "class names, one per line, in class-id order"
        palette_doc = {
            "classes": [{"id": i, "name": n, "rgb": colours[i].tolist()} for i, n in enumerate(names)]
        }
        (stage / "palette.json").write_text(json.dumps(palette_doc, indent=2) + "\n")
        shipped["palette.json"] = "the colour of each class in the masks"
        (stage / "preprocess.json").write_text(json.dumps(spec, indent=2) + "\n")
        shipped["preprocess.json"] = "what the model takes and returns"
        shutil.copyfile(INFER_TEMPLATE, stage / "infer.py")
        shipped["infer.py"] = "`python infer.py IMAGE_OR_FOLDER --out DIR`: colour masks"
        config = triton.config_pbtxt(name, picked.backend, inputs, output)
        shipped[_copy(picked.path, stage, "triton", name, "1", triton.model_file(picked.backend))] = (
            "the model, where Triton looks for it"
        )
        (stage / "triton" / name / "config.pbtxt").write_text(config)
        shipped[f"triton/{name}/config.pbtxt"] = "Triton model configuration"
        checks: dict[str, Any] = {}
        if fp32.is_file():
            source = Artifact.open(fp32)
            source_info = ModelInfo.from_metadata(source.metadata, None, fp32)
            ds_model, prep = deepstream.deepstream_model(load_onnx(fp32), source_info)
            size = source_info.input_size or (0, 0)
            images = np.concatenate([b for b, _ in ValBatches(recipe.data, max_images=CHECK_IMAGES)])
            checks["deepstream"] = check_deepstream(ds_model, prep, fp32, images, size)
            ds_file = f"{name}.deepstream.onnx"
            (stage / "deepstream").mkdir()
            onnx.save_model(ds_model, str(stage / "deepstream" / ds_file))
            batch = inputs.shape[0] if inputs.shape[0] > 0 else 1
            settings = deepstream.NvinferSettings(
                ds_file,
                batch,
                picked.backend.precision,
                info.num_classes or len(names),
                size,
                "../labels.txt",
                prep,
            )
            (stage / "deepstream" / f"config_infer_{name}.txt").write_text(
                deepstream.nvinfer_config(settings)
            )
            shipped[f"deepstream/{ds_file}"] = "the model nvinfer runs: float pixels in, softmax out"
            shipped[f"deepstream/config_infer_{name}.txt"] = "DeepStream nvinfer configuration"
            notes.append(f"DeepStream preprocessing: {prep.note}.")
        else:
            notes.append(
                f"no DeepStream configuration: the exported FP32 model {fp32.name} is not beside the choice"
            )
        notes.append(
            "Verified on CPU when packaged: the DeepStream model under nvinfer's formula against "
            f"the exported model ({checks.get('deepstream')}). Triton and DeepStream themselves "
            "were not run: their configurations follow their documentation."
        )
        streams = f"deepstream/config_infer_{name}.txt" in shipped
        (stage / "README.md").write_text(_readme(name, spec, picked, shipped, notes, streams))
        shipped = {"README.md": "this file", **shipped}
        manifest = {
            "fakd_deploy_version": __version__,
            "run": str(run.root),
            "model": picked.path.name,
            "backend": picked.backend.name,
            "chosen_by": picked.how,
            "checks": checks,
            "files": {path: file_sha256(stage / path) for path in shipped if (stage / path).is_file()},
        }
        (stage / MARKER).write_text(json.dumps(manifest, indent=2) + "\n")
    return {"out": str(out), **manifest}
