"""VoxGS: one Gaussian fixed at every voxel centre of an output grid, decoded from per-view feature maps.

The X-GRM decoder (see :class:`medgauss.nets.XGRM`). For each voxel centre ``mu`` (world mm, from the
grid's voxel-to-world ``affine``):

1. project ``mu`` into every view with that view's ``[3, 4]`` projection matrix
   (:meth:`medgauss.geometry.CircularGeometry.projection_matrices`: world ``(x, y, z, 1)`` ->
   ``(col w, row w, w)``, detector pixel centres at integer ``(col, row)``);
2. sample the view's feature map bilinearly there (``F.grid_sample``, ``align_corners=False``: a feature
   map of any resolution covers the same detector area as the ``H x W`` projection, so the full-resolution
   pixel coordinate ``col`` maps to ``(2 col + 1) / W - 1`` whatever the feature resolution);
3. max-pool the samples over the views in which ``mu`` is visible (in front of the source and on the
   detector; a voxel seen by no view gets zeros), which is invariant to the order of the views;
4. an MLP maps the pooled feature to 8 numbers (11 with ``shift``): opacity (the CT value,
   ``softplus``, non-negative), scale (3, bounded in voxel units, then mm) and rotation (4, normalised
   quaternion ``(w, x, y, z)`` in the world frame), plus the bounded offset of the centre for ``shift``.

The result is a :class:`medgauss.gaussians.Gaussians` in world mm whose ``intensities`` are the volume:
Gaussian ``n`` of a decoded box sits at voxel ``(d, h, w)`` of the box with ``n = (d * H + h) * W + w``
(C order), so the volume is ``intensities.reshape(B, 1, D, H, W)``.

Memory is bounded by ``chunk_size`` voxels at a time (independently of the grid size), and a sub-box of
the grid can be decoded alone (training renders random sub-volumes).

**Skipping empty blocks** (:meth:`VoxGSDecoder.forward_skipping_empty`, an inference option). The box is tiled
into ``block_size^3`` blocks from its corner. A coarse pass decodes only the first, middle and last voxel of
every block along each axis (27 voxels per block, its 8 corners among them: about ``27 / block_size^3`` of
the cost of a full decode); a block whose largest coarse opacity is below ``threshold`` is not decoded and
its cells are written as Gaussians of opacity exactly 0. Every other block is decoded in full, with the same
computation as :meth:`VoxGSDecoder.forward` (equal to it up to the float rounding of a different batch shape).
This is exact only where a skipped block truly is empty: the coarse pass sees 27 voxels, not all of them,
so a block whose sampled voxels are all below the threshold but whose other voxels are not loses those
values. It is meant for models trained with an opacity L1 penalty (``XGRMLoss(lambda_opacity_l1=...)``),
whose air is near zero everywhere, and for thresholds at the noise level of that air. A threshold of 0
never skips anything (opacities are ``softplus`` values, never negative), and then the result is exactly
the full decode.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from medgauss.gaussians import Gaussians

__all__ = [
    "VoxGSDecoder",
    "activate_voxel_gaussians",
    "NUM_PARAMS",
    "NUM_SHIFT",
    "OPACITY_BIAS_INIT",
    "UNIT_MASS_SCALE",
    "check_grid",
    "check_box",
    "voxel_centres",
    "project_points",
    "sample_views",
    "max_pool_views",
    "random_box_starts",
    "box_affine",
    "subvolume_geometry",
    "coarse_block_samples",
]

UNIT_MASS_SCALE = 1.0 / math.sqrt(2.0 * math.pi)
"""Scale (voxels) at which a Gaussian of peak ``I`` holds the mass ``I`` of one voxel:
``(2 pi)^{3/2} s^3 = 1``. At this scale a lattice of Gaussians whose peaks are the voxel values projects
(line integrals) like the voxel volume itself, so it is the decoder's initial scale."""

# Initial opacity softplus(-2.25) = 0.1 (volumes normalised to [0, 1] are mostly dark).
OPACITY_BIAS_INIT = -2.25
NUM_PARAMS = 8  # opacity 1, scale 3, rotation 4
NUM_SHIFT = 3


# ---------------------------------------------------------------------------------------------- grids


