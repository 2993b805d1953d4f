"""Pure-torch reference splat: obviously correct, differentiable by autograd, memory O(voxels + N).

Every other backend is tested against this. It evaluates every (Gaussian, point) pair in blocks and
recomputes each block in the backward pass (activation checkpointing), so no ``[voxels x N]``
tensor ever exists, in the forward or the backward pass. The Mahalanobis form is the sum of squares
``|L r|^2`` of the float64 precision factor (:func:`medgauss.render._common.precision_factor`), cast to
the Gaussians' dtype: never negative, and accurate in float32 for very anisotropic Gaussians.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from medgauss.gaussians import Gaussians
from medgauss.render._common import points_to_normalized, precision_factor, voxel_centers

# Pairs evaluated per block (about 50 MB of float32 scratch, forward or backward).
_BLOCK_PAIRS = 1 << 20


def mahalanobis_sq(r: Tensor, factor: Tensor) -> Tensor:
    """``|L r|^2`` for offsets ``r [..., 3]`` and packed factors ``factor [..., 6]`` (broadcast)."""
    r0, r1, r2 = r.unbind(-1)
    l00, l11, l22, l10, l20, l21 = factor.unbind(-1)
    y1 = l10 * r0 + l11 * r1
    y2 = l20 * r0 + l21 * r1 + l22 * r2
    return (l00 * r0).square() + y1.square() + y2.square()


def _block(x: Tensor, means: Tensor, factor: Tensor, intensities: Tensor, cutoff_sq: float | None) -> Tensor:
    """Sum over a block of Gaussians at a block of points: x [B,m,3], means [B,n,3], factor [B,n,6] -> [B,m]."""
    r = x[:, :, None, :] - means[:, None, :, :]  # [B, m, n, 3]
    q = mahalanobis_sq(r, factor[:, None])
    e = torch.exp(-0.5 * q)
    if cutoff_sq is not None:
        e = torch.where(q < cutoff_sq, e, torch.zeros_like(e))
    return (e * intensities[:, None, :]).sum(-1)


def splat(gaussians: Gaussians, shape: tuple[int, int, int], *, points: Tensor | None = None,
          cutoff: float | None = 3.0) -> Tensor:
    """Reference for :func:`medgauss.render.splat` (arguments already validated there).

    Returns ``[B, 1, D, H, W]`` without ``points``, else ``[B, M]`` at ``points [B, M, 3]`` (normalised
    floats, or integer voxel indices).
    """
    b, n = gaussians.batch_size, gaussians.num_gaussians
    dtype, device = gaussians.dtype, gaussians.device
    if points is None:
        x = voxel_centers(shape, dtype, device).expand(b, -1, -1)
    else:
        x = points_to_normalized(points, shape, dtype)
    m = x.shape[1]
    cutoff_sq = None if cutoff is None else cutoff * cutoff
    if n == 0 or m == 0:
        out = gaussians.intensities.sum(-1, keepdim=True).expand(b, m) * 0  # keeps the graph connected
    else:
        factor = precision_factor(gaussians)[0].to(dtype)
        needs_grad = torch.is_grad_enabled() and any(
            t.requires_grad for t in (gaussians.means, factor, gaussians.intensities))
        n_block = min(n, max(1, _BLOCK_PAIRS // max(1, min(m, 4096))))
        m_block = max(1, _BLOCK_PAIRS // n_block)
        chunks = []
        for ms in range(0, m, m_block):
            xs = x[:, ms:ms + m_block]
            acc = None
            for ns in range(0, n, n_block):
                args = (xs, gaussians.means[:, ns:ns + n_block], factor[:, ns:ns + n_block],
                        gaussians.intensities[:, ns:ns + n_block], cutoff_sq)
                part = checkpoint(_block, *args, use_reentrant=False) if needs_grad else _block(*args)
                acc = part if acc is None else acc + part
            chunks.append(acc)
        out = torch.cat(chunks, dim=1)
    if points is None:
        return out.reshape(b, 1, *shape)
    return out
