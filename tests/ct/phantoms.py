"""Analytic ellipsoid phantoms for the CT tests: exact chord lengths and supersampled voxelisation."""

from __future__ import annotations

import math

import torch
from torch import Tensor

# (centre x, y, z mm), (semi-axes mm), rotation about z (rad), attenuation per mm
ELLIPSOIDS = (
    ((0.0, 0.0, 0.0), (20.0, 15.0, 17.0), 0.0, 0.02),
    ((5.0, -4.0, 3.0), (7.0, 4.0, 6.0), 0.6, 0.03),
    ((-7.0, 6.0, -4.0), (3.0, 5.0, 4.0), -0.3, -0.01),
)


def _inverse_shape_matrix(axes, angle) -> Tensor:
    c, s = math.cos(angle), math.sin(angle)
    rot = torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    return rot @ torch.diag(1.0 / torch.tensor(axes, dtype=torch.float64) ** 2) @ rot.T


def analytic_projection(origins: Tensor, directions: Tensor) -> Tensor:
    """Exact line integrals of :data:`ELLIPSOIDS` along rays ``[..., 3]`` (float64, whole line)."""
    total = torch.zeros(origins.shape[:-1], dtype=torch.float64)
    for centre, axes, angle, mu in ELLIPSOIDS:
        m = _inverse_shape_matrix(axes, angle)
        r = origins - torch.tensor(centre, dtype=torch.float64)
        a = torch.einsum("...i,ij,...j->...", directions, m, directions)
        b = torch.einsum("...i,ij,...j->...", directions, m, r)
        c = torch.einsum("...i,ij,...j->...", r, m, r) - 1.0
        disc = (b * b - a * c).clamp_min(0.0)
        total = total + mu * 2.0 * disc.sqrt() / a
    return total


def voxelise(geometry, supersample: int = 3) -> Tensor:
    """``[1, 1, D, H, W]`` float64 phantom: each voxel is the mean over ``supersample^3`` sub-points."""
    d, h, w = geometry.vol_shape
    sd, sh, sw = geometry.vol_spacing
    sub = (torch.arange(supersample, dtype=torch.float64) + 0.5) / supersample - 0.5
    axes = [(torch.arange(n, dtype=torch.float64)[:, None] + sub[None, :]).reshape(-1) for n in (d, h, w)]
    zz, yy, xx = torch.meshgrid(*axes, indexing="ij")
    idx = torch.stack((zz, yy, xx, torch.ones_like(xx)), dim=-1)
    world = idx @ geometry.volume_affine.T  # (x, y, z, 1)
    vol = torch.zeros(zz.shape, dtype=torch.float64)
    for centre, axes_mm, angle, mu in ELLIPSOIDS:
        m = _inverse_shape_matrix(axes_mm, angle)
        r = world[..., :3] - torch.tensor(centre, dtype=torch.float64)
        vol = vol + mu * (torch.einsum("...i,ij,...j->...", r, m, r) <= 1.0).to(torch.float64)
    k = supersample
    vol = vol.reshape(d, k, h, k, w, k).mean(dim=(1, 3, 5))
    return vol[None, None]
