"""build_xgrm_dataset: prepared cases load, train / held-out are disjoint (phantom seeds; CT regions in world mm
through the affines), variants differ, the case transform moves marked world points as recorded, resuming,
and argument errors."""

import json
import math
import shutil

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from medgauss.ct import CTReconstructionDataset, load_case
from medgauss.data import build_xgrm_dataset
from medgauss.frame import grid_affine, save_nifti

TINY = {"fov_mm": 60.0, "grid": 12, "num_views": 8, "det_size": 16}
PHANTOM = {"phantom_shape": (40, 36, 44), "phantom_spacing_mm": 4.0}


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    """The bundled CT, three variants, three phantoms, two held-out phantoms and the held-out CT case."""
    out = tmp_path_factory.mktemp("xgrm") / "ds"
    info = build_xgrm_dataset(out, num_ct_variants=3, num_phantoms=3, heldout_phantoms=2, seed=5, prepare=TINY,
                              **PHANTOM)
    return info, json.loads(info.manifest.read_text())


def content_source_points(case_dir, record, threshold=1e-3):
    """Source-world (x, y, z) mm of every voxel of a prepared case that holds anything but air."""
    case = load_case(case_dir)
    volume = np.asarray(case["volume"])
    idx = np.argwhere(volume > threshold).astype(np.float64)
    scanner = idx @ case["affine"].numpy()[:3, :3].T + case["affine"].numpy()[:3, 3]  # case world
    back = np.linalg.inv(np.asarray(record["transform"]["matrix"]))
    return scanner @ back[:3, :3].T + back[:3, 3], volume.size


def test_cases_load_with_the_reconstruction_dataset(bundled):
    info, manifest = bundled
    train, heldout = CTReconstructionDataset(info.train_dir), CTReconstructionDataset(info.heldout_dir, num_views=4)
    assert len(train) == 6 and len(heldout) == 3
    assert train.case_ids == list(info.train_cases) and heldout.case_ids == list(info.heldout_cases)
    item = train[0]
    assert item["volume"].shape == (1, 12, 12, 12) and item["projections"].shape == (8, 16, 16)
    assert heldout[2]["projections"].shape == (4, 16, 16)
    assert train.settings["grid"] == 12 and train.settings["seed"] == 5  # the noise seed follows seed
    assert manifest["complete"] and manifest["settings"]["seed"] == 5
    assert set(manifest["cases"]) == set(info.train_cases) | set(info.heldout_cases)


def test_train_and_heldout_are_disjoint(bundled):
    info, manifest = bundled
    assert not set(info.train_cases) & set(info.heldout_cases)
    assert not {p.name for p in info.train_dir.iterdir()} & set(info.heldout_cases)  # never in the training folder
    seeds = manifest["phantom_seeds"]
    assert len(seeds["train"]) == 3 and len(seeds["heldout"]) == 2 and not set(seeds["train"]) & set(seeds["heldout"])
    # CT: training content comes from below the boundary, held-out content from above, in the source's world
    boundary = manifest["ct_boundary_z_mm"]
    cases = manifest["cases"]
    train_region, held_region = cases["train_ct_000"]["source_region_z_mm"], cases["heldout_ct_000"][
        "source_region_z_mm"]
    assert train_region[1] < boundary < held_region[0]
    for case_id, record in cases.items():
        if record["kind"] != "ct":
            continue
        points, total = content_source_points(info.root / record["split"] / case_id, record)
        assert len(points) > 0.2 * total  # the check is not vacuous
        if record["split"] == "train":
            assert points[:, 2].max() < boundary, case_id
        else:
            assert points[:, 2].min() > boundary, case_id


