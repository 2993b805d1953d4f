"""X-GRM: feed-forward sparse-view CT reconstruction (per-view ViT + Plücker ModLN + fusion ViT + VoxGS).

``K`` log-projections ``[B, K, H, W]`` and their geometry -> the CT volume on an output grid, in one pass:

1. **Per-view encoder** (shared by all views): ``patch_size`` x ``patch_size`` patches of the 1-channel
   projection (times ``projection_scale``), a learnable position embedding (2-D sin-cos at
   initialisation, the same for every view), timm ``Block`` s, a final LayerNorm.
2. **Camera conditioning** (``pose_conditioning``):

   * ``"modln"`` (the paper's): every LayerNorm inside every encoder block is modulated by the
     Plücker embedding of its patch's centre ray, ``ModLN(h) = LN(h) * (1 + gamma) + beta``, with
     ``(gamma, beta)`` per block and per norm from ``Linear(SiLU(pose_mlp(plucker)))`` (adaLN, as in
     DiT / LRM);
   * ``"add"``: a linear embedding of the Plücker map is added to the patch tokens;
   * ``"none"``: no camera information in the encoder (the views are still placed by the decoder).

   The Plücker maps are ``geometry.plucker(downsample=patch_size)``: for a detector whose size is a
   multiple of ``patch_size``, pixel ``(i, j)`` of that downsampled detector is centred exactly at
   full-resolution pixel ``(p i + (p - 1) / 2, p j + (p - 1) / 2)``, the centre of patch ``(i, j)``
   (see ``test_plucker_downsample_is_patch_centres``). Inside the model they are expressed in the
   output grid's normalised frame: the direction ``d`` is kept, the moment becomes
   ``((o - c) x d) / R = (m - c x d) / R`` with ``c`` the grid's centre and ``R`` half its longest edge
   (mm), so the rays of a grid scaled to ``[-1, 1]`` have moments of order one.
3. **Fusion ViT**: self-attention over the tokens of all ``K`` views together. No view-index embedding:
   the output is equivariant to permutations of the views (and invariant after the decoder's max-pool).
4. **Upsampler**: ``Linear(fusion_size -> r * r * feature_dim)`` + pixel shuffle: per-view feature maps
   ``[B, K, feature_dim, r H / p, r W / p]`` (``r = upsample_factor``; ``r = 1`` samples the token grid).
5. **VoxGS decoder** (:class:`medgauss.nets.voxgs.VoxGSDecoder`): one Gaussian per voxel centre, the
   volume is its opacities.

Parts from the LRM family (constructor options; the defaults are the model above, bit for bit):

* ``upsampler="transformer"`` (GRM's upsampler, :class:`TransformerUpsampler`): ``log2(r)`` steps of
  ``Linear(c -> 4 c')`` + pixel shuffle x2 (``c' = max(feature_dim, c / 2)``), each followed by a pre-norm
  block of windowed self-attention (non-overlapping ``w x w`` pixel windows of each view's map, tiled from
  its corner; a map smaller than ``w`` is one window, a ragged edge is padded and the padding masked) and
  an MLP; then ``LayerNorm`` + ``Linear(c -> feature_dim)``. Windows never span views: the output stays
  equivariant to the order of the views. ``r`` must be a power of 2.
* ``token_merge=True`` (Long-LRM's token merge): a ``Conv2d(hidden_size -> fusion_size, 2, stride 2)`` on
  each view's ``H / p x W / p`` token grid (which must be even: no padding) replaces ``fusion_in``, so the
  fusion ViT sees 4x fewer tokens (24-48 views stay affordable); the upsampler then upsamples by ``2 r``,
  so the feature maps keep their size ``r H / p x r W / p``.
* ``skip_empty=t`` (inference): the VoxGS decoder first decodes a coarse pass (27 voxels of every
  ``skip_block_size^3`` block) and skips the blocks whose largest opacity is below ``t``, writing opacity
  0 there (:meth:`medgauss.nets.voxgs.VoxGSDecoder.forward_skipping_empty`); ``XGRMOutput.skipped_fraction``
  reports the share of voxels skipped. Exact only where a skipped block truly is empty (a model trained
  with ``XGRMLoss(lambda_opacity_l1=...)`` drives its air towards 0); ``t = 0`` never skips.

Choices where the paper is silent (see ``PAPERS.md``): 1-channel input (a pretrained RGB patch embedding
is summed over its colour channels), a ModLN MLP of ``6 -> pose_dim -> pose_dim`` shared by all blocks
followed by a per-block ``Linear(pose_dim -> 4 hidden)``, the moment normalisation above, the pixel-shuffle
upsampler to ``H / 4``, a 3-layer decoder MLP of width 128, softplus opacities, scales bounded to
``[0.25, 1]`` voxels.

The model returns predictions only; losses live in :mod:`medgauss.losses`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from medgauss.gaussians import Gaussians
from medgauss.nets.blocks import init_linear_and_norm, transformer_blocks
from medgauss.nets.pretrained import PretrainedMixin, config_from_locals
from medgauss.nets.upsamplers import TransformerUpsampler
from medgauss.nets.voxgs import VoxGSDecoder, box_affine, check_box, check_grid

__all__ = ["XGRM", "XGRMOutput", "POSE_CONDITIONING", "UPSAMPLERS", "geometry_inputs", "normalize_plucker",
           "grid_frame", "modulated_layer_norm", "load_vit_weights"]

POSE_CONDITIONING = ("modln", "add", "none")
UPSAMPLERS = ("linear", "transformer")
MODEL_SETTING = "model"
"""Default of :meth:`XGRM.forward`'s ``skip_empty``: the model's own setting (applied in eval mode only)."""
_MODULATION_STD = 1e-3  # ModLN starts close to plain LN (a pretrained ViT keeps its behaviour) yet trains


@dataclass
class XGRMOutput:
    """What :class:`XGRM` returns.

    Attributes:
        gaussians: ``B x (d h w)`` Gaussians in world mm (float32), one per voxel of the decoded box, in C
            order; ``intensities`` are the opacities.
        volume: ``[B, 1, d, h, w]`` the opacities reshaped (a view of ``gaussians.intensities``).
        box_start: ``[B, 3]`` int64 first voxel ``(d, h, w)`` of the decoded box in the grid.
        box_size: ``(d, h, w)`` of the decoded box (the grid shape for a full decode).
        affine: ``[B, 4, 4]`` float64 voxel-to-world affine of ``volume`` (the box's).
        skipped_fraction: ``[B]`` float64 share of each box's voxels that ``skip_empty`` did not decode (written
            as opacity 0); ``None`` when no coarse pass ran (``skip_empty`` off).
    """

    gaussians: Gaussians
    volume: Tensor
    box_start: Tensor
    box_size: tuple[int, int, int]
    affine: Tensor
    skipped_fraction: Tensor | None = None


def modulated_layer_norm(norm: nn.Module, h: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
    """ModLN: ``norm(h) * (1 + gamma) + beta`` (``gamma``, ``beta`` broadcast against ``h [..., dim]``)."""
    return norm(h) * (1.0 + gamma) + beta


def _modulated_block(block: nn.Module, x: Tensor, modulation: Tensor | None) -> Tensor:
    """A timm ``Block`` whose two LayerNorms are ModLN; ``modulation [N, L, 4, dim]`` = (g1, b1, g2, b2)."""
    if modulation is None:
        return block(x)
    g1, b1, g2, b2 = modulation.unbind(dim=2)
    x = x + block.drop_path1(block.ls1(block.attn(modulated_layer_norm(block.norm1, x, g1, b1))))
    return x + block.drop_path2(block.ls2(block.mlp(modulated_layer_norm(block.norm2, x, g2, b2))))


def _sincos_2d(grid: tuple[int, int], dim: int) -> Tensor:
    """Fixed 2-D sin-cos embeddings ``[gh * gw, dim]`` (rows then columns, C order); spare channels zero."""
    per_axis = 2 * (dim // 4)
    omega = 1.0 / 10000.0 ** (torch.arange(per_axis // 2, dtype=torch.float64) / max(1, per_axis // 2))
    parts = []
    for axis in torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij"):
        angles = axis.reshape(-1, 1).to(torch.float64) * omega[None]
        parts += [angles.sin(), angles.cos()]
    emb = torch.cat(parts, dim=1)
    return torch.cat([emb, emb.new_zeros(emb.shape[0], dim - emb.shape[1])], dim=1).float()


def normalize_plucker(plucker: Tensor, centre: Tensor, radius: Tensor) -> Tensor:
    """Plücker maps ``[B, K, 6, h, w]`` (direction, moment mm about the world origin) -> the grid's frame.

    Returns ``(d, (m - c x d) / R)``: the moment about the grid centre ``c [B, 3]`` mm in units of
    ``R [B]`` mm.
    """
    d, m = plucker[:, :, :3], plucker[:, :, 3:]
    c = centre.to(plucker)[:, None, :, None, None].expand_as(d)
    moment = (m - torch.linalg.cross(c, d, dim=2)) / radius.to(plucker)[:, None, None, None, None]
    return torch.cat((d, moment), dim=2)


def grid_frame(grid_shape: tuple[int, int, int], affine: Tensor) -> tuple[Tensor, Tensor]:
    """Centre ``[B, 3]`` (world mm) and half the longest edge ``[B]`` (mm) of grids ``affine [B, 4, 4]``."""
    shape = torch.tensor(grid_shape, dtype=torch.float64, device=affine.device)
    centre = affine[:, :3, :3] @ ((shape - 1) / 2) + affine[:, :3, 3]
    edges = affine[:, :3, :3].norm(dim=1) * shape  # world length of each array axis
    return centre, 0.5 * edges.amax(dim=1)


class ViewEncoder(nn.Module):
    """Per-view ViT on 1-channel projections with optional Plücker conditioning (see the module doc)."""

    def __init__(self, img_size: tuple[int, int], patch_size: int, hidden_size: int, num_layers: int,
                 num_heads: int, mlp_dim: int, qkv_bias: bool, drop_path_rate: float, pose_conditioning: str,
                 pose_dim: int) -> None:
        super().__init__()
        self.grid = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.pose_conditioning = pose_conditioning
        self.patch_embed = nn.Conv2d(1, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(_sincos_2d(self.grid, hidden_size)[None])
        self.blocks = transformer_blocks(hidden_size, num_layers, num_heads, mlp_dim, qkv_bias, drop_path_rate)
        self.norm = nn.LayerNorm(hidden_size)
        self.pose_embed: nn.Module | None = None
        self.modulation: nn.ModuleList | None = None
        if pose_conditioning == "modln":
            self.pose_embed = nn.Sequential(nn.Linear(6, pose_dim), nn.SiLU(), nn.Linear(pose_dim, pose_dim))
            self.modulation = nn.ModuleList(
                nn.Sequential(nn.SiLU(), nn.Linear(pose_dim, 4 * hidden_size)) for _ in range(num_layers))
        elif pose_conditioning == "add":
            self.pose_embed = nn.Linear(6, hidden_size)
        self.grad_checkpointing = False
        self.apply(init_linear_and_norm)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        for mod in self.modulation or ():
            nn.init.normal_(mod[-1].weight, std=_MODULATION_STD)

    def forward(self, images: Tensor, plucker: Tensor | None) -> Tensor:
        """``images [N, 1, H, W]``, normalised ``plucker [N, 6, gh, gw]`` -> tokens ``[N, gh * gw, hidden]``."""
        x = self.patch_embed(images).flatten(2).transpose(1, 2) + self.pos_embed
        pose = None if plucker is None or self.pose_embed is None else self.pose_embed(
            plucker.flatten(2).transpose(1, 2).to(x.dtype))
        if self.pose_conditioning == "add":
            x = x + pose
        for i, block in enumerate(self.blocks):
            mod = None
            if self.modulation is not None:
                mod = self.modulation[i](pose).unflatten(-1, (4, x.shape[-1]))
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(_modulated_block, block, x, mod, use_reentrant=False)
            else:
                x = _modulated_block(block, x, mod)
        return self.norm(x)


class XGRM(PretrainedMixin, nn.Module):
    """X-GRM sparse-view CT reconstruction model (see the module docstring for the architecture).

    Args:
        img_size: projection size ``(H, W)`` (int = square), a multiple of ``patch_size``.
        patch_size: patch edge of the per-view encoder (16 in the paper).
        hidden_size, num_layers, num_heads, mlp_dim, qkv_bias: the per-view ViT (ViT-B/16: 768, 12, 12, 3072,
            True as in timm / DINO checkpoints).
        fusion_size, fusion_layers, fusion_heads, fusion_mlp_dim: the fusion ViT (``fusion_layers=0``:
            no fusion, the "w/o attention" ablation).
        pose_conditioning: ``"modln"`` | ``"add"`` | ``"none"``.
        pose_dim: width of the Plücker MLP of ModLN (``None`` = ``hidden_size``).
        feature_dim, upsample_factor: channels and upsampling of the per-view feature maps.
        decoder_hidden, decoder_layers, min_scale, max_scale, shift, max_shift: the
            :class:`~medgauss.nets.voxgs.VoxGSDecoder`.
        projection_scale: factor applied to the projections (line integrals, value x mm) before the
            patch embedding, so that typical inputs are of order one.
        drop_path_rate: stochastic depth of the last block of both ViTs.
        grad_checkpointing: recompute transformer blocks and decoder chunks in the backward pass.
        chunk_size: voxels decoded at once (default of :meth:`forward`'s ``chunk_size``).
        pretrained: optional local file (``.safetensors`` or a ``torch.save`` state dict, read with
            ``weights_only=True``) of a timm / DINO ViT whose patch embedding, position embedding, blocks
            and final norm initialise the per-view encoder (:func:`load_vit_weights`). Nothing is ever
            downloaded. Not stored in the saved config: a checkpoint holds the weights themselves.
        decoder: ``"voxgs"`` (:class:`~medgauss.nets.voxgs.VoxGSDecoder`, the paper's) or ``"iterative"``
            (:class:`~medgauss.nets.ilrm.IterativeGaussianDecoder`, iLRM-style query refinement; it reads
            ``feature_dim``, ``min_scale``, ``max_scale``, ``shift`` and ``max_shift``, not ``decoder_hidden`` /
            ``decoder_layers``).
        decoder_options: further keyword arguments of the iterative decoder (``None`` for ``"voxgs"``).
        upsampler: ``"linear"`` (``Linear`` + pixel shuffle, the default) or ``"transformer"`` (GRM's
            :class:`TransformerUpsampler`; needs a power-of-2 ``upsample_factor``).
        upsampler_window, upsampler_head_dim: window edge (pixels) and smallest head width of the
            transformer upsampler's attention (unused by ``"linear"``).
        token_merge: Long-LRM's 2x2 stride-2 convolution on each view's token grid before the fusion ViT
            (4x fewer fusion tokens; the token grid ``img_size / patch_size`` must be even on both axes).
        skip_empty: opacity threshold of empty-block skipping at inference (``None``: off), the default of
            :meth:`forward`'s ``skip_empty`` in eval mode (training-mode forwards decode every voxel unless
            ``forward`` is given ``skip_empty``). VoxGS decoder only. Exact only where the skipped blocks are
            truly empty (see the module docstring).
        skip_block_size: edge (voxels) of the blocks ``skip_empty`` decides on.

    ``forward(projections, projection_matrices, plucker, grid_shape, grid_affine) -> XGRMOutput``;
    :meth:`geometry_inputs` builds every argument after ``projections`` from a geometry, and
    :meth:`reconstruct` does both.
    """

    def __init__(self, img_size: int | Sequence[int] = 256, patch_size: int = 16, hidden_size: int = 768,
                 num_layers: int = 12, num_heads: int = 12, mlp_dim: int = 3072, qkv_bias: bool = True,
                 fusion_size: int = 768, fusion_layers: int = 12, fusion_heads: int = 12,
                 fusion_mlp_dim: int = 3072, pose_conditioning: str = "modln", pose_dim: int | None = None,
                 feature_dim: int = 64, upsample_factor: int = 4, decoder_hidden: int = 128,
                 decoder_layers: int = 3, min_scale: float = 0.25, max_scale: float = 1.0, shift: bool = False,
                 max_shift: float = 0.5, projection_scale: float = 0.01, drop_path_rate: float = 0.0,
                 grad_checkpointing: bool = False, chunk_size: int = 65536, pretrained: str | None = None,
                 decoder: str = "voxgs", decoder_options: dict[str, Any] | None = None, upsampler: str = "linear",
                 upsampler_window: int = 8, upsampler_head_dim: int = 32, token_merge: bool = False,
                 skip_empty: float | None = None, skip_block_size: int = 8) -> None:
        super().__init__()
        self.init_config = config_from_locals(locals())
        self.init_config["pretrained"] = None
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
            raise ValueError(f"img_size must be a positive int or (H, W), got {img_size!r}")
        if not isinstance(patch_size, int) or patch_size < 1 or size[0] % patch_size or size[1] % patch_size:
            raise ValueError(f"patch_size must be a positive int dividing img_size {size}, got {patch_size!r}")
        if pose_conditioning not in POSE_CONDITIONING:
            raise ValueError(f"pose_conditioning must be one of {POSE_CONDITIONING}, got {pose_conditioning!r}")
        if not isinstance(upsample_factor, int) or upsample_factor < 1:
            raise ValueError(f"upsample_factor must be a positive int, got {upsample_factor!r}")
        if not (math.isfinite(projection_scale) and projection_scale > 0):
            raise ValueError(f"projection_scale must be a positive number, got {projection_scale!r}")
        self._check_chunk(chunk_size)
        merge_factor = self._check_lrm_options(size, patch_size, upsample_factor, upsampler, upsampler_window,
                                               upsampler_head_dim, token_merge, decoder, skip_empty, skip_block_size)
        self.img_size, self.patch_size = size, patch_size
        self.pose_conditioning = pose_conditioning
        self.projection_scale = float(projection_scale)
        self.chunk_size = chunk_size
        self.upsample_factor = upsample_factor
        self.encoder = ViewEncoder(size, patch_size, hidden_size, num_layers, num_heads, mlp_dim, qkv_bias,
                                   drop_path_rate, pose_conditioning, pose_dim or hidden_size)
        self.token_merge = bool(token_merge)
        self.fusion_in = nn.Identity() if fusion_size == hidden_size or token_merge else \
            nn.Linear(hidden_size, fusion_size)
        self.fusion = transformer_blocks(fusion_size, fusion_layers, fusion_heads, fusion_mlp_dim, qkv_bias,
                                         drop_path_rate)
        self.fusion_norm = nn.LayerNorm(fusion_size)
        self.upsampler = upsampler
        self.fusion_upsampling = factor = upsample_factor * merge_factor  # the fusion grid -> the feature maps
        self.upsample: nn.Module = nn.Linear(fusion_size, factor ** 2 * feature_dim) if upsampler == "linear" else \
            TransformerUpsampler(fusion_size, feature_dim, factor, upsampler_window, upsampler_head_dim, qkv_bias)
        # --- decoder choice (issue 10: "voxgs" | "iterative", swappable by config) ---
        self.decoder_kind = decoder
        if decoder == "voxgs":
            if decoder_options:
                raise ValueError(f"decoder_options are for decoder='iterative'; got {decoder_options!r} with 'voxgs'")
            self.decoder = VoxGSDecoder(feature_dim, decoder_hidden, decoder_layers, min_scale, max_scale, shift,
                                        max_shift)
        elif decoder == "iterative":
            from medgauss.nets.ilrm import build_iterative_decoder  # ilrm imports this module

            self.decoder = build_iterative_decoder(feature_dim, min_scale, max_scale, shift, max_shift, decoder_options)
        else:
            raise ValueError(f"decoder must be 'voxgs' or 'iterative', got {decoder!r}")
        for module in (self.fusion_in, self.fusion, self.fusion_norm, self.upsample):
            module.apply(init_linear_and_norm)
        # --- Long-LRM token merge (issue 10); absent by default, so the default model is unchanged ---
        self.token_merger: nn.Conv2d | None = None
        if token_merge:
            self.token_merger = nn.Conv2d(hidden_size, fusion_size, kernel_size=2, stride=2)
            w = self.token_merger.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.zeros_(self.token_merger.bias)
        self.skip_empty = None if skip_empty is None else float(skip_empty)
        self.skip_block_size = skip_block_size
        self.grad_checkpointing = bool(grad_checkpointing)
        if pretrained is not None:
            load_vit_weights(self.encoder, pretrained)

    # ------------------------------------------------------------------ options
    @property
    def grad_checkpointing(self) -> bool:
        return self._grad_checkpointing

    @grad_checkpointing.setter
    def grad_checkpointing(self, enabled: bool) -> None:
        self._grad_checkpointing = bool(enabled)
        self.encoder.grad_checkpointing = bool(enabled)

    @staticmethod
    def _check_lrm_options(size: tuple[int, int], patch_size: int, upsample_factor: int, upsampler: object,
                           upsampler_window: object, upsampler_head_dim: object, token_merge: object, decoder: object,
                           skip_empty: object, skip_block_size: object) -> int:
        """Validate the LRM-family options; returns the token merge's factor (2 with ``token_merge``, else 1)."""
        if upsampler not in UPSAMPLERS:
            raise ValueError(f"upsampler must be one of {UPSAMPLERS}, got {upsampler!r}")
        if not isinstance(token_merge, bool):
            raise ValueError(f"token_merge must be a bool, got {token_merge!r}")
        grid = (size[0] // patch_size, size[1] // patch_size)
        if token_merge and (grid[0] % 2 or grid[1] % 2):
            raise ValueError(f"token_merge merges 2x2 tokens, so the token grid img_size / patch_size must be even on "
                             f"both axes; img_size {size} with patch_size {patch_size} gives {grid}")
        if upsampler == "transformer" and upsample_factor & (upsample_factor - 1):
            raise ValueError(f"upsampler='transformer' upsamples in steps of 2: upsample_factor must be a power of 2, "
                             f"got {upsample_factor}")
        for name, value in (("upsampler_window", upsampler_window), ("upsampler_head_dim", upsampler_head_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if skip_empty is not None:
            if isinstance(skip_empty, bool) or not isinstance(skip_empty, (int, float)) \
                    or not math.isfinite(skip_empty) or skip_empty < 0:
                raise ValueError(f"skip_empty must be None or a finite opacity >= 0, got {skip_empty!r}")
            if decoder != "voxgs":
                raise ValueError(f"skip_empty needs decoder='voxgs' (the iterative decoder has no cheap coarse pass: "
                                 f"its cost is the query refinement every block needs), got decoder={decoder!r}")
        if isinstance(skip_block_size, bool) or not isinstance(skip_block_size, int) or skip_block_size < 1:
            raise ValueError(f"skip_block_size must be a positive int (voxels), got {skip_block_size!r}")
        return 2 if token_merge else 1

    @staticmethod
    def _check_chunk(chunk_size: object) -> int:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        return chunk_size

    @property
    def token_grid(self) -> tuple[int, int]:
        """Patches per view ``(H / p, W / p)``: the Plücker map size."""
        return self.encoder.grid

    @property
    def fusion_grid(self) -> tuple[int, int]:
        """Tokens per view entering the fusion ViT: the token grid, halved on both axes by ``token_merge``."""
        gh, gw = self.encoder.grid
        return (gh // 2, gw // 2) if self.token_merge else (gh, gw)

    @property
    def feature_size(self) -> tuple[int, int]:
        """Per-view feature map size ``(r H / p, r W / p)`` (also with ``token_merge``)."""
        return tuple(g * self.upsample_factor for g in self.token_grid)  # type: ignore[return-value]

    # ------------------------------------------------------------------ inputs
    def geometry_inputs(self, geometry: Any, *, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32) -> dict[str, Any]:
        """:func:`geometry_inputs` with this model's ``patch_size`` and a check of its ``img_size``."""
        inputs = geometry_inputs(geometry, self.patch_size, device=device, dtype=dtype)
        if tuple(inputs["plucker"].shape[-2:]) != self.token_grid:
            raise ValueError(f"geometry has a detector of {inputs['image_size']} pixels; this model takes "
                             f"img_size={self.img_size} projections")
        del inputs["image_size"]
        return inputs

    def _check_inputs(self, projections: Tensor, projection_matrices: Tensor,
                      plucker: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Validate; returns ``projection_matrices`` and ``plucker`` broadcast to the batch."""
        if not isinstance(projections, Tensor) or not projections.is_floating_point():
            raise ValueError(f"projections must be a floating-point torch.Tensor [B, K, H, W], got "
                             f"{type(projections).__name__} {getattr(projections, 'dtype', '')}")
        if projections.ndim != 4 or tuple(projections.shape[2:]) != self.img_size or 0 in projections.shape[:2]:
            raise ValueError(f"projections must have shape [B, K, {self.img_size[0]}, {self.img_size[1]}] with "
                             f"B, K >= 1 (the model's img_size), got {tuple(projections.shape)}")
        b, k = projections.shape[:2]
        if not bool(torch.isfinite(projections).all()):
            raise ValueError("projections contains non-finite values (NaN or inf)")
        expected = {"projection_matrices": (b, k, 3, 4), "plucker": (b, k, 6, *self.token_grid)}
        for name, value in (("projection_matrices", projection_matrices), ("plucker", plucker)):
            if value is None and name == "plucker" and self.pose_conditioning == "none":
                continue
            if not isinstance(value, Tensor) or not value.is_floating_point():
                raise ValueError(f"{name} must be a floating-point torch.Tensor {list(expected[name])}, got "
                                 f"{type(value).__name__}")
            if tuple(value.shape) != expected[name] and tuple(value.shape) != (1, *expected[name][1:]):
                raise ValueError(f"{name} must have shape {list(expected[name])} (or 1 for B) to match projections "
                                 f"{tuple(projections.shape)} (one per view), got {tuple(value.shape)}")
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"{name} contains non-finite values (NaN or inf)")
        plucker = None if plucker is None else plucker.expand(b, *plucker.shape[1:])
        return projection_matrices.expand(b, *projection_matrices.shape[1:]), plucker

    # ------------------------------------------------------------------ forward
    def encode_views(self, projections: Tensor, plucker: Tensor | None, grid_shape: tuple[int, int, int],
                     grid_affine: Tensor) -> Tensor:
        """Per-view feature maps ``[B, K, feature_dim, r H / p, r W / p]`` (inputs validated by :meth:`forward`).

        ``grid_affine`` is ``[B, 4, 4]`` float64; it sets the frame of the Plücker moments.
        """
        b, k, h, w = projections.shape
        images = (projections * self.projection_scale).reshape(b * k, 1, h, w)
        images = images.to(self.encoder.patch_embed.weight.dtype)
        rays = None
        if plucker is not None and self.pose_conditioning != "none":
            centre, radius = grid_frame(grid_shape, grid_affine.to(plucker.device))
            rays = normalize_plucker(plucker, centre, radius).flatten(0, 1)
        tokens = self.encoder(images, rays)  # [BK, L, hidden]
        if self.token_merger is not None:  # 2x2 stride-2 convolution on each view's token grid
            grid = tokens.transpose(1, 2).reshape(b * k, tokens.shape[2], *self.token_grid)
            tokens = self.token_merger(grid).flatten(2).transpose(1, 2)  # [BK, L / 4, fusion]
        x = self.fusion_in(tokens).reshape(b, k * tokens.shape[1], -1)
        for block in self.fusion:
            x = checkpoint(block, x, use_reentrant=False) if self.grad_checkpointing and torch.is_grad_enabled() \
                else block(x)
        x = self.fusion_norm(x).reshape(b * k, tokens.shape[1], -1)
        gh, gw = self.fusion_grid
        if self.upsampler == "transformer":
            maps = self.upsample(x, (gh, gw), self.grad_checkpointing)
        else:
            maps = self.upsample(x).transpose(1, 2).reshape(b * k, -1, gh, gw)
            maps = F.pixel_shuffle(maps, self.fusion_upsampling)
        return maps.reshape(b, k, *maps.shape[1:])

    def forward(self, projections: Tensor, projection_matrices: Tensor, plucker: Tensor | None,
                grid_shape: Sequence[int], grid_affine: Tensor, *, box_start: Tensor | Sequence[int] | None = None,
                box_size: Sequence[int] | None = None, chunk_size: int | None = None,
                skip_empty: float | str | None = MODEL_SETTING) -> XGRMOutput:
        """Reconstruct the volume (or a sub-box of it) from ``K`` views.

        Args:
            projections: ``[B, K, H, W]`` log-projections (line integrals), any ``K >= 1``.
            projection_matrices: ``[B, K, 3, 4]`` world mm -> ``(col w, row w, w)`` of each view
                (``geometry.projection_matrices()``); a leading 1 instead of ``B`` is broadcast.
            plucker: ``[B, K, 6, H / p, W / p]`` ``geometry.plucker(downsample=patch_size)`` (patch
                centres; direction, moment mm; leading 1 broadcast). May be ``None`` with
                ``pose_conditioning="none"``.
            grid_shape: ``(D, H, W)`` voxels of the output grid.
            grid_affine: ``[4, 4]``, ``[1, 4, 4]`` or ``[B, 4, 4]`` voxel ``(d, h, w)`` -> world ``(x, y, z)`` mm
                of the grid (``geometry.volume_affine`` places it where ``medgauss.ct.forward_project`` does).
            box_start: decode only a box: ``[3]`` or ``[B, 3]`` first voxel ``(d, h, w)`` (default corner).
            box_size: ``(d, h, w)`` of the box (default the whole grid).
            chunk_size: voxels decoded at once (default the model's ``chunk_size``).
            skip_empty: opacity threshold below which a coarse pass's empty blocks are not decoded (opacity 0
                written there; VoxGS decoder only; exact only where those blocks truly are empty); ``None``: decode
                every voxel; ``"model"`` (default): the model's ``skip_empty`` in eval mode, ``None`` in training mode.

        Returns:
            :class:`XGRMOutput`: Gaussians in world mm (float32 also under bf16 autocast), the volume
            ``[B, 1, d, h, w]`` = their opacities and, with ``skip_empty``, the ``skipped_fraction``.
        """
        projection_matrices, plucker = self._check_inputs(projections, projection_matrices, plucker)
        b = projections.shape[0]
        shape, affine = check_grid(grid_shape, grid_affine, b)
        affine = affine.to(projections.device)
        start, size = check_box(box_start, box_size, shape, b, device=affine.device)
        chunk = self._check_chunk(self.chunk_size if chunk_size is None else chunk_size)
        threshold = self._skip_threshold(skip_empty)
        maps = self.encode_views(projections, plucker, shape, affine)
        skipped = None
        if self.decoder_kind == "iterative":  # its query lattice spans the whole grid, not the box
            gaussians = self.decoder(maps, projection_matrices, self.img_size, affine, start, size, chunk,
                                     self.grad_checkpointing, grid_shape=shape)
        elif threshold is not None:
            gaussians, skipped = self.decoder.forward_skipping_empty(
                maps, projection_matrices, self.img_size, affine, start, size, chunk, threshold,
                self.skip_block_size, self.grad_checkpointing)
        else:
            gaussians = self.decoder(maps, projection_matrices, self.img_size, affine, start, size, chunk,
                                     self.grad_checkpointing)
        volume = gaussians.intensities.reshape(b, 1, *size)
        return XGRMOutput(gaussians, volume, start, size, box_affine(affine, start), skipped)

    def _skip_threshold(self, skip_empty: object) -> float | None:
        """The threshold of this forward pass: ``forward``'s ``skip_empty`` or, by default, the model's in eval mode."""
        if isinstance(skip_empty, str):
            if skip_empty != MODEL_SETTING:
                raise ValueError(f"skip_empty must be a number >= 0, None or {MODEL_SETTING!r}, got {skip_empty!r}")
            return None if self.training else self.skip_empty
        if skip_empty is None:
            return None
        if isinstance(skip_empty, bool) or not isinstance(skip_empty, (int, float)) or not math.isfinite(skip_empty) \
                or skip_empty < 0:
            raise ValueError(f"skip_empty must be a finite opacity >= 0, None or {MODEL_SETTING!r}, got {skip_empty!r}")
        if self.decoder_kind != "voxgs":
            raise ValueError(f"skip_empty needs decoder='voxgs'; this model has decoder={self.decoder_kind!r}")
        return float(skip_empty)

    def reconstruct(self, projections: Tensor, geometry: Any, **kwargs: Any) -> XGRMOutput:
        """``forward(projections, **geometry_inputs(geometry), **kwargs)`` on the projections' device.

        ``geometry`` is one geometry (shared by the batch) or one per sample; its views must be the
        ``K`` projected ones, in order.
        """
        return self(projections, **self.geometry_inputs(geometry, device=projections.device), **kwargs)

    def render(self, gaussians: Gaussians, geometry: Any, **kwargs: Any) -> Tensor:
        """X-ray projections ``[B, V, rows, cols]`` of the Gaussians through :func:`medgauss.render.project`
        (keyword arguments pass through: ``cutoff``, ``view_ids``, ``backend``)."""
        from medgauss.render import project

        return project(gaussians, geometry, **kwargs)


def geometry_inputs(geometry: Any, patch_size: int = 16, *, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The geometry arguments of :meth:`XGRM.forward`, built from one geometry or one per sample.

    Args:
        geometry: a :class:`medgauss.geometry.ConeBeamGeometry` / ``ParallelBeamGeometry`` (a batch of one,
            which :meth:`XGRM.forward` broadcasts over the projections' batch), or a sequence of them (one
            per sample) with the same number of views, detector and ``vol_shape``.
        patch_size: the encoder's patch edge; the detector size must be a multiple of it.
        device, dtype: of the returned tensors (the affine is always float64).

    Returns:
        dict with ``projection_matrices [B, K, 3, 4]``, ``plucker [B, K, 6, rows / p, cols / p]``
        (``geometry.plucker(downsample=patch_size)``: patch-centre rays), ``grid_shape`` (``vol_shape``),
        ``grid_affine [B, 4, 4]`` float64 (``volume_affine``) and ``image_size`` (``det_shape``).
    """
    from medgauss.geometry import CircularGeometry

    geometries = [geometry] if isinstance(geometry, CircularGeometry) else list(geometry)
    if not geometries or not all(isinstance(g, CircularGeometry) for g in geometries):
        raise ValueError("geometry must be a ConeBeamGeometry / ParallelBeamGeometry or a non-empty sequence "
                         f"of them, got {type(geometry).__name__}")
    first = geometries[0]
    for g in geometries[1:]:
        if (g.num_views, g.det_shape, g.vol_shape) != (first.num_views, first.det_shape, first.vol_shape):
            raise ValueError("geometry: every sample's geometry must have the same number of views, det_shape and "
                             f"vol_shape; got {(g.num_views, g.det_shape, g.vol_shape)} vs "
                             f"{(first.num_views, first.det_shape, first.vol_shape)}")
    rows, cols = first.det_shape
    if rows % patch_size or cols % patch_size:
        raise ValueError(f"geometry.det_shape {first.det_shape} must be a multiple of patch_size {patch_size}")
    return {
        "projection_matrices": torch.stack([g.projection_matrices() for g in geometries]).to(device, dtype),
        "plucker": torch.stack([g.plucker(downsample=patch_size, dtype=torch.float64) for g in geometries]
                               ).to(device, dtype),
        "grid_shape": tuple(first.vol_shape),
        "grid_affine": torch.stack([g.volume_affine for g in geometries]).to(device),
        "image_size": tuple(first.det_shape),
    }


# ---------------------------------------------------------------------------------- pretrained ViT weights

_WRAPPERS = ("state_dict", "model", "teacher", "student")
_PREFIXES = ("module.", "backbone.")


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors / pickle raise many types for corrupt files
        raise ValueError(f"cannot read pretrained weights file {path}: {type(exc).__name__}: {exc}") from exc
    while isinstance(state, dict) and any(isinstance(state.get(w), dict) for w in _WRAPPERS):
        state = next(state[w] for w in _WRAPPERS if isinstance(state.get(w), dict))
    if not isinstance(state, dict):
        raise ValueError(f"pretrained weights file {path} does not hold a state dict")
    out = {}
    for key, value in state.items():
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        if isinstance(value, Tensor):
            out[key] = value
    return out


def load_vit_weights(encoder: ViewEncoder, path: str | Path) -> None:
    """Initialise ``encoder`` from a local timm / DINO ViT state dict (never downloads).

    Read: ``patch_embed.proj.{weight, bias}`` (an RGB patch embedding is summed over its input channels,
    so a grey image gives the response of that image replicated in R, G and B), ``pos_embed`` (a class
    token's entry dropped, the grid resized bicubically to the encoder's), ``blocks.*`` and ``norm.*``.
    The Plücker modules keep their initialisation.

    Raises:
        FileNotFoundError: no such file. ValueError (naming the file): unreadable, or missing / mismatched
        tensors.
    """
    path = Path(path)
    state = _read_state_dict(path)
    mine = encoder.state_dict()
    loaded: dict[str, Tensor] = {}
    for key, target in mine.items():
        if key.startswith(("pose_embed", "modulation")):
            continue
        source_key = "patch_embed.proj." + key.split(".", 1)[1] if key.startswith("patch_embed.") else key
        if source_key not in state:
            raise ValueError(f"pretrained weights file {path} lacks {source_key!r} (for encoder.{key}); "
                             f"it holds e.g. {sorted(state)[:8]}")
        value = state[source_key].to(target.dtype)
        if key == "patch_embed.weight" and value.ndim == 4 and value.shape[1] != 1:
            value = value.sum(dim=1, keepdim=True)
        if key == "pos_embed":
            value = _resize_pos_embed(value, encoder.grid, path)
        if value.shape != target.shape:
            raise ValueError(f"pretrained weights file {path}: {source_key!r} has shape {tuple(value.shape)}, "
                             f"the encoder needs {tuple(target.shape)}")
        loaded[key] = value
    encoder.load_state_dict(loaded, strict=False)


def _resize_pos_embed(pos: Tensor, grid: tuple[int, int], path: Path) -> Tensor:
    tokens = pos.reshape(-1, pos.shape[-1])
    side = math.isqrt(tokens.shape[0])
    if side * side != tokens.shape[0]:
        tokens, side = tokens[1:], math.isqrt(tokens.shape[0] - 1)  # drop the class token
    if side * side != tokens.shape[0]:
        raise ValueError(f"pretrained weights file {path}: pos_embed of {pos.shape} is no square patch grid")
    if (side, side) == grid:
        return tokens[None]
    image = tokens.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    image = F.interpolate(image, size=grid, mode="bicubic", align_corners=False)
    return image.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1).to(pos.dtype)
