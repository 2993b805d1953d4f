"""X-GRM training (feed-forward sparse-view CT reconstruction): Hydra config -> objects -> ``TrainingEngine.fit``.

Run (no arguments: ``xgrm_tiny`` on the CPU dataset built from the bundled CT and phantoms, see
``recipes/conf_xgrm/xgrm_cpu.yaml``; ``--config-name xgrm_paper``: the paper's setting, for many GPUs)::

    accelerate launch recipes/xgrm_train.py
    python recipes/xgrm_train.py trainer.max_steps=200 trainer.batch_size=2
    python recipes/xgrm_train.py model.decoder=iterative                  # iLRM-style iterative decoder
    python recipes/xgrm_train.py trainer.run_dir=runs/x trainer.resume=latest   # continue a run
    accelerate launch --multi_gpu --num_processes 4 recipes/xgrm_train.py --config-name xgrm_paper \\
        data.samples.root=/data/recon/train data.val.root=/data/recon/heldout

Each step decodes a random quarter-grid sub-box of each sample from its ``K`` in {6, 8, 10} input views and
minimises :class:`medgauss.losses.XGRMLoss` (volume MSE on the box + L1 / D-SSIM of the box's rendered X-rays at
the input and held-out views); the loss parts go to TensorBoard (``train/volume_mse``, ``train/render_l1``,
``train/render_dssim``, ``train/render``) and to the engine's log line at each log step. Every
``trainer.val_every`` steps the held-out cases are reconstructed at 6 / 8 / 10 views (full grid) and scored by
PSNR / slice SSIM beside FDK and SART; the line says whether the model beats FDK (``validation.jsonl``,
TensorBoard ``val/*``). Panels (``panels/``) show prediction / ground truth / FDK slices of a training sample.

Outputs go to ``trainer.run_dir`` (as ``recipes/medgmae_pretrain.py``): ``config.yaml`` (+ ``config.resume-<k>.yaml``
and ``resumes.yaml`` per resume), ``checkpoints/``, ``tensorboard/``, ``panels/``, ``validation.jsonl`` and the
final ``model/`` export, which ``medgauss-reconstruct --method xgrm --checkpoint RUN_DIR/model`` (``--method ilrm``
for ``model.decoder=iterative``) reconstructs with.

CPU budget of ``xgrm_cpu`` (6000 steps of batch 4, ~23 minutes on one core): see
``recipes/conf_xgrm/trainer/cpu.yaml``.
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

from medgauss.data import XGRMSampleDataset, build_xgrm_dataset  # noqa: E402
from medgauss.engines import (  # noqa: E402
    ReconstructionValidator,
    TrainingEngine,
    TrainResult,
    XGRMTask,
    build_optimizer,
)
from medgauss.losses import XGRMLoss  # noqa: E402
from medgauss.nets import create_model  # noqa: E402


def _plain(node: Any) -> Any:
    """A config node as plain dicts / lists (``None`` stays ``None``)."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def run(cfg: DictConfig, overrides: Sequence[str] | None = None) -> TrainResult:
    """Build every object from ``cfg`` and train; returns the engine's :class:`TrainResult`.

    ``overrides`` (the command line's, when known) are recorded with a resume (``resumes.yaml``).
    """
    engine = TrainingEngine(**_plain(cfg.trainer))
    cfg.trainer.run_dir = str(engine.run_dir)  # interpolations of run_dir see the one shared directory
    written = engine.save_config(OmegaConf.to_container(cfg, resolve=True), overrides)
    acc = engine.accelerator
    engine.print(f"run dir: {engine.run_dir}  (world size {acc.num_processes}); config: {written.name}")

    if cfg.data.get("build") is not None:
        with acc.main_process_first():  # rank 0 builds (or finds) the dataset; the others then find it complete
            cases = build_xgrm_dataset(**_plain(cfg.data.build))
        engine.print(f"dataset {cases.root}: {len(cases.train_cases)} training cases, "
                     f"{len(cases.heldout_cases)} held-out cases")
    model = create_model(**_plain(cfg.model))
    dataset = XGRMSampleDataset(batch_size=engine.batch_size, rank=acc.process_index, world_size=acc.num_processes,
                                **_plain(cfg.data.samples))
    samples = engine.max_steps * engine.batch_size * engine.grad_accum_steps * acc.num_processes
    engine.print(f"{samples} samples = {samples / len(dataset.case_ids):.1f} epochs of {len(dataset.case_ids)} "
                 f"training cases; sub-box {dataset.box_size} of {dataset.grid_shape}, "
                 f"K in {list(dataset.view_counts)}")
    task = XGRMTask(XGRMLoss(**_plain(cfg.loss)), **_plain(cfg.get("task") or {}))
    optimizer, scheduler = build_optimizer(model, max_steps=engine.max_steps, **_plain(cfg.optim))
    val = cfg.data.get("val")
    validator = None if val is None else ReconstructionValidator(**_plain(val))
    if validator is not None:
        check_heldout(dataset, validator)
    return engine.fit(model, task, dataset, optimizer, scheduler, validator=validator)


def check_heldout(dataset: XGRMSampleDataset, validator: ReconstructionValidator) -> None:
    """Refuse validation cases that training may see: the same folder, or a case id in both folders.

    Raises:
        ValueError: naming the folders or the shared case ids.
    """
    train_root, val_root = Path(dataset.root).resolve(), Path(validator.dataset.root).resolve()
    if train_root == val_root:
        raise ValueError(f"data.val.root and data.samples.root are the same folder {train_root}: held-out cases "
                         "must never be trained on (prepare them into their own folder)")
    shared = sorted(set(dataset.case_ids) & set(validator.case_ids))
    if shared:
        raise ValueError(f"case ids {shared[:5]}{' ...' if len(shared) > 5 else ''} are in both data.samples.root "
                         f"{train_root} and data.val.root {val_root}: held-out cases must never be trained on")


@hydra.main(version_base="1.3", config_path="conf_xgrm", config_name="xgrm_cpu")
def main(cfg: DictConfig) -> None:
    run(cfg, overrides=list(HydraConfig.get().overrides.task))


if __name__ == "__main__":
    main()
