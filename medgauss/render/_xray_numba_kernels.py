"""numba CPU kernels for the X-ray projection of Gaussians (float64 arithmetic throughout).

Serial ``nogil`` kernels over an interleaved share ``range(task, total, num_tasks)`` of their work
items, run concurrently by :func:`medgauss._parallel.run_tasks` (the library's one threading and fork
policy); every item writes only its own outputs, so there are no races and results do not depend on
the number of threads:

* binning: one item per (sample, view) counts, then lists, that view's (tile, Gaussian) pairs;
* forward: one item per (sample, view, tile) owns the tile's pixels and sums the Gaussians
  binned to it, in ascending Gaussian order (deterministic);
* backward: one item per (sample, Gaussian) owns that Gaussian's gradient and reads the
  upstream gradient of every pixel in its footprints.

Within a footprint box only the columns inside the outline conic are visited, row by row.

Per pair (ray ``o + t d``, Gaussian ``mu, P = L^T L, I``), with ``r = o - mu``: ``a = |L d|^2``,
``b = (L r).(L d)``, ``m = |L r - (b/a) L d|^2`` (``= r.Pr - b^2/a``, but a sum of squares: never
negative) and ``value = I sqrt(2 pi / a) exp(-m / 2)`` where ``m < cutoff^2``. Packed factor order
``(L00, L11, L22, L10, L20, L21)`` (lower triangular, see :func:`medgauss.render._common.precision_factor`);
gradients are returned with respect to that factor (as by the Triton kernels).
Terms that are constant over a view (the source for cone beam, the direction for parallel beam) are
computed once per (view, Gaussian).
"""

from __future__ import annotations

import math

import numba

_SQRT_2PI = math.sqrt(2.0 * math.pi)
_SPAN_MARGIN_PX = 1e-2  # as medgauss.render.xray's box margin: rounding never drops a contributing ray


# How the rays of a view vary (chosen per view by the caller): only directions (cone beam, one
# source), only origins (parallel beam, one direction), or both.
RAYS_GENERAL, RAYS_SHARED_ORIGIN, RAYS_SHARED_DIRECTION = 0, 1, 2


_JIT = {"cache": True, "nogil": True}
# Per-Gaussian and per-view values are passed to the inlined helpers as tuples of scalars, not array
# views: numba tells LLVM nothing about aliasing, so every array element read in the pixel loops would
# be reloaded after each store to ``out`` (measured 2.8x slower than with the values in registers).


@numba.njit(inline="always", **_JIT)
def _lower(f, x, y, z):
    """``L (x, y, z)`` for the packed lower-triangular factor ``f = (L00, L11, L22, L10, L20, L21)`` (a tuple)."""
    return f[0] * x, f[3] * x + f[1] * y, f[4] * x + f[5] * y + f[2] * z


@numba.njit(inline="always", **_JIT)
def _view_terms(origins, directions, vi, mu, f):
    """Per (view, Gaussian) constants from the view's first ray: ``r0 = o0 - mu``, ``L r0``, ``d0``,
    ``L d0`` and ``a0 = |L d0|^2`` (``mu``, ``f``: tuples of scalars)."""
    rx = origins[vi, 0, 0, 0] - mu[0]
    ry = origins[vi, 0, 0, 1] - mu[1]
    rz = origins[vi, 0, 0, 2] - mu[2]
    lrx, lry, lrz = _lower(f, rx, ry, rz)
    dx, dy, dz = directions[vi, 0, 0, 0], directions[vi, 0, 0, 1], directions[vi, 0, 0, 2]
    ldx, ldy, ldz = _lower(f, dx, dy, dz)
    return rx, ry, rz, lrx, lry, lrz, dx, dy, dz, ldx, ldy, ldz, ldx * ldx + ldy * ldy + ldz * ldz


@numba.njit(inline="always", **_JIT)
def _pixel_terms(mode, origins, directions, vi, row, col, mu, f, k):
    """``r = o - mu``, ``d``, ``L d``, ``w = L r - (b/a) L d``, ``a``, ``b/a`` and ``m = |w|^2`` of one ray.

    ``k`` are the :func:`_view_terms`; with a shared origin (direction) the origin (direction)
    terms are taken from them instead of being recomputed. float64 keeps ``m`` accurate without
    moving ``o`` along the ray (``|o - mu|`` of a metre, Gaussians of a millimetre).
    """
    if mode == RAYS_SHARED_ORIGIN:
        rx, ry, rz, lrx, lry, lrz = k[0], k[1], k[2], k[3], k[4], k[5]
    else:
        rx = origins[vi, row, col, 0] - mu[0]
        ry = origins[vi, row, col, 1] - mu[1]
        rz = origins[vi, row, col, 2] - mu[2]
        lrx, lry, lrz = _lower(f, rx, ry, rz)
    if mode == RAYS_SHARED_DIRECTION:
        dx, dy, dz, ldx, ldy, ldz, a = k[6], k[7], k[8], k[9], k[10], k[11], k[12]
    else:
        dx, dy, dz = directions[vi, row, col, 0], directions[vi, row, col, 1], directions[vi, row, col, 2]
        ldx, ldy, ldz = _lower(f, dx, dy, dz)
        a = ldx * ldx + ldy * ldy + ldz * ldz
    ba = (lrx * ldx + lry * ldy + lrz * ldz) / a
    wx = lrx - ba * ldx
    wy = lry - ba * ldy
    wz = lrz - ba * ldz
    return rx, ry, rz, dx, dy, dz, ldx, ldy, ldz, wx, wy, wz, a, ba, wx * wx + wy * wy + wz * wz


