"""Patch bookkeeping shared by the models and the losses: patchify / unpatchify and masks.

Patches are numbered in C order over the patch grid ``(gd, gh, gw)``, the order of
:class:`medgauss.nets.blocks.PatchEmbed3D`; inside a patch, values are ordered ``(pd, ph, pw, c)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["patchify", "unpatchify", "mask_to_volume", "masked_voxel_indices"]


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


def masked_voxel_indices(mask: Tensor, grid_size: tuple[int, int, int],
                         patch_size: tuple[int, int, int]) -> Tensor:
    """Integer voxel indices ``[B, M, 3]`` (d, h, w; C order) of every hidden voxel.

    Every sample must hide the same number of patches (``random_masking`` guarantees it), so that
    ``M = hidden patches * pd * ph * pw`` is the same for the whole batch.
    """
    counts = mask.sum(dim=1)
    if mask.shape[0] and not bool((counts == counts[0]).all()):
        raise ValueError(f"mask must hide the same number of patches in every sample, got {counts.tolist()}")
    vol = mask_to_volume(mask, grid_size, patch_size)[:, 0]
    idx = torch.nonzero(vol)  # [B*M, 4], sorted by batch then C order
    return idx[:, 1:].reshape(mask.shape[0], -1, 3)
