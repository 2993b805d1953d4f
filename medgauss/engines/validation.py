"""Held-out validation of masked pretraining: does the model predict hidden voxels better than a trivial fill?

A falling training loss does not show that an MAE learned anything: a model that predicts the mean of
the visible voxels also lowers it. :class:`MaskedReconstructionValidator` scores a model on fixed
held-out crops (:func:`medgauss.data.heldout_crops`), with fixed masks (the model's own patch masking,
drawn from ``mask_seed``, identical at every evaluation and for every model with the same patch grid),
by masked-region MSE / PSNR / SSIM (:mod:`medgauss.metrics.masked`), beside the same metrics of the two
trivial predictors of :mod:`medgauss.metrics.fill` on the same masks:

- ``constant``: every hidden voxel = the mean of the visible ones;
- ``fill``: normalised-convolution fill of the visible voxels (``fill_box^3`` neighbourhood).

The engine calls it every ``val_every`` steps (:class:`medgauss.engines.TrainingEngine`), prints one line
saying whether the model beats the fill, writes the numbers to TensorBoard and ``validation.jsonl``.
Evaluation draws no random numbers from the global generators, so it never changes a training run.

**Any validator plugs into the engine** (:class:`Validator`, structural): ``evaluate(model, *, final)``
returns a :class:`ValidationReport`, an object with

- ``summary() -> str``: the line the engine prints;
- ``metrics: dict[str, dict[str, float]]``: ``{group: {metric: value}}``, each logged to TensorBoard as
  ``val/<group>_<metric>`` (NaN values are skipped);
- ``headline: tuple[str, float]``: the run's main validation number, logged as ``val/<name>``;
- ``as_dict() -> dict``: JSON-ready record, appended to ``validation.jsonl`` after ``step`` and
  ``train_seconds``.

The engine calls it on the main process only, inside Accelerate's autocast, with the unwrapped model in
training mode, and ``final=True`` at the last step (for metrics too slow to compute every time). It must
leave the model's train / eval mode as it found it and draw nothing from the global RNGs. Example, the
held-out error of a regression model::

    @dataclass
    class RegressionReport:
        mse: float

        @property
        def metrics(self):
            return {"model": {"mse": self.mse}}

        @property
        def headline(self):
            return ("mse", self.mse)

        def summary(self):
            return f"held-out MSE {self.mse:.4f}"

        def as_dict(self):
            return {"metrics": self.metrics}

    class RegressionValidator:
        def __init__(self, x, y):
            self.x, self.y = x, y

        @torch.no_grad()
        def evaluate(self, model, *, final):
            was_training = model.training
            model.eval()
            device = next(model.parameters()).device
            try:
                pred = model(self.x.to(device)).float().cpu()
            finally:
                model.train(was_training)
            return RegressionReport(float(((pred - self.y) ** 2).mean()))
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from medgauss.metrics import constant_fill, masked_mse, masked_psnr, masked_ssim, normalized_convolution_fill

__all__ = ["PREDICTORS", "MaskedReconstructionValidator", "ValidationReport", "ValidationResult", "Validator"]

PREDICTORS = ("model", "constant", "fill")


@runtime_checkable
class ValidationReport(Protocol):
    """What a :class:`Validator` returns (see the module doc for how the engine logs each member)."""

    metrics: dict[str, dict[str, float]]

    @property
    def headline(self) -> tuple[str, float]:
        """``(name, value)``: the main validation number, TensorBoard ``val/<name>``."""
        ...

    def summary(self) -> str:
        """One printable line."""
        ...

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready record for ``validation.jsonl``."""
        ...


@runtime_checkable
class Validator(Protocol):
    """Held-out evaluation the engine runs every ``val_every`` steps and at the last one (module doc)."""

    def evaluate(self, model: nn.Module, *, final: bool) -> ValidationReport:
        """Score ``model``; ``final`` is True at the run's last step."""
        ...


