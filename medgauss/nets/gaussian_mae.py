"""MedGMAE: masked autoencoding of 3D volumes with Gaussians as the reconstruction target.

The encoder sees the visible patches only; a query decoder predicts ``num_queries`` Gaussians (plus,
for MedGMAE*, residual levels of children) whose splat is compared with the hidden voxels by
:class:`medgauss.losses.MaskedGaussianLoss`. The model never computes its loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from medgauss.gaussians import Gaussians
from medgauss.nets.decoders import (
    QUERY_MODES,
    GaussianHeads,
    GaussianQueryDecoder,
    anchor_grid_shape,
    anchor_points,
)
from medgauss.nets.hierarchy import ResidualLevels
from medgauss.nets.masking import num_masked_patches, random_masking
from medgauss.nets.patches import mask_to_volume
from medgauss.nets.pretrained import PretrainedMixin, config_from_locals
from medgauss.nets.vit3d import ViT3D
from medgauss.render import splat

__all__ = ["GaussianMAE", "GaussianMAEOutput"]


@dataclass
class GaussianMAEOutput:
    """What :class:`GaussianMAE` returns.

    Attributes:
        gaussians: ``B x N`` Gaussians in normalised volume coordinates of the input crop (component
            ``a`` along array axis ``a``: (z, y, x) in the medgauss frame), all levels concatenated
            (level 0 first, then each residual level; ``level_sizes`` gives their lengths). World mm:
            ``gaussians_to_world(out.gaussians, crop_shape, affine=crop["affine"])``.
        mask: ``[B, L]`` bool, True = patch hidden from the encoder.
        ids_restore: ``[B, L]`` int64 un-shuffle indices; ``ids_keep``: ``[B, K]`` visible patch indices.
        grid_size, patch_size: patch grid and patch size ``(D, H, W)`` that ``mask`` refers to.
        level_sizes: Gaussians per level, e.g. ``(N0,)`` or ``(N0, m1*N0, m2*N0)``.
    """

    gaussians: Gaussians
    mask: Tensor
    ids_restore: Tensor
    ids_keep: Tensor
    grid_size: tuple[int, int, int]
    patch_size: tuple[int, int, int]
    level_sizes: tuple[int, ...]


class GaussianMAE(PretrainedMixin, nn.Module):
    """MedGMAE (``children_per_level=()``) and MedGMAE* (residual levels) pretraining model.

    Args:
        img_size, patch_size, in_channels: input geometry (see :class:`ViT3D`).
        hidden_size, num_layers, num_heads, mlp_dim, qkv_bias, drop_path_rate: the :class:`ViT3D` encoder.
        decoder_dim, decoder_depth, decoder_heads, decoder_mlp_ratio: the query decoder.
        num_queries: level-0 Gaussians ``N0``.
        max_scale: upper bound of level-0 scales, as a fraction of the crop edge (init ~0.2 of it).
        mask_ratio: fraction of patches hidden per sample.
        children_per_level: MedGMAE* children per level-0 Gaussian at levels 1, 2, ...
            (``()`` = plain MedGMAE).
        scale_offsets: ``delta_l`` per residual level (0.02, 0.05 for two levels).
        sigma_scale, sigma_mean, sigma_intensity, sigma_rotation: residual bounds, see
            :class:`medgauss.nets.hierarchy.ResidualLevels`.
        min_scale: lower bound of every scale, all levels (fraction of the crop edge; 2e-3 is 0.2
            voxel of a 96^3 crop): keeps Gaussians representable in float32.
        query_mode: ``"free"`` (the paper's free learnable queries, centres anywhere in the crop) or
            ``"anchored"`` (each level-0 query tied to a cell of a regular anchor grid over the crop,
            ``num_queries`` = g0 * g1 * g2 with the most cubic cells, see
            :func:`medgauss.nets.decoders.anchor_grid_shape`; its centre is a bounded offset from the
            cell centre). See :mod:`medgauss.nets.decoders`. Residual levels refine level 0 either way.
        anchor_offset: anchored mode only: the largest offset of a centre from its anchor per axis, in
            normalised units (fraction of the crop edge); ``None`` = 1.5 anchor cell widths per axis.
        anchor_pool_sigma: anchored mode only: add to each query the Gaussian-weighted mean of the
            visible tokens around its anchor (width ``sigma`` in patch widths, see
            :meth:`medgauss.nets.decoders.GaussianQueryDecoder.anchor_pool`); ``None`` = off.

    ``forward(images [B, C, D, H, W] in [0, 1]) -> GaussianMAEOutput``.
    """

    def __init__(self, img_size: int | Sequence[int] = 96, patch_size: int | Sequence[int] = 16,
                 in_channels: int = 1, hidden_size: int = 768, num_layers: int = 12, num_heads: int = 12,
                 mlp_dim: int = 3072, qkv_bias: bool = False, drop_path_rate: float = 0.0,
                 decoder_dim: int = 512, decoder_depth: int = 8, decoder_heads: int = 16,
                 decoder_mlp_ratio: float = 4.0, num_queries: int = 512, max_scale: float = 0.1,
                 mask_ratio: float = 0.75, children_per_level: Sequence[int] = (),
                 scale_offsets: Sequence[float] = (0.02, 0.05), sigma_scale: float = 0.1,
                 sigma_mean: float = 0.05, sigma_intensity: float = 0.1, sigma_rotation: float = 0.1,
                 min_scale: float = 2e-3, query_mode: str = "free", anchor_offset: float | None = None,
                 anchor_pool_sigma: float | None = None) -> None:
        super().__init__()
        self.init_config = config_from_locals(locals())
        if query_mode not in QUERY_MODES:
            raise ValueError(f"query_mode must be one of {QUERY_MODES}, got {query_mode!r}")
        for option, value in (("anchor_offset", anchor_offset), ("anchor_pool_sigma", anchor_pool_sigma)):
            if query_mode == "free" and value is not None:
                raise ValueError(f"{option}={value!r} applies to query_mode='anchored' only")
        self.query_mode = query_mode
        self.encoder = ViT3D(img_size, patch_size, in_channels, hidden_size, num_layers, num_heads, mlp_dim,
                             qkv_bias, drop_path_rate)
        num_masked_patches(self.encoder.num_patches, mask_ratio)  # validates mask_ratio
        self.mask_ratio = float(mask_ratio)
        self.anchor_grid = (anchor_grid_shape(num_queries, self.encoder.img_size)
                            if query_mode == "anchored" else None)
        anchors = None if self.anchor_grid is None else anchor_points(self.anchor_grid)
        self.decoder = GaussianQueryDecoder(hidden_size, self.encoder.grid_size, decoder_dim, decoder_depth,
                                            decoder_heads, num_queries, decoder_mlp_ratio, anchors=anchors,
                                            anchor_pool_sigma=anchor_pool_sigma)
        self.heads = GaussianHeads(decoder_dim, max_scale, min_scale, anchors=anchors, grid=self.anchor_grid,
                                   max_offset=anchor_offset)
        children = tuple(children_per_level)
        if len(tuple(scale_offsets)) < len(children):
            raise ValueError(f"scale_offsets {tuple(scale_offsets)} needs one entry per residual level "
                             f"(children_per_level {children})")
        offsets = tuple(scale_offsets)[:len(children)]
        self.levels = (ResidualLevels(decoder_dim, children, offsets, sigma_scale,
                                      sigma_mean, sigma_intensity, sigma_rotation, min_scale)
                       if children else None)
        self.level_sizes = (num_queries, *(m * num_queries for m in children))

    @property
    def num_gaussians(self) -> int:
        """Gaussians per sample, all levels."""
        return sum(self.level_sizes)

    def forward(self, images: Tensor, noise: Tensor | None = None,
                mask_ratio: float | None = None) -> GaussianMAEOutput:
        """Mask, encode the visible patches, decode Gaussians.

        Args:
            images: ``[B, in_channels, *img_size]`` float, intensities in ``[0, 1]``.
            noise: optional ``[B, L]`` masking scores (lowest kept); default random.
            mask_ratio: fraction of patches to hide for this call, in ``[0, 1)``; ``None`` (default) uses
                the model's ``mask_ratio``. ``0.0`` shows the encoder every patch (inference, e.g.
                :func:`medgauss.recon.gaussian.decoder_init.init_from_decoder`): without ``noise`` the
                patches then stay in their original order and no random numbers are drawn.
        """
        tokens = self.encoder.embed(images)
        ratio = self.mask_ratio if mask_ratio is None else float(mask_ratio)
        if mask_ratio is not None and ratio == 0.0 and noise is None:
            b, length = tokens.shape[:2]
            noise = torch.arange(length, dtype=torch.float32, device=tokens.device).expand(b, length)
        masking = random_masking(tokens, ratio, noise)
        latent = self.encoder.encode_tokens(masking.kept)
        features = self.decoder(latent, masking.ids_keep)
        # Gaussian parameters are always computed in (at least) float32, also under bf16/fp16 autocast:
        # renderers and the container expect full-precision geometry.
        if features.dtype in (torch.float16, torch.bfloat16):
            features = features.float()
        with torch.autocast(device_type=features.device.type, enabled=False):
            base = self.heads(features)
            levels = [] if self.levels is None else self.levels(base, features)
        gaussians = Gaussians.cat([base, *levels], dim=1) if levels else base
        return GaussianMAEOutput(gaussians, masking.mask, masking.ids_restore, masking.ids_keep,
                                 self.encoder.grid_size, self.encoder.patch_size, self.level_sizes)

    def reconstruct(self, out: GaussianMAEOutput, images_shape: Sequence[int],
                    backend: str = "auto") -> Tensor:
        """Dense splat of ``out.gaussians`` on the voxel grid of ``images_shape`` (``[B, C, D, H, W]`` or
        ``(D, H, W)``) -> ``[B, 1, D, H, W]``."""
        return splat(out.gaussians, tuple(images_shape)[-3:], backend=backend)

    def mask_to_volume(self, mask: Tensor) -> Tensor:
        """Patch mask ``[B, L]`` -> voxel mask ``[B, 1, D, H, W]`` bool (True = hidden voxel)."""
        return mask_to_volume(mask, self.encoder.grid_size, self.encoder.patch_size)
