"""Labelled volumes, segmentation crops and label budgets, Dice and the intensity baseline, grid resampling."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric

from medgauss.data import DataError
from medgauss.data.labelled import (
    BUNDLED_CLASS_GROUPS,
    class_lookup,
    class_names_for,
    load_labelled_volumes,
    read_structures,
)
from medgauss.data.segmentation import SegmentationCropDataset, labelled_subset
from medgauss.engines.segmentation import IntensityBaseline, foreground_dice
from medgauss.frame import resample_to_grid
from medgauss.metrics import dice_per_class

AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])  # RAS, 2 mm


def write(path, array, affine=AFFINE):
    nib.save(nib.Nifti1Image(np.asarray(array), affine), str(path))
    return str(path)


def synthetic_case(tmp_path, name="case", shape=(20, 18, 16), seed=0):
    """A CT (HU) with two labelled boxes: label 3 (bright, 400 HU) and label 7 (dark, -800 HU) in soft tissue."""
    rng = np.random.default_rng(seed)
    ct = np.full(shape, 40.0) + rng.normal(0, 5, shape)
    label = np.zeros(shape, np.int16)
    label[2:8, 3:9, 4:10], ct[2:8, 3:9, 4:10] = 3, 400.0
    label[10:16, 8:14, 2:8], ct[10:16, 8:14, 2:8] = 7, -800.0
    return {"image": write(tmp_path / f"{name}_ct.nii.gz", ct.astype(np.float32)),
            "label": write(tmp_path / f"{name}_lab.nii.gz", label)}


def test_bundled_groups_are_known_structures_and_disjoint():
    structures = read_structures()
    lut = class_lookup(BUNDLED_CLASS_GROUPS, structures)
    for index, (name, members) in enumerate(BUNDLED_CLASS_GROUPS.items(), start=1):
        for member in members:
            assert lut[structures[member]] == index, (name, member)
    assert (lut > 0).sum() == sum(len(m) for m in BUNDLED_CLASS_GROUPS.values())
    assert class_names_for(BUNDLED_CLASS_GROUPS, None) == ["background", *BUNDLED_CLASS_GROUPS]
    with pytest.raises(ValueError, match="unknown structure"):
        class_lookup({"x": ["no_such_organ"]}, structures)
    with pytest.raises(ValueError, match="in both class"):
        class_lookup({"a": ["heart"], "b": ["heart"]}, structures)


def test_labels_follow_the_image_through_preprocessing(tmp_path):
    """Grouping via a structures table, RAS -> medgauss frame, resampling: label k sits where the image says."""
    entry = synthetic_case(tmp_path)
    table = tmp_path / "structures.csv"
    table.write_text("structure,id\nbone_box,3\nair_box,7\n")
    volume = load_labelled_volumes([entry], classes={"air": ["air_box"], "bone": ["bone_box"]}, structures=table,
                                   pixdim=2.0, a_min=-1000, a_max=1000, foreground_threshold=-1.0)[0]
    image, label = volume["image"][0], volume["label"][0]
    assert image.shape == label.shape and label.dtype == torch.int64
    assert set(label.unique().tolist()) == {0, 1, 2}
    hu = image * 2000.0 - 1000.0
    torch.testing.assert_close(hu[label == 2], torch.full_like(hu[label == 2], 400.0), atol=1e-3, rtol=0)
    torch.testing.assert_close(hu[label == 1], torch.full_like(hu[label == 1], -800.0), atol=1e-3, rtol=0)
    assert int((label == 2).sum()) == 6 * 6 * 6 and int((label == 1).sum()) == 6 * 6 * 6
    # num_classes mode keeps raw values; the affine maps voxel centres to the same world points as the file's
    raw = load_labelled_volumes([entry], num_classes=8, pixdim=2.0, a_min=-1000, a_max=1000,
                                foreground_threshold=-1.0)[0]
    d, h, w = (torch.nonzero(raw["label"][0] == 3)[0]).tolist()
    world = raw["affine"].numpy() @ np.array([d, h, w, 1.0])
    file_index = np.linalg.inv(AFFINE) @ world
    assert nib.load(entry["label"]).get_fdata()[tuple(np.round(file_index[:3]).astype(int))] == 3


def test_label_errors_name_the_file(tmp_path):
    entry = synthetic_case(tmp_path)
    shifted = AFFINE.copy()
    shifted[0, 3] = 5.0
    moved = write(tmp_path / "moved.nii.gz", nib.load(entry["label"]).get_fdata().astype(np.int16), shifted)
    with pytest.raises(DataError, match="moved.nii.gz.*different affines"):
        load_labelled_volumes([{**entry, "label": moved}], num_classes=8)
    small = write(tmp_path / "small.nii.gz", np.zeros((4, 4, 4), np.int16))
    with pytest.raises(DataError, match="small.nii.gz.*different shapes"):
        load_labelled_volumes([{**entry, "label": small}], num_classes=8)
    with pytest.raises(DataError, match="outside \\[0, 4\\]"):
        load_labelled_volumes([entry], num_classes=5)
    empty = write(tmp_path / "empty.nii.gz", np.zeros((20, 18, 16), np.int16))
    with pytest.raises(DataError, match="empty.nii.gz.*empty mask"):
        load_labelled_volumes([{**entry, "label": empty}], num_classes=8)
    with pytest.raises(DataError, match="missing.nii.gz"):
        load_labelled_volumes([{**entry, "image": str(tmp_path / "missing.nii.gz")}], num_classes=8)
    with pytest.raises(ValueError, match="has no 'label'"):
        load_labelled_volumes([{"image": entry["image"]}], num_classes=8)
    with pytest.raises(ValueError, match="exactly one"):
        load_labelled_volumes([entry])


def volumes_for_crops(n=1, shape=(24, 20, 22)):
    """Volumes whose image encodes each voxel's flat index, so a crop reveals where it came from."""
    out = []
    for v in range(n):
        index = torch.arange(math.prod(shape), dtype=torch.float32).reshape(1, *shape)
        label = torch.zeros(1, *shape, dtype=torch.int64)
        label[0, 5:9, 4:8, 10:14] = 1 + v % 2
        out.append({"image": index + 1e6 * v, "label": label})
    return out


