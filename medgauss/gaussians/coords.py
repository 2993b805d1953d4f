"""Conversions between normalised volume coordinates and voxel indices / world millimetres.

Normalised coordinates (the network side): for a volume ``[B, C, D, H, W]``, component ``a`` of
a point is the position along array axis ``a`` (D, H, W order); voxel index ``i`` of an axis of
size ``n`` has its centre at ``u = (i + 0.5) / n``. So ``u = 0`` and ``u = 1`` are the outer
faces of the volume, and a scale of ``0.1`` is a tenth of that axis' edge.

World coordinates: ``world = affine @ [i_D, i_H, i_W, 1]`` with the 4x4 voxel-to-world
``affine`` of the volume (NIfTI / MONAI ``affine``, RAS millimetres), or ``diag(spacing)`` when
only the spacing is known. Covariances map as ``M Sigma M^T`` with ``M`` the linear part of the
combined normalised-to-world map; when ``M`` is not a similarity it is carried as the Gaussians'
``linear_map`` (exact and differentiable everywhere); see :func:`transform_gaussians`. The array
axes of every volume follow :mod:`medgauss.frame`: ``(D, H, W)`` = world ``(z, y, x)``.
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
    Every route is exact and differentiable at every input:

    * ``M`` a uniform scale times an orthogonal matrix (isotropic spacing, axis permutations, flips),
      on Gaussians without a ``linear_map``: scales are multiplied and rotations composed, so the
      result stays in plain scale / rotation form.
    * any other ``M`` (anisotropic spacing, a non-cubic crop, shear): ``M`` is composed into the
      Gaussians' ``linear_map`` (``L -> M L``), which every renderer honours through
      :meth:`Gaussians.covariance` / :meth:`Gaussians.precision`. No eigen-decomposition is taken
      (its gradient is undefined where two mapped axes have equal length, e.g. an isotropic Gaussian
      on a CT grid whose z spacing differs); :meth:`Gaussians.canonical` does that for export only.

    Args:
        gaussians: ``B`` x ``N`` Gaussians.
        matrix: ``[4, 4]`` affine (float64 recommended; cast to the Gaussians' dtype).

    Returns:
        The mapped Gaussians (same ``B``, ``N``, dtype and device).
    """
    m = torch.as_tensor(matrix, dtype=torch.float64).cpu()
    if m.shape != (4, 4) or not bool(torch.isfinite(m).all()):
        raise ValueError(f"matrix must be a finite [4, 4] affine, got shape {tuple(m.shape)}")
    lin = m[:3, :3]
    gram = lin @ lin.T
    c = float(gram.diagonal().mean().sqrt())
    if not c > 0:
        raise ValueError("matrix has a zero linear part")
    dev, dt = gaussians.device, gaussians.dtype
    means = transform_points(gaussians.means, m)
    similarity = torch.allclose(gram, torch.eye(3, dtype=torch.float64) * c * c, rtol=1e-9, atol=1e-12 * c * c)
    if gaussians.linear_map is not None or not similarity:
        lin_t = lin.to(dtype=dt, device=dev)
        linear = lin_t if gaussians.linear_map is None else lin_t @ gaussians.linear_map
        return Gaussians(means, gaussians.scales, gaussians.quats, gaussians.intensities,
                         linear_map=linear, validate=False)
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
    return Gaussians(means, gaussians.scales * c, quats, gaussians.intensities, validate=False)


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