def test_variants_differ(bundled):
    info, manifest = bundled
    train = CTReconstructionDataset(info.train_dir)
    volumes = [train[i]["volume"] for i in range(len(train))]
    for i in range(len(volumes)):
        for j in range(i):
            assert (volumes[i] - volumes[j]).abs().max() > 0.05, (train.case_ids[i], train.case_ids[j])
    matrices = [np.asarray(r["transform"]["matrix"]) for r in manifest["cases"].values() if r["split"] == "train"]
    assert all(not np.allclose(a, b) for k, a in enumerate(matrices) for b in matrices[:k])
    held = manifest["cases"]["heldout_ct_000"]["transform"]
    assert np.allclose(np.asarray(held["matrix"]), np.eye(4)) and held["intensity_scale"] == 1.0


# ----------------------------------------------------------------------------------------- marked points

MARKERS_SIGMA_MM = 4.0


def marked_source(path, centre=(10.0, -20.0, 30.0)):
    """A 2 mm air volume (160 x 64 x 64 along z, y, x, centred at ``centre``) holding Gaussian blobs: three in the
    inferior half, three in the superior half, 35-43 mm apart around the middle of each half."""
    shape, spacing = (160, 64, 64), 2.0
    affine = grid_affine(shape, (spacing,) * 3, centre)
    c = np.asarray(centre)
    offsets = [np.array(o) for o in ((-20.0, 0.0, -6.0), (18.0, 16.0, 8.0), (0.0, -20.0, 14.0))]
    markers = [c + (0.0, 0.0, -80.0) + o for o in offsets] + [c + (0.0, 0.0, 81.0) + o for o in offsets]
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(np.float64)
    world = idx @ affine[:3, :3].T + affine[:3, 3]
    hu = np.full(shape, -1000.0)
    for k, m in enumerate(markers):
        hu += (800.0 + 200.0 * k) * np.exp(-((world - m) ** 2).sum(-1) / (2 * MARKERS_SIGMA_MM ** 2))
    save_nifti(path, hu.astype(np.float32), affine)
    return markers


