"""The Distiller with tiny models that follow the model contract (see docs/architecture.md)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fakd_deploy.distill import LOSSES, Distiller, LossTerm, fakd, losses

CLASSES = 3


class TinySegmenter(nn.Module):
    """forward -> logits at 1/stride; forward_train -> logits, pre-classifier features, aux."""

    def __init__(self, feat_dim: int, stride: int, aux: bool) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, feat_dim, 3, stride=stride, padding=1),
                                  nn.BatchNorm2d(feat_dim), nn.ReLU())
        self.classifier = nn.Conv2d(feat_dim, CLASSES, 1)
        self.aux_classifier = nn.Conv2d(feat_dim, CLASSES, 1) if aux else None
        self.num_classes, self.feat_dim = CLASSES, feat_dim

    def forward_train(self, x: torch.Tensor) -> SimpleNamespace:
        features = self.body(x)
        aux = self.aux_classifier(features) if self.aux_classifier is not None else None
        return SimpleNamespace(logits=self.classifier(features), features=features, aux_logits=aux)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_train(x).logits


def models(aux: bool = True) -> tuple[TinySegmenter, TinySegmenter]:
    """A student at 1/4 and a wider teacher at 1/2 of the input: its outputs must be resized."""
    torch.manual_seed(0)
    return TinySegmenter(4, 4, aux), TinySegmenter(6, 2, aux=False)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    labels = torch.randint(0, CLASSES, (2, 16, 16), generator=gen)
    labels[:, :4] = 255
    return torch.randn(2, 3, 16, 16, generator=gen), labels


ALL_TERMS = [LossTerm("kd", lam0=2.0, bound="pairwise"), LossTerm("cwd", tau=4.0, weight=0.5),
             LossTerm("cwd_feat", tau=4.0, lam0=1.0), LossTerm("mse_feat", weight=0.1, lam0=1.0,
                                                             diagonal=False)]


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
    assert set(terms) == {"ce", "aux", "kd", "kd.lam", "cwd", "cwd_feat", "cwd_feat.lam",
                          "mse_feat", "mse_feat.lam"}
    expected = terms["ce"] + 0.4 * terms["aux"] + terms["kd"] + 0.5 * terms["cwd"] \
        + terms["cwd_feat"] + 0.1 * terms["mse_feat"]
    torch.testing.assert_close(total.detach(), expected)
    assert all(not value.requires_grad for value in terms.values())


def test_lam_ramps_linearly_with_progress() -> None:
    student, teacher = models()
    distiller = Distiller(student, teacher, [LossTerm("kd", lam0=2.5)], CLASSES)
    for progress in (0.0, 0.4, 1.0):
        assert distiller(*batch(), progress=progress)[1]["kd.lam"].item() == pytest.approx(2.5 * progress)


def test_fakd_term_at_progress_zero_equals_plain_kd() -> None:
    student, teacher = models()
    images, labels = batch()
    plain = Distiller(student, teacher, [LossTerm("kd")], CLASSES)(images, labels, 0.0)[1]["kd"]
    augmented = Distiller(student, teacher, [LossTerm("kd", lam0=5.0)], CLASSES)(images, labels, 0.0)[1]
    assert torch.equal(plain, augmented["kd"])


def test_fakd_kd_term_matches_the_library_call() -> None:
    student, teacher = models()
    images, labels = batch()
    distiller = Distiller(student, teacher, [LossTerm("kd", tau=2.0, lam0=2.0)], CLASSES).eval()
    estimator = distiller.estimators["diagonal"]
    estimator.update(student.forward_train(images).features, labels)
    value = distiller(images, labels, 0.5)[1]["kd"]
    z_t = losses.resize_like(teacher(images), student(images))
    expected = fakd.kd_loss(student(images), z_t, student.classifier.weight[:, :, 0, 0],
                            estimator.covariance, labels, 1.0, 2.0, "marginal")
    torch.testing.assert_close(value, expected)


def test_teacher_is_frozen_and_outside_the_state() -> None:
    student, teacher = models()
    distiller = Distiller(student, teacher, ALL_TERMS, CLASSES)
    assert distiller.teacher is teacher and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not teacher_ids & {id(p) for p in distiller.parameters()}
    keys = set(distiller.state_dict())
    assert all(key.split(".")[0] in {"student", "adapters", "estimators"} for key in keys)
    assert {"estimators.diagonal.cov", "estimators.full.cov", "adapters.cwd_feat.weight",
            "adapters.mse_feat.weight"} <= keys
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


def test_recipe_terms_fit_the_distiller() -> None:
    from fakd_deploy.recipe import LossTerm as RecipeTerm

    student, teacher = models()
    terms = [RecipeTerm(loss="kd", lam0=1.0), RecipeTerm(loss="kd", tau=2.0)]
    assert set(Distiller(student, teacher, terms, CLASSES)(*batch(), progress=1.0)[1]) == {
        "ce", "aux", "kd", "kd.lam", "kd2"}


def test_bad_configurations_fail_at_construction() -> None:
    student, teacher = models()
    with pytest.raises(ValueError, match="unknown loss"):
        Distiller(student, teacher, [LossTerm("nope")], CLASSES)
    with pytest.raises(ValueError, match="bound"):
        Distiller(student, teacher, [LossTerm("kd", bound="tight")], CLASSES)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="teacher"):
        Distiller(student, None, [LossTerm("kd")], CLASSES)
    assert {"kd", "cwd", "cwd_feat", "mse_feat"} <= set(LOSSES)
