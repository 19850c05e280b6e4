"""FAKD's closed forms against the formulas of docs/fakd.md, written out pixel by pixel.

The references below are plain Python loops over images, pixels and classes in float64
numpy, written from the formulas and sharing nothing with the library: they downsample
the labels themselves (output pixel i reads input pixel floor(i * in / out), what nearest
interpolation does), form s_c(j) and q_c(j, k) from the covariance entry by entry, and
average over the pixels themselves. A wrong constant (tau instead of tau^2, a lost 1/2),
a variance on the wrong channel or pixel, or a pixel reading another pixel's class moves
the value far outside the 1e-10 tolerance.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fakd_deploy.distill import fakd

IGNORE = 255
TOL = {"rel": 1e-10, "abs": 1e-12}  # float64 throughout; the references sum in another order
TAUS = [0.5, 1.0, 2.0, 4.0]
LAM = 1.5


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: a second thread only costs


# the references ------------------------------------------------------------------------------


def nearest_labels(labels: np.ndarray, h: int, w: int) -> np.ndarray:
    """(N, H, W) -> (N, h, w): output pixel (i, j) takes input pixel (floor(i H / h), floor(j W / w))."""
    n, big_h, big_w = labels.shape
    out = np.empty((n, h, w), dtype=labels.dtype)
    for b in range(n):
        for i in range(h):
            for j in range(w):
                out[b, i, j] = labels[b, (i * big_h) // h, (j * big_w) // w]
    return out


def quadratic(u: np.ndarray, sigma: np.ndarray, v: np.ndarray) -> float:
    """u^T Sigma v, with Sigma an A x A matrix or the A-vector of a diagonal one."""
    if sigma.ndim == 1:
        return sum(u[a] * sigma[a] * v[a] for a in range(len(u)))
    return sum(u[a] * sigma[a, b] * v[b] for a in range(len(u)) for b in range(len(v)))


def log_sum_exp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def softmax(values: list[float]) -> list[float]:
    total = log_sum_exp(values)
    return [math.exp(v - total) for v in values]


def entropy(p: list[float]) -> float:
    return -sum(pk * math.log(pk) for pk in p if pk > 0)


def centred_rows(weight: np.ndarray) -> np.ndarray:
    """w_j - (1/K) sum_k w_k for every row j."""
    mean = sum(weight[k] for k in range(len(weight))) / len(weight)
    return np.stack([weight[j] - mean for j in range(len(weight))])


def kd_reference(
    student: np.ndarray,
    teacher: np.ndarray,
    weight: np.ndarray,
    cov: np.ndarray,
    labels: np.ndarray,
    lam: float,
    tau: float,
    bound: str,
    ignore: int = IGNORE,
) -> float:
    """Mean over non-ignored pixels of the KD surrogate (docs/fakd.md, "The method")."""
    n, classes, h, w = student.shape
    a = lam / (2 * tau**2)
    rows = centred_rows(weight) if bound == "centred" else weight
    y = nearest_labels(labels, h, w)
    values = []
    for b in range(n):
        for i in range(h):
            for j in range(w):
                c = y[b, i, j]
                if c == ignore:
                    continue
                z = [student[b, k, i, j] / tau for k in range(classes)]
                p = softmax([teacher[b, k, i, j] / tau for k in range(classes)])
                if bound == "pairwise":
                    terms = [
                        sum(
                            p[k]
                            * log_sum_exp(
                                [
                                    z[m] - z[k] + a * quadratic(rows[m] - rows[k], cov[c], rows[m] - rows[k])
                                    for m in range(classes)
                                ]
                            )
                            for k in range(classes)
                        )
                    ]
                else:
                    s = [quadratic(rows[m], cov[c], rows[m]) for m in range(classes)]
                    terms = [
                        -sum(p[k] * z[k] for k in range(classes)),
                        log_sum_exp([z[m] + a * s[m] for m in range(classes)]),
                    ]
                values.append(tau**2 * (sum(terms) - entropy(p)))
    return sum(values) / len(values)


def pixel_variance(weight_row: np.ndarray, cov: np.ndarray, label: int, ignore: int) -> float:
    """s_y(c) = u_c^T Sigma_y u_c; 0 for an ignored pixel (it is not augmented)."""
    return 0.0 if label == ignore else quadratic(weight_row, cov[label], weight_row)


def cwd_reference(
    student: np.ndarray,
    teacher: np.ndarray,
    weight: np.ndarray,
    cov: np.ndarray,
    labels: np.ndarray,
    lam: float,
    tau: float,
    ignore: int = IGNORE,
) -> float:
    """Mean over (image, channel) of the CWD surrogate; softmax over every pixel of the channel."""
    n, channels, h, w = student.shape
    a = lam / (2 * tau**2)
    y = nearest_labels(labels, h, w)
    pixels = [(i, j) for i in range(h) for j in range(w)]
    values = []
    for b in range(n):
        for c in range(channels):
            z = [student[b, c, i, j] / tau for i, j in pixels]
            phi = softmax([teacher[b, c, i, j] / tau for i, j in pixels])
            s = [pixel_variance(weight[c], cov, y[b, i, j], ignore) for i, j in pixels]
            value = (
                -sum(phi[i] * z[i] for i in range(len(pixels)))
                + log_sum_exp([z[i] + a * s[i] for i in range(len(pixels))])
                - entropy(phi)
            )
            values.append(tau**2 * value)
    return sum(values) / len(values)


def mse_reference(
    student: np.ndarray,
    teacher: np.ndarray,
    weight: np.ndarray,
    cov: np.ndarray,
    labels: np.ndarray,
    lam: float,
    ignore: int = IGNORE,
) -> float:
    """mean (x^S - x^T)^2 + lam * mean over pixels of sum_c s_{y_i}(c) / K (ignored pixels: 0)."""
    n, channels, h, w = student.shape
    y = nearest_labels(labels, h, w)
    squares = [
        (student[b, c, i, j] - teacher[b, c, i, j]) ** 2
        for b in range(n)
        for c in range(channels)
        for i in range(h)
        for j in range(w)
    ]
    traces = [
        sum(pixel_variance(weight[c], cov, y[b, i, j], ignore) for c in range(channels)) / channels
        for b in range(n)
        for i in range(h)
        for j in range(w)
    ]
    return sum(squares) / len(squares) + lam * sum(traces) / len(traces)


# the problems --------------------------------------------------------------------------------

Problem = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def exact_problem(
    seed: int,
    full: bool,
    label_scale: int,
    channels: int = 4,
    classes: int = 4,
    feat_dim: int = 3,
    size: tuple[int, int] = (3, 4),
) -> Problem:
    """Two images of size (h, w) != (w, h), `channels` outputs of a (channels, A) map, labels of
    `classes` classes at `label_scale` times the output size, some pixels ignored, every class
    with its own (co)variance."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    h, w = size
    student, teacher = randn(2, channels, h, w), 2 * randn(2, channels, h, w)
    weight = randn(channels, feat_dim)
    if full:
        root = randn(classes, feat_dim, feat_dim)
        cov = root @ root.transpose(1, 2) / feat_dim + 0.1 * torch.eye(feat_dim, dtype=torch.float64)
    else:
        cov = torch.rand(classes, feat_dim, generator=gen, dtype=torch.float64) * 2 + 0.2
    labels = torch.randint(0, classes, (2, h * label_scale, w * label_scale), generator=gen)
    labels[torch.rand(labels.shape, generator=gen) < 0.2] = IGNORE
    labels[0, 0, 0] = labels[1, -label_scale, -label_scale] = IGNORE  # read at every scale
    return student, teacher, weight, cov, labels


