"""Overlap of label maps: Dice per class (segmentation validation, warped labels in registration)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["dice_per_class"]


def _labels_batch(labels: object, name: str) -> Tensor:
    if not isinstance(labels, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor label map, got {type(labels).__name__}")
    if labels.ndim == 5:
        if labels.shape[1] != 1:
            raise ValueError(f"{name} must be [B, 1, D, H, W], [B, D, H, W] or [D, H, W], got {tuple(labels.shape)}")
        labels = labels[:, 0]
    elif labels.ndim == 3:
        labels = labels[None]
    elif labels.ndim != 4:
        raise ValueError(f"{name} must be [B, 1, D, H, W], [B, D, H, W] or [D, H, W], got {tuple(labels.shape)}")
    if labels.is_floating_point():
        if not torch.equal(labels, labels.round()):
            raise ValueError(f"{name} must hold integer class indices, got non-integer values")
        labels = labels.long()
    return labels


def dice_per_class(pred_labels: Tensor, true_labels: Tensor, num_classes: int) -> Tensor:
    """Dice overlap of every class, per sample: MONAI ``DiceMetric``'s value (tested against it), computed from exact
    confusion counts, so whole volumes need no one-hot copies.

    Args:
        pred_labels: ``[B, 1, D, H, W]``, ``[B, D, H, W]`` or ``[D, H, W]`` class indices ``0..num_classes-1``
            (e.g. the warped moving label map).
        true_labels: same shape (e.g. the fixed label map).
        num_classes: ``K`` (background 0 included).

    Returns:
        ``[B, K]`` float64: ``2 |P_k & T_k| / (|P_k| + |T_k|)``; NaN for a class absent from both maps (no
        evidence either way: average with ``nanmean``).

    Raises:
        ValueError: shapes differ, non-integer values, or values outside ``0..num_classes-1`` (naming the argument).
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    pred, true = _labels_batch(pred_labels, "pred_labels"), _labels_batch(true_labels, "true_labels")
    if pred.shape != true.shape:
        raise ValueError(f"pred_labels and true_labels must have the same shape, got {tuple(pred_labels.shape)} and "
                         f"{tuple(true_labels.shape)}")
    for name, t in (("pred_labels", pred), ("true_labels", true)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
            raise ValueError(f"{name} holds values in [{int(t.min())}, {int(t.max())}], outside [0, {num_classes - 1}]")
    b = pred.shape[0]
    # per-sample confusion counts from one bincount (exact int64, O(N) memory even for whole CT volumes)
    codes = (pred.reshape(b, -1) * num_classes + true.reshape(b, -1)).long()
    codes = codes + (torch.arange(b, device=codes.device) * num_classes * num_classes)[:, None]
    confusion = torch.bincount(codes.reshape(-1), minlength=b * num_classes * num_classes)
    confusion = confusion.reshape(b, num_classes, num_classes).double()  # [B, pred class, true class]
    inter = confusion.diagonal(dim1=1, dim2=2)
    total = confusion.sum(2) + confusion.sum(1)
    return torch.where(total > 0, 2.0 * inter / total.clamp_min(1.0), torch.full_like(total, float("nan")))
