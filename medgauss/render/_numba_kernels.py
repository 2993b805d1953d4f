"""Numba kernels of the CPU splat backend (float64, and a float32 dense forward pass; no torch here).

Everything is in *voxel units*: voxel ``i`` of an axis sits at coordinate ``i``. Each Gaussian is
described by one row of ``params [G, NUM_PARAMS]`` (``G = B * N``, batch-major) holding its mean
and its precision ``P`` in the factored (LDL) form used by every kernel::

    r = u - mean                                   (voxel offset along D, H, W)
    q = T * r0^2                                   (marginal along D; T = 1 / Sigma_00)
      + S11 * (r1 - SLOPE1 * r0)^2                 (H given D)
      + A * (r2 - SLOPE20 * r0 - SLOPE21 * r1)^2   (W given D, H; A = P_22)

which equals ``r^T P r`` exactly in real arithmetic and is well conditioned in floating point.
A term counts when ``q < c2``. Every kernel evaluates ``q`` with the same sequence of floating
point operations, so the dense and the point kernels, forward and backward, agree on which
(Gaussian, voxel) pairs are inside, and a pair skipped by culling is always one with ``q >= c2``.

Kernels are plain ``nogil`` functions over an index range; the adapter runs disjoint ranges on
a thread pool (no ``parallel=True``: its compilation costs tens of seconds, and the pool balances
load dynamically). Dense forward: parallel over ``(b, d)`` slabs; per Gaussian touching the slab
and per row ``h`` the inside voxels form a contiguous chord along W, found from the quadratic
``q(w)`` and then checked at its ends. Along the chord ``exp(-q/2)`` is advanced by
multiplications from the row's peak outwards (``e[w+1] = e[w] * rho[w]``,
``rho[w+1] = rho[w] * exp(-A)``), two or three ``exp`` per row. Float32 Gaussians use
``dense_forward_f32`` instead: same chords, each voxel's ``exp`` evaluated independently by a
vectorisable float32 ``exp`` (see its section).
Dense backward: parallel over Gaussians; each owns its 10 gradient sums and reads the upstream
gradient along the same chords. Points: Gaussians are binned into a coarse cell grid (CSR) and
points are sorted by cell; the forward pass is parallel over cells (each runs its Gaussian list
against its own points), the backward over ranges of cells with private gradient buffers.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from medgauss.render._fast_exp import FASTMATH, fast_exp_f32

# Columns of ``params``.
M0, M1, M2, SCHUR_D, SCHUR_H, SLOPE1, PREC_W, SLOPE20, SLOPE21, DECAY, INTENSITY = range(11)
NUM_PARAMS = 11
# Columns of the per-Gaussian gradient sums, weighted by the upstream gradient g and e = exp(-q/2):
# sum(g e), sum(g e r_a) for a = 0..2, sum(g e r_a r_b) in the packed order 00, 11, 22, 01, 02, 12.
NUM_SUMS = 10

_JIT = {"cache": True, "nogil": True, "error_model": "numpy"}


@njit(**_JIT)
def _padded_range(center: float, half: float, n: int) -> tuple[int, int]:
    """Indices ``[lo, hi]`` in ``[0, n)`` covering ``(center - half, center + half)`` plus one each side."""
    lo = math.ceil(max(center - half, -2.0)) - 1
    hi = math.floor(min(center + half, n + 1.0)) + 1
    return max(lo, 0), min(hi, n - 1)


@njit(**_JIT)
def _row_q(w: int, m2: float, offset: float, a: float, q_row: float) -> float:
    dw = (w - m2) - offset
    return a * (dw * dw) + q_row


@njit(**_JIT)
def _chord(m2: float, offset: float, a: float, inv_a: float, q_row: float, c2: float, n: int
           ) -> tuple[int, int]:
    """Voxels ``[lo, hi]`` of a row (``0 <= w < n``) with ``q(w) < c2``; empty when ``lo > hi``.

    Estimated from the quadratic (``inv_a = 1 / a``, a multiplication instead of a division per
    row), then moved until the ends agree with ``_row_q`` itself (``q`` is monotone on each side of
    its minimum, so the inside set is one interval): the estimate never changes the result.
    """
    center = m2 + offset
    half = math.sqrt((c2 - q_row) * inv_a)
    lo = max(math.ceil(max(center - half, -1.0)), 0)
    hi = min(math.floor(min(center + half, float(n))), n - 1)
    while lo <= hi and not _row_q(lo, m2, offset, a, q_row) < c2:
        lo += 1
    while lo > 0 and lo <= hi + 1 and _row_q(lo - 1, m2, offset, a, q_row) < c2:
        lo -= 1
    while hi >= lo and not _row_q(hi, m2, offset, a, q_row) < c2:
        hi -= 1
    while hi < n - 1 and hi >= lo - 1 and _row_q(hi + 1, m2, offset, a, q_row) < c2:
        hi += 1
    return lo, hi


@njit(**_JIT)
def _peak(m2: float, offset: float, lo: int, hi: int) -> int:
    """The chord voxel nearest the row's minimum of ``q``; walking outwards from it ``q`` only grows."""
    return min(max(math.floor(m2 + offset + 0.5), lo), hi)


