"""Pure-torch reference X-ray projection: every (ray, Gaussian) pair, differentiable by autograd.

Obviously correct rather than fast: no culling, only the cutoff rule. Pairs are evaluated in
blocks that are recomputed in the backward pass (activation checkpointing), so memory stays
O(rays + N). The culled numba and Triton backends are tested against this.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from medgauss.gaussians import Gaussians

# (ray, Gaussian) pairs per block; each pair needs ~20 numbers of scratch.
_BLOCK_PAIRS = 1 << 18


def ray_integrals(origins: Tensor, directions: Tensor, means: Tensor, precision: Tensor, intensities: Tensor,
                  cutoff_sq: float | None) -> Tensor:
    """Sum of closed-form line integrals over a block: rays ``[m, 3]`` x Gaussians ``[B, n]`` -> ``[B, m]``.

    Args:
        origins, directions: ``[m, 3]`` ray points and UNIT directions (world mm).
        means: ``[B, n, 3]``; precision: ``[B, n, 3, 3]`` inverse covariances (1/mm^2);
        intensities: ``[B, n]`` attenuation at the centres (1/mm).
        cutoff_sq: squared Mahalanobis radius, or ``None``.
    """
    d = directions[None, :, None, :]  # [1, m, 1, 3]
    r = origins[None, :, None, :] - means[:, None, :, :]  # [B, m, n, 3]
    # Move the ray origin to the point closest (in mm) to the centre: same line, same integral,
    # but small numbers in c and b^2/a, so their difference keeps float32 precision.
    r = r - (r * d).sum(-1, keepdim=True) * d
    p_d = torch.einsum("bnij,mj->bmni", precision, directions)  # [B, m, n, 3]
    a = (p_d * d).sum(-1)
    b = (p_d * r).sum(-1)
    c = torch.einsum("bmni,bnij,bmnj->bmn", r, precision, r)
    dist_sq = c - b * b / a
    value = intensities[:, None, :] * torch.sqrt(2 * math.pi / a) * torch.exp(-0.5 * dist_sq)
    if cutoff_sq is not None:
        value = torch.where(dist_sq < cutoff_sq, value, torch.zeros_like(value))
    return value.sum(-1)


def project(gaussians: Gaussians, origins: Tensor, directions: Tensor, matrices: Tensor, *,
            cutoff: float | None = 3.0) -> Tensor:
    """Reference for :func:`medgauss.render.project` (arguments already validated there).

    Args:
        gaussians: ``B`` x ``N`` Gaussians in world mm.
        origins, directions: ``[V, rows, cols, 3]`` rays in the Gaussians' dtype, unit directions.
        matrices: ``[V, 3, 4]`` projection matrices (unused: the reference does not cull).
        cutoff: Mahalanobis radius or ``None``.

    Returns:
        ``[B, V, rows, cols]`` line integrals.
    """
    del matrices
    b, n = gaussians.batch_size, gaussians.num_gaussians
    v, rows, cols, _ = origins.shape
    o = origins.reshape(-1, 3)
    d = directions.reshape(-1, 3)
    m = o.shape[0]
    cutoff_sq = None if cutoff is None else cutoff * cutoff
    if n == 0 or m == 0:
        out = gaussians.intensities.sum(-1, keepdim=True).expand(b, m) * 0  # keeps the graph connected
        return out.reshape(b, v, rows, cols)
    precision = gaussians.precision()
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (gaussians.means, precision, gaussians.intensities))
    n_block = min(n, max(1, _BLOCK_PAIRS // max(1, b * min(m, 1024))))
    m_block = max(1, _BLOCK_PAIRS // (b * n_block))
    chunks = []
    for ms in range(0, m, m_block):
        acc = None
        for ns in range(0, n, n_block):
            args = (o[ms:ms + m_block], d[ms:ms + m_block], gaussians.means[:, ns:ns + n_block],
                    precision[:, ns:ns + n_block], gaussians.intensities[:, ns:ns + n_block], cutoff_sq)
            if needs_grad:
                part = checkpoint(ray_integrals, *args, use_reentrant=False)
            else:
                part = ray_integrals(*args)
            acc = part if acc is None else acc + part
        chunks.append(acc)
    return torch.cat(chunks, dim=1).reshape(b, v, rows, cols)
