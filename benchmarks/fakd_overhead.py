"""What FAKD adds to a training step: KD vs FAKD-KD and CWD vs FAKD-CWD, measured in one run.

    python benchmarks/fakd_overhead.py                          # 256x512, batch 2, 5 rounds
    python benchmarks/fakd_overhead.py --height 64 --width 128 --rounds 2     # a quick look

A step is what the training loop does: student and teacher forward, backward, optimiser
step. Student DeepLabV3-R18, teacher DeepLabV3-R50, both output stride 8, random weights.
Configurations run round-robin (one step each per round), so a slow spell on a shared
machine hits all of them alike; the medians and their ratios are printed. A second table
times the loss terms alone (forward + backward on the real head-sized tensors).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from fakd_deploy.distill import Distiller, LossTerm
from fakd_deploy.models import build_model

NUM_CLASSES = 19
CONFIGS = {
    "kd": LossTerm(loss="kd", tau=1.0),
    "fakd_kd_marginal": LossTerm(loss="kd", tau=1.0, lam0=1.0, bound="marginal"),
    "fakd_kd_pairwise": LossTerm(loss="kd", tau=1.0, lam0=1.0, bound="pairwise"),
    "cwd": LossTerm(loss="cwd", tau=4.0, weight=3.0),
    "fakd_cwd": LossTerm(loss="cwd", tau=4.0, weight=3.0, lam0=5.0),
}
BASELINE = {"fakd_kd_marginal": "kd", "fakd_kd_pairwise": "kd", "fakd_cwd": "cwd"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return parser.parse_args()


def make_step(
    term: LossTerm, teacher: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor
) -> Callable[[], None]:
    """One configuration: its own student and optimiser, the shared frozen teacher."""
    torch.manual_seed(0)
    student = build_model("deeplabv3", NUM_CLASSES, "resnet18", output_stride=8)
    distiller = Distiller(student, teacher, [term], NUM_CLASSES).train()
    optimizer = torch.optim.SGD(distiller.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss, _ = distiller(images, labels, progress=0.5)
        loss.backward()
        optimizer.step()

    return step


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one call; on a shared machine the CPU time
    is the steadier of the two (it does not count time spent waiting for a core)."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def round_robin(
    fns: dict[str, Callable[[], object]], rounds: int, warmup: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall and CPU seconds per call of each function, calls interleaved."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    for index in range(warmup + rounds):
        for name, fn in fns.items():
            elapsed = timed(fn)
            if index >= warmup:
                times[name].append(elapsed)
    return (
        {name: statistics.median(wall for wall, _ in values) for name, values in times.items()},
        {name: statistics.median(cpu for _, cpu in values) for name, values in times.items()},
    )


def loss_only(
    term: LossTerm, distiller: Distiller, out: object, teacher_out: object, labels: torch.Tensor
) -> Callable[[], None]:
    """The term's forward and backward alone, plus the estimator update for FAKD terms."""

    def run() -> None:
        if term.lam0 > 0:
            distiller.update_estimators(out.features, labels)  # type: ignore[attr-defined]
        value = distiller.term_loss(term.loss, term, out, teacher_out, labels, 0.5 * term.lam0)
        value.backward()

    return run


def report(title: str, medians: dict[str, float], unit: float, label: str) -> None:
    print(f"\n{title}")
    for name, median in medians.items():
        ratio = f"  x{median / medians[BASELINE[name]]:.3f} vs {BASELINE[name]}" if name in BASELINE else ""
        print(f"  {name:18s} {median * unit:9.2f} {label}{ratio}")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images = torch.randn(args.batch, 3, args.height, args.width)
    labels = torch.randint(0, NUM_CLASSES, (args.batch, args.height, args.width))
    labels[:, : args.height // 8] = 255
    teacher = build_model("deeplabv3", NUM_CLASSES, "resnet50", output_stride=8)
    steps = {name: make_step(term, teacher, images, labels) for name, term in CONFIGS.items()}
    print(
        f"{args.batch}x3x{args.height}x{args.width}, {args.threads} threads, "
        f"{args.rounds} rounds after {args.warmup} warm-up"
    )
    wall, cpu = round_robin(steps, args.rounds, args.warmup)
    report("full training step, wall clock (median)", wall, 1.0, "s")
    report("full training step, process CPU time (median)", cpu, 1.0, "s")

    student = build_model("deeplabv3", NUM_CLASSES, "resnet18", output_stride=8)
    with torch.no_grad():
        out, teacher_out = student.forward_train(images), teacher.eval().forward_train(images)
    out.logits.requires_grad_()
    out.features.requires_grad_()
    terms = {name: (term, Distiller(student, teacher, [term], NUM_CLASSES)) for name, term in CONFIGS.items()}
    losses = {
        name: loss_only(term, distiller, out, teacher_out, labels)
        for name, (term, distiller) in terms.items()
    }
    wall, _ = round_robin(losses, 20, 2)
    report(
        "loss term alone, forward + backward, FAKD with its estimator update (median wall)", wall, 1e3, "ms"
    )


if __name__ == "__main__":
    main()
