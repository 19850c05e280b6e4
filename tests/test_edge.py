"""The deploy-only install: build, bench, evaluate and predict on ONNX models where torch, timm,
albumentations and OpenCV cannot be imported, as on a Jetson without the training stack."""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from PIL import Image

from fakd_deploy.deploy.ort import tensorrt_major_for

BLOCKED = ("torch", "timm", "albumentations", "cv2")
STANDINS = Path(__file__).resolve().parent / "standins"

# Runs the CLI with the training stack (and whatever else is named) not installed: a None in
# sys.modules makes `import x` fail and `importlib.util.find_spec("x")` answer None, as for a
# package that is not there. The stand-ins for tensorrt and cuda-python come first on the path
# when asked.
LAUNCH = """
import sys

BLOCKED = {blocked!r}
sys.modules.update(dict.fromkeys(BLOCKED))
sys.path[:0] = {path!r}
from fakd_deploy.cli import app
try:
    app(sys.argv[1:])
finally:
    loaded = sorted(m for m, module in sys.modules.items() if m.split(".")[0] in BLOCKED and module)
    print("LOADED", loaded, file=sys.stderr)
"""


def edge(
    *args: object, blocked: tuple[str, ...] = BLOCKED, standins: bool = False
) -> subprocess.CompletedProcess[str]:
    launch = LAUNCH.format(blocked=blocked, path=[str(STANDINS)] if standins else [])
    return subprocess.run(
        [sys.executable, "-c", launch, *map(str, args)], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def folder_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user's own data (`folder` layout): PNGs read with PIL alone."""
    root = tmp_path_factory.mktemp("data")
    (root / "classes.yaml").write_text("\n".join(f"- c{i}" for i in range(6)) + "\n")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for index in range(4):
            (root / "images" / split).mkdir(parents=True, exist_ok=True)
            (root / "masks" / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
                root / "images" / split / f"{index}.png"
            )
            Image.fromarray(rng.integers(0, 6, (32, 32), dtype=np.uint8)).save(
                root / "masks" / split / f"{index}.png"
            )
    return root


def test_the_training_stack_is_really_blocked() -> None:
    launch = LAUNCH.format(blocked=(*BLOCKED, "onnxruntime"), path=[str(STANDINS)])
    for module in ("torch", "onnxruntime"):
        result = subprocess.run(
            [sys.executable, "-c", launch.replace("from fakd_deploy.cli import app", f"import {module}")],
            capture_output=True,
            text=True,
        )
        assert result.returncode != 0 and f"ModuleNotFoundError: import of {module} halted" in result.stderr
    probe = "import tensorrt, cuda.bindings.runtime as r; print(tensorrt.__version__, r.cudaGetDeviceCount())"
    result = subprocess.run(
        [sys.executable, "-c", launch.replace("from fakd_deploy.cli import app", probe)],
        capture_output=True,
        text=True,
    )
    assert "10.3.0 (<cudaError_t.cudaSuccess: 0>, 1)" in result.stdout, result.stderr


def test_build_evaluate_bench_predict_without_torch(
    tmp_path: Path, artifacts: dict[str, Path], folder_dataset: Path
) -> None:
    onnx = tmp_path / "student.onnx"
    onnx.write_bytes(artifacts["onnx"].read_bytes())
    data = ["--set", "data.name=folder", "--set", f"data.root={folder_dataset}", "--set", "data.options={}"]

    for backend in ("ort-cpu-fp32", "ort-cpu-int8"):
        args = ["build", onnx, "--backend", backend, *(data if backend.endswith("int8") else [])]
        done = edge(*args)
        assert done.returncode == 0, done.stderr
    assert (tmp_path / "student.int8.onnx").is_file()

    done = edge("evaluate", tmp_path / "student.int8.onnx", *data, "--json", tmp_path / "eval.json")
    assert done.returncode == 0, done.stderr
    scored = json.loads((tmp_path / "eval.json").read_text())
    assert (scored["dataset"], scored["split"], scored["images"]) == ("folder", "val", 4)

    done = edge(
        "bench",
        onnx,
        tmp_path / "student.int8.onnx",
        *data,
        "--out",
        tmp_path / "report",
        "--seconds",
        "0.05",
        "--warmup",
        "0",
    )
    assert done.returncode == 0, done.stderr
    rows = json.loads((tmp_path / "report" / "report.json").read_text())["rows"]
    assert [(r["backend"], r["status"]) for r in rows] == [("ort-cpu-fp32", "ok"), ("ort-cpu-int8", "ok")]

    image = folder_dataset / "images" / "val" / "0.png"
    done = edge("predict", tmp_path / "student.int8.onnx", image, "--out", tmp_path / "pred")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "pred" / "0.student.ort-cpu-int8.labels.png").is_file()
    assert "LOADED []" in done.stderr  # none of the blocked modules was even partly imported


