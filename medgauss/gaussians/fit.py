"""Fit ``K`` 3D Gaussians directly to a volume by splatting and Adam (the "oracle" fit).

``fit_gaussians_to_volume(volume, K)`` answers "how well can ``K`` Gaussians represent this volume?":
the oracle row of the pretraining quality benchmark, and the volume-fit initialisation of per-case CT
reconstruction (Gaussians fitted to an FDK volume). Everything is in normalised volume coordinates,
the convention of :func:`medgauss.render.splat` (see :mod:`medgauss.gaussians.coords`).

**Parameterisation** (unconstrained, one Adam parameter group per field):

* centres: the normalised coordinates themselves, projected back into ``[0, 1]`` after every step
  (a plain box constraint keeps Adam's step size the same everywhere, which a sigmoid would not);
* scales: ``log`` of the per-axis standard deviations, projected into ``[log min_scale, log max_scale]``
  after every step;
* rotations: raw quaternions (w, x, y, z), normalised by :class:`~medgauss.gaussians.Gaussians`;
* intensities: ``amplitude * softplus(raw)``, non-negative; ``amplitude`` is the largest absolute
  value of the (masked) volume, fixed per sample, so that the default learning rates do not depend on
  the volume's units (``[0, 1]`` crops or attenuation in mm^-1 alike).

**Initialisation** (``init="intensity"``): ``32 K`` points drawn at voxels with probability proportional
to ``max(volume, 0) * weights`` (jittered inside the voxel) are clustered by k-means (k-means++ seeding,
10 Lloyd steps) and the ``K`` centres are the cluster means: they spread over the volume's mass instead
of clumping where random draws happen to fall (two centres on one structure and none on another is a
local minimum Adam rarely leaves; for very large ``K`` the draws themselves are the centres). Scales
are isotropic (in voxels), ``scale_factor`` times the mean distance to the 3 nearest other centres;
rotations the identity; intensities the mean volume value over the cluster, all rescaled by the one
factor that minimises the initial loss (overlapping Gaussians add up to several times each peak).
``init="grid"`` puts the centres on a regular grid instead (a seeded subset of it when ``K`` is not a
product of the grid sizes). Ideas taken, not code: point-cloud initialisation from a reconstructed
volume and nearest-neighbour scales (R²-Gaussian's ``initialize_pcd.py`` / ``create_from_pcd``, after
3DGS's ``distCUDA2`` scales), log-scales, raw quaternions, softplus densities, per-field Adam learning
rates with an exponential decay to a tenth and Adam ``eps = 1e-15`` (3DGS / R²-Gaussian optimisers).

**Loss**: per-sample mean squared error of ``splat(gaussians, shape)`` against the volume, weighted by
``weights`` when given; the optimised objective is the sum over samples, so each sample's fit is
independent of the others in the batch (Adam is element-wise). Voxels of weight 0 influence nothing:
neither the loss, nor the initial centres, intensities or amplitude.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from medgauss.gaussians.container import Gaussians

__all__ = ["FitResult", "fit_gaussians_to_volume", "init_gaussians_from_volume", "DEFAULT_FIT_LR"]

# Adam learning rates per field, in the units of the parameterisation above (normalised coordinates,
# log-scale, raw quaternion, softplus-raw intensity relative to the volume's amplitude). Tuned on 96^3 crops
# of the bundled CT with 128 and 512 Gaussians: five times the 3DGS / R²-Gaussian-like (2e-3, 2e-2, 2e-2,
# 3e-2) gained ~1.5 dB after 200 iterations, eight times was no better, twenty times diverged.
DEFAULT_FIT_LR: dict[str, float] = {"means": 1e-2, "scales": 1e-1, "quats": 1e-1, "intensities": 1.5e-1}
_FIELDS = tuple(DEFAULT_FIT_LR)
_INITS = ("intensity", "grid")
_NEIGHBOURS = 3
_ADAM_EPS = 1e-15  # the MSE of one Gaussian's parameters is tiny: Adam's default 1e-8 would damp its steps
_INTENSITY_FLOOR = 1e-3  # smallest initial intensity, relative to the amplitude (softplus^-1 of 0 is -inf)
_KNN_BLOCK = 1 << 22  # entries of one block of the pairwise-distance matrix in the nearest-neighbour search
# k-means placement of the "intensity" init: points drawn per Gaussian, their bounds, the largest K * points
# it is used for (above it the draws are the centres), and the Lloyd steps after the k-means++ seeding.
_KMEANS_SAMPLES_PER_GAUSSIAN = 16
_KMEANS_MIN_SAMPLES = 4096
_KMEANS_MAX_SAMPLES = 65536
_KMEANS_BUDGET = 5e7
_LLOYD_ITERATIONS = 5


@dataclass
class FitResult:
    """What :func:`fit_gaussians_to_volume` returns.

    Attributes:
        gaussians: ``[B, K]`` fitted Gaussians (detached), normalised coordinates of the volume,
            intensities in the volume's units; dtype and device of the volume.
        losses: ``[T + 1, B]`` per-sample (weighted) mean squared error, in squared volume units, of the
            Gaussians before each of the ``T`` Adam steps taken and (last row) of the returned ones.
        iterations: ``T``, the number of Adam steps taken (``iterations``, fewer if ``callback`` stopped it).
        seconds: wall-clock seconds of the whole fit (initialisation included).
    """

    gaussians: Gaussians
    losses: Tensor
    iterations: int
    seconds: float


def fit_gaussians_to_volume(
    volume: Tensor,
    num_gaussians: int,
    *,
    weights: Tensor | None = None,
    iterations: int = 400,
    lr: float | Mapping[str, float] | None = None,
    lr_final_ratio: float = 0.1,
    init: str = "intensity",
    scale_factor: float = 0.5,
    seed: int = 0,
    min_scale: float | None = None,
    max_scale: float = 0.25,
    cutoff: float | None = 3.0,
    backend: str = "auto",
    callback: Callable[[int, Gaussians, Tensor], bool | None] | None = None,
) -> FitResult:
    """Fit ``num_gaussians`` Gaussians to each volume of a batch by minimising the splatting MSE with Adam.

    Args:
        volume: ``[B, 1, D, H, W]`` float32 or float64 volumes, finite, any units. ``B = 0`` is valid.
        num_gaussians: ``K >= 1``, Gaussians per volume.
        weights: optional ``[B, 1, D, H, W]`` non-negative voxel weights (bool or float; a mask), at
            least one positive per sample. The loss is the weighted mean of the squared error; voxels of
            weight 0 influence nothing. ``None``: every voxel, weight 1.
        iterations: ``T >= 0`` Adam steps.
        lr: Adam learning rates: ``None`` for :data:`DEFAULT_FIT_LR`, a positive number multiplying all
            of them, or a mapping overriding some of ``"means"`` (normalised units), ``"scales"``
            (log-scale), ``"quats"``, ``"intensities"`` (softplus-raw).
        lr_final_ratio: each learning rate decays exponentially to ``lr * lr_final_ratio`` at the last
            step, in ``(0, 1]`` (1: constant).
        init: ``"intensity"`` (k-means centres of points drawn with probability ~ volume) or ``"grid"``
            (regular grid); see :func:`init_gaussians_from_volume`. It runs on the CPU (NumPy) whatever
            the volume's device, so that a seed gives the same start everywhere.
        scale_factor: initial scale as a multiple of the mean distance to the 3 nearest centres (> 0).
        seed: seed of the initialisation (sample ``b`` draws from the stream ``(seed, b)``); the whole
            fit is deterministic for a seed on the CPU backends.
        min_scale, max_scale: bounds of every scale, in normalised units (fractions of the axis' edge);
            ``min_scale=None`` means half a voxel of the largest axis, ``0.5 / max(D, H, W)``. Pass a
            model's own bounds to measure what that model could represent; ``max_scale`` also bounds the
            cost of a step (one splat forward and backward, whose work grows with the Gaussians' volume).
        cutoff, backend: passed to :func:`medgauss.render.splat` (Mahalanobis truncation, render backend).
        callback: optional ``callback(step, gaussians, losses)`` called with each evaluated state: the
            detached ``[B, K]`` Gaussians before step ``step`` (``step = T``: the final ones) and their
            ``[B]`` losses. Returning ``True`` stops the fit there and returns that state.

    Returns:
        :class:`FitResult` with the fitted ``[B, K]`` Gaussians and the ``[T + 1, B]`` loss history.

    Raises:
        ValueError: naming the argument, for a volume that is not ``[B, 1, D, H, W]`` float32/float64 or
            not finite, bad ``weights`` (shape, device, negative, non-finite, all zero in a sample),
            ``num_gaussians < 1``, ``iterations < 0``, unknown ``init`` or ``lr`` keys, non-positive
            learning rates or scale bounds, ``min_scale >= max_scale``.
    """
    start = time.perf_counter()
    volume, weights = _check_volume_and_weights(volume, weights)
    num_gaussians = _check_int("num_gaussians", num_gaussians, minimum=1)
    iterations = _check_int("iterations", iterations, minimum=0)
    rates = _check_lr(lr)
    lr_final_ratio = _check_positive("lr_final_ratio", lr_final_ratio)
    if lr_final_ratio > 1:
        raise ValueError(f"lr_final_ratio must lie in (0, 1], got {lr_final_ratio}")
    if callback is not None and not callable(callback):
        raise ValueError(f"callback must be callable or None, got {type(callback).__name__}")
    shape = tuple(volume.shape[2:])
    min_scale, max_scale = _check_scale_bounds(min_scale, max_scale, shape)

    params, amplitude = _initial_parameters(volume, weights, num_gaussians, init=init, seed=seed,
                                            scale_factor=scale_factor, min_scale=min_scale,
                                            max_scale=max_scale, cutoff=cutoff, backend=backend)
    b = volume.shape[0]
    if b == 0:  # nothing to fit: empty Gaussians and an empty loss history of the promised shape
        empty = _build(params, amplitude).detach()
        return FitResult(empty, volume.new_zeros(iterations + 1, 0), iterations, time.perf_counter() - start)

    log_min, log_max = math.log(min_scale), math.log(max_scale)
    optimizer = torch.optim.Adam([{"params": [params[f]], "lr": rates[f], "name": f} for f in _FIELDS],
                                 eps=_ADAM_EPS)
    decay = lr_final_ratio ** (1.0 / max(iterations - 1, 1))
    target, wsum = volume, None if weights is None else weights.sum(dim=(1, 2, 3, 4))
    history: list[Tensor] = []
    steps = 0
    for step in range(iterations + 1):
        last = step == iterations
        with torch.set_grad_enabled(not last):
            gaussians = _build(params, amplitude)
            loss = _per_sample_loss(gaussians, target, weights, wsum, shape, cutoff, backend)
        history.append(loss.detach())
        if callback is not None and callback(step, gaussians.detach(), loss.detach()) is True:
            break
        if last:
            break
        optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()
        optimizer.step()
        steps += 1
        with torch.no_grad():
            params["means"].clamp_(0.0, 1.0)
            params["scales"].clamp_(log_min, log_max)
            for group in optimizer.param_groups:
                group["lr"] *= decay
    return FitResult(gaussians.detach(), torch.stack(history), steps, time.perf_counter() - start)


def init_gaussians_from_volume(
    volume: Tensor,
    num_gaussians: int,
    *,
    weights: Tensor | None = None,
    init: str = "intensity",
    scale_factor: float = 0.5,
    seed: int = 0,
    min_scale: float | None = None,
    max_scale: float = 0.25,
    cutoff: float | None = 3.0,
    backend: str = "auto",
) -> Gaussians:
    """The initial Gaussians of :func:`fit_gaussians_to_volume` (same arguments, same meaning).

    Returns ``[B, K]`` Gaussians in normalised coordinates of ``volume [B, 1, D, H, W]``, detached, dtype
    and device of the volume: centres = k-means of points drawn with probability ``~ max(volume, 0) *
    weights`` (``init="intensity"``) or a regular grid (``init="grid"``); isotropic scales ``scale_factor``
    x the mean distance to the 3 nearest other centres, clamped to ``[min_scale, max_scale]``; identity
    rotations; intensities = the volume around each centre times the one factor that minimises the
    (weighted) MSE of their splat (one render, with ``cutoff`` and ``backend``). Deterministic for a seed;
    raises ``ValueError`` naming the argument like :func:`fit_gaussians_to_volume`.
    """
    volume, weights = _check_volume_and_weights(volume, weights)
    num_gaussians = _check_int("num_gaussians", num_gaussians, minimum=1)
    min_scale, max_scale = _check_scale_bounds(min_scale, max_scale, tuple(volume.shape[2:]))
    params, amplitude = _initial_parameters(volume, weights, num_gaussians, init=init, seed=seed,
                                            scale_factor=scale_factor, min_scale=min_scale,
                                            max_scale=max_scale, cutoff=cutoff, backend=backend)
    return _build(params, amplitude).detach()


# ---------------------------------------------------------------------------------------------- internals
def _build(params: dict[str, Tensor], amplitude: Tensor) -> Gaussians:
    """Gaussians of the raw parameters (differentiable)."""
    intensities = amplitude[:, None] * F.softplus(params["intensities"])
    return Gaussians(params["means"], params["scales"].exp(), params["quats"], intensities, validate=False)


def _per_sample_loss(gaussians: Gaussians, target: Tensor, weights: Tensor | None, wsum: Tensor | None,
                     shape: tuple[int, ...], cutoff: float | None, backend: str) -> Tensor:
    """``[B]`` (weighted) mean squared error of the splat against ``target``."""
    from medgauss.render import splat  # render imports medgauss.gaussians: import on use

    diff = splat(gaussians, shape, cutoff=cutoff, backend=backend) - target
    sq = diff * diff
    if weights is None:
        return sq.mean(dim=(1, 2, 3, 4))
    return (sq * weights).sum(dim=(1, 2, 3, 4)) / wsum


def _initial_parameters(volume: Tensor, weights: Tensor | None, k: int, *, init: str, seed: int,
                        scale_factor: float, min_scale: float, max_scale: float, cutoff: float | None,
                        backend: str) -> tuple[dict[str, Tensor], Tensor]:
    """Raw leaf parameters ``{field: tensor}`` (requires_grad) and the ``[B]`` amplitudes."""
    if init not in _INITS:
        raise ValueError(f"init must be one of {_INITS}, got {init!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an int, got {seed!r}")
    scale_factor = _check_positive("scale_factor", scale_factor)
    b, shape, dtype, device = volume.shape[0], tuple(volume.shape[2:]), volume.dtype, volume.device
    sizes = np.asarray(shape, dtype=np.float64)

    amplitude = volume.abs().flatten(1).amax(dim=1) if b else volume.new_zeros(0)
    amplitude = torch.where(amplitude > 0, amplitude, torch.ones_like(amplitude))
    vol_np = (volume / amplitude.view(-1, 1, 1, 1, 1)).flatten(1).cpu().double().numpy()
    w_np = None if weights is None else weights.detach().flatten(1).cpu().double().numpy()

    means, spacing, values = [], [], []
    for i in range(b):
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, i])
        if init == "intensity":
            centre_vox, value = _intensity_centres(vol_np[i], None if w_np is None else w_np[i], shape, k, rng)
        else:
            flat = _grid_voxels(shape, k, rng)
            centre_vox = np.stack(np.unravel_index(flat, shape), axis=1) + rng.random((k, 3))  # inside the voxel
            value = vol_np[i][flat]
        means.append(centre_vox / sizes)
        spacing.append(_mean_neighbour_distance(centre_vox))
        values.append(value)

    def to_tensor(arrays: list[np.ndarray], *tail: int) -> Tensor:
        if not arrays:
            return torch.zeros((0, k, *tail), dtype=dtype, device=device)
        return torch.from_numpy(np.stack(arrays)).to(dtype=dtype, device=device)

    means_t = to_tensor(means, 3).clamp_(0.0, 1.0)
    # Isotropic in voxels: scale along axis a (normalised) is the voxel distance over the axis' size.
    scales_t = (scale_factor * to_tensor(spacing)[..., None] / torch.as_tensor(sizes, dtype=dtype, device=device))
    scales_t = scales_t.clamp_(min_scale, max_scale)
    quats_t = torch.zeros(b, k, 4, dtype=dtype, device=device)
    quats_t[..., 0] = 1.0
    peaks = to_tensor(values).clamp_min_(_INTENSITY_FLOOR)
    if b:
        peaks = peaks * _best_factor(means_t, scales_t, quats_t, peaks, amplitude, volume, weights, shape,
                                     cutoff, backend)[:, None]
    peaks = peaks.clamp_min_(_INTENSITY_FLOOR)
    raw = peaks + torch.log(-torch.expm1(-peaks))  # softplus^-1
    params = {"means": means_t, "scales": scales_t.log(), "quats": quats_t, "intensities": raw}
    return {f: t.detach().requires_grad_(True) for f, t in params.items()}, amplitude


def _best_factor(means: Tensor, scales: Tensor, quats: Tensor, peaks: Tensor, amplitude: Tensor,
                 volume: Tensor, weights: Tensor | None, shape: tuple[int, ...], cutoff: float | None,
                 backend: str) -> Tensor:
    """``[B]`` factor ``c`` minimising the weighted ``|c * splat - volume|^2`` (clamped to ``[1e-3, 1e3]``)."""
    from medgauss.render import splat

    with torch.no_grad():
        g = Gaussians(means, scales, quats, amplitude[:, None] * peaks, validate=False)
        r = splat(g, shape, cutoff=cutoff, backend=backend)
        w = torch.ones_like(r) if weights is None else weights
        num = (w * r * volume).sum(dim=(1, 2, 3, 4))
        den = (w * r * r).sum(dim=(1, 2, 3, 4))
        factor = torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.ones_like(den))
    return factor.clamp(1e-3, 1e3)


def _intensity_centres(values: np.ndarray, weights: np.ndarray | None, shape: tuple[int, ...], k: int,
                       rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``[K, 3]`` centres (continuous voxel units, voxel ``i`` spans ``[i, i + 1)``) and ``[K]`` values.

    Points are drawn at voxels with probability ``~ max(values, 0) * weights`` (uniform over the voxels of
    positive weight when that is zero everywhere) and jittered inside their voxel. When ``K * samples``
    is affordable, ``_KMEANS_SAMPLES_PER_GAUSSIAN * K`` such points are clustered by k-means (k-means++
    seeding, :data:`_LLOYD_ITERATIONS` Lloyd steps): the centres then spread over the mass of the volume
    instead of clumping where random draws happen to fall (two centres in one structure and none in
    another is a local minimum the fit rarely leaves), and each value is the mean over its cluster.
    Otherwise the ``K`` centres are the draws themselves (without replacement while enough voxels have
    positive probability) and the values those of their voxels.
    """
    p = np.clip(values, 0.0, None) * (1.0 if weights is None else weights)
    if not (p > 0).any():
        p = (np.ones_like(values) if weights is None else (weights > 0)).astype(np.float64)
    positive = np.flatnonzero(p > 0)
    samples = int(np.clip(_KMEANS_SAMPLES_PER_GAUSSIAN * k, _KMEANS_MIN_SAMPLES, _KMEANS_MAX_SAMPLES))
    if k * samples <= _KMEANS_BUDGET:
        cdf = np.cumsum(p[positive])
        drawn = positive[np.minimum(np.searchsorted(cdf, rng.random(samples) * cdf[-1], side="right"),
                                    positive.size - 1)]
        points = np.stack(np.unravel_index(drawn, shape), axis=1) + rng.random((samples, 3))
        centres, labels = _kmeans(points, k, rng)
        counts = np.bincount(labels, minlength=k)
        sums = np.bincount(labels, weights=values[drawn], minlength=k)
        return centres, sums / np.maximum(counts, 1)
    if positive.size >= k:  # Gumbel top-k: k draws without replacement, probability ~ p
        keys = np.log(p[positive]) + rng.gumbel(size=positive.size)
        drawn = np.sort(positive[np.argpartition(-keys, k - 1)[:k]])
    else:
        drawn = np.sort(rng.choice(positive, size=k, replace=True, p=p[positive] / p[positive].sum()))
    return np.stack(np.unravel_index(drawn, shape), axis=1) + rng.random((k, 3)), values[drawn]


def _kmeans(points: np.ndarray, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """k-means of ``points [M, 3]`` (float64): ``[k, 3]`` centres and ``[M]`` labels.

    Greedy k-means++ seeding (each next seed is the best, by the resulting sum of squared distances, of
    ``2 + log k`` candidates drawn with probability ~ squared distance to the nearest seed so far), then
    :data:`_LLOYD_ITERATIONS` Lloyd steps; an empty cluster keeps its centre.
    """
    m = len(points)
    trials = 2 + int(math.log(k))
    sq = (points**2).sum(axis=1)
    centres = np.empty((k, 3))
    centres[0] = points[rng.integers(m)]
    d2 = ((points - centres[0]) ** 2).sum(axis=1)
    for j in range(1, k):
        cdf = np.cumsum(d2)
        if cdf[-1] > 0:
            picks = np.minimum(np.searchsorted(cdf, rng.random(trials) * cdf[-1], side="right"), m - 1)
        else:  # every point sits on a seed already
            picks = rng.integers(m, size=trials)
        to_picks = np.maximum(sq[picks][:, None] - 2.0 * (points[picks] @ points.T) + sq[None, :], 0.0)
        candidates = np.minimum(d2, to_picks)  # [trials, M] squared distance to the nearest seed
        best = int(np.argmin(candidates.sum(axis=1)))
        centres[j] = points[picks[best]]
        d2 = candidates[best]
    pts = torch.from_numpy(points)
    for step in range(_LLOYD_ITERATIONS + 1):
        labels = _nearest(pts, torch.from_numpy(centres))
        counts = np.bincount(labels, minlength=k)
        if step == _LLOYD_ITERATIONS:
            break
        sums = np.stack([np.bincount(labels, weights=points[:, a], minlength=k) for a in range(3)], axis=1)
        centres = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], centres)
    return centres, labels


def _nearest(points: Tensor, centres: Tensor) -> np.ndarray:
    """``[M]`` index of the nearest of ``centres [K, 3]`` for each of ``points [M, 3]`` (blocked).

    Ranks ``|c|^2 - 2 p.c`` (the squared distance less the per-point ``|p|^2``) in float32: one matrix
    product per block, ~6x faster than ``cdist`` in float64; near-ties may resolve either way, always the
    same way for the same input.
    """
    c = centres.float()
    norms = c.square().sum(dim=1)
    out = np.empty(len(points), dtype=np.int64)
    block = max(1, _KNN_BLOCK // len(centres))
    for lo in range(0, len(points), block):
        score = torch.addmm(norms, points[lo:lo + block].float(), c.T, alpha=-2.0)
        out[lo:lo + block] = score.argmin(dim=1).numpy()
    return out


def _grid_voxels(shape: tuple[int, ...], k: int, rng: np.random.Generator) -> np.ndarray:
    """Flat indices of the voxels nearest a regular grid of at least ``k`` points spread over ``shape``
    (counts per axis proportional to the axis' size); a seeded subset of ``k`` of them."""
    sizes = np.asarray(shape, dtype=np.float64)
    c = (k / sizes.prod()) ** (1.0 / 3.0)
    counts = np.clip(np.round(sizes * c), 1, sizes).astype(np.int64)
    while counts.prod() < k:  # grow the axis with the widest spacing until the grid holds k points
        grow = np.argmax(np.where(counts < sizes, sizes / counts, -1.0))
        counts[grow] += 1
    axes = [np.floor((np.arange(n) + 0.5) * s / n).astype(np.int64) for n, s in zip(counts, shape)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    if len(grid) > k:
        grid = grid[np.sort(rng.choice(len(grid), size=k, replace=False))]
    return np.ravel_multi_index(tuple(grid.T), shape)


def _mean_neighbour_distance(points: np.ndarray) -> np.ndarray:
    """``[K]`` mean distance of each point ``[K, 3]`` to its (up to) 3 nearest other points; 1 when alone."""
    k = len(points)
    if k == 1:
        return np.ones(1)
    m = min(_NEIGHBOURS, k - 1)
    pts = torch.from_numpy(points)
    out = np.empty(k)
    block = max(1, _KNN_BLOCK // k)
    for lo in range(0, k, block):
        d2 = torch.cdist(pts[lo:lo + block], pts).square_()
        d2[torch.arange(d2.shape[0]), torch.arange(lo, lo + d2.shape[0])] = math.inf  # not its own neighbour
        nearest = torch.topk(d2, m, dim=1, largest=False).values
        out[lo:lo + block] = nearest.clamp_min(0).sqrt().mean(dim=1).numpy()
    return np.maximum(out, 1e-3)


def _check_volume_and_weights(volume: Tensor, weights: Tensor | None) -> tuple[Tensor, Tensor | None]:
    if not isinstance(volume, Tensor):
        raise ValueError(f"volume must be a torch.Tensor, got {type(volume).__name__}")
    if volume.ndim != 5 or volume.shape[1] != 1 or min(volume.shape[2:]) < 1:
        raise ValueError(f"volume must have shape [B, 1, D, H, W] with D, H, W >= 1, got {tuple(volume.shape)}")
    if volume.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"volume must be float32 or float64, got {volume.dtype}")
    if volume.numel() and not bool(torch.isfinite(volume).all()):
        raise ValueError("volume contains non-finite values (NaN or inf)")
    volume = volume.detach()
    if weights is None:
        return volume, None
    if not isinstance(weights, Tensor):
        raise ValueError(f"weights must be a torch.Tensor or None, got {type(weights).__name__}")
    if tuple(weights.shape) != tuple(volume.shape):
        raise ValueError(f"weights must have the volume's shape {tuple(volume.shape)}, got {tuple(weights.shape)}")
    if weights.device != volume.device:
        raise ValueError(f"weights is on {weights.device} but volume is on {volume.device}")
    if weights.is_complex() or not (weights.is_floating_point() or weights.dtype == torch.bool):
        raise ValueError(f"weights must be a bool or floating-point tensor, got {weights.dtype}")
    weights = weights.detach().to(volume.dtype)
    if weights.numel():
        if not bool(torch.isfinite(weights).all()):
            raise ValueError("weights contains non-finite values (NaN or inf)")
        if not bool((weights >= 0).all()):
            raise ValueError(f"weights must be non-negative, got minimum {weights.min().item():.3g}")
        empty = (weights.flatten(1).sum(dim=1) <= 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"weights must have a positive voxel in every sample; samples {empty} have none")
    # Zero the volume where the weight is 0: from here on nothing can read a voxel that must not count.
    return torch.where(weights > 0, volume, torch.zeros_like(volume)), weights


def _check_int(name: str, value: object, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_positive(name: str, value: object) -> float:
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}") from exc
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return v


def _check_lr(lr: float | Mapping[str, float] | None) -> dict[str, float]:
    if lr is None:
        return dict(DEFAULT_FIT_LR)
    if isinstance(lr, Mapping):
        unknown = sorted(set(lr) - set(_FIELDS))
        if unknown:
            raise ValueError(f"lr has unknown keys {unknown}; known: {list(_FIELDS)}")
        return {f: _check_positive(f"lr[{f!r}]", lr[f]) if f in lr else DEFAULT_FIT_LR[f] for f in _FIELDS}
    factor = _check_positive("lr", lr)
    return {f: factor * DEFAULT_FIT_LR[f] for f in _FIELDS}


def _check_scale_bounds(min_scale: float | None, max_scale: float, shape: tuple[int, ...]) -> tuple[float, float]:
    high = _check_positive("max_scale", max_scale)
    low = 0.5 / max(shape) if min_scale is None else _check_positive("min_scale", min_scale)
    if not low < high:
        raise ValueError(f"min_scale must be below max_scale, got min_scale={low}, max_scale={high}")
    return low, high
