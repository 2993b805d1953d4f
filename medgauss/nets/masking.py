"""Per-sample random masking of patch tokens (MAE: argsort of uniform noise)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["MaskingResult", "num_masked_patches", "random_masking"]


class MaskingResult(NamedTuple):
    """Result of :func:`random_masking`.

    Attributes:
        kept: ``[B, K, C]`` the visible tokens, in shuffled order.
        mask: ``[B, L]`` bool, True = hidden from the encoder, in the original patch order.
        ids_restore: ``[B, L]`` int64; ``torch.gather(cat(kept, hidden), 1, ids_restore)`` restores order.
        ids_keep: ``[B, K]`` int64 original patch indices of ``kept``.
    """

    kept: Tensor
    mask: Tensor
    ids_restore: Tensor
    ids_keep: Tensor


def num_masked_patches(num_patches: int, mask_ratio: float) -> int:
    """Patches hidden per sample: ``round(num_patches * mask_ratio)``, at least one kept."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must lie in [0, 1), got {mask_ratio}")
    masked = int(round(num_patches * mask_ratio))
    if masked >= num_patches:
        raise ValueError(f"mask_ratio {mask_ratio} hides all {num_patches} patches; "
                         "at least one must stay visible")
    return masked


def random_masking(tokens: Tensor, mask_ratio: float, noise: Tensor | None = None) -> MaskingResult:
    """Hide ``round(L * mask_ratio)`` tokens of each sample, chosen independently per sample.

    Args:
        tokens: ``[B, L, C]`` patch tokens.
        mask_ratio: fraction of tokens to hide, in ``[0, 1)``.
        noise: optional ``[B, L]`` float scores; the tokens with the smallest scores are kept.
            Defaults to ``torch.rand`` (so ``torch.manual_seed`` makes masks reproducible).
    """
    if tokens.ndim != 3:
        raise ValueError(f"tokens must have shape [B, L, C], got {tuple(tokens.shape)}")
    b, length, channels = tokens.shape
    num_keep = length - num_masked_patches(length, mask_ratio)
    if noise is None:
        noise = torch.rand(b, length, device=tokens.device)
    elif tuple(noise.shape) != (b, length):
        raise ValueError(f"noise must have shape [B={b}, L={length}], got {tuple(noise.shape)}")
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :num_keep]
    kept = torch.gather(tokens, 1, ids_keep[:, :, None].expand(b, num_keep, channels))
    mask = torch.ones(b, length, dtype=torch.bool, device=tokens.device)
    mask[:, :num_keep] = False
    mask = torch.gather(mask, 1, ids_restore)
    return MaskingResult(kept, mask, ids_restore, ids_keep)
