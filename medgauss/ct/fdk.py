"""Analytic reconstruction: FDK for circular cone beam, FBP for parallel beam.

FDK (Feldkamp, Davis & Kress 1984, in the form of Kak & Slaney ch. 3): with detector coordinates
``(a, b)`` scaled to a virtual detector through the isocentre,

1. cosine weighting ``p'(a, b) = p(a, b) dso / sqrt(dso^2 + a^2 + b^2)``,
2. ramp filtering along detector rows, ``q = p' * h`` (band-limited discrete ramp of Kak & Slaney,
   optionally apodised by a window),
3. weighted voxel-driven back projection ``f(x) = sum_views w_theta (dso / (dso - x . e_s))^2 q(a(x), b(x))``,

with angular weights ``w_theta`` = half the angular spacing for a full 360 degree scan (each line is
measured twice). Parallel-beam FBP is the same without steps 1 and the distance weight. Short scans
are normalised by their arc (no Parker weights; expect artefacts below 180 degrees + fan).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from medgauss.ct.projectors import check_projections
from medgauss.geometry import CircularGeometry, ConeBeamGeometry

__all__ = ["WINDOWS", "ramp_filter", "filter_projections", "angular_weights", "fdk"]

WINDOWS = ("ram-lak", "shepp-logan", "cosine", "hamming", "hann")

_VOXELS_PER_CHUNK = 1 << 22


def ramp_filter(
    length: int,
    spacing: float,
    window: str = "ram-lak",
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Frequency response ``[n_fft]`` of the apodised discrete ramp filter for rows of ``length`` samples.

    Uses the spatial ramp kernel of Kak & Slaney (``h(0) = 1/(4 tau^2)``, ``h(n odd) = -1/(n pi tau)^2``,
    0 for even ``n``) on ``n_fft >= 2 length`` (power of two, no circular wrap), times ``tau`` (so that
    ``ifft(fft(p) H)`` approximates the continuous convolution), times the ``window`` in frequency.

    Args:
        length: detector samples per row.
        spacing: sample spacing ``tau`` in mm (at the isocentre for cone beam).
        window: one of :data:`WINDOWS`.
    """
    if window not in WINDOWS:
        raise ValueError(f"window must be one of {WINDOWS}, got {window!r}")
    if length < 1 or not (spacing > 0):
        raise ValueError(f"length must be >= 1 and spacing > 0, got {length}, {spacing}")
    n_fft = 1 << max(1, math.ceil(math.log2(2 * length)))
    n = torch.arange(n_fft, dtype=torch.float64)
    n = torch.where(n <= n_fft // 2, n, n - n_fft)  # signed offsets, circularly
    h = torch.zeros(n_fft, dtype=torch.float64)
    h[0] = 1.0 / (4.0 * spacing**2)
    odd = (n.abs() % 2) == 1
    h[odd] = -1.0 / (math.pi * n[odd] * spacing) ** 2
    response = torch.fft.fft(h).real * spacing
    nu = torch.fft.fftfreq(n_fft, dtype=torch.float64)  # cycles per sample, [-0.5, 0.5)
    if window == "shepp-logan":
        response = response * torch.sinc(nu)
    elif window == "cosine":
        response = response * torch.cos(math.pi * nu)
    elif window == "hamming":
        response = response * (0.54 + 0.46 * torch.cos(2 * math.pi * nu))
    elif window == "hann":
        response = response * (0.5 + 0.5 * torch.cos(2 * math.pi * nu))
    return response.to(dtype=dtype, device=device)


def _iso_scale(geometry: CircularGeometry) -> float:
    return geometry.dso / geometry.dsd if isinstance(geometry, ConeBeamGeometry) else 1.0


def filter_projections(projections: Tensor, geometry: CircularGeometry, window: str = "ram-lak") -> Tensor:
    """Cosine-weighted (cone beam) and ramp-filtered projections ``[B, V, rows, cols]`` (same shape out;
    ``B = 0`` gives an empty stack)."""
    rows, cols = geometry.det_shape
    scale = _iso_scale(geometry)
    p = projections
    if isinstance(geometry, ConeBeamGeometry):
        row_mm, col_mm = geometry.det_spacing
        a = (
            (torch.arange(cols, dtype=torch.float64) - (cols - 1) / 2) * col_mm + geometry.det_offset[1]
        ) * scale
        b = (
            (torch.arange(rows, dtype=torch.float64) - (rows - 1) / 2) * row_mm + geometry.det_offset[0]
        ) * scale
        cosine = geometry.dso / torch.sqrt(geometry.dso**2 + a[None, :] ** 2 + b[:, None] ** 2)
        p = p * cosine.to(dtype=p.dtype, device=p.device)
    response = ramp_filter(cols, geometry.det_spacing[1] * scale, window, dtype=p.dtype, device=p.device)
    if p.shape[0] == 0:  # empty batch: the FFT rejects it, the answer is empty
        return p.clone()
    spectrum = torch.fft.rfft(p, n=response.numel(), dim=-1)
    filtered = torch.fft.irfft(spectrum * response[: spectrum.shape[-1]], n=response.numel(), dim=-1)
    return filtered[..., :cols]


def angular_weights(angles: Tensor, *, name: str = "angles") -> Tensor:
    """``[V]`` float64 quadrature weights of the views: each view's share of the arc, scaled by
    ``pi / arc`` so a full 360 degree scan gets half its angular spacing (every line measured twice).

    Args:
        angles: ``[V]`` gantry angles in radians.
        name: how error messages call ``angles`` (e.g. ``"geometry.angles"``).

    Raises:
        ValueError: several views whose angles are all equal (a zero arc has no quadrature).
    """
    v = angles.numel()
    if v == 1:
        return torch.full((1,), math.pi, dtype=torch.float64)
    if float(angles.max() - angles.min()) == 0.0:
        raise ValueError(
            f"{name} holds {v} views at the same angle ({float(angles[0]):.6g} rad): a zero arc has no "
            "angular quadrature, so FDK / FBP cannot weight the views (use distinct angles)"
        )
    order = torch.argsort(angles)
    sorted_angles = angles[order].double()
    gaps = torch.diff(sorted_angles)
    mean_gap = float(gaps.mean())
    arc = min(float(sorted_angles[-1] - sorted_angles[0]) + mean_gap, 2 * math.pi)
    # each view covers half the gap to each neighbour; the ends get a mean half-gap outside
    share = torch.empty(v, dtype=torch.float64)
    share[1:-1] = 0.5 * (gaps[:-1] + gaps[1:])
    share[0] = 0.5 * (gaps[0] + mean_gap)
    share[-1] = 0.5 * (gaps[-1] + mean_gap)
    out = torch.empty_like(share)
    out[order] = share * math.pi / arc
    return out


def _backproject_weighted(filtered: Tensor, geometry: CircularGeometry, weights: Tensor) -> Tensor:
    """Voxel-driven back projection ``[B, V, rows, cols]`` -> ``[B, 1, D, H, W]`` with FDK distance weights.

    All views of a z-slab go through one ``grid_sample`` call (views in its batch dimension).
    """
    b, v = filtered.shape[:2]
    d, h, w = geometry.vol_shape
    rows, cols = geometry.det_shape
    dtype, device = filtered.dtype, filtered.device
    mats = geometry.projection_matrices().to(device=device, dtype=dtype)  # [V, 3, 4]
    aff = geometry.volume_affine
    # world coordinates are separable: x from w, y from h, z from d
    xs = float(aff[0, 2]) * torch.arange(w, dtype=dtype, device=device) + float(aff[0, 3])
    ys = float(aff[1, 1]) * torch.arange(h, dtype=dtype, device=device) + float(aff[1, 3])
    zs = float(aff[2, 0]) * torch.arange(d, dtype=dtype, device=device) + float(aff[2, 3])
    images = filtered.transpose(0, 1)  # [V, B, rows, cols]
    view_w = weights.to(dtype=dtype, device=device)[:, None, None, None, None]
    out = torch.empty(b, d, h, w, dtype=dtype, device=device)
    slab = max(1, _VOXELS_PER_CHUNK // (v * h * w))
    m = mats[:, :, :, None, None, None]  # [V, 3, 4, 1, 1, 1]
    for z0 in range(0, d, slab):
        z = zs[z0 : z0 + slab, None, None]
        # [V, 3, slab, H, W]: (col w, row w, w) of every voxel in every view
        hom = m[:, :, 0] * xs + m[:, :, 1] * ys[:, None] + m[:, :, 2] * z + m[:, :, 3]
        inv_w = 1.0 / hom[:, 2]
        grid = torch.stack(
            ((2 * hom[:, 0] * inv_w + 1) / cols - 1, (2 * hom[:, 1] * inv_w + 1) / rows - 1), -1
        )
        vals = F.grid_sample(
            images, grid.reshape(v, -1, w, 2), mode="bilinear", padding_mode="zeros", align_corners=False
        ).reshape(v, b, -1, h, w)
        if isinstance(geometry, ConeBeamGeometry):
            vals = vals * ((geometry.dso / geometry.dsd) * inv_w)[:, None] ** 2
        out[:, z0 : z0 + slab] = (vals * view_w).sum(dim=0)
    return out[:, None]


def fdk(projections: Tensor, geometry: CircularGeometry, *, window: str = "ram-lak") -> Tensor:
    """FDK (cone beam) or FBP (parallel beam) reconstruction.

    Args:
        projections: ``[B, V, rows, cols]`` line integrals (dimensionless) measured with ``geometry``.
        geometry: circular cone- or parallel-beam geometry.
        window: ramp apodisation, one of :data:`WINDOWS` (``"hann"`` / ``"hamming"`` trade resolution
            for less noise).

    Returns:
        ``[B, 1, D, H, W]`` attenuation per mm on ``geometry``'s volume grid, in the projections' dtype
        (``B = 0`` gives an empty volume).

    Raises:
        ValueError: malformed ``projections``, an unknown ``window``, or several views that all share
            one angle (``geometry.angles`` spans no arc).
    """
    projections, geometry = check_projections(projections, geometry)
    weights = angular_weights(geometry.angles, name="geometry.angles")
    filtered = filter_projections(projections, geometry, window)
    if filtered.shape[0] == 0:  # empty batch: an empty volume, still attached to the graph
        return filtered.reshape(0, 1, *geometry.vol_shape)
    return _backproject_weighted(filtered, geometry, weights)
