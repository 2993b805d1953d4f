"""A tiny masked autoencoder following the MedGMAE model contract, for engine-mechanics tests only.

It patchifies ``[B, 1, S, S, S]`` volumes into ``p^3`` patches, hides a random 75% per sample (torch
global RNG, like the real models), encodes the visible patches with an MLP + mean pooling and predicts
every patch's voxels. Loss = MSE on hidden patches.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn


@dataclass
class TinyOut:
    mask: Tensor  # [B, L] bool, True = hidden
    pred: Tensor  # [B, L, p^3]


class TinyMAE(nn.Module):
    def __init__(
        self,
        img_size: int = 16,
        patch_size: int = 8,
        hidden: int = 32,
        mask_ratio: float = 0.75,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.config = {
            "img_size": img_size,
            "patch_size": patch_size,
            "hidden": hidden,
            "mask_ratio": mask_ratio,
            "dropout": dropout,
        }
        self.img_size, self.patch_size, self.mask_ratio = img_size, patch_size, mask_ratio
        self.grid = img_size // patch_size
        self.num_patches = self.grid**3
        voxels = patch_size**3
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, hidden))
        self.encode = nn.Sequential(nn.Linear(voxels, hidden), nn.LayerNorm(hidden), nn.GELU())
        self.decode = nn.Linear(2 * hidden, voxels)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def patchify(self, images: Tensor) -> Tensor:
        b, p, g = images.shape[0], self.patch_size, self.grid
        x = images.reshape(b, g, p, g, p, g, p).permute(0, 1, 3, 5, 2, 4, 6)
        return x.reshape(b, g**3, p**3)

    def unpatchify(self, patches: Tensor) -> Tensor:
        b, p, g = patches.shape[0], self.patch_size, self.grid
        x = patches.reshape(b, g, g, g, p, p, p).permute(0, 1, 4, 2, 5, 3, 6)
        return x.reshape(b, 1, g * p, g * p, g * p)

    def forward(self, images: Tensor) -> TinyOut:
        patches = self.patchify(images)
        b, length = patches.shape[:2]
        keep = max(1, int(round(length * (1 - self.mask_ratio))))
        order = torch.argsort(torch.rand(b, length, device=images.device), dim=1)
        mask = torch.ones(b, length, dtype=torch.bool, device=images.device)
        mask.scatter_(1, order[:, :keep], False)
        tokens = self.drop(self.encode(patches) + self.pos_embed)
        visible = (tokens * (~mask)[..., None]).sum(1) / keep
        context = visible[:, None, :].expand(-1, length, -1)
        pred = self.decode(torch.cat([context, self.pos_embed.expand(b, -1, -1)], dim=-1))
        return TinyOut(mask=mask, pred=pred)

    def reconstruct(self, out: TinyOut, images_shape) -> Tensor:
        return self.unpatchify(out.pred)

    def mask_to_volume(self, mask: Tensor) -> Tensor:
        p = self.patch_size
        return self.unpatchify(mask[..., None].float().expand(-1, -1, p**3)) > 0.5

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        tmp = Path(tempfile.mkdtemp(dir=directory.parent if directory.parent.exists() else None))
        torch.save(self.state_dict(), tmp / "weights.pt")
        (tmp / "config.json").write_text(json.dumps(self.config))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)


class TinyMaskedLoss(nn.Module):
    def __init__(self, model: TinyMAE):
        super().__init__()
        self.patchify = model.patchify

    def forward(self, out: TinyOut, images: Tensor) -> Tensor:
        err = ((out.pred - self.patchify(images)) ** 2).mean(-1)
        return (err * out.mask).sum() / out.mask.sum()
