"""Shared fixtures: where the real data lives, and small recipes that run in seconds."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CAMVID = ROOT.parent / "shared" / "datasets" / "camvid"

torch.set_num_threads(2)


@pytest.fixture
def camvid() -> Path:
    """The CamVid copy in ../shared beside the project; tests that need it skip without it."""
    if not (CAMVID / "train.txt").exists():
        pytest.skip(f"CamVid not found at {CAMVID} (it lives in ../shared beside the project)")
    return CAMVID


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def free_port() -> Callable[[], int]:
    """A function returning a free local TCP port, for `torchrun --master_port`."""
    return _free_port
