"""Image-quality metrics for reconstructions and projections, with an explicit ``data_range``.

- :func:`psnr`: PSNR over the whole 3D volume, per batch item.
- :func:`ssim_slices`: SSIM averaged over 2D slices along one axis (or all three), the protocol of
  X-GRM / DIF-Net / SAX-NeRF style sparse-view CT papers.
- :func:`ssim3d`: SSIM with a 3D Gaussian window.
- :func:`projection_psnr`, :func:`projection_ssim`: the same on projection stacks ``[B, V, rows, cols]``.

SSIM follows Wang et al. (2004): Gaussian window (size 11, sigma 1.5), ``K1 = 0.01``, ``K2 = 0.03``,
statistics over the "valid" region (no padding), mean of the SSIM map. Windows larger than an image
side shrink to the largest odd size that fits.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["psnr", "ssim_slices", "ssim3d", "projection_psnr", "projection_ssim"]


def _check_pair(pred: Tensor, target: Tensor, ndim: int, layout: str) -> None:
    for name, t in (("pred", pred), ("target", target)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise ValueError(f"{name} must be a float tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        if t.ndim != ndim:
            raise ValueError(f"{name} must have shape {layout}, got {tuple(t.shape)}")
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")


def _check_range(data_range: float) -> float:
    r = float(data_range)
    if not (math.isfinite(r) and r > 0):
        raise ValueError(
            f"data_range must be a positive finite number (max - min of the data), got {data_range!r}"
        )
    return r


def _psnr(pred: Tensor, target: Tensor, data_range: float) -> Tensor:
    mse = (pred.double() - target.double()).pow(2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(data_range**2 / mse)  # identical images -> +inf


def psnr(pred: Tensor, target: Tensor, *, data_range: float) -> Tensor:
    """PSNR in dB over whole volumes: ``10 log10(data_range^2 / MSE)``.

    Args:
        pred, target: ``[B, C, D, H, W]`` volumes (e.g. normalised to [0, 1]).
        data_range: max - min of the data (1.0 for [0, 1] volumes); explicit, never inferred.

    Returns:
        ``[B]`` float64 (``inf`` for identical inputs).
    """
    _check_pair(pred, target, 5, "[B, C, D, H, W]")
    return _psnr(pred, target, _check_range(data_range))


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    x = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _ssim_map_mean(x: Tensor, y: Tensor, data_range: float, window: int, sigma: float) -> Tensor:
    """Mean SSIM of each item of ``x, y`` ``[N, 1, *spatial]`` (2D or 3D), float64 -> ``[N]``."""
    return ssim_map(x, y, data_range, window, sigma).flatten(1).mean(dim=1)


def ssim_map(x: Tensor, y: Tensor, data_range: float, window: int = 11, sigma: float = 1.5) -> Tensor:
    """SSIM map of ``x, y`` ``[N, 1, *spatial]`` (2D or 3D) over the valid region, float64.

    Entry ``p`` of the map is the SSIM of the window centred on voxel ``p + (size - 1) // 2`` (``size`` the
    window, shrunk to the largest odd size that fits): the map is ``size - 1`` shorter along every axis.
    """
    spatial = x.shape[2:]
    size = min(window, *spatial)
    size = size if size % 2 == 1 else size - 1
    g = _gaussian_window(size, sigma, torch.float64, x.device).tolist()

    def blur(t: Tensor) -> Tensor:
        # Separable valid-region filter as a sum of shifted slices: float64 convolution with a 1-D kernel
        # has no fast CPU kernel in torch (measured ~50x slower than this on a 96^3 volume).
        for axis in range(2, 2 + len(spatial)):
            n = t.shape[axis] - size + 1
            acc = t.narrow(axis, 0, n) * g[0]
            for k in range(1, size):
                acc = acc + t.narrow(axis, k, n) * g[k]
            t = acc
        return t

    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    x, y = x.double(), y.double()
    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    return ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))


def ssim_slices(
    pred: Tensor,
    target: Tensor,
    *,
    data_range: float,
    axis: int | str = 0,
    window: int = 11,
    sigma: float = 1.5,
) -> Tensor:
    """SSIM averaged over 2D slices of 3D volumes.

    Args:
        pred, target: ``[B, C, D, H, W]``.
        data_range: max - min of the data (1.0 for [0, 1] volumes).
        axis: spatial axis the slices are taken along: 0 (D, axial for the geometry contract's
            z-along-D volumes), 1 (H) or 2 (W); ``"all"`` averages the three per-axis means.
        window, sigma: Gaussian SSIM window.

    Returns:
        ``[B]`` float64 mean slice SSIM (channels averaged too).
    """
    _check_pair(pred, target, 5, "[B, C, D, H, W]")
    r = _check_range(data_range)
    if axis == "all":
        return torch.stack(
            [ssim_slices(pred, target, data_range=r, axis=a, window=window, sigma=sigma) for a in range(3)]
        ).mean(dim=0)
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1, 2 or 'all', got {axis!r}")
    b = pred.shape[0]

    def slices(t: Tensor) -> Tensor:
        moved = t.movedim(2 + axis, 2)  # [B, C, S, a, b]
        return moved.reshape(-1, 1, *moved.shape[3:])

    return _ssim_map_mean(slices(pred), slices(target), r, window, sigma).view(b, -1).mean(dim=1)


def ssim3d(
    pred: Tensor, target: Tensor, *, data_range: float, window: int = 11, sigma: float = 1.5
) -> Tensor:
    """SSIM with a separable 3D Gaussian window over ``[B, C, D, H, W]`` volumes -> ``[B]`` float64."""
    _check_pair(pred, target, 5, "[B, C, D, H, W]")
    r = _check_range(data_range)
    b = pred.shape[0]
    flat = lambda t: t.reshape(-1, 1, *t.shape[2:])
    return _ssim_map_mean(flat(pred), flat(target), r, window, sigma).view(b, -1).mean(dim=1)


def projection_psnr(pred: Tensor, target: Tensor, *, data_range: float) -> Tensor:
    """PSNR in dB over whole projection stacks ``[B, V, rows, cols]`` -> ``[B]`` float64.

    ``data_range`` is explicit because line integrals are not normalised (use e.g. the max of the
    measured projections of the test set, and report it).
    """
    _check_pair(pred, target, 4, "[B, V, rows, cols]")
    return _psnr(pred, target, _check_range(data_range))


def projection_ssim(
    pred: Tensor, target: Tensor, *, data_range: float, window: int = 11, sigma: float = 1.5
) -> Tensor:
    """SSIM of each projection image ``[B, V, rows, cols]``, averaged over views -> ``[B]`` float64."""
    _check_pair(pred, target, 4, "[B, V, rows, cols]")
    r = _check_range(data_range)
    b = pred.shape[0]
    flat = lambda t: t.reshape(-1, 1, *t.shape[2:])
    return _ssim_map_mean(flat(pred), flat(target), r, window, sigma).view(b, -1).mean(dim=1)
