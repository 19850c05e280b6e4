"""Export a student to one self-describing ONNX file and prove that it matches PyTorch.

The exported graph takes normalised images (N, 3, H, W) and returns logits upsampled to
(H, W), or int64 labels with `argmax=True`. Everything a runtime needs to use it (class
names, normalisation, input size) and to trace it back (recipe, checkpoint hash) is
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
from fakd_deploy.data import splits
from fakd_deploy.deploy.onnx_meta import write_metadata
from fakd_deploy.errors import ExportError, error_summary
from fakd_deploy.models import Checkpoint
from fakd_deploy.recipe import Recipe
from fakd_deploy.utils import atomic_write, file_sha256, text_sha256

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


def _run_fixed_batch(
    session: ort.InferenceSession, output: str, images: torch.Tensor, batch: int | None
) -> torch.Tensor:
    """Run chunks of exactly `batch` images (a static-batch graph takes no other size)."""
    chunks = [images] if batch is None else list(images.split(batch))
    outputs = []
    for chunk in chunks:
        real = chunk.shape[0]
        if batch is not None and real < batch:
            chunk = torch.cat([chunk, chunk.new_zeros(batch - real, *chunk.shape[1:])])
        (out,) = session.run([output], {INPUT_NAME: chunk.numpy()})
        outputs.append(torch.from_numpy(out)[:real])
    return torch.cat(outputs)


@torch.no_grad()
def check_parity(
    reference: nn.Module,
    path: Path,
    batches: ParityBatches,
    size: tuple[int, int],
    batch: int | None,
    argmax: bool,
) -> dict[str, Any]:
    """Largest absolute logit difference and argmax agreement of ONNX Runtime vs PyTorch."""
    session, output = _logits_session(path, argmax)
    diff, agree, pixels, count = 0.0, 0, 0, 0
    for images in _images(batches, size):
        expected = reference(images)
        actual = _run_fixed_batch(session, output, images, batch)
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
    metadata: dict[str, Any] | None = None,
    parity_batches: ParityBatches | None = None,
    tolerance: float = 1e-4,
) -> dict[str, Any]:
    """Export, check, simplify, annotate and verify a student; the file appears only if it passes.

    Raises `ExportError` when ONNX Runtime differs from PyTorch by more than `tolerance`
    (absolute, on the upsampled logits).
    """
    start = time.perf_counter()
    out = Path(out)
    model, meta, recipe = load_student(checkpoint_or_model)
    model = revert_sync_batchnorm(model).eval().cpu().float()
    size = (height, width)
    reference = DeployModel(model, size, argmax=False).eval()
    wrapper = DeployModel(model, size, argmax=argmax).eval()
    # A dynamic batch traced at size 1 would be specialised to 1 by torch.export.
    example = torch.randn(max(batch, 2) if dynamic else batch, 3, height, width)
    with torch.no_grad():
        num_classes = int(reference(example[:1]).shape[1])
    output_name = "labels" if argmax else "logits"

    proto, exporter = _to_onnx(wrapper, example, dynamic, opset, output_name)
    proto, simplified = _simplify(proto)
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
    )
    meta.update(metadata or {})
    write_metadata(proto, meta)
    batches = parity_batches if parity_batches is not None else _default_parity(recipe, example)
    parity: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        _save(proto, tmp, out.name)
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except onnx.checker.ValidationError as error:
            raise ExportError(f"the exported graph fails onnx.checker: {error_summary(error)}") from None
        parity.update(check_parity(reference, tmp, batches, size, None if dynamic else batch, argmax))
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
    return {
        "path": str(out),
        "exporter": exporter,
        "simplified": simplified,
        "opset": opset,
        "input_size": [height, width],
        "batch": None if dynamic else batch,
        "dynamic": dynamic,
        "argmax": argmax,
        "num_classes": num_classes,
        **parity,
        "size_mb": out.stat().st_size / 2**20,
        "sha256": file_sha256(out),
        "seconds": time.perf_counter() - start,
    }


def export_checkpoint(
    checkpoint: Path, out: Path | None = None, overrides: list[str] | None = None
) -> dict[str, Any]:
    """Export a checkpoint with its recipe's `deploy.export` settings (and `--set` overrides).

    The same settings `run` uses, so both give the same graph; parity is checked on the
    recipe's validation images.
    """
    from fakd_deploy.artifacts import recipe_of

    recipe = recipe_of(checkpoint, overrides or [])
    cfg = recipe.deploy.export
    height, width = export_size(recipe)
    return export_onnx(
        checkpoint,
        out or checkpoint.with_suffix(".onnx"),
        height,
        width,
        **cfg.model_dump(exclude={"variant", "height", "width"}),
        parity_batches=splits.ValBatches(recipe.data, max_images=PARITY_IMAGES),
    )
