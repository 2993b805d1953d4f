"""Conversions between normalised volume coordinates and voxel indices / world millimetres.

Normalised coordinates (the network side): for a volume ``[B, C, D, H, W]``, component ``a`` of
a point is the position along array axis ``a`` (D, H, W order); voxel index ``i`` of an axis of
size ``n`` has its centre at ``u = (i + 0.5) / n``. So ``u = 0`` and ``u = 1`` are the outer
faces of the volume, and a scale of ``0.1`` is a tenth of that axis' edge.

World coordinates: ``world = affine @ [i_D, i_H, i_W, 1]`` with the 4x4 voxel-to-world
``affine`` of the volume (NIfTI / MONAI ``affine``, RAS millimetres), or ``diag(spacing)`` when
only the spacing is known. Covariances map as ``M Sigma M^T`` with ``M`` the linear part of the
combined normalised-to-world map; see :func:`transform_gaussians`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from medgauss.gaussians.container import Gaussians
from medgauss.gaussians.quaternions import quat_multiply, rotmat_to_quat

__all__ = [
    "normalized_to_voxel_matrix",
    "normalized_to_world_matrix",
    "transform_points",
    "transform_gaussians",
    "gaussians_to_world",
    "gaussians_to_normalized",
]


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) <= 0:
        raise ValueError(f"shape must be three positive sizes (D, H, W), got {shape}")
    return shape  # type: ignore[return-value]


def normalized_to_voxel_matrix(shape: Sequence[int]) -> Tensor:
    """``[4, 4]`` float64 map from normalised coordinates to continuous voxel indices (``i = u n - 0.5``)."""
    d, h, w = _check_shape(shape)
    m = torch.diag(torch.tensor([d, h, w, 1.0], dtype=torch.float64))
    m[:3, 3] = -0.5
    return m


def normalized_to_world_matrix(
    shape: Sequence[int],
    *,
    spacing: Sequence[float] | None = None,
    affine: Tensor | Sequence[Sequence[float]] | None = None,
) -> Tensor:
    """``[4, 4]`` float64 map from normalised coordinates to world millimetres.

    Args:
        shape: ``(D, H, W)`` volume size in voxels.
        spacing: voxel size in mm along (D, H, W); the world frame is then the voxel grid scaled
            (origin at the centre of voxel 0). Mutually exclusive with ``affine``.
        affine: ``[4, 4]`` voxel-index-to-world matrix (as stored in NIfTI / MONAI metadata).
    """
    if spacing is not None and affine is not None:
        raise ValueError("pass either spacing or affine, not both (an affine already holds the spacing)")
    if affine is not None:
        a = torch.as_tensor(affine, dtype=torch.float64).cpu()
        if a.shape != (4, 4) or not bool(torch.isfinite(a).all()):
            raise ValueError(f"affine must be a finite [4, 4] matrix, got shape {tuple(a.shape)}")
        if abs(float(torch.linalg.det(a[:3, :3]))) < 1e-12:
            raise ValueError("affine has a singular linear part")
    else:
        sp = (1.0, 1.0, 1.0) if spacing is None else tuple(float(s) for s in spacing)
        if len(sp) != 3 or min(sp) <= 0:
            raise ValueError(f"spacing must be three positive sizes in mm, got {sp}")
        a = torch.diag(torch.tensor([*sp, 1.0], dtype=torch.float64))
    return a @ normalized_to_voxel_matrix(shape)


def transform_points(points: Tensor, matrix: Tensor) -> Tensor:
    """Apply a 4x4 affine ``matrix`` to points ``[..., 3]`` (result in the points' dtype)."""
    m = torch.as_tensor(matrix, dtype=points.dtype, device=points.device)
    return points @ m[:3, :3].T + m[:3, 3]


def transform_gaussians(gaussians: Gaussians, matrix: Tensor) -> Gaussians:
    """Map Gaussians through the affine ``x -> M x + t`` given as a ``[4, 4]`` ``matrix``.

    Means map as points, covariances as ``M Sigma M^T``; intensities (peak values) are unchanged.
    When ``M`` is a uniform scale times an orthogonal matrix (any voxel-grid affine with isotropic
    spacing over a cubic crop, including axis permutations and flips) the result is exact and
    differentiable: scales are multiplied, rotations composed. Otherwise the new axes come from an
    eigen-decomposition of ``M Sigma M^T``, whose gradient is undefined for equal scales.
    """
    m = torch.as_tensor(matrix, dtype=torch.float64).cpu()
    if m.shape != (4, 4):
        raise ValueError(f"matrix must be [4, 4], got {tuple(m.shape)}")
    lin = m[:3, :3]
    gram = lin @ lin.T
    c = float(gram.diagonal().mean().sqrt())
    dev, dt = gaussians.device, gaussians.dtype
    means = transform_points(gaussians.means, m)
    if torch.allclose(gram, torch.eye(3, dtype=torch.float64) * c * c, rtol=1e-9, atol=1e-12 * c * c):
        q_mat = lin / c
        quats = gaussians.quats
        if float(torch.linalg.det(q_mat)) < 0:
            # Q = Q+ F with F = diag(1, 1, -1): F R F is the rotation with quaternion (w, -x, -y, z),
            # and flipping the Gaussian's third axis leaves its covariance unchanged.
            flip = torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)
            q_mat = q_mat * flip  # Q F (scales columns)
            quats = quats * torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=dt, device=dev)
        q_outer = rotmat_to_quat(q_mat).to(dtype=dt, device=dev)
        quats = quat_multiply(q_outer.expand_as(quats), quats)
        scales = gaussians.scales * c
    else:
        lin_t = lin.to(dtype=dt, device=dev)
        cov = lin_t @ gaussians.covariance() @ lin_t.T
        evals, evecs = torch.linalg.eigh(cov)
        # eigh may return a reflection; flip the last axis (leaves the covariance unchanged).
        sign = torch.where(torch.linalg.det(evecs) < 0, -1.0, 1.0).to(dt)
        evecs = torch.cat((evecs[..., :2], evecs[..., 2:] * sign[..., None, None]), dim=-1)
        scales = evals.clamp_min(torch.finfo(dt).tiny).sqrt()
        quats = rotmat_to_quat(evecs)
    return Gaussians(means, scales, quats, gaussians.intensities, validate=False)


def gaussians_to_world(
    gaussians: Gaussians,
    shape: Sequence[int],
    *,
    spacing: Sequence[float] | None = None,
    affine: Tensor | None = None,
) -> Gaussians:
    """Gaussians in normalised coordinates of a ``shape`` volume -> world millimetres."""
    return transform_gaussians(gaussians, normalized_to_world_matrix(shape, spacing=spacing, affine=affine))


def gaussians_to_normalized(
    gaussians: Gaussians,
    shape: Sequence[int],
    *,
    spacing: Sequence[float] | None = None,
    affine: Tensor | None = None,
) -> Gaussians:
    """World-millimetre Gaussians -> normalised coordinates of a ``shape`` volume (inverse of
    :func:`gaussians_to_world`)."""
    fwd = normalized_to_world_matrix(shape, spacing=spacing, affine=affine)
    return transform_gaussians(gaussians, torch.linalg.inv(fwd))
