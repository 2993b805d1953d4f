"""MONAI dictionary-transform pipelines for Gaussian masked pretraining.

Two halves, so the expensive deterministic half can be cached once per volume:

* :func:`pretrain_preprocess` (deterministic): load (finite values only) -> channel first -> orientation
  into the medgauss frame -> spacing (1.5 mm) -> HU window ``[a_min, a_max]`` scaled to ``[b_min, b_max]``
  (clipped) -> foreground crop -> size check -> crop-centre indices. Output keys: ``"image"``
  ``[1, D, H, W]`` float32, ``"affine"`` ``[4, 4]`` float64 and ``"fg_indices"`` / ``"bg_indices"`` (label > 0
  where a label exists, else image > foreground threshold).
* :func:`pretrain_augment` (random): ``spatial_size`` sub-crop centred on a positive (mask) voxel with
  probability ``pos / (pos + neg)`` (3:1 default), random flips along each axis, rotate by 90 degrees in
  the axial plane, intensity scale and shift, then a clamp back to ``[b_min, b_max]``.
  Output: ``{"image": [1, *spatial_size] float32, "affine": [4, 4] float64}``.

Array axes follow :mod:`medgauss.frame`: axis 0 (D) towards Superior, 1 (H) Anterior, 2 (W) Right, so
``image[0, d]`` is an axial slice. Every volume carries its ``affine`` (voxel index ``(d, h, w, 1)`` ->
world RAS mm); a crop's affine includes its offset and any flip or rotation applied to it, so a Gaussian
predicted in the crop's normalised coordinates maps to world mm by
``gaussians_to_world(g, crop_shape, affine=crop["affine"])``.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    Orientationd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialCrop,
)
from monai.transforms.utils import map_binary_to_indices

from medgauss.frame import AXCODES

__all__ = [
    "DataError",
    "LoadVolumed",
    "RequireMinSized",
    "CropCentreIndicesd",
    "ClampIntensityd",
    "StoreAffined",
    "CropRegiond",
    "AttachAffined",
    "pretrain_preprocess",
    "pretrain_augment",
    "sample_seed",
    "apply_pipeline",
    "window_and_spacing",
]


class DataError(ValueError):
    """A data file is missing, unreadable or unsuitable; the message names the file."""


def _as_triple(value: int | Sequence[int], name: str) -> tuple[int, int, int]:
    triple = (value,) * 3 if isinstance(value, int) else tuple(value)
    if len(triple) != 3 or any(int(v) < 1 for v in triple):
        raise ValueError(f"{name} must be a positive int or 3 positive ints, got {value!r}")
    return tuple(int(v) for v in triple)


def _source_name(data: Mapping[Hashable, object], key: Hashable) -> str:
    """File a (loaded) entry came from, for error messages."""
    meta = getattr(data.get(key), "meta", None) or {}
    return str(meta.get("filename_or_obj", "<unknown file>"))


class LoadVolumed(MapTransform):
    """``LoadImaged`` (NIfTI via nibabel) that names the file in every failure and requires 3-D volumes.

    Raises:
        DataError: missing file, unreadable / corrupt file, or an array that is not 3-D.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self._loader = LoadImaged(keys, reader="NibabelReader", image_only=True, allow_missing_keys=True)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            path = d[key]
            try:
                d[key] = self._loader({key: path})[key]
            except Exception as err:  # nibabel / gzip / MONAI raise many types; re-raise naming the file
                raise DataError(f"cannot read {key} file {path}: {type(err).__name__}: {err}") from err
            if d[key].ndim != 3:
                raise DataError(
                    f"{key} file {path} must hold a 3-D volume, got array shape {tuple(d[key].shape)}"
                )
            finite = torch.isfinite(torch.as_tensor(d[key]))
            if not bool(finite.all()):
                raise DataError(
                    f"{key} file {path} holds {int((~finite).sum())} non-finite voxel(s) (NaN or inf)"
                )
        return d


def window_and_spacing(a_min: float, a_max: float, pixdim: float | Sequence[float]) -> tuple[float, float, float]:
    """Check a HU window and a voxel spacing; returns the spacing as 3 floats (mm).

    Raises:
        ValueError: ``a_min >= a_max``, or a spacing that is not one or three positive numbers.
    """
    if not a_min < a_max:
        raise ValueError(f"HU window needs a_min < a_max, got a_min={a_min}, a_max={a_max}")
    pix = (float(pixdim),) * 3 if isinstance(pixdim, int | float) else tuple(float(p) for p in pixdim)
    if len(pix) != 3 or min(pix) <= 0:
        raise ValueError(f"pixdim must be a positive float or 3 positive floats, got {pixdim!r}")
    return pix


