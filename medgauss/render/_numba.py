"""Numba CPU backend of :func:`medgauss.render.splat`: adapter between torch and the kernels.

Torch computes, with autograd, the float64 precision factor and packed precision ``[B, N, 6]`` of the
Gaussians (:func:`medgauss.render._common.precision_factor`); a ``torch.autograd.Function`` takes
``(means, precision, intensities)`` and the factor, runs the kernels of
:mod:`medgauss.render._numba_kernels` (float64 arithmetic on the factor; the dense volume of float32
Gaussians is stored as float32) and returns the gradients of those three tensors, so the
gradients with respect to scales and quaternions follow from torch's chain rule. The kernels run on
the thread pool of :mod:`medgauss._parallel`, the library's one threading and fork policy. No kernel
allocates anything of size voxels x N: memory is a few volumes (float64 output, upstream
gradient) plus O(N) per Gaussian data (and, in point mode, a cell grid of Gaussian lists).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from medgauss import _parallel
from medgauss._parallel import run_tasks
from medgauss.gaussians import Gaussians
from medgauss.render import _numba_kernels as kernels
from medgauss.render._common import PRECISION_PACKING, points_to_normalized, precision_factor

__all__ = ["splat"]

# exp(-q/2) is exactly 0.0 in float64 for q > 1490.3; terms beyond this are skipped, also when
# cutoff=None, without changing any float64 result (float32 underflows much earlier).
EXP_UNDERFLOW_Q = 1500.0
# Relative and absolute (voxels) padding of the culling boxes of point mode; the exact test
# q < cutoff^2 decides every pair, the padding only guarantees that culling never drops one.
_BOX_PAD_REL = 1e-3
_BOX_PAD_ABS = 1e-3
# Candidate cells per axis of the point-mode grid, and the largest CSR size (entries) allowed.
_GRID_CANDIDATES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)
_MAX_GRID_ENTRIES = 1 << 23
# Points per voxel from which voxel-centre points are rendered densely and gathered (measured:
# the dense kernels cost ~1/8 of the point kernels per (Gaussian, voxel) pair).
GATHER_MIN_FRACTION = 0.125
# Largest total size (float64 numbers) of the private gradient buffers of the point backward pass.
_MAX_BUFFER_NUMBERS = 1 << 23


def splat(gaussians: Gaussians, shape: tuple[int, int, int], *, points: Tensor | None = None,
          cutoff: float | None = 3.0) -> Tensor:
    """Numba backend of :func:`medgauss.render.splat` (arguments already validated there).

    Args:
        gaussians: ``B`` x ``N`` Gaussians in normalised volume coordinates, on the CPU.
        shape: ``(D, H, W)``.
        points: ``None``, normalised coordinates ``[B, M, 3]`` of the Gaussians' dtype, or integer voxel
            indices ``[B, M, 3]`` (many of them take the gather route without any conversion).
        cutoff: Mahalanobis truncation radius, or ``None`` (every term that is non-zero in float64).

    Returns:
        ``[B, 1, D, H, W]`` at voxel centres, or ``[B, M]`` at ``points``; dtype of the Gaussians.
        Differentiable with respect to means, scales, quats and intensities.
    """
    b, n = gaussians.batch_size, gaussians.num_gaussians
    m = math.prod(shape) if points is None else points.shape[1]
    if b == 0 or n == 0 or m == 0:
        out = gaussians.intensities.sum(-1, keepdim=True).expand(b, m) * 0  # keeps the graph connected
        return out.reshape(b, 1, *shape) if points is None else out
    c2 = EXP_UNDERFLOW_Q if cutoff is None else min(float(cutoff) ** 2, EXP_UNDERFLOW_Q)
    factor, prec = precision_factor(gaussians)
    return _NumbaSplat.apply(gaussians.means, prec, gaussians.intensities, factor.detach(), tuple(shape), c2,
                             points)


@dataclass
class _Prepared:
    """Float64 kernel inputs of one call, kept for the backward pass."""

    params: np.ndarray  # [B*N, NUM_PARAMS]
    prec_voxel: np.ndarray  # [B*N, 6] packed precision in voxel units
    sizes: np.ndarray  # [3] (D, H, W) as float64
    batch: int


class _NumbaSplat(torch.autograd.Function):
    """``(means [B,N,3], precision [B,N,6], intensities [B,N]) -> volume or point values``.

    Values are evaluated with ``factor [B,N,6]`` (``factor^T factor = precision``, no gradient); the
    gradient is returned with respect to the packed ``precision``. Three routes: ``dense`` (no
    points), ``gather`` (points that are voxel centres, many of them: dense kernels, then a gather;
    backward scatters the upstream gradient into a volume) and ``points`` (cell-binned kernels
    evaluated at arbitrary points).
    """

    @staticmethod
    def forward(ctx, means: Tensor, prec6: Tensor, intensities: Tensor, factor6: Tensor,
                shape: tuple[int, int, int], c2: float, points: Tensor | None) -> Tensor:
        prep = _prepare(means, prec6, factor6, intensities, shape)
        b = prep.batch
        voxel_index = None if points is None else _voxel_centre_index(points, shape)
        if points is None or voxel_index is not None:
            slabs = _slab_ranges(prep, c2, shape[0])
            out = _dense_forward(prep, slabs, shape, c2, single=means.dtype == torch.float32)
            ctx.route, ctx.state = ("dense", slabs) if points is None else ("gather", (slabs, voxel_index))
            result = torch.from_numpy(out).reshape(b, 1, *shape) if points is None else \
                torch.from_numpy(out[voxel_index]).reshape(b, -1)
        else:
            binned = _bin_points(prep, points_to_normalized(points, shape, torch.float64), c2)
            sorted_out = np.zeros(binned.coords.shape[0])
            run_tasks(kernels.points_forward, binned.cell_start.shape[0] - 1, prep.params, binned.coords,
                      binned.cell_start, binned.offsets, binned.entries, c2, sorted_out)
            out = np.empty_like(sorted_out)
            out[binned.order] = sorted_out
            ctx.route, ctx.state = "points", binned
            result = torch.from_numpy(out).reshape(b, -1)
        ctx.prep, ctx.shape, ctx.c2 = prep, shape, c2
        ctx.dtypes = (means.dtype, prec6.dtype, intensities.dtype)
        return result.to(means.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        prep: _Prepared = ctx.prep
        grad = grad_out.detach().to(torch.float64).contiguous().reshape(-1).numpy()
        if ctx.route == "points":
            binned: _BinnedPoints = ctx.state
            sums = _points_backward(prep, binned, ctx.c2, np.ascontiguousarray(grad[binned.order]))
        else:
            slabs = ctx.state if ctx.route == "dense" else ctx.state[0]
            if ctx.route == "gather":  # scatter-add (repeated points add up) into a volume
                grad = np.bincount(ctx.state[1], weights=grad, minlength=prep.batch * math.prod(ctx.shape))
            sums = np.zeros((prep.params.shape[0], kernels.NUM_SUMS))
            run_tasks(kernels.dense_backward, prep.params.shape[0], prep.params, *slabs, grad, prep.batch,
                      *ctx.shape, ctx.c2, sums)
        grad_means, grad_prec, grad_int = _gradients_from_sums(sums, prep)
        b = prep.batch
        dt_means, dt_prec, dt_int = ctx.dtypes

        def as_tensor(a: np.ndarray, dtype: torch.dtype, *tail: int) -> Tensor:
            return torch.from_numpy(a).reshape(b, -1, *tail).to(dtype)

        return (as_tensor(grad_means, dt_means, 3), as_tensor(grad_prec, dt_prec, 6), as_tensor(grad_int, dt_int),
                None, None, None, None)


def _dense_forward(prep: _Prepared, slabs: tuple[np.ndarray, np.ndarray], shape: tuple[int, int, int],
                   c2: float, single: bool) -> np.ndarray:
    """The volume ``[B*D*H*W]``, float32 when ``single`` else float64 (computed in float64 either way)."""
    out = np.empty(prep.batch * math.prod(shape), dtype=np.float32 if single else np.float64)  # every slab written
    run_tasks(kernels.dense_forward, prep.batch * shape[0], prep.params, *slabs, prep.batch, *shape, c2, out)
    return out


def _voxel_centre_index(points: Tensor, shape: tuple[int, int, int]) -> np.ndarray | None:
    """Flat indices ``[B*M]`` into ``[B, D, H, W]`` when the gather route applies, else ``None``.

    It applies when there are at least ``GATHER_MIN_FRACTION`` points per voxel and every point
    is a voxel centre ``(i + 0.5) / n`` up to two units in the last place of its dtype (so integer
    voxel indices always qualify); such points are evaluated at the exact centres.
    """
    m = points.shape[1]
    if m < GATHER_MIN_FRACTION * math.prod(shape):
        return None
    if not points.is_floating_point():  # voxel indices, range-checked by the API
        d, h, w = shape
        idx = points.long()
        sample = torch.arange(points.shape[0]).view(-1, 1)
        return (((sample * d + idx[..., 0]) * h + idx[..., 1]) * w + idx[..., 2]).reshape(-1).numpy()
    sizes = np.asarray(shape, dtype=np.float64)
    tolerance = 2.0 * torch.finfo(points.dtype).eps * sizes
    index, all_centres = kernels.voxel_centre_index(_to_numpy(points).reshape(-1, 3), sizes, tolerance, m)
    return index if all_centres else None


def _prepare(means: Tensor, prec6: Tensor, factor6: Tensor, intensities: Tensor,
             shape: tuple[int, int, int]) -> _Prepared:
    """Per-Gaussian kernel parameters (voxel units, factored precision) ``[B*N, NUM_PARAMS]``.

    ``prec6`` / ``factor6`` are the packed precision and its factor of
    :func:`medgauss.render._common.precision_factor` (whose pivots are positive by construction; a
    factor that is not raises, as an internal error, rather than rendering nonsense).
    """
    if means.device.type != "cpu":
        raise ValueError(f"the numba backend needs CPU tensors, got means on {means.device}")
    sizes = np.asarray(shape, dtype=np.float64)
    params, prec, bad = kernels.gaussian_params(_to_numpy(means).reshape(-1, 3), _to_numpy(prec6).reshape(-1, 6),
                                                _to_numpy(factor6).reshape(-1, 6), _to_numpy(intensities).reshape(-1),
                                                sizes)
    if bad >= 0:
        n = means.shape[1]
        pivots = params[bad, [kernels.PREC_W, kernels.SCHUR_H, kernels.SCHUR_D]]
        raise ValueError(f"gaussians: the precision factor of Gaussian (b={bad // n}, n={bad % n}) is not "
                         f"positive definite or not finite (pivots {pivots.tolist()})")
    return _Prepared(params=params, prec_voxel=prec, sizes=sizes, batch=means.shape[0])


def _to_numpy(t: Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).contiguous().numpy()


def _slab_ranges(prep: _Prepared, c2: float, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """Inclusive D-slab range ``[B*N]`` each Gaussian may touch (one slab of slack each side)."""
    m0 = prep.params[:, kernels.M0]
    half = np.sqrt(c2 / prep.params[:, kernels.SCHUR_D])
    d_lo = np.clip(np.ceil(m0 - half) - 1, 0, depth).astype(np.int64)
    d_hi = np.clip(np.floor(m0 + half) + 1, -1, depth - 1).astype(np.int64)
    return d_lo, d_hi


def _half_extents_voxels(prep: _Prepared, c2: float) -> np.ndarray:
    """Padded half-size ``[B*N, 3]`` (voxels) of each ellipsoid ``q < c2`` along D, H, W.

    ``sqrt(c2 Sigma_aa)`` with ``Sigma = M M^T``, ``M = L^-1`` from the factored parameters: every
    variance is a sum of squares, accurate however anisotropic the Gaussian.
    """
    p = prep.params
    m00 = 1.0 / np.sqrt(p[:, kernels.SCHUR_D])
    m11 = 1.0 / np.sqrt(p[:, kernels.SCHUR_H])
    m10 = p[:, kernels.SLOPE1] * m00
    m21 = p[:, kernels.SLOPE21] * m11
    m20 = p[:, kernels.SLOPE20] * m00 + p[:, kernels.SLOPE21] * m10
    variances = np.stack([m00 * m00, m10 * m10 + m11 * m11,
                          m20 * m20 + m21 * m21 + p[:, kernels.INV_PREC_W]], axis=1)
    half = np.sqrt(c2 * variances)
    return half * (1 + _BOX_PAD_REL) + _BOX_PAD_ABS


def _cell_boxes(centers: np.ndarray, half: np.ndarray, sizes: np.ndarray, grid: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Inclusive cell box ``[B*N, 3]`` of each Gaussian in a ``grid^3`` grid over ``[0, 1]^3``.

    Gaussians entirely outside the volume get an empty box (``hi < lo``).
    """
    lo_x = (centers - half + 0.5) / sizes
    hi_x = (centers + half + 0.5) / sizes
    lo = np.clip(np.floor(lo_x * grid), 0, grid - 1).astype(np.int64)
    hi = np.clip(np.floor(hi_x * grid), 0, grid - 1).astype(np.int64)
    outside = ((hi_x < 0) | (lo_x > 1)).any(axis=1)
    hi[outside] = -1
    return lo, hi


