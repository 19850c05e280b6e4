"""The Distiller with tiny models that follow the model contract (see docs/architecture.md)."""

from __future__ import annotations

import pytest
import torch
from helpers import TinySegmenter
from pydantic import ValidationError

from fakd_deploy.distill import LOSSES, Distiller, LossTerm, losses
from fakd_deploy.errors import BadInput

CLASSES = 3


def models(aux: bool = True) -> tuple[TinySegmenter, TinySegmenter]:
    """A student at 1/4 and a wider teacher at 1/2 of the input: its outputs must be resized."""
    return (
        TinySegmenter(CLASSES, feat_dim=4, stride=4, aux=aux).train(),
        TinySegmenter(CLASSES, feat_dim=6, stride=2, seed=1),
    )


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    labels = torch.randint(0, CLASSES, (2, 16, 16), generator=gen)
    labels[:, :4] = 255
    return torch.randn(2, 3, 16, 16, generator=gen), labels


ALL_TERMS = [
    LossTerm(loss="kd", lam0=2.0, bound="pairwise"),
    LossTerm(loss="cwd", tau=4.0, weight=0.5),
    LossTerm(loss="cwd_feat", tau=4.0, lam0=1.0),
    LossTerm(loss="mse_feat", weight=0.1, lam0=1.0, diagonal=False),
]


def test_plain_training_is_cross_entropy() -> None:
    student, _ = models()
    images, labels = batch()
    total, terms = Distiller(student, None, [], CLASSES, aux_weight=0.4)(images, labels, 0.3)
    out = student.forward_train(images)
    assert set(terms) == {"ce", "aux"}
    torch.testing.assert_close(terms["ce"], losses.ce_loss(out.logits, labels))
    torch.testing.assert_close(total, terms["ce"] + 0.4 * terms["aux"])


def test_every_term_is_returned_and_summed_with_its_weight() -> None:
    student, teacher = models()
    distiller = Distiller(student, teacher, ALL_TERMS, CLASSES)
    total, terms = distiller(*batch(), progress=0.5)
    assert set(terms) == {
        "ce",
        "aux",
        "kd",
        "kd.lam",
        "cwd",
        "cwd_feat",
        "cwd_feat.lam",
        "mse_feat",
        "mse_feat.lam",
    }
    expected = (
        terms["ce"]
        + 0.4 * terms["aux"]
        + terms["kd"]
        + 0.5 * terms["cwd"]
        + terms["cwd_feat"]
        + 0.1 * terms["mse_feat"]
    )
    torch.testing.assert_close(total.detach(), expected)
    assert all(not value.requires_grad for value in terms.values())


def test_lam_ramps_linearly_with_progress() -> None:
    student, teacher = models()
    distiller = Distiller(student, teacher, [LossTerm(loss="kd", lam0=2.5)], CLASSES)
    for progress in (0.0, 0.4, 1.0):
        assert distiller(*batch(), progress=progress)[1]["kd.lam"].item() == pytest.approx(2.5 * progress)


def test_fakd_term_at_progress_zero_equals_plain_kd() -> None:
    student, teacher = models()
    images, labels = batch()
    plain = Distiller(student, teacher, [LossTerm(loss="kd")], CLASSES)(images, labels, 0.0)[1]["kd"]
    augmented = Distiller(student, teacher, [LossTerm(loss="kd", lam0=5.0)], CLASSES)(images, labels, 0.0)[1]
    assert torch.equal(plain, augmented["kd"])


def test_teacher_is_frozen_and_outside_the_state() -> None:
    student, teacher = models()
    distiller = Distiller(student, teacher, ALL_TERMS, CLASSES)
    assert distiller.teacher is teacher and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not teacher_ids & {id(p) for p in distiller.parameters() if p.requires_grad}
    keys = set(distiller.state_dict())
    assert all(key.split(".")[0] in {"student", "adapters", "estimators"} for key in keys)
    assert {
        "estimators.diagonal.cov",
        "estimators.full.cov",
        "adapters.cwd_feat.weight",
        "adapters.mse_feat.weight",
    } <= keys
    distiller.train()
    assert not teacher.training


def test_gradient_reaches_student_and_adapters_not_teacher() -> None:
    student, teacher = models()
    distiller = Distiller(student, teacher, ALL_TERMS, CLASSES)
    distiller(*batch(), progress=0.5)[0].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in distiller.adapters.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_estimators_update_only_in_training() -> None:
    student, teacher = models()
    distiller = Distiller(student, teacher, ALL_TERMS, CLASSES)
    images, labels = batch()
    distiller.eval()
    distiller(images, labels, 0.5)
    assert all(est.count.sum() == 0 for est in distiller.estimators.values())
    distiller.train()
    distiller(images, labels, 0.5)
    valid = (labels[:, ::4, ::4] != 255).sum()  # student head at 1/4, nearest labels
    assert all(est.count.sum() == valid for est in distiller.estimators.values())


def test_state_dict_round_trips_and_teacher_follows_casts() -> None:
    student, teacher = models()
    distiller = Distiller(student, teacher, ALL_TERMS, CLASSES)
    distiller(*batch(), progress=0.5)
    copy = Distiller(*models(), ALL_TERMS, CLASSES)
    copy.load_state_dict(distiller.state_dict())
    assert torch.equal(copy.estimators["full"].cov, distiller.estimators["full"].cov)
    distiller.double()
    assert next(teacher.parameters()).dtype == torch.float64


def test_repeated_losses_get_numbered_names() -> None:
    student, teacher = models()
    terms = [LossTerm(loss="kd", lam0=1.0), LossTerm(loss="kd", tau=2.0)]
    assert set(Distiller(student, teacher, terms, CLASSES)(*batch(), progress=1.0)[1]) == {
        "ce",
        "aux",
        "kd",
        "kd.lam",
        "kd2",
    }


def test_bad_configurations_fail_at_construction() -> None:
    student, _ = models()
    with pytest.raises(ValidationError, match="loss"):
        LossTerm(loss="nope")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="bound"):
        LossTerm(loss="kd", bound="tight", lam0=1.0)  # type: ignore[arg-type]
    without_teacher = r"^distillation terms need a teacher \(a .teacher. section in the recipe\)$"
    with pytest.raises(BadInput, match=without_teacher):
        Distiller(student, None, [LossTerm(loss="kd")], CLASSES)
    assert {"kd", "cwd", "cwd_feat", "mse_feat"} <= set(LOSSES)


def test_teacher_moves_with_the_distiller_and_stays_in_eval() -> None:
    student, teacher = models()
    distiller = Distiller(student, teacher, [LossTerm(loss="kd")], CLASSES).train()
    assert distiller.student.training and not distiller.teacher.training
    distiller.to(torch.float64)
    assert next(teacher.parameters()).dtype == torch.float64
