"""One generic test over every registered model (tiny sizes), plus model-specific checks."""

import functools
import math

import pytest
import torch

from medgauss.gaussians import Gaussians
from medgauss.losses import MaskedGaussianLoss, pretrain_loss_for
from medgauss.nets import GaussianMAE, VoxelMAE, create_model, list_models
from medgauss.nets.decoders import HEAD_BIAS_INIT
from medgauss.nets.zoo import SIZES

# Small inputs keep the generic test fast; every other constructor argument is the registered one.
SMALL = dict(img_size=16, patch_size=4)


def small_model(name: str, **extra):
    overrides = dict(SMALL, **extra)
    if name.startswith("gmae"):
        overrides.setdefault("num_queries", 8)
    return create_model(name, **overrides)


def loss_for(model):
    if isinstance(model, GaussianMAE):
        return pretrain_loss_for(model, backend="torch", cutoff=None)
    return pretrain_loss_for(model)


def test_registry_names():
    expected = {f"{k}_{s}" for k in ("gmae", "gmae_star", "vmae") for s in ("tiny", "base", "large")}
    assert expected <= set(list_models())
    assert list_models("vmae_*") == ["vmae_base", "vmae_large", "vmae_tiny"]
    with pytest.raises(ValueError, match="unknown model name"):
        create_model("gmae_huge")
    with pytest.raises(ValueError, match="hidden_dim"):
        create_model("vmae_tiny", hidden_dim=64)


@pytest.mark.parametrize("name", ["vmae_tiny", "gmae_tiny", "gmae_star_tiny"])
def test_only_unknown_keywords_are_reported_as_invalid_overrides(name):
    # num_queries is a GaussianMAE argument but not a VoxelMAE one: checked per constructor.
    bad = {"hidden_dim": 64, "num_queries": 8} if name.startswith("vmae") else {"hidden_dim": 64, "bogus": 1}
    with pytest.raises(ValueError, match=r"invalid overrides \[.*'hidden_dim'") as info:
        create_model(name, **SMALL, **bad)
    # exactly the unknown names, nothing else
    assert str(info.value).startswith(f"invalid overrides {sorted(bad)}: no keyword argument of ")
    model = create_model(name, **SMALL, num_layers=1, decoder_depth=1)  # known names pass through
    assert model.registry_name == name


@pytest.mark.parametrize("error", [TypeError, RuntimeError])
def test_errors_raised_inside_a_constructor_propagate_unchanged(monkeypatch, error):
    original = VoxelMAE.__init__

    @functools.wraps(original)  # same signature, so the override check still sees VoxelMAE's arguments
    def broken(self, *args, **kwargs):
        original(self, *args, **kwargs)
        raise error("bug inside the constructor")

    monkeypatch.setattr(VoxelMAE, "__init__", broken)
    with pytest.raises(error, match="bug inside the constructor"):
        create_model("vmae_tiny", **SMALL)


@pytest.mark.parametrize("name", list_models("*mae*tiny"))
def test_every_tiny_model_trains(name):
    torch.manual_seed(0)
    model = small_model(name)
    assert model.registry_name == name
    images = torch.rand(2, 1, 16, 16, 16)
    out = model(images)
    num_patches = 4 ** 3
    assert out.mask.shape == (2, num_patches) and out.mask.dtype == torch.bool
    assert out.mask.sum(1).tolist() == [round(0.75 * num_patches)] * 2
    if isinstance(model, GaussianMAE):
        g = out.gaussians
        assert isinstance(g, Gaussians)
        assert g.means.shape == (2, model.num_gaussians, 3)
        assert g.num_gaussians == sum(out.level_sizes)
        Gaussians(g.means, g.scales, g.quats, g.intensities)  # validates: finite, positive scales
        recon = model.reconstruct(out, images.shape, backend="torch")
    else:
        assert out.pred.shape == (2, num_patches, 4 ** 3)
        assert torch.isfinite(out.pred).all()
        recon = model.reconstruct(out, images.shape)
    assert recon.shape == (2, 1, 16, 16, 16) and torch.isfinite(recon).all()
    vol = model.mask_to_volume(out.mask)
    assert vol.shape == (2, 1, 16, 16, 16) and vol.dtype == torch.bool
    assert vol.sum().item() == out.mask.sum().item() * 4 ** 3

    loss = loss_for(model)(out, images)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not no_grad, f"parameters without gradient: {no_grad}"


