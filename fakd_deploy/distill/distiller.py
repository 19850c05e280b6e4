"""The Distiller: student + frozen teacher + loss terms -> one scalar loss and its parts.

The same class trains all three roles: with no teacher and no terms it is plain
cross-entropy (teacher, baseline); with terms it adds distillation (students).
A term with lam0 > 0 is FAKD: it augments the student's features with the class
covariance kept by a `ClassCovariance` (updated every training step) and minimises the
closed-form bound from `fakd.py`, with lam = lam0 * progress (ISDA's linear ramp).

A term is the recipe's `LossTerm`. Adding a distillation method is one function with
the `TermFn` signature below and one line in `LOSSES` (and its name in the recipe's
`LossName`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
from torch import Tensor, nn

from fakd_deploy.distill import fakd, losses
from fakd_deploy.errors import BadInput
from fakd_deploy.recipe import LossTerm

if TYPE_CHECKING:
    from fakd_deploy.models.segmenter import SegmentationModel


@dataclass
class Pair:
    """What one term compares, at the student's head resolution.

    `student` is the student's logits, or its features through the term's 1x1 adapter;
    `weight` (K, A) maps the pre-classifier feature h into `student`, so FAKD can turn
    the feature covariance into the variance of each of the K channels.
    """

    student: Tensor
    teacher: Tensor
    weight: Tensor
    labels: Tensor
    ignore_index: int


def kd_term(pair: Pair, term: LossTerm, covariance: Tensor | None, lam: float) -> Tensor:
    if covariance is None:
        return losses.kd_loss(pair.student, pair.teacher, term.tau, pair.labels, pair.ignore_index)
    return fakd.kd_loss(
        pair.student,
        pair.teacher,
        pair.weight,
        covariance,
        pair.labels,
        lam,
        term.tau,
        term.bound,
        pair.ignore_index,
    )


def cwd_term(pair: Pair, term: LossTerm, covariance: Tensor | None, lam: float) -> Tensor:
    if covariance is None:
        return losses.cwd_loss(pair.student, pair.teacher, term.tau)
    return fakd.cwd_loss(
        pair.student, pair.teacher, pair.weight, covariance, pair.labels, lam, term.tau, pair.ignore_index
    )


def mse_term(pair: Pair, term: LossTerm, covariance: Tensor | None, lam: float) -> Tensor:
    if covariance is None:
        return losses.mse_loss(pair.student, pair.teacher)
    return fakd.mse_loss(
        pair.student, pair.teacher, pair.weight, covariance, pair.labels, lam, pair.ignore_index
    )


# (pair, term, covariance or None for a plain term with lam0 = 0, current lam) -> loss
TermFn = Callable[[Pair, LossTerm, Tensor | None, float], Tensor]

# name -> (its function, whether it compares logits or features through a 1x1 adapter)
LOSSES: dict[str, tuple[TermFn, Literal["logits", "features"]]] = {
    "kd": (kd_term, "logits"),
    "cwd": (cwd_term, "logits"),
    "cwd_feat": (cwd_term, "features"),
    "mse_feat": (mse_term, "features"),
}


class Distiller(nn.Module):
    """Student, optional frozen teacher, adapters and class-covariance estimators.

    The teacher is a registered submodule, frozen: no gradients, always in eval mode (see
    `train`), and left out of `state_dict()`: a checkpoint holds the student, adapters and
    estimators; the teacher has a checkpoint of its own. It follows `.to(device)` as any
    submodule does.
    """

    def __init__(
        self,
        student: SegmentationModel,
        teacher: SegmentationModel | None,
        terms: Sequence[LossTerm],
        num_classes: int,
        ignore_index: int = 255,
        aux_weight: float = 0.4,
    ) -> None:
        super().__init__()
        if terms and teacher is None:
            raise BadInput("distillation terms need a teacher (a 'teacher' section in the recipe)")
        self.student = student
        self.teacher = teacher.eval().requires_grad_(False) if teacher is not None else None
        self.terms = list(terms)
        self.names = term_names(self.terms)
        self.num_classes, self.ignore_index, self.aux_weight = num_classes, ignore_index, aux_weight
        self.adapters = nn.ModuleDict(
            {
                name: nn.Conv2d(student.feat_dim, teacher.feat_dim, 1)
                for name, term in zip(self.names, self.terms, strict=True)
                if teacher is not None and LOSSES[term.loss][1] == "features"
            }
        )
        self.estimators = nn.ModuleDict(
            {
                estimator_key(term): fakd.ClassCovariance(num_classes, student.feat_dim, term.diagonal)
                for term in self.terms
                if term.lam0 > 0
            }
        )
        self.register_state_dict_post_hook(_without_teacher)
        self.register_load_state_dict_pre_hook(_with_own_teacher)

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def forward(self, images: Tensor, labels: Tensor, progress: float) -> tuple[Tensor, dict[str, Tensor]]:
        """Total loss and every term, detached, for logging ("ce", "aux", "kd", "kd.lam", ...).

        total = ce + aux_weight * aux + sum_t weight_t * term_t. progress = step / total_steps
        in [0, 1] sets lam = lam0 * progress. Losses are computed in float32, outside autocast.
        """
        out = self.student.forward_train(images)
        teacher_out = self.teacher_forward(images)
        with torch.autocast(images.device.type, enabled=False):
            logs = {"ce": losses.ce_loss(out.logits.float(), labels, self.ignore_index)}
            total = logs["ce"]
            if out.aux_logits is not None:
                logs["aux"] = losses.ce_loss(out.aux_logits.float(), labels, self.ignore_index)
                total = total + self.aux_weight * logs["aux"]
            if self.training:
                self.update_estimators(out.features, labels)
            lam_scale = min(max(progress, 0.0), 1.0)
            for name, term in zip(self.names, self.terms, strict=True):
                lam = term.lam0 * lam_scale
                logs[name] = self.term_loss(name, term, out, teacher_out, labels, lam)
                total = total + term.weight * logs[name]
                if term.lam0 > 0:
                    logs[f"{name}.lam"] = logs[name].new_tensor(lam)
        return total, {key: value.detach() for key, value in logs.items()}

    @torch.no_grad()
    def teacher_forward(self, images: Tensor) -> Any:
        """The teacher's outputs (logits and features), or None when nothing is distilled."""
        if self.teacher is None or not self.terms:
            return None
        return self.teacher.forward_train(images)

    def update_estimators(self, features: Tensor, labels: Tensor) -> None:
        for estimator in self.estimators.values():
            cast(fakd.ClassCovariance, estimator).update(features, labels, self.ignore_index)

    def estimator(self, term: LossTerm) -> fakd.ClassCovariance:
        """The `ClassCovariance` of a FAKD term, shared by the terms of its kind (`estimator_key`)."""
        return cast(fakd.ClassCovariance, self.estimators[estimator_key(term)])

    def term_loss(
        self, name: str, term: LossTerm, out: Any, teacher_out: Any, labels: Tensor, lam: float
    ) -> Tensor:
        """One term's value; FAKD (lam0 > 0) passes the shared estimator's covariance."""
        covariance = self.estimator(term).covariance if term.lam0 > 0 else None
        pair = self.pair(name, term, out, teacher_out, labels)
        return LOSSES[term.loss][0](pair, term, covariance, lam)

    def pair(self, name: str, term: LossTerm, out: Any, teacher_out: Any, labels: Tensor) -> Pair:
        """Logits and classifier rows, or adapted features and adapter rows, for one term."""
        if LOSSES[term.loss][1] == "features":
            adapter = cast(nn.Conv2d, self.adapters[name])
            student, weight = adapter(out.features.float()), adapter.weight[:, :, 0, 0]
            teacher = teacher_out.features
        else:
            student, weight = out.logits.float(), self.student.classifier.weight[:, :, 0, 0]
            teacher = teacher_out.logits
        return Pair(
            student, losses.resize_like(teacher.float(), student), weight.float(), labels, self.ignore_index
        )


def _without_teacher(module: Distiller, state: dict[str, Any], prefix: str, metadata: Any) -> None:
    for key in [key for key in state if key.startswith(f"{prefix}teacher.")]:
        del state[key]


def _with_own_teacher(module: Distiller, state: dict[str, Any], prefix: str, *args: Any) -> None:
    """A saved distiller has no teacher entries: load keeps the teacher it was built with."""
    if module.teacher is not None:
        for key, value in module.teacher.state_dict(prefix=f"{prefix}teacher.").items():
            state.setdefault(key, value)


def term_names(terms: Sequence[LossTerm]) -> list[str]:
    """Log keys: the loss name, numbered from the second occurrence on ("kd", "kd2", ...)."""
    names = []
    for i, term in enumerate(terms):
        uses = [earlier.loss for earlier in terms[:i]].count(term.loss)
        names.append(term.loss if uses == 0 else f"{term.loss}{uses + 1}")
    return names


def estimator_key(term: LossTerm) -> str:
    """FAKD terms share one estimator per covariance kind: they see the same features."""
    return "diagonal" if term.diagonal else "full"