@njit(**_JIT)
def _mahalanobis(p: np.ndarray, u0: float, u1: float, u2: float) -> tuple[float, float, float, float]:
    """``(q, r0, r1, r2)`` of Gaussian row ``p`` at voxel coordinate ``u``, in the kernels' common form."""
    r0 = u0 - p[M0]
    r1 = u1 - p[M1]
    q = p[SCHUR_D] * (r0 * r0)
    dh = r1 - p[SLOPE1] * r0
    q = q + p[SCHUR_H] * (dh * dh)
    offset = p[SLOPE20] * r0 + p[SLOPE21] * r1
    dw = (u2 - p[M2]) - offset
    q = p[PREC_W] * (dw * dw) + q
    return q, r0, r1, u2 - p[M2]


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


@njit(**_JIT)
def dense_forward(params: np.ndarray, d_lo: np.ndarray, d_hi: np.ndarray, batch: int, depth: int,
                  height: int, width: int, c2: float, out: np.ndarray, first: int, last: int) -> None:
    """Dense splat of the slabs ``first <= b * D + d < last`` into ``out [B*D*H*W]`` (accumulated).

    ``params [B*N, NUM_PARAMS]``; ``d_lo, d_hi [B*N]`` are slab ranges that only cull (they may be
    wider than the Gaussian): ``q < c2`` decides every pair. Calls with disjoint slab ranges write
    disjoint parts of ``out`` and may run concurrently (the GIL is released).
    """
    n = params.shape[0] // batch
    for slab in range(first, last):
        b = slab // depth
        d = slab - b * depth
        for i in range(n):
            g = b * n + i
            if d < d_lo[g] or d > d_hi[g]:
                continue
            p = params[g]
            r0 = d - p[M0]
            q0 = p[SCHUR_D] * (r0 * r0)
            if not q0 < c2:
                continue
            s11 = p[SCHUR_H]
            a = p[PREC_W]
            inv_a = 1.0 / a
            h_first, h_last = _padded_range(p[M1] + p[SLOPE1] * r0, math.sqrt((c2 - q0) / s11), height)
            for h in range(h_first, h_last + 1):
                r1 = h - p[M1]
                dh = r1 - p[SLOPE1] * r0
                q_row = q0 + s11 * (dh * dh)
                if not q_row < c2:
                    continue
                offset = p[SLOPE20] * r0 + p[SLOPE21] * r1
                lo, hi = _chord(p[M2], offset, a, inv_a, q_row, c2, width)
                if lo > hi:
                    continue
                peak = _peak(p[M2], offset, lo, hi)
                delta = (peak - p[M2]) - offset
                _add_row(out, (slab * height + h) * width, lo, hi, peak, delta, a, p[DECAY], q_row,
                         p[INTENSITY])


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
def dense_backward(params: np.ndarray, d_lo: np.ndarray, d_hi: np.ndarray, grad: np.ndarray, batch: int,
                   depth: int, height: int, width: int, c2: float, sums: np.ndarray, first: int,
                   last: int) -> None:
    """Gradient sums ``sums[g]`` of the Gaussians ``first <= g < last`` for the upstream ``grad [B*D*H*W]``.

    Each Gaussian reads the gradient along the chords of its own ellipsoid; calls with disjoint
    ranges write disjoint rows of ``sums`` and may run concurrently.
    """
    n = params.shape[0] // batch
    for g in range(first, last):
        b = g // n
        p = params[g]
        s11 = p[SCHUR_H]
        a = p[PREC_W]
        inv_a = 1.0 / a
        a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = a8 = a9 = 0.0
        for d in range(d_lo[g], d_hi[g] + 1):
            r0 = d - p[M0]
            q0 = p[SCHUR_D] * (r0 * r0)
            if not q0 < c2:
                continue
            h_first, h_last = _padded_range(p[M1] + p[SLOPE1] * r0, math.sqrt((c2 - q0) / s11), height)
            for h in range(h_first, h_last + 1):
                r1 = h - p[M1]
                dh = r1 - p[SLOPE1] * r0
                q_row = q0 + s11 * (dh * dh)
                if not q_row < c2:
                    continue
                offset = p[SLOPE20] * r0 + p[SLOPE21] * r1
                lo, hi = _chord(p[M2], offset, a, inv_a, q_row, c2, width)
                if lo > hi:
                    continue
                peak = _peak(p[M2], offset, lo, hi)
                delta = (peak - p[M2]) - offset
                t0, t1, t2 = _row_sums(grad, ((b * depth + d) * height + h) * width, lo, hi, peak, delta,
                                       a, p[DECAY], q_row, peak - p[M2])
                a0 += t0
                a1 += r0 * t0
                a2 += r1 * t0
                a3 += t1
                a4 += r0 * r0 * t0
                a5 += r1 * r1 * t0
                a6 += t2
                a7 += r0 * r1 * t0
                a8 += r0 * t1
                a9 += r1 * t1
        sums[g, 0] = a0
        sums[g, 1] = a1
        sums[g, 2] = a2
        sums[g, 3] = a3
        sums[g, 4] = a4
        sums[g, 5] = a5
        sums[g, 6] = a6
        sums[g, 7] = a7
        sums[g, 8] = a8
        sums[g, 9] = a9


