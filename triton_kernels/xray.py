"""Tile-based Triton kernels for the X-ray projection of Gaussians (exact per-ray line integrals).

For a ray ``o + t d`` (unit ``d``) and a Gaussian ``(mu, P = L^T L, I)`` (packed lower-triangular
factor ``(L00, L11, L22, L10, L20, L21)``), with ``r`` = ``o - mu`` moved
along the ray to the point closest to ``mu`` (keeps float32 accurate when ``|o - mu|`` is a metre and
the Gaussian a millimetre)::

    a = |L d|^2,  b = (L r).(L d),  m = |L r - (b/a) L d|^2 (= r.P.r - b^2/a),
    value = I sqrt(2 pi / a) exp(-m / 2)

(sums of squares: never negative, accurate in float32 however anisotropic the Gaussian)

counted only where ``m < cutoff^2`` (strictly; ``cutoff=None`` counts all).

Work decomposition:

* the caller gives every Gaussian's conservative tile box per (sample, view); :func:`bin_tile_boxes`
  lists each Gaussian under every tile of its box and sorts the list by tile (stable, so each tile
  sees its Gaussians in ascending order), giving each tile a contiguous range;
* forward: one program per (sample, view, tile) holds the tile's ``TR x TC`` rays as a block, walks
  its Gaussians ``BLOCK_G`` at a time as a ``[rays x BLOCK_G]`` block and writes the tile once;
* backward: the same programs reduce each Gaussian's contributions over the tile (``tl.sum``) to 10
  numbers (3 mean, 6 factor, 1 intensity) and add them with relaxed atomics, skipping Gaussians
  that reach no ray of the tile. The gradient is taken with respect to ``L`` itself,
  ``dv/dL_ij = -v (w_i (r_j - (b/a) d_j) + (L d)_i d_j / a)`` with ``w = L r - (b/a) L d``: going
  through ``P`` would lose the thin axis of a very anisotropic Gaussian to cancellation in float32.

This module imports only torch and triton.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["project_rays", "bin_tile_boxes", "default_block_g", "NUM_WARPS"]

# Warps per program, and Gaussians per loop step by dtype, chosen from ``cuobjdump --dump-resource-usage``
# of sm_90 builds of the 16x16-ray tile (tests/render/test_project_backends.py compiles every variant):
# no variant spills. 4 warps x 8 Gaussians (the earlier choice) spilled in every variant, up to 6.6 kB of
# stack per thread in the float64 backward; 8 warps fit float32 x 8 Gaussians in 142-225 registers and
# float64 x 4 in 153-228.
NUM_WARPS = 8
_BLOCK_G = {torch.float32: 8, torch.float64: 4}


def default_block_g(dtype: torch.dtype) -> int:
    """Gaussians evaluated together per loop step for ``dtype`` (8 for float32, 4 for float64)."""
    return _BLOCK_G.get(dtype, 8)
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
def _load_gaussians(j0, end, base, ids_ptr, means_ptr, fac_ptr, inten_ptr, BLOCK_G: tl.constexpr):
    """Flat ids ``[BLOCK_G]``, mask and parameters (mean, factor, intensity) of list entries
    ``j0 .. j0 + BLOCK_G``."""
    jj = j0 + tl.arange(0, BLOCK_G)
    gmask = jj < end
    gid = base + tl.load(ids_ptr + jj, mask=gmask, other=0).to(tl.int64)
    m0 = tl.load(means_ptr + gid * 3 + 0, mask=gmask, other=0.0)
    m1 = tl.load(means_ptr + gid * 3 + 1, mask=gmask, other=0.0)
    m2 = tl.load(means_ptr + gid * 3 + 2, mask=gmask, other=0.0)
    # padding lanes get the identity factor (a = 1, never a division by zero) and zero intensity
    l00 = tl.load(fac_ptr + gid * 6 + 0, mask=gmask, other=1.0)
    l11 = tl.load(fac_ptr + gid * 6 + 1, mask=gmask, other=1.0)
    l22 = tl.load(fac_ptr + gid * 6 + 2, mask=gmask, other=1.0)
    l10 = tl.load(fac_ptr + gid * 6 + 3, mask=gmask, other=0.0)
    l20 = tl.load(fac_ptr + gid * 6 + 4, mask=gmask, other=0.0)
    l21 = tl.load(fac_ptr + gid * 6 + 5, mask=gmask, other=0.0)
    inten = tl.load(inten_ptr + gid, mask=gmask, other=0.0)
    return gid, gmask, m0, m1, m2, l00, l11, l22, l10, l20, l21, inten


@triton.jit
def _pair_terms(o0, o1, o2, d0, d1, d2, m0, m1, m2, l00, l11, l22, l10, l20, l21):
    """Per (ray, Gaussian) on the ``[rays, BLOCK_G]`` block: perpendicular offset ``r``, ``L d``,
    ``w = L r - (b/a) L d``, ``a = |L d|^2``, ``b / a`` and ``m = |w|^2``."""
    r0 = o0[:, None] - m0[None, :]
    r1 = o1[:, None] - m1[None, :]
    r2 = o2[:, None] - m2[None, :]
    t = r0 * d0[:, None] + r1 * d1[:, None] + r2 * d2[:, None]
    r0 = r0 - t * d0[:, None]
    r1 = r1 - t * d1[:, None]
    r2 = r2 - t * d2[:, None]
    ld0 = l00[None, :] * d0[:, None]
    ld1 = l10[None, :] * d0[:, None] + l11[None, :] * d1[:, None]
    ld2 = l20[None, :] * d0[:, None] + l21[None, :] * d1[:, None] + l22[None, :] * d2[:, None]
    lr0 = l00[None, :] * r0
    lr1 = l10[None, :] * r0 + l11[None, :] * r1
    lr2 = l20[None, :] * r0 + l21[None, :] * r1 + l22[None, :] * r2
    a = ld0 * ld0 + ld1 * ld1 + ld2 * ld2
    ba = (lr0 * ld0 + lr1 * ld1 + lr2 * ld2) / a
    w0 = lr0 - ba * ld0
    w1 = lr1 - ba * ld1
    w2 = lr2 - ba * ld2
    return r0, r1, r2, ld0, ld1, ld2, w0, w1, w2, a, ba, w0 * w0 + w1 * w1 + w2 * w2


# ------------------------------------------------------------------------------------------ kernels
@triton.jit
def _xray_fwd_kernel(out_ptr, origins_ptr, dirs_ptr, means_ptr, fac_ptr, inten_ptr, cutoff_sq_ptr,
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
        _, gmask, m0, m1, m2, l00, l11, l22, l10, l20, l21, inten = _load_gaussians(
            j0, end, b.to(tl.int64) * N, ids_ptr, means_ptr, fac_ptr, inten_ptr, BLOCK_G)
        _, _, _, _, _, _, _, _, _, a, _, m = _pair_terms(o0, o1, o2, d0, d1, d2, m0, m1, m2,
                                                         l00, l11, l22, l10, l20, l21)
        value = inten[None, :] * tl.sqrt(2.0 * 3.141592653589793 / a) * tl.exp(-0.5 * m)
        keep = valid[:, None] & gmask[None, :]
        if HAS_CUTOFF:
            keep = keep & (m < cutoff_sq)
        acc += tl.sum(tl.where(keep, value, 0.0), axis=1)
    tl.store(out_ptr + out_offs, acc, mask=valid)


@triton.jit
def _xray_bwd_kernel(grad_out_ptr, grad_means_ptr, grad_fac_ptr, grad_inten_ptr, origins_ptr, dirs_ptr,
                     means_ptr, fac_ptr, inten_ptr, cutoff_sq_ptr, tile_start_ptr, ids_ptr,
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
        gid, gmask, m0, m1, m2, l00, l11, l22, l10, l20, l21, inten = _load_gaussians(
            j0, end, b.to(tl.int64) * N, ids_ptr, means_ptr, fac_ptr, inten_ptr, BLOCK_G)
        r0, r1, r2, ld0, ld1, ld2, w0, w1, w2, a, ba, m = _pair_terms(
            o0, o1, o2, d0, d1, d2, m0, m1, m2, l00, l11, l22, l10, l20, l21)
        keep = valid[:, None] & gmask[None, :]
        if HAS_CUTOFF:
            keep = keep & (m < cutoff_sq)
        e = tl.where(keep, tl.sqrt(2.0 * 3.141592653589793 / a) * tl.exp(-0.5 * m), 0.0)
        ge = up[:, None] * e  # d loss / d intensity, per pair
        val = ge * inten[None, :]  # upstream times value
        hit = gmask & (tl.max(keep.to(tl.int32), axis=0) > 0)
        # w is orthogonal to L d in exact arithmetic; for a thin Gaussian (|L| ~ 1 / thinnest scale) its
        # rounding along L d is amplified by L^T below, so remove that component first.
        wd = (w0 * ld0 + w1 * ld1 + w2 * ld2) / a
        w0 = w0 - wd * ld0
        w1 = w1 - wd * ld1
        w2 = w2 - wd * ld2
        # dv/dL_ij = -v (w_i u_j + (L d)_i d_j / a) with u = r - (b/a) d
        u0 = r0 - ba * d0[:, None]
        u1 = r1 - ba * d1[:, None]
        u2 = r2 - ba * d2[:, None]
        vw0 = val * w0
        vw1 = val * w1
        vw2 = val * w2
        va0 = val * ld0 / a
        va1 = val * ld1 / a
        va2 = val * ld2 / a
        dd0 = d0[:, None]
        dd1 = d1[:, None]
        dd2 = d2[:, None]
        sum_l00 = -tl.sum(vw0 * u0 + va0 * dd0, axis=0)
        sum_l11 = -tl.sum(vw1 * u1 + va1 * dd1, axis=0)
        sum_l22 = -tl.sum(vw2 * u2 + va2 * dd2, axis=0)
        sum_l10 = -tl.sum(vw1 * u0 + va1 * dd0, axis=0)
        sum_l20 = -tl.sum(vw2 * u0 + va2 * dd0, axis=0)
        sum_l21 = -tl.sum(vw2 * u1 + va2 * dd1, axis=0)
        tl.atomic_add(grad_inten_ptr + gid, tl.sum(ge, axis=0), mask=hit, sem="relaxed")
        # dv/dmu = v P (r - (b/a) d) = v L^T w, summed over the tile's rays
        sw0 = tl.sum(vw0, axis=0)
        sw1 = tl.sum(vw1, axis=0)
        sw2 = tl.sum(vw2, axis=0)
        tl.atomic_add(grad_means_ptr + gid * 3 + 0, l00 * sw0 + l10 * sw1 + l20 * sw2, mask=hit, sem="relaxed")
        tl.atomic_add(grad_means_ptr + gid * 3 + 1, l11 * sw1 + l21 * sw2, mask=hit, sem="relaxed")
        tl.atomic_add(grad_means_ptr + gid * 3 + 2, l22 * sw2, mask=hit, sem="relaxed")
        tl.atomic_add(grad_fac_ptr + gid * 6 + 0, sum_l00, mask=hit, sem="relaxed")
        tl.atomic_add(grad_fac_ptr + gid * 6 + 1, sum_l11, mask=hit, sem="relaxed")
        tl.atomic_add(grad_fac_ptr + gid * 6 + 2, sum_l22, mask=hit, sem="relaxed")
        tl.atomic_add(grad_fac_ptr + gid * 6 + 3, sum_l10, mask=hit, sem="relaxed")
        tl.atomic_add(grad_fac_ptr + gid * 6 + 4, sum_l20, mask=hit, sem="relaxed")
        tl.atomic_add(grad_fac_ptr + gid * 6 + 5, sum_l21, mask=hit, sem="relaxed")


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
                    num_warps=NUM_WARPS)


class _ProjectTiles(torch.autograd.Function):
    """``(means [B,N,3], factor [B,N,6], intensities [B,N]) -> [B,V,R,C]`` for fixed rays and tile lists."""

    @staticmethod
    def forward(ctx, means: Tensor, fac: Tensor, inten: Tensor, plan: _Plan) -> Tensor:
        means, fac, inten = means.contiguous(), fac.contiguous(), inten.contiguous()
        out = torch.empty(plan.batch, plan.v, plan.r, plan.c, dtype=means.dtype, device=means.device)
        if plan.num_programs > 0:
            _xray_fwd_kernel[(plan.num_programs,)](out, plan.origins, plan.directions, means, fac, inten,
                                                   plan.cutoff_sq, *plan.sizes(), **plan.constexprs())
        ctx.save_for_backward(means, fac, inten)
        ctx.plan = plan
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        means, fac, inten = ctx.saved_tensors
        plan = ctx.plan
        grad_means = torch.zeros_like(means)
        grad_fac = torch.zeros_like(fac)
        grad_inten = torch.zeros_like(inten)
        if plan.num_programs > 0:
            go = grad_out.to(means.dtype).contiguous()
            _xray_bwd_kernel[(plan.num_programs,)](go, grad_means, grad_fac, grad_inten, plan.origins,
                                                   plan.directions, means, fac, inten, plan.cutoff_sq,
                                                   *plan.sizes(), **plan.constexprs())
        return grad_means, grad_fac, grad_inten, None


# --------------------------------------------------------------------------------------- public API
def project_rays(means: Tensor, factor: Tensor, intensities: Tensor, origins: Tensor, directions: Tensor,
                 tile_box: Tensor, *, cutoff: float | None, tile: tuple[int, int] = (16, 16),
                 block_g: int | None = None) -> Tensor:
    """Line integrals of Gaussians along detector rays, differentiable w.r.t. the first three inputs.

    Args:
        means: ``[B, N, 3]`` centres (mm), float32 or float64, CUDA (or CPU under ``TRITON_INTERPRET=1``).
        factor: ``[B, N, 6]`` packed lower-triangular precision factor ``(L00, L11, L22, L10, L20, L21)``,
            ``P = L^T L`` (1/mm).
        intensities: ``[B, N]`` attenuation at the centres (1/mm).
        origins, directions: ``[V, R, C, 3]`` ray points and UNIT directions (mm), same dtype/device.
        tile_box: ``[B, V, N, 4]`` int inclusive tile ranges ``(row0, row1, col0, col1)`` of tiles of
            ``tile`` pixels that may hold rays reaching each Gaussian (conservative; empty: first > last).
        cutoff: strict Mahalanobis radius, or ``None``.
        tile: detector tile ``(rows, cols)``, powers of two, the one ``tile_box`` was computed for.
        block_g: Gaussians per loop step (power of two; default :func:`default_block_g`).

    Returns:
        ``[B, V, R, C]`` line integrals in the means' dtype.
    """
    b, n = intensities.shape
    for name, t, shape in (("means", means, (b, n, 3)), ("factor", factor, (b, n, 6)),
                           ("tile_box", tile_box, (b, origins.shape[0], n, 4))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)}, got {tuple(t.shape)}")
    if origins.ndim != 4 or origins.shape[-1] != 3 or origins.shape != directions.shape:
        raise ValueError(f"origins and directions must both be [V, R, C, 3], got {tuple(origins.shape)} and "
                         f"{tuple(directions.shape)}")
    if means.dtype not in (torch.float32, torch.float64) or origins.dtype != means.dtype \
            or factor.dtype != means.dtype:
        raise ValueError(f"means, factor and rays must share a float32/float64 dtype, got {means.dtype}, "
                         f"{factor.dtype} and {origins.dtype}")
    block_g = default_block_g(means.dtype) if block_g is None else int(block_g)
    if block_g <= 0 or block_g & (block_g - 1):
        raise ValueError(f"block_g must be a power of two, got {block_g}")
    plan = _Plan(origins, directions, tile_box, cutoff, tile, b, n, means.dtype, block_g)
    return _ProjectTiles.apply(means, factor, intensities, plan)
