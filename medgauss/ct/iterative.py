"""Iterative reconstruction on top of the matched projectors: (OS-)SART and ASD-POCS (TV-regularised).

SART (Andersen & Kak 1984), ordered-subset form: for each subset ``s`` of views,
``x <- x + lambda * A_s^T((b_s - A_s x) / A_s 1) / (A_s^T 1)``, optionally clamped at 0.
ASD-POCS (Sidky & Pan 2008): alternate one SART sweep (data consistency + positivity) with a few
steepest-descent steps on the total variation whose length adapts to the SART change, as in TIGRE.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from tqdm.auto import tqdm

from medgauss.ct.projectors import back_project, check_projections, forward_project
from medgauss.geometry import CircularGeometry

__all__ = ["sart", "asd_pocs", "total_variation", "total_variation_gradient"]

_EPS = 1e-8


def _check_inputs(
    projections: Tensor, geometry: CircularGeometry, initial: Tensor | None, num_subsets: int | None
) -> int:
    """Validate the shared arguments of :func:`sart` / :func:`asd_pocs`; returns the subset count."""
    projections, geometry = check_projections(projections, geometry)
    if initial is not None:
        want = (projections.shape[0], 1, *geometry.vol_shape)
        if not isinstance(initial, Tensor) or tuple(initial.shape) != want:
            raise ValueError(
                f"initial must have shape {list(want)}, got {tuple(getattr(initial, 'shape', ()))}"
            )
    v = geometry.num_views
    subsets = min(v, 10) if num_subsets is None else num_subsets
    if not 1 <= subsets <= v:
        raise ValueError(f"num_subsets must lie in [1, {v}] (number of views), got {subsets}")
    return subsets


def _empty_result(projections: Tensor, geometry: CircularGeometry, initial: Tensor | None) -> Tensor:
    """``[0, 1, D, H, W]`` reconstruction of an empty batch, attached to the inputs' graph."""
    empty = projections.reshape(0, 1, *geometry.vol_shape)
    return empty if initial is None else empty + initial.to(empty)


class _SartSweeper:
    """Ordered-subset SART sweeps with the row / column sums of each subset precomputed once."""

    def __init__(self, projections: Tensor, geometry: CircularGeometry, num_subsets: int, backend: str):
        v = geometry.num_views
        # interleaved subsets: consecutive updates use well-separated angles
        self.subsets = [torch.arange(s, v, num_subsets) for s in range(num_subsets)]
        self.backend = backend
        self.parts = []
        dtype, device = projections.dtype, projections.device
        ones_vol = torch.ones(1, 1, *geometry.vol_shape, dtype=dtype, device=device)
        for ids in self.subsets:
            geo = geometry.subset(ids)
            row = forward_project(ones_vol, geo, backend=backend)
            col = back_project(
                torch.ones(1, *geo.output_shape(), dtype=dtype, device=device), geo, backend=backend
            )
            inv_row = torch.where(row > _EPS, 1.0 / row.clamp_min(_EPS), torch.zeros_like(row))
            inv_col = torch.where(col > _EPS, 1.0 / col.clamp_min(_EPS), torch.zeros_like(col))
            self.parts.append((geo, projections[:, ids.to(device)], inv_row, inv_col))

    def sweep(self, x: Tensor, relaxation: float, nonnegative: bool) -> Tensor:
        for geo, measured, inv_row, inv_col in self.parts:
            residual = (measured - forward_project(x, geo, backend=self.backend)) * inv_row
            x = x + relaxation * back_project(residual, geo, backend=self.backend) * inv_col
            if nonnegative:
                x = x.clamp_min(0.0)
        return x


def sart(
    projections: Tensor,
    geometry: CircularGeometry,
    *,
    iterations: int = 20,
    relaxation: float = 1.0,
    num_subsets: int | None = None,
    nonnegative: bool = True,
    initial: Tensor | None = None,
    backend: str = "auto",
    progress: bool = True,
) -> Tensor:
    """(OS-)SART reconstruction.

    Args:
        projections: ``[B, V, rows, cols]`` line integrals measured with ``geometry``.
        geometry: cone- or parallel-beam geometry.
        iterations: sweeps over all views.
        relaxation: step ``lambda`` in ``(0, 2)``.
        num_subsets: views are split into this many interleaved subsets, one update each (default
            ``min(V, 10)``; ``V`` is classic SART, 1 is SIRT-like). Each subset keeps one column-sum volume.
        nonnegative: clamp the volume at 0 after each update.
        initial: ``[B, 1, D, H, W]`` starting volume (default zeros).
        backend: projector backend.
        progress: show a tqdm bar.

    Returns:
        ``[B, 1, D, H, W]`` attenuation per mm (``B = 0``: an empty volume).
    """
    subsets = _check_inputs(projections, geometry, initial, num_subsets)
    if not 0 < relaxation < 2:
        raise ValueError(f"relaxation must lie in (0, 2), got {relaxation}")
    if projections.shape[0] == 0:
        return _empty_result(projections, geometry, initial)
    sweeper = _SartSweeper(projections, geometry, subsets, backend)
    x = _initial(projections, geometry, initial)
    for _ in tqdm(range(int(iterations)), desc="SART", disable=not progress, leave=False):
        x = sweeper.sweep(x, relaxation, nonnegative)
    return x


