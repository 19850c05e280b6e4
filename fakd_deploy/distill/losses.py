"""Plain segmentation and distillation losses, each the textbook formula with no augmentation.

Shapes: logits and features are (N, C, h, w); labels are (N, H, W) integer maps whose
`ignore_index` pixels count nowhere. The FAKD versions in `fakd.py` reuse the row-wise
pieces below, so at lam = 0 they run exactly the same operations as these losses.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn


def resize_labels(labels: Tensor, size: Sequence[int]) -> Tensor:
    """Nearest-neighbour resize of an (N, H, W) label map; labels are never interpolated."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    resized = F.interpolate(labels[:, None].float(), size=size, mode="nearest")
    return resized[:, 0].to(labels.dtype)


def resize_like(x: Tensor, reference: Tensor) -> Tensor:
    """Bilinear resize of x (N, C, h', w') to the spatial size of reference (the student's)."""
    if x.shape[-2:] == reference.shape[-2:]:
        return x
    return F.interpolate(x, size=reference.shape[-2:], mode="bilinear", align_corners=False)


def pixel_rows(x: Tensor) -> Tensor:
    """(N, C, h, w) -> (N*h*w, C): one row per pixel, the layout every pixel-wise loss uses."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def valid_pixels(labels: Tensor | None, size: Sequence[int], ignore_index: int) -> Tensor | None:
    """Boolean (N*h*w,) mask of pixels whose nearest-downsampled label is not ignored."""
    if labels is None:
        return None
    return resize_labels(labels, size).reshape(-1) != ignore_index


def kl_rows(teacher_logits: Tensor, student_log_probs: Tensor, tau: float) -> Tensor:
    """Per-row KL(p || q) with p = softmax(teacher / tau): sum_k p_k (log p_k - log q_k).

    `student_log_probs` are log q, given rather than computed so FAKD can pass its
    augmented log-probabilities through the very same reduction.
    """
    log_p = F.log_softmax(teacher_logits / tau, dim=-1)
    return (log_p.exp() * (log_p - student_log_probs)).sum(-1)


def mean_or_zero(x: Tensor) -> Tensor:
    """Mean of x, or a zero that keeps the graph when x is empty (an all-ignored batch)."""
    return x.sum() / max(x.numel(), 1)


def ce_loss(logits: Tensor, labels: Tensor, ignore_index: int = 255) -> Tensor:
    """Cross-entropy -log softmax(z)_y averaged over non-ignored pixels.

    The logits are upsampled bilinearly to the label resolution (the usual practice:
    the ground truth keeps its full detail). An all-ignored batch gives 0, not NaN.
    """
    logits = (
        logits
        if logits.shape[-2:] == labels.shape[-2:]
        else F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    )
    total = F.cross_entropy(logits, labels.long(), ignore_index=ignore_index, reduction="sum")
    return total / (labels != ignore_index).sum().clamp(min=1)


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    tau: float = 1.0,
    labels: Tensor | None = None,
    ignore_index: int = 255,
) -> Tensor:
    """Pixel-wise KD: tau^2 * KL(softmax(z^T/tau) || softmax(z^S/tau)), mean over valid pixels.

    Both logits at the same (head) resolution. With `labels`, pixels whose
    nearest-downsampled label is `ignore_index` are left out of sum and count.
    """
    student, teacher = pixel_rows(student_logits), pixel_rows(teacher_logits)
    valid = valid_pixels(labels, student_logits.shape[-2:], ignore_index)
    if valid is not None:
        student, teacher = student[valid], teacher[valid]
    return tau**2 * mean_or_zero(kl_rows(teacher, F.log_softmax(student / tau, dim=-1), tau))


def channel_rows(x: Tensor) -> Tensor:
    """(N, C, h, w) -> (N*C, h*w): one row per (image, channel), the layout of CWD."""
    return x.reshape(x.shape[0] * x.shape[1], -1)


def cwd_loss(student: Tensor, teacher: Tensor, tau: float = 4.0) -> Tensor:
    """Channel-wise distillation (Shu et al., ICCV 2021).

    phi_c = softmax over the h*w positions of x_c / tau, for each image and channel;
    loss = tau^2 / (N C) * sum_{n,c} KL(phi^T_c || phi^S_c). Works on logits or features.
    """
    rows = channel_rows(student)
    return tau**2 * kl_rows(channel_rows(teacher), F.log_softmax(rows / tau, dim=-1), tau).mean()


def mse_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean squared error over every element: mean (x^S - x^T)^2."""
    return F.mse_loss(student, teacher)


def cwd_feat_loss(
    student_features: Tensor, teacher_features: Tensor, adapter: nn.Conv2d, tau: float = 4.0
) -> Tensor:
    """CWD between U h (the student's features through a 1x1 adapter U) and the teacher's."""
    return cwd_loss(adapter(student_features), teacher_features, tau)


def mse_feat_loss(student_features: Tensor, teacher_features: Tensor, adapter: nn.Conv2d) -> Tensor:
    """Feature MSE mean (U h - f^T)^2, with U the 1x1 adapter to the teacher's channels."""
    return mse_loss(adapter(student_features), teacher_features)
