"""Losses (separate from models, so one model serves pretraining and fine-tuning)."""

from medgauss.losses.pretrain import MaskedGaussianLoss, MaskedPatchLoss, pretrain_loss_for

__all__ = ["MaskedGaussianLoss", "MaskedPatchLoss", "pretrain_loss_for"]
