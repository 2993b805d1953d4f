"""Labelled volumes for fine-tuning (segmentation, registration, classification): image + class map, one frame.

:func:`labelled_preprocess` is the pretraining preprocessing (:func:`medgauss.data.pretrain_preprocess`: load,
medgauss frame, ``pixdim`` mm, HU window -> ``[b_min, b_max]``, foreground crop, optional body region) that
carries the label map along (nearest-neighbour resampling) and maps its values onto ``0..K`` classes.
:func:`load_labelled_volumes` runs it over a datalist and keeps the (few) volumes in memory.

**Classes.** A label map's values are mapped through a lookup table (:func:`class_lookup`):

- grouped structures (the default for the bundled CT, :data:`BUNDLED_CLASS_GROUPS`): each class is a list of
  structure names of a ``structures.csv`` (``group,original_idx,structure,id``), e.g. ``lungs`` = the five lung
  lobes; every other labelled voxel becomes background;
- ``num_classes=K`` (Decathlon-style label maps already valued ``0..K-1``): values are kept and a value
  ``>= K`` is an error naming the file.

Errors name the file: a label whose grid (shape or affine) differs from its image's, values outside the class
range, a label map with no voxel of any class (an empty mask).
"""

from __future__ import annotations

import csv
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    MapTransform,
    Orientationd,
    ScaleIntensityRanged,
    Spacingd,
)

from medgauss.data.datalist import example_ct_path
from medgauss.data.transforms import (
    CropRegiond,
    DataError,
    LoadVolumed,
    StoreAffined,
    _Above,
    _source_name,
    apply_pipeline,
    check_region,
    window_and_spacing,
)
from medgauss.frame import AXCODES

__all__ = [
    "BUNDLED_CLASS_GROUPS",
    "CheckLabelGridd",
    "MapLabelsd",
    "class_lookup",
    "class_names_for",
    "image_preprocess",
    "labelled_preprocess",
    "load_labelled_volumes",
    "read_structures",
]

BUNDLED_CLASS_GROUPS: dict[str, tuple[str, ...]] = {
    "lungs": ("lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right", "lung_middle_lobe_right",
              "lung_lower_lobe_right"),
    "heart": ("heart",),
    "aorta": ("aorta",),
    "spine": tuple(f"vertebrae_{v}" for v in ("L5", "L4", "L3", "L2", "L1", *(f"T{i}" for i in range(12, 0, -1)),
                                              *(f"C{i}" for i in range(7, 0, -1)))),
    "ribs": (*(f"rib_{side}_{i}" for side in ("left", "right") for i in range(1, 13)), "sternum",
             "costal_cartilages"),
    "back_muscles": ("autochthon_left", "autochthon_right"),
}
"""The bundled CT's segmentation classes (1..6; 0 is background): structure names of its ``structures.csv``.

Each class is present both in the inferior 55% of the body (fine-tuning's training region) and in the superior
45% (its held-out region); the liver, the largest organ of the scan, is not (it lies wholly in the inferior part),
so it is not a class."""


def read_structures(path: str | Path | None = None) -> dict[str, int]:
    """``{structure name: label value}`` of a ``structures.csv`` (columns ``structure`` and ``id``; default: the
    bundled CT's).

    Raises:
        FileNotFoundError / DataError: the file is missing, or lacks the columns (naming it).
    """
    path = example_ct_path("structures") if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"structures file not found: {path}")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"structure", "id"} <= set(rows[0]):
        raise DataError(f"structures file {path} needs the columns 'structure' and 'id'")
    try:
        return {row["structure"]: int(row["id"]) for row in rows}
    except ValueError as err:
        raise DataError(f"structures file {path} has a non-integer id: {err}") from err


def class_lookup(groups: Mapping[str, Sequence[str]], structures: Mapping[str, int]) -> np.ndarray:
    """Lookup table ``lut[value] -> class`` (``int64``, classes ``1..len(groups)`` in ``groups`` order, 0 else).

    Raises:
        ValueError: a group is empty, names an unknown structure, or a structure is in two groups.
    """
    if not groups:
        raise ValueError("groups must name at least one class")
    lut = np.zeros(max(structures.values(), default=0) + 1, dtype=np.int64)
    seen: dict[str, str] = {}
    for index, (name, members) in enumerate(groups.items(), start=1):
        if isinstance(members, str) or not members:
            raise ValueError(f"class {name!r} must be a non-empty list of structure names, got {members!r}")
        for member in members:
            if member not in structures:
                raise ValueError(f"class {name!r}: unknown structure {member!r} (not in the structures table)")
            if member in seen:
                raise ValueError(f"structure {member!r} is in both class {seen[member]!r} and {name!r}")
            seen[member] = name
            lut[structures[member]] = index
    return lut


