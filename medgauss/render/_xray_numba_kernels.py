"""numba CPU kernels for the X-ray projection of Gaussians (float64 arithmetic throughout).

Parallel without races:

* binning: one thread per (sample, view) builds that view's tile lists (counting sort);
* forward: one thread per (sample, view, tile) owns the tile's pixels and sums the Gaussians
  binned to it, in ascending Gaussian order (deterministic);
* backward: one thread per (sample, Gaussian) owns that Gaussian's gradient and reads the
  upstream gradient of every pixel in its footprints.

Within a footprint box only the columns inside the outline conic are visited, row by row.

Per pair (ray ``o + t d``, Gaussian ``mu, P, I``), with ``r = o - mu``: ``a = d.Pd``, ``b = r.Pd``,
``c = r.Pr``, ``m = c - b^2/a`` and
``value = I sqrt(2 pi / a) exp(-m / 2)`` where ``m < cutoff^2``. Packed precision order:
``(P00, P11, P22, P01, P02, P12)``. Terms that are constant over a view (the source for cone
beam, the direction for parallel beam) are computed once per (view, Gaussian).
"""

from __future__ import annotations

import math

import numba
import numpy as np

_SQRT_2PI = math.sqrt(2.0 * math.pi)
_SPAN_MARGIN_PX = 1e-2  # as medgauss.render.xray's box margin: rounding never drops a contributing ray


# How the rays of a view vary (chosen per view by the caller): only directions (cone beam, one
# source), only origins (parallel beam, one direction), or both.
RAYS_GENERAL, RAYS_SHARED_ORIGIN, RAYS_SHARED_DIRECTION = 0, 1, 2


@numba.njit(cache=True, inline="always")
def _sym_mul(p, x, y, z):
    """``P (x, y, z)`` for the packed symmetric ``p = (P00, P11, P22, P01, P02, P12)``."""
    return (p[0] * x + p[3] * y + p[4] * z,
            p[3] * x + p[1] * y + p[5] * z,
            p[4] * x + p[5] * y + p[2] * z)


@numba.njit(cache=True, inline="always")
def _view_terms(origins, directions, vi, mu, p):
    """Per (view, Gaussian) constants from the view's first ray: ``r0 = o0 - mu``, ``P r0``,
    ``c0 = r0.P r0``, ``d0``, ``P d0``, ``a0 = d0.P d0``."""
    rx = origins[vi, 0, 0, 0] - mu[0]
    ry = origins[vi, 0, 0, 1] - mu[1]
    rz = origins[vi, 0, 0, 2] - mu[2]
    prx, pry, prz = _sym_mul(p, rx, ry, rz)
    dx, dy, dz = directions[vi, 0, 0, 0], directions[vi, 0, 0, 1], directions[vi, 0, 0, 2]
    pdx, pdy, pdz = _sym_mul(p, dx, dy, dz)
    return (rx, ry, rz, prx, pry, prz, rx * prx + ry * pry + rz * prz,
            dx, dy, dz, pdx, pdy, pdz, dx * pdx + dy * pdy + dz * pdz)


@numba.njit(cache=True, inline="always")
def _pixel_terms(mode, origins, directions, vi, row, col, mu, p, k):
    """``r = o - mu``, ``d``, ``P d``, ``P r`` and ``a = d.Pd``, ``b = r.Pd``, ``c = r.Pr`` of one ray.

    ``k`` are the :func:`_view_terms`; with a shared origin (direction) the origin (direction)
    terms are taken from them instead of being recomputed. float64 keeps ``c - b^2/a`` accurate
    without moving ``o`` along the ray (``|o - mu|`` of a metre, Gaussians of a millimetre).
    """
    if mode == RAYS_SHARED_ORIGIN:
        rx, ry, rz, prx, pry, prz, c = k[0], k[1], k[2], k[3], k[4], k[5], k[6]
    else:
        rx = origins[vi, row, col, 0] - mu[0]
        ry = origins[vi, row, col, 1] - mu[1]
        rz = origins[vi, row, col, 2] - mu[2]
        prx, pry, prz = _sym_mul(p, rx, ry, rz)
        c = rx * prx + ry * pry + rz * prz
    if mode == RAYS_SHARED_DIRECTION:
        dx, dy, dz, pdx, pdy, pdz, a = k[7], k[8], k[9], k[10], k[11], k[12], k[13]
    else:
        dx, dy, dz = directions[vi, row, col, 0], directions[vi, row, col, 1], directions[vi, row, col, 2]
        pdx, pdy, pdz = _sym_mul(p, dx, dy, dz)
        a = dx * pdx + dy * pdy + dz * pdz
    b = rx * pdx + ry * pdy + rz * pdz
    return rx, ry, rz, dx, dy, dz, pdx, pdy, pdz, prx, pry, prz, a, b, c


