"""Procedural chest / upper-abdomen CT phantoms with realistic Hounsfield units and a label map.

Arrays follow the medgauss volume frame (:mod:`medgauss.frame`): ``[D, H, W]`` with axis 0 towards
Superior (z), axis 1 towards Anterior (y), axis 2 towards the patient's Right (x), and an affine to RAS
millimetres with the volume centred on the origin. Each case draws its body size, organ positions and sizes, rib
spacing and noise from a seed, so unlimited distinct volumes can be generated and written as NIfTI
(:func:`write_phantom_dataset`) for the same pipeline as real data.

Label values (:data:`PHANTOM_LABELS`) and HU of each tissue (:data:`PHANTOM_HU`) are module constants;
later structures overwrite earlier ones where they overlap (e.g. the heart is cut out of the lungs).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medgauss.frame import grid_affine, save_nifti

__all__ = ["PHANTOM_LABELS", "PHANTOM_HU", "make_ct_phantom", "write_phantom_dataset"]

# Label values of the structures; like public CT label maps, generic body tissue (muscle, fat) and air
# outside the body are unlabelled (0), so crops can be centred on structures vs. plain body tissue.
PHANTOM_LABELS: dict[str, int] = {
    "lung_left": 1,
    "lung_right": 2,
    "heart": 3,
    "aorta": 4,
    "liver": 5,
    "spleen": 6,
    "kidney_left": 7,
    "kidney_right": 8,
    "vertebra": 9,
    "intervertebral_disc": 10,
    "spinal_canal": 11,
    "rib": 12,
    "trachea": 13,
}

# Typical (non-contrast, except the aorta: arterial phase) attenuation in Hounsfield units of every tissue.
PHANTOM_HU: dict[str, float] = {
    "background": -1000.0,
    "muscle": 45.0,
    "subcutaneous_fat": -100.0,
    "lung_left": -850.0,
    "lung_right": -850.0,
    "heart": 40.0,
    "aorta": 180.0,
    "liver": 60.0,
    "spleen": 48.0,
    "kidney_left": 32.0,
    "kidney_right": 32.0,
    "vertebra": 250.0,  # cancellous bone; the cortical shell is CORTICAL_HU
    "intervertebral_disc": 85.0,
    "spinal_canal": 20.0,
    "rib": 700.0,
    "trachea": -1000.0,
}
CORTICAL_HU = 1000.0


def _ellipsoid(grid: tuple[np.ndarray, ...], centre: Sequence[float], radii: Sequence[float]) -> np.ndarray:
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0


def make_ct_phantom(
    shape: Sequence[int] = (128, 128, 128),
    spacing: float | Sequence[float] = 2.5,
    *,
    seed: int = 0,
    noise_hu: float = 15.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One random chest / upper-abdomen phantom.

    Args:
        shape: ``(D, H, W)`` voxels along (z, y, x), as in :mod:`medgauss.frame`.
        spacing: voxel size in mm (one value or per axis, (D, H, W) order).
        seed: case seed (anatomy variation and noise).
        noise_hu: standard deviation of additive Gaussian noise, HU.

    Returns:
        ``(hu, labels, affine)``: ``hu`` int16 ``[D, H, W]`` in [-1024, 3071]; ``labels`` uint8
        ``[D, H, W]`` with values of :data:`PHANTOM_LABELS` (0: unlabelled); ``affine`` ``[4, 4]``
        float64 (voxel ``(d, h, w)`` -> RAS mm, volume centred on the origin).
    """
    frame_shape = tuple(int(s) for s in shape)
    if len(frame_shape) != 3 or min(frame_shape) < 8:
        raise ValueError(f"shape must be 3 ints >= 8, got {frame_shape}")
    frame_spacing = (
        (float(spacing),) * 3 if isinstance(spacing, (int, float)) else tuple(float(s) for s in spacing)
    )
    if len(frame_spacing) != 3 or min(frame_spacing) <= 0:
        raise ValueError(f"spacing must be a positive float or 3 positive floats, got {spacing}")
    # The anatomy is drawn on (x, y, z)-ordered axes and transposed into the (z, y, x) frame at the end.
    shape, spacing = frame_shape[::-1], frame_spacing[::-1]
    if noise_hu < 0:
        raise ValueError(f"noise_hu must be >= 0, got {noise_hu}")
    rng = np.random.default_rng(seed)
    extent = np.array(shape) * np.array(spacing)  # mm
    axes = [(np.arange(n) + 0.5) * s - e / 2 for n, s, e in zip(shape, spacing, extent)]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    grid = (x, y, z)
    tissue_names = list(PHANTOM_HU)
    tissue = np.zeros(shape, dtype=np.uint8)  # index into tissue_names
    cortical = np.zeros(shape, dtype=bool)

    def paint(name: str, mask: np.ndarray) -> None:
        tissue[np.broadcast_to(mask, shape)] = tissue_names.index(name)

    jitter = lambda scale: 1.0 + rng.uniform(-scale, scale)
    zlen = extent[2]
    ax, ay = 0.44 * extent[0] * jitter(0.08), 0.33 * extent[1] * jitter(0.08)  # body semi-axes, mm
    body = (x / ax) ** 2 + (y / ay) ** 2 <= 1.0
    fat = rng.uniform(8.0, 18.0)  # subcutaneous fat thickness, mm
    paint("subcutaneous_fat", body)
    paint("muscle", (x / (ax - fat)) ** 2 + (y / (ay - fat)) ** 2 <= 1.0)

    diaphragm = -0.1 * zlen * jitter(0.5)  # z of the lung bases, mm
    z_lung = 0.5 * (diaphragm + 0.5 * zlen)
    for name, side in (("lung_left", -1.0), ("lung_right", 1.0)):
        centre = (side * 0.47 * ax * jitter(0.05), 0.05 * ay, z_lung)
        radii = (
            0.36 * ax * jitter(0.08),
            0.62 * ay * jitter(0.08),
            0.5 * (0.5 * zlen - diaphragm) + 0.1 * zlen,
        )
        paint(name, _ellipsoid(grid, centre, radii) & (z > diaphragm))
    heart_c = (-0.12 * ax * jitter(0.3), 0.3 * ay, diaphragm + 0.12 * zlen * jitter(0.2))
    paint(
        "heart", _ellipsoid(grid, heart_c, (0.3 * ax, 0.38 * ay, 0.14 * zlen) * np.array([jitter(0.1)] * 3))
    )
    liver_c = (0.3 * ax, 0.05 * ay, diaphragm - 0.12 * zlen * jitter(0.2))
    paint("liver", _ellipsoid(grid, liver_c, (0.5 * ax * jitter(0.1), 0.6 * ay, 0.18 * zlen * jitter(0.1))))
    spleen_c = (-0.6 * ax, -0.2 * ay, diaphragm - 0.08 * zlen * jitter(0.2))
    paint(
        "spleen",
        _ellipsoid(grid, spleen_c, (0.15 * ax, 0.3 * ay, 0.08 * zlen) * np.array([jitter(0.15)] * 3)),
    )
    for name, side in (("kidney_left", -1.0), ("kidney_right", 1.0)):
        centre = (side * 0.35 * ax, -0.45 * ay, diaphragm - 0.3 * zlen * jitter(0.15))
        paint(
            name, _ellipsoid(grid, centre, (0.12 * ax, 0.18 * ay, 0.11 * zlen) * np.array([jitter(0.1)] * 3))
        )

    spine_y = -0.62 * ay
    aorta_r = rng.uniform(9.0, 13.0)
    paint("aorta", ((x + 0.12 * ax) ** 2 + (y - spine_y - 30.0) ** 2 <= aorta_r**2) & (z < heart_c[2]))
    trachea_r = rng.uniform(7.0, 10.0)
    paint("trachea", (x**2 + (y - 0.05 * ay) ** 2 <= trachea_r**2) & (z > heart_c[2] + 0.15 * zlen))

    # Spine: vertebral bodies (cortical shell + cancellous core) separated by discs, canal behind.
    body_r, period, disc = rng.uniform(15.0, 20.0), rng.uniform(26.0, 32.0), 5.0
    in_column = x**2 + (y - spine_y) ** 2 <= body_r**2
    in_disc = ((z - rng.uniform(0, period)) % period) < disc
    paint("vertebra", in_column & ~in_disc)
    paint("intervertebral_disc", in_column & in_disc)
    cortical |= np.broadcast_to(
        in_column & ~in_disc & (x**2 + (y - spine_y) ** 2 >= (body_r - 2.0) ** 2), shape
    )
    paint("spinal_canal", x**2 + (y - spine_y + body_r + 9.0) ** 2 <= 8.0**2)

    # Ribs: tubes along an ellipse inset from the body wall, from the spine to the front, sloping down.
    rib_r, rib_period = rng.uniform(4.0, 6.0), rng.uniform(22.0, 30.0)
    angle = np.arctan2(y / (ay - fat - 8.0), x / (ax - fat - 8.0))  # -pi/2 = posterior midline
    radial = np.sqrt((x / (ax - fat - 8.0)) ** 2 + (y / (ay - fat - 8.0)) ** 2)
    dist_wall = np.abs(radial - 1.0) * min(ax, ay)  # approx. distance to the rib ellipse, mm
    frac = np.clip((angle + np.pi / 2) % (2 * np.pi) / np.pi, 0.0, 2.0)  # 0 at the spine, 1 at the front
    front_gap = np.abs(angle - np.pi / 2) < 0.35  # costal cartilage gap around the sternum (anterior)
    slope = np.minimum(frac, 2.0 - frac) * 30.0  # ribs drop 30 mm from back to front
    z_rib = (z + slope - rng.uniform(0, rib_period)) % rib_period
    in_rib = (dist_wall**2 + (np.minimum(z_rib, rib_period - z_rib)) ** 2 <= rib_r**2) & (
        z > diaphragm - 40.0
    )
    paint("rib", in_rib & ~front_gap & body)

    hu = np.asarray([PHANTOM_HU[n] for n in tissue_names], dtype=np.float32)[tissue]
    labels = np.asarray([PHANTOM_LABELS.get(n, 0) for n in tissue_names], dtype=np.uint8)[tissue]
    hu[cortical & (tissue == tissue_names.index("vertebra"))] = CORTICAL_HU  # unless painted over later
    # Lung vessels: sparse bright specks smoothed by the noise, so lungs are not flat.
    lungs = (labels == PHANTOM_LABELS["lung_left"]) | (labels == PHANTOM_LABELS["lung_right"])
    hu[lungs & (rng.random(shape) < 0.02)] = -300.0
    if noise_hu > 0:
        hu += rng.normal(0.0, noise_hu, size=shape).astype(np.float32)
    hu = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    hu, labels = (np.ascontiguousarray(a.transpose(2, 1, 0)) for a in (hu, labels))  # (x, y, z) -> (z, y, x)
    return hu, labels, grid_affine(frame_shape, frame_spacing)


