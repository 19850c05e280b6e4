"""Distillation: plain losses, FAKD (class covariance and closed-form bounds), the Distiller."""

from fakd_deploy.distill import fakd, losses
from fakd_deploy.distill.distiller import LOSSES, Distiller
from fakd_deploy.recipe import LossTerm

__all__ = ["LOSSES", "Distiller", "LossTerm", "fakd", "losses"]
