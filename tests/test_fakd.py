"""FAKD's bounds and class-covariance estimator, checked in float64 against what they claim.

1. lam = 0 is the plain loss, values and gradients;  2. plain <= Monte-Carlo E <= bound;
3. pairwise with a one-hot teacher is ISDA's augmented CE;  4. the streaming estimator
is numpy's one-pass mean and variance;  5. gradcheck;  6. ranks under torchrun agree.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from fakd_deploy.distill import fakd, losses

IGNORE = 255
MC_SAMPLES = 2000
MC_SIGMAS = 4.0  # every gap must exceed this many standard errors of the Monte-Carlo mean
WORKER = Path(__file__).with_name("fakd_ddp_worker.py")

Problem = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def make_problem(seed: int, full: bool, classes: int = 4, feat_dim: int = 5, size: int = 3) -> Problem:
    """Random student/teacher logits (1, C, size, size), weight (C, A), covariance, labels."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    student, teacher, weight = randn(1, classes, size, size), 2 * randn(1, classes, size, size), \
        randn(classes, feat_dim)
    if full:
        root = randn(classes, feat_dim, feat_dim)
        covariance = root @ root.transpose(1, 2) / feat_dim + 0.1 * torch.eye(feat_dim, dtype=torch.float64)
    else:
        covariance = torch.rand(classes, feat_dim, generator=gen, dtype=torch.float64) + 0.2
    labels = torch.randint(0, classes, (1, size, size), generator=gen)
    labels[0, 0, 0] = IGNORE
    return student, teacher, weight, covariance, labels


def sample_logits(student: torch.Tensor, weight: torch.Tensor, covariance: torch.Tensor,
                  labels: torch.Tensor, lam: float, samples: int) -> torch.Tensor:
    """Draws of z~ = z + W delta, delta ~ N(0, lam Sigma_y), ignored pixels not augmented."""
    gen = torch.Generator().manual_seed(123)
    n, classes, h, w = student.shape
    feat_dim = weight.shape[1]
    y = labels.reshape(-1)
    y = torch.where(y == IGNORE, covariance.shape[0], y)
    root = torch.diag_embed(covariance.sqrt()) if covariance.dim() == 2 else torch.linalg.cholesky(covariance)
    root = torch.cat([root, root.new_zeros(1, feat_dim, feat_dim)])[y]  # (P, A, A)
    noise = torch.randn(samples, y.numel(), feat_dim, generator=gen, dtype=torch.float64)
    delta = lam**0.5 * torch.einsum("pab,spb->spa", root, noise)
    shift = (delta @ weight.T).reshape(samples, n, h, w, classes).permute(0, 1, 4, 2, 3)
    return student[None] + shift


def monte_carlo(plain: Callable[[torch.Tensor], torch.Tensor], draws: torch.Tensor) -> tuple[float, float]:
    values = torch.stack([plain(z) for z in draws])
    return values.mean().item(), (values.std() / len(values) ** 0.5).item()


# 1. lam = 0 is the plain loss ----------------------------------------------------------------