@dataclass
class ValidationResult:
    """Mean masked-region metrics over the held-out crops, per predictor.

    Attributes:
        metrics: ``{predictor: {"mse": float, "psnr": float, "ssim": float}}`` for ``"model"``,
            ``"constant"`` and ``"fill"``; PSNR in dB (mean of per-crop PSNR), data range of the validator.
        num_crops: crops evaluated.
        per_crop_psnr: ``{predictor: [num_crops] floats}``.
    """

    metrics: dict[str, dict[str, float]]
    num_crops: int
    per_crop_psnr: dict[str, list[float]] = field(default_factory=dict)

    @property
    def margin_db(self) -> float:
        """Model PSNR minus the fill's (positive: the model beats the trivial fill)."""
        return self.metrics["model"]["psnr"] - self.metrics["fill"]["psnr"]

    @property
    def beats_fill(self) -> bool:
        return self.margin_db > 0

    @property
    def headline(self) -> tuple[str, float]:
        """``("margin_over_fill_db", margin_db)``: the engine's TensorBoard ``val/margin_over_fill_db``."""
        return "margin_over_fill_db", self.margin_db

    def summary(self) -> str:
        """One line: the three predictors' PSNR / SSIM and the verdict."""
        m = self.metrics
        verdict = (f"beats the trivial fill by {self.margin_db:+.2f} dB" if self.beats_fill
                   else f"does NOT beat the trivial fill ({self.margin_db:+.2f} dB): not learned yet")
        ssim = "" if math.isnan(m["model"]["ssim"]) else f" (SSIM {m['model']['ssim']:.3f})"
        return (f"held-out masked PSNR {m['model']['psnr']:.2f} dB{ssim} | "
                f"constant {m['constant']['psnr']:.2f} dB | fill {m['fill']['psnr']:.2f} dB | "
                f"{self.num_crops} crops: model {verdict}")

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (metrics not computed, such as a skipped SSIM, are ``None``)."""
        clean = lambda v: None if isinstance(v, float) and math.isnan(v) else v
        metrics = {p: {k: clean(v) for k, v in m.items()} for p, m in self.metrics.items()}
        return {"metrics": metrics, "num_crops": self.num_crops, "margin_db": self.margin_db,
                "beats_fill": self.beats_fill, "per_crop_psnr": self.per_crop_psnr}


class MaskedReconstructionValidator:
    """Masked-region quality of an MAE-style model on fixed held-out crops, beside the trivial fills.

    Args:
        images: ``[N, 1, D, H, W]`` held-out crops in ``[0, data_range]`` (e.g.
            ``medgauss.data.heldout_crops(...)["image"]``).
        mask_seed: seed of the masking noise (one ``[N, L]`` draw per patch count ``L``).
        batch_size: crops per forward pass.
        fill_box: neighbourhood edge of the normalised-convolution fill, voxels.
        data_range: intensity range for PSNR / SSIM.

    The model must follow the pretraining contract: ``model(images, noise=...)`` with ``noise [B, L]``,
    ``model.reconstruct(out, images.shape)`` and ``model.mask_to_volume(out.mask)``, and expose its patch
    count as ``model.encoder.num_patches`` (``GaussianMAE``, MedGMAE*, ``VoxelMAE``).
    """

    def __init__(self, images: Tensor, *, mask_seed: int = 0, batch_size: int = 4, fill_box: int = 25,
                 data_range: float = 1.0) -> None:
        if not isinstance(images, Tensor) or images.ndim != 5 or images.shape[1] != 1 or images.shape[0] == 0:
            raise ValueError(f"images must be held-out crops [N >= 1, 1, D, H, W], got "
                             f"{tuple(getattr(images, 'shape', ()))}")
        if not bool(torch.isfinite(images).all()):
            raise ValueError("images contains non-finite values (NaN or inf)")
        if int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.images = images.detach().float().cpu()
        self.mask_seed, self.batch_size = int(mask_seed), int(batch_size)
        self.fill_box, self.data_range = int(fill_box), float(data_range)
        self._baselines: dict[tuple, dict[str, Tensor]] = {}

    @property
    def num_crops(self) -> int:
        return int(self.images.shape[0])

    def noise(self, num_patches: int) -> Tensor:
        """The fixed masking scores ``[N, num_patches]`` (same for every call and every model)."""
        gen = torch.Generator().manual_seed(self.mask_seed)
        return torch.rand(self.num_crops, int(num_patches), generator=gen)

    def _scores(self, pred: Tensor, target: Tensor, hidden: Tensor, with_ssim: bool) -> dict[str, Tensor]:
        mse = masked_mse(pred, target, hidden)
        return {
            "mse": mse,
            "psnr": masked_psnr(pred, target, hidden, data_range=self.data_range),
            "ssim": masked_ssim(pred, target, hidden, data_range=self.data_range) if with_ssim
            else torch.full_like(mse, math.nan),
        }

    @torch.no_grad()
    def evaluate(self, model: nn.Module, *, with_ssim: bool | None = None, final: bool = True) -> ValidationResult:
        """Score ``model`` (left in the train / eval mode it came in) on the held-out crops.

        ``with_ssim=False`` skips the SSIM (NaN in the result), the costly part on a CPU (a 3D SSIM of
        12 crops of 96^3 takes seconds). ``with_ssim=None`` (default) computes it when ``final``: the
        engine passes ``final=True`` at the last step only (:class:`Validator`).
        """
        if with_ssim is None:
            with_ssim = bool(final)
        encoder = getattr(model, "encoder", None)
        if encoder is None or not hasattr(encoder, "num_patches"):
            raise ValueError(f"{type(model).__name__} has no encoder.num_patches: not an MAE-style model")
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        noise = self.noise(encoder.num_patches)
        scores: dict[str, list[Tensor]] = {p: [] for p in PREDICTORS}
        try:
            for start in range(0, self.num_crops, self.batch_size):
                images = self.images[start:start + self.batch_size]
                out = model(images.to(device), noise=noise[start:start + self.batch_size].to(device))
                pred = model.reconstruct(out, tuple(images.shape)).float().cpu()
                hidden = model.mask_to_volume(out.mask).cpu()
                key = (encoder.num_patches, start)
                if key not in self._baselines:  # the fills depend only on crops and masks: computed once
                    self._baselines[key] = {
                        "constant": constant_fill(images, hidden),
                        "fill": normalized_convolution_fill(images, hidden, box=self.fill_box),
                    }
                predictions = {"model": pred, **self._baselines[key]}
                for name, p in predictions.items():
                    scores[name].append(
                        torch.stack(list(self._scores(p, images, hidden, with_ssim).values()), dim=-1)
                    )
        finally:
            model.train(was_training)
        metrics, per_crop = {}, {}
        for name, parts in scores.items():
            table = torch.cat(parts)  # [N, 3]: mse, psnr, ssim
            mean = table.mean(dim=0)
            metrics[name] = {"mse": float(mean[0]), "psnr": float(mean[1]), "ssim": float(mean[2])}
            per_crop[name] = [round(float(v), 4) if math.isfinite(float(v)) else float(v) for v in table[:, 1]]
        return ValidationResult(metrics, self.num_crops, per_crop)