def write_phantom_dataset(
    out_dir: str | Path,
    num_cases: int,
    *,
    shape: Sequence[int] = (128, 128, 128),
    spacing: float | Sequence[float] = 2.5,
    seed: int = 0,
    noise_hu: float = 15.0,
    overwrite: bool = False,
) -> list[dict[str, str]]:
    """Write ``num_cases`` phantoms as ``phantom_<nnn>_ct.nii.gz`` / ``phantom_<nnn>_labels.nii.gz``.

    Case ``i`` uses seed ``seed + i``. The parameters are recorded in ``out_dir/phantoms.json``; a later
    call with the same parameters reuses the files (phantoms are deterministic), one with different
    parameters raises unless ``overwrite=True``.

    Returns:
        The datalist ``[{"image": ..., "label": ...}, ...]``.

    Raises:
        ValueError: ``num_cases < 1``, or ``out_dir`` holds phantoms made with other parameters.
    """
    if num_cases < 1:
        raise ValueError(f"num_cases must be >= 1, got {num_cases}")
    out_dir = Path(out_dir)
    params = {
        "num_cases": int(num_cases),
        "shape": [int(s) for s in shape],
        "spacing": [float(spacing)] * 3 if isinstance(spacing, (int, float)) else [float(s) for s in spacing],
        "seed": int(seed),
        "noise_hu": float(noise_hu),
    }
    datalist = [
        {
            "image": str(out_dir / f"phantom_{i:03d}_ct.nii.gz"),
            "label": str(out_dir / f"phantom_{i:03d}_labels.nii.gz"),
        }
        for i in range(num_cases)
    ]
    manifest = out_dir / "phantoms.json"
    if manifest.is_file() and not overwrite:
        recorded = json.loads(manifest.read_text())
        if recorded != params:
            raise ValueError(
                f"{out_dir} already holds phantoms made with {recorded}, not {params}; "
                "choose another out_dir or pass overwrite=True"
            )
        if all(Path(e[k]).is_file() for e in datalist for k in e):
            return datalist
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, entry in enumerate(datalist):
        hu, labels, affine = make_ct_phantom(shape, spacing, seed=seed + i, noise_hu=noise_hu)
        save_nifti(entry["image"], hu, affine)
        save_nifti(entry["label"], labels, affine)
    tmp = manifest.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(params))
    os.replace(tmp, manifest)  # written last: its presence means every file is complete
    return datalist
