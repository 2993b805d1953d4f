"""Pure-torch backend of the voxel projectors (Joseph's method, see :mod:`medgauss.ct._joseph`).

Rays are grouped by dominant axis and processed in chunks: the sample points on every voxel plane of
the dominant axis go to one ``grid_sample`` call (trilinear interpolation at a point on a voxel plane
is Joseph's bilinear interpolation; zero padding is Joseph's "zero outside"). Runs on any device and
is differentiable through autograd; chunks are checkpointed when gradients are needed, so memory
stays bounded by one chunk. The back projection is the exact vector-Jacobian product of the forward
pass (matched adjoint by construction).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from medgauss.geometry import CircularGeometry

__all__ = ["forward_project", "back_project"]

# Sample points (rays x planes) per grid_sample call.
_SAMPLES_PER_CHUNK = 1 << 22


def _index_rays(geometry: CircularGeometry, device: torch.device) -> tuple[Tensor, Tensor]:
    """Ray origins and directions in voxel-index space ``(i_d, i_h, i_w)``, each ``[V*rows*cols, 3]`` f64."""
    origins, directions = geometry.rays(dtype=torch.float64)
    org = torch.tensor(geometry.volume_origin, dtype=torch.float64)
    sp = torch.tensor(geometry.vol_spacing, dtype=torch.float64)
    o = (origins.flip(-1) - org) / sp
    d = directions.flip(-1) / sp
    return o.reshape(-1, 3).to(device), d.reshape(-1, 3).to(device)


def _chunk_integrals(volume_cb: Tensor, o: Tensor, d: Tensor, axis: int, is_cone: bool) -> Tensor:
    """Joseph sums for rays ``o, d`` ``[R, 3]`` (f64, dominant ``axis``) -> ``[B, R]`` in the volume's dtype.

    ``volume_cb`` is ``[1, B, D, H, W]`` (batch folded into channels so all rays sample every batch item).
    """
    shape = volume_cb.shape[2:]
    n_a = shape[axis]
    k = torch.arange(n_a, dtype=torch.float64, device=o.device)
    t = (k[None, :] - o[:, axis, None]) / d[:, axis, None]  # [R, n_a]
    points = o[:, None, :] + t[..., None] * d[:, None, :]  # [R, n_a, 3] in (d, h, w) index order
    points[..., axis] = k
    sizes = torch.tensor(shape, dtype=torch.float64, device=o.device)
    grid = (2.0 * points + 1.0) / sizes - 1.0  # align_corners=False normalisation
    grid = grid.flip(-1).to(volume_cb.dtype)[None, None]  # [1, 1, R, n_a, 3] in (w, h, d) order
    samples = F.grid_sample(volume_cb, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    samples = samples[0, :, 0]  # [B, R, n_a]
    if is_cone:
        samples = samples * (t >= 0).to(samples.dtype)
    weight = (1.0 / d[:, axis].abs()).to(samples.dtype)
    return samples.sum(dim=-1) * weight


def forward_project(volume: Tensor, geometry: CircularGeometry) -> Tensor:
    """Joseph forward projection: ``[B, 1, D, H, W]`` per mm -> ``[B, V, rows, cols]`` line integrals.

    Inputs are assumed validated by :func:`medgauss.ct.forward_project`. Differentiable w.r.t. ``volume``.
    """
    b = volume.shape[0]
    o, d = _index_rays(geometry, volume.device)
    dominant = d.abs().argmax(dim=-1)
    volume_cb = volume.reshape(1, b, *volume.shape[2:])
    out = volume.new_zeros(b, o.shape[0])
    need_grad = volume.requires_grad and torch.is_grad_enabled()
    for axis in range(3):
        ids = (dominant == axis).nonzero().squeeze(1)
        if ids.numel() == 0:
            continue
        step = max(1, _SAMPLES_PER_CHUNK // geometry.vol_shape[axis])
        for start in range(0, ids.numel(), step):
            sel = ids[start : start + step]
            if need_grad:
                vals = checkpoint(
                    _chunk_integrals, volume_cb, o[sel], d[sel], axis, geometry.is_cone, use_reentrant=False
                )
            else:
                vals = _chunk_integrals(volume_cb, o[sel], d[sel], axis, geometry.is_cone)
            out = out.index_copy(1, sel, vals) if need_grad else out.index_copy_(1, sel, vals)
    return out.reshape(b, *geometry.output_shape())


class _BackProject(torch.autograd.Function):
    @staticmethod
    def forward(ctx, projections: Tensor, geometry: CircularGeometry) -> Tensor:  # type: ignore[override]
        ctx.geometry = geometry
        b = projections.shape[0]
        with torch.enable_grad():
            x = projections.new_zeros(b, 1, *geometry.vol_shape, requires_grad=True)
            (grad,) = torch.autograd.grad(forward_project(x, geometry), x, grad_outputs=projections.detach())
        return grad

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return forward_project(grad, ctx.geometry), None


def back_project(projections: Tensor, geometry: CircularGeometry) -> Tensor:
    """Matched adjoint of :func:`forward_project`: ``[B, V, rows, cols]`` -> ``[B, 1, D, H, W]``."""
    return _BackProject.apply(projections, geometry)
