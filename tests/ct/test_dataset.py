"""CTReconstructionDataset: validation at construction, scanner affines, and batching with collate_cases."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from medgauss.ct import CTReconstructionDataset, collate_cases, load_case
from medgauss.ct.prepare import PrepareConfig, prepare_dataset

CONFIG = PrepareConfig(fov_mm=60.0, grid=8, num_views=4, det_size=8, dso=200.0, dsd=300.0, photons=None)
# the inputs' affines: different spacings and origins, one LPS-oriented
AFFINES = (
    np.diag([4.0, 4.0, 4.5, 1.0]),
    np.array([[-3.0, 0, 0, 40.0], [0, -3.5, 0, -12.0], [0, 0, 5.0, 7.0], [0, 0, 0, 1]]),
    np.array([[4.0, 0, 0, -5.0], [0, 4.0, 0, 3.0], [0, 0, 4.0, 250.0], [0, 0, 0, 1]]),
)
SHAPE = (14, 15, 13)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("recon")
    gen = np.random.default_rng(1)
    images = []
    for i, affine in enumerate(AFFINES):
        path = root / f"img{i}.nii.gz"
        nib.save(nib.Nifti1Image(gen.uniform(-1000, 1500, size=SHAPE).astype(np.float32), affine), str(path))
        images.append(path)
    prepare_dataset(images, root / "out", CONFIG, progress=False)
    return root / "out"


def copy_of(prepared, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(prepared, out)
    return out


def test_items_carry_the_scanner_affine(prepared):
    ds = CTReconstructionDataset(prepared)
    for i, affine in enumerate(AFFINES):
        item = ds[i]
        assert item["affine"].dtype == torch.float64 and item["affine"].shape == (4, 4)
        # written out from the contract: 7.5 mm voxels along (z, y, x), grid centre at the image centre
        centre = affine @ np.array([(n - 1) / 2 for n in SHAPE] + [1.0])
        expected = np.zeros((4, 4))
        expected[0, 2] = expected[1, 1] = expected[2, 0] = 7.5
        expected[:3, 3] = centre[:3] - 3.5 * 7.5
        expected[3, 3] = 1.0
        np.testing.assert_allclose(item["affine"].numpy(), expected, atol=1e-9)
        torch.testing.assert_close(load_case(prepared / item["case_id"])["affine"], item["affine"])


def test_dataloader_batches_cases_with_collate_cases(prepared):
    ds = CTReconstructionDataset(prepared, num_views=2)
    loader = DataLoader(ds, batch_size=2, shuffle=False, num_workers=0, collate_fn=collate_cases)
    batches = list(loader)
    assert [len(b["case_id"]) for b in batches] == [2, 1]
    batch = batches[0]
    assert batch["volume"].shape == (2, 1, 8, 8, 8) and batch["projections"].shape == (2, 2, 8, 8)
    assert batch["affine"].shape == (2, 4, 4) and batch["volume_affine"].shape == (2, 4, 4)
    assert batch["projection_matrices"].shape == (2, 2, 3, 4)
    assert batch["source_positions"].shape == (2, 2, 3) and batch["vectors"].shape == (2, 2, 12)
    assert batch["angles"].shape == (2, 2) and len(batch["geometry"]) == 2 and len(batch["meta"]) == 2
    for b in range(2):
        item = ds[b]
        geo = item["geometry"]
        assert batch["case_id"][b] == item["case_id"] and batch["geometry"][b] == geo
        torch.testing.assert_close(batch["volume"][b], item["volume"], rtol=0, atol=0)
        torch.testing.assert_close(batch["projections"][b], item["projections"], rtol=0, atol=0)
        torch.testing.assert_close(batch["affine"][b], item["affine"], rtol=0, atol=0)
        torch.testing.assert_close(batch["volume_affine"][b], geo.volume_affine, rtol=0, atol=0)
        torch.testing.assert_close(batch["projection_matrices"][b], geo.projection_matrices(), rtol=0, atol=0)
        torch.testing.assert_close(batch["source_positions"][b], geo.source_positions(), rtol=0, atol=0)
        torch.testing.assert_close(batch["vectors"][b], geo.vectors(), rtol=0, atol=0)
        torch.testing.assert_close(batch["angles"][b], geo.angles, rtol=0, atol=0)
        assert batch["meta"][b]["case_id"] == item["case_id"]
    # independent of the geometry code: 2 of 4 views over 360 degrees are angles 0 and pi; the source sits
    # dso = 200 mm along (cos, sin, 0)
    torch.testing.assert_close(batch["angles"][0], torch.tensor([0.0, np.pi], dtype=torch.float64))
    torch.testing.assert_close(
        batch["source_positions"][1], torch.tensor([[200.0, 0, 0], [-200.0, 0, 0]], dtype=torch.float64)
    )


def test_collate_refuses_cases_that_do_not_stack(prepared):
    two, three = CTReconstructionDataset(prepared, num_views=2), CTReconstructionDataset(prepared, num_views=3)
    with pytest.raises(ValueError, match=r"different view counts \(img0: 2, img1: 3\)"):
        collate_cases([two[0], three[1]])
    item = two[1]
    coarse = dict(item, geometry=item["geometry"].downsampled(2), projections=item["projections"][:, ::2, ::2])
    with pytest.raises(ValueError, match=r"different detector shapes .*img0: \(8, 8\), img1: \(4, 4\)"):
        collate_cases([two[0], coarse])
    small = dict(item, geometry=item["geometry"].replace(vol_shape=(4, 4, 4)), volume=item["volume"][:, :4, :4, :4])
    with pytest.raises(ValueError, match=r"different volume shapes .*img0: \(8, 8, 8\), img1: \(4, 4, 4\)"):
        collate_cases([two[0], small])
    with pytest.raises(ValueError, match="at least one item"):
        collate_cases([])


def test_construction_validates_every_case(prepared, tmp_path):
    with pytest.raises(ValueError, match=r"num_views=5 exceeds the 4 views of case 'img0' \(.*geometry\.json\)"):
        CTReconstructionDataset(prepared, num_views=5)
    with pytest.raises(ValueError, match="num_views must be a positive int"):
        CTReconstructionDataset(prepared, num_views=0)
    root = copy_of(prepared, tmp_path)
    (root / "img2" / "meta.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"case 'img2' is not finished: .*img2/meta\.json"):
        CTReconstructionDataset(root)
    assert len(CTReconstructionDataset(root, cases=["img0", "img1"])) == 2
    shutil.rmtree(root / "img2")
    with pytest.raises(FileNotFoundError, match=r"case 'img2' listed in .*dataset\.json has no folder"):
        CTReconstructionDataset(root)
    (root / "img1" / "geometry.json").write_text("{broken")
    with pytest.raises(ValueError, match=r"img1/geometry\.json"):
        CTReconstructionDataset(root, cases=["img0", "img1"])


def test_datasets_without_a_recorded_frame_are_refused(prepared, tmp_path):
    root = copy_of(prepared, tmp_path)
    meta_path = root / "img0" / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["affine"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"img0/meta\.json records no scanner 'affine'"):
        CTReconstructionDataset(root)
    index = json.loads((root / "dataset.json").read_text())
    index["version"] = 1
    (root / "dataset.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="format version 1"):
        CTReconstructionDataset(root)
