"""CT phantom generator: tissue HU, anatomy layout in the medgauss frame, determinism, dataset writing."""

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


def test_anatomy_is_laid_out_in_the_medgauss_frame(clean_phantom):
    """Array axes (D, H, W) = (z, y, x) towards Superior, Anterior, Right (medgauss.frame)."""
    _, labels, affine = clean_phantom
    centre = lambda name: np.argwhere(labels == PHANTOM_LABELS[name]).mean(0)
    assert centre("lung_right")[2] > centre("lung_left")[2]  # +x = patient right
    assert centre("liver")[2] > centre("spleen")[2]  # liver on the right
    assert centre("vertebra")[1] < centre("heart")[1]  # spine posterior (-y) to the heart
    assert centre("lung_left")[0] > centre("liver")[0] and centre("lung_left")[0] > centre("kidney_left")[0]
    assert nib.aff2axcodes(affine) == ("S", "A", "R")
    np.testing.assert_allclose(affine[:3, :3], [[0, 0, 3.5], [0, 3.5, 0], [3.5, 0, 0]])
    np.testing.assert_allclose(affine @ [47.5, 47.5, 47.5, 1.0], [0, 0, 0, 1], atol=1e-9)  # centred
    # world positions: the right lung has x > 0 and lies above the liver (z)
    world = lambda name: affine[:3, :3] @ centre(name) + affine[:3, 3]
    assert world("lung_right")[0] > 0 > world("lung_left")[0]
    assert world("lung_right")[2] > world("liver")[2]


def test_anisotropic_phantom_shape_and_spacing_follow_d_h_w():
    hu, labels, affine = make_ct_phantom((20, 40, 48), (5.0, 2.0, 1.8), seed=1, noise_hu=0.0)
    assert hu.shape == labels.shape == (20, 40, 48)
    np.testing.assert_allclose(np.abs(affine[:3, :3]).sum(0), [5.0, 2.0, 1.8])  # column a = axis a's step
    np.testing.assert_allclose(affine[2, 0], 5.0)  # axis 0 runs along z


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