@numba.njit(cache=True, inline="always")
def _row_span(conic, row, c_lo, c_hi):
    """Columns ``[first, last]`` of ``row`` inside the footprint conic, clipped to ``[c_lo, c_hi]``.

    ``conic`` = ``(C00, C01, C02, C11, C12, C22)`` with inside ``<=> q(col, row) >= 0`` (see
    :func:`medgauss.render.xray.footprints`); ``C00 >= 0`` marks an unbounded outline (whole row).
    """
    a = conic[0]
    if a >= 0.0:
        return c_lo, c_hi
    y = float(row)
    half_b = conic[1] * y + conic[2]
    c = (conic[3] * y + 2.0 * conic[4]) * y + conic[5]
    disc = half_b * half_b - a * c
    if disc < 0.0:
        return 1, 0
    root = math.sqrt(disc)
    lo = (-half_b + root) / a  # a < 0: this is the smaller root
    hi = (-half_b - root) / a
    margin = _SPAN_MARGIN_PX + 1e-9 * max(abs(lo), abs(hi))
    lo = max(lo - margin, c_lo - 1.0)
    hi = min(hi + margin, c_hi + 1.0)
    return max(c_lo, int(math.ceil(lo))), min(c_hi, int(math.floor(hi)))


@numba.njit(parallel=True, cache=True)
def bin_tiles(tile_box, n_tile_rows, n_tile_cols):
    """Counting sort of (tile, Gaussian) pairs per (sample, view).

    Args:
        tile_box: ``[S, N, 4]`` int32 inclusive tile ranges (row0, row1, col0, col1) per
            (sample*view ``S``, Gaussian); empty when row0 > row1 or col0 > col1.

    Returns:
        ``offsets [S * T + 1]`` int64 and ``ids [pairs]`` int32: the Gaussians of tile ``t`` of
        slot ``s`` are ``ids[offsets[s*T + t] : offsets[s*T + t + 1]]``, in ascending order.
    """
    s_count, n = tile_box.shape[0], tile_box.shape[1]
    t_count = n_tile_rows * n_tile_cols
    counts = np.zeros((s_count, t_count), dtype=np.int64)
    for s in numba.prange(s_count):
        for g in range(n):
            for tr in range(tile_box[s, g, 0], tile_box[s, g, 1] + 1):
                for tc in range(tile_box[s, g, 2], tile_box[s, g, 3] + 1):
                    counts[s, tr * n_tile_cols + tc] += 1
    offsets = np.zeros(s_count * t_count + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(counts.ravel())
    ids = np.empty(offsets[-1], dtype=np.int32)
    for s in numba.prange(s_count):
        cursor = offsets[s * t_count:(s + 1) * t_count].copy()
        for g in range(n):
            for tr in range(tile_box[s, g, 0], tile_box[s, g, 1] + 1):
                for tc in range(tile_box[s, g, 2], tile_box[s, g, 3] + 1):
                    k = tr * n_tile_cols + tc
                    ids[cursor[k]] = g
                    cursor[k] += 1
    return offsets, ids


@numba.njit(parallel=True, cache=True)
def forward(origins, directions, ray_modes, means, prec, intens, pixel_box, conics, offsets, ids, tile_rows,
            tile_cols, n_tile_cols, cutoff_sq, out):
    """Accumulate line integrals into ``out [B, V, R, C]`` (float64, zero on entry).

    ``origins``/``directions`` ``[V, R, C, 3]``, ``ray_modes [V]`` (``RAYS_*``); ``means [B, N, 3]``,
    ``prec [B, N, 6]``, ``intens [B, N]``; ``pixel_box [B, V, N, 4]`` int32 inclusive footprint boxes
    and ``conics [B, V, N, 6]`` footprint outlines; ``offsets``/``ids`` from :func:`bin_tiles` over
    ``B * V`` slots.
    """
    n_b, n_v, n_r, n_c = out.shape
    t_count = (offsets.shape[0] - 1) // (n_b * n_v)
    for job in numba.prange(n_b * n_v * t_count):
        slot = job // t_count
        tile = job - slot * t_count
        bi = slot // n_v
        vi = slot - bi * n_v
        mode = ray_modes[vi]
        row0 = (tile // n_tile_cols) * tile_rows
        col0 = (tile % n_tile_cols) * tile_cols
        row1 = min(row0 + tile_rows, n_r) - 1
        col1 = min(col0 + tile_cols, n_c) - 1
        for k in range(offsets[job], offsets[job + 1]):
            g = ids[k]
            r_lo = max(row0, pixel_box[bi, vi, g, 0])
            r_hi = min(row1, pixel_box[bi, vi, g, 1])
            c_lo = max(col0, pixel_box[bi, vi, g, 2])
            c_hi = min(col1, pixel_box[bi, vi, g, 3])
            mu = means[bi, g]
            p = prec[bi, g]
            consts = _view_terms(origins, directions, vi, mu, p)
            peak = intens[bi, g] * _SQRT_2PI
            conic = conics[bi, vi, g]
            for r in range(r_lo, r_hi + 1):
                first, last = _row_span(conic, r, c_lo, c_hi)
                for c in range(first, last + 1):
                    terms = _pixel_terms(mode, origins, directions, vi, r, c, mu, p, consts)
                    a, b, cc = terms[12], terms[13], terms[14]
                    m = cc - b * b / a
                    if m < cutoff_sq:
                        out[bi, vi, r, c] += peak / math.sqrt(a) * math.exp(-0.5 * m)


@numba.njit(parallel=True, cache=True)
def backward(origins, directions, ray_modes, means, prec, intens, pixel_box, conics, cutoff_sq, grad_out,
             grad_means, grad_prec, grad_intens):
    """Gradients of ``sum(grad_out * out)`` w.r.t. means ``[B,N,3]``, packed precision ``[B,N,6]``
    and intensities ``[B,N]`` (float64 outputs, overwritten). One thread per (sample, Gaussian).

    With ``e = sqrt(2 pi / a) exp(-m/2)``, ``v = I e`` and upstream ``g``:
    ``dv/dI = e``; ``dv/da = -v/2 (1/a + b^2/a^2)``; ``dv/db = v b / a``; ``dv/dc = -v/2``;
    ``a, b, c`` are bilinear in ``P`` (``d d^T``, sym(``d r^T``), ``r r^T``) and
    ``dv/dmu = v P (r - (b/a) d)``. (The value is unchanged when ``r`` moves along ``d``, so these
    hold for any point ``o`` of the ray.)
    """
    n_b, n_v, n_r, n_c = grad_out.shape
    n_g = means.shape[1]
    for job in numba.prange(n_b * n_g):
        bi = job // n_g
        g = job - bi * n_g
        mu = means[bi, g]
        p = prec[bi, g]
        peak = intens[bi, g]
        gi = 0.0
        gm0 = 0.0
        gm1 = 0.0
        gm2 = 0.0
        gp0 = 0.0
        gp1 = 0.0
        gp2 = 0.0
        gp3 = 0.0
        gp4 = 0.0
        gp5 = 0.0
        for vi in range(n_v):
            mode = ray_modes[vi]
            consts = _view_terms(origins, directions, vi, mu, p)
            conic = conics[bi, vi, g]
            for r in range(pixel_box[bi, vi, g, 0], pixel_box[bi, vi, g, 1] + 1):
                first, last = _row_span(conic, r, pixel_box[bi, vi, g, 2], pixel_box[bi, vi, g, 3])
                for c in range(first, last + 1):
                    up = grad_out[bi, vi, r, c]
                    if up == 0.0:
                        continue
                    rx, ry, rz, dx, dy, dz, pdx, pdy, pdz, prx, pry, prz, a, b, cc = _pixel_terms(
                        mode, origins, directions, vi, r, c, mu, p, consts)
                    m = cc - b * b / a
                    if m >= cutoff_sq:
                        continue
                    e = _SQRT_2PI / math.sqrt(a) * math.exp(-0.5 * m)
                    gi += up * e
                    val = up * peak * e
                    ba = b / a
                    g_a = -0.5 * val * (1.0 / a + ba * ba)
                    g_b = val * ba
                    g_c = -0.5 * val
                    gp0 += g_a * dx * dx + g_b * dx * rx + g_c * rx * rx
                    gp1 += g_a * dy * dy + g_b * dy * ry + g_c * ry * ry
                    gp2 += g_a * dz * dz + g_b * dz * rz + g_c * rz * rz
                    gp3 += 2.0 * (g_a * dx * dy + g_c * rx * ry) + g_b * (dx * ry + dy * rx)
                    gp4 += 2.0 * (g_a * dx * dz + g_c * rx * rz) + g_b * (dx * rz + dz * rx)
                    gp5 += 2.0 * (g_a * dy * dz + g_c * ry * rz) + g_b * (dy * rz + dz * ry)
                    gm0 += val * (prx - ba * pdx)
                    gm1 += val * (pry - ba * pdy)
                    gm2 += val * (prz - ba * pdz)
        grad_intens[bi, g] = gi
        grad_means[bi, g, 0] = gm0
        grad_means[bi, g, 1] = gm1
        grad_means[bi, g, 2] = gm2
        grad_prec[bi, g, 0] = gp0
        grad_prec[bi, g, 1] = gp1
        grad_prec[bi, g, 2] = gp2
        grad_prec[bi, g, 3] = gp3
        grad_prec[bi, g, 4] = gp4
        grad_prec[bi, g, 5] = gp5
