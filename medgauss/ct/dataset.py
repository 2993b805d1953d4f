"""On-disk format of prepared reconstruction datasets, and the ``Dataset`` that reads it lazily.

Layout written by :mod:`medgauss.ct.prepare` (one folder per case, plus an index)::

    <root>/dataset.json                 {"format": "medgauss.ct.recon", "version": 1, "cases": [...],
                                         "settings": {...PrepareConfig fields...}}
    <root>/<case_id>/volume.npy         float32 [D, H, W], HU clipped to the window and normalised to [0, 1];
                                        array axes (z, y, x) as in the geometry contract
    <root>/<case_id>/projections.npy    float32 [V, rows, cols], line integrals of volume.npy
                                        (units: normalised value x mm), with simulated noise
    <root>/<case_id>/geometry.json      the ConeBeamGeometry (medgauss.geometry JSON)
    <root>/<case_id>/meta.json          source file, HU window, attenuation_scale, noise, seed (written last)

A case folder only ever appears under its final name complete (it is written under a temporary
name and renamed), so the presence of ``<case_id>/meta.json`` means the case is finished.
Arrays are ``.npy`` so they can be memory-mapped (``np.load(mmap_mode="r")``): nothing is read
until an item is requested.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from medgauss.geometry import CircularGeometry, geometry_from_json

__all__ = ["FORMAT", "FORMAT_VERSION", "CASE_FILES", "load_case", "CTReconstructionDataset"]

FORMAT = "medgauss.ct.recon"
FORMAT_VERSION = 1
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


def load_case(case_dir: str | Path, *, mmap: bool = True) -> dict[str, Any]:
    """Read one prepared case.

    Returns:
        ``{"volume": [D, H, W] float32, "projections": [V, rows, cols] float32 (numpy, memory-mapped
        when ``mmap``), "geometry": CircularGeometry, "meta": dict}``.

    Raises:
        FileNotFoundError / ValueError naming the missing or corrupt file, or shapes that disagree with
        the stored geometry.
    """
    case_dir = Path(case_dir)
    meta = _read_json(case_dir / "meta.json")
    geometry = geometry_from_json(_read_json(case_dir / "geometry.json"))
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
    return {"volume": volume, "projections": projections, "geometry": geometry, "meta": meta}


def evenly_spaced_views(total: int, count: int) -> list[int]:
    """``count`` view indices spread evenly over ``total`` (e.g. 10 of 50 -> 0, 5, 10, ...)."""
    if not 1 <= count <= total:
        raise ValueError(f"num_views must lie in [1, {total}], got {count}")
    return [int(i * total // count) for i in range(count)]


class CTReconstructionDataset(Dataset):
    """Prepared cases as dicts ``case_id``, ``volume`` ``[1, D, H, W]``, ``projections`` ``[V', rows, cols]``,
    ``geometry``, ``meta``.

    Args:
        root: folder written by ``python -m medgauss.ct.prepare``.
        num_views: keep this many evenly spaced views of each case (sparse-view training); default all.
        cases: restrict to these case ids (default: every case of the index, in index order).

    Items are read from disk only when requested (memory-mapped, then copied into tensors).
    """

    def __init__(self, root: str | Path, *, num_views: int | None = None, cases: list[str] | None = None):
        self.root = Path(root)
        index = _read_json(self.root / "dataset.json")
        if index.get("format") != FORMAT:
            raise ValueError(
                f"{self.root / 'dataset.json'} is not a {FORMAT} index (format={index.get('format')!r})"
            )
        known = list(index.get("cases", []))
        if cases is not None:
            missing = sorted(set(cases) - set(known))
            if missing:
                raise ValueError(f"cases not in {self.root / 'dataset.json'}: {missing}")
            known = list(cases)
        if not known:
            raise ValueError(f"{self.root / 'dataset.json'} lists no finished case")
        self.case_ids = known
        self.num_views = num_views
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
            "meta": case["meta"],
        }
