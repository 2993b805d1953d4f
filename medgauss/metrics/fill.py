"""Trivial predictors of hidden voxels: the baselines a masked autoencoder must beat to have learned.

- :func:`constant_fill`: every hidden voxel = the mean of the item's visible voxels;
- :func:`normalized_convolution_fill`: every hidden voxel = the mean of the visible voxels in a
  ``box^3`` neighbourhood (normalised convolution with a box kernel, Knutsson & Westin 1993), falling
  back to the constant fill where the box holds no visible voxel.

Both return the whole volume, visible voxels unchanged, so they drop into any metric of
:mod:`medgauss.metrics.masked`. Neither learns anything: a model that does not beat them has not
learned to predict what it cannot see.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["constant_fill", "normalized_convolution_fill"]


def _check(images: Tensor, hidden: Tensor) -> Tensor:
    if not isinstance(images, Tensor) or not images.is_floating_point() or images.ndim != 5:
        raise ValueError(f"images must be a float tensor [B, C, D, H, W], got "
                         f"{getattr(images, 'shape', type(images).__name__)}")
    if not isinstance(hidden, Tensor) or hidden.dtype != torch.bool:
        raise ValueError("hidden must be a bool tensor [B, 1 or C, D, H, W]")
    if hidden.ndim != 5 or hidden.shape[0] != images.shape[0] or hidden.shape[2:] != images.shape[2:] \
            or hidden.shape[1] not in (1, images.shape[1]):
        raise ValueError(f"hidden must have shape [B, 1 or C, D, H, W] matching images {tuple(images.shape)}, "
                         f"got {tuple(hidden.shape)}")
    visible = ~hidden.expand_as(images)
    none = ~visible.flatten(1).any(dim=1)
    if bool(none.any()):
        raise ValueError(f"batch item(s) {none.nonzero().flatten().tolist()} have no visible voxel to fill from")
    return visible


def constant_fill(images: Tensor, hidden: Tensor) -> Tensor:
    """Hidden voxels = mean of the visible voxels (per item and channel).

    Args:
        images: ``[B, C, D, H, W]`` volumes.
        hidden: ``[B, 1 or C, D, H, W]`` bool, True = hidden.

    Returns:
        ``[B, C, D, H, W]`` in the dtype of ``images``.
    """
    visible = _check(images, hidden)
    v = visible.to(images.dtype)
    mean = (images * v).flatten(2).sum(-1) / v.flatten(2).sum(-1).clamp_min(1)
    return torch.where(visible, images, mean[..., None, None, None].expand_as(images))


def _box_sum(x: Tensor, size: int) -> Tensor:
    """Sum over a centred ``size^3`` box (zero outside the volume) of ``x [B, C, D, H, W]``, by cumulative sums."""
    half = size // 2
    for axis in (2, 3, 4):
        n = x.shape[axis]
        c = torch.cumsum(x, dim=axis)
        zero = torch.zeros_like(c.narrow(axis, 0, 1))
        c = torch.cat([zero, c], dim=axis)  # c[k] = sum of x[:k]
        idx = torch.arange(n, device=x.device)
        hi = (idx + half + 1).clamp(max=n)
        lo = (idx - half).clamp(min=0)
        x = c.index_select(axis, hi) - c.index_select(axis, lo)
    return x


def normalized_convolution_fill(images: Tensor, hidden: Tensor, box: int = 25) -> Tensor:
    """Hidden voxels = mean of the visible voxels in the ``box^3`` neighbourhood (constant fill where none).

    Args:
        images: ``[B, C, D, H, W]`` volumes.
        hidden: ``[B, 1 or C, D, H, W]`` bool, True = hidden.
        box: odd edge of the neighbourhood in voxels.

    Returns:
        ``[B, C, D, H, W]`` in the dtype of ``images`` (computed in float64).
    """
    if int(box) != box or box < 1 or box % 2 == 0:
        raise ValueError(f"box must be an odd positive int, got {box!r}")
    visible = _check(images, hidden)
    v = visible.double()
    num = _box_sum(images.double() * v, int(box))
    den = _box_sum(v, int(box))
    local = num / den.clamp_min(1e-12)
    fallback = constant_fill(images, hidden).double()
    pred = torch.where(den > 0.5, local, fallback)
    return torch.where(visible, images, pred.to(images.dtype))