def test_crops_are_pure_functions_of_the_sample_id_and_match_the_volume():
    volumes = volumes_for_crops()
    ds = SegmentationCropDataset(volumes, 8, pool_size=20, flip_prob=0.0, rot90_prob=0.0, seed=3)
    a, b = ds[7], ds[7]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    flat = int(a["image"][0, 0, 0, 0])
    d, rest = divmod(flat, 20 * 22)
    h, w = divmod(rest, 22)
    torch.testing.assert_close(a["image"], volumes[0]["image"][:, d:d + 8, h:h + 8, w:w + 8])
    assert torch.equal(a["label"], volumes[0]["label"][:, d:d + 8, h:h + 8, w:w + 8])
    flipped = SegmentationCropDataset(volumes, 8, pool_size=20, flip_prob=1.0, rot90_prob=0.0, seed=3)[7]
    assert torch.equal(flipped["label"], b["label"].flip(1, 2, 3))  # image and label flipped alike
    assert torch.equal(flipped["image"], b["image"].flip(1, 2, 3))
    with pytest.raises(ValueError, match="rank"):
        SegmentationCropDataset(volumes, 8, rank=1, world_size=2)[2]


def test_label_fraction_keeps_nested_subsets_of_the_pool():
    volumes = volumes_for_crops()
    pools = {f: SegmentationCropDataset(volumes, 8, label_fraction=f, pool_size=100, seed=5).pool
             for f in (0.01, 0.1, 1.0)}
    assert [len(pools[f]) for f in (0.01, 0.1, 1.0)] == [1, 10, 100]
    assert pools[1.0][:10] == pools[0.1] and pools[0.1][:1] == pools[0.01]
    ds = SegmentationCropDataset(volumes, 8, label_fraction=0.1, pool_size=100, seed=5, flip_prob=0.0,
                                 rot90_prob=0.0)
    starts = {tuple(s) for _, s in ds.pool}
    for i in range(30):  # every training sample is one of the 10 labelled crops
        flat = int(ds[i]["image"][0, 0, 0, 0])
        d, rest = divmod(flat, 20 * 22)
        assert (d, *divmod(rest, 22)) in starts
    images, labels = ds.labelled_data()
    assert len(images) == len(labels) == 10 and images[0].shape == (1, 8, 8, 8)
    assert ds.num_labelled == "10 of 100 pool crops"


