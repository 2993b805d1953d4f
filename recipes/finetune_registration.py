"""Deformable registration fine-tuning (TransMorph-style, MedGMAE encoder): Hydra config -> objects -> engine.fit.

Run (no arguments: from scratch with the ``tiny_cpu`` encoder on synthetic pairs of the bundled CT, ~4 minutes on
one CPU thread, ``recipes/conf_finetune/registration.yaml``)::

    python recipes/finetune_registration.py
    python recipes/finetune_registration.py pretrained.checkpoint=runs/pretrained/medgmae_cpu_30min
    python recipes/finetune_registration.py trainer.max_steps=60 trainer.seed=1       # a quick run
    python recipes/finetune_registration.py data=registration_pairs data.train.pairs=train.json data.val.pairs=val.json
    python recipes/finetune_registration.py trainer.run_dir=runs/x trainer.resume=latest   # continue a run
    accelerate launch recipes/finetune_registration.py --config-name registration_paper pretrained.checkpoint=...

The network (:class:`medgauss.nets.registration.ViTRegistrationNet`) runs the (pretrained) ViT encoder on the pair
``cat([fixed, moving])`` (the pretrained patch layer widened to two channels, ``W / 2`` each) and decodes a
displacement field; the loss is LNCC + diffusion (:class:`medgauss.engines.registration.RegistrationTask`, parts
logged as ``train/similarity``, ``train/smoothness``). Every ``trainer.val_every`` steps the fixed held-out pairs are
registered and scored (:class:`medgauss.engines.registration.RegistrationValidator`): Dice of the warped labels and
% non-positive Jacobian, beside the identity (no deformation); ``validation.jsonl`` holds the groups ``model`` and
``identity``. Panels (``panels/``) show fixed / moving / warped / the deformation grid. The final ``model/`` export
and ``config.yaml`` are what ``medgauss-register --checkpoint RUN_DIR`` reads.
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
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from medgauss.data.registration import PairListDataset, synthetic_registration_pairs  # noqa: E402
from medgauss.engines import TrainingEngine, TrainResult, build_optimizer  # noqa: E402
from medgauss.engines.finetune import build_encoder, resolve_preprocessing  # noqa: E402
from medgauss.engines.registration import RegistrationTask, RegistrationValidator  # noqa: E402
from medgauss.nets.registration import ViTRegistrationNet, registration_net_from_encoder  # noqa: E402

DATA_KINDS = ("synthetic", "pairs")


def _plain(node: Any) -> Any:
    """A config node as plain dicts / lists (``None`` stays ``None``)."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def build_model(checkpoint: str | None, encoder: dict[str, Any] | None, decoder: dict[str, Any]
                ) -> tuple[ViTRegistrationNet, Any]:
    """``(model, pretraining preprocessing or None)``: from a pretraining run (patch layer widened, every other
    encoder weight copied) or from scratch with the ``encoder`` architecture."""
    vit, preprocessing = build_encoder(checkpoint, encoder)
    if checkpoint is not None:
        return registration_net_from_encoder(vit, **decoder), preprocessing
    config = {k: v for k, v in vit.init_config.items() if k != "in_channels"}
    return ViTRegistrationNet(**config, **decoder), None


def build_data(data: dict[str, Any], img_size: Sequence[int]) -> tuple[Any, RegistrationValidator | None]:
    """``(training dataset, validator or None)`` from the ``data`` config group (module doc of the configs), whose
    ``preprocessing`` is already resolved (:func:`medgauss.engines.finetune.resolve_preprocessing`)."""
    kind = data.get("kind")
    if kind not in DATA_KINDS:
        raise ValueError(f"data.kind must be one of {DATA_KINDS}, got {kind!r}")
    pre = dict(data["preprocessing"])
    size = list(img_size)
    if kind == "synthetic":
        deformation = data.get("deformation") or {}
        train_cfg, val_cfg = dict(data["train"]), dict(data.get("val") or {})
        train = synthetic_registration_pairs(crop_size=size, **pre, **deformation, **train_cfg)
        validator = None
        if val_cfg:
            num_pairs, batch_size = int(val_cfg.pop("num_pairs")), int(val_cfg.pop("batch_size", 1))
            held_out = synthetic_registration_pairs(crop_size=size, **pre, **deformation, **val_cfg)
            validator = RegistrationValidator([held_out[i] for i in range(num_pairs)],
                                              class_names=held_out.class_names, batch_size=batch_size)
        return train, validator
    train = PairListDataset(data["train"]["pairs"], size=size, cache=bool(data["train"].get("cache", True)), **pre)
    val_cfg = dict(data.get("val") or {})
    if not val_cfg.get("pairs"):
        return train, None
    held_out = PairListDataset(val_cfg["pairs"], size=size, require_labels=True,
                               num_classes=val_cfg.get("num_classes"), **pre)
    pairs = [held_out[i] for i in range(len(held_out))]
    num_classes = val_cfg.get("num_classes")
    names = None if num_classes is None else ["background", *(f"class_{k}" for k in range(1, int(num_classes)))]
    return train, RegistrationValidator(pairs, class_names=names, batch_size=int(val_cfg.get("batch_size", 1)))


def run(cfg: DictConfig, overrides: Sequence[str] | None = None) -> TrainResult:
    """Build every object from ``cfg`` and train; returns the engine's :class:`TrainResult`.

    ``overrides`` (the command line's, when known) are recorded with a resume (``resumes.yaml``).
    """
    engine = TrainingEngine(**_plain(cfg.trainer))
    cfg.trainer.run_dir = str(engine.run_dir)
    checkpoint = cfg.pretrained.get("checkpoint")
    model, pretraining = build_model(None if checkpoint is None else str(checkpoint), _plain(cfg.get("encoder")),
                                     _plain(cfg.model) or {})
    # the preprocessing the run uses, recorded resolved in config.yaml (medgauss-register reads it from there)
    cfg.data.preprocessing = resolve_preprocessing(_plain(cfg.data.get("preprocessing")) or {}, pretraining)
    written = engine.save_config(OmegaConf.to_container(cfg, resolve=True), overrides)
    engine.print(f"run dir: {engine.run_dir}  (world size {engine.accelerator.num_processes}); config: {written.name}")
    source = f"pretrained {checkpoint}" if checkpoint is not None else "from scratch"
    engine.print(f"ViTRegistrationNet {source}: img_size {list(model.img_size)}, "
                 f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    dataset, validator = build_data(_plain(cfg.data), model.img_size)
    task = RegistrationTask(**_plain(cfg.loss))
    optimizer, scheduler = build_optimizer(model, max_steps=engine.max_steps, **_plain(cfg.optim))
    return engine.fit(model, task, dataset, optimizer, scheduler, validator=validator)


@hydra.main(version_base="1.3", config_path="conf_finetune", config_name="registration")
def main(cfg: DictConfig) -> None:
    run(cfg, overrides=list(HydraConfig.get().overrides.task))


if __name__ == "__main__":
    main()
