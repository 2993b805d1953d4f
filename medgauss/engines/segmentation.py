"""Segmentation fine-tuning plugged into the training engine: Dice + cross-entropy, sliding-window Dice validation.

- :class:`SegmentationTask`: ``DiceCELoss`` (MONAI; softmax over the classes, one-hot labels) on a batch of
  labelled crops, with an overlay panel (image, truth, prediction).
- :func:`sliding_window_probabilities`: MONAI ``sliding_window_inference`` of a whole preprocessed volume (the one
  inference path, shared by validation and ``medgauss-segment``).
- :class:`SegmentationValidator`: held-out volumes segmented whole, scored with MONAI ``DiceMetric`` per class and
  as a mean over the foreground classes (:func:`medgauss.metrics.dice_per_class`), beside the trivial baseline
  ``intensity``: each voxel labelled with the class most frequent at its intensity in the labelled training crops
  (a histogram classifier, no spatial context, fitted once). A model that does not beat it has learned nothing an
  intensity threshold would not give.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from torch import Tensor, nn

from medgauss.engines.panels import axial_display, save_figure
from medgauss.metrics.overlap import dice_per_class

__all__ = [
    "IntensityBaseline",
    "SegmentationReport",
    "SegmentationTask",
    "SegmentationValidator",
    "foreground_dice",
    "save_overlay_panel",
    "sliding_window_probabilities",
]

_COLOURS = ["#00000000", "#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6",
            "#bcf60c", "#fabebe", "#008080", "#e6beff", "#9a6324"]


def save_overlay_panel(path: str | Path, image: Tensor, truth: Tensor, prediction: Tensor, *,
                       class_names: Sequence[str] | None = None, title: str = "") -> Path:
    """PNG of the axial slice with the most labelled voxels: image, truth overlay, prediction overlay.

    Args:
        image: ``[D, H, W]`` in [0, 1]; truth, prediction: ``[D, H, W]`` class indices (0 = background).
        class_names: legend names (background first).
    """
    img = image.detach().float().cpu().numpy()
    gt, pr = truth.detach().cpu().numpy(), prediction.detach().cpu().numpy()
    if not img.shape == gt.shape == pr.shape or img.ndim != 3:
        raise ValueError(f"image, truth, prediction must be [D, H, W] of one shape, got {img.shape}, {gt.shape}, "
                         f"{pr.shape}")
    k = int(np.argmax((gt > 0).reshape(gt.shape[0], -1).sum(1)))
    cmap = ListedColormap(_COLOURS[: max(2, int(max(gt.max(), pr.max())) + 1)])
    fig = Figure(figsize=(10, 3.8))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    for ax, overlay, name in zip(axes, (None, gt, pr), ("image", "truth", "prediction")):
        ax.imshow(axial_display(img, k), cmap="gray", vmin=0.0, vmax=1.0)
        if overlay is not None:
            shown = np.ma.masked_equal(axial_display(overlay, k), 0)
            ax.imshow(shown, cmap=cmap, vmin=0, vmax=cmap.N - 1, alpha=0.55, interpolation="nearest")
        ax.set_title(name)
        ax.set_axis_off()
    if class_names:
        present = sorted(set(np.unique(gt[k])) | set(np.unique(pr[k])) - {0})
        text = "  ".join(f"{int(c)}={class_names[int(c)]}" for c in present if int(c) < len(class_names))
        fig.text(0.5, 0.01, text, ha="center", fontsize=8)
    return save_figure(fig, path, title or f"axial slice {k}")


class SegmentationTask:
    """Supervised segmentation step: ``DiceCELoss(model(image), label)``.

    Batches: ``{"image": [B, 1, D, H, W] float, "label": [B, 1, D, H, W] int64}`` (e.g.
    :class:`medgauss.data.segmentation.SegmentationCropDataset`). The Dice and cross-entropy parts are logged.

    Args:
        lambda_dice, lambda_ce: weights of the two parts (MONAI's ``DiceCELoss``).
        class_names: for the panel's legend.
    """

    loss_label = "Dice+CE loss"
    loss_tag = "dice_ce"

    def __init__(self, lambda_dice: float = 1.0, lambda_ce: float = 1.0,
                 class_names: Sequence[str] | None = None) -> None:
        if lambda_dice < 0 or lambda_ce < 0 or lambda_dice + lambda_ce == 0:
            raise ValueError(f"lambda_dice and lambda_ce must be >= 0 and not both 0, got {lambda_dice}, {lambda_ce}")
        self.loss = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=lambda_dice, lambda_ce=lambda_ce)
        self.class_names = None if class_names is None else list(class_names)

    def compute_loss(self, model: nn.Module, batch: dict, device: torch.device) -> tuple[Tensor, Tensor, dict]:
        image = batch["image"].to(device, non_blocking=True)
        label = batch["label"].to(device, non_blocking=True)
        logits = model(image)
        loss = self.loss(logits, label)
        with torch.no_grad():
            parts = {"dice_loss": float(self.loss.dice(logits, label)), "ce": float(self.loss.ce(logits, label.long()))}
        return loss, logits.detach(), parts

    def panel(self, model: nn.Module, out: Tensor, batch: dict, path: Path, step: int) -> None:
        save_overlay_panel(path, batch["image"][0, 0], batch["label"][0, 0], out[0].argmax(0).cpu(),
                           class_names=self.class_names, title=f"step {step}")


@torch.no_grad()
def sliding_window_probabilities(model: nn.Module, image: Tensor, roi_size: Sequence[int], *, overlap: float = 0.25,
                                 sw_batch_size: int = 4, mode: str = "gaussian") -> Tensor:
    """Class probabilities of a whole volume by MONAI sliding-window inference (``roi_size`` windows, softmax).

    Args:
        image: ``[1, C, D, H, W]`` preprocessed volume, each side at least ``roi_size`` (pad smaller ones first).
        roi_size: the model's input size.

    Returns:
        ``[1, K, D, H, W]`` float32 probabilities on the image's device.
    """
    if image.ndim != 5 or image.shape[0] != 1:
        raise ValueError(f"image must be one volume [1, C, D, H, W], got {tuple(image.shape)}")
    if any(s < r for s, r in zip(image.shape[2:], roi_size)):
        raise ValueError(f"image {tuple(image.shape[2:])} is smaller than the model's input {tuple(roi_size)}")
    was_training = model.training
    model.eval()
    try:
        logits = sliding_window_inference(image, tuple(roi_size), sw_batch_size, model, overlap=overlap, mode=mode)
    finally:
        model.train(was_training)
    return torch.as_tensor(logits).float().softmax(1)


def foreground_dice(prediction: Tensor, truth: Tensor, num_classes: int) -> list[float]:
    """Dice of each foreground class ``1..K-1`` of one volume (:func:`medgauss.metrics.dice_per_class`, MONAI's
    ``DiceMetric``; NaN where the class is in neither map)."""
    return [float(v) for v in dice_per_class(prediction, truth, num_classes)[0, 1:]]


class IntensityBaseline:
    """Each voxel gets the class most frequent at its intensity in the labelled training crops.

    Intensities (in ``[b_min, b_max]``) are binned into ``bins`` equal bins; the class of a bin is the arg-max of the
    label counts in it (background where a bin is empty).

    Args:
        images: the labelled training crops or volumes, each ``[1, d, h, w]``; labels: their class maps, alike.
    """

    def __init__(self, images: Sequence[Tensor], labels: Sequence[Tensor], num_classes: int, *, bins: int = 64,
                 b_min: float = 0.0, b_max: float = 1.0) -> None:
        if len(images) == 0 or len(images) != len(labels):
            raise ValueError(f"need as many label maps as images (at least one), got {len(images)} and {len(labels)}")
        if not b_min < b_max:
            raise ValueError(f"need b_min < b_max, got {b_min}, {b_max}")
        self.bins, self.b_min, self.b_max = bins, b_min, b_max
        counts = torch.zeros(bins * num_classes, dtype=torch.float64)
        for image, label in zip(images, labels):
            if image.shape != label.shape:
                raise ValueError(f"image and label shapes differ: {tuple(image.shape)} vs {tuple(label.shape)}")
            flat = self._bin(image).reshape(-1) * num_classes + label.reshape(-1).long()
            counts += torch.bincount(flat, minlength=bins * num_classes).double()
        self.table = counts.reshape(bins, num_classes).argmax(1)

    def _bin(self, image: Tensor) -> Tensor:
        scaled = (image.float() - self.b_min) / (self.b_max - self.b_min)
        return (scaled * self.bins).long().clamp(0, self.bins - 1)

    def __call__(self, image: Tensor) -> Tensor:
        """``[..., D, H, W]`` intensities -> class map of the same shape."""
        return self.table[self._bin(image)]


@dataclass
class SegmentationReport:
    """Held-out Dice per class and mean, of the model and the intensity baseline.

    Attributes:
        dice: ``{predictor: {class name: Dice}}`` (means over the volumes; NaN classes skipped).
        class_names: foreground class names.
        num_volumes: held-out volumes scored.
    """

    dice: dict[str, dict[str, float]]
    class_names: list[str]
    num_volumes: int
    seconds: float = math.nan
    per_volume: dict[str, list[float]] = field(default_factory=dict)

    def mean(self, predictor: str) -> float:
        values = [v for v in self.dice[predictor].values() if not math.isnan(v)]
        return float(np.mean(values)) if values else math.nan

    @property
    def metrics(self) -> dict[str, dict[str, float]]:
        return {name: {"dice_mean": self.mean(name), **{f"dice_{c}": v for c, v in rows.items()}}
                for name, rows in self.dice.items()}

    @property
    def headline(self) -> tuple[str, float]:
        return "dice_mean", self.mean("model")

    def summary(self) -> str:
        model, base = self.mean("model"), self.mean("intensity")
        parts = " ".join(f"{c} {self.dice['model'][c]:.3f}" for c in self.class_names)
        verdict = (f"beats the intensity baseline by {model - base:+.3f}" if model > base
                   else f"does NOT beat the intensity baseline ({model - base:+.3f}): not learned yet")
        return (f"held-out mean Dice {model:.3f} ({parts}) | intensity baseline {base:.3f} | "
                f"{self.num_volumes} volume(s): model {verdict}")

    def as_dict(self) -> dict[str, Any]:
        return {"metrics": self.metrics, "num_volumes": self.num_volumes, "seconds": self.seconds,
                "beats_intensity": self.mean("model") > self.mean("intensity")}


class SegmentationValidator:
    """Sliding-window segmentation of whole held-out volumes, scored by Dice (module doc).

    Args:
        volumes: held-out ``{"image": [1, D, H, W], "label": [1, D, H, W]}`` volumes (each side at least the roi).
        roi_size: the model's input size.
        class_names: all classes, background first.
        baseline: the fitted :class:`IntensityBaseline`.
        overlap, sw_batch_size: sliding-window settings.
    """

    def __init__(self, volumes: Sequence[dict], roi_size: Sequence[int], class_names: Sequence[str],
                 baseline: IntensityBaseline, *, overlap: float = 0.25, sw_batch_size: int = 4) -> None:
        if not volumes:
            raise ValueError("volumes is empty: nothing to validate on")
        self.volumes, self.roi_size, self.class_names = list(volumes), tuple(roi_size), list(class_names)
        self.baseline, self.overlap, self.sw_batch_size = baseline, overlap, sw_batch_size
        k = len(self.class_names)
        self._baseline_dice = [foreground_dice(baseline(v["image"][0]), v["label"][0], k) for v in self.volumes]

    def evaluate(self, model: nn.Module, *, final: bool = True) -> SegmentationReport:
        t0 = time.perf_counter()
        device = next(model.parameters()).device
        k = len(self.class_names)
        model_scores = []
        for volume in self.volumes:
            probs = sliding_window_probabilities(model, volume["image"][None].to(device), self.roi_size,
                                                 overlap=self.overlap, sw_batch_size=self.sw_batch_size)
            model_scores.append(foreground_dice(probs[0].argmax(0).cpu(), volume["label"][0], k))
        names = self.class_names[1:]

        def mean_over_volumes(scores: list[list[float]]) -> dict[str, float]:
            table = np.array(scores, dtype=np.float64)
            return {n: (float(np.nanmean(table[:, i])) if np.isfinite(table[:, i]).any() else math.nan)
                    for i, n in enumerate(names)}

        report = SegmentationReport(
            dice={"model": mean_over_volumes(model_scores), "intensity": mean_over_volumes(self._baseline_dice)},
            class_names=names, num_volumes=len(self.volumes), seconds=time.perf_counter() - t0,
            per_volume={"model": [float(np.nanmean(s)) for s in model_scores]})
        return report