def apply_pipeline(pipeline, entry: Mapping[str, object]) -> dict:
    """Run a MONAI pipeline on one datalist entry; any failure becomes a :class:`DataError` naming the file.

    MONAI's ``Compose`` wraps a transform's exception in ``RuntimeError("applying transform ...")``; the root cause
    is surfaced (a :class:`DataError` as it is, anything else as a ``DataError`` naming the entry's image file).
    """
    try:
        return pipeline(dict(entry))
    except DataError:
        raise
    except Exception as err:
        root = err
        while root.__cause__ is not None:
            root = root.__cause__
        if isinstance(root, DataError):
            raise root from err
        raise DataError(f"preprocessing failed for image file {entry.get('image')}: {type(root).__name__}: {root}"
                        ) from err


class RequireMinSized(MapTransform):
    """Raise :class:`DataError` (naming the file) when a volume is smaller than ``min_size`` on any axis."""

    def __init__(self, keys: KeysCollection, min_size: int | Sequence[int]) -> None:
        super().__init__(keys)
        self.min_size = _as_triple(min_size, "min_size")

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            spatial = tuple(d[key].shape[1:])
            if any(s < m for s, m in zip(spatial, self.min_size)):
                raise DataError(
                    f"{key} file {_source_name(d, key)} is {spatial} voxels after resampling, foreground "
                    f"cropping and region selection, smaller than the crop size {self.min_size}"
                )
        return d


