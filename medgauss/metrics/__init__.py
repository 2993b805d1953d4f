"""Image-quality metrics (PSNR, slice / 3D SSIM, projection-domain metrics) with explicit data range,
masked-region metrics of MAE pretraining, and the trivial fills a pretrained model must beat."""

from medgauss.metrics.fill import constant_fill, normalized_convolution_fill
from medgauss.metrics.image import projection_psnr, projection_ssim, psnr, ssim3d, ssim_slices
from medgauss.metrics.masked import masked_mse, masked_psnr, masked_ssim

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
]