def test_label_fraction_of_cases_with_many_cases():
    assert labelled_subset(5, 0.1, seed=0) is None  # too few cases: a share of the crop pool
    kept = labelled_subset(30, 0.1, seed=0)
    assert len(kept) == 3 and kept == labelled_subset(30, 0.1, seed=0) and kept != labelled_subset(30, 0.1, seed=1)
    volumes = volumes_for_crops(30)
    ds = SegmentationCropDataset(volumes, 8, label_fraction=0.1, seed=0, flip_prob=0.0, rot90_prob=0.0)
    assert ds.pool is None and ds.num_labelled == "3 of 30 cases"
    used = {int(ds[i]["image"][0, 0, 0, 0] // 1e6) for i in range(40)}
    assert used == set(kept)
    with pytest.raises(ValueError, match="label_fraction"):
        labelled_subset(30, 0.0, seed=0)


def test_foreground_dice_skips_background_and_marks_absent_classes():
    rng = np.random.default_rng(0)
    truth = torch.as_tensor(rng.integers(0, 4, (6, 7, 8)))
    pred = torch.as_tensor(rng.integers(0, 3, (6, 7, 8)))  # never predicts class 3
    scores = foreground_dice(pred, truth, 5)
    for k in (1, 2, 3):
        t, p = truth.numpy() == k, pred.numpy() == k
        assert scores[k - 1] == pytest.approx(2 * (t & p).sum() / (t.sum() + p.sum()))
    assert scores[2] == 0.0 and math.isnan(scores[3])  # class 3 missed; class 4 in neither map
    assert foreground_dice(truth, truth, 5)[:3] == [1.0, 1.0, 1.0]


def test_dice_is_monai_dice_metric():
    """medgauss.metrics.dice_per_class (exact counts) against MONAI's DiceMetric on one-hot maps."""
    rng = np.random.default_rng(4)
    pred = torch.as_tensor(rng.integers(0, 5, (2, 1, 7, 6, 5)))
    truth = torch.as_tensor(rng.integers(0, 5, (2, 1, 7, 6, 5)))
    one_hot = lambda x: torch.nn.functional.one_hot(x[:, 0], 5).permute(0, 4, 1, 2, 3).double()
    reference = DiceMetric(include_background=True, reduction="none", ignore_empty=False)(one_hot(pred),
                                                                                             one_hot(truth))
    torch.testing.assert_close(dice_per_class(pred, truth, 5), reference.double(), rtol=0, atol=1e-12)


def test_intensity_baseline_is_a_histogram_classifier():
    image = torch.cat([torch.full((1, 4, 4, 4), 0.1), torch.full((1, 4, 4, 4), 0.9)], dim=1)
    label = torch.cat([torch.zeros(1, 4, 4, 4, dtype=torch.long), torch.full((1, 4, 4, 4), 2)], dim=1)
    baseline = IntensityBaseline([image], [label], 3, bins=10)
    assert torch.equal(baseline(image), label)
    assert torch.equal(baseline(torch.tensor([0.95, 0.12, 0.5])), torch.tensor([2, 0, 0]))  # empty bin: background


def test_resample_to_grid_against_float64_brute_force():
    rng = np.random.default_rng(1)
    source = torch.as_tensor(rng.normal(size=(2, 5, 6, 7)), dtype=torch.float32)
    affine = np.array([[0, 0, 1.5, -3], [0, 1.2, 0, 2], [0.8, 0, 0, 1], [0, 0, 0, 1.0]])  # medgauss frame
    target = np.array([[-0.7, 0, 0, 4], [0, 0, 0.9, -1], [0, 0.5, 0, 2.5], [0, 0, 0, 1.0]])  # LPS-ish, permuted
    shape = (6, 4, 5)
    out = resample_to_grid(source, affine, target, shape, chunk=2)
    src = source.double().numpy()
    expected = np.zeros((2, *shape))
    for v in np.ndindex(*shape):
        p = np.linalg.inv(affine) @ target @ np.array([*v, 1.0])
        if np.any(p[:3] < 0) or np.any(p[:3] > np.array(src.shape[1:]) - 1):
            continue  # outside: zero
        lo = np.floor(p[:3]).astype(int)
        frac = p[:3] - lo
        for corner in np.ndindex(2, 2, 2):
            idx = np.minimum(lo + corner, np.array(src.shape[1:]) - 1)
            weight = np.prod(np.where(corner, frac, 1 - frac))
            expected[(slice(None), *v)] += weight * src[(slice(None), *idx)]
    inside = np.abs(expected).sum(0) > 0
    assert inside.sum() > 20
    np.testing.assert_allclose(out.numpy()[:, inside], expected[:, inside], atol=1e-5)
    same = resample_to_grid(source, affine, affine, source.shape[1:])
    torch.testing.assert_close(same, source, atol=1e-5, rtol=0)
