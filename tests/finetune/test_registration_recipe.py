"""The registration recipe end to end at tiny size on a pair list of NIfTI files: trains, validates beside the
identity, resumes bit for bit, refuses a pair list with a missing file; ``medgauss-register`` round trip (outputs
on the fixed file's own grid, a zero-displacement model reproduces the moving image, grid mismatch refused)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medgauss.inference.register import cli as register_cli
from medgauss.nets import load_pretrained
from medgauss.nets.registration import ViTRegistrationNet
from tests._accelerate_state import fresh_accelerate_state  # noqa: F401  (autouse fixture)
from tests.finetune.conftest import assert_resumes_exactly, compose_config, fresh_accelerate, load_recipe

ROOT = Path(__file__).resolve().parents[2]
RAS = np.diag([1.5, 1.5, 1.5, 1.0])  # a RAS-ordered file (not the medgauss frame's S, A, R order)


def _blob_volume(rng, shape, centre):
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    d = np.linalg.norm(grid - np.asarray(centre), axis=-1)
    image = np.where(d < 4, 800.0, -800.0) + rng.normal(0, 50, size=shape)
    return image.astype(np.float32), (d < 4).astype(np.int16) + (grid[..., 0] > 9).astype(np.int16)


def _pairs(folder: Path, n: int = 2) -> Path:
    rng = np.random.default_rng(0)
    entries = []
    for i in range(n):
        entry = {}
        for role, centre in (("fixed", (6, 6, 6)), ("moving", (6 + i, 7, 5))):
            image, label = _blob_volume(rng, (12, 12, 12), centre)
            entry[role] = f"{role}{i}.nii.gz"
            entry[f"{role}_label"] = f"{role}{i}_label.nii.gz"
            nib.save(nib.Nifti1Image(image, RAS), str(folder / entry[role]))
            nib.save(nib.Nifti1Image(label, RAS), str(folder / entry[f"{role}_label"]))
        entries.append(entry)
    path = folder / "pairs.json"
    path.write_text(json.dumps(entries))
    return path


def _common(tmp_path):
    pairs = _pairs(tmp_path)
    return ["encoder.img_size=16", "encoder.hidden_size=32", "encoder.num_layers=2", "encoder.num_heads=2",
            "encoder.mlp_dim=64", "model.decoder_channels=[8]", "model.stem_channels=[4]", "loss.kernel_size=5",
            "data=registration_pairs", f"data.train.pairs={pairs}", f"data.val.pairs={pairs}",
            "data.val.num_classes=3", "trainer.max_steps=4", "trainer.checkpoint_every=2",
            "trainer.keep_checkpoints=0", "trainer.val_every=2", "trainer.panel_every=2", "trainer.log_every=1",
            "trainer.progress=false", "trainer.tensorboard=false", "optim.warmup_steps=1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reg")
    fresh_accelerate()
    common = _common(tmp)
    result = load_recipe("registration").run(compose_config("registration", [*common, f"trainer.run_dir={tmp / 'a'}"]))
    return tmp, common, result


def test_the_recipe_trains_validates_and_exports(trained):
    tmp, _, result = trained
    run = tmp / "a"
    assert len(result.losses) == 4 and all(np.isfinite(result.losses))
    lines = [json.loads(x) for x in (run / "validation.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [2, 4]
    metrics = lines[-1]["metrics"]
    assert set(metrics) == {"model", "identity"}
    assert {"dice", "nonpositive_jacobian_pct", "dice_class_1", "dice_class_2"} <= set(metrics["model"])
    assert metrics["identity"]["nonpositive_jacobian_pct"] == 0.0
    assert 0.0 < metrics["identity"]["dice"] < 1.0
    assert isinstance(load_pretrained(run / "model"), ViTRegistrationNet)
    assert sorted(p.name for p in (run / "panels").glob("*.png"))
    import yaml

    pre = yaml.safe_load((run / "config.yaml").read_text())["data"]["preprocessing"]
    assert pre == {"pixdim": 1.5, "a_min": -1000.0, "a_max": 1000.0, "b_min": 0.0, "b_max": 1.0}


def test_an_interrupted_run_resumes_with_bitwise_equal_losses(trained, monkeypatch):
    tmp, common, straight = trained
    assert_resumes_exactly("registration", "RegistrationTask", "registration", common, straight, tmp / "a",
                           tmp / "b", monkeypatch)


def test_a_pair_list_with_a_missing_file_fails_naming_it(tmp_path):
    common = _common(tmp_path)
    entries = json.loads((tmp_path / "pairs.json").read_text())
    entries[1]["moving"] = "gone.nii.gz"
    (tmp_path / "bad.json").write_text(json.dumps(entries))
    fresh_accelerate()
    with pytest.raises(FileNotFoundError, match=r"entry 1: moving file not found: .*gone\.nii\.gz"):
        load_recipe("registration").run(compose_config("registration", [
            *common, f"data.train.pairs={tmp_path / 'bad.json'}", f"trainer.run_dir={tmp_path / 'run'}"]))


def _register(run, tmp, *extra):
    out = {k: tmp / f"{k}.nii.gz" for k in ("warped", "ddf", "label")}
    register_cli(["--checkpoint", str(run), "--fixed", str(tmp / "fixed0.nii.gz"), "--moving",
                  str(tmp / "moving0.nii.gz"), "--out-warped", str(out["warped"]), "--out-ddf", str(out["ddf"]),
                  "--moving-label", str(tmp / "moving0_label.nii.gz"), "--out-warped-label", str(out["label"]),
                  *extra])
    return out


def test_medgauss_register_writes_on_the_fixed_grid(trained, tmp_path):
    tmp, _, _ = trained
    out = _register(tmp / "a", tmp)
    fixed = nib.load(str(tmp / "fixed0.nii.gz"))
    for key in ("warped", "label"):
        img = nib.load(str(out[key]))
        assert img.shape == fixed.shape and np.allclose(img.affine, fixed.affine)
    ddf = nib.load(str(out["ddf"]))
    assert ddf.shape == (*fixed.shape, 1, 3) and np.allclose(ddf.affine, fixed.affine)
    assert np.isfinite(np.asarray(ddf.dataobj)).all()


def test_a_zero_displacement_model_reproduces_the_moving_image(trained, tmp_path):
    tmp, _, _ = trained
    model = load_pretrained(tmp / "a" / "model")
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
    model.save_pretrained(tmp_path / "zero" / "model")
    shutil.copy(tmp / "a" / "config.yaml", tmp_path / "zero" / "config.yaml")
    out = _register(tmp_path / "zero", tmp)
    moving = np.asarray(nib.load(str(tmp / "moving0.nii.gz")).dataobj)
    np.testing.assert_allclose(np.asarray(nib.load(str(out["warped"])).dataobj), moving, rtol=0, atol=1e-3)
    label = np.asarray(nib.load(str(tmp / "moving0_label.nii.gz")).dataobj)
    assert np.array_equal(np.asarray(nib.load(str(out["label"])).dataobj), label)
    assert np.count_nonzero(np.asarray(nib.load(str(out["ddf"])).dataobj)) == 0


def test_medgauss_register_refuses_images_on_different_grids(trained, tmp_path, capsys):
    tmp, _, _ = trained
    shifted = RAS.copy()
    shifted[0, 3] = 4.0
    nib.save(nib.Nifti1Image(np.zeros((12, 12, 12), np.float32), shifted), str(tmp_path / "moving.nii.gz"))
    with pytest.raises(SystemExit):
        register_cli(["--checkpoint", str(tmp / "a"), "--fixed", str(tmp / "fixed0.nii.gz"), "--moving",
                      str(tmp_path / "moving.nii.gz"), "--out-warped", str(tmp_path / "w.nii.gz"), "--out-ddf",
                      str(tmp_path / "d.nii.gz")])
    err = capsys.readouterr().err
    assert "fixed0.nii.gz" in err and "moving.nii.gz" in err and "different affines" in err
    with pytest.raises(SystemExit):
        register_cli(["--checkpoint", str(tmp_path / "nowhere"), "--fixed", str(tmp / "fixed0.nii.gz"), "--moving",
                      str(tmp / "moving0.nii.gz"), "--out-warped", str(tmp_path / "w.nii.gz"), "--out-ddf",
                      str(tmp_path / "d.nii.gz")])
    assert "nowhere" in capsys.readouterr().err
