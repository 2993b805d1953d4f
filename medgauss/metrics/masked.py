"""Metrics of masked-volume prediction (MAE pretraining): scored on the hidden voxels only.

A masked autoencoder sees the visible voxels and is judged on the voxels it could not see, so these
metrics take a ``hidden`` mask and ignore everything else:

- :func:`masked_mse`: mean squared error over the hidden voxels of each item;
- :func:`masked_psnr`: ``10 log10(data_range^2 / masked_mse)``;
- :func:`masked_ssim`: the 3D SSIM map (Gaussian window, as :func:`medgauss.metrics.ssim3d`) averaged over
  the windows centred on hidden voxels (the windows still see visible neighbours: SSIM is a local
  structure measure, and a prediction that copies the visible voxels scores only where the centre is hidden).

An item with no hidden voxel has no score: it raises ``ValueError`` instead of returning NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor

from medgauss.metrics.image import _check_pair, _check_range, ssim_map

__all__ = ["masked_mse", "masked_psnr", "masked_ssim"]


def _check_hidden(hidden: Tensor, pred: Tensor) -> Tensor:
    """``hidden [B, 1 or C, D, H, W]`` bool -> broadcast to ``pred``'s shape."""
    if not isinstance(hidden, Tensor) or hidden.dtype != torch.bool:
        raise ValueError(f"hidden must be a bool tensor, got {getattr(hidden, 'dtype', type(hidden).__name__)}")
    b, c = pred.shape[:2]
    if hidden.ndim != 5 or hidden.shape[0] != b or hidden.shape[1] not in (1, c) or hidden.shape[2:] != pred.shape[2:]:
        raise ValueError(f"hidden must have shape [B={b}, 1 or {c}, {', '.join(map(str, pred.shape[2:]))}], "
                         f"got {tuple(hidden.shape)}")
    hidden = hidden.expand_as(pred)
    empty = ~hidden.flatten(1).any(dim=1)
    if bool(empty.any()):
        raise ValueError(f"hidden is empty for batch item(s) {empty.nonzero().flatten().tolist()}: "
                         "a masked metric needs at least one hidden voxel")
    return hidden


def masked_mse(pred: Tensor, target: Tensor, hidden: Tensor) -> Tensor:
    """Mean squared error over the hidden voxels.

    Args:
        pred, target: ``[B, C, D, H, W]`` volumes.
        hidden: ``[B, 1 or C, D, H, W]`` bool, True = hidden from the model (scored).

    Returns:
        ``[B]`` float64.
    """
    _check_pair(pred, target, 5, "[B, C, D, H, W]")
    h = _check_hidden(hidden, pred).double()
    err = (pred.double() - target.double()).square() * h
    return err.flatten(1).sum(dim=1) / h.flatten(1).sum(dim=1)


def masked_psnr(pred: Tensor, target: Tensor, hidden: Tensor, *, data_range: float) -> Tensor:
    """PSNR in dB over the hidden voxels: ``10 log10(data_range^2 / masked_mse)`` -> ``[B]`` float64."""
    r = _check_range(data_range)
    return 10.0 * torch.log10(r**2 / masked_mse(pred, target, hidden))


def masked_ssim(
    pred: Tensor, target: Tensor, hidden: Tensor, *, data_range: float, window: int = 11, sigma: float = 1.5
) -> Tensor:
    """3D SSIM averaged over the windows centred on hidden voxels -> ``[B]`` float64 (channels averaged).

    Windows are those of :func:`medgauss.metrics.ssim3d` (valid region, no padding), so hidden voxels
    within ``window // 2`` of the border are not scored; an item whose hidden voxels all lie there raises.
    """
    _check_pair(pred, target, 5, "[B, C, D, H, W]")
    r = _check_range(data_range)
    h = _check_hidden(hidden, pred)
    b, c = pred.shape[:2]
    flat = lambda t: t.reshape(b * c, 1, *t.shape[2:])
    smap = ssim_map(flat(pred), flat(target), r, window, sigma)  # [B*C, 1, *valid]
    lo = [(n - m) // 2 for n, m in zip(pred.shape[2:], smap.shape[2:])]
    centres = flat(h)[:, :, lo[0]:lo[0] + smap.shape[2], lo[1]:lo[1] + smap.shape[3], lo[2]:lo[2] + smap.shape[4]]
    weights = centres.double().flatten(1)
    count = weights.sum(dim=1)
    if bool((count == 0).any()):
        bad = sorted({int(i) // c for i in (count == 0).nonzero().flatten().tolist()})
        raise ValueError(f"hidden has no voxel away from the border (window {window}) for batch item(s) {bad}")
    per_channel = (smap.flatten(1) * weights).sum(dim=1) / count
    return per_channel.view(b, c).mean(dim=1)
