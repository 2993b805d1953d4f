"""Tile binning for the tile-based splat kernels, in plain torch ops on the tensors' device.

The volume ``(D, H, W)`` is cut into tiles of ``(TD, TH, TW)`` voxels. A tile *owns* the part of the
normalised cube covered by its voxels' cells (voxel ``i`` of an axis of size ``n`` owns
``[i / n, (i + 1) / n)``; the last one also owns ``1``). Every point (voxel centre or query point)
therefore belongs to exactly one tile, and a Gaussian is listed for a tile whenever its axis-aligned
cut-off box ``mu +- half_extent`` reaches one of the tile's cells. The box contains the ellipsoid
``q < cutoff^2``, so every Gaussian that can contribute to a point of the tile is listed for it.

Keys: a tile of batch item ``b`` has key ``b * num_tiles + t`` with ``t`` the tile's C-order index in
the tile grid; Gaussians are addressed by their flat index ``b * N + i``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["TileGrid", "bin_gaussians", "bin_points", "gaussian_tile_boxes", "tile_keys_of_points"]

# Cells of slack added to each side of a box, relative to its size, plus an absolute part, so that
# rounding in the box or in the kernel's Mahalanobis distance never drops a contributing pair.
_RELATIVE_SLACK = 1e-4
_ABSOLUTE_SLACK = 1e-3


@dataclass(frozen=True)
class TileGrid:
    """A volume ``shape = (D, H, W)`` cut into tiles of ``tile = (TD, TH, TW)`` voxels."""

    shape: tuple[int, int, int]
    tile: tuple[int, int, int]

    @property
    def tiles_per_axis(self) -> tuple[int, int, int]:
        return tuple(-(-n // t) for n, t in zip(self.shape, self.tile))  # type: ignore[return-value]

    @property
    def num_tiles(self) -> int:
        return math.prod(self.tiles_per_axis)


def gaussian_tile_boxes(means: Tensor, half_extents: Tensor, grid: TileGrid) -> tuple[Tensor, Tensor]:
    """Inclusive tile-index range ``[lo, hi]`` of each Gaussian along each axis.

    Args:
        means: ``[B, N, 3]`` centres, normalised coordinates.
        half_extents: ``[B, N, 3]`` half-size of the cut-off box, normalised units (``inf`` = everywhere).
        grid: the tile grid.

    Returns:
        ``(lo, hi)``, both ``[B, N, 3]`` int64; ``lo > hi`` on some axis means the box misses the
        volume on that axis (the Gaussian touches no tile).
    """
    mu = means.detach().to(torch.float64)
    ext = half_extents.detach().to(torch.float64)
    sizes = torch.tensor(grid.shape, dtype=torch.float64, device=means.device)
    tiles = torch.tensor(grid.tile, dtype=torch.int64, device=means.device)
    slack = _ABSOLUTE_SLACK + _RELATIVE_SLACK * torch.nan_to_num(ext * sizes, posinf=0.0)
    # Cell index range of the box, clamped in floating point first (the box may be infinite).
    lo_cell = torch.minimum(torch.floor((mu - ext) * sizes - slack).clamp_min(-1.0), sizes)
    hi_cell = torch.minimum(torch.floor((mu + ext) * sizes + slack).clamp_min(-1.0), sizes)
    last = sizes.to(torch.int64) - 1
    out_of_volume = (hi_cell < 0) | (lo_cell > last)
    lo = torch.minimum(lo_cell.to(torch.int64).clamp_min(0), last) // tiles
    hi = torch.minimum(hi_cell.to(torch.int64).clamp_min(0), last) // tiles
    hi = torch.where(out_of_volume, lo - 1, hi)
    return lo, hi


def bin_gaussians(means: Tensor, half_extents: Tensor, grid: TileGrid) -> tuple[Tensor, Tensor]:
    """Sorted (tile, Gaussian) pairs and each tile's range into them.

    Args:
        means: ``[B, N, 3]`` centres, normalised coordinates.
        half_extents: ``[B, N, 3]`` cut-off box half-sizes (finite).
        grid: the tile grid.

    Returns:
        ``(tile_start, gaussian_ids)``: ``tile_start [B * num_tiles + 1]`` int32 offsets (tile key ``k``
        owns ``gaussian_ids[tile_start[k]:tile_start[k + 1]]``) and ``gaussian_ids [P]`` int32 flat
        Gaussian indices ``b * N + i``, ascending within each tile.
    """
    b, n = means.shape[:2]
    device = means.device
    lo, hi = gaussian_tile_boxes(means, half_extents, grid)
    box = (hi - lo + 1).clamp_min(0)  # [B, N, 3] tiles per axis
    counts = box.prod(-1).reshape(-1)  # [B*N]
    num_keys = b * grid.num_tiles
    total = int(counts.sum())
    if total >= 2**31:
        raise ValueError(f"{total} (tile, Gaussian) pairs exceed int32 indexing (B={b}, N={n}, "
                         f"tiles={grid.num_tiles}); use a smaller cutoff, fewer Gaussians or smaller batches")
    if total == 0:
        return torch.zeros(num_keys + 1, dtype=torch.int32, device=device), torch.zeros(
            0, dtype=torch.int32, device=device)
    gid = torch.repeat_interleave(torch.arange(b * n, device=device), counts, output_size=total)
    first = torch.cumsum(counts, 0) - counts  # first pair of each Gaussian
    k = torch.arange(total, device=device) - first[gid]  # pair's index inside its Gaussian's box
    box_flat, lo_flat = box.reshape(-1, 3)[gid], lo.reshape(-1, 3)[gid]
    kw = k % box_flat[:, 2]
    kh = (k // box_flat[:, 2]) % box_flat[:, 1]
    kd = k // (box_flat[:, 2] * box_flat[:, 1])
    _, nth, ntw = grid.tiles_per_axis
    tile = ((lo_flat[:, 0] + kd) * nth + (lo_flat[:, 1] + kh)) * ntw + (lo_flat[:, 2] + kw)
    key = (gid // n) * grid.num_tiles + tile
    # Gaussians are generated in ascending order, so a stable sort keeps them ascending per tile,
    # which makes the forward sum's order (and result) deterministic.
    key_sorted, order = torch.sort(key, stable=True)
    tile_start = torch.zeros(num_keys + 1, dtype=torch.int64, device=device)
    tile_start[1:] = torch.cumsum(torch.bincount(key_sorted, minlength=num_keys), 0)
    return tile_start.to(torch.int32), gid[order].to(torch.int32)


def tile_keys_of_points(points: Tensor, grid: TileGrid) -> Tensor:
    """Tile key ``[B, M]`` (int64) of each normalised point ``[B, M, 3]`` (points in ``[0, 1]``)."""
    b = points.shape[0]
    sizes = torch.tensor(grid.shape, dtype=points.dtype, device=points.device)
    last = torch.tensor(grid.shape, device=points.device) - 1
    cell = torch.minimum(torch.floor(points * sizes).to(torch.int64).clamp_min(0), last)
    t = cell // torch.tensor(grid.tile, device=points.device)
    _, nth, ntw = grid.tiles_per_axis
    tile = (t[..., 0] * nth + t[..., 1]) * ntw + t[..., 2]
    return tile + torch.arange(b, device=points.device)[:, None] * grid.num_tiles


def bin_points(points: Tensor, grid: TileGrid, block: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Group query points by tile into work items of at most ``block`` points.

    Args:
        points: ``[B, M, 3]`` normalised coordinates in ``[0, 1]``.
        grid: the tile grid.
        block: the most points one work item (one kernel program) handles.

    Returns:
        ``(order, points_sorted, item_tile, item_start, item_count)``: ``order [B*M]`` int64 such that
        ``points.reshape(-1, 3)[order]`` is sorted by tile key; ``points_sorted [B*M, 3]`` (contiguous);
        per work item its tile key, first sorted point and number of points (``[I]`` int32 each).
    """
    keys = tile_keys_of_points(points, grid).reshape(-1)
    num_keys = points.shape[0] * grid.num_tiles
    keys_sorted, order = torch.sort(keys, stable=True)
    counts = torch.bincount(keys_sorted, minlength=num_keys)
    starts = torch.cumsum(counts, 0) - counts
    items_per_tile = -(-counts // block)
    num_items = int(items_per_tile.sum())
    item_tile = torch.repeat_interleave(torch.arange(num_keys, device=points.device), items_per_tile,
                                        output_size=num_items)
    first_item = torch.cumsum(items_per_tile, 0) - items_per_tile
    item_rank = torch.arange(num_items, device=points.device) - first_item[item_tile]
    item_start = starts[item_tile] + item_rank * block
    item_count = torch.minimum(counts[item_tile] - item_rank * block, torch.full_like(item_rank, block))
    points_sorted = points.reshape(-1, 3)[order].contiguous()
    return (order, points_sorted, item_tile.to(torch.int32), item_start.to(torch.int32),
            item_count.to(torch.int32))
