"""A Triton Inference Server model folder for one deployed model: `config.pbtxt` + `1/model.*`.

Every field comes from the model file: the input and output names, element types and
dims from the ONNX graph (or the engine sidecar), the batching from its batch dimension.
A static batch N is `max_batch_size: 0` with N in `dims`; a dynamic batch is
`max_batch_size: MAX_BATCH` with the batch left out of `dims` (Triton's model
configuration guide, "Maximum Batch Size"). The backend follows the chosen fakd-deploy
backend:

| fakd-deploy backend | Triton backend | instance | accelerator |
|---|---|---|---|
| ort-cpu-* | onnxruntime | KIND_CPU | |
| ort-cuda-* | onnxruntime | KIND_GPU | |
| ort-trt-fp16 / ort-trt-int8 | onnxruntime | KIND_GPU | `tensorrt`, `precision_mode` FP16 / INT8 |
| trt-* | tensorrt (`model.plan`) | KIND_GPU | |

The accelerator parameters are those of the ONNX Runtime backend's README ("ONNX Runtime
with TensorRT optimization"); INT8 takes no calibration table because the model carries
its Q/DQ scales. Tests parse every generated file with `tritonclient`'s `model_config_pb2`.
"""

from __future__ import annotations

from dataclasses import dataclass

from fakd_deploy.deploy.backends import Backend

MAX_BATCH = 8  # the largest batch a dynamic-batch engine is built for (deploy.trt.MAX_BATCH)
WORKSPACE_BYTES = 2 * 2**30

TRITON_TYPES = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "uint8": "TYPE_UINT8",
    "int32": "TYPE_INT32",
    "int64": "TYPE_INT64",
}


@dataclass(frozen=True)
class Tensor:
    """One model input or output: name, numpy element type name, shape with -1 for a dynamic batch."""

    name: str
    dtype: str
    shape: tuple[int, ...]


def model_file(backend: Backend) -> str:
    return "model.plan" if backend.engine else "model.onnx"


def _dims(tensor: Tensor, batched: bool) -> str:
    dims = tensor.shape[1:] if batched else tensor.shape
    return ", ".join(str(d) for d in dims)


def _tensor(kind: str, tensor: Tensor, batched: bool) -> str:
    return (
        f'{kind} [\n  {{\n    name: "{tensor.name}"\n    data_type: {TRITON_TYPES[tensor.dtype]}\n'
        f"    dims: [ {_dims(tensor, batched)} ]\n  }}\n]\n"
    )


def config_pbtxt(name: str, backend: Backend, inputs: Tensor, output: Tensor) -> str:
    """The text of `config.pbtxt` for a model with one image input and one output."""
    batched = inputs.shape[0] < 0
    lines = [
        f'name: "{name}"',
        f'backend: "{"tensorrt" if backend.engine else "onnxruntime"}"',
        f"max_batch_size: {MAX_BATCH if batched else 0}",
    ]
    text = "\n".join(lines) + "\n" + _tensor("input", inputs, batched) + _tensor("output", output, batched)
    kind = "KIND_CPU" if backend.device == "cpu" else "KIND_GPU"
    text += f"instance_group [\n  {{\n    kind: {kind}\n    count: 1\n  }}\n]\n"
    if batched:
        text += "dynamic_batching { }\n"
    if backend.provider == "TensorrtExecutionProvider":
        text += (
            "optimization {\n  execution_accelerators {\n    gpu_execution_accelerator: [\n      {\n"
            '        name: "tensorrt"\n'
            f'        parameters {{ key: "precision_mode" value: "{backend.precision.upper()}" }}\n'
            f'        parameters {{ key: "max_workspace_size_bytes" value: "{WORKSPACE_BYTES}" }}\n'
            "      }\n    ]\n  }\n}\n"
        )
    return text
