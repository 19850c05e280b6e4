"""onnxruntime-gpu's Python API around a real CPU session, on a machine without a GPU.

What it copies from the real library, with where each behaviour is written down:

- `get_available_providers()` lists the TensorRT provider whether or not TensorRT loads
  (onnxruntime issue #13501); a TensorRT session without libnvinfer fails, and with
  `enable_fallback` on (the default) is silently recreated on CUDA + CPU
  (onnxruntime_inference_collection.py, `InferenceSession.__init__`: "Falling back to ...").
- `get_providers()` lists the registered providers, not where nodes ran; the profiler writes
  one `"cat": "Node"` event per node run with `args.provider`, and stops after
  `end_profiling()` (onnxruntime/core/common/profiler.cc, `EndProfiling`). Nodes the TensorRT
  provider takes run as one fused node.
- `run` ends with cudaStreamSynchronize on the compute stream unless the run option
  `disable_synchronize_execution_providers` is "1"
  (onnxruntime_run_options_config_keys.h).
- The TensorRT provider caches engines under `trt_engine_cache_path`, named by a hash of the
  model's file name, input and initializer names and node output names, and the ORT, CUDA
  and TensorRT versions: not the weights (tensorrt_execution_provider_utils.h, `TRTGenerateId`).
  A cached engine is loaded instead of building one, so it runs the model it was built from.
"""

from __future__ import annotations

import hashlib
import json
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import onnx

CPU, CUDA, TENSORRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
NO_SYNC = "disable_synchronize_execution_providers"


