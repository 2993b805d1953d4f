"""Segmentation training data: labelled crops addressed by sample id, with a label budget (1% / 10% / 100%).

**Label fraction.** Fine-tuning with few labels is what pretraining is for, so the share of labelled training data
is a setting. With enough cases (``round(fraction * cases) >= 1`` and at least ``min_cases_for_case_split`` cases)
it is a share of the training *cases* (a seeded choice of ``round(fraction * cases)`` volumes), each sample then a
fresh random crop of one of them. With few cases (the bundled CT is one patient) it is a share of a fixed *pool*
of labelled crops: ``pool_size`` crops drawn once from the training volumes (seeded), of which the first
``max(1, round(fraction * pool_size))`` are kept, so 1% of a 100-crop pool is one labelled crop and every
smaller budget is a subset of every larger one. Either way the unlabelled rest is never seen.

**Crops.** A crop is centred on a labelled voxel with probability ``pos / (pos + neg)``, else anywhere in the
volume (MONAI ``RandCropByPosNegLabeld``'s rule, drawn here with one seeded generator per sample so a sample is a
pure function of ``(seed, sample_id)`` and resume is exact), clamped inside the volume. Training samples get random
flips along each axis and 90-degree axial rotations, applied to image and label alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from medgauss.data.sampling import check_rank
from medgauss.data.transforms import sample_seed

__all__ = ["SegmentationCropDataset", "draw_crop", "labelled_subset"]


def _triple(value: int | Sequence[int], name: str) -> tuple[int, int, int]:
    triple = (int(value),) * 3 if isinstance(value, int) else tuple(int(v) for v in value)
    if len(triple) != 3 or min(triple) < 1:
        raise ValueError(f"{name} must be a positive int or 3 positive ints, got {value!r}")
    return triple


def draw_crop(volume: dict, size: tuple[int, int, int], rng: np.random.Generator, *, pos: float = 1.0,
              neg: float = 1.0) -> tuple[Tensor, Tensor, tuple[int, int, int]]:
    """One ``size`` crop of ``volume`` (``{"image": [1, D, H, W], "label": [1, D, H, W]}``).

    Returns:
        ``(image [1, *size], label [1, *size], start (d, h, w))``: views into the volume.

    Raises:
        ValueError: the volume is smaller than ``size`` (naming its file).
    """
    shape = tuple(volume["image"].shape[1:])
    if any(s < c for s, c in zip(shape, size)):
        raise ValueError(f"volume {volume.get('image_path', '<in memory>')} is {shape} voxels after preprocessing, "
                         f"smaller than the crop size {size}")
    if rng.random() < pos / (pos + neg):
        labelled = volume.get("_fg")
        if labelled is None:
            labelled = volume["_fg"] = torch.nonzero(volume["label"][0] > 0).numpy()
        centre = labelled[rng.integers(len(labelled))]
    else:
        centre = np.array([rng.integers(s) for s in shape])
    start = tuple(int(min(max(c - k // 2, 0), s - k)) for c, k, s in zip(centre, size, shape))
    window = (slice(None), *(slice(a, a + k) for a, k in zip(start, size)))
    return volume["image"][window], volume["label"][window], start


def _augment(image: Tensor, label: Tensor, rng: np.random.Generator, flip_prob: float,
             rot90_prob: float) -> tuple[Tensor, Tensor]:
    for axis in (1, 2, 3):
        if rng.random() < flip_prob:
            image, label = image.flip(axis), label.flip(axis)
    if rot90_prob > 0 and rng.random() < rot90_prob and image.shape[2] == image.shape[3]:
        k = int(rng.integers(1, 4))
        image, label = image.rot90(k, (2, 3)), label.rot90(k, (2, 3))
    return image, label


def labelled_subset(num_cases: int, fraction: float, seed: int, min_cases_for_case_split: int = 10) -> list[int] | None:
    """The training cases a label ``fraction`` keeps (seeded), or ``None`` when it is a share of a crop pool
    instead (too few cases; module doc)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label_fraction must be in (0, 1], got {fraction}")
    keep = round(fraction * num_cases)
    if num_cases < min_cases_for_case_split or keep < 1:
        return None
    order = np.random.default_rng(seed).permutation(num_cases)
    return sorted(int(i) for i in order[:keep])


