"""3D Vision Transformer encoder (MAE-ready, fine-tuning ready, exportable to MONAI's ViT)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.layers import trunc_normal_
from torch import Tensor, nn

from medgauss.nets.blocks import (
    PatchEmbed3D,
    grid_size_for,
    init_linear_and_norm,
    sincos_pos_embed_3d,
    to_3tuple,
    transformer_blocks,
)
from medgauss.nets.pretrained import PretrainedMixin, config_from_locals

__all__ = ["ViT3D", "check_images"]


def check_images(images: object, in_channels: int, img_size: tuple[int, int, int],
                 name: str = "images") -> Tensor:
    """Raise ``ValueError`` naming ``name`` unless ``images`` is a float ``[B, in_channels, *img_size]``
    tensor; returns it unchanged."""
    if not isinstance(images, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 5:
        raise ValueError(f"{name} must have shape [B, C, D, H, W], got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {images.dtype}")
    if images.shape[1] != in_channels:
        raise ValueError(f"{name} must have {in_channels} channel(s), got shape {tuple(images.shape)}")
    if tuple(images.shape[2:]) != img_size:
        raise ValueError(f"{name} must have spatial size {img_size} (the model's img_size), "
                         f"got shape {tuple(images.shape)}")
    return images


class ViT3D(PretrainedMixin, nn.Module):
    """ViT encoder for ``[B, C, D, H, W]`` volumes built from timm blocks.

    Layout: Conv3d patch embedding -> + learnable position embedding ``[1, L, hidden]`` (initialised
    with fixed 3D sin-cos values, then trained) -> optional token subset (MAE) -> cls token prepended
    (it has no position embedding) -> ``num_layers`` pre-norm timm blocks -> final LayerNorm.

    With ``include_cls=False`` the computation is exactly MONAI's ``ViT`` (``classification=False``),
    which is what :func:`medgauss.nets.encoder_to_monai_state_dict` exports to. ``qkv_bias`` defaults
    to False, MONAI's and UNETR's default.

    Args:
        img_size: input spatial size ``(D, H, W)`` (int = cube), divisible by ``patch_size``.
        patch_size: patch edge in voxels (16 default; 12 supported, any divisor works).
        in_channels: input channels.
        hidden_size, num_layers, num_heads, mlp_dim: transformer width, depth, heads, Mlp width.
        qkv_bias: bias on the qkv projection.
        drop_path_rate: stochastic depth rate of the last block (linear schedule).
    """

    def __init__(self, img_size: int | Sequence[int] = 96, patch_size: int | Sequence[int] = 16,
                 in_channels: int = 1, hidden_size: int = 768, num_layers: int = 12, num_heads: int = 12,
                 mlp_dim: int = 3072, qkv_bias: bool = False, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        self.init_config = config_from_locals(locals())
        self.img_size = to_3tuple(img_size, "img_size")
        self.patch_size = to_3tuple(patch_size, "patch_size")
        self.grid_size = grid_size_for(self.img_size, self.patch_size)
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        self.in_channels = in_channels
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.qkv_bias = qkv_bias
        self.num_patches = self.grid_size[0] * self.grid_size[1] * self.grid_size[2]

        self.patch_embed = PatchEmbed3D(in_channels, hidden_size, self.patch_size)
        self.pos_embed = nn.Parameter(sincos_pos_embed_3d(self.grid_size, hidden_size)[None])
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.blocks = transformer_blocks(hidden_size, num_layers, num_heads, mlp_dim, qkv_bias,
                                         drop_path_rate)
        self.norm = nn.LayerNorm(hidden_size)
        self._init_weights()

    def _init_weights(self) -> None:
        self.apply(init_linear_and_norm)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a Linear over flattened patches (MAE)
        nn.init.zeros_(self.patch_embed.proj.bias)
        trunc_normal_(self.cls_token, std=0.02)

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def embed(self, images: Tensor) -> Tensor:
        """Patch tokens with position embedding: ``[B, C, D, H, W] -> [B, L, hidden]``."""
        check_images(images, self.in_channels, self.img_size)
        return self.patch_embed(images) + self.pos_embed

    def encode_tokens(self, tokens: Tensor, include_cls: bool = True,
                      return_hidden_states: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Run the transformer on already embedded tokens ``[B, K, hidden]``.

        Returns ``[B, 1 + K, hidden]`` (cls first) or ``[B, K, hidden]`` without the cls token, after
        the final norm; with ``return_hidden_states`` also every block's output (before the norm).
        """
        x = tokens
        if include_cls:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        hidden = []
        for block in self.blocks:
            x = block(x)
            if return_hidden_states:
                hidden.append(x)
        x = self.norm(x)
        return (x, hidden) if return_hidden_states else x

    def forward_features(self, images: Tensor, ids_keep: Tensor | None = None, include_cls: bool = True,
                         return_hidden_states: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Encode ``images [B, C, D, H, W]``, optionally only the patches ``ids_keep [B, K]``.

        Returns ``[B, 1 + K, hidden]`` tokens (cls first; ``K = L`` without ``ids_keep``), or
        ``[B, K, hidden]`` with ``include_cls=False`` (MONAI ViT / UNETR layout); with
        ``return_hidden_states`` a tuple ``(tokens, [block outputs])`` like MONAI's ``ViT.forward``.
        """
        tokens = self.embed(images)
        if ids_keep is not None:
            if ids_keep.ndim != 2 or ids_keep.shape[0] != tokens.shape[0]:
                raise ValueError(f"ids_keep must have shape [B={tokens.shape[0]}, K], "
                                 f"got {tuple(ids_keep.shape)}")
            tokens = torch.gather(tokens, 1, ids_keep[:, :, None].expand(-1, -1, tokens.shape[-1]))
        return self.encode_tokens(tokens, include_cls, return_hidden_states)

    def forward(self, images: Tensor) -> Tensor:
        """All tokens ``[B, 1 + L, hidden]`` (cls first) of ``images [B, C, D, H, W]``."""
        return self.forward_features(images)
