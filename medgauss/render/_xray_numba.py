"""numba CPU backend of :func:`medgauss.render.project`: culled, tiled, hand-written backward.

Each Gaussian's cutoff ellipsoid is projected to its exact outline (a conic) and pixel box per view
(:func:`medgauss.render.xray.footprints`), binned into 16x16-pixel tiles, and only pixels of binned
(tile, Gaussian) pairs inside the outline are evaluated. Kernels compute in float64 whatever
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


class _ProjectNumba(torch.autograd.Function):
    """``(means [B,N,3], prec [B,N,6], intensities [B,N]) -> [B,V,R,C]`` with fixed rays and boxes."""

    @staticmethod
    def forward(ctx, means: Tensor, prec: Tensor, intensities: Tensor, origins: Tensor, directions: Tensor,
                pixel_box: Tensor, conics: Tensor, cutoff: float | None) -> Tensor:
        b, n = intensities.shape
        v, rows, cols, _ = origins.shape
        th, tw = TILE_SHAPE
        n_tr, n_tc = -(-rows // th), -(-cols // tw)
        box = np.ascontiguousarray(pixel_box.cpu().numpy())
        conic = _f64(conics)
        tiles = np.ascontiguousarray(tile_rects(pixel_box, TILE_SHAPE).cpu().numpy().reshape(b * v, n, 4))
        offsets, ids = kernels.bin_tiles(tiles, n_tr, n_tc)
        arrays = (_f64(origins), _f64(directions), _ray_modes(origins, directions), _f64(means), _f64(prec),
                  _f64(intensities))
        out = np.zeros((b, v, rows, cols), dtype=np.float64)
        kernels.forward(*arrays, box, conic, offsets, ids, th, tw, n_tc, _cutoff_sq(cutoff), out)
        ctx.arrays, ctx.box, ctx.conic, ctx.cutoff, ctx.dtype = arrays, box, conic, cutoff, means.dtype
        return torch.from_numpy(out).to(means.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        origins, directions, modes, means, prec, intens = ctx.arrays
        g_means = np.empty_like(means)
        g_prec = np.empty_like(prec)
        g_int = np.empty_like(intens)
        kernels.backward(origins, directions, modes, means, prec, intens, ctx.box, ctx.conic,
                         _cutoff_sq(ctx.cutoff), _f64(grad_out), g_means, g_prec, g_int)
        to = lambda a: torch.from_numpy(a).to(ctx.dtype)
        return to(g_means), to(g_prec), to(g_int), None, None, None, None, None


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
    return _ProjectNumba.apply(gaussians.means, precision_upper(gaussians), gaussians.intensities,
                               origins, directions, box, conics, cutoff)
