"""UNETR on a pretrained encoder: MONAI equivalence, the weight transfer, layer-wise decay, errors."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import UNETR

from medgauss.engines import build_optimizer
from medgauss.nets import load_pretrained
from medgauss.nets.unetr import PretrainedUNETR, ScratchSwinUNETR, tap_layers, unetr_from_encoder, unetr_from_pretrained
from tests.finetune.conftest import TINY_ENCODER


def test_vit_b_layout_is_exactly_monai_unetr():
    """Patch 16 and 12 layers: MONAI's UNETR, key for key and output for output."""
    torch.manual_seed(0)
    reference = UNETR(1, 3, 32, feature_size=4, hidden_size=24, mlp_dim=48, num_heads=2)
    ours = PretrainedUNETR(3, img_size=32, patch_size=16, hidden_size=24, num_layers=12, num_heads=2, mlp_dim=48,
                           feature_size=4)
    assert set(ours.state_dict()) == set(reference.state_dict())
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 1, 32, 32, 32)
    torch.testing.assert_close(ours(x), reference(x), rtol=0, atol=0)
    assert ours.tap_layers == (3, 6, 9)


def test_tap_layers_spread_over_depth():
    assert tap_layers(12) == (3, 6, 9)
    assert tap_layers(6) == (1, 3, 4)
    assert tap_layers(4) == (1, 2, 3)
    with pytest.raises(ValueError, match="at least 4 layers"):
        tap_layers(3)


