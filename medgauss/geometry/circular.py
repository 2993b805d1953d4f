"""Circular-orbit cone- and parallel-beam CT geometries in millimetres (TIGRE-style parameters).

Conventions (the geometry contract, shared with ``medgauss.render.project``):

- World frame: millimetres, axes (x, y, z), isocentre at the origin, gantry rotation axis = world z.
- Volume ``[D, H, W]``: array axis 0 (D) runs along world z, axis 1 (H) along y, axis 2 (W) along x: the
  library's one volume frame (:mod:`medgauss.frame`), so ``volume_affine`` is a volume's NIfTI-style affine
  and :func:`medgauss.frame.grid_placement` turns any canonical volume affine into ``vol_spacing`` /
  ``vol_offset``.
  ``vol_shape``, ``vol_spacing`` and ``vol_offset`` are in (D, H, W) order; voxel ``(d, h, w)`` has its
  centre at ``x = (w - (W-1)/2) sw + off_w``, ``y = (h - (H-1)/2) sh + off_h``,
  ``z = (d - (D-1)/2) sd + off_d``.
- View at angle ``theta``: source direction ``e_s = (cos, sin, 0)``; detector column axis
  ``u = (-sin, cos, 0)``, row axis ``v = (0, 0, -1)`` (row index grows towards -z: images display upright).
  Cone beam: source ``S = dso e_s``, detector centre ``C = -(dsd - dso) e_s``. Parallel beam: detector
  plane through the isocentre, rays travel along ``-e_s``.
- Pixel ``(r, c)`` centre:
  ``C + (c - (cols-1)/2) col_mm u + (r - (rows-1)/2) row_mm v + off_col u + off_row v``.
- Optional per-view ``poses`` ``[V, 4, 4]`` (rigid, gantry -> world) move each view's source and detector
  after this circular placement, e.g. for measured C-arm poses or a wobbling gantry.
- Volumes hold linear attenuation per mm; a projection is the (dimensionless) line integral.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

__all__ = ["CircularGeometry", "ConeBeamGeometry", "ParallelBeamGeometry", "geometry_from_json"]

_FORMAT = "medgauss.geometry"


def _positive_ints(name: str, value: Sequence[int], n: int) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be {n} positive ints, got {value!r}") from exc
    if len(out) != n or min(out) <= 0 or any(float(v) != o for v, o in zip(value, out)):
        raise ValueError(f"{name} must be {n} positive ints, got {tuple(value)}")
    return out


def _floats(name: str, value: Sequence[float], n: int, positive: bool) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be {n} numbers, got {value!r}") from exc
    if len(out) != n or not all(math.isfinite(v) for v in out):
        raise ValueError(f"{name} must be {n} finite numbers, got {value!r}")
    if positive and min(out) <= 0:
        raise ValueError(f"{name} must be {n} positive numbers (mm), got {out}")
    return out


def _angles(value: Any) -> Tensor:
    if isinstance(value, Tensor):
        a = value.detach().to(device="cpu", dtype=torch.float64)
    else:
        try:
            a = torch.as_tensor(np.asarray(value, dtype=np.float64))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"angles must be a 1-D sequence of radians, got {value!r}") from exc
    if a.ndim == 0:
        a = a.reshape(1)
    if a.ndim != 1:
        raise ValueError(f"angles must be 1-D (radians), got shape {tuple(a.shape)}")
    if a.numel() == 0:
        raise ValueError("angles is empty: a geometry needs at least one view")
    if not bool(torch.isfinite(a).all()):
        raise ValueError("angles contains non-finite values")
    return a.contiguous()


def _poses(value: Any, num_views: int) -> Tensor | None:
    if value is None:
        return None
    p = torch.as_tensor(np.asarray(value, dtype=np.float64)) if not isinstance(value, Tensor) else value
    p = p.detach().to(device="cpu", dtype=torch.float64)
    if p.shape != (num_views, 4, 4):
        raise ValueError(f"poses must have shape [V={num_views}, 4, 4] (one per angle), got {tuple(p.shape)}")
    if not bool(torch.isfinite(p).all()):
        raise ValueError("poses contains non-finite values")
    bottom = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    rot = p[:, :3, :3]
    eye = torch.eye(3, dtype=torch.float64).expand_as(rot)
    if (
        not torch.allclose(p[:, 3], bottom.expand(num_views, 4))
        or not torch.allclose(rot @ rot.transpose(1, 2), eye, atol=1e-6)
        or bool((torch.linalg.det(rot) < 0).any())
    ):
        raise ValueError(
            "poses must be rigid transforms: rotation (orthonormal, det +1) and translation, last row (0, 0, 0, 1)"
        )
    return p.contiguous()


@dataclass(eq=False)
class CircularGeometry(ABC):
    """Shared part of :class:`ConeBeamGeometry` and :class:`ParallelBeamGeometry` (not used directly).

    Attributes:
        det_shape: detector ``(rows, cols)`` in pixels.
        det_spacing: pixel size ``(row_mm, col_mm)``.
        vol_shape: volume ``(D, H, W)`` in voxels.
        vol_spacing: voxel size ``(sd, sh, sw)`` in mm (along z, y, x).
        angles: ``[V]`` float64 gantry angles in radians (any count, any arc).
        det_offset: ``(row_mm, col_mm)`` shift of the detector along ``v`` and ``u``.
        vol_offset: ``(z, y, x)`` mm shift of the volume centre from the isocentre.
        poses: optional ``[V, 4, 4]`` float64 rigid transforms (gantry frame -> world, mm) applied to each
            view's source and detector after the circular placement; ``None`` is the ideal orbit.
    """

    det_shape: tuple[int, int]
    det_spacing: tuple[float, float]
    vol_shape: tuple[int, int, int]
    vol_spacing: tuple[float, float, float]
    angles: Tensor
    det_offset: tuple[float, float] = (0.0, 0.0)
    vol_offset: tuple[float, float, float] = (0.0, 0.0, 0.0)
    poses: Tensor | None = None

    kind: ClassVar[str] = "circular"
    is_cone: ClassVar[bool] = False

    def __post_init__(self) -> None:
        self.det_shape = _positive_ints("det_shape", self.det_shape, 2)  # type: ignore[assignment]
        self.det_spacing = _floats("det_spacing", self.det_spacing, 2, True)  # type: ignore[assignment]
        self.vol_shape = _positive_ints("vol_shape", self.vol_shape, 3)  # type: ignore[assignment]
        self.vol_spacing = _floats("vol_spacing", self.vol_spacing, 3, True)  # type: ignore[assignment]
        self.det_offset = _floats("det_offset", self.det_offset, 2, False)  # type: ignore[assignment]
        self.vol_offset = _floats("vol_offset", self.vol_offset, 3, False)  # type: ignore[assignment]
        self.angles = _angles(self.angles)
        self.poses = _poses(self.poses, self.num_views)

    # ------------------------------------------------------------------ basic properties
    @property
    def num_views(self) -> int:
        return int(self.angles.numel())

    @property
    def volume_affine(self) -> Tensor:
        """``[4, 4]`` float64 map from voxel index ``(d, h, w, 1)`` to world ``(x, y, z, 1)`` mm."""
        m = torch.zeros(4, 4, dtype=torch.float64)
        m[3, 3] = 1.0
        for row, axis in ((0, 2), (1, 1), (2, 0)):  # x <- w, y <- h, z <- d
            m[row, axis] = self.vol_spacing[axis]
            m[row, 3] = self.volume_origin[axis]
        return m

    @property
    def volume_origin(self) -> tuple[float, float, float]:
        """World coordinate (mm) of the centre of voxel ``(0, 0, 0)`` along (z, y, x) = (D, H, W) axes."""
        return tuple(  # type: ignore[return-value]
            -(n - 1) / 2.0 * s + o for n, s, o in zip(self.vol_shape, self.vol_spacing, self.vol_offset)
        )

    def volume_corners(self) -> Tensor:
        """``[8, 3]`` float64 world (x, y, z) corners of the volume's outer faces."""
        lo = [o - 0.5 * s for o, s in zip(self.volume_origin, self.vol_spacing)]
        hi = [o + (n - 0.5) * s for o, n, s in zip(self.volume_origin, self.vol_shape, self.vol_spacing)]
        corners = [(x, y, z) for z in (lo[0], hi[0]) for y in (lo[1], hi[1]) for x in (lo[2], hi[2])]
        return torch.tensor(corners, dtype=torch.float64)

    def _det_grid(self, downsample: int) -> tuple[int, int, float, float]:
        k = int(downsample)
        if k < 1 or k != downsample:
            raise ValueError(f"downsample must be a positive int, got {downsample!r}")
        rows, cols = self.det_shape[0] // k, self.det_shape[1] // k
        if rows == 0 or cols == 0:
            raise ValueError(f"downsample={k} leaves no pixels of a {self.det_shape} detector")
        return rows, cols, self.det_spacing[0] * k, self.det_spacing[1] * k

    def output_shape(self, downsample: int = 1) -> tuple[int, int, int]:
        """``(V, rows', cols')`` of a projection stack at ``downsample``."""
        rows, cols, _, _ = self._det_grid(downsample)
        return self.num_views, rows, cols

    # ------------------------------------------------------------------ per-view frames
    def _frames(self) -> tuple[Tensor, Tensor, Tensor]:
        """``e_s``, ``u``, ``v``: each ``[V, 3]`` float64."""
        c, s = torch.cos(self.angles), torch.sin(self.angles)
        zero = torch.zeros_like(c)
        e_s = torch.stack((c, s, zero), dim=-1)
        u = torch.stack((-s, c, zero), dim=-1)
        v = torch.stack((zero, zero, -torch.ones_like(c)), dim=-1)
        return e_s, u, v

    @abstractmethod
    def _detector_center(self, e_s: Tensor) -> Tensor:
        """Detector centres ``[V, 3]`` (gantry frame, before offsets) for source directions ``e_s [V, 3]``."""

    @abstractmethod
    def _gantry_source(self, e_s: Tensor) -> Tensor:
        """Source positions ``[V, 3]`` in the gantry frame (parallel beam: a point upstream of each view)."""

    def _posed(self, x: Tensor, is_point: bool) -> Tensor:
        """Apply the per-view poses to ``[V, 3]`` points (rotation + translation) or directions."""
        if self.poses is None:
            return x
        out = torch.einsum("vij,vj->vi", self.poses[:, :3, :3], x)
        return out + self.poses[:, :3, 3] if is_point else out

    def source_positions(self) -> Tensor:
        """``[V, 3]`` float64 source points (cone beam); for parallel beam the unit ray direction."""
        e_s, _, _ = self._frames()
        return self._posed(self._gantry_source(e_s), self.is_cone)

    def vectors(self, downsample: int = 1) -> Tensor:
        """``[V, 12]`` float64 ASTRA-style per-view vectors ``(src, d00, du, dv)``.

        ``src`` is the source point (cone) or the unit ray direction (parallel); ``d00`` the centre of
        pixel ``(0, 0)``; ``du`` / ``dv`` the step from one pixel centre to the next column / row, so
        pixel ``(r, c)`` has its centre at ``d00 + c du + r dv`` (world mm).
        """
        rows, cols, row_mm, col_mm = self._det_grid(downsample)
        e_s, u, v = self._frames()
        centre = self._detector_center(e_s) + self.det_offset[1] * u + self.det_offset[0] * v
        du, dv = col_mm * u, row_mm * v
        d00 = centre - (cols - 1) / 2.0 * du - (rows - 1) / 2.0 * dv
        d00, du, dv = self._posed(d00, True), self._posed(du, False), self._posed(dv, False)
        return torch.cat((self.source_positions(), d00, du, dv), dim=-1)

    def _view_ids(self, view_ids: Any) -> Tensor:
        if view_ids is None:
            return torch.arange(self.num_views)
        ids = torch.as_tensor(view_ids).reshape(-1)
        if ids.is_floating_point() or ids.dtype == torch.bool:
            raise ValueError(f"view_ids must be integer indices, got dtype {ids.dtype}")
        if ids.numel() and (int(ids.min()) < -self.num_views or int(ids.max()) >= self.num_views):
            raise ValueError(f"view_ids must lie in [0, {self.num_views - 1}], got {ids.tolist()}")
        return ids.long() % self.num_views

    def pixel_centers(self, view_ids: Any = None, downsample: int = 1) -> Tensor:
        """``[V', rows', cols', 3]`` float64 world positions (mm) of detector pixel centres."""
        rows, cols, _, _ = self._det_grid(downsample)
        vec = self.vectors(downsample)[self._view_ids(view_ids)]
        r = torch.arange(rows, dtype=torch.float64)[None, :, None, None]
        c = torch.arange(cols, dtype=torch.float64)[None, None, :, None]
        return vec[:, None, None, 3:6] + c * vec[:, None, None, 6:9] + r * vec[:, None, None, 9:12]

    def rays(
        self,
        view_ids: Any = None,
        downsample: int = 1,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> tuple[Tensor, Tensor]:
        """Per-pixel rays ``(origins, directions)``, each ``[V', rows', cols', 3]`` world mm.

        Cone beam: origins are the source, directions ``normalize(P - S)``. Parallel beam: origins are the
        pixel centres ``P`` (a point on the line; integrals run over the whole line), directions ``-e_s``.
        Directions have unit length. Computed in float64, returned in ``dtype`` on ``device``.
        """
        origins, directions = self._rays64(view_ids, downsample)
        return origins.to(device=device, dtype=dtype), directions.to(device=device, dtype=dtype)

    @abstractmethod
    def _rays64(self, view_ids: Any, downsample: int) -> tuple[Tensor, Tensor]:
        """Ray origins and unit directions, each ``[V, rows', cols', 3]`` float64 world mm (see :meth:`rays`)."""

    def plucker(
        self, downsample: int = 1, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ) -> Tensor:
        """``[V, 6, rows', cols']`` Plücker ray embeddings ``(d, o x d)`` (direction unit, moment in mm)."""
        o, d = self._rays64(None, downsample)
        emb = torch.cat((d, torch.linalg.cross(o, d, dim=-1)), dim=-1)
        return emb.permute(0, 3, 1, 2).contiguous().to(device=device, dtype=dtype)

    def projection_matrices(self, downsample: int = 1) -> Tensor:
        """``[V, 3, 4]`` float64 maps of world ``(x, y, z, 1)`` to ``(col w, row w, w)``.

        Pixel indices have pixel centres at integers (consistent with :meth:`rays`). Cone beam:
        ``w = (dso - x . e_s) / dsd`` (depth from the source along the central ray over ``dsd``).
        Parallel beam: the last row is ``(0, 0, 0, 1)``.
        """
        rows, cols, row_mm, col_mm = self._det_grid(downsample)
        e_s, u, v = self._frames()
        n = self.num_views
        w_row = self._w_row(e_s)  # [V, 4]
        c0 = (cols - 1) / 2.0 - self.det_offset[1] / col_mm
        r0 = (rows - 1) / 2.0 - self.det_offset[0] / row_mm
        zeros = torch.zeros(n, 1, dtype=torch.float64)
        col_row = torch.cat((u / col_mm, zeros), dim=-1) + c0 * w_row
        row_row = torch.cat((v / row_mm, zeros), dim=-1) + r0 * w_row
        mats = torch.stack((col_row, row_row, w_row), dim=1)
        if self.poses is not None:
            mats = mats @ torch.linalg.inv(self.poses)  # world -> gantry frame first
        return mats

    @abstractmethod
    def _w_row(self, e_s: Tensor) -> Tensor:
        """Homogeneous-coordinate row ``[V, 4]`` of the projection matrices (depth for cone, constant for parallel)."""

    # ------------------------------------------------------------------ derived geometries
    def _fields(self) -> dict[str, Any]:
        return {
            "det_shape": list(self.det_shape),
            "det_spacing": list(self.det_spacing),
            "vol_shape": list(self.vol_shape),
            "vol_spacing": list(self.vol_spacing),
            "angles": self.angles.tolist(),
            "det_offset": list(self.det_offset),
            "vol_offset": list(self.vol_offset),
            "poses": None if self.poses is None else self.poses.tolist(),
        }

    def replace(self, **changes: Any) -> CircularGeometry:
        """A copy with some constructor fields changed (validated again)."""
        fields = self._fields()
        fields.update(changes)
        return type(self)(**fields)

    def subset(self, view_ids: Any) -> CircularGeometry:
        """The geometry restricted to ``view_ids`` (in that order)."""
        ids = self._view_ids(view_ids)
        return self.replace(angles=self.angles[ids], poses=None if self.poses is None else self.poses[ids])

    def downsampled(self, downsample: int) -> CircularGeometry:
        """The same detector area sampled by ``rows // k x cols // k`` pixels ``k`` times larger."""
        rows, cols, row_mm, col_mm = self._det_grid(downsample)
        return self.replace(det_shape=(rows, cols), det_spacing=(row_mm, col_mm))

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        return {"format": _FORMAT, "type": self.kind, **self._fields()}

    def to_json(self, indent: int | None = 2) -> str:
        """JSON text of the geometry (read back with :meth:`from_json` or :func:`geometry_from_json`)."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str | dict[str, Any]) -> CircularGeometry:
        """Geometry from :meth:`to_json` text (or its parsed dict); the stored ``type`` picks the class."""
        geo = geometry_from_json(text)
        if cls is not CircularGeometry and not isinstance(geo, cls):
            raise ValueError(f"JSON holds a {type(geo).__name__}, not a {cls.__name__}")
        return geo

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self.to_dict() == other.to_dict()  # type: ignore[union-attr]

    def __repr__(self) -> str:
        extra = f"dso={self.dso}, dsd={self.dsd}, " if self.is_cone else ""  # type: ignore[attr-defined]
        return (
            f"{type(self).__name__}({extra}det_shape={self.det_shape}, det_spacing={self.det_spacing}, "
            f"vol_shape={self.vol_shape}, vol_spacing={self.vol_spacing}, num_views={self.num_views}, "
            f"det_offset={self.det_offset}, vol_offset={self.vol_offset})"
        )


@dataclass(eq=False, repr=False)
class ConeBeamGeometry(CircularGeometry):
    """Circular cone-beam geometry (TIGRE conventions, millimetres).

    Args:
        dso: source-to-origin (isocentre) distance, mm.
        dsd: source-to-detector distance, mm (``> dso``).
        det_shape, det_spacing, vol_shape, vol_spacing, angles, det_offset, vol_offset, poses: see
            :class:`CircularGeometry`.

    Raises:
        ValueError: non-positive or non-finite distances, ``dsd <= dso``, the source inside the volume
            at any view, the detector plane cutting the volume box (or the volume beyond the detector)
            at any view, an empty angle list, or malformed shapes / spacings.
    """

    dso: float = 1000.0
    dsd: float = 1500.0

    kind: ClassVar[str] = "cone"
    is_cone: ClassVar[bool] = True

    def __init__(
        self,
        *,
        dso: float,
        dsd: float,
        det_shape: Sequence[int],
        det_spacing: Sequence[float],
        vol_shape: Sequence[int],
        vol_spacing: Sequence[float],
        angles: Any,
        det_offset: Sequence[float] = (0.0, 0.0),
        vol_offset: Sequence[float] = (0.0, 0.0, 0.0),
        poses: Any = None,
    ) -> None:
        self.dso, self.dsd = float(dso), float(dsd)
        self.det_shape, self.det_spacing = det_shape, det_spacing  # type: ignore[assignment]
        self.vol_shape, self.vol_spacing = vol_shape, vol_spacing  # type: ignore[assignment]
        self.angles, self.det_offset, self.vol_offset = angles, det_offset, vol_offset  # type: ignore[assignment]
        self.poses = poses
        self.__post_init__()

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("dso", "dsd"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite distance in mm, got {value!r}")
        if self.dsd <= self.dso:
            raise ValueError(
                f"dsd (source-detector, {self.dsd} mm) must exceed dso (source-isocentre, "
                f"{self.dso} mm): the detector lies beyond the isocentre"
            )
        corners = self.volume_corners()
        lo, hi = corners.min(dim=0).values, corners.max(dim=0).values
        src = self.source_positions()
        inside = ((src > lo) & (src < hi)).all(dim=-1)
        if bool(inside.any()):
            view = int(inside.nonzero()[0, 0])
            raise ValueError(
                f"the source lies inside the volume at view {view} "
                f"(angle {float(self.angles[view]):.4g} rad, "
                f"source {src[view].tolist()} mm, volume box {lo.tolist()}..{hi.tolist()} mm): increase dso "
                "or shrink vol_shape / vol_spacing"
            )
        self._check_detector_outside(corners)

    def _check_detector_outside(self, corners: Tensor) -> None:
        """Reject views whose detector plane cuts the volume box (``corners`` ``[8, 3]`` world mm).

        Exact for the box and cheap: every corner must lie strictly on the source side of the
        (infinite) detector plane of every view, so no voxel lies on or beyond the detector along any
        ray. This also rejects a volume lying wholly behind the detector.
        """
        vec = self.vectors()
        src, d00, du, dv = vec[:, 0:3], vec[:, 3:6], vec[:, 6:9], vec[:, 9:12]
        normal = torch.linalg.cross(du, dv, dim=-1)
        normal = normal / normal.norm(dim=-1, keepdim=True)
        normal = normal * torch.sign(((src - d00) * normal).sum(-1, keepdim=True))  # towards the source
        height = torch.einsum("vk,cvk->vc", normal, corners[:, None, :] - d00[None])  # [V, 8] mm
        crossing = (height <= 0).any(dim=-1)
        if bool(crossing.any()):
            view = int(crossing.nonzero()[0, 0])
            raise ValueError(
                f"the detector lies inside the volume at view {view} (angle {float(self.angles[view]):.4g} "
                f"rad): its plane cuts the volume box {corners.min(0).values.tolist()}.."
                f"{corners.max(0).values.tolist()} mm, a corner lies {-float(height[view].min()):.4g} mm "
                "beyond the detector; increase dsd - dso or shrink vol_shape / vol_spacing"
            )

    def _detector_center(self, e_s: Tensor) -> Tensor:
        return -(self.dsd - self.dso) * e_s

    def _gantry_source(self, e_s: Tensor) -> Tensor:
        return self.dso * e_s

    def _rays64(self, view_ids: Any, downsample: int) -> tuple[Tensor, Tensor]:
        ids = self._view_ids(view_ids)
        pix = self.pixel_centers(ids, downsample)
        src = self.source_positions()[ids][:, None, None, :].expand_as(pix)
        d = pix - src
        return src.contiguous(), d / d.norm(dim=-1, keepdim=True)

    def _w_row(self, e_s: Tensor) -> Tensor:
        return torch.cat(
            (-e_s / self.dsd, torch.full((e_s.shape[0], 1), self.dso / self.dsd, dtype=torch.float64)), dim=-1
        )

    def _fields(self) -> dict[str, Any]:
        return {"dso": self.dso, "dsd": self.dsd, **super()._fields()}


@dataclass(eq=False, repr=False)
class ParallelBeamGeometry(CircularGeometry):
    """Circular parallel-beam geometry: a detector plane through the isocentre, rays along ``-e_s``.

    Args: as :class:`ConeBeamGeometry` without ``dso`` / ``dsd``.
    """

    kind: ClassVar[str] = "parallel"
    is_cone: ClassVar[bool] = False

    def __init__(
        self,
        *,
        det_shape: Sequence[int],
        det_spacing: Sequence[float],
        vol_shape: Sequence[int],
        vol_spacing: Sequence[float],
        angles: Any,
        det_offset: Sequence[float] = (0.0, 0.0),
        vol_offset: Sequence[float] = (0.0, 0.0, 0.0),
        poses: Any = None,
    ) -> None:
        self.det_shape, self.det_spacing = det_shape, det_spacing  # type: ignore[assignment]
        self.vol_shape, self.vol_spacing = vol_shape, vol_spacing  # type: ignore[assignment]
        self.angles, self.det_offset, self.vol_offset = angles, det_offset, vol_offset  # type: ignore[assignment]
        self.poses = poses
        self.__post_init__()

    def _detector_center(self, e_s: Tensor) -> Tensor:
        return torch.zeros_like(e_s)

    def _gantry_source(self, e_s: Tensor) -> Tensor:
        return -e_s

    def _rays64(self, view_ids: Any, downsample: int) -> tuple[Tensor, Tensor]:
        ids = self._view_ids(view_ids)
        pix = self.pixel_centers(ids, downsample)
        return pix, self.source_positions()[ids][:, None, None, :].expand_as(pix).contiguous()

    def _w_row(self, e_s: Tensor) -> Tensor:
        w = torch.zeros(e_s.shape[0], 4, dtype=torch.float64)
        w[:, 3] = 1.0
        return w


_KINDS: dict[str, type[CircularGeometry]] = {"cone": ConeBeamGeometry, "parallel": ParallelBeamGeometry}


def geometry_from_json(text: str | dict[str, Any]) -> CircularGeometry:
    """Rebuild a geometry from :meth:`CircularGeometry.to_json` text or its parsed dict."""
    if isinstance(text, dict):
        data = dict(text)
    else:
        try:
            data = json.loads(text)
        except (TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"geometry JSON could not be parsed: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != _FORMAT:
        raise ValueError(f"not a medgauss geometry JSON (expected format={_FORMAT!r})")
    kind = data.pop("type", None)
    data.pop("format")
    if kind not in _KINDS:
        raise ValueError(f"geometry JSON has unknown type {kind!r}; expected one of {sorted(_KINDS)}")
    try:
        return _KINDS[kind](**data)
    except TypeError as exc:
        raise ValueError(f"geometry JSON has wrong fields for a {kind} geometry: {exc}") from exc
