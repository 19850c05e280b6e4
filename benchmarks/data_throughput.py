"""Images per second of the training data pipeline at Cityscapes size, per number of workers.

    python benchmarks/data_throughput.py                      # 0, 1, 2, ... up to the cores
    python benchmarks/data_throughput.py --workers 0 4 8 --images 64

The pipeline is the one training uses (`data.workers` loader processes): decode a
1024x2048 PNG and its label, random scale 0.5-2, pad and crop 512x1024, flip, colour
jitter, normalise, batch. A GPU step that takes T seconds for a batch of B images needs
at least B / T images/s from here, so read off the smallest worker count that delivers it.
The images are generated once into a temporary folder (`folder` dataset layout).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from fakd_deploy.data.splits import train_dataset
from fakd_deploy.recipe import DataConfig
from fakd_deploy.train import EpochSampler, SeededSamples


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cores = os.cpu_count() or 1
    parser.add_argument("--workers", type=int, nargs="+", default=sorted({0, 1, 2, cores // 2, cores}))
    parser.add_argument("--images", type=int, default=32, help="distinct images on disk")
    parser.add_argument("--batches", type=int, default=8, help="timed batches per worker count")
    parser.add_argument("--batch-size", type=int, default=2)
    return parser.parse_args()


def write_images(root: Path, count: int) -> None:
    """Cityscapes-sized PNGs: smooth colour fields (they compress like photos), 19-class labels."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.yaml").write_text("\n".join(f"- c{i}" for i in range(19)) + "\n")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:1024, 0:2048].astype(np.float32)
    for index in range(count):
        phase = rng.uniform(0, 6.28, size=3)
        image = np.stack([127 + 100 * np.sin(xx / (90 + 30 * c) + yy / 150 + phase[c]) for c in range(3)], -1)
        image += rng.normal(0, 8, image.shape)
        labels = ((xx // 128 + yy // 128 + index) % 19).astype(np.uint8)
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / "images" / f"{index}.png")
        Image.fromarray(labels).save(root / "masks" / f"{index}.png")


def images_per_second(cfg: DataConfig, workers: int, batches: int) -> float:
    dataset = train_dataset(cfg)
    sampler = EpochSampler(len(dataset), cfg.batch_size, seed=0)
    loader = DataLoader(
        SeededSamples(dataset, 0),
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=workers,
        drop_last=True,
    )
    stream = iter(loader)
    next(stream)  # workers started, first batch out
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)
    return batches * cfg.batch_size / (time.perf_counter() - start)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        write_images(Path(tmp), args.images)
        cfg = DataConfig(
            name="folder", root=tmp, crop=(512, 1024), scale=(0.5, 2.0), batch_size=args.batch_size, workers=0
        )
        print(
            f"1024x2048 PNG -> scale 0.5-2, crop 512x1024, flip, jitter, normalise; batch "
            f"{args.batch_size}; {os.cpu_count()} cores"
        )
        baseline = None
        for workers in args.workers:
            rate = images_per_second(cfg, workers, args.batches)
            baseline = baseline or rate
            print(f"  workers {workers:2d}: {rate:6.2f} images/s  ({rate / baseline:.2f}x workers 0)")


if __name__ == "__main__":
    main()
