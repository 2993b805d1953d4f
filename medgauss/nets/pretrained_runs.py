"""A pretraining run as a starting point: its model export, its preprocessing, and its encoder.

A run of ``recipes/medgmae_pretrain.py`` (or any recipe on :class:`medgauss.engines.TrainingEngine`) leaves
``config.yaml`` (the resolved Hydra config) and ``model/`` (``save_pretrained``) in its run directory. Everything
that starts from such a run (zero-shot 3DGR initialisation, fine-tuning, the inference commands) reads it
through this module: :func:`model_dir` finds the export, :func:`run_preprocessing` the spacing and HU window the
model saw, :func:`load_pretrained_encoder` its ViT encoder.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from medgauss.nets.pretrained import CONFIG_NAME, load_pretrained
from medgauss.nets.vit3d import ViT3D

__all__ = [
    "RUN_CONFIG_NAME",
    "PretrainingPreprocessing",
    "find_run_config",
    "load_pretrained_encoder",
    "model_dir",
    "run_preprocessing",
]

RUN_CONFIG_NAME = "config.yaml"
"""The resolved Hydra config a pretraining run writes into its run directory."""
_MODEL_SUBDIR = "model"


@dataclass(frozen=True)
class PretrainingPreprocessing:
    """The intensity and spacing preprocessing a model was pretrained with (``data.dataset`` of its run).

    Attributes:
        pixdim: isotropic voxel size of the pretraining crops, mm.
        a_min, a_max: HU window mapped linearly onto ``[b_min, b_max]`` (values outside clipped).
        b_min, b_max: normalised intensity range of the crops the model saw (``[0, 1]`` by default).
    """

    pixdim: float
    a_min: float
    a_max: float
    b_min: float = 0.0
    b_max: float = 1.0

    def __post_init__(self) -> None:
        for name in ("pixdim", "a_min", "a_max", "b_min", "b_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if not self.pixdim > 0:
            raise ValueError(f"pixdim must be a positive voxel size in mm, got {self.pixdim}")
        if not self.a_min < self.a_max:
            raise ValueError(f"HU window needs a_min < a_max, got a_min={self.a_min}, a_max={self.a_max}")
        if not self.b_min < self.b_max:
            raise ValueError(f"intensity range needs b_min < b_max, got b_min={self.b_min}, b_max={self.b_max}")


def find_run_config(checkpoint: Path) -> Path:
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {checkpoint}")
    for folder in (checkpoint, checkpoint.parent):
        path = folder / RUN_CONFIG_NAME
        if path.is_file():
            return path
    raise FileNotFoundError(f"{RUN_CONFIG_NAME} not found in {checkpoint} or its parent {checkpoint.parent}: "
                            "pass a pretraining run directory (recipes/medgmae_pretrain.py) or its model/ export")


def _config_number(dataset: dict[str, Any], key: str, path: Path, default: float | None = None) -> Any:
    if key not in dataset:
        if default is None:
            raise ValueError(f"{path} lacks data.dataset.{key}")
        return default
    value = dataset[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"data.dataset.{key} in {path} must be a number, got {value!r}")
    return value


def run_preprocessing(checkpoint: str | Path) -> PretrainingPreprocessing:
    """Read a model's pretraining preprocessing from its run's ``config.yaml``.

    Args:
        checkpoint: the pretraining run directory or its ``model/`` export; ``config.yaml`` is looked up in
            this folder, then in its parent.

    Returns:
        The :class:`PretrainingPreprocessing` of ``data.dataset.{pixdim, a_min, a_max, b_min, b_max}``.

    Raises:
        FileNotFoundError: the folder or its ``config.yaml`` does not exist (naming both places looked in).
        ValueError: the file is not valid YAML, lacks a key, or holds an anisotropic or invalid value
            (naming the file). A run pretrained with ``clip: false`` only warns: this initialiser clips.
    """
    path = find_run_config(Path(checkpoint))
    try:
        config = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ValueError(f"config file {path} is not valid YAML: {exc}") from exc
    data = config.get("data") if isinstance(config, dict) else None
    dataset = data.get("dataset") if isinstance(data, dict) else None
    if not isinstance(dataset, dict):
        raise ValueError(f"{path} has no data.dataset section (expected the resolved config of a pretraining run)")
    pixdim = dataset.get("pixdim")
    if isinstance(pixdim, list | tuple):
        if len(pixdim) != 3 or len({float(p) for p in pixdim if isinstance(p, int | float)}) != 1:
            raise ValueError(f"data.dataset.pixdim in {path} must be one isotropic voxel size, got {pixdim!r}")
        dataset = {**dataset, "pixdim": pixdim[0]}
    values = {key: _config_number(dataset, key, path) for key in ("pixdim", "a_min", "a_max")}
    values.update({key: _config_number(dataset, key, path, default)
                   for key, default in (("b_min", 0.0), ("b_max", 1.0))})
    if dataset.get("clip", True) is False:
        warnings.warn(f"{path} pretrained without clipping the HU window (data.dataset.clip: false); "
                      "medgauss clips to [a_min, a_max] anyway", stacklevel=2)
    try:
        return PretrainingPreprocessing(**values)
    except ValueError as exc:
        raise ValueError(f"invalid preprocessing in {path}: {exc}") from exc


def model_dir(checkpoint: Path) -> Path:
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {checkpoint}")
    for folder in (checkpoint, checkpoint / _MODEL_SUBDIR):
        if (folder / CONFIG_NAME).is_file():
            return folder
    raise FileNotFoundError(f"no model export ({CONFIG_NAME} + model.safetensors) in {checkpoint} or "
                            f"{checkpoint / _MODEL_SUBDIR}: is the pretraining run finished?")


def load_pretrained_encoder(checkpoint: str | Path, map_location: str | torch.device = "cpu") -> ViT3D:
    """The ViT3D encoder of a pretrained MedGMAE / MedGMAE* / voxel-MAE (or a saved bare :class:`ViT3D`).

    Args:
        checkpoint: a run directory (its ``model/`` export is used) or a ``save_pretrained`` folder.
        map_location: device of the weights.

    Returns:
        The encoder (a :class:`ViT3D`, in training mode, detached from its pretraining model).

    Raises:
        FileNotFoundError: no model export in or under ``checkpoint`` (naming both places).
        ValueError: the export holds a model without a ViT3D encoder (e.g. an XGRM; naming the folder and the
            class), or its files are corrupt.
    """
    folder = model_dir(Path(checkpoint))
    model = load_pretrained(folder, map_location=map_location)
    encoder = model if isinstance(model, ViT3D) else getattr(model, "encoder", None)
    if not isinstance(encoder, ViT3D):
        raise ValueError(f"{folder} holds a {type(model).__name__}, which has no ViT3D encoder to fine-tune "
                         "(expected a GaussianMAE, VoxelMAE or ViT3D export)")
    return encoder.train()
