"""Losses (separate from models, so one model serves pretraining and fine-tuning)."""

from medgauss.losses.pretrain import MaskedGaussianLoss, MaskedPatchLoss, pretrain_loss_for
from medgauss.losses.xgrm import XGRM_LAMBDA_L1, XGRM_LAMBDA_SSIM, XGRMLoss, box_line_integral_range, shadow_window

__all__ = ["MaskedGaussianLoss", "MaskedPatchLoss", "pretrain_loss_for", "XGRMLoss", "XGRM_LAMBDA_L1",
           "XGRM_LAMBDA_SSIM", "box_line_integral_range", "shadow_window"]