def blob_centroid(volume, index, radius=3.0):
    """Intensity centroid (voxels) of ``volume`` within ``radius`` voxels of ``index`` (a ball, so the window stays
    >= 4.6 sigma away from the other markers)."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in volume.shape], indexing="ij"), axis=-1).astype(np.float64)
    weight = np.where(((grid - index) ** 2).sum(-1) <= radius**2, volume, 0.0)
    return (grid * weight[..., None]).sum((0, 1, 2)) / weight.sum()


def test_case_transform_moves_marked_world_points_as_recorded(tmp_path):
    markers = marked_source(tmp_path / "marked.nii.gz")
    info = build_xgrm_dataset(tmp_path / "ds", num_ct_variants=4, num_phantoms=0, heldout_phantoms=0, seed=2,
                              ct_path=tmp_path / "marked.nii.gz", ct_split=0.5, max_rotation_deg=10.0,
                              flip_prob=0.5, prepare={"fov_mm": 120.0, "grid": 24, "num_views": 4, "det_size": 16})
    manifest = json.loads(info.manifest.read_text())
    flipped = 0
    for case_id, record in manifest["cases"].items():
        t = record["transform"]
        # the recorded matrix is the stated transform: x -> R F (x - c) + c + t, R from extrinsic x-y-z angles
        rf = Rotation.from_euler("xyz", t["rotation_deg"], degrees=True).as_matrix() @ np.diag(
            [-1.0 if f else 1.0 for f in t["flips"]])
        c, shift = np.asarray(t["centre_mm"]), np.asarray(t["translation_mm"])
        matrix = np.asarray(t["matrix"])
        assert np.allclose(matrix[:3, :3], rf) and np.allclose(matrix[:3, 3], c - rf @ c + shift)
        flipped += any(t["flips"])
        case = load_case(info.root / record["split"] / case_id)
        volume, affine = np.asarray(case["volume"]), case["affine"].numpy()
        mine = markers[:3] if record["split"] == "train" else markers[3:]
        for k, p in enumerate(mine):
            moved = matrix[:3, :3] @ p + matrix[:3, 3]  # where the stated transform puts the marker
            index = np.linalg.solve(affine[:3, :3], moved - affine[:3, 3])  # ... as a voxel of volume.npy
            assert np.all(index > 3) and np.all(index < 20), (case_id, k, index)  # window inside the grid
            assert np.abs(blob_centroid(volume, index) - index).max() < 0.1, (case_id, k)  # voxels (5 mm)
    assert flipped  # the seed gives at least one mirrored case


# ----------------------------------------------------------------------------------------- resuming, errors


def test_rerun_is_a_no_op_and_other_settings_are_refused(tmp_path):
    kwargs = dict(num_ct_variants=1, num_phantoms=1, heldout_phantoms=1, heldout_ct=False, prepare=TINY, **PHANTOM)
    first = build_xgrm_dataset(tmp_path / "ds", **kwargs)
    volume = first.train_dir / first.train_cases[0] / "volume.npy"
    stamp = volume.stat().st_mtime_ns
    again = build_xgrm_dataset(tmp_path / "ds", **kwargs)
    assert again == first and volume.stat().st_mtime_ns == stamp
    # an interrupted build (a case and its source missing) is finished with the same, deterministic case
    lost = first.heldout_dir / first.heldout_cases[0]
    arrays = {name: np.load(lost / name) for name in ("volume.npy", "projections.npy")}
    shutil.rmtree(lost)
    (tmp_path / "ds" / "sources" / "heldout" / f"{first.heldout_cases[0]}.nii.gz").unlink()
    assert build_xgrm_dataset(tmp_path / "ds", **kwargs) == first
    for name, array in arrays.items():
        assert np.array_equal(np.load(lost / name), array), name
    with pytest.raises(ValueError, match="seed"):
        build_xgrm_dataset(tmp_path / "ds", **{**kwargs, "seed": 1})
    with pytest.raises(ValueError, match=r"prepare\.grid: 12 recorded, 16 requested"):
        build_xgrm_dataset(tmp_path / "ds", **{**kwargs, "prepare": {**TINY, "grid": 16}})
    assert json.loads(first.manifest.read_text())["settings"]["prepare.grid"] == 12


@pytest.mark.parametrize("kwargs, name", [
    ({"num_ct_variants": -1}, "num_ct_variants"),
    ({"num_phantoms": 1.5}, "num_phantoms"),
    ({"heldout_phantoms": -2}, "heldout_phantoms"),
    ({"num_ct_variants": 0, "num_phantoms": 0}, "num_ct_variants"),
    ({"heldout_phantoms": 0, "heldout_ct": False}, "heldout_phantoms"),
    ({"seed": -1}, "seed"),
    ({"ct_split": 1.0}, "ct_split"),
    ({"ct_split": 0.001}, "ct_split"),
    ({"max_rotation_deg": -1.0}, "max_rotation_deg"),
    ({"max_translation_mm": math.inf}, "max_translation_mm"),
    ({"flip_prob": 1.5}, "flip_prob"),
    ({"intensity_jitter": 1.0}, "intensity_jitter"),
    ({"phantom_shape": (4, 40, 40)}, "phantom_shape"),
    ({"phantom_spacing_mm": 0.0}, "phantom_spacing_mm"),
    ({"prepare": {"gird": 16}}, "gird"),
    ({"prepare": {"grid": 0}}, "grid"),
    ({"workers": 0}, "workers"),
    ({"heldout_ct": "yes"}, "heldout_ct"),
])
def test_bad_arguments_raise_value_errors_naming_them(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=name):
        build_xgrm_dataset(tmp_path / "ds", **{"prepare": TINY, **kwargs})
    assert not (tmp_path / "ds").exists()  # refused before writing anything


def test_missing_ct_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="ct_path"):
        build_xgrm_dataset(tmp_path / "ds", ct_path=tmp_path / "none.nii.gz", prepare=TINY)
