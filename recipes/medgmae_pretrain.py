"""MedGMAE masked pretraining: Hydra config -> medgauss objects -> ``PretrainEngine.fit``.

Run (no arguments: ``gmae_tiny`` on the bundled chest CT, 96^3 crops, a few minutes on a CPU)::

    accelerate launch recipes/medgmae_pretrain.py
    accelerate launch --cpu --num_processes 2 recipes/medgmae_pretrain.py trainer.max_steps=20
    python recipes/medgmae_pretrain.py model=gmae_star_tiny data=phantom trainer.batch_size=1
    python recipes/medgmae_pretrain.py trainer.run_dir=runs/x trainer.resume=latest   # continue a run

Config groups live in ``recipes/conf`` (model, data, optim, trainer); their keys are the arguments of
``create_model``, the datalist builder + ``build_pretrain_dataset``, ``build_optimizer`` and
``PretrainEngine``. Outputs go to ``trainer.run_dir``: ``config.yaml`` (resolved), ``checkpoints/``,
``tensorboard/``, ``panels/`` and the final ``model/`` export (``save_pretrained``).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script from a source checkout: make `medgauss` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from medgauss.data import build_pretrain_dataset  # noqa: E402
from medgauss.engines import PretrainEngine, TrainResult, build_optimizer  # noqa: E402
from medgauss.losses import pretrain_loss_for  # noqa: E402
from medgauss.nets import create_model  # noqa: E402


def run(cfg: DictConfig) -> TrainResult:
    """Build every object from ``cfg`` and train; returns the engine's :class:`TrainResult`."""
    engine = PretrainEngine(**cfg.trainer)
    # Interpolations of trainer.run_dir (e.g. data.datalist.out_dir) must see the one shared directory.
    cfg.trainer.run_dir = str(engine.run_dir)
    if engine.is_main_process:
        (engine.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        engine.print(f"run dir: {engine.run_dir}  (world size {engine.accelerator.num_processes})")

    model = create_model(**cfg.model)
    loss_fn = pretrain_loss_for(model)
    with engine.accelerator.main_process_first():  # rank 0 writes generated data (phantoms) first
        datalist = instantiate(cfg.data.datalist)
        dataset = build_pretrain_dataset(datalist, **cfg.data.dataset)
    optimizer, scheduler = build_optimizer(model, max_steps=cfg.trainer.max_steps, **cfg.optim)
    return engine.fit(model, loss_fn, dataset, optimizer, scheduler)


@hydra.main(version_base="1.3", config_path="conf", config_name="medgmae_pretrain")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