def test_star_levels_sizes_and_base_config():
    model = small_model("gmae_star_tiny")
    assert model.level_sizes == (8, 16, 32)
    assert model.num_gaussians == 56
    plain = small_model("gmae_tiny")
    assert plain.level_sizes == (8,) and plain.levels is None
    assert SIZES["base"]["hidden_size"] == 768 and SIZES["base"]["num_layers"] == 12


def test_head_bias_and_weight_init():
    model = small_model("gmae_tiny")
    heads = model.heads
    assert HEAD_BIAS_INIT == {"center": 0.0, "scale": -1.386, "rotation": 0.0, "intensity": -0.405}
    for name, value in HEAD_BIAS_INIT.items():
        layer = getattr(heads, name)
        assert torch.all(layer.bias == torch.tensor(value))
        fan_in, fan_out = layer.weight.shape[1], layer.weight.shape[0]
        bound = math.sqrt(6.0 / (fan_in + fan_out))  # Xavier-uniform bound
        assert layer.weight.abs().max() <= bound
        assert layer.weight.abs().max() > 0.8 * bound
    # head activations: centre in (0, 1), scale = sigmoid * max_scale, unit quaternion, intensity in (0, 1)
    features = torch.zeros(1, 2, heads.center.in_features)
    g = heads(features)
    assert torch.allclose(g.means, torch.full_like(g.means, 0.5))
    initial = 2e-3 + torch.sigmoid(torch.tensor(-1.386)) * (0.1 - 2e-3)  # min + sigmoid * (max - min)
    assert torch.allclose(g.scales, torch.full_like(g.scales, initial.item()))
    assert torch.allclose(g.intensities, torch.full_like(g.intensities, torch.sigmoid(torch.tensor(-0.405))))
    g = heads(torch.randn(1, 5, heads.center.in_features))
    assert torch.allclose(g.quats.norm(dim=-1), torch.ones(1, 5))
    assert (g.scales < 0.1).all() and (g.scales > 0).all()
    g = heads(1e3 * torch.randn(1, 50, heads.center.in_features))  # saturated sigmoids stay in bounds
    assert (g.scales >= 2e-3).all() and (g.scales <= 0.1).all()
    assert g.scales.min() < 2.1e-3 and g.scales.max() > 0.099


def test_max_scale_is_configurable():
    model = small_model("gmae_tiny", max_scale=0.3)
    out = model(torch.rand(1, 1, 16, 16, 16))
    assert (out.gaussians.scales < 0.3).all()
    assert out.gaussians.scales.max() > 0.1 * 0.3


def test_same_noise_same_mask_across_models():
    noise = torch.rand(2, 64)
    images = torch.rand(2, 1, 16, 16, 16)
    a = small_model("gmae_tiny")(images, noise=noise)
    b = small_model("vmae_tiny")(images, noise=noise)
    assert torch.equal(a.mask, b.mask)


@pytest.mark.parametrize("model_cls", [GaussianMAE, VoxelMAE])
def test_bad_images_raise_value_error_naming_images(model_cls):
    model = model_cls(img_size=16, patch_size=4, hidden_size=24, num_layers=1, num_heads=2, mlp_dim=48,
                      decoder_dim=12, decoder_depth=1, decoder_heads=2)
    with pytest.raises(ValueError, match=r"images must have shape \[B, C, D, H, W\]"):
        model(torch.rand(1, 16, 16, 16))
    with pytest.raises(ValueError, match="images must have 1 channel"):
        model(torch.rand(1, 2, 16, 16, 16))
    with pytest.raises(ValueError, match="images must have spatial size"):
        model(torch.rand(1, 1, 16, 16, 20))
    with pytest.raises(ValueError, match="images must be a floating-point"):
        model(torch.zeros(1, 1, 16, 16, 16, dtype=torch.int16))


