"""Registration pairs: synthetic pairs from labelled CT, and a user's pair list of NIfTI files.

**Synthetic pairs** (:class:`SyntheticRegistrationPairs`, built from the bundled CT by
:func:`synthetic_registration_pairs`): item ``i`` is a pure function of ``(seed, i)``
(:func:`~medgauss.data.sample_seed`). The fixed image is a ``crop_size`` crop of a labelled volume centred on a
random labelled voxel; the moving image is the same region resampled at ``x + u(x)``, where ``u`` is a random smooth
displacement (a coarse ``control_points^3`` grid of values uniform in ``[-max_displacement, max_displacement]``
voxels per component, upsampled trilinearly, so ``|u_a| <= max_displacement`` everywhere), read from the whole
volume (the moving image has real anatomy where the crop's border moved inwards), followed by a random intensity
change (gamma, scale, shift, clamped to ``[b_min, b_max]``). The moving label is the label map resampled the same way
(nearest neighbour). So ``moving(y) = volume(start + y + u(y))``, and a perfect registration of moving to fixed is
the inverse of that map. By convention training uses the inferior region ``(0, 0.55)`` of the body and validation a
fixed list of pairs from the disjoint superior region ``(0.55, 1.0)``.

**Pair lists** (:class:`PairListDataset`): a JSON list of ``{"fixed", "moving", "fixed_label", "moving_label"}``
NIfTI paths (labels optional for training; required for Dice validation, ``require_labels=True``). Each file is read
with :func:`medgauss.frame.load_nifti`, windowed like the encoder's pretraining (``a_min, a_max -> b_min, b_max``,
clipped; :func:`medgauss.engines.finetune.resolve_preprocessing` fills the values) and resampled onto the **model
grid** (:func:`model_grid_affine`): ``size`` voxels of ``pixdim`` mm, axis-aligned in the medgauss frame, centred on
the fixed image's centre (a larger image is thus cropped around its centre, a smaller one padded with ``b_min`` /
background). The fixed and moving images of a pair must share one grid (same shape and affine, as after an affine
pre-alignment); a label must share its image's grid. ``medgauss-register`` uses the same resampling
(:func:`resample_to_grid`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import Dataset

from medgauss.data.datalist import example_ct_datalist
from medgauss.data.labelled import BUNDLED_CLASS_GROUPS, load_labelled_volumes
from medgauss.data.transforms import DataError, sample_seed
from medgauss.frame import grid_affine, load_nifti, resample_to_grid, sample_at

__all__ = [
    "PAIR_KEYS",
    "PairListDataset",
    "SyntheticRegistrationPairs",
    "check_same_grid",
    "model_grid_affine",
    "random_smooth_displacement",
    "read_pair_list",
    "synthetic_registration_pairs",
    "window_intensity",
]

PAIR_KEYS = ("fixed", "moving", "fixed_label", "moving_label")
"""Keys of a pair-list entry (and of a dataset item's volumes)."""


# ------------------------------------------------------------------------------------------ resampling


def model_grid_affine(affine: np.ndarray, shape: Sequence[int], size: Sequence[int], pixdim: float) -> np.ndarray:
    """The model grid of a volume: ``size`` voxels of ``pixdim`` mm, axis-aligned (medgauss frame), centred on the
    centre of the volume's grid (``affine``, ``shape``). ``[4, 4]`` float64 voxel -> world RAS mm."""
    centre_index = (np.asarray(shape, dtype=np.float64) - 1.0) / 2.0
    centre = np.asarray(affine, dtype=np.float64)[:3, :3] @ centre_index + np.asarray(affine)[:3, 3]
    return grid_affine(tuple(int(s) for s in size), (float(pixdim),) * 3, tuple(float(c) for c in centre))


def window_intensity(image: Tensor, a_min: float, a_max: float, b_min: float, b_max: float) -> Tensor:
    """HU window ``[a_min, a_max]`` mapped linearly onto ``[b_min, b_max]``, clipped (pretraining's
    ``ScaleIntensityRanged(clip=True)``)."""
    scaled = (image - a_min) / (a_max - a_min) * (b_max - b_min) + b_min
    return scaled.clamp(min(b_min, b_max), max(b_min, b_max))


def check_same_grid(shape_a: Sequence[int], affine_a: np.ndarray, shape_b: Sequence[int], affine_b: np.ndarray,
                    what: str, atol: float = 1e-3) -> None:
    """Raise :class:`DataError` (whose message starts with ``what``) unless both grids have the same shape and
    affine (within ``atol`` mm)."""
    if tuple(shape_a) != tuple(shape_b):
        raise DataError(f"{what} have different shapes: {tuple(shape_a)} vs {tuple(shape_b)} (they must share one "
                        "grid: resample one onto the other first)")
    a, b = np.asarray(affine_a, dtype=np.float64), np.asarray(affine_b, dtype=np.float64)
    if not np.allclose(a, b, atol=atol, rtol=0.0):
        raise DataError(f"{what} have different affines (max difference {np.abs(a - b).max():.4g} mm); they must "
                        "share one grid: resample one onto the other first")


# ------------------------------------------------------------------------------------------ synthetic pairs


def random_smooth_displacement(rng: np.random.Generator, size: Sequence[int], *, max_displacement: float,
                               control_points: int = 4) -> Tensor:
    """A random smooth displacement ``[3, *size]`` float32 in voxels, ``|u_a| <= max_displacement``.

    Values uniform in ``[-max_displacement, max_displacement]`` on a ``control_points^3`` grid spanning the volume,
    upsampled trilinearly (``align_corners=True``: a convex combination, so the bound holds everywhere).
    """
    c = int(control_points)
    coarse = rng.uniform(-1.0, 1.0, size=(1, 3, c, c, c)) * float(max_displacement)
    field = F.interpolate(torch.from_numpy(coarse).float(), size=tuple(int(s) for s in size), mode="trilinear",
                          align_corners=True)
    return field[0]


class SyntheticRegistrationPairs(Dataset):
    """Synthetic registration pairs from labelled volumes (module doc); item ``i`` = f(``seed``, ``i``).

    Args:
        volumes: ``[{"image": [1, D, H, W] float in [b_min, b_max], "label": [1, D, H, W] int64}, ...]``
            (:func:`~medgauss.data.labelled.load_labelled_volumes`).
        crop_size: ``(D, H, W)`` of the pairs (int = cube): the model's ``img_size``.
        seed: seed of the pairs.
        max_displacement: largest displacement component, voxels.
        control_points: control points per axis of the random displacement (>= 2).
        gamma, scale, shift: ranges ``(low, high)`` of the moving image's intensity change on ``[0, 1]``-normalised
            intensities: ``x -> scale * x^gamma + shift`` (then clamped).
        b_min, b_max: intensity range of the volumes.
        samples_per_epoch: the dataset's ``len`` (any id is valid; the engine's sampler is endless).

    Items: ``{"fixed", "moving": [1, *crop_size] float32, "fixed_label", "moving_label": [1, *crop_size] int64,
    "displacement": [3, *crop_size] float32 (the ``u`` with ``moving(y) = volume(start + y + u(y))``), "crop_start":
    [3] int64, "volume_index": int, "sample_id": int}``.
    """

    def __init__(self, volumes: Sequence[Mapping[str, Any]], *, crop_size: int | Sequence[int], seed: int = 0,
                 max_displacement: float = 6.0, control_points: int = 4, gamma: Sequence[float] = (0.7, 1.4),
                 scale: Sequence[float] = (0.9, 1.1), shift: Sequence[float] = (-0.1, 0.1), b_min: float = 0.0,
                 b_max: float = 1.0, samples_per_epoch: int = 1000) -> None:
        if len(volumes) == 0:
            raise ValueError("volumes is empty: no labelled volume to make pairs from")
        size = (crop_size,) * 3 if isinstance(crop_size, int) else tuple(crop_size)
        if len(size) != 3 or not all(isinstance(s, int) and s >= 2 for s in size):
            raise ValueError(f"crop_size must be an int >= 2 or three of them, got {crop_size!r}")
        if not (isinstance(max_displacement, int | float) and max_displacement >= 0):
            raise ValueError(f"max_displacement must be a number >= 0 (voxels), got {max_displacement!r}")
        if isinstance(control_points, bool) or not isinstance(control_points, int) or control_points < 2:
            raise ValueError(f"control_points must be an int >= 2, got {control_points!r}")
        for name, rng in (("gamma", gamma), ("scale", scale), ("shift", shift)):
            if len(rng) != 2 or not float(rng[0]) <= float(rng[1]):
                raise ValueError(f"{name} must be a range (low, high) with low <= high, got {rng!r}")
        if not float(gamma[0]) > 0:
            raise ValueError(f"gamma must be positive, got {gamma!r}")
        if not b_min < b_max:
            raise ValueError(f"b_min must be < b_max, got {b_min}, {b_max}")
        self.images = [torch.as_tensor(v["image"]).float() for v in volumes]
        self.labels = [torch.as_tensor(v["label"]).long() for v in volumes]
        for k, (img, lab) in enumerate(zip(self.images, self.labels)):
            if img.ndim != 4 or img.shape[0] != 1 or img.shape != lab.shape:
                raise ValueError(f"volume {k}: image and label must be [1, D, H, W] of one shape, got "
                                 f"{tuple(img.shape)} and {tuple(lab.shape)}")
        self.foreground = [torch.nonzero(lab[0] > 0) for lab in self.labels]
        self.crop_size, self.seed = size, int(seed)
        self.max_displacement, self.control_points = float(max_displacement), control_points
        self.gamma, self.scale = tuple(map(float, gamma)), tuple(map(float, scale))
        self.shift = tuple(map(float, shift))
        self.b_min, self.b_max = float(b_min), float(b_max)
        self.samples_per_epoch = int(samples_per_epoch)
        axes = [torch.arange(s, dtype=torch.float32) for s in size]
        self._base = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # [*size, 3]

    def __len__(self) -> int:
        return self.samples_per_epoch

    def _crop_start(self, rng: np.random.Generator, k: int) -> np.ndarray:
        shape = np.asarray(self.images[k].shape[1:])
        fg = self.foreground[k]
        centre = fg[rng.integers(len(fg))].numpy() if len(fg) else rng.integers(0, shape)
        start = centre - np.asarray(self.crop_size) // 2
        high = np.maximum(shape - np.asarray(self.crop_size), 0)
        # a volume smaller than the crop is centred in it (padded: b_min / background outside)
        low = np.minimum(high, (shape - np.asarray(self.crop_size)) // 2)
        return np.clip(start, low, high).astype(np.int64)

    def __getitem__(self, sample_id: int) -> dict[str, Any]:
        sample_id = int(sample_id)
        rng = np.random.default_rng(sample_seed(self.seed, sample_id))
        k = int(rng.integers(len(self.images)))
        start = self._crop_start(rng, k)
        u = random_smooth_displacement(rng, self.crop_size, max_displacement=self.max_displacement,
                                       control_points=self.control_points)
        gamma, scale, shift = (float(rng.uniform(*r)) for r in (self.gamma, self.scale, self.shift))
        origin = torch.from_numpy(start).float()
        fixed_coords = self._base + origin
        moving_coords = fixed_coords + u.permute(1, 2, 3, 0)
        image, label = self.images[k], self.labels[k]
        fixed = sample_at(image, fixed_coords, mode="nearest", pad_value=self.b_min)  # integer positions: exact
        fixed_label = sample_at(label.float(), fixed_coords, mode="nearest").round().long()
        moving = sample_at(image, moving_coords, mode="bilinear", pad_value=self.b_min)
        moving_label = sample_at(label.float(), moving_coords, mode="nearest").round().long()
        span = self.b_max - self.b_min
        x = ((moving - self.b_min) / span).clamp(0.0, 1.0)
        moving = ((scale * x.pow(gamma) + shift).clamp(0.0, 1.0) * span + self.b_min).float()
        return {"fixed": fixed.float(), "moving": moving, "fixed_label": fixed_label, "moving_label": moving_label,
                "displacement": u, "crop_start": torch.from_numpy(start), "volume_index": k, "sample_id": sample_id}


def synthetic_registration_pairs(*, crop_size: int | Sequence[int], region: Sequence[float], seed: int = 0,
                                 datalist: Sequence[Mapping[str, str]] | None = None,
                                 classes: Mapping[str, Sequence[str]] | None = None, num_classes: int | None = None,
                                 pixdim: float = 1.5, a_min: float = -1000.0, a_max: float = 1000.0,
                                 b_min: float = 0.0, b_max: float = 1.0, region_axis: int = 0,
                                 **pair_kwargs: Any) -> SyntheticRegistrationPairs:
    """:class:`SyntheticRegistrationPairs` from a labelled datalist's ``region`` (default: the bundled CT grouped
    into :data:`~medgauss.data.labelled.BUNDLED_CLASS_GROUPS`), preprocessed by
    :func:`~medgauss.data.labelled.load_labelled_volumes` (``pixdim``, HU window -> ``[b_min, b_max]``).

    ``pair_kwargs``: ``max_displacement``, ``control_points``, ``gamma``, ``scale``, ``shift``,
    ``samples_per_epoch``. The dataset's ``class_names`` attribute lists the classes (background first).
    """
    from medgauss.data.labelled import class_names_for

    if datalist is None:
        datalist = example_ct_datalist()
    if classes is None and num_classes is None:
        classes = BUNDLED_CLASS_GROUPS
    volumes = load_labelled_volumes(datalist, classes=classes, num_classes=num_classes, pixdim=pixdim, a_min=a_min,
                                    a_max=a_max, b_min=b_min, b_max=b_max, region=region, region_axis=region_axis)
    plain = [{"image": _plain(v["image"]).float(), "label": _plain(v["label"]).long()} for v in volumes]
    dataset = SyntheticRegistrationPairs(plain, crop_size=crop_size, seed=seed, b_min=b_min, b_max=b_max,
                                         **pair_kwargs)
    dataset.class_names = class_names_for(classes, num_classes)
    return dataset


def _plain(t: Any) -> Tensor:
    return t.as_tensor() if hasattr(t, "as_tensor") else torch.as_tensor(t)


# ------------------------------------------------------------------------------------------ pair lists


def read_pair_list(pairs: str | Path | Sequence[Mapping[str, str]], *, require_labels: bool = False
                   ) -> list[dict[str, str]]:
    """The entries of a pair list: a JSON file (a list of objects) or the list itself.

    Relative paths in a file are resolved against the file's folder.

    Raises:
        FileNotFoundError: the JSON file, or a file an entry names, does not exist (naming the file and the entry).
        DataError: not a non-empty list of objects with ``fixed`` and ``moving`` (and, with ``require_labels``,
            both labels), naming the entry.
    """
    base = None
    if isinstance(pairs, str | Path):
        path = Path(pairs)
        if not path.is_file():
            raise FileNotFoundError(f"pair list file not found: {path}")
        try:
            entries = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"pair list {path} is not valid JSON: {exc}") from exc
        base, source = path.parent, str(path)
    else:
        entries, source = pairs, "pair list"
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{source} must be a non-empty JSON list of {{fixed, moving, fixed_label, moving_label}} "
                        "objects")
    out = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise DataError(f"{source} entry {i} must be an object with NIfTI paths, got {entry!r}")
        needed = PAIR_KEYS if require_labels else PAIR_KEYS[:2]
        missing = [k for k in needed if not entry.get(k)]
        if missing:
            why = " (Dice validation needs both labels)" if require_labels else ""
            raise DataError(f"{source} entry {i} ({dict(entry)}) lacks {missing}{why}")
        unknown = sorted(set(entry) - set(PAIR_KEYS))
        if unknown:
            raise DataError(f"{source} entry {i} has unknown keys {unknown}; expected {list(PAIR_KEYS)}")
        resolved = {}
        for key in PAIR_KEYS:
            if entry.get(key):
                p = Path(entry[key])
                if base is not None and not p.is_absolute():
                    p = base / p
                if not p.is_file():
                    raise FileNotFoundError(f"{source} entry {i}: {key} file not found: {p}")
                resolved[key] = str(p)
        out.append(resolved)
    return out


