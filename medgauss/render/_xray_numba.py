"""numba CPU backend of :func:`medgauss.render.project`: culled, tiled, hand-written backward.

Each Gaussian's cutoff ellipsoid is projected to its exact outline (a conic) and pixel box per view
(:func:`medgauss.render.xray.footprints`), binned into 16x16-pixel tiles, and only pixels of binned
(tile, Gaussian) pairs inside the outline are evaluated. Kernels compute in float64 whatever
the input dtype, with the float64 precision factor of :func:`medgauss.render._common.precision_factor`;
results and gradients are returned in the input dtype. Torch chains the factor's gradient to scales
and quaternions. The kernels run on the thread pool of
:mod:`medgauss._parallel` (the library's one threading and fork policy).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from medgauss._parallel import run_tasks
from medgauss.gaussians import Gaussians
from medgauss.render import _xray_numba_kernels as kernels
from medgauss.render._common import precision_factor
from medgauss.render.xray import TILE_SHAPE, footprints, tile_rects


def _f64(t: Tensor) -> np.ndarray:
    """A contiguous float64 numpy copy (or view) of ``t`` for the kernels."""
    return np.ascontiguousarray(t.detach().cpu().to(torch.float64).numpy())


def _ray_modes(origins: Tensor, directions: Tensor) -> np.ndarray:
    """``[V]`` int64 per-view ray layout: one shared origin (cone beam), one shared direction
    (parallel beam) or general (see the ``RAYS_*`` constants of the kernels)."""
    shared_o = (origins == origins[:, :1, :1]).flatten(1).all(-1)
    shared_d = (directions == directions[:, :1, :1]).flatten(1).all(-1)
    modes = torch.full(shared_o.shape, kernels.RAYS_GENERAL, dtype=torch.int64)
    modes[shared_d.cpu()] = kernels.RAYS_SHARED_DIRECTION
    modes[shared_o.cpu()] = kernels.RAYS_SHARED_ORIGIN
    return modes.numpy()


def _cutoff_sq(cutoff: float | None) -> float:
    return np.inf if cutoff is None else float(cutoff) ** 2


def bin_tiles(tiles: np.ndarray, n_tile_rows: int, n_tile_cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Counting sort of (tile, Gaussian) pairs per slot (sample x view).

    Args:
        tiles: ``[S, N, 4]`` int32 inclusive tile ranges (row0, row1, col0, col1); empty when
            row0 > row1 or col0 > col1.
        n_tile_rows, n_tile_cols: tiles per detector column / row.

    Returns:
        ``offsets [S * T + 1]`` int64 and ``ids [pairs]`` int32: the Gaussians of tile ``t`` of slot
        ``s`` are ``ids[offsets[s*T + t] : offsets[s*T + t + 1]]``, in ascending order.
    """
    slots = tiles.shape[0]
    counts = np.zeros((slots, n_tile_rows * n_tile_cols), dtype=np.int64)
    run_tasks(kernels.count_tiles, slots, tiles, n_tile_cols, counts)
    offsets = np.zeros(counts.size + 1, dtype=np.int64)
    np.cumsum(counts.ravel(), out=offsets[1:])
    ids = np.empty(int(offsets[-1]), dtype=np.int32)
    run_tasks(kernels.fill_tiles, slots, tiles, n_tile_cols, offsets, ids)
    return offsets, ids


class _ProjectNumba(torch.autograd.Function):
    """``(means [B,N,3], factor [B,N,6], intensities [B,N]) -> [B,V,R,C]`` with fixed rays and boxes."""

    @staticmethod
    def forward(ctx, means: Tensor, factor: Tensor, intensities: Tensor, origins: Tensor,
                directions: Tensor, pixel_box: Tensor, conics: Tensor, cutoff: float | None) -> Tensor:
        b, n = intensities.shape
        v, rows, cols, _ = origins.shape
        th, tw = TILE_SHAPE
        n_tr, n_tc = -(-rows // th), -(-cols // tw)
        box = np.ascontiguousarray(pixel_box.cpu().numpy())
        conic = _f64(conics)
        tiles = np.ascontiguousarray(tile_rects(pixel_box, TILE_SHAPE).cpu().numpy().reshape(b * v, n, 4))
        offsets, ids = bin_tiles(tiles, n_tr, n_tc)
        arrays = (_f64(origins), _f64(directions), _ray_modes(origins, directions), _f64(means), _f64(factor),
                  _f64(intensities))
        out = np.zeros((b, v, rows, cols), dtype=np.float64)
        run_tasks(kernels.forward, b * v * n_tr * n_tc, *arrays, box, conic, offsets, ids, th, tw, n_tc,
                  _cutoff_sq(cutoff), out)
        ctx.arrays, ctx.box, ctx.conic, ctx.cutoff = arrays, box, conic, cutoff
        ctx.dtypes = (means.dtype, factor.dtype, intensities.dtype)
        return torch.from_numpy(out).to(means.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        origins, directions, modes, means, factor, intens = ctx.arrays
        g_means = np.empty_like(means)
        g_fac = np.empty_like(factor)
        g_int = np.empty_like(intens)
        run_tasks(kernels.backward, intens.size, origins, directions, modes, means, factor, intens, ctx.box,
                  ctx.conic, _cutoff_sq(ctx.cutoff), _f64(grad_out), g_means, g_fac, g_int)
        dt_means, dt_fac, dt_int = ctx.dtypes
        return (torch.from_numpy(g_means).to(dt_means), torch.from_numpy(g_fac).to(dt_fac),
                torch.from_numpy(g_int).to(dt_int), None, None, None, None, None)


def project(gaussians: Gaussians, origins: Tensor, directions: Tensor, matrices: Tensor, *,
            cutoff: float | None = 3.0) -> Tensor:
    """numba implementation of :func:`medgauss.render.project` (arguments validated there).

    Args:
        gaussians: ``B`` x ``N`` Gaussians in world mm (CPU).
        origins, directions: ``[V, rows, cols, 3]`` rays, unit directions.
        matrices: ``[V, 3, 4]`` float64 projection matrices consistent with the rays (for culling).
        cutoff: Mahalanobis radius or ``None``.

    Returns:
        ``[B, V, rows, cols]`` line integrals in the Gaussians' dtype.
    """
    rows, cols = origins.shape[1:3]
    box, conics = footprints(gaussians, matrices, (rows, cols), cutoff)
    factor = precision_factor(gaussians)[0]
    return _ProjectNumba.apply(gaussians.means, factor, gaussians.intensities, origins, directions, box, conics,
                               cutoff)
