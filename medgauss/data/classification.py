"""Classification data: the "which structures are present in this crop" task, and users' labelled image lists.

**Structure presence (the default task).** A sample is a cubic crop (the encoder's ``img_size``) of a labelled
volume (:func:`medgauss.data.labelled.load_labelled_volumes`, e.g. the bundled CT with
:data:`~medgauss.data.labelled.BUNDLED_CLASS_GROUPS`) and a multi-label target: ``target[k] = 1`` when foreground
class ``k + 1`` has at least ``min_voxels[k]`` voxels in the crop (:func:`presence_targets`). Crop centres are drawn
uniformly among the *body* voxels (intensity above ``body_threshold``, or labelled), not only on labels, so
negatives exist; the crop is then shifted to lie inside the volume. Training crops are randomly flipped along each
axis (presence does not change). Item ``i`` of :class:`PresenceCropDataset` is a pure function of ``(seed, i)``;
:func:`presence_crop_set` is a fixed (unflipped) crop set, e.g. the held-out one from the superior region.

Why a threshold, and why per class: with a crop of 64^3 voxels at 1.5 mm (96 mm), a target "any voxel of the class"
is nearly always 1 for the big structures (ribs, and the lungs in the thorax), so it would teach nothing and be
unscorable (AUC needs negatives). ``recipes/conf_finetune/classification.yaml`` uses 4000 voxels (13.5 ml, 1.5 %
of the crop) for every class but the lungs, and 32000 (108 ml, 12 % of the crop) for the lungs, whose held-out
(thoracic) crops all contain some lung: measured prevalences (300 body-centred 64^3 crops) train / held-out:
lungs 0.33 / 0.72, heart 0.24 / 0.13, aorta 0.16 / 0.28, spine 0.25 / 0.30, ribs 0.39 / 0.60, back muscles 0.22 /
0.25. :func:`prevalence` reports them for any set (the recipe prints both).

**Labelled image lists (users' data).** :func:`load_labelled_image_list` reads a JSON list of ``{"image": path,
"labels": [0/1, ...]}`` (whole-image multi-label classification): each image is read into the medgauss frame
(:func:`medgauss.frame.load_nifti`), windowed (``a_min``/``a_max`` HU -> ``[b_min, b_max]``) and resampled
(trilinear) to the model's ``img_size``; :class:`ImageTargetDataset` serves such a set for training.
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

from medgauss.data.transforms import DataError, sample_seed
from medgauss.frame import load_nifti

__all__ = [
    "ImageTargetDataset",
    "PresenceCropDataset",
    "load_labelled_image_list",
    "presence_crop_set",
    "presence_targets",
    "prevalence",
]


def _triple(value: int | Sequence[int], name: str) -> tuple[int, int, int]:
    values = (value,) * 3 if isinstance(value, int | np.integer) else tuple(value)
    if len(values) != 3 or any(isinstance(v, bool) or int(v) != v or v < 1 for v in values):
        raise ValueError(f"{name} must be a positive int or 3 positive ints, got {value!r}")
    return tuple(int(v) for v in values)  # type: ignore[return-value]


def _min_voxels(min_voxels: int | Sequence[int], num_classes: int) -> Tensor:
    values = [min_voxels] * num_classes if isinstance(min_voxels, int | np.integer) else list(min_voxels)
    if len(values) != num_classes or any(isinstance(v, bool) or int(v) != v or v < 1 for v in values):
        raise ValueError(f"min_voxels must be a positive int or {num_classes} positive ints (one per foreground "
                         f"class), got {min_voxels!r}")
    return torch.tensor([int(v) for v in values], dtype=torch.int64)


def presence_targets(label: Tensor, num_classes: int, min_voxels: int | Sequence[int]) -> Tensor:
    """Multi-label presence targets of a label map.

    Args:
        label: ``[D, H, W]`` or ``[1, D, H, W]`` integer class map, values ``0..num_classes`` (0 = background).
        num_classes: foreground classes ``K`` (classes ``1..K``).
        min_voxels: voxels a class needs to count as present (one int, or ``K`` ints).

    Returns:
        ``[K]`` float32: ``target[k] = 1`` iff class ``k + 1`` has ``>= min_voxels[k]`` voxels.

    Raises:
        ValueError: a non-integer label, values outside ``0..num_classes``, or bad ``min_voxels``.
    """
    if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    thresholds = _min_voxels(min_voxels, int(num_classes))
    if not isinstance(label, Tensor) or label.is_floating_point() or label.ndim not in (3, 4):
        raise ValueError(f"label must be an integer tensor [D, H, W] or [1, D, H, W], got "
                         f"{getattr(label, 'dtype', type(label).__name__)} {tuple(getattr(label, 'shape', ()))}")
    flat = label.reshape(-1).long()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) > num_classes):
        raise ValueError(f"label values must be in 0..{num_classes}, got [{int(flat.min())}, {int(flat.max())}]")
    counts = torch.bincount(flat, minlength=int(num_classes) + 1)[1:]
    return (counts >= thresholds).float()


def prevalence(targets: Tensor) -> list[float]:
    """Fraction of positives of each class of ``targets [N, K]`` (0 or 1: a constant class, unscorable)."""
    if not isinstance(targets, Tensor) or targets.ndim != 2 or targets.shape[0] == 0:
        raise ValueError(f"targets must be a tensor [N >= 1, K], got {tuple(getattr(targets, 'shape', ()))}")
    return [round(float(v), 4) for v in targets.float().mean(dim=0)]


class PresenceCropDataset(Dataset):
    """Random crops of labelled volumes with structure-presence targets (module doc); item ``i`` is a pure function
    of ``(seed, i)`` (endless: any non-negative ``i``).

    Args:
        volumes: ``[{"image": [1, D, H, W] float, "label": [1, D, H, W] int64 0..K}, ...]`` (e.g.
            :func:`~medgauss.data.labelled.load_labelled_volumes`; other keys ignored).
        crop_size: crop edge(s) in voxels (the encoder's ``img_size``); a smaller volume is padded (image with its
            minimum, label with background).
        num_classes: foreground classes ``K``.
        min_voxels: presence threshold, one int or ``K`` ints (:func:`presence_targets`).
        seed: data seed.
        flip: flip each axis with probability 1/2 (training augmentation).
        body_threshold: image value above which a voxel is body (``0.25`` = -500 HU under the HU window
            ``[-1000, 1000] -> [0, 1]``); labelled voxels are body too.

    Items: ``{"image": [1, *crop_size] float32, "target": [K] float32, "sample_id": int}``.
    """

    def __init__(self, volumes: Sequence[Mapping[str, Any]], crop_size: int | Sequence[int], *, num_classes: int,
                 min_voxels: int | Sequence[int], seed: int = 0, flip: bool = True,
                 body_threshold: float = 0.25) -> None:
        if len(volumes) == 0:
            raise ValueError("volumes is empty: no labelled volume to crop")
        self.crop_size = _triple(crop_size, "crop_size")
        self.num_classes = int(num_classes)
        self.min_voxels = _min_voxels(min_voxels, self.num_classes)
        self.seed, self.flip, self.body_threshold = int(seed), bool(flip), float(body_threshold)
        self.images: list[Tensor] = []
        self.labels: list[Tensor] = []
        self.body: list[Tensor] = []
        for index, volume in enumerate(volumes):
            image, label = volume["image"], volume["label"]
            if image.ndim != 4 or image.shape[0] != 1 or tuple(label.shape) != tuple(image.shape):
                raise ValueError(f"volumes[{index}] needs image and label of one shape [1, D, H, W], got "
                                 f"{tuple(image.shape)} and {tuple(label.shape)}")
            if label.is_floating_point() or int(label.min()) < 0 or int(label.max()) > self.num_classes:
                raise ValueError(f"volumes[{index}] label must be integers in 0..{self.num_classes}")
            pad = [max(0, c - s) for c, s in zip(self.crop_size, image.shape[1:], strict=True)]
            widths = [w for p in reversed(pad) for w in (p // 2, p - p // 2)]
            image = F.pad(image.float(), widths, value=float(image.min()))
            label = F.pad(label.long(), widths, value=0)
            body = ((image[0] > self.body_threshold) | (label[0] > 0)).nonzero()
            if body.shape[0] == 0:
                raise ValueError(f"volumes[{index}] has no body voxel (image > body_threshold={body_threshold} or "
                                 "labelled)")
            self.images.append(image.contiguous())
            self.labels.append(label.contiguous())
            self.body.append(body)

    def crop_start(self, rng: np.random.Generator, volume: int) -> tuple[int, ...]:
        """Corner of a crop centred on a uniformly drawn body voxel, shifted to lie inside the volume."""
        body = self.body[volume]
        centre = body[int(rng.integers(body.shape[0]))].tolist()
        shape = self.images[volume].shape[1:]
        return tuple(min(max(c - s // 2, 0), n - s) for c, s, n in zip(centre, self.crop_size, shape, strict=True))

    def __getitem__(self, sample_id: int) -> dict[str, Any]:
        if int(sample_id) != sample_id or sample_id < 0:
            raise IndexError(f"sample_id must be a non-negative int, got {sample_id!r}")
        rng = np.random.default_rng(sample_seed(self.seed, int(sample_id)))
        volume = int(rng.integers(len(self.images)))
        d, h, w = self.crop_start(rng, volume)
        sd, sh, sw = self.crop_size
        image = self.images[volume][:, d:d + sd, h:h + sh, w:w + sw]
        label = self.labels[volume][:, d:d + sd, h:h + sh, w:w + sw]
        target = presence_targets(label, self.num_classes, self.min_voxels.tolist())
        if self.flip:
            axes = [1 + a for a in range(3) if rng.random() < 0.5]
            if axes:
                image = torch.flip(image, axes)
        return {"image": image.clone(), "target": target, "sample_id": int(sample_id)}

    def __len__(self) -> int:
        """Nominal length (the dataset is endless): one crop per body voxel of the first volume."""
        return int(self.body[0].shape[0])


def presence_crop_set(volumes: Sequence[Mapping[str, Any]], crop_size: int | Sequence[int], *, num_crops: int,
                      num_classes: int, min_voxels: int | Sequence[int], seed: int = 1234,
                      body_threshold: float = 0.25) -> dict[str, Tensor]:
    """A fixed set of unflipped presence crops (items ``0..num_crops-1`` of a :class:`PresenceCropDataset`).

    Returns:
        ``{"image": [N, 1, *crop_size] float32, "target": [N, K] float32}``.
    """
    if isinstance(num_crops, bool) or int(num_crops) != num_crops or num_crops < 1:
        raise ValueError(f"num_crops must be an integer >= 1, got {num_crops!r}")
    dataset = PresenceCropDataset(volumes, crop_size, num_classes=num_classes, min_voxels=min_voxels, seed=seed,
                                  flip=False, body_threshold=body_threshold)
    items = [dataset[i] for i in range(int(num_crops))]
    return {"image": torch.stack([it["image"] for it in items]), "target": torch.stack([it["target"] for it in items])}


def load_labelled_image_list(entries: str | Path | Sequence[Mapping[str, Any]], *, num_labels: int,
                             img_size: int | Sequence[int], a_min: float = -1000.0, a_max: float = 1000.0,
                             b_min: float = 0.0, b_max: float = 1.0, clip: bool = True) -> dict[str, Any]:
    """Read a whole-image multi-label list into memory, each image resampled to ``img_size``.

    Args:
        entries: a JSON file holding ``[{"image": path, "labels": [0/1, ...]}, ...]`` (relative paths are relative
            to the file's folder), or that list itself (paths relative to the working directory).
        num_labels: ``K``, the length every ``labels`` must have.
        img_size: the model's input size ``(D, H, W)`` (int = cube).
        a_min, a_max, b_min, b_max, clip: HU window mapped linearly onto ``[b_min, b_max]`` (clipped).

    Returns:
        ``{"image": [N, 1, *img_size] float32, "target": [N, K] float32, "paths": [N] str}``.

    Raises:
        FileNotFoundError: the list file is missing, or image files are (all named).
        DataError: the list is not a non-empty JSON list of such entries, or a ``labels`` has the wrong length or
            non-binary values (naming the entry).
    """
    size = _triple(img_size, "img_size")
    if not a_min < a_max:
        raise ValueError(f"HU window needs a_min < a_max, got a_min={a_min}, a_max={a_max}")
    if isinstance(entries, str | Path):
        source = Path(entries)
        if not source.is_file():
            raise FileNotFoundError(f"labelled image list not found: {source}")
        try:
            items = json.loads(source.read_text())
        except json.JSONDecodeError as err:
            raise DataError(f"labelled image list {source} is not valid JSON: {err}") from err
        base, where = source.parent, str(source)
    else:
        items, base, where = list(entries), Path("."), "the labelled image list"
    if not isinstance(items, list) or not items:
        raise DataError(f"{where} must be a non-empty JSON list of {{\"image\": path, \"labels\": [0/1, ...]}}")
    paths, targets = [], []
    for index, item in enumerate(items):
        if not isinstance(item, Mapping) or "image" not in item or "labels" not in item:
            raise DataError(f"{where} entry {index} must have the keys 'image' and 'labels', got {item!r}")
        labels = item["labels"]
        if not isinstance(labels, list | tuple) or len(labels) != num_labels:
            got = len(labels) if isinstance(labels, list | tuple) else repr(labels)
            raise DataError(f"{where} entry {index} ({item['image']}) has {got} labels, expected {num_labels}")
        if any(v not in (0, 1) or isinstance(v, str) for v in labels):
            raise DataError(f"{where} entry {index} ({item['image']}) labels must be 0 or 1, got {labels}")
        path = Path(item["image"])
        paths.append(path if path.is_absolute() else base / path)
        targets.append([float(v) for v in labels])
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{where}: {len(missing)} image file(s) not found: {', '.join(missing)}")
    images = []
    for path in paths:
        array, _ = load_nifti(path)
        volume = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        volume = (volume - a_min) / (a_max - a_min) * (b_max - b_min) + b_min
        if clip:
            volume = volume.clamp(min(b_min, b_max), max(b_min, b_max))
        resized = F.interpolate(volume[None, None], size=size, mode="trilinear", align_corners=False)
        images.append(resized[0])
    return {"image": torch.stack(images), "target": torch.tensor(targets, dtype=torch.float32),
            "paths": [str(p) for p in paths]}


class ImageTargetDataset(Dataset):
    """Endless shuffled passes over in-memory ``images [N, 1, D, H, W]`` with ``targets [N, K]``.

    Item ``i`` is image ``perm_e[i % N]`` of epoch ``e = i // N`` (``perm_e`` drawn from ``(seed, e)``), flipped
    along each axis with probability 1/2 when ``flip`` (drawn from ``(seed, i)``): a pure function of ``(seed, i)``.
    Items as :class:`PresenceCropDataset`'s.
    """

    def __init__(self, images: Tensor, targets: Tensor, *, seed: int = 0, flip: bool = True) -> None:
        if not isinstance(images, Tensor) or images.ndim != 5 or images.shape[0] == 0:
            raise ValueError(f"images must be [N >= 1, C, D, H, W], got {tuple(getattr(images, 'shape', ()))}")
        if not isinstance(targets, Tensor) or targets.ndim != 2 or targets.shape[0] != images.shape[0]:
            raise ValueError(f"targets must be [N={images.shape[0]}, K], got {tuple(getattr(targets, 'shape', ()))}")
        self.images, self.targets = images.float(), targets.float()
        self.seed, self.flip = int(seed), bool(flip)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, sample_id: int) -> dict[str, Any]:
        if int(sample_id) != sample_id or sample_id < 0:
            raise IndexError(f"sample_id must be a non-negative int, got {sample_id!r}")
        n = len(self)
        epoch, position = divmod(int(sample_id), n)
        perm = np.random.default_rng([self.seed, epoch, 0x5EED]).permutation(n)  # per-epoch order stream
        index = int(perm[position])
        image = self.images[index]
        if self.flip:
            rng = np.random.default_rng(sample_seed(self.seed, int(sample_id)))
            axes = [1 + a for a in range(3) if rng.random() < 0.5]
            if axes:
                image = torch.flip(image, axes)
        return {"image": image.clone(), "target": self.targets[index].clone(), "sample_id": int(sample_id)}