class _Above:
    """Picklable ``x > threshold`` (foreground selection for ``CropForegroundd``)."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    def __call__(self, x):
        return x > self.threshold


class CropCentreIndicesd(MapTransform):
    """Precompute where crop centres may fall (so random cropping costs no full-volume scan per sample).

    Positive centres: voxels with ``label > 0`` when ``label_key`` is present, else body voxels
    (``image > threshold``). Negative centres: with a label, unlabelled voxels inside the body; without,
    voxels outside the body mask. Adds ``"fg_indices"`` / ``"bg_indices"`` (flat int64 indices into the
    spatial grid) and drops the label.

    Raises:
        DataError: label and image grids differ, or there is no positive voxel (names the file).
    """

    def __init__(self, image_key: str = "image", label_key: str = "label", threshold: float = 0.0) -> None:
        super().__init__([image_key])
        self.image_key, self.label_key, self.threshold = image_key, label_key, threshold

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        image = d[self.image_key]
        label = d.pop(self.label_key, None)
        if label is not None and tuple(label.shape) != tuple(image.shape):
            raise DataError(
                f"label file {_source_name(data, self.label_key)} has shape {tuple(label.shape)} but image "
                f"{_source_name(d, self.image_key)} has {tuple(image.shape)} after resampling"
            )
        if label is not None:
            fg, bg = map_binary_to_indices(label > 0, image, self.threshold)
        else:
            fg, bg = map_binary_to_indices(image > self.threshold)
        if len(fg) == 0:
            what = "labelled" if label is not None else "foreground"
            raise DataError(f"file {_source_name(d, self.image_key)} has no {what} voxel to centre crops on")
        d["fg_indices"], d["bg_indices"] = torch.as_tensor(fg), torch.as_tensor(bg)
        return d


class ClampIntensityd(MapTransform):
    """Clamp values of ``keys`` into ``[low, high]`` (after intensity augmentation)."""

    def __init__(self, keys: KeysCollection, low: float, high: float) -> None:
        super().__init__(keys)
        if not low < high:
            raise ValueError(f"need low < high, got low={low}, high={high}")
        self.low, self.high = low, high

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = torch.clamp(torch.as_tensor(d[key]), self.low, self.high)
        return d


def check_region(region: Sequence[float] | None, region_axis: int) -> tuple[float, float] | None:
    """Validate a body region ``(start, stop)`` given as fractions in ``[0, 1]`` along ``region_axis``."""
    if region_axis not in (0, 1, 2):
        raise ValueError(f"region_axis must be 0 (z), 1 (y) or 2 (x), got {region_axis!r}")
    if region is None:
        return None
    try:
        start, stop = (float(v) for v in region)
    except (TypeError, ValueError) as err:
        raise ValueError(f"region must be two fractions (start, stop) in [0, 1], got {region!r}") from err
    if not 0.0 <= start < stop <= 1.0:
        raise ValueError(f"region must satisfy 0 <= start < stop <= 1 (fractions of the body's extent), "
                         f"got {region!r}: an empty region holds no crop")
    return start, stop


class CropRegiond(MapTransform):
    """Keep only a slab of the volume: fractions ``region = (start, stop)`` of its extent along ``axis``.

    Splits one scan into disjoint training and held-out parts (e.g. ``(0, 0.55)`` and ``(0.55, 1)`` along z
    for the bundled CT): slice ``[round(start n), round(stop n))``, so complementary regions share no voxel,
    with the affine updated (MONAI tracks it).
    Applied after the foreground crop, so the fractions are of the body's extent.

    Raises:
        DataError: the slab is empty (names the file).
    """

    def __init__(self, keys: KeysCollection, region: Sequence[float], axis: int = 0) -> None:
        super().__init__(keys)
        checked = check_region(region, axis)
        assert checked is not None
        self.region, self.axis = checked, int(axis)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        first = next(iter(self.key_iterator(d)))
        n = int(d[first].shape[1 + self.axis])
        lo, hi = round(self.region[0] * n), round(self.region[1] * n)
        if hi <= lo:
            raise DataError(f"region {self.region} of axis {self.axis} is empty for file {_source_name(d, first)} "
                            f"({n} voxels along that axis)")
        slices = [slice(None)] * 3
        slices[self.axis] = slice(lo, hi)
        crop = SpatialCrop(roi_slices=slices)
        for key in self.key_iterator(d):
            d[key] = crop(d[key])
        return d


class StoreAffined(MapTransform):
    """Copy the voxel-to-world affine that MONAI tracks on ``image_key`` into ``d["affine"]``.

    The value is a ``[4, 4]`` float64 tensor (voxel index ``(d, h, w, 1)`` -> world RAS mm), so it survives
    the conversion of the image to a plain tensor and the default collate (``[B, 4, 4]``).
    """

    def __init__(self, image_key: str = "image", affine_key: str = "affine") -> None:
        super().__init__([image_key])
        self.image_key, self.affine_key = image_key, affine_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        image = d[self.image_key]
        if not isinstance(image, MetaTensor):
            raise ValueError(f"{self.image_key} carries no affine (got {type(image).__name__}, not a MetaTensor)")
        d[self.affine_key] = torch.as_tensor(image.affine, dtype=torch.float64).clone()
        return d


class AttachAffined(MapTransform):
    """Make ``image_key`` a ``MetaTensor`` carrying ``d["affine"]``, so MONAI's crops, flips and rotations
    update the affine along with the voxels (:class:`StoreAffined` reads it back)."""

    def __init__(self, image_key: str = "image", affine_key: str = "affine") -> None:
        super().__init__([image_key])
        self.image_key, self.affine_key = image_key, affine_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        affine = torch.as_tensor(d[self.affine_key], dtype=torch.float64)
        if affine.shape != (4, 4):
            raise ValueError(f"{self.affine_key} must be [4, 4], got {tuple(affine.shape)}")
        d[self.image_key] = MetaTensor(torch.as_tensor(d[self.image_key]), affine=affine)
        return d


def pretrain_preprocess(
    *,
    spatial_size: int | Sequence[int] = 96,
    pixdim: float | Sequence[float] = 1.5,
    a_min: float = -175.0,
    a_max: float = 250.0,
    b_min: float = 0.0,
    b_max: float = 1.0,
    clip: bool = True,
    foreground_threshold: float = 0.0,
    foreground_margin: int = 0,
    has_labels: bool = True,
    region: Sequence[float] | None = None,
    region_axis: int = 0,
) -> Compose:
    """Deterministic part of the pipeline (cache its output once per volume).

    Args:
        spatial_size: crop size (voxels) the volume must at least have after foreground cropping.
        pixdim: target voxel spacing in mm (one value or per axis).
        a_min, a_max: HU window mapped linearly to ``[b_min, b_max]``; ``clip`` clips outside values.
        foreground_threshold: scaled intensity above which a voxel is body (foreground crop, and the
            crop mask when no label exists).
        foreground_margin: voxels kept around the foreground bounding box.
        has_labels: entries carry a ``"label"`` file (resampled with nearest neighbour).
        region, region_axis: keep only the slab ``(start, stop)`` (fractions of the body's extent) along
            array axis ``region_axis`` (0 = z, superior-inferior) after the foreground crop
            (:class:`CropRegiond`): disjoint regions of one scan for training and held-out evaluation.

    Returns:
        ``Compose``: ``{"image": path, "label": path?}`` -> ``{"image": [1, D, H, W] float32,
        "affine": [4, 4] float64, "fg_indices": [P] int64, "bg_indices": [Q] int64}`` (see
        :class:`CropCentreIndicesd`; axes as in :mod:`medgauss.frame`).
    """
    pix = window_and_spacing(a_min, a_max, pixdim)
    size = _as_triple(spatial_size, "spatial_size")
    keys = ["image", "label"] if has_labels else ["image"]
    modes = ("bilinear", "nearest") if has_labels else ("bilinear",)
    return Compose(
        [
            LoadVolumed(keys),
            EnsureChannelFirstd(keys, channel_dim="no_channel"),
            Orientationd(keys, axcodes="".join(AXCODES), labels=(("L", "R"), ("P", "A"), ("I", "S"))),
            Spacingd(keys, pixdim=pix, mode=modes),
            ScaleIntensityRanged("image", a_min=a_min, a_max=a_max, b_min=b_min, b_max=b_max, clip=clip),
            CropForegroundd(
                keys,
                source_key="image",
                select_fn=_Above(foreground_threshold),
                margin=foreground_margin,
                allow_smaller=True,
            ),
            *([CropRegiond(keys, region, region_axis)] if check_region(region, region_axis) else []),
            RequireMinSized("image", size),
            CropCentreIndicesd("image", "label", threshold=foreground_threshold),
            StoreAffined("image"),
            EnsureTyped(["image"], dtype=torch.float32, track_meta=False),
        ]
    )


def pretrain_augment(
    *,
    spatial_size: int | Sequence[int] = 96,
    pos: float = 3.0,
    neg: float = 1.0,
    foreground_threshold: float = 0.0,
    flip_prob: float = 0.5,
    rot90_prob: float = 0.3,
    scale_intensity: float = 0.1,
    shift_intensity: float = 0.1,
    intensity_prob: float = 0.1,
    b_min: float = 0.0,
    b_max: float = 1.0,
) -> Compose:
    """Random part of the pipeline, applied to every drawn sample.

    Args:
        spatial_size: crop size in voxels.
        pos, neg: ratio of crops centred on a positive vs. a negative voxel (:class:`CropCentreIndicesd`).
        foreground_threshold: negatives are centred where the image exceeds it.
        flip_prob: probability of a flip, independently along each of the 3 axes.
        rot90_prob: probability of a k*90 degree rotation (k in 1..3) in the axial plane (array axes 1, 2).
        scale_intensity: ``v -> v * (1 + f)`` with ``f ~ U(-scale, scale)``, probability ``intensity_prob``.
        shift_intensity: ``v -> v + o`` with ``o ~ U(-shift, shift)``, with probability ``intensity_prob``.
        b_min, b_max: final clamp range (the scaled intensity range).

    Returns:
        ``Compose`` (randomised through ``set_random_state``): cached dict (with ``"affine"``) -> list with
        one ``{"image": [1, *spatial_size] float32, "affine": [4, 4] float64}``, the crop's own affine.
    """
    size = _as_triple(spatial_size, "spatial_size")
    for name, p in (("flip_prob", flip_prob), ("rot90_prob", rot90_prob), ("intensity_prob", intensity_prob)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {p}")
    if rot90_prob > 0 and size[1] != size[2]:
        raise ValueError(f"rot90 in the axial plane needs spatial_size[1] == spatial_size[2], got {size}")
    if pos < 0 or neg < 0 or pos + neg == 0:
        raise ValueError(f"pos and neg must be >= 0 and not both 0, got pos={pos}, neg={neg}")
    return Compose(
        [
            AttachAffined("image"),
            RandCropByPosNegLabeld(
                ["image"],
                label_key="label",  # absent: centres come from the precomputed indices below
                spatial_size=size,
                pos=pos,
                neg=neg,
                num_samples=1,
                image_key="image",
                image_threshold=foreground_threshold,
                fg_indices_key="fg_indices",
                bg_indices_key="bg_indices",
                allow_smaller=False,
            ),
            RandFlipd(["image"], prob=flip_prob, spatial_axis=0),
            RandFlipd(["image"], prob=flip_prob, spatial_axis=1),
            RandFlipd(["image"], prob=flip_prob, spatial_axis=2),
            RandRotate90d(["image"], prob=rot90_prob, max_k=3, spatial_axes=(1, 2)),
            RandScaleIntensityd(["image"], factors=scale_intensity, prob=intensity_prob),
            RandShiftIntensityd(["image"], offsets=shift_intensity, prob=intensity_prob),
            ClampIntensityd(["image"], b_min, b_max),
            StoreAffined("image"),
            EnsureTyped(["image"], dtype=torch.float32, track_meta=False),
        ]
    )


def sample_seed(seed: int, sample_id: int) -> int:
    """Deterministic 32-bit seed of one drawn sample (independent of worker / rank / resume state)."""
    return int(np.random.SeedSequence([int(seed), int(sample_id)]).generate_state(1)[0])