class SegmentationCropDataset(Dataset):
    """Labelled training crops for one rank, addressed by global ``sample_id`` (see the module doc).

    Args:
        volumes: preprocessed labelled volumes (:func:`medgauss.data.labelled.load_labelled_volumes`).
        spatial_size: crop size (the model's input size).
        label_fraction: share of the labelled training data used (``(0, 1]``).
        pool_size: labelled crops of the full budget when the fraction is a share of crops.
        min_cases_for_case_split: fewer cases than this: the fraction is a share of the crop pool.
        pos, neg: crop centre on a labelled voxel vs anywhere.
        flip_prob, rot90_prob: augmentation probabilities (per axis / per sample).
        seed: data seed (pool, case subset, every sample's crop and augmentation).
        rank, world_size: the process this dataset serves (ids ``rank + world_size * k``).

    ``dataset[i]`` -> ``{"image": [1, *spatial_size] float32, "label": [1, *spatial_size] int64, "sample_id": i}``.
    ``len(dataset)`` is the number of distinct labelled crops (the pool) or, with a case subset, the number of cases
    kept times ``pool_size``; the engine's sampler does not need it.
    """

    def __init__(self, volumes: Sequence[dict], spatial_size: int | Sequence[int], *, label_fraction: float = 1.0,
                 pool_size: int = 100, min_cases_for_case_split: int = 10, pos: float = 1.0, neg: float = 1.0,
                 flip_prob: float = 0.5, rot90_prob: float = 0.3, seed: int = 41, rank: int = 0,
                 world_size: int = 1) -> None:
        if len(volumes) == 0:
            raise ValueError("volumes is empty: no labelled training volume")
        if pool_size < 1:
            raise ValueError(f"pool_size must be >= 1, got {pool_size}")
        if pos < 0 or neg < 0 or pos + neg == 0:
            raise ValueError(f"pos and neg must be >= 0 and not both 0, got pos={pos}, neg={neg}")
        for name, p in (("flip_prob", flip_prob), ("rot90_prob", rot90_prob)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        check_rank(rank, world_size)
        self.size = _triple(spatial_size, "spatial_size")
        self.volumes = list(volumes)
        self.pos, self.neg, self.flip_prob, self.rot90_prob = pos, neg, flip_prob, rot90_prob
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.label_fraction = float(label_fraction)
        self.cases = labelled_subset(len(self.volumes), label_fraction, seed, min_cases_for_case_split)
        self.pool: list[tuple[int, tuple[int, int, int]]] | None = None
        if self.cases is None:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, 0x5E6]))
            pool = []
            for _ in range(pool_size):
                index = int(rng.integers(len(self.volumes)))
                pool.append((index, draw_crop(self.volumes[index], self.size, rng, pos=pos, neg=neg)[2]))
            self.pool = pool[: max(1, round(self.label_fraction * pool_size))]
        self.pool_size = pool_size

    @property
    def num_labelled(self) -> str:
        """What the label budget holds, for logs (``"1 of 100 pool crops"`` / ``"3 of 30 cases"``)."""
        if self.pool is not None:
            return f"{len(self.pool)} of {self.pool_size} pool crops"
        return f"{len(self.cases)} of {len(self.volumes)} cases"

    def labelled_data(self) -> tuple[list[Tensor], list[Tensor]]:
        """Every labelled voxel this budget may train on: the pool's crops, or the kept cases' volumes.

        Returns:
            ``(images, labels)``: lists of ``[1, d, h, w]`` tensors (views, not copies).
        """
        if self.pool is not None:
            windows = [(self.volumes[i], (slice(None), *(slice(a, a + k) for a, k in zip(start, self.size))))
                       for i, start in self.pool]
            return [v["image"][w] for v, w in windows], [v["label"][w] for v, w in windows]
        return [self.volumes[i]["image"] for i in self.cases], [self.volumes[i]["label"] for i in self.cases]

    def __len__(self) -> int:
        return len(self.pool) if self.pool is not None else len(self.cases) * self.pool_size

    def __getitem__(self, sample_id: int) -> dict:
        sample_id = int(sample_id)
        if sample_id < 0:
            raise IndexError(f"sample_id must be >= 0, got {sample_id}")
        if sample_id % self.world_size != self.rank:
            raise ValueError(f"sample_id {sample_id} belongs to rank {sample_id % self.world_size} of "
                             f"{self.world_size}, but this dataset serves rank {self.rank}")
        rng = np.random.default_rng(sample_seed(self.seed, sample_id))
        if self.pool is not None:
            index, start = self.pool[int(rng.integers(len(self.pool)))]
            volume = self.volumes[index]
            window = (slice(None), *(slice(a, a + k) for a, k in zip(start, self.size)))
            image, label = volume["image"][window], volume["label"][window]
        else:
            volume = self.volumes[self.cases[int(rng.integers(len(self.cases)))]]
            image, label, _ = draw_crop(volume, self.size, rng, pos=self.pos, neg=self.neg)
        image, label = _augment(image, label, rng, self.flip_prob, self.rot90_prob)
        return {"image": image.contiguous().clone(), "label": label.contiguous().clone(), "sample_id": sample_id}
