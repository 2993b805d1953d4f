"""ViTRegistrationNet: shapes and argument checks, identity start, the 2-channel widening rule of a pretrained patch
layer (an identical pair gives the pretrained embedding), MONAI Warp against a brute-force shift, save / load."""

from __future__ import annotations

import pytest
import torch

from medgauss.engines import build_optimizer
from medgauss.nets import load_pretrained
from medgauss.nets.registration import ViTRegistrationNet, registration_net_from_encoder, widen_patch_weight
from medgauss.nets.vit3d import ViT3D

ENC = dict(img_size=16, patch_size=8, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64)
DEC = dict(decoder_channels=[8, 8, 4], stem_channels=[4, 4], convs_per_stage=1)


def _pair(b=1, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 1, 16, 16, 16, generator=g, dtype=dtype), torch.rand(b, 1, 16, 16, 16, generator=g,
                                                                              dtype=dtype)


def test_forward_gives_a_near_identity_field_of_the_input_size():
    torch.manual_seed(0)
    net = ViTRegistrationNet(**ENC, **DEC)
    fixed, moving = _pair(2)
    ddf = net(fixed, moving)
    assert ddf.shape == (2, 3, 16, 16, 16)
    assert ddf.abs().max() < 1e-2  # head ~ N(0, 1e-5): starts at the identity
    assert net.lr_decay_prefix == "encoder."
    net2 = ViTRegistrationNet(**ENC, decoder_channels=[8, 8], stem_channels=[4], ddf_stride=2)
    assert net2(fixed, moving).shape == (2, 3, 16, 16, 16)


def test_gradients_reach_the_encoder_and_the_decoder():
    torch.manual_seed(0)
    net = ViTRegistrationNet(**ENC, **DEC, head_init_std=0.1)
    fixed, moving = _pair()
    net.warp(moving, net(fixed, moving)).sub(fixed).pow(2).mean().backward()
    for name in ("encoder.patch_embed.proj.weight", "encoder.blocks.1.mlp.fc1.weight", "head.weight",
                 "stem.0.0.weight"):
        grad = dict(net.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


@pytest.mark.parametrize("bad, name", [
    ((torch.rand(1, 2, 16, 16, 16), torch.rand(1, 1, 16, 16, 16)), "fixed"),
    ((torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 8)), "moving"),
    ((torch.rand(1, 1, 16, 16, 16), torch.rand(2, 1, 16, 16, 16)), "batch size"),
])
def test_bad_inputs_are_rejected_naming_the_argument(bad, name):
    net = ViTRegistrationNet(**ENC, **DEC)
    with pytest.raises(ValueError, match=name):
        net(*bad)


def test_bad_decoder_arguments_are_rejected():
    with pytest.raises(ValueError, match="decoder_channels"):
        ViTRegistrationNet(**ENC, decoder_channels=[8, 8], stem_channels=[4])
    with pytest.raises(ValueError, match="stem_channels"):
        ViTRegistrationNet(**ENC, decoder_channels=[8, 8, 4], stem_channels=[4, 4, 4, 4])
    with pytest.raises(ValueError, match="patch_size"):
        ViTRegistrationNet(**{**ENC, "img_size": 18, "patch_size": 6}, **DEC)
    with pytest.raises(ValueError, match="ddf_stride"):
        ViTRegistrationNet(**ENC, **DEC, ddf_stride=3)


