"""The one volume frame (medgauss.frame): any NIfTI orientation and spacing enters it in one place, and a
world point stays the same world point through the pretraining pipeline (crops, flips, rotations), through a
Gaussian placed at it in normalised crop coordinates, through the CT geometry (Gaussian X-ray projection and
voxel forward projection see it at the same detector pixel), and through a prepared reconstruction case."""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medgauss import frame
from medgauss.ct import forward_project
from medgauss.data.transforms import pretrain_augment, pretrain_preprocess
from medgauss.gaussians import Gaussians, gaussians_to_world
from medgauss.geometry import ConeBeamGeometry
from medgauss.render import project

# An LPS-stored CT (first axis towards the patient's Left, second Posterior, third Superior) with
# anisotropic voxels and an origin away from zero, as DICOM converters often write.
LPS_SHAPE = (70, 60, 24)
LPS_SPACING = (0.9, 1.1, 2.5)
LPS_AFFINE = np.array([[-0.9, 0, 0, 40.0], [0, -1.1, 0, 25.0], [0, 0, 2.5, -60.0], [0, 0, 0, 1]])
MARK_INDEX = (30, 22, 11)  # voxel of the stored array holding the marked point
MARK_WORLD = (LPS_AFFINE @ [*MARK_INDEX, 1.0])[:3]


def _write_marked_ct(folder: Path) -> dict[str, str]:
    """Soft-tissue body (-175 HU: 0 after the pretraining window) with a bright 3-voxel cube at the mark."""
    hu = np.full(LPS_SHAPE, -175.0, dtype=np.float32)
    i, j, k = MARK_INDEX
    hu[i - 1 : i + 2, j - 1 : j + 2, k - 1 : k + 2] = 250.0
    label = np.zeros(LPS_SHAPE, dtype=np.uint8)
    label[i - 1 : i + 2, j - 1 : j + 2, k - 1 : k + 2] = 1  # positive crop centres: the mark only
    nib.save(nib.Nifti1Image(hu, LPS_AFFINE), folder / "ct.nii.gz")
    nib.save(nib.Nifti1Image(label, LPS_AFFINE), folder / "label.nii.gz")
    return {"image": str(folder / "ct.nii.gz"), "label": str(folder / "label.nii.gz")}


def _peak(volume: np.ndarray) -> np.ndarray:
    """Centroid (continuous voxel index) of the brightest voxels."""
    vol = np.asarray(volume, dtype=np.float64)
    idx = np.argwhere(vol >= 0.75 * vol.max())
    return (idx * vol[tuple(idx.T)][:, None]).sum(0) / vol[tuple(idx.T)].sum()


def test_to_canonical_reorients_without_moving_any_voxel():
    rng = np.random.default_rng(0)
    arr = rng.random(LPS_SHAPE)
    out, aff = frame.to_canonical(arr, LPS_AFFINE)
    assert frame.is_canonical(aff) and nib.aff2axcodes(aff) == frame.AXCODES
    assert out.shape == (24, 60, 70)  # (z, y, x)
    for ijk in ((0, 0, 0), (69, 59, 23), MARK_INDEX, (5, 40, 17)):
        world = LPS_AFFINE @ [*ijk, 1.0]
        dhw = np.rint(frame.world_to_voxel(world[:3], aff)).astype(int)
        assert out[tuple(dhw)] == arr[ijk]
        np.testing.assert_allclose(frame.voxel_to_world(dhw, aff), world[:3], atol=1e-9)


def test_load_and_save_nifti_round_trip(tmp_path):
    arr = np.random.default_rng(1).random(LPS_SHAPE).astype(np.float32)
    nib.save(nib.Nifti1Image(arr, LPS_AFFINE), tmp_path / "lps.nii.gz")
    vol, aff = frame.load_nifti(tmp_path / "lps.nii.gz")
    expected, expected_aff = frame.to_canonical(arr, LPS_AFFINE)
    np.testing.assert_array_equal(vol, expected)
    np.testing.assert_allclose(aff, expected_aff)
    frame.save_nifti(tmp_path / "out.nii.gz", vol, aff)
    img = nib.load(tmp_path / "out.nii.gz")
    np.testing.assert_allclose(img.affine, aff, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(img.dataobj), vol)