def _choose_grid(centers: np.ndarray, half: np.ndarray, sizes: np.ndarray, batch: int,
                 num_points: int) -> int:
    """Cells per axis minimising a rough cost: pair tests + CSR entries + cells, within a memory cap."""
    best, best_cost = 1, math.inf
    for grid in _GRID_CANDIDATES:
        lo, hi = _cell_boxes(centers, half, sizes, grid)
        entries = float(np.clip(hi - lo + 1, 0, None).prod(axis=1).sum())
        if entries > _MAX_GRID_ENTRIES and grid > 1:
            break
        cells = batch * grid ** 3
        cost = num_points * entries / cells + 4.0 * entries + cells
        if cost < best_cost:
            best, best_cost = grid, cost
    return best


@dataclass
class _BinnedPoints:
    """Points sorted by cell of a ``grid^3`` grid per sample, and the Gaussians listed per cell."""

    coords: np.ndarray  # [P, 3] voxel coordinates, in cell order
    order: np.ndarray  # [P] original (flattened b*M + m) index of each sorted point
    cell_start: np.ndarray  # [B*grid^3 + 1] first sorted point of each cell
    offsets: np.ndarray  # [B*grid^3 + 1] CSR offsets into entries
    entries: np.ndarray  # Gaussian indices (b*N + n) per cell