def _initial(projections: Tensor, geometry: CircularGeometry, initial: Tensor | None) -> Tensor:
    if initial is not None:
        return initial.to(dtype=projections.dtype, device=projections.device).clone()
    return projections.new_zeros(projections.shape[0], 1, *geometry.vol_shape)


def total_variation(x: Tensor, eps: float = 1e-8) -> Tensor:
    """Smoothed isotropic total variation ``sum sqrt(|grad x|^2 + eps)`` per batch item, ``[B]``.

    ``x`` is ``[B, 1, D, H, W]``; forward differences with a replicated last plane.
    """
    dz = torch.diff(x, dim=2, append=x[:, :, -1:])
    dy = torch.diff(x, dim=3, append=x[:, :, :, -1:])
    dx = torch.diff(x, dim=4, append=x[:, :, :, :, -1:])
    return torch.sqrt(dz * dz + dy * dy + dx * dx + eps).flatten(1).sum(dim=1)


def total_variation_gradient(x: Tensor, eps: float = 1e-8) -> Tensor:
    """Gradient of :func:`total_variation` w.r.t. ``x`` (same shape)."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(total_variation(xg, eps).sum(), xg)
    return grad


def _norm(x: Tensor) -> Tensor:
    return x.flatten(1).norm(dim=1).view(-1, 1, 1, 1, 1)


def asd_pocs(
    projections: Tensor,
    geometry: CircularGeometry,
    *,
    iterations: int = 20,
    tv_iterations: int = 20,
    alpha: float = 0.002,
    alpha_reduction: float = 0.95,
    max_ratio: float = 0.95,
    relaxation: float = 1.0,
    relaxation_reduction: float = 0.99,
    num_subsets: int | None = None,
    initial: Tensor | None = None,
    backend: str = "auto",
    progress: bool = True,
) -> Tensor:
    """ASD-POCS: adaptive steepest descent on TV alternating with SART projections onto the data.

    Each iteration: one OS-SART sweep with positivity (step ``relaxation``, shrunk by
    ``relaxation_reduction``); its change ``dp``; ``tv_iterations`` normalised TV descent steps of length
    ``dtvg`` (initialised to ``alpha * dp``); if the TV change exceeds ``max_ratio * dp``, ``dtvg`` is
    multiplied by ``alpha_reduction``. Defaults follow TIGRE's ``ASD_POCS``.

    Args:
        projections: ``[B, V, rows, cols]`` line integrals; geometry: their geometry.
        iterations: outer iterations; tv_iterations: TV steps per iteration.
        num_subsets, initial, backend, progress: as in :func:`sart`.

    Returns:
        ``[B, 1, D, H, W]`` attenuation per mm (``B = 0``: an empty volume).
    """
    subsets = _check_inputs(projections, geometry, initial, num_subsets)
    for name, value in (
        ("alpha", alpha),
        ("alpha_reduction", alpha_reduction),
        ("max_ratio", max_ratio),
        ("relaxation_reduction", relaxation_reduction),
    ):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be positive, got {value!r}")
    if not 0 < relaxation < 2:
        raise ValueError(f"relaxation must lie in (0, 2), got {relaxation}")
    if projections.shape[0] == 0:
        return _empty_result(projections, geometry, initial)
    sweeper = _SartSweeper(projections, geometry, subsets, backend)
    x = _initial(projections, geometry, initial)
    dtvg = None
    beta = relaxation
    for _ in tqdm(range(int(iterations)), desc="ASD-POCS", disable=not progress, leave=False):
        x_prev = x
        x = sweeper.sweep(x, beta, nonnegative=True)
        beta *= relaxation_reduction
        dp = _norm(x - x_prev)
        if dtvg is None:
            dtvg = alpha * dp
        x_data = x
        for _ in range(int(tv_iterations)):
            g = total_variation_gradient(x)
            x = x - dtvg * g / _norm(g).clamp_min(_EPS)
        dg = _norm(x - x_data)
        dtvg = torch.where((dg > max_ratio * dp) & (dp > _EPS), dtvg * alpha_reduction, dtvg)
    return x.clamp_min(0.0)
