"""The training loop: resume gives the same weights, signals save state, bad losses stop it."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import signal_at_forward
from torch.utils.data import DistributedSampler

from fakd_deploy.distill.distiller import Distiller
from fakd_deploy.errors import DatasetError, Interrupted, TrainingError
from fakd_deploy.models import Checkpoint, build_model
from fakd_deploy.recipe import TrainConfig, load_recipe
from fakd_deploy.train import EpochSampler, Job, fit, poly_schedule

ROOT = Path(__file__).resolve().parents[1]
TINY = Path(__file__).resolve().parent / "recipes" / "tiny.yaml"


def tiny_job(tmp_path: Path, steps: int = 6, **train: object) -> tuple[Distiller, Job]:
    from fakd_deploy.data import splits

    recipe = load_recipe(TINY)
    torch.manual_seed(0)
    model = build_model(**recipe.student.model.build_kwargs(), num_classes=6)
    cfg = TrainConfig(**{"steps": steps, "eval_every": 3, "checkpoint_every": 2, "lr": 0.01, **train})
    job = Job(
        out_dir=tmp_path,
        num_classes=6,
        cfg=cfg,
        batch_size=4,
        train_set=splits.train_dataset(recipe.data),
        val_batches=splits.ValBatches(recipe.data),
        seed=0,
    )
    return Distiller(model, None, [], 6), job


def load(path: Path) -> Checkpoint:
    return Checkpoint.load(path)


def test_poly_schedule_warms_up_then_decays_to_zero() -> None:
    factor = poly_schedule(TrainConfig(steps=10, warmup_steps=2, poly_power=1.0))
    assert [round(factor(s), 6) for s in range(11)] == [
        0.5,
        1.0,
        1.0,
        0.875,
        0.75,
        0.625,
        0.5,
        0.375,
        0.25,
        0.125,
        0.0,
    ]


def test_interrupted_run_resumes_to_identical_weights(tmp_path: Path, monkeypatch) -> None:
    torch.manual_seed(0)
    distiller, job = tiny_job(tmp_path / "straight")
    fit(distiller, job)
    straight = load(tmp_path / "straight" / "last.pt")

    distiller, job = tiny_job(tmp_path / "resumed")
    signal_at_forward(monkeypatch, 3, signal.SIGINT)
    with pytest.raises(Interrupted, match="stopped by signal"):
        fit(distiller, job)
    assert load(tmp_path / "resumed" / "last.pt").step == 3
    monkeypatch.undo()

    distiller, job = tiny_job(tmp_path / "resumed")
    fit(distiller, job)
    resumed = load(tmp_path / "resumed" / "last.pt")
    assert resumed.step == straight.step == 6
    for key, value in straight.model.items():
        torch.testing.assert_close(resumed.model[key], value, rtol=0, atol=1e-6, msg=key)


def test_an_interrupted_run_leaves_no_loader_worker_behind(tmp_path: Path, monkeypatch) -> None:
    """Loader workers ignore stop signals (the main process ends them). Were they kept alive by
    the raised error's traceback, the interpreter would wait for them forever at exit."""
    distiller, job = tiny_job(tmp_path)
    signal_at_forward(monkeypatch, 2, signal.SIGTERM)
    with pytest.raises(Interrupted) as stopped:
        fit(distiller, dataclasses.replace(job, workers=2))
    assert stopped.traceback  # its frames, fit's included, are still held here
    assert multiprocessing.active_children() == []

    def unreadable(self: object, index: int) -> None:
        raise DatasetError(f"sample {index} cannot be read")

    distiller, job = tiny_job(tmp_path / "unreadable")
    monkeypatch.setattr(type(job.train_set), "__getitem__", unreadable)  # the workers fork after
    with pytest.raises(DatasetError) as failed:  # raised inside the batch generator's own frame
        fit(distiller, dataclasses.replace(job, workers=2))
    assert failed.traceback
    assert multiprocessing.active_children() == []


