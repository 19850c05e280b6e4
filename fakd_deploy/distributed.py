"""torch.distributed as the stages use it: which rank this is, joining the group `torchrun`
describes, agreeing on rank 0's decisions, and saying which rank died when one does.

A rank killed mid-run makes the others fail inside a collective with the transport's
error (gloo: "Connection reset by peer"); `rank_failures_reported` turns that into one line
naming the rank that is gone, since the same command resumes the run.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from fakd_deploy.errors import StageFailed
from fakd_deploy.utils import process_alive

PEERS: list[tuple[str, int]] = []  # (host, pid) of every rank, gathered when the group forms
# How the transports describe a peer that went away.
LOST_PEER = ("Connection reset", "Connection closed", "Broken pipe", "Socket Timeout", "timed out")


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def init_distributed(device: torch.device) -> torch.device:
    """Join the process group `torchrun` describes; a no-op when run as one process."""
    if "WORLD_SIZE" not in os.environ or dist.is_initialized():
        return device
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend)
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    peers: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(peers, (socket.gethostname(), os.getpid()))
    PEERS[:] = peers
    return device


def agree(value: Any) -> Any:
    """Rank 0's value on every rank (unchanged outside torch.distributed)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def leave_group() -> None:
    """After training: every rank waits for the others, then the group ends. Rank 0 alone
    runs the stages after training (evaluation, export, builds, bench), and those agree and
    wait as one process does; the other ranks stop here."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def lost_ranks() -> list[str]:
    """The ranks on this host whose process is gone, as `rank N (pid P)`."""
    host = socket.gethostname()
    return [
        f"rank {rank} (pid {pid})"
        for rank, (peer_host, pid) in enumerate(PEERS)
        if peer_host == host and pid != os.getpid() and not process_alive(pid)
    ]


@contextmanager
def rank_failures_reported() -> Iterator[None]:
    """One line, instead of the transport's traceback, when another rank died."""
    try:
        yield
    except RuntimeError as error:
        if not dist.is_initialized() or dist.get_world_size() == 1:
            raise
        lost = lost_ranks()
        if not lost and not any(marker in str(error) for marker in LOST_PEER):
            raise
        who = ", ".join(lost) if lost else "a rank on another node (its connection closed)"
        raise StageFailed(
            f"{who} stopped during the run, so rank {dist.get_rank()} stopped too; run the same "
            "command again to resume (training continues from its last saved state)"
        ) from None
