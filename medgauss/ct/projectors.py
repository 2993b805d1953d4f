"""Public voxel projectors: ``forward_project`` (line integrals) and its matched adjoint ``back_project``.

Both use Joseph's method (see :mod:`medgauss.ct._joseph` for why) and choose their backend through
:mod:`medgauss.dispatch` (argument > ``MEDGAUSS_BACKEND`` > auto: numba for CPU tensors,
torch for CUDA tensors). Both backends are differentiable. An empty batch (``B = 0``) gives an
empty result of the right shape (with a gradient) for every backend.
"""

from __future__ import annotations

import torch
from torch import Tensor

from medgauss.dispatch import get_implementation, resolve_backend
from medgauss.geometry import CircularGeometry

__all__ = ["forward_project", "back_project"]


def _check_geometry(geometry: object) -> CircularGeometry:
    if not isinstance(geometry, CircularGeometry):
        raise ValueError(
            f"geometry must be a ConeBeamGeometry or ParallelBeamGeometry, got {type(geometry).__name__}"
        )
    return geometry


def _check_float(name: str, tensor: object) -> Tensor:
    if not isinstance(tensor, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{name} must be float32 or float64, got {tensor.dtype}")
    if tensor.numel() and not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    return tensor


def check_projections(projections: object, geometry: object) -> tuple[Tensor, CircularGeometry]:
    """Validate a projection stack ``[B, V, rows, cols]`` (float32/float64) against ``geometry``.

    The one place every consumer of projections (``back_project``, ``fdk``, ``sart``, ``asd_pocs``)
    checks them; raises ``ValueError`` naming the argument and what was received (wrong type, dtype or
    shape, or non-finite values).
    """
    geometry = _check_geometry(geometry)
    projections = _check_float("projections", projections)
    expected = geometry.output_shape()
    if projections.ndim != 4 or tuple(projections.shape[1:]) != expected:
        raise ValueError(
            f"projections must have shape [B, {', '.join(map(str, expected))}] "
            f"(views, rows, cols of the geometry), got {tuple(projections.shape)}"
        )
    return projections, geometry


def forward_project(volume: Tensor, geometry: CircularGeometry, *, backend: str = "auto") -> Tensor:
    """Line integrals of an attenuation volume along every detector ray of ``geometry``.

    Args:
        volume: ``[B, 1, D, H, W]`` linear attenuation per mm (float32/float64), array axes
            (D, H, W) along world (z, y, x) as in the geometry contract; ``(D, H, W)`` must equal
            ``geometry.vol_shape``.
        geometry: a :class:`~medgauss.geometry.ConeBeamGeometry` or ``ParallelBeamGeometry``.
        backend: ``"auto"``, ``"numba"`` (CPU) or ``"torch"`` (any device).

    Returns:
        ``[B, V, rows, cols]`` dimensionless line integrals, same dtype/device as ``volume``
        (``B = 0`` gives an empty stack).
    """
    geometry = _check_geometry(geometry)
    volume = _check_float("volume", volume)
    expected = tuple(geometry.vol_shape)
    if volume.ndim != 5 or volume.shape[1] != 1 or tuple(volume.shape[2:]) != expected:
        raise ValueError(
            f"volume must have shape [B, 1, {', '.join(map(str, expected))}] "
            f"(geometry.vol_shape), got {tuple(volume.shape)}"
        )
    name = resolve_backend("forward_project", backend, volume.device)
    if volume.shape[0] == 0:
        return _empty_like_graph(volume, (0, *geometry.output_shape()))
    return get_implementation("forward_project", name)(volume.contiguous(), geometry)


def back_project(projections: Tensor, geometry: CircularGeometry, *, backend: str = "auto") -> Tensor:
    """Matched adjoint (transpose) of :func:`forward_project`: smears projections back into the volume.

    ``<forward_project(x), y> == <x, back_project(y)>`` to rounding. This is the unfiltered, unweighted
    transpose used by iterative methods, not an FBP/FDK back projection (see :func:`medgauss.ct.fdk`).

    Args:
        projections: ``[B, V, rows, cols]`` (float32/float64) with ``(V, rows, cols)`` equal to
            ``geometry.output_shape()``.
        geometry: the geometry the projections belong to.
        backend: ``"auto"``, ``"numba"`` (CPU) or ``"torch"`` (any device).

    Returns:
        ``[B, 1, D, H, W]`` in units of projection value times mm, same dtype/device as ``projections``
        (``B = 0`` gives an empty batch).
    """
    projections, geometry = check_projections(projections, geometry)
    name = resolve_backend("back_project", backend, projections.device)
    if projections.shape[0] == 0:
        return _empty_like_graph(projections, (0, 1, *geometry.vol_shape))
    return get_implementation("back_project", name)(projections.contiguous(), geometry)


def _empty_like_graph(source: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Zeros of ``shape`` (an empty batch) in ``source``'s dtype/device, in ``source``'s graph."""
    return source.new_zeros(shape) + source.sum() * 0
