"""Export a student to one self-describing ONNX file and prove that it matches PyTorch.

The exported graph takes normalised images (N, 3, H, W), float pixels or uint8 (N, H, W, 3)
images (`input`, see `deploy.inputs`) and returns logits upsampled to (H, W), or int32 or
uint8 labels with `argmax=True`. Everything a runtime needs to use it (class names,
normalisation, input mode and size) and to trace it back (recipe, checkpoint hash) is
stored in the model's `metadata_props`. Its settings are the recipe's `deploy.export`,
for `run` and for the `export` command alike.
"""

from __future__ import annotations

import io
import logging
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import onnxslim
import torch
import torch.nn.functional as F
from torch import nn

from fakd_deploy import __version__
from fakd_deploy.artifacts import ModelInfo
from fakd_deploy.data import splits
from fakd_deploy.data.preprocess import Normalise
from fakd_deploy.deploy.inputs import (
    add_normalisation,
    cast_labels,
    fold_normalisation,
    layout,
    pixels_from_normalised,
)
from fakd_deploy.deploy.onnx_meta import write_metadata
from fakd_deploy.errors import ArtifactError, ExportError, error_summary
from fakd_deploy.models import Checkpoint
from fakd_deploy.recipe import Recipe
from fakd_deploy.runfolder import held_around
from fakd_deploy.utils import atomic_write, file_sha256, not_an_input, text_sha256

log = logging.getLogger(__name__)

INPUT_NAME = "images"
EXTERNAL_DATA_BYTES = 2**31  # protobuf cannot hold a single file beyond 2 GB
PARITY_IMAGES = 8

ParityBatches = Iterable[np.ndarray | tuple[np.ndarray, ...]]


