"""``medgauss-reconstruct``: round trips on a prepared phantom case, the file route, options, novel views, errors."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from medgauss.ct import forward_project, sart
from medgauss.frame import grid_affine
from medgauss.geometry import geometry_from_json
from medgauss.recon import (
    available_methods,
    geometry_affine_from_json,
    geometry_to_json,
    get_method,
    read_geometry_file,
    register_method,
    registry,
)
from medgauss.recon.registry import parse_option_value
from tests.recon.conftest import VIEWS, cli_fails, run_cli  # the case_dir fixture is in conftest.py

K = 12  # input views of most tests: evenly spaced = the even indices, novel = the odd ones
FAST = {"sart": ["--opt", "iterations=3"], "asd_pocs": ["--opt", "iterations=3", "--opt", "tv_iterations=5"]}


def _case(case_dir):
    meta = json.loads((case_dir / "meta.json").read_text())
    geometry = geometry_from_json((case_dir / "geometry.json").read_text())
    return meta, geometry, np.load(case_dir / "projections.npy"), np.load(case_dir / "volume.npy")


def _ssim_slices_reference(x: np.ndarray, y: np.ndarray) -> float:
    """Mean SSIM over axial slices, float64, scipy Gaussian window (11, sigma 1.5), valid region only."""
    c1, c2 = 0.01**2, 0.03**2
    blur = lambda a: ndimage.gaussian_filter(a, 1.5, truncate=5 / 1.5)[5:-5, 5:-5]
    scores = []
    for a, b in zip(x.astype(np.float64), y.astype(np.float64)):
        ma, mb = blur(a), blur(b)
        saa, sbb, sab = blur(a * a) - ma**2, blur(b * b) - mb**2, blur(a * b) - ma * mb
        scores.append((((2 * ma * mb + c1) * (2 * sab + c2)) / ((ma**2 + mb**2 + c1) * (saa + sbb + c2))).mean())
    return float(np.mean(scores))


@pytest.mark.parametrize("method", ["fdk", "sart", "asd_pocs"])
def test_round_trip_every_method(case_dir, tmp_path, capsys, method):
    meta, geometry, _, truth = _case(case_dir)
    views = VIEWS if method == "fdk" else K
    out = tmp_path / "new" / "folder" / f"{method}.nii.gz"  # missing folders are created
    line = run_cli(capsys, ["--method", method, "--case", case_dir, "--views", views, "--out", out,
                            *FAST.get(method, [])])
    img = nib.load(str(out))
    volume = np.asarray(img.dataobj, dtype=np.float64)
    np.testing.assert_allclose(img.affine, np.array(meta["affine"]), rtol=0, atol=1e-5)
    assert volume.shape == tuple(geometry.vol_shape) == truth.shape == (24, 24, 24)
    assert line["method"] == method and int(line["views"]) == views and float(line["seconds"]) > 0
    mse = np.mean((volume - truth) ** 2)
    assert float(line["psnr"]) == pytest.approx(10 * np.log10(1.0 / mse), abs=2e-4)
    assert float(line["ssim"]) == pytest.approx(_ssim_slices_reference(volume, truth), abs=2e-5)
    zero_psnr = 10 * np.log10(1.0 / np.mean(truth.astype(np.float64) ** 2))
    if method == "fdk":
        assert np.corrcoef(volume.ravel(), truth.ravel())[0, 1] > 0.95
    else:
        assert float(line["psnr"]) > zero_psnr + 10.0
    assert not list(out.parent.glob(".*"))  # atomic write left no temporary file


def test_file_route_reproduces_case_route(case_dir, tmp_path, capsys):
    meta, geometry, projections, _ = _case(case_dir)
    ids = [i * VIEWS // K for i in range(K)]
    np.save(tmp_path / "p.npy", projections[ids])
    (tmp_path / "g.json").write_text(geometry_to_json(geometry.subset(ids), affine=np.array(meta["affine"])))
    run_cli(capsys, ["--method", "fdk", "--case", case_dir, "--views", K, "--out", tmp_path / "case.nii.gz"])
    line = run_cli(
        capsys,
        [
            "--method",
            "fdk",
            "--projections",
            tmp_path / "p.npy",
            "--geometry",
            tmp_path / "g.json",
            "--out",
            tmp_path / "file.nii.gz",
        ],
    )
    assert "psnr" not in line and int(line["views"]) == K  # no ground truth on this route
    a, b = nib.load(str(tmp_path / "case.nii.gz")), nib.load(str(tmp_path / "file.nii.gz"))
    np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
    np.testing.assert_array_equal(a.affine, b.affine)
    # all views + --views K selects the same views; a case's own geometry.json (no affine) places the volume
    # by the geometry: the grid centred at vol_offset
    np.save(tmp_path / "all.npy", projections)
    run_cli(
        capsys,
        [
            "--method",
            "fdk",
            "--projections",
            tmp_path / "all.npy",
            "--geometry",
            case_dir / "geometry.json",
            "--views",
            K,
            "--out",
            tmp_path / "own.nii.gz",
        ],
    )
    c = nib.load(str(tmp_path / "own.nii.gz"))
    np.testing.assert_array_equal(np.asarray(c.dataobj), np.asarray(a.dataobj))
    centre = geometry.vol_offset[::-1]
    np.testing.assert_allclose(c.affine, grid_affine(geometry.vol_shape, geometry.vol_spacing, centre), atol=1e-6)


def test_geometry_json_round_trip(case_dir, tmp_path):
    meta, geometry, _, _ = _case(case_dir)
    affine = np.array(meta["affine"])
    back, back_affine = geometry_affine_from_json(geometry_to_json(geometry, affine=torch.tensor(affine)))
    assert back == geometry
    np.testing.assert_array_equal(back_affine, affine)
    back, back_affine = geometry_affine_from_json(geometry_to_json(geometry))
    assert back == geometry and back_affine is None
    rotated = np.eye(4)
    rotated[:3, :3] = np.array([[0, 1, 0], [-1, 0, 0], [0, 0, 1]]) @ affine[:3, :3]  # rigid: voxel sizes kept
    assert np.allclose(geometry_affine_from_json(geometry_to_json(geometry, rotated))[1], rotated)
    bad = json.loads(geometry_to_json(geometry, affine))
    bad["affine"][0][2] *= 2  # x voxel size no longer the geometry's vol_spacing
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"bad\.json.*voxel sizes"):
        read_geometry_file(tmp_path / "bad.json")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"junk\.json.*not valid JSON"):
        read_geometry_file(tmp_path / "junk.json")


def test_options_parse_and_reach_the_method(case_dir, tmp_path, capsys):
    assert [parse_option_value(t) for t in ("20", "-3", "0.5", "1e-3", "True", "false", "None", "hann")] == [
        20,
        -3,
        0.5,
        1e-3,
        True,
        False,
        None,
        "hann",
    ]
    sart_method = get_method("sart")
    parsed = sart_method.options_from_text(
        {"iterations": "5", "relaxation": "1", "nonnegative": "false", "num_subsets": "none", "backend": "torch"}
    )
    assert parsed == {"iterations": 5, "relaxation": 1.0, "nonnegative": False, "num_subsets": None, "backend": "torch"}
    assert isinstance(parsed["relaxation"], float)
    assert get_method("fdk").options_from_text({"window": "hann"}) == {"window": "hann"}
    with pytest.raises(ValueError, match="iterations=2.5 .* must be int"):
        sart_method.options_from_text({"iterations": "2.5"})
    # the options reach medgauss.ct.sart: the command's volume is sart(...) with those keyword arguments
    _, geometry, projections, _ = _case(case_dir)
    ids = [i * VIEWS // K for i in range(K)]
    out = tmp_path / "s.nii.gz"
    run_cli(
        capsys,
        [
            "--method",
            "sart",
            "--case",
            case_dir,
            "--views",
            K,
            "--out",
            out,
            "--opt",
            "iterations=2",
            "--opt",
            "num_subsets=1",
            "--opt",
            "relaxation=0.5",
        ],
    )
    direct = sart(
        torch.from_numpy(projections[ids])[None],
        geometry.subset(ids),
        iterations=2,
        num_subsets=1,
        relaxation=0.5,
        progress=False,
    )
    np.testing.assert_allclose(np.asarray(nib.load(str(out)).dataobj), direct[0, 0].numpy(), rtol=0, atol=1e-6)


def test_option_errors(case_dir, tmp_path, capsys):
    base = ["--case", case_dir, "--views", K, "--out", tmp_path / "o.nii.gz"]
    err = cli_fails(capsys, ["--method", "sart", *base, "--opt", "lam=0.5"])
    assert "no option 'lam'" in err
    assert "valid options: backend, iterations, nonnegative, num_subsets, progress, relaxation" in err
    assert "valid options: window" in cli_fails(capsys, ["--method", "fdk", *base, "--opt", "iterations=3"])
    assert "expects key=value" in cli_fails(capsys, ["--method", "sart", *base, "--opt", "iterations"])
    assert "given twice" in cli_fails(
        capsys, ["--method", "sart", *base, "--opt", "iterations=1", "--opt", "iterations=2"]
    )
    assert "must be int" in cli_fails(capsys, ["--method", "sart", *base, "--opt", "iterations=many"])
    assert "relaxation must lie in (0, 2)" in cli_fails(capsys, ["--method", "sart", *base, "--opt", "relaxation=3"])
    assert not (tmp_path / "o.nii.gz").exists()


def test_novel_views_are_the_unused_views(case_dir, tmp_path, capsys):
    _, geometry, projections, _ = _case(case_dir)
    out, novel = tmp_path / "f.nii.gz", tmp_path / "nv" / "novel.npy"
    line = run_cli(capsys, ["--method", "fdk", "--case", case_dir, "--views", K, "--out", out, "--novel-views", novel])
    rendered = np.load(novel)
    unused = list(range(1, VIEWS, 2))  # 12 evenly spaced of 24 are the even views
    assert rendered.shape == (VIEWS - K, 32, 32) and rendered.dtype == np.float32
    volume = torch.from_numpy(np.asarray(nib.load(str(out)).dataobj, dtype=np.float32))[None, None]
    expected = forward_project(volume, geometry.subset(unused))[0].numpy()
    np.testing.assert_allclose(rendered, expected, rtol=1e-5, atol=1e-5)
    measured = projections[unused].astype(np.float64)
    data_range = measured.max() - measured.min()
    mse = np.mean((rendered.astype(np.float64) - measured) ** 2)
    assert float(line["novel_range"]) == pytest.approx(data_range, rel=1e-5)
    assert float(line["novel_psnr"]) == pytest.approx(10 * np.log10(data_range**2 / mse), abs=2e-4)
    # the file route renders the views of its geometry file that were not inputs
    np.save(tmp_path / "all.npy", projections)
    run_cli(
        capsys,
        [
            "--method",
            "fdk",
            "--projections",
            tmp_path / "all.npy",
            "--geometry",
            case_dir / "geometry.json",
            "--views",
            K,
            "--out",
            tmp_path / "g.nii.gz",
            "--novel-views",
            tmp_path / "g.npy",
        ],
    )
    np.testing.assert_array_equal(np.load(tmp_path / "g.npy"), rendered)
    err = cli_fails(
        capsys,
        ["--method", "fdk", "--case", case_dir, "--out", tmp_path / "x.nii.gz", "--novel-views", tmp_path / "x.npy"],
    )
    assert "--novel-views" in err and "none is left" in err


def test_registry_and_unregistered_methods(case_dir, tmp_path, capsys):
    assert {"fdk", "sart", "asd_pocs", "xgrm", "ilrm", "3dgr"} <= set(available_methods())
    for name in ("4dgr", "not_a_method"):
        err = cli_fails(capsys, ["--method", name, "--case", case_dir, "--views", K, "--out", tmp_path / "x.nii.gz"])
        assert f"method '{name}' is not registered" in err and "fdk" in err
    with pytest.raises(ValueError, match="already registered"):
        register_method("fdk")(lambda *a: None)


def test_checkpoint_errors(case_dir, tmp_path, capsys, monkeypatch):
    base = ["--case", case_dir, "--views", K, "--out", tmp_path / "o.nii.gz"]
    err = cli_fails(capsys, ["--method", "fdk", *base, "--checkpoint", tmp_path])
    assert "--checkpoint" in err and "'fdk' takes no checkpoint" in err
    # a method that needs a checkpoint of one model class (as learned methods will)
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    register_method("needs_model", checkpoint_classes=("XGRM",))(lambda p, g, o, c: torch.zeros(1, 1, 24, 24, 24))
    assert "needs --checkpoint" in cli_fails(capsys, ["--method", "needs_model", *base])
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    assert "config.json is missing" in cli_fails(capsys, ["--method", "needs_model", *base, "--checkpoint", ckpt])
    (ckpt / "config.json").write_text(json.dumps({"format": "medgauss.nets", "class": "GaussianMAE", "kwargs": {}}))
    err = cli_fails(capsys, ["--method", "needs_model", *base, "--checkpoint", ckpt])
    assert str(ckpt / "config.json") in err and "'GaussianMAE'" in err and "XGRM" in err
    assert not (tmp_path / "o.nii.gz").exists()


def test_bad_files_and_arguments(case_dir, tmp_path, capsys):
    _, geometry, projections, _ = _case(case_dir)
    out = ["--out", tmp_path / "o.nii.gz"]
    geo = tmp_path / "g.json"
    geo.write_text(geometry.subset(range(K)).to_json())

    def file_route(array, name="p.npy"):
        np.save(tmp_path / name, array)
        return cli_fails(capsys, ["--method", "fdk", "--projections", tmp_path / name, "--geometry", geo, *out])

    err = file_route(projections[: K - 1])
    assert "p.npy holds 11 views" in err and "g.json describes 12" in err
    err = file_route(projections[:K, :30])
    assert "30x32 pixel projections" in err and "32x32 detector" in err and "g.json" in err
    bad = projections[:K].copy()
    bad[3, 4, 5] = np.nan
    bad[0, 0, 0] = np.inf
    assert "nan.npy holds 2 non-finite value(s)" in file_route(bad, "nan.npy")
    (tmp_path / "junk.npy").write_bytes(b"not an array")
    assert "junk.npy is not a readable .npy array" in cli_fails(
        capsys, ["--method", "fdk", "--projections", tmp_path / "junk.npy", "--geometry", geo, *out]
    )
    assert "file not found" in cli_fails(
        capsys, ["--method", "fdk", "--projections", tmp_path / "none.npy", "--geometry", geo, *out]
    )
    assert "--geometry: file not found" in cli_fails(
        capsys, ["--method", "fdk", "--projections", tmp_path / "p.npy", "--geometry", tmp_path / "none.json", *out]
    )
    assert "--projections needs --geometry" in cli_fails(
        capsys, ["--method", "fdk", "--projections", tmp_path / "p.npy", *out]
    )
    assert "--geometry goes with --projections" in cli_fails(
        capsys, ["--method", "fdk", "--case", case_dir, "--geometry", geo, *out]
    )
    # views out of range
    assert f"--views 25 exceeds the {VIEWS} views of {case_dir}" in cli_fails(
        capsys, ["--method", "fdk", "--case", case_dir, "--views", 25, *out]
    )
    assert "--views must be at least 1" in cli_fails(capsys, ["--method", "fdk", "--case", case_dir, "--views", 0,
                                                              *out])
    # output names
    assert "must end in .nii.gz or .nii" in cli_fails(
        capsys, ["--method", "fdk", "--case", case_dir, "--out", tmp_path / "o.npy"]
    )
    assert not (tmp_path / "o.nii.gz").exists()


def test_missing_and_corrupt_cases(case_dir, tmp_path, capsys):
    def fails_on(folder) -> str:
        return cli_fails(capsys, ["--method", "fdk", "--case", folder, "--views", K, "--out", tmp_path / "o.nii.gz"])

    assert f"--case: folder not found: {tmp_path / 'nope'}" in fails_on(tmp_path / "nope")
    assert "is a dataset folder" in fails_on(case_dir.parent)
    broken = {}
    for name in ("meta", "nan", "gone"):
        broken[name] = tmp_path / name
        shutil.copytree(case_dir, broken[name])
    (broken["meta"] / "meta.json").write_text("{truncated")
    assert f"corrupt JSON file {broken['meta'] / 'meta.json'}" in fails_on(broken["meta"])
    p = np.load(broken["nan"] / "projections.npy")
    p[5, 1, 1] = np.nan
    np.save(broken["nan"] / "projections.npy", p)
    assert f"{broken['nan'] / 'projections.npy'} holds 1 non-finite value(s)" in fails_on(broken["nan"])
    (broken["gone"] / "volume.npy").unlink()
    assert f"missing file: {broken['gone'] / 'volume.npy'}" in fails_on(broken["gone"])
    assert not (tmp_path / "o.nii.gz").exists()
