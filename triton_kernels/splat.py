"""Tile-based Triton kernels for volumetric Gaussian splatting, forward and backward.

Evaluates ``value(x) = sum_i I_i exp(-0.5 q_i(x))`` with ``q_i = r^T P_i r = |L_i r|^2``, ``r = x - mu_i``
and the packed lower-triangular precision factor ``L = (L00, L11, L22, L10, L20, L21)`` (``P = L^T L``):
a sum of squares, never negative, and accurate in float32 for very anisotropic Gaussians, whose
``P`` has entries many orders of magnitude apart (a rounded ``P`` is not even positive definite),
counting only terms with ``q < cutoff^2``
(strictly; ``cutoff=None`` counts all), at every voxel centre ``((d + 0.5) / D, (h + 0.5) / H,
(w + 0.5) / W)`` of a ``(D, H, W)`` volume or at given normalised points.

Work decomposition (see :mod:`triton_kernels.binning`):

* the volume is cut into tiles of ``TD x TH x TW`` voxels; every Gaussian is listed for each tile its
  cut-off box reaches, the lists sorted by tile so each tile owns a contiguous range (with
  ``cutoff=None`` no lists are built: every tile walks all Gaussians of its batch item);
* dense mode: one program per tile holds the tile's voxel coordinates as a block, walks the tile's
  Gaussians ``BLOCK_G`` at a time as a ``[voxels x BLOCK_G]`` block, accumulates in registers and
  writes the tile once (no atomics);
* points mode: points are sorted by tile and cut into work items of at most one tile-block of
  points; one program per work item walks that tile's Gaussian range; results are scattered back to
  the caller's point order;
* backward: the same programs reduce each Gaussian's contributions over the block (``tl.sum``) to
  10 numbers (3 mean, 6 factor, 1 intensity) and add them with relaxed atomics into
  per-Gaussian gradient buffers, skipping Gaussians that touch none of the block's points. The
  gradient is taken with respect to ``L`` itself (``dq/dL_ij = 2 (L r)_i r_j``): going through ``P``
  would lose the thin axis of a very anisotropic Gaussian to cancellation in float32.

This module imports only torch and triton.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from triton_kernels.binning import TileGrid, bin_gaussians, bin_points

__all__ = ["splat_tiles", "DEFAULT_TILE", "DEFAULT_BLOCK_G"]

DEFAULT_TILE = (4, 8, 8)  # voxels per tile along (D, H, W): 256 voxels, one block per program
DEFAULT_BLOCK_G = 8  # Gaussians evaluated together per loop step: [256 x 8] block


def num_warps_for(backward: bool, dtype: torch.dtype) -> int:
    """Warps per program. From ``cuobjdump --dump-resource-usage`` of sm_90 builds of the default
    (4, 8, 8) x 8 block: forward float32 needs 63 registers/thread at 4 warps; the backward
    (133 at 4 warps) and float64 (154-240 at 4 warps) fit without spills and at higher occupancy
    with 8 warps (87-162 registers)."""
    return 8 if backward or dtype == torch.float64 else 4


# --------------------------------------------------------------------------------------- jit helpers
@triton.jit
def _work_item(pid, points_ptr, item_tile_ptr, item_start_ptr, item_count_ptr, D, H, W,
               tiles_h, tiles_w, num_tiles, v_total,
               TD: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr, POINTS: tl.constexpr):
    """Coordinates ``[BLOCK_V]`` x3, validity, output offsets and tile key of program ``pid``."""
    BLOCK_V: tl.constexpr = TD * TH * TW
    lane = tl.arange(0, BLOCK_V)
    dtype = points_ptr.dtype.element_ty
    if POINTS:
        tile_key = tl.load(item_tile_ptr + pid)
        start = tl.load(item_start_ptr + pid)
        count = tl.load(item_count_ptr + pid)
        valid = lane < count
        offs = (start + lane).to(tl.int64)
        x0 = tl.load(points_ptr + offs * 3 + 0, mask=valid, other=0.0)
        x1 = tl.load(points_ptr + offs * 3 + 1, mask=valid, other=0.0)
        x2 = tl.load(points_ptr + offs * 3 + 2, mask=valid, other=0.0)
    else:
        tile_key = pid
        b = pid // num_tiles
        t = pid % num_tiles
        d = (t // (tiles_h * tiles_w)) * TD + lane // (TH * TW)
        h = ((t // tiles_w) % tiles_h) * TH + (lane // TW) % TH
        w = (t % tiles_w) * TW + lane % TW
        valid = (d < D) & (h < H) & (w < W)
        offs = b.to(tl.int64) * v_total + ((d * H + h) * W + w).to(tl.int64)
        x0 = (d.to(dtype) + 0.5) / D
        x1 = (h.to(dtype) + 0.5) / H
        x2 = (w.to(dtype) + 0.5) / W
    return tile_key, x0, x1, x2, valid, offs


@triton.jit
def _gaussian_range(tile_key, num_tiles, N, tile_start_ptr, USE_LIST: tl.constexpr):
    """``[start, end)`` of the tile's Gaussians: into the sorted id list, or ``[0, N)`` of its batch."""
    if USE_LIST:
        start = tl.load(tile_start_ptr + tile_key)
        end = tl.load(tile_start_ptr + tile_key + 1)
    else:
        start = tile_key * 0
        end = start + N
    return start, end


