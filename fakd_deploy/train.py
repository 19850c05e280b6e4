"""The one training loop, for teachers, baselines and distilled students alike.

Read it top to bottom: build the optimiser and schedule, restore `last.pt` if there is
one, then step: fetch a batch, compute the distiller's loss, step the optimiser; every
`log_every` steps read the loss back (the only host synchronisation of a plain step),
evaluate now and then, save `last.pt` (and `best.pt` on a better mIoU) atomically.
The same code runs on one CPU, one GPU or many under `torchrun`: torch.distributed is
initialised from the environment when `WORLD_SIZE` is set, and every rank runs the loop.
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections.abc import Callable, Generator, Iterator
from contextlib import closing, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from fakd_deploy.data.splits import ValBatches
from fakd_deploy.distill.distiller import Distiller
from fakd_deploy.distributed import rank_and_world
from fakd_deploy.errors import FakdError, Interrupted, TrainingError
from fakd_deploy.evaluate import evaluate
from fakd_deploy.models import Checkpoint, TorchPredictor
from fakd_deploy.progress import progress_bar
from fakd_deploy.recipe import EvalConfig, TrainConfig
from fakd_deploy.signals import StopSignal, quiet_worker, signals_blocked

log = logging.getLogger(__name__)


@dataclass
class Job:
    """Everything the loop needs besides the distiller; filled in by the pipeline."""

    out_dir: Path
    train_set: Any  # (image, mask) tensors through the training augmentation
    val_batches: ValBatches
    num_classes: int
    cfg: TrainConfig
    batch_size: int
    workers: int = 0
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    ignore_index: int = 255
    eval: EvalConfig = field(default_factory=EvalConfig)
    # stored in every checkpoint: recipe, class names, role, variant, seed
    meta: dict[str, Any] = field(default_factory=dict)
    description: str = "train"


def resolve_workers(workers: int | str) -> int:
    """`auto`: one loader process per spare core of this process's share of the machine, up to 8."""
    if workers != "auto":
        return int(workers)
    per_process = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(0, min(8, per_process - 1))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


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
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 where the GPU supports it, fp16 otherwise; full precision on the CPU."""
    if cfg.amp == "off" or device.type != "cuda":
        return None
    if cfg.amp == "fp16" or (cfg.amp == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


@dataclass
class BadSample:
    """A sample a loader worker could not read: its error travels to the main process as a
    value, and is raised there as it was (one line), not wrapped in the worker's traceback."""

    error: FakdError


class SeededSamples(Dataset[tuple[torch.Tensor, torch.Tensor] | BadSample]):
    """Item (epoch, index) of a dataset, its augmentation seeded from (seed, epoch, index).

    A sample's augmentation is then the same whatever the number of loader workers and
    wherever a resumed run restarts, because nothing depends on a running RNG.
    """

    def __init__(self, dataset: Any, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor] | BadSample:
        epoch, index = key
        transform: Any = getattr(self.dataset, "transform", None)
        if hasattr(transform, "set_random_seed"):
            transform.set_random_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + index)
        try:
            image, mask = self.dataset[index]
        except FakdError as error:
            return BadSample(error)
        return image, mask


def collate(samples: list[Any]) -> Any:
    """The batch, or the first sample that could not be read."""
    bad = next((sample for sample in samples if isinstance(sample, BadSample)), None)
    return bad if bad is not None else default_collate(samples)


