"""Pieces every render backend shares: input checks, voxel grids, culling extents, the precision factor.

Kept in one module so that the backends cannot drift apart on a decision (which Gaussians are
valid, how their quadratic forms are evaluated, what counts as inside the cutoff, where a voxel
centre is, how integer points map to normalised coordinates, what an empty batch returns).

**The contract on Gaussians** (:func:`check_gaussians`, :func:`precision_factor`): every Gaussian whose
parameters are finite and whose scales are positive is valid, however anisotropic (e.g. scales
``(1e-4, 1, 1)``), in every backend. Every backend evaluates the Mahalanobis form as a sum of
squares ``q = |L r|^2`` of the factor ``L`` (``P = L^T L``, lower triangular) computed here in float64,
never as ``r^T P r`` from a rounded ``P``: that form is never negative (so every value and gradient is
finite) and keeps float32 accurate where ``P``'s entries differ by many orders of magnitude (a float32
``P`` of a ``(1e-4, 1, 1)`` Gaussian is not even positive definite). Backends therefore agree with the
float64 reference within their dtype's rounding. Anisotropy beyond what float64 can factor (a
condition number above ``1 / PIVOT_FLOOR``, scale ratios beyond about ``1e6``) is rendered at that
limit, the thinnest axis widened (see :func:`precision_factor`), never raising in one backend and not
in another.
Non-finite parameters are rejected at the entry of ``splat`` and ``project`` with a ``ValueError``
naming the field.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from medgauss.gaussians import Gaussians

# Order of the packed upper triangle of a symmetric 3x3 precision matrix.
PRECISION_PACKING = ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))
# Order of the packed lower-triangular precision factor ``L`` (``P = L^T L``).
FACTOR_PACKING = ((0, 0), (1, 1), (2, 2), (1, 0), (2, 0), (2, 1))
# Smallest pivot of the covariance's Cholesky factorisation, relative to the diagonal entry it comes
# from (float64 rounding makes smaller pivots meaningless: they are raised to this).
PIVOT_FLOOR = 1e-12
# Fields of the container that enter the rendered values (checked for finiteness at the entry).
_CHECKED_FIELDS = ("means", "scales", "quats", "intensities", "linear_map")


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
    """The entry check of ``splat`` and ``project``: a :class:`Gaussians` with finite fields and positive scales.

    Containers built with ``validate=False`` skip these value checks, so they are repeated here, once
    per call: one reduction per field and a single host synchronisation for all of them. Raises
    ``ValueError`` naming the first offending field.
    """
    if not isinstance(gaussians, Gaussians):
        raise ValueError(f"gaussians must be a medgauss.gaussians.Gaussians, got {type(gaussians).__name__}")
    names, flags = [], []
    for name in _CHECKED_FIELDS:
        t = getattr(gaussians, name, None)
        if t is not None and t.numel():
            names.append(f"{name} contains non-finite values (NaN or inf)")
            flags.append(torch.isfinite(t.detach()).all())
    if gaussians.scales.numel():
        names.append("scales must be strictly positive")
        flags.append((gaussians.scales.detach() > 0).all())
    if flags:
        ok = torch.stack(flags).tolist()
        for message, good in zip(names, ok):
            if not good:
                raise ValueError(f"gaussians: {message}")
    return gaussians


def is_empty(gaussians: Gaussians, num_outputs: int) -> bool:
    """Whether a render has nothing to evaluate: no sample, no Gaussian or no output value per sample."""
    return gaussians.batch_size == 0 or gaussians.num_gaussians == 0 or num_outputs == 0


def empty_result(gaussians: Gaussians, shape: Sequence[int]) -> Tensor:
    """Zeros of ``shape`` in the Gaussians' dtype and device, connected to the graph of every parameter.

    What every backend returns when :func:`is_empty`: ``torch.autograd.grad`` then gives zero (not
    missing) gradients for means, scales, quats and intensities, also for an empty batch (``B = 0``).
    """
    link = sum(getattr(gaussians, f).sum() for f in ("means", "scales", "quats", "intensities"))
    return torch.zeros(tuple(shape), dtype=gaussians.dtype, device=gaussians.device) + link * 0


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


def precision_factor(gaussians: Gaussians) -> tuple[Tensor, Tensor]:
    """The factor every backend evaluates the quadratic forms with, and the precision it stands for.

    ``L`` is lower triangular with ``P = L^T L``, so ``r^T P r = |L r|^2 = (L00 r0)^2 +
    (L10 r0 + L11 r1)^2 + (L20 r0 + L21 r1 + L22 r2)^2``. It is the inverse of the Cholesky factor ``C``
    of the covariance (``Sigma = C C^T``), both in closed form, in float64 whatever the Gaussians' dtype,
    differentiably. Going through the covariance, not the precision, decides what happens beyond
    float64: a covariance pivot below ``PIVOT_FLOOR`` times its diagonal entry (the variance along the
    thinnest axis lost to rounding) is raised to it, so the thinnest axis is widened to a relative
    ``sqrt(PIVOT_FLOOR)`` while every other axis stays exact (a precision computed first would have
    lost the thick axes instead).

    Returns:
        ``factor [B, N, 6]`` = ``(L00, L11, L22, L10, L20, L21)`` (:data:`FACTOR_PACKING`) and
        ``precision [B, N, 6]`` = the packed ``L^T L`` (:data:`PRECISION_PACKING`), float64, in the
        Gaussians' units^-1 (factor) and units^-2 (precision). Backends whose kernels return gradients
        with respect to the factor take ``factor`` (torch, Triton, numba X-ray); the numba splat, whose
        gradient sums are in terms of ``P``, takes ``factor.detach()`` for the values and ``precision``
        for the gradient: autograd then chains it through ``L`` like every other backend's.
    """
    s = gaussians.to(torch.float64).covariance()
    tiny = torch.finfo(torch.float64).tiny
    s00, s11, s22 = s[..., 0, 0], s[..., 1, 1], s[..., 2, 2]
    c00 = s00.clamp_min(tiny).sqrt()
    c10 = s[..., 1, 0] / c00
    c20 = s[..., 2, 0] / c00
    c11 = torch.maximum(s11 - c10 * c10, PIVOT_FLOOR * s11).clamp_min(tiny).sqrt()
    c21 = (s[..., 2, 1] - c20 * c10) / c11
    c22 = torch.maximum(s22 - c20 * c20 - c21 * c21, PIVOT_FLOOR * s22).clamp_min(tiny).sqrt()
    # L = C^-1 (lower triangular)
    l00, l11, l22 = c00.reciprocal(), c11.reciprocal(), c22.reciprocal()
    l10 = -c10 * l00 / c11
    l21 = -c21 * l11 / c22
    l20 = -(c20 * l00 + c21 * l10) / c22
    factor = torch.stack((l00, l11, l22, l10, l20, l21), dim=-1)
    precision = torch.stack((l00 * l00 + l10 * l10 + l20 * l20, l11 * l11 + l21 * l21, l22 * l22,
                             l10 * l11 + l20 * l21, l20 * l22, l21 * l22), dim=-1)
    return factor, precision


@torch.no_grad()
def half_extents(gaussians: Gaussians, cutoff: float | None) -> Tensor:
    """Axis-aligned half-size ``[B, N, 3]`` of the ellipsoid ``q < cutoff^2``: ``cutoff * sqrt(Sigma_aa)``.

    With ``cutoff=None`` every Gaussian reaches everywhere (``inf``).
    """
    if cutoff is None:
        return torch.full_like(gaussians.means, math.inf).detach()
    var = gaussians.covariance().diagonal(dim1=-2, dim2=-1)
    return (cutoff * var.sqrt()).detach()
