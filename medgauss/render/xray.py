"""Differentiable X-ray projection of Gaussians: exact line integrals per detector ray.

The line integral of ``I exp(-0.5 (x - mu)^T P (x - mu))`` along ``x = o + t d`` (``d`` unit,
``t`` over the whole real line) is, with ``r = o - mu``, ``a = d^T P d``, ``b = d^T P r`` and
``c = r^T P r``::

    I * sqrt(2 pi / a) * exp(-0.5 (c - b^2 / a))

``c - b^2 / a`` is the smallest squared Mahalanobis distance from the Gaussian's centre to the
ray. Every backend evaluates this closed form for each (ray, Gaussian) pair, with the ray's own
origin and direction, and counts a Gaussian on a ray only where that distance is below ``cutoff``
(the same rule as :func:`splat`).

Why not a rasteriser footprint: R²-Gaussian (like 3DGS) linearises the perspective map at each
Gaussian's centre (EWA), splats the resulting 2-D Gaussian ``J Sigma J^T`` and multiplies it by an
integration-bias factor ``sqrt(2 pi det(Sigma_ray) / det(Sigma_2d))``. For parallel beams that is
this same formula (the factor is ``sqrt(2 pi / a)`` and the 2-D exponent is ``c - b^2/a``, by the
Schur complement); for cone beams it treats every ray through the Gaussian as parallel to the
centre ray, an error of order ``sigma / distance to the source`` (about 1 % of the peak for a 20 mm
Gaussian 1 m from the source, see ``tests/render/test_project.py``). The per-ray form is exact for
both, for any size and position (even straddling the source plane), at a similar cost per pair.

This module holds the public entry point and the decisions every backend shares:

* :func:`footprints`: the exact outline (a conic) and pixel bounding box of each Gaussian's
  cutoff ellipsoid in each view (a ray meets the ellipsoid only if its pixel lies inside);
* :func:`tile_rects`: the same boxes in units of pixel tiles, used to bin Gaussians into tiles;
* :func:`detector_rays`: every pixel's ray, computed on the Gaussians' device from the geometry's
  ``[V, 12]`` per-view vectors (nothing of the size of the detector is built on the CPU or copied);
* the contract on Gaussians (finite, any anisotropy, empty batches) of :mod:`medgauss.render._common`.

The backends are the pure-torch reference (:mod:`medgauss.render._xray_torch`, dense, no culling),
numba (:mod:`medgauss.render._xray_numba`) and Triton (:mod:`medgauss.render._xray_triton`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from medgauss.dispatch import get_implementation, resolve_backend
from medgauss.gaussians import Gaussians
from medgauss.render import _common

__all__ = ["project", "detector_rays", "footprints", "footprint_pixel_rects", "tile_rects", "TILE_SHAPE"]

# Detector tile (rows, cols) used to bin Gaussians for the culled backends.
TILE_SHAPE = (16, 16)

# Safety margin (in pixels) added around every footprint so that rounding in the float32 kernels
# can never move a ray that meets the cutoff ellipsoid out of the box.
_FOOTPRINT_MARGIN_PX = 1e-2

# Views x Gaussians evaluated at once when computing footprints (bounds temporary memory).
_FOOTPRINT_CHUNK = 1 << 20


def project(
    gaussians: Gaussians,
    geometry: Any,
    *,
    cutoff: float | None = 3.0,
    view_ids: Sequence[int] | Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """Line integrals of a sum of Gaussians along every detector ray (differentiable).

    Args:
        gaussians: ``B`` x ``N`` Gaussians in WORLD millimetres (the geometry's frame: x, y, z,
            rotation axis z). ``intensities [B, N]`` is the linear attenuation at each centre
            (per mm); ``scales`` are standard deviations in mm. Any finite parameters with positive
            scales, however anisotropic (see :mod:`medgauss.render._common`); non-finite values
            raise ``ValueError`` naming the field. ``B = 0`` and ``N = 0`` are valid.
        geometry: a :class:`medgauss.geometry.ConeBeamGeometry` or
            :class:`medgauss.geometry.ParallelBeamGeometry` (anything with the same ``vectors``,
            ``is_cone``, ``projection_matrices``, ``num_views`` and ``det_shape``).
        cutoff: Mahalanobis truncation radius: a Gaussian contributes to a ray only where the
            ray's smallest Mahalanobis distance to its centre is below ``cutoff``; ``None``
            integrates every Gaussian on every ray.
        view_ids: optional 1-D integer indices of the views to render (default: all views).
        backend: ``"auto"`` | ``"torch"`` | ``"numba"`` | ``"triton"`` (see
            :mod:`medgauss.dispatch`).

    Returns:
        ``[B, V, rows, cols]`` line integrals (dimensionless), ``V`` = number of rendered views,
        in the dtype and on the device of ``gaussians``. Gradients flow to means, scales, quats
        and intensities for every backend (zeros, never missing, for empty inputs).
    """
    gaussians = _common.check_gaussians(gaussians)
    cutoff = _common.check_cutoff(cutoff)
    _check_geometry(geometry)
    ids = _check_view_ids(view_ids, int(geometry.num_views))
    dtype, device = gaussians.dtype, gaussians.device
    n_views = int(geometry.num_views) if ids is None else int(ids.numel())
    rows, cols = (int(s) for s in geometry.det_shape)
    name = resolve_backend("project", backend, device)
    if _common.is_empty(gaussians, n_views * rows * cols):
        return _common.empty_result(gaussians, (gaussians.batch_size, n_views, rows, cols))
    origins, directions = detector_rays(geometry, ids, dtype=dtype, device=device)
    matrices = torch.as_tensor(geometry.projection_matrices(), dtype=torch.float64).to(device)
    if ids is not None:
        matrices = matrices[ids.to(matrices.device)]
    if tuple(matrices.shape) != (n_views, 3, 4):
        raise ValueError(f"geometry.projection_matrices() must give [V, 3, 4] for the rendered views, got "
                         f"{tuple(matrices.shape)}")
    return get_implementation("project", name)(gaussians, origins, directions, matrices, cutoff=cutoff)


def detector_rays(geometry: Any, view_ids: Sequence[int] | Tensor | None = None, *,
                  dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Every detector pixel's ray, computed on ``device`` from the geometry's per-view vectors.

    ``geometry.vectors()`` is ``[V, 12]`` float64: the source point (cone beam) or the ray direction
    (parallel beam), the centre of pixel ``(0, 0)``, and the steps from one pixel centre to the next
    column and row (world mm). Only these ``12 V`` numbers travel to the device; the rays are built
    there in float64 for float64 output and in float32 otherwise (then cast to ``dtype``), the same
    rays as ``geometry.rays()`` up to that rounding.

    Args:
        geometry: a cone- or parallel-beam geometry (``vectors()``, ``is_cone``, ``det_shape``).
        view_ids: optional 1-D integer view indices (default: every view).
        dtype: floating dtype of the result.
        device: device of the result.

    Returns:
        ``(origins, directions)``, each ``[V', rows, cols, 3]`` world mm, directions of unit length.
        Cone beam: the origins are the source (one per view, broadcast); parallel beam: the pixel
        centres, and the directions are one per view (broadcast). Both may be expanded views:
        call ``.contiguous()`` before writing to them.
    """
    vectors = torch.as_tensor(geometry.vectors(), dtype=torch.float64)
    num_views = int(geometry.num_views)
    if tuple(vectors.shape) != (num_views, 12):
        raise ValueError(f"geometry.vectors() must give [V={num_views}, 12], got {tuple(vectors.shape)}")
    if view_ids is not None:
        vectors = vectors[torch.as_tensor(view_ids, dtype=torch.long, device=vectors.device)]
    work = torch.float64 if dtype == torch.float64 else torch.float32
    vec = vectors.to(device=device, dtype=work)[:, None, None, :]  # [V, 1, 1, 12]
    rows, cols = (int(s) for s in geometry.det_shape)
    row = torch.arange(rows, dtype=work, device=vec.device)[None, :, None, None]
    col = torch.arange(cols, dtype=work, device=vec.device)[None, None, :, None]
    pixels = vec[..., 3:6] + col * vec[..., 6:9] + row * vec[..., 9:12]  # [V, rows, cols, 3]
    source = vec[..., 0:3]
    if bool(geometry.is_cone):
        directions = pixels - source
        directions = directions / directions.norm(dim=-1, keepdim=True)
        origins = source.expand_as(pixels)
    else:
        origins = pixels
        directions = (source / source.norm(dim=-1, keepdim=True)).expand_as(pixels)
    return origins.to(dtype), directions.to(dtype)