@pytest.mark.parametrize("model_name", ["gmae_tiny", "vmae_tiny"])
def test_pretrained_encoder_weights_reach_unetr(pretraining_run, model_name):
    run = pretraining_run(model_name=model_name)
    encoder = load_pretrained(run / "model").encoder.eval()
    net = unetr_from_pretrained(run, out_channels=3, feature_size=4).eval()
    x = torch.rand(2, 1, 16, 16, 16)
    tokens, hidden = encoder.forward_features(x, include_cls=False, return_hidden_states=True)
    with torch.no_grad():
        monai_tokens, monai_hidden = net.vit(x)
    torch.testing.assert_close(monai_tokens, tokens.detach(), rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(monai_hidden, hidden):
        torch.testing.assert_close(ours, theirs.detach(), rtol=1e-5, atol=1e-5)
    # the whole network trains: right output shape, every trainable parameter gets a finite gradient (MONAI's unused
    # cross-attention norms are frozen, or DistributedDataParallel would wait for them)
    net.train()
    out = net(x)
    assert out.shape == (2, 3, 16, 16, 16)
    out.square().mean().backward()
    frozen = {name for name, param in net.named_parameters() if not param.requires_grad}
    assert frozen == {f"vit.blocks.{i}.norm_cross_attn.{p}" for i in range(4) for p in ("weight", "bias")}
    for name, param in net.named_parameters():
        if name not in frozen:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name


def test_patch_8_decoder_resolutions():
    net = PretrainedUNETR(4, img_size=32, patch_size=8, hidden_size=32, num_layers=4, num_heads=2, mlp_dim=64,
                          feature_size=4)
    assert net.feat_size == (4, 4, 4)
    x = torch.rand(1, 1, 32, 32, 32)
    tokens = net.proj_feat(net.vit(x)[1][1])
    assert net.encoder2(tokens).shape[2:] == (16, 16, 16)  # 1/2
    assert net.encoder3(tokens).shape[2:] == (8, 8, 8)  # 1/4
    assert net.encoder4(tokens).shape[2:] == (4, 4, 4)  # 1/8
    assert net(x).shape == (1, 4, 32, 32, 32)


def test_saved_unetr_round_trips(tmp_path, pretraining_run):
    net = unetr_from_pretrained(pretraining_run(), out_channels=3, feature_size=4, class_names=["bg", "a", "b"])
    net.save_pretrained(tmp_path / "seg")
    loaded = load_pretrained(tmp_path / "seg")
    assert isinstance(loaded, PretrainedUNETR) and loaded.class_names == ["bg", "a", "b"]
    x = torch.rand(1, 1, 16, 16, 16)
    torch.testing.assert_close(loaded.eval()(x), net.eval()(x))


def test_layer_decay_scales_encoder_depths(pretraining_run):
    net = unetr_from_pretrained(pretraining_run(), out_channels=3, feature_size=4)
    lr, decay, layers = 1e-3, 0.5, TINY_ENCODER["num_layers"]
    optimizer, _ = build_optimizer(net, max_steps=10, lr=lr, layer_decay=decay, warmup_steps=0)
    rate = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            rate[id(param)] = group["lr"]
    expected = {
        "vit.patch_embedding.patch_embeddings.weight": lr * decay ** (layers + 1),
        "vit.blocks.0.attn.qkv.weight": lr * decay**layers,
        f"vit.blocks.{layers - 1}.mlp.linear1.weight": lr * decay,
        "vit.norm.weight": lr,
        "decoder2.transp_conv.conv.weight": lr,
        "out.conv.conv.weight": lr,
    }
    params = dict(net.named_parameters())
    for name, value in expected.items():
        assert rate[id(params[name])] == pytest.approx(value), name
    trainable = [p for p in params.values() if p.requires_grad]
    assert len(rate) == len(trainable)  # every trainable parameter is in exactly one group
    with pytest.raises(ValueError, match="lr_decay_prefix"):
        build_optimizer(torch.nn.Linear(2, 2), max_steps=10, layer_decay=0.5)


def test_frozen_encoder_is_left_out_of_the_optimizer(pretraining_run):
    net = unetr_from_pretrained(pretraining_run(), out_channels=3, feature_size=4)
    for param in net.vit.parameters():
        param.requires_grad_(False)
    optimizer, _ = build_optimizer(net, max_steps=10)
    optimised = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not optimised & {id(p) for p in net.vit.parameters()}
    assert optimised


def test_errors_name_the_problem(tmp_path, pretraining_run):
    with pytest.raises(ValueError, match="patch_size must be one of"):
        PretrainedUNETR(3, img_size=24, patch_size=12, hidden_size=32, num_layers=4, num_heads=2, mlp_dim=64)
    with pytest.raises(ValueError, match="divisible by patch_size"):
        PretrainedUNETR(3, img_size=20, patch_size=8, hidden_size=32, num_layers=4, num_heads=2, mlp_dim=64)
    with pytest.raises(ValueError, match="class_names"):
        PretrainedUNETR(3, img_size=16, patch_size=8, hidden_size=32, num_layers=4, num_heads=2, mlp_dim=64,
                        class_names=["bg"])
    with pytest.raises(FileNotFoundError, match="missing"):
        unetr_from_pretrained(tmp_path / "missing", 3)
    with pytest.raises(ValueError, match="ViT3D"):
        unetr_from_encoder(torch.nn.Linear(2, 2), 3)
    net = unetr_from_pretrained(pretraining_run(), out_channels=3, feature_size=4)
    with pytest.raises(ValueError, match="spatial size"):
        net(torch.rand(1, 1, 24, 24, 24))
    other = load_pretrained(pretraining_run("wide", hidden_size=48, num_heads=2) / "model").encoder
    with pytest.raises(ValueError, match="does not fit"):
        net.load_encoder(other)


def test_swin_unetr_reference_builds_and_checks_sizes():
    net = ScratchSwinUNETR(3, img_size=64, feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))
    assert net(torch.rand(1, 1, 64, 64, 64)).shape == (1, 3, 64, 64, 64)
    with pytest.raises(ValueError, match="spatial size"):
        net(torch.rand(1, 1, 32, 32, 32))
    with pytest.raises(ValueError, match="divisible by 32"):
        ScratchSwinUNETR(3, img_size=48)