def values_and_grads(loss: Callable[..., torch.Tensor], z: torch.Tensor,
                     weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss value and its gradients w.r.t. the logits and the weight (zeros if unused)."""
    z, weight = z.clone().requires_grad_(), weight.clone().requires_grad_()
    value = loss(z, weight)
    grad_z, grad_w = torch.autograd.grad(value, (z, weight), allow_unused=True, materialize_grads=True)
    return value.detach(), grad_z, grad_w


LAM_ZERO_CASES = {
    "kd-marginal": (lambda z, t, w, cov, y: fakd.kd_loss(z, t, w, cov, y, 0.0, 2.0, "marginal"),
                    lambda z, t, w, cov, y: losses.kd_loss(z, t, 2.0, y)),
    "kd-pairwise": (lambda z, t, w, cov, y: fakd.kd_loss(z, t, w, cov, y, 0.0, 2.0, "pairwise"),
                    lambda z, t, w, cov, y: losses.kd_loss(z, t, 2.0, y)),
    "cwd": (lambda z, t, w, cov, y: fakd.cwd_loss(z, t, w, cov, y, 0.0, 4.0),
            lambda z, t, w, cov, y: losses.cwd_loss(z, t, 4.0)),
    "mse": (lambda z, t, w, cov, y: fakd.mse_loss(z, t, w, cov, y, 0.0),
            lambda z, t, w, cov, y: losses.mse_loss(z, t)),
}


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("case", list(LAM_ZERO_CASES))
def test_lam_zero_is_the_plain_loss(case: str, full: bool) -> None:
    """Bitwise equal, except pairwise's logit gradient: it sums the same terms in another
    order (a K x K softmax per pixel), so it agrees to 1e-15 in float64."""
    z, t, weight, cov, labels = make_problem(0, full)
    augmented, plain = LAM_ZERO_CASES[case]
    ours = values_and_grads(lambda x, w: augmented(x, t, w, cov, labels), z, weight)
    reference = values_and_grads(lambda x, w: plain(x, t, w, cov, labels), z, weight)
    assert torch.equal(ours[0], reference[0])
    if case == "kd-pairwise":
        torch.testing.assert_close(ours[1], reference[1], rtol=0, atol=1e-15)
    else:
        assert torch.equal(ours[1], reference[1])
    assert torch.count_nonzero(ours[2]) == 0


# 2. plain <= Monte-Carlo expectation <= bound -------------------------------------------------

@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize(("tau", "lam"), [(1.0, 1.0), (2.0, 0.5), (4.0, 4.0)])
def test_kd_bounds_sandwich_the_expected_loss(tau: float, lam: float, full: bool) -> None:
    z, t, weight, cov, labels = make_problem(10, full)
    mean, se = monte_carlo(lambda x: losses.kd_loss(x, t, tau, labels),
                           sample_logits(z, weight, cov, labels, lam, MC_SAMPLES))
    plain = losses.kd_loss(z, t, tau, labels).item()
    assert mean - plain > MC_SIGMAS * se
    for bound in ("marginal", "pairwise"):
        surrogate = fakd.kd_loss(z, t, weight, cov, labels, lam, tau, bound).item()
        assert surrogate - mean > MC_SIGMAS * se, bound


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize(("tau", "lam"), [(1.0, 1.0), (4.0, 1.0), (4.0, 16.0)])
def test_cwd_bound_sandwiches_the_expected_loss(tau: float, lam: float, full: bool) -> None:
    z, t, weight, cov, labels = make_problem(11, full)
    mean, se = monte_carlo(lambda x: losses.cwd_loss(x, t, tau),
                           sample_logits(z, weight, cov, labels, lam, MC_SAMPLES))
    plain = losses.cwd_loss(z, t, tau).item()
    surrogate = fakd.cwd_loss(z, t, weight, cov, labels, lam, tau).item()
    assert mean - plain > MC_SIGMAS * se
    assert surrogate - mean > MC_SIGMAS * se


def test_mse_is_the_exact_expectation() -> None:
    z, t, weight, cov, labels = make_problem(12, True)
    mean, se = monte_carlo(lambda x: losses.mse_loss(x, t),
                           sample_logits(z, weight, cov, labels, 2.0, MC_SAMPLES))
    assert abs(fakd.mse_loss(z, t, weight, cov, labels, 2.0).item() - mean) < MC_SIGMAS * se


def test_marginal_sits_closer_than_pairwise_on_a_random_problem() -> None:
    """The measured note of docs/fakd.md (C = 4, A = 5, diagonal, tau = 1, lam = 1)."""
    z, t, weight, cov, labels = make_problem(10, False)
    marginal = fakd.kd_loss(z, t, weight, cov, labels, 1.0, 1.0, "marginal")
    pairwise = fakd.kd_loss(z, t, weight, cov, labels, 1.0, 1.0, "pairwise")
    assert marginal < pairwise


# 3. pairwise, one-hot teacher, tau = 1 is ISDA ------------------------------------------------

def isda_cross_entropy(logits: np.ndarray, weight: np.ndarray, covariance: np.ndarray,
                       labels: np.ndarray, lam: float) -> float:
    """ISDA (Wang et al. 2019), eq. of the augmented CE, pixel by pixel:
    -log softmax(z + lam/2 * diag((W - w_y) Sigma_y (W - w_y)^T))_y."""
    total = []
    for z, y in zip(logits, labels, strict=True):
        sigma = covariance[y] if covariance.ndim == 3 else np.diag(covariance[y])
        diff = weight - weight[y]
        augmented = z + 0.5 * lam * np.einsum("ja,ab,jb->j", diff, sigma, diff)
        top = augmented.max()
        total.append(top + np.log(np.exp(augmented - top).sum()) - augmented[y])
    return float(np.mean(total))


@pytest.mark.parametrize("full", [False, True])
def test_pairwise_with_one_hot_teacher_is_isda(full: bool) -> None:
    z, _, weight, cov, labels = make_problem(20, full, classes=5, size=4)
    labels[labels == IGNORE] = 0
    one_hot = 1000.0 * torch.nn.functional.one_hot(labels, 5).permute(0, 3, 1, 2).double()
    ours = fakd.kd_loss(z, one_hot, weight, cov, labels, 0.7, 1.0, "pairwise").item()
    rows = z.permute(0, 2, 3, 1).reshape(-1, 5).numpy()
    expected = isda_cross_entropy(rows, weight.numpy(), cov.numpy(), labels.reshape(-1).numpy(), 0.7)
    assert ours == pytest.approx(expected, rel=1e-12)


# 4. the streaming estimator -----------------------------------------------------------------

def random_batches(seed: int, classes: int, feat_dim: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of random size; features off-centre per class, labels at 2x the feature size."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(7):
        n = int(torch.randint(1, 4, (1,), generator=gen))
        labels = torch.randint(0, classes, (n, 8, 6), generator=gen)
        labels[torch.rand(labels.shape, generator=gen) < 0.2] = IGNORE
        labels[labels == classes - 1] = IGNORE  # the last class is never seen
        centre = torch.arange(classes, dtype=torch.float32)[:, None] * 3.0 + 5.0
        head = labels[:, ::2, ::2].clamp(max=classes - 1)
        features = torch.randn(n, feat_dim, 4, 3, generator=gen) * 2 + centre[head].permute(0, 3, 1, 2)
        batches.append((features, labels))
    return batches


def numpy_statistics(batches: list[tuple[torch.Tensor, torch.Tensor]], classes: int,
                     full: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Count, mean and biased (co)variance per class in one pass over all valid pixels."""
    x = np.concatenate([f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]).double().numpy() for f, _ in batches])
    y = np.concatenate([lab[:, ::2, ::2].reshape(-1).numpy() for _, lab in batches])
    feat_dim = x.shape[1]
    count, mean = np.zeros(classes), np.zeros((classes, feat_dim))
    cov = np.zeros((classes, feat_dim, feat_dim) if full else (classes, feat_dim))
    for c in range(classes):
        members = x[y == c]
        count[c] = len(members)
        if len(members):
            mean[c] = members.mean(0)
            cov[c] = np.cov(members, rowvar=False, bias=True) if full else members.var(0)
    return count, mean, cov