@numba.njit(inline="always", **_JIT)
def _gaussian(means, fac, bi, g):
    """Mean and packed factor of Gaussian ``(bi, g)`` as tuples of scalars."""
    mu = (means[bi, g, 0], means[bi, g, 1], means[bi, g, 2])
    f = (fac[bi, g, 0], fac[bi, g, 1], fac[bi, g, 2], fac[bi, g, 3], fac[bi, g, 4], fac[bi, g, 5])
    return mu, f


@numba.njit(inline="always", **_JIT)
def _conic(conics, bi, vi, g):
    """Footprint conic of Gaussian ``(bi, g)`` in view ``vi`` as a tuple of scalars."""
    c = conics[bi, vi, g]
    return c[0], c[1], c[2], c[3], c[4], c[5]


@numba.njit(inline="always", **_JIT)
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


@numba.njit(**_JIT)
def count_tiles(tile_box, n_tile_cols, counts, task, total, num_tasks):
    """Count the Gaussians of every tile: ``counts [S, T]`` (zero on entry) for slots ``range(task, total, num_tasks)``.

    ``tile_box``: ``[S, N, 4]`` int32 inclusive tile ranges (row0, row1, col0, col1) per
    (sample*view ``S``, Gaussian); empty when row0 > row1 or col0 > col1.
    """
    n = tile_box.shape[1]
    for s in range(task, total, num_tasks):
        for g in range(n):
            for tr in range(tile_box[s, g, 0], tile_box[s, g, 1] + 1):
                for tc in range(tile_box[s, g, 2], tile_box[s, g, 3] + 1):
                    counts[s, tr * n_tile_cols + tc] += 1


@numba.njit(**_JIT)
def fill_tiles(tile_box, n_tile_cols, offsets, ids, task, total, num_tasks):
    """List the Gaussians of every tile of slots ``range(task, total, num_tasks)``, in ascending order.

    ``offsets [S * T + 1]``: exclusive prefix sums of :func:`count_tiles`'s counts; ``ids`` (written):
    the Gaussians of tile ``t`` of slot ``s`` are ``ids[offsets[s*T + t] : offsets[s*T + t + 1]]``.
    """
    n = tile_box.shape[1]
    t_count = (offsets.shape[0] - 1) // max(total, 1)
    for s in range(task, total, num_tasks):
        cursor = offsets[s * t_count:(s + 1) * t_count].copy()
        for g in range(n):
            for tr in range(tile_box[s, g, 0], tile_box[s, g, 1] + 1):
                for tc in range(tile_box[s, g, 2], tile_box[s, g, 3] + 1):
                    k = tr * n_tile_cols + tc
                    ids[cursor[k]] = g
                    cursor[k] += 1


@numba.njit(**_JIT)
def forward(origins, directions, ray_modes, means, fac, intens, pixel_box, conics, offsets, ids, tile_rows,
            tile_cols, n_tile_cols, cutoff_sq, out, task, total, num_tasks):
    """Accumulate line integrals into ``out [B, V, R, C]`` (float64, zero on entry) for the (sample, view,
    tile) items ``range(task, total, num_tasks)`` (``total = B * V * tiles``).

    ``origins``/``directions`` ``[V, R, C, 3]``, ``ray_modes [V]`` (``RAYS_*``); ``means [B, N, 3]``,
    ``fac [B, N, 6]`` packed factors, ``intens [B, N]``; ``pixel_box [B, V, N, 4]`` int32 inclusive
    footprint boxes and ``conics [B, V, N, 6]`` footprint outlines; ``offsets``/``ids`` from
    :func:`fill_tiles` over ``B * V`` slots.
    """
    n_b, n_v, n_r, n_c = out.shape
    t_count = (offsets.shape[0] - 1) // (n_b * n_v)
    for job in range(task, total, num_tasks):
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
            mu, f = _gaussian(means, fac, bi, g)
            consts = _view_terms(origins, directions, vi, mu, f)
            peak = intens[bi, g] * _SQRT_2PI
            conic = _conic(conics, bi, vi, g)
            for r in range(r_lo, r_hi + 1):
                first, last = _row_span(conic, r, c_lo, c_hi)
                for c in range(first, last + 1):
                    terms = _pixel_terms(mode, origins, directions, vi, r, c, mu, f, consts)
                    a, m = terms[12], terms[14]
                    if m < cutoff_sq:
                        out[bi, vi, r, c] += peak / math.sqrt(a) * math.exp(-0.5 * m)


