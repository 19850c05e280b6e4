"""FAKD's bounds and class-covariance estimator, checked in float64 against what they claim.

1. lam = 0 is the plain loss, values and gradients;  2. plain <= Monte-Carlo E <= bound, and
as lam -> 0 each bound's excess over the plain loss is the first-order excess derived below;
3. pairwise with a one-hot teacher is ISDA's augmented CE;  4. the streaming estimator
is numpy's one-pass mean and variance;  5. gradcheck;  6. ranks under torchrun agree.
Exact values against per-pixel formulas are in test_fakd_exact.py; the centred bound's
shift invariance in test_fakd_centred.py.
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

    student, teacher, weight = (
        randn(1, classes, size, size),
        2 * randn(1, classes, size, size),
        randn(classes, feat_dim),
    )
    if full:
        root = randn(classes, feat_dim, feat_dim)
        covariance = root @ root.transpose(1, 2) / feat_dim + 0.1 * torch.eye(feat_dim, dtype=torch.float64)
    else:
        covariance = torch.rand(classes, feat_dim, generator=gen, dtype=torch.float64) + 0.2
    labels = torch.randint(0, classes, (1, size, size), generator=gen)
    labels[0, 0, 0] = IGNORE
    return student, teacher, weight, covariance, labels


def sample_logits(
    student: torch.Tensor,
    weight: torch.Tensor,
    covariance: torch.Tensor,
    labels: torch.Tensor,
    lam: float,
    samples: int,
) -> torch.Tensor:
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


def log_softmax_np(x: np.ndarray, axis: int) -> np.ndarray:
    x = x - x.max(axis=axis, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def kd_per_draw(draws: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, tau: float) -> np.ndarray:
    """Plain tau^2 KL(p || softmax(z~/tau)) of every draw (S, N, C, h, w), mean over valid pixels."""
    log_q = log_softmax_np(draws.numpy() / tau, axis=2)
    log_p = log_softmax_np(teacher.numpy() / tau, axis=1)[None]
    kl = (np.exp(log_p) * (log_p - log_q)).sum(2)  # (S, N, h, w)
    return tau**2 * kl[:, labels.numpy() != IGNORE].mean(1)


def cwd_per_draw(draws: torch.Tensor, teacher: torch.Tensor, tau: float) -> np.ndarray:
    """Plain CWD of every draw: softmax over the pixels of each (image, channel), mean over them."""
    s, n, c = draws.shape[:3]
    log_q = log_softmax_np(draws.numpy().reshape(s, n, c, -1) / tau, axis=3)
    log_p = log_softmax_np(teacher.numpy().reshape(1, n, c, -1) / tau, axis=3)
    return tau**2 * (np.exp(log_p) * (log_p - log_q)).sum(3).mean((1, 2))


def monte_carlo(values: np.ndarray) -> tuple[float, float]:
    """Mean of per-draw values and its standard error."""
    return float(values.mean()), float(values.std(ddof=1) / len(values) ** 0.5)


def expected_kd(
    z: torch.Tensor,
    t: torch.Tensor,
    weight: torch.Tensor,
    covariance: torch.Tensor,
    labels: torch.Tensor,
    lam: float,
    tau: float,
) -> tuple[float, float]:
    """Monte-Carlo E[tau^2 KL(p || softmax(z~/tau))] and its standard error."""
    draws = sample_logits(z, weight, covariance, labels, lam, MC_SAMPLES)
    return monte_carlo(kd_per_draw(draws, t, labels, tau))


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: a second thread only costs


# 1. lam = 0 is the plain loss ----------------------------------------------------------------


def values_and_grads(
    loss: Callable[..., torch.Tensor], z: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss value and its gradients w.r.t. the logits and the weight (zeros if unused)."""
    z, weight = z.clone().requires_grad_(), weight.clone().requires_grad_()
    value = loss(z, weight)
    grad_z, grad_w = torch.autograd.grad(value, (z, weight), allow_unused=True, materialize_grads=True)
    return value.detach(), grad_z, grad_w


