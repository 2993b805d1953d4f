"""Registration data: synthetic pairs (pure function of (seed, id), bounded smooth displacement, moving label =
brute-force nearest lookup, identity when undeformed), the bundled CT's held-out region, and pair lists of NIfTI
files (exact identity resampling, errors naming the missing file / the mismatched grids)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medgauss.data.registration import PairListDataset, SyntheticRegistrationPairs, synthetic_registration_pairs
from medgauss.data.transforms import DataError
from medgauss.frame import grid_affine, save_nifti


def _volumes():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 1, 6, 7, 8, generator=g)
    image = torch.nn.functional.interpolate(image, size=(24, 28, 30), mode="trilinear")[0]
    label = torch.zeros(1, 24, 28, 30, dtype=torch.long)
    label[0, 4:14, 5:20, 6:18] = 1
    label[0, 12:22, 10:25, 15:28] = 2
    return [{"image": image, "label": label}]


def test_items_are_a_pure_function_of_seed_and_id():
    a = SyntheticRegistrationPairs(_volumes(), crop_size=16, seed=3, max_displacement=3.0)
    b = SyntheticRegistrationPairs(_volumes(), crop_size=16, seed=3, max_displacement=3.0)
    x, y = a[5], b[5]
    assert x.keys() == y.keys()
    assert all(torch.equal(x[k], y[k]) for k in ("fixed", "moving", "fixed_label", "moving_label", "displacement"))
    assert not torch.equal(a[6]["moving"], x["moving"])
    assert not torch.equal(SyntheticRegistrationPairs(_volumes(), crop_size=16, seed=4, max_displacement=3.0)[5][
        "displacement"], x["displacement"])
    assert x["fixed"].shape == x["moving"].shape == (1, 16, 16, 16) and x["fixed_label"].dtype == torch.long
    assert float(x["displacement"].abs().max()) <= 3.0 + 1e-6 and float(x["displacement"].abs().max()) > 0.5
    assert 0.0 <= float(x["moving"].min()) and float(x["moving"].max()) <= 1.0


def test_fixed_is_the_crop_and_moving_label_is_the_nearest_lookup():
    vols = _volumes()
    ds = SyntheticRegistrationPairs(vols, crop_size=16, seed=1, max_displacement=4.0)
    label = vols[0]["label"][0].numpy()
    image = vols[0]["image"][0].numpy()
    for i in range(3):
        item = ds[i]
        s = item["crop_start"].numpy()
        assert np.array_equal(item["fixed"][0].numpy(), image[s[0]:s[0] + 16, s[1]:s[1] + 16, s[2]:s[2] + 16])
        assert np.array_equal(item["fixed_label"][0].numpy(), label[s[0]:s[0] + 16, s[1]:s[1] + 16, s[2]:s[2] + 16])
        grid = np.stack(np.meshgrid(*[np.arange(16)] * 3, indexing="ij"))
        pos = grid + s[:, None, None, None] + item["displacement"].numpy().astype(np.float64)
        idx = np.rint(pos).astype(int)
        inside = np.all((idx >= 0) & (idx < np.array(label.shape)[:, None, None, None]), axis=0)
        brute = np.zeros((16, 16, 16), dtype=np.int64)
        brute[inside] = label[idx[0][inside], idx[1][inside], idx[2][inside]]
        frac_ties = np.mean(np.any(np.abs(pos - np.floor(pos) - 0.5) < 1e-4, axis=0))
        agree = np.mean(brute == item["moving_label"][0].numpy())
        assert agree >= 1.0 - frac_ties - 1e-3


def test_without_deformation_and_intensity_change_moving_is_fixed():
    ds = SyntheticRegistrationPairs(_volumes(), crop_size=16, seed=2, max_displacement=0.0, gamma=(1, 1),
                                    scale=(1, 1), shift=(0, 0))
    item = ds[0]
    torch.testing.assert_close(item["moving"], item["fixed"], rtol=0, atol=1e-6)
    assert torch.equal(item["moving_label"], item["fixed_label"])


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="crop_size"):
        SyntheticRegistrationPairs(_volumes(), crop_size=1)
    with pytest.raises(ValueError, match="gamma"):
        SyntheticRegistrationPairs(_volumes(), crop_size=16, gamma=(1.5, 1.0))
    with pytest.raises(ValueError, match="volumes"):
        SyntheticRegistrationPairs([], crop_size=16)


def test_bundled_ct_heldout_region_pairs():
    ds = synthetic_registration_pairs(crop_size=16, region=(0.55, 1.0), seed=0, max_displacement=3.0)
    assert ds.class_names[0] == "background" and len(ds.class_names) == 7
    item = ds[0]
    assert item["fixed"].shape == (1, 16, 16, 16)
    assert int(item["fixed_label"].max()) <= 6 and bool((item["fixed_label"] > 0).any())  # centred on a structure


def _write_pair(tmp_path, shape=(10, 12, 14), spacing=(2.0, 1.5, 1.0), moving_affine=None, label_shape=None):
    rng = np.random.default_rng(0)
    affine = grid_affine(shape, spacing)
    fixed = rng.uniform(-1200, 1200, size=shape).astype(np.float32)
    moving = rng.uniform(-1200, 1200, size=shape).astype(np.float32)
    label = rng.integers(0, 3, size=label_shape or shape).astype(np.int16)
    paths = {k: tmp_path / f"{k}.nii.gz" for k in ("fixed", "moving", "fixed_label", "moving_label")}
    save_nifti(paths["fixed"], fixed, affine)
    save_nifti(paths["moving"], moving, affine if moving_affine is None else moving_affine)
    save_nifti(paths["fixed_label"], label, affine)
    save_nifti(paths["moving_label"], label[::-1].copy() if label_shape is None else label, affine)
    return {k: str(v) for k, v in paths.items()}, fixed, label


def test_pair_list_identity_resampling_is_exact(tmp_path):
    entry, fixed, label = _write_pair(tmp_path, shape=(10, 10, 10), spacing=(1.5, 1.5, 1.5))
    (tmp_path / "pairs.json").write_text(json.dumps([entry]))
    ds = PairListDataset(tmp_path / "pairs.json", size=10, pixdim=1.5, a_min=-1000, a_max=1000,
                         require_labels=True, num_classes=3)
    item = ds[3]  # ids wrap around the pairs
    assert item["pair_index"] == 0 and item["sample_id"] == 3 and item["has_labels"]
    expected = np.clip((fixed + 1000) / 2000, 0, 1)
    np.testing.assert_allclose(item["fixed"][0].numpy(), expected, rtol=0, atol=1e-5)
    assert np.array_equal(item["fixed_label"][0].numpy(), label)
    other = PairListDataset([entry], size=8, pixdim=3.0)  # coarser and smaller: still the model size
    assert other[0]["moving"].shape == (1, 8, 8, 8)


def test_pair_list_errors_name_the_file_and_entry(tmp_path):
    entry, _, _ = _write_pair(tmp_path)
    missing = {**entry, "moving": str(tmp_path / "nope.nii.gz")}
    (tmp_path / "pairs.json").write_text(json.dumps([entry, missing]))
    with pytest.raises(FileNotFoundError, match=r"entry 1: moving file not found: .*nope\.nii\.gz"):
        PairListDataset(tmp_path / "pairs.json", size=8)
    with pytest.raises(DataError, match="lacks"):
        PairListDataset([{"fixed": entry["fixed"], "moving": entry["moving"]}], size=8, require_labels=True)
    bad_dir = tmp_path / "b"
    bad_dir.mkdir()
    shifted = grid_affine((10, 12, 14), (2.0, 1.5, 1.0), centre=(5.0, 0.0, 0.0))
    entry2, _, _ = _write_pair(bad_dir, moving_affine=shifted)
    with pytest.raises(DataError, match="fixed .* and moving .* different affines"):
        PairListDataset([entry2], size=8)[0]
    bad_label = tmp_path / "c"
    bad_label.mkdir()
    entry3, _, _ = _write_pair(bad_label, label_shape=(10, 12, 13))
    with pytest.raises(DataError, match="label file .*fixed_label.* different shapes"):
        PairListDataset([entry3], size=8)[0]
    with pytest.raises(DataError, match=r"outside \[0, 1\]"):
        PairListDataset([entry], size=8, num_classes=2)[0]
