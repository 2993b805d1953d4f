"""Pretraining pipeline: values against an independent numpy reference, crop sampling, determinism,
rank sharding, and clear errors for bad files."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medgauss.data import (
    DataError,
    ShardedSampleSampler,
    build_pretrain_dataset,
    example_ct_datalist,
    pretrain_preprocess,
)

NO_AUG = {"flip_prob": 0.0, "rot90_prob": 0.0, "intensity_prob": 0.0}


def _save(path: Path, array: np.ndarray, spacing=(1.5, 1.5, 1.5), flip_x: bool = False) -> str:
    affine = np.diag([-spacing[0] if flip_x else spacing[0], spacing[1], spacing[2], 1.0])
    nib.save(nib.Nifti1Image(array, affine), path)
    return str(path)


def _window(hu: np.ndarray) -> np.ndarray:
    return np.clip((hu.astype(np.float64) + 175.0) / 425.0, 0.0, 1.0)


def test_preprocess_matches_numpy_reference(tmp_path):
    rng = np.random.default_rng(0)
    hu = np.full((24, 20, 28), -1000, dtype=np.int16)
    hu[3:21, 2:17, 4:26] = rng.integers(-150, 400, size=(18, 15, 22))  # body: all above the window floor
    path = _save(tmp_path / "las.nii.gz", hu, flip_x=True)  # stored LAS: x must be flipped
    out = pretrain_preprocess(spatial_size=8, has_labels=False)({"image": path})
    # medgauss frame: array axes (z, y, x) towards S, A, R; then cropped to the body
    expected = _window(np.flip(hu, axis=0).transpose(2, 1, 0))[4:26, 2:17, 3:21]
    assert tuple(out["image"].shape) == (1, *expected.shape)
    np.testing.assert_allclose(out["image"][0].numpy(), expected, atol=1e-5)
    # the affine travels with the volume: voxel (d, h, w) of the output -> the same world point as the input
    idx_in = np.array([5, 7, 9])  # (i, j, k) of the stored LAS array, inside the body
    world = np.diag([-1.5, 1.5, 1.5]) @ idx_in
    d, h, w = 9 - 4, 7 - 2, (24 - 1 - 5) - 3  # flipped x, transposed, body-cropped
    np.testing.assert_allclose(out["affine"].numpy() @ [d, h, w, 1.0], [*world, 1.0], atol=1e-9)
    assert float(out["image"][0, d, h, w]) == pytest.approx(float(_window(hu[5, 7, 9])), abs=1e-5)


def test_preprocess_resamples_to_target_spacing(tmp_path):
    hu = np.zeros((10, 12, 8), dtype=np.int16)
    path = _save(tmp_path / "coarse.nii.gz", hu, spacing=(3.0, 3.0, 3.0))
    out = pretrain_preprocess(spatial_size=4, has_labels=False)({"image": path})
    assert tuple(out["image"].shape[1:]) == (15, 23, 19)  # (n - 1) * 3 / 1.5 + 1 voxel centres, (z, y, x)
    np.testing.assert_allclose(out["image"].numpy(), 175.0 / 425.0, atol=1e-6)


def _cube_volume(tmp_path: Path) -> list[dict[str, str]]:
    hu = np.zeros((40, 40, 40), dtype=np.int16)  # soft-tissue body filling the volume
    hu[16:24, 16:24, 16:24] = 200
    label = np.zeros_like(hu, dtype=np.uint8)
    label[16:24, 16:24, 16:24] = 1
    return [{"image": _save(tmp_path / "ct.nii.gz", hu), "label": _save(tmp_path / "lab.nii.gz", label)}]


def test_positive_crops_are_centred_on_labels_and_negative_crops_are_not(tmp_path):
    datalist = _cube_volume(tmp_path)
    inside, outside = float(_window(np.array(200))), float(_window(np.array(0)))
    pos_only = build_pretrain_dataset(datalist, spatial_size=16, pos=1, neg=0, samples_per_volume=1, **NO_AUG)
    neg_only = build_pretrain_dataset(datalist, spatial_size=16, pos=0, neg=1, samples_per_volume=1, **NO_AUG)
    for i in range(12):
        assert pos_only[i]["image"].shape == (1, 16, 16, 16)
        assert float(pos_only[i]["image"][0, 8, 8, 8]) == pytest.approx(inside, abs=1e-5)
        assert float(neg_only[i]["image"][0, 8, 8, 8]) == pytest.approx(outside, abs=1e-5)
    # 3:1 default: about three quarters of the crop centres inside the labelled cube.
    mixed = build_pretrain_dataset(datalist, spatial_size=16, samples_per_volume=1, **NO_AUG)
    frac = np.mean([abs(float(mixed[i]["image"][0, 8, 8, 8]) - inside) < 1e-5 for i in range(100)])
    assert 0.6 < frac < 0.9


def test_samples_are_reproducible_distinct_and_in_range(tmp_path):
    datalist = _cube_volume(tmp_path)
    kw = {"spatial_size": 16, "intensity_prob": 1.0, "samples_per_volume": 4, "seed": 7}
    a, b = build_pretrain_dataset(datalist, **kw), build_pretrain_dataset(datalist, **kw)
    for i in (0, 5, 123):
        assert torch.equal(a[i]["image"], b[i]["image"]) and a[i]["sample_id"] == i
    assert not torch.equal(a[0]["image"], a[1]["image"])
    other_seed = build_pretrain_dataset(datalist, **{**kw, "seed": 8})
    assert not torch.equal(a[0]["image"], other_seed[0]["image"])
    images = torch.stack([a[i]["image"] for i in range(16)])
    assert images.dtype == torch.float32 and images.min() >= 0.0 and images.max() <= 1.0


def test_every_volume_is_drawn_equally_often_per_epoch(tmp_path):
    volumes = []
    for k in range(3):
        hu = np.full((20, 20, 20), 10 * k, dtype=np.int16)
        volumes.append({"image": _save(tmp_path / f"v{k}.nii.gz", hu)})
    ds = build_pretrain_dataset(volumes, spatial_size=8, samples_per_volume=4, **NO_AUG)
    for epoch in range(2):
        counts = np.bincount([ds[epoch * 12 + p]["volume_index"] for p in range(12)], minlength=3)
        assert counts.tolist() == [4, 4, 4]
    assert float(ds[0]["image"].mean()) == pytest.approx(float(_window(np.array(10 * ds[0]["volume_index"]))))


def test_sampler_gives_ranks_disjoint_streams_and_resumes_in_place():
    def take(sampler, n):
        it = iter(sampler)
        return [next(it) for _ in range(n)]

    r0, r1 = take(ShardedSampleSampler(0, 2), 50), take(ShardedSampleSampler(1, 2), 50)
    assert not set(r0) & set(r1) and sorted(r0 + r1) == list(range(100))
    assert take(ShardedSampleSampler(1, 2, start=20), 30) == r1[20:]
    with pytest.raises(ValueError, match="rank"):
        ShardedSampleSampler(2, 2)


def test_bad_files_fail_naming_the_file(tmp_path):
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b definitely not a nifti")
    with pytest.raises(DataError, match="corrupt.nii.gz"):
        build_pretrain_dataset([{"image": str(corrupt)}], spatial_size=8)
    with pytest.raises(DataError, match="gone.nii.gz"):
        build_pretrain_dataset([{"image": str(tmp_path / "gone.nii.gz")}], spatial_size=8)
    small = np.full((30, 30, 30), -1000, dtype=np.int16)
    small[10:20, 5:25, 5:25] = 40  # body only 10 voxels along x
    path = _save(tmp_path / "small.nii.gz", small)
    with pytest.raises(
        DataError, match=r"small.nii.gz.*\(20, 20, 10\).*smaller than the crop size \(16, 16, 16\)"
    ):
        build_pretrain_dataset([{"image": path}], spatial_size=16)
    flat = _save(tmp_path / "flat2d.nii.gz", np.zeros((20, 20), dtype=np.int16))
    with pytest.raises(DataError, match="flat2d.nii.gz.*3-D"):
        build_pretrain_dataset([{"image": flat}], spatial_size=8)
    with pytest.raises(ValueError, match="empty"):
        build_pretrain_dataset([], spatial_size=8)


def test_non_finite_voxels_are_rejected_naming_the_file(tmp_path):
    hu = np.full((30, 30, 30), 40.0, dtype=np.float32)
    hu[10:14, 10:14, 10:14] = np.nan
    hu[0, 0, 0] = np.inf
    path = _save(tmp_path / "holes.nii.gz", hu)
    with pytest.raises(DataError, match=r"holes.nii.gz holds 65 non-finite voxel"):
        build_pretrain_dataset([{"image": path}], spatial_size=8)


def test_partially_labelled_datalists_are_rejected(tmp_path):
    datalist = _cube_volume(tmp_path) + [{"image": _cube_volume(tmp_path)[0]["image"]}]
    with pytest.raises(ValueError, match="1 of 2 datalist entries have a label"):
        build_pretrain_dataset(datalist, spatial_size=8)


def test_bundled_ct_gives_96_cubed_crops():
    ds = build_pretrain_dataset(example_ct_datalist(), samples_per_volume=2)
    volume = ds.volumes[0]["image"]
    # 3 mm grid (x, y, z) = (120, 97, 110) -> 1.5 mm voxel centres ((n - 1) * 2 + 1), cropped to the body
    # along y; array axes (z, y, x) in the medgauss frame.
    assert tuple(volume.shape) == (1, 219, 181, 239)
    crop = ds[0]["image"]
    assert crop.shape == (1, 96, 96, 96) and crop.dtype == torch.float32
    assert 0.0 <= float(crop.min()) and float(crop.max()) <= 1.0 and float(crop.std()) > 0.05


def test_regions_split_one_scan_into_disjoint_world_slabs(tmp_path):
    hu = np.full((20, 20, 40), 40, dtype=np.int16)  # RAS file: z is the last stored axis
    hu[:, :, 20:] = 200  # superior half brighter
    path = _save(tmp_path / "ct.nii.gz", hu)
    kw = dict(spatial_size=8, has_labels=False)
    low = pretrain_preprocess(region=(0.0, 0.5), **kw)({"image": path})
    high = pretrain_preprocess(region=(0.5, 1.0), **kw)({"image": path})
    whole = pretrain_preprocess(**kw)({"image": path})
    n = whole["image"].shape[1]  # z after resampling to 1.5 mm
    assert low["image"].shape[1] + high["image"].shape[1] == n  # complementary, no shared voxel
    torch.testing.assert_close(torch.cat([low["image"], high["image"]], dim=1), whole["image"])
    # each part's affine places its voxels where they were in the whole scan
    step = whole["affine"][:3, 0]  # world step of one z voxel
    torch.testing.assert_close(high["affine"][:3, 3], whole["affine"][:3, 3] + low["image"].shape[1] * step)
    assert float(high["image"].mean()) > float(low["image"].mean())


def test_empty_or_too_small_regions_raise(tmp_path):
    path = _save(tmp_path / "ct.nii.gz", np.full((20, 20, 20), 40, dtype=np.int16))
    with pytest.raises(ValueError, match="0 <= start < stop <= 1"):
        build_pretrain_dataset([{"image": path}], spatial_size=8, region=(0.6, 0.6))
    with pytest.raises(ValueError, match="region_axis"):
        build_pretrain_dataset([{"image": path}], spatial_size=8, region=(0.0, 0.5), region_axis=3)
    with pytest.raises(DataError, match=r"ct.nii.gz is \(2, 20, 20\) voxels.*region selection.*\(8, 8, 8\)"):
        build_pretrain_dataset([{"image": path}], spatial_size=8, region=(0.9, 1.0))