# ----------------------------------------------------------------------- dense, float32 fast path
#
# Why a second forward kernel: the multiplicative walk above is exact in float64 but serial (two
# dependent multiply chains per row, ~2.3 ns per pair), and ``math.exp`` is a scalar libm call
# here (no SVML). For float32 Gaussians the rows are instead evaluated independently per voxel,
# ``exp(-q/2)`` by the vectorisable :func:`fast_exp_f32`, so LLVM emits packed AVX code. Per
# (slab, Gaussian) the rows' chords are found first (float64, ``_chord``: the same inside test as
# every other kernel), then the vector loops run back to back, free of the chord logic's branches.

_F32_ZERO = np.float32(0.0)
# Each chord is evaluated over whole blocks of this many voxels (the vector width of float32 on
# AVX2; AVX-512 runs two blocks per instruction pair), masked to the chord: no scalar remainder.
_BLOCK = 8
_JIT_F32 = {**_JIT, "fastmath": FASTMATH}


@njit(**_JIT_F32)
def _add_row_f32(out: np.ndarray, base: int, lo: int, hi: int, width: int, dw_lo: np.float32,
                 neg_half_a: np.float32, neg_half_q_row: np.float32, intensity: np.float32) -> None:
    """``out[base + w] += I exp(-q(w)/2)`` for ``lo <= w <= hi`` (``out`` float32), vectorised.

    ``q(w) = a (dw_lo + w - lo)^2 + q_row``. The loop covers the chord rounded up to whole
    blocks, shifted to stay inside the row ``[0, width)``; voxels outside the chord add exactly 0
    (the row belongs to the calling thread, so touching its other voxels is race-free). Indices
    are unsigned so numba emits no negative-index wraparound, which would block vectorisation.
    """
    padded = ((hi - lo) // _BLOCK + 1) * _BLOCK
    start = max(min(lo, width - padded), 0)
    count = min(padded, width - start)
    first = np.uint64(base + start)
    dw_start = dw_lo - np.float32(lo - start)
    inside_lo = np.uint64(lo - start)
    inside_hi = np.uint64(hi - start)
    for j in range(count):
        dw = dw_start + np.float32(j)
        e = intensity * fast_exp_f32(neg_half_a * (dw * dw) + neg_half_q_row)
        k = np.uint64(j)
        out[first + k] += e if (k >= inside_lo and k <= inside_hi) else _F32_ZERO


@njit(**_JIT_F32)
def _add_row_pair_f32(out: np.ndarray, base_a: int, lo_a: int, hi_a: int, dw_lo_a: np.float32,
                      neg_half_q_a: np.float32, base_b: int, lo_b: int, hi_b: int, dw_lo_b: np.float32,
                      neg_half_q_b: np.float32, width: int, neg_half_a: np.float32,
                      intensity: np.float32) -> None:
    """:func:`_add_row_f32` for two different rows ``a`` and ``b`` of one Gaussian in one loop.

    Why: chords are short (~24 voxels for sigma ~ 6 voxels) and each ``exp`` is a long dependency
    chain, so one row per loop leaves the core waiting on latency (measured: ~1.5x slower). Both
    rows are padded to the longer one's block count; rows too wide for that go one at a time.
    """
    padded = max(((hi_a - lo_a) // _BLOCK + 1) * _BLOCK, ((hi_b - lo_b) // _BLOCK + 1) * _BLOCK)
    if padded > width:
        _add_row_f32(out, base_a, lo_a, hi_a, width, dw_lo_a, neg_half_a, neg_half_q_a, intensity)
        _add_row_f32(out, base_b, lo_b, hi_b, width, dw_lo_b, neg_half_a, neg_half_q_b, intensity)
        return
    start_a = min(lo_a, width - padded)
    start_b = min(lo_b, width - padded)
    first_a = np.uint64(base_a + start_a)
    first_b = np.uint64(base_b + start_b)
    dw_start_a = dw_lo_a - np.float32(lo_a - start_a)
    dw_start_b = dw_lo_b - np.float32(lo_b - start_b)
    inside_lo_a, inside_hi_a = np.uint64(lo_a - start_a), np.uint64(hi_a - start_a)
    inside_lo_b, inside_hi_b = np.uint64(lo_b - start_b), np.uint64(hi_b - start_b)
    for j in range(padded):
        dw_a = dw_start_a + np.float32(j)
        dw_b = dw_start_b + np.float32(j)
        e_a = intensity * fast_exp_f32(neg_half_a * (dw_a * dw_a) + neg_half_q_a)
        e_b = intensity * fast_exp_f32(neg_half_a * (dw_b * dw_b) + neg_half_q_b)
        k = np.uint64(j)
        out[first_a + k] += e_a if (k >= inside_lo_a and k <= inside_hi_a) else _F32_ZERO
        out[first_b + k] += e_b if (k >= inside_lo_b and k <= inside_hi_b) else _F32_ZERO


@njit(**_JIT)
def _estimate_chords(p: np.ndarray, r0: float, q0: float, h_first: int, rows: int, c2: float, width: int,
                     inv_a: float, q_row: np.ndarray, offset: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                     verified: np.ndarray) -> None:
    """Chords of rows ``h_first .. h_first + rows - 1`` of one slab, branch-free (vectorised over rows).

    Writes per row ``q_row``, ``offset``, the quadratic's estimate ``[lo, hi]`` (as floats) and
    ``verified``: the estimate is non-empty and its ends pass ``_chord``'s own end tests, so it is
    exactly what ``_chord`` returns (same expressions, same rounding; ``_chord``'s loops would not
    move). Rows not verified (empty or off by a voxel) are left to ``_chord``.
    """
    m1, m2, a = p[M1], p[M2], p[PREC_W]
    s11, slope1, slope20, slope21 = p[SCHUR_H], p[SLOPE1], p[SLOPE20], p[SLOPE21]
    last = width - 1.0
    for k in range(rows):
        r1 = (h_first + k) - m1
        dh = r1 - slope1 * r0
        q = q0 + s11 * (dh * dh)
        off = slope20 * r0 + slope21 * r1
        center = m2 + off
        half = math.sqrt(max(c2 - q, 0.0) * inv_a)
        w_lo = max(np.ceil(max(center - half, -1.0)), 0.0)
        w_hi = min(np.floor(min(center + half, float(width))), last)
        dw_lo = (w_lo - m2) - off
        dw_before = ((w_lo - 1.0) - m2) - off
        dw_hi = (w_hi - m2) - off
        dw_after = ((w_hi + 1.0) - m2) - off
        ends_inside = (a * (dw_lo * dw_lo) + q < c2) & (a * (dw_hi * dw_hi) + q < c2)
        lo_is_first = (w_lo == 0.0) | (not a * (dw_before * dw_before) + q < c2)
        hi_is_last = (w_hi == last) | (not a * (dw_after * dw_after) + q < c2)
        q_row[k] = q
        offset[k] = off
        lo[k] = w_lo
        hi[k] = w_hi
        verified[k] = (q < c2) & (w_lo <= w_hi) & ends_inside & lo_is_first & hi_is_last


@njit(**_JIT)
def dense_forward_f32(params: np.ndarray, d_lo: np.ndarray, d_hi: np.ndarray, batch: int, depth: int,
                      height: int, width: int, c2: float, out: np.ndarray, first: int, last: int) -> None:
    """Float32 twin of :func:`dense_forward`: same arguments, ``out [B*D*H*W]`` float32 (accumulated).

    Same pairs as the float64 kernels (chords from the float64 parameters by the same expressions;
    this function is compiled without ``contract`` so none of them becomes a fused multiply-add);
    values differ by float32 rounding: ``q`` in float32 relative to the row's first voxel and
    ``exp`` within 2 ulps, so each term has a relative error of about ``1e-7 (1 + q)``.
    """
    n = params.shape[0] // batch
    est_q = np.empty(height + 2)
    est_offset = np.empty(height + 2)
    est_lo = np.empty(height + 2)
    est_hi = np.empty(height + 2)
    est_verified = np.empty(height + 2, dtype=np.bool_)
    row_base = np.empty(height, dtype=np.int64)
    row_lo = np.empty(height, dtype=np.int64)
    row_hi = np.empty(height, dtype=np.int64)
    row_dw_lo = np.empty(height, dtype=np.float32)
    row_neg_half_q = np.empty(height, dtype=np.float32)
    for slab in range(first, last):
        b = slab // depth
        d = slab - b * depth
        for i in range(n):
            g = b * n + i
            if d < d_lo[g] or d > d_hi[g]:
                continue
            p = params[g]
            r0 = d - p[M0]
            q0 = p[SCHUR_D] * (r0 * r0)
            if not q0 < c2:
                continue
            a = p[PREC_W]
            inv_a = 1.0 / a
            h_first, h_last = _padded_range(p[M1] + p[SLOPE1] * r0, math.sqrt((c2 - q0) / p[SCHUR_H]), height)
            _estimate_chords(p, r0, q0, h_first, h_last - h_first + 1, c2, width, inv_a, est_q, est_offset,
                             est_lo, est_hi, est_verified)
            rows = 0
            for k in range(h_last - h_first + 1):
                q_row = est_q[k]
                if not q_row < c2:
                    continue
                offset = est_offset[k]
                if est_verified[k]:
                    lo, hi = int(est_lo[k]), int(est_hi[k])
                else:
                    lo, hi = _chord(p[M2], offset, a, inv_a, q_row, c2, width)
                    if lo > hi:
                        continue
                row_base[rows] = (slab * height + h_first + k) * width
                row_lo[rows] = lo
                row_hi[rows] = hi
                row_dw_lo[rows] = np.float32((lo - p[M2]) - offset)
                row_neg_half_q[rows] = np.float32(-0.5 * q_row)
                rows += 1
            neg_half_a = np.float32(-0.5 * a)
            intensity = np.float32(p[INTENSITY])
            for k in range(0, rows - 1, 2):
                _add_row_pair_f32(out, row_base[k], row_lo[k], row_hi[k], row_dw_lo[k], row_neg_half_q[k],
                                  row_base[k + 1], row_lo[k + 1], row_hi[k + 1], row_dw_lo[k + 1],
                                  row_neg_half_q[k + 1], width, neg_half_a, intensity)
            if rows % 2 == 1:
                k = rows - 1
                _add_row_f32(out, row_base[k], row_lo[k], row_hi[k], width, row_dw_lo[k], neg_half_a,
                             row_neg_half_q[k], intensity)


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
                   entries: np.ndarray, c2: float, out: np.ndarray, cell_first: int, cell_last: int) -> None:
    """Splat at the points of cells ``cell_first <= c < cell_last`` into ``out [P]`` (sorted order).

    ``coords [P, 3]`` are voxel coordinates sorted by cell; each cell runs its Gaussian list
    against its own points. Calls with disjoint cell ranges may run concurrently.
    """
    for cell in range(cell_first, cell_last):
        first = cell_start[cell]
        last = cell_start[cell + 1]
        if first == last:
            continue
        for k in range(offsets[cell], offsets[cell + 1]):
            p = params[entries[k]]
            intensity = p[INTENSITY]
            for i in range(first, last):
                q = _mahalanobis(p, coords[i, 0], coords[i, 1], coords[i, 2])[0]
                if q < c2:
                    out[i] += intensity * math.exp(-0.5 * q)


@njit(**_JIT)
def points_backward(params: np.ndarray, coords: np.ndarray, cell_start: np.ndarray, offsets: np.ndarray,
                    entries: np.ndarray, c2: float, grad: np.ndarray, buf: np.ndarray, cell_first: int,
                    cell_last: int) -> None:
    """Add the gradient sums of cells ``cell_first <= c < cell_last`` into ``buf [B*N, NUM_SUMS]``.

    ``grad [P]`` is the upstream gradient in sorted point order. Concurrent calls need separate
    ``buf`` (summed afterwards): a Gaussian is listed in many cells.
    """
    for cell in range(cell_first, cell_last):
        first = cell_start[cell]
        last = cell_start[cell + 1]
        if first == last:
            continue
        for k in range(offsets[cell], offsets[cell + 1]):
            g = entries[k]
            p = params[g]
            s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = s8 = s9 = 0.0
            for i in range(first, last):
                q, r0, r1, r2 = _mahalanobis(p, coords[i, 0], coords[i, 1], coords[i, 2])
                if q < c2:
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