class PairListDataset(Dataset):
    """A user's registration pairs, preprocessed like pretraining onto the model grid (module doc).

    Args:
        pairs: JSON file or list of ``{"fixed", "moving"[, "fixed_label", "moving_label"]}`` NIfTI paths.
        size: model input size ``(D, H, W)`` (int = cube), the encoder's ``img_size``.
        pixdim: model grid spacing, mm; a_min, a_max, b_min, b_max: the HU window and its target range
            (:func:`~medgauss.engines.finetune.resolve_preprocessing`).
        require_labels: every entry must have both labels (validation).
        num_classes: when given, label values must lie in ``0..num_classes-1``.
        cache: keep preprocessed pairs in memory.

    Item ``i`` is pair ``i % len(pairs)`` (no augmentation: a pure function of ``i``): ``{"fixed", "moving": [1,
    *size] float32, "fixed_label", "moving_label": [1, *size] int64 (zeros, ``has_labels`` False, without labels),
    "has_labels": bool, "pair_index": int, "sample_id": int}``.

    Raises:
        FileNotFoundError: a missing file (naming the file and the entry). DataError: fixed / moving or an image /
        its label on different grids, non-integer labels or labels out of range (naming the files).
    """

    def __init__(self, pairs: str | Path | Sequence[Mapping[str, str]], *, size: int | Sequence[int],
                 pixdim: float = 1.5, a_min: float = -1000.0, a_max: float = 1000.0, b_min: float = 0.0,
                 b_max: float = 1.0, require_labels: bool = False, num_classes: int | None = None,
                 cache: bool = True) -> None:
        self.entries = read_pair_list(pairs, require_labels=require_labels)
        self.size = (size,) * 3 if isinstance(size, int) else tuple(int(s) for s in size)
        if len(self.size) != 3 or min(self.size) < 2:
            raise ValueError(f"size must be an int >= 2 or three of them, got {size!r}")
        if not (isinstance(pixdim, int | float) and pixdim > 0):
            raise ValueError(f"pixdim must be a positive voxel size in mm, got {pixdim!r}")
        if not a_min < a_max or not b_min < b_max:
            raise ValueError(f"need a_min < a_max and b_min < b_max, got {a_min}, {a_max}, {b_min}, {b_max}")
        self.pixdim, self.a_min, self.a_max, self.b_min, self.b_max = map(float, (pixdim, a_min, a_max, b_min, b_max))
        self.num_classes, self.cache = num_classes, bool(cache)
        self._cache: dict[int, dict[str, Any]] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def load(self, index: int) -> dict[str, Any]:
        """Pair ``index`` preprocessed onto its model grid (plus ``"affine"``: the model grid's ``[4, 4]``)."""
        entry = self.entries[index]
        fixed, fixed_affine = load_nifti(entry["fixed"])
        moving, moving_affine = load_nifti(entry["moving"])
        check_same_grid(fixed.shape, fixed_affine, moving.shape, moving_affine,
                        f"pair {index}: fixed {entry['fixed']} and moving {entry['moving']}")
        target = model_grid_affine(fixed_affine, fixed.shape, self.size, self.pixdim)

        def image(array: np.ndarray) -> Tensor:
            windowed = window_intensity(torch.from_numpy(np.ascontiguousarray(array))[None].float(), self.a_min,
                                        self.a_max, self.b_min, self.b_max)
            return resample_to_grid(windowed, fixed_affine, target, self.size, pad_value=self.b_min)

        out: dict[str, Any] = {"fixed": image(fixed), "moving": image(moving), "affine": target, "pair_index": index}
        has_labels = bool(entry.get("fixed_label") and entry.get("moving_label"))
        for key, image_key, image_affine, image_shape in (("fixed_label", "fixed", fixed_affine, fixed.shape),
                                                          ("moving_label", "moving", moving_affine, moving.shape)):
            if not has_labels:
                out[key] = torch.zeros(1, *self.size, dtype=torch.int64)
                continue
            label, label_affine = load_nifti(entry[key])
            check_same_grid(label.shape, label_affine, image_shape, image_affine,
                            f"pair {index}: label file {entry[key]} and image file {entry[image_key]}")
            values = torch.from_numpy(np.ascontiguousarray(label)).double()
            if not torch.equal(values, values.round()):
                raise DataError(f"label file {entry[key]} holds non-integer values (a label map must hold classes)")
            low, high = int(values.min()), int(values.max())
            if low < 0 or (self.num_classes is not None and high >= self.num_classes):
                raise DataError(f"label file {entry[key]} holds values in [{low}, {high}], outside [0, "
                                f"{'...' if self.num_classes is None else self.num_classes - 1}]")
            out[key] = resample_to_grid(values[None].float(), fixed_affine, target, self.size,
                                        mode="nearest").round().long()
        out["has_labels"] = has_labels
        return out

    def __getitem__(self, sample_id: int) -> dict[str, Any]:
        index = int(sample_id) % len(self.entries)
        if index in self._cache:
            item = self._cache[index]
        else:
            item = self.load(index)
            if self.cache:
                self._cache[index] = item
        return {**{k: item[k] for k in ("fixed", "moving", "fixed_label", "moving_label", "has_labels",
                                        "pair_index")}, "sample_id": int(sample_id)}
