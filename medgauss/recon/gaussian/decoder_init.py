"""Zero-shot initialisation of per-case Gaussian CT reconstruction from a pretrained MedGMAE / MedGMAE* decoder.

The FDK volume of a case is brought into the pretraining preprocessing (HU, ``pixdim`` mm isotropic, HU
window ``[a_min, a_max]`` -> ``[b_min, b_max]``), tiled with windows of the model's crop size, and every
non-empty window is decoded without masking. Each window's Gaussians (normalised crop coordinates,
pretraining intensity units) are mapped into the geometry's world frame (x, y, z mm) through the library's one
coordinate conversion (:func:`medgauss.gaussians.gaussians_to_world`) and into the volume's units, then the
overlaps between windows are de-duplicated. The result is the starting point of a per-case reconstruction
(the reconstructor refines every parameter against the measured projections).

Ideas: initialising per-case Gaussians from the FDK volume follows R²-Gaussian's ``initialize_pcd.py``;
tiling a volume with model-sized windows follows MONAI's ``sliding_window_inference``.

Public API: :class:`DecoderPreprocessing`, :func:`decoder_preprocessing`, :func:`load_decoder`,
:func:`init_from_decoder`.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from medgauss.gaussians import Gaussians, gaussians_to_world
from medgauss.geometry import CircularGeometry
from medgauss.nets.gaussian_mae import GaussianMAE
from medgauss.nets.pretrained import load_pretrained
from medgauss.nets.pretrained_runs import PretrainingPreprocessing, model_dir, run_preprocessing

__all__ = ["DecoderPreprocessing", "decoder_preprocessing", "load_decoder", "init_from_decoder"]

DecoderPreprocessing = PretrainingPreprocessing
"""The preprocessing a decoder was pretrained with (the name this module has always used)."""
decoder_preprocessing = run_preprocessing
"""Read a decoder's pretraining preprocessing from its run's ``config.yaml`` (:func:`run_preprocessing`)."""


def load_decoder(checkpoint: str | Path,
                 map_location: str | torch.device = "cpu") -> tuple[GaussianMAE, DecoderPreprocessing]:
    """Load a pretrained MedGMAE / MedGMAE* and the preprocessing it was trained with.

    Args:
        checkpoint: the pretraining run directory (holding ``config.yaml`` and ``model/``) or its
            ``model/`` export (``config.json`` + ``model.safetensors``, ``config.yaml`` in the parent).
        map_location: device for the weights.

    Returns:
        ``(model, preprocessing)``, the model in eval mode.

    Raises:
        FileNotFoundError: the folder, the model export or ``config.yaml`` is missing (naming it).
        ValueError: the checkpoint holds another class (XGRM, VoxelMAE, ...; naming the folder and the
            class), or its files are corrupt.
    """
    checkpoint = Path(checkpoint)
    folder = model_dir(checkpoint)
    preprocessing = decoder_preprocessing(checkpoint)
    model = load_pretrained(folder, map_location=map_location)
    if not isinstance(model, GaussianMAE):
        raise ValueError(f"{folder} holds a {type(model).__name__}, not a GaussianMAE (MedGMAE / MedGMAE*): "
                         "init_from_decoder needs a pretrained Gaussian decoder")
    return model.eval(), preprocessing


# ---------------------------------------------------------------------------------------------- resampling
def _resampled_grid(geometry: CircularGeometry, pixdim: float) -> tuple[tuple[int, ...], list[Tensor], Tensor]:
    """The ``pixdim`` mm grid covering the volume's world box, centred on it.

    Returns ``(shape (D', H', W'), positions, affine)``: per axis the ``[n']`` float64 continuous source
    voxel indices of the new voxel centres, and the ``[4, 4]`` float64 voxel -> world affine of the new grid.
    """
    shape, positions, steps = [], [], []
    for n, s in zip(geometry.vol_shape, geometry.vol_spacing):
        m = max(1, math.ceil(n * s / pixdim - 1e-9))
        step = pixdim / s
        shape.append(m)
        steps.append(step)
        positions.append((n - 1) / 2.0 + (torch.arange(m, dtype=torch.float64) - (m - 1) / 2.0) * step)
    to_source = torch.eye(4, dtype=torch.float64)
    for a in range(3):
        to_source[a, a] = steps[a]
        to_source[a, 3] = positions[a][0]
    return tuple(shape), positions, geometry.volume_affine @ to_source


def _resample_axis(x: Tensor, axis: int, positions: Tensor) -> Tensor:
    """Linear interpolation of ``x [D, H, W]`` along ``axis`` at continuous indices ``positions [m]``
    (clamped to the edge voxels: values just outside the grid repeat the border)."""
    n = x.shape[axis]
    p = positions.to(x.device).clamp(0.0, n - 1.0)
    if n == 1:
        return x.index_select(axis, torch.zeros(p.numel(), dtype=torch.long, device=x.device))
    i0 = p.floor().long().clamp(max=n - 2)
    frac = (p - i0).to(x.dtype)
    view = [1, 1, 1]
    view[axis] = -1
    frac = frac.view(view)
    return x.index_select(axis, i0) * (1.0 - frac) + x.index_select(axis, i0 + 1) * frac


def _window_starts(n: int, size: int, stride: int) -> list[int]:
    """Window starts along an axis of ``n >= size`` voxels: every ``stride``, the last one ending at ``n``."""
    starts = list(range(0, n - size + 1, stride))
    if starts[-1] != n - size:
        starts.append(n - size)
    return starts


def _core_bounds(starts: list[int], size: int) -> list[tuple[float, float]]:
    """Per window, the ``[lo, hi)`` continuous index interval (voxel ``i`` spans ``[i, i + 1)``) closer to
    its centre than to any other window's centre; the outer windows' cores extend to infinity."""
    centres = [s + size / 2.0 for s in starts]
    bounds = []
    for j, c in enumerate(centres):
        lo = -math.inf if j == 0 else (centres[j - 1] + c) / 2.0
        hi = math.inf if j == len(centres) - 1 else (c + centres[j + 1]) / 2.0
        bounds.append((lo, hi))
    return bounds


def _check_volume(volume: Tensor, geometry: CircularGeometry) -> None:
    expected = (1, 1, *geometry.vol_shape)
    if not isinstance(volume, Tensor) or tuple(volume.shape) != expected:
        got = tuple(volume.shape) if isinstance(volume, Tensor) else type(volume).__name__
        raise ValueError(f"volume must have shape [1, 1, *geometry.vol_shape] = {list(expected)}, got {got}")
    if not volume.is_floating_point():
        raise ValueError(f"volume must be a floating-point tensor, got dtype {volume.dtype}")
    if not bool(torch.isfinite(volume).all()):
        raise ValueError("volume holds non-finite values (NaN or inf)")


def _hu_window(volume_hu_window: Sequence[float]) -> tuple[float, float]:
    try:
        hu_min, hu_max = (float(v) for v in volume_hu_window)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"volume_hu_window must be two numbers (hu_min, hu_max), got {volume_hu_window!r}") from exc
    if not (math.isfinite(hu_min) and math.isfinite(hu_max) and hu_max > hu_min):
        raise ValueError(f"volume_hu_window must be finite with max > min, got {volume_hu_window!r}")
    return hu_min, hu_max


def init_from_decoder(
    volume: Tensor,
    geometry: CircularGeometry,
    model: GaussianMAE | str | Path,
    *,
    preprocessing: DecoderPreprocessing | None = None,
    volume_hu_window: tuple[float, float] = (-1000.0, 2000.0),
    stride: int | None = None,
    min_window_mean: float = 0.02,
    batch_size: int = 4,
) -> Gaussians:
    """Initial world-mm Gaussians of one case, predicted zero-shot by a pretrained MedGMAE / MedGMAE* decoder.

    Steps:

    1. **Preprocess as in pretraining.** ``volume`` (value ``v`` is ``HU = hu_min + v (hu_max - hu_min)``,
       how :mod:`medgauss.ct.prepare` normalises cases) is converted to HU and resampled trilinearly to
       ``pixdim`` mm isotropic in the geometry's world frame: a grid of ``ceil(n s / pixdim)`` voxels per
       axis, centred on the volume's world box and covering it (values just outside the source voxel
       centres repeat the border). Array order stays ``(D, H, W)`` = world ``(z, y, x)``, the order of the
       pretraining crops. HU are clipped to ``[a_min, a_max]`` and mapped linearly to ``[b_min, b_max]``.
    2. **Tile** the resampled volume with windows of the model's ``img_size`` (an axis shorter than a window
       is padded on both sides with ``b_min``, air) every ``stride`` voxels, the last window shifted back to
       end at the border. Windows whose mean of ``(x - b_min) / (b_max - b_min)`` is below
       ``min_window_mean`` (air) are skipped.
    3. **Decode** the remaining windows in batches of ``batch_size`` with ``mask_ratio=0.0`` (every patch
       visible), in eval mode under ``torch.no_grad()``, all levels (MedGMAE*'s ``out.gaussians``
       concatenates them).
    4. **Map** each window's normalised Gaussians to world mm with
       ``gaussians_to_world(g, window_shape, affine=window_affine)`` (the resampled grid's voxel -> world
       affine shifted by the window start, float64): means, scales and rotations all go through it.
    5. **De-duplicate overlaps.** A Gaussian is kept only by the window whose *core* contains its centre: the
       core of a window is the part of the (padded) resampled grid closer to that window's centre than to
       any other window's along each axis, i.e. every overlap is split at its middle (the outermost cores
       are unbounded). Gaussians whose centres fall outside the volume's world box
       (``geometry.volume_corners()``) are dropped.
    6. **Intensities** go from pretraining units to the volume's units. Pretraining maps
       ``HU = a_min + (w - b_min) / (b_max - b_min) (a_max - a_min)`` and the volume
       ``v = (HU - hu_min) / (hu_max - hu_min)``. Gaussians add up, so only the linear part of this map can
       be carried by their peaks: ``intensity = w (a_max - a_min) / ((b_max - b_min) (hu_max - hu_min))``.
       The constant part ``(a_min - hu_min) / (hu_max - hu_min) - b_min k`` (``k`` the factor above) is
       zero when the decoder's window starts where the volume's does (``a_min = hu_min = -1000`` HU, air,
       ``b_min = 0``). Otherwise it cannot be represented by scaling intensities: every voxel above
       ``a_min`` then lacks that offset (e.g. a ``[-175, 250]`` HU decoder on a ``[-1000, 2000]`` volume puts
       soft tissue 825 HU too low), and a ``UserWarning`` says so.

    What the HU window loses: everything above ``a_max`` (bone, contrast) saturates at ``b_max`` and
    everything below ``a_min`` collapses to ``b_min``, so the decoder never sees them. The reconstructor
    recovers both (and the constant offset above): it optimises the intensities (and its density control
    adds Gaussians) against the measured projections, which carry the unclipped attenuation.

    Args:
        volume: ``[1, 1, D, H, W]`` float on ``geometry.vol_shape`` (the FDK volume), in the case's units.
        geometry: the reconstruction geometry; ``geometry.volume_affine`` places the volume in world mm.
        model: a :class:`GaussianMAE`, or a pretraining run directory / its ``model/`` export
            (:func:`load_decoder`).
        preprocessing: the decoder's pretraining preprocessing; ``None`` reads it from the checkpoint's
            ``config.yaml`` (required when ``model`` is a module).
        volume_hu_window: ``(hu_min, hu_max)`` HU of the volume's values 0 and 1.
        stride: window step in resampled voxels, ``1 <= stride <= window``; ``None`` = the window size.
        min_window_mean: windows with a lower mean normalised value are skipped as air.
        batch_size: windows per forward pass.

    Returns:
        ``Gaussians`` with ``B = 1``, ``N`` = all kept Gaussians: ``means [1, N, 3]`` world (x, y, z) mm,
        ``scales [1, N, 3]`` mm, ``quats [1, N, 4]`` (plain scales / rotations, no ``linear_map``),
        ``intensities [1, N]`` in the volume's units; float32 on ``volume.device``.

    Raises:
        ValueError: ``volume`` not ``[1, 1, *geometry.vol_shape]`` or not finite, ``model`` not a
            GaussianMAE (naming its class), ``preprocessing`` missing for a module, ``volume_hu_window`` with
            ``max <= min``, ``stride`` outside ``[1, window]``, a bad ``min_window_mean`` / ``batch_size``,
            every window empty, or no Gaussian inside the volume box.
        FileNotFoundError: the checkpoint folder, its model export or its ``config.yaml`` is missing.
    """
    if not isinstance(geometry, CircularGeometry):
        raise ValueError(f"geometry must be a CircularGeometry, got {type(geometry).__name__}")
    _check_volume(volume, geometry)
    hu_min, hu_max = _hu_window(volume_hu_window)
    if isinstance(min_window_mean, bool) or not isinstance(min_window_mean, int | float) \
            or not math.isfinite(min_window_mean):
        raise ValueError(f"min_window_mean must be a finite number, got {min_window_mean!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(model, str | Path):
        loaded, read = load_decoder(model)
        model = loaded
        preprocessing = read if preprocessing is None else preprocessing
    elif not isinstance(model, GaussianMAE):
        raise ValueError(f"model must be a GaussianMAE (MedGMAE / MedGMAE*) or a checkpoint folder, "
                         f"got a {type(model).__name__}")
    if preprocessing is None:
        raise ValueError("preprocessing is required when model is a GaussianMAE module "
                         "(decoder_preprocessing(run_dir) reads it from a pretraining run)")
    if not isinstance(preprocessing, DecoderPreprocessing):
        raise ValueError(f"preprocessing must be a DecoderPreprocessing, got {type(preprocessing).__name__}")
    pre = preprocessing
    window = tuple(int(s) for s in model.encoder.img_size)
    if stride is None:
        steps = window
    elif isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= min(window):
        raise ValueError(f"stride must be an integer in [1, {min(window)}] (the window size {window}), "
                         f"got {stride!r}")
    else:
        steps = (stride,) * 3

    k = (pre.a_max - pre.a_min) / ((pre.b_max - pre.b_min) * (hu_max - hu_min))
    offset = (pre.a_min - hu_min) / (hu_max - hu_min) - pre.b_min * k
    if abs(offset) > 1e-9:
        warnings.warn(
            f"the decoder's HU window [{pre.a_min:g}, {pre.a_max:g}] (intensities [{pre.b_min:g}, {pre.b_max:g}]) "
            f"does not start where volume_hu_window ({hu_min:g}, {hu_max:g}) does: Gaussian intensities carry "
            f"only the linear part of the intensity map, so every voxel above a_min={pre.a_min:g} HU lacks a "
            f"constant {offset:.4g} (volume units, {offset * (hu_max - hu_min):.1f} HU); the reconstruction "
            "must recover it from the projections", stacklevel=2)

    # 1. HU, pixdim mm isotropic, clipped HU window -> [b_min, b_max]
    x = volume[0, 0].to(torch.float64 if volume.dtype == torch.float64 else torch.float32)
    x = hu_min + x * (hu_max - hu_min)
    grid_shape, positions, affine = _resampled_grid(geometry, pre.pixdim)
    for axis in range(3):
        x = _resample_axis(x, axis, positions[axis])
    x = x.clamp(pre.a_min, pre.a_max)
    x = pre.b_min + (x - pre.a_min) * ((pre.b_max - pre.b_min) / (pre.a_max - pre.a_min))

    # 2. pad axes shorter than a window with air (both sides), then tile
    before = [max(0, (w - n) // 2) for n, w in zip(grid_shape, window)]
    after = [max(0, w - n) - b for n, w, b in zip(grid_shape, window, before)]
    if any(before) or any(after):
        x = F.pad(x, (before[2], after[2], before[1], after[1], before[0], after[0]), value=pre.b_min)
        shift = torch.eye(4, dtype=torch.float64)
        shift[:3, 3] = -torch.tensor(before, dtype=torch.float64)
        affine = affine @ shift
    starts = [_window_starts(n, w, s) for n, w, s in zip(x.shape, window, steps)]
    cores = [_core_bounds(st, w) for st, w in zip(starts, window)]
    chosen: list[tuple[tuple[int, ...], tuple[tuple[float, float], ...]]] = []
    best = -math.inf
    for idx in itertools.product(*(range(len(st)) for st in starts)):
        start = tuple(starts[a][i] for a, i in enumerate(idx))
        tile = x[start[0]:start[0] + window[0], start[1]:start[1] + window[1], start[2]:start[2] + window[2]]
        mean = float((tile.mean() - pre.b_min) / (pre.b_max - pre.b_min))
        best = max(best, mean)
        if mean >= min_window_mean:
            chosen.append((start, tuple(cores[a][i] for a, i in enumerate(idx))))
    if not chosen:
        raise ValueError(f"no window of the volume contains anything above min_window_mean={min_window_mean:g} "
                         f"(largest window mean {best:.4g} in normalised [b_min, b_max] units): is the volume "
                         "empty, or volume_hu_window wrong?")

    # 3-5. decode, map to world, keep each Gaussian in the window owning its centre and inside the box
    corners = geometry.volume_corners()
    box_lo, box_hi = corners.min(dim=0).values, corners.max(dim=0).values
    window_t = torch.tensor(window, dtype=torch.float64)
    param = next(model.parameters())
    kept: list[Gaussians] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for first in range(0, len(chosen), batch_size):
                batch = chosen[first:first + batch_size]
                tiles = torch.stack([x[s[0]:s[0] + window[0], s[1]:s[1] + window[1], s[2]:s[2] + window[2]]
                                     for s, _ in batch])[:, None]
                out = model(tiles.to(device=param.device, dtype=param.dtype), mask_ratio=0.0)
                g_all = out.gaussians.detach().to(device="cpu", dtype=torch.float64)
                for i, (start, core) in enumerate(batch):
                    g = g_all[i:i + 1]
                    centre = torch.tensor(start, dtype=torch.float64) + g.means[0] * window_t  # [N, 3] index
                    lo = torch.tensor([c[0] for c in core], dtype=torch.float64)
                    hi = torch.tensor([c[1] for c in core], dtype=torch.float64)
                    own = ((centre >= lo) & (centre < hi)).all(dim=-1)
                    if not bool(own.any()):
                        continue
                    shift = torch.eye(4, dtype=torch.float64)
                    shift[:3, 3] = torch.tensor(start, dtype=torch.float64)
                    world = gaussians_to_world(g[:, own], window, affine=affine @ shift)
                    inside = ((world.means[0] >= box_lo) & (world.means[0] <= box_hi)).all(dim=-1)
                    if bool(inside.any()):
                        kept.append(world[:, inside])
    finally:
        model.train(was_training)
    if not kept:
        raise ValueError("the decoder placed no Gaussian centre inside the volume's world box")

    # 6. one container, plain scales / rotations, intensities in the volume's units
    g = Gaussians.cat(kept, dim=1).canonical()
    return Gaussians(g.means, g.scales, g.quats, g.intensities * k).to(device=volume.device, dtype=torch.float32)
