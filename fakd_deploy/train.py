"""The one training loop, for teachers, baselines and distilled students alike.

Read it top to bottom: build the optimiser and schedule, restore a checkpoint if there
is one, then step: fetch a batch, compute the distiller's loss, step the optimiser,
evaluate now and then, save `last.pt` (and `best.pt` on a better mIoU) atomically.
The same code runs on one CPU, one GPU or many under `torchrun`: torch.distributed is
initialised from the environment when `WORLD_SIZE` is set, and every rank runs the loop.
"""

from __future__ import annotations

import math
import os
import random
import signal
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from fakd_deploy.distill.distiller import Distiller
from fakd_deploy.evaluate import EvalMode, TorchPredictor, evaluate
from fakd_deploy.models import load_checkpoint, save_checkpoint
from fakd_deploy.progress import console, progress_bar
from fakd_deploy.recipe import TrainConfig


class TrainingError(RuntimeError):
    """Training stopped for a reason the user must see (non-finite loss, bad resume)."""


class Interrupted(RuntimeError):
    """SIGINT or SIGTERM arrived; a checkpoint was saved and the run can resume."""


@dataclass
class Job:
    """Everything the loop needs besides the distiller; filled in by the pipeline."""

    out_dir: Path
    train_set: Dataset
    val_set: Dataset
    num_classes: int
    cfg: TrainConfig
    batch_size: int
    val_batch_size: int
    workers: int = 0
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    ignore_index: int = 255
    eval_mode: EvalMode | None = None
    payload: dict[str, Any] | None = None  # recipe, arch, role... stored in every checkpoint
    description: str = "train"


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
        return torch.device("cuda", local)
    return device


def poly_schedule(cfg: TrainConfig) -> Callable[[int], float]:
    """Linear warm-up to the base lr, then (1 - t)^power decay to zero at the last step."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        span = max(cfg.steps - cfg.warmup_steps, 1)
        return max(1 - (step - cfg.warmup_steps) / span, 0.0) ** cfg.poly_power

    return factor


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 where the GPU supports it, fp16 otherwise; full precision on the CPU."""
    if cfg.amp == "off" or device.type != "cuda":
        return None
    if cfg.amp == "fp16" or (cfg.amp == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


Batch = tuple[torch.Tensor, torch.Tensor]


def batches(dataset: Dataset, job: Job, start_step: int) -> Iterator[Batch]:
    """An endless stream of shuffled batches that resumes at `start_step`'s position.

    Each epoch's order depends only on (seed, epoch), so a resumed run sees the same
    batches as an uninterrupted one; the batches already consumed are skipped by index.
    """
    rank, world = rank_and_world()
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                 seed=job.seed, drop_last=True)
    per_epoch = len(sampler) // job.batch_size
    if per_epoch == 0:
        raise TrainingError(f"the training split has {len(dataset)} images, fewer than one "
                            f"batch of {job.batch_size} per process")
    epoch, skip = divmod(start_step * job.cfg.grad_accum, per_epoch)
    while True:
        sampler.set_epoch(epoch)
        indices = list(sampler)[skip * job.batch_size:]
        loader = DataLoader(EpochSeeded(dataset, job.seed, epoch), batch_size=job.batch_size,
                            sampler=indices, num_workers=job.workers, drop_last=True,
                            pin_memory=job.device.type == "cuda",
                            generator=torch.Generator().manual_seed(job.seed + epoch))
        yield from loader
        epoch, skip = epoch + 1, 0


class EpochSeeded(Dataset):
    """Seeds each sample's augmentation from (seed, epoch, index), not from a running RNG.

    The augmentation of a sample is then the same whatever the number of workers and
    wherever a resumed run restarts.
    """

    def __init__(self, dataset: Dataset, seed: int, epoch: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Batch:
        transform = getattr(self.dataset, "transform", None)
        if hasattr(transform, "set_random_seed"):
            transform.set_random_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index)
        return self.dataset[index]


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def validate(distiller: Distiller, job: Job) -> dict[str, Any]:
    loader = DataLoader(job.val_set, batch_size=job.val_batch_size, num_workers=job.workers)
    was_training = distiller.student.training
    result = evaluate(TorchPredictor(distiller.student, job.device), loader, job.num_classes,
                      job.ignore_index, job.eval_mode, description="  validate",
                      total=len(loader))
    distiller.student.train(was_training)
    return result


