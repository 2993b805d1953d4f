"""Adapter from :func:`medgauss.render.splat` to the tile-based Triton kernels in :mod:`triton_kernels`.

Converts the :class:`~medgauss.gaussians.Gaussians` container to the plain tensors the kernels take
(means, the differentiable precision factor of :func:`medgauss.render._common.precision_factor` cast
to the kernels' dtype, intensities, cut-off box half-sizes); gradients reach scales and quats
through that factor by autograd.
"""

from __future__ import annotations

import torch
from torch import Tensor

from medgauss.gaussians import Gaussians
from medgauss.render._common import half_extents, points_to_normalized, precision_factor
from triton_kernels.splat import splat_tiles

__all__ = ["splat"]

# The kernels compute in float32 or float64; half-precision Gaussians (autocast training) are
# evaluated in float32 and the result cast back, so callers get their own dtype as from the reference.
_HALF_DTYPES = (torch.float16, torch.bfloat16)


def splat(gaussians: Gaussians, shape: tuple[int, int, int], *, points: Tensor | None = None,
          cutoff: float | None = 3.0) -> Tensor:
    """Triton backend of :func:`medgauss.render.splat` (arguments already validated there).

    Args:
        gaussians: ``B`` x ``N`` Gaussians in normalised coordinates, on CUDA (or CPU under
            ``TRITON_INTERPRET=1``); float32 / float64 (float16 / bfloat16 are computed in float32).
        shape: ``(D, H, W)`` of the volume.
        points: optional query points ``[B, M, 3]``: normalised floats in ``[0, 1]`` or integer voxel indices.
        cutoff: strict Mahalanobis truncation radius, or ``None`` for every term.

    Returns:
        ``[B, 1, D, H, W]`` at voxel centres without ``points``, else ``[B, M]``; the Gaussians' dtype.
    """
    b, out_dtype = gaussians.batch_size, gaussians.dtype
    if out_dtype in _HALF_DTYPES:
        gaussians = gaussians.to(torch.float32)
    points = None if points is None else points_to_normalized(points, shape, gaussians.dtype)
    factor = precision_factor(gaussians)[0].to(gaussians.dtype)
    values = splat_tiles(gaussians.means, factor, gaussians.intensities,
                         half_extents(gaussians, cutoff), shape, points=points, cutoff=cutoff)
    values = values.to(out_dtype)
    if points is None:
        return values.reshape(b, 1, *shape)
    return values