def numpy_args(*tensors: torch.Tensor) -> list[np.ndarray]:
    return [t.numpy() for t in tensors]


GRID = [(tau, full, scale) for tau in TAUS for full in (False, True) for scale in (1, 2)]
GRID_IDS = [f"tau{tau}-{'full' if full else 'diag'}-labels{scale}x" for tau, full, scale in GRID]


# the tests -----------------------------------------------------------------------------------


def test_nearest_reference_is_what_label_resizing_means() -> None:
    """The references' own downsampling picks rows/columns 0, 2, 4 at 2x and 0, 2, 4 of 7 -> 3."""
    labels = np.arange(2 * 6 * 7).reshape(2, 6, 7)
    np.testing.assert_array_equal(nearest_labels(labels, 3, 3), labels[:, ::2, [0, 2, 4]])


@pytest.mark.parametrize("bound", ["marginal", "centred", "pairwise"])
@pytest.mark.parametrize(("tau", "full", "scale"), GRID, ids=GRID_IDS)
def test_kd_bounds_equal_the_per_pixel_formula(bound: str, tau: float, full: bool, scale: int) -> None:
    z, t, weight, cov, labels = exact_problem(1, full, scale)
    ours = fakd.kd_loss(z, t, weight, cov, labels, LAM, tau, bound).item()  # type: ignore[arg-type]
    assert ours == pytest.approx(kd_reference(*numpy_args(z, t, weight, cov, labels), LAM, tau, bound), **TOL)


