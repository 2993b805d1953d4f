"""MAE decoders: the Gaussian query decoder (MedGMAE) and the voxel patch decoder (MAE baseline).

Two query designs (``query_mode``):

* ``"free"`` (the paper's): ``num_queries`` learnable tokens with no position; each Gaussian's centre
  is ``sigmoid(linear(feature))``, anywhere in the crop.
* ``"anchored"`` (DAB-/Deformable-DETR style): query ``q`` is tied to the centre ``a_q`` of cell ``q`` of
  a regular 3D anchor grid over the crop (:func:`anchor_grid_shape`, :func:`anchor_points`); its token is
  a learnable content embedding plus the fixed sin-cos embedding of ``a_q`` (in the same patch-index
  units as the visible tokens' embeddings), and its centre is an offset from the anchor,
  ``a_q + max_offset * tanh(linear(feature))`` scaled per side so that it stays inside ``[0, 1]``.
  At initialisation the Gaussians tile the crop: centres exactly on the anchors, scales half a cell
  (one standard deviation spans the cell), identity rotations, and intensities whose overlapping sum
  is about the free mode's initial 0.4.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import Tensor, nn

from medgauss.gaussians import Gaussians
from medgauss.gaussians.coords import normalized_to_voxel_matrix, transform_points
from medgauss.nets.blocks import (
    _sincos_1d,
    check_pool_sigma,
    distance_weighted_pool,
    init_linear_and_norm,
    sincos_pos_embed_3d,
    transformer_blocks,
)
from medgauss.nets.patches import patch_centres

__all__ = ["GaussianHeads", "GaussianQueryDecoder", "PatchDecoder", "HEAD_BIAS_INIT", "QUERY_MODES",
           "ANCHOR_OFFSET_CELLS", "ANCHOR_SCALE_CELLS", "MAX_ANCHOR_CELL_ASPECT", "anchor_grid_shape",
           "anchor_points", "anchor_pos_embed"]

# Initial head biases (centre, scale, rotation, intensity): sigmoid(-1.386) = 0.2 of the scale range,
# sigmoid(-0.405) = 0.4 intensity, centres at the volume centre before the Xavier-initialised weights act.
HEAD_BIAS_INIT = {"center": 0.0, "scale": -1.386, "rotation": 0.0, "intensity": -0.405}

QUERY_MODES = ("free", "anchored")
# Anchored queries: default reach of a centre from its anchor, and initial scale, in anchor cell widths
# (per axis). 1.5 cells lets a Gaussian move into any neighbouring cell; a standard deviation of half a
# cell makes the initial Gaussians tile the crop (a sum of Gaussians spaced one cell apart is flat to 2%).
ANCHOR_OFFSET_CELLS = 1.5
ANCHOR_SCALE_CELLS = 0.5
# The most elongated anchor cell (longest / shortest edge, in voxels) accepted for a grid.
MAX_ANCHOR_CELL_ASPECT = 4.0
# Anchored queries start from their anchor's position: small content embeddings (MAE's mask-token
# std), and small random head weights so that the initial Gaussians keep the tiling described above.
_ANCHORED_CONTENT_STD = 0.02
_ANCHORED_HEAD_STD = 1e-3


def _grid_aspect(grid: tuple[int, int, int], img_size: tuple[int, int, int]) -> float:
    cells = [s / g for s, g in zip(img_size, grid)]
    return max(cells) / min(cells)


def _most_cubic_grid(num_queries: int, img_size: tuple[int, int, int]) -> tuple[tuple[int, int, int], float]:
    best, best_aspect = (1, 1, num_queries), math.inf
    for g0 in range(1, num_queries + 1):
        if num_queries % g0:
            continue
        rest = num_queries // g0
        for g1 in range(1, rest + 1):
            if rest % g1:
                continue
            grid = (g0, g1, rest // g1)
            aspect = _grid_aspect(grid, img_size)
            if aspect < best_aspect * (1 - 1e-12):  # first of equals in this order: (4, 4, 8), not (8, 4, 4)
                best, best_aspect = grid, aspect
    return best, best_aspect


def anchor_grid_shape(num_queries: int, img_size: Sequence[int]) -> tuple[int, int, int]:
    """The anchor grid ``(g0, g1, g2)``, ``g0 * g1 * g2 = num_queries``, whose cells are the most cubic.

    Cells are measured in voxels of an ``img_size`` ``(D, H, W)`` crop: the grid minimises the ratio of
    the longest to the shortest cell edge (for a cube: 512 -> (8, 8, 8), 128 -> (4, 4, 8), 64 ->
    (4, 4, 4)); among equal grids the first in C order of ``(g0, g1)`` wins.

    Raises:
        ValueError: ``num_queries`` is not a positive int, or even its best grid has cells more elongated
            than :data:`MAX_ANCHOR_CELL_ASPECT` (e.g. a prime ``num_queries > 4``); the message names
            ``num_queries`` and the nearest counts that do have a grid.
    """
    size = tuple(int(s) for s in img_size)
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"img_size must be three positive sizes (D, H, W), got {tuple(img_size)}")
    if isinstance(num_queries, bool) or not isinstance(num_queries, int) or num_queries < 1:
        raise ValueError(f"num_queries must be a positive int, got {num_queries!r}")
    grid, aspect = _most_cubic_grid(num_queries, size)
    if aspect > MAX_ANCHOR_CELL_ASPECT:
        def ok(n: int) -> bool:
            return _most_cubic_grid(n, size)[1] <= MAX_ANCHOR_CELL_ASPECT
        below = next((n for n in range(num_queries - 1, 0, -1) if ok(n)), None)
        above = next(n for n in range(num_queries + 1, 8 * num_queries + 8) if ok(n))
        near = [n for n in (below, above) if n is not None]
        raise ValueError(
            f"num_queries={num_queries} has no sensible anchor grid for query_mode='anchored' on a "
            f"{size} crop: the most cubic grid g0*g1*g2 = {num_queries} is {grid}, whose cells are "
            f"{aspect:.3g}:1 (at most {MAX_ANCHOR_CELL_ASPECT:g}:1 allowed); nearest counts with a grid: "
            f"{near}")
    return grid


def anchor_points(grid: Sequence[int]) -> Tensor:
    """Anchors ``[g0*g1*g2, 3]`` float32: the centres of the cells of ``grid`` in normalised crop
    coordinates (cell ``(i, j, k)`` at ``((i + 0.5) / g0, (j + 0.5) / g1, (k + 0.5) / g2)``), cells
    numbered in C order (query ``q = (i * g1 + j) * g2 + k``)."""
    g = tuple(int(v) for v in grid)
    axes = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in g], indexing="ij")
    cells = torch.stack(axes, dim=-1).reshape(-1, 3)
    to_normalised = torch.linalg.inv(normalized_to_voxel_matrix(g))  # cell index -> cell centre
    return transform_points(cells, to_normalised).float()


def anchor_pos_embed(anchors: Tensor, grid_size: tuple[int, int, int], dim: int,
                     temperature: float = 10000.0) -> Tensor:
    """Sin-cos embeddings ``[N, dim]`` (float32) of ``anchors [N, 3]`` (normalised crop coordinates).

    Positions are expressed in patch-index units of the patch grid ``grid_size`` (patch ``i`` of ``g``
    spans ``[i / g, (i + 1) / g)``, its centre is index ``i``), with the channel layout of
    :func:`medgauss.nets.blocks.sincos_pos_embed_3d`: an anchor at a patch centre gets exactly that
    patch's embedding, so queries and visible tokens share one positional code.
    """
    if dim < 6:
        raise ValueError(f"dim must be at least 6 for a 3D sin-cos embedding, got {dim}")
    positions = transform_points(anchors.detach().cpu().double(), normalized_to_voxel_matrix(grid_size))
    per_axis = 2 * (dim // 6)
    emb = torch.cat([_sincos_1d(positions[:, a], per_axis, temperature) for a in range(3)], dim=1)
    return F.pad(emb, (0, dim - emb.shape[1])).float()


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

    Anchored queries (``anchors`` given, ``[N, 3]`` normalised, with ``grid`` their anchor grid): the
    centre of query ``q`` is ``a_q + t * (hi_q - a_q)`` for ``t = tanh(center(f)) >= 0`` and
    ``a_q + t * (a_q - lo_q)`` for ``t < 0``, with ``hi_q = min(a_q + max_offset, 1)`` and
    ``lo_q = max(a_q - max_offset, 0)`` per axis: the offset is bounded by ``max_offset`` (normalised
    units, default :data:`ANCHOR_OFFSET_CELLS` cell widths per axis) and the centre never leaves
    ``[0, 1]``, without a clamp that would stop its gradient. The centre head starts at zero (centres
    on the anchors); the other heads start with small weights and biases that tile the crop (scale
    :data:`ANCHOR_SCALE_CELLS` cell widths, kept inside the scale bounds; identity rotation;
    intensity such that the overlapping Gaussians sum to about ``sigmoid(HEAD_BIAS_INIT["intensity"])``).
    """

    def __init__(self, dim: int, max_scale: float, min_scale: float = 0.0, anchors: Tensor | None = None,
                 grid: Sequence[int] | None = None, max_offset: float | None = None) -> None:
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
        self.anchored = anchors is not None
        if self.anchored:
            self._init_anchored(anchors, grid, max_offset)
        elif grid is not None or max_offset is not None:
            raise ValueError("grid and max_offset apply to anchored queries only (pass anchors)")

    def _init_anchored(self, anchors: Tensor, grid: Sequence[int] | None, max_offset: float | None) -> None:
        if grid is None or len(tuple(grid)) != 3 or math.prod(int(g) for g in grid) != anchors.shape[0]:
            raise ValueError(f"grid must be the anchor grid (g0, g1, g2) of the {anchors.shape[0]} anchors, "
                             f"got {grid}")
        if anchors.ndim != 2 or anchors.shape[1] != 3 or not bool(((anchors > 0) & (anchors < 1)).all()):
            raise ValueError(f"anchors must be [N, 3] inside (0, 1), got shape {tuple(anchors.shape)}")
        cell = 1.0 / torch.tensor([float(g) for g in grid], dtype=torch.float64)  # cell widths, normalised
        if max_offset is None:
            reach = ANCHOR_OFFSET_CELLS * cell
        elif isinstance(max_offset, bool) or not isinstance(max_offset, int | float) \
                or not math.isfinite(max_offset) or max_offset <= 0:
            raise ValueError(f"anchor_offset (max_offset) must be a positive finite number of normalised "
                             f"units or None, got {max_offset!r}")
        else:
            reach = torch.full((3,), float(max_offset), dtype=torch.float64)
        a = anchors.detach().to(torch.float64)
        self.register_buffer("anchors", a.float(), persistent=False)
        self.register_buffer("max_offset", reach.float(), persistent=False)
        self.register_buffer("reach_up", ((a + reach).clamp(max=1.0) - a).float(), persistent=False)
        self.register_buffer("reach_down", (a - (a - reach).clamp(min=0.0)).float(), persistent=False)
        with torch.no_grad():
            nn.init.zeros_(self.center.weight)
            nn.init.zeros_(self.center.bias)
            for layer in (self.scale, self.rotation, self.intensity):
                trunc_normal_(layer.weight, std=_ANCHORED_HEAD_STD)
            span = self.max_scale - self.min_scale
            frac = ((ANCHOR_SCALE_CELLS * cell - self.min_scale) / span).clamp(0.05, 0.95)
            self.scale.bias.copy_(torch.logit(frac))
            self.rotation.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))
            scale0 = self.min_scale + frac * span
            # a sum of unit-peak Gaussians spaced h apart with std s is ~ sqrt(2 pi) s / h per axis
            overlap = torch.prod(math.sqrt(2 * math.pi) * scale0 / cell).clamp_min(1.0)
            level = torch.sigmoid(torch.tensor(HEAD_BIAS_INIT["intensity"], dtype=torch.float64))
            self.intensity.bias.fill_(float(torch.logit(level / overlap)))

    def forward(self, features: Tensor) -> Gaussians:
        """``features [B, N, dim]`` -> :class:`Gaussians` with ``B x N`` entries (normalised coordinates).

        Anchored heads need ``N`` = their number of anchors."""
        if self.anchored:
            if features.shape[-2] != self.anchors.shape[0]:
                raise ValueError(f"features must have {self.anchors.shape[0]} queries (one per anchor), got "
                                 f"shape {tuple(features.shape)}")
            t = torch.tanh(self.center(features))
            means = self.anchors + torch.where(t >= 0, t * self.reach_up, t * self.reach_down)
        else:
            means = torch.sigmoid(self.center(features))
        scales = self.min_scale + torch.sigmoid(self.scale(features)) * (self.max_scale - self.min_scale)
        quats = F.normalize(self.rotation(features), dim=-1, eps=1e-8)
        intensities = torch.sigmoid(self.intensity(features)).squeeze(-1)
        return Gaussians(means, scales, quats, intensities, validate=False)