def trt_model_id(path: Path, model: onnx.ModelProto) -> str:
    """The cache key `TRTGenerateId` builds: names only, never values."""
    names = [path.name * (500 // max(len(path.name), 1) + 1)]
    names += [v.name for v in model.graph.input] + [t.name for t in model.graph.initializer]
    names += [out for node in model.graph.node for out in node.output]
    names += ["LINUX", "1.22.0", "12060", "10.3"]
    return hashlib.sha256("\0".join(names).encode()).hexdigest()[:16]


class GpuOnnxRuntime(types.ModuleType):
    """Stands in for the `onnxruntime` module the deploy code imports.

    `cudart` is the CUDA stand-in the sessions enqueue their GPU work on (`work_ms` of GPU time
    after `launch_ms` of host time per run). `libnvinfer` says whether TensorRT loads; nodes
    whose op type is in `cpu_ops` (or `cuda_ops`) run on that provider instead of the one asked.
    """

    def __init__(
        self,
        real: Any,
        cudart: Any,
        version: str = "1.22.0",
        libnvinfer: bool = True,
        cuda_ops: tuple[str, ...] = (),
        cpu_ops: tuple[str, ...] = (),
        work_ms: float = 2.0,
        launch_ms: float = 1.0,
    ) -> None:
        super().__init__("onnxruntime")
        self.__version__ = version
        self.real, self.cudart = real, cudart
        self.libnvinfer, self.cuda_ops, self.cpu_ops = libnvinfer, cuda_ops, cpu_ops
        self.work_ms, self.launch_ms = work_ms, launch_ms
        self.SessionOptions, self.RunOptions = real.SessionOptions, real.RunOptions
        self.GraphOptimizationLevel = real.GraphOptimizationLevel
        self.engines_built: list[str] = []
        fake = self

        class OrtValue:
            def __init__(self, array: np.ndarray, device: str) -> None:
                self.array, self.device = array, device

            @staticmethod
            def ortvalue_from_numpy(array: np.ndarray, device: str = "cpu", device_id: int = 0) -> OrtValue:
                return OrtValue(np.array(array), device)

        class IOBinding:
            def __init__(self) -> None:
                self.inputs: dict[str, np.ndarray] = {}
                self.outputs: list[np.ndarray] = []

            def bind_cpu_input(self, name: str, array: np.ndarray) -> None:
                self.inputs[name] = np.array(array)

            def bind_ortvalue_input(self, name: str, value: OrtValue) -> None:
                self.inputs[name] = value.array

            def bind_output(self, name: str, device: str = "cpu", device_id: int = 0) -> None:
                self.output_name = name

            def synchronize_inputs(self) -> None:
                pass

            def copy_outputs_to_cpu(self) -> list[np.ndarray]:
                return [np.array(out) for out in self.outputs]

        class InferenceSession:
            def __init__(
                self,
                source: str,
                options: Any = None,
                providers: list[str] | None = None,
                provider_options: list[dict[str, str]] | None = None,
                **kwargs: Any,
            ) -> None:
                providers = list(providers or [CPU])
                self.options = dict(zip(providers, provider_options or [{}] * len(providers), strict=True))
                if providers[0] == TENSORRT and not fake.libnvinfer:
                    if int(kwargs.get("enable_fallback", 1)) != 1:
                        raise RuntimeError("TensorRT EP could not be created: libnvinfer.so.10: cannot open")
                    print(f"Falling back to {[CUDA, CPU]} and retrying.")
                    providers = [CUDA, CPU]
                self.providers = providers
                path = Path(source)
                model = onnx.load(str(path))
                if (
                    providers[0] == TENSORRT
                    and self.options[TENSORRT].get("trt_engine_cache_enable") == "True"
                ):
                    model = self._cached_engine(path, model)
                self.model = model
                self.cpu = fake.real.InferenceSession(model.SerializeToString(), providers=[CPU])
                self.stream = int(self.options.get(providers[0], {}).get("user_compute_stream", 0))
                self.profile: list[dict[str, Any]] | None = (
                    [] if options and options.enable_profiling else None
                )
                self.prefix = options.profile_file_prefix if options else ""

            def _cached_engine(self, path: Path, model: onnx.ModelProto) -> onnx.ModelProto:
                cache = Path(self.options[TENSORRT]["trt_engine_cache_path"])
                engine = (
                    cache
                    / f"TensorrtExecutionProvider_TRTKernel_graph_{trt_model_id(path, model)}_0_0.engine"
                )
                if engine.is_file():
                    return onnx.load_from_string(engine.read_bytes())
                cache.mkdir(parents=True, exist_ok=True)
                engine.write_bytes(model.SerializeToString())
                fake.engines_built.append(str(engine))
                return model

            def get_providers(self) -> list[str]:
                return list(self.providers)

            def get_inputs(self) -> list[Any]:
                return self.cpu.get_inputs()

            def get_outputs(self) -> list[Any]:
                return self.cpu.get_outputs()

            def io_binding(self) -> IOBinding:
                return IOBinding()

            def _record(self) -> None:
                if self.profile is None:
                    return
                first = self.providers[0]
                fused = False
                for node in self.model.graph.node:
                    provider = CPU if node.op_type in fake.cpu_ops else first
                    provider = CUDA if node.op_type in fake.cuda_ops and first != CPU else provider
                    if provider == TENSORRT:
                        if not fused:
                            name = f"{TENSORRT}_TRTKernel_graph_main_0_kernel_time"
                            self.profile.append({"cat": "Node", "name": name, "args": {"provider": TENSORRT}})
                        fused = True
                        continue
                    args = {"op_name": node.op_type, "provider": provider}
                    self.profile.append({"cat": "Node", "name": f"{node.name}_kernel_time", "args": args})
                self.profile.append({"cat": "Session", "name": "model_run", "args": {}})

            def _gpu(self, run_options: Any) -> None:
                if self.providers[0] == CPU:
                    return
                fake.cudart.enqueue(self.stream, fake.work_ms, fake.launch_ms, what="execute")
                if run_options is None or run_options.get_run_config_entry(NO_SYNC) != "1":
                    fake.cudart.wait_for(self.stream)
                    fake.cudart.calls.append(("sync", self.stream))

            def run(
                self, names: list[str] | None, feed: dict[str, np.ndarray], run_options: Any = None
            ) -> list:
                out = self.cpu.run(names, feed)
                self._record()
                self._gpu(run_options)
                return out

            def run_with_iobinding(self, binding: IOBinding, run_options: Any = None) -> None:
                binding.outputs = self.cpu.run([binding.output_name], binding.inputs)
                self._record()
                self._gpu(run_options)

            def end_profiling(self) -> str:
                if self.profile is None:
                    return ""
                path = Path(f"{self.prefix}_{time.strftime('%Y-%m-%d_%H-%M-%S')}.json")
                path.write_text(json.dumps(self.profile))
                self.profile = None  # "will not collect profile after writing"
                return str(path)

        self.OrtValue, self.InferenceSession = OrtValue, InferenceSession

    def get_available_providers(self) -> list[str]:
        return [TENSORRT, CUDA, CPU]