class StopSignal:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def fit(distiller: Distiller, job: Job, resume: bool = True) -> dict[str, Any]:
    """Train to `cfg.steps`, resuming from `last.pt` when it exists; returns the best metrics."""
    cfg, device = job.cfg, job.device
    rank, world = rank_and_world()
    last, best = job.out_dir / "last.pt", job.out_dir / "best.pt"

    distiller.to(device)
    if world > 1 and cfg.sync_bn and device.type == "cuda":  # torch has SyncBN on GPUs only
        distiller.student = nn.SyncBatchNorm.convert_sync_batchnorm(distiller.student)
    params = [p for p in distiller.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_schedule(cfg))
    dtype = amp_dtype(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    step, best_metrics = 0, {"miou": -math.inf}
    if resume and last.exists():
        state = load_checkpoint(last)
        distiller.load_state_dict(state["distiller"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        step, best_metrics = state["step"], state["best_metrics"]
        if rank == 0:
            console.print(f"resuming {job.description} from {last} at step {step}/{cfg.steps}")

    model = DistributedDataParallel(distiller) if world > 1 else distiller

    def save(path: Path, metrics: dict[str, Any]) -> None:
        """best.pt: the student's weights and metadata; last.pt adds all training state."""
        if rank != 0:
            return
        student = distiller.student
        state = {**(job.payload or {}), "model": student.state_dict(), "arch": student.config,
                 "step": step, "complete": step >= cfg.steps, "metrics": metrics}
        if path == last:
            state.update(distiller=distiller.state_dict(), optimizer=optimizer.state_dict(),
                         scheduler=scheduler.state_dict(), scaler=scaler.state_dict(),
                         rng=rng_state(), best_metrics=best_metrics)
        save_checkpoint(path, state)

    stream = batches(job.train_set, job, step)
    distiller.train()
    with StopSignal() as stop, progress_bar("loss", "lr") as progress:
        task = progress.add_task(job.description, total=cfg.steps, completed=step,
                                 loss="-", lr="-", visible=rank == 0)
        while step < cfg.steps:
            optimizer.zero_grad(set_to_none=True)
            for _ in range(cfg.grad_accum):
                images, masks = next(stream)
                images, masks = images.to(device, non_blocking=True), masks.to(device)
                autocast = (torch.autocast(device.type, dtype=dtype) if dtype else nullcontext())
                with autocast:
                    loss, terms = model(images, masks, step / cfg.steps)
                if not torch.isfinite(loss):
                    bad = [k for k, v in terms.items() if not torch.isfinite(v).all()] or ["total"]
                    raise TrainingError(
                        f"non-finite loss term '{bad[0]}' at step {step}; stopped, the last good "
                        f"checkpoint is {last if last.exists() else 'not written yet'}")
                scaler.scale(loss / cfg.grad_accum).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            progress.update(task, advance=1, loss=f"{loss.item():.4f}",
                            lr=f"{scheduler.get_last_lr()[0]:.2e}")

            metrics: dict[str, Any] = {}
            if step % cfg.eval_every == 0 or step == cfg.steps:
                if rank == 0:
                    metrics = {**validate(distiller, job), "step": step,
                               "terms": {k: float(v) for k, v in terms.items()}}
                    progress.console.print(f"  step {step}: val mIoU {metrics['miou']:.2f}")
                    if metrics["miou"] > best_metrics["miou"]:
                        best_metrics = metrics
                        save(best, metrics)
                if world > 1:
                    dist.barrier()
            if step % cfg.checkpoint_every == 0 or step == cfg.steps or metrics:
                save(last, metrics)
            if stop.received is not None:
                save(last, metrics)
                raise Interrupted(f"stopped by signal {stop.received} at step {step}; "
                                  f"resume with the same command ({last} holds the state)")
    if world > 1:
        dist.barrier()
    return best_metrics