def _check_geometry(geometry: Any) -> None:
    needed = ("vectors", "is_cone", "projection_matrices", "num_views", "det_shape")
    missing = [a for a in needed if not hasattr(geometry, a)]
    if missing:
        raise ValueError(f"geometry must be a ConeBeamGeometry or ParallelBeamGeometry (with vectors(), "
                         f"is_cone, projection_matrices(), num_views, det_shape); got "
                         f"{type(geometry).__name__} lacking {missing}")


def _check_view_ids(view_ids: Sequence[int] | Tensor | None, num_views: int) -> Tensor | None:
    """``None`` or a validated 1-D int64 CPU tensor of view indices in ``[0, num_views)``."""
    if view_ids is None:
        return None
    try:
        ids = torch.as_tensor(view_ids).cpu()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"view_ids must be a 1-D sequence of ints, got {view_ids!r}") from exc
    if ids.ndim != 1 or ids.numel() == 0:
        raise ValueError(f"view_ids must be a non-empty 1-D sequence of ints, got shape {tuple(ids.shape)}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"view_ids must be integers, got dtype {ids.dtype}")
    if int(ids.min()) < 0 or int(ids.max()) >= num_views:
        raise ValueError(f"view_ids must lie in [0, {num_views - 1}] (geometry.num_views={num_views}), got "
                         f"range [{int(ids.min())}, {int(ids.max())}]")
    return ids.long()


@torch.no_grad()
def footprint_pixel_rects(
    gaussians: Gaussians, matrices: Tensor, det_shape: tuple[int, int], cutoff: float | None
) -> Tensor:
    """Pixel boxes ``[B, V, N, 4]`` of the Gaussians' cutoff ellipsoids (see :func:`footprints`)."""
    return footprints(gaussians, matrices, det_shape, cutoff)[0]


@torch.no_grad()
def footprints(
    gaussians: Gaussians, matrices: Tensor, det_shape: tuple[int, int], cutoff: float | None
) -> tuple[Tensor, Tensor]:
    """Exact detector footprint of every Gaussian's cutoff ellipsoid in every view: box and conic.

    The ellipsoid ``E = {x : (x - mu)^T Sigma^{-1} (x - mu) <= cutoff^2}`` has the dual quadric
    ``Q* = [[M - mu mu^T, -mu], [-mu^T, -1]]`` with ``M = cutoff^2 Sigma``: a plane ``pi`` touches
    ``E`` iff ``pi^T Q* pi = 0``. Its outline on the detector (through the source for cone beam,
    along the rays for parallel beam) is the conic with dual ``C* = P Q* P^T`` (``P`` the ``[3, 4]``
    projection matrix, pixel coordinates ``(col, row, 1)``): ``C*_jk = p_j^T M p_k - (p_j . mu)(p_k . mu)``.

    * Box: the columns ``u`` where the line ``col = u`` touches the outline solve
      ``C*_00 - 2 u C*_02 + u^2 C*_22 = 0`` (rows likewise with index 1). For parallel beam this is
      ``u = p0 . mu +- cutoff sqrt(p0^T Sigma p0)``.
    * Conic: the pixels whose ray meets ``E`` are ``x^T C x >= 0`` with ``C = adj(C*)``, sign-fixed so
      that the projected centre is inside; each detector row is then one column interval.

    When ``E`` meets the plane through the source parallel to the detector (``C*_22 >= 0``), the
    outline is unbounded: the box is the whole detector and the conic is ``(0, 0, 0, 0, 0, 1)``
    (every pixel of every row). ``M`` is enlarged by a relative ``1e-6`` and boxes by 0.01 pixel so
    that rounding never drops a ray whose smallest Mahalanobis distance is below ``cutoff``: culling
    with these footprints never drops a contributing (ray, Gaussian) pair.

    Args:
        gaussians: ``B`` x ``N`` Gaussians in world mm.
        matrices: ``[V, 3, 4]`` float64 world-to-pixel projection matrices (pixel centres at
            integers, ``(col * w, row * w, w)``).
        det_shape: detector ``(rows, cols)``.
        cutoff: Mahalanobis radius, or ``None`` (every footprint is the whole detector).

    Returns:
        ``boxes [B, V, N, 4]`` int32 inclusive pixel ranges ``(row_min, row_max, col_min, col_max)``
        clipped to the detector (empty where ``row_min > row_max`` or ``col_min > col_max``) and
        ``conics [B, V, N, 6]`` float64 ``(C00, C01, C02, C11, C12, C22)``, scaled to max-abs 1:
        pixel ``(col, row)`` may see the Gaussian iff
        ``C00 col^2 + 2 C01 col row + 2 C02 col + C11 row^2 + 2 C12 row + C22 >= 0``.
    """
    rows, cols = det_shape
    b, n = gaussians.batch_size, gaussians.num_gaussians
    v = matrices.shape[0]
    device = gaussians.device
    full = torch.tensor([0, rows - 1, 0, cols - 1], dtype=torch.int32, device=device)
    everywhere = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 1.0], dtype=torch.float64, device=device)
    if cutoff is None:
        return full.expand(b, v, n, 4).contiguous(), everywhere.expand(b, v, n, 6).contiguous()
    g64 = gaussians.detach().to(torch.float64)  # a float32 covariance of a thin Gaussian is not even PSD
    mu = g64.means
    m_mat = g64.covariance() * (cutoff * cutoff * (1 + 1e-6))  # [B, N, 3, 3]
    mu_h = torch.cat((mu, torch.ones_like(mu[..., :1])), dim=-1)  # [B, N, 4]
    boxes, conics = [], []
    step = max(1, _FOOTPRINT_CHUNK // max(1, b * n))
    for start in range(0, v, step):
        p = matrices[start:start + step].to(device=device, dtype=torch.float64)  # [v, 3, 4]
        alpha = torch.einsum("vkj,bnj->bvnk", p, mu_h)  # [B, v, N, 3]: projected centre (homogeneous)
        mp = torch.einsum("bnij,vkj->bvnik", m_mat, p[..., :3])  # M p_k: [B, v, N, 3, 3(k)]
        beta = torch.einsum("vji,bvnik->bvnjk", p[..., :3], mp)  # p_j^T M p_k: [B, v, N, 3, 3]
        dual = beta - alpha[..., :, None] * alpha[..., None, :]  # C*
        bounded = -dual[..., 2, 2] > 1e-12 * (alpha[..., 2].square() + beta[..., 2, 2])
        safe_c22 = torch.where(bounded, dual[..., 2, 2], -torch.ones_like(dual[..., 2, 2]))
        bounds = []
        for k, size in ((1, rows), (0, cols)):  # rows from p1, columns from p0
            root = (dual[..., k, 2].square() - dual[..., k, k] * safe_c22).clamp_min(0).sqrt()
            lo = (dual[..., k, 2] + root) / safe_c22  # C*_22 < 0: the larger numerator gives the lower root
            hi = (dual[..., k, 2] - root) / safe_c22
            lo = torch.where(bounded, lo, torch.full_like(lo, -math.inf))
            hi = torch.where(bounded, hi, torch.full_like(hi, math.inf))
            margin = _FOOTPRINT_MARGIN_PX + 1e-9 * torch.maximum(lo.abs(), hi.abs()).nan_to_num(0, 0, 0)
            first = torch.ceil((lo - margin).clamp(-1.0, float(size)))
            last = torch.floor((hi + margin).clamp(-1.0, float(size)))
            bounds += [first.clamp_min(0), last.clamp_max(size - 1)]
        boxes.append(torch.stack(bounds, dim=-1).to(torch.int32))
        conics.append(_outline_conic(dual, alpha, bounded, everywhere))
    if not boxes:
        return full.expand(b, 0, n, 4).contiguous(), everywhere.expand(b, 0, n, 6).contiguous()
    return torch.cat(boxes, dim=1), torch.cat(conics, dim=1)


def _outline_conic(dual: Tensor, centre: Tensor, bounded: Tensor, everywhere: Tensor) -> Tensor:
    """Packed point conic ``adj(C*)`` ``[..., 6]``, positive at the projected ``centre [..., 3]``."""
    s00, s01, s02 = dual[..., 0, 0], dual[..., 0, 1], dual[..., 0, 2]
    s11, s12, s22 = dual[..., 1, 1], dual[..., 1, 2], dual[..., 2, 2]
    adj = torch.stack((s11 * s22 - s12 * s12, s02 * s12 - s01 * s22, s01 * s12 - s02 * s11,
                       s00 * s22 - s02 * s02, s01 * s02 - s00 * s12, s00 * s11 - s01 * s01), dim=-1)
    x, y, w = centre.unbind(-1)
    at_centre = (adj[..., 0] * x * x + 2 * adj[..., 1] * x * y + 2 * adj[..., 2] * x * w
                 + adj[..., 3] * y * y + 2 * adj[..., 4] * y * w + adj[..., 5] * w * w)
    scale = adj.abs().amax(-1).clamp_min(torch.finfo(torch.float64).tiny)
    conic = adj * (torch.sign(at_centre) / scale)[..., None]
    return torch.where(bounded[..., None] & (at_centre != 0)[..., None], conic, everywhere)


def tile_rects(pixel_rects: Tensor, tile_shape: tuple[int, int] = TILE_SHAPE) -> Tensor:
    """Tile ranges ``[..., 4]`` (inclusive, int32) covering the pixel ranges ``[..., 4]``.

    Empty pixel boxes give empty tile boxes (``first > last``).
    """
    th, tw = tile_shape
    r0, r1, c0, c1 = pixel_rects.unbind(-1)
    empty = (r0 > r1) | (c0 > c1)
    t = torch.stack((r0 // th, r1 // th, c0 // tw, c1 // tw), dim=-1)
    t[..., 0] = torch.where(empty, torch.ones_like(r0), t[..., 0])
    t[..., 1] = torch.where(empty, torch.zeros_like(r0), t[..., 1])
    return t.to(torch.int32)