class GaussianQueryDecoder(nn.Module):
    """Transformer decoder that turns encoder tokens into ``num_queries`` Gaussian query features.

    Input sequence: ``[projected cls] + num_queries learnable query tokens + projected visible tokens``;
    visible tokens get fixed 3D sin-cos decoder position embeddings of their patch. Free queries
    (``anchors=None``) have no position (their learnable values act as their embedding); anchored queries
    (``anchors [num_queries, 3]``, normalised crop coordinates) add the fixed sin-cos embedding of their
    anchor (:func:`anchor_pos_embed`) to a learnable content embedding. Returns the queries' output
    features.
    """

    def __init__(self, encoder_dim: int, grid_size: tuple[int, int, int], decoder_dim: int, depth: int,
                 num_heads: int, num_queries: int, mlp_ratio: float = 4.0,
                 drop_path_rate: float = 0.0, anchors: Tensor | None = None,
                 anchor_pool_sigma: float | None = None) -> None:
        super().__init__()
        if num_queries < 1:
            raise ValueError(f"num_queries must be >= 1, got {num_queries}")
        if anchors is not None and tuple(anchors.shape) != (num_queries, 3):
            raise ValueError(f"anchors must have shape [num_queries={num_queries}, 3], got {tuple(anchors.shape)}")
        if anchor_pool_sigma is not None:
            if anchors is None:
                raise ValueError("anchor_pool_sigma applies to anchored queries only (pass anchors)")
        self.anchor_pool_sigma = check_pool_sigma(anchor_pool_sigma, "anchor_pool_sigma")
        self.num_queries = num_queries
        self.anchored = anchors is not None
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
        # Anchored queries are told apart by their anchors' embeddings and their centres are held on the
        # anchors, so their content starts small and position drives the first attention.
        trunc_normal_(self.query_tokens, std=_ANCHORED_CONTENT_STD if self.anchored else 1.0)
        if self.anchored:
            self.register_buffer("query_pos", anchor_pos_embed(anchors, grid_size, decoder_dim)[None],
                                 persistent=False)
        if self.anchor_pool_sigma is not None:
            # anchors and patch centres in patch units, for the distance weights of anchor_pool
            grid = torch.tensor(grid_size, dtype=torch.float32)
            self.register_buffer("anchor_cells", anchors.detach().float() * grid, persistent=False)
            self.register_buffer("patch_cells", patch_centres(grid_size), persistent=False)

    def forward(self, latent: Tensor, ids_keep: Tensor) -> Tensor:
        """``latent [B, 1 + K, encoder_dim]`` (cls first), ``ids_keep [B, K]``
        -> query features ``[B, num_queries, decoder_dim]``."""
        x = self.embed(latent)
        b, dim = x.shape[0], x.shape[-1]
        pos = self.pos_embed.expand(b, -1, -1).to(x.dtype)
        pos = torch.gather(pos, 1, ids_keep[:, :, None].expand(-1, -1, dim))
        queries = self.query_tokens if not self.anchored else self.query_tokens + self.query_pos
        queries = queries.expand(b, -1, -1).to(x.dtype)
        if self.anchor_pool_sigma is not None:
            queries = queries + self.anchor_pool(x[:, 1:], ids_keep)
        x = torch.cat([x[:, :1], queries, x[:, 1:] + pos], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x[:, 1:1 + self.num_queries])


    def anchor_pool(self, tokens: Tensor, ids_keep: Tensor) -> Tensor:
        """Each anchor's Gaussian-weighted mean of the visible tokens (a normalised convolution in
        feature space, the way Deformable-DETR samples features at a query's reference point).

        ``tokens [B, K, dim]`` (embedded visible tokens, no position), ``ids_keep [B, K]`` their patch
        indices -> ``[B, num_queries, dim]``; weights ``softmax_k(-|a_q - p_k|^2 / (2 sigma^2))`` with
        distances in patch widths, so every query starts from what was seen around its anchor.
        """
        return distance_weighted_pool(tokens, self.patch_cells[ids_keep], self.anchor_cells,
                                      self.anchor_pool_sigma)


