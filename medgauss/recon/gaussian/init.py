"""Non-learned initialisers of per-case Gaussian CT reconstruction (3DGR), in world millimetres.

Every initialiser returns :class:`~medgauss.gaussians.Gaussians` with batch 1 in the WORLD frame of the
reconstruction geometry (:class:`~medgauss.geometry.CircularGeometry`): ``means [1, N, 3]`` are (x, y, z)
mm, ``scales [1, N, 3]`` standard deviations in mm, ``quats [1, N, 4]`` (w, x, y, z), ``intensities [1, N]``
peak values in the volume's units (attenuation per mm for an FDK volume), and no ``linear_map``: the
plain form a reconstructor optimises. Voxel ``(d, h, w)`` of the geometry's grid sits at
``geometry.volume_affine @ (d, h, w, 1)``; every voxel-to-world conversion goes through
:func:`medgauss.gaussians.transform_points` with that affine. The dtype is float32 unless the input volume
is float64; the device is the volume's (CPU without one).

* :func:`init_from_fbp`: points at voxels of an FDK/FBP volume, two published recipes, ``"3dgr"``
  (3DGR-CT, gradient-ranked voxels of a half-resolution FBP; idea from 3DGR-CT's
  ``GaussianModel.create_from_fbp``) and ``"r2"`` (R²-Gaussian, random voxels above a density threshold;
  idea from R²-Gaussian's ``initialize_pcd.py`` / ``GaussianModel.create_from_pcd``).
* :func:`init_random`: uniform centres in the reconstruction box (the uninformed baseline).
* :func:`init_from_volume_fit`: Gaussians fitted to the volume by splatting
  (:func:`medgauss.gaussians.fit_gaussians_to_volume`), FaCT-GS's prior-volume warm start.

Rendering world Gaussians on the geometry's grid, as every least-squares factor here does:
``splat(gaussians_to_normalized(g, geometry.vol_shape, affine=geometry.volume_affine), geometry.vol_shape)``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from medgauss.gaussians import Gaussians, fit_gaussians_to_volume, gaussians_to_normalized, gaussians_to_world
from medgauss.gaussians.coords import transform_points
from medgauss.geometry import CircularGeometry

__all__ = [
    "RECIPES",
    "DEFAULT_RANDOM_INTENSITY",
    "check_volume_on_geometry",
    "init_from_fbp",
    "init_random",
    "init_from_volume_fit",
]

RECIPES = ("3dgr", "r2")
# Peak value of init_random's Gaussians when neither ``intensity`` nor ``volume`` is given: about half the
# linear attenuation of water (~0.02 mm^-1); Gaussians of init_random's scales overlap to ~2x their peak
# ((2 pi)^(3/2) / 8 = 1.97 for a scale of half the mean spacing), so their splat starts near water.
DEFAULT_RANDOM_INTENSITY = 0.01

# "3dgr": fraction of the (non-zero) voxels with the largest gradient that are skipped (3DGR-CT's ``start``).
_SKIP_FRACTION = 0.15
# "3dgr": edge of the cubic window in which selected neighbours are counted (3DGR-CT's ``kernel_size``).
_NEIGHBOUR_WINDOW = 5
# "3dgr": scale = _SCALE_FACTOR x the local spacing of the selected points (half-resolution voxels).
_SCALE_FACTOR = 0.5
# "r2": intensity = _R2_DENSITY_RESCALE x FDK value (R²-Gaussian's ``density_rescale``).
_R2_DENSITY_RESCALE = 0.15
# "r2": neighbours averaged in the scale (3DGS's ``distCUDA2``: mean squared distance to the 3 nearest).
_R2_NEIGHBOURS = 3
_KNN_BLOCK = 1 << 22  # entries of one block of the pairwise-distance matrix in the nearest-neighbour search


# ---------------------------------------------------------------------------------------------- checks
def check_volume_on_geometry(volume: Tensor, geometry: CircularGeometry, name: str = "volume") -> Tensor:
    """Validate a reconstruction-grid volume and return it, detached.

    Args:
        volume: ``[1, 1, D, H, W]`` float32 or float64 tensor with ``(D, H, W) = geometry.vol_shape``,
            finite, in any units.
        geometry: the reconstruction geometry whose grid the volume lies on.
        name: what to call the volume in error messages.

    Returns:
        ``volume.detach()`` (same tensor data, dtype and device).

    Raises:
        ValueError: naming ``name`` (or ``geometry``) for a non-tensor, a shape other than
            ``[1, 1, *geometry.vol_shape]``, a dtype other than float32/float64, or non-finite values.
    """
    if not isinstance(geometry, CircularGeometry):
        raise ValueError(f"geometry must be a medgauss.geometry.CircularGeometry, got {type(geometry).__name__}")
    if not isinstance(volume, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(volume).__name__}")
    expected = (1, 1, *geometry.vol_shape)
    if tuple(volume.shape) != expected:
        raise ValueError(f"{name} must have shape [1, 1, *geometry.vol_shape] = {list(expected)}, "
                         f"got {list(volume.shape)}")
    if volume.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{name} must be float32 or float64, got {volume.dtype}")
    if not bool(torch.isfinite(volume).all()):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    return volume.detach()


def _check_count(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an int, got {seed!r}")
    return int(seed)


def _check_float(name: str, value: object, *, minimum: float | None = None) -> float:
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a finite number, got {value!r}") from exc
    if not math.isfinite(v) or (minimum is not None and v < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise ValueError(f"{name} must be a finite number{bound}, got {value!r}")
    return v


# ---------------------------------------------------------------------------------------------- public API
def init_from_fbp(
    volume: Tensor,
    geometry: CircularGeometry,
    *,
    num_gaussians: int,
    recipe: str = "3dgr",
    threshold: float = 0.05,
    seed: int = 0,
) -> Gaussians:
    """Gaussians at voxels of an FDK/FBP reconstruction, by one of two published recipes.

    **recipe "3dgr"** (idea from 3DGR-CT's ``GaussianModel.create_from_fbp``, SigmaLDC/3DGR-CT):

    1. half-resolution FBP: the mean of each 2x2x2 block of voxels (ceil mode: on an odd axis the last
       block holds the one remaining voxel); each half-resolution voxel sits at the centroid of the voxels
       it averages (index ``2i + 0.5``, or ``2i`` for a lone last voxel);
    2. values below ``threshold`` (absolute, volume units; 3DGR-CT's ``air_threshold``) set to 0;
    3. the non-zero voxels ranked by the magnitude of the 3D gradient, central differences in mm at the
       voxels' world positions (one-sided at the faces; 0 along an axis of one voxel), ties broken by
       voxel order; the top 15% (``floor(0.15 * non-zero count)``) skipped, as 3DGR-CT skips its largest
       gradients (the object's outer rim and streaks), and the next ``num_gaussians`` kept (all that
       remain after the skip when fewer);
    4. isotropic scales from the number ``n`` (1..125) of selected voxels in the 5x5x5 window around each
       selected voxel, itself included (3DGR-CT's neighbour count): ``scale = 0.5 * h * (125 / n)^(1/3)``
       with ``h`` the geometric mean of the half-resolution voxel size in mm. ``h (125 / n)^(1/3)`` is the
       mean spacing of points filling a fraction ``n / 125`` of the voxels, so the scale is half the local
       point spacing: ``0.5 h`` where every voxel is selected, ``2.5 h`` for an isolated one. 3DGR-CT uses
       ``ini_sigma / n`` instead, which makes Gaussians in dense regions 125x smaller than isolated ones and
       far below a voxel, where they vanish between voxel centres and no intensity factor can fit them;
    5. identity rotations; intensities = the (thresholded) half-resolution value at the voxel, times ONE
       global factor ``c = <splat, volume> / <splat, splat>`` (sums over the full-resolution grid, the
       Gaussians' contributions adding up where they overlap) that minimises ``|c * splat - volume|^2``
       (kept at 1 when that inner product is not positive). 3DGR-CT uses ``0.04 * value + 0.001``
       instead, tuned to its own volumes. ``seed`` is unused: the recipe is deterministic.

    Departures from 3DGR-CT's code: it counts the 15% skip over all voxels of the half grid (air
    included) and uses forward differences in voxel units; here the skip is over the non-zero voxels and
    the gradient is in mm, so anisotropic voxels rank the same as isotropic ones would.

    **recipe "r2"** (idea from R²-Gaussian's ``initialize_pcd.py`` / ``GaussianModel.create_from_pcd``,
    Ruyi-Zha/r2_gaussian): candidate voxels are those whose value exceeds ``threshold * max(volume)``
    (R²-Gaussian thresholds at an absolute ``density_thresh = 0.05`` of volumes normalised to a maximum
    near 1, where the two agree); ``num_gaussians`` of them drawn uniformly without replacement with
    ``numpy.random.default_rng(seed)`` (all of them when fewer; R²-Gaussian asserts instead), centred at
    their voxel centres; intensity = ``0.15 * value`` exactly (``density_rescale``); isotropic scale =
    the square root of the mean squared distance (mm) to the 3 nearest other selected points (3DGS's
    ``distCUDA2``, computed exactly; with fewer than 4 points the others; a single point gets the
    geometric mean voxel size); identity rotations.

    Args:
        volume: ``[1, 1, D, H, W]`` float32/float64 FDK/FBP volume on ``geometry.vol_shape``, finite.
        geometry: reconstruction geometry (grid placement via ``geometry.volume_affine``).
        num_gaussians: ``N >= 1``, Gaussians wanted (fewer are returned when fewer voxels qualify).
        recipe: ``"3dgr"`` or ``"r2"``.
        threshold: ``>= 0``; "3dgr": absolute air threshold in volume units; "r2": fraction of the
            volume's maximum.
        seed: "r2": seed of the voxel draw (deterministic for a seed); "3dgr": unused.

    Returns:
        ``Gaussians`` with ``means [1, N', 3]`` world mm, ``scales [1, N', 3]`` mm (isotropic),
        identity ``quats [1, N', 4]``, ``intensities [1, N']`` volume units; ``N' <= N``; dtype float32
        unless ``volume`` is float64; ``volume``'s device.

    Raises:
        ValueError: naming the argument, for a bad ``volume`` (see :func:`check_volume_on_geometry`),
            an unknown ``recipe``, ``num_gaussians < 1``, a negative or non-finite ``threshold``, or no
            voxel above ``threshold``.
    """
    volume = check_volume_on_geometry(volume, geometry)
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")
    num_gaussians = _check_count("num_gaussians", num_gaussians, 1)
    threshold = _check_float("threshold", threshold, minimum=0.0)
    seed = _check_seed(seed)
    if recipe == "3dgr":
        return _init_3dgr(volume, geometry, num_gaussians, threshold)
    return _init_r2(volume, geometry, num_gaussians, threshold, seed)


def init_random(
    geometry: CircularGeometry,
    *,
    num_gaussians: int,
    intensity: float | None = None,
    volume: Tensor | None = None,
    seed: int = 0,
) -> Gaussians:
    """Gaussians with centres drawn uniformly in the reconstruction box (the uninformed start).

    The box is the world extent of the voxel grid (outer faces of the outer voxels,
    ``geometry.volume_corners()``), ``[lo, hi]`` per world axis. Centres are
    ``lo + (hi - lo) * U`` with ``U`` from ``numpy.random.default_rng(seed)`` (float64, then cast);
    isotropic scales ``(box volume / N)^(1/3) / 2`` mm (half the mean spacing of ``N`` points filling the
    box); identity rotations. Intensities, all equal: ``intensity`` when given; otherwise, with a
    ``volume``, the one value ``c = <splat, volume> / <splat, splat>`` (for unit intensities) that
    minimises ``|c * splat - volume|^2`` on the geometry's grid, overlapping Gaussians adding up (the
    default below when that inner product is not positive); otherwise :data:`DEFAULT_RANDOM_INTENSITY`
    (0.01, about half water's attenuation per mm: these Gaussians overlap to about twice their peak).

    Args:
        geometry: reconstruction geometry.
        num_gaussians: ``N >= 1``.
        intensity: optional finite peak value of every Gaussian (volume units).
        volume: optional ``[1, 1, D, H, W]`` float32/float64 volume on ``geometry.vol_shape`` whose
            least-squares factor sets the intensities (ignored when ``intensity`` is given, but checked);
            it also sets the dtype (float64 stays float64) and the device.
        seed: seed of the centres; the result is deterministic for a seed.

    Returns:
        ``Gaussians`` with ``means [1, N, 3]`` world mm inside the box, ``scales [1, N, 3]`` mm,
        identity ``quats [1, N, 4]``, ``intensities [1, N]``.

    Raises:
        ValueError: naming the argument, for ``num_gaussians < 1``, a non-finite ``intensity``, a bad
            ``volume``, a non-int ``seed`` or a geometry that is not a ``CircularGeometry``.
    """
    if not isinstance(geometry, CircularGeometry):
        raise ValueError(f"geometry must be a medgauss.geometry.CircularGeometry, got {type(geometry).__name__}")
    num_gaussians = _check_count("num_gaussians", num_gaussians, 1)
    seed = _check_seed(seed)
    if intensity is not None:
        intensity = _check_float("intensity", intensity)
    if volume is not None:
        volume = check_volume_on_geometry(volume, geometry)
    dtype = torch.float64 if volume is not None and volume.dtype == torch.float64 else torch.float32
    device = volume.device if volume is not None else torch.device("cpu")

    corners = geometry.volume_corners()
    lo, hi = corners.min(dim=0).values.numpy(), corners.max(dim=0).values.numpy()
    rng = np.random.default_rng(seed)
    means = lo + (hi - lo) * rng.random((num_gaussians, 3))
    scale = float(np.prod(hi - lo) / num_gaussians) ** (1.0 / 3.0) / 2.0
    g = _build(torch.from_numpy(means), torch.full((num_gaussians,), scale, dtype=torch.float64),
               torch.ones(num_gaussians, dtype=torch.float64), dtype, device)
    if intensity is not None:
        value = intensity
    elif volume is not None:
        factor = _least_squares_factor(g, volume, geometry)
        value = DEFAULT_RANDOM_INTENSITY if factor is None else factor
    else:
        value = DEFAULT_RANDOM_INTENSITY
    return Gaussians(g.means, g.scales, g.quats, torch.full_like(g.intensities, value))


def init_from_volume_fit(
    volume: Tensor,
    geometry: CircularGeometry,
    *,
    num_gaussians: int,
    iterations: int = 200,
    seed: int = 0,
    max_scale: float = 0.25,
    backend: str = "auto",
) -> Gaussians:
    """Gaussians fitted to a reconstructed (FDK or SART) volume by splatting, in world mm.

    FaCT-GS's prior-volume warm start: :func:`medgauss.gaussians.fit_gaussians_to_volume` fits
    ``num_gaussians`` Gaussians to ``volume`` in normalised coordinates (k-means start, ``iterations`` Adam
    steps on the splatting MSE, ``seed``, ``max_scale`` and ``backend`` passed through), then
    :func:`medgauss.gaussians.gaussians_to_world` maps them to world mm with ``geometry.volume_affine``.
    On a non-cubic grid or anisotropic spacing that map is not a similarity and arrives as a
    ``linear_map``; the result is returned in :meth:`Gaussians.canonical` form (plain scales and
    rotations, no ``linear_map``), which the reconstructor optimises. That is safe here: ``canonical``'s
    eigen-decomposition has no gradient where two axes are equal, but these Gaussians are detached, and
    its covariances equal the mapped ones up to rounding (an isotropic normalised Gaussian becomes an
    axis-aligned anisotropic one in mm).

    Args:
        volume: ``[1, 1, D, H, W]`` float32/float64 volume on ``geometry.vol_shape``, finite.
        geometry: reconstruction geometry.
        num_gaussians: ``K >= 1``.
        iterations: ``>= 0`` Adam steps of the fit.
        seed: seed of the fit's initialisation (deterministic for a seed on the CPU backends).
        max_scale: largest scale during the fit, as a fraction of each axis' edge (normalised units).
        backend: splat backend of the fit (see :mod:`medgauss.dispatch`).

    Returns:
        ``Gaussians`` with ``means [1, K, 3]`` world mm, ``scales [1, K, 3]`` mm, ``quats [1, K, 4]``,
        ``intensities [1, K]`` volume units, no ``linear_map``; ``volume``'s dtype and device.

    Raises:
        ValueError: naming the argument, for a bad ``volume``, ``num_gaussians < 1``, ``iterations < 0``,
            a bad ``max_scale`` or ``seed`` (the last ones from the fit).
    """
    volume = check_volume_on_geometry(volume, geometry)
    num_gaussians = _check_count("num_gaussians", num_gaussians, 1)
    iterations = _check_count("iterations", iterations, 0)
    seed = _check_seed(seed)
    fit = fit_gaussians_to_volume(volume, num_gaussians, iterations=iterations, seed=seed, max_scale=max_scale,
                                  backend=backend)
    world = gaussians_to_world(fit.gaussians, geometry.vol_shape, affine=geometry.volume_affine)
    return world.canonical()


# ---------------------------------------------------------------------------------------------- recipes
def _init_3dgr(volume: Tensor, geometry: CircularGeometry, num_gaussians: int, threshold: float) -> Gaussians:
    """Recipe "3dgr" of :func:`init_from_fbp` (arguments already checked)."""
    dtype, device = volume.dtype, volume.device
    half, centres = _half_resolution(volume[0, 0])
    half = half.double()
    half = torch.where(half < threshold, torch.zeros_like(half), half)
    nonzero = (half != 0).flatten()
    count = int(nonzero.sum())
    if count == 0:
        raise ValueError(f"threshold={threshold}: no voxel of the half-resolution volume reaches threshold "
                         f"(its maximum is {float(half.max()):.4g}); lower threshold")
    spacing = geometry.vol_spacing
    coords_mm = [(c * s).to(device) for c, s in zip(centres, spacing)]  # voxel centres along each axis, mm
    grad_sq = torch.zeros_like(half)
    for axis in range(3):
        if half.shape[axis] > 1:
            g = torch.gradient(half, spacing=(coords_mm[axis],), dim=axis)[0]
            grad_sq += g * g
    candidates = torch.nonzero(nonzero).flatten()  # ascending flat index
    order = torch.sort(grad_sq.flatten()[candidates], descending=True, stable=True).indices
    skip = int(_SKIP_FRACTION * count)
    chosen = candidates[order[skip:skip + num_gaussians]]
    if chosen.numel() < 1:
        raise ValueError(f"num_gaussians={num_gaussians}: no voxel remains after skipping the top "
                         f"{_SKIP_FRACTION:.0%} of {count}")
    chosen = torch.sort(chosen).values
    shape = tuple(half.shape)
    idx = torch.stack(torch.unravel_index(chosen, shape), dim=1)  # [N, 3] half-res (d, h, w)

    selected = torch.zeros(shape, dtype=torch.float64, device=device).flatten()
    selected[chosen] = 1.0
    kernel = torch.ones((1, 1) + (_NEIGHBOUR_WINDOW,) * 3, dtype=torch.float64, device=device)
    counts = F.conv3d(selected.view(1, 1, *shape), kernel, padding=_NEIGHBOUR_WINDOW // 2).flatten()[chosen]
    h = 2.0 * math.prod(spacing) ** (1.0 / 3.0)  # geometric-mean half-resolution voxel size, mm
    scales = _SCALE_FACTOR * h * (float(_NEIGHBOUR_WINDOW**3) / counts).pow(1.0 / 3.0)

    voxel = torch.stack([centres[a].to(device)[idx[:, a]] for a in range(3)], dim=1)  # full-res indices
    means = transform_points(voxel, geometry.volume_affine.to(device))
    g = _build(means, scales, half.flatten()[chosen], dtype, device)
    factor = _least_squares_factor(g, volume, geometry)
    if factor is None:
        return g
    return Gaussians(g.means, g.scales, g.quats, g.intensities * factor)


def _init_r2(volume: Tensor, geometry: CircularGeometry, num_gaussians: int, threshold: float,
             seed: int) -> Gaussians:
    """Recipe "r2" of :func:`init_from_fbp` (arguments already checked)."""
    dtype, device = volume.dtype, volume.device
    flat = volume.flatten()
    peak = float(flat.max())
    level = threshold * peak
    candidates = torch.nonzero(flat > level).flatten().cpu().numpy() if peak > 0 else np.zeros(0, np.int64)
    if candidates.size == 0:
        raise ValueError(f"threshold={threshold}: no voxel of volume lies above threshold * max(volume) = "
                         f"{level:.4g} (max {peak:.4g}); lower threshold or check the volume")
    rng = np.random.default_rng(seed)
    n = min(num_gaussians, candidates.size)
    chosen = np.sort(rng.choice(candidates, size=n, replace=False))
    chosen_t = torch.from_numpy(chosen).to(device)
    idx = torch.stack(torch.unravel_index(chosen_t, tuple(geometry.vol_shape)), dim=1).double()
    means = transform_points(idx, geometry.volume_affine.to(device))
    scales = _knn_rms_distance(means, _R2_NEIGHBOURS, fallback=math.prod(geometry.vol_spacing) ** (1.0 / 3.0))
    g = _build(means, scales, torch.ones(n, dtype=torch.float64, device=device), dtype, device)
    intensities = (_R2_DENSITY_RESCALE * flat[chosen_t]).view(1, n)  # in the volume's dtype, exactly
    return Gaussians(g.means, g.scales, g.quats, intensities)


# ---------------------------------------------------------------------------------------------- internals
def _build(means: Tensor, scales: Tensor, intensities: Tensor, dtype: torch.dtype,
           device: torch.device) -> Gaussians:
    """Batch-1 isotropic Gaussians with identity rotations from ``means [N, 3]``, ``scales [N]`` and
    ``intensities [N]`` (float64), cast to ``dtype`` on ``device``."""
    n = means.shape[0]
    quats = torch.zeros(1, n, 4, dtype=dtype, device=device)
    quats[..., 0] = 1.0
    return Gaussians(means.to(dtype=dtype, device=device).view(1, n, 3),
                     scales.to(dtype=dtype, device=device).view(1, n, 1).expand(1, n, 3).contiguous(),
                     quats, intensities.to(dtype=dtype, device=device).view(1, n))


def _least_squares_factor(gaussians: Gaussians, volume: Tensor, geometry: CircularGeometry) -> float | None:
    """``<splat, volume> / <splat, splat>`` of world ``gaussians`` on the geometry's grid (sums in float64),
    or ``None`` when either inner product is not positive."""
    from medgauss.render import splat  # medgauss.render imports medgauss.gaussians: import on use

    shape = tuple(geometry.vol_shape)
    with torch.no_grad():
        rendered = splat(gaussians_to_normalized(gaussians, shape, affine=geometry.volume_affine), shape)
        r, v = rendered.double(), volume.double()
        num, den = float((r * v).sum()), float((r * r).sum())
    if not (num > 0 and den > 0 and math.isfinite(num / den)):
        return None
    return num / den


def _half_resolution(vol: Tensor) -> tuple[Tensor, list[Tensor]]:
    """Mean of each 2x2x2 block of ``vol [D, H, W]`` (ceil mode) and each axis' block centroids.

    Returns ``half [ceil(D/2), ceil(H/2), ceil(W/2)]`` in ``vol``'s dtype, the mean of the voxels each
    block holds (on an odd axis the last block holds one voxel), and three float64 CPU vectors of the
    blocks' centroid voxel indices along D, H, W (``2i + 0.5``, or ``2i`` for a lone last voxel). The
    average is separable, so per-axis pair means give the block means exactly.
    """
    out = vol
    centres = []
    for axis in range(3):
        n = out.shape[axis]
        m = (n + 1) // 2
        if n % 2:
            pad = list(out.shape)
            pad[axis] = 1
            out = torch.cat((out, out.new_zeros(pad)), dim=axis)
        shape = list(out.shape)
        shape[axis:axis + 1] = [m, 2]
        counts = torch.full((m,), 2.0, dtype=torch.float64)
        if n % 2:
            counts[-1] = 1.0
        view = [1, 1, 1]
        view[axis] = m
        out = out.reshape(shape).sum(dim=axis + 1) / counts.to(dtype=out.dtype, device=out.device).view(view)
        centres.append(2.0 * torch.arange(m, dtype=torch.float64) + 0.5 * (counts - 1.0))
    return out, centres


def _knn_rms_distance(points: Tensor, k: int, fallback: float) -> Tensor:
    """``[N]`` root mean squared distance of each of ``points [N, 3]`` (float64) to its ``k`` nearest other
    points (fewer when ``N <= k``; ``fallback`` for a single point). Exact, blocked pairwise distances."""
    n = points.shape[0]
    if n == 1:
        return torch.full((1,), fallback, dtype=torch.float64, device=points.device)
    m = min(k, n - 1)
    out = torch.empty(n, dtype=torch.float64, device=points.device)
    block = max(1, _KNN_BLOCK // n)
    points = points - points.mean(dim=0)  # centred: |a|^2 - 2 a.b + |b|^2 then loses no digits to the offset
    sq = points.square().sum(dim=1)
    for lo in range(0, n, block):
        rows = points[lo:lo + block]
        d2 = (sq[lo:lo + block, None] - 2.0 * rows @ points.T + sq[None, :]).clamp_min_(0.0)
        d2[torch.arange(rows.shape[0]), torch.arange(lo, lo + rows.shape[0])] = math.inf  # not its own neighbour
        out[lo:lo + block] = torch.topk(d2, m, dim=1, largest=False).values.mean(dim=1).sqrt()
    return out
