"""FAKD: distillation from infinitely many feature-augmented students, in closed form.

The student's pre-classifier feature h of a pixel labelled y is augmented as
h~ = h + delta, delta ~ N(0, lam * Sigma_y), with Sigma_y the running covariance of
class y's features (`ClassCovariance`). Through the 1x1 classifier z = W h + b this is
z~ ~ N(z, lam * W Sigma_y W^T), and the expected distillation loss over z~ is bounded
above in closed form (Jensen + the Gaussian moment generating function). The losses
below minimise those bounds; the teacher is never augmented. See docs/fakd.md.

This is a reconstruction from the paper's abstract and from ISDA (Wang et al., 2019):
the authors released no code. Usable on its own, without the rest of fakd-deploy:

    est = ClassCovariance(num_classes, feat_dim)
    est.update(features, labels)
    loss = kd_loss(z_s, z_t, classifier_weight, est.covariance, labels, lam)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from fakd_deploy.distill import losses

Bound = Literal["pairwise", "marginal", "centred"]


class ClassCovariance(nn.Module):
    """Per-class count N_c, mean mu_c and (biased) covariance Sigma_c of detached features.

    Exact streaming merge (Chan et al.) in float64, so the result equals one pass over
    every pixel seen, whatever the batch sizes. Under torch.distributed the batch
    statistics are summed over ranks first, so every rank holds the same Sigma.
    Sigma_c is an A-vector (diagonal, the default) or an A x A matrix (for small A).
    Buffers `count`, `mean`, `cov` travel in `state_dict()` and checkpoints.
    """

    count: Tensor
    mean: Tensor
    cov: Tensor

    def __init__(self, num_classes: int, feat_dim: int, diagonal: bool = True) -> None:
        super().__init__()
        self.num_classes, self.feat_dim, self.diagonal = num_classes, feat_dim, diagonal
        cov_shape = (num_classes, feat_dim) if diagonal else (num_classes, feat_dim, feat_dim)
        self.register_buffer("count", torch.zeros(num_classes, dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(num_classes, feat_dim, dtype=torch.float64))
        self.register_buffer("cov", torch.zeros(cov_shape, dtype=torch.float64))

    @property
    def covariance(self) -> Tensor:
        """(C, A) diagonal or (C, A, A) full; zeros for a class not seen yet (no augmentation)."""
        return self.cov

    @torch.no_grad()
    def update(self, features: Tensor, labels: Tensor, ignore_index: int = 255) -> None:
        """Fold one batch in: features (N, A, h, w), labels (N, H, W) nearest-resized to (h, w)."""
        sums = self.batch_sums(features.detach().to(self.mean.dtype), labels, ignore_index)
        self.merge(*all_reduce_sum(sums))

    def batch_sums(self, features: Tensor, labels: Tensor, ignore_index: int) -> list[Tensor]:
        """Per class, over non-ignored pixels: n_c, sum h, and sum h*h (diagonal) or sum h h^T.

        One-hot matrix products on the (N, A, h*w) layout: no transposed copy of the features,
        and memory P x C + C x A, never P x C x A. Ignored pixels get an all-zero one-hot row.
        """
        n, a = features.shape[:2]
        x = features.reshape(n, a, -1)
        y = losses.resize_labels(labels, features.shape[-2:]).reshape(n, -1).long()
        y = torch.where(y == ignore_index, self.num_classes, y)
        onehot = F.one_hot(y, self.num_classes + 1)[..., : self.num_classes].to(x.dtype)
        count, total = onehot.sum((0, 1)), (x @ onehot).sum(0).T
        if self.diagonal:
            return [count, total, ((x * x) @ onehot).sum(0).T]
        return [count, total, self.outer_sums(x.transpose(1, 2).reshape(-1, a), y.reshape(-1))]

    def outer_sums(self, rows: Tensor, y: Tensor) -> Tensor:
        """sum h h^T per class, one (n_c x A)^T (n_c x A) product per class present."""
        squares = rows.new_zeros(self.cov.shape)
        for c in y.unique().tolist():
            if c < self.num_classes:
                members = rows[y == c]
                squares[c] = members.T @ members
        return squares

    def merge(self, count: Tensor, total: Tensor, squares: Tensor) -> None:
        """Chan's merge of the running (N, mu, Sigma) with a batch (n, m, S), per class.

        w = n / (N + n);  Sigma <- (1-w) Sigma + w S + w (1-w) (mu - m)(mu - m)^T;
        mu <- (1-w) mu + w m;  N <- N + n.  A class absent from the batch has w = 0.
        """
        n = count.clamp(min=1)[:, None]
        batch_mean = total / n
        if self.diagonal:
            batch_cov = (squares / n - batch_mean**2).clamp(min=0)
            spread = (self.mean - batch_mean) ** 2
        else:
            batch_cov = squares / n[..., None] - outer(batch_mean, batch_mean)
            spread = outer(self.mean - batch_mean, self.mean - batch_mean)
        w = count / (self.count + count).clamp(min=1)
        w_cov = w.view(-1, *[1] * (self.cov.dim() - 1))
        self.cov.copy_((1 - w_cov) * self.cov + w_cov * batch_cov + w_cov * (1 - w_cov) * spread)
        self.mean.copy_((1 - w[:, None]) * self.mean + w[:, None] * batch_mean)
        self.count.add_(count)


def outer(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise outer products: (C, A), (C, A) -> (C, A, A)."""
    return a[:, :, None] * b[:, None, :]


