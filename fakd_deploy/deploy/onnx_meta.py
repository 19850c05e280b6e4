"""Read and write the metadata an exported ONNX model carries (`metadata_props`), without torch.

Values are stored as JSON; the recipe is stored as plain YAML text so Netron shows it
readably. Artifacts derived from a model (INT8, FP16, engines) copy this metadata, so
any one of them is enough to run `predict` or `evaluate`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx
from google.protobuf.message import DecodeError

from fakd_deploy.errors import ArtifactError, printable
from fakd_deploy.inputs import MAX_METADATA_BYTES

TEXT_KEYS = frozenset({"recipe"})


def load_onnx(path: str | Path, load_external_data: bool = True) -> onnx.ModelProto:
    """An ONNX model, or one line naming the file when it is missing, empty or not ONNX."""
    path = Path(path)
    if path.is_dir():
        raise ArtifactError(f"{path} is a directory, not an ONNX model")
    if not path.is_file():
        raise ArtifactError(f"ONNX model not found: {path}")
    if path.stat().st_size == 0:
        raise ArtifactError(f"{path} is empty (0 bytes): not an ONNX model")
    try:
        model = onnx.load(str(path), load_external_data=load_external_data)
    except (DecodeError, ValueError, RuntimeError, OSError) as error:
        raise ArtifactError(
            f"{path} is not a readable ONNX model (truncated or corrupt?): {type(error).__name__}"
        ) from None
    if not model.graph.node:
        raise ArtifactError(f"{path} is not a readable ONNX model: its graph has no nodes")
    return model


def write_metadata(model: onnx.ModelProto, metadata: dict[str, Any]) -> None:
    """Set `metadata_props` entries (JSON values; the recipe as plain text), keeping the others."""
    entries = {prop.key: prop.value for prop in model.metadata_props}
    for key, value in metadata.items():
        entries[key] = value if key in TEXT_KEYS else json.dumps(value)
    onnx.helper.set_model_props(model, entries)


def _decode(key: str, value: str) -> Any:
    if key in TEXT_KEYS:
        return value
    try:
        return json.loads(value)
    except (ValueError, RecursionError):
        return value  # written by another tool, or nested too deeply: its checks name it


def model_metadata(model: onnx.ModelProto, path: str | Path = "the model") -> dict[str, Any]:
    """The decoded `metadata_props` of a loaded model, each value at most MAX_METADATA_BYTES."""
    for prop in model.metadata_props:
        if len(prop.value) > MAX_METADATA_BYTES:
            raise ArtifactError(
                f"{path}: metadata '{printable(prop.key[:64])}' holds {len(prop.value):,} characters; "
                f"the limit is {MAX_METADATA_BYTES:,}"
            )
    return {prop.key: _decode(prop.key, prop.value) for prop in model.metadata_props}


def graph_to_model(graph: Any, original: onnx.ModelProto) -> onnx.ModelProto:
    """An onnx-graphsurgeon graph edited from `original` back as a model: unused nodes and
    constants removed, nodes in order, and `original`'s IR version and metadata kept."""
    import onnx_graphsurgeon as gs

    graph.cleanup().toposort()
    model = gs.export_onnx(graph)
    model.ir_version = original.ir_version
    del model.metadata_props[:]
    model.metadata_props.extend(original.metadata_props)
    return model


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The decoded `metadata_props` of an ONNX file; the weights are not read."""
    return model_metadata(load_onnx(path, load_external_data=False), path)
