"""The training loop on Accelerate, for every recipe: one run directory for all ranks, exact resume, logs, panels.

One engine runs every kind of training (masked pretraining, feed-forward CT reconstruction, fine-tuning):
the recipe plugs in its step as a *task* (:class:`medgauss.engines.tasks.TrainTask`: ``loss_label`` and
``compute_loss(model, batch, device) -> (loss, out[, scalars])``, optionally ``panel``) and, optionally, a held-out
*validator* (:class:`medgauss.engines.validation.Validator`). Masked pretraining (what
``recipes/medgmae_pretrain.py`` does)::

    engine = TrainingEngine(run_dir="runs/x", max_steps=300, batch_size=2)   # seeds every RNG
    model = create_model("gmae_tiny")                                        # built after seeding
    optimizer, scheduler = build_optimizer(model, max_steps=300)
    task = MaskedPretrainTask(pretrain_loss_for(model))    # a bare loss module is wrapped the same way
    result = engine.fit(model, task, dataset, optimizer, scheduler, validator=validator)

Any other task (see :mod:`medgauss.engines.tasks` for a complete regression example)::

    result = engine.fit(model, RegressionTask(), dataset, optimizer, scheduler, validator=RegressionValidator(...))

**Datasets.** Map-style and addressed by a global integer sample id: rank ``r`` of ``W`` reads
``dataset[r]``, ``dataset[r + W]``, ``dataset[r + 2W]``, ... without end (:class:`ShardedSampleSampler`),
so the engine resumes a run by skipping ``step * batch_size * grad_accum_steps`` ids per rank and never
needs the dataset's length; a finite collection can be cycled (``item(sample_id % n)``). Items go through
the DataLoader's default collate, or through the task's ``collate_fn`` when it has one (optional attribute,
e.g. for items holding geometry objects). A dataset that is built for one rank says so with ``rank`` /
``world_size`` attributes (optional; checked against the process group). ``record_samples`` needs a
``"sample_id"`` entry in every batch.

Data order is a pure function of (data seed, world size, global sample id) (see :mod:`medgauss.data.dataset`), and
the model's own randomness (masking, drop path) comes from the torch RNG that the checkpoint restores,
so ``resume`` continues with exactly the losses an uninterrupted run would have produced.

The run's configuration (:meth:`TrainingEngine.save_config`): ``config.yaml`` is written when the run
starts from step 0 and never rewritten by a resume; resume ``k`` writes ``config.resume-<k>.yaml`` (the
configuration of that call) and appends ``{resume, time, step, from_checkpoint, config, overrides,
changed}`` to ``resumes.yaml``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object, set_seed
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from medgauss.data import ShardedSampleSampler
from medgauss.engines.checkpoint import TRAINER_STATE_FILE, CheckpointManager, write_atomic
from medgauss.engines.tasks import TrainTask, as_task
from medgauss.engines.validation import ValidationReport, Validator

__all__ = [
    "CONFIG_FILE",
    "RESUMES_FILE",
    "VALIDATION_FILE",
    "TrainResult",
    "TrainingEngine",
    "config_changes",
    "loss_summary",
]

VALIDATION_FILE = "validation.jsonl"

_MIXED_PRECISION = ("no", "bf16", "fp16")
CONFIG_FILE = "config.yaml"
RESUMES_FILE = "resumes.yaml"
_RESUME_CONFIG = "config.resume-{}.yaml"


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def config_changes(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Dotted keys whose values differ between two nested configurations.

    Returns:
        ``{"trainer.max_steps": {"before": 10, "after": 20}, ...}``, sorted by key; a key present on one
        side only has ``None`` on the other.
    """
    old, new = _flatten(before), _flatten(after)
    return {
        key: {"before": old.get(key), "after": new.get(key)}
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key) or (key in old) != (key in new)
    }


@dataclass
class TrainResult:
    """Outcome of :meth:`TrainingEngine.fit` (identical on every rank).

    Attributes:
        losses: the task's loss of every optimizer step of the run (rank-averaged, mean over the micro-batches),
            including the steps done before a resume.
        run_dir: the shared run directory.
        export_dir: where the final ``save_pretrained`` export went (``None`` if the model has no
            ``save_pretrained``).
        wall_time_s: seconds spent in this call.
        resumed_from: checkpoint this call started from, if any.
        summary: :func:`loss_summary` of ``losses``, with the task's loss label.
        validation: the last held-out validation (``None`` without a validator).
    """

    losses: list[float]
    run_dir: Path
    export_dir: Path | None
    wall_time_s: float
    resumed_from: Path | None = None
    summary: str = field(default="")
    validation: ValidationReport | None = None


