"""Run by tests/test_fakd.py under `torchrun --nproc_per_node 2`: each rank feeds its own batches.

Writes OUT/rank<r>.pt with the batches the rank saw and both estimators' buffers, so the
test can check that the ranks agree and equal one pass over the union of all batches.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from fakd_deploy.distill import fakd

CLASSES, FEAT_DIM, STEPS, IGNORE = 4, 3, 5, 255


def rank_batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Different data and batch sizes per rank; labels at twice the feature resolution."""
    gen = torch.Generator().manual_seed(100 + rank)
    batches = []
    for _ in range(STEPS):
        n = int(torch.randint(1, 4, (1,), generator=gen))
        labels = torch.randint(0, CLASSES, (n, 8, 6), generator=gen)
        labels[torch.rand(labels.shape, generator=gen) < 0.2] = IGNORE
        features = torch.randn(n, FEAT_DIM, 4, 3, generator=gen) * (rank + 1) + 3.0 * rank
        batches.append((features, labels))
    return batches


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    estimators = {
        "diagonal": fakd.ClassCovariance(CLASSES, FEAT_DIM, diagonal=True),
        "full": fakd.ClassCovariance(CLASSES, FEAT_DIM, diagonal=False),
    }
    batches = rank_batches(rank)
    for features, labels in batches:
        for est in estimators.values():
            est.update(features, labels, IGNORE)
    torch.save(
        {
            "batches": batches,
            "seen": [tuple(f.shape) for f, _ in batches],
            **{kind: est.state_dict() for kind, est in estimators.items()},
        },
        out / f"rank{rank}.pt",
    )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
