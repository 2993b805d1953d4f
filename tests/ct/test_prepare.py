"""Dataset preparation: resampling geometry, end-to-end tiny dataset, resumability, CLI, Dataset reader."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from medgauss.ct import forward_project
from medgauss.ct.dataset import CTReconstructionDataset, load_case
from medgauss.ct.prepare import PrepareConfig, main, prepare_dataset, resample_to_grid
from medgauss.geometry import ConeBeamGeometry

TINY = PrepareConfig(fov_mm=60.0, grid=12, num_views=4, det_size=10, dso=200.0, dsd=300.0, photons=None)


def linear_image(shape, affine, coeffs):
    """HU image whose value is an affine function of the world point (trilinear resampling is exact)."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(np.float64)
    world = idx @ affine[:3, :3].T + affine[:3, 3]
    return (world @ np.asarray(coeffs)).astype(np.float32), world


def test_resample_is_exact_for_linear_images_with_flipped_permuted_affine():
    # LAS-like axis flip, axis permutation and anisotropic spacing
    affine = np.array([[0.0, -1.5, 0.0, 40.0], [2.0, 0.0, 0.0, -30.0], [0.0, 0.0, 2.5, 10.0], [0, 0, 0, 1.0]])
    image, world = linear_image((30, 40, 20), affine, (1.0, -2.0, 3.0))
    centre = world.reshape(-1, 3).min(0) / 2 + world.reshape(-1, 3).max(0) / 2
    geo = ConeBeamGeometry(
        dso=500.0,
        dsd=800.0,
        det_shape=(4, 4),
        det_spacing=(1.0, 1.0),
        vol_shape=(6, 7, 8),
        vol_spacing=(2.0, 1.5, 1.0),
        angles=[0.0],
    )
    out = resample_to_grid(image, affine, geo).double()
    idx = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in (6, 7, 8)], indexing="ij"), -1)
    pts = idx @ geo.volume_affine[:3, :3].T + geo.volume_affine[:3, 3] + torch.as_tensor(centre)
    expected = pts @ torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(out, expected, rtol=0, atol=2e-3)


def write_cases(folder, n=2):
    folder.mkdir()
    gen = np.random.default_rng(0)
    for i in range(n):
        hu = gen.uniform(-1000, 1500, size=(14, 15, 13)).astype(np.float32)
        nib.save(nib.Nifti1Image(hu, np.diag([4.0, 4.0, 4.5, 1.0])), str(folder / f"case{i}.nii.gz"))


def test_prepare_end_to_end_resumable(tmp_path):
    write_cases(tmp_path / "in")
    out = tmp_path / "out"
    ids = main(
        [
            "--folder",
            str(tmp_path / "in"),
            "--out",
            str(out),
            "--fov-mm",
            "60",
            "--grid",
            "12",
            "--views",
            "4",
            "--det-size",
            "10",
            "--dso",
            "200",
            "--dsd",
            "300",
            "--photons",
            "0",
            "--no-progress",
        ]
    )
    assert ids == ["case0", "case1"]
    case = load_case(out / "case0")
    assert case["volume"].shape == (12, 12, 12) and case["projections"].shape == (4, 10, 10)
    assert isinstance(case["volume"], np.memmap)
    vol = np.asarray(case["volume"])
    assert vol.min() >= 0.0 and vol.max() <= 1.0 and vol.max() > 0.3
    # noiseless projections are the line integrals of the stored normalised volume
    expected = forward_project(torch.from_numpy(vol.copy())[None, None], case["geometry"])[0]
    torch.testing.assert_close(torch.from_numpy(np.array(case["projections"])), expected)
    assert case["meta"]["attenuation_scale"] == pytest.approx(TINY.mu_water * 3.0)

    # resumable: finished cases are skipped, leftovers removed, an unfinished case folder redone
    stamp = (out / "case0" / "volume.npy").stat().st_mtime_ns
    (out / ".tmp-case1-dead").mkdir()
    (out / "case1" / "meta.json").unlink()  # as if the case had been interrupted before finishing
    prepare_dataset([tmp_path / "in" / "case0.nii.gz", tmp_path / "in" / "case1.nii.gz"], out, TINY, progress=False)
    assert (out / "case0" / "volume.npy").stat().st_mtime_ns == stamp
    assert (out / "case1" / "meta.json").is_file() and not (out / ".tmp-case1-dead").exists()
    with pytest.raises(ValueError, match="other settings"):
        prepare_dataset([tmp_path / "in" / "case0.nii.gz"], out, PrepareConfig(grid=8), progress=False)

    ds = CTReconstructionDataset(out, num_views=2)
    item = ds[1]
    assert len(ds) == 2 and item["case_id"] == "case1"
    assert item["volume"].shape == (1, 12, 12, 12) and item["projections"].shape == (2, 10, 10)
    assert item["geometry"].num_views == 2
    torch.testing.assert_close(item["geometry"].angles, case["geometry"].angles[[0, 2]])


@pytest.mark.slow  # spawning two worker processes (torch import) takes ~25 s on 2 busy cores
def test_prepare_with_noise_and_two_workers(tmp_path):
    write_cases(tmp_path / "in")
    cfg = PrepareConfig(fov_mm=60.0, grid=8, num_views=3, det_size=8, dso=200.0, dsd=300.0, photons=1e3)
    images = sorted((tmp_path / "in").glob("*.nii.gz"))
    prepare_dataset(images, tmp_path / "out", cfg, workers=2, progress=False)
    index = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert index["cases"] == ["case0", "case1"] and index["settings"]["photons"] == 1e3
    a, b = load_case(tmp_path / "out" / "case0"), load_case(tmp_path / "out" / "case1")
    clean = forward_project(torch.from_numpy(np.array(a["volume"]))[None, None], a["geometry"])[0]
    noisy = torch.from_numpy(np.array(a["projections"]))
    assert not torch.allclose(noisy, clean) and float((noisy - clean).abs().mean()) < 0.5 * float(clean.mean())
    assert a["meta"]["seed"] != b["meta"]["seed"]


def test_missing_and_corrupt_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.nii.gz"):
        prepare_dataset([tmp_path / "nope.nii.gz"], tmp_path / "out", TINY, progress=False)
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a nifti")
    with pytest.raises(ValueError, match="bad.nii.gz"):
        prepare_dataset([bad], tmp_path / "out2", TINY, progress=False)
    with pytest.raises(FileNotFoundError, match="dataset.json"):
        CTReconstructionDataset(tmp_path)
