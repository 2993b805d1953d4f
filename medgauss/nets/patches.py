"""Patch bookkeeping shared by the models and the losses: patchify / unpatchify and masks.

Patches are numbered in C order over the patch grid ``(gd, gh, gw)``, the order of
:class:`medgauss.nets.blocks.PatchEmbed3D`; inside a patch, values are ordered ``(pd, ph, pw, c)``.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

__all__ = ["patchify", "unpatchify", "mask_to_volume", "masked_voxel_indices", "patch_centres"]


def patchify(images: Tensor, patch_size: tuple[int, int, int]) -> Tensor:
    """``images [B, C, D, H, W] -> [B, L, pd*ph*pw*C]`` (sizes must be multiples of ``patch_size``)."""
    b, c, d, h, w = images.shape
    pd, ph, pw = patch_size
    if d % pd or h % ph or w % pw:
        raise ValueError(f"images spatial size {(d, h, w)} is not divisible by patch_size {patch_size}")
    x = images.reshape(b, c, d // pd, pd, h // ph, ph, w // pw, pw)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # b, gd, gh, gw, pd, ph, pw, c
    return x.reshape(b, (d // pd) * (h // ph) * (w // pw), pd * ph * pw * c)


def unpatchify(patches: Tensor, patch_size: tuple[int, int, int], grid_size: tuple[int, int, int],
               channels: int) -> Tensor:
    """Inverse of :func:`patchify`: ``[B, L, pd*ph*pw*C] -> [B, C, D, H, W]``."""
    b = patches.shape[0]
    gd, gh, gw = grid_size
    pd, ph, pw = patch_size
    x = patches.reshape(b, gd, gh, gw, pd, ph, pw, channels)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(b, channels, gd * pd, gh * ph, gw * pw)


def mask_to_volume(mask: Tensor, grid_size: tuple[int, int, int], patch_size: tuple[int, int, int]) -> Tensor:
    """Patch mask ``[B, L]`` (True = hidden) -> voxel mask ``[B, 1, D, H, W]`` bool."""
    b = mask.shape[0]
    vol = mask.bool().reshape(b, 1, *grid_size)
    for axis, p in enumerate(patch_size):
        vol = vol.repeat_interleave(p, dim=2 + axis)
    return vol


@functools.lru_cache(maxsize=8)
def _patch_voxel_table(grid_size: tuple[int, int, int], patch_size: tuple[int, int, int],
                       device: torch.device) -> Tensor:
    """``[L, pd*ph*pw, 3]`` int32 voxel indices of every patch, in patchify order (cached: one per grid)."""
    gd, gh, gw = grid_size
    patch = torch.tensor(patch_size, dtype=torch.int32)
    grid = torch.stack(torch.meshgrid(*[torch.arange(g, dtype=torch.int32) for g in grid_size], indexing="ij"),
                       dim=-1).reshape(-1, 1, 3)
    offsets = torch.stack(torch.meshgrid(*[torch.arange(p, dtype=torch.int32) for p in patch_size],
                                         indexing="ij"), dim=-1).reshape(1, -1, 3)
    return (grid * patch + offsets).to(device)


def masked_voxel_indices(mask: Tensor, grid_size: tuple[int, int, int],
                         patch_size: tuple[int, int, int]) -> Tensor:
    """Integer voxel indices ``[B, M, 3]`` (d, h, w) of every hidden voxel, int32.

    Ordered patch by patch (hidden patches in increasing patch index), each patch's voxels in C
    order, i.e. the order of :func:`patchify` values. Every sample must hide the same number of
    patches (``random_masking`` guarantees it), so ``M = hidden patches * pd * ph * pw`` for all.
    Rows are copied from a cached per-patch index table (contiguous copies; building the indices
    by broadcasting costs ~20x more for the 10^6 indices of a 96^3 batch).
    """
    b = mask.shape[0]
    counts = mask.sum(dim=1)
    if b and not bool((counts == counts[0]).all()):
        raise ValueError(f"mask must hide the same number of patches in every sample, got {counts.tolist()}")
    table = _patch_voxel_table(tuple(grid_size), tuple(patch_size), mask.device)
    if mask.shape[1] != table.shape[0]:
        raise ValueError(f"mask has {mask.shape[1]} patches but grid_size {tuple(grid_size)} has {table.shape[0]}")
    hidden = torch.nonzero(mask)[:, 1]  # [B * Lm], increasing per sample
    per_sample = int(mask[0].sum()) * table.shape[1] if b else 0
    return table.index_select(0, hidden).reshape(b, per_sample, 3)


def patch_centres(grid_size: tuple[int, int, int]) -> Tensor:
    """Centres ``[L, 3]`` (float32) of the patches of ``grid_size``, in patch units, in patch index
    (C) order: patch ``(i, j, k)`` is centred at ``(i + 0.5, j + 0.5, k + 0.5)``."""
    axes = [torch.arange(int(n), dtype=torch.float32) + 0.5 for n in grid_size]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)
