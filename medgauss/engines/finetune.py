"""What every fine-tuning recipe shares: the encoder (pretrained or from scratch) and the preprocessing it implies.

A fine-tuning run starts either from a pretraining run (``recipes/medgmae_pretrain.py``'s run directory, or its
``model/`` export) or from scratch with the same encoder architecture, so "pretrained vs scratch" differs in the
weights only. The data must be preprocessed the way the encoder saw it during pretraining: the spacing and HU
window of the pretraining run (its ``config.yaml``, :func:`medgauss.nets.run_preprocessing`) fill every
preprocessing value a fine-tuning config leaves ``null``; a value given explicitly that differs from the
pretraining run's is kept and warned about.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medgauss.nets.pretrained_runs import PretrainingPreprocessing, load_pretrained_encoder, run_preprocessing
from medgauss.nets.vit3d import ViT3D

__all__ = ["SCRATCH_PREPROCESSING", "build_encoder", "resolve_preprocessing"]

SCRATCH_PREPROCESSING = PretrainingPreprocessing(pixdim=1.5, a_min=-1000.0, a_max=1000.0, b_min=0.0, b_max=1.0)
"""Preprocessing of a run from scratch whose config leaves it ``null``: 1.5 mm, HU [-1000, 1000] -> [0, 1]
(MedGMAE's CT-RATE / AMOS window, and that of the benchmarks' pretraining runs)."""

_PREPROCESSING_KEYS = ("pixdim", "a_min", "a_max", "b_min", "b_max")


def build_encoder(checkpoint: str | Path | None, encoder: Mapping[str, Any] | None = None
                  ) -> tuple[ViT3D, PretrainingPreprocessing | None]:
    """The encoder to fine-tune and the preprocessing it was pretrained with.

    Args:
        checkpoint: a pretraining run directory or ``model/`` export (``None``: from scratch).
        encoder: :class:`ViT3D` kwargs of the scratch encoder (``img_size``, ``patch_size``, ``hidden_size``, ...);
            with a checkpoint, any key given must match the checkpoint's encoder.

    Returns:
        ``(encoder, preprocessing)``; ``preprocessing`` is ``None`` from scratch.

    Raises:
        ValueError: no checkpoint and no ``encoder``, or a checkpoint whose encoder differs from ``encoder`` (naming
            the keys), or a checkpoint without a ViT3D encoder.
        FileNotFoundError: the checkpoint folder, its model export or its ``config.yaml`` is missing.
    """
    wanted = {k: v for k, v in dict(encoder or {}).items() if v is not None}
    if checkpoint is None:
        if not wanted:
            raise ValueError("from scratch (no checkpoint) the encoder architecture must be given (model.encoder)")
        return ViT3D(**wanted), None
    vit = load_pretrained_encoder(checkpoint)
    have = vit.init_config
    differ = {k: (v, have.get(k)) for k, v in wanted.items() if _normalised(v) != _normalised(have.get(k))}
    if differ:
        detail = ", ".join(f"{k}: config {a!r} vs checkpoint {b!r}" for k, (a, b) in sorted(differ.items()))
        raise ValueError(f"checkpoint {checkpoint} has another encoder than model.encoder asks for ({detail}); "
                         "drop model.encoder or match it")
    return vit, run_preprocessing(checkpoint)


def _normalised(value: Any) -> Any:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, list | tuple):
        values = [_normalised(v) for v in value]
        return values[0] if len(set(values)) == 1 else values  # [64, 64, 64] == 64
    return value


def resolve_preprocessing(dataset: Mapping[str, Any], pretraining: PretrainingPreprocessing | None
                          ) -> dict[str, Any]:
    """``dataset`` with ``pixdim``, ``a_min``, ``a_max``, ``b_min``, ``b_max`` filled in where ``None``.

    Filled from ``pretraining`` (the checkpoint's run), or :data:`SCRATCH_PREPROCESSING` without one. An explicit
    value that differs from the pretraining run's is kept, with a ``UserWarning`` (the encoder then sees
    intensities or a spacing it was not pretrained on).
    """
    out = dict(dataset)
    source = pretraining or SCRATCH_PREPROCESSING
    for key in _PREPROCESSING_KEYS:
        reference = getattr(source, key)
        if out.get(key) is None:
            out[key] = reference
        elif pretraining is not None and float(out[key]) != reference:
            warnings.warn(f"data.dataset.{key}={out[key]} differs from the pretraining run's {reference}: the encoder "
                          "sees data preprocessed unlike its pretraining data", UserWarning, stacklevel=2)
    return out
