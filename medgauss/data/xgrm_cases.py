"""Training data for X-GRM at CPU scale: augmented variants of the bundled CT plus procedural phantoms,
prepared by the ``medgauss-prepare-ct`` code path into ``train/`` and ``held-out`` folders.

Every case is first made as a NIfTI on exactly the prepared grid (``sources/<split>/<case>.nii.gz``), then
:func:`medgauss.ct.prepare_dataset` turns each split into a dataset folder that
:class:`medgauss.ct.CTReconstructionDataset` reads (its resampling onto the same grid is the identity,
so the source NIfTI is what gets projected). Layout::

    <out_dir>/xgrm_cases.json        settings, seeds, and every case's transform (written first, completed last)
    <out_dir>/sources/{train,heldout}/<case>.nii.gz
    <out_dir>/train/                 a medgauss-prepare-ct dataset (dataset.json + one folder per case)
    <out_dir>/heldout/               the same, for held-out cases only

**Cases.**

- *CT variants* (``train_ct_<i>``): the bundled chest CT restricted to its training region, the inferior
  ``ct_split`` of its extent along z (array axis 0, as the pretraining ``region`` option), moved by a random
  transform (:class:`CaseTransform`: a rotation about each world axis, a translation, mirror flips, a crop
  centre, an intensity scale) and resampled onto the case grid, with air outside the region.
- *Held-out CT* (``heldout_ct_000``): the superior region ``[k + 1, n)`` with ``k = round(ct_split n)``, untransformed,
  centred. Slice ``k`` is a guard used by neither side, so trilinear interpolation never mixes the regions:
  training content lies strictly below world ``z = ct_boundary_z_mm`` of the source frame, held-out content
  strictly above (``xgrm_cases.json`` records the boundary and each case's source interval).
- *Phantoms* (``train_phantom_<i>``, ``heldout_phantom_<i>``): :func:`medgauss.data.make_ct_phantom` of a body
  the size of the bundled CT, moved and cropped by a random :class:`CaseTransform` like the CT variants.
  Training phantoms use even seeds ``2 (seed 10^6 + i)``, held-out ones odd seeds ``2 (seed 10^6 + i) + 1``:
  disjoint for any counts.

**Frames.** A case's world is the source's world moved by :meth:`CaseTransform.matrix` ``M`` (``x -> R F (x - c)
+ c + t``: flips ``F`` and rotation ``R = Rz Ry Rx`` about the crop centre ``c``, then translation ``t``), so a
point at source world ``p`` appears at ``M p`` of the case: voxel ``meta["affine"]^-1 M p`` of its
``volume.npy``. The case grid is axis-aligned (:func:`medgauss.frame.grid_affine`) and centred on ``c + t``,
which is where ``medgauss-prepare-ct`` puts the isocentre; the translation therefore moves the case in the
scanner frame (``meta["affine"]``) and the crop centre chooses what it holds.

**Resuming.** Re-running with the same arguments finishes an interrupted build and otherwise changes
nothing; other arguments in the same ``out_dir`` raise ``ValueError`` naming the differing settings.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medgauss.ct.prepare import PrepareConfig, prepare_dataset
from medgauss.data.datalist import example_ct_path
from medgauss.data.phantom import make_ct_phantom
from medgauss.frame import crop_affine, grid_affine, load_nifti, save_nifti, voxel_to_world, world_to_voxel

__all__ = [
    "XGRM_CPU_PREPARE",
    "XGRM_CASES_FORMAT",
    "CaseTransform",
    "XGRMCases",
    "xgrm_prepare_config",
    "draw_case_transform",
    "resample_case",
    "build_xgrm_dataset",
]

XGRM_CASES_FORMAT = "medgauss.xgrm_cases"
_VERSION = 1
_MANIFEST = "xgrm_cases.json"
_AIR_HU = -1000.0

XGRM_CPU_PREPARE: dict[str, Any] = {"fov_mm": 144.0, "grid": 32, "num_views": 50, "det_size": 64}
"""Default preparation for CPU training (other fields: :class:`~medgauss.ct.PrepareConfig`'s defaults):
``xgrm_tiny``'s 64^2 input and 32^3 grid (``medgauss.nets.zoo.XGRM_SIZES`` / ``XGRM_GRID_SIZES``), the paper's
50 views, 4.5 mm voxels. 144 mm is the largest cube that fits the held-out region of the bundled CT (49
slices of 3 mm, 144 mm between the outer slice centres), so the held-out CT case holds no air slab where
its region ends."""


def xgrm_prepare_config(prepare: Mapping[str, Any] | PrepareConfig | None = None, seed: int = 0) -> PrepareConfig:
    """The :class:`PrepareConfig` of an X-GRM dataset: :data:`XGRM_CPU_PREPARE` updated by ``prepare``.

    Args:
        prepare: a ``PrepareConfig`` (used as is) or a mapping of its field names to values (a Hydra
            ``DictConfig`` works); ``None``: the CPU defaults.
        seed: the noise ``seed`` unless ``prepare`` sets one.

    Raises:
        ValueError: a key that is no ``PrepareConfig`` field (naming it), or ``PrepareConfig``'s own checks.
    """
    if isinstance(prepare, PrepareConfig):
        return prepare
    overrides = dict(prepare or {})
    known = {f.name for f in fields(PrepareConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"prepare has unknown keys {unknown}; PrepareConfig fields are {sorted(known)}")
    return PrepareConfig(**{**XGRM_CPU_PREPARE, "seed": seed, **overrides})


# ------------------------------------------------------------------------------------------- transforms


def _rotation(degrees: Sequence[float]) -> np.ndarray:
    """``Rz @ Ry @ Rx`` for angles (about world x, y, z) in degrees: x first."""
    ax, ay, az = (math.radians(a) for a in degrees)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass(frozen=True)
class CaseTransform:
    """How one case is cut from its source (see the module docstring).

    Attributes:
        rotation_deg: angles about world x, y, z (degrees); ``R = Rz Ry Rx``.
        translation_mm: ``t``, world (x, y, z) mm.
        flips: mirror along world x, y, z (through the crop centre).
        centre_mm: ``c``, the source world (x, y, z) point at the centre of the case (before ``t``).
        intensity_scale: ``s``: HU become ``-1000 + s (HU + 1000)`` (air stays air).
    """

    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    translation_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    flips: tuple[bool, bool, bool] = (False, False, False)
    centre_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    intensity_scale: float = 1.0

    def linear(self) -> np.ndarray:
        """``[3, 3]`` ``R F``: rotation times the flips (``det = -1`` for an odd number of flips)."""
        return _rotation(self.rotation_deg) @ np.diag([-1.0 if f else 1.0 for f in self.flips])

    def matrix(self) -> np.ndarray:
        """``[4, 4]`` float64 map from source world ``(x, y, z, 1)`` mm to case world: ``x -> R F (x - c) + c + t``."""
        m = np.eye(4)
        m[:3, :3] = self.linear()
        c = np.asarray(self.centre_mm, dtype=np.float64)
        m[:3, 3] = c - m[:3, :3] @ c + np.asarray(self.translation_mm, dtype=np.float64)
        return m

    def case_centre(self) -> tuple[float, float, float]:
        """World (x, y, z) mm of the case grid's centre, ``c + t``."""
        return tuple(float(c + t) for c, t in zip(self.centre_mm, self.translation_mm))  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["matrix"] = self.matrix().tolist()
        return out


def _world_bounds(shape: Sequence[int], affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per world axis (x, y, z) min and max over the voxel centres of a ``shape`` grid."""
    corners = np.array([[i, j, k] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)])
    world = voxel_to_world(corners, affine)
    return world.min(axis=0), world.max(axis=0)


def draw_case_transform(rng: np.random.Generator, source_shape: Sequence[int], source_affine: np.ndarray,
                        case_half_extent_mm: Sequence[float], *, max_rotation_deg: float, max_translation_mm: float,
                        flip_prob: float, intensity_jitter: float) -> CaseTransform:
    """A random :class:`CaseTransform` whose case grid takes its content from inside the source where it fits.

    Angles are uniform in ``[-max_rotation_deg, max_rotation_deg]`` per axis, the translation uniform in
    ``[-max_translation_mm, max_translation_mm]`` per axis, each flip has probability ``flip_prob``, the
    intensity scale is uniform in ``[1 - intensity_jitter, 1 + intensity_jitter]``. The crop centre is
    uniform over the positions at which the case's footprint in the source (its voxel centres moved back,
    half extent ``|R F|^T case_half_extent_mm`` per axis) lies inside the source's voxel centres; along an axis
    where the footprint is larger than the source, the centre is the source's middle.

    Args:
        rng: random source.
        source_shape, source_affine: the source grid (voxels, voxel -> world mm).
        case_half_extent_mm: half the distance between the case grid's outer voxel centres, world (x, y, z).
    """
    rotation = tuple(float(a) for a in rng.uniform(-max_rotation_deg, max_rotation_deg, size=3))
    translation = tuple(float(t) for t in rng.uniform(-max_translation_mm, max_translation_mm, size=3))
    flips = tuple(bool(f) for f in rng.random(3) < flip_prob)
    scale = float(rng.uniform(1.0 - intensity_jitter, 1.0 + intensity_jitter))
    linear = CaseTransform(rotation, translation, flips).linear()
    footprint = np.abs(linear).T @ np.asarray(case_half_extent_mm, dtype=np.float64)
    lo, hi = _world_bounds(source_shape, source_affine)
    room = (hi - lo) - 2 * footprint
    u = rng.random(3)
    centre = np.where(room >= 0, lo + footprint + u * np.maximum(room, 0), (lo + hi) / 2)
    return CaseTransform(rotation, translation, flips, tuple(float(c) for c in centre), scale)  # type: ignore[arg-type]


def resample_case(source_hu: np.ndarray, source_affine: np.ndarray, transform: CaseTransform, shape: Sequence[int],
                  spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """The case grid of a source moved by ``transform`` (trilinear, air outside the source).

    Args:
        source_hu: ``[I, J, K]`` HU in the voxel order of ``source_affine`` (e.g. :func:`medgauss.frame.load_nifti`).
        source_affine: ``[4, 4]`` voxel -> source world mm.
        transform: the case transform ``M``.
        shape: ``(D, H, W)`` of the case grid; ``spacing``: its ``(sd, sh, sw)`` mm.

    Returns:
        ``(hu [D, H, W] float32, affine [4, 4] float64)``: the medgauss frame grid centred on
        ``transform.case_centre()``; voxel ``v`` holds the source at ``M^-1 (affine v)``, intensity-scaled.
    """
    affine = grid_affine(shape, spacing, transform.case_centre())
    to_source = np.linalg.inv(transform.matrix())
    source = torch.from_numpy(np.ascontiguousarray(source_hu, dtype=np.float32)) - _AIR_HU  # air -> 0 padding
    sizes = np.asarray(source_hu.shape, dtype=np.float64)
    d, h, w = (int(s) for s in shape)
    out = np.empty((d, h, w), dtype=np.float32)
    hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    slab = max(1, (1 << 21) // (h * w))
    for z0 in range(0, d, slab):
        zz = np.arange(z0, min(d, z0 + slab))
        idx = np.stack(np.broadcast_arrays(zz[:, None, None], hh[None], ww[None]), axis=-1)
        world = voxel_to_world(idx, affine)
        moved = world @ to_source[:3, :3].T + to_source[:3, 3]
        index = world_to_voxel(moved, source_affine)
        grid = torch.from_numpy((2 * index / np.maximum(sizes - 1, 1) - 1)[..., ::-1].copy()).float()
        values = F.grid_sample(source[None, None], grid[None], mode="bilinear", padding_mode="zeros",
                               align_corners=True)
        out[z0: z0 + len(zz)] = values[0, 0].numpy()
    return _AIR_HU + transform.intensity_scale * out, affine


# ------------------------------------------------------------------------------------------- the build


@dataclass(frozen=True)
class XGRMCases:
    """Where :func:`build_xgrm_dataset` put a dataset: ``CTReconstructionDataset(train_dir)`` for training,
    ``CTReconstructionDataset(heldout_dir)`` for evaluation; ``manifest`` records seeds and transforms."""

    root: Path
    train_dir: Path
    heldout_dir: Path
    train_cases: tuple[str, ...]
    heldout_cases: tuple[str, ...]
    manifest: Path


@dataclass(frozen=True)
class _Spec:
    """One case to make: its split, kind (``"ct"`` / ``"phantom"``), index, and phantom seed (-1 for CT)."""

    split: str
    kind: str
    index: int
    seed: int

    @property
    def case_id(self) -> str:
        return f"{self.split}_{self.kind}_{self.index:03d}"


@dataclass(frozen=True)
class _CTRegions:
    """The source CT cut into its training slab ``[0, k)`` and held-out slab ``[k + 1, n)`` (arrays + affines)."""

    path: Path
    slabs: dict[str, tuple[np.ndarray, np.ndarray]]
    boundary_z_mm: float  # world z of the guard slice k


def _split_ct(path: Path, ct_split: float) -> _CTRegions:
    hu, affine = load_nifti(path)
    n = hu.shape[0]
    k = round(ct_split * n)
    if k < 1 or k + 1 >= n:
        raise ValueError(f"ct_split={ct_split} leaves no slice for training or held-out: {path} has {n} slices "
                         f"along z, training would take [0, {k}) and held-out [{k + 1}, {n})")
    slabs = {"train": (hu[:k], affine), "heldout": (hu[k + 1:], crop_affine(affine, (k + 1, 0, 0)))}
    return _CTRegions(path, slabs, float(voxel_to_world(np.array([k, 0, 0]), affine)[2]))


def _count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return value


def _number(name: str, value: Any, low: float, high: float, *, open_high: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or value > high or (open_high and value == high):
        bound = f"[{low}, {high})" if open_high else f"[{low}, {high}]"
        raise ValueError(f"{name} must be a number in {bound}, got {value!r}")
    return float(value)


def _validated(arguments: dict[str, Any]) -> dict[str, Any]:
    """The build arguments checked (``ValueError`` naming the argument) and made JSON-ready."""
    out: dict[str, Any] = {k: _count(k, arguments[k]) for k in ("num_ct_variants", "num_phantoms", "heldout_phantoms",
                                                                 "seed")}
    if out["num_ct_variants"] + out["num_phantoms"] == 0:
        raise ValueError("num_ct_variants + num_phantoms must be >= 1: there would be no training case")
    if not isinstance(arguments["heldout_ct"], bool):
        raise ValueError(f"heldout_ct must be True or False, got {arguments['heldout_ct']!r}")
    if out["heldout_phantoms"] == 0 and not arguments["heldout_ct"]:
        raise ValueError("heldout_phantoms must be >= 1 when heldout_ct is False: there would be no held-out case")
    out["heldout_ct"] = arguments["heldout_ct"]
    for name, low, high, open_high in (("ct_split", 0.0, 1.0, True), ("max_rotation_deg", 0.0, 45.0, False),
                                       ("max_translation_mm", 0.0, 1e4, False), ("flip_prob", 0.0, 1.0, False),
                                       ("intensity_jitter", 0.0, 1.0, True), ("phantom_spacing_mm", 1e-3, 1e3, False)):
        out[name] = _number(name, arguments[name], low, high, open_high=open_high)
    shape = arguments["phantom_shape"]
    try:
        out["phantom_shape"] = [int(v) for v in shape]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"phantom_shape must be three ints >= 8, got {shape!r}") from exc
    if len(out["phantom_shape"]) != 3 or min(out["phantom_shape"]) < 8:
        raise ValueError(f"phantom_shape must be three ints >= 8, got {shape!r}")
    return out


def _case_specs(settings: dict[str, Any]) -> list[_Spec]:
    """Every case, training first; phantom seeds even for training, odd for held-out (disjoint for any counts)."""
    base = settings["seed"] * 10**6
    specs = [_Spec("train", "ct", i, -1) for i in range(settings["num_ct_variants"])]
    specs += [_Spec("train", "phantom", i, 2 * (base + i)) for i in range(settings["num_phantoms"])]
    specs += [_Spec("heldout", "ct", 0, -1)] if settings["heldout_ct"] else []
    specs += [_Spec("heldout", "phantom", i, 2 * (base + i) + 1) for i in range(settings["heldout_phantoms"])]
    return specs


def _source_of(spec: _Spec, ct: _CTRegions | None, settings: dict[str, Any],
               case_half_extent_mm: np.ndarray) -> tuple[CaseTransform, np.ndarray | None, np.ndarray, dict[str, Any]]:
    """``(transform, image or None for a phantom not made yet, source affine, record)`` of one case."""
    rng = np.random.default_rng([settings["seed"], int(spec.split == "heldout"), int(spec.kind == "phantom"),
                                 spec.index])
    draw = {k: settings[k] for k in ("max_rotation_deg", "max_translation_mm", "flip_prob", "intensity_jitter")}
    if spec.kind == "phantom":
        affine = grid_affine(settings["phantom_shape"], (settings["phantom_spacing_mm"],) * 3)  # make_ct_phantom's
        transform = draw_case_transform(rng, settings["phantom_shape"], affine, case_half_extent_mm, **draw)
        return transform, None, affine, {"phantom_seed": spec.seed}
    assert ct is not None
    image, affine = ct.slabs[spec.split]
    lo, hi = _world_bounds(image.shape, affine)
    if spec.split == "heldout":  # untransformed, centred on the region
        transform = CaseTransform(centre_mm=tuple(float(c) for c in (lo + hi) / 2))  # type: ignore[arg-type]
    else:
        transform = draw_case_transform(rng, image.shape, affine, case_half_extent_mm, **draw)
    return transform, image, affine, {"source": str(ct.path.resolve()),
                                      "source_region_z_mm": [float(lo[2]), float(hi[2])]}


def _atomic_json(path: Path, record: dict[str, Any]) -> None:
    tmp = path.with_name(f".tmp-{path.name}-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, path)


def _claim(out_dir: Path, settings: dict[str, Any]) -> None:
    """Write the settings first; refuse a folder built with other settings."""
    settings = json.loads(json.dumps(settings))  # compare as recorded (lists, floats)
    path = out_dir / _MANIFEST
    if path.is_file():
        try:
            recorded = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"corrupt manifest {path}: {exc}") from exc
        if recorded.get("format") != XGRM_CASES_FORMAT:
            raise ValueError(f"{path} is not an {XGRM_CASES_FORMAT} manifest: build into a new out_dir")
        old = recorded.get("settings", {})
        differ = [k for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
        if differ:
            details = "; ".join(f"{k}: {old.get(k)!r} recorded, {settings.get(k)!r} requested" for k in differ)
            raise ValueError(f"{out_dir} was built with other settings ({details}; recorded in {path}): use a new "
                             "out_dir, or the recorded settings to resume")
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    _atomic_json(path, {"format": XGRM_CASES_FORMAT, "version": _VERSION, "complete": False, "settings": settings})


def build_xgrm_dataset(
    out_dir: str | Path,
    *,
    num_ct_variants: int = 48,
    num_phantoms: int = 48,
    heldout_phantoms: int = 8,
    seed: int = 0,
    prepare: Mapping[str, Any] | None = None,
    heldout_ct: bool = True,
    ct_path: str | Path | None = None,
    ct_split: float = 0.55,
    max_rotation_deg: float = 8.0,
    max_translation_mm: float = 20.0,
    flip_prob: float = 0.5,
    intensity_jitter: float = 0.1,
    phantom_shape: Sequence[int] = (110, 96, 120),
    phantom_spacing_mm: float = 3.0,
    workers: int = 1,
    progress: bool = False,
) -> XGRMCases:
    """Build (or finish) the X-GRM training set in ``out_dir`` (see the module docstring).

    Args:
        out_dir: output folder.
        num_ct_variants: training variants of the CT's training region.
        num_phantoms: training phantoms; ``heldout_phantoms``: held-out phantoms (unseen seeds).
        seed: base of every random draw (phantom seeds, transforms, and the projection noise unless
            ``prepare`` sets ``seed``).
        prepare: :class:`~medgauss.ct.PrepareConfig` fields over :data:`XGRM_CPU_PREPARE` (grid, views, detector,
            field of view, noise, HU window).
        heldout_ct: add the held-out CT case (the superior region).
        ct_path: source CT NIfTI (HU); default the bundled chest CT (:func:`medgauss.data.example_ct_path`).
        ct_split: fraction of the CT's extent along z (from the inferior end) that training may use.
        max_rotation_deg, max_translation_mm, flip_prob, intensity_jitter: ranges of the random
            :class:`CaseTransform` (:func:`draw_case_transform`).
        phantom_shape, phantom_spacing_mm: grid of each phantom before its transform (default: the bundled CT's
            size, 3 mm).
        workers, progress: passed to :func:`medgauss.ct.prepare_dataset`.

    Returns:
        :class:`XGRMCases`.

    Raises:
        ValueError: a bad argument (naming it), or ``out_dir`` built with other settings.
        FileNotFoundError: ``ct_path`` missing.
    """
    settings = _validated(dict(
        num_ct_variants=num_ct_variants, num_phantoms=num_phantoms, heldout_phantoms=heldout_phantoms, seed=seed,
        heldout_ct=heldout_ct, ct_split=ct_split, max_rotation_deg=max_rotation_deg,
        max_translation_mm=max_translation_mm, flip_prob=flip_prob, intensity_jitter=intensity_jitter,
        phantom_shape=phantom_shape, phantom_spacing_mm=phantom_spacing_mm))
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    config = xgrm_prepare_config(prepare, seed)
    ct_file = Path(ct_path) if ct_path is not None else example_ct_path()
    ct = None
    if num_ct_variants > 0 or heldout_ct:
        if not ct_file.is_file():
            raise FileNotFoundError(f"ct_path not found: {ct_file}")
        ct = _split_ct(ct_file, settings["ct_split"])
    settings["ct_path"] = str(ct_file.resolve())
    settings.update({f"prepare.{k}": v for k, v in asdict(config).items()})
    out_dir = Path(out_dir)
    _claim(out_dir, settings)

    spacing = (config.fov_mm / config.grid,) * 3
    half = np.full(3, (config.grid - 1) / 2 * spacing[0])  # case voxel centres: +-half around the case centre
    records: dict[str, dict[str, Any]] = {}
    sources: dict[str, list[Path]] = {"train": [], "heldout": []}
    for spec in _case_specs(settings):
        transform, image, affine, record = _source_of(spec, ct, settings, half)
        path = out_dir / "sources" / spec.split / f"{spec.case_id}.nii.gz"
        if not (out_dir / spec.split / spec.case_id / "meta.json").is_file() and not path.is_file():
            if image is None:
                image = make_ct_phantom(settings["phantom_shape"], settings["phantom_spacing_mm"], seed=spec.seed)[0]
            save_nifti(path, *resample_case(image, affine, transform, (config.grid,) * 3, spacing))
        sources[spec.split].append(path)
        records[spec.case_id] = {"split": spec.split, "kind": spec.kind, "index": spec.index,
                                 "transform": transform.to_dict(), "nifti": str(path), **record}

    done = {split: prepare_dataset(paths, out_dir / split, config, workers=workers, progress=progress)
            for split, paths in sources.items()}
    manifest = {
        "format": XGRM_CASES_FORMAT, "version": _VERSION, "complete": True, "settings": settings,
        "ct_boundary_z_mm": None if ct is None else ct.boundary_z_mm,
        "splits": done,
        "phantom_seeds": {split: [r["phantom_seed"] for r in records.values() if r["split"] == split and
                                  "phantom_seed" in r] for split in ("train", "heldout")},
        "cases": records,
    }
    _atomic_json(out_dir / _MANIFEST, json.loads(json.dumps(manifest)))
    return XGRMCases(out_dir, out_dir / "train", out_dir / "heldout", tuple(done["train"]), tuple(done["heldout"]),
                     out_dir / _MANIFEST)
