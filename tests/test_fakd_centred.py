"""The centred KD bound: the marginal bound on the rows w_j - mean_k w_k.

The softmax ignores a shift common to every logit, and adding one vector v to every row of
W shifts every z~_j by v^T h~: the expected loss and the pairwise bound cannot see it, the
marginal bound can. Centring the rows makes the marginal form blind to it too. Exact values
against the per-pixel formula are in test_fakd_exact.py, plain <= E <= centred and its
first-order tightness in test_fakd.py.
"""

from __future__ import annotations

import pytest
import torch
from test_fakd import MC_SAMPLES, MC_SIGMAS, expected_kd, kd_per_draw, make_problem, sample_logits

from fakd_deploy.distill import fakd, losses

TAU, LAM = 2.0, 1.5


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: a second thread only costs


def shifted(weight: torch.Tensor, seed: int = 5, size: float = 3.0) -> torch.Tensor:
    """W + 1 v^T: the same vector v added to every row."""
    v = size * torch.randn(weight.shape[1], generator=torch.Generator().manual_seed(seed), dtype=weight.dtype)
    return weight + v


def value_and_weight_grad(
    bound: str,
    z: torch.Tensor,
    t: torch.Tensor,
    weight: torch.Tensor,
    cov: torch.Tensor,
    labels: torch.Tensor,
) -> tuple[float, torch.Tensor]:
    weight = weight.clone().requires_grad_()
    value = fakd.kd_loss(z, t, weight, cov, labels, LAM, TAU, bound)  # type: ignore[arg-type]
    return value.item(), torch.autograd.grad(value, weight)[0]


@pytest.mark.parametrize("full", [False, True])
def test_the_expectation_does_not_see_a_common_row_shift(full: bool) -> None:
    """Same draws delta: z + (W + 1 v^T) delta differs from z + W delta by v^T delta on every logit."""
    z, t, weight, cov, labels = make_problem(50, full)
    draws = sample_logits(z, weight, cov, labels, LAM, MC_SAMPLES)
    draws_shifted = sample_logits(z, shifted(weight), cov, labels, LAM, MC_SAMPLES)
    assert not torch.allclose(draws, draws_shifted)
    torch.testing.assert_close(
        kd_per_draw(draws_shifted, t, labels, TAU), kd_per_draw(draws, t, labels, TAU), rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("bound", ["centred", "pairwise"])
def test_centred_and_pairwise_are_invariant_to_a_common_row_shift(bound: str, full: bool) -> None:
    """Same value and same gradient, and the gradient's rows sum to zero: d/dv L(W + 1 v^T) =
    sum_j dL/dw_j = 0, no pull along the shift direction."""
    z, t, weight, cov, labels = make_problem(51, full)
    value, grad = value_and_weight_grad(bound, z, t, weight, cov, labels)
    value_shifted, grad_shifted = value_and_weight_grad(bound, z, t, shifted(weight), cov, labels)
    assert value_shifted == pytest.approx(value, rel=1e-12)
    torch.testing.assert_close(grad_shifted, grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad.sum(0), torch.zeros_like(grad[0]), rtol=0, atol=1e-12)
    assert grad.abs().max() > 1e-2


@pytest.mark.parametrize("full", [False, True])
def test_marginal_is_not_invariant_to_a_common_row_shift(full: bool) -> None:
    """What makes the test above meaningful: the uncentred bound moves, and is pulled along v."""
    z, t, weight, cov, labels = make_problem(51, full)
    value, grad = value_and_weight_grad("marginal", z, t, weight, cov, labels)
    value_shifted, _ = value_and_weight_grad("marginal", z, t, shifted(weight), cov, labels)
    assert abs(value_shifted - value) > 0.1
    assert grad.sum(0).norm() > 1e-2


@pytest.mark.parametrize("bound", ["centred", "pairwise", "marginal"])
def test_through_a_classifier_only_marginal_pulls_along_the_shift(bound: str) -> None:
    """With z = W h + b the true loss has no gradient along W -> W + 1 v^T (nor b -> b + c 1):
    plain KD's and centred's rows sum to zero, marginal's do not."""
    z, t, weight, cov, labels = make_problem(52, True)
    gen = torch.Generator().manual_seed(53)
    h = torch.randn(1, weight.shape[1], *z.shape[-2:], generator=gen, dtype=torch.float64)
    bias = torch.randn(weight.shape[0], generator=gen, dtype=torch.float64).requires_grad_()
    weight.requires_grad_()

    def loss(lam: float) -> torch.Tensor:
        logits = torch.einsum("ca,nahw->nchw", weight, h) + bias[:, None, None]
        return fakd.kd_loss(logits, t, weight, cov, labels, lam, TAU, bound)  # type: ignore[arg-type]

    for lam in (0.0, LAM):
        grad_w, grad_b = torch.autograd.grad(loss(lam), (weight, bias))
        assert abs(grad_b.sum().item()) < 1e-12
        pull = grad_w.sum(0).norm().item()
        assert pull > 1e-2 if bound == "marginal" and lam > 0 else pull < 1e-12


@pytest.mark.parametrize("full", [False, True])
def test_centred_is_far_tighter_when_the_rows_share_an_offset(full: bool) -> None:
    z, t, weight, cov, labels = make_problem(54, full)
    weight = shifted(weight)
    mean, se = expected_kd(z, t, weight, cov, labels, LAM, TAU)
    centred = fakd.kd_loss(z, t, weight, cov, labels, LAM, TAU, "centred").item()
    marginal = fakd.kd_loss(z, t, weight, cov, labels, LAM, TAU, "marginal").item()
    assert mean + MC_SIGMAS * se < centred
    assert centred - mean < (marginal - mean) / 2


def test_centred_is_not_always_tighter_than_marginal() -> None:
    """A confident student on a class whose row is zero: the best shift (a softmax-weighted mean
    of the rows) is that row, so the uncentred rows win. One pixel, C = 3, A = 2, tau = 1."""
    z = torch.tensor([6.0, 0.0, 0.0], dtype=torch.float64).reshape(1, 3, 1, 1)
    weight = torch.tensor([[0.0, 0.0], [3.0, 1.0], [3.0, -1.0]], dtype=torch.float64)
    cov = torch.ones(3, 2, dtype=torch.float64)
    labels = torch.zeros(1, 1, 1, dtype=torch.long)
    mean, se = expected_kd(z, z, weight, cov, labels, 1.0, 1.0)
    marginal = fakd.kd_loss(z, z, weight, cov, labels, 1.0, 1.0, "marginal").item()
    centred = fakd.kd_loss(z, z, weight, cov, labels, 1.0, 1.0, "centred").item()
    assert losses.kd_loss(z, z).item() < mean - MC_SIGMAS * se
    assert mean + MC_SIGMAS * se < marginal < centred - 1.0