def class_names_for(groups: Mapping[str, Sequence[str]] | None, num_classes: int | None) -> list[str]:
    """Class names, background first: ``["background", *groups]`` or ``["background", "class_1", ...]``."""
    if groups is not None:
        return ["background", *groups]
    if num_classes is None or num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (background + one class) without groups, got {num_classes!r}")
    return ["background", *(f"class_{k}" for k in range(1, num_classes))]


class CheckLabelGridd(MapTransform):
    """Refuse a label map whose grid differs from its image's (shape, or affine beyond ``atol`` mm), as loaded.

    Raises:
        DataError: naming both files and the difference.
    """

    def __init__(self, image_key: str = "image", label_key: str = "label", atol: float = 1e-3) -> None:
        super().__init__([image_key, label_key])
        self.image_key, self.label_key, self.atol = image_key, label_key, float(atol)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        image, label = d[self.image_key], d[self.label_key]
        names = f"label file {_source_name(d, self.label_key)} and image file {_source_name(d, self.image_key)}"
        if tuple(image.shape) != tuple(label.shape):
            raise DataError(f"{names} have different shapes: {tuple(label.shape)} vs {tuple(image.shape)}")
        a, b = np.asarray(image.affine, dtype=np.float64), np.asarray(label.affine, dtype=np.float64)
        if not np.allclose(a, b, atol=self.atol, rtol=0.0):
            raise DataError(f"{names} have different affines (max difference {np.abs(a - b).max():.4g} mm):\n"
                            f"label {b.round(4).tolist()}\nimage {a.round(4).tolist()}")
        return d


class MapLabelsd(MapTransform):
    """Map label values onto classes ``0..K-1`` (through ``lut``, or kept as they are below ``num_classes``).

    Output: ``d[label_key]`` an ``int64`` tensor (a ``MetaTensor`` keeps its affine).

    Raises:
        DataError: non-integer values, values outside the class range (``>= num_classes``, negative, or beyond the
            lookup table), or no voxel of any class left (naming the file).
    """

    def __init__(self, label_key: str = "label", *, lut: np.ndarray | None = None,
                 num_classes: int | None = None) -> None:
        super().__init__([label_key])
        if (lut is None) == (num_classes is None):
            raise ValueError("pass exactly one of lut (grouped structures) and num_classes")
        self.label_key, self.num_classes = label_key, num_classes
        self.lut = None if lut is None else torch.as_tensor(lut, dtype=torch.int64)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        label = d[self.label_key]
        name = _source_name(d, self.label_key)
        plain = label.as_tensor() if isinstance(label, MetaTensor) else torch.as_tensor(label)
        values = plain.float()
        rounded = values.round()
        if not torch.equal(rounded, values):
            raise DataError(f"label file {name} holds non-integer values (a label map must hold class indices)")
        ints = rounded.long()
        low, high = int(ints.min()), int(ints.max())
        limit = len(self.lut) if self.lut is not None else self.num_classes
        if low < 0 or high >= limit:
            what = "the structures table's largest id" if self.lut is not None else "num_classes"
            raise DataError(f"label file {name} holds values in [{low}, {high}], outside [0, {limit - 1}] "
                            f"({what} = {limit - 1 if self.lut is not None else limit})")
        classes = self.lut[ints] if self.lut is not None else ints
        if not bool((classes > 0).any()):
            raise DataError(f"label file {name} has no voxel of any class (an empty mask)")
        d[self.label_key] = MetaTensor(classes, meta=label.meta) if isinstance(label, MetaTensor) else classes
        return d


def labelled_preprocess(
    *,
    pixdim: float | Sequence[float] = 1.5,
    a_min: float = -175.0,
    a_max: float = 250.0,
    b_min: float = 0.0,
    b_max: float = 1.0,
    clip: bool = True,
    foreground_threshold: float = 0.0,
    region: Sequence[float] | None = None,
    region_axis: int = 0,
    lut: np.ndarray | None = None,
    num_classes: int | None = None,
) -> Compose:
    """Deterministic preprocessing of ``{"image": path, "label": path}`` (the pretraining pipeline's, with labels).

    Args:
        pixdim, a_min, a_max, b_min, b_max, clip, foreground_threshold, region, region_axis: as in
            :func:`medgauss.data.pretrain_preprocess` (use the pretraining run's values:
            :func:`medgauss.nets.run_preprocessing`).
        lut, num_classes: the class mapping (:class:`MapLabelsd`; exactly one).

    Returns:
        ``Compose`` -> ``{"image": [1, D, H, W] float32, "label": [1, D, H, W] int64 in 0..K-1, "affine": [4, 4]
        float64}`` (axes as in :mod:`medgauss.frame`; the affine maps voxel indices to world RAS mm).
    """
    pix = window_and_spacing(a_min, a_max, pixdim)
    keys = ["image", "label"]
    return Compose(
        [
            LoadVolumed(keys),
            EnsureChannelFirstd(keys, channel_dim="no_channel"),
            CheckLabelGridd("image", "label"),
            MapLabelsd("label", lut=lut, num_classes=num_classes),
            Orientationd(keys, axcodes="".join(AXCODES), labels=(("L", "R"), ("P", "A"), ("I", "S"))),
            Spacingd(keys, pixdim=pix, mode=("bilinear", "nearest")),
            ScaleIntensityRanged("image", a_min=a_min, a_max=a_max, b_min=b_min, b_max=b_max, clip=clip),
            CropForegroundd(keys, source_key="image", select_fn=_Above(foreground_threshold), allow_smaller=True),
            *([CropRegiond(keys, region, region_axis)] if check_region(region, region_axis) else []),
            StoreAffined("image"),
        ]
    )


