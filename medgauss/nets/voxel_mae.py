"""Voxel-MAE baseline: the same ViT3D encoder with a standard MAE patch-pixel decoder."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from medgauss.nets.decoders import PatchDecoder
from medgauss.nets.masking import num_masked_patches, random_masking
from medgauss.nets.patches import mask_to_volume, unpatchify
from medgauss.nets.pretrained import PretrainedMixin, config_from_locals
from medgauss.nets.vit3d import ViT3D

__all__ = ["VoxelMAE", "VoxelMAEOutput"]


@dataclass
class VoxelMAEOutput:
    """What :class:`VoxelMAE` returns.

    Attributes:
        pred: ``[B, L, C * pd * ph * pw]`` predicted voxels of every patch (order of
            :func:`medgauss.nets.patches.patchify`).
        mask: ``[B, L]`` bool, True = hidden patch; ``ids_restore [B, L]``, ``ids_keep [B, K]``.
        grid_size, patch_size: patch grid and patch size ``(D, H, W)``.
    """

    pred: Tensor
    mask: Tensor
    ids_restore: Tensor
    ids_keep: Tensor
    grid_size: tuple[int, int, int]
    patch_size: tuple[int, int, int]


class VoxelMAE(PretrainedMixin, nn.Module):
    """MAE with voxel targets (the baseline MedGMAE is compared against).

    Arguments as :class:`GaussianMAE` (encoder, decoder trunk, ``mask_ratio``), and
    ``mask_pool_sigma``: hidden patches' tokens start from the distance-weighted mean of the visible
    tokens around them (width in patch widths; ``None`` = MAE's plain mask token), see
    :class:`medgauss.nets.decoders.PatchDecoder`.
    """

    def __init__(self, img_size: int | Sequence[int] = 96, patch_size: int | Sequence[int] = 16,
                 in_channels: int = 1, hidden_size: int = 768, num_layers: int = 12, num_heads: int = 12,
                 mlp_dim: int = 3072, qkv_bias: bool = False, drop_path_rate: float = 0.0,
                 decoder_dim: int = 512, decoder_depth: int = 8, decoder_heads: int = 16,
                 decoder_mlp_ratio: float = 4.0, mask_ratio: float = 0.75,
                 mask_pool_sigma: float | None = None) -> None:
        super().__init__()
        self.init_config = config_from_locals(locals())
        self.encoder = ViT3D(img_size, patch_size, in_channels, hidden_size, num_layers, num_heads, mlp_dim,
                             qkv_bias, drop_path_rate)
        num_masked_patches(self.encoder.num_patches, mask_ratio)
        self.mask_ratio = float(mask_ratio)
        self.in_channels = in_channels
        self.patch_values = in_channels * math.prod(self.encoder.patch_size)
        self.decoder = PatchDecoder(hidden_size, self.encoder.grid_size, decoder_dim, decoder_depth,
                                    decoder_heads, self.patch_values, decoder_mlp_ratio,
                                    mask_pool_sigma=mask_pool_sigma)

    def forward(self, images: Tensor, noise: Tensor | None = None) -> VoxelMAEOutput:
        """``images [B, C, D, H, W]`` in ``[0, 1]`` (optional masking ``noise [B, L]``)
        -> :class:`VoxelMAEOutput`."""
        tokens = self.encoder.embed(images)
        masking = random_masking(tokens, self.mask_ratio, noise)
        latent = self.encoder.encode_tokens(masking.kept)
        pred = self.decoder(latent, masking.ids_restore)
        return VoxelMAEOutput(pred, masking.mask, masking.ids_restore, masking.ids_keep,
                              self.encoder.grid_size, self.encoder.patch_size)

    def reconstruct(self, out: VoxelMAEOutput, images_shape: Sequence[int]) -> Tensor:
        """Unpatchified prediction ``[B, C, D, H, W]`` (``images_shape`` only checked against the grid)."""
        spatial = tuple(images_shape)[-3:]
        expected = tuple(g * p for g, p in zip(out.grid_size, out.patch_size))
        if spatial != expected:
            raise ValueError(f"images_shape {tuple(images_shape)} does not match the prediction "
                             f"grid {expected}")
        return unpatchify(out.pred, out.patch_size, out.grid_size, self.in_channels)

    def mask_to_volume(self, mask: Tensor) -> Tensor:
        """Patch mask ``[B, L]`` -> voxel mask ``[B, 1, D, H, W]`` bool (True = hidden voxel)."""
        return mask_to_volume(mask, self.encoder.grid_size, self.encoder.patch_size)
