"""Pieces every splat backend shares: input checks, voxel grids, culling extents, packed precisions.

Kept in one module so that the backends cannot drift apart on a decision (what counts as inside
the cutoff, where a voxel centre is, how integer points map to normalised coordinates).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from medgauss.gaussians import Gaussians

# Order of the packed upper triangle of a symmetric 3x3 precision matrix.
PRECISION_PACKING = ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))


def check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    """Validate a spatial ``shape`` ``(D, H, W)`` of positive ints."""
    try:
        out = tuple(int(s) for s in shape)
    except TypeError as exc:
        raise ValueError(f"shape must be a sequence of three ints (D, H, W), got {shape!r}") from exc
    if len(out) != 3 or min(out, default=0) <= 0 or any(int(s) != s for s in shape):
        raise ValueError(f"shape must be three positive ints (D, H, W), got {tuple(shape)}")
    return out  # type: ignore[return-value]


def check_cutoff(cutoff: float | None) -> float | None:
    """``None`` (every term) or a positive finite Mahalanobis distance."""
    if cutoff is None:
        return None
    c = float(cutoff)
    if not (math.isfinite(c) and c > 0):
        raise ValueError(f"cutoff must be a positive finite number or None, got {cutoff!r}")
    return c


def check_gaussians(gaussians: object) -> Gaussians:
    if not isinstance(gaussians, Gaussians):
        raise ValueError(f"gaussians must be a medgauss.gaussians.Gaussians, got {type(gaussians).__name__}")
    return gaussians


def check_points(points: Tensor, gaussians: Gaussians, shape: tuple[int, int, int]) -> Tensor:
    """Validate query ``points [B, M, 3]`` and return them as backends receive them.

    Float points are normalised coordinates, must lie in ``[0, 1]`` and are returned in the
    Gaussians' dtype; integer points are voxel indices ``(d, h, w)``, must lie in ``[0, n - 1]`` per
    axis and are returned unchanged (backends map them with :func:`points_to_normalized`, or use
    them as indices directly).
    """
    if not isinstance(points, Tensor):
        raise ValueError(f"points must be a torch.Tensor, got {type(points).__name__}")
    b = gaussians.batch_size
    if points.ndim != 3 or points.shape[0] != b or points.shape[2] != 3:
        raise ValueError(f"points must have shape [B={b}, M, 3], got {tuple(points.shape)}")
    if points.device != gaussians.device:
        raise ValueError(f"points is on {points.device} but gaussians are on {gaussians.device}")
    if points.dtype == torch.bool or points.is_complex():
        raise ValueError(f"points must be float (normalised) or integer (voxel indices), got {points.dtype}")
    sizes = torch.tensor(shape, device=points.device)
    if points.numel() == 0:
        return points.to(gaussians.dtype) if points.is_floating_point() else points
    # Whole-tensor min/max (NaN propagates into them) are ~20x cheaper than per-axis reductions over
    # the strided last axis, which run only when the global bound cannot settle the question.
    low, high = torch.aminmax(points)
    if points.is_floating_point():
        if not bool(torch.isfinite(low) & torch.isfinite(high)):
            raise ValueError("points contains non-finite values (NaN or inf)")
        if not bool((low >= 0) & (high <= 1)):
            raise ValueError("float points are normalised coordinates and must lie in [0, 1]; got range "
                             f"[{low.item():.4g}, {high.item():.4g}]")
        return points.to(gaussians.dtype)
    if not (bool(low >= 0) and (int(high) < min(shape) or bool((points.amax(dim=(0, 1)) < sizes).all()))):
        raise ValueError(f"integer points are voxel indices and must lie in [0, n-1] for shape {shape}; got "
                         f"per-axis minima {points.amin(dim=(0, 1)).tolist()} and maxima "
                         f"{points.amax(dim=(0, 1)).tolist()}")
    return points


def points_to_normalized(points: Tensor, shape: tuple[int, int, int], dtype: torch.dtype) -> Tensor:
    """Validated points as normalised coordinates ``[B, M, 3]`` of ``dtype``.

    Float points are already normalised; integer voxel indices ``i`` map to ``(i + 0.5) / n``.
    Backends that can use voxel indices directly (the numba gather route) skip this conversion.
    """
    if points.is_floating_point():
        return points.to(dtype)
    sizes = torch.tensor(shape, dtype=dtype, device=points.device)
    return (points.to(dtype) + 0.5) / sizes


def voxel_centers(shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Normalised centres ``[D*H*W, 3]`` of every voxel, in C (D, H, W) order."""
    axes = [(torch.arange(n, dtype=dtype, device=device) + 0.5) / n for n in shape]
    grid = torch.meshgrid(*axes, indexing="ij")
    return torch.stack(grid, dim=-1).reshape(-1, 3)


def precision_upper(gaussians: Gaussians) -> Tensor:
    """Packed precision ``[B, N, 6]`` = (P00, P11, P22, P01, P02, P12), differentiable.

    The Mahalanobis form is ``q = P00 r0^2 + P11 r1^2 + P22 r2^2 + 2 (P01 r0 r1 + P02 r0 r2 + P12 r1 r2)``.
    """
    p = gaussians.precision()
    return torch.stack([p[..., i, j] for i, j in PRECISION_PACKING], dim=-1)


@torch.no_grad()
def half_extents(gaussians: Gaussians, cutoff: float | None) -> Tensor:
    """Axis-aligned half-size ``[B, N, 3]`` of the ellipsoid ``q < cutoff^2``: ``cutoff * sqrt(Sigma_aa)``.

    With ``cutoff=None`` every Gaussian reaches everywhere (``inf``).
    """
    if cutoff is None:
        return torch.full_like(gaussians.means, math.inf).detach()
    var = gaussians.covariance().diagonal(dim1=-2, dim2=-1)
    return (cutoff * var.sqrt()).detach()
