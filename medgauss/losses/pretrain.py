"""Pretraining losses: masked-voxel MSE for Gaussian models, masked-patch MSE for voxel-MAE."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from medgauss.nets.gaussian_mae import GaussianMAE, GaussianMAEOutput
from medgauss.nets.patches import masked_voxel_indices, patchify
from medgauss.nets.voxel_mae import VoxelMAE, VoxelMAEOutput
from medgauss.render import splat

__all__ = ["MaskedGaussianLoss", "MaskedPatchLoss", "pretrain_loss_for"]


def _check_images(images: object, grid_size: tuple[int, int, int], patch_size: tuple[int, int, int],
                  batch: int) -> Tensor:
    expected = tuple(g * p for g, p in zip(grid_size, patch_size))
    if not isinstance(images, Tensor) or images.ndim != 5 or tuple(images.shape[2:]) != expected \
            or images.shape[0] != batch:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must have shape [B={batch}, C, {expected[0]}, {expected[1]}, "
                         f"{expected[2]}] "
                         f"to match the model output, got {shape}")
    return images


class MaskedGaussianLoss(nn.Module):
    """Mean squared error between the splatted Gaussians and ``images`` over the hidden voxels.

    The Gaussians are evaluated only at the hidden voxels (``splat(..., points=<int voxel indices>)``),
    which equals the dense render gathered at the mask.

    Args:
        cutoff: Mahalanobis truncation radius passed to :func:`medgauss.render.splat`.
        backend: splat backend (``"auto"`` picks numba on CPU, triton on CUDA).
        visible_weight: weight ``w`` of an extra term, the MSE over the *visible* voxels:
            ``loss = mse(hidden) + w * mse(visible)``. 0 (the paper's loss) evaluates the hidden voxels
            only; ``w > 0`` also asks the Gaussians to reproduce what the encoder saw, at the cost of
            evaluating every voxel (the hidden share is ``mask_ratio``).
    """

    def __init__(self, cutoff: float | None = 3.0, backend: str = "auto", visible_weight: float = 0.0) -> None:
        super().__init__()
        self.cutoff = cutoff
        self.backend = backend
        self.visible_weight = _check_visible_weight(visible_weight)

    def forward(self, out: GaussianMAEOutput, images: Tensor) -> Tensor:
        """``out`` from :class:`GaussianMAE`, ``images [B, 1, D, H, W]`` -> scalar loss."""
        g = out.gaussians
        images = _check_images(images, out.grid_size, out.patch_size, g.batch_size)
        if images.shape[1] != 1:
            raise ValueError("images must have 1 channel for a Gaussian loss, got shape "
                             f"{tuple(images.shape)}")
        idx = masked_voxel_indices(out.mask, out.grid_size, out.patch_size)  # [B, M, 3]
        hidden = idx.shape[1]
        if self.visible_weight:  # one splat call for hidden then visible voxels
            idx = torch.cat([idx, masked_voxel_indices(~out.mask, out.grid_size, out.patch_size)], dim=1)
        pred = splat(g, images.shape[2:], points=idx, cutoff=self.cutoff, backend=self.backend)  # [B, M(+V)]
        # the input's voxels in the order of ``idx`` (patch by patch, C order inside)
        patches = patchify(images, out.patch_size)
        target = patches[out.mask].reshape(g.batch_size, -1).to(pred.dtype)
        loss = (pred[:, :hidden] - target).square().mean()
        if self.visible_weight:
            seen = patches[~out.mask].reshape(g.batch_size, -1).to(pred.dtype)
            loss = loss + self.visible_weight * (pred[:, hidden:] - seen).square().mean()
        return loss


class MaskedPatchLoss(nn.Module):
    """MAE loss: per-voxel MSE averaged over the hidden patches.

    Args:
        norm_pix_loss: normalise each target patch to zero mean / unit variance first (MAE option).
        visible_weight: weight ``w`` of the same MSE over the visible patches,
            ``loss = mse(hidden) + w * mse(visible)``; 0 is MAE's loss.
    """

    def __init__(self, norm_pix_loss: bool = False, eps: float = 1e-6, visible_weight: float = 0.0) -> None:
        super().__init__()
        self.norm_pix_loss = norm_pix_loss
        self.eps = eps
        self.visible_weight = _check_visible_weight(visible_weight)

    def forward(self, out: VoxelMAEOutput, images: Tensor) -> Tensor:
        """``out`` from :class:`VoxelMAE`, ``images [B, C, D, H, W]`` -> scalar loss."""
        images = _check_images(images, out.grid_size, out.patch_size, out.pred.shape[0])
        target = patchify(images, out.patch_size).to(out.pred.dtype)
        if target.shape != out.pred.shape:
            raise ValueError(f"images give patches of shape {tuple(target.shape)} but out.pred has "
                             f"{tuple(out.pred.shape)} (channel mismatch?)")
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + self.eps).sqrt()
        per_patch = (out.pred - target).square().mean(dim=-1)
        mask = out.mask.to(per_patch.dtype)
        loss = (per_patch * mask).sum() / mask.sum()
        if self.visible_weight:
            loss = loss + self.visible_weight * (per_patch * (1 - mask)).sum() / (1 - mask).sum()
        return loss


def _check_visible_weight(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"visible_weight must be a finite number >= 0, got {value!r}")
    return float(value)


def pretrain_loss_for(model: nn.Module, **kwargs: object) -> nn.Module:
    """The pretraining loss of ``model``: :class:`MaskedGaussianLoss` for :class:`GaussianMAE`,
    :class:`MaskedPatchLoss` for :class:`VoxelMAE`; ``kwargs`` go to the loss constructor."""
    if isinstance(model, GaussianMAE):
        return MaskedGaussianLoss(**kwargs)  # type: ignore[arg-type]
    if isinstance(model, VoxelMAE):
        return MaskedPatchLoss(**kwargs)  # type: ignore[arg-type]
    raise ValueError(f"model must be a GaussianMAE or VoxelMAE, got {type(model).__name__}")
