"""On a CUDA machine: TensorRT engines and ONNX Runtime GPU backends against ONNX Runtime on CPU;
and scripts/gpu_check.sh, whose plan and report are checked here on any machine (--dry-run).

The GPU tests are marked `gpu` and skip (saying why) without TensorRT, onnxruntime-gpu or a
visible GPU. The fixtures live here: the models are built with onnx.helper, so no other
test module is imported.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx_graphs import onnx_segmenter

from fakd_deploy.deploy import cuda
from fakd_deploy.deploy.build import build
from fakd_deploy.deploy.measure import measure_gpu_compute, measure_latency
from fakd_deploy.deploy.ort import OrtPredictor
from fakd_deploy.deploy.rows import Latency
from fakd_deploy.deploy.runtime import open_backend, unavailable_reason
from fakd_deploy.deploy.trt import EngineMismatch, TrtPredictor, load_sidecar, sidecar_path

NO_GPU = cuda.no_gpu_reason()
NO_TRT = "tensorrt is not installed" if importlib.util.find_spec("tensorrt") is None else NO_GPU
needs_trt = pytest.mark.skipif(NO_TRT is not None, reason=f"needs TensorRT and a GPU: {NO_TRT}")
SIZE = (64, 96)


def _images(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 3, *SIZE)).astype(np.float32)


@pytest.fixture(params=[2, "batch"], ids=["static-batch-2", "dynamic-batch"])
def fp32(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    path = tmp_path / "m.onnx"
    onnx.save(onnx_segmenter(request.param, SIZE, channels=16, aspp=False), str(path))
    return path


def _calibration() -> list[np.ndarray]:
    return [image[None] for image in _images(8, seed=1)]


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.argmax(1) == b.argmax(1)).mean())


@pytest.mark.gpu
@needs_trt
@pytest.mark.parametrize(("precision", "minimum"), [("fp32", 0.999), ("fp16", 0.98)])
def test_engines_match_onnx_runtime_on_cpu(fp32: Path, precision: str, minimum: float) -> None:
    engine = build(fp32, f"trt-{precision}")
    sidecar = load_sidecar(engine)
    assert sidecar["precision"] == precision and sidecar["trtexec"].startswith("trtexec --onnx=")
    images = _images(3)
    expected = OrtPredictor(fp32)(images)
    actual = open_backend(engine, f"trt-{precision}")(images)
    assert actual.shape == expected.shape and actual.dtype == np.float32
    assert _agreement(actual, expected) > minimum


@pytest.mark.gpu
@needs_trt
def test_int8_engine_runs_its_qdq_model_as_onnx_runtime_does(fp32: Path) -> None:
    engine = build(fp32, "trt-int8", calib_images=_calibration())
    qdq = fp32.with_name("m.qdq.onnx")
    images = _images(3, seed=5)
    on_cpu = OrtPredictor(qdq)(images)
    on_gpu = TrtPredictor(engine)(images)
    assert _agreement(on_gpu, on_cpu) > 0.97
    assert _agreement(on_gpu, OrtPredictor(fp32)(images)) > 0.95


@pytest.mark.gpu
@needs_trt
def test_engine_from_another_gpu_is_refused(fp32: Path) -> None:
    engine = build(fp32, "trt-fp16")
    sidecar = json.loads(sidecar_path(engine).read_text())
    sidecar.update(gpu="Orin", compute_capability="8.7")
    sidecar_path(engine).write_text(json.dumps(sidecar))
    with pytest.raises(EngineMismatch, match="Orin"):
        TrtPredictor(engine)


@pytest.mark.gpu
@needs_trt
def test_tensorrt_bench_numbers_gpu_compute_below_host_latency(fp32: Path) -> None:
    predictor = TrtPredictor(build(fp32, "trt-fp16"))
    image = _images(1)
    host = Latency.of(measure_latency(predictor, image, warmup_s=0.2, seconds=0.5))
    compute = measure_gpu_compute(predictor, image, warmup_s=0.2, seconds=0.5)
    assert compute is not None and min(compute) > 0
    assert Latency.of(compute).p50 <= host.p50


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["ort-cuda-fp32", "ort-cuda-fp16", "ort-trt-fp16", "ort-trt-int8"])
def test_onnx_runtime_gpu_backends_run_what_they_say(fp32: Path, backend: str) -> None:
    reason = unavailable_reason(backend)
    if reason:
        pytest.skip(reason)
    artifact = build(fp32, backend, calib_images=_calibration())
    predictor = open_backend(artifact, backend)
    expected = "TensorrtExecutionProvider" if backend.startswith("ort-trt") else "CUDAExecutionProvider"
    assert predictor.providers[0] == expected
    images = _images(3, seed=2)
    assert _agreement(predictor(images), OrtPredictor(fp32)(images)) > 0.95
    compute = measure_gpu_compute(predictor, images[:1], warmup_s=0.1, seconds=0.2)
    assert compute is not None and min(compute) > 0


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
STANDINS = Path(__file__).resolve().parent / "standins"


def _gpu_check(tmp_path: Path, *args: str, gpu: bool = False, tensorrt: bool = False) -> tuple[int, dict]:
    """Run the script with `args`; `gpu` puts a stand-in nvidia-smi and CUDA runtime on the
    paths (one H100), `tensorrt` the TensorRT stand-in too. Returns the exit code and report.json."""
    env = dict(os.environ)
    tmp_path = Path(tempfile.mkdtemp(dir=tmp_path))
    if gpu:
        (tmp_path / "bin").mkdir()
        smi = tmp_path / "bin" / "nvidia-smi"
        gpu_line = "NVIDIA H100 80GB HBM3, 9.0, 81559 MiB"
        smi.write_text(
            f"#!/bin/sh\ncase $1 in *driver_version*) echo 550.54.15 ;; *) echo '{gpu_line}' ;; esac\n"
        )
        smi.chmod(0o755)
        env["PATH"] = f"{tmp_path / 'bin'}:{env['PATH']}"
        shadow = tmp_path / "standins"  # only the stand-ins asked for
        shutil.copytree(STANDINS / "cuda", shadow / "cuda")
        if tensorrt:
            shutil.copytree(STANDINS / "tensorrt", shadow / "tensorrt")
        for module in ("fake_cuda.py", "fake_tensorrt.py"):
            shutil.copy(STANDINS / module, shadow / module)
        env["PYTHONPATH"] = str(shadow)
    out = tmp_path / "check"
    done = subprocess.run(
        ["bash", str(SCRIPT), *args, str(out)], capture_output=True, text=True, env=env, timeout=300
    )
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").is_file() else {}
    if report:
        assert (out / "report.md").read_text().startswith("# GPU check")
    return done.returncode, report


def _steps(report: dict) -> dict[str, str]:
    return {step["step"]: step["status"] for step in report["steps"]}


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_gpu_check_is_shellcheck_clean() -> None:
    done = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


@pytest.mark.skipif(NO_GPU is None, reason="a CUDA GPU is visible here")
def test_gpu_check_without_a_gpu_says_so_and_exits_2(tmp_path: Path) -> None:
    code, report = _gpu_check(tmp_path)
    assert code == 2 and report == {}


@pytest.mark.slow
def test_gpu_check_reports_the_stack_and_plans_training_and_every_gpu_backend(tmp_path: Path) -> None:
    """With a GPU, TensorRT and cuda-python (the stand-ins), the plan trains with AMP, runs the
    pipeline with every TensorRT backend, builds, evaluates and benches each; without a GPU
    deploy backend the same plan would fail, unless only training is checked."""
    code, report = _gpu_check(tmp_path, "--dry-run", gpu=True, tensorrt=True)
    assert code == 0 and report["result"] == "dry run: nothing ran"
    stack = report["stack"]
    assert stack["driver"] == "550.54.15" and stack["cuda_driver"] == "12.8" and stack["tensorrt"] == "10.3.0"
    for key in ("cuda_runtime", "cuda_python", "onnxruntime", "onnxruntime_providers", "polygraphy", "torch"):
        assert key in stack
    steps = _steps(report)
    assert steps["train-fp16"] == "planned" and steps["train-ddp"] == "skipped"
    for backend in ("trt-fp32", "trt-fp16", "trt-int8"):
        assert steps[f"build-{backend}"] == steps[f"evaluate-{backend}"] == "planned"
    assert steps["bench"] == "planned" and "gpu-backends" not in steps
    pipeline = next(s for s in report["steps"] if s["step"] == "pipeline")["detail"]
    assert "deploy.backends=[ort-cpu-fp32,trt-fp32,trt-fp16,trt-int8]" in pipeline

    code, report = _gpu_check(tmp_path, "--dry-run", gpu=True)
    assert _steps(report)["gpu-backends"] == "would fail" and _steps(report)["trt-fp16"] == "skipped"
    code, report = _gpu_check(tmp_path, "--dry-run", "--training-only", gpu=True)
    assert "gpu-backends" not in _steps(report) and report["mode"] == "training only"


def test_gpu_check_dry_run_writes_the_report_without_a_gpu(tmp_path: Path) -> None:
    code, report = _gpu_check(tmp_path, "--dry-run")
    assert code == 0 and set(report) == {"date", "mode", "result", "stack", "steps", "miou"}
    steps = _steps(report)
    assert steps["pipeline"] == "planned" and steps["trt-fp16"] == "skipped"
    assert steps["gpu-backends"] == "would fail"  # a real run would exit 1 here
    for key in (
        "driver",
        "cuda_driver",
        "cuda_runtime",
        "cuda_python",
        "tensorrt",
        "onnxruntime",
        "polygraphy",
    ):
        assert key in report["stack"]
