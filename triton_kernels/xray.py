"""Tile-based Triton kernels for the X-ray projection of Gaussians (exact per-ray line integrals).

For a ray ``o + t d`` (unit ``d``) and a Gaussian ``(mu, P, I)`` (packed precision
``(P00, P11, P22, P01, P02, P12)``), with ``r`` = ``o - mu`` moved along the ray to the point closest
to ``mu`` (keeps float32 accurate when ``|o - mu|`` is a metre and the Gaussian a millimetre)::

    a = d.P.d,  b = r.P.d,  c = r.P.r,  m = c - b^2 / a,   value = I sqrt(2 pi / a) exp(-m / 2)

counted only where ``m < cutoff^2`` (strictly; ``cutoff=None`` counts all).

Work decomposition:

* the caller gives every Gaussian's conservative tile box per (sample, view); :func:`bin_tile_boxes`
  lists each Gaussian under every tile of its box and sorts the list by tile (stable, so each tile
  sees its Gaussians in ascending order), giving each tile a contiguous range;
* forward: one program per (sample, view, tile) holds the tile's ``TR x TC`` rays as a block, walks
  its Gaussians ``BLOCK_G`` at a time as a ``[rays x BLOCK_G]`` block and writes the tile once;
* backward: the same programs reduce each Gaussian's contributions over the tile (``tl.sum``) to 10
  numbers (3 mean, 6 precision, 1 intensity) and add them with relaxed atomics, skipping Gaussians
  that reach no ray of the tile.

This module imports only torch and triton.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["project_rays", "bin_tile_boxes", "DEFAULT_BLOCK_G"]

DEFAULT_BLOCK_G = 8
_NUM_WARPS = 4
_SQRT_2PI = math.sqrt(2.0 * math.pi)


# --------------------------------------------------------------------------------------- jit helpers
@triton.jit
def _tile_rays(pid, origins_ptr, dirs_ptr, V, R, C, num_tiles, tiles_c, TR: tl.constexpr, TC: tl.constexpr):
    """Sample index, ray origins/directions ``[TR*TC]`` x3, validity and flat pixel offsets of ``pid``."""
    lane = tl.arange(0, TR * TC)
    slot = pid // num_tiles
    t = pid % num_tiles
    b = slot // V
    v = slot % V
    row = (t // tiles_c) * TR + lane // TC
    col = (t % tiles_c) * TC + lane % TC
    valid = (row < R) & (col < C)
    pix = (v.to(tl.int64) * R + row) * C + col
    o0 = tl.load(origins_ptr + pix * 3 + 0, mask=valid, other=0.0)
    o1 = tl.load(origins_ptr + pix * 3 + 1, mask=valid, other=0.0)
    o2 = tl.load(origins_ptr + pix * 3 + 2, mask=valid, other=0.0)
    d0 = tl.load(dirs_ptr + pix * 3 + 0, mask=valid, other=1.0)
    d1 = tl.load(dirs_ptr + pix * 3 + 1, mask=valid, other=0.0)
    d2 = tl.load(dirs_ptr + pix * 3 + 2, mask=valid, other=0.0)
    out_offs = b.to(tl.int64) * V * R * C + pix
    return b, o0, o1, o2, d0, d1, d2, valid, out_offs


@triton.jit
def _load_gaussians(j0, end, base, ids_ptr, means_ptr, prec_ptr, inten_ptr, BLOCK_G: tl.constexpr):
    """Flat ids ``[BLOCK_G]``, mask and parameters of list entries ``j0 .. j0 + BLOCK_G``."""
    jj = j0 + tl.arange(0, BLOCK_G)
    gmask = jj < end
    gid = base + tl.load(ids_ptr + jj, mask=gmask, other=0).to(tl.int64)
    m0 = tl.load(means_ptr + gid * 3 + 0, mask=gmask, other=0.0)
    m1 = tl.load(means_ptr + gid * 3 + 1, mask=gmask, other=0.0)
    m2 = tl.load(means_ptr + gid * 3 + 2, mask=gmask, other=0.0)
    # padding lanes get the identity precision (a = 1, never a division by zero) and zero intensity
    p00 = tl.load(prec_ptr + gid * 6 + 0, mask=gmask, other=1.0)
    p11 = tl.load(prec_ptr + gid * 6 + 1, mask=gmask, other=1.0)
    p22 = tl.load(prec_ptr + gid * 6 + 2, mask=gmask, other=1.0)
    p01 = tl.load(prec_ptr + gid * 6 + 3, mask=gmask, other=0.0)
    p02 = tl.load(prec_ptr + gid * 6 + 4, mask=gmask, other=0.0)
    p12 = tl.load(prec_ptr + gid * 6 + 5, mask=gmask, other=0.0)
    inten = tl.load(inten_ptr + gid, mask=gmask, other=0.0)
    return gid, gmask, m0, m1, m2, p00, p11, p22, p01, p02, p12, inten


@triton.jit
def _pair_terms(o0, o1, o2, d0, d1, d2, m0, m1, m2, p00, p11, p22, p01, p02, p12):
    """Per (ray, Gaussian) on the ``[rays, BLOCK_G]`` block: perpendicular offset ``r``, ``P d``,
    ``P r`` and ``a, b, c``."""
    r0 = o0[:, None] - m0[None, :]
    r1 = o1[:, None] - m1[None, :]
    r2 = o2[:, None] - m2[None, :]
    t = r0 * d0[:, None] + r1 * d1[:, None] + r2 * d2[:, None]
    r0 = r0 - t * d0[:, None]
    r1 = r1 - t * d1[:, None]
    r2 = r2 - t * d2[:, None]
    pd0 = p00[None, :] * d0[:, None] + p01[None, :] * d1[:, None] + p02[None, :] * d2[:, None]
    pd1 = p01[None, :] * d0[:, None] + p11[None, :] * d1[:, None] + p12[None, :] * d2[:, None]
    pd2 = p02[None, :] * d0[:, None] + p12[None, :] * d1[:, None] + p22[None, :] * d2[:, None]
    pr0 = p00[None, :] * r0 + p01[None, :] * r1 + p02[None, :] * r2
    pr1 = p01[None, :] * r0 + p11[None, :] * r1 + p12[None, :] * r2
    pr2 = p02[None, :] * r0 + p12[None, :] * r1 + p22[None, :] * r2
    a = d0[:, None] * pd0 + d1[:, None] * pd1 + d2[:, None] * pd2
    b = r0 * pd0 + r1 * pd1 + r2 * pd2
    c = r0 * pr0 + r1 * pr1 + r2 * pr2
    return r0, r1, r2, pd0, pd1, pd2, pr0, pr1, pr2, a, b, c


# ------------------------------------------------------------------------------------------ kernels
@triton.jit
def _xray_fwd_kernel(out_ptr, origins_ptr, dirs_ptr, means_ptr, prec_ptr, inten_ptr, cutoff_sq_ptr,
                     tile_start_ptr, ids_ptr, V, R, C, N, num_tiles, tiles_c,
                     TR: tl.constexpr, TC: tl.constexpr, BLOCK_G: tl.constexpr, HAS_CUTOFF: tl.constexpr):
    pid = tl.program_id(0)
    b, o0, o1, o2, d0, d1, d2, valid, out_offs = _tile_rays(pid, origins_ptr, dirs_ptr, V, R, C, num_tiles,
                                                            tiles_c, TR, TC)
    cutoff_sq = tl.load(cutoff_sq_ptr)
    start = tl.load(tile_start_ptr + pid)
    end = tl.load(tile_start_ptr + pid + 1)
    acc = tl.zeros([TR * TC], dtype=out_ptr.dtype.element_ty)
    for j0 in range(start, end, BLOCK_G):
        _, gmask, m0, m1, m2, p00, p11, p22, p01, p02, p12, inten = _load_gaussians(
            j0, end, b.to(tl.int64) * N, ids_ptr, means_ptr, prec_ptr, inten_ptr, BLOCK_G)
        _, _, _, _, _, _, _, _, _, a, bb, c = _pair_terms(o0, o1, o2, d0, d1, d2, m0, m1, m2,
                                                          p00, p11, p22, p01, p02, p12)
        m = c - bb * bb / a
        value = inten[None, :] * tl.sqrt(2.0 * 3.141592653589793 / a) * tl.exp(-0.5 * m)
        keep = valid[:, None] & gmask[None, :]
        if HAS_CUTOFF:
            keep = keep & (m < cutoff_sq)
        acc += tl.sum(tl.where(keep, value, 0.0), axis=1)
    tl.store(out_ptr + out_offs, acc, mask=valid)


@triton.jit
def _xray_bwd_kernel(grad_out_ptr, grad_means_ptr, grad_prec_ptr, grad_inten_ptr, origins_ptr, dirs_ptr,
                     means_ptr, prec_ptr, inten_ptr, cutoff_sq_ptr, tile_start_ptr, ids_ptr,
                     V, R, C, N, num_tiles, tiles_c,
                     TR: tl.constexpr, TC: tl.constexpr, BLOCK_G: tl.constexpr, HAS_CUTOFF: tl.constexpr):
    pid = tl.program_id(0)
    b, o0, o1, o2, d0, d1, d2, valid, out_offs = _tile_rays(pid, origins_ptr, dirs_ptr, V, R, C, num_tiles,
                                                            tiles_c, TR, TC)
    up = tl.load(grad_out_ptr + out_offs, mask=valid, other=0.0)
    cutoff_sq = tl.load(cutoff_sq_ptr)
    start = tl.load(tile_start_ptr + pid)
    end = tl.load(tile_start_ptr + pid + 1)
    for j0 in range(start, end, BLOCK_G):
        gid, gmask, m0, m1, m2, p00, p11, p22, p01, p02, p12, inten = _load_gaussians(
            j0, end, b.to(tl.int64) * N, ids_ptr, means_ptr, prec_ptr, inten_ptr, BLOCK_G)
        r0, r1, r2, pd0, pd1, pd2, pr0, pr1, pr2, a, bb, c = _pair_terms(
            o0, o1, o2, d0, d1, d2, m0, m1, m2, p00, p11, p22, p01, p02, p12)
        m = c - bb * bb / a
        keep = valid[:, None] & gmask[None, :]
        if HAS_CUTOFF:
            keep = keep & (m < cutoff_sq)
        e = tl.where(keep, tl.sqrt(2.0 * 3.141592653589793 / a) * tl.exp(-0.5 * m), 0.0)
        ge = up[:, None] * e  # d loss / d intensity, per pair
        val = ge * inten[None, :]  # upstream times value
        ba = bb / a
        g_a = -0.5 * val * (1.0 / a + ba * ba)
        g_b = val * ba
        g_c = -0.5 * val
        hit = gmask & (tl.max(keep.to(tl.int32), axis=0) > 0)
        dd0 = d0[:, None]
        dd1 = d1[:, None]
        dd2 = d2[:, None]
        sum_p0 = tl.sum(g_a * dd0 * dd0 + g_b * dd0 * r0 + g_c * r0 * r0, axis=0)
        sum_p1 = tl.sum(g_a * dd1 * dd1 + g_b * dd1 * r1 + g_c * r1 * r1, axis=0)
        sum_p2 = tl.sum(g_a * dd2 * dd2 + g_b * dd2 * r2 + g_c * r2 * r2, axis=0)
        sum_p3 = tl.sum(2.0 * (g_a * dd0 * dd1 + g_c * r0 * r1) + g_b * (dd0 * r1 + dd1 * r0), axis=0)
        sum_p4 = tl.sum(2.0 * (g_a * dd0 * dd2 + g_c * r0 * r2) + g_b * (dd0 * r2 + dd2 * r0), axis=0)
        sum_p5 = tl.sum(2.0 * (g_a * dd1 * dd2 + g_c * r1 * r2) + g_b * (dd1 * r2 + dd2 * r1), axis=0)
        tl.atomic_add(grad_inten_ptr + gid, tl.sum(ge, axis=0), mask=hit, sem="relaxed")
        tl.atomic_add(grad_means_ptr + gid * 3 + 0, tl.sum(val * (pr0 - ba * pd0), axis=0), mask=hit,
                      sem="relaxed")
        tl.atomic_add(grad_means_ptr + gid * 3 + 1, tl.sum(val * (pr1 - ba * pd1), axis=0), mask=hit,
                      sem="relaxed")
        tl.atomic_add(grad_means_ptr + gid * 3 + 2, tl.sum(val * (pr2 - ba * pd2), axis=0), mask=hit,
                      sem="relaxed")
        tl.atomic_add(grad_prec_ptr + gid * 6 + 0, sum_p0, mask=hit, sem="relaxed")
        tl.atomic_add(grad_prec_ptr + gid * 6 + 1, sum_p1, mask=hit, sem="relaxed")
        tl.atomic_add(grad_prec_ptr + gid * 6 + 2, sum_p2, mask=hit, sem="relaxed")
        tl.atomic_add(grad_prec_ptr + gid * 6 + 3, sum_p3, mask=hit, sem="relaxed")
        tl.atomic_add(grad_prec_ptr + gid * 6 + 4, sum_p4, mask=hit, sem="relaxed")
        tl.atomic_add(grad_prec_ptr + gid * 6 + 5, sum_p5, mask=hit, sem="relaxed")


# ----------------------------------------------------------------------------------------- binning
def bin_tile_boxes(tile_box: Tensor, tiles_r: int, tiles_c: int) -> tuple[Tensor, Tensor]:
    """Sort (tile, Gaussian) pairs by tile for every slot (sample x view).

    Args:
        tile_box: ``[S, N, 4]`` integer inclusive tile ranges ``(row0, row1, col0, col1)`` per slot and
            Gaussian; empty where ``row0 > row1`` or ``col0 > col1``.
        tiles_r, tiles_c: tiles per detector column / row.

    Returns:
        ``tile_start [S * T + 1]`` int32 and ``ids [pairs]`` int32 (Gaussian index within its sample):
        tile ``t`` of slot ``s`` owns ``ids[tile_start[s*T + t] : tile_start[s*T + t + 1]]``, ascending.
    """
    s_count, n = tile_box.shape[:2]
    num_tiles = tiles_r * tiles_c
    device = tile_box.device
    box = tile_box.reshape(-1, 4).long()
    heights = (box[:, 1] - box[:, 0] + 1).clamp_min(0)
    widths = (box[:, 3] - box[:, 2] + 1).clamp_min(0)
    counts = heights * widths
    total = int(counts.sum())
    if total >= 2**31:
        raise ValueError(f"{total} (tile, Gaussian) pairs exceed int32 indexing; render fewer views at once")
    src = torch.repeat_interleave(torch.arange(s_count * n, device=device), counts)
    first = torch.cumsum(counts, 0) - counts
    k = torch.arange(total, device=device) - first[src]
    w = widths[src]
    tr = box[src, 0] + torch.div(k, w, rounding_mode="floor")
    tc = box[src, 2] + k % w
    key = torch.div(src, n, rounding_mode="floor") * num_tiles + tr * tiles_c + tc
    key_sorted, order = torch.sort(key, stable=True)
    ids = (src % n)[order].to(torch.int32)
    tile_start = torch.zeros(s_count * num_tiles + 1, dtype=torch.int64, device=device)
    tile_start[1:] = torch.cumsum(torch.bincount(key_sorted, minlength=s_count * num_tiles), 0)
    return tile_start.to(torch.int32), ids


# ----------------------------------------------------------------------------------------- launchers
class _Plan:
    """Sizes, tile lists and launch constants shared by the forward and backward launches."""

    def __init__(self, origins: Tensor, directions: Tensor, tile_box: Tensor, cutoff: float | None,
                 tile: tuple[int, int], batch: int, num_gaussians: int, dtype: torch.dtype, block_g: int):
        self.v, self.r, self.c = (int(s) for s in origins.shape[:3])
        self.tile = (int(tile[0]), int(tile[1]))
        self.tiles_r = -(-self.r // self.tile[0])
        self.tiles_c = -(-self.c // self.tile[1])
        self.batch, self.n = batch, num_gaussians
        self.origins = origins.contiguous()
        self.directions = directions.contiguous()
        boxes = tile_box.reshape(batch * self.v, num_gaussians, 4)
        self.tile_start, self.ids = bin_tile_boxes(boxes, self.tiles_r, self.tiles_c)
        if self.ids.numel() == 0:
            self.ids = torch.zeros(1, dtype=torch.int32, device=origins.device)
        self.has_cutoff = cutoff is not None
        self.cutoff_sq = torch.tensor([0.0 if cutoff is None else cutoff * cutoff], dtype=dtype,
                                      device=origins.device)
        self.block_g = block_g

    @property
    def num_programs(self) -> int:
        return self.batch * self.v * self.tiles_r * self.tiles_c

    def sizes(self) -> tuple:
        return (self.tile_start, self.ids, self.v, self.r, self.c, self.n, self.tiles_r * self.tiles_c,
                self.tiles_c)

    def constexprs(self) -> dict:
        return dict(TR=self.tile[0], TC=self.tile[1], BLOCK_G=self.block_g, HAS_CUTOFF=self.has_cutoff,
                    num_warps=_NUM_WARPS)


class _ProjectTiles(torch.autograd.Function):
    """``(means [B,N,3], prec [B,N,6], intensities [B,N]) -> [B,V,R,C]`` for fixed rays and tile lists."""

    @staticmethod
    def forward(ctx, means: Tensor, prec: Tensor, inten: Tensor, plan: _Plan) -> Tensor:
        means, prec, inten = means.contiguous(), prec.contiguous(), inten.contiguous()
        out = torch.empty(plan.batch, plan.v, plan.r, plan.c, dtype=means.dtype, device=means.device)
        if plan.num_programs > 0:
            _xray_fwd_kernel[(plan.num_programs,)](out, plan.origins, plan.directions, means, prec, inten,
                                                   plan.cutoff_sq, *plan.sizes(), **plan.constexprs())
        ctx.save_for_backward(means, prec, inten)
        ctx.plan = plan
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        means, prec, inten = ctx.saved_tensors
        plan = ctx.plan
        grad_means = torch.zeros_like(means)
        grad_prec = torch.zeros_like(prec)
        grad_inten = torch.zeros_like(inten)
        if plan.num_programs > 0:
            go = grad_out.to(means.dtype).contiguous()
            _xray_bwd_kernel[(plan.num_programs,)](go, grad_means, grad_prec, grad_inten, plan.origins,
                                                   plan.directions, means, prec, inten, plan.cutoff_sq,
                                                   *plan.sizes(), **plan.constexprs())
        return grad_means, grad_prec, grad_inten, None


# --------------------------------------------------------------------------------------- public API
def project_rays(means: Tensor, prec: Tensor, intensities: Tensor, origins: Tensor, directions: Tensor,
                 tile_box: Tensor, *, cutoff: float | None, tile: tuple[int, int] = (16, 16),
                 block_g: int = DEFAULT_BLOCK_G) -> Tensor:
    """Line integrals of Gaussians along detector rays, differentiable w.r.t. the first three inputs.

    Args:
        means: ``[B, N, 3]`` centres (mm), float32 or float64, CUDA (or CPU under ``TRITON_INTERPRET=1``).
        prec: ``[B, N, 6]`` packed precision ``(P00, P11, P22, P01, P02, P12)`` (1/mm^2).
        intensities: ``[B, N]`` attenuation at the centres (1/mm).
        origins, directions: ``[V, R, C, 3]`` ray points and UNIT directions (mm), same dtype/device.
        tile_box: ``[B, V, N, 4]`` int inclusive tile ranges ``(row0, row1, col0, col1)`` of tiles of
            ``tile`` pixels that may hold rays reaching each Gaussian (conservative; empty: first > last).
        cutoff: strict Mahalanobis radius, or ``None``.
        tile: detector tile ``(rows, cols)``, powers of two, the one ``tile_box`` was computed for.
        block_g: Gaussians per loop step (power of two).

    Returns:
        ``[B, V, R, C]`` line integrals in the means' dtype.
    """
    b, n = intensities.shape
    for name, t, shape in (("means", means, (b, n, 3)), ("prec", prec, (b, n, 6)),
                           ("tile_box", tile_box, (b, origins.shape[0], n, 4))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)}, got {tuple(t.shape)}")
    if origins.ndim != 4 or origins.shape[-1] != 3 or origins.shape != directions.shape:
        raise ValueError(f"origins and directions must both be [V, R, C, 3], got {tuple(origins.shape)} and "
                         f"{tuple(directions.shape)}")
    if means.dtype not in (torch.float32, torch.float64) or origins.dtype != means.dtype:
        raise ValueError(f"means and rays must share a float32/float64 dtype, got {means.dtype} and "
                         f"{origins.dtype}")
    plan = _Plan(origins, directions, tile_box, cutoff, tile, b, n, means.dtype, block_g)
    return _ProjectTiles.apply(means, prec, intensities, plan)
