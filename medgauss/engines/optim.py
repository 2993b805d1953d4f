"""AdamW with decay-free norms / biases / embeddings, and a linear-warmup cosine learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn

__all__ = ["NO_DECAY_NAME_PARTS", "param_groups", "build_optimizer", "warmup_cosine_factor"]

# Parameter-name fragments that never get weight decay (besides every 0-/1-D tensor: norms and biases).
NO_DECAY_NAME_PARTS: tuple[str, ...] = ("pos_embed", "cls_token", "mask_token", "query", "token", "embed_pos")


def _no_decay(name: str, param: torch.Tensor, extra: Iterable[str]) -> bool:
    return param.ndim <= 1 or name in extra or any(part in name for part in NO_DECAY_NAME_PARTS)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed weights, and norms / biases / position embeddings / tokens at 0 decay.

    A model's ``no_weight_decay()`` (timm convention: a set of parameter names) is honoured as well.
    Frozen parameters (``requires_grad=False``) are left out.
    """
    extra = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if _no_decay(name, param, extra) else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def warmup_cosine_factor(step: int, *, warmup_steps: int, max_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Learning-rate multiplier at optimizer step ``step`` (0-based).

    Linear from ``1 / (warmup_steps + 1)`` up to 1 over the first ``warmup_steps`` steps, then cosine
    from 1 down to ``min_lr_ratio`` at ``max_steps`` (held there afterwards).
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(
    model: nn.Module,
    *,
    max_steps: int,
    lr: float = 1e-4,
    weight_decay: float = 0.05,
    betas: Sequence[float] = (0.9, 0.95),
    eps: float = 1e-8,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over :func:`param_groups` and its per-optimizer-step warmup-cosine schedule.

    Args:
        model: the model to optimise.
        max_steps: optimizer steps of the whole run (end of the cosine).
        lr: peak learning rate; weight_decay: decoupled decay of the decayed group; betas, eps: AdamW.
        warmup_steps: linear warmup length in optimizer steps (``>= max_steps``: the run is all warmup).
        min_lr_ratio: final learning rate as a fraction of ``lr``.

    Returns:
        ``(optimizer, scheduler)``; call ``scheduler.step()`` once after every ``optimizer.step()``.
    """
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if lr <= 0 or weight_decay < 0 or not 0 <= min_lr_ratio <= 1:
        raise ValueError(
            f"need lr > 0, weight_decay >= 0, 0 <= min_lr_ratio <= 1; got {lr}, {weight_decay}, "
            f"{min_lr_ratio}"
        )
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"betas must be two values in [0, 1), got {betas}")
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        _WarmupCosine(warmup_steps=warmup_steps, max_steps=max_steps, min_lr_ratio=min_lr_ratio),
    )
    return optimizer, scheduler


class _WarmupCosine:
    """Picklable schedule callable (``LambdaLR`` state stays small and exact on resume)."""

    def __init__(self, *, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> None:
        self.warmup_steps, self.max_steps, self.min_lr_ratio = warmup_steps, max_steps, min_lr_ratio

    def __call__(self, step: int) -> float:
        return warmup_cosine_factor(
            step, warmup_steps=self.warmup_steps, max_steps=self.max_steps, min_lr_ratio=self.min_lr_ratio
        )