@pytest.mark.parametrize("full", [False, True])
def test_streaming_estimator_equals_one_pass_statistics(full: bool) -> None:
    classes, feat_dim = 4, 3
    batches = random_batches(30, classes, feat_dim)
    est = fakd.ClassCovariance(classes, feat_dim, diagonal=not full)
    for features, labels in batches:
        est.update(features, labels, IGNORE)
    count, mean, cov = numpy_statistics(batches, classes, full)
    np.testing.assert_array_equal(est.count.numpy(), count)
    np.testing.assert_allclose(est.mean.numpy(), mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(est.covariance.numpy(), cov, rtol=1e-10, atol=1e-12)
    assert count[-1] == 0 and not est.covariance[-1].any()


def test_estimator_state_round_trips() -> None:
    batches = random_batches(31, 4, 3)
    est = fakd.ClassCovariance(4, 3, diagonal=False)
    est.update(*batches[0])
    assert set(est.state_dict()) == {"count", "mean", "cov"}
    copy = fakd.ClassCovariance(4, 3, diagonal=False)
    copy.load_state_dict(est.state_dict())
    for features, labels in batches[1:]:
        est.update(features, labels)
        copy.update(features, labels)
    assert torch.equal(copy.covariance, est.covariance)


def test_estimator_does_not_track_gradients() -> None:
    features = torch.randn(1, 3, 2, 2, requires_grad=True)
    est = fakd.ClassCovariance(2, 3)
    est.update(features, torch.zeros(1, 2, 2, dtype=torch.long))
    assert not est.covariance.requires_grad and est.count[0] == 4


# 5. gradcheck -------------------------------------------------------------------------------

@pytest.mark.parametrize("full", [False, True])
def test_gradcheck(full: bool) -> None:
    z, t, weight, cov, labels = make_problem(40, full, classes=3, feat_dim=4, size=2)
    z.requires_grad_()
    weight.requires_grad_()
    for bound in ("marginal", "pairwise"):
        assert torch.autograd.gradcheck(
            lambda x, w, b=bound: fakd.kd_loss(x, t, w, cov, labels, 1.5, 2.0, b), (z, weight))
    assert torch.autograd.gradcheck(lambda x, w: fakd.cwd_loss(x, t, w, cov, labels, 1.5, 2.0), (z, weight))
    assert torch.autograd.gradcheck(lambda x, w: fakd.mse_loss(x, t, w, cov, labels, 1.5), (z, weight))


# 6. under torchrun, every rank holds the covariance of the union ------------------------------


def test_ranks_agree_under_torchrun(tmp_path: Path, free_port: Callable[[], int]) -> None:
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(WORKER), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["seen"] != ranks[1]["seen"]  # the ranks were fed different batches
    for kind, full in (("diagonal", False), ("full", True)):
        assert torch.equal(ranks[0][kind]["cov"], ranks[1][kind]["cov"])
        union = [batch for rank in ranks for batch in rank["batches"]]
        count, mean, cov = numpy_statistics(union, 4, full)
        np.testing.assert_array_equal(ranks[0][kind]["count"].numpy(), count)
        np.testing.assert_allclose(ranks[0][kind]["mean"].numpy(), mean, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(ranks[0][kind]["cov"].numpy(), cov, rtol=1e-10, atol=1e-12)