class PatchDecoder(nn.Module):
    """Standard MAE decoder: mask tokens fill hidden patches, sin-cos position embeddings,
    linear voxel head.

    ``mask_pool_sigma`` (patch widths; ``None`` = MAE's plain mask token): each hidden patch's token is
    the mask token plus the distance-weighted mean of the visible tokens around it
    (:func:`medgauss.nets.blocks.distance_weighted_pool`), the voxel-MAE counterpart of
    :class:`GaussianQueryDecoder`'s ``anchor_pool_sigma``.
    """

    def __init__(self, encoder_dim: int, grid_size: tuple[int, int, int], decoder_dim: int, depth: int,
                 num_heads: int, patch_values: int, mlp_ratio: float = 4.0,
                 drop_path_rate: float = 0.0, mask_pool_sigma: float | None = None) -> None:
        super().__init__()
        self.mask_pool_sigma = check_pool_sigma(mask_pool_sigma, "mask_pool_sigma")
        if self.mask_pool_sigma is not None:
            self.register_buffer("patch_cells", patch_centres(grid_size), persistent=False)
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
        if self.mask_pool_sigma is not None:
            order = torch.argsort(ids_restore, dim=1)  # kept patches first, then the hidden ones
            kept = x.shape[1] - 1
            hidden = hidden + distance_weighted_pool(x[:, 1:], self.patch_cells[order[:, :kept]],
                                                     self.patch_cells[order[:, kept:]], self.mask_pool_sigma)
        tokens = torch.cat([x[:, 1:], hidden], dim=1)
        tokens = torch.gather(tokens, 1, ids_restore[:, :, None].expand(-1, -1, dim))
        x = torch.cat([x[:, :1], tokens + self.pos_embed.to(x.dtype)], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))[:, 1:]