def check_grid(grid_shape: Sequence[int], grid_affine: Tensor, batch_size: int) -> tuple[tuple[int, int, int], Tensor]:
    """Validate an output grid; returns ``((D, H, W), affine [B, 4, 4] float64 on the affine's device)``.

    Args:
        grid_shape: ``(D, H, W)`` voxels.
        grid_affine: ``[4, 4]``, ``[1, 4, 4]`` or ``[B, 4, 4]`` voxel index ``(d, h, w, 1)`` -> world
            ``(x, y, z, 1)`` mm (e.g. ``geometry.volume_affine``), invertible, last row ``(0, 0, 0, 1)``.
        batch_size: ``B``.
    """
    try:
        shape = tuple(int(s) for s in grid_shape)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"grid_shape must be three positive ints (D, H, W), got {grid_shape!r}") from exc
    if len(shape) != 3 or min(shape) <= 0 or any(float(a) != b for a, b in zip(grid_shape, shape)):
        raise ValueError(f"grid_shape must be three positive ints (D, H, W), got {tuple(grid_shape)}")
    if not isinstance(grid_affine, Tensor):
        raise ValueError(f"grid_affine must be a torch.Tensor [4, 4] or [B, 4, 4], got {type(grid_affine).__name__}")
    a = grid_affine.to(torch.float64)
    if a.ndim == 2:
        a = a.unsqueeze(0)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a.expand(batch_size, -1, -1)
    if a.shape != (batch_size, 4, 4):
        raise ValueError(f"grid_affine must have shape [4, 4], [1, 4, 4] or [B={batch_size}, 4, 4], "
                         f"got {tuple(grid_affine.shape)}")
    if not bool(torch.isfinite(a).all()):
        raise ValueError("grid_affine contains non-finite values (NaN or inf)")
    bottom = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64, device=a.device)
    if not bool((a[:, 3] == bottom).all()):
        raise ValueError("grid_affine must be affine: its last row must be (0, 0, 0, 1)")
    lin = a[:, :3, :3]
    if not bool((torch.linalg.det(lin).abs() > 1e-12 * lin.abs().flatten(1).amax(1).pow(3)).all()):
        raise ValueError("grid_affine has a singular linear part")
    return shape, a  # type: ignore[return-value]


def check_box(box_start: Tensor | Sequence[int] | None, box_size: Sequence[int] | None,
              grid_shape: tuple[int, int, int], batch_size: int,
              device: torch.device | str = "cpu") -> tuple[Tensor, tuple[int, int, int]]:
    """Validate a sub-box of the grid; returns ``(start [B, 3] int64, (d, h, w))``.

    ``box_start`` ``None`` = the grid's corner; ``[3]`` = the same start for every sample; ``[B, 3]`` = one
    per sample (voxel indices ``(d, h, w)``). ``box_size`` ``None`` = the whole grid. The box must lie
    inside the grid.
    """
    if box_size is None:
        size = grid_shape
    else:
        try:
            size = tuple(int(s) for s in box_size)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"box_size must be three positive ints (d, h, w), got {box_size!r}") from exc
        if len(size) != 3 or min(size) <= 0:
            raise ValueError(f"box_size must be three positive ints (d, h, w), got {tuple(box_size)}")
    if box_start is None:
        start = torch.zeros(batch_size, 3, dtype=torch.long, device=device)
    else:
        start = torch.as_tensor(box_start, device=device)
        if start.is_floating_point() or start.dtype == torch.bool or start.is_complex():
            raise ValueError(f"box_start must hold integer voxel indices, got dtype {start.dtype}")
        start = start.long()
        if start.ndim == 1:
            start = start.unsqueeze(0).expand(batch_size, -1)
        if start.shape != (batch_size, 3):
            raise ValueError(f"box_start must have shape [3] or [B={batch_size}, 3], got {tuple(start.shape)}")
    limit = torch.tensor(grid_shape, device=start.device) - torch.tensor(size, device=start.device)
    if bool((start < 0).any()) or bool((start > limit).any()):
        raise ValueError(f"box_start {start.tolist()} with box_size {size} leaves the grid {grid_shape}")
    return start, size  # type: ignore[return-value]


