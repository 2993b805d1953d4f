"""AdamW with decay-free norms / biases / embeddings, layer-wise learning-rate decay for fine-tuning a ViT, and a
linear-warmup cosine learning-rate schedule.

Layer-wise decay (BEiT / MAE fine-tuning; SelfMedMAE fine-tunes UNETR with 0.75): the parameters of a model's ViT
encoder get ``lr * layer_decay ** (L + 1 - i)``, where ``i`` is 0 for the patch / position embeddings, ``k`` for
transformer block ``k - 1`` and ``L + 1`` for everything else (the final norm and the task's head / decoder). The
model says where its encoder is with an ``lr_decay_prefix`` attribute (e.g. ``"vit."`` for UNETR), and the encoder
is a :class:`medgauss.nets.ViT3D` or a MONAI ``ViT`` (its blocks named ``blocks.<k>.``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn

__all__ = ["NO_DECAY_NAME_PARTS", "encoder_layer_id", "param_groups", "build_optimizer", "warmup_cosine_factor"]

_EMBEDDING_PARTS = ("patch_embed", "pos_embed", "cls_token", "mask_token")  # ViT3D and MONAI ViT names

# Parameter-name fragments that never get weight decay (besides every 0-/1-D tensor: norms and biases).
NO_DECAY_NAME_PARTS: tuple[str, ...] = ("pos_embed", "cls_token", "mask_token", "query", "token", "embed_pos")


def _no_decay(name: str, param: torch.Tensor, extra: Iterable[str]) -> bool:
    return param.ndim <= 1 or name in extra or any(part in name for part in NO_DECAY_NAME_PARTS)


def encoder_layer_id(name: str, prefix: str, num_layers: int) -> int:
    """Depth of parameter ``name`` for layer-wise decay: 0 = embeddings, ``k + 1`` = encoder block ``k``,
    ``num_layers + 1`` = anything else (final norm, head, decoder), for an encoder under ``prefix``."""
    if not name.startswith(prefix):
        return num_layers + 1
    rest = name[len(prefix):]
    if any(rest.startswith(part) for part in _EMBEDDING_PARTS):
        return 0
    if rest.startswith("blocks."):
        return int(rest.split(".")[1]) + 1
    return num_layers + 1


def _num_encoder_layers(model: nn.Module, prefix: str) -> int:
    ids = {int(n[len(prefix):].split(".")[1]) for n, _ in model.named_parameters()
           if n.startswith(prefix + "blocks.")}
    if not ids:
        raise ValueError(f"layer_decay needs an encoder with blocks under {prefix!r} (the model's lr_decay_prefix), "
                         f"found none in {type(model).__name__}")
    return max(ids) + 1


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """AdamW groups: decayed weights, and norms / biases / position embeddings / tokens at 0 decay.

    A model's ``no_weight_decay()`` (timm convention: a set of parameter names) is honoured as well.
    Frozen parameters (``requires_grad=False``) are left out. With ``layer_decay < 1`` the model needs an
    ``lr_decay_prefix`` attribute, and each (depth, decay) pair becomes a group with ``"lr_scale"`` (module doc);
    :func:`build_optimizer` multiplies its learning rate by it.
    """
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    extra = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    prefix, num_layers = None, 0
    if layer_decay < 1.0:
        prefix = getattr(model, "lr_decay_prefix", None)
        if not isinstance(prefix, str):
            raise ValueError(f"layer_decay={layer_decay} needs a model with an lr_decay_prefix attribute (where its "
                             f"ViT encoder is), {type(model).__name__} has none")
        num_layers = _num_encoder_layers(model, prefix)
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        depth = encoder_layer_id(name, prefix, num_layers) if prefix is not None else 0
        no_decay = _no_decay(name, param, extra)
        group = groups.setdefault((depth, no_decay), {
            "params": [], "weight_decay": 0.0 if no_decay else weight_decay,
            "lr_scale": layer_decay ** (num_layers + 1 - depth) if prefix is not None else 1.0})
        group["params"].append(param)
    return [groups[key] for key in sorted(groups, key=lambda k: (k[0], k[1]))]


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
    layer_decay: float = 1.0,
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over :func:`param_groups` and its per-optimizer-step warmup-cosine schedule.

    Args:
        model: the model to optimise.
        max_steps: optimizer steps of the whole run (end of the cosine).
        lr: peak learning rate; weight_decay: decoupled decay of the decayed group; betas, eps: AdamW.
        warmup_steps: linear warmup length in optimizer steps (``>= max_steps``: the run is all warmup).
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        layer_decay: layer-wise learning-rate decay of the model's ViT encoder (``1``: none; see the module doc).

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
    groups = param_groups(model, weight_decay, layer_decay)
    for group in groups:
        group["lr"] = lr * group["lr_scale"]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps)
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
