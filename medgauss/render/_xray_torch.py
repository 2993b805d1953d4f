"""Pure-torch reference X-ray projection: every (ray, Gaussian) pair, differentiable by autograd.

Obviously correct rather than fast: no culling, only the cutoff rule. Pairs are evaluated in
blocks that are recomputed in the backward pass (activation checkpointing), so memory stays
O(rays + N). The culled numba and Triton backends are tested against this. Every quadratic form is
evaluated with the float64 precision factor ``L`` (``P = L^T L``,
:func:`medgauss.render._common.precision_factor`) cast to the Gaussians' dtype: ``a = |L d|^2`` and the
squared distance ``m = |L r - (b / a) L d|^2`` are sums of squares, never negative.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from medgauss.gaussians import Gaussians
from medgauss.render._common import precision_factor

# (ray, Gaussian) pairs per block; each pair needs ~20 numbers of scratch.
_BLOCK_PAIRS = 1 << 18


def _lower(factor: Tensor, x: Tensor) -> Tensor:
    """``L x`` for packed factors ``factor [..., 6]`` and vectors ``x [..., 3]`` (broadcast)."""
    x0, x1, x2 = x.unbind(-1)
    l00, l11, l22, l10, l20, l21 = factor.unbind(-1)
    return torch.stack((l00 * x0, l10 * x0 + l11 * x1, l20 * x0 + l21 * x1 + l22 * x2), dim=-1)


def ray_integrals(origins: Tensor, directions: Tensor, means: Tensor, factor: Tensor, intensities: Tensor,
                  cutoff_sq: float | None) -> Tensor:
    """Sum of closed-form line integrals over a block: rays ``[m, 3]`` x Gaussians ``[B, n]`` -> ``[B, m]``.

    Args:
        origins, directions: ``[m, 3]`` ray points and UNIT directions (world mm).
        means: ``[B, n, 3]``; factor: ``[B, n, 6]`` packed precision factors ``L`` (``P = L^T L``, 1/mm);
        intensities: ``[B, n]`` attenuation at the centres (1/mm).
        cutoff_sq: squared Mahalanobis radius, or ``None``.
    """
    d = directions[None, :, None, :]  # [1, m, 1, 3]
    r = origins[None, :, None, :] - means[:, None, :, :]  # [B, m, n, 3]
    # Move the ray origin to the point closest (in mm) to the centre: same line, same integral,
    # but small numbers in L r, so the squared distance below keeps float32 precision.
    r = r - (r * d).sum(-1, keepdim=True) * d
    fac = factor[:, None]  # [B, 1, n, 6]
    l_d = _lower(fac, d)  # [B, m, n, 3]
    l_r = _lower(fac, r)
    a = l_d.square().sum(-1)
    b = (l_r * l_d).sum(-1)
    dist_sq = (l_r - (b / a)[..., None] * l_d).square().sum(-1)
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
    if b == 0 or n == 0 or m == 0:
        out = gaussians.intensities.sum(-1, keepdim=True).expand(b, m) * 0  # keeps the graph connected
        return out.reshape(b, v, rows, cols)
    factor = precision_factor(gaussians)[0].to(gaussians.dtype)
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (gaussians.means, factor, gaussians.intensities))
    n_block = min(n, max(1, _BLOCK_PAIRS // max(1, b * min(m, 1024))))
    m_block = max(1, _BLOCK_PAIRS // max(1, b * n_block))
    chunks = []
    for ms in range(0, m, m_block):
        acc = None
        for ns in range(0, n, n_block):
            args = (o[ms:ms + m_block], d[ms:ms + m_block], gaussians.means[:, ns:ns + n_block],
                    factor[:, ns:ns + n_block], gaussians.intensities[:, ns:ns + n_block], cutoff_sq)
            if needs_grad:
                part = checkpoint(ray_integrals, *args, use_reentrant=False)
            else:
                part = ray_integrals(*args)
            acc = part if acc is None else acc + part
        chunks.append(acc)
    return torch.cat(chunks, dim=1).reshape(b, v, rows, cols)