@triton.jit
def _load_gaussians(j0, end, base, gauss_ids_ptr, means_ptr, fac_ptr, inten_ptr,
                    BLOCK_G: tl.constexpr, USE_LIST: tl.constexpr):
    """Flat ids ``[BLOCK_G]``, their mask and the 10 parameters (mean, factor, intensity) of Gaussians
    ``j0 .. j0+BLOCK_G``."""
    jj = j0 + tl.arange(0, BLOCK_G)
    gmask = jj < end
    if USE_LIST:
        gid = tl.load(gauss_ids_ptr + jj, mask=gmask, other=0)
    else:
        gid = base + jj
    m0 = tl.load(means_ptr + gid * 3 + 0, mask=gmask, other=0.0)
    m1 = tl.load(means_ptr + gid * 3 + 1, mask=gmask, other=0.0)
    m2 = tl.load(means_ptr + gid * 3 + 2, mask=gmask, other=0.0)
    l00 = tl.load(fac_ptr + gid * 6 + 0, mask=gmask, other=0.0)
    l11 = tl.load(fac_ptr + gid * 6 + 1, mask=gmask, other=0.0)
    l22 = tl.load(fac_ptr + gid * 6 + 2, mask=gmask, other=0.0)
    l10 = tl.load(fac_ptr + gid * 6 + 3, mask=gmask, other=0.0)
    l20 = tl.load(fac_ptr + gid * 6 + 4, mask=gmask, other=0.0)
    l21 = tl.load(fac_ptr + gid * 6 + 5, mask=gmask, other=0.0)
    inten = tl.load(inten_ptr + gid, mask=gmask, other=0.0)  # 0 for padding lanes: they add nothing
    return gid, gmask, m0, m1, m2, l00, l11, l22, l10, l20, l21, inten


@triton.jit
def _offsets_and_weights(x0, x1, x2, m0, m1, m2, l00, l11, l22, l10, l20, l21, cutoff_sq,
                         HAS_CUTOFF: tl.constexpr):
    """Offsets ``r``, ``y = L r`` and ``exp(-0.5 q)`` (0 outside the cutoff) on the ``[BLOCK_V, BLOCK_G]`` block."""
    r0 = x0[:, None] - m0[None, :]
    r1 = x1[:, None] - m1[None, :]
    r2 = x2[:, None] - m2[None, :]
    y0 = l00[None, :] * r0
    y1 = l10[None, :] * r0 + l11[None, :] * r1
    y2 = l20[None, :] * r0 + l21[None, :] * r1 + l22[None, :] * r2
    q = y0 * y0 + y1 * y1 + y2 * y2
    e = tl.exp(-0.5 * q)
    if HAS_CUTOFF:
        e = tl.where(q < cutoff_sq, e, 0.0)
    return r0, r1, r2, y0, y1, y2, e


