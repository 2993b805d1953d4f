"""Public rendering entry points. Backends are chosen in :mod:`medgauss.dispatch`."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor

from medgauss.dispatch import get_implementation, resolve_backend
from medgauss.gaussians import Gaussians
from medgauss.render import _common

__all__ = ["splat"]


def splat(
    gaussians: Gaussians,
    shape: Sequence[int],
    *,
    points: Tensor | None = None,
    cutoff: float | None = 3.0,
    backend: str = "auto",
) -> Tensor:
    """Sum of Gaussians evaluated on a voxel grid or at query points (differentiable).

    The value at ``x`` is ``sum_i I_i exp(-0.5 (x - mu_i)^T Sigma_i^{-1} (x - mu_i))`` over the
    Gaussians whose Mahalanobis distance to ``x`` is below ``cutoff`` (``None``: all, exactly).

    Args:
        gaussians: batch of ``B`` x ``N`` Gaussians in normalised volume coordinates
            (see :mod:`medgauss.gaussians.coords`). Any finite parameters with positive scales, however
            anisotropic (see :mod:`medgauss.render._common`); non-finite values raise ``ValueError``
            naming the field. ``B = 0`` and ``N = 0`` are valid.
        shape: spatial size ``(D, H, W)`` of the volume.
        points: optional query points ``[B, M, 3]``: floating point = normalised coordinates in
            ``[0, 1]``; integer = voxel indices ``(d, h, w)``. Points carry no gradient.
        cutoff: Mahalanobis truncation radius, or ``None`` for no truncation.
        backend: ``"auto"`` | ``"torch"`` | ``"numba"`` | ``"triton"`` (see
            :mod:`medgauss.dispatch`; the ``MEDGAUSS_BACKEND`` variable applies to ``auto``).

    Returns:
        ``[B, 1, D, H, W]`` at voxel centres without ``points``; ``[B, M]`` with ``points``.
        Gradients flow to means, scales, quats and intensities for every backend. Empty inputs
        (``B``, ``N`` or ``M`` zero) give zeros of that shape, with zero gradients.
    """
    gaussians = _common.check_gaussians(gaussians)
    size = _common.check_shape(shape)
    cutoff = _common.check_cutoff(cutoff)
    pts = None if points is None else _common.check_points(points, gaussians, size)
    name = resolve_backend("splat", backend, gaussians.device)
    b = gaussians.batch_size
    if _common.is_empty(gaussians, math.prod(size) if pts is None else pts.shape[1]):
        return _common.empty_result(gaussians, (b, 1, *size) if pts is None else (b, pts.shape[1]))
    return get_implementation("splat", name)(gaussians, size, points=pts, cutoff=cutoff)
