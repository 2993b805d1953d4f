"""Numba kernels of the CPU splat backend (float64 arithmetic throughout; no torch here).

Everything is in *voxel units*: voxel ``i`` of an axis sits at coordinate ``i``. Each Gaussian is
described by one row of ``params [G, NUM_PARAMS]`` (``G = B * N``, batch-major) holding its mean
and its precision ``P`` in the factored (LDL) form used by every kernel::

    r = u - mean                                   (voxel offset along D, H, W)
    q = T * r0^2                                   (marginal along D; T = 1 / Sigma_00)
      + S11 * (r1 - SLOPE1 * r0)^2                 (H given D)
      + A * (r2 - SLOPE20 * r0 - SLOPE21 * r1)^2   (W given D, H; A = P_22)

which equals ``r^T P r`` exactly in real arithmetic and is well conditioned in floating point.
A term counts when ``q < c2``, tested as ``dw^2 < lim`` with ``dw = r2 - SLOPE20 * r0 - SLOPE21 * r1``
and the row's limit ``lim = (c2 - q_row) / A`` (``q_row``: the first two terms): one subtraction,
one multiplication and a comparison per voxel in the vectorised loops. Every kernel evaluates
``q_row``, ``lim`` and ``dw`` with the same sequence of floating point operations, so the dense
and the point kernels, forward and backward, agree on which (Gaussian, voxel) pairs are inside,
and a pair skipped by culling is always one with ``q >= c2``.

Kernels are plain ``nogil`` functions over an interleaved share of an index range, run on the
thread pool of :mod:`medgauss._parallel` (the library's one threading and fork policy: no
``parallel=True``). Rows: within a slab, the inside voxels of a row ``h`` form a contiguous chord
along W, found from the quadratic ``q(w)`` and then checked at its ends; along it ``exp(-q/2)`` is
advanced by multiplications from the row's peak outwards (``e[w+1] = e[w] * rho[w]``,
``rho[w+1] = rho[w] * exp(-A)``), two or three ``exp`` per row (the *row walk*).
Dense forward: parallel over ``(b, d)`` slabs, summed per slab in a float64 buffer. A Gaussian's
*section* of a slab (the ellipse ``q < c2`` in the (H, W) plane) is evaluated over its bounding
rectangle by a geometric recurrence with no per-voxel ``exp``: ``q(h, w)`` is quadratic in ``h``
at fixed ``w``, so ``e(h+1, w) = e(h, w) * ratio(h, w)`` with ``ratio(h+1, w) = ratio(h, w) *
exp(-(S11 + A * SLOPE21^2))``; the first row's ``e`` and ``ratio`` are geometric in ``w`` (four
``exp`` per section). Each voxel then costs two multiplications and the exact inside test,
vectorised along W, four rows per pass. Sections whose rectangle reaches ``q >= Q_MAX`` (very thin,
sheared Gaussians; ``cutoff=None``) take the row walk.
Dense backward: parallel over Gaussians; each owns its 10 gradient sums and reads the upstream
gradient over the same sections by the same two routes (per column, the recurrence sums ``g e``
weighted by 1, r1 and r1^2; the weights in r2 depend on the column only and are applied once).
Points: Gaussians are binned into a coarse cell grid (CSR) and points are sorted by cell; the
forward pass is parallel over cells (each runs its Gaussian list against its own points), the
backward over ranges of cells with private gradient buffers.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

# Columns of ``params``.
# INV_PREC_W = 1 / A; DECAY = exp(-A); ROW_DECAY = exp(-(S11 + A SLOPE21^2)) and RATIO_STEP = exp(A SLOPE21)
# are the constant factors of the dense recurrence.
M0, M1, M2, SCHUR_D, SCHUR_H, SLOPE1, PREC_W, SLOPE20, SLOPE21, INV_PREC_W, DECAY, ROW_DECAY, RATIO_STEP, INTENSITY = \
    range(14)
NUM_PARAMS = 14
# Columns of the per-Gaussian gradient sums, weighted by the upstream gradient g and e = exp(-q/2):
# sum(g e), sum(g e r_a) for a = 0..2, sum(g e r_a r_b) in the packed order 00, 11, 22, 01, 02, 12.
NUM_SUMS = 10

_JIT = {"cache": True, "nogil": True, "error_model": "numpy"}
# Dense forward recurrence: sections whose rectangle reaches q >= Q_MAX take the row walk instead
# (exp(-Q_MAX / 2) and its reciprocal keep every factor of the recurrence far inside float64's range,
# and the relative error of a factor, about Q_MAX * 1e-16, stays far below the tests' 1e-11).
Q_MAX = 200.0
# The section rectangle's width is padded to a multiple of this (two AVX2 float64 vectors, which is
# what LLVM's vectorised W loop handles per iteration), so the loop runs no scalar remainder.
_BLOCK = 8


@njit(**_JIT)
def _padded_range(center: float, half: float, n: int) -> tuple[int, int]:
    """Indices ``[lo, hi]`` in ``[0, n)`` covering ``(center - half, center + half)`` plus one each side."""
    lo = math.ceil(max(center - half, -2.0)) - 1
    hi = math.floor(min(center + half, n + 1.0)) + 1
    return max(lo, 0), min(hi, n - 1)


@njit(**_JIT)
def _row_limit(q_row: float, c2: float, inv_a: float) -> float:
    """``lim = (c2 - q_row) / A`` of a row: its voxels with ``dw^2 < lim`` are inside (``inv_a = 1 / A``)."""
    return (c2 - q_row) * inv_a


@njit(**_JIT)
def _inside(w: int, m2: float, offset: float, lim: float) -> bool:
    """The inside test of voxel ``w`` of a row, by the same operations as every other kernel's."""
    dw = (w - m2) - offset
    return dw * dw < lim


