"""Pretraining datasets: cached preprocessed volumes + reproducible random crops, sharded per rank.

A drawn sample is identified by a global integer ``sample_id`` (0, 1, 2, ... over the whole run).
Everything random about it (which volume, which crop, which flips) is a pure function of
``(seed, sample_id)``, so a run resumed at sample ``k`` sees exactly the samples an uninterrupted run
would, whatever the worker count. :class:`ShardedSampleSampler` hands rank ``r`` of ``W`` the ids
``r, r + W, r + 2W, ...``: ranks never see the same sample.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from medgauss.data.transforms import DataError, pretrain_augment, pretrain_preprocess, sample_seed

__all__ = ["CachedVolumeDataset", "PretrainCropDataset", "ShardedSampleSampler", "build_pretrain_dataset"]


class CachedVolumeDataset(Dataset):
    """Deterministically preprocessed volumes, computed once (``cache=True``) or on every access.

    Args:
        datalist: ``[{"image": path, "label": path?}, ...]`` (see :mod:`medgauss.data.datalist`).
        preprocess: deterministic dict transform (e.g. :func:`pretrain_preprocess`).
        cache: keep every preprocessed volume in memory (built eagerly in the constructor, so bad files
            fail at start-up, not mid-run).

    Raises:
        ValueError: empty datalist; :class:`DataError` (a ``ValueError``) naming a bad file.
    """

    def __init__(
        self, datalist: Sequence[dict[str, str]], preprocess: Callable, *, cache: bool = True
    ) -> None:
        if len(datalist) == 0:
            raise ValueError("datalist is empty: no image to train on")
        self.datalist = [dict(entry) for entry in datalist]
        self.preprocess = preprocess
        self.cache = cache
        self._cached = [self._load(i) for i in range(len(self.datalist))] if cache else None

    def _load(self, index: int) -> dict:
        entry = self.datalist[index]
        try:
            return self.preprocess(dict(entry))
        except DataError:
            raise
        except Exception as err:  # MONAI wraps failures in RuntimeError; surface the file and the root cause
            root = err
            while root.__cause__ is not None:
                root = root.__cause__
            if isinstance(root, DataError):
                raise root from err
            raise DataError(
                f"preprocessing failed for image file {entry.get('image')}: {type(root).__name__}: {root}"
            ) from err

    def __len__(self) -> int:
        return len(self.datalist)

    def __getitem__(self, index: int) -> dict:
        if self._cached is not None:
            return self._cached[index]
        return self._load(index)


class PretrainCropDataset(Dataset):
    """Random crops of cached volumes, addressed by a global ``sample_id``.

    ``sample_id`` belongs to epoch ``e = sample_id // samples_per_epoch``; within an epoch the ids are
    spread over the volumes by a permutation seeded with ``(seed, e)`` so every volume is drawn equally
    often; the crop / flip randomness is seeded with ``(seed, sample_id)``.

    Args:
        volumes: preprocessed volumes (``{"image": [1, D, H, W], "affine": [4, 4], "fg_indices": [P],
            "bg_indices": [Q]}``).
        augment: random MONAI ``Compose`` (e.g. :func:`pretrain_augment`); must return a list of one dict.
        samples_per_epoch: ids per epoch; a multiple of ``len(volumes)`` (default: ``len(volumes)``).
        seed: data seed.

    Returns (``__getitem__``): ``{"image": [1, D, H, W] float32 in [b_min, b_max], "affine": [4, 4] float64
    (the crop's voxel -> world RAS mm map, see :mod:`medgauss.frame`), "sample_id": int, "volume_index": int}``.
    """

    def __init__(
        self, volumes: Dataset, augment, *, samples_per_epoch: int | None = None, seed: int = 41
    ) -> None:
        n = len(volumes)
        samples_per_epoch = n if samples_per_epoch is None else int(samples_per_epoch)
        if samples_per_epoch < n or samples_per_epoch % n:
            raise ValueError(
                f"samples_per_epoch must be a positive multiple of the number of volumes ({n}), "
                f"got {samples_per_epoch}"
            )
        self.volumes, self.augment = volumes, augment
        self.samples_per_epoch, self.seed = samples_per_epoch, int(seed)
        self._epoch_order: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        """Samples per epoch (the sampler is infinite; this is the epoch length)."""
        return self.samples_per_epoch

    def volume_index(self, sample_id: int) -> int:
        """Which volume sample ``sample_id`` is cropped from."""
        epoch, position = divmod(int(sample_id), self.samples_per_epoch)
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._epoch_order = (epoch, rng.permutation(self.samples_per_epoch))
        return int(self._epoch_order[1][position] % len(self.volumes))

    def __getitem__(self, sample_id: int) -> dict:
        if int(sample_id) < 0:
            raise IndexError(f"sample_id must be >= 0, got {sample_id}")
        index = self.volume_index(sample_id)
        volume = self.volumes[index]
        self.augment.set_random_state(seed=sample_seed(self.seed, sample_id))
        keys = ("image", "affine", "fg_indices", "bg_indices")
        crops = self.augment({key: volume[key] for key in keys})
        crop = crops[0] if isinstance(crops, list) else crops
        return {
            "image": torch.as_tensor(crop["image"]),
            "affine": torch.as_tensor(crop["affine"], dtype=torch.float64),
            "sample_id": int(sample_id),
            "volume_index": index,
        }


class ShardedSampleSampler(Sampler[int]):
    """Infinite stream of sample ids for one rank: ``rank + world_size * k`` for ``k = start, start+1, ...``.

    Args:
        rank, world_size: this process and the number of processes.
        start: samples this rank has already consumed (resume position).
    """

    def __init__(self, rank: int = 0, world_size: int = 1, start: int = 0) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.rank, self.world_size, self.start = rank, world_size, start

    def __iter__(self) -> Iterator[int]:
        k = self.start
        while True:
            yield self.rank + self.world_size * k
            k += 1


def build_pretrain_dataset(
    datalist: Sequence[dict[str, str]],
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
    pos: float = 3.0,
    neg: float = 1.0,
    flip_prob: float = 0.5,
    rot90_prob: float = 0.3,
    scale_intensity: float = 0.1,
    shift_intensity: float = 0.1,
    intensity_prob: float = 0.1,
    samples_per_volume: int = 64,
    cache: bool = True,
    seed: int = 41,
) -> PretrainCropDataset:
    """The standard pretraining dataset: :func:`pretrain_preprocess` (cached) + :func:`pretrain_augment`.

    Arguments are those of the two pipeline halves (see their docs) plus ``samples_per_volume`` (crops
    per volume per epoch), ``cache`` and the data ``seed``. Labels (all entries or none) define the
    positive crop centres; without labels the body mask does.
    """
    if len(datalist) == 0:
        raise ValueError("datalist is empty: no image to train on")
    if samples_per_volume < 1:
        raise ValueError(f"samples_per_volume must be >= 1, got {samples_per_volume}")
    labelled = [("label" in entry) for entry in datalist]
    if any(labelled) and not all(labelled):
        missing = next(e["image"] for e, has in zip(datalist, labelled) if not has)
        raise ValueError(
            f"{sum(labelled)} of {len(datalist)} datalist entries have a label; all or none must "
            f"(first without: {missing}); drop labels with use_labels=False when building the datalist"
        )
    has_labels = all(labelled)
    entries = [dict(e) for e in datalist]
    preprocess = pretrain_preprocess(
        spatial_size=spatial_size,
        pixdim=pixdim,
        a_min=a_min,
        a_max=a_max,
        b_min=b_min,
        b_max=b_max,
        clip=clip,
        foreground_threshold=foreground_threshold,
        foreground_margin=foreground_margin,
        has_labels=has_labels,
    )
    augment = pretrain_augment(
        spatial_size=spatial_size,
        pos=pos,
        neg=neg,
        foreground_threshold=foreground_threshold,
        flip_prob=flip_prob,
        rot90_prob=rot90_prob,
        scale_intensity=scale_intensity,
        shift_intensity=shift_intensity,
        intensity_prob=intensity_prob,
        b_min=b_min,
        b_max=b_max,
    )
    volumes = CachedVolumeDataset(entries, preprocess, cache=cache)
    return PretrainCropDataset(
        volumes, augment, samples_per_epoch=samples_per_volume * len(entries), seed=seed
    )