LAM_ZERO_CASES = {
    "kd-marginal": (
        lambda z, t, w, cov, y: fakd.kd_loss(z, t, w, cov, y, 0.0, 2.0, "marginal"),
        lambda z, t, w, cov, y: losses.kd_loss(z, t, 2.0, y),
    ),
    "kd-pairwise": (
        lambda z, t, w, cov, y: fakd.kd_loss(z, t, w, cov, y, 0.0, 2.0, "pairwise"),
        lambda z, t, w, cov, y: losses.kd_loss(z, t, 2.0, y),
    ),
    "cwd": (
        lambda z, t, w, cov, y: fakd.cwd_loss(z, t, w, cov, y, 0.0, 4.0),
        lambda z, t, w, cov, y: losses.cwd_loss(z, t, 4.0),
    ),
    "mse": (
        lambda z, t, w, cov, y: fakd.mse_loss(z, t, w, cov, y, 0.0),
        lambda z, t, w, cov, y: losses.mse_loss(z, t),
    ),
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

BOUNDS = ("marginal", "centred", "pairwise")


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize(("tau", "lam"), [(1.0, 1.0), (2.0, 0.5), (4.0, 4.0)])
def test_kd_bounds_sandwich_the_expected_loss(tau: float, lam: float, full: bool) -> None:
    z, t, weight, cov, labels = make_problem(10, full)
    mean, se = expected_kd(z, t, weight, cov, labels, lam, tau)
    plain = losses.kd_loss(z, t, tau, labels).item()
    assert mean - plain > MC_SIGMAS * se
    for bound in BOUNDS:
        surrogate = fakd.kd_loss(z, t, weight, cov, labels, lam, tau, bound).item()
        assert surrogate - mean > MC_SIGMAS * se, bound


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize(("tau", "lam"), [(1.0, 1.0), (4.0, 1.0), (4.0, 16.0)])
def test_cwd_bound_sandwiches_the_expected_loss(tau: float, lam: float, full: bool) -> None:
    z, t, weight, cov, labels = make_problem(11, full)
    mean, se = monte_carlo(cwd_per_draw(sample_logits(z, weight, cov, labels, lam, MC_SAMPLES), t, tau))
    plain = losses.cwd_loss(z, t, tau).item()
    surrogate = fakd.cwd_loss(z, t, weight, cov, labels, lam, tau).item()
    assert mean - plain > MC_SIGMAS * se
    assert surrogate - mean > MC_SIGMAS * se


def test_mse_is_the_exact_expectation() -> None:
    z, t, weight, cov, labels = make_problem(12, True)
    draws = sample_logits(z, weight, cov, labels, 2.0, MC_SAMPLES).numpy()
    mean, se = monte_carlo(((draws - t.numpy()[None]) ** 2).mean((1, 2, 3, 4)))
    assert abs(fakd.mse_loss(z, t, weight, cov, labels, 2.0).item() - mean) < MC_SIGMAS * se


def first_order_slopes(
    z: torch.Tensor,
    t: torch.Tensor,
    weight: torch.Tensor,
    cov: torch.Tensor,
    labels: torch.Tensor,
    tau: float,
) -> dict[str, float]:
    """d/dlam at lam = 0 of the expected KD loss and of each bound, mean over valid pixels.

    With pi = softmax(z/tau), p = softmax(z^T/tau) and S = W Sigma_y W^T (the covariance of
    z~ per unit lam), a second-order expansion of log-sum-exp gives, per pixel,
      expectation: 1/2 [sum_j pi_j S_jj - pi^T S pi]      (the softmax's Hessian against S)
      marginal:    1/2 sum_j pi_j S_jj
      centred:     1/2 sum_j pi_j S'_jj,  S' from the centred rows w_j - mean_k w_k
      pairwise:    1/2 sum_k p_k sum_j pi_j (S_jj + S_kk - 2 S_jk)
    tau cancels in all of them (tau^2 outside, 1/tau^2 inside): a bound scaled by lam/(2 tau)
    instead of lam/(2 tau^2) is off by a factor tau.
    """
    w = weight.numpy()
    centred = w - w.mean(0)
    slopes = dict.fromkeys(("expectation", *BOUNDS), 0.0)
    valid = [(i, j) for i in range(z.shape[2]) for j in range(z.shape[3]) if labels[0, i, j] != IGNORE]
    for i, j in valid:
        c = int(labels[0, i, j])
        sigma = cov[c].numpy() if cov.dim() == 3 else np.diag(cov[c].numpy())
        pi = np.exp(log_softmax_np(z[0, :, i, j].numpy() / tau, axis=0))
        p = np.exp(log_softmax_np(t[0, :, i, j].numpy() / tau, axis=0))
        s, s_centred = w @ sigma @ w.T, centred @ sigma @ centred.T
        pair = np.diag(s)[:, None] + np.diag(s)[None, :] - 2 * s
        slopes["expectation"] += 0.5 * (pi @ np.diag(s) - pi @ s @ pi) / len(valid)
        slopes["marginal"] += 0.5 * pi @ np.diag(s) / len(valid)
        slopes["centred"] += 0.5 * pi @ np.diag(s_centred) / len(valid)
        slopes["pairwise"] += 0.5 * p @ pair @ pi / len(valid)
    return slopes


SMALL_LAM, TIGHTNESS_BAND = 1e-3, 0.05


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0, 4.0])
def test_small_lam_excess_ratio_is_the_first_order_ratio(tau: float, full: bool) -> None:
    """As lam -> 0, (bound - plain) / (E - plain) tends to slope_bound / slope_E >= 1.

    E - plain is measured by Monte Carlo with antithetic pairs (z + W delta, z - W delta), whose
    odd orders cancel, so its relative error stays ~1 % however small lam is. Each ratio must
    sit within 5 % of the first-order ratio; a variance term off by a factor tau (2, 4, 0.5)
    falls far outside that band.
    """
    z, t, weight, cov, labels = make_problem(10, full)
    slopes = first_order_slopes(z, t, weight, cov, labels, tau)
    plain = losses.kd_loss(z, t, tau, labels).item()
    draws = sample_logits(z, weight, cov, labels, SMALL_LAM, MC_SAMPLES)
    mirrored = 2 * z[None] - draws
    excess, se = monte_carlo(
        (kd_per_draw(draws, t, labels, tau) + kd_per_draw(mirrored, t, labels, tau)) / 2 - plain
    )
    assert se < 0.02 * excess
    assert excess == pytest.approx(SMALL_LAM * slopes["expectation"], rel=TIGHTNESS_BAND)
    for bound in BOUNDS:
        ratio = (fakd.kd_loss(z, t, weight, cov, labels, SMALL_LAM, tau, bound).item() - plain) / excess
        first_order = slopes[bound] / slopes["expectation"]
        assert first_order >= 1
        assert ratio == pytest.approx(first_order, rel=TIGHTNESS_BAND), bound


