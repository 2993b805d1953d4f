"""Adapter from :func:`medgauss.render.project` to the Triton kernels in :mod:`triton_kernels.xray`.

Computes each Gaussian's exact pixel footprint per view
(:func:`medgauss.render.xray.footprint_pixel_rects`), turns it into tile ranges, and hands plain
tensors to the kernels: means, the differentiable precision factor (gradients reach scales and
quats through :func:`medgauss.render._common.precision_factor` by autograd), intensities and the rays.
"""

from __future__ import annotations

from torch import Tensor

from medgauss.gaussians import Gaussians
from medgauss.render._common import precision_factor
from medgauss.render.xray import TILE_SHAPE, footprint_pixel_rects, tile_rects
from triton_kernels.xray import project_rays

__all__ = ["project"]


def project(gaussians: Gaussians, origins: Tensor, directions: Tensor, matrices: Tensor, *,
            cutoff: float | None = 3.0) -> Tensor:
    """Triton backend of :func:`medgauss.render.project` (arguments already validated there).

    Args:
        gaussians: ``B`` x ``N`` Gaussians in world mm, float32 or float64, on CUDA (or CPU under
            ``TRITON_INTERPRET=1``).
        origins, directions: ``[V, rows, cols, 3]`` rays in the Gaussians' dtype, unit directions.
        matrices: ``[V, 3, 4]`` float64 projection matrices consistent with the rays (for culling).
        cutoff: strict Mahalanobis radius, or ``None``.

    Returns:
        ``[B, V, rows, cols]`` line integrals.
    """
    rows, cols = origins.shape[1:3]
    boxes = tile_rects(footprint_pixel_rects(gaussians, matrices, (rows, cols), cutoff), TILE_SHAPE)
    factor = precision_factor(gaussians)[0].to(gaussians.dtype)
    return project_rays(gaussians.means, factor, gaussians.intensities, origins, directions, boxes,
                        cutoff=cutoff, tile=TILE_SHAPE)
