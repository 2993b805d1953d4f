"""numba CPU backend of :func:`medgauss.render.project`: culled, tiled, hand-written backward.

Each Gaussian's cutoff ellipsoid is projected to an exact pixel box per view
(:func:`medgauss.render.xray.footprint_pixel_rects`), binned into 16x16-pixel tiles, and only
binned (tile, Gaussian) pairs inside the box are evaluated. Kernels compute in float64 whatever
the input dtype; results and gradients are returned in the input dtype. Torch chains the
packed-precision gradient to scales and quaternions.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from medgauss.gaussians import Gaussians
from medgauss.render import _xray_numba_kernels as kernels
from medgauss.render._common import precision_upper
from medgauss.render.xray import TILE_SHAPE, footprint_pixel_rects, tile_rects


def _f64(t: Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().to(torch.float64).numpy())


def _cutoff_sq(cutoff: float | None) -> float:
    return np.inf if cutoff is None else float(cutoff) ** 2


class _ProjectNumba(torch.autograd.Function):
    """``(means [B,N,3], prec [B,N,6], intensities [B,N]) -> [B,V,R,C]`` with fixed rays and boxes."""

    @staticmethod
    def forward(ctx, means: Tensor, prec: Tensor, intensities: Tensor, origins: Tensor, directions: Tensor,
                pixel_box: Tensor, cutoff: float | None) -> Tensor:
        b, n = intensities.shape
        v, rows, cols, _ = origins.shape
        th, tw = TILE_SHAPE
        n_tr, n_tc = -(-rows // th), -(-cols // tw)
        box = np.ascontiguousarray(pixel_box.cpu().numpy())
        tiles = np.ascontiguousarray(tile_rects(pixel_box, TILE_SHAPE).cpu().numpy().reshape(b * v, n, 4))
        offsets, ids = kernels.bin_tiles(tiles, n_tr, n_tc)
        arrays = (_f64(origins), _f64(directions), _f64(means), _f64(prec), _f64(intensities))
        out = np.zeros((b, v, rows, cols), dtype=np.float64)
        kernels.forward(*arrays, box, offsets, ids, th, tw, n_tc, _cutoff_sq(cutoff), out)
        ctx.arrays, ctx.box, ctx.cutoff, ctx.dtype = arrays, box, cutoff, means.dtype
        return torch.from_numpy(out).to(means.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        origins, directions, means, prec, intens = ctx.arrays
        g_means = np.empty_like(means)
        g_prec = np.empty_like(prec)
        g_int = np.empty_like(intens)
        kernels.backward(origins, directions, means, prec, intens, ctx.box, _cutoff_sq(ctx.cutoff),
                         _f64(grad_out), g_means, g_prec, g_int)
        to = lambda a: torch.from_numpy(a).to(ctx.dtype)
        return to(g_means), to(g_prec), to(g_int), None, None, None, None


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
    box = footprint_pixel_rects(gaussians, matrices, (rows, cols), cutoff)
    return _ProjectNumba.apply(gaussians.means, precision_upper(gaussians), gaussians.intensities,
                               origins, directions, box, cutoff)