def voxel_centres(grid_affine: Tensor, box_start: Tensor, box_size: Sequence[int], first: int = 0,
                  last: int | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """World centres ``[B, last - first, 3]`` (x, y, z) mm of voxels ``first:last`` (C order) of a box.

    Args:
        grid_affine: ``[B, 4, 4]`` float64 voxel-to-world affines (see :func:`check_grid`).
        box_start: ``[B, 3]`` int64 first voxel ``(d, h, w)`` of the box; ``box_size``: ``(d, h, w)``.
        first, last: range of flattened box indices ``n = (i * h + j) * w + k`` (``last`` ``None`` = all).
        dtype: result dtype (computed in float64, then cast).
    """
    d, h, w = (int(s) for s in box_size)
    last = d * h * w if last is None else last
    n = torch.arange(first, last, device=grid_affine.device)
    index = torch.stack((n // (h * w), (n // w) % h, n % w), dim=-1)  # [m, 3]
    index = (index[None] + box_start.to(grid_affine.device)[:, None, :]).to(torch.float64)  # [B, m, 3]
    world = index @ grid_affine[:, :3, :3].transpose(1, 2) + grid_affine[:, None, :3, 3]
    return world.to(dtype)


def box_affine(grid_affine: Tensor, box_start: Tensor) -> Tensor:
    """``[B, 4, 4]`` float64 affines of the boxes starting at ``box_start [B, 3]`` of ``grid_affine [B, 4, 4]``."""
    out = grid_affine.clone()
    out[:, :3, 3] = out[:, :3, 3] + (grid_affine[:, :3, :3] @ box_start.to(grid_affine)[..., None])[..., 0]
    return out


def random_box_starts(grid_shape: Sequence[int], box_size: Sequence[int], batch_size: int,
                      generator: torch.Generator | None = None) -> Tensor:
    """Uniformly random starts ``[B, 3]`` int64 of ``box_size`` boxes inside ``grid_shape`` (training crops)."""
    shape, size = tuple(int(s) for s in grid_shape), tuple(int(s) for s in box_size)
    if len(shape) != 3 or len(size) != 3 or any(s <= 0 or s > g for s, g in zip(size, shape)):
        raise ValueError(f"box_size {tuple(box_size)} must be three positive ints within "
                         f"grid_shape {tuple(grid_shape)}")
    room = torch.tensor([g - s + 1 for g, s in zip(shape, size)], dtype=torch.float64)
    u = torch.rand(batch_size, 3, generator=generator, dtype=torch.float64)
    return (u * room).floor().long().clamp_max(room.long() - 1)


def subvolume_geometry(geometry, box_start: Sequence[int], box_size: Sequence[int]):
    """The geometry whose volume is the box ``box_start``/``box_size`` of ``geometry``'s volume.

    Same views and detector; ``vol_shape = box_size`` and ``vol_offset`` chosen so that its
    ``volume_affine`` is the box's affine. This is how a ground-truth sub-volume is forward projected
    (:func:`medgauss.ct.forward_project`) for the render loss of the sub-volume's Gaussians.

    Args:
        geometry: a :class:`medgauss.geometry.CircularGeometry`.
        box_start: ``(d, h, w)`` first voxel; ``box_size``: ``(d, h, w)`` voxels.
    """
    start, size = check_box(box_start, box_size, tuple(geometry.vol_shape), 1)
    centre_index = start[0].to(torch.float64) + (torch.tensor(size, dtype=torch.float64) - 1) / 2
    offset = [o + (c - (n - 1) / 2) * s for o, c, n, s in
              zip(geometry.vol_offset, centre_index.tolist(), geometry.vol_shape, geometry.vol_spacing)]
    return geometry.replace(vol_shape=list(size), vol_offset=offset)


def coarse_block_samples(box_size: Sequence[int], block_size: int,
                         device: torch.device | str = "cpu") -> list[Tensor]:
    """Per-axis voxel indices of the coarse pass that finds empty blocks (three int64 tensors, sorted).

    Along each axis of ``box_size`` the blocks are ``[j s, min((j + 1) s, n) - 1]`` (``s = block_size``); the
    samples are the first, middle (``(first + last) // 2``) and last index of every block, so the product of
    the three lists holds the 8 corners and the centre of every block.
    """
    axes = []
    for n in (int(v) for v in box_size):
        first = torch.arange(0, n, block_size)
        last = torch.clamp(first + block_size, max=n) - 1
        axes.append(torch.unique(torch.cat((first, (first + last) // 2, last))).to(device))
    return axes


# ------------------------------------------------------------------------------- projection and pooling


def project_points(points: Tensor, projection_matrices: Tensor) -> tuple[Tensor, Tensor]:
    """Detector pixel coordinates of world points in every view.

    Args:
        points: ``[B, N, 3]`` world (x, y, z) mm.
        projection_matrices: ``[B, K, 3, 4]`` world -> ``(col w, row w, w)`` (pixel centres at integers).

    Returns:
        ``(pixels [B, K, N, 2], depth [B, K, N])``: ``(col, row)`` full-resolution pixel coordinates and
        the homogeneous ``w`` (positive in front of a cone-beam source, 1 for parallel beam).
    """
    hom = torch.einsum("bkij,bnj->bkni", projection_matrices[..., :3], points)
    hom = hom + projection_matrices[:, :, None, :, 3]
    depth = hom[..., 2]
    tiny = torch.finfo(depth.dtype).tiny
    safe = torch.where(depth.abs() > tiny, depth, torch.ones_like(depth))
    return hom[..., :2] / safe[..., None], depth


def sample_views(feature_maps: Tensor, points: Tensor, projection_matrices: Tensor,
                 image_size: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Bilinear samples of each view's feature map where each point projects.

    Args:
        feature_maps: ``[B, K, C, h, w]`` per-view features covering the ``H x W`` detector (any ``h, w``).
        points: ``[B, N, 3]`` world (x, y, z) mm.
        projection_matrices: ``[B, K, 3, 4]`` of the full-resolution ``H x W`` detector.
        image_size: ``(H, W)`` detector rows and columns the matrices refer to.

    Returns:
        ``(samples [B, K, N, C], visible [B, K, N] bool)``. ``visible``: in front of the source and
        inside the detector (pixel coordinates within ``[-0.5, W - 0.5] x [-0.5, H - 0.5]``). Samples use
        border padding (a point on the detector's outer half pixel reads the edge feature).
    """
    b, k, c, fh, fw = feature_maps.shape
    rows, cols = (int(s) for s in image_size)
    pixels, depth = project_points(points.to(feature_maps.dtype), projection_matrices.to(feature_maps.dtype))
    size = torch.tensor([cols, rows], dtype=pixels.dtype, device=pixels.device)
    grid = (2.0 * pixels + 1.0) / size - 1.0  # [B, K, N, 2] (x = col, y = row), align_corners=False
    visible = (depth > 0) & (grid.abs() <= 1.0).all(dim=-1)
    grid = grid.clamp(-1.0, 1.0)  # hidden points read the border; they are masked out when pooling
    samples = F.grid_sample(feature_maps.reshape(b * k, c, fh, fw), grid.reshape(b * k, -1, 1, 2),
                            mode="bilinear", padding_mode="border", align_corners=False)  # [BK, C, N, 1]
    return samples.reshape(b, k, c, -1).transpose(2, 3), visible


def max_pool_views(samples: Tensor, visible: Tensor) -> Tensor:
    """Max over the views ``[B, K, N, C] -> [B, N, C]``, among the visible ones (zeros where none is)."""
    masked = samples.masked_fill(~visible[..., None], float("-inf"))
    pooled = masked.amax(dim=1)
    return torch.where(visible.any(dim=1)[..., None], pooled, torch.zeros_like(pooled))


# ------------------------------------------------------------------------------------------- decoder


class VoxGSDecoder(nn.Module):
    """Per-view feature maps -> one Gaussian at every voxel centre of a grid (or of a sub-box of it).

    Args:
        feature_dim: channels ``C`` of the feature maps.
        hidden_dim: width of the MLP's hidden layers.
        num_layers: linear layers of the MLP (``>= 1``; GELU between them).
        min_scale, max_scale: bounds of each scale in voxel units (the mean voxel edge
            ``|det A|^{1/3}`` of the grid's affine ``A``), converted to mm; the initial scale is
            :data:`UNIT_MASS_SCALE` when it lies inside the bounds.
        shift: predict a bounded offset of each centre (the paper's "w/ shift" ablation); features
            are still sampled at the voxel centre.
        max_shift: largest offset per array axis, in voxels.

    ``forward(...) -> Gaussians`` (see :meth:`forward`).
    """

    def __init__(self, feature_dim: int, hidden_dim: int = 128, num_layers: int = 3, min_scale: float = 0.25,
                 max_scale: float = 1.0, shift: bool = False, max_shift: float = 0.5) -> None:
        super().__init__()
        for name, value in (("feature_dim", feature_dim), ("hidden_dim", hidden_dim), ("num_layers", num_layers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not (0 < min_scale < max_scale and math.isfinite(max_scale)):
            raise ValueError(f"min_scale and max_scale must satisfy 0 < min_scale < max_scale (voxels), "
                             f"got {min_scale!r}, {max_scale!r}")
        if shift and not (0 < max_shift and math.isfinite(max_shift)):
            raise ValueError(f"max_shift must be a positive number of voxels, got {max_shift!r}")
        self.min_scale, self.max_scale = float(min_scale), float(max_scale)
        self.shift, self.max_shift = bool(shift), float(max_shift)
        outputs = NUM_PARAMS + (NUM_SHIFT if shift else 0)
        widths = [feature_dim] + [hidden_dim] * (num_layers - 1) + [outputs]
        layers: list[nn.Module] = []
        for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
            if i:
                layers.append(nn.GELU())
            layers.append(nn.Linear(n_in, n_out))
        self.mlp = nn.Sequential(*layers)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        head = self.mlp[-1]
        init_scale = min(max(UNIT_MASS_SCALE, self.min_scale * 1.01), self.max_scale * 0.99)
        fraction = (init_scale - self.min_scale) / (self.max_scale - self.min_scale)
        with torch.no_grad():
            head.bias[0] = OPACITY_BIAS_INIT
            head.bias[1:4] = math.log(fraction / (1.0 - fraction))
            head.bias[4] = 1.0  # identity rotation (w = 1)

    @property
    def num_outputs(self) -> int:
        """Raw values per Gaussian (8, or 11 with ``shift``)."""
        return self.mlp[-1].out_features

    def forward(self, feature_maps: Tensor, projection_matrices: Tensor, image_size: Sequence[int],
                grid_affine: Tensor, box_start: Tensor, box_size: Sequence[int], chunk_size: int,
                grad_checkpointing: bool = False) -> Gaussians:
        """Decode the Gaussians of one box of the grid.

        Args:
            feature_maps: ``[B, K, C, h, w]`` per-view feature maps (any float dtype).
            projection_matrices: ``[B, K, 3, 4]`` for the ``image_size`` detector.
            image_size: ``(H, W)`` detector pixels.
            grid_affine: ``[B, 4, 4]`` float64 voxel-to-world affines (:func:`check_grid`).
            box_start: ``[B, 3]`` int64, ``box_size`` ``(d, h, w)`` (:func:`check_box`).
            chunk_size: voxels decoded at once (bounds the memory of sampling and the MLP).
            grad_checkpointing: recompute each chunk in the backward pass instead of storing it.

        Returns:
            ``B x (d h w)`` Gaussians in world mm (float32, or float64 for float64 inputs, also under
            autocast), in C order over the box; ``intensities`` are the opacities (the CT values).
        """
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        total = math.prod(box_size)
        work = torch.promote_types(feature_maps.dtype, torch.float32)  # never sample or place in bf16
        maps, matrices = feature_maps.to(work), projection_matrices.to(device=feature_maps.device, dtype=work)
        grid_affine, box_start = grid_affine.to(maps.device), box_start.to(maps.device)
        store = grad_checkpointing and torch.is_grad_enabled()
        raw, centres = [], []
        for first in range(0, total, chunk_size):
            last = min(total, first + chunk_size)
            centres.append(voxel_centres(grid_affine, box_start, box_size, first, last, work))
            if store:
                raw.append(checkpoint(self._decode_chunk, maps, matrices, centres[-1], tuple(image_size),
                                      use_reentrant=False))
            else:
                raw.append(self._decode_chunk(maps, matrices, centres[-1], tuple(image_size)))
        params = torch.cat(raw, dim=1)
        return self._activate(params, torch.cat(centres, dim=1).to(params.dtype), grid_affine)

    def forward_skipping_empty(self, feature_maps: Tensor, projection_matrices: Tensor, image_size: Sequence[int],
                               grid_affine: Tensor, box_start: Tensor, box_size: Sequence[int], chunk_size: int,
                               threshold: float, block_size: int = 8,
                               grad_checkpointing: bool = False) -> tuple[Gaussians, Tensor]:
        """:meth:`forward` that skips the blocks a coarse pass finds empty (see the module docstring).

        Args:
            feature_maps, projection_matrices, image_size, grid_affine, box_start, box_size, chunk_size,
                grad_checkpointing: as :meth:`forward`.
            threshold: opacity (CT value) below which a block counts as empty; finite, ``>= 0``.
            block_size: edge (voxels) of the blocks, tiled from the box's corner (the last ones clipped).

        Returns:
            ``(gaussians, skipped_fraction)``: the ``B x (d h w)`` Gaussians of :meth:`forward`, with opacity
            exactly 0 (scale at the middle of its bounds, identity rotation, no shift) in the skipped cells,
            and ``[B]`` float the fraction of each sample's box voxels that were skipped. When no block is
            skipped the Gaussians are exactly :meth:`forward`'s.
        """
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold) \
                or threshold < 0:
            raise ValueError(f"skip_empty threshold must be a finite number >= 0 (an opacity), got {threshold!r}")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"skip_block_size must be a positive int (voxels), got {block_size!r}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        size = tuple(int(s) for s in box_size)
        total = math.prod(size)
        b = feature_maps.shape[0]
        work = torch.promote_types(feature_maps.dtype, torch.float32)
        maps, matrices = feature_maps.to(work), projection_matrices.to(device=feature_maps.device, dtype=work)
        grid_affine, box_start = grid_affine.to(maps.device), box_start.to(maps.device)
        store = grad_checkpointing and torch.is_grad_enabled()
        image = tuple(image_size)

        # coarse pass: the largest opacity among each block's 27 sample voxels
        samples = coarse_block_samples(size, block_size, maps.device)  # 3 x [n_a]
        nblocks = [math.ceil(n / block_size) for n in size]
        index = torch.stack(torch.meshgrid(*samples, indexing="ij"), dim=-1).reshape(-1, 3)  # [M, 3]
        cell = index // block_size
        block = (cell[:, 0] * nblocks[1] + cell[:, 1]) * nblocks[2] + cell[:, 2]  # [M] C-order block number
        flat = (index[:, 0] * size[1] + index[:, 1]) * size[2] + index[:, 2]
        opacity = torch.cat([F.softplus(raw[..., 0]) for raw in self._decode_voxels(
            maps, matrices, grid_affine, box_start, size, flat, image, chunk_size, store)], dim=1).detach()
        block_max = opacity.new_full((b, math.prod(nblocks)), -math.inf)
        block_max = block_max.scatter_reduce(1, block.expand(b, -1), opacity, reduce="amax")
        kept_block = block_max >= threshold  # [B, blocks]
        if bool(kept_block.all()):
            gaussians = self.forward(feature_maps, projection_matrices, image_size, grid_affine, box_start, size,
                                     chunk_size, grad_checkpointing)
            return gaussians, torch.zeros(b, dtype=torch.float64, device=maps.device)

        # fine pass: every voxel of the kept blocks, sample by sample
        kept = kept_block.reshape(b, *nblocks)
        for axis, n in enumerate(size):
            kept = kept.repeat_interleave(block_size, dim=axis + 1).narrow(axis + 1, 0, n)
        kept = kept.reshape(b, total)  # [B, total] bool
        raw = maps.new_zeros(b, total, self.num_outputs)
        raw[..., 4] = 1.0  # identity rotation in the skipped cells
        for i in range(b):
            chosen = kept[i].nonzero().squeeze(1)
            if chosen.numel() == 0:
                continue
            pieces = self._decode_voxels(maps[i: i + 1], matrices[i: i + 1], grid_affine[i: i + 1],
                                         box_start[i: i + 1], size, chosen, image, chunk_size, store)
            raw.index_put_((torch.full_like(chosen, i), chosen), torch.cat(pieces, dim=1)[0].to(raw.dtype))
        centres = torch.cat([voxel_centres(grid_affine, box_start, size, first, min(total, first + chunk_size), work)
                             for first in range(0, total, chunk_size)], dim=1)
        g = self._activate(raw, centres.to(raw.dtype), grid_affine)
        intensities = torch.where(kept, g.intensities, torch.zeros_like(g.intensities))
        skipped = 1.0 - kept.to(torch.float64).mean(dim=1)
        return Gaussians(g.means, g.scales, g.quats, intensities, validate=False), skipped

    def _decode_voxels(self, maps: Tensor, matrices: Tensor, grid_affine: Tensor, box_start: Tensor,
                       box_size: tuple[int, int, int], flat: Tensor, image_size: tuple[int, int], chunk_size: int,
                       store: bool) -> list[Tensor]:
        """Raw values ``[B, m, P]`` (one tensor per chunk) of the box voxels ``flat [M]`` (C-order indices)."""
        _, h, w = box_size
        out = []
        for first in range(0, flat.shape[0], chunk_size):
            n = flat[first: first + chunk_size]
            index = torch.stack((n // (h * w), (n // w) % h, n % w), dim=-1)  # as voxel_centres computes it
            cells = (index[None] + box_start[:, None, :]).to(torch.float64)
            centres = (cells @ grid_affine[:, :3, :3].transpose(1, 2) + grid_affine[:, None, :3, 3]).to(maps.dtype)
            if store:
                out.append(checkpoint(self._decode_chunk, maps, matrices, centres, image_size, use_reentrant=False))
            else:
                out.append(self._decode_chunk(maps, matrices, centres, image_size))
        return out

    def _decode_chunk(self, maps: Tensor, matrices: Tensor, centres: Tensor, image_size: tuple[int, int]) -> Tensor:
        with torch.autocast(device_type=maps.device.type, enabled=False):
            samples, visible = sample_views(maps, centres, matrices, image_size)
            pooled = max_pool_views(samples, visible)
        raw = self.mlp(pooled.to(self.mlp[0].weight.dtype))  # ambient autocast applies here
        return raw.to(torch.promote_types(raw.dtype, torch.float32))

    def _activate(self, raw: Tensor, centres: Tensor, grid_affine: Tensor) -> Gaussians:
        return activate_voxel_gaussians(raw, centres, grid_affine, self.min_scale, self.max_scale, self.shift,
                                        self.max_shift)


def activate_voxel_gaussians(raw: Tensor, centres: Tensor, grid_affine: Tensor, min_scale: float, max_scale: float,
                             shift: bool, max_shift: float) -> Gaussians:
    """The VoxGS activation: raw values ``[B, N, 8 | 11]`` at voxel ``centres [B, N, 3]`` mm -> Gaussians.

    Opacity ``softplus`` (the CT value), scales ``min + (max - min) sigmoid`` in units of the mean voxel
    edge ``|det A|^{1/3}`` of ``grid_affine [B, 4, 4]`` then mm, normalised quaternions, and with ``shift``
    a ``max_shift tanh`` offset (voxels along the array axes); float32 also under autocast. Shared by
    :class:`VoxGSDecoder` and :class:`medgauss.nets.ilrm.IterativeGaussianDecoder`.
    """
    with torch.autocast(device_type=raw.device.type, enabled=False):
        lin = grid_affine[:, :3, :3]
        voxel_mm = torch.linalg.det(lin).abs().pow(1.0 / 3.0).to(raw.dtype)  # [B]
        intensities = F.softplus(raw[..., 0])
        scales = (min_scale + (max_scale - min_scale) * torch.sigmoid(raw[..., 1:4])) * voxel_mm[:, None, None]
        quats = F.normalize(raw[..., 4:8], dim=-1, eps=1e-12)
        means = centres
        if shift:
            offset_vox = max_shift * torch.tanh(raw[..., 8:11])
            means = means + offset_vox @ lin.transpose(1, 2).to(raw.dtype)
    return Gaussians(means, scales, quats, intensities, validate=False)
