"""Image-quality metrics (PSNR, slice / 3D SSIM, projection-domain metrics) with explicit data range,
masked-region metrics of MAE pretraining, the trivial fills a pretrained model must beat, and the fine-tuning
metrics: Dice per class, Jacobian folding of a displacement field, multi-label AUC."""

from medgauss.metrics.classification import multilabel_auc
from medgauss.metrics.fill import constant_fill, normalized_convolution_fill
from medgauss.metrics.image import projection_psnr, projection_ssim, psnr, ssim3d, ssim_slices
from medgauss.metrics.masked import masked_mse, masked_psnr, masked_ssim
from medgauss.metrics.overlap import dice_per_class
from medgauss.metrics.registration import jacobian_determinant, nonpositive_jacobian_fraction

__all__ = [
    "psnr",
    "ssim_slices",
    "ssim3d",
    "projection_psnr",
    "projection_ssim",
    "masked_mse",
    "masked_psnr",
    "masked_ssim",
    "constant_fill",
    "normalized_convolution_fill",
    "dice_per_class",
    "jacobian_determinant",
    "nonpositive_jacobian_fraction",
    "multilabel_auc",
]
