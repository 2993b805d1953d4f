"""Classification fine-tuning and linear probe from a MedGMAE (or voxel-MAE) encoder: Hydra config -> objects.

Run (no arguments: the CPU default ``recipes/conf_finetune/classification.yaml``, the bundled CT's "which
structures are present in this crop" task, tiny encoder from scratch; ``--config-name classification_paper``:
MedGMAE's CT-RATE setting)::

    python recipes/finetune_classification.py                                          # fine-tune, from scratch
    python recipes/finetune_classification.py pretrained.checkpoint=runs/pretrained/medgmae_cpu_30min
    python recipes/finetune_classification.py mode=linear_probe pretrained.checkpoint=runs/pretrained/medgmae_cpu_30min
    python recipes/finetune_classification.py model.freeze_encoder=true optim.layer_decay=0.75
    python recipes/finetune_classification.py trainer.run_dir=runs/x trainer.resume=latest   # continue a run
    python recipes/finetune_classification.py data.source=image_list data.image_list.train=train.json \\
        data.image_list.val=val.json data.image_list.num_labels=3     # a user's [{"image", "labels"}] lists

Modes:

- ``finetune``: :class:`medgauss.nets.ViTClassifier` (the encoder's weights copied strictly, a new pooled
  LayerNorm + Linear head) trained with BCE-with-logits on the engine (:class:`medgauss.engines.TrainingEngine`:
  checkpoints, exact resume, TensorBoard, ``validation.jsonl``, ``model/`` export); ``model.freeze_encoder`` trains
  the head only, ``optim.layer_decay < 1`` decays the encoder's learning rate layer by layer.
- ``linear_probe``: one-vs-rest scikit-learn logistic regression on the frozen encoder's pooled, standardised
  features of ``data.num_train_crops`` fixed training crops (:func:`medgauss.engines.linear_probe`). It does not go
  through the engine's training loop: a linear probe has nothing to optimise by gradient (the encoder is frozen and
  the logistic regression is a convex fit solved once), so there are no steps, checkpoints or resumes. It writes
  the same record format into the run directory: ``validation.jsonl`` with one line ``{"step": 0, "metrics":
  {...}, ...}``, and ``linear_probe.json`` (the probe's coefficients, intercepts and feature standardisation).

Both report the held-out macro / per-class AUC of the ``model`` beside the ``prior`` (AUC 0.5) and the
``intensity_histogram`` baseline (:mod:`medgauss.engines.classification`), on a fixed crop set of the superior body
region (0.55, 1.0); training crops come from the inferior region (0, 0.55). The per-class prevalence of the fixed
training crops and of the held-out crops is printed (a class always present or absent is unscorable).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script from a source checkout: make `medgauss` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import json  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Any  # noqa: E402

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from medgauss.data import example_ct_datalist  # noqa: E402
from medgauss.data.classification import (  # noqa: E402
    ImageTargetDataset,
    PresenceCropDataset,
    load_labelled_image_list,
    presence_crop_set,
    prevalence,
)
from medgauss.data.labelled import BUNDLED_CLASS_GROUPS, class_names_for, load_labelled_volumes  # noqa: E402
from medgauss.engines import TrainingEngine, TrainResult, build_optimizer  # noqa: E402
from medgauss.engines.checkpoint import write_atomic  # noqa: E402
from medgauss.engines.classification import (  # noqa: E402
    ClassificationTask,
    ClassificationValidator,
    linear_probe,
)
from medgauss.engines.finetune import build_encoder, resolve_preprocessing  # noqa: E402
from medgauss.engines.training import VALIDATION_FILE  # noqa: E402
from medgauss.nets.classification import classifier_from_encoder  # noqa: E402

MODES = ("finetune", "linear_probe")
SOURCES = ("labelled_volumes", "image_list")
PROBE_FILE = "linear_probe.json"


def _plain(node: Any) -> Any:
    """A config node as plain dicts / lists (``None`` stays ``None``)."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def _hu_to_normalised(hu: float, pre: dict[str, Any]) -> float:
    """``hu`` through the HU window ``[a_min, a_max] -> [b_min, b_max]`` (clipped)."""
    t = min(max((float(hu) - pre["a_min"]) / (pre["a_max"] - pre["a_min"]), 0.0), 1.0)
    return pre["b_min"] + t * (pre["b_max"] - pre["b_min"])


def build_data(cfg: DictConfig, pre: dict[str, Any], img_size: tuple[int, int, int]) -> dict[str, Any]:
    """The training dataset, the fixed training set (baselines / linear probe), the held-out set, class names.

    Returns:
        ``{"train": Dataset, "train_set": {"image", "target"}, "val_set": {"image", "target"},
        "class_names": [K]}``.
    """
    data = cfg.data
    if data.source not in SOURCES:
        raise ValueError(f"data.source must be one of {SOURCES}, got {data.source!r}")
    window = {k: pre[k] for k in ("a_min", "a_max", "b_min", "b_max")}
    if data.source == "image_list":
        lists = data.image_list
        k = int(lists.num_labels)
        train_set = load_labelled_image_list(lists.train, num_labels=k, img_size=img_size, **window)
        val_set = load_labelled_image_list(lists.val, num_labels=k, img_size=img_size, **window)
        names = list(lists.class_names) if lists.get("class_names") else [f"label_{i}" for i in range(k)]
        train = ImageTargetDataset(train_set["image"], train_set["target"], seed=int(data.seed), flip=True)
        return {"train": train, "train_set": train_set, "val_set": val_set, "class_names": names}
    vols = data.volumes
    datalist = _plain(vols.datalist) if vols.get("datalist") is not None else example_ct_datalist()
    groups = _plain(vols.classes) if vols.get("classes") is not None else None
    num_classes = vols.get("num_classes")
    if groups is None and num_classes is None:
        groups = BUNDLED_CLASS_GROUPS
    names = class_names_for(groups, num_classes)[1:]
    load = dict(classes=groups, num_classes=num_classes, structures=vols.get("structures"), pixdim=pre["pixdim"],
                clip=True, **window)
    train_volumes = load_labelled_volumes(datalist, region=tuple(vols.train_region), **load)
    val_volumes = load_labelled_volumes(datalist, region=tuple(vols.val_region), **load)
    common = dict(num_classes=len(names), min_voxels=_plain(data.min_voxels),
                  body_threshold=_hu_to_normalised(data.body_hu, pre))
    train = PresenceCropDataset(train_volumes, img_size, seed=int(data.seed), flip=True, **common)
    train_set = presence_crop_set(train_volumes, img_size, num_crops=int(data.num_train_crops), seed=int(data.seed),
                                  **common)
    val_set = presence_crop_set(val_volumes, img_size, num_crops=int(data.val.num_crops), seed=int(data.val.seed),
                                **common)
    return {"train": train, "train_set": train_set, "val_set": val_set, "class_names": names}


