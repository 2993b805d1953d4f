"""Pretraining data at scale: volumes sharded over ranks, the on-disk cache (hits, invalidation, atomic
writes), crops equal to direct preprocessing, DataLoader workers, and bad files named."""

from __future__ import annotations

import multiprocessing
import os
import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import medgauss.data.dataset as dataset_module
from medgauss.data import (
    CachedVolumeDataset,
    DataError,
    PretrainCropDataset,
    SampleSchedule,
    ShardedSampleSampler,
    build_pretrain_dataset,
    pretrain_augment,
    pretrain_preprocess,
)
from medgauss.data.volume_cache import write_entry

SMALL = {"spatial_size": 8, "samples_per_volume": 2, "seed": 3}


def _save(path: Path, array: np.ndarray) -> str:
    nib.save(nib.Nifti1Image(array, np.diag([1.5, 1.5, 1.5, 1.0])), path)
    return str(path)


def _volumes(folder: Path, n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` labelled 20^3 CTs of random soft-tissue HU (every voxel is body, a labelled cube inside)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for k in range(n):
        hu = rng.integers(-100, 300, size=(20, 20, 20)).astype(np.int16)
        label = np.zeros(hu.shape, dtype=np.uint8)
        label[6:14, 5:15, 7:13] = 1
        entries.append(
            {"image": _save(folder / f"ct{k}.nii.gz", hu), "label": _save(folder / f"lab{k}.nii.gz", label)}
        )
    return entries


class _Counting:
    """Wraps a preprocess ``Compose``, recording the image file of every call."""

    def __init__(self, inner, calls: list[str]) -> None:
        self.inner, self.calls = inner, calls

    def __call__(self, data: dict) -> dict:
        self.calls.append(Path(data["image"]).name)
        return self.inner(data)


@pytest.fixture
def preprocess_calls(monkeypatch) -> list[str]:
    """Image file names passed to ``pretrain_preprocess``'s pipeline, in call order (this process only)."""
    calls: list[str] = []
    real = dataset_module.pretrain_preprocess
    monkeypatch.setattr(dataset_module, "pretrain_preprocess", lambda **kw: _Counting(real(**kw), calls))
    return calls


# ------------------------------------------------------------------------------------------- schedule
@pytest.mark.parametrize(
    "n,world_size,spv", [(6, 2, 3), (7, 3, 4), (1, 2, 5), (1, 2, 1), (2, 3, 3), (3, 4, 1), (10, 4, 1), (5, 1, 2)]
)
def test_schedule_shards_volumes_disjointly_and_draws_each_equally_often(n, world_size, spv):
    sched = SampleSchedule(n, spv * n, world_size=world_size, seed=11)
    own = [set(sched.own_volumes(r)) for r in range(world_size)]
    shared = set(sched.shared_volumes())
    for a in range(world_size):
        for b in range(a + 1, world_size):
            assert not own[a] & own[b]
        assert not own[a] & shared
        assert set(sched.rank_volumes(a)) == own[a] | shared
    assert set().union(*own) | shared == set(range(n))
    assert len(shared) == n % world_size  # ranks share only the remainder (< W volumes)
    spe = spv * n
    for epoch in range(3):
        drawn = [sched.volume_index(s) for s in range(epoch * spe, (epoch + 1) * spe)]
        assert np.bincount(drawn, minlength=n).tolist() == [spv] * n  # every volume spv times per epoch
        for s, v in zip(range(epoch * spe, (epoch + 1) * spe), drawn):
            assert v in sched.rank_volumes(s % world_size)
            for other in range(world_size):
                if other != s % world_size:
                    assert v not in own[other]
    # a pure function of the id: a fresh schedule queried in another order (a resumed run) agrees
    ids = list(range(4 * spe))
    fresh = SampleSchedule(n, spe, world_size=world_size, seed=11)
    assert [fresh.volume_index(s) for s in reversed(ids)] == [sched.volume_index(s) for s in reversed(ids)]
    assert [SampleSchedule(n, spe, world_size=world_size, seed=12).volume_index(s) for s in ids] != [
        sched.volume_index(s) for s in ids
    ] or n == 1


def test_single_process_schedule_is_the_unsharded_permutation():
    """One rank: volume = (permutation of the epoch's ids seeded with (seed, epoch))[position] mod N."""
    n, spv, seed = 5, 3, 7
    sched = SampleSchedule(n, spv * n, seed=seed)
    for s in range(4 * spv * n):
        epoch, position = divmod(s, spv * n)
        expected = np.random.default_rng([seed, epoch]).permutation(spv * n)[position] % n
        assert sched.volume_index(s) == expected


def test_schedule_and_sampler_reject_bad_arguments():
    with pytest.raises(ValueError, match="multiple of the number of volumes"):
        SampleSchedule(4, 6)
    with pytest.raises(ValueError, match="world_size"):
        SampleSchedule(4, 4, world_size=0)
    with pytest.raises(ValueError, match="rank"):
        SampleSchedule(4, 4, world_size=2).own_volumes(2)
    with pytest.raises(IndexError, match="sample_id"):
        SampleSchedule(4, 4).volume_index(-1)


# ------------------------------------------------------------------------------------------- ranks
def test_each_rank_preprocesses_only_its_shard_and_draws_the_same_crops(tmp_path, preprocess_calls):
    datalist = _volumes(tmp_path / "data", 5)
    names = [Path(e["image"]).name for e in datalist]
    per_rank = {}
    for rank in (0, 1):
        preprocess_calls.clear()
        per_rank[rank] = build_pretrain_dataset(datalist, rank=rank, world_size=2, cache="memory", **SMALL)
        # 5 = 2 * 2 + 1: rank r owns volumes r and r + 2; volume 4 is shared
        assert sorted(preprocess_calls) == sorted(names[i] for i in (rank, rank + 2, 4))
    # Sharding the volumes does not change any sample: the same id from a dataset holding every volume.
    preprocess = pretrain_preprocess(spatial_size=8, has_labels=True)
    everything = CachedVolumeDataset(datalist, preprocess)
    for rank, ds in per_rank.items():
        full = PretrainCropDataset(
            everything, pretrain_augment(spatial_size=8), samples_per_epoch=10, seed=3, rank=rank, world_size=2
        )
        for sample_id in range(rank, 40, 2):
            mine, ref = ds[sample_id], full[sample_id]
            assert mine["volume_index"] == ref["volume_index"] in ds.schedule.rank_volumes(rank)
            assert torch.equal(mine["image"], ref["image"]) and torch.equal(mine["affine"], ref["affine"])
    with pytest.raises(ValueError, match="belongs to rank 1 of 2"):
        per_rank[0][1]
    with pytest.raises(ValueError, match="not in this dataset's shard"):
        per_rank[0].volumes[1]
    with pytest.raises(ValueError, match=r"cannot read 2 volume\(s\) that rank 1 of 2 draws \(first: 1\)"):
        PretrainCropDataset(per_rank[0].volumes, pretrain_augment(spatial_size=8), rank=1, world_size=2)
    assert per_rank[1].sampler(start=3).start == 3 and next(iter(per_rank[1].sampler())) == 1


def test_rank_defaults_to_the_torch_distributed_group(tmp_path, monkeypatch):
    datalist = _volumes(tmp_path / "data", 3)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    ds = build_pretrain_dataset(datalist, **SMALL)
    assert (ds.rank, ds.world_size) == (1, 2) and ds.volumes.indices == (1, 2)
    with pytest.raises(ValueError, match="both rank and world_size"):
        build_pretrain_dataset(datalist, rank=0, **SMALL)


# ------------------------------------------------------------------------------------------- disk cache
def test_disk_cache_is_hit_by_a_second_build(tmp_path, preprocess_calls):
    datalist = _volumes(tmp_path / "data", 3)
    cache = tmp_path / "cache"
    first = build_pretrain_dataset(datalist, cache_dir=cache, validate=True, **SMALL)  # auto -> disk
    assert first.volumes.cache == "disk" and len(preprocess_calls) == 3
    second = build_pretrain_dataset(datalist, cache_dir=cache, validate=True, **SMALL)
    crops = [second[i] for i in range(12)]
    assert len(preprocess_calls) == 3  # nothing preprocessed again: every volume came from the cache
    for i, crop in enumerate(crops):
        assert torch.equal(crop["image"], first[i]["image"])
    assert len([p for p in cache.iterdir()]) == 3  # one folder per volume, no temporary leftovers
    lazy = build_pretrain_dataset(datalist, cache_dir=tmp_path / "lazy", **SMALL)
    assert len(preprocess_calls) == 3 and not any((tmp_path / "lazy").iterdir())  # lazy: nothing yet
    lazy[0], lazy[1]
    assert len(preprocess_calls) == 3 + len({lazy.volume_index(0), lazy.volume_index(1)})


def test_disk_cache_is_invalidated_by_a_setting_or_a_file_change(tmp_path, preprocess_calls):
    datalist = _volumes(tmp_path / "data", 3)
    cache = tmp_path / "cache"
    build_pretrain_dataset(datalist, cache_dir=cache, validate=True, **SMALL)
    assert len(preprocess_calls) == 3
    build_pretrain_dataset(datalist, cache_dir=cache, validate=True, a_max=300.0, **SMALL)
    assert len(preprocess_calls) == 6  # another HU window: every volume again
    build_pretrain_dataset(datalist, cache_dir=cache, validate=True, flip_prob=0.0, **SMALL)
    assert len(preprocess_calls) == 6  # augmentation settings do not touch the cached volumes
    # Rewrite one file with other values (and a later modification time): only it is preprocessed again.
    new_hu = np.full((20, 20, 20), 125, dtype=np.int16)
    _save(Path(datalist[1]["image"]), new_hu)
    stat = os.stat(datalist[1]["image"])
    os.utime(datalist[1]["image"], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    preprocess_calls.clear()
    ds = build_pretrain_dataset(datalist, cache_dir=cache, validate=True, **SMALL)
    assert preprocess_calls == ["ct1.nii.gz"]
    np.testing.assert_allclose(ds.volumes[1]["image"].numpy(), (125 + 175) / 425, atol=1e-6)
    # A file changed after the dataset was built is refused rather than cached under a stale key.
    lazy = build_pretrain_dataset(datalist, cache_dir=tmp_path / "other", **SMALL)
    _save(Path(datalist[2]["image"]), new_hu[:, :, :18])
    with pytest.raises(DataError, match="ct2.nii.gz changed while this dataset was in use"):
        lazy.volumes[2]


def test_cached_volumes_and_crops_equal_direct_preprocessing(tmp_path):
    datalist = _volumes(tmp_path / "data", 2)
    kw = {**SMALL, "intensity_prob": 1.0}
    direct = build_pretrain_dataset(datalist, cache="none", **kw)
    memory = build_pretrain_dataset(datalist, cache="memory", **kw)
    cold = build_pretrain_dataset(datalist, cache="disk", cache_dir=tmp_path / "c", **kw)
    warm = build_pretrain_dataset(datalist, cache="disk", cache_dir=tmp_path / "c", **kw)
    for i in range(16):
        ref = direct[i]
        for ds in (memory, cold, warm):
            crop = ds[i]
            assert torch.equal(crop["image"], ref["image"]) and torch.equal(crop["affine"], ref["affine"])
            assert crop["affine"].dtype == torch.float64 and crop["volume_index"] == ref["volume_index"]
    reference = pretrain_preprocess(spatial_size=8, has_labels=True)(dict(datalist[1]))
    stored = warm.volumes[1]
    for key in ("image", "affine", "fg_indices", "bg_indices"):
        expected = torch.as_tensor(reference[key])
        assert stored[key].dtype == expected.dtype and torch.equal(stored[key], expected.as_subclass(torch.Tensor))
    files = sorted(p.name for p in warm.volumes.entry_path(1).iterdir())
    assert {"image.npy", "affine.npy", "fg_indices.npy", "bg_indices.npy", "meta.json"} <= set(files)


def test_lazy_disk_cache_feeds_dataloader_workers(tmp_path):
    datalist = _volumes(tmp_path / "data", 4)
    ds = build_pretrain_dataset(datalist, cache_dir=tmp_path / "cache", rank=1, world_size=2, **SMALL)
    memory = build_pretrain_dataset(datalist, cache="memory", rank=1, world_size=2, **SMALL)
    # Workers receive file names, not volumes: the in-memory dataset's pickle carries this rank's volumes,
    # the on-disk one's stays the same size after the volumes have been read (and cached).
    held = [memory.volumes[i] for i in memory.volumes.indices]
    held_bytes = sum(v.numel() * v.element_size() for vol in held for v in vol.values() if torch.is_tensor(v))
    before = len(pickle.dumps(ds))
    assert len(pickle.dumps(memory)) - before > 0.9 * held_bytes
    loader = DataLoader(ds, batch_size=2, sampler=ShardedSampleSampler(1, 2, start=5), num_workers=2)
    batches = iter(loader)
    got = [next(batches) for _ in range(4)]
    del batches
    ids = [int(i) for b in got for i in b["sample_id"]]
    assert ids == list(range(11, 27, 2))
    reference = build_pretrain_dataset(datalist, cache="none", rank=1, world_size=2, **SMALL)
    images = torch.cat([b["image"] for b in got])
    assert torch.equal(images, torch.stack([reference[i]["image"] for i in ids]))
    assert torch.equal(torch.cat([b["affine"] for b in got]), torch.stack([reference[i]["affine"] for i in ids]))
    assert torch.equal(images, torch.stack([ds[i]["image"] for i in ids]))  # now read here too
    assert len(pickle.dumps(ds)) < before + 0.1 * held_bytes
    entries = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(entries) == len({ds.volume_index(i) for i in ids}) and not any(".tmp" in e for e in entries)


def _fill_entry(args: tuple[list[dict[str, str]], str]) -> str:
    datalist, cache_dir = args
    volumes = CachedVolumeDataset(
        datalist, pretrain_preprocess(spatial_size=8), cache="disk", cache_dir=cache_dir, settings={"s": 8}
    )
    return str(volumes.entry_path(0)) if float(volumes[0]["image"].sum()) > 0 else ""


def test_racing_writers_leave_one_complete_entry(tmp_path):
    datalist = _volumes(tmp_path / "data", 1)
    cache = tmp_path / "cache"
    with multiprocessing.get_context("fork").Pool(3) as pool:
        folders = pool.map(_fill_entry, [(datalist, str(cache))] * 6)
    assert len(set(folders)) == 1 and folders[0]
    assert [p.name for p in cache.iterdir()] == [Path(folders[0]).name]  # no temporary folder left
    # The loser of a race discards its copy and reports it; the installed entry is untouched.
    entry = Path(folders[0])
    before = (entry / "image.npy").stat().st_mtime_ns
    volume = pretrain_preprocess(spatial_size=8)(dict(datalist[0]))
    assert write_entry(entry, volume, {}) is False
    assert (entry / "image.npy").stat().st_mtime_ns == before and len(list(cache.iterdir())) == 1


def test_bad_files_are_named_when_first_read_or_at_start_up(tmp_path):
    datalist = _volumes(tmp_path / "data", 2)
    corrupt = tmp_path / "data" / "corrupt.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b definitely not a nifti")
    bad = [datalist[0], {"image": str(corrupt), "label": datalist[1]["label"]}]
    lazy = build_pretrain_dataset(bad, cache_dir=tmp_path / "cache", samples_per_volume=1, spatial_size=8)
    lazy.volumes[0]
    with pytest.raises(DataError, match="corrupt.nii.gz"):
        lazy.volumes[1]
    with pytest.raises(DataError, match="corrupt.nii.gz"):
        build_pretrain_dataset(bad, cache_dir=tmp_path / "cache", validate=True, spatial_size=8)
    with pytest.raises(DataError, match="corrupt.nii.gz"):
        build_pretrain_dataset(bad, cache="none", validate=True, spatial_size=8)
    gone = [{"image": str(tmp_path / "gone.nii.gz")}]
    with pytest.raises(DataError, match="gone.nii.gz"):
        build_pretrain_dataset(gone, cache_dir=tmp_path / "cache", spatial_size=8)
    # A damaged cache entry is reported with its folder and its source file.
    entry = lazy.volumes.entry_path(0)
    (entry / "image.npy").write_bytes(b"\x93NUMPY broken")
    with pytest.raises(DataError, match=rf"cache entry .*{entry.name}.*ct0.nii.gz.*delete the folder"):
        lazy.volumes[0]


def test_cache_arguments_are_checked(tmp_path):
    datalist = _volumes(tmp_path / "data", 1)
    preprocess = pretrain_preprocess(spatial_size=8)
    with pytest.raises(ValueError, match="cache must be one of"):
        build_pretrain_dataset(datalist, cache="ram", spatial_size=8)
    with pytest.raises(ValueError, match="needs cache_dir"):
        CachedVolumeDataset(datalist, preprocess, cache="disk", settings={})
    with pytest.raises(ValueError, match="needs settings"):
        CachedVolumeDataset(datalist, preprocess, cache="disk", cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="indices must lie"):
        CachedVolumeDataset(datalist, preprocess, indices=[1])
