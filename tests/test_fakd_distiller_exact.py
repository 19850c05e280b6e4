"""The Distiller's terms against the per-pixel formulas, from quantities computed here.

A tiny student (1/4 resolution) and teacher (1/2) run through `Distiller` in training mode;
each logged term must equal the reference of test_fakd_exact.py evaluated on the student's
own outputs, the teacher's outputs resized bilinearly, a covariance computed by numpy from
the student's features and the nearest-downsampled labels, and lam = lam0 * progress.
The distiller computes in float32, hence the 1e-4 relative tolerance; every FAKD term is
checked to move by more than 5 % between lam = 0 and the lam used.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import TinySegmenter
from test_fakd_exact import IGNORE, cwd_reference, kd_reference, mse_reference, nearest_labels

from fakd_deploy.distill import Distiller, LossTerm

CLASSES, PROGRESS = 3, 0.5
TOL = {"rel": 1e-4, "abs": 1e-6}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: a second thread only costs


def setup(ignore: int) -> tuple[TinySegmenter, TinySegmenter, torch.Tensor, torch.Tensor]:
    """A student at 1/4 and a wider teacher at 1/2 of the input; some labels are `ignore`."""
    student = TinySegmenter(CLASSES, feat_dim=4, stride=4, aux=True)
    teacher = TinySegmenter(CLASSES, feat_dim=6, stride=2, seed=1)
    gen = torch.Generator().manual_seed(1)
    labels = torch.randint(0, CLASSES, (2, 16, 16), generator=gen)
    labels[:, :4] = ignore
    labels[1, 8:, 8:] = ignore
    return student, teacher, 3 * torch.randn(2, 3, 16, 16, generator=gen), labels


def numpy_covariance(features: np.ndarray, labels: np.ndarray, full: bool) -> np.ndarray:
    """Biased per-class (co)variance over the pixels of each class (an ignore label is none of
    them); zeros for a class not present."""
    feat_dim, h, w = features.shape[1:]
    y = nearest_labels(labels, h, w).reshape(-1)
    rows = features.transpose(0, 2, 3, 1).reshape(-1, feat_dim)
    cov = np.zeros((CLASSES, feat_dim, feat_dim) if full else (CLASSES, feat_dim))
    for c in range(CLASSES):
        members = rows[y == c]
        if len(members):
            cov[c] = np.cov(members, rowvar=False, bias=True) if full else members.var(0)
    return cov


def run(
    term: LossTerm, ignore: int = IGNORE, progress: float = PROGRESS
) -> tuple[dict[str, torch.Tensor], float, SimpleNamespace]:
    """The distiller's logs for one term, its total, and everything the references need."""
    student, teacher, images, labels = setup(ignore)
    distiller = Distiller(student, teacher, [term], CLASSES, ignore_index=ignore).train()
    total, logs = distiller(images, labels, progress)
    with torch.no_grad():
        out, teacher_out = student.forward_train(images), teacher.forward_train(images)
    size = out.logits.shape[-2:]

    def resized(x: torch.Tensor) -> np.ndarray:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False).double().numpy()

    adapter = next(iter(distiller.adapters.values()), None)
    if adapter is not None:
        with torch.no_grad():
            student_side, weight = adapter(out.features), adapter.weight[:, :, 0, 0]
        teacher_side = resized(teacher_out.features)
    else:
        student_side, weight = out.logits, student.classifier.weight[:, :, 0, 0]
        teacher_side = resized(teacher_out.logits)
    refs = SimpleNamespace(
        student=student_side.detach().double().numpy(),
        teacher=teacher_side,
        weight=weight.detach().double().numpy(),
        labels=labels.numpy(),
        logits=out.logits,
        aux=out.aux_logits,
        label_tensor=labels,
        ignore=ignore,
        cov=numpy_covariance(out.features.double().numpy(), labels.numpy(), not term.diagonal),
    )
    return logs, total.item(), refs


def reference(term: LossTerm, refs: SimpleNamespace, lam: float) -> float:
    args = (refs.student, refs.teacher, refs.weight, refs.cov, refs.labels, lam)
    if term.loss == "kd":
        return kd_reference(*args, term.tau, term.bound, refs.ignore)
    if term.loss in ("cwd", "cwd_feat"):
        return cwd_reference(*args, term.tau, refs.ignore)
    return mse_reference(*args, refs.ignore)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore: int) -> float:
    up = F.interpolate(logits.detach().double(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(up, labels, ignore_index=ignore).item()


TERMS = {
    "kd-marginal": LossTerm(loss="kd", tau=2.0, lam0=3.0, bound="marginal", weight=0.7),
    "kd-centred": LossTerm(loss="kd", tau=2.0, lam0=3.0, bound="centred"),
    "kd-pairwise-full": LossTerm(loss="kd", tau=0.5, lam0=1.0, bound="pairwise", diagonal=False),
    "cwd": LossTerm(loss="cwd", tau=4.0, lam0=16.0),
    "cwd_feat": LossTerm(loss="cwd_feat", tau=4.0, lam0=16.0, weight=0.3),
    "cwd_feat-full": LossTerm(loss="cwd_feat", tau=2.0, lam0=8.0, diagonal=False),
    "mse_feat": LossTerm(loss="mse_feat", lam0=2.0, weight=0.1),
    "kd-plain": LossTerm(loss="kd", tau=2.0),
    "cwd-plain": LossTerm(loss="cwd", tau=2.0),
    "cwd_feat-plain": LossTerm(loss="cwd_feat", tau=4.0),
    "mse_feat-plain": LossTerm(loss="mse_feat"),
}


@pytest.mark.parametrize("ignore", [IGNORE, 254])
@pytest.mark.parametrize("case", list(TERMS))
def test_term_equals_the_formula_at_lam0_times_progress(case: str, ignore: int) -> None:
    """Every term, FAKD or plain, with the default ignore label and another one."""
    term = TERMS[case]
    logs, total, refs = run(term, ignore)
    lam = term.lam0 * PROGRESS
    expected = reference(term, refs, lam)
    assert logs[term.loss].item() == pytest.approx(expected, **TOL)
    if term.lam0 > 0:
        assert logs[f"{term.loss}.lam"].item() == pytest.approx(lam, rel=1e-12)
        assert abs(expected - reference(term, refs, 0.0)) > 0.05 * abs(expected)
    else:
        assert f"{term.loss}.lam" not in logs
    ce, aux = (cross_entropy(x, refs.label_tensor, ignore) for x in (refs.logits, refs.aux))
    assert logs["ce"].item() == pytest.approx(ce, **TOL)
    assert logs["aux"].item() == pytest.approx(aux, **TOL)
    assert total == pytest.approx(ce + 0.4 * aux + term.weight * expected, **TOL)


def test_lam_stops_at_lam0_past_the_end_of_training() -> None:
    term = TERMS["kd-marginal"]
    logs, _, refs = run(term, progress=1.5)
    assert logs["kd.lam"].item() == term.lam0
    assert logs["kd"].item() == pytest.approx(reference(term, refs, term.lam0), **TOL)


def test_plain_terms_keep_no_estimator() -> None:
    student, teacher, _, _ = setup(IGNORE)
    terms = [TERMS[name] for name in TERMS if name.endswith("-plain")]
    keys = Distiller(student, teacher, terms, CLASSES).state_dict()
    assert not any(key.startswith("estimators.") for key in keys)
