"""On-disk format of prepared reconstruction datasets, the ``Dataset`` that reads it lazily, and its collate.

Layout written by :mod:`medgauss.ct.prepare` (one folder per case, plus an index)::

    <root>/dataset.json                 {"format": "medgauss.ct.recon", "version": 2, "cases": [...],
                                         "settings": {...PrepareConfig fields...}}
    <root>/<case_id>/volume.npy         float32 [D, H, W], HU clipped to the window and normalised to [0, 1]
    <root>/<case_id>/projections.npy    float32 [V, rows, cols], line integrals of volume.npy
                                        (units: normalised value x mm), with simulated noise
    <root>/<case_id>/geometry.json      the ConeBeamGeometry (medgauss.geometry JSON)
    <root>/<case_id>/meta.json          written last: case_id, source (absolute path of the input file),
                                        source_shape / source_affine (the input image in the library
                                        frame), affine, isocentre_mm (see Frames), settings (the
                                        PrepareConfig fields), hu_window, attenuation_scale, noise, seed

Frames (see :mod:`medgauss.frame`). ``volume.npy`` is in the library's one volume frame: array axes
(D, H, W) run along world (z, y, x), indices increasing towards Superior, Anterior, Right. Two worlds
meet in a case, both in RAS+ millimetres and with the same axes:

- the *scanner frame*: the world of the source NIfTI (its ``affine``, RAS+ as nibabel reports it);
- the *geometry world frame* of ``geometry.json``: the scanner frame translated so that the centre of
  the source image sits at the isocentre (the origin). No rotation, no scaling, only that shift.

``meta["isocentre_mm"]`` is the scanner position of the isocentre (the source image centre), and
``meta["affine"]`` (``[4, 4]``) maps a voxel index ``(d, h, w, 1)`` of ``volume.npy`` to scanner
``(x, y, z, 1)`` mm: ``translate(isocentre_mm) @ geometry.volume_affine``. Writing a reconstruction
with that affine (e.g. :func:`medgauss.frame.save_nifti`) overlays it on the original CT.

A case folder only ever appears under its final name complete (it is written under a temporary
name and renamed), so the presence of ``<case_id>/meta.json`` means the case is finished.
Arrays are ``.npy`` so they can be memory-mapped (``np.load(mmap_mode="r")``): nothing is read
until an item is requested. Items hold a geometry object, so batches of more than one case need
:func:`collate_cases` (``DataLoader(dataset, batch_size=4, collate_fn=collate_cases)``).
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from medgauss.geometry import CircularGeometry, geometry_from_json

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "CASE_FILES",
    "load_case",
    "evenly_spaced_views",
    "CTReconstructionDataset",
    "collate_cases",
]

FORMAT = "medgauss.ct.recon"
FORMAT_VERSION = 2  # 2: meta.json records the scanner frame ("affine", "isocentre_mm") and "settings"
CASE_FILES = ("volume.npy", "projections.npy", "geometry.json", "meta.json")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"missing file: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"corrupt JSON file {path}: {exc}") from exc


def _read_npy(path: Path, mmap: bool) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"missing file: {path}")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise ValueError(f"corrupt array file {path}: {exc}") from exc


def _read_header(case_dir: Path) -> tuple[dict[str, Any], CircularGeometry, Tensor]:
    """``(meta, geometry, affine)`` of a finished case, from its two small JSON files.

    Raises FileNotFoundError naming ``meta.json`` for an unfinished case, ValueError naming the file
    for a corrupt geometry or a missing / malformed scanner affine.
    """
    meta_path, geometry_path = case_dir / "meta.json", case_dir / "geometry.json"
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"case {case_dir.name!r} is not finished: {meta_path} is missing (run medgauss-prepare-ct again "
            "to finish it)"
        )
    meta = _read_json(meta_path)
    try:
        geometry = geometry_from_json(_read_json(geometry_path))
    except ValueError as exc:
        raise ValueError(f"{geometry_path}: {exc}") from exc
    if "affine" not in meta:
        raise ValueError(
            f"{meta_path} records no scanner 'affine' (prepared by a medgauss-prepare-ct older than format "
            f"version {FORMAT_VERSION}); prepare the dataset again into a new folder"
        )
    try:
        affine = torch.tensor(meta["affine"], dtype=torch.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{meta_path}: 'affine' is not a 4x4 matrix of numbers ({exc})") from exc
    if affine.shape != (4, 4) or not bool(torch.isfinite(affine).all()):
        raise ValueError(f"{meta_path}: 'affine' must be a finite 4x4 matrix, got shape {tuple(affine.shape)}")
    linear = geometry.volume_affine[:3, :3]
    if not torch.allclose(affine[:3, :3], linear, rtol=1e-9, atol=1e-9 * float(linear.abs().max())):
        raise ValueError(
            f"{meta_path}: 'affine' {affine[:3, :3].tolist()} is not the geometry's voxel axes "
            f"{linear.tolist()} plus a shift (scanner frame = geometry world frame translated)"
        )
    return meta, geometry, affine


def load_case(case_dir: str | Path, *, mmap: bool = True) -> dict[str, Any]:
    """Read one prepared case.

    Returns:
        ``{"volume": [D, H, W] float32, "projections": [V, rows, cols] float32`` (numpy, memory-mapped
        when ``mmap``), ``"geometry": CircularGeometry, "affine": [4, 4] float64 Tensor`` (voxel
        ``(d, h, w, 1)`` of the volume -> scanner ``(x, y, z, 1)`` mm, see the module docstring),
        ``"meta": dict}``.

    Raises:
        FileNotFoundError / ValueError naming the missing or corrupt file, or shapes that disagree with
        the stored geometry.
    """
    case_dir = Path(case_dir)
    meta, geometry, affine = _read_header(case_dir)
    volume = _read_npy(case_dir / "volume.npy", mmap)
    projections = _read_npy(case_dir / "projections.npy", mmap)
    if tuple(volume.shape) != tuple(geometry.vol_shape):
        raise ValueError(
            f"{case_dir / 'volume.npy'} has shape {volume.shape}, geometry says {geometry.vol_shape}"
        )
    if tuple(projections.shape) != geometry.output_shape():
        raise ValueError(
            f"{case_dir / 'projections.npy'} has shape {projections.shape}, "
            f"geometry says {geometry.output_shape()}"
        )
    return {"volume": volume, "projections": projections, "geometry": geometry, "affine": affine, "meta": meta}


def evenly_spaced_views(total: int, count: int) -> list[int]:
    """``count`` view indices spread evenly over ``total`` (e.g. 10 of 50 -> 0, 5, 10, ...)."""
    if not 1 <= count <= total:
        raise ValueError(f"num_views must lie in [1, {total}], got {count}")
    return [int(i * total // count) for i in range(count)]


class CTReconstructionDataset(Dataset):
    """Prepared cases as dicts ``case_id``, ``volume`` ``[1, D, H, W]`` float32, ``projections``
    ``[V', rows, cols]`` float32, ``geometry`` (a :class:`~medgauss.geometry.CircularGeometry` of those
    ``V'`` views), ``affine`` ``[4, 4]`` float64 (voxel ``(d, h, w, 1)`` -> scanner world mm, see the module
    docstring) and ``meta``.

    Args:
        root: folder written by ``medgauss-prepare-ct`` (``python -m medgauss.ct.prepare``).
        num_views: keep this many evenly spaced views of each case (sparse-view training); default all.
        cases: restrict to these case ids (default: every case of the index, in index order).

    Every case is checked at construction (it is finished, its geometry is readable and it has at least
    ``num_views`` views) by reading its two small JSON files; arrays are read only when an item is
    requested (memory-mapped, then copied into tensors). Batch items with :func:`collate_cases`.

    Raises:
        FileNotFoundError / ValueError naming the index, the case and the file at fault.
    """

    def __init__(self, root: str | Path, *, num_views: int | None = None, cases: list[str] | None = None):
        self.root = Path(root)
        index_path = self.root / "dataset.json"
        index = _read_json(index_path)
        if index.get("format") != FORMAT:
            raise ValueError(f"{index_path} is not a {FORMAT} index (format={index.get('format')!r})")
        if index.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{index_path} has format version {index.get('version')!r}, this medgauss reads version "
                f"{FORMAT_VERSION} (which records each case's scanner frame); prepare the dataset again "
                "into a new folder"
            )
        known = list(index.get("cases", []))
        if cases is not None:
            missing = sorted(set(cases) - set(known))
            if missing:
                raise ValueError(f"cases not in {index_path}: {missing}")
            known = list(cases)
        if not known:
            raise ValueError(f"{index_path} lists no finished case")
        if num_views is not None and (
            not isinstance(num_views, numbers.Integral) or isinstance(num_views, bool) or num_views < 1
        ):
            raise ValueError(f"num_views must be a positive int or None, got {num_views!r}")
        for case_id in known:
            case_dir = self.root / case_id
            if not case_dir.is_dir():
                raise FileNotFoundError(f"case {case_id!r} listed in {index_path} has no folder {case_dir}")
            _, geometry, _ = _read_header(case_dir)
            if num_views is not None and num_views > geometry.num_views:
                raise ValueError(
                    f"num_views={num_views} exceeds the {geometry.num_views} views of case {case_id!r} "
                    f"({case_dir / 'geometry.json'})"
                )
        self.case_ids = known
        self.num_views = None if num_views is None else int(num_views)
        self.settings = index.get("settings", {})

    def __len__(self) -> int:
        return len(self.case_ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        case_id = self.case_ids[index]
        case = load_case(self.root / case_id, mmap=True)
        geometry: CircularGeometry = case["geometry"]
        projections = case["projections"]
        if self.num_views is not None:
            ids = evenly_spaced_views(geometry.num_views, self.num_views)
            geometry = geometry.subset(ids)
            projections = projections[ids]
        return {
            "case_id": case_id,
            "volume": torch.from_numpy(np.array(case["volume"], dtype=np.float32))[None],
            "projections": torch.from_numpy(np.array(projections, dtype=np.float32)),
            "geometry": geometry,
            "affine": case["affine"],
            "meta": case["meta"],
        }


_ITEM_KEYS = ("case_id", "volume", "projections", "geometry", "affine")


def _same(items: Sequence[dict[str, Any]], what: str, values: list[Any]) -> None:
    if len(set(values)) > 1:
        listing = ", ".join(f"{item['case_id']}: {value}" for item, value in zip(items, values))
        raise ValueError(f"cannot batch cases with different {what} ({listing})")


def collate_cases(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch :class:`CTReconstructionDataset` items (``DataLoader(..., collate_fn=collate_cases)``).

    The cases must share the number of views, the detector shape, the volume shape and the geometry
    kind (cone / parallel); their angles, spacings and frames may differ.

    Args:
        items: ``B >= 1`` dataset items.

    Returns:
        ``{"case_id": list[str] (B), "volume": [B, 1, D, H, W] float32, "projections": [B, V, rows, cols]
        float32, "affine": [B, 4, 4] float64`` (voxel -> scanner mm), ``"volume_affine": [B, 4, 4] float64``
        (voxel -> geometry world mm, ``geometry.volume_affine``), ``"projection_matrices": [B, V, 3, 4]
        float64, "source_positions": [B, V, 3] float64`` (mm; unit ray directions for parallel beam),
        ``"vectors": [B, V, 12] float64`` (ASTRA ray bases ``(src, d00, du, dv)``, see
        :meth:`~medgauss.geometry.CircularGeometry.vectors`), ``"angles": [B, V] float64`` (radians),
        ``"geometry": list`` of the B geometries, ``"meta": list`` of the B meta dicts ``}``.

    Raises:
        ValueError: no items, an item lacking a key, or cases that differ in view count, detector shape,
        volume shape or geometry kind (naming the case ids).
    """
    if len(items) == 0:
        raise ValueError("collate_cases needs at least one item")
    for item in items:
        missing = [k for k in _ITEM_KEYS if k not in item]
        if missing:
            raise ValueError(f"collate_cases: item {item.get('case_id', '?')!r} lacks {missing}")
    geometries: list[CircularGeometry] = [item["geometry"] for item in items]
    _same(items, "geometry kinds", [type(g).__name__ for g in geometries])
    _same(items, "view counts", [g.num_views for g in geometries])
    _same(items, "detector shapes (rows, cols)", [tuple(g.det_shape) for g in geometries])
    _same(items, "volume shapes (D, H, W)", [tuple(g.vol_shape) for g in geometries])
    _same(items, "projection array shapes", [tuple(item["projections"].shape) for item in items])
    _same(items, "volume array shapes", [tuple(item["volume"].shape) for item in items])
    return {
        "case_id": [item["case_id"] for item in items],
        "volume": torch.stack([item["volume"] for item in items]),
        "projections": torch.stack([item["projections"] for item in items]),
        "affine": torch.stack([torch.as_tensor(item["affine"], dtype=torch.float64) for item in items]),
        "volume_affine": torch.stack([g.volume_affine for g in geometries]),
        "projection_matrices": torch.stack([g.projection_matrices() for g in geometries]),
        "source_positions": torch.stack([g.source_positions() for g in geometries]),
        "vectors": torch.stack([g.vectors() for g in geometries]),
        "angles": torch.stack([g.angles for g in geometries]),
        "geometry": geometries,
        "meta": [item.get("meta") for item in items],
    }
