"""Registration metrics: the Jacobian determinant of a displacement field (Dice of warped label maps is
:func:`medgauss.metrics.dice_per_class`).

A dense displacement field ``ddf [B, 3, D, H, W]`` (voxels; channel ``a`` along array axis ``a``, MONAI ``Warp``'s
convention) defines the map ``phi(x) = x + u(x)``. Its Jacobian ``J = I + grad u`` is estimated with central
differences in the interior and one-sided differences on the border voxels (``torch.gradient``, unit voxel spacing);
``det J <= 0`` marks a voxel where the map folds (TransMorph reports the percentage of such voxels, ``% |J| <= 0``).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["jacobian_determinant", "nonpositive_jacobian_fraction"]


def _check_ddf(ddf: object) -> Tensor:
    if not isinstance(ddf, Tensor) or ddf.ndim != 5 or ddf.shape[1] != 3:
        raise ValueError(f"ddf must be a displacement field [B, 3, D, H, W], got {tuple(getattr(ddf, 'shape', ()))}")
    if not ddf.is_floating_point():
        raise ValueError(f"ddf must be a floating-point tensor, got dtype {ddf.dtype}")
    if min(ddf.shape[2:]) < 2:
        raise ValueError(f"ddf needs at least 2 voxels along every spatial axis, got {tuple(ddf.shape)}")
    return ddf


def jacobian_determinant(ddf: Tensor) -> Tensor:
    """Jacobian determinant of ``x -> x + u(x)`` at every voxel.

    Args:
        ddf: ``[B, 3, D, H, W]`` displacement ``u`` in voxels (channel ``a`` along array axis ``a``).

    Returns:
        ``[B, D, H, W]`` (``ddf``'s dtype): ``det(I + du_a / dx_b)``, derivatives by central differences
        (one-sided on the border voxels), unit voxel spacing. 1 = volume preserved, ``<= 0`` = folding.
    """
    u = _check_ddf(ddf)
    rows = []
    for a in range(3):
        grads = torch.gradient(u[:, a], dim=(1, 2, 3))  # d u_a / d x_b for b = 0, 1, 2
        rows.append(torch.stack(grads, dim=-1))
    jac = torch.stack(rows, dim=-2)  # [B, D, H, W, 3 (a), 3 (b)]
    jac = jac + torch.eye(3, dtype=u.dtype, device=u.device)
    return torch.linalg.det(jac)


def nonpositive_jacobian_fraction(ddf: Tensor) -> Tensor:
    """Fraction of voxels where ``x -> x + u(x)`` folds (``det J <= 0``), per sample.

    Args:
        ddf: ``[B, 3, D, H, W]`` displacement in voxels.

    Returns:
        ``[B]`` float64 in ``[0, 1]`` (multiply by 100 for TransMorph's ``% |J| <= 0``).
    """
    det = jacobian_determinant(ddf)
    return (det <= 0).flatten(1).double().mean(dim=1)