def _bin_points(prep: _Prepared, points: Tensor, c2: float) -> _BinnedPoints:
    """Bin the normalised ``points [B, M, 3]`` and the Gaussians into one cell grid per sample."""
    x = _to_numpy(points).reshape(-1, 3)
    centers = prep.params[:, kernels.M0:kernels.M2 + 1]
    half = _half_extents_voxels(prep, c2)
    grid = _choose_grid(centers, half, prep.sizes, prep.batch, x.shape[0])
    lo, hi = _cell_boxes(centers, half, prep.sizes, grid)
    offsets, entries = kernels.bin_gaussians(lo, hi, prep.batch, grid)
    cell_start, order, coords = kernels.bin_points(x, prep.sizes, grid, points.shape[1])
    return _BinnedPoints(coords=coords, order=order, cell_start=cell_start, offsets=offsets, entries=entries)


def _points_backward(prep: _Prepared, binned: _BinnedPoints, c2: float,
                     grad_sorted: np.ndarray) -> np.ndarray:
    """Gradient sums ``[B*N, NUM_SUMS]`` of the point route: private buffers per task, summed."""
    num_cells = binned.cell_start.shape[0] - 1
    per_buffer = prep.params.shape[0] * kernels.NUM_SUMS
    tasks = _parallel.num_tasks(num_cells, min(_parallel.TASKS_PER_THREAD * _parallel.num_threads(),
                                                max(1, _MAX_BUFFER_NUMBERS // per_buffer)))
    buffers = np.zeros((tasks, prep.params.shape[0], kernels.NUM_SUMS))
    args = (prep.params, binned.coords, binned.cell_start, binned.offsets, binned.entries, c2, grad_sorted)
    _parallel.map_tasks(lambda t: kernels.points_backward(*args, buffers[t], t, num_cells, tasks), tasks)
    return buffers.sum(axis=0)


def _gradients_from_sums(sums: np.ndarray, prep: _Prepared) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients w.r.t. normalised means ``[B*N, 3]``, packed precision ``[B*N, 6]``, intensities ``[B*N]``.

    With ``e = exp(-q/2)``, ``r`` the voxel offset and ``P'`` the voxel-unit precision:
    ``dL/dI = sum g e``, ``dL/dm = I P' sum(g e r)``, ``dL/dP'_ab = -I/2 sum(g e r_a r_b)`` (twice that
    for the off-diagonal packed entries, which appear twice in ``q``); then back to normalised units.
    """
    intensity = prep.params[:, kernels.INTENSITY]
    p00, p11, p22, p01, p02, p12 = prep.prec_voxel.T
    full = np.stack([np.stack([p00, p01, p02], -1), np.stack([p01, p11, p12], -1),
                     np.stack([p02, p12, p22], -1)], axis=1)
    grad_voxel_means = intensity[:, None] * np.einsum("gij,gj->gi", full, sums[:, 1:4])
    grad_means = grad_voxel_means * prep.sizes
    multiplicity = np.array([1.0, 1.0, 1.0, 2.0, 2.0, 2.0])
    unit_scale = np.array([prep.sizes[i] * prep.sizes[j] for i, j in PRECISION_PACKING])
    grad_prec = -0.5 * intensity[:, None] * sums[:, 4:10] * multiplicity / unit_scale
    return grad_means, grad_prec, np.ascontiguousarray(sums[:, 0])