# ------------------------------------------------------------------------------------------ kernels
@triton.jit
def _splat_fwd_kernel(out_ptr, means_ptr, fac_ptr, inten_ptr, cutoff_sq_ptr,
                      tile_start_ptr, gauss_ids_ptr,
                      points_ptr, item_tile_ptr, item_start_ptr, item_count_ptr,
                      N, D, H, W, tiles_h, tiles_w, num_tiles, v_total,
                      TD: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr, BLOCK_G: tl.constexpr,
                      POINTS: tl.constexpr, USE_LIST: tl.constexpr, HAS_CUTOFF: tl.constexpr):
    pid = tl.program_id(0)
    tile_key, x0, x1, x2, valid, offs = _work_item(
        pid, points_ptr, item_tile_ptr, item_start_ptr, item_count_ptr, D, H, W,
        tiles_h, tiles_w, num_tiles, v_total, TD, TH, TW, POINTS)
    start, end = _gaussian_range(tile_key, num_tiles, N, tile_start_ptr, USE_LIST)
    base = (tile_key // num_tiles) * N
    cutoff_sq = tl.load(cutoff_sq_ptr)
    acc = tl.zeros_like(x0)
    for j0 in range(start, end, BLOCK_G):
        gid, gmask, m0, m1, m2, l00, l11, l22, l10, l20, l21, inten = _load_gaussians(
            j0, end, base, gauss_ids_ptr, means_ptr, fac_ptr, inten_ptr, BLOCK_G, USE_LIST)
        _, _, _, _, _, _, e = _offsets_and_weights(x0, x1, x2, m0, m1, m2, l00, l11, l22, l10, l20, l21,
                                                   cutoff_sq, HAS_CUTOFF)
        acc += tl.sum(e * inten[None, :], axis=1)
    tl.store(out_ptr + offs, acc, mask=valid)


@triton.jit
def _splat_bwd_kernel(grad_out_ptr, grad_means_ptr, grad_fac_ptr, grad_inten_ptr,
                      means_ptr, fac_ptr, inten_ptr, cutoff_sq_ptr,
                      tile_start_ptr, gauss_ids_ptr,
                      points_ptr, item_tile_ptr, item_start_ptr, item_count_ptr,
                      N, D, H, W, tiles_h, tiles_w, num_tiles, v_total,
                      TD: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr, BLOCK_G: tl.constexpr,
                      POINTS: tl.constexpr, USE_LIST: tl.constexpr, HAS_CUTOFF: tl.constexpr):
    pid = tl.program_id(0)
    tile_key, x0, x1, x2, valid, offs = _work_item(
        pid, points_ptr, item_tile_ptr, item_start_ptr, item_count_ptr, D, H, W,
        tiles_h, tiles_w, num_tiles, v_total, TD, TH, TW, POINTS)
    start, end = _gaussian_range(tile_key, num_tiles, N, tile_start_ptr, USE_LIST)
    base = (tile_key // num_tiles) * N
    cutoff_sq = tl.load(cutoff_sq_ptr)
    go = tl.load(grad_out_ptr + offs, mask=valid, other=0.0)
    for j0 in range(start, end, BLOCK_G):
        gid, gmask, m0, m1, m2, l00, l11, l22, l10, l20, l21, inten = _load_gaussians(
            j0, end, base, gauss_ids_ptr, means_ptr, fac_ptr, inten_ptr, BLOCK_G, USE_LIST)
        r0, r1, r2, y0, y1, y2, e = _offsets_and_weights(x0, x1, x2, m0, m1, m2, l00, l11, l22, l10, l20, l21,
                                                         cutoff_sq, HAS_CUTOFF)
        e = tl.where(valid[:, None], e, 0.0)
        # Only Gaussians reaching a point of this block send atomics.
        hit = gmask & (tl.max(e, axis=0) > 0.0)
        ge = go[:, None] * e  # d value / d I_i, times the upstream gradient
        w = ge * inten[None, :]  # upstream gradient times the term; dL/dq = -0.5 w
        wy0 = w * y0
        wy1 = w * y1
        wy2 = w * y2
        s0 = tl.sum(wy0, axis=0)
        s1 = tl.sum(wy1, axis=0)
        s2 = tl.sum(wy2, axis=0)
        # dq/dmu = -2 L^T y  =>  dL/dmu = L^T (sum_v w y)
        tl.atomic_add(grad_means_ptr + gid * 3 + 0, l00 * s0 + l10 * s1 + l20 * s2, mask=hit, sem="relaxed")
        tl.atomic_add(grad_means_ptr + gid * 3 + 1, l11 * s1 + l21 * s2, mask=hit, sem="relaxed")
        tl.atomic_add(grad_means_ptr + gid * 3 + 2, l22 * s2, mask=hit, sem="relaxed")
        # dq/dL_ij = 2 y_i r_j  =>  dL/dL_ij = -sum_v w y_i r_j (packed L00, L11, L22, L10, L20, L21)
        tl.atomic_add(grad_fac_ptr + gid * 6 + 0, -tl.sum(wy0 * r0, axis=0), mask=hit, sem="relaxed")
        tl.atomic_add(grad_fac_ptr + gid * 6 + 1, -tl.sum(wy1 * r1, axis=0), mask=hit, sem="relaxed")
        tl.atomic_add(grad_fac_ptr + gid * 6 + 2, -tl.sum(wy2 * r2, axis=0), mask=hit, sem="relaxed")
        tl.atomic_add(grad_fac_ptr + gid * 6 + 3, -tl.sum(wy1 * r0, axis=0), mask=hit, sem="relaxed")
        tl.atomic_add(grad_fac_ptr + gid * 6 + 4, -tl.sum(wy2 * r0, axis=0), mask=hit, sem="relaxed")
        tl.atomic_add(grad_fac_ptr + gid * 6 + 5, -tl.sum(wy2 * r1, axis=0), mask=hit, sem="relaxed")
        tl.atomic_add(grad_inten_ptr + gid, tl.sum(ge, axis=0), mask=hit, sem="relaxed")


# ----------------------------------------------------------------------------------------- launchers
@dataclass
class _Plan:
    """Everything the forward and backward launches share: sizes, tile lists, point work items."""

    grid: TileGrid
    batch: int
    num_gaussians: int
    num_points: int  # per batch item: M, or D*H*W in dense mode
    cutoff_sq: Tensor  # [1], the Gaussians' dtype (a dummy 0 when there is no cutoff)
    has_cutoff: bool
    use_list: bool
    tile_start: Tensor  # [B*tiles+1] int32 (dummy when not use_list)
    gauss_ids: Tensor  # [P] int32 (dummy when not use_list)
    points_mode: bool
    order: Tensor | None  # [B*M] sort permutation of the points (points mode)
    points_sorted: Tensor  # [B*M, 3] (dummy in dense mode)
    item_tile: Tensor  # [I] int32 (dummy in dense mode)
    item_start: Tensor
    item_count: Tensor
    block_g: int

    @property
    def num_programs(self) -> int:
        return self.item_tile.numel() if self.points_mode else self.batch * self.grid.num_tiles

    def kernel_args(self) -> tuple:
        d, h, w = self.grid.shape
        _, th, tw = self.grid.tiles_per_axis
        return (self.tile_start, self.gauss_ids, self.points_sorted, self.item_tile, self.item_start,
                self.item_count, self.num_gaussians, d, h, w, th, tw, self.grid.num_tiles, d * h * w)

    def constexprs(self, backward: bool) -> dict:
        td, th, tw = self.grid.tile
        return dict(TD=td, TH=th, TW=tw, BLOCK_G=self.block_g, POINTS=self.points_mode,
                    USE_LIST=self.use_list, HAS_CUTOFF=self.has_cutoff,
                    num_warps=num_warps_for(backward, self.cutoff_sq.dtype))


def _make_plan(means: Tensor, half_extents: Tensor, shape: tuple[int, int, int], points: Tensor | None,
               cutoff: float | None, tile: tuple[int, int, int], block_g: int) -> _Plan:
    b, n = means.shape[:2]
    device, dtype = means.device, means.dtype
    grid = TileGrid(shape, tile)
    dummy_i32 = torch.zeros(1, dtype=torch.int32, device=device)
    use_list = cutoff is not None
    if use_list:
        tile_start, gauss_ids = bin_gaussians(means, half_extents, grid)
        if gauss_ids.numel() == 0:
            gauss_ids = dummy_i32
    else:
        tile_start, gauss_ids = dummy_i32, dummy_i32
    cutoff_sq = torch.tensor([0.0 if cutoff is None else cutoff * cutoff], dtype=dtype, device=device)
    if points is None:
        order, points_sorted = None, torch.zeros(1, 3, dtype=dtype, device=device)
        item_tile = item_start = item_count = dummy_i32
        num_points = grid.shape[0] * grid.shape[1] * grid.shape[2]
    else:
        order, points_sorted, item_tile, item_start, item_count = bin_points(
            points, grid, _points_per_program(tile))
        num_points = points.shape[1]
    return _Plan(grid, b, n, num_points, cutoff_sq, cutoff is not None, use_list, tile_start, gauss_ids,
                 points is not None, order, points_sorted, item_tile, item_start, item_count, block_g)


def _points_per_program(tile: Sequence[int]) -> int:
    """Points handled by one program: the voxel count of a tile."""
    return int(tile[0]) * int(tile[1]) * int(tile[2])


def _forward(plan: _Plan, means: Tensor, fac: Tensor, inten: Tensor) -> Tensor:
    """Values ``[B, num_points]`` in the caller's point order."""
    out = torch.empty(plan.batch * plan.num_points, dtype=means.dtype, device=means.device)
    if plan.num_programs > 0:
        _splat_fwd_kernel[(plan.num_programs,)](out, means, fac, inten, plan.cutoff_sq, *plan.kernel_args(),
                                                **plan.constexprs(backward=False))
    if plan.points_mode:
        out = torch.empty_like(out).index_put_((plan.order,), out)  # sorted order -> caller's order
    return out.reshape(plan.batch, plan.num_points)


def _backward(plan: _Plan, means: Tensor, fac: Tensor, inten: Tensor,
              grad_out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients w.r.t. means, the packed factor and intensities."""
    go = grad_out.reshape(-1).to(means.dtype)
    go = go[plan.order] if plan.points_mode else go.contiguous()
    grad_means = torch.zeros_like(means)
    grad_fac = torch.zeros_like(fac)
    grad_inten = torch.zeros_like(inten)
    if plan.num_programs > 0:
        _splat_bwd_kernel[(plan.num_programs,)](go, grad_means, grad_fac, grad_inten, means, fac, inten,
                                                plan.cutoff_sq, *plan.kernel_args(),
                                                **plan.constexprs(backward=True))
    return grad_means, grad_fac, grad_inten


class _SplatTiles(torch.autograd.Function):
    """``(means, factor, intensities) -> values``; gradients for all three from the backward kernel."""

    @staticmethod
    def forward(ctx, means: Tensor, fac: Tensor, inten: Tensor, plan: _Plan) -> Tensor:
        ctx.save_for_backward(means, fac, inten)
        ctx.plan = plan
        return _forward(plan, means, fac, inten)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        means, fac, inten = ctx.saved_tensors
        grad_means, grad_fac, grad_inten = _backward(ctx.plan, means, fac, inten, grad_out)
        return grad_means, grad_fac, grad_inten, None


# --------------------------------------------------------------------------------------- public API
def _check_inputs(means: Tensor, factor: Tensor, inten: Tensor, half_extents: Tensor,
                  shape: Sequence[int], points: Tensor | None, cutoff: float | None,
                  tile: Sequence[int], block_g: int) -> None:
    """Shape / dtype / device checks (no value checks: those would synchronise the GPU)."""
    for name, t in (("means", means), ("factor", factor), ("intensities", inten), ("half_extents", half_extents)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if means.ndim != 3 or means.shape[2] != 3:
        raise ValueError(f"means must have shape [B, N, 3], got {tuple(means.shape)}")
    b, n = means.shape[:2]
    expected = {"factor": (factor, (b, n, 6)), "intensities": (inten, (b, n)),
                "half_extents": (half_extents, (b, n, 3))}
    for name, (t, shp) in expected.items():
        if tuple(t.shape) != shp:
            raise ValueError(f"{name} must have shape {list(shp)} to match means, got {tuple(t.shape)}")
    if b * n * 6 >= 2**31:
        raise ValueError(f"B*N = {b * n} Gaussians exceed the kernels' int32 indexing")
    if means.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"means must be float32 or float64, got {means.dtype}")
    others = {"factor": factor, "intensities": inten, "half_extents": half_extents}
    if points is not None:
        others["points"] = points
    for name, t in others.items():
        if name != "half_extents" and t.dtype != means.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but means has {means.dtype}")
        if t.device != means.device:
            raise ValueError(f"{name} is on {t.device} but means is on {means.device}")
    if means.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("the Triton splat kernels need CUDA tensors (CPU tensors run only with "
                         "TRITON_INTERPRET=1 set before triton is imported)")
    if len(tuple(shape)) != 3 or min(int(s) for s in shape) <= 0:
        raise ValueError(f"shape must be three positive ints (D, H, W), got {tuple(shape)}")
    if points is not None and (points.ndim != 3 or points.shape[0] != b or points.shape[2] != 3):
        raise ValueError(f"points must have shape [B={b}, M, 3], got {tuple(points.shape)}")
    if cutoff is not None and not cutoff > 0:
        raise ValueError(f"cutoff must be positive or None, got {cutoff!r}")
    if len(tuple(tile)) != 3 or any(int(t) <= 0 or int(t) & (int(t) - 1) for t in tile):
        raise ValueError(f"tile must be three powers of two, got {tuple(tile)}")
    if block_g <= 0 or block_g & (block_g - 1):
        raise ValueError(f"block_g must be a power of two, got {block_g}")


def splat_tiles(means: Tensor, factor: Tensor, intensities: Tensor, half_extents: Tensor,
                shape: Sequence[int], *, points: Tensor | None = None, cutoff: float | None = 3.0,
                tile: Sequence[int] = DEFAULT_TILE, block_g: int = DEFAULT_BLOCK_G) -> Tensor:
    """Differentiable tile-based splat of Gaussians given as plain tensors.

    Args:
        means: ``[B, N, 3]`` centres in normalised coordinates (axis order D, H, W), float32/float64.
        factor: ``[B, N, 6]`` packed lower-triangular precision factor ``(L00, L11, L22, L10, L20, L21)``,
            ``P = L^T L`` (normalised units^-1).
        intensities: ``[B, N]`` peak values.
        half_extents: ``[B, N, 3]`` half-size of each Gaussian's axis-aligned cut-off box,
            ``cutoff * sqrt(Sigma_aa)`` in normalised units (``inf`` allowed; unused when ``cutoff`` is None).
            Must contain the ellipsoid ``q < cutoff^2``, else terms are lost. Carries no gradient.
        shape: ``(D, H, W)`` of the volume (sets the voxel centres and the tiling).
        points: optional ``[B, M, 3]`` normalised query points in ``[0, 1]`` (no gradient).
        cutoff: strict Mahalanobis cut-off ``q < cutoff^2``; ``None`` = every term.
        tile: voxels per tile along (D, H, W), powers of two.
        block_g: Gaussians evaluated together per loop step, a power of two.

    Returns:
        ``[B, D*H*W]`` (C order) without ``points``, ``[B, M]`` with; differentiable w.r.t. ``means``,
        ``factor`` and ``intensities``.
    """
    shape = tuple(int(s) for s in shape)
    tile = tuple(int(t) for t in tile)
    _check_inputs(means, factor, intensities, half_extents, shape, points, cutoff, tile, block_g)
    b, n = means.shape[:2]
    m = shape[0] * shape[1] * shape[2] if points is None else points.shape[1]
    if b == 0 or n == 0 or m == 0:
        # Nothing to evaluate; stay connected to the graph like the torch reference.
        return intensities.sum(-1, keepdim=True).expand(b, m) * 0
    plan = _make_plan(means, half_extents, shape, None if points is None else points.detach(), cutoff,
                      tile, block_g)
    return _SplatTiles.apply(means.contiguous(), factor.contiguous(), intensities.contiguous(), plan)