def test_resume_with_gradient_accumulation_is_identical(tmp_path: Path, monkeypatch) -> None:
    distiller, job = tiny_job(tmp_path / "straight", steps=4, grad_accum=2)
    fit(distiller, job)
    straight = load(tmp_path / "straight" / "last.pt")

    distiller, job = tiny_job(tmp_path / "resumed", steps=4, grad_accum=2)
    signal_at_forward(monkeypatch, 3, signal.SIGTERM)  # in the second step's first micro-batch
    with pytest.raises(Interrupted):
        fit(distiller, job)
    monkeypatch.undo()
    assert load(tmp_path / "resumed" / "last.pt").step == 2
    distiller, job = tiny_job(tmp_path / "resumed", steps=4, grad_accum=2)
    fit(distiller, job)
    for key, value in straight.model.items():
        torch.testing.assert_close(
            load(tmp_path / "resumed" / "last.pt").model[key], value, rtol=0, atol=1e-6, msg=key
        )


def test_sampler_draws_distributed_samplers_order() -> None:
    """Resumable epochs keep the shuffle `DistributedSampler` gives (seed + epoch, drop_last)."""
    dataset = list(range(23))
    for rank, world in ((0, 1), (0, 2), (1, 2)):
        sampler = EpochSampler(len(dataset), batch_size=4, seed=7)
        sampler.rank, sampler.world = rank, world
        sampler.per_rank = len(dataset) // world
        sampler.batches_per_epoch = sampler.per_rank // 4
        reference = DistributedSampler(
            dataset, num_replicas=world, rank=rank, shuffle=True, seed=7, drop_last=True
        )
        for epoch in (0, 3):
            reference.set_epoch(epoch)
            expected = list(reference)[: sampler.batches_per_epoch * 4]
            assert sampler.epoch_indices(epoch) == expected


def test_resumed_sampler_continues_where_the_stream_was() -> None:
    full = EpochSampler(23, batch_size=4, seed=1)
    stream = iter(full)
    keys = [next(stream) for _ in range(4 * 12)]
    resumed = iter(EpochSampler(23, batch_size=4, seed=1, start_batch=7))
    assert [next(resumed) for _ in range(4 * 5)] == keys[4 * 7 :]


def test_a_plain_step_does_not_wait_for_the_device(tmp_path: Path, monkeypatch) -> None:
    """Loss values are read back only every `log_every` steps (and at checkpoints)."""
    distiller, job = tiny_job(tmp_path, steps=8, log_every=4, eval_every=8, checkpoint_every=8)
    reads = {"n": 0}
    original = torch.Tensor.item

    def counted(self):
        if sys._getframe(1).f_code.co_filename.endswith("fakd_deploy/train.py"):
            reads["n"] += 1
        return original(self)

    monkeypatch.setattr(torch.Tensor, "item", counted)
    fit(distiller, job)
    assert reads["n"] == 2  # the loss at steps 4 and 8


def test_non_finite_loss_names_the_term_and_keeps_the_last_checkpoint(tmp_path: Path, monkeypatch) -> None:
    distiller, job = tiny_job(tmp_path)
    original = Distiller.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        calls["n"] += 1
        loss, terms = original(self, *args, **kwargs)
        if calls["n"] == 5:
            terms["ce"] = loss * float("nan")
            loss = terms["ce"]
        return loss, terms

    monkeypatch.setattr(Distiller, "forward", poisoned)
    with pytest.raises(TrainingError, match=r"non-finite loss term 'ce' by step 6"):
        fit(distiller, job)
    assert load(tmp_path / "last.pt").step == 4


def test_weights_that_blow_up_are_never_saved(tmp_path: Path) -> None:
    """lr 1e6: BatchNorm statistics go inf before the loss does; last.pt keeps finite weights."""
    distiller, job = tiny_job(tmp_path, steps=12, lr=1e6, optimizer="sgd", checkpoint_every=1, eval_every=12)
    with pytest.raises(TrainingError, match=r"non-finite") as error:
        fit(distiller, job)
    message = str(error.value)
    assert "last good checkpoint" in message
    if (tmp_path / "last.pt").exists():
        saved = load(tmp_path / "last.pt")
        assert all(bool(torch.isfinite(t).all()) for t in saved.model.values() if t.is_floating_point())
        assert all(
            bool(torch.isfinite(t).all())
            for t in saved.training["distiller"].values()
            if t.is_floating_point()
        )


def test_best_checkpoint_holds_the_best_validation(tmp_path: Path) -> None:
    distiller, job = tiny_job(tmp_path)
    best = fit(distiller, job)
    saved = load(tmp_path / "best.pt")
    assert saved.metrics["miou"] == pytest.approx(best["miou"])
    assert best["step"] in (3, 6)
    assert saved.training is None and load(tmp_path / "last.pt").training is not None


