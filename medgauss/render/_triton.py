"""Adapter from :func:`medgauss.render.splat` to the tile-based Triton kernels in :mod:`triton_kernels`.

Converts the :class:`~medgauss.gaussians.Gaussians` container to the plain tensors the kernels take
(means, differentiable packed precision, intensities, cut-off box half-sizes); gradients reach
scales and quats through :func:`medgauss.render._common.precision_upper` by autograd.
"""

from __future__ import annotations

from torch import Tensor

from medgauss.gaussians import Gaussians
from medgauss.render._common import half_extents, precision_upper
from triton_kernels.splat import splat_tiles

__all__ = ["splat"]


def splat(gaussians: Gaussians, shape: tuple[int, int, int], *, points: Tensor | None = None,
          cutoff: float | None = 3.0) -> Tensor:
    """Triton backend of :func:`medgauss.render.splat` (arguments already validated there).

    Args:
        gaussians: ``B`` x ``N`` Gaussians in normalised coordinates, on CUDA (or CPU under
            ``TRITON_INTERPRET=1``), float32 or float64.
        shape: ``(D, H, W)`` of the volume.
        points: optional normalised query points ``[B, M, 3]`` in ``[0, 1]``, the Gaussians' dtype.
        cutoff: strict Mahalanobis truncation radius, or ``None`` for every term.

    Returns:
        ``[B, 1, D, H, W]`` at voxel centres without ``points``, else ``[B, M]``.
    """
    b = gaussians.batch_size
    values = splat_tiles(gaussians.means, precision_upper(gaussians), gaussians.intensities,
                         half_extents(gaussians, cutoff), shape, points=points, cutoff=cutoff)
    if points is None:
        return values.reshape(b, 1, *shape)
    return values