def test_tensorrt_commands_on_a_jetson_without_onnx_runtime(
    tmp_path: Path, artifacts: dict[str, Path], folder_dataset: Path
) -> None:
    """JetPack's TensorRT and cuda-python, no onnxruntime, no training stack: build an FP16
    engine, evaluate, bench and predict with it (tensorrt and the CUDA runtime are the stand-ins
    of tests/standins, on a simulated GPU)."""
    onnx = tmp_path / "student.onnx"
    onnx.write_bytes(artifacts["onnx"].read_bytes())
    data = ["--set", "data.name=folder", "--set", f"data.root={folder_dataset}", "--set", "data.options={}"]
    jetson = {"blocked": (*BLOCKED, "onnxruntime"), "standins": True}

    done = edge("build", onnx, "--backend", "trt-fp16", **jetson)
    assert done.returncode == 0, done.stderr
    engine = tmp_path / "student.fp16.engine"
    assert engine.is_file() and (tmp_path / "student.fp16.engine.json").is_file()

    done = edge("evaluate", engine, *data, "--json", tmp_path / "eval.json", **jetson)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "eval.json").read_text())["images"] == 4

    done = edge(
        "bench", engine, *data, "--out", tmp_path / "report", "--seconds", "0.05", "--warmup", "0", **jetson
    )
    assert done.returncode == 0, done.stderr
    (row,) = json.loads((tmp_path / "report" / "report.json").read_text())["rows"]
    assert (row["backend"], row["status"]) == ("trt-fp16", "ok") and row["gpu_compute_ms"]["p50"] > 0

    image = folder_dataset / "images" / "val" / "0.png"
    done = edge("predict", engine, image, "--out", tmp_path / "pred", **jetson)
    assert done.returncode == 0, done.stderr
    assert [p.name for p in (tmp_path / "pred").glob("0.*.trt-fp16.labels.png")], done.stdout
    assert "LOADED []" in done.stderr  # neither onnxruntime nor the training stack was touched


