"""Export a :class:`ViT3D` encoder to MONAI's ``ViT`` (the ``.vit`` of ``monai.networks.nets.UNETR``).

Key mapping (medgauss / timm -> MONAI 1.6):

==============================  ==============================================
``patch_embed.proj.*``          ``patch_embedding.patch_embeddings.*``
``pos_embed`` ``[1, L, C]``     ``patch_embedding.position_embeddings``
``blocks.i.norm1/norm2.*``      ``blocks.i.norm1/norm2.*``
``blocks.i.attn.qkv.*``         ``blocks.i.attn.qkv.*`` (same (3, heads, head_dim) row order)
``blocks.i.attn.proj.*``        ``blocks.i.attn.out_proj.*``
``blocks.i.mlp.fc1/fc2.*``      ``blocks.i.mlp.linear1/linear2.*``
(none)                          ``blocks.i.norm_cross_attn.*``: identity LayerNorm (MONAI creates it even
                                without cross-attention and never uses it then)
``norm.*``                      ``norm.*``
``cls_token``                   dropped: UNETR's ViT (``classification=False``) has no cls token
==============================  ==============================================

MONAI's ViT then computes exactly ``encoder.forward_features(x, include_cls=False,
return_hidden_states=True)``. Both use LayerNorm eps 1e-5, exact GELU and ``qkv_bias=False`` by default.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from medgauss.nets.vit3d import ViT3D

__all__ = ["encoder_to_monai_state_dict", "monai_vit_kwargs"]

_BLOCK_RENAMES = {
    "norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight", "norm2.bias": "norm2.bias",
    "attn.qkv.weight": "attn.qkv.weight", "attn.qkv.bias": "attn.qkv.bias",
    "attn.proj.weight": "attn.out_proj.weight", "attn.proj.bias": "attn.out_proj.bias",
    "mlp.fc1.weight": "mlp.linear1.weight", "mlp.fc1.bias": "mlp.linear1.bias",
    "mlp.fc2.weight": "mlp.linear2.weight", "mlp.fc2.bias": "mlp.linear2.bias",
}


def monai_vit_kwargs(encoder: ViT3D) -> dict[str, Any]:
    """Constructor kwargs of ``monai.networks.nets.ViT`` matching ``encoder`` (``proj_type="conv"``,
    ``pos_embed_type="learnable"``, ``classification=False``). UNETR takes the same ``hidden_size``,
    ``mlp_dim``, ``num_heads``, ``qkv_bias``, ``img_size`` and ``in_channels`` (patch 16, 12 layers fixed)."""
    return dict(in_channels=encoder.in_channels, img_size=encoder.img_size, patch_size=encoder.patch_size,
                hidden_size=encoder.hidden_size, mlp_dim=encoder.mlp_dim, num_layers=encoder.num_layers,
                num_heads=encoder.num_heads, qkv_bias=encoder.qkv_bias, proj_type="conv",
                pos_embed_type="learnable", classification=False)


def encoder_to_monai_state_dict(encoder: ViT3D) -> dict[str, Tensor]:
    """State dict for MONAI's ``ViT(**monai_vit_kwargs(encoder))``, loadable with ``strict=True``.

    For the ``base`` encoder (hidden 768, 12 layers, 12 heads, mlp 3072, patch 16) on 96^3 inputs this
    is what ``UNETR(in_channels=1, out_channels=K, img_size=96, feature_size=16, hidden_size=768,
    mlp_dim=3072, num_heads=12).vit.load_state_dict(sd, strict=True)`` accepts. Tensors are detached
    copies on the encoder's device.
    """
    if not isinstance(encoder, ViT3D):
        raise ValueError(f"encoder must be a medgauss.nets.ViT3D, got {type(encoder).__name__}")
    src = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    out: dict[str, Tensor] = {
        "patch_embedding.position_embeddings": src.pop("pos_embed"),
        "patch_embedding.patch_embeddings.weight": src.pop("patch_embed.proj.weight"),
        "patch_embedding.patch_embeddings.bias": src.pop("patch_embed.proj.bias"),
        "norm.weight": src.pop("norm.weight"),
        "norm.bias": src.pop("norm.bias"),
    }
    src.pop("cls_token")
    for i in range(encoder.num_layers):
        prefix = f"blocks.{i}."
        for ours, theirs in _BLOCK_RENAMES.items():
            if prefix + ours in src:
                out[prefix + theirs] = src.pop(prefix + ours)
        width = out[prefix + "norm1.weight"]
        out[prefix + "norm_cross_attn.weight"] = torch.ones_like(width)
        out[prefix + "norm_cross_attn.bias"] = torch.zeros_like(width)
    if src:
        raise ValueError(f"encoder has parameters MONAI's ViT cannot hold: {sorted(src)}")
    return out
