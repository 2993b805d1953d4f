"""The one volume frame of medgauss: how a volume's array axes sit in the world.

Every volume the library touches (pretraining crops, phantoms, the bundled CT, prepared CT cases,
reconstructions, the CT geometry, panels, and the normalised coordinates of predicted Gaussians) is
an array ``[..., D, H, W]`` whose axes run along world ``(z, y, x)``:

* world coordinates are RAS+ millimetres: ``+x`` towards the patient's Right, ``+y`` Anterior, ``+z``
  Superior (NIfTI's convention, and nibabel's ``affine``);
* array axis 0 (D) indexes increase towards Superior, axis 1 (H) towards Anterior, axis 2 (W)
  towards Right: nibabel axis codes :data:`AXCODES` = ``("S", "A", "R")``;
* each volume travels with its ``[4, 4]`` float64 ``affine`` mapping voxel index ``(d, h, w, 1)`` to
  world ``(x, y, z, 1)`` mm, the NIfTI meaning of an affine; in this frame its linear part is
  ``[[0, 0, sw], [0, sh, 0], [sd, 0, 0]]`` for voxel sizes ``(sd, sh, sw)`` (until an augmentation
  flips or rotates a crop: the crop's affine then records that too).

This is TIGRE's and :class:`medgauss.geometry.CircularGeometry`'s layout (gantry rotation about world
z, so an axial slice is ``volume[d]`` and a detector row runs along x/y), so a crop made for
pretraining, a case prepared for reconstruction and the geometry that projects it agree without a
transpose. Normalised coordinates of Gaussians (component ``a`` along array axis ``a``) are therefore
``(z, y, x)``-ordered fractions of the volume; :func:`medgauss.gaussians.gaussians_to_world` maps them
to world ``(x, y, z)`` mm through the volume's affine.

A user's NIfTI (any orientation code, any spacing) enters this frame in one place:
:func:`to_canonical` (a permutation and flips of the array, never a resampling), used by
:func:`load_nifti` and by the MONAI pipelines (``Orientationd(axcodes=AXCODES)``).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations

__all__ = [
    "AXCODES",
    "to_canonical",
    "is_canonical",
    "load_nifti",
    "save_nifti",
    "grid_affine",
    "grid_placement",
    "crop_affine",
    "voxel_to_world",
    "world_to_voxel",
    "grid_coords",
    "sample_at",
    "resample_to_grid",
]

AXCODES: tuple[str, str, str] = ("S", "A", "R")
"""Direction towards which array axes 0, 1, 2 (D, H, W) of every medgauss volume increase."""


def _as_affine(affine: np.ndarray | Sequence[Sequence[float]], name: str = "affine") -> np.ndarray:
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.isfinite(a).all():
        raise ValueError(f"{name} must be a finite [4, 4] voxel-to-world matrix, got shape {a.shape}")
    if abs(np.linalg.det(a[:3, :3])) < 1e-12:
        raise ValueError(f"{name} has a singular linear part")
    return a


def to_canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorient a volume into the medgauss frame (axes towards S, A, R) without resampling.

    The array's axes are permuted and flipped to the closest canonical orientation (nibabel's
    ``io_orientation``: oblique acquisitions keep their obliquity in the returned affine), so every
    voxel keeps its value and its world position.

    Args:
        array: ``[I, J, K]`` volume in the voxel order of ``affine`` (e.g. a NIfTI's data array).
        affine: ``[4, 4]`` voxel-to-world RAS mm matrix (the NIfTI affine).

    Returns:
        ``(array [D, H, W], affine [4, 4] float64)`` with array axes towards (S, A, R). The array is
        a view where numpy allows it.
    """
    if np.ndim(array) != 3:
        raise ValueError(f"array must be a 3-D volume, got shape {np.shape(array)}")
    a = _as_affine(affine)
    current = orientations.io_orientation(a)
    target = orientations.axcodes2ornt(AXCODES)
    transform = orientations.ornt_transform(current, target)
    out = orientations.apply_orientation(np.asarray(array), transform)
    new_affine = a @ orientations.inv_ornt_aff(transform, np.shape(array))
    return out, new_affine


