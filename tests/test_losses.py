"""The plain losses against their textbook formulas, written out independently in float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fakd_deploy.distill import losses

TOL = {"rtol": 1e-12, "atol": 1e-12}


def log_softmax_np(x: np.ndarray, axis: int) -> np.ndarray:
    x = x - x.max(axis=axis, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64)


def test_resize_labels_is_nearest() -> None:
    labels = torch.arange(16).reshape(1, 4, 4)
    assert torch.equal(losses.resize_labels(labels, (2, 2)), labels[:, ::2, ::2])
    assert losses.resize_labels(labels, (4, 4)) is labels
    odd = torch.arange(2 * 7 * 9).reshape(2, 7, 9)  # output pixel i reads input pixel floor(i * in / out)
    rows, cols = [i * 7 // 3 for i in range(3)], [j * 9 // 4 for j in range(4)]
    assert rows == [0, 2, 4] and cols == [0, 2, 4, 6]
    assert torch.equal(losses.resize_labels(odd, (3, 4)), odd[:, rows][:, :, cols])
    assert losses.resize_labels(odd.to(torch.uint8), (3, 4)).dtype == torch.uint8


def test_resize_like_is_bilinear_and_leaves_a_same_size_input_alone() -> None:
    x, reference = randn(1, 2, 3, 4), randn(1, 5, 6, 8)
    expected = F.interpolate(x, size=(6, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(losses.resize_like(x, reference), expected, **TOL)
    assert losses.resize_like(x, randn(1, 5, 3, 4)) is x


def test_ce_upsamples_logits_to_labels_and_skips_ignored() -> None:
    torch.manual_seed(0)
    logits, labels = randn(2, 3, 4, 4), torch.randint(0, 3, (2, 8, 8))
    labels[0, :3] = 255
    up = F.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=False)
    expected = F.cross_entropy(up, labels, ignore_index=255)
    torch.testing.assert_close(losses.ce_loss(logits, labels), expected, **TOL)


def test_ce_with_one_valid_pixel_is_its_negative_log_probability() -> None:
    logits = randn(1, 3, 2, 2)
    labels = torch.full((1, 2, 2), 255)
    labels[0, 1, 0] = 2
    expected = -torch.log_softmax(logits[0, :, 1, 0], 0)[2]
    torch.testing.assert_close(losses.ce_loss(logits, labels), expected, **TOL)


def test_ce_of_an_all_ignored_batch_is_zero_not_nan() -> None:
    logits = randn(1, 3, 2, 2).requires_grad_()
    loss = losses.ce_loss(logits, torch.full((1, 2, 2), 255))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_kd_matches_formula_over_valid_pixels(tau: float) -> None:
    torch.manual_seed(1)
    student, teacher = randn(2, 4, 3, 3), randn(2, 4, 3, 3)
    labels = torch.randint(0, 4, (2, 6, 6))
    labels[1, 2:4] = 255  # head row 1 of image 1 (nearest picks label rows 0, 2, 4)
    s, t = student.numpy() / tau, teacher.numpy() / tau
    log_p, log_q = log_softmax_np(t, 1), log_softmax_np(s, 1)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(1)  # (N, h, w)
    valid = labels[:, ::2, ::2].numpy() != 255
    expected = tau**2 * kl[valid].mean()
    assert losses.kd_loss(student, teacher, tau, labels).item() == pytest.approx(expected, rel=1e-12)
    assert losses.kd_loss(student, teacher, tau).item() == pytest.approx(tau**2 * kl.mean(), rel=1e-12)
    if tau == 1.0:  # the default
        assert losses.kd_loss(student, teacher, labels=labels).item() == pytest.approx(expected, rel=1e-12)


def test_kd_ignores_what_happens_at_ignored_pixels() -> None:
    torch.manual_seed(2)
    student, teacher = randn(1, 3, 2, 2), randn(1, 3, 2, 2)
    labels = torch.tensor([[[0, 255], [1, 2]]])
    changed = student.clone()
    changed[0, :, 0, 1] += 100.0
    assert losses.kd_loss(student, teacher, 1.0, labels) == losses.kd_loss(changed, teacher, 1.0, labels)


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_cwd_matches_formula(tau: float) -> None:
    torch.manual_seed(3)
    student, teacher = randn(2, 3, 4, 5), randn(2, 3, 4, 5)
    n, c = student.shape[:2]
    s = student.numpy().reshape(n, c, -1) / tau
    t = teacher.numpy().reshape(n, c, -1) / tau
    log_p, log_q = log_softmax_np(t, 2), log_softmax_np(s, 2)  # softmax over positions
    expected = tau**2 / (n * c) * (np.exp(log_p) * (log_p - log_q)).sum()
    assert losses.cwd_loss(student, teacher, tau).item() == pytest.approx(expected, rel=1e-12)
    if tau == 4.0:  # the default
        assert losses.cwd_loss(student, teacher).item() == pytest.approx(expected, rel=1e-12)


def test_identical_inputs_give_zero_distillation_loss() -> None:
    x = randn(2, 3, 4, 4)
    assert losses.kd_loss(x, x.clone()).abs().item() < 1e-14
    assert losses.cwd_loss(x, x.clone()).abs().item() < 1e-14


def test_feature_losses_go_through_the_adapter() -> None:
    torch.manual_seed(4)
    adapter = nn.Conv2d(5, 3, 1).double()
    student, teacher = randn(2, 5, 4, 4), randn(2, 3, 4, 4)
    adapted = adapter(student)
    torch.testing.assert_close(
        losses.cwd_feat_loss(student, teacher, adapter, 2.0), losses.cwd_loss(adapted, teacher, 2.0), **TOL
    )
    torch.testing.assert_close(
        losses.cwd_feat_loss(student, teacher, adapter), losses.cwd_loss(adapted, teacher, 4.0), **TOL
    )
    expected = ((adapted - teacher) ** 2).mean()
    torch.testing.assert_close(losses.mse_feat_loss(student, teacher, adapter), expected, **TOL)