def test_missing_best_is_recovered_from_a_complete_last(tmp_path: Path) -> None:
    distiller, job = tiny_job(tmp_path)
    fit(distiller, job)
    (tmp_path / "best.pt").unlink()
    distiller, job = tiny_job(tmp_path)
    metrics = fit(distiller, job)
    recovered = load(tmp_path / "best.pt")
    assert recovered.step == 6 and recovered.metrics["miou"] == pytest.approx(metrics["miou"])


@pytest.mark.slow
def test_sigkill_mid_training_resumes_and_finishes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    overrides = [
        "teacher.train.steps=60",
        "teacher.train.checkpoint_every=5",
        "teacher.train.eval_every=60",
        "teacher.train.log_every=5",
    ]
    cmd = [
        sys.executable,
        str(ROOT / "cli.py"),
        "train",
        str(TINY),
        "--out",
        str(out),
        *[arg for item in overrides for arg in ("--set", item)],
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = out / "teacher" / "last.pt"
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline:
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = load(last).step
    assert 0 < killed_at < 60

    finish = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert finish.returncode == 0, finish.stderr
    assert f"resuming teacher from {last} at step {killed_at}/60" in " ".join(finish.stderr.split())
    assert load(out / "teacher" / "best.pt").step == 60


def distributed_args(out: Path, steps: int, batch: int) -> list[str]:
    """The tiny recipe at 64x64 without scale augmentation: every crop pixel is labelled, and
    the student's head is 8 x 8, so a FAKD estimator counts steps x processes x batch x 64."""
    overrides = [
        "data.options.num_images=16",
        f"data.batch_size={batch}",
        "data.scale=[1.0, 1.0]",
        "data.options.size=64",
        "data.crop=[64, 64]",
        "teacher.train.steps=2",
        "teacher.train.eval_every=2",
        f"student.train.steps={steps}",
        f"student.train.eval_every={steps}",
        "student.model.output_stride=8",
    ]
    return [str(TINY), "--out", str(out), *[arg for item in overrides for arg in ("--set", item)]]


@pytest.mark.slow
def test_torchrun_two_cpu_ranks_train_and_pool_fakd_statistics(
    tmp_path: Path, free_port: Callable[[], int]
) -> None:
    """`torchrun --nproc_per_node 2` (gloo): a teacher, then a FAKD student from it.

    With no scale augmentation every crop pixel is labelled, so the FAKD estimator in the
    student's last.pt must have counted steps x ranks x batch x (8 x 8 head pixels): both
    ranks' pixels, all-reduced inside the training loop.
    """
    steps, ranks, batch = 3, 2, 2
    common = distributed_args(tmp_path, steps, batch)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    study = ["study", "--out", str(tmp_path / "study"), "--set", "study.lam0=[1.0]"]
    for command in (["train", "--role", "teacher"], ["distill", "--variant", "fakd_kd"], ["run"], study):
        launch = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(ranks),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
            str(ROOT / "cli.py"),
            command[0],
            *common,
            *command[1:],
        ]
        done = subprocess.run(launch, capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
    # after training, rank 0 alone evaluates, exports, builds and benches (or scores the study)
    assert json.loads((tmp_path / "report.json").read_text())["rows"]
    assert json.loads((tmp_path / "study" / "study.json").read_text())["rows"][0]["seeds"] == 1
    last = load(tmp_path / "students" / "fakd_kd_s0" / "last.pt")
    assert last.step == steps and last.complete
    count = last.training["distiller"]["estimators.diagonal.count"]
    assert int(count.sum()) == steps * ranks * batch * 8 * 8


@pytest.mark.slow
def test_two_nodes_train_one_student_and_pool_fakd_statistics(
    tmp_path: Path, free_port: Callable[[], int]
) -> None:
    """Two single-process "nodes" on localhost (`--nnodes 2`, c10d rendezvous) sharing one
    run folder: rank 0 (on node 0) holds the lock and writes; the estimator counts both
    nodes' pixels."""
    steps, batch = 3, 2
    common = distributed_args(tmp_path, steps, batch)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    teacher = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), "train", *common],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert teacher.returncode == 0, teacher.stderr[-3000:]
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--nproc_per_node",
                "1",
                "--node_rank",
                str(node),
                "--rdzv_backend",
                "c10d",
                "--rdzv_endpoint",
                endpoint,
                "--rdzv_id",
                "two-nodes",
                str(ROOT / "cli.py"),
                "distill",
                *common,
                "--variant",
                "fakd_kd",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for node in (0, 1)
    ]
    for node in nodes:
        _, err = node.communicate(timeout=300)
        assert node.returncode == 0, err[-3000:]
    last = load(tmp_path / "students" / "fakd_kd_s0" / "last.pt")
    assert last.step == steps and last.complete
    count = last.training["distiller"]["estimators.diagonal.count"]
    assert int(count.sum()) == steps * 2 * batch * 8 * 8