@pytest.mark.parametrize(("tau", "full", "scale"), GRID, ids=GRID_IDS)
def test_cwd_on_logits_equals_the_per_channel_formula(tau: float, full: bool, scale: int) -> None:
    z, t, weight, cov, labels = exact_problem(2, full, scale)
    ours = fakd.cwd_loss(z, t, weight, cov, labels, LAM, tau).item()
    assert ours == pytest.approx(cwd_reference(*numpy_args(z, t, weight, cov, labels), LAM, tau), **TOL)


@pytest.mark.parametrize(("tau", "full", "scale"), GRID, ids=GRID_IDS)
def test_cwd_on_features_equals_the_per_channel_formula(tau: float, full: bool, scale: int) -> None:
    """Five adapter channels for four classes: the channel index and the class index differ."""
    x, t, adapter, cov, labels = exact_problem(3, full, scale, channels=5)
    ours = fakd.cwd_loss(x, t, adapter, cov, labels, LAM, tau).item()
    assert ours == pytest.approx(cwd_reference(*numpy_args(x, t, adapter, cov, labels), LAM, tau), **TOL)


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("scale", [1, 2])
def test_feature_mse_equals_its_expectation_formula(full: bool, scale: int) -> None:
    x, t, adapter, cov, labels = exact_problem(4, full, scale, channels=5)
    ours = fakd.mse_loss(x, t, adapter, cov, labels, LAM).item()
    assert ours == pytest.approx(mse_reference(*numpy_args(x, t, adapter, cov, labels), LAM), **TOL)


def test_the_references_see_lam() -> None:
    """The problems are not degenerate: the augmentation moves every loss well past the tolerance."""
    args = numpy_args(*exact_problem(1, True, 2))
    for tau in TAUS:
        for bound in ("marginal", "centred", "pairwise"):
            assert kd_reference(*args, LAM, tau, bound) - kd_reference(*args, 0.0, tau, bound) > 1e-3
        assert cwd_reference(*args, LAM, tau) - cwd_reference(*args, 0.0, tau) > 1e-3
    assert mse_reference(*args, LAM) - mse_reference(*args, 0.0) > 1e-3


def test_defaults_are_tau_1_pairwise_for_kd_and_tau_4_for_cwd() -> None:
    z, t, weight, cov, labels = exact_problem(5, False, 2)
    args = numpy_args(z, t, weight, cov, labels)
    assert fakd.kd_loss(z, t, weight, cov, labels, LAM).item() == pytest.approx(
        kd_reference(*args, LAM, 1.0, "pairwise"), **TOL
    )
    assert fakd.cwd_loss(z, t, weight, cov, labels, LAM).item() == pytest.approx(
        cwd_reference(*args, LAM, 4.0), **TOL
    )


def test_an_unknown_bound_is_refused() -> None:
    z, t, weight, cov, labels = exact_problem(5, False, 1)
    with pytest.raises(ValueError, match="bound must be 'pairwise', 'marginal' or 'centred', not 'tight'"):
        fakd.kd_loss(z, t, weight, cov, labels, LAM, 1.0, "tight")  # type: ignore[arg-type]
