"""Datalists: Decathlon JSON and NIfTI folders; every bad input fails naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medgauss.data import (
    example_ct_datalist,
    example_ct_path,
    load_decathlon_datalist,
    nifti_folder_datalist,
    shard_datalist,
)


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_decathlon_json_resolves_relative_paths_and_keeps_order(tmp_path):
    for name in (
        "imagesTr/a.nii.gz",
        "labelsTr/a.nii.gz",
        "imagesTr/b.nii.gz",
        "labelsTr/b.nii.gz",
        "imagesTs/c.nii.gz",
    ):
        _touch(tmp_path / name)
    content = {
        "training": [
            {"image": "./imagesTr/b.nii.gz", "label": "./labelsTr/b.nii.gz"},
            {"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"},
        ],
        "test": ["./imagesTs/c.nii.gz"],
    }
    (tmp_path / "dataset.json").write_text(json.dumps(content))
    train = load_decathlon_datalist(tmp_path / "dataset.json")
    assert train == [
        {"image": str(tmp_path / "imagesTr/b.nii.gz"), "label": str(tmp_path / "labelsTr/b.nii.gz")},
        {"image": str(tmp_path / "imagesTr/a.nii.gz"), "label": str(tmp_path / "labelsTr/a.nii.gz")},
    ]
    assert load_decathlon_datalist(tmp_path / "dataset.json", use_labels=False)[0] == {
        "image": str(tmp_path / "imagesTr/b.nii.gz")
    }
    assert load_decathlon_datalist(tmp_path / "dataset.json", key="test") == [
        {"image": str(tmp_path / "imagesTs/c.nii.gz")}
    ]


def test_decathlon_json_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_decathlon_datalist(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json.*not valid JSON"):
        load_decathlon_datalist(bad)
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"training": []}))
    with pytest.raises(ValueError, match="empty"):
        load_decathlon_datalist(empty)
    with pytest.raises(ValueError, match="no list 'validation'"):
        load_decathlon_datalist(empty, key="validation")
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps({"training": [{"image": "gone.nii.gz"}]}))
    with pytest.raises(FileNotFoundError, match="gone.nii.gz"):
        load_decathlon_datalist(missing)


def test_nifti_folder_pairs_labels_by_name(tmp_path):
    for name in ("b.nii.gz", "a.nii", "notes.txt"):
        _touch(tmp_path / "img" / name)
    for name in ("a.nii", "b.nii.gz"):
        _touch(tmp_path / "lab" / name)
    entries = nifti_folder_datalist(tmp_path / "img", label_dir=tmp_path / "lab")
    assert [Path(e["image"]).name for e in entries] == ["a.nii", "b.nii.gz"]
    assert [Path(e["label"]).parent.name for e in entries] == ["lab", "lab"]

    (tmp_path / "lab" / "a.nii").unlink()
    with pytest.raises(FileNotFoundError, match="a.nii"):
        nifti_folder_datalist(tmp_path / "img", label_dir=tmp_path / "lab")
    (tmp_path / "none").mkdir()
    with pytest.raises(ValueError, match="holds no NIfTI"):
        nifti_folder_datalist(tmp_path / "none")
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        nifti_folder_datalist(tmp_path / "missing_dir")


def test_shard_datalist_is_a_disjoint_cover():
    entries = [{"image": str(i)} for i in range(7)]
    shards = [shard_datalist(entries, r, 3) for r in range(3)]
    assert sorted(e["image"] for s in shards for e in s) == sorted(e["image"] for e in entries)
    assert [len(s) for s in shards] == [3, 2, 2]
    with pytest.raises(ValueError, match="rank"):
        shard_datalist(entries, 3, 3)
    with pytest.raises(ValueError, match="cannot shard 2"):
        shard_datalist(entries[:2], 0, 3)


def test_bundled_example_ct_is_small_real_ras_int16():
    image, label = example_ct_path("image"), example_ct_path("label")
    assert image.stat().st_size + label.stat().st_size < 4_000_000
    img, lab = nib.load(image), nib.load(label)
    assert img.shape == lab.shape == (120, 97, 110)
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    np.testing.assert_allclose(np.abs(np.diag(img.affine)[:3]), 3.0)
    np.testing.assert_array_equal(img.affine, lab.affine)
    assert img.get_data_dtype() == np.int16 and lab.get_data_dtype() == np.uint8
    hu = np.asanyarray(img.dataobj)
    assert hu.min() >= -1024 and hu.max() <= 3071
    assert (hu < -900).mean() > 0.1 and ((hu > 0) & (hu < 100)).mean() > 0.1  # air and soft tissue
    assert example_ct_datalist() == [{"image": str(image), "label": str(label)}]
    assert (image.parent / "README.md").read_text().count("MIT") >= 1
    with pytest.raises(ValueError, match="kind"):
        example_ct_path("mask")