class EpochSampler(Sampler[tuple[int, int]]):
    """An endless stream of (epoch, index): each epoch a fresh shuffle, sharded over ranks.

    The order depends only on (seed, epoch), as `DistributedSampler` with `drop_last=True`
    draws it, and each epoch keeps a whole number of batches, so a batch never spans two
    epochs. `start_batch` skips what a resumed run already consumed.
    """

    def __init__(self, size: int, batch_size: int, seed: int, start_batch: int = 0) -> None:
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world = rank_and_world()
        self.per_rank = size // self.world
        self.batches_per_epoch = self.per_rank // batch_size
        if self.batches_per_epoch == 0:
            raise TrainingError(
                f"the training split has {size} images, fewer than one batch of {batch_size} per process"
            )
        self.start_epoch, self.skip = divmod(start_batch, self.batches_per_epoch)

    def epoch_indices(self, epoch: int) -> list[int]:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch))
        shard = order[: self.per_rank * self.world][self.rank :: self.world].tolist()
        return shard[: self.batches_per_epoch * self.batch_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, skip = self.start_epoch, self.skip
        while True:
            for index in self.epoch_indices(epoch)[skip * self.batch_size :]:
                yield epoch, index
            epoch, skip = epoch + 1, 0


def batches(job: Job, start_step: int) -> Generator[tuple[torch.Tensor, torch.Tensor], None, None]:
    """Training batches from `start_step` on.

    One loader iterator serves the whole run, so its worker processes start once and live
    as long as the run (persistent by construction); memory is pinned on CUDA. Workers
    ignore stop signals (the loop saves and stops them), and a sample that cannot be read
    is raised here as its own one-line error.
    """
    sampler = EpochSampler(len(job.train_set), job.batch_size, job.seed, start_step * job.cfg.grad_accum)
    loader = DataLoader(
        SeededSamples(job.train_set, job.seed),
        batch_size=job.batch_size,
        sampler=sampler,
        num_workers=job.workers,
        collate_fn=collate,
        drop_last=True,
        pin_memory=job.device.type == "cuda",
        generator=torch.Generator().manual_seed(job.seed),
        worker_init_fn=quiet_worker if job.workers else None,
    )
    with signals_blocked():
        stream = iter(loader)
    try:
        for batch in stream:
            if isinstance(batch, BadSample):
                raise batch.error
            yield batch
    finally:
        # The workers ignore stop signals and end when their iterator goes: drop it here, also
        # when this frame outlives the loop in a traceback (the interpreter would wait at exit).
        del stream


def rng_state() -> dict[str, Any]:
    """Every RNG the loop draws from, as tensors and plain values (safe to load)."""
    # numpy's global RandomState is an MT19937, whose legacy state is this tuple (never a dict)
    legacy = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
    kind, keys, pos, has_gauss, gauss = legacy
    state: dict[str, Any] = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def first_nonfinite(module: nn.Module) -> str | None:
    """Name of the first parameter or buffer holding inf or NaN, or None."""
    for name, tensor in module.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def validate(distiller: Distiller, job: Job) -> dict[str, Any]:
    was_training = distiller.student.training
    result = evaluate(
        TorchPredictor(distiller.student, job.device),
        job.val_batches,
        job.num_classes,
        job.ignore_index,
        job.eval,
        description="  validate",
        total=len(job.val_batches),
    )
    distiller.student.train(was_training)
    return result


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
        state = Checkpoint.load(last)
        if state.training is None:
            raise TrainingError(f"{last} holds no training state; rerun with --force to start over")
        distiller.load_state_dict(state.training["distiller"])
        optimizer.load_state_dict(state.training["optimizer"])
        scheduler.load_state_dict(state.training["scheduler"])
        scaler.load_state_dict(state.training["scaler"])
        set_rng_state(state.training["rng"])
        step, best_metrics = state.step, state.training["best_metrics"]
        if rank == 0:
            log.info(f"resuming {job.description} from {last} at step {step}/{cfg.steps}")

    model = DistributedDataParallel(distiller) if world > 1 else distiller

    def save(path: Path, metrics: dict[str, Any]) -> None:
        """best.pt: the student's weights and metadata; last.pt adds all training state.

        Weights or statistics that went non-finite are never saved: the previous file stays.
        """
        if rank != 0:
            return
        bad = first_nonfinite(distiller)
        if bad:
            raise TrainingError(
                f"'{bad}' became non-finite by step {step}; stopped without saving, "
                f"the last good checkpoint is {last if last.exists() else 'not written yet'}"
            )
        student = distiller.student
        training = None
        if path == last:
            training = {
                "distiller": distiller.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": rng_state(),
                "best_metrics": best_metrics,
            }
        Checkpoint(
            model=student.state_dict(),
            arch=student.config,
            step=step,
            complete=step >= cfg.steps,
            metrics=metrics,
            training=training,
            **job.meta,
        ).save(path)

    distiller.train()
    loss_sum = torch.zeros((), device=device)
    nonfinite: torch.Tensor | None = None  # per logged term, set once a value was inf or NaN
    since_log = 0
    # closing: the loader's workers (which ignore stop signals) end with the loop, also when it
    # raises; a traceback that kept them would leave the interpreter waiting for them at exit
    with closing(batches(job, step)) as stream, StopSignal() as stop, progress_bar("loss", "lr") as progress:
        task = progress.add_task(
            job.description, total=cfg.steps, completed=step, loss="-", lr="-", visible=rank == 0
        )
        while step < cfg.steps:
            optimizer.zero_grad(set_to_none=True)
            for _ in range(cfg.grad_accum):
                images, masks = next(stream)
                images, masks = images.to(device, non_blocking=True), masks.to(device, non_blocking=True)
                autocast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
                with autocast:
                    loss, terms = model(images, masks, step / cfg.steps)
                scaler.scale(loss / cfg.grad_accum).backward()
                flags = torch.stack([~torch.isfinite(v).all() for v in (loss.detach(), *terms.values())])
                nonfinite = flags if nonfinite is None else nonfinite | flags
                loss_sum += loss.detach()
                since_log += 1
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            progress.advance(task)

            evaluate_now = step % cfg.eval_every == 0 or step == cfg.steps
            save_now = step % cfg.checkpoint_every == 0 or step == cfg.steps or evaluate_now
            if step % cfg.log_every == 0 or save_now or stop.received is not None:
                assert nonfinite is not None
                check_finite(nonfinite, ["total", *terms], step, last, world)
                progress.update(
                    task, loss=f"{loss_sum.item() / since_log:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}"
                )
                loss_sum.zero_()
                since_log = 0

            metrics: dict[str, Any] = {}
            if evaluate_now:
                if rank == 0:
                    metrics = {
                        **validate(distiller, job),
                        "step": step,
                        "terms": {k: float(v) for k, v in terms.items()},
                    }
                    log.info(f"  {job.description} step {step}: val mIoU {metrics['miou']:.2f}")
                    if metrics["miou"] > best_metrics["miou"]:
                        best_metrics = metrics
                        save(best, metrics)
                if world > 1:
                    dist.barrier()
            if save_now:
                save(last, metrics)
            if stop.received is not None:
                save(last, metrics)
                raise Interrupted(
                    f"stopped by signal {stop.received} at step {step}; "
                    f"resume with the same command ({last} holds the state)"
                )
    if rank == 0 and not best.exists():
        best_metrics = {**validate(distiller, job), "step": step}
        log.info(
            f"{best} was missing: scored the final weights (val mIoU "
            f"{best_metrics['miou']:.2f}) and saved them as best.pt"
        )
        save(best, best_metrics)
    if world > 1:
        dist.barrier()
    return best_metrics


def check_finite(flags: torch.Tensor, names: list[str], step: int, last: Path, world: int) -> None:
    """Stop, naming the first term that went non-finite since the last check (all ranks agree)."""
    if world > 1:
        flags = flags.int()
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    bad = [name for name, flag in zip(names, flags.tolist(), strict=True) if flag]
    if bad:
        culprit = next((name for name in bad if name != "total"), "total")
        raise TrainingError(
            f"non-finite loss term '{culprit}' by step {step}; stopped, the last good "
            f"checkpoint is {last if last.exists() else 'not written yet'}"
        )