@pytest.mark.parametrize("kwargs,match", [
    (dict(img_size=18, patch_size=4), "img_size"),
    (dict(img_size=(16, 16), patch_size=4), "img_size"),
    (dict(img_size=16, patch_size=0), "patch_size"),
    (dict(img_size=16, patch_size=4, mask_ratio=1.0), "mask_ratio"),
    (dict(img_size=16, patch_size=4, hidden_size=25), "divisible by num_heads"),
    (dict(img_size=16, patch_size=4, min_scale=0.2, max_scale=0.1), "min_scale"),
])
def test_bad_constructor_arguments(kwargs, match):
    base = dict(hidden_size=24, num_layers=1, num_heads=2, mlp_dim=48, decoder_dim=12, decoder_depth=1,
                decoder_heads=2)
    with pytest.raises(ValueError, match=match):
        GaussianMAE(**{**base, **kwargs})


def test_patch_size_12_is_supported():
    model = create_model("vmae_tiny", img_size=24, patch_size=12, num_layers=1, decoder_depth=1)
    out = model(torch.rand(1, 1, 24, 24, 24))
    assert out.pred.shape == (1, 8, 12 ** 3)
    assert out.mask.sum().item() == 6


def test_gaussian_loss_rejects_mismatched_images():
    model = small_model("gmae_tiny")
    out = model(torch.rand(2, 1, 16, 16, 16))
    loss = MaskedGaussianLoss(backend="torch")
    with pytest.raises(ValueError, match="images must have shape"):
        loss(out, torch.rand(2, 1, 16, 16, 8))
    with pytest.raises(ValueError, match="1 channel"):
        loss(out, torch.rand(2, 2, 16, 16, 16))


def test_gaussians_stay_float32_under_bf16_autocast():
    model = small_model("gmae_star_tiny")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.rand(1, 1, 16, 16, 16))
    assert out.gaussians.dtype == torch.float32
    assert out.gaussians.scales.dtype == out.gaussians.intensities.dtype == torch.float32


def test_initial_gaussians_spread_over_the_volume():
    # Regression: near-identical queries decode to one cluster of Gaussians whose overlap overshoots
    # the target, and training then switches every Gaussian off instead of fitting the volume.
    torch.manual_seed(0)
    model = small_model("gmae_tiny", num_queries=64)
    with torch.no_grad():
        g = model(torch.rand(2, 1, 16, 16, 16)).gaussians
    assert (g.means.std(dim=1) > 0.18).all()  # uniform on [0, 1] has 0.29


@pytest.mark.parametrize("sigma", [0.7, 2.0])
def test_voxel_mae_mask_pool_starts_hidden_tokens_from_their_visible_neighbours(sigma):
    """The decoder's input at each hidden patch is mask token + position + the weighted mean of the
    visible tokens, weights exp(-d^2 / 2 sigma^2) over patch-centre distances written out by hand."""
    torch.manual_seed(0)
    model = VoxelMAE(img_size=(8, 12, 16), patch_size=4, hidden_size=12, num_layers=1, num_heads=2, mlp_dim=24,
                     decoder_dim=8, decoder_depth=1, decoder_heads=2, mask_pool_sigma=sigma).double()
    seen = {}
    model.decoder.blocks[0].register_forward_pre_hook(lambda module, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        model.decoder.mask_token.normal_()
        out = model(torch.rand(2, 1, 8, 12, 16, dtype=torch.float64))
    x, pos = seen["x"][:, 1:], model.decoder.pos_embed[0]
    for b in range(2):
        visible = out.ids_keep[b].tolist()
        cells = {k: (k // 12 + 0.5, (k // 4) % 3 + 0.5, k % 4 + 0.5) for k in range(24)}
        for patch in range(24):
            if not out.mask[b, patch]:
                continue
            weights = [math.exp(-sum((cells[patch][i] - cells[k][i]) ** 2 for i in range(3)) / (2 * sigma ** 2))
                       for k in visible]
            total = sum(weights)
            pooled = sum(w / total * (x[b, k] - pos[k]) for w, k in zip(weights, visible))
            expected = model.decoder.mask_token[0, 0] + pooled + pos[patch]
            torch.testing.assert_close(x[b, patch], expected, rtol=1e-10, atol=1e-12)
    assert model.encoder.grid_size == (2, 3, 4)


def test_pool_sigma_options_reject_bad_values():
    with pytest.raises(ValueError, match="mask_pool_sigma"):
        VoxelMAE(img_size=8, patch_size=4, hidden_size=12, num_layers=1, num_heads=2, mlp_dim=24, decoder_dim=8,
                 decoder_depth=1, decoder_heads=2, mask_pool_sigma=-1.0)