def is_canonical(affine: np.ndarray) -> bool:
    """Whether ``affine``'s array axes point towards (S, A, R) (to within obliquity)."""
    return orientations.aff2axcodes(_as_affine(affine)) == AXCODES


def load_nifti(path: str | Path, *, dtype: np.dtype | type = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Read a 3-D NIfTI volume into the medgauss frame.

    Args:
        path: ``.nii`` / ``.nii.gz`` file (a trailing singleton 4th axis is dropped).
        dtype: dtype of the returned array (values scaled by the header's slope / intercept).

    Returns:
        ``(array [D, H, W], affine [4, 4] float64)`` in the frame of this module.

    Raises:
        FileNotFoundError: no such file. ValueError (naming the file): unreadable or corrupt file, not
        3-D, or non-finite voxels.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"NIfTI file not found: {path}")
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=dtype)
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as exc:  # nibabel / gzip raise many types for corrupt files
        raise ValueError(f"could not read NIfTI file {path}: {type(exc).__name__}: {exc}") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{path} is not a 3-D volume (array shape {data.shape})")
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise ValueError(f"{path} holds {bad} non-finite voxel(s) (NaN or inf)")
    try:
        return to_canonical(data, affine)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc


def save_nifti(path: str | Path, array: np.ndarray, affine: np.ndarray, *, vector: bool = False) -> Path:
    """Write a volume with its affine, atomically (temp + rename).

    Args:
        path: output ``.nii`` / ``.nii.gz`` file (parent folders are created).
        array: ``[D, H, W]`` volume (any numeric dtype nibabel stores), or ``[D, H, W, C]`` values per voxel
            (class probabilities; with ``vector=True`` a displacement field, written ``[D, H, W, 1, C]`` with the
            NIfTI vector intent, ITK's layout).
        affine: ``[4, 4]`` voxel-to-world RAS mm matrix of the array's first three axes.
        vector: write ``[D, H, W, C]`` as a NIfTI vector field (spatial units mm).

    Returns:
        ``path``.
    """
    path = Path(path)
    arr = np.asarray(array)
    if arr.ndim != 3 and not (arr.ndim == 4 and arr.shape[3] >= 1):
        raise ValueError(f"array must be a volume [D, H, W] or per-voxel values [D, H, W, C], got shape {arr.shape}")
    if vector and arr.ndim != 4:
        raise ValueError(f"vector=True needs a [D, H, W, C] field, got shape {arr.shape}")
    a = _as_affine(affine)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp{suffix}")
    img = nib.Nifti1Image(arr[:, :, :, None, :] if vector else arr, a)
    if vector:
        img.header.set_intent("vector")
        img.header.set_xyzt_units("mm")
    img.set_qform(a, code=1)
    img.set_sform(a, code=1)
    try:
        nib.save(img, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def grid_affine(
    shape: Sequence[int], spacing: Sequence[float], centre: Sequence[float] = (0.0, 0.0, 0.0)
) -> np.ndarray:
    """Affine of a canonical grid of ``shape`` voxels whose centre sits at world ``centre``.

    Args:
        shape: ``(D, H, W)`` voxels.
        spacing: ``(sd, sh, sw)`` voxel size in mm (along z, y, x).
        centre: world ``(x, y, z)`` mm of the grid's centre.

    Returns:
        ``[4, 4]`` float64: voxel ``(d, h, w)`` sits at ``x = (w - (W-1)/2) sw + cx``,
        ``y = (h - (H-1)/2) sh + cy``, ``z = (d - (D-1)/2) sd + cz`` (the geometry's ``volume_affine``
        for ``centre = vol_offset`` reversed).
    """
    shape = tuple(int(s) for s in shape)
    sp = tuple(float(s) for s in spacing)
    c = tuple(float(v) for v in centre)
    if len(shape) != 3 or min(shape) <= 0:
        raise ValueError(f"shape must be three positive ints (D, H, W), got {shape}")
    if len(sp) != 3 or min(sp) <= 0:
        raise ValueError(f"spacing must be three positive sizes in mm (D, H, W), got {sp}")
    if len(c) != 3 or not all(np.isfinite(c)):
        raise ValueError(f"centre must be three finite world coordinates (x, y, z) mm, got {c}")
    a = np.zeros((4, 4))
    a[3, 3] = 1.0
    for row, axis in ((0, 2), (1, 1), (2, 0)):  # x <- w, y <- h, z <- d
        a[row, axis] = sp[axis]
        a[row, 3] = c[row] - (shape[axis] - 1) / 2.0 * sp[axis]
    return a


Triple = tuple[float, float, float]


def grid_placement(affine: np.ndarray, shape: Sequence[int]) -> tuple[Triple, Triple]:
    """Voxel size and world centre of an axis-aligned grid of this frame (the inverse of :func:`grid_affine`).

    This is how a volume is placed in a CT geometry: ``ConeBeamGeometry(vol_shape=shape,
    vol_spacing=spacing, vol_offset=(cz, cy, cx))`` has ``volume_affine == affine``.

    Args:
        affine: ``[4, 4]`` voxel-to-world matrix whose linear part is ``[[0, 0, sw], [0, sh, 0], [sd, 0, 0]]``
            with positive sizes (an augmented crop may be flipped or rotated: bring it back with
            :func:`to_canonical` first).
        shape: ``(D, H, W)`` voxels.

    Returns:
        ``(spacing, centre)``: ``(sd, sh, sw)`` mm and the world ``(x, y, z)`` mm of the grid's centre.

    Raises:
        ValueError: the affine is oblique, permuted or flipped relative to this frame.
    """
    a = _as_affine(affine)
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) <= 0:
        raise ValueError(f"shape must be three positive ints (D, H, W), got {shape}")
    lin = a[:3, :3]
    spacing = (float(lin[2, 0]), float(lin[1, 1]), float(lin[0, 2]))
    expected = np.array([[0, 0, spacing[2]], [0, spacing[1], 0], [spacing[0], 0, 0]])
    if min(spacing) <= 0 or not np.allclose(lin, expected, rtol=0, atol=1e-9 * max(abs(v) for v in spacing)):
        raise ValueError(
            "affine is not an axis-aligned grid of the medgauss frame (axes towards S, A, R); reorient it with "
            f"medgauss.frame.to_canonical or resample it first; linear part {lin.tolist()}"
        )
    centre_index = np.array([(n - 1) / 2.0 for n in shape])
    centre = lin @ centre_index + a[:3, 3]
    return spacing, (float(centre[0]), float(centre[1]), float(centre[2]))


