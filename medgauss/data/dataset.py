"""Pretraining datasets: preprocessed volumes (in memory or in an on-disk cache) + reproducible random
crops, sharded per rank.

**Sample ids.** A drawn sample is identified by a global integer ``sample_id`` (0, 1, 2, ... over the
whole run). Rank ``r`` of ``W`` draws the ids ``r, r + W, r + 2W, ...`` (:class:`ShardedSampleSampler`),
so ranks never see the same sample. Everything random about a sample (which volume, which crop, which
flips) is a pure function of ``(seed, W, sample_id)``, so a run resumed at sample ``k`` (with the same
number of processes) sees exactly the samples an uninterrupted run would, whatever the worker count.

**Volumes per rank** (:class:`SampleSchedule`). With ``N`` volumes and ``W`` ranks, write
``N = q W + m`` (``0 <= m < W``). Rank ``r`` owns the volumes ``r, r + W, ..., r + (q - 1) W`` (the
round-robin split of the first ``q W`` volumes, :func:`medgauss.data.shard_datalist`); the last ``m``
volumes are shared by every rank. An epoch is ``samples_per_epoch = s N`` consecutive ids and draws
every volume exactly ``s`` times: each rank crops each of its own volumes ``s`` times, and the
``s m`` draws of the shared volumes are dealt to the ranks so that every rank gets exactly as many
samples as the ids it owns in that epoch. So a rank only ever reads its ``q`` own volumes and at most
``W - 1`` shared ones (none when ``W`` divides ``N``), about ``N / W`` of the dataset.

**Volume storage** (:class:`CachedVolumeDataset`): ``"memory"`` keeps this rank's preprocessed
volumes in RAM (built eagerly, fastest for a handful of volumes such as the bundled CT); ``"disk"``
writes each preprocessed volume once to ``cache_dir`` as ``.npy`` files and memory-maps them on every
access, so memory does not grow with the number of volumes and DataLoader workers receive only file
names; ``"none"`` preprocesses on every access.

**The on-disk cache.** One folder per volume, ``<cache_dir>/<image stem>-<key>/`` holding one ``.npy``
per array (``image`` ``[1, D, H, W]`` float32, ``affine`` ``[4, 4]`` float64, ``fg_indices`` /
``bg_indices`` int64, ...) and ``meta.json`` (the settings and the source files, for people). ``key``
hashes the preprocessing settings, :data:`CACHE_FORMAT`, the medgauss and MONAI versions, and each
source file's resolved path, size and modification time, so changing a setting or a file makes a new
entry (stale ones are never read; delete the folder to reclaim space). A folder is written under a
temporary name and renamed into place, so a present folder is complete; when two processes (ranks,
workers) race on one entry, the first rename wins and the other copy is discarded. The cache may be
shared by runs and ranks (a shared file system, or one cache per node).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from medgauss.data.sampling import SampleSchedule, ShardedSampleSampler, check_rank, distributed_rank
from medgauss.data.transforms import DataError, apply_pipeline, pretrain_augment, pretrain_preprocess, sample_seed
from medgauss.data.volume_cache import CACHE_FORMAT, entry_exists, entry_name, read_entry, source_stat, write_entry

__all__ = ["CACHE_MODES", "CachedVolumeDataset", "PretrainCropDataset", "build_pretrain_dataset", "heldout_crops"]

CACHE_MODES = ("memory", "disk", "none")
_MEMORY_WARN_VOLUMES = 64  # "auto" without cache_dir warns when a rank would hold more volumes in RAM


# ---------------------------------------------------------------------------------------- volumes
class CachedVolumeDataset(Dataset):
    """Deterministically preprocessed volumes, indexed like ``datalist``, of which this process may read
    ``indices``.

    Args:
        datalist: ``[{"image": path, "label": path?}, ...]`` (see :mod:`medgauss.data.datalist`), all volumes
            of the dataset (every rank passes the same list).
        preprocess: deterministic dict transform (e.g. :func:`pretrain_preprocess`); returns a dict of
            arrays (``{"image": [1, D, H, W] float32, "affine": [4, 4] float64, "fg_indices": [P] int64,
            "bg_indices": [Q] int64}`` for :func:`pretrain_preprocess`).
        cache: ``"memory"``: keep the volumes of ``indices`` in RAM, preprocessed in the constructor (a
            bad file fails at start-up); ``"disk"``: the on-disk cache in ``cache_dir`` (module
            docstring), filled on first access or, with ``validate``, in the constructor, and read
            lazily (memory-mapped) on every access; ``"none"``: preprocess on every access.
        cache_dir: folder of the on-disk cache (created if missing); required for ``"disk"``.
        settings: JSON-serialisable description of ``preprocess`` (its arguments); part of the cache key,
            so that changing it invalidates the cache. Required for ``"disk"``.
        indices: datalist positions this process may read (e.g. :meth:`SampleSchedule.rank_volumes`);
            default all. Only these are preprocessed, stat-ed or cached by this process.
        validate: also preprocess (``"none"``, ``"disk"``: fill the missing cache entries of) every
            volume of ``indices`` in the constructor, so a bad file fails before training starts.
            ``"memory"`` always does.

    ``dataset[i]`` is the preprocessed dict of ``datalist[i]``; with ``"disk"`` its arrays are tensors
    backed by copy-on-write memory maps of the cache files (nothing is read until used).

    Raises:
        ValueError: empty datalist, unknown ``cache``, ``"disk"`` without ``cache_dir`` / ``settings``,
            or ``indices`` outside the datalist; :class:`DataError` (a ``ValueError``) naming a bad
            file: at construction for ``"memory"`` or ``validate``, else when the file is first read.
        OSError: a cache entry cannot be written (the message names its folder).
    """

    def __init__(
        self,
        datalist: Sequence[Mapping[str, str]],
        preprocess: Callable[[dict], dict],
        *,
        cache: str = "memory",
        cache_dir: str | os.PathLike | None = None,
        settings: Mapping[str, Any] | None = None,
        indices: Sequence[int] | None = None,
        validate: bool = False,
    ) -> None:
        if len(datalist) == 0:
            raise ValueError("datalist is empty: no image to train on")
        if cache not in CACHE_MODES:
            raise ValueError(f"cache must be one of {CACHE_MODES}, got {cache!r}")
        self.datalist = [dict(entry) for entry in datalist]
        self.preprocess, self.cache = preprocess, cache
        held = range(len(self.datalist)) if indices is None else sorted({int(i) for i in indices})
        if any(not 0 <= i < len(self.datalist) for i in held):
            raise ValueError(f"indices must lie in [0, {len(self.datalist)}), got {list(indices)}")
        self.indices: tuple[int, ...] = tuple(held)
        self._held = frozenset(self.indices)
        self.cache_dir: Path | None = None
        self._entries: dict[int, tuple[str, dict[str, tuple[str, int, int]]]] = {}
        self._memory: dict[int, dict] = {}
        if cache == "disk":
            if cache_dir is None:
                raise ValueError('cache="disk" needs cache_dir (a folder for the preprocessed volumes)')
            if settings is None:
                raise ValueError(
                    'cache="disk" needs settings (the preprocessing arguments), so that changing them '
                    "invalidates the cache"
                )
            try:
                settings_json = json.dumps(dict(settings), sort_keys=True)
            except TypeError as err:
                raise ValueError(f"settings must be JSON-serialisable: {err}") from err
            self.cache_dir = Path(cache_dir)
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            self._settings = json.loads(settings_json)
            for i in self.indices:
                entry = self.datalist[i]
                files = {key: source_stat(entry[key]) for key in sorted(entry)}
                self._entries[i] = (entry_name(entry, files, settings_json), files)
            if validate:
                for i in self.indices:
                    self._ensure_entry(i)
        elif cache == "memory":
            self._memory = {i: self._load(i) for i in self.indices}
        elif validate:
            for i in self.indices:
                self._load(i)

    def _load(self, index: int) -> dict:
        """Preprocess ``datalist[index]``; any failure becomes a :class:`DataError` naming the file."""
        return apply_pipeline(self.preprocess, self.datalist[index])

    def entry_path(self, index: int) -> Path:
        """Folder of ``datalist[index]``'s on-disk cache entry (``"disk"`` only; it may not exist yet)."""
        if self.cache_dir is None:
            raise ValueError(f'entry_path needs cache="disk", this dataset has cache={self.cache!r}')
        self._check_held(index)
        return self.cache_dir / self._entries[index][0]

    def _ensure_entry(self, index: int) -> Path:
        """The cache folder of ``index``, preprocessing and writing it first when missing."""
        folder = self.entry_path(index)
        if entry_exists(folder):
            return folder
        files = self._entries[index][1]
        volume = self._load(index)
        for key, recorded in files.items():  # the key must describe the bytes that were preprocessed
            if source_stat(self.datalist[index][key]) != recorded:
                raise DataError(
                    f"{key} file {self.datalist[index][key]} changed while this dataset was in use "
                    "(size or modification time); build the dataset again"
                )
        meta = {"format": CACHE_FORMAT, "settings": self._settings, "files": files}
        try:
            write_entry(folder, volume, meta)
        except OSError as err:  # full disk, read-only cache folder ...: name the folder, keep the cause
            raise OSError(
                f"cannot write the cache entry {folder} of image file {self.datalist[index]['image']}: {err}"
            ) from err
        return folder

    def _check_held(self, index: int) -> None:
        if not -len(self.datalist) <= index < len(self.datalist):
            raise IndexError(f"volume index {index} out of range for {len(self.datalist)} volumes")
        index %= len(self.datalist)
        if index not in self._held:
            raise ValueError(
                f"volume {index} ({self.datalist[index]['image']}) is not in this dataset's shard "
                f"({len(self.indices)} of {len(self.datalist)} volumes): build the dataset with the rank "
                "and world size of the sampler that draws from it"
            )

    def __len__(self) -> int:
        """Volumes in the datalist (all ranks'); only :attr:`indices` can be read here."""
        return len(self.datalist)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        self._check_held(index)
        index %= len(self.datalist)
        if self.cache == "memory":
            return self._memory[index]
        if self.cache == "disk":
            return read_entry(self._ensure_entry(index), self.datalist[index]["image"])
        return self._load(index)


