"""Shared fixtures of the fine-tuning tests: a tiny pretraining run folder (config.yaml + model/ export)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from medgauss.nets import create_model

TINY_ENCODER = dict(img_size=16, patch_size=8, hidden_size=32, num_layers=4, num_heads=2, mlp_dim=64)
"""A 4-layer encoder on 16^3 crops with 8^3 patches (2^3 tokens): the smallest UNETR-compatible layout."""


def write_pretraining_run(root: Path, *, model_name: str = "gmae_tiny", pixdim: float = 4.0, a_min: float = -1000.0,
                          a_max: float = 1000.0, seed: int = 0, **model_overrides) -> Path:
    """A run folder like recipes/medgmae_pretrain.py leaves: config.yaml (data.dataset) + model/ (save_pretrained)."""
    torch.manual_seed(seed)
    overrides = {**TINY_ENCODER, **model_overrides}
    if model_name.startswith("gmae"):
        overrides.setdefault("num_queries", 8)
    model = create_model(model_name, **overrides)
    root.mkdir(parents=True, exist_ok=True)
    dataset = dict(spatial_size=overrides["img_size"], pixdim=pixdim, a_min=a_min, a_max=a_max, b_min=0.0, b_max=1.0,
                   clip=True)
    (root / "config.yaml").write_text(yaml.safe_dump({"model": {"name": model_name, **overrides},
                                                      "data": {"dataset": dataset}}))
    model.save_pretrained(root / "model")
    return root


@pytest.fixture
def pretraining_run(tmp_path):
    """Factory: ``pretraining_run(name="run", **kwargs)`` -> a tiny pretraining run folder under ``tmp_path``."""

    def make(name: str = "run", **kwargs) -> Path:
        return write_pretraining_run(tmp_path / name, **kwargs)

    return make