def image_preprocess(*, pixdim: float | Sequence[float] = 1.5, a_min: float = -175.0, a_max: float = 250.0,
                     b_min: float = 0.0, b_max: float = 1.0, clip: bool = True) -> Compose:
    """Inference preprocessing of ``{"image": path}``: the training pipeline's load, medgauss frame, ``pixdim`` mm
    and HU window, without any crop (the whole image is segmented / registered).

    Returns:
        ``Compose`` -> ``{"image": [1, D, H, W] float32 MetaTensor, "affine": [4, 4] float64}`` (voxel -> world mm).
    """
    pix = window_and_spacing(a_min, a_max, pixdim)
    return Compose(
        [
            LoadVolumed(["image"]),
            EnsureChannelFirstd(["image"], channel_dim="no_channel"),
            Orientationd(["image"], axcodes="".join(AXCODES), labels=(("L", "R"), ("P", "A"), ("I", "S"))),
            Spacingd(["image"], pixdim=pix, mode="bilinear"),
            ScaleIntensityRanged("image", a_min=a_min, a_max=a_max, b_min=b_min, b_max=b_max, clip=clip),
            StoreAffined("image"),
        ]
    )


def load_labelled_volumes(
    datalist: Sequence[Mapping[str, str]],
    *,
    classes: Mapping[str, Sequence[str]] | None = None,
    num_classes: int | None = None,
    structures: str | Path | None = None,
    pixdim: float | Sequence[float] = 1.5,
    a_min: float = -175.0,
    a_max: float = 250.0,
    b_min: float = 0.0,
    b_max: float = 1.0,
    clip: bool = True,
    foreground_threshold: float = 0.0,
    region: Sequence[float] | None = None,
    region_axis: int = 0,
) -> list[dict]:
    """Preprocess every labelled entry of ``datalist`` into memory (:func:`labelled_preprocess`).

    Args:
        datalist: ``[{"image": path, "label": path}, ...]`` (e.g. :func:`medgauss.data.example_ct_datalist`).
        classes: ``{class name: [structure names]}`` (e.g. :data:`BUNDLED_CLASS_GROUPS`), read against
            ``structures`` (a ``structures.csv``; default the bundled CT's); or
        num_classes: classes of label maps already valued ``0..num_classes-1`` (background included).
        Other arguments: :func:`labelled_preprocess`.

    Returns:
        One dict per entry: ``{"image": [1, D, H, W] float32, "label": [1, D, H, W] int64, "affine": [4, 4]
        float64, "image_path": str, "label_path": str}`` (plain tensors).

    Raises:
        ValueError: an empty datalist, an entry without a label, neither or both of ``classes`` / ``num_classes``.
        DataError: a missing / corrupt file, a label that does not match its image, or bad label values
            (naming the file).
    """
    if len(datalist) == 0:
        raise ValueError("datalist is empty: no labelled volume")
    if (classes is None) == (num_classes is None):
        raise ValueError("pass exactly one of classes (grouped structures) and num_classes")
    for entry in datalist:
        if "label" not in entry:
            raise ValueError(f"datalist entry {entry.get('image', entry)} has no 'label': fine-tuning needs labels")
    lut = None if classes is None else class_lookup(classes, read_structures(structures))
    preprocess = labelled_preprocess(pixdim=pixdim, a_min=a_min, a_max=a_max, b_min=b_min, b_max=b_max, clip=clip,
                                     foreground_threshold=foreground_threshold, region=region,
                                     region_axis=region_axis, lut=lut, num_classes=num_classes)
    volumes = []
    for entry in datalist:
        out = apply_pipeline(preprocess, {"image": entry["image"], "label": entry["label"]})
        image, label = (x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)
                        for x in (out["image"], out["label"]))
        volumes.append({
            "image": image.float().contiguous().clone(),
            "label": label.long().contiguous().clone(),
            "affine": out["affine"],
            "image_path": str(entry["image"]),
            "label_path": str(entry["label"]),
        })
    return volumes
