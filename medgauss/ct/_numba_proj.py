"""Numba CPU backend of the voxel projectors (Joseph's method, see :mod:`medgauss.ct._joseph`).

- Forward: parallel over (batch, view, detector row); each item owns its output pixels.
- Adjoint (back projection): parallel over z-slabs of the volume; each slab walks every ray but
  only the part of it whose bilinear footprint touches the slab, and writes only voxels of the slab,
  so there are no write races and no per-thread volume copies. The adjoint uses the same ray setup
  and the same weights as the forward pass, so ``<A x, y> = <x, A^T y>`` holds to rounding.

The kernels are serial ``nogil`` functions over an interleaved share ``range(task, total, num_tasks)``
of their items, run on the thread pool of :mod:`medgauss._parallel` (the library's one threading and
fork policy: no ``parallel=True``, so they run the same before and after a fork, e.g. in DataLoader
workers). Results do not depend on the number of threads.

Both are wrapped in ``torch.autograd.Function`` s whose backward is the other one, so this backend is
differentiable too.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit
from torch import Tensor

from medgauss._parallel import num_tasks, run_tasks
from medgauss.ct._joseph import kernel_arguments
from medgauss.geometry import CircularGeometry

__all__ = ["forward_project", "back_project"]

_EPS = 1e-12


_JIT = {"cache": True, "nogil": True}


@njit(**_JIT)
def _ray_setup(vec, v, r, c, is_cone, org, sp, n0, n1, n2):
    """Index-space ray of pixel (r, c) of view v, clipped to the interpolation support.

    Returns ``(ok, a, k0, k1, oa, da, ob, db, oc, db_c, weight, axis_b, axis_c)``: dominant axis ``a``,
    plane range ``k0..k1`` (inclusive), the ray's origin / direction components along ``a`` and the two
    other axes ``b < c``, and the mm length per plane step.
    """
    px = vec[v, 3] + c * vec[v, 6] + r * vec[v, 9]
    py = vec[v, 4] + c * vec[v, 7] + r * vec[v, 10]
    pz = vec[v, 5] + c * vec[v, 8] + r * vec[v, 11]
    if is_cone:
        ox, oy, oz = vec[v, 0], vec[v, 1], vec[v, 2]
        dx, dy, dz = px - ox, py - oy, pz - oz
        norm = math.sqrt(dx * dx + dy * dy + dz * dz)
        dx, dy, dz = dx / norm, dy / norm, dz / norm
        tmin = 0.0
    else:
        ox, oy, oz = px, py, pz
        dx, dy, dz = vec[v, 0], vec[v, 1], vec[v, 2]
        tmin = -np.inf
    o = ((oz - org[0]) / sp[0], (oy - org[1]) / sp[1], (ox - org[2]) / sp[2])
    d = (dz / sp[0], dy / sp[1], dx / sp[2])
    n = (n0, n1, n2)
    tmax = np.inf
    ok = True
    for j in range(3):
        if abs(d[j]) < _EPS:
            if o[j] <= -1.0 or o[j] >= n[j]:
                ok = False
        else:
            t1 = (-1.0 - o[j]) / d[j]
            t2 = (n[j] - o[j]) / d[j]
            tmin = max(tmin, min(t1, t2))
            tmax = min(tmax, max(t1, t2))
    a = 0
    if abs(d[1]) > abs(d[a]):
        a = 1
    if abs(d[2]) > abs(d[a]):
        a = 2
    if a == 0:
        b, cc = 1, 2
    elif a == 1:
        b, cc = 0, 2
    else:
        b, cc = 0, 1
    k0, k1 = 0, -1
    weight = 0.0
    if ok and tmax > tmin:
        p1 = o[a] + tmin * d[a]
        p2 = o[a] + tmax * d[a]
        k0 = max(0, int(math.ceil(min(p1, p2))))
        k1 = min(n[a] - 1, int(math.floor(max(p1, p2))))
        weight = 1.0 / abs(d[a])
    return k0, k1, a, b, cc, o[a], d[a], o[b], d[b], o[cc], d[cc], weight


@njit(**_JIT)
def _interior_range(k0, k1, oa, da, o, d, lo, hi, margin):
    """Planes ``k`` in ``[k0, k1]`` where ``p = o + (k - oa) d / da`` lies in ``[lo + margin, hi - 1 - margin]``,
    i.e. where both bilinear neighbours ``floor(p)`` and ``floor(p) + 1`` lie in ``[lo, hi)`` (no bounds
    checks needed). ``margin`` keeps rounding of ``p`` from crossing a bound."""
    slope = d / da
    lo_p, hi_p = lo + margin, hi - 1.0 - margin
    if hi_p < lo_p:
        return k1 + 1, k1
    if abs(slope) < _EPS:
        if o < lo_p or o > hi_p:
            return k1 + 1, k1
        return k0, k1
    ka = oa + (lo_p - o) / slope
    kb = oa + (hi_p - o) / slope
    first = max(k0, int(math.ceil(min(ka, kb))) + 1)
    last = min(k1, int(math.floor(max(ka, kb))) - 1)
    if last < first:
        return k1 + 1, k1
    return first, last


@njit(**_JIT)
def _sample_checked(vol, bi, base, ib, ic, fb, fc, nbsz, ncsz, sb, sc):
    acc = 0.0
    if ib >= 0 and ib < nbsz:
        if ic >= 0 and ic < ncsz:
            acc += (1.0 - fb) * (1.0 - fc) * vol[bi, base + ib * sb + ic * sc]
        if ic + 1 >= 0 and ic + 1 < ncsz:
            acc += (1.0 - fb) * fc * vol[bi, base + ib * sb + (ic + 1) * sc]
    if ib + 1 >= 0 and ib + 1 < nbsz:
        if ic >= 0 and ic < ncsz:
            acc += fb * (1.0 - fc) * vol[bi, base + (ib + 1) * sb + ic * sc]
        if ic + 1 >= 0 and ic + 1 < ncsz:
            acc += fb * fc * vol[bi, base + (ib + 1) * sb + (ic + 1) * sc]
    return acc


@njit(**_JIT)
def _forward_kernel(vol, vec, is_cone, org, sp, shape, out, task, total, num_tasks):
    """vol ``[B, D*H*W]``, out ``[B, V, rows, cols]`` (written) for the (batch, view, row) items
    ``range(task, total, num_tasks)``, ``total = B * V * rows``.

    Each ray's planes are split into an interior run (all four bilinear neighbours inside the volume,
    no bounds checks) and the checked runs before and after it; the arithmetic is the same in both.
    """
    nb, nv, rows, cols = out.shape
    n0, n1, n2 = shape[0], shape[1], shape[2]
    strides = (n1 * n2, n2, 1)
    for job in range(task, total, num_tasks):
        bi = job // (nv * rows)
        v = (job // rows) % nv
        r = job % rows
        for c in range(cols):
            k0, k1, a, b, cc, oa, da, ob, db, oc, dc, weight = _ray_setup(vec, v, r, c, is_cone, org, sp, n0, n1, n2)
            nbsz = shape[b]
            ncsz = shape[cc]
            sa, sb, sc = strides[a], strides[b], strides[cc]
            lb, hb = _interior_range(k0, k1, oa, da, ob, db, 0, nbsz, 1e-6)
            lc, hc = _interior_range(k0, k1, oa, da, oc, dc, 0, ncsz, 1e-6)
            fast_lo, fast_hi = max(lb, lc), min(hb, hc)
            if fast_hi < fast_lo:
                fast_lo, fast_hi = k1 + 1, k1
            acc = 0.0
            for k in range(k0, min(k1, fast_lo - 1) + 1):
                t = (k - oa) / da
                pb = ob + t * db
                pc = oc + t * dc
                ib = int(math.floor(pb))
                ic = int(math.floor(pc))
                acc += _sample_checked(vol, bi, k * sa, ib, ic, pb - ib, pc - ic, nbsz, ncsz, sb, sc)
            for k in range(fast_lo, fast_hi + 1):
                t = (k - oa) / da
                pb = ob + t * db
                pc = oc + t * dc
                ib = int(pb)
                ic = int(pc)
                fb = pb - ib
                fc = pc - ic
                i00 = k * sa + ib * sb + ic * sc
                acc += (1.0 - fb) * ((1.0 - fc) * vol[bi, i00] + fc * vol[bi, i00 + sc]) + fb * (
                    (1.0 - fc) * vol[bi, i00 + sb] + fc * vol[bi, i00 + sb + sc]
                )
            for k in range(max(k0, fast_hi + 1), k1 + 1):
                t = (k - oa) / da
                pb = ob + t * db
                pc = oc + t * dc
                ib = int(math.floor(pb))
                ic = int(math.floor(pc))
                acc += _sample_checked(vol, bi, k * sa, ib, ic, pb - ib, pc - ic, nbsz, ncsz, sb, sc)
            out[bi, v, r, c] = acc * weight


@njit(**_JIT)
def _adjoint_kernel(proj, vec, is_cone, org, sp, shape, out, task, num_slabs, num_tasks):
    """proj ``[B, V, rows, cols]``, out ``[B, D*H*W]`` (zeroed by the caller, accumulated) for the slabs
    ``range(task, num_slabs, num_tasks)`` of ``num_slabs`` equal z-slabs."""
    nb, nv, rows, cols = proj.shape
    n0, n1, n2 = shape[0], shape[1], shape[2]
    strides = (n1 * n2, n2, 1)
    for slab in range(task, num_slabs, num_tasks):
        z0 = slab * n0 // num_slabs
        z1 = (slab + 1) * n0 // num_slabs
        for bi in range(nb):
            for v in range(nv):
                for r in range(rows):
                    for c in range(cols):
                        val = proj[bi, v, r, c]
                        if val == 0.0:
                            continue
                        k0, k1, a, b, cc, oa, da, ob, db, oc, dc, weight = _ray_setup(
                            vec, v, r, c, is_cone, org, sp, n0, n1, n2
                        )
                        if k1 < k0:
                            continue
                        if a == 0:
                            k0 = max(k0, z0)
                            k1 = min(k1, z1 - 1)
                        else:
                            # axis 0 is axis b: z(k) = ob + (k - oa) db / da must satisfy z in [z0 - 1, z1)
                            slope = db / da
                            if abs(slope) < _EPS:
                                if ob < z0 - 1.0 or ob >= z1:
                                    continue
                            else:
                                ka = oa + (z0 - 1.0 - ob) / slope
                                kb = oa + (z1 - ob) / slope
                                k0 = max(k0, int(math.floor(min(ka, kb))) - 1)
                                k1 = min(k1, int(math.ceil(max(ka, kb))) + 1)
                        if k1 < k0:
                            continue
                        nbsz = shape[b]
                        ncsz = shape[cc]
                        sa, sb, sc = strides[a], strides[b], strides[cc]
                        lo_b, hi_b = 0, nbsz
                        if a != 0:
                            lo_b, hi_b = z0, z1
                        w = val * weight
                        lb, hb = _interior_range(k0, k1, oa, da, ob, db, lo_b, hi_b, 1e-6)
                        lc, hc = _interior_range(k0, k1, oa, da, oc, dc, 0, ncsz, 1e-6)
                        fast_lo, fast_hi = max(lb, lc), min(hb, hc)
                        if fast_hi < fast_lo:
                            fast_lo, fast_hi = k1 + 1, k1
                        for k in range(k0, k1 + 1):
                            t = (k - oa) / da
                            pb = ob + t * db
                            pc = oc + t * dc
                            if k >= fast_lo and k <= fast_hi:
                                ib = int(pb)
                                ic = int(pc)
                                fb = pb - ib
                                fc = pc - ic
                                i00 = k * sa + ib * sb + ic * sc
                                out[bi, i00] += w * (1.0 - fb) * (1.0 - fc)
                                out[bi, i00 + sc] += w * (1.0 - fb) * fc
                                out[bi, i00 + sb] += w * fb * (1.0 - fc)
                                out[bi, i00 + sb + sc] += w * fb * fc
                                continue
                            ib = int(math.floor(pb))
                            ic = int(math.floor(pc))
                            fb = pb - ib
                            fc = pc - ic
                            base = k * sa
                            if ib >= lo_b and ib < hi_b:
                                if ic >= 0 and ic < ncsz:
                                    out[bi, base + ib * sb + ic * sc] += w * (1.0 - fb) * (1.0 - fc)
                                if ic + 1 >= 0 and ic + 1 < ncsz:
                                    out[bi, base + ib * sb + (ic + 1) * sc] += w * (1.0 - fb) * fc
                            if ib + 1 >= lo_b and ib + 1 < hi_b:
                                if ic >= 0 and ic < ncsz:
                                    out[bi, base + (ib + 1) * sb + ic * sc] += w * fb * (1.0 - fc)
                                if ic + 1 >= 0 and ic + 1 < ncsz:
                                    out[bi, base + (ib + 1) * sb + (ic + 1) * sc] += w * fb * fc


def _numpy(t: Tensor) -> np.ndarray:
    # One float64 kernel per operation: halves the JIT compile time and accumulates in float64.
    return t.detach().to(torch.float64).contiguous().numpy()


def _forward(volume: Tensor, geometry: CircularGeometry) -> Tensor:
    args = kernel_arguments(geometry)
    b = volume.shape[0]
    rows, cols = args["det_shape"]
    vol = _numpy(volume.reshape(b, -1))
    out = np.empty((b, geometry.num_views, rows, cols), dtype=np.float64)
    run_tasks(_forward_kernel, b * geometry.num_views * rows, vol, args["vectors"], args["is_cone"], args["origin"],
              args["spacing"], args["vol_shape"], out)
    return torch.from_numpy(out).to(volume.dtype)


def _adjoint(projections: Tensor, geometry: CircularGeometry) -> Tensor:
    args = kernel_arguments(geometry)
    b = projections.shape[0]
    d, h, w = geometry.vol_shape
    proj = _numpy(projections)
    out = np.zeros((b, d * h * w), dtype=np.float64)
    # Every slab walks every ray: as many slabs as tasks (one task per slab), at most one per z-plane.
    num_slabs = num_tasks(d)
    run_tasks(_adjoint_kernel, num_slabs, proj, args["vectors"], args["is_cone"], args["origin"], args["spacing"],
              args["vol_shape"], out, tasks=num_slabs)
    return torch.from_numpy(out).reshape(b, 1, d, h, w).to(projections.dtype)


class _ForwardProject(torch.autograd.Function):
    @staticmethod
    def forward(ctx, volume: Tensor, geometry: CircularGeometry) -> Tensor:  # type: ignore[override]
        ctx.geometry = geometry
        return _forward(volume, geometry)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return _BackProject.apply(grad, ctx.geometry), None


class _BackProject(torch.autograd.Function):
    @staticmethod
    def forward(ctx, projections: Tensor, geometry: CircularGeometry) -> Tensor:  # type: ignore[override]
        ctx.geometry = geometry
        return _adjoint(projections, geometry)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return _ForwardProject.apply(grad, ctx.geometry), None


def forward_project(volume: Tensor, geometry: CircularGeometry) -> Tensor:
    """Joseph forward projection on CPU: ``[B, 1, D, H, W]`` per mm -> ``[B, V, rows, cols]`` line integrals.

    Inputs are assumed validated by :func:`medgauss.ct.forward_project`. Differentiable.
    """
    return _ForwardProject.apply(volume, geometry)


def back_project(projections: Tensor, geometry: CircularGeometry) -> Tensor:
    """Matched adjoint of :func:`forward_project`: ``[B, V, rows, cols]`` -> ``[B, 1, D, H, W]``."""
    return _BackProject.apply(projections, geometry)
