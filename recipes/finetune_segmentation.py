"""Segmentation fine-tuning: Hydra config -> UNETR on a pretrained (or scratch) encoder -> ``TrainingEngine.fit``.

Run (no arguments: UNETR from scratch on the bundled CT's 6 grouped classes, ~5 minutes on 2 cores)::

    python recipes/finetune_segmentation.py pretrained.checkpoint=runs/pretrained/medgmae_cpu_30min
    python recipes/finetune_segmentation.py data.crops.label_fraction=0.01     # one labelled crop
    accelerate launch --multi_gpu recipes/finetune_segmentation.py --config-name segmentation_paper ...

Configs live in ``recipes/conf_finetune`` (``segmentation.yaml`` documents every group). Outputs go to
``trainer.run_dir``: ``config.yaml`` (with the preprocessing actually used, which ``medgauss-segment`` reads),
``checkpoints/``, ``tensorboard/``, ``panels/`` (overlays), ``validation.jsonl`` (held-out Dice of the model and the
intensity baseline) and the final ``model/`` export.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script from a source checkout: make `medgauss` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collections.abc import Sequence  # noqa: E402
from typing import Any  # noqa: E402

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from medgauss.data.labelled import BUNDLED_CLASS_GROUPS, class_names_for, load_labelled_volumes  # noqa: E402
from medgauss.data.segmentation import SegmentationCropDataset  # noqa: E402
from medgauss.engines import TrainingEngine, TrainResult, build_optimizer  # noqa: E402
from medgauss.engines.finetune import build_encoder, resolve_preprocessing  # noqa: E402
from medgauss.engines.segmentation import IntensityBaseline, SegmentationTask, SegmentationValidator  # noqa: E402
from medgauss.nets.unetr import ScratchSwinUNETR, unetr_from_encoder  # noqa: E402


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def class_groups(data: DictConfig) -> dict[str, list[str]] | None:
    """``data.classes``: ``"bundled"`` -> :data:`BUNDLED_CLASS_GROUPS`, a mapping as given, ``None`` (use
    ``data.num_classes``)."""
    classes = _plain(data.classes)
    if classes == "bundled":
        return {k: list(v) for k, v in BUNDLED_CLASS_GROUPS.items()}
    if classes is not None and not isinstance(classes, dict):
        raise ValueError(f"data.classes must be 'bundled', a mapping of class name -> structures, or null; "
                         f"got {classes!r}")
    return classes


def build_model(cfg: DictConfig, num_classes: int, class_names: list[str]):
    """UNETR on the (pretrained or fresh) encoder, or SwinUNETR from scratch; returns ``(model, preprocessing)``."""
    arch = cfg.model.arch
    if arch == "swinunetr":
        if cfg.pretrained.checkpoint is not None:
            raise ValueError("model.arch=swinunetr is the from-scratch reference: set pretrained.checkpoint=null")
        size = _plain(cfg.encoder)["img_size"]
        model = ScratchSwinUNETR(num_classes, img_size=size, in_channels=cfg.encoder.in_channels,
                                 feature_size=cfg.model.swin_feature_size, class_names=class_names)
        return model, None
    if arch != "unetr":
        raise ValueError(f"model.arch must be 'unetr' or 'swinunetr', got {arch!r}")
    encoder, pretraining = build_encoder(cfg.pretrained.checkpoint, _plain(cfg.encoder))
    model = unetr_from_encoder(encoder, num_classes, feature_size=cfg.model.feature_size,
                               norm_name=cfg.model.norm_name, dropout_rate=cfg.model.dropout_rate,
                               class_names=class_names)
    if cfg.model.freeze_encoder:
        for param in model.vit.parameters():
            param.requires_grad_(False)
    return model, pretraining


def run(cfg: DictConfig, overrides: Sequence[str] | None = None) -> TrainResult:
    """Build every object from ``cfg`` and fine-tune; returns the engine's :class:`TrainResult`."""
    engine = TrainingEngine(**_plain(cfg.trainer))
    cfg.trainer.run_dir = str(engine.run_dir)
    acc = engine.accelerator
    groups = class_groups(cfg.data)
    names = class_names_for(groups, cfg.data.num_classes)
    model, pretraining = build_model(cfg, len(names), names)
    # Record the preprocessing actually used (null values filled from the pretraining run) for medgauss-segment.
    cfg.data.preprocessing = resolve_preprocessing(_plain(cfg.data.preprocessing), pretraining)
    written = engine.save_config(OmegaConf.to_container(cfg, resolve=True), overrides)
    engine.print(f"run dir: {engine.run_dir}  (world size {acc.num_processes}); config: {written.name}")

    labels = dict(classes=groups, num_classes=None if groups is not None else cfg.data.num_classes,
                  structures=cfg.data.structures, region_axis=cfg.data.region_axis, **_plain(cfg.data.preprocessing))
    with acc.main_process_first():  # rank 0 writes generated data (phantoms) first
        train_list, val_list = instantiate(cfg.data.datalist), instantiate(cfg.data.val_datalist)
    train_volumes = load_labelled_volumes(train_list, region=_plain(cfg.data.region), **labels)
    val_volumes = load_labelled_volumes(val_list, region=_plain(cfg.data.val_region), **labels)
    size = model.img_size
    dataset = SegmentationCropDataset(train_volumes, size, seed=cfg.trainer.seed, rank=acc.process_index,
                                      world_size=acc.num_processes, **_plain(cfg.data.crops))
    images, truths = dataset.labelled_data()
    baseline = IntensityBaseline(images, truths, len(names), b_min=cfg.data.preprocessing.b_min,
                                 b_max=cfg.data.preprocessing.b_max)
    validator = SegmentationValidator(val_volumes, size, names, baseline, **_plain(cfg.val))
    source = cfg.pretrained.checkpoint or f"scratch ({cfg.model.arch})"
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    engine.print(f"classes: {', '.join(names[1:])}; labelled training data: {dataset.num_labelled}; "
                 f"{len(val_volumes)} held-out volume(s); encoder: {source}; "
                 f"{trainable / 1e6:.2f}M trainable parameters")
    task = SegmentationTask(**_plain(cfg.loss), class_names=names)
    optimizer, scheduler = build_optimizer(model, max_steps=cfg.trainer.max_steps, **_plain(cfg.optim))
    return engine.fit(model, task, dataset, optimizer, scheduler, validator=validator)


@hydra.main(version_base="1.3", config_path="conf_finetune", config_name="segmentation")
def main(cfg: DictConfig) -> None:
    run(cfg, overrides=list(HydraConfig.get().overrides.task))


if __name__ == "__main__":
    main()
