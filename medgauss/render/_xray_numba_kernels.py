"""numba CPU kernels for the X-ray projection of Gaussians (float64 arithmetic throughout).

Parallel without races:

* binning: one thread per (sample, view) builds that view's tile lists (counting sort);
* forward: one thread per (sample, view, tile) owns the tile's pixels and sums the Gaussians
  binned to it, in ascending Gaussian order (deterministic);
* backward: one thread per (sample, Gaussian) owns that Gaussian's gradient and reads the
  upstream gradient of every pixel in its footprint boxes.

Per pair (ray ``o + t d``, Gaussian ``mu, P, I``), with ``r`` = ``o - mu`` moved along the ray to
the point closest to ``mu``: ``a = d.Pd``, ``b = r.Pd``, ``c = r.Pr``, ``m = c - b^2/a`` and
``value = I sqrt(2 pi / a) exp(-m / 2)`` where ``m < cutoff^2``. Packed precision order:
``(P00, P11, P22, P01, P02, P12)``.
"""

from __future__ import annotations

import math

import numba
import numpy as np

_SQRT_2PI = math.sqrt(2.0 * math.pi)


@numba.njit(cache=True, inline="always")
def _pair_terms(ox, oy, oz, dx, dy, dz, mx, my, mz, p0, p1, p2, p3, p4, p5):
    """Perpendicular offset ``r``, ``P d``, ``P r`` and ``a, b, c`` for one (ray, Gaussian) pair."""
    rx = ox - mx
    ry = oy - my
    rz = oz - mz
    t = rx * dx + ry * dy + rz * dz
    rx -= t * dx
    ry -= t * dy
    rz -= t * dz
    pdx = p0 * dx + p3 * dy + p4 * dz
    pdy = p3 * dx + p1 * dy + p5 * dz
    pdz = p4 * dx + p5 * dy + p2 * dz
    prx = p0 * rx + p3 * ry + p4 * rz
    pry = p3 * rx + p1 * ry + p5 * rz
    prz = p4 * rx + p5 * ry + p2 * rz
    a = dx * pdx + dy * pdy + dz * pdz
    b = rx * pdx + ry * pdy + rz * pdz
    c = rx * prx + ry * pry + rz * prz
    return rx, ry, rz, pdx, pdy, pdz, prx, pry, prz, a, b, c


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
def forward(origins, directions, means, prec, intens, pixel_box, offsets, ids, tile_rows, tile_cols,
            n_tile_cols, cutoff_sq, out):
    """Accumulate line integrals into ``out [B, V, R, C]`` (float64, zero on entry).

    ``origins``/``directions`` ``[V, R, C, 3]``; ``means [B, N, 3]``, ``prec [B, N, 6]``,
    ``intens [B, N]``; ``pixel_box [B, V, N, 4]`` int32 inclusive footprints; ``offsets``/``ids``
    from :func:`bin_tiles` over ``B * V`` slots.
    """
    n_b, n_v, n_r, n_c = out.shape
    t_count = (offsets.shape[0] - 1) // (n_b * n_v)
    for job in numba.prange(n_b * n_v * t_count):
        slot = job // t_count
        tile = job - slot * t_count
        bi = slot // n_v
        vi = slot - bi * n_v
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
            mx, my, mz = means[bi, g, 0], means[bi, g, 1], means[bi, g, 2]
            p0, p1, p2 = prec[bi, g, 0], prec[bi, g, 1], prec[bi, g, 2]
            p3, p4, p5 = prec[bi, g, 3], prec[bi, g, 4], prec[bi, g, 5]
            peak = intens[bi, g] * _SQRT_2PI
            for r in range(r_lo, r_hi + 1):
                for c in range(c_lo, c_hi + 1):
                    terms = _pair_terms(origins[vi, r, c, 0], origins[vi, r, c, 1], origins[vi, r, c, 2],
                                        directions[vi, r, c, 0], directions[vi, r, c, 1],
                                        directions[vi, r, c, 2], mx, my, mz, p0, p1, p2, p3, p4, p5)
                    a, b, cc = terms[9], terms[10], terms[11]
                    m = cc - b * b / a
                    if m < cutoff_sq:
                        out[bi, vi, r, c] += peak / math.sqrt(a) * math.exp(-0.5 * m)


@numba.njit(parallel=True, cache=True)
def backward(origins, directions, means, prec, intens, pixel_box, cutoff_sq, grad_out,
             grad_means, grad_prec, grad_intens):
    """Gradients of ``sum(grad_out * out)`` w.r.t. means ``[B,N,3]``, packed precision ``[B,N,6]``
    and intensities ``[B,N]`` (float64 outputs, overwritten). One thread per (sample, Gaussian).

    With ``e = sqrt(2 pi / a) exp(-m/2)``, ``v = I e`` and upstream ``g``:
    ``dv/dI = e``; ``dv/da = -v/2 (1/a + b^2/a^2)``; ``dv/db = v b / a``; ``dv/dc = -v/2``;
    ``a, b, c`` are bilinear in ``P`` (``d d^T``, sym(``d r^T``), ``r r^T``) and
    ``dv/dmu = v P (r - (b/a) d)``.
    """
    n_b, n_v, n_r, n_c = grad_out.shape
    n_g = means.shape[1]
    for job in numba.prange(n_b * n_g):
        bi = job // n_g
        g = job - bi * n_g
        mx, my, mz = means[bi, g, 0], means[bi, g, 1], means[bi, g, 2]
        p0, p1, p2 = prec[bi, g, 0], prec[bi, g, 1], prec[bi, g, 2]
        p3, p4, p5 = prec[bi, g, 3], prec[bi, g, 4], prec[bi, g, 5]
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
            for r in range(pixel_box[bi, vi, g, 0], pixel_box[bi, vi, g, 1] + 1):
                for c in range(pixel_box[bi, vi, g, 2], pixel_box[bi, vi, g, 3] + 1):
                    up = grad_out[bi, vi, r, c]
                    if up == 0.0:
                        continue
                    dx, dy, dz = directions[vi, r, c, 0], directions[vi, r, c, 1], directions[vi, r, c, 2]
                    rx, ry, rz, pdx, pdy, pdz, prx, pry, prz, a, b, cc = _pair_terms(
                        origins[vi, r, c, 0], origins[vi, r, c, 1], origins[vi, r, c, 2], dx, dy, dz,
                        mx, my, mz, p0, p1, p2, p3, p4, p5)
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
                    gp3 += 2.0 * g_a * dx * dy + g_b * (dx * ry + dy * rx) + 2.0 * g_c * rx * ry
                    gp4 += 2.0 * g_a * dx * dz + g_b * (dx * rz + dz * rx) + 2.0 * g_c * rx * rz
                    gp5 += 2.0 * g_a * dy * dz + g_b * (dy * rz + dz * ry) + 2.0 * g_c * ry * rz
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