def test_widened_patch_layer_gives_the_pretrained_response_on_an_identical_pair():
    torch.manual_seed(1)
    vit = ViT3D(**ENC)
    with torch.no_grad():
        vit.pos_embed.normal_()
    net = registration_net_from_encoder(vit, **DEC)
    w = vit.patch_embed.proj.weight
    w2 = net.encoder.patch_embed.proj.weight
    assert w2.shape == (32, 2, 8, 8, 8)
    assert torch.equal(w2[:, 0], w[:, 0] / 2) and torch.equal(w2[:, 1], w[:, 0] / 2)
    assert torch.equal(widen_patch_weight(w, 2), w2)
    pretrained, widened = vit.state_dict(), net.encoder.state_dict()
    assert pretrained.keys() == widened.keys()
    for key in pretrained:
        if key != "patch_embed.proj.weight":
            assert torch.equal(pretrained[key], widened[key]), key
    vit, net = vit.double(), net.double()
    x, y = _pair(dtype=torch.float64)
    ref = vit.forward_features(x, include_cls=False)
    torch.testing.assert_close(net.encoder.forward_features(torch.cat([x, x], 1), include_cls=False), ref,
                               rtol=1e-12, atol=1e-12)
    # a different pair gives the mean of the two images' patch responses at the embedding
    emb = net.encoder.patch_embed(torch.cat([x, y], 1))
    torch.testing.assert_close(emb, (vit.patch_embed(x) + vit.patch_embed(y)) / 2, rtol=1e-12, atol=1e-12)


def test_from_encoder_refuses_a_two_channel_encoder_and_encoder_kwargs():
    with pytest.raises(ValueError, match="in_channels"):
        registration_net_from_encoder(ViT3D(**ENC, in_channels=2), **DEC)
    with pytest.raises(ValueError, match="img_size"):
        registration_net_from_encoder(ViT3D(**ENC), img_size=32, **DEC)


def test_warp_matches_a_brute_force_shift():
    net = ViTRegistrationNet(**ENC, **DEC).double()
    image = torch.rand(1, 1, 16, 16, 16, dtype=torch.float64)
    ddf = torch.zeros(1, 3, 16, 16, 16, dtype=torch.float64)
    ddf[:, 2] = 0.25  # out(d, h, w) = image(d, h, w + 0.25): linear interpolation along W
    out = net.warp(image, ddf)
    expected = 0.75 * image[..., :-1] + 0.25 * image[..., 1:]
    torch.testing.assert_close(out[..., :-1], expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out[..., -1], image[..., -1], rtol=1e-10, atol=1e-10)  # border padding
    labels = torch.randint(0, 5, (1, 1, 16, 16, 16))
    ddf[:, 2] = 0.0
    ddf[:, 0] = 1.3  # nearest: index d + 1
    warped = net.warp(labels, ddf, mode="nearest")
    assert warped.dtype == labels.dtype
    assert torch.equal(warped[:, :, :-2], labels[:, :, 1:-1])
    with pytest.raises(ValueError, match="mode"):
        net.warp(image, ddf, mode="cubic")
    with pytest.raises(ValueError, match="ddf"):
        net.warp(image, ddf[:, :2])


def test_a_zero_head_reproduces_the_moving_image():
    net = ViTRegistrationNet(**ENC, **DEC, head_init_std=0.0)
    fixed, moving = _pair()
    ddf = net(fixed, moving)
    assert torch.count_nonzero(ddf) == 0
    torch.testing.assert_close(net.warp(moving, ddf), moving, rtol=0, atol=1e-6)


def test_save_and_load_round_trip_and_layer_decay(tmp_path):
    torch.manual_seed(2)
    net = ViTRegistrationNet(**ENC, **DEC, head_init_std=0.1)
    net.save_pretrained(tmp_path / "m")
    back = load_pretrained(tmp_path / "m")
    assert isinstance(back, ViTRegistrationNet) and back.init_config == net.init_config
    fixed, moving = _pair()
    torch.testing.assert_close(back(fixed, moving), net(fixed, moving), rtol=0, atol=0)
    optimizer, _ = build_optimizer(net, max_steps=10, layer_decay=0.5)
    scales = sorted({g["lr_scale"] for g in optimizer.param_groups})
    assert scales == [0.5 ** 3, 0.5 ** 2, 0.5, 1.0]  # embeddings, 2 blocks, decoder + norm
