"""The exported encoder loads into MONAI's ViT / UNETR and computes the same features."""

import torch
from monai.networks.nets import UNETR, ViT

from medgauss.nets import ViT3D, encoder_to_monai_state_dict, monai_vit_kwargs
from medgauss.nets.zoo import SIZES


def test_base_encoder_loads_strictly_into_unetr():
    base = SIZES["base"]
    encoder = ViT3D(img_size=96, patch_size=16, hidden_size=base["hidden_size"],  # the *_base encoder
                    num_layers=base["num_layers"], num_heads=base["num_heads"], mlp_dim=base["mlp_dim"])
    unetr = UNETR(in_channels=1, out_channels=3, img_size=96, feature_size=16, hidden_size=768, mlp_dim=3072,
                  num_heads=12)
    state = encoder_to_monai_state_dict(encoder)
    result = unetr.vit.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    loaded = unetr.vit.state_dict()
    assert torch.equal(loaded["blocks.11.attn.qkv.weight"], encoder.blocks[11].attn.qkv.weight)
    assert torch.equal(loaded["patch_embedding.position_embeddings"], encoder.pos_embed)


def test_monai_vit_reproduces_encoder_features():
    torch.manual_seed(0)
    # base width / heads / mlp / patch, fewer layers to stay fast; float64 so the only difference
    # between the two implementations (SDPA vs explicit softmax) is rounding at 1e-15.
    encoder = ViT3D(img_size=(48, 32, 64), patch_size=16, hidden_size=768, num_layers=2, num_heads=12,
                    mlp_dim=3072).double().eval()
    with torch.no_grad():  # non-trivial norms and biases so every mapped tensor matters
        for name, p in encoder.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.1 * torch.randn_like(p))
    vit = ViT(**monai_vit_kwargs(encoder)).double().eval()
    vit.load_state_dict(encoder_to_monai_state_dict(encoder), strict=True)
    x = torch.rand(2, 1, 48, 32, 64, dtype=torch.float64)
    with torch.no_grad():
        ours, ours_hidden = encoder.forward_features(x, include_cls=False, return_hidden_states=True)
        theirs, theirs_hidden = vit(x)
    assert ours.shape == theirs.shape == (2, 3 * 2 * 4, 768)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10)
    assert len(ours_hidden) == len(theirs_hidden) == 2
    for a, b in zip(ours_hidden, theirs_hidden):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_export_with_qkv_bias_matches_monai_setting():
    encoder = ViT3D(img_size=32, patch_size=16, hidden_size=24, num_layers=1, num_heads=2, mlp_dim=48,
                    qkv_bias=True)
    vit = ViT(**monai_vit_kwargs(encoder))
    vit.load_state_dict(encoder_to_monai_state_dict(encoder), strict=True)
    assert torch.equal(vit.blocks[0].attn.qkv.bias, encoder.blocks[0].attn.qkv.bias)