def test_int8_calibration_without_onnx_runtime_says_what_to_do(
    tmp_path: Path, artifacts: dict[str, Path], folder_dataset: Path
) -> None:
    onnx = tmp_path / "student.onnx"
    onnx.write_bytes(artifacts["onnx"].read_bytes())
    data = ["--set", "data.name=folder", "--set", f"data.root={folder_dataset}", "--set", "data.options={}"]
    done = edge(
        "build", onnx, "--backend", "trt-int8", *data, blocked=(*BLOCKED, "onnxruntime"), standins=True
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "onnxruntime" in done.stderr and "student.qdq.onnx" in done.stderr


@pytest.mark.slow
def test_a_train_only_install_trains_and_distils_to_the_end(tmp_path: Path, tiny_recipe: Path) -> None:
    """`pip install 'fakd-deploy[train]'` has torch but no ONNX Runtime: training and distillation
    must finish (and report versions) without importing it."""
    out = tmp_path / "run"
    for command in (["train", tiny_recipe, "--out", out], ["distill", tiny_recipe, "--out", out]):
        done = edge(*command, blocked=("onnxruntime",))
        assert done.returncode == 0, done.stderr[-3000:]
        assert "LOADED []" in done.stderr
    assert (out / "teacher" / "best.pt").is_file()
    assert len(list((out / "students").glob("*/best.pt"))) == 2  # kd and fakd_kd


def test_a_checkpoint_on_the_edge_says_what_to_install(artifacts: dict[str, Path]) -> None:
    done = edge("evaluate", artifacts["checkpoint"])
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "torch" in done.stderr and "[train]" in done.stderr


ROOT = Path(__file__).resolve().parents[1]
GPU_EXTRAS = ("gpu", "gpu-cu13")


def _extras() -> dict[str, list[Requirement]]:
    """This source tree's optional dependencies (pyproject.toml), parsed as pip reads them."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = {"": project["dependencies"], **project["optional-dependencies"]}
    return {name: [Requirement(r) for r in requirements] for name, requirements in extras.items()}


def _names(requirements: list[Requirement]) -> set[str]:
    return {requirement.name.lower() for requirement in requirements}


def test_a_gpu_install_brings_one_onnx_runtime_build() -> None:
    """onnxruntime and onnxruntime-gpu install the same module, file by file: never both.

    Neither the core nor an extra a GPU user combines with a GPU extra (`train`, `modelopt`)
    may pull in the CPU build, directly or through an installed dependency.
    """
    extras = _extras()
    for gpu in GPU_EXTRAS:
        assert "onnxruntime-gpu" in _names(extras[gpu]) and "onnxruntime" not in _names(extras[gpu])
    assert "onnxruntime" in _names(extras["cpu"])
    beside_gpu = extras[""] + extras["train"] + extras["modelopt"]
    assert "onnxruntime" not in _names(beside_gpu)
    for name in _names(beside_gpu):
        try:
            pulled = [Requirement(r) for r in importlib.metadata.requires(name) or []]
        except importlib.metadata.PackageNotFoundError:
            continue
        unconditional = [r for r in pulled if r.marker is None or "extra" not in str(r.marker)]
        assert "onnxruntime" not in _names(unconditional), f"{name} pulls in onnxruntime"


def _matrix() -> dict[str, dict[str, str]]:
    """The install matrix of docs/deploy.md: one dict of column -> cell per row, by install."""
    text = (ROOT / "docs" / "deploy.md").read_text()
    table = text[text.index("| install | how |") :].split("\n\n")[0].splitlines()
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    rows = [[cell.strip().strip("`") for cell in line.strip("|").split("|")] for line in table[2:]]
    return {row[0]: dict(zip(header, row, strict=True)) for row in rows}


def test_every_gpu_extra_resolves_to_a_stack_that_runs() -> None:
    """Each GPU extra keeps one CUDA major throughout: TensorRT's wheel for it, the
    onnxruntime-gpu releases whose TensorRT provider loads that TensorRT major (built for CUDA
    12 and TensorRT 10 up to 1.26, CUDA 13 and TensorRT 11 from 1.27: the CUDA packages each
    wheel's `cuda` extra names), the cuda-python of that CUDA major; and docs/deploy.md's
    matrix says exactly what the extras ask for."""
    extras, matrix = _extras(), _matrix()
    candidates = [f"1.{minor}.0" for minor in range(18, 40)]
    for gpu in GPU_EXTRAS:
        by_name = {r.name.lower(): r for r in extras[gpu]}
        (tensorrt,) = [r for r in extras[gpu] if r.name.startswith("tensorrt-cu")]
        cuda = int(tensorrt.name.removeprefix("tensorrt-cu"))
        tensorrt_major = min(int(s.version.split(".")[0]) for s in tensorrt.specifier if ">" in s.operator)
        assert f"{tensorrt_major + 1}.0" not in tensorrt.specifier  # one TensorRT major
        ort = by_name["onnxruntime-gpu"].specifier
        allowed = [v for v in candidates if v in ort]
        assert allowed and {tensorrt_major_for(v) for v in allowed} == {tensorrt_major}, gpu
        cuda_python = by_name["cuda-python"].specifier
        assert f"{cuda}.5.0" in cuda_python and f"{cuda + 1}.0.0" not in cuda_python
        assert f"{cuda - 1}.9.0" not in cuda_python
        (row,) = [row for row in matrix.values() if f"[{gpu}]" in row["how"]]
        documented = Requirement(row["TensorRT"])
        assert (documented.name, documented.specifier, row["CUDA"]) == (
            tensorrt.name,
            tensorrt.specifier,
            str(cuda),
        )
        assert SpecifierSet(row["onnxruntime-gpu"]) == ort and SpecifierSet(row["cuda-python"]) == cuda_python


def test_the_docker_image_keeps_what_it_ships() -> None:
    """The NGC base image sets no pip constraints: the Dockerfile freezes the image's torch,
    torchvision and TensorRT into one before installing, installs no second TensorRT (no `gpu`
    extra), pins an onnxruntime-gpu whose TensorRT provider loads the image's TensorRT 10 and the
    matching cuda-python, and asserts the majors in its own check; the docs' matrix agrees."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    run = dockerfile[dockerfile.index("RUN pip list") :]
    frozen = re.search(r"pip list --format=freeze \| grep -iE '\^\((\S+)\)==' > (\S+)", run)
    assert frozen is not None and set(frozen.group(1).split("|")) == {"torch", "torchvision", "tensorrt"}
    install = re.search(r"PIP_CONSTRAINT=(\S+) pip install (.*)", run)
    assert install is not None and install.group(1) == frozen.group(2)
    assert frozen.group(2) in run.split("pip install")[0]  # written before anything is installed
    assert "gpu" not in install.group(2).split('"')[0]  # `.[train]`: no extra that brings TensorRT
    pins = dict(re.findall(r'"([a-z-]+)([<>=!~][^"]+)"', install.group(2)))
    docker = _matrix()["Docker"]
    assert SpecifierSet(pins["onnxruntime-gpu"]) == SpecifierSet(docker["onnxruntime-gpu"])
    assert SpecifierSet(pins["cuda-python"]) == SpecifierSet(docker["cuda-python"])
    image_tensorrt = int(docker["TensorRT"].split(".")[0])
    assert {
        tensorrt_major_for(v) for v in ("1.20.0", "1.20.2") if v in SpecifierSet(pins["onnxruntime-gpu"])
    } == {image_tensorrt}
    for check in ("tensorrt.__version__.startswith('10.')", "torch.__version__.startswith('2.')"):
        assert check in run
    assert "'TensorrtExecutionProvider' in onnxruntime.get_available_providers()" in run
