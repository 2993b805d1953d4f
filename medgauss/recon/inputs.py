"""What ``medgauss-reconstruct`` reconstructs from: a prepared case, or a projection file and a geometry file.

Two routes give the same :class:`ReconInputs`:

- :func:`load_case_inputs`: a case folder written by ``medgauss-prepare-ct`` (format of
  :mod:`medgauss.ct.dataset`). ``K`` evenly spaced views (:func:`medgauss.ct.dataset.evenly_spaced_views`)
  are the inputs, the others are novel views; the case's ``volume.npy`` is the ground truth and its
  ``meta["affine"]`` (voxel -> scanner mm) places the reconstruction over the source CT.
- :func:`load_file_inputs`: ``projections.npy`` (float ``[V, rows, cols]`` line integrals) and a geometry
  file. ``K`` evenly spaced views of the ``V`` are the inputs, the same rule as for a case.

Geometry file (``.json``): the JSON of :meth:`medgauss.geometry.CircularGeometry.to_json`, that is
``{"format": "medgauss.geometry", "type": "cone" | "parallel"``, the constructor arguments of
:class:`~medgauss.geometry.ConeBeamGeometry` (``dso``, ``dsd``, ``det_shape`` ``[rows, cols]``,
``det_spacing`` ``[row_mm, col_mm]``, ``vol_shape`` ``[D, H, W]``, ``vol_spacing`` ``[sd, sh, sw]`` mm,
``angles`` ``[V]`` radians, ``det_offset``, ``vol_offset`` ``[z, y, x]`` mm, ``poses`` ``[V, 4, 4]`` or
null) ``}``, plus an optional ``"affine"``: the ``[4, 4]`` voxel ``(d, h, w, 1)`` -> world ``(x, y, z, 1)``
mm map of the output volume (e.g. a case's scanner frame). Without it the output is placed by the
geometry itself (``geometry.volume_affine``, i.e. :func:`medgauss.frame.grid_affine` of the grid centred
at ``vol_offset``). A case's own ``geometry.json`` is a valid geometry file. Write one with
:func:`geometry_to_json`, read it with :func:`read_geometry_file`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from medgauss.ct.dataset import evenly_spaced_views, load_case
from medgauss.geometry import CircularGeometry, geometry_from_json

__all__ = [
    "ReconInputs",
    "geometry_to_json",
    "geometry_affine_from_json",
    "read_geometry_file",
    "select_views",
    "load_case_inputs",
    "load_file_inputs",
]


@dataclass
class ReconInputs:
    """Inputs of one reconstruction and what its outputs are compared with.

    Attributes:
        projections: ``[1, K, rows, cols]`` float32 input line integrals.
        geometry: the ``K`` input views' geometry.
        affine: ``[4, 4]`` float64 voxel ``(d, h, w, 1)`` -> world ``(x, y, z, 1)`` mm of the output volume.
        view_ids: indices of the ``K`` input views among all ``V`` measured views.
        novel_ids: the other ``V - K`` indices, ascending (the novel views).
        full_geometry: geometry of all ``V`` measured views.
        measured: ``[V, rows, cols]`` float32 measured projections of every view (may be memory-mapped).
        reference: ``[1, 1, D, H, W]`` float32 ground-truth volume (normalised to [0, 1]), or ``None``.
        source: the case folder or projection file, for messages.
    """

    projections: Tensor
    geometry: CircularGeometry
    affine: np.ndarray
    view_ids: list[int]
    novel_ids: list[int]
    full_geometry: CircularGeometry
    measured: np.ndarray
    reference: Tensor | None
    source: str

    def novel_geometry(self) -> CircularGeometry:
        """Geometry of the novel views (``ValueError`` when every view is an input)."""
        if not self.novel_ids:
            raise ValueError(
                f"--novel-views: all {len(self.view_ids)} views of {self.source} are inputs, none is left to "
                "render; use --views smaller than the number of views"
            )
        return self.full_geometry.subset(self.novel_ids)

    def novel_measured(self) -> Tensor:
        """``[1, V - K, rows, cols]`` float32 measured projections of the novel views."""
        return torch.from_numpy(np.array(self.measured[self.novel_ids], dtype=np.float32))[None]


def _check_output_affine(affine: Any, geometry: CircularGeometry, where: str) -> np.ndarray:
    """A finite ``[4, 4]`` affine whose voxel axes have the geometry's voxel sizes (rotation allowed)."""
    try:
        a = np.asarray(affine, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: 'affine' is not a 4x4 matrix of numbers ({exc})") from exc
    if a.shape != (4, 4) or not np.isfinite(a).all() or not np.allclose(a[3], (0, 0, 0, 1)):
        raise ValueError(f"{where}: 'affine' must be a finite 4x4 matrix with last row (0, 0, 0, 1), got {a.tolist()}")
    sizes = np.linalg.norm(a[:3, :3], axis=0)  # column a: the world step of array axis a (D, H, W)
    if not np.allclose(sizes, geometry.vol_spacing, rtol=1e-6, atol=0):
        raise ValueError(
            f"{where}: 'affine' has voxel sizes {sizes.tolist()} mm along (D, H, W), but the geometry's "
            f"vol_spacing is {list(geometry.vol_spacing)}"
        )
    return a


def geometry_to_json(geometry: CircularGeometry, affine: Any = None, *, indent: int | None = 2) -> str:
    """Text of a geometry file (see the module docstring).

    Args:
        geometry: cone- or parallel-beam geometry.
        affine: optional ``[4, 4]`` voxel -> world mm map of the output volume (array or tensor).
    """
    data = geometry.to_dict()
    if affine is not None:
        if isinstance(affine, Tensor):
            affine = affine.detach().cpu().numpy()
        data["affine"] = _check_output_affine(affine, geometry, "geometry_to_json").tolist()
    return json.dumps(data, indent=indent)


def geometry_affine_from_json(
    text: str | dict[str, Any], *, where: str = "geometry JSON"
) -> tuple[CircularGeometry, np.ndarray | None]:
    """``(geometry, affine [4, 4] float64 or None)`` from geometry-file text or its parsed dict.

    Raises:
        ValueError (starting with ``where``): unparsable JSON, not a medgauss geometry, a malformed
            geometry, or an ``affine`` that is not ``[4, 4]`` or disagrees with ``vol_spacing``.
    """
    if isinstance(text, dict):
        data = dict(text)
    else:
        try:
            data = json.loads(text)
        except (TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{where}: not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
    affine = data.pop("affine", None)
    try:
        geometry = geometry_from_json(data)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from exc
    return geometry, None if affine is None else _check_output_affine(affine, geometry, where)


def read_geometry_file(path: str | Path) -> tuple[CircularGeometry, np.ndarray | None]:
    """``(geometry, affine or None)`` of a geometry file (errors name the file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--geometry: file not found: {path}")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--geometry: cannot read {path}: {exc}") from exc
    return geometry_affine_from_json(text, where=str(path))


def select_views(total: int, views: int | None, where: str) -> tuple[list[int], list[int]]:
    """``(input ids, novel ids)``: ``views`` evenly spaced of ``total`` (all when ``None``) and the rest.

    Raises:
        ValueError: ``views`` below 1 or above ``total`` (naming ``--views`` and ``where``).
    """
    if views is None:
        return list(range(total)), []
    if isinstance(views, bool) or not isinstance(views, int | np.integer):
        raise ValueError(f"--views must be an integer, got {views!r}")
    if views < 1:
        raise ValueError(f"--views must be at least 1, got {views}")
    if views > total:
        raise ValueError(f"--views {views} exceeds the {total} views of {where}")
    ids = evenly_spaced_views(total, int(views))
    chosen = set(ids)
    return ids, [i for i in range(total) if i not in chosen]


def _check_finite(array: np.ndarray, path: Path) -> None:
    finite = np.isfinite(array)
    if not finite.all():
        raise ValueError(f"{path} holds {int((~finite).sum())} non-finite value(s) (NaN or inf)")


def _inputs(
    measured: np.ndarray,
    geometry: CircularGeometry,
    views: int | None,
    affine: np.ndarray,
    reference: Tensor | None,
    source: str,
) -> ReconInputs:
    ids, novel = select_views(geometry.num_views, views, source)
    projections = torch.from_numpy(np.array(measured[ids], dtype=np.float32))[None]
    return ReconInputs(
        projections=projections,
        geometry=geometry.subset(ids),
        affine=affine,
        view_ids=ids,
        novel_ids=novel,
        full_geometry=geometry,
        measured=measured,
        reference=reference,
        source=source,
    )


def load_case_inputs(case_dir: str | Path, views: int | None = None) -> ReconInputs:
    """Inputs from a prepared case: ``views`` evenly spaced views (all when ``None``).

    Args:
        case_dir: one case folder of a dataset written by ``medgauss-prepare-ct`` (``<root>/<case_id>``).
        views: number of input views ``K``.

    Returns:
        :class:`ReconInputs` with the case's ground truth and its scanner-frame ``affine``.

    Raises:
        FileNotFoundError / ValueError naming the folder or file: missing folder, a dataset root instead
        of a case, a missing or corrupt case file, non-finite projections or volume, ``views`` out of range.
    """
    case_dir = Path(case_dir)
    if not case_dir.is_dir():
        raise FileNotFoundError(f"--case: folder not found: {case_dir}")
    if (case_dir / "dataset.json").is_file() and not (case_dir / "meta.json").exists():
        raise ValueError(
            f"--case: {case_dir} is a dataset folder (it holds dataset.json); pass one of its case folders, "
            f"e.g. {case_dir / '<case_id>'}"
        )
    case = load_case(case_dir, mmap=True)
    _check_finite(case["projections"], case_dir / "projections.npy")
    volume = np.array(case["volume"], dtype=np.float32)
    _check_finite(volume, case_dir / "volume.npy")
    return _inputs(
        case["projections"],
        case["geometry"],
        views,
        case["affine"].numpy(),
        torch.from_numpy(volume)[None, None],
        str(case_dir),
    )


def _read_projections(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"--projections: file not found: {path}")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(f"--projections: {path} is not a readable .npy array ({exc})") from exc
    if not isinstance(array, np.ndarray) or not (
        np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
    ):
        raise ValueError(
            f"--projections: {path} must hold a real-valued array, got {getattr(array, 'dtype', type(array))}"
        )
    if array.ndim != 3:
        raise ValueError(f"--projections: {path} must be [views, rows, cols], got shape {array.shape}")
    _check_finite(array, path)
    return array.astype(np.float32, copy=False)


def load_file_inputs(projections_path: str | Path, geometry_path: str | Path, views: int | None = None) -> ReconInputs:
    """Inputs from a projection file and a geometry file: ``views`` evenly spaced views (all when ``None``).

    Args:
        projections_path: ``.npy`` ``[V, rows, cols]`` line integrals.
        geometry_path: geometry file with ``V`` views and a ``rows x cols`` detector (see the module
            docstring).
        views: number of input views ``K``.

    Returns:
        :class:`ReconInputs` without ground truth; the affine is the file's ``affine`` or the geometry's
        ``volume_affine``.

    Raises:
        FileNotFoundError / ValueError naming the file(s): missing or unreadable files, non-finite
        projections, a view count or detector size that disagrees with the geometry, ``views`` out of range.
    """
    projections_path, geometry_path = Path(projections_path), Path(geometry_path)
    measured = _read_projections(projections_path)
    geometry, affine = read_geometry_file(geometry_path)
    if measured.shape[0] != geometry.num_views:
        raise ValueError(
            f"{projections_path} holds {measured.shape[0]} views but {geometry_path} describes "
            f"{geometry.num_views}: the projections and the geometry must list the same views"
        )
    if tuple(measured.shape[1:]) != tuple(geometry.det_shape):
        raise ValueError(
            f"{projections_path} has {measured.shape[1]}x{measured.shape[2]} pixel projections but "
            f"{geometry_path} describes a {geometry.det_shape[0]}x{geometry.det_shape[1]} detector (rows x cols)"
        )
    if affine is None:
        affine = geometry.volume_affine.numpy()
    return _inputs(measured, geometry, views, affine, None, str(projections_path))