def all_reduce_sum(tensors: list[Tensor]) -> list[Tensor]:
    """Sum tensors over all ranks in one collective; unchanged outside torch.distributed."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    return [
        part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors, strict=True)
    ]


def class_variances(weight: Tensor, covariance: Tensor) -> Tensor:
    """s_c(j) = w_j^T Sigma_c w_j, the variance of z~_j for a pixel of class c: (C_cls, K).

    weight (K, A): the classifier's rows (or an adapter's); covariance (C_cls, A) or
    (C_cls, A, A), constant. Gradients reach `weight`.
    """
    cov = covariance.to(weight.dtype)
    if cov.dim() == 2:
        return cov @ (weight * weight).T
    return torch.einsum("ja,cab,jb->cj", weight, cov, weight)


def pair_variances(weight: Tensor, covariance: Tensor) -> Tensor:
    """q_c(j, k) = (w_j - w_k)^T Sigma_c (w_j - w_k), the variance of z~_j - z~_k: (C_cls, K, K).

    Computed as s_c(j) + s_c(k) - 2 w_j^T Sigma_c w_k, so the diagonal is exactly zero.
    """
    cov = covariance.to(weight.dtype)
    gram = (weight[None] * cov[:, None, :]) @ weight.T if cov.dim() == 2 else weight @ cov @ weight.T
    s = gram.diagonal(dim1=1, dim2=2)
    return s[:, :, None] + s[:, None, :] - 2 * gram


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    weight: Tensor,
    covariance: Tensor,
    labels: Tensor,
    lam: float,
    tau: float = 1.0,
    bound: Bound = "pairwise",
    ignore_index: int = 255,
) -> Tensor:
    """Upper bound of E[tau^2 KL(p || softmax(z~/tau))], mean over non-ignored pixels.

    With p = softmax(z^T/tau), a = lam / (2 tau^2) and y the pixel's label:
      pairwise: tau^2 [sum_k p_k log sum_j exp((z_j - z_k)/tau + a q_y(j,k)) - H(p)]
      marginal: tau^2 [-sum_k p_k z_k/tau + log sum_j exp(z_j/tau + a s_y(j)) - H(p)]
      centred:  marginal with s_y(j) from the centred rows w_j - (1/K) sum_k w_k
    All are tau^2 sum_k p_k (log p_k - log q~_k) for an "augmented" log q~. Rows W - 1 v^T give
    z~ - (v^T delta) 1, which the softmax cannot tell from z~: the expectation is the same for
    every v, so marginal on any shifted rows bounds it too, and centred picks v = the mean row.
    The expectation, pairwise and centred are invariant to W -> W + 1 v^T; marginal is not.
    pairwise costs a K x K matrix per pixel: use marginal or centred when K is large (ADE20K's
    150 classes). lam = 0 runs the same operations as `losses.kd_loss`: the plain loss.
    """
    size = student_logits.shape[-2:]
    valid = losses.valid_pixels(labels, size, ignore_index)
    z = losses.pixel_rows(student_logits)[valid] / tau
    y = losses.resize_labels(labels, size).reshape(-1)[valid].long()
    scale = lam / (2 * tau**2)
    if bound in ("marginal", "centred"):
        rows = weight - weight.mean(0) if bound == "centred" else weight
        shift = scale * class_variances(rows, covariance)[y]
        log_q = F.log_softmax(z + shift, dim=-1) - shift
    elif bound == "pairwise":
        shift = scale * pair_variances(weight, covariance)[y]  # (P, k, j)
        log_q = F.log_softmax(z[:, None, :] + shift, dim=-1).diagonal(dim1=1, dim2=2)
    else:
        raise ValueError(f"bound must be 'pairwise', 'marginal' or 'centred', not {bound!r}")
    teacher = losses.pixel_rows(teacher_logits)[valid]
    return tau**2 * losses.mean_or_zero(losses.kl_rows(teacher, log_q, tau))


def pixel_variances(
    weight: Tensor, covariance: Tensor, labels: Tensor, size: Sequence[int], ignore_index: int
) -> Tensor:
    """s_{y_i}(j) for every pixel i (N*h*w, K); ignored pixels get 0 (they are not augmented)."""
    s = class_variances(weight, covariance)
    s = torch.cat([s, s.new_zeros(1, s.shape[1])])
    y = losses.resize_labels(labels, size).reshape(-1).long()
    return s[torch.where(y == ignore_index, covariance.shape[0], y)]


def cwd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    weight: Tensor,
    covariance: Tensor,
    labels: Tensor,
    lam: float,
    tau: float = 4.0,
    ignore_index: int = 255,
) -> Tensor:
    """Upper bound of the expected channel-wise distillation loss over augmented students.

    Per image n and channel c, with phi^T_c = softmax_i(z^T_{c,i}/tau), a = lam / (2 tau^2):
      tau^2 [-sum_i phi^T_{c,i} z_{c,i}/tau + log sum_i exp(z_{c,i}/tau + a s_{y_i}(c)) - H(phi^T_c)]
    averaged over (n, c). On features, pass the adapter output and the adapter's rows as
    `weight`. lam = 0 runs the same operations as `losses.cwd_loss`.
    """
    n, k, h, w = student_logits.shape
    variances = pixel_variances(weight, covariance, labels, (h, w), ignore_index)
    shift = lam / (2 * tau**2) * variances.reshape(n, h * w, k).transpose(1, 2).reshape(n * k, h * w)
    z = losses.channel_rows(student_logits) / tau
    log_q = F.log_softmax(z + shift, dim=-1) - shift
    return tau**2 * losses.kl_rows(losses.channel_rows(teacher_logits), log_q, tau).mean()


def mse_loss(
    student: Tensor,
    teacher: Tensor,
    weight: Tensor,
    covariance: Tensor,
    labels: Tensor,
    lam: float,
    ignore_index: int = 255,
) -> Tensor:
    """Exact expectation of the feature MSE over augmented students (no bound needed).

    E mean (U h~ + b - f^T)^2 = mean (U h + b - f^T)^2 + lam * mean_i tr(U Sigma_{y_i} U^T) / K,
    with `student` = U h + b (K channels) and `weight` = U: augmentation only adds a regulariser.
    """
    variances = pixel_variances(weight, covariance, labels, student.shape[-2:], ignore_index)
    return losses.mse_loss(student, teacher) + lam * variances.mean()
