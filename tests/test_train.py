"""The training loop: resume gives the same weights, signals save state, bad losses stop it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from fakd_deploy.distill.distiller import Distiller
from fakd_deploy.models import build_model, load_checkpoint
from fakd_deploy.recipe import TrainConfig, load_recipe
from fakd_deploy.train import Interrupted, Job, TrainingError, fit, poly_schedule

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.options.num_images=24", "data.batch_size=4", "data.val_batch_size=8"]



def tiny_job(tmp_path: Path, steps: int = 6, **train: object) -> tuple[Distiller, Job]:
    from fakd_deploy import loaders

    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml", TINY)
    torch.manual_seed(0)
    model = build_model(**recipe.student.model.build_kwargs(), num_classes=8)
    cfg = TrainConfig(steps=steps, eval_every=3, checkpoint_every=2, lr=0.01, **train)
    job = Job(out_dir=tmp_path, num_classes=8, cfg=cfg, batch_size=4, val_batch_size=8,
              train_set=loaders.dataset(recipe.data, "train", train=True),
              val_set=loaders.dataset(recipe.data, "val", train=False), seed=0)
    return Distiller(model, None, [], 8), job


def test_poly_schedule_warms_up_then_decays_to_zero() -> None:
    factor = poly_schedule(TrainConfig(steps=10, warmup_steps=2, poly_power=1.0))
    assert [round(factor(s), 6) for s in range(11)] == [
        0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0]


def test_interrupted_run_resumes_to_identical_weights(tmp_path: Path, monkeypatch) -> None:
    torch.manual_seed(0)
    distiller, job = tiny_job(tmp_path / "straight")
    fit(distiller, job)
    straight = load_checkpoint(tmp_path / "straight" / "last.pt")

    distiller, job = tiny_job(tmp_path / "resumed")
    original = Distiller.forward
    calls = {"n": 0}

    def forward_then_signal(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            signal.raise_signal(signal.SIGINT)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Distiller, "forward", forward_then_signal)
    with pytest.raises(Interrupted, match="stopped by signal"):
        fit(distiller, job)
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["step"] == 3
    monkeypatch.setattr(Distiller, "forward", original)

    distiller, job = tiny_job(tmp_path / "resumed")
    fit(distiller, job)
    resumed = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert resumed["step"] == straight["step"] == 6
    for key, value in straight["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, rtol=0, atol=1e-6, msg=key)


def test_non_finite_loss_names_the_term_and_keeps_the_last_checkpoint(tmp_path: Path,
                                                                       monkeypatch) -> None:
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
    with pytest.raises(TrainingError, match=r"non-finite loss term 'ce' at step 4"):
        fit(distiller, job)
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 4


def test_best_checkpoint_holds_the_best_validation(tmp_path: Path) -> None:
    distiller, job = tiny_job(tmp_path)
    best = fit(distiller, job)
    saved = load_checkpoint(tmp_path / "best.pt")
    assert saved["metrics"]["miou"] == pytest.approx(best["miou"])
    assert best["step"] in (3, 6)


@pytest.mark.slow
def test_sigkill_mid_training_resumes_and_finishes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    overrides = [*TINY, "teacher.train.steps=60", "teacher.train.checkpoint_every=5",
                 "teacher.train.eval_every=60"]
    cmd = [sys.executable, str(ROOT / "cli.py"), "train", str(ROOT / "recipes" / "quickstart.yaml"),
           "--out", str(out), *[arg for item in overrides for arg in ("--set", item)]]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = out / "teacher" / "last.pt"
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline:
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(last)["step"]
    assert 0 < killed_at < 60

    finish = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert finish.returncode == 0, finish.stderr
    assert f"resuming teacher from {last} at step {killed_at}/60" in " ".join(finish.stderr.split())
    assert load_checkpoint(out / "teacher" / "best.pt")["step"] == 60


@pytest.mark.slow
def test_torchrun_two_cpu_ranks_train_and_pool_fakd_statistics(tmp_path: Path,
                                                              free_port: Callable[[], int]) -> None:
    """`torchrun --nproc_per_node 2` (gloo): a teacher, then a FAKD student from it.

    With no scale augmentation every crop pixel is labelled, so the FAKD estimator in the
    student's last.pt must have counted steps x ranks x batch x (8 x 8 head pixels): both
    ranks' pixels, all-reduced inside the training loop.
    """
    steps, ranks, batch = 3, 2, 2
    overrides = ["data.options.num_images=16", f"data.batch_size={batch}", "data.scale=[1.0, 1.0]",
                 "data.val_batch_size=8", "teacher.train.steps=2", "teacher.train.eval_every=2",
                 f"student.train.steps={steps}", f"student.train.eval_every={steps}"]
    common = [str(ROOT / "recipes" / "quickstart.yaml"), "--out", str(tmp_path),
              *[arg for item in overrides for arg in ("--set", item)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for command in (["train", "--role", "teacher"], ["distill", "--variant", "fakd_kd"]):
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
                  "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                  str(ROOT / "cli.py"), command[0], *common, *command[1:]]
        done = subprocess.run(launch, capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
    last = load_checkpoint(tmp_path / "students" / "fakd_kd_s0" / "last.pt")
    assert last["step"] == steps and last["complete"]
    count = last["distiller"]["estimators.diagonal.count"]
    assert int(count.sum()) == steps * ranks * batch * 8 * 8
