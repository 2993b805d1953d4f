"""Image-quality metrics (PSNR, slice / 3D SSIM, projection-domain metrics) with explicit data range."""

from medgauss.metrics.image import projection_psnr, projection_ssim, psnr, ssim3d, ssim_slices

__all__ = ["psnr", "ssim_slices", "ssim3d", "projection_psnr", "projection_ssim"]
