"""MedGMAE masked pretraining: Hydra config -> medgauss objects -> ``TrainingEngine.fit``.

Run (no arguments: ``gmae_tiny`` on the bundled chest CT, 96^3 crops, 100 steps, a quick smoke run;
``--config-name medgmae_cpu``: the CPU main job, ~5 minutes, that beats the trivial fill on held-out data;
``--config-name medgmae_paper``: the paper's setting, for many GPUs)::

    accelerate launch recipes/medgmae_pretrain.py --config-name medgmae_cpu
    accelerate launch recipes/medgmae_pretrain.py
    accelerate launch --multi_gpu --num_processes 2 recipes/medgmae_pretrain.py trainer.max_steps=20
    torchrun --nproc_per_node 2 recipes/medgmae_pretrain.py trainer.max_steps=20   # the same, via torchrun
    python recipes/medgmae_pretrain.py model=gmae_star_tiny data=phantom trainer.batch_size=1
    python recipes/medgmae_pretrain.py trainer.run_dir=runs/x trainer.resume=latest   # continue a run

Two processes on a CPU-only machine: ``--multi_gpu`` (Accelerate then forms a gloo group on the CPU) or
``torchrun``; ``accelerate launch --cpu --num_processes 2`` starts ONE process (Accelerate 1.x's simple
launcher), which the engine flags with a warning.

Config groups live in ``recipes/conf`` (model, data, optim, trainer); their keys are the arguments of
``create_model``, the datalist builder + ``build_pretrain_dataset``, ``build_optimizer`` and
``TrainingEngine``. Outputs go to ``trainer.run_dir``: ``config.yaml`` (resolved, written when the run
starts at step 0 and kept as is by every resume), ``config.resume-<k>.yaml`` + ``resumes.yaml`` (one per
resume: its configuration, time, step, overrides and the keys it changed; see
``TrainingEngine.save_config``), ``checkpoints/``, ``tensorboard/``, ``panels/`` and the final ``model/``
export (``save_pretrained``).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script from a source checkout: make `medgauss` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collections.abc import Sequence  # noqa: E402

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from medgauss.data import build_pretrain_dataset, heldout_crops  # noqa: E402
from medgauss.engines import (  # noqa: E402
    MaskedPretrainTask,
    MaskedReconstructionValidator,
    TrainingEngine,
    TrainResult,
    build_optimizer,
)
from medgauss.losses import pretrain_loss_for  # noqa: E402
from medgauss.nets import create_model  # noqa: E402


def run(cfg: DictConfig, overrides: Sequence[str] | None = None) -> TrainResult:
    """Build every object from ``cfg`` and train; returns the engine's :class:`TrainResult`.

    ``overrides`` (the command line's, when known) are recorded with a resume (``resumes.yaml``).
    """
    engine = TrainingEngine(**cfg.trainer)
    # Interpolations of trainer.run_dir (e.g. data.datalist.out_dir) must see the one shared directory.
    cfg.trainer.run_dir = str(engine.run_dir)
    written = engine.save_config(OmegaConf.to_container(cfg, resolve=True), overrides)
    engine.print(f"run dir: {engine.run_dir}  (world size {engine.accelerator.num_processes}); config: {written.name}")

    model = create_model(**cfg.model)
    task = MaskedPretrainTask(pretrain_loss_for(model, **cfg.get("loss", {})))
    with engine.accelerator.main_process_first():  # rank 0 writes generated data (phantoms) first
        datalist = instantiate(cfg.data.datalist)
    # Every rank preprocesses only its shard, in parallel (the on-disk cache is safe under races).
    acc = engine.accelerator
    dataset = build_pretrain_dataset(
        datalist, rank=acc.process_index, world_size=acc.num_processes, **cfg.data.dataset
    )
    optimizer, scheduler = build_optimizer(model, max_steps=cfg.trainer.max_steps, **cfg.optim)
    return engine.fit(model, task, dataset, optimizer, scheduler, validator=build_validator(cfg, engine))


def build_validator(cfg: DictConfig, engine: TrainingEngine) -> MaskedReconstructionValidator | None:
    """Held-out validation of ``cfg.data.val`` (``None`` when the data option has none): fixed crops of
    data that training never sees (another region of the scan, or phantoms of unseen seeds), through the
    training pipeline without augmentation."""
    val = cfg.data.get("val")
    if val is None:
        return None
    with engine.accelerator.main_process_first():  # rank 0 writes generated data (phantoms) first
        datalist = instantiate(val.datalist)
    pipeline = {**OmegaConf.to_container(cfg.data.dataset, resolve=True), "region": val.region}
    pipeline.pop("seed")  # the training data seed; held-out crops have their own
    crops = heldout_crops(datalist, num_crops=val.num_crops, seed=val.seed, **pipeline)
    return MaskedReconstructionValidator(crops["image"], mask_seed=val.mask_seed, fill_box=val.fill_box)


@hydra.main(version_base="1.3", config_path="conf", config_name="medgmae_pretrain")
def main(cfg: DictConfig) -> None:
    run(cfg, overrides=list(HydraConfig.get().overrides.task))


if __name__ == "__main__":
    main()
