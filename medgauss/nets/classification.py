"""Volume classification with a (pretrained) ViT3D encoder: pooled tokens -> LayerNorm -> Linear logits.

:class:`ViTClassifier` is the fine-tuning model of ``recipes/finetune_classification.py``: the encoder's tokens
(after its final norm) are pooled to one vector per volume (the mean of the patch tokens, MAE's fine-tuning
default, or the cls token), normalised by the head's own LayerNorm and mapped to ``num_classes`` logits (one per
label of a multi-label task; train with ``BCEWithLogitsLoss``). :meth:`ViTClassifier.features` is the pooled vector
itself, what a linear probe fits on. :func:`classifier_from_encoder` starts a classifier from a pretrained
:class:`~medgauss.nets.ViT3D` (e.g. :func:`medgauss.engines.finetune.build_encoder`'s), copying its weights with a
strict load. Pooling then LayerNorm before the linear head follows MAE's fine-tuning head (``global_pool`` +
``fc_norm``, He et al. 2022).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from medgauss.nets.pretrained import PretrainedMixin, config_from_locals
from medgauss.nets.vit3d import ViT3D

__all__ = ["POOLINGS", "ViTClassifier", "classifier_from_encoder"]

POOLINGS = ("mean", "cls")


class ViTClassifier(PretrainedMixin, nn.Module):
    """ViT3D encoder -> pooled token features ``[B, C]`` -> LayerNorm -> Dropout -> Linear -> logits ``[B, K]``.

    Args:
        num_classes: ``K`` logits (labels of a multi-label task, or classes of a softmax one), ``>= 1``.
        encoder: the :class:`~medgauss.nets.ViT3D` kwargs (``img_size``, ``patch_size``, ``hidden_size``, ...;
            JSON-able, e.g. a pretrained encoder's ``init_config``).
        pooling: ``"mean"``: mean of the patch tokens (no cls token is run); ``"cls"``: the cls token.
        head_dropout: dropout before the linear layer, in ``[0, 1)``.
        freeze_encoder: the encoder's parameters get ``requires_grad=False`` and the encoder stays in eval mode
            (no drop path) whatever :meth:`train` is told; only the head trains (and :func:`medgauss.engines.
            build_optimizer` leaves the frozen parameters out).

    Attributes:
        lr_decay_prefix: ``"encoder."``, where layer-wise learning-rate decay finds the ViT blocks.
    """

    lr_decay_prefix = "encoder."

    def __init__(self, num_classes: int, encoder: Mapping[str, Any] | None = None, pooling: str = "mean",
                 head_dropout: float = 0.0, freeze_encoder: bool = False) -> None:
        super().__init__()
        self.init_config = config_from_locals(locals())
        if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 1:
            raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if not 0.0 <= float(head_dropout) < 1.0:
            raise ValueError(f"head_dropout must be in [0, 1), got {head_dropout!r}")
        if encoder is not None and not isinstance(encoder, Mapping):
            raise ValueError(f"encoder must be a mapping of ViT3D kwargs, got {type(encoder).__name__}")
        self.num_classes, self.pooling = int(num_classes), pooling
        self.encoder = ViT3D(**dict(encoder or {}))
        width = self.encoder.hidden_size
        self.fc_norm = nn.LayerNorm(width)
        self.head_drop = nn.Dropout(float(head_dropout))
        self.head = nn.Linear(width, self.num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)  # MAE fine-tuning: a small head at the start
        nn.init.zeros_(self.head.bias)
        if pooling == "mean":  # the cls token is never used: frozen, so DistributedDataParallel does not wait for it
            self.encoder.cls_token.requires_grad_(False)
        self.freeze_encoder = bool(freeze_encoder)
        if self.freeze_encoder:
            self.encoder.requires_grad_(False)
            self.encoder.eval()

    @property
    def feature_dim(self) -> int:
        """``C``, the width of :meth:`features` (the encoder's hidden size)."""
        return self.encoder.hidden_size

    def train(self, mode: bool = True) -> ViTClassifier:
        """Set train / eval mode; a frozen encoder always stays in eval mode."""
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()
        return self

    def features(self, images: Tensor) -> Tensor:
        """Pooled encoder features ``[B, C]`` of ``images [B, in_channels, *img_size]``.

        ``"mean"``: the mean over the ``L`` patch tokens of ``encoder.forward_features(images, include_cls=False)``
        (after the encoder's final norm); ``"cls"``: token 0 of ``forward_features(images)``. Computed without a
        graph when the encoder is frozen.
        """
        with torch.no_grad() if self.freeze_encoder else torch.enable_grad():
            if self.pooling == "mean":
                return self.encoder.forward_features(images, include_cls=False).mean(dim=1)
            return self.encoder.forward_features(images, include_cls=True)[:, 0]

    def forward(self, images: Tensor) -> Tensor:
        """Logits ``[B, num_classes]`` of ``images [B, in_channels, *img_size]``."""
        return self.head(self.head_drop(self.fc_norm(self.features(images))))


def classifier_from_encoder(encoder: ViT3D, num_classes: int, *, pooling: str = "mean", head_dropout: float = 0.0,
                            freeze_encoder: bool = False) -> ViTClassifier:
    """A :class:`ViTClassifier` whose encoder holds a copy of ``encoder``'s weights (a new head).

    The copy is a strict ``load_state_dict``; a missing / unexpected key or a shape mismatch is an error listing
    them (it cannot happen for a true :class:`~medgauss.nets.ViT3D`, whose ``init_config`` rebuilds it exactly).
    The classifier is on ``encoder``'s device and dtype; ``encoder`` itself is not changed.

    Raises:
        ValueError: ``encoder`` is not a ViT3D, or its weights do not load into the rebuilt encoder.
    """
    if not isinstance(encoder, ViT3D):
        raise ValueError(f"encoder must be a medgauss.nets.ViT3D, got {type(encoder).__name__}")
    model = ViTClassifier(num_classes, encoder=dict(encoder.init_config), pooling=pooling,
                          head_dropout=head_dropout, freeze_encoder=freeze_encoder)
    state = encoder.state_dict()
    own = model.encoder.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in set(own) & set(state)
                    if state[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        raise ValueError(f"the encoder's weights do not fit a ViTClassifier encoder: missing keys {missing}, "
                         f"unexpected keys {unexpected}, shape mismatches {shapes}")
    model.encoder.load_state_dict(state, strict=True)
    param = next(encoder.parameters(), None)
    if param is not None:
        model = model.to(device=param.device, dtype=param.dtype)
    return model
