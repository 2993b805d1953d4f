"""MAE decoders: the Gaussian query decoder (MedGMAE) and the voxel patch decoder (MAE baseline)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import Tensor, nn

from medgauss.gaussians import Gaussians
from medgauss.nets.blocks import init_linear_and_norm, sincos_pos_embed_3d, transformer_blocks

__all__ = ["GaussianHeads", "GaussianQueryDecoder", "PatchDecoder", "HEAD_BIAS_INIT"]

# Initial head biases (centre, scale, rotation, intensity): sigmoid(-1.386) = 0.2 of the scale range,
# sigmoid(-0.405) = 0.4 intensity, centres at the volume centre before the Xavier-initialised weights act.
HEAD_BIAS_INIT = {"center": 0.0, "scale": -1.386, "rotation": 0.0, "intensity": -0.405}


class GaussianHeads(nn.Module):
    """Four linear heads from query features ``[B, N, dim]`` to Gaussian parameters.

    centre ``sigmoid`` (normalised coordinates in ``(0, 1)``), scale
    ``min_scale + sigmoid * (max_scale - min_scale)`` (fraction of the crop edge), rotation
    L2-normalised quaternion (w, x, y, z), intensity ``sigmoid``. Weights Xavier-uniform, biases
    :data:`HEAD_BIAS_INIT`.

    The floor ``min_scale`` keeps Gaussians from collapsing into sub-voxel needles: a saturated
    sigmoid would otherwise give scales of 1e-5 whose float32 precision matrices are not even
    positive definite (seen with the ``base`` decoder at initialisation, whose head inputs have
    standard deviation ~1.4).
    """

    def __init__(self, dim: int, max_scale: float, min_scale: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= min_scale < max_scale:
            raise ValueError(f"scales need 0 <= min_scale < max_scale, got min_scale={min_scale}, "
                             f"max_scale={max_scale}")
        self.max_scale = float(max_scale)
        self.min_scale = float(min_scale)
        self.center = nn.Linear(dim, 3)
        self.scale = nn.Linear(dim, 3)
        self.rotation = nn.Linear(dim, 4)
        self.intensity = nn.Linear(dim, 1)
        for name, bias in HEAD_BIAS_INIT.items():
            layer = getattr(self, name)
            nn.init.xavier_uniform_(layer.weight)
            nn.init.constant_(layer.bias, bias)

    def forward(self, features: Tensor) -> Gaussians:
        """``features [B, N, dim]`` -> :class:`Gaussians` with ``B x N`` entries (normalised coordinates)."""
        means = torch.sigmoid(self.center(features))
        scales = self.min_scale + torch.sigmoid(self.scale(features)) * (self.max_scale - self.min_scale)
        quats = F.normalize(self.rotation(features), dim=-1, eps=1e-8)
        intensities = torch.sigmoid(self.intensity(features)).squeeze(-1)
        return Gaussians(means, scales, quats, intensities, validate=False)


class GaussianQueryDecoder(nn.Module):
    """Transformer decoder that turns encoder tokens into ``num_queries`` Gaussian query features.

    Input sequence: ``[projected cls] + num_queries learnable query tokens + projected visible tokens``;
    visible tokens get fixed 3D sin-cos decoder position embeddings of their patch, queries are free
    (their learnable values act as their embedding). Returns the queries' output features.
    """

    def __init__(self, encoder_dim: int, grid_size: tuple[int, int, int], decoder_dim: int, depth: int,
                 num_heads: int, num_queries: int, mlp_ratio: float = 4.0,
                 drop_path_rate: float = 0.0) -> None:
        super().__init__()
        if num_queries < 1:
            raise ValueError(f"num_queries must be >= 1, got {num_queries}")
        self.num_queries = num_queries
        self.embed = nn.Linear(encoder_dim, decoder_dim)
        self.query_tokens = nn.Parameter(torch.zeros(1, num_queries, decoder_dim))
        self.register_buffer("pos_embed", sincos_pos_embed_3d(grid_size, decoder_dim)[None], persistent=False)
        self.blocks = transformer_blocks(decoder_dim, depth, num_heads, int(decoder_dim * mlp_ratio),
                                         qkv_bias=True, drop_path_rate=drop_path_rate)
        self.norm = nn.LayerNorm(decoder_dim)
        self.apply(init_linear_and_norm)
        # Unit-scale queries (like nn.Embedding / DETR queries): with MAE's 0.02 the queries are drowned by
        # the shared attention output, all decode to nearly the same Gaussian, their overlap overshoots the
        # target and training switches every Gaussian off (measured: centre spread 0.1 vs 0.25 with 1.0).
        trunc_normal_(self.query_tokens, std=1.0)

    def forward(self, latent: Tensor, ids_keep: Tensor) -> Tensor:
        """``latent [B, 1 + K, encoder_dim]`` (cls first), ``ids_keep [B, K]``
        -> query features ``[B, num_queries, decoder_dim]``."""
        x = self.embed(latent)
        b, dim = x.shape[0], x.shape[-1]
        pos = self.pos_embed.expand(b, -1, -1).to(x.dtype)
        pos = torch.gather(pos, 1, ids_keep[:, :, None].expand(-1, -1, dim))
        queries = self.query_tokens.expand(b, -1, -1).to(x.dtype)
        x = torch.cat([x[:, :1], queries, x[:, 1:] + pos], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x[:, 1:1 + self.num_queries])


class PatchDecoder(nn.Module):
    """Standard MAE decoder: mask tokens fill hidden patches, sin-cos position embeddings,
    linear voxel head."""

    def __init__(self, encoder_dim: int, grid_size: tuple[int, int, int], decoder_dim: int, depth: int,
                 num_heads: int, patch_values: int, mlp_ratio: float = 4.0,
                 drop_path_rate: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Linear(encoder_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer("pos_embed", sincos_pos_embed_3d(grid_size, decoder_dim)[None], persistent=False)
        self.blocks = transformer_blocks(decoder_dim, depth, num_heads, int(decoder_dim * mlp_ratio),
                                         qkv_bias=True, drop_path_rate=drop_path_rate)
        self.norm = nn.LayerNorm(decoder_dim)
        self.head = nn.Linear(decoder_dim, patch_values)
        self.apply(init_linear_and_norm)
        trunc_normal_(self.mask_token, std=0.02)

    def forward(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        """``latent [B, 1 + K, encoder_dim]``, ``ids_restore [B, L]``
        -> patch values ``[B, L, patch_values]``."""
        x = self.embed(latent)
        b, dim = x.shape[0], x.shape[-1]
        length = ids_restore.shape[1]
        hidden = self.mask_token.to(x.dtype).expand(b, length + 1 - x.shape[1], -1)
        tokens = torch.cat([x[:, 1:], hidden], dim=1)
        tokens = torch.gather(tokens, 1, ids_restore[:, :, None].expand(-1, -1, dim))
        x = torch.cat([x[:, :1], tokens + self.pos_embed.to(x.dtype)], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))[:, 1:]