@numba.njit(**_JIT)
def backward(origins, directions, ray_modes, means, fac, intens, pixel_box, conics, cutoff_sq, grad_out,
             grad_means, grad_fac, grad_intens, task, total, num_tasks):
    """Gradients of ``sum(grad_out * out)`` w.r.t. means ``[B,N,3]``, the packed factor ``[B,N,6]``
    and intensities ``[B,N]`` (float64 outputs, written) for the (sample, Gaussian) items
    ``range(task, total, num_tasks)`` (``total = B * N``).

    With ``e = sqrt(2 pi / a) exp(-m/2)``, ``v = I e``, upstream ``g``, ``w = L r - (b/a) L d`` and
    ``u = r - (b/a) d``: ``dv/dI = e``, ``dv/dmu = v L^T w`` and
    ``dv/dL_ij = -v (w_i u_j + (L d)_i d_j / a)``. (The value is unchanged when ``r`` moves along
    ``d``, and so are ``w`` and ``u``: these hold for any point ``o`` of the ray.) ``w`` is orthogonal
    to ``L d``; its rounding error along ``L d`` is removed before use (``L^T`` would amplify it).
    """
    n_b, n_v, n_r, n_c = grad_out.shape
    n_g = means.shape[1]
    for job in range(task, total, num_tasks):
        bi = job // n_g
        g = job - bi * n_g
        mu, f = _gaussian(means, fac, bi, g)
        peak = intens[bi, g]
        gi = 0.0
        gw0 = 0.0
        gw1 = 0.0
        gw2 = 0.0
        gl0 = 0.0
        gl1 = 0.0
        gl2 = 0.0
        gl3 = 0.0
        gl4 = 0.0
        gl5 = 0.0
        for vi in range(n_v):
            mode = ray_modes[vi]
            consts = _view_terms(origins, directions, vi, mu, f)
            conic = _conic(conics, bi, vi, g)
            for r in range(pixel_box[bi, vi, g, 0], pixel_box[bi, vi, g, 1] + 1):
                first, last = _row_span(conic, r, pixel_box[bi, vi, g, 2], pixel_box[bi, vi, g, 3])
                for c in range(first, last + 1):
                    up = grad_out[bi, vi, r, c]
                    if up == 0.0:
                        continue
                    rx, ry, rz, dx, dy, dz, ldx, ldy, ldz, wx, wy, wz, a, ba, m = _pixel_terms(
                        mode, origins, directions, vi, r, c, mu, f, consts)
                    if m >= cutoff_sq:
                        continue
                    e = _SQRT_2PI / math.sqrt(a) * math.exp(-0.5 * m)
                    gi += up * e
                    val = up * peak * e
                    # w is orthogonal to L d but for rounding, which L^T would amplify (|L| ~ 1 / the
                    # thinnest scale): remove that component
                    wd = (wx * ldx + wy * ldy + wz * ldz) / a
                    wx -= wd * ldx
                    wy -= wd * ldy
                    wz -= wd * ldz
                    ux = rx - ba * dx
                    uy = ry - ba * dy
                    uz = rz - ba * dz
                    vwx, vwy, vwz = val * wx, val * wy, val * wz
                    vax, vay, vaz = val * ldx / a, val * ldy / a, val * ldz / a
                    gl0 -= vwx * ux + vax * dx
                    gl1 -= vwy * uy + vay * dy
                    gl2 -= vwz * uz + vaz * dz
                    gl3 -= vwy * ux + vay * dx
                    gl4 -= vwz * ux + vaz * dx
                    gl5 -= vwz * uy + vaz * dy
                    gw0 += vwx
                    gw1 += vwy
                    gw2 += vwz
        grad_intens[bi, g] = gi
        # dv/dmu summed = L^T (sum of val * w)
        grad_means[bi, g, 0] = f[0] * gw0 + f[3] * gw1 + f[4] * gw2
        grad_means[bi, g, 1] = f[1] * gw1 + f[5] * gw2
        grad_means[bi, g, 2] = f[2] * gw2
        grad_fac[bi, g, 0] = gl0
        grad_fac[bi, g, 1] = gl1
        grad_fac[bi, g, 2] = gl2
        grad_fac[bi, g, 3] = gl3
        grad_fac[bi, g, 4] = gl4
        grad_fac[bi, g, 5] = gl5