class DeployModel(nn.Module):
    """The graph users deploy: bilinear upsampling to the input size and optional argmax inside."""

    def __init__(self, model: nn.Module, size: tuple[int, int], argmax: bool = False) -> None:
        super().__init__()
        self.model = model
        self.size = (int(size[0]), int(size[1]))
        self.argmax = argmax

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = F.interpolate(self.model(images), size=self.size, mode="bilinear", align_corners=False)
        return logits.argmax(1) if self.argmax else logits


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """SyncBatchNorm exists for multi-GPU training only; exporters and runtimes want BatchNorm2d."""
    if isinstance(module, nn.SyncBatchNorm):
        plain = nn.BatchNorm2d(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        plain.load_state_dict(module.state_dict())
        return plain
    for name, child in module.named_children():
        reverted = revert_sync_batchnorm(child)
        if reverted is not child:
            setattr(module, name, reverted)
    return module


def checkpoint_metadata(checkpoint: Checkpoint, sha256: str) -> dict[str, Any]:
    """What a runtime needs from a training checkpoint: classes, normalisation, recipe."""
    meta: dict[str, Any] = {
        "checkpoint_sha256": sha256,
        "role": checkpoint.role,
        "variant": checkpoint.variant,
        "arch": checkpoint.arch,
        "class_names": checkpoint.class_names,
    }
    recipe = checkpoint.recipe_config()
    if recipe is not None:
        text = recipe.to_yaml()
        meta.update(
            mean=list(recipe.data.mean),
            std=list(recipe.data.std),
            pixel_scale=recipe.data.pixel_scale,
            ignore_index=recipe.data.ignore_index,
            recipe=text,
            recipe_sha256=text_sha256(text),
        )
    return meta


def load_student(source: str | Path | nn.Module) -> tuple[nn.Module, dict[str, Any], Recipe | None]:
    """The bare student of a checkpoint (teacher, adapters and aux heads are not in `forward`),
    the metadata its ONNX model will carry, and its recipe."""
    if isinstance(source, nn.Module):
        return source, {}, None
    checkpoint = Checkpoint.load(source)
    meta = checkpoint_metadata(checkpoint, file_sha256(source))
    return checkpoint.build(str(source)), meta, checkpoint.recipe_config()


def check_weights(model: nn.Module, source: object) -> None:
    """A model whose weights are not finite, or whose BatchNorm variances are negative,
    predicts NaN: refused before export, naming the tensor."""
    for name, tensor in model.state_dict().items():
        if not tensor.is_floating_point():
            continue
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise ArtifactError(
                f"{source}: weight '{name}' has {bad} non-finite value(s) (NaN or inf); "
                "a model with such weights predicts NaN: retrain or re-import it"
            )
        if name.endswith("running_var") and bool((tensor < 0).any()):
            raise ArtifactError(
                f"{source}: '{name}' (a BatchNorm variance) has negative values; "
                "a model with such statistics predicts NaN: retrain or re-import it"
            )


def _to_onnx(
    wrapper: nn.Module, example: torch.Tensor, dynamic: bool, opset: int, output_name: str
) -> tuple[onnx.ModelProto, str]:
    """The dynamo exporter first; the TorchScript exporter when dynamo cannot trace the model."""
    try:
        shapes = {INPUT_NAME: {0: torch.export.Dim("batch", min=1)}} if dynamic else None
        program = torch.onnx.export(
            wrapper,
            (example,),
            dynamo=True,
            dynamic_shapes=shapes,
            verbose=False,
            input_names=[INPUT_NAME],
            output_names=[output_name],
            opset_version=opset,
        )
        return program.model_proto, "dynamo"  # type: ignore[union-attr]  # None only when dynamo=False
    except Exception as error:
        warnings.warn(
            f"the dynamo ONNX exporter failed ({error_summary(error)}); falling back to "
            "the TorchScript exporter",
            stacklevel=3,
        )
    axes = {INPUT_NAME: {0: "batch"}, output_name: {0: "batch"}} if dynamic else None
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's own deprecation notice
        torch.onnx.export(
            wrapper,
            (example,),
            buffer,  # type: ignore[arg-type]  # the TorchScript exporter also writes to a file object
            dynamo=False,
            dynamic_axes=axes,
            input_names=[INPUT_NAME],
            output_names=[output_name],
            opset_version=opset,
        )
    return onnx.load_from_string(buffer.getvalue()), "torchscript"


def _simplify(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    try:
        return onnxslim.slim(model), True
    except Exception as error:
        warnings.warn(
            f"onnxslim could not simplify the graph ({error_summary(error)}); keeping the exported graph",
            stacklevel=3,
        )
        return model, False


def _save(model: onnx.ModelProto, path: Path, final_name: str) -> None:
    """One file below 2 GB; beyond that the weights go to `<name>.data` beside it."""
    weights = sum(tensor.ByteSize() for tensor in model.graph.initializer)
    large = weights > EXTERNAL_DATA_BYTES
    onnx.save_model(
        model, str(path), save_as_external_data=large, location=f"{final_name}.data" if large else None
    )


def _logits_session(path: Path, argmax: bool) -> tuple[ort.InferenceSession, str]:
    """A CPU session whose last output is the logits, also for argmax exports."""
    if not argmax:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session, session.get_outputs()[0].name
    model = onnx.load(str(path))
    node = next(node for node in model.graph.node if node.op_type == "ArgMax")
    model.graph.output.append(onnx.helper.make_tensor_value_info(node.input[0], onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session, node.input[0]


def _images(batches: ParityBatches, size: tuple[int, int]) -> Iterable[torch.Tensor]:
    for item in batches:
        images = torch.from_numpy(
            np.asarray(item[0] if isinstance(item, tuple | list) else item, dtype=np.float32)
        )
        if tuple(images.shape[-2:]) != size:
            images = F.interpolate(images, size, mode="bilinear", align_corners=False)
        yield images


def _feeds(images: torch.Tensor, mode: str, normalise: Normalise) -> tuple[torch.Tensor, np.ndarray]:
    """What PyTorch and the exported graph are given for one batch: the same picture.

    A `pixels` or `uint8` graph gets the images as pixels (whole numbers for uint8);
    PyTorch gets those very pixels normalised as in training.
    """
    if mode == "float":
        return images, images.numpy()
    pixels = pixels_from_normalised(images.numpy(), normalise)
    if mode == "uint8":
        pixels = np.clip(np.rint(pixels), 0, 255).astype(np.float32)
    reference = np.stack([normalise(image) for image in pixels.transpose(0, 2, 3, 1)])
    return torch.from_numpy(reference), layout(pixels, mode)


def _run_fixed_batch(
    session: ort.InferenceSession, output: str, feed: np.ndarray, batch: int | None
) -> torch.Tensor:
    """Run chunks of exactly `batch` images (a static-batch graph takes no other size)."""
    chunks = [feed] if batch is None else [feed[i : i + batch] for i in range(0, len(feed), batch)]
    outputs = []
    for chunk in chunks:
        real = chunk.shape[0]
        if batch is not None and real < batch:
            chunk = np.concatenate([chunk, np.zeros((batch - real, *chunk.shape[1:]), chunk.dtype)])
        (out,) = session.run([output], {INPUT_NAME: chunk})
        outputs.append(torch.from_numpy(out)[:real])
    return torch.cat(outputs)


def _non_finite(where: str, logits: torch.Tensor) -> str | None:
    bad = int((~torch.isfinite(logits)).sum())
    return f"{where} gives {bad} non-finite logit(s) (NaN or inf)" if bad else None


@torch.no_grad()
def check_parity(
    reference: nn.Module,
    path: Path,
    batches: ParityBatches,
    size: tuple[int, int],
    batch: int | None,
    argmax: bool,
    mode: str = "float",
    normalise: Normalise | None = None,
) -> dict[str, Any]:
    """Largest absolute logit difference and argmax agreement of ONNX Runtime vs PyTorch.

    Any non-finite logit on either side fails the check: NaN compares false with
    everything, so it would otherwise pass as a difference of 0.
    """
    session, output = _logits_session(path, argmax)
    normalise = normalise or Normalise((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    diff, agree, pixels, count = 0.0, 0, 0, 0
    for images in _images(batches, size):
        torch_input, onnx_input = _feeds(images, mode, normalise)
        expected = reference(torch_input)
        actual = _run_fixed_batch(session, output, onnx_input, batch)
        problem = _non_finite("PyTorch", expected) or _non_finite("ONNX Runtime", actual)
        if problem:
            raise ExportError(
                f"{problem} on the parity images: the model's weights or statistics are not "
                "usable (NaN, inf or overflow); nothing was written"
            )
        diff = max(diff, float((expected - actual).abs().max()))
        agree += int((expected.argmax(1) == actual.argmax(1)).sum())
        pixels += expected.argmax(1).numel()
        count += images.shape[0]
    if count == 0:
        raise ExportError("the parity check got no images")
    return {"max_abs_diff": diff, "argmax_agreement": agree / pixels, "parity_images": count}


def export_size(recipe: Recipe) -> tuple[int, int]:
    """The recipe's export size, or the size of the validation images as the val transform gives."""
    cfg = recipe.deploy.export
    if cfg.height and cfg.width:
        return cfg.height, cfg.width
    image, _ = splits.val_dataset(recipe.data)[0]
    return int(image.shape[-2]), int(image.shape[-1])


def _default_parity(recipe: Recipe | None, example: torch.Tensor) -> ParityBatches:
    """Validation images from the checkpoint's recipe; random ones only for a bare module."""
    if recipe is not None:
        return splits.ValBatches(recipe.data, max_images=PARITY_IMAGES)
    warnings.warn("no validation images for the parity check: comparing on random inputs", stacklevel=3)
    return [torch.randn_like(example).numpy() for _ in range(2)]


def export_onnx(
    checkpoint_or_model: str | Path | nn.Module,
    out: str | Path,
    height: int,
    width: int,
    batch: int = 1,
    dynamic: bool = False,
    opset: int = 18,
    argmax: bool = False,
    input: str = "float",
    labels: str = "int32",
    metadata: dict[str, Any] | None = None,
    parity_batches: ParityBatches | None = None,
    tolerance: float = 1e-4,
) -> dict[str, Any]:
    """Export, check, simplify, annotate and verify a student; the file appears only if it passes.

    `input` is the input mode (float, pixels or uint8: `deploy.inputs`), `labels` the type
    of an argmax model's output (int32 or uint8). Raises `ExportError` when ONNX Runtime
    differs from PyTorch by more than `tolerance` (absolute, on the upsampled logits) or
    either gives a non-finite logit.
    """
    start = time.perf_counter()
    out = Path(out)
    model, meta, recipe = load_student(checkpoint_or_model)
    model = revert_sync_batchnorm(model).eval().cpu().float()
    check_weights(model, checkpoint_or_model if isinstance(checkpoint_or_model, str | Path) else "the model")
    size = (height, width)
    reference = DeployModel(model, size, argmax=False).eval()
    wrapper = DeployModel(model, size, argmax=argmax).eval()
    # A dynamic batch traced at size 1 would be specialised to 1 by torch.export.
    example = torch.randn(max(batch, 2) if dynamic else batch, 3, height, width)
    with torch.no_grad():
        num_classes = int(reference(example[:1]).shape[1])
    if argmax and labels == "uint8" and num_classes > 256:
        raise ArtifactError(f"{num_classes} classes do not fit uint8 labels: use deploy.export.labels=int32")
    output_name = "labels" if argmax else "logits"

    proto, exporter = _to_onnx(wrapper, example, dynamic, opset, output_name)
    proto, simplified = _simplify(proto)
    meta.update(metadata or {})
    normalise = ModelInfo.from_metadata(meta, None).normalise
    add_normalisation(proto, normalise, input)
    folding = fold_normalisation(proto)
    if argmax:
        cast_labels(proto, labels)
    meta.update(
        fakd_deploy_version=__version__,
        exporter=exporter,
        opset=opset,
        input_size=[height, width],
        batch=None if dynamic else batch,
        dynamic=dynamic,
        num_classes=num_classes,
        argmax=argmax,
        output=output_name,
        input=input,
        labels=labels if argmax else None,
        mean=list(normalise.mean),
        std=list(normalise.std),
        pixel_scale=normalise.pixel_scale,
    )
    write_metadata(proto, meta)
    batches = parity_batches if parity_batches is not None else _default_parity(recipe, example)
    parity: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        _save(proto, tmp, out.name)
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except onnx.checker.ValidationError as error:
            raise ExportError(f"the exported graph fails onnx.checker: {error_summary(error)}") from None
        fixed = None if dynamic else batch
        parity.update(check_parity(reference, tmp, batches, size, fixed, argmax, input, normalise))
        log.info(
            f"parity over {parity['parity_images']} images: max |Δ logit| "
            f"{parity['max_abs_diff']:.2e} (tolerance {tolerance:.0e}), argmax "
            f"agreement {100 * parity['argmax_agreement']:.3f} %"
        )
        if not parity["max_abs_diff"] <= tolerance:
            raise ExportError(
                f"ONNX Runtime differs from PyTorch by {parity['max_abs_diff']:.2e} "
                f"> tolerance {tolerance:.0e} (argmax agreement "
                f"{100 * parity['argmax_agreement']:.3f} %); {out} was not written"
            )

    atomic_write(out, write)
    shape = [batch if not dynamic else None, height, width]
    return {
        "path": str(out),
        "exporter": exporter,
        "simplified": simplified,
        "opset": opset,
        "input_size": [height, width],
        "batch": None if dynamic else batch,
        "dynamic": dynamic,
        "input": input,
        "input_shape": [shape[0], height, width, 3] if input == "uint8" else [shape[0], 3, height, width],
        "normalisation": folding if input != "float" else "outside the graph (input float)",
        "argmax": argmax,
        "labels": labels if argmax else None,
        "output": output_name,
        "num_classes": num_classes,
        "tolerance": tolerance,
        **parity,
        "size_mb": out.stat().st_size / 2**20,
        "sha256": file_sha256(out),
        "seconds": time.perf_counter() - start,
    }


def export_summary(report: dict[str, Any]) -> list[str]:
    """The report of `export_onnx` as lines a person reads."""
    batch = "N" if report["batch"] is None else str(report["batch"])
    height, width = report["input_size"]
    dims = (
        f"({batch}, {height}, {width}, 3)"
        if report["input"] == "uint8"
        else f"({batch}, 3, {height}, {width})"
    )
    kind = {"float": "float32, normalised", "pixels": "float32 RGB pixels 0-255", "uint8": "uint8 RGB"}
    if report["argmax"]:
        output = f"labels {report['labels']} ({batch}, {height}, {width})"
    else:
        output = f"logits float32 ({batch}, {report['num_classes']}, {height}, {width})"
    return [
        f"exported {report['path']} ({report['size_mb']:.2f} MB, sha256 {report['sha256'][:12]})",
        f"  input          images {kind[report['input']]} {dims}",
        f"  normalisation  {report['normalisation']}",
        f"  output         {output}, {report['num_classes']} classes",
        f"  parity         {report['parity_images']} images: max |Δ logit| {report['max_abs_diff']:.1e} "
        f"(tolerance {report['tolerance']:.0e}), argmax agreement "
        f"{100 * report['argmax_agreement']:.3f} %",
        f"  graph          {report['exporter']} exporter, opset {report['opset']}"
        f"{', simplified by onnxslim' if report['simplified'] else ''}, {report['seconds']:.1f} s",
    ]


def export_checkpoint(
    checkpoint: Path, out: Path | None = None, overrides: list[str] | None = None
) -> dict[str, Any]:
    """Export a checkpoint with its recipe's `deploy.export` settings (and `--set` overrides).

    The same settings `run` uses, so both give the same graph; parity is checked on the
    recipe's validation images.
    """
    from fakd_deploy.artifacts import recipe_of

    out = out or checkpoint.with_suffix(".onnx")
    not_an_input(out, [checkpoint], "--out")
    recipe = recipe_of(checkpoint, overrides or [])
    cfg = recipe.deploy.export
    height, width = export_size(recipe)
    with held_around(out):
        return export_onnx(
            checkpoint,
            out,
            height,
            width,
            **cfg.model_dump(exclude={"variant", "height", "width"}),
            parity_batches=splits.ValBatches(recipe.data, max_images=PARITY_IMAGES),
        )
