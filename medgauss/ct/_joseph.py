"""What every voxel projector backend shares: the ray parameters of a geometry in voxel-index space.

Both backends implement Joseph's method (P. M. Joseph, IEEE TMI 1982): a ray is sampled where it
crosses each voxel plane perpendicular to its *dominant* axis (the axis along which it advances
fastest in voxel units), the volume is bilinearly interpolated in that plane (zero outside), and each
sample is weighted by the ray length between two planes (``1 / |d_a|`` mm for index-space direction
``d``). Why Joseph and not Siddon: it is exact for any volume that is linear between voxel centres
(so it converges to the true line integral as the grid refines, while Siddon integrates a
piecewise-constant volume and aliases on fine detector grids), it has one sample per plane (regular,
vectorisable, ``grid_sample``-friendly on GPUs), its samples are continuous in the ray parameters
(gradients with respect to the volume are smooth), and its transpose is a simple bilinear scatter, so
the matched adjoint costs what the forward pass costs.

Index space: continuous voxel indices ``(i_d, i_h, i_w)`` with voxel centres at integers; a world
point ``(x, y, z)`` maps to ``((z - z0) / sd, (y - y0) / sh, (x - x0) / sw)`` with ``(z0, y0, x0)``
the centre of voxel ``(0, 0, 0)`` (``geometry.volume_origin``).
"""

from __future__ import annotations

import numpy as np

from medgauss.geometry import CircularGeometry


def kernel_arguments(geometry: CircularGeometry) -> dict[str, object]:
    """Plain numpy arguments of the projection kernels for ``geometry``.

    Returns a dict with ``vectors`` ``[V, 12]`` float64 (ASTRA-style ``src, d00, du, dv`` in world
    mm), ``is_cone`` bool, ``det_shape`` ``(rows, cols)``, ``vol_shape`` int64 ``[3]``, ``origin``
    float64 ``[3]`` (z, y, x of voxel (0, 0, 0), mm) and ``spacing`` float64 ``[3]`` (sd, sh, sw, mm).
    """
    return {
        "vectors": np.ascontiguousarray(geometry.vectors().numpy()),
        "is_cone": bool(geometry.is_cone),
        "det_shape": tuple(geometry.det_shape),
        "vol_shape": np.asarray(geometry.vol_shape, dtype=np.int64),
        "origin": np.asarray(geometry.volume_origin, dtype=np.float64),
        "spacing": np.asarray(geometry.vol_spacing, dtype=np.float64),
    }
