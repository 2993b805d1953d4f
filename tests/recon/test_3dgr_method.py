"""``medgauss-reconstruct --method 3dgr``: round trip on a prepared case, Gaussians in the NIfTI's frame, errors."""

import json

import nibabel as nib
import numpy as np
import torch

from medgauss.gaussians import Gaussians
from medgauss.nets import GaussianMAE, VoxelMAE
from medgauss.recon import get_method
from medgauss.recon.gaussian import splat_world
from tests.recon.conftest import cli_fails, run_cli

FAST = ["--opt", "iterations=60", "--opt", "num_gaussians=300", "--opt", "densify_every=20",
        "--opt", "densify_from=20"]


def test_3dgr_round_trip_writes_the_volume_and_gaussians_in_its_frame(case_dir, tmp_path, capsys):
    meta = json.loads((case_dir / "meta.json").read_text())
    truth = np.load(case_dir / "volume.npy").astype(np.float64)
    out, gauss = tmp_path / "v.nii.gz", tmp_path / "g.safetensors"
    line = run_cli(capsys, ["--method", "3dgr", "--init", "r2", "--case", case_dir, "--views", 24, "--out", out,
                         "--out-gaussians", gauss, *FAST])
    assert line["method"] == "3dgr" and int(line["initial_gaussians"]) > 0 and int(line["iterations"]) == 60
    img = nib.load(str(out))
    volume = np.asarray(img.dataobj, dtype=np.float64)
    np.testing.assert_allclose(img.affine, np.array(meta["affine"]), atol=1e-5)
    zero_psnr = 10 * np.log10(1.0 / np.mean(truth**2))
    assert float(line["psnr"]) > zero_psnr + 8, (line["psnr"], zero_psnr)
    # the Gaussians file is in the NIfTI's world frame: splatted on the NIfTI's grid it is the NIfTI
    g = Gaussians.load(gauss)
    assert g.num_gaussians == int(line["gaussians"])
    again = splat_world(g.to(torch.float64), volume.shape, torch.as_tensor(img.affine, dtype=torch.float64))
    np.testing.assert_allclose(again[0, 0].numpy(), volume, atol=2e-4 * np.abs(volume).max())


def test_3dgr_options_and_errors(case_dir, tmp_path, capsys):
    method = get_method("3dgr")
    assert method.makes_gaussians and method.checkpoint_optional and "init" in method.option_types
    base = ["--case", case_dir, "--views", 12, "--out", tmp_path / "o.nii.gz"]
    err = cli_fails(capsys, ["--method", "fdk", *base, "--out-gaussians", tmp_path / "g.safetensors"])
    assert "--out-gaussians" in err and "makes no Gaussians" in err
    err = cli_fails(capsys, ["--method", "3dgr", *base, "--out-gaussians", tmp_path / "g.npy"])
    assert "--out-gaussians" in err and ".safetensors" in err
    assert "init must be one of" in cli_fails(capsys, ["--method", "3dgr", *base, "--opt", "init=magic"])
    assert "init must be one of" in cli_fails(capsys, ["--method", "3dgr", *base, "--init", "magic"])
    assert "give the initialiser once" in cli_fails(capsys, ["--method", "3dgr", *base, "--init", "r2", "--opt",
                                                          "init=fbp"])
    assert "has no initialiser" in cli_fails(capsys, ["--method", "sart", *base, "--init", "r2"])
    err = cli_fails(capsys, ["--method", "3dgr", *base, "--opt", "init=decoder"])
    assert "needs --checkpoint" in err
    other = tmp_path / "vmae"
    VoxelMAE(img_size=16, patch_size=8, hidden_size=32, num_layers=1, num_heads=2, mlp_dim=32, decoder_dim=32,
             decoder_depth=1, decoder_heads=2).save_pretrained(other)
    err = cli_fails(capsys, ["--method", "3dgr", *base, "--opt", "init=decoder", "--checkpoint", other])
    assert "VoxelMAE" in err and "GaussianMAE" in err
    gmae = tmp_path / "gmae"
    GaussianMAE(img_size=16, patch_size=8, hidden_size=32, num_layers=1, num_heads=2, mlp_dim=32, decoder_dim=32,
                decoder_depth=1, decoder_heads=2, num_queries=8).save_pretrained(gmae)
    err = cli_fails(capsys, ["--method", "3dgr", *base, "--opt", "init=fbp", "--checkpoint", gmae])
    assert "init='decoder' only" in err
    # a bare model export without its pretraining run's config.yaml: the preprocessing is unknown
    err = cli_fails(capsys, ["--method", "3dgr", *base, "--opt", "init=decoder", "--checkpoint", gmae])
    assert "config.yaml" in err
    assert not (tmp_path / "o.nii.gz").exists()