# 3. pairwise, one-hot teacher, tau = 1 is ISDA ------------------------------------------------


def isda_cross_entropy(
    logits: np.ndarray, weight: np.ndarray, covariance: np.ndarray, labels: np.ndarray, lam: float
) -> float:
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


def numpy_statistics(
    batches: list[tuple[torch.Tensor, torch.Tensor]], classes: int, full: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


def test_a_class_seen_once_and_a_class_never_seen() -> None:
    """A first batch with no ignored pixel: one pixel of class 1 is its mean, with no spread, and
    class 2 stays empty. Diagonal is the default."""
    features = torch.arange(12, dtype=torch.float32).reshape(1, 3, 2, 2)
    est = fakd.ClassCovariance(3, 3)
    est.update(features, torch.tensor([[[0, 0], [1, 0]]]))
    assert est.covariance.shape == (3, 3)
    assert est.count.tolist() == [3, 1, 0]
    assert est.mean[1].tolist() == features[0, :, 1, 0].tolist()
    assert not est.covariance[1:].any() and not est.mean[2].any()


def test_counts_stay_exact_past_float32_precision() -> None:
    """2^24 + 1 pixels of a class (a few hundred batches at head resolution): a float32 count
    would stop at 2^24 and mis-weight every later merge."""
    est = fakd.ClassCovariance(2, 3)
    est.count[0] = 2**24
    est.update(torch.zeros(1, 3, 1, 1), torch.zeros(1, 1, 1, dtype=torch.long))
    assert est.count[0].item() == 2**24 + 1


def test_all_reduce_sums_every_statistic_in_one_collective(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two simulated ranks holding the same statistics: each comes back doubled, in its own shape."""
    calls = []

    def all_reduce(tensor: torch.Tensor) -> None:
        calls.append(tensor.shape)
        tensor.mul_(2)

    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    tensors = [torch.arange(3.0), torch.arange(6.0).reshape(2, 3), torch.arange(8.0).reshape(2, 2, 2)]
    reduced = fakd.all_reduce_sum([t.clone() for t in tensors])
    assert calls == [(17,)]
    assert [r.shape for r in reduced] == [t.shape for t in tensors]
    assert all(torch.equal(r, 2 * t) for r, t in zip(reduced, tensors, strict=True))


# 5. gradcheck -------------------------------------------------------------------------------


@pytest.mark.parametrize("full", [False, True])
def test_gradcheck(full: bool) -> None:
    z, t, weight, cov, labels = make_problem(40, full, classes=3, feat_dim=4, size=2)
    z.requires_grad_()
    weight.requires_grad_()
    for bound in ("marginal", "pairwise"):
        assert torch.autograd.gradcheck(
            lambda x, w, b=bound: fakd.kd_loss(x, t, w, cov, labels, 1.5, 2.0, b), (z, weight)
        )
    assert torch.autograd.gradcheck(lambda x, w: fakd.cwd_loss(x, t, w, cov, labels, 1.5, 2.0), (z, weight))
    assert torch.autograd.gradcheck(lambda x, w: fakd.mse_loss(x, t, w, cov, labels, 1.5), (z, weight))


# 6. under torchrun, every rank holds the covariance of the union ------------------------------


@pytest.mark.slow
def test_ranks_agree_under_torchrun(tmp_path: Path, free_port: Callable[[], int]) -> None:
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(WORKER),
        str(tmp_path),
    ]
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
