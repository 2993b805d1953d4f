"""Dataset preparation: resampling geometry, end-to-end tiny dataset, resumability, CLI, Dataset reader."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medgauss.ct import forward_project
from medgauss.ct.dataset import CTReconstructionDataset, load_case
from medgauss.ct.prepare import (
    PrepareConfig,
    case_ids_for,
    main,
    prepare_case,
    prepare_dataset,
    resample_to_grid,
)
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


TINY_ARGS = ["--fov-mm", "60", "--views", "4", "--det-size", "10", "--dso", "200", "--dsd", "300", "--photons", "0"]


def test_rerun_with_other_settings_after_an_interruption_is_refused(tmp_path):
    write_cases(tmp_path / "in", n=3)
    out = tmp_path / "out"
    images = sorted((tmp_path / "in").glob("*.nii.gz"))
    # a run with --grid 12 interrupted after two cases: no dataset.json was written
    for image, case_id in zip(images[:2], ["case0", "case1"]):
        prepare_case(image, out, TINY, case_id)
    assert not (out / "dataset.json").exists()
    for grid in ("8", "12"):
        args = ["--folder", str(tmp_path / "in"), "--out", str(out), "--grid", grid, *TINY_ARGS, "--no-progress"]
        if grid == "8":
            with pytest.raises(ValueError, match=rf"{out}.*grid: 12 recorded, 8 requested"):
                main(args)
            assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["case0", "case1"]
        else:  # the recorded settings resume the run
            assert main(args) == ["case0", "case1", "case2"]
    shapes = {np.load(out / c / "volume.npy", mmap_mode="r").shape for c in ("case0", "case1", "case2")}
    assert shapes == {(12, 12, 12)}
    # a finished dataset whose dataset.json was lost is protected the same way, per case
    (out / "dataset.json").unlink()
    with pytest.raises(ValueError, match=r"other settings \(hu_max: 2000.0 recorded, 1000.0 requested"):
        prepare_dataset(images, out, PrepareConfig(**{**TINY.__dict__, "hu_max": 1000.0}), progress=False)


def test_clashing_names_give_one_case_per_input(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    values = {"a.nii": -500.0, "a.nii.gz": 0.0, "a_1.nii.gz": 700.0}
    for name, hu in values.items():
        image = nib.Nifti1Image(np.full((14, 15, 13), hu, np.float32), np.diag([4.0, 4.0, 4.5, 1.0]))
        nib.save(image, str(folder / name))
    out = tmp_path / "out"
    ids = main(["--folder", str(folder), "--out", str(out), "--grid", "12", *TINY_ARGS, "--no-progress"])
    assert len(set(ids)) == 3
    index = json.loads((out / "dataset.json").read_text())
    assert index["cases"] == ids
    sources = {}
    for case_id in ids:
        case = load_case(out / case_id)
        source = Path(case["meta"]["source"])
        sources[source.name] = case_id
        # the centre voxel holds that input's own HU, normalised over the window [-1000, 2000]
        assert float(case["volume"][6, 6, 6]) == pytest.approx((values[source.name] + 1000) / 3000, abs=1e-6)
    assert sorted(sources) == sorted(values)
    # the ids depend on the set of inputs only, not on their order
    files = [folder / n for n in values]
    assert case_ids_for(files[::-1]) == case_ids_for(files)[::-1]


def test_case_ids_in_nested_folders_and_duplicates(tmp_path):
    paths = [tmp_path / "BDMAP_0001" / "ct.nii.gz", tmp_path / "BDMAP_0002" / "ct.nii.gz", tmp_path / "x.nii.gz"]
    assert case_ids_for(paths) == ["BDMAP_0001__ct", "BDMAP_0002__ct", "x"]
    # a/b.nii and c/b.nii become a__b and c__b; a__b then clashes with a__b.nii.gz: both get a hash
    ids = case_ids_for([tmp_path / "a" / "b.nii", tmp_path / "c" / "b.nii", tmp_path / "a__b.nii.gz"])
    assert ids[1] == "c__b" and ids[0] != ids[2] and ids[0].startswith("a__b-") and ids[2].startswith("a__b-")
    with pytest.raises(ValueError, match="more than once"):
        case_ids_for([tmp_path / "x.nii.gz", tmp_path / "." / "x.nii.gz"])


def test_a_finished_case_from_another_file_is_refused(tmp_path):
    for sub in ("one", "two"):
        write_cases(tmp_path / sub, n=1)
    out = tmp_path / "out"
    prepare_dataset([tmp_path / "one" / "case0.nii.gz"], out, TINY, progress=False)
    with pytest.raises(ValueError, match=r"case 'case0' .* was prepared from .*one.*case0\.nii\.gz, not from"):
        prepare_dataset([tmp_path / "two" / "case0.nii.gz"], out, TINY, progress=False)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_voxels_are_refused_naming_the_file(tmp_path, bad):
    write_cases(tmp_path / "in", n=1)
    hu = np.zeros((14, 15, 13), np.float32)
    hu[3:5, 6:9, 2:4] = bad
    broken = tmp_path / "in" / "broken.nii.gz"
    nib.save(nib.Nifti1Image(hu, np.eye(4)), str(broken))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"broken\.nii\.gz holds 12 non-finite voxel"):
        prepare_dataset([tmp_path / "in" / "case0.nii.gz", broken], out, TINY, progress=False)
    assert not (out / "broken").exists() and not list(out.glob(".tmp-*"))


def test_prepared_case_records_its_scanner_frame(tmp_path):
    # LPS-oriented input (x and y axes reversed), anisotropic voxels, a bright cube off the centre
    spacing = (0.8, 0.8, 2.5)
    affine = np.array(
        [[-spacing[0], 0, 0, 20.0], [0, -spacing[1], 0, 30.0], [0, 0, spacing[2], -100.0], [0, 0, 0, 1]]
    )
    shape = (60, 50, 16)
    hu = np.full(shape, -1000.0, np.float32)
    i0, j0, k0 = 15, 35, 11
    hu[i0 - 2 : i0 + 3, j0 - 2 : j0 + 3, k0 - 1 : k0 + 2] = 1000.0
    world = affine @ np.array([i0, j0, k0, 1.0])  # scanner point of the cube's centre: (8, 2, -72.5)
    centre = affine @ np.array([(n - 1) / 2 for n in shape] + [1.0])  # image centre = isocentre
    (tmp_path / "in").mkdir()
    nib.save(nib.Nifti1Image(hu, affine), str(tmp_path / "in" / "lps.nii.gz"))
    config = PrepareConfig(fov_mm=60.0, grid=24, num_views=4, det_size=24, dso=200.0, dsd=300.0, photons=None)
    prepare_dataset([tmp_path / "in" / "lps.nii.gz"], tmp_path / "out", config, progress=False)
    case = load_case(tmp_path / "out" / "lps")
    frame = case["affine"].numpy()
    np.testing.assert_allclose(case["meta"]["isocentre_mm"], centre[:3], atol=1e-9)
    np.testing.assert_allclose(case["meta"]["affine"], frame)
    # library frame: 2.5 mm voxels, axes (d, h, w) towards (S, A, R)
    np.testing.assert_allclose(frame[:3, :3], [[0, 0, 2.5], [0, 2.5, 0], [2.5, 0, 0]], atol=1e-12)
    vol = np.asarray(case["volume"])
    voxel = np.rint(np.linalg.inv(frame) @ world)[:3].astype(int)
    peak = np.array(np.unravel_index(np.argmax(vol), vol.shape))
    assert np.abs(peak - voxel).max() <= 1, (peak, voxel)
    assert vol[tuple(voxel)] > 0.5 * vol.max()
    # the geometry sees the cube at (scanner point - isocentre): its projections peak at that pixel
    geometry = case["geometry"]
    h = geometry.projection_matrices().numpy() @ np.append(world[:3] - centre[:3], 1.0)
    cols, rows = h[:, 0] / h[:, 2], h[:, 1] / h[:, 2]
    proj = np.asarray(case["projections"])
    for v in range(geometry.num_views):
        r, c = np.unravel_index(np.argmax(proj[v]), proj[v].shape)
        assert abs(r - rows[v]) <= 1 and abs(c - cols[v]) <= 1, (v, r, c, rows[v], cols[v])