@njit(**_JIT)
def _chord(m2: float, offset: float, lim: float, n: int) -> tuple[int, int]:
    """Voxels ``[lo, hi]`` of a row (``0 <= w < n``) that pass ``_inside`` (``lim > 0``); empty when ``lo > hi``.

    Estimated as ``m2 + offset +- sqrt(lim)``, then moved until the ends agree with ``_inside``
    itself (``dw^2`` is monotone on each side of its minimum, so the inside set is one interval):
    the estimate never changes the result.
    """
    center = m2 + offset
    half = math.sqrt(lim)
    lo = max(math.ceil(max(center - half, -1.0)), 0)
    hi = min(math.floor(min(center + half, float(n))), n - 1)
    while lo <= hi and not _inside(lo, m2, offset, lim):
        lo += 1
    while lo > 0 and lo <= hi + 1 and _inside(lo - 1, m2, offset, lim):
        lo -= 1
    while hi >= lo and not _inside(hi, m2, offset, lim):
        hi -= 1
    while hi < n - 1 and hi >= lo - 1 and _inside(hi + 1, m2, offset, lim):
        hi += 1
    return lo, hi


@njit(**_JIT)
def _peak(m2: float, offset: float, lo: int, hi: int) -> int:
    """The chord voxel nearest the row's minimum of ``q``; walking outwards from it ``q`` only grows."""
    return min(max(math.floor(m2 + offset + 0.5), lo), hi)


@njit(**_JIT)
def _mahalanobis(p: np.ndarray, u0: float, u1: float, u2: float, c2: float
                 ) -> tuple[bool, float, float, float, float]:
    """``(inside, q, r0, r1, r2)`` of Gaussian row ``p`` at voxel coordinate ``u``, in the kernels' common form."""
    r0 = u0 - p[M0]
    r1 = u1 - p[M1]
    q_row = p[SCHUR_D] * (r0 * r0)
    dh = r1 - p[SLOPE1] * r0
    q_row = q_row + p[SCHUR_H] * (dh * dh)
    offset = p[SLOPE20] * r0 + p[SLOPE21] * r1
    dw = (u2 - p[M2]) - offset
    dw2 = dw * dw
    return dw2 < _row_limit(q_row, c2, p[INV_PREC_W]), p[PREC_W] * dw2 + q_row, r0, r1, u2 - p[M2]