def test_bad_nifti_inputs_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="gone.nii.gz"):
        frame.load_nifti(tmp_path / "gone.nii.gz")
    (tmp_path / "junk.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(ValueError, match="junk.nii.gz"):
        frame.load_nifti(tmp_path / "junk.nii.gz")
    arr = np.zeros((8, 8, 8), dtype=np.float32)
    arr[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(arr, np.eye(4)), tmp_path / "nan.nii.gz")
    with pytest.raises(ValueError, match="nan.nii.gz holds 1 non-finite voxel"):
        frame.load_nifti(tmp_path / "nan.nii.gz")
    with pytest.raises(ValueError, match="not an axis-aligned grid"):
        frame.grid_placement(LPS_AFFINE, LPS_SHAPE)


def test_grid_affine_matches_the_geometry_and_grid_placement_inverts_it():
    geo = ConeBeamGeometry(dso=500.0, dsd=800.0, det_shape=(4, 4), det_spacing=(1.0, 1.0), vol_shape=(6, 8, 10),
                           vol_spacing=(2.5, 1.0, 0.8), vol_offset=(3.0, -2.0, 5.0), angles=[0.0])
    aff = frame.grid_affine((6, 8, 10), (2.5, 1.0, 0.8), centre=(5.0, -2.0, 3.0))
    np.testing.assert_allclose(aff, geo.volume_affine.numpy(), atol=1e-12)
    spacing, centre = frame.grid_placement(aff, (6, 8, 10))
    assert spacing == pytest.approx((2.5, 1.0, 0.8)) and centre == pytest.approx((5.0, -2.0, 3.0))


def _same_pixel_in_projections(volume: np.ndarray, affine: np.ndarray, world_point: np.ndarray) -> None:
    """``project`` of a small Gaussian at ``world_point`` and ``forward_project`` of ``volume`` (placed by its
    affine) peak at the same detector pixel in every view, and that pixel is where the point projects.

    The isocentre is placed 4 mm off the volume's centre (the geometry's world is the volume's world shifted
    by the isocentre, as in prepared cases), so the volume sits off-centre in the field of view."""
    spacing, centre = frame.grid_placement(affine, volume.shape)
    iso = np.asarray(centre) + np.array([4.0, -3.0, 2.0])
    world_point = np.asarray(world_point) - iso
    affine = affine.copy()
    affine[:3, 3] -= iso
    offset = np.asarray(centre) - iso
    geo = ConeBeamGeometry(dso=400.0, dsd=600.0, det_shape=(48, 56), det_spacing=(1.5, 1.5),
                           vol_shape=volume.shape, vol_spacing=spacing, vol_offset=tuple(offset[::-1]),
                           angles=torch.tensor([0.0, 0.7, 2.0, 4.1]))
    np.testing.assert_allclose(geo.volume_affine.numpy(), affine, atol=1e-9)
    g = Gaussians(torch.tensor(world_point, dtype=torch.float64).reshape(1, 1, 3),
                  torch.full((1, 1, 3), 1.5, dtype=torch.float64),
                  torch.tensor([[[1.0, 0, 0, 0]]], dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64))
    xg = project(g, geo, backend="torch")[0]
    xv = forward_project(torch.as_tensor(np.ascontiguousarray(volume), dtype=torch.float32)[None, None], geo)[0]
    mats = geo.projection_matrices().numpy()
    for view in range(geo.num_views):
        pix_g, pix_v = _peak(xg[view].numpy()), _peak(xv[view].numpy())  # (row, col) centroids of the spots
        col, row, w = mats[view] @ [*world_point, 1.0]
        np.testing.assert_allclose(pix_g, [row / w, col / w], atol=0.3, err_msg=f"view {view}")
        np.testing.assert_allclose(pix_v, pix_g, atol=1.0, err_msg=f"view {view}")


def test_a_world_point_survives_pretraining_crops_gaussians_and_projection(tmp_path):
    entry = _write_marked_ct(tmp_path)
    pre = pretrain_preprocess(spatial_size=24, pixdim=1.5, foreground_threshold=-1.0)
    volume = pre(entry)
    # 1. the preprocessed volume (reoriented to (z, y, x), resampled to 1.5 mm) shows the mark at its world point
    np.testing.assert_allclose(frame.voxel_to_world(_peak(volume["image"][0]), volume["affine"].numpy()),
                               MARK_WORLD, atol=1.0)
    aug = pretrain_augment(spatial_size=24, pos=1, neg=0, flip_prob=0.5, rot90_prob=0.7, intensity_prob=0.0)
    keys = ("image", "affine", "fg_indices", "bg_indices")
    flipped_or_rotated = 0
    for seed in range(6):
        aug.set_random_state(seed=seed)
        crop = aug({k: volume[k] for k in keys})[0]
        image, affine = crop["image"][0].numpy(), crop["affine"].numpy()
        flipped_or_rotated += not frame.is_canonical(affine)
        # 2. a Gaussian placed at the mark in normalised crop coordinates lands at the world point
        peak = _peak(image)
        n = np.array(image.shape)
        g = Gaussians(torch.tensor((peak + 0.5) / n, dtype=torch.float64).reshape(1, 1, 3),
                      torch.full((1, 1, 3), 0.02, dtype=torch.float64),
                      torch.tensor([[[1.0, 0, 0, 0]]], dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64))
        g_world = gaussians_to_world(g, image.shape, affine=affine)
        np.testing.assert_allclose(g_world.means[0, 0].numpy(), MARK_WORLD, atol=1.0)
        # 3. X-ray projection of that Gaussian and of the (canonicalised) crop agree on the detector
        canon, canon_affine = frame.to_canonical(image, affine)
        _same_pixel_in_projections(canon, canon_affine, g_world.means[0, 0].numpy())
    assert flipped_or_rotated >= 2  # the augmentation really moved the axes in some crops


def test_a_world_point_survives_ct_preparation(tmp_path):
    from medgauss.ct.dataset import load_case
    from medgauss.ct.prepare import PrepareConfig, prepare_dataset

    entry = _write_marked_ct(tmp_path)
    cfg = PrepareConfig(fov_mm=96.0, grid=48, num_views=4, det_size=48, photons=None)
    (case_id,) = prepare_dataset([entry["image"]], tmp_path / "prepared", cfg, progress=False)
    case = load_case(tmp_path / "prepared" / case_id)
    affine = np.asarray(case["affine"], dtype=np.float64)  # volume.npy voxel -> scanner world mm
    volume = np.asarray(case["volume"])
    np.testing.assert_allclose(frame.voxel_to_world(_peak(volume), affine), MARK_WORLD, atol=2.0)
    # the geometry's world is the scanner frame shifted so that the isocentre is the origin
    iso = np.asarray(case["meta"]["isocentre_mm"], dtype=np.float64)
    np.testing.assert_allclose(case["geometry"].volume_affine.numpy()[:3, 3] + iso, affine[:3, 3], atol=1e-6)
    body, mark = (np.array([-175.0, 250.0]) - cfg.hu_min) / (cfg.hu_max - cfg.hu_min)
    _same_pixel_in_projections(np.clip(volume - 0.5 * (body + mark), 0, None), affine, MARK_WORLD)  # the mark alone


@pytest.mark.parametrize("shape", [(24, 60, 70), (9, 10, 11)])
def test_crop_affine_and_world_to_voxel_are_consistent(shape):
    aff = frame.grid_affine(shape, (2.5, 1.1, 0.9), centre=(1.0, 2.0, 3.0))
    sub = frame.crop_affine(aff, (3, 4, 5))
    np.testing.assert_allclose(frame.voxel_to_world([0, 0, 0], sub), frame.voxel_to_world([3, 4, 5], aff))
    np.testing.assert_allclose(frame.world_to_voxel(frame.voxel_to_world([1.5, 2, 7], aff), aff), [1.5, 2, 7])
    assert math.isclose(abs(np.linalg.det(aff[:3, :3])), 2.5 * 1.1 * 0.9)