def crop_affine(affine: np.ndarray, start: Sequence[int]) -> np.ndarray:
    """Affine of the sub-volume whose voxel ``(0, 0, 0)`` is voxel ``start`` ``(d, h, w)`` of ``affine``."""
    a = _as_affine(affine).copy()
    s = np.asarray(start, dtype=np.float64)
    if s.shape != (3,):
        raise ValueError(f"start must be three voxel indices (d, h, w), got {start!r}")
    a[:3, 3] = a[:3, 3] + a[:3, :3] @ s
    return a


def voxel_to_world(indices: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """World ``[..., 3]`` (x, y, z) mm of continuous voxel indices ``[..., 3]`` (d, h, w)."""
    a = _as_affine(affine)
    idx = np.asarray(indices, dtype=np.float64)
    return idx @ a[:3, :3].T + a[:3, 3]


def world_to_voxel(points: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Continuous voxel indices ``[..., 3]`` (d, h, w) of world points ``[..., 3]`` (x, y, z) mm."""
    inv = np.linalg.inv(_as_affine(affine))
    pts = np.asarray(points, dtype=np.float64)
    return pts @ inv[:3, :3].T + inv[:3, 3]


def grid_coords(source_affine: np.ndarray, target_affine: np.ndarray, target_shape: Sequence[int]):
    """``[*target_shape, 3]`` float64 torch tensor: the continuous voxel index ``(d, h, w)`` in the source grid
    (voxel -> world ``source_affine``) of every voxel centre of the target grid (``target_affine``,
    ``target_shape``; any axis order)."""
    import torch

    mapping = np.linalg.inv(_as_affine(source_affine, "source_affine")) @ _as_affine(target_affine, "target_affine")
    axes = [torch.arange(int(n), dtype=torch.float64) for n in target_shape]
    index = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
    m = torch.from_numpy(mapping)
    return index @ m[:3, :3].T + m[:3, 3]


def sample_at(volume, coords, *, mode: str = "bilinear", pad_value: float = 0.0):
    """Values of ``volume`` at continuous voxel coordinates (``torch.nn.functional.grid_sample``,
    ``align_corners=True``: voxel ``i`` sits at index ``i``).

    Args:
        volume: ``[C, D, H, W]`` float torch tensor.
        coords: ``[..., 3]`` voxel coordinates ``(d, h, w)`` in ``volume``'s grid.
        mode: ``"bilinear"`` (trilinear) or ``"nearest"``.
        pad_value: the value outside the volume.

    Returns:
        ``[C, ...]`` in ``volume``'s dtype and device.
    """
    import torch
    import torch.nn.functional as F

    if not isinstance(volume, torch.Tensor) or volume.ndim != 4 or coords.shape[-1] != 3:
        raise ValueError(f"volume must be [C, D, H, W] and coords [..., 3], got {tuple(getattr(volume, 'shape', ()))} "
                         f"and {tuple(coords.shape)}")
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"mode must be 'bilinear' or 'nearest', got {mode!r}")
    coords = coords.to(device=volume.device, dtype=torch.float64)
    dims = torch.tensor(volume.shape[1:], dtype=torch.float64, device=volume.device)
    normalised = 2.0 * coords / (dims - 1).clamp_min(1) - 1.0
    grid = normalised.flip(-1).reshape(1, 1, 1, -1, 3).to(volume.dtype)  # grid_sample wants (w, h, d) order
    out = F.grid_sample(volume[None] - pad_value, grid, mode=mode, padding_mode="zeros", align_corners=True)
    return out[0, :, 0, 0].reshape(volume.shape[0], *coords.shape[:-1]) + pad_value


def resample_to_grid(volume, affine: np.ndarray, target_affine: np.ndarray, target_shape: Sequence[int], *,
                     mode: str = "bilinear", pad_value: float = 0.0, chunk: int = 16):
    """Sample ``volume`` (a grid with voxel -> world ``affine``) at every voxel centre of another grid.

    The way a result computed on a preprocessed grid (reoriented, resampled, cropped or padded) goes back onto a
    user's image grid, or an image onto a model's grid: target voxel ``v`` takes the value of ``volume`` at
    continuous index ``inv(affine) @ target_affine @ v`` (:func:`grid_coords`, :func:`sample_at`).

    Args:
        volume: ``[C, D, H, W]`` float torch tensor (channels are resampled alike).
        affine: ``[4, 4]`` voxel -> world mm of ``volume``.
        target_affine, target_shape: ``[4, 4]`` voxel -> world mm and ``(n0, n1, n2)`` of the target grid (any axis
            order: e.g. a NIfTI file's own array order and affine).
        mode: ``"bilinear"`` (trilinear) or ``"nearest"``.
        pad_value: the value outside ``volume``.
        chunk: target slices (along its first axis) sampled at once (bounds memory).

    Returns:
        ``[C, *target_shape]`` in ``volume``'s dtype, on its device.
    """
    import torch

    if not isinstance(volume, torch.Tensor) or volume.ndim != 4:
        raise ValueError(f"volume must be a [C, D, H, W] tensor, got {getattr(volume, 'shape', type(volume))}")
    shape = tuple(int(n) for n in target_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"target_shape must be 3 positive ints, got {target_shape!r}")
    out = torch.empty((volume.shape[0], *shape), dtype=volume.dtype, device=volume.device)
    step = np.eye(4)
    for start in range(0, shape[0], chunk):
        stop = min(start + chunk, shape[0])
        step[0, 3] = start  # the slab's first index, in the target grid
        coords = grid_coords(affine, _as_affine(target_affine) @ step, (stop - start, *shape[1:]))
        out[:, start:stop] = sample_at(volume, coords, mode=mode, pad_value=pad_value)
    return out