# ---------------------------------------------------------------------------------------- crops
def _own_storage(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, copied when it is a view into a larger buffer (a cached volume or its memory map):
    sending a view to the main process from a DataLoader worker would move the whole buffer."""
    if not tensor.is_contiguous() or tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        return tensor.contiguous().clone()
    return tensor


class PretrainCropDataset(Dataset):
    """Random crops of preprocessed volumes, addressed by a global ``sample_id``, for one rank.

    Which volume a sample comes from is :meth:`SampleSchedule.volume_index` (every volume drawn equally
    often per epoch; a rank only reads its shard); the crop / flip randomness is seeded with
    ``(seed, sample_id)``.

    Args:
        volumes: preprocessed volumes indexed like the datalist (``{"image": [1, D, H, W], "affine":
            [4, 4], "fg_indices": [P], "bg_indices": [Q]}``), e.g. a :class:`CachedVolumeDataset`; if it
            has ``indices`` (the volumes it can read), they must include this rank's
            :meth:`SampleSchedule.rank_volumes`.
        augment: random MONAI ``Compose`` (e.g. :func:`pretrain_augment`); must return a list of one dict.
        samples_per_epoch: ids per epoch; a multiple of ``len(volumes)`` (default: ``len(volumes)``).
        seed: data seed.
        rank, world_size: the process this dataset serves (it accepts only ids ``rank + world_size k``)
            and the number of processes drawing ids (:class:`ShardedSampleSampler`).

    Returns (``__getitem__``): ``{"image": [1, D, H, W] float32 in [b_min, b_max], "affine": [4, 4] float64
    (the crop's voxel -> world RAS mm map, see :mod:`medgauss.frame`), "sample_id": int, "volume_index": int}``.

    Raises:
        ValueError: bad ``samples_per_epoch`` / ``rank`` / ``world_size``, or ``volumes`` lacks a volume
            of this rank's shard.
    """

    def __init__(
        self,
        volumes: Dataset,
        augment: Callable,
        *,
        samples_per_epoch: int | None = None,
        seed: int = 41,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        check_rank(rank, world_size)
        n = len(volumes)
        self.schedule = SampleSchedule(
            n, n if samples_per_epoch is None else samples_per_epoch, world_size=world_size, seed=seed
        )
        held = getattr(volumes, "indices", None)
        if held is not None:
            missing = sorted(set(self.schedule.rank_volumes(rank)) - set(held))
            if missing:
                raise ValueError(
                    f"volumes cannot read {len(missing)} volume(s) that rank {rank} of {world_size} draws "
                    f"(first: {missing[0]}); build them with indices=SampleSchedule.rank_volumes(rank)"
                )
        self.volumes, self.augment = volumes, augment
        self.samples_per_epoch, self.seed = self.schedule.samples_per_epoch, int(seed)
        self.rank, self.world_size = int(rank), int(world_size)

    def __len__(self) -> int:
        """Samples per epoch over all ranks (the sampler is infinite; this is the epoch length)."""
        return self.samples_per_epoch

    def volume_index(self, sample_id: int) -> int:
        """Which volume sample ``sample_id`` is cropped from."""
        return self.schedule.volume_index(sample_id)

    def __getitem__(self, sample_id: int) -> dict:
        sample_id = int(sample_id)
        if sample_id < 0:
            raise IndexError(f"sample_id must be >= 0, got {sample_id}")
        if sample_id % self.world_size != self.rank:
            raise ValueError(
                f"sample_id {sample_id} belongs to rank {sample_id % self.world_size} of {self.world_size}, "
                f"but this dataset serves rank {self.rank}; use ShardedSampleSampler({self.rank}, "
                f"{self.world_size})"
            )
        index = self.volume_index(sample_id)
        volume = self.volumes[index]
        self.augment.set_random_state(seed=sample_seed(self.seed, sample_id))
        keys = ("image", "affine", "fg_indices", "bg_indices")
        crops = self.augment({key: volume[key] for key in keys})
        crop = crops[0] if isinstance(crops, list) else crops
        return {
            "image": _own_storage(torch.as_tensor(crop["image"])),
            "affine": torch.as_tensor(crop["affine"], dtype=torch.float64),
            "sample_id": sample_id,
            "volume_index": index,
        }

    def sampler(self, start: int = 0) -> ShardedSampleSampler:
        """The sample-id stream of this dataset's rank, from its ``start``-th sample (resume position)."""
        return ShardedSampleSampler(self.rank, self.world_size, start=start)


# ---------------------------------------------------------------------------------------- builder
def _triple(value: float | Sequence[float], cast: type) -> list:
    return [cast(value)] * 3 if isinstance(value, (int, float)) else [cast(v) for v in value]


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
    region: Sequence[float] | None = None,
    region_axis: int = 0,
    pos: float = 3.0,
    neg: float = 1.0,
    flip_prob: float = 0.5,
    rot90_prob: float = 0.3,
    scale_intensity: float = 0.1,
    shift_intensity: float = 0.1,
    intensity_prob: float = 0.1,
    samples_per_volume: int = 64,
    cache: str = "auto",
    cache_dir: str | os.PathLike | None = None,
    validate: bool = False,
    seed: int = 41,
    rank: int | None = None,
    world_size: int | None = None,
) -> PretrainCropDataset:
    """The standard pretraining dataset of one rank: :func:`pretrain_preprocess` (cached) +
    :func:`pretrain_augment`.

    Arguments are those of the two pipeline halves (see their docs) plus:

    Args:
        samples_per_volume: crops per volume per epoch.
        cache: ``"memory"``, ``"disk"`` or ``"none"`` (:class:`CachedVolumeDataset`); ``"auto"``: ``"disk"``
            when ``cache_dir`` is given, else ``"memory"`` (with a warning when this rank would hold more
            than 64 volumes in RAM).
        cache_dir: on-disk cache folder, shared by ranks and runs (keyed on the preprocessing settings
            and the source files' path, size and modification time).
        validate: preprocess (or find in the cache) every volume of this rank's shard now, so a bad file
            fails before training; otherwise ``"disk"`` / ``"none"`` report it when first read.
        seed: data seed.
        rank, world_size: the process this dataset serves and the number of processes; default (both
            ``None``): the initialised ``torch.distributed`` group (Accelerate creates it), else ``0, 1``.
            Only this rank's volumes (:meth:`SampleSchedule.rank_volumes`) are preprocessed and read.

    Labels (all entries or none) define the positive crop centres; without labels the body mask does.
    """
    if len(datalist) == 0:
        raise ValueError("datalist is empty: no image to train on")
    if samples_per_volume < 1:
        raise ValueError(f"samples_per_volume must be >= 1, got {samples_per_volume}")
    if (rank is None) != (world_size is None):
        raise ValueError(f"pass both rank and world_size or neither, got rank={rank}, world_size={world_size}")
    rank, world_size = distributed_rank() if rank is None else (int(rank), int(world_size))
    check_rank(rank, world_size)
    if cache not in ("auto", *CACHE_MODES):
        raise ValueError(f"cache must be one of {('auto', *CACHE_MODES)}, got {cache!r}")
    labelled = [("label" in entry) for entry in datalist]
    if any(labelled) and not all(labelled):
        missing = next(e["image"] for e, has in zip(datalist, labelled) if not has)
        raise ValueError(
            f"{sum(labelled)} of {len(datalist)} datalist entries have a label; all or none must "
            f"(first without: {missing}); drop labels with use_labels=False when building the datalist"
        )
    settings = {
        "spatial_size": _triple(spatial_size, int),
        "pixdim": _triple(pixdim, float),
        "a_min": float(a_min),
        "a_max": float(a_max),
        "b_min": float(b_min),
        "b_max": float(b_max),
        "clip": bool(clip),
        "foreground_threshold": float(foreground_threshold),
        "foreground_margin": int(foreground_margin),
        "has_labels": all(labelled),
        "region": None if region is None else [float(v) for v in region],
        "region_axis": int(region_axis),
    }
    entries = [dict(e) for e in datalist]
    preprocess = pretrain_preprocess(**settings)
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
    samples_per_epoch = samples_per_volume * len(entries)
    held = SampleSchedule(len(entries), samples_per_epoch, world_size=world_size, seed=seed).rank_volumes(rank)
    if cache == "auto":
        cache = "memory" if cache_dir is None else "disk"
        if cache == "memory" and len(held) > _MEMORY_WARN_VOLUMES:
            warnings.warn(
                f"holding {len(held)} preprocessed volumes in memory on rank {rank}; pass cache_dir= for an "
                "on-disk cache read lazily (memory then does not grow with the dataset)",
                stacklevel=2,
            )
    volumes = CachedVolumeDataset(
        entries, preprocess, cache=cache, cache_dir=cache_dir, settings=settings, indices=held, validate=validate
    )
    return PretrainCropDataset(
        volumes, augment, samples_per_epoch=samples_per_epoch, seed=seed, rank=rank, world_size=world_size
    )


def heldout_crops(
    datalist: Sequence[dict[str, str]], *, num_crops: int = 12, seed: int = 123, **dataset_kwargs: Any
) -> dict[str, torch.Tensor]:
    """Fixed evaluation crops: the pretraining pipeline without augmentation, crops fixed by ``seed``.

    Args:
        datalist: held-out volumes (e.g. phantoms with seeds never used for training), or the training
            scan with a held-out ``region`` (``dataset_kwargs["region"]``) that training excludes.
        num_crops: crops to draw (spread over the volumes like an epoch of :func:`build_pretrain_dataset`).
        seed: data seed of the crop positions.
        dataset_kwargs: the training pipeline's :func:`build_pretrain_dataset` arguments (spatial size,
            spacing, HU window, ...); augmentation, caching and sharding arguments are overridden.

    Returns:
        ``{"image": [num_crops, 1, D, H, W] float32, "affine": [num_crops, 4, 4] float64}``.
    """
    if int(num_crops) != num_crops or num_crops < 1:
        raise ValueError(f"num_crops must be a positive int, got {num_crops!r}")
    kwargs = {
        k: v for k, v in dataset_kwargs.items() if k not in ("cache", "cache_dir", "validate", "rank", "world_size")
    }
    kwargs.update(flip_prob=0.0, rot90_prob=0.0, intensity_prob=0.0, seed=seed)
    kwargs["samples_per_volume"] = -(-int(num_crops) // len(datalist))
    dataset = build_pretrain_dataset(datalist, cache="memory", rank=0, world_size=1, **kwargs)
    items = [dataset[i] for i in range(int(num_crops))]
    return {"image": torch.stack([it["image"] for it in items]), "affine": torch.stack([it["affine"] for it in items])}

