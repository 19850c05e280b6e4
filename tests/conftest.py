"""Shared fixtures: where the real data lives, the tiny recipe, and small artifacts made once."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CAMVID = ROOT.parent / "shared" / "datasets" / "camvid"
TINY = Path(__file__).resolve().parent / "recipes" / "tiny.yaml"

torch.set_num_threads(2)


@pytest.fixture
def camvid() -> Path:
    """The CamVid copy in ../shared beside the project; tests that need it skip without it."""
    if not (CAMVID / "train.txt").exists():
        pytest.skip(f"CamVid not found at {CAMVID} (it lives in ../shared beside the project)")
    return CAMVID


@pytest.fixture
def tiny_recipe() -> Path:
    """tests/recipes/tiny.yaml: every stage on 32x32 synthetic images in seconds."""
    return TINY


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread for tests of tiny tensors, where a second only adds start-up costs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def free_port() -> Callable[[], int]:
    """A function returning a free local TCP port, for `torchrun --master_port`."""
    return _free_port


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An untrained tiny-recipe student as a checkpoint, its ONNX export and ORT INT8 model.

    Weights are random: enough for everything that checks files, shapes and errors.
    """
    from fakd_deploy.data.splits import calibration_images, dataset_info
    from fakd_deploy.deploy.build import build
    from fakd_deploy.deploy.export import export_onnx
    from fakd_deploy.models import Checkpoint, build_model
    from fakd_deploy.recipe import load_recipe

    folder = tmp_path_factory.mktemp("artifacts")
    recipe = load_recipe(TINY)
    num_classes, names = dataset_info(recipe.data)
    torch.manual_seed(0)
    model = build_model(num_classes=num_classes, **recipe.student.model.build_kwargs())
    checkpoint = Checkpoint(
        model=model.state_dict(),
        arch=model.config,
        recipe=recipe.model_dump(mode="json"),
        class_names=names,
        variant="fakd_kd",
        seed=0,
    ).save(folder / "best.pt")
    onnx = folder / "student.onnx"
    export_onnx(checkpoint, onnx, 32, 32)
    int8 = build(onnx, "ort-cpu-int8", calib_images=calibration_images(recipe.data, 4))
    return {"checkpoint": checkpoint, "onnx": onnx, "int8": int8, "folder": folder}


@pytest.fixture(autouse=True, scope="session")
def stop_signals_as_a_terminal_gives_them() -> None:
    """The signal tests expect SIGINT, SIGTERM and SIGHUP handled as in a terminal. A test run
    started in the background (`cmd &`, `nohup`) inherits some of them ignored, which the tool
    deliberately respects (docs/trust.md): give them back their defaults for the tests, and so
    to the processes the tests start."""
    import signal

    defaults = {
        signal.SIGINT: signal.default_int_handler,
        signal.SIGTERM: signal.SIG_DFL,
        signal.SIGHUP: signal.SIG_DFL,
    }
    for sig, handler in defaults.items():
        if signal.getsignal(sig) is signal.SIG_IGN:
            signal.signal(sig, handler)
