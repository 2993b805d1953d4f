"""Held-out validation of masked pretraining: does the model predict hidden voxels better than a trivial fill?

A falling training loss does not show that an MAE learned anything: a model that predicts the mean of
the visible voxels also lowers it. :class:`MaskedReconstructionValidator` scores a model on fixed
held-out crops (:func:`medgauss.data.heldout_crops`), with fixed masks (the model's own patch masking,
drawn from ``mask_seed``, identical at every evaluation and for every model with the same patch grid),
by masked-region MSE / PSNR / SSIM (:mod:`medgauss.metrics.masked`), beside the same metrics of the two
trivial predictors of :mod:`medgauss.metrics.fill` on the same masks:

- ``constant``: every hidden voxel = the mean of the visible ones;
- ``fill``: normalised-convolution fill of the visible voxels (``fill_box^3`` neighbourhood).

The engine calls it every ``val_every`` steps (:class:`medgauss.engines.PretrainEngine`), prints one line
saying whether the model beats the fill, writes the numbers to TensorBoard and ``validation.jsonl``.
Evaluation draws no random numbers from the global generators, so it never changes a training run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from medgauss.metrics import constant_fill, masked_mse, masked_psnr, masked_ssim, normalized_convolution_fill

__all__ = ["MaskedReconstructionValidator", "ValidationResult", "PREDICTORS"]

PREDICTORS = ("model", "constant", "fill")


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
    def evaluate(self, model: nn.Module, *, with_ssim: bool = True) -> ValidationResult:
        """Score ``model`` (left in the train / eval mode it came in) on the held-out crops.

        ``with_ssim=False`` skips the SSIM (NaN in the result), the costly part on a CPU (a 3D SSIM of
        12 crops of 96^3 takes seconds): the engine computes it at the last step only.
        """
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