def run(cfg: DictConfig, overrides: Sequence[str] | None = None) -> TrainResult:
    """Build every object from ``cfg`` and fine-tune (``mode: finetune``) or fit the linear probe; returns a
    :class:`TrainResult` (for the probe: no losses, no export, ``validation`` = the probe's report).

    ``overrides`` (the command line's, when known) are recorded with a resume (``resumes.yaml``).
    """
    if cfg.mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {cfg.mode!r}")
    t0 = time.perf_counter()
    engine = TrainingEngine(**_plain(cfg.trainer))  # seeds every RNG before the model is built
    cfg.trainer.run_dir = str(engine.run_dir)
    encoder, pretraining = build_encoder(cfg.pretrained.checkpoint, _plain(cfg.encoder))
    cfg.data.dataset = resolve_preprocessing(_plain(cfg.data.dataset), pretraining)
    pre = _plain(cfg.data.dataset)
    written = engine.save_config(OmegaConf.to_container(cfg, resolve=True), overrides)
    engine.print(f"run dir: {engine.run_dir}; mode {cfg.mode}; encoder "
                 f"{'from ' + str(cfg.pretrained.checkpoint) if cfg.pretrained.checkpoint else 'from scratch'} "
                 f"({encoder.num_layers} layers, hidden {encoder.hidden_size}, img_size {list(encoder.img_size)}); "
                 f"config: {written.name}")
    data = build_data(cfg, pre, encoder.img_size)
    names, train_set, val_set = data["class_names"], data["train_set"], data["val_set"]
    engine.print(f"classes {names}")
    engine.print(f"prevalence train ({train_set['target'].shape[0]} fixed crops): {prevalence(train_set['target'])}")
    engine.print(f"prevalence held-out ({val_set['target'].shape[0]} crops): {prevalence(val_set['target'])}")
    value_range = (min(pre["b_min"], pre["b_max"]), max(pre["b_min"], pre["b_max"]))
    val_cfg = cfg.data.val
    if cfg.mode == "linear_probe":
        return _run_probe(cfg, engine, encoder, data, value_range, t0)
    model = classifier_from_encoder(encoder, len(names), **_plain(cfg.model))
    optimizer, scheduler = build_optimizer(model, max_steps=engine.max_steps, **_plain(cfg.optim))
    validator = ClassificationValidator(val_set["image"], val_set["target"], train_images=train_set["image"],
                                        train_targets=train_set["target"], class_names=names,
                                        batch_size=int(val_cfg.batch_size), hist_bins=int(val_cfg.hist_bins),
                                        value_range=value_range, C=float(cfg.probe.C))
    return engine.fit(model, ClassificationTask(), data["train"], optimizer, scheduler, validator=validator)


def _run_probe(cfg: DictConfig, engine: TrainingEngine, encoder: Any, data: dict[str, Any],
               value_range: tuple[float, float], t0: float) -> TrainResult:
    """Fit the linear probe once and write ``validation.jsonl`` (one line) and ``linear_probe.json``."""
    train_set, val_set = data["train_set"], data["val_set"]
    t_fit = time.perf_counter()
    report = linear_probe(encoder, train_set["image"], train_set["target"], val_set["image"], val_set["target"],
                          C=float(cfg.probe.C), pooling=str(cfg.model.pooling),
                          batch_size=int(cfg.data.val.batch_size), class_names=data["class_names"],
                          hist_bins=int(cfg.data.val.hist_bins), value_range=value_range,
                          max_iter=int(cfg.probe.max_iter))
    fit_seconds = time.perf_counter() - t_fit
    engine.print(f"val step 0: {report.summary()}")
    if engine.is_main_process:
        record = {"step": 0, "train_seconds": round(fit_seconds, 3), **report.as_dict()}
        write_atomic(engine.run_dir / VALIDATION_FILE, json.dumps(record) + "\n")
        probe = {"class_names": data["class_names"], **report.probe}
        write_atomic(engine.run_dir / PROBE_FILE, json.dumps(probe))
    engine.accelerator.wait_for_everyone()
    wall = time.perf_counter() - t0
    summary = f"linear probe: held-out macro AUC {report.headline[1]:.4f} ({fit_seconds:.1f} s features + fit)"
    engine.print(f"{summary}; wall time {wall:.1f} s; run dir {engine.run_dir}")
    return TrainResult([], engine.run_dir, None, wall, None, summary, report)


@hydra.main(version_base="1.3", config_path="conf_finetune", config_name="classification")
def main(cfg: DictConfig) -> None:
    run(cfg, overrides=list(HydraConfig.get().overrides.task))


if __name__ == "__main__":
    main()
