"""CT phantom generator: tissue HU, anatomy layout in RAS, determinism, dataset writing."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from medgauss.data import PHANTOM_HU, PHANTOM_LABELS, make_ct_phantom, write_phantom_dataset


@pytest.fixture(scope="module")
def clean_phantom():
    return make_ct_phantom((96, 96, 96), 3.5, seed=2, noise_hu=0.0)


def test_every_structure_has_its_hounsfield_value(clean_phantom):
    hu, labels, _ = clean_phantom
    assert hu.dtype == np.int16 and labels.dtype == np.uint8 and hu.shape == labels.shape == (96, 96, 96)
    for name, value in PHANTOM_LABELS.items():
        region = labels == value
        assert region.sum() > 20, name
        if name == "vertebra":  # cancellous core + cortical shell
            assert set(np.unique(hu[region])) <= {PHANTOM_HU[name], 1000}
        elif name.startswith("lung"):  # parenchyma + sparse vessels
            assert np.median(hu[region]) == PHANTOM_HU[name] and (hu[region] == -300).mean() < 0.05
        else:
            assert set(np.unique(hu[region])) == {PHANTOM_HU[name]}, name
    unlabelled = set(np.unique(hu[labels == 0]))
    assert unlabelled == {PHANTOM_HU["background"], PHANTOM_HU["muscle"], PHANTOM_HU["subcutaneous_fat"]}


def test_anatomy_is_laid_out_in_ras(clean_phantom):
    _, labels, affine = clean_phantom
    centre = lambda name: np.argwhere(labels == PHANTOM_LABELS[name]).mean(0)
    assert centre("lung_right")[0] > centre("lung_left")[0]  # +x = patient right in RAS
    assert centre("liver")[0] > centre("spleen")[0]  # liver on the right
    assert centre("vertebra")[1] < centre("heart")[1]  # spine posterior (-y) to the heart
    assert centre("lung_left")[2] > centre("liver")[2] and centre("lung_left")[2] > centre("kidney_left")[2]
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    np.testing.assert_allclose(affine[:3, :3], np.diag([3.5] * 3))
    np.testing.assert_allclose(affine @ [47.5, 47.5, 47.5, 1.0], [0, 0, 0, 1], atol=1e-9)  # centred


def test_phantoms_are_deterministic_per_seed_and_vary_across_seeds():
    a, la, _ = make_ct_phantom((48, 48, 48), 6.0, seed=5)
    b, lb, _ = make_ct_phantom((48, 48, 48), 6.0, seed=5)
    c, lc, _ = make_ct_phantom((48, 48, 48), 6.0, seed=6)
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    assert not np.array_equal(la, lc)
    noise = a.astype(np.float64) - make_ct_phantom((48, 48, 48), 6.0, seed=5, noise_hu=0.0)[0]
    assert 12.0 < noise[np.abs(noise) < 200].std() < 18.0  # 15 HU noise
    with pytest.raises(ValueError, match="shape"):
        make_ct_phantom((4, 48, 48))


def test_write_phantom_dataset_roundtrips_and_guards_its_folder(tmp_path):
    datalist = write_phantom_dataset(tmp_path, 2, shape=(24, 24, 24), spacing=8.0, seed=1)
    assert len(datalist) == 2
    hu, labels, affine = make_ct_phantom((24, 24, 24), 8.0, seed=2)
    img = nib.load(datalist[1]["image"])
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), hu)
    np.testing.assert_array_equal(np.asanyarray(nib.load(datalist[1]["label"]).dataobj), labels)
    np.testing.assert_allclose(img.affine, affine)
    assert json.loads((tmp_path / "phantoms.json").read_text())["seed"] == 1
    mtime = (tmp_path / "phantom_000_ct.nii.gz").stat().st_mtime_ns
    assert write_phantom_dataset(tmp_path, 2, shape=(24, 24, 24), spacing=8.0, seed=1) == datalist
    assert (tmp_path / "phantom_000_ct.nii.gz").stat().st_mtime_ns == mtime  # reused, not rewritten
    with pytest.raises(ValueError, match="already holds phantoms"):
        write_phantom_dataset(tmp_path, 2, shape=(24, 24, 24), spacing=8.0, seed=9)
