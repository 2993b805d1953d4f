"""save_pretrained / from_pretrained / load_pretrained round trips and file errors."""

import json

import pytest
import torch

from medgauss.nets import GaussianMAE, ViT3D, VoxelMAE, create_model, load_pretrained


def _tiny(name):
    return create_model(name, img_size=16, patch_size=4, num_layers=1, decoder_depth=1,
                        **({"num_queries": 4} if name.startswith("gmae") else {}))


@pytest.mark.parametrize("name", ["gmae_star_tiny", "vmae_tiny"])
def test_round_trip_gives_identical_outputs(tmp_path, name):
    torch.manual_seed(0)
    model = _tiny(name).eval()
    with torch.no_grad():
        for p in model.parameters():  # move off the init so a re-initialised model would differ
            p.add_(0.01 * torch.randn_like(p))
    images, noise = torch.rand(2, 1, 16, 16, 16), torch.rand(2, 64)
    target = model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((target / "config.json").read_text())
    assert config["registry_name"] == name and config["kwargs"]["img_size"] == 16
    cls = GaussianMAE if name.startswith("gmae") else VoxelMAE
    for loaded in (cls.from_pretrained(target), load_pretrained(target)):
        assert type(loaded) is cls and loaded.registry_name == name
        loaded.eval()
        with torch.no_grad():
            a, b = model(images, noise=noise), loaded(images, noise=noise)
        if cls is GaussianMAE:
            for field in ("means", "scales", "quats", "intensities"):
                assert torch.equal(getattr(a.gaussians, field), getattr(b.gaussians, field))
        else:
            assert torch.equal(a.pred, b.pred)
    # saving again over an existing directory replaces it atomically and leaves no temp dirs
    model.save_pretrained(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_encoder_round_trip(tmp_path):
    encoder = ViT3D(img_size=16, patch_size=4, hidden_size=24, num_layers=1, num_heads=2, mlp_dim=48)
    encoder.save_pretrained(tmp_path / "enc")
    loaded = ViT3D.from_pretrained(tmp_path / "enc")
    x = torch.rand(1, 1, 16, 16, 16)
    assert torch.equal(encoder(x), loaded(x))


def test_from_pretrained_wrong_class(tmp_path):
    _tiny("vmae_tiny").save_pretrained(tmp_path / "v")
    with pytest.raises(ValueError, match="VoxelMAE, not a GaussianMAE"):
        GaussianMAE.from_pretrained(tmp_path / "v")


def test_missing_and_corrupt_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_pretrained(tmp_path / "nowhere")
    target = _tiny("vmae_tiny").save_pretrained(tmp_path / "m")
    (target / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="model.safetensors"):
        load_pretrained(target)
    (target / "config.json").write_text("{ broken")
    with pytest.raises(ValueError, match="config.json"):
        load_pretrained(target)
    (target / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(target)


def test_weights_not_matching_config_are_reported(tmp_path):
    target = _tiny("vmae_tiny").save_pretrained(tmp_path / "m")
    config = json.loads((target / "config.json").read_text())
    config["kwargs"]["hidden_size"] = 48
    config["kwargs"]["num_heads"] = 4
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="do not match"):
        load_pretrained(target)