@njit(**_JIT)
def gaussian_params(means: np.ndarray, prec: np.ndarray, factor: np.ndarray, intensities: np.ndarray,
                    sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Kernel parameters of Gaussians given in normalised coordinates.

    Args:
        means: ``[G, 3]`` normalised centres; prec: ``[G, 6]`` packed normalised precision
            (P00, P11, P22, P01, P02, P12); factor: ``[G, 6]`` its lower-triangular factor
            (L00, L11, L22, L10, L20, L21), ``P = L^T L``; intensities: ``[G]``; sizes: ``[3]`` volume
            shape (D, H, W).
    Returns:
        ``params [G, NUM_PARAMS]`` (voxel units, factored precision), ``prec_voxel [G, 6]`` (the
        packed precision in voxel units, for the gradients) and the first Gaussian whose parameters
        are not finite or whose pivots ``A, S11, T`` are not positive, or ``-1``.

    The factored form is read off the factor (in voxel units ``L_ij / size_j``), never computed from
    ``P``: ``T = L00^2``, ``S11 = L11^2``, ``SLOPE1 = -L10 / L11``, ``A = L22^2``, ``SLOPE20 = -L20 / L22``,
    ``SLOPE21 = -L21 / L22``; its pivots are positive however anisotropic the Gaussian.
    """
    num = means.shape[0]
    params = np.empty((num, NUM_PARAMS))
    prec_voxel = np.empty((num, 6))
    first_bad = -1
    for g in range(num):
        prec_voxel[g, 0] = prec[g, 0] / (sizes[0] * sizes[0])
        prec_voxel[g, 1] = prec[g, 1] / (sizes[1] * sizes[1])
        prec_voxel[g, 2] = prec[g, 2] / (sizes[2] * sizes[2])
        prec_voxel[g, 3] = prec[g, 3] / (sizes[0] * sizes[1])
        prec_voxel[g, 4] = prec[g, 4] / (sizes[0] * sizes[2])
        prec_voxel[g, 5] = prec[g, 5] / (sizes[1] * sizes[2])
        l00 = factor[g, 0] / sizes[0]
        l11 = factor[g, 1] / sizes[1]
        l22 = factor[g, 2] / sizes[2]
        l10 = factor[g, 3] / sizes[0]
        l20 = factor[g, 4] / sizes[0]
        l21 = factor[g, 5] / sizes[1]
        a = l22 * l22
        s11 = l11 * l11
        schur_d = l00 * l00
        slope21 = -l21 / l22
        row = params[g]
        for axis in range(3):
            row[M0 + axis] = means[g, axis] * sizes[axis] - 0.5
        row[SCHUR_D] = schur_d
        row[SCHUR_H] = s11
        row[SLOPE1] = -l10 / l11
        row[PREC_W] = a
        row[SLOPE20] = -l20 / l22
        row[SLOPE21] = slope21
        row[INV_PREC_W] = 1.0 / a
        row[DECAY] = math.exp(-a)
        # The recurrence's other constant factors: used only where it applies (then far inside
        # float64's range); the bounds keep them finite for every other Gaussian.
        row[ROW_DECAY] = math.exp(-min(s11 + a * (slope21 * slope21), 1e300))
        row[RATIO_STEP] = math.exp(max(min(a * slope21, 700.0), -700.0))
        row[INTENSITY] = intensities[g]
        ok = a > 0.0 and s11 > 0.0 and schur_d > 0.0
        for k in range(NUM_PARAMS):
            ok = ok and math.isfinite(row[k])
        if not ok and first_bad < 0:
            first_bad = g
    return params, prec_voxel, first_bad


# ---------------------------------------------------------------------------------------- dense


@njit(**_JIT)
def _first_ratios(a: float, delta: float, decay: float, n_right: int, n_left: int) -> tuple[float, float]:
    """``e[peak+1] / e[peak]`` and ``e[peak-1] / e[peak]`` for ``delta = peak - w*`` (0 when unused).

    Their product is ``exp(-a) = decay``, so when both are needed (then ``|delta| <= 1/2``, both lie
    in ``[decay, 1]``) one ``exp`` and a division suffice, unless ``decay`` underflows.
    """
    rho_right = math.exp(-0.5 * a * (2.0 * delta + 1.0)) if n_right > 0 else 0.0
    if n_left == 0:
        return rho_right, 0.0
    if n_right > 0 and a < 700.0:
        return rho_right, decay / rho_right
    return rho_right, math.exp(0.5 * a * (2.0 * delta - 1.0))


@njit(**_JIT)
def _add_row(out: np.ndarray, base: int, lo: int, hi: int, peak: int, delta: float, a: float,
             decay: float, q_row: float, intensity: float) -> None:
    """``out[base + w] += I exp(-q(w)/2)`` for ``lo <= w <= hi``, two multiplicative chains from ``peak``."""
    e_right = intensity * math.exp(-0.5 * (a * (delta * delta) + q_row))
    e_left = e_right
    out[base + peak] += e_right
    n_right = hi - peak
    n_left = peak - lo
    rho_right, rho_left = _first_ratios(a, delta, decay, n_right, n_left)
    both = min(n_right, n_left)
    for k in range(1, both + 1):
        e_right *= rho_right
        rho_right *= decay
        e_left *= rho_left
        rho_left *= decay
        out[base + peak + k] += e_right
        out[base + peak - k] += e_left
    for k in range(both + 1, n_right + 1):
        e_right *= rho_right
        rho_right *= decay
        out[base + peak + k] += e_right
    for k in range(both + 1, n_left + 1):
        e_left *= rho_left
        rho_left *= decay
        out[base + peak - k] += e_left


@njit(inline="always", **_JIT)
def _row_terms(p: np.ndarray, r0: float, q0: float, h: int) -> tuple[float, float]:
    """``(q_row, offset)`` of row ``h`` in the slab ``r0``: the same operations as every row loop."""
    r1 = h - p[M1]
    dh = r1 - p[SLOPE1] * r0
    return q0 + p[SCHUR_H] * (dh * dh), p[SLOPE20] * r0 + p[SLOPE21] * r1


@njit(**_JIT)
def _walk_chord(p: np.ndarray, r0: float, q0: float, h: int, c2: float, width: int
                ) -> tuple[float, int, int, int, float]:
    """Row ``h`` of a slab for the row walks: ``(q_row, lo, hi, peak, delta)``; no voxels when ``lo > hi``.

    ``[lo, hi]`` is the chord, ``peak`` its voxel nearest the minimum of ``q`` and ``delta`` that
    voxel's offset from the minimum.
    """
    q_row, offset = _row_terms(p, r0, q0, h)
    if not q_row < c2:  # then lim <= 0: no voxel is inside
        return q_row, 1, 0, 0, 0.0
    lo, hi = _chord(p[M2], offset, _row_limit(q_row, c2, p[INV_PREC_W]), width)
    if lo > hi:
        return q_row, lo, hi, 0, 0.0
    peak = _peak(p[M2], offset, lo, hi)
    return q_row, lo, hi, peak, (peak - p[M2]) - offset


@njit(**_JIT)
def _section_walk(p: np.ndarray, r0: float, q0: float, h_first: int, h_last: int, c2: float, width: int,
                  acc: np.ndarray) -> None:
    """Add one Gaussian's slab section to ``acc [H*W]`` row by row, exact chords and multiplicative walks.

    The general route: any section, any ``c2``, two or three ``exp`` per row.
    """
    a = p[PREC_W]
    for h in range(h_first, h_last + 1):
        q_row, lo, hi, peak, delta = _walk_chord(p, r0, q0, h, c2, width)
        if lo <= hi:
            _add_row(acc, h * width, lo, hi, peak, delta, a, p[DECAY], q_row, p[INTENSITY])


@njit(**_JIT)
def _section_q(p: np.ndarray, r0: float, q0: float, h: int, w: int) -> float:
    """``q`` at voxel ``(h, w)`` of the slab ``r0`` (for the range check of a rectangle's corners)."""
    q_row, offset = _row_terms(p, r0, q0, h)
    dw = (w - p[M2]) - offset
    return p[PREC_W] * (dw * dw) + q_row


@njit(**_JIT)
def _section_rectangle(p: np.ndarray, r0: float, q0: float, h_first: int, h_last: int, c2: float,
                       width: int) -> tuple[int, int]:
    """``(w_first, cols)``: the section's W range padded to whole vector blocks, or ``cols = 0``.

    ``cols = 0`` when the recurrence does not apply: a corner of the rectangle has ``q >= Q_MAX``
    (values there could leave the float64 range of the recurrence's factors), or one of its
    constant ratios would underflow.
    """
    s11 = p[SCHUR_H]
    a = p[PREC_W]
    slope21 = p[SLOPE21]
    h_centre = p[M1] + p[SLOPE1] * r0
    w_centre = p[M2] + p[SLOPE20] * r0 + slope21 * (h_centre - p[M1])
    # W extent of {s11 u^2 + a (v - slope21 u)^2 < c2 - q0}: sqrt((c2 - q0) (1/a + slope21^2 / s11)).
    w_first, w_last = _padded_range(w_centre, math.sqrt((c2 - q0) * (1.0 / a + slope21 * slope21 / s11)), width)
    if w_first > w_last or not (a < Q_MAX and s11 + a * slope21 * slope21 < Q_MAX):
        return 0, 0
    cols = min(((w_last - w_first) // _BLOCK + 1) * _BLOCK, width)
    w_first = min(w_first, width - cols)
    w_last = w_first + cols - 1
    q_corner = max(max(_section_q(p, r0, q0, h_first, w_first), _section_q(p, r0, q0, h_first, w_last)),
                   max(_section_q(p, r0, q0, h_last, w_first), _section_q(p, r0, q0, h_last, w_last)))
    return (w_first, cols) if q_corner < Q_MAX else (0, 0)


@njit(**_JIT)
def _recurrence_seeds(p: np.ndarray, r0: float, q0: float, h_first: int, w_first: int, cols: int, scale: float,
                      w_minus_mean: np.ndarray, e: np.ndarray, ratio: np.ndarray) -> None:
    """First row of the recurrence over a section's rectangle (three ``exp``).

    Writes for ``j < cols`` (``w = w_first + j``): ``w_minus_mean[j] = w - mean_W``,
    ``e[j] = scale * exp(-q(h_first, w) / 2)`` and ``ratio[j] = e(h_first + 1, w) / e(h_first, w)``.
    Along ``j`` both are geometric: ``e[j+1] = e[j] * step[j]`` with ``step[j+1] = step[j] * DECAY``,
    and ``ratio[j+1] = ratio[j] * RATIO_STEP`` (the differences of ``q`` are taken analytically, so
    no cancellation enters the factors).
    """
    s11 = p[SCHUR_H]
    a = p[PREC_W]
    slope21 = p[SLOPE21]
    r1 = h_first - p[M1]
    dh = r1 - p[SLOPE1] * r0
    dw = (w_first - p[M2]) - (p[SLOPE20] * r0 + slope21 * r1)
    q = q0 + s11 * (dh * dh) + a * (dw * dw)
    value = scale * math.exp(-0.5 * q)
    step = math.exp(-0.5 * a * (2.0 * dw + 1.0))
    row_ratio = math.exp(-0.5 * (s11 * (2.0 * dh + 1.0) + a * slope21 * (slope21 - 2.0 * dw)))
    decay = p[DECAY]
    ratio_step = p[RATIO_STEP]
    for j in range(cols):
        w_minus_mean[j] = (w_first + j) - p[M2]  # the first operation of every kernel's dw
        e[j] = value
        ratio[j] = row_ratio
        value *= step
        step *= decay
        row_ratio *= ratio_step


# The two row functions take the rows' terms as scalars: small arrays passed per call cost numba
# reference-count updates (atomic) that measured slower than the loop itself for short rows.


@njit(inline="always", **_JIT)
def _recurrence_row(acc: np.ndarray, start: int, cols: int, w_minus_mean: np.ndarray, e: np.ndarray,
                    ratio: np.ndarray, lim: float, offset: float, decay: float) -> None:
    """One row of a section: ``acc[start + j] += e[j]`` where inside; then ``e`` moves to the next row.

    ``lim``, ``offset`` are the row's terms of the inside test (computed by the caller exactly as in
    every kernel) and ``decay`` the power of the H decay that turns ``ratio`` into this row's ratio.
    This module compiles without ``contract`` (no fused multiply-adds), so the test selects exactly
    the pairs every other kernel does. Indices are unsigned so numba emits no negative-index
    wraparound, which would block vectorisation; the loop over ``j`` vectorises (AVX2: 4 float64 per
    instruction). Written as a select between the sum and the old value (not ``+= v or 0``), the
    update compiles to one masked store on AVX-512 machines (measured 5-11% faster than a zeroing
    move and an add).
    """
    row = np.uint64(start)
    for j in range(cols):
        v = e[j]
        dw = w_minus_mean[j] - offset
        before = acc[row + np.uint64(j)]
        acc[row + np.uint64(j)] = before + v if dw * dw < lim else before
        e[j] = v * (ratio[j] * decay)


@njit(inline="always", **_JIT)
def _recurrence_4_rows(acc: np.ndarray, start: int, width: int, cols: int, w_minus_mean: np.ndarray,
                       e: np.ndarray, ratio: np.ndarray, l0: float, l1: float, l2: float, l3: float,
                       o0: float, o1: float, o2: float, o3: float, d0: float, d1: float, d2: float, d3: float
                       ) -> None:
    """:func:`_recurrence_row` for four consecutive rows in one pass (``e`` loaded and stored once)."""
    row0 = np.uint64(start)
    row1 = np.uint64(start + width)
    row2 = np.uint64(start + 2 * width)
    row3 = np.uint64(start + 3 * width)
    for j in range(cols):
        u = np.uint64(j)
        wm = w_minus_mean[j]
        r = ratio[j]
        v = e[j]
        dw = wm - o0
        a0 = acc[row0 + u]
        acc[row0 + u] = a0 + v if dw * dw < l0 else a0
        v = v * (r * d0)
        dw = wm - o1
        a1 = acc[row1 + u]
        acc[row1 + u] = a1 + v if dw * dw < l1 else a1
        v = v * (r * d1)
        dw = wm - o2
        a2 = acc[row2 + u]
        acc[row2 + u] = a2 + v if dw * dw < l2 else a2
        v = v * (r * d2)
        dw = wm - o3
        a3 = acc[row3 + u]
        acc[row3 + u] = a3 + v if dw * dw < l3 else a3
        e[j] = v * (r * d3)


@njit(inline="always", **_JIT)
def _four_rows(p: np.ndarray, r0: float, q0: float, h: int, c2: float, power: float
               ) -> tuple[float, float, float, float, float, float, float, float, float, float, float, float]:
    """Terms of rows ``h .. h+3`` for a recurrence pass: ``lim`` x4, ``offset`` x4, decay powers x4.

    ``power`` is ``ROW_DECAY ** (h - h_first)``; the decays are it times ``ROW_DECAY ** k``.
    """
    inv_a = p[INV_PREC_W]
    q_0, o_0 = _row_terms(p, r0, q0, h)
    q_1, o_1 = _row_terms(p, r0, q0, h + 1)
    q_2, o_2 = _row_terms(p, r0, q0, h + 2)
    q_3, o_3 = _row_terms(p, r0, q0, h + 3)
    row_decay = p[ROW_DECAY]
    d_1 = power * row_decay
    d_2 = d_1 * row_decay
    return (_row_limit(q_0, c2, inv_a), _row_limit(q_1, c2, inv_a), _row_limit(q_2, c2, inv_a),
            _row_limit(q_3, c2, inv_a), o_0, o_1, o_2, o_3, power, d_1, d_2, d_2 * row_decay)


@njit(**_JIT)
def _section_recurrence(p: np.ndarray, r0: float, q0: float, h_first: int, h_last: int, w_first: int,
                        cols: int, c2: float, width: int, acc: np.ndarray, w_minus_mean: np.ndarray,
                        e: np.ndarray, ratio: np.ndarray) -> None:
    """Add one Gaussian's slab section to ``acc [H*W]`` over its rectangle, without per-voxel ``exp``.

    ``w_minus_mean, e, ratio [>= W]`` are work arrays (separate allocations: LLVM's vectoriser then
    sees that they do not overlap).
    """
    _recurrence_seeds(p, r0, q0, h_first, w_first, cols, p[INTENSITY], w_minus_mean, e, ratio)
    power = 1.0  # ROW_DECAY ** (h - h_first)
    h = h_first
    while h + 3 <= h_last:
        l_0, l_1, l_2, l_3, o_0, o_1, o_2, o_3, d_0, d_1, d_2, d_3 = _four_rows(p, r0, q0, h, c2, power)
        _recurrence_4_rows(acc, h * width + w_first, width, cols, w_minus_mean, e, ratio,
                           l_0, l_1, l_2, l_3, o_0, o_1, o_2, o_3, d_0, d_1, d_2, d_3)
        power = d_3 * p[ROW_DECAY]
        h += 4
    while h <= h_last:
        q_row, offset = _row_terms(p, r0, q0, h)
        _recurrence_row(acc, h * width + w_first, cols, w_minus_mean, e, ratio,
                        _row_limit(q_row, c2, p[INV_PREC_W]), offset, power)
        power *= p[ROW_DECAY]
        h += 1


@njit(**_JIT)
def dense_forward(params: np.ndarray, d_lo: np.ndarray, d_hi: np.ndarray, batch: int, depth: int,
                  height: int, width: int, c2: float, out: np.ndarray, first: int, last: int, step: int) -> None:
    """Dense splat of the slabs ``b * D + d`` in ``range(first, last, step)``, written into ``out [B*D*H*W]``.

    ``params [B*N, NUM_PARAMS]``; ``d_lo, d_hi [B*N]`` are slab ranges that only cull (they may be
    wider than the Gaussian): ``q < c2`` decides every pair. ``out`` is float64 or float32; values
    are computed and summed per slab in float64 either way. Calls with disjoint sets of slabs write
    disjoint parts of ``out`` and may run concurrently (the GIL is released).
    """
    n = params.shape[0] // batch
    plane = height * width
    acc = np.zeros(plane)
    w_minus_mean, e, ratio = np.empty(width), np.empty(width), np.empty(width)
    for slab in range(first, last, step):
        b = slab // depth
        d = slab - b * depth
        h_min, h_max = height, -1  # rows of acc written in this slab
        for i in range(n):
            g = b * n + i
            if d < d_lo[g] or d > d_hi[g]:
                continue
            p = params[g]
            r0 = d - p[M0]
            q0 = p[SCHUR_D] * (r0 * r0)
            if not q0 < c2:
                continue
            h_first, h_last = _padded_range(p[M1] + p[SLOPE1] * r0, math.sqrt((c2 - q0) / p[SCHUR_H]), height)
            if h_first > h_last:
                continue
            h_min = min(h_min, h_first)
            h_max = max(h_max, h_last)
            w_first, cols = _section_rectangle(p, r0, q0, h_first, h_last, c2, width)
            if cols > 0:
                _section_recurrence(p, r0, q0, h_first, h_last, w_first, cols, c2, width, acc, w_minus_mean, e,
                                    ratio)
            else:
                _section_walk(p, r0, q0, h_first, h_last, c2, width, acc)
        # Write the whole plane (out needs no zeroing beforehand): zeros, the written rows, zeros.
        first_row, end_row = (h_min, h_max + 1) if h_max >= 0 else (0, 0)
        base = slab * plane
        for k in range(first_row * width):
            out[base + k] = 0.0
        for k in range(first_row * width, end_row * width):
            out[base + k] = acc[k]
            acc[k] = 0.0
        for k in range(end_row * width, plane):
            out[base + k] = 0.0


@njit(**_JIT)
def _row_sums(grad: np.ndarray, base: int, lo: int, hi: int, peak: int, delta: float, a: float,
              decay: float, q_row: float, r_peak: float) -> tuple[float, float, float]:
    """``(sum g e, sum g e r2, sum g e r2^2)`` over a chord, ``r2 = w - mean_W``, ``e = exp(-q/2)``.

    ``r_peak`` is ``r2`` at ``peak``; two chains walk outwards from it as in ``_add_row``.
    """
    e_right = math.exp(-0.5 * (a * (delta * delta) + q_row))
    e_left = e_right
    ge = grad[base + peak] * e_right
    gr = ge * r_peak
    s0, s1, s2 = ge, gr, gr * r_peak
    t0 = t1 = t2 = 0.0
    n_right = hi - peak
    n_left = peak - lo
    rho_right, rho_left = _first_ratios(a, delta, decay, n_right, n_left)
    r_right = r_peak
    r_left = r_peak
    both = min(n_right, n_left)
    for k in range(1, both + 1):
        e_right *= rho_right
        rho_right *= decay
        e_left *= rho_left
        rho_left *= decay
        r_right += 1.0
        r_left -= 1.0
        ge = grad[base + peak + k] * e_right
        gr = ge * r_right
        s0 += ge
        s1 += gr
        s2 += gr * r_right
        ge = grad[base + peak - k] * e_left
        gr = ge * r_left
        t0 += ge
        t1 += gr
        t2 += gr * r_left
    for k in range(both + 1, n_right + 1):
        e_right *= rho_right
        rho_right *= decay
        r_right += 1.0
        ge = grad[base + peak + k] * e_right
        gr = ge * r_right
        s0 += ge
        s1 += gr
        s2 += gr * r_right
    for k in range(both + 1, n_left + 1):
        e_left *= rho_left
        rho_left *= decay
        r_left -= 1.0
        ge = grad[base + peak - k] * e_left
        gr = ge * r_left
        t0 += ge
        t1 += gr
        t2 += gr * r_left
    return s0 + t0, s1 + t1, s2 + t2


@njit(**_JIT)
def _section_walk_sums(p: np.ndarray, r0: float, q0: float, h_first: int, h_last: int, c2: float, width: int,
                       grad: np.ndarray, plane_start: int, sums: np.ndarray) -> None:
    """Add one slab section's gradient sums (``NUM_SUMS``, see ``dense_backward``) to ``sums`` by row walks.

    ``grad[plane_start + h * width + w]`` is the upstream gradient of the slab.
    """
    a = p[PREC_W]
    for h in range(h_first, h_last + 1):
        q_row, lo, hi, peak, delta = _walk_chord(p, r0, q0, h, c2, width)
        if lo > hi:
            continue
        t0, t1, t2 = _row_sums(grad, plane_start + h * width, lo, hi, peak, delta, a, p[DECAY], q_row,
                               peak - p[M2])
        r1 = h - p[M1]
        _add_sums(sums, r0, r1 * t0, r1 * r1 * t0, r1 * t1, t0, t1, t2)


@njit(inline="always", **_JIT)
def _add_sums(sums: np.ndarray, r0: float, t_r1: float, t_r1r1: float, t_r1r2: float, t: float, t_r2: float,
              t_r2r2: float) -> None:
    """Fold one section's (or row's) sums of ``t = g e`` times 1, r1, r1^2, r1 r2, r2, r2^2 into ``sums``."""
    sums[0] += t
    sums[1] += r0 * t
    sums[2] += t_r1
    sums[3] += t_r2
    sums[4] += r0 * r0 * t
    sums[5] += t_r1r1
    sums[6] += t_r2r2
    sums[7] += r0 * t_r1
    sums[8] += r0 * t_r2
    sums[9] += t_r1r2


@njit(inline="always", **_JIT)
def _recurrence_4_rows_sums(grad: np.ndarray, start: int, width: int, cols: int, w_minus_mean: np.ndarray,
                            e: np.ndarray, ratio: np.ndarray,
                            l0: float, l1: float, l2: float, l3: float, o0: float, o1: float, o2: float, o3: float,
                            d0: float, d1: float, d2: float, d3: float, r1_0: float, r1_1: float, r1_2: float,
                            r1_3: float, t_sum: np.ndarray, t_r1: np.ndarray, t_r1r1: np.ndarray) -> None:
    """Backward twin of :func:`_recurrence_4_rows`: per column ``j``, ``t = g e`` (inside pairs) summed
    over the four rows into ``t_sum[j]``, weighted by ``r1`` into ``t_r1[j]`` and by ``r1^2`` into
    ``t_r1r1[j]`` (``r2`` depends on ``j`` only, so the caller weights by it after the rows)."""
    row0 = np.uint64(start)
    row1 = np.uint64(start + width)
    row2 = np.uint64(start + 2 * width)
    row3 = np.uint64(start + 3 * width)
    for j in range(cols):
        u = np.uint64(j)
        wm = w_minus_mean[j]
        r = ratio[j]
        v = e[j]
        dw = wm - o0
        t0 = grad[row0 + u] * v if dw * dw < l0 else 0.0
        v = v * (r * d0)
        dw = wm - o1
        t1 = grad[row1 + u] * v if dw * dw < l1 else 0.0
        v = v * (r * d1)
        dw = wm - o2
        t2 = grad[row2 + u] * v if dw * dw < l2 else 0.0
        v = v * (r * d2)
        dw = wm - o3
        t3 = grad[row3 + u] * v if dw * dw < l3 else 0.0
        e[j] = v * (r * d3)
        w0 = t0 * r1_0
        w1 = t1 * r1_1
        w2 = t2 * r1_2
        w3 = t3 * r1_3
        t_sum[j] += (t0 + t1) + (t2 + t3)
        t_r1[j] += (w0 + w1) + (w2 + w3)
        t_r1r1[j] += (w0 * r1_0 + w1 * r1_1) + (w2 * r1_2 + w3 * r1_3)


@njit(inline="always", **_JIT)
def _recurrence_row_sums(grad: np.ndarray, start: int, cols: int, w_minus_mean: np.ndarray, e: np.ndarray,
                         ratio: np.ndarray, lim: float, offset: float, decay: float, r1: float,
                         t_sum: np.ndarray, t_r1: np.ndarray, t_r1r1: np.ndarray) -> None:
    """One row of :func:`_recurrence_4_rows_sums`."""
    row = np.uint64(start)
    for j in range(cols):
        v = e[j]
        dw = w_minus_mean[j] - offset
        t = grad[row + np.uint64(j)] * v if dw * dw < lim else 0.0
        e[j] = v * (ratio[j] * decay)
        w = t * r1
        t_sum[j] += t
        t_r1[j] += w
        t_r1r1[j] += w * r1


@njit(**_JIT)
def _section_recurrence_sums(p: np.ndarray, r0: float, q0: float, h_first: int, h_last: int, w_first: int,
                             cols: int, c2: float, width: int, grad: np.ndarray, plane_start: int,
                             sums: np.ndarray, w_minus_mean: np.ndarray, e: np.ndarray, ratio: np.ndarray,
                             t_sum: np.ndarray, t_r1: np.ndarray, t_r1r1: np.ndarray) -> None:
    """Add one slab section's gradient sums to ``sums`` over its rectangle, without per-voxel ``exp``.

    The same recurrence as :func:`_section_recurrence` (``e = exp(-q/2)``, no intensity); the three
    per-column accumulators ``t_sum, t_r1, t_r1r1 [>= W]`` are work arrays.
    """
    _recurrence_seeds(p, r0, q0, h_first, w_first, cols, 1.0, w_minus_mean, e, ratio)
    for j in range(cols):
        t_sum[j] = 0.0
        t_r1[j] = 0.0
        t_r1r1[j] = 0.0
    power = 1.0  # ROW_DECAY ** (h - h_first)
    h = h_first
    while h + 3 <= h_last:
        l_0, l_1, l_2, l_3, o_0, o_1, o_2, o_3, d_0, d_1, d_2, d_3 = _four_rows(p, r0, q0, h, c2, power)
        _recurrence_4_rows_sums(grad, plane_start + h * width + w_first, width, cols, w_minus_mean, e, ratio,
                                l_0, l_1, l_2, l_3, o_0, o_1, o_2, o_3, d_0, d_1, d_2, d_3,
                                h - p[M1], (h + 1) - p[M1], (h + 2) - p[M1], (h + 3) - p[M1], t_sum, t_r1, t_r1r1)
        power = d_3 * p[ROW_DECAY]
        h += 4
    while h <= h_last:
        q_row, offset = _row_terms(p, r0, q0, h)
        _recurrence_row_sums(grad, plane_start + h * width + w_first, cols, w_minus_mean, e, ratio,
                             _row_limit(q_row, c2, p[INV_PREC_W]), offset, power, h - p[M1], t_sum, t_r1, t_r1r1)
        power *= p[ROW_DECAY]
        h += 1
    t = t_r2 = t_r2r2 = s_r1 = s_r1r1 = s_r1r2 = 0.0
    for j in range(cols):
        wm = w_minus_mean[j]
        t += t_sum[j]
        t_r2 += wm * t_sum[j]
        t_r2r2 += wm * wm * t_sum[j]
        s_r1 += t_r1[j]
        s_r1r1 += t_r1r1[j]
        s_r1r2 += wm * t_r1[j]
    _add_sums(sums, r0, s_r1, s_r1r1, s_r1r2, t, t_r2, t_r2r2)


@njit(**_JIT)
def dense_backward(params: np.ndarray, d_lo: np.ndarray, d_hi: np.ndarray, grad: np.ndarray, batch: int,
                   depth: int, height: int, width: int, c2: float, sums: np.ndarray, first: int,
                   last: int, step: int) -> None:
    """Gradient sums ``sums[g]`` of the Gaussians ``g`` in ``range(first, last, step)`` for the upstream ``grad``.

    ``grad [B*D*H*W]`` is the upstream gradient of the dense volume.

    ``sums [B*N, NUM_SUMS]`` (overwritten): with ``t = g e`` over the inside voxels, ``r`` the voxel
    offset from the mean, the sums of ``t`` times 1, r0, r1, r2, r0^2, r1^2, r2^2, r0 r1, r0 r2, r1 r2.
    Each Gaussian reads the gradient over its own sections, by the recurrence or the row walk as the
    forward pass does; calls with disjoint sets of Gaussians write disjoint rows of ``sums`` and may run
    concurrently.
    """
    n = params.shape[0] // batch
    w_minus_mean, e, ratio = np.empty(width), np.empty(width), np.empty(width)
    t_sum, t_r1, t_r1r1 = np.empty(width), np.empty(width), np.empty(width)
    for g in range(first, last, step):
        b = g // n
        p = params[g]
        own = sums[g]
        own[:] = 0.0
        for d in range(d_lo[g], d_hi[g] + 1):
            r0 = d - p[M0]
            q0 = p[SCHUR_D] * (r0 * r0)
            if not q0 < c2:
                continue
            h_first, h_last = _padded_range(p[M1] + p[SLOPE1] * r0, math.sqrt((c2 - q0) / p[SCHUR_H]), height)
            if h_first > h_last:
                continue
            plane_start = (b * depth + d) * height * width
            w_first, cols = _section_rectangle(p, r0, q0, h_first, h_last, c2, width)
            if cols > 0:
                _section_recurrence_sums(p, r0, q0, h_first, h_last, w_first, cols, c2, width, grad, plane_start,
                                         own, w_minus_mean, e, ratio, t_sum, t_r1, t_r1r1)
            else:
                _section_walk_sums(p, r0, q0, h_first, h_last, c2, width, grad, plane_start, own)


# ---------------------------------------------------------------------------------------- points


@njit(**_JIT)
def _prefix_sum(counts: np.ndarray) -> np.ndarray:
    out = np.empty_like(counts)
    total = 0
    for i in range(counts.shape[0]):
        total += counts[i]
        out[i] = total
    return out


@njit(**_JIT)
def bin_gaussians(cell_lo: np.ndarray, cell_hi: np.ndarray, batch: int, grid: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """CSR lists of the Gaussians overlapping each cell of a ``grid^3`` grid per sample.

    Args:
        cell_lo, cell_hi: ``[B*N, 3]`` inclusive cell box of each Gaussian (``lo > hi``: no cell).
    Returns:
        ``offsets [B*grid^3 + 1]`` and ``entries`` (Gaussian indices); cell ``c`` of sample ``b``
        (``c = (i * grid + j) * grid + k``) lists ``entries[offsets[b*grid^3 + c] : offsets[... + 1]]``.
    """
    num = cell_lo.shape[0]
    n = num // batch
    cells = grid * grid * grid
    counts = np.zeros(batch * cells + 1, dtype=np.int64)
    for g in range(num):
        first = (g // n) * cells
        for i in range(cell_lo[g, 0], cell_hi[g, 0] + 1):
            for j in range(cell_lo[g, 1], cell_hi[g, 1] + 1):
                for k in range(cell_lo[g, 2], cell_hi[g, 2] + 1):
                    counts[first + (i * grid + j) * grid + k + 1] += 1
    offsets = _prefix_sum(counts)
    cursor = offsets[:-1].copy()
    entries = np.empty(offsets[-1], dtype=np.int64)
    for g in range(num):
        first = (g // n) * cells
        for i in range(cell_lo[g, 0], cell_hi[g, 0] + 1):
            for j in range(cell_lo[g, 1], cell_hi[g, 1] + 1):
                for k in range(cell_lo[g, 2], cell_hi[g, 2] + 1):
                    c = first + (i * grid + j) * grid + k
                    entries[cursor[c]] = g
                    cursor[c] += 1
    return offsets, entries


@njit(**_JIT)
def voxel_centre_index(x: np.ndarray, sizes: np.ndarray, tolerance: np.ndarray, per_sample: int
                       ) -> tuple[np.ndarray, bool]:
    """Flat indices into ``[B, D, H, W]`` of normalised points ``x [B*M, 3]`` that are voxel centres.

    Returns ``(index [B*M], True)`` when every point lies within ``tolerance [3]`` voxels of a
    centre ``(i + 0.5) / n``, else ``(partial index, False)`` (stops at the first other point).
    """
    num_points = x.shape[0]
    volume = int(sizes[0]) * int(sizes[1]) * int(sizes[2])
    index = np.empty(num_points, dtype=np.int64)
    for i in range(num_points):
        flat = 0
        for a in range(3):
            u = x[i, a] * sizes[a] - 0.5
            k = math.floor(u + 0.5)
            if not abs(u - k) <= tolerance[a]:
                return index, False
            flat = flat * int(sizes[a]) + min(max(k, 0), int(sizes[a]) - 1)
        index[i] = (i // per_sample) * volume + flat
    return index, True


@njit(**_JIT)
def bin_points(x: np.ndarray, sizes: np.ndarray, grid: int, per_sample: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sort points by cell of a ``grid^3`` grid per sample (counting sort, stable).

    Args:
        x: ``[B*M, 3]`` normalised coordinates in ``[0, 1]`` (sample-major).
        sizes: ``[3]`` volume shape (D, H, W) as floats.
        grid: cells per axis; per_sample: ``M``.
    Returns:
        ``cell_start [B*grid^3 + 1]`` (the points of cell ``c`` are sorted positions
        ``cell_start[c] : cell_start[c + 1]``), ``order [B*M]`` (original index of each sorted
        point) and ``coords [B*M, 3]`` (voxel coordinates ``x * size - 0.5``, sorted).
    """
    num_points = x.shape[0]
    cells = grid * grid * grid
    point_cell = np.empty(num_points, dtype=np.int64)
    counts = np.zeros((num_points // max(per_sample, 1)) * cells + 1, dtype=np.int64)
    for i in range(num_points):
        c = (i // per_sample) * cells
        for a in range(3):
            k = min(max(int(math.floor(x[i, a] * grid)), 0), grid - 1)
            c += k * (grid * grid if a == 0 else (grid if a == 1 else 1))
        point_cell[i] = c
        counts[c + 1] += 1
    cell_start = _prefix_sum(counts)
    cursor = cell_start[:-1].copy()
    order = np.empty(num_points, dtype=np.int64)
    coords = np.empty((num_points, 3))
    for i in range(num_points):
        c = point_cell[i]
        j = cursor[c]
        cursor[c] += 1
        order[j] = i
        for a in range(3):
            coords[j, a] = x[i, a] * sizes[a] - 0.5
    return cell_start, order, coords


@njit(**_JIT)
def points_forward(params: np.ndarray, coords: np.ndarray, cell_start: np.ndarray, offsets: np.ndarray,
                   entries: np.ndarray, c2: float, out: np.ndarray, cell_first: int, cell_last: int,
                   step: int) -> None:
    """Splat at the points of the cells in ``range(cell_first, cell_last, step)`` into ``out [P]`` (sorted order).

    ``coords [P, 3]`` are voxel coordinates sorted by cell; each cell runs its Gaussian list
    against its own points. Calls with disjoint sets of cells may run concurrently.
    """
    for cell in range(cell_first, cell_last, step):
        first = cell_start[cell]
        last = cell_start[cell + 1]
        if first == last:
            continue
        for k in range(offsets[cell], offsets[cell + 1]):
            p = params[entries[k]]
            intensity = p[INTENSITY]
            for i in range(first, last):
                inside, q = _mahalanobis(p, coords[i, 0], coords[i, 1], coords[i, 2], c2)[:2]
                if inside:
                    out[i] += intensity * math.exp(-0.5 * q)


@njit(**_JIT)
def points_backward(params: np.ndarray, coords: np.ndarray, cell_start: np.ndarray, offsets: np.ndarray,
                    entries: np.ndarray, c2: float, grad: np.ndarray, buf: np.ndarray, cell_first: int,
                    cell_last: int, step: int) -> None:
    """Add the gradient sums of the cells in ``range(cell_first, cell_last, step)`` into ``buf [B*N, NUM_SUMS]``.

    ``grad [P]`` is the upstream gradient in sorted point order. Concurrent calls need separate
    ``buf`` (summed afterwards): a Gaussian is listed in many cells.
    """
    for cell in range(cell_first, cell_last, step):
        first = cell_start[cell]
        last = cell_start[cell + 1]
        if first == last:
            continue
        for k in range(offsets[cell], offsets[cell + 1]):
            g = entries[k]
            p = params[g]
            s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = s8 = s9 = 0.0
            for i in range(first, last):
                inside, q, r0, r1, r2 = _mahalanobis(p, coords[i, 0], coords[i, 1], coords[i, 2], c2)
                if inside:
                    ge = grad[i] * math.exp(-0.5 * q)
                    s0 += ge
                    s1 += ge * r0
                    s2 += ge * r1
                    s3 += ge * r2
                    s4 += ge * r0 * r0
                    s5 += ge * r1 * r1
                    s6 += ge * r2 * r2
                    s7 += ge * r0 * r1
                    s8 += ge * r0 * r2
                    s9 += ge * r1 * r2
            buf[g, 0] += s0
            buf[g, 1] += s1
            buf[g, 2] += s2
            buf[g, 3] += s3
            buf[g, 4] += s4
            buf[g, 5] += s5
            buf[g, 6] += s6
            buf[g, 7] += s7
            buf[g, 8] += s8
            buf[g, 9] += s9
