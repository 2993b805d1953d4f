"""What a recipe plugs into the training engine: the step's loss (and an optional panel) as a *task*.

:class:`medgauss.engines.TrainingEngine` owns everything a run shares (Accelerate, data order, gradient
accumulation / clipping, the optimizer and scheduler steps, checkpoints and exact resume, TensorBoard,
held-out validation, the final export); a task says only how one micro-batch becomes a loss.

The :class:`TrainTask` protocol (structural: any object with these members is a task):

- ``loss_label: str``: what the log line, the progress bar and the run summary call the loss
  (e.g. ``"masked-region loss"``).
- ``compute_loss(model, batch, device) -> (loss, out)``: one micro-batch's scalar loss and whatever the
  panel hook needs (``out``, e.g. the model's forward output). ``batch`` is what the DataLoader yields
  (the default collate of the dataset's items, on the CPU); the task moves what it uses to ``device``.
  The engine calls it inside Accelerate's autocast, in training mode, with the model Accelerate prepared
  (``DistributedDataParallel``-wrapped on several processes: call it, do not reach into it). All of the
  step's randomness must come from the global RNGs (which checkpoints restore) or from the batch, so a
  resumed run repeats the uninterrupted one bit for bit. It may return a third element, a mapping
  ``{name: float}`` of extra scalars (e.g. the parts of a multi-part loss): the engine averages them over
  the step's micro-batches (the main process's) and, at its log steps, writes them to TensorBoard as
  ``train/<name>`` and appends them to its log line.

Optional members (looked up with ``getattr``):

- ``loss_tag: str``: TensorBoard scalar of the loss, ``train/<loss_tag>`` (default ``"loss"``).
- ``panel(model, out, batch, path, step) -> None``: draw a PNG of the last micro-batch to ``path`` at
  ``step``. Main process only, with the unwrapped model; it must not draw from the global RNGs (that
  would change the training run), e.g. reuse ``out`` instead of running the model again.

Example, a supervised regression task (a dataset whose item ``i`` is ``{"x": [F], "y": [1],
"sample_id": i}``)::

    class RegressionTask:
        loss_label = "regression MSE"
        loss_tag = "mse"

        def compute_loss(self, model, batch, device):
            pred = model(batch["x"].to(device))
            return torch.nn.functional.mse_loss(pred, batch["y"].to(device)), pred

    engine = TrainingEngine(run_dir="runs/reg", max_steps=200, batch_size=8)
    model = torch.nn.Linear(4, 1)
    optimizer, scheduler = build_optimizer(model, max_steps=200)
    engine.fit(model, RegressionTask(), dataset, optimizer, scheduler)

:class:`MaskedPretrainTask` is masked-image pretraining (MedGMAE / voxel MAE): ``loss_fn(model(image),
image)``, with the input / masked input / rendering / target panel.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from medgauss.engines.panels import panel_from_output, save_slice_panel

__all__ = ["MaskedPretrainTask", "TrainTask", "as_task"]


@runtime_checkable
class TrainTask(Protocol):
    """One training step's loss, plugged into :class:`medgauss.engines.TrainingEngine` (see the module doc)."""

    loss_label: str

    def compute_loss(self, model: nn.Module, batch: Any, device: torch.device) -> tuple[Tensor, Any]:
        """``(loss, out)`` or ``(loss, out, scalars)``: scalar loss of the micro-batch ``batch``, what
        :meth:`panel` needs, and optional extra scalars to log."""
        ...


class MaskedPretrainTask:
    """Masked-image pretraining: ``out = model(image)``, ``loss = loss_fn(out, image)``.

    Args:
        loss_fn: ``loss_fn(out, images) -> scalar`` module (e.g. ``medgauss.losses.pretrain_loss_for(model)``);
            moved to the training device on first use.

    Batches are the pretraining datasets' (``batch["image"]`` ``[B, 1, D, H, W]``). The model follows the
    MedGMAE contract: ``model(images)`` draws its masking from the global torch RNG; the panel uses
    ``model.reconstruct(out, shape)`` and ``model.mask_to_volume(out.mask)`` when the model has them.
    """

    loss_label = "masked-region loss"
    loss_tag = "masked_loss"

    def __init__(self, loss_fn: nn.Module) -> None:
        if not callable(loss_fn):
            raise ValueError(f"loss_fn must be a callable loss module, got {type(loss_fn).__name__}")
        self.loss_fn = loss_fn
        self._device: torch.device | None = None

    def compute_loss(self, model: nn.Module, batch: dict, device: torch.device) -> tuple[Tensor, Any]:
        """``(loss_fn(out, images), out)`` with ``images = batch["image"]`` on ``device``."""
        if self._device != device and isinstance(self.loss_fn, nn.Module):
            self.loss_fn = self.loss_fn.to(device)
        self._device = device
        images = batch["image"].to(device, non_blocking=True)
        out = model(images)
        return self.loss_fn(out, images), out

    def panel(self, model: nn.Module, out: Any, batch: dict, path: Path, step: int) -> None:
        """Slice panel of sample 0 of the micro-batch, from outputs already computed (no RNG is consumed).

        Skipped for a model without ``reconstruct`` (nothing to render).
        """
        if not hasattr(model, "reconstruct"):
            return
        was_training = model.training
        model.eval()
        try:
            pieces = panel_from_output(model, out, batch["image"])
        finally:
            model.train(was_training)
        save_slice_panel(
            path,
            pieces["image"],
            pieces["hidden"],
            pieces["reconstruction"],
            centres=pieces["centres"],
            title=f"step {step}",
        )


def as_task(task: Any) -> TrainTask:
    """``task`` itself when it is a :class:`TrainTask`; a plain loss module becomes
    ``MaskedPretrainTask(task)`` (the engine's original ``fit(model, loss_fn, ...)`` call).

    Raises:
        ValueError: ``task`` is neither a task (``loss_label`` + ``compute_loss``) nor an ``nn.Module`` loss.
    """
    if isinstance(task, TrainTask):
        return task
    if isinstance(task, nn.Module):
        return MaskedPretrainTask(task)
    raise ValueError(
        f"task must be a TrainTask (a loss_label and compute_loss(model, batch, device)) or a masked-pretraining "
        f"loss nn.Module, got {type(task).__name__}"
    )