def test_sighup_saves_the_state_like_sigint(tmp_path: Path, monkeypatch) -> None:
    """A closed terminal (SIGHUP) stops training after the step, with last.pt saved."""
    distiller, job = tiny_job(tmp_path)
    signal_at_forward(monkeypatch, 2, signal.SIGHUP)
    with pytest.raises(Interrupted, match=f"signal {int(signal.SIGHUP)}"):
        fit(distiller, job)
    assert load(tmp_path / "last.pt").step == 2


def long_training(out: Path, workers: int) -> list[str]:
    overrides = [
        "teacher.train.steps=2000",
        "teacher.train.checkpoint_every=3",
        "teacher.train.eval_every=2000",
        "teacher.train.log_every=3",
        f"data.workers={workers}",
    ]
    return [
        sys.executable,
        str(ROOT / "cli.py"),
        "train",
        str(TINY),
        "--out",
        str(out),
        *[arg for item in overrides for arg in ("--set", item)],
    ]


def wait_for(path: Path, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while not path.exists() and time.time() < deadline:
        time.sleep(0.1)
    assert path.exists(), f"{path} never appeared"


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.slow
def test_sigterm_to_the_process_group_saves_and_exits_130(tmp_path: Path) -> None:
    """What Slurm and systemd send: SIGTERM to the whole group, loader workers included.
    Before: a DataLoader traceback and exit 1, the work since the last save lost."""
    out = tmp_path / "run"
    proc = subprocess.Popen(
        long_training(out, workers=2), stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    wait_for(out / "teacher" / "last.pt")
    assert children(proc.pid), "the loader workers should be running"
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "stopped by signal 15" in " ".join(err.split())
    assert load(out / "teacher" / "last.pt").step > 0


@pytest.mark.slow
def test_a_rerun_right_after_kill_9_is_not_refused(tmp_path: Path) -> None:
    """The loader workers of a killed trainer live on for a few seconds; they no longer
    hold the run folder's lock (before: "in use by pid N" although N was dead)."""
    from fakd_deploy.runfolder import RunFolder, RunLock
    from fakd_deploy.utils import process_alive

    out = tmp_path / "run"
    proc = subprocess.Popen(long_training(out, workers=2), stderr=subprocess.DEVNULL)
    wait_for(out / "teacher" / "last.pt")
    workers = children(proc.pid)
    assert workers
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert any(process_alive(pid) for pid in workers)  # the case: orphaned workers still running
    with RunLock(RunFolder(out)):
        pass


@pytest.mark.slow
def test_torchrun_with_a_rank_killed_says_which_in_one_line(
    tmp_path: Path, free_port: Callable[[], int]
) -> None:
    """kill -9 of rank 1: rank 0 ends with one line naming the rank and saying the same
    command resumes (before: gloo's traceback)."""
    logs = tmp_path / "logs"
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "--log-dir",
        str(logs),
        "--redirects",
        "3",
        *long_training(tmp_path / "run", workers=0)[1:],
    ]
    proc = subprocess.Popen(
        launch,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        wait_for(tmp_path / "run" / "teacher" / "last.pt", 300)
        ranks = {}
        for pid in children(proc.pid):
            env = dict(
                item.split("=", 1)
                for item in Path(f"/proc/{pid}/environ").read_text().split("\0")
                if "=" in item
            )
            ranks[env.get("RANK")] = pid
        os.kill(ranks["1"], signal.SIGKILL)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    (rank0,) = logs.glob("**/attempt_0/0/stderr.log")
    text = rank0.read_text()
    assert "Traceback" not in text, text[-3000:]
    lines = [line for line in text.splitlines() if "error:" in line]
    assert len(lines) == 1 and f"rank 1 (pid {ranks['1']})" in lines[0] and "resume" in lines[0], text[-3000:]