def _check_world_size(num_processes: int) -> None:
    """Raise if the launcher started ``WORLD_SIZE`` processes but they did not form one group."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != num_processes:
        raise RuntimeError(
            f"the launcher started WORLD_SIZE={launched} processes but Accelerate formed a group of "
            f"{num_processes}; each rank would train alone into the same run directory"
        )


def _warn_if_cpu_launch_collapsed(num_processes: int) -> None:
    """Warn when ``accelerate launch --cpu --num_processes N`` (N > 1) started a single process.

    Accelerate's simple launcher (used for ``--cpu`` without an MPI hostfile) runs ONE process and only
    exports ``MASTER_ADDR``; real multi-process CPU training needs ``--multi_gpu`` (gloo on a CPU-only
    machine) or ``torchrun --nproc_per_node N``.
    """
    env = os.environ
    requested_many = "MASTER_ADDR" in env and "WORLD_SIZE" not in env
    if num_processes == 1 and requested_many and env.get("ACCELERATE_USE_CPU", "").lower() == "true":
        warnings.warn(
            "accelerate launch --cpu --num_processes N started ONE process (Accelerate's simple launcher); "
            "for N CPU processes use `accelerate launch --multi_gpu --num_processes N` (gloo when no GPU "
            "is present) or `torchrun --nproc_per_node N`",
            RuntimeWarning,
            stacklevel=3,
        )


def loss_summary(losses: list[float], window: int | None = None, label: str = "masked-region loss") -> str:
    """``"<label>: start A (mean of first k steps) -> end B (mean of last k), change -x%"``."""
    if not losses:
        return "no step run"
    k = window or max(1, min(10, len(losses) // 10))
    start, end = sum(losses[:k]) / k, sum(losses[-k:]) / k
    change = 100.0 * (end - start) / start if start else float("nan")
    return (
        f"{label}: start {start:.5f} (mean of first {k} steps) -> end {end:.5f} "
        f"(mean of last {k} steps), change {change:+.1f}% over {len(losses)} steps"
    )


class TrainingEngine:
    """The training loop of every recipe on Accelerate (CPU, one or several GPUs, multi-process CPU).

    :meth:`fit` runs any :class:`~medgauss.engines.tasks.TrainTask` (masked pretraining:
    :class:`~medgauss.engines.tasks.MaskedPretrainTask`) with any
    :class:`~medgauss.engines.validation.Validator`.

    Constructing the engine creates the ``Accelerator``, seeds every RNG (build the model AFTER it) and fixes
    the run directory: the main process's ``run_dir`` is broadcast to every rank, so per-rank differences
    (e.g. a timestamp resolved separately per process) can never split a run.

    Args:
        run_dir: run directory (checkpoints, TensorBoard, panels, final export).
        max_steps: optimizer steps of the whole run.
        batch_size: samples per rank per micro-batch.
        grad_accum_steps: micro-batches per optimizer step.
        grad_clip: max global gradient norm (``0``: no clipping).
        mixed_precision: ``"no"`` | ``"bf16"`` | ``"fp16"`` (autocast; fp16 needs a GPU).
        seed: seed of model init / masking RNGs (rank ``r`` uses ``seed + r``).
        num_workers: DataLoader worker processes per rank.
        log_every: print + TensorBoard every this many steps.
        panel_every: PNG panel (the task's ``panel`` hook, if it has one) under ``run_dir/panels`` every this
            many steps, at step 1 and at the last step (``0``: never).
        checkpoint_every: checkpoint every this many steps and at the last step (``0``: only the last step).
        keep_checkpoints: complete checkpoints kept (``0``: all).
        resume: ``None`` | ``"latest"`` | ``"auto"`` | checkpoint path (:meth:`CheckpointManager.resolve`).
        cpu: force CPU even when a GPU is present (always CPU when no GPU is present).
        progress: show a tqdm bar (main process only).
        tensorboard: write TensorBoard scalars under ``run_dir/tensorboard`` (main process only).
        val_every: held-out validation every this many steps and at the last step, when :meth:`fit` gets a
            ``validator`` (``0``: only at the last step): its summary is printed, its metrics logged to
            TensorBoard (``val/*``) and appended to ``validation.jsonl`` with the step and the training
            seconds so far (learning curves by step and by wall-clock). The validator is told which call is
            the last (``final=True``); :class:`MaskedReconstructionValidator` computes its costly SSIM then
            only (seconds per call on a CPU), MSE and PSNR every time.
        record_samples: write ``run_dir/sample_ids_<first>-<last step>.json``: the sample ids each rank
            trained on in this call (a data-order audit, e.g. to check per-rank sharding); the batches must
            carry a ``"sample_id"`` entry.
    """

    def __init__(
        self,
        *,
        run_dir: str | Path,
        max_steps: int,
        batch_size: int = 2,
        grad_accum_steps: int = 1,
        grad_clip: float = 1.0,
        mixed_precision: str = "no",
        seed: int = 41,
        num_workers: int = 0,
        log_every: int = 10,
        panel_every: int = 100,
        checkpoint_every: int = 100,
        keep_checkpoints: int = 2,
        resume: str | None = None,
        cpu: bool = False,
        progress: bool = True,
        tensorboard: bool = True,
        record_samples: bool = False,
        val_every: int = 0,
    ) -> None:
        for name, value, low in (
            ("max_steps", max_steps, 1),
            ("batch_size", batch_size, 1),
            ("grad_accum_steps", grad_accum_steps, 1),
            ("log_every", log_every, 1),
            ("num_workers", num_workers, 0),
            ("panel_every", panel_every, 0),
            ("checkpoint_every", checkpoint_every, 0),
            ("val_every", val_every, 0),
        ):
            if int(value) != value or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if mixed_precision not in _MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {_MIXED_PRECISION}, got {mixed_precision!r}")
        if grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0, got {grad_clip}")
        self.max_steps, self.batch_size, self.grad_accum_steps = max_steps, batch_size, grad_accum_steps
        self.grad_clip, self.seed, self.num_workers = grad_clip, seed, num_workers
        self.log_every, self.panel_every, self.checkpoint_every = log_every, panel_every, checkpoint_every
        self.resume, self.progress, self.tensorboard = resume, progress, tensorboard
        self.record_samples = record_samples
        self.val_every = val_every
        # Without a GPU, Accelerate forms a multi-process (gloo) group under torchrun / `accelerate launch
        # --multi_gpu` only when told to use the CPU; otherwise every rank would train alone.
        use_cpu = cpu or not torch.cuda.is_available()
        self.accelerator = Accelerator(cpu=use_cpu, mixed_precision=mixed_precision)
        _check_world_size(self.accelerator.num_processes)
        _warn_if_cpu_launch_collapsed(self.accelerator.num_processes)
        set_seed(seed, device_specific=True)
        self.run_dir = self._shared_run_dir(run_dir)
        self.checkpoints = CheckpointManager(self.run_dir, keep_last=keep_checkpoints)
        self._resume_checkpoint: Path | None = None
        self._resume_resolved = False

    # ------------------------------------------------------------------ setup
    def _shared_run_dir(self, run_dir: str | Path) -> Path:
        chosen = [str(Path(run_dir).resolve())]
        if self.accelerator.num_processes > 1:
            broadcast_object_list(chosen, from_process=0)
        path = Path(chosen[0])
        if self.accelerator.is_main_process:
            path.mkdir(parents=True, exist_ok=True)
        self.accelerator.wait_for_everyone()
        return path

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def resume_checkpoint(self) -> Path | None:
        """The checkpoint this engine resumes from (``None``: the run starts at step 0).

        Resolved from ``resume`` on first use (:meth:`CheckpointManager.resolve`) and then fixed, so
        :meth:`save_config` and :meth:`fit` agree.

        Raises:
            FileNotFoundError: ``resume`` names no complete checkpoint (see :meth:`CheckpointManager.resolve`).
        """
        if not self._resume_resolved:
            self._resume_checkpoint = self.checkpoints.resolve(self.resume)
            self._resume_resolved = True
        return self._resume_checkpoint

    def save_config(self, config: Mapping[str, Any], overrides: Sequence[str] | None = None) -> Path:
        """Record this call's configuration in the run directory (collective: every rank calls it; the main
        process writes).

        A run starting at step 0 writes ``config.yaml`` (replacing the file, and the resume records, of a
        run previously started in this directory). A resumed run leaves ``config.yaml`` as the run's
        start wrote it, writes ``config.resume-<k>.yaml`` (``k`` = 1, 2, ... in resume order) and appends
        to ``resumes.yaml`` an entry ``{resume: k, time (UTC, ISO 8601), step (of the checkpoint),
        from_checkpoint, config, overrides, changed}``, where ``changed`` lists the dotted keys whose values
        differ from ``config.yaml`` (:func:`config_changes`; ``None`` when there is no ``config.yaml``).

        Args:
            config: nested mapping of plain values (e.g. ``OmegaConf.to_container(cfg, resolve=True)``).
            overrides: the command-line overrides of this call, recorded as given (``None``: unknown).

        Returns:
            The file written: ``config.yaml`` or ``config.resume-<k>.yaml``.

        Raises:
            ValueError: ``config`` is not a mapping, or holds values that are not plain (e.g. a ``Path``).
        """
        if not isinstance(config, Mapping):
            raise ValueError(f"config must be a mapping, got {type(config).__name__}")
        try:  # plain dicts / lists / scalars from here on (no OmegaConf containers, no tuples)
            config = json.loads(json.dumps(config))
        except TypeError as err:
            raise ValueError(f"config must hold plain values (mappings, lists, str, numbers, None): {err}") from err
        text = yaml.safe_dump(config, sort_keys=False)
        original = self.run_dir / CONFIG_FILE
        resumes = self.run_dir / RESUMES_FILE
        checkpoint = self.resume_checkpoint
        acc = self.accelerator
        if checkpoint is None:
            if acc.is_main_process:
                for stale in [resumes, *self.run_dir.glob(_RESUME_CONFIG.format("*"))]:
                    stale.unlink(missing_ok=True)
                write_atomic(original, text)
            acc.wait_for_everyone()
            return original
        records = (yaml.safe_load(resumes.read_text()) or []) if resumes.is_file() else []
        path = self.run_dir / _RESUME_CONFIG.format(len(records) + 1)
        acc.wait_for_everyone()  # every rank has read the records before the main process appends
        if acc.is_main_process:
            state = json.loads((checkpoint / TRAINER_STATE_FILE).read_text())
            before = yaml.safe_load(original.read_text()) if original.is_file() else None
            records.append(
                {
                    "resume": len(records) + 1,
                    "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "step": int(state["step"]),
                    "from_checkpoint": os.path.relpath(checkpoint, self.run_dir),
                    "config": path.name,
                    "overrides": None if overrides is None else [str(o) for o in overrides],
                    "changed": None if before is None else config_changes(before, config),
                }
            )
            write_atomic(path, text)
            write_atomic(resumes, yaml.safe_dump(records, sort_keys=False))
        acc.wait_for_everyone()
        return path

    def print(self, message: str) -> None:
        """Print on the main process only (through tqdm so the bar stays intact)."""
        if self.is_main_process:
            tqdm.write(message)

    def _loader(self, dataset: Dataset, start_sample: int, collate_fn: Any = None) -> DataLoader:
        acc = self.accelerator
        shard = (getattr(dataset, "rank", 0), getattr(dataset, "world_size", 1))
        if shard[1] > 1 and shard != (acc.process_index, acc.num_processes):
            raise ValueError(
                f"the dataset was sharded for rank {shard[0]} of {shard[1]}, but this process is rank "
                f"{acc.process_index} of {acc.num_processes}: build it after the engine (its rank then comes "
                "from torch.distributed) or pass rank=engine.accelerator.process_index, "
                "world_size=engine.accelerator.num_processes"
            )
        sampler = ShardedSampleSampler(acc.process_index, acc.num_processes, start=start_sample)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed),  # never draws from the global RNG
            persistent_workers=self.num_workers > 0,
            pin_memory=acc.device.type == "cuda",
            collate_fn=collate_fn,  # None: the DataLoader's default collate
        )

    # ------------------------------------------------------------------ loop
    def fit(
        self,
        model: nn.Module,
        task: TrainTask | nn.Module,
        dataset: Dataset,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        validator: Validator | None = None,
    ) -> TrainResult:
        """Train to ``max_steps`` (resuming first if asked), checkpoint, and export the model.

        Args:
            model: the model the task trains (optional ``save_pretrained(dir)`` for the final export).
            task: the step (:class:`~medgauss.engines.tasks.TrainTask`); a plain loss module
                ``loss_fn(out, images) -> scalar`` means masked pretraining,
                ``MaskedPretrainTask(loss_fn)`` (the model then follows the MedGMAE contract). A task's optional
                ``collate_fn`` attribute batches the dataset's items (default: the DataLoader's default collate).
            dataset: map-style dataset addressed by global sample id (module doc), e.g. a
                :class:`~medgauss.data.PretrainCropDataset` (``dataset[i]["image"]`` ``[1, D, H, W]``).
            optimizer, scheduler: from :func:`medgauss.engines.build_optimizer` (the scheduler is stepped
                once per optimizer step and checkpointed).
            validator: held-out validation (:class:`~medgauss.engines.validation.Validator`) run every
                ``val_every`` steps and at the last step (main process; it draws no global random numbers,
                so resume stays exact).

        Returns:
            :class:`TrainResult`.

        Raises:
            ValueError: ``task`` is not a task, the dataset is sharded for another rank, ``record_samples``
                with batches that carry no ``"sample_id"``, or a checkpoint of another world size.
            FloatingPointError: a non-finite loss.
        """
        task = as_task(task)
        loss_label = str(task.loss_label)
        loss_tag = str(getattr(task, "loss_tag", "loss"))
        panel = getattr(task, "panel", None)
        t0 = time.perf_counter()
        acc = self.accelerator
        model, optimizer = acc.prepare(model, optimizer)
        acc.register_for_checkpointing(scheduler)
        raw_model = acc.unwrap_model(model)

        state = {"step": 0, "samples_per_rank": 0, "losses": [], "world_size": acc.num_processes,
                 "train_seconds": 0.0}
        resumed_from = self.resume_checkpoint
        if resumed_from is not None:
            state = CheckpointManager.load(acc, resumed_from)
            if state["world_size"] != acc.num_processes:
                raise ValueError(
                    f"checkpoint {resumed_from} was written by {state['world_size']} processes; resuming "
                    f"with {acc.num_processes} would change the data order (relaunch with the same count)"
                )
            self.print(f"resumed from {resumed_from} at step {state['step']}")
            if state.get("max_steps", self.max_steps) != self.max_steps:
                self.print(
                    f"note: the restored learning-rate schedule is the checkpoint's (built for max_steps="
                    f"{state['max_steps']}); training now runs to max_steps={self.max_steps}"
                )
        losses: list[float] = list(state["losses"])
        train_seconds = float(state.get("train_seconds", 0.0))  # training time of the whole run, no validation
        validation: ValidationReport | None = None
        step = int(state["step"])
        batches = iter(self._loader(dataset, int(state["samples_per_rank"]), getattr(task, "collate_fn", None)))
        writer = self._writer()
        bar = tqdm(
            total=self.max_steps,
            initial=step,
            desc=loss_label,
            disable=not (self.progress and self.is_main_process),
            dynamic_ncols=True,
        )
        model.train()
        first_step, seen = step + 1, []
        while step < self.max_steps:
            t_step = time.perf_counter()
            loss_sum = torch.zeros((), device=acc.device)
            scalar_sums: dict[str, float] = {}  # the task's extra scalars, summed over this step's micro-batches
            for micro in range(self.grad_accum_steps):
                batch = next(batches)
                if self.record_samples:
                    seen.extend(_sample_ids(batch))
                last = micro == self.grad_accum_steps - 1
                with contextlib.nullcontext() if last else acc.no_sync(model):
                    with acc.autocast():
                        loss, out, *extra = task.compute_loss(model, batch, acc.device)
                    if not torch.is_tensor(loss) or loss.numel() != 1 or len(extra) > 1:
                        raise ValueError(
                            f"{type(task).__name__}.compute_loss must return (scalar loss tensor, out[, scalars]), "
                            f"got a loss of type {type(loss).__name__} and shape "
                            f"{tuple(getattr(loss, 'shape', ()))} and {len(extra)} more values"
                        )
                    for name, value in (extra[0] if extra else {}).items():
                        scalar_sums[name] = scalar_sums.get(name, 0.0) + float(value)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"non-finite loss {loss.item()} at step {step + 1}")
                    acc.backward(loss / self.grad_accum_steps)
                loss_sum += loss.detach().float()
            grad_norm = (
                acc.clip_grad_norm_(model.parameters(), self.grad_clip) if self.grad_clip > 0 else None
            )
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            step_loss = float(acc.reduce(loss_sum / self.grad_accum_steps, reduction="mean"))
            losses.append(step_loss)
            lr = max(scheduler.get_last_lr())  # the head's rate under layer-wise decay (the others are lower)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.5f}", lr=f"{lr:.2e}")
            if step % self.log_every == 0 or step == self.max_steps or step == 1:
                scalars = {name: total / self.grad_accum_steps for name, total in scalar_sums.items()}
                parts = "".join(f" | {name} {value:.5f}" for name, value in scalars.items())
                self.print(f"step {step}/{self.max_steps} {loss_label} {step_loss:.5f} lr {lr:.3e}{parts}")
                if writer is not None:
                    writer.add_scalar(f"train/{loss_tag}", step_loss, step)
                    for name, value in scalars.items():
                        writer.add_scalar(f"train/{name}", value, step)
                    writer.add_scalar("train/lr", lr, step)
                    writer.add_scalar("train/step_time_s", time.perf_counter() - t_step, step)
                    if grad_norm is not None:
                        writer.add_scalar("train/grad_norm", float(grad_norm), step)
            train_seconds += time.perf_counter() - t_step
            if (
                panel is not None
                and self.is_main_process
                and self.panel_every
                and (step % self.panel_every == 0 or step == self.max_steps or step == 1)
            ):  # of the last micro-batch, from its outputs already computed (the hook draws no RNG)
                panel(raw_model, out, batch, self.run_dir / "panels" / f"step_{step:08d}.png", step)
            if validator is not None and (
                (self.val_every and step % self.val_every == 0) or step == self.max_steps
            ):
                validation = self._validate(raw_model, validator, step, train_seconds, writer)
            if (self.checkpoint_every and step % self.checkpoint_every == 0) or step == self.max_steps:
                trainer_state = {
                    "step": step,
                    "samples_per_rank": step * self.batch_size * self.grad_accum_steps,
                    "losses": losses,
                    "world_size": acc.num_processes,
                    "max_steps": self.max_steps,
                    "train_seconds": train_seconds,
                }
                self.checkpoints.save(acc, step, trainer_state)
        bar.close()
        if writer is not None:
            writer.close()
        if self.record_samples:
            self._write_sample_ids(seen, first_step, step)
        export_dir = self._export(raw_model)
        summary = loss_summary(losses, label=loss_label)
        self.print(summary)
        wall = time.perf_counter() - t0
        self.print(f"wall time {wall:.1f} s; run dir {self.run_dir}")
        return TrainResult(losses, self.run_dir, export_dir, wall, resumed_from, summary, validation)

    # ------------------------------------------------------------------ outputs
    def _validate(
        self, model: nn.Module, validator: Validator, step: int, train_seconds: float, writer
    ) -> ValidationReport:
        """Held-out validation on the main process; every rank returns the same result."""
        acc = self.accelerator
        result = [None]
        if self.is_main_process:
            with acc.autocast():
                res = validator.evaluate(model, final=step == self.max_steps)
            result[0] = res
            self.print(f"val step {step}: {res.summary()}")
            if writer is not None:
                for name, values in res.metrics.items():
                    for metric, value in values.items():
                        if not math.isnan(value):
                            writer.add_scalar(f"val/{name}_{metric}", value, step)
                headline, value = res.headline
                writer.add_scalar(f"val/{headline}", value, step)
            record = {"step": step, "train_seconds": round(train_seconds, 3), **res.as_dict()}
            with open(self.run_dir / VALIDATION_FILE, "a") as f:
                f.write(json.dumps(record) + "\n")
        if acc.num_processes > 1:
            broadcast_object_list(result, from_process=0)
        return result[0]

    def _writer(self):
        if not (self.tensorboard and self.is_main_process):
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    def _write_sample_ids(self, seen: list[int], first_step: int, last_step: int) -> None:
        by_rank = gather_object([seen]) if self.accelerator.num_processes > 1 else [seen]
        if self.is_main_process:
            path = self.run_dir / f"sample_ids_{first_step:08d}-{last_step:08d}.json"
            path.write_text(json.dumps({str(rank): ids for rank, ids in enumerate(by_rank)}))

    def _export(self, model: nn.Module) -> Path | None:
        """``save_pretrained`` into ``run_dir/model`` on the main process (atomic in the model's method)."""
        export_dir = self.run_dir / "model"
        if self.is_main_process and hasattr(model, "save_pretrained"):
            model.save_pretrained(export_dir)
        self.accelerator.wait_for_everyone()
        return export_dir if hasattr(model, "save_pretrained") else None


"""The original name of :class:`TrainingEngine` (the same class)."""


def _sample_ids(batch: Any) -> list[int]:
    """The ``"sample_id"`` entries of a collated batch (for ``record_samples``)."""
    if not isinstance(batch, Mapping) or "sample_id" not in batch:
        raise ValueError(
            "record_samples=True needs batches with a 'sample_id' entry (dataset items as dicts holding their "
            f"sample id), got a batch of type {type(batch).__name__}"
            + (f" with keys {sorted(batch)}" if isinstance(batch, Mapping) else "")
        )
    return [int(i) for i in batch["sample_id"]]
