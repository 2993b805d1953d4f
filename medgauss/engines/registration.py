"""Deformable registration in the training engine: the unsupervised task and its held-out validator.

* :class:`RegistrationTask` (a :class:`~medgauss.engines.tasks.TrainTask`): ``ddf = model(fixed, moving)``,
  ``warped = model.warp(moving, ddf)``, loss = similarity(warped, fixed) + ``smoothness_weight`` x smoothness(ddf)
  (TransMorph: LNCC + diffusion, 1:1); the two parts are logged as ``train/similarity`` and ``train/smoothness``.
  Its panel shows fixed / moving / warped / the deformation grid over the warped image (middle axial slice).
* :class:`RegistrationValidator` (a :class:`~medgauss.engines.validation.Validator`): on fixed held-out pairs with
  labels, the Dice of the warped moving labels against the fixed labels (mean over the foreground classes, and per
  class) and the percentage of voxels with a non-positive Jacobian determinant, beside the trivial baseline
  ``identity`` (no deformation: the moving labels as they are) in the same report.

Neither draws from the global random generators (the model is deterministic given the batch; the validator runs it
in eval mode without gradients), so resume stays exact.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from monai.losses import BendingEnergyLoss, DiffusionLoss, LocalNormalizedCrossCorrelationLoss
from torch import Tensor, nn

from medgauss.engines.panels import axial_display, save_figure
from medgauss.metrics.overlap import dice_per_class
from medgauss.metrics.registration import nonpositive_jacobian_fraction

__all__ = [
    "SIMILARITIES",
    "SMOOTHNESS",
    "RegistrationReport",
    "RegistrationTask",
    "RegistrationValidator",
    "save_registration_panel",
]

SIMILARITIES = ("lncc", "mse")
SMOOTHNESS = ("diffusion", "bending")


def _unwrapped(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


class RegistrationTask:
    """Unsupervised registration step: similarity of the warped moving image to the fixed one + smoothness.

    Args:
        similarity: ``"lncc"`` (MONAI ``LocalNormalizedCrossCorrelationLoss``, which returns ``-LNCC^2``, so a
            perfect match scores -1) or ``"mse"``.
        kernel_size: LNCC window edge (odd), voxels.
        smoothness: ``"diffusion"`` (MONAI ``DiffusionLoss``, mean squared first derivatives) or ``"bending"``
            (``BendingEnergyLoss``, needs every spatial size > 4).
        smoothness_weight: weight of the smoothness term (TransMorph: 1).

    Batches are dataset items collated (``fixed``, ``moving`` ``[B, 1, D, H, W]``; labels unused in training).
    The model: ``model(fixed, moving) -> ddf [B, 3, D, H, W]`` voxels and ``model.warp(image, ddf, mode)``
    (:class:`~medgauss.nets.registration.ViTRegistrationNet`).
    """

    loss_label = "registration loss"
    loss_tag = "registration_loss"

    def __init__(self, *, similarity: str = "lncc", kernel_size: int = 9, smoothness: str = "diffusion",
                 smoothness_weight: float = 1.0) -> None:
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
        if smoothness not in SMOOTHNESS:
            raise ValueError(f"smoothness must be one of {SMOOTHNESS}, got {smoothness!r}")
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd positive int, got {kernel_size!r}")
        if not (isinstance(smoothness_weight, int | float) and math.isfinite(smoothness_weight)
                and smoothness_weight >= 0):
            raise ValueError(f"smoothness_weight must be a finite number >= 0, got {smoothness_weight!r}")
        self.similarity_name, self.smoothness_name = similarity, smoothness
        self.kernel_size, self.smoothness_weight = kernel_size, float(smoothness_weight)
        self.similarity = (LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=kernel_size)
                           if similarity == "lncc" else nn.MSELoss())
        self.smoothness = DiffusionLoss() if smoothness == "diffusion" else BendingEnergyLoss()

    def losses(self, warped: Tensor, fixed: Tensor, ddf: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(total, similarity, smoothness)`` scalars (the loss terms computed in float32)."""
        sim = self.similarity(warped.float(), fixed.float())
        smooth = self.smoothness(ddf.float())
        return sim + self.smoothness_weight * smooth, sim, smooth

    def compute_loss(self, model: nn.Module, batch: Mapping[str, Any],
                     device: torch.device) -> tuple[Tensor, dict[str, Tensor], dict[str, float]]:
        """``(loss, {"ddf", "warped"}, {"similarity", "smoothness"})`` of one micro-batch."""
        fixed = batch["fixed"].to(device, non_blocking=True)
        moving = batch["moving"].to(device, non_blocking=True)
        ddf = model(fixed, moving)
        warped = _unwrapped(model).warp(moving, ddf)
        total, sim, smooth = self.losses(warped, fixed, ddf)
        out = {"ddf": ddf.detach(), "warped": warped.detach()}
        return total, out, {"similarity": float(sim.detach()), "smoothness": float(smooth.detach())}

    @torch.no_grad()
    def panel(self, model: nn.Module, out: Mapping[str, Tensor], batch: Mapping[str, Any], path: Path,
              step: int) -> None:
        """Sample 0 of the micro-batch, from the outputs already computed (no model call, no RNG)."""
        save_registration_panel(path, batch["fixed"][0, 0], batch["moving"][0, 0], out["warped"][0, 0].float().cpu(),
                                out["ddf"][0].float().cpu(), title=f"step {step}")


def _deformation_lines(ddf_slice: np.ndarray, every: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Displayed ``(cols, rows)`` polylines of a deformed grid in an axial slice: grid lines every ``every``
    voxels, each point ``(h, w)`` moved by its in-plane displacement ``(u_h, u_w)`` (``ddf_slice [3, H, W]``)."""
    _, h, w = ddf_slice.shape
    hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    ph, pw = hh + ddf_slice[1], ww + ddf_slice[2]
    rows, cols = (h - 1) - ph, (w - 1) - pw  # axial_display flips both in-plane axes
    lines = [(cols[i, :], rows[i, :]) for i in range(0, h, every)]
    lines += [(cols[:, j], rows[:, j]) for j in range(0, w, every)]
    return lines


def save_registration_panel(path: str | Path, fixed: Tensor, moving: Tensor, warped: Tensor, ddf: Tensor, *,
                            grid_every: int | None = None, title: str = "") -> Path:
    """A 1 x 5 PNG of the middle axial slice: fixed, moving, warped moving, |warped - fixed|, and the deformation
    grid (every ``grid_every`` voxels, displaced by the field) drawn over the warped image.

    Args:
        path: output PNG (parent folders created).
        fixed, moving, warped: ``[D, H, W]`` in ``[0, 1]``.
        ddf: ``[3, D, H, W]`` displacement in voxels.
        grid_every: grid spacing in voxels (default: ``H // 16``, at least 2).
        title: figure title.

    Returns:
        ``path``.
    """
    vols = [v.detach().float().cpu().numpy() for v in (fixed, moving, warped)]
    field_np = ddf.detach().float().cpu().numpy()
    if any(v.ndim != 3 or v.shape != vols[0].shape for v in vols) or field_np.shape != (3, *vols[0].shape):
        raise ValueError(f"fixed, moving, warped must be [D, H, W] of one shape and ddf [3, D, H, W], got "
                         f"{[v.shape for v in vols]} and {field_np.shape}")
    d, h, _ = vols[0].shape
    k = d // 2
    every = grid_every or max(2, h // 16)
    diff = np.abs(vols[2] - vols[0])
    fig = Figure(figsize=(16, 3.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 5)
    names = ("fixed", "moving", "warped moving", "|warped - fixed|", "deformation grid")
    for ax, vol, name in zip(axes, (vols[0], vols[1], vols[2], diff, vols[2]), names):
        ax.imshow(axial_display(vol, k), cmap="gray", vmin=0.0, vmax=1.0 if name != "|warped - fixed|" else 0.5)
        ax.set_title(name)
        ax.set_axis_off()
    for cols, rows in _deformation_lines(field_np[:, k], every):
        axes[4].plot(cols, rows, color="yellow", linewidth=0.6)
    mae = float(np.mean(diff))
    before = float(np.mean(np.abs(vols[1] - vols[0])))
    axes[3].set_title(f"|warped - fixed| {mae:.4f}\n(moving: {before:.4f})")
    return save_figure(fig, path, title)


# ------------------------------------------------------------------------------------------- validation


@dataclass
class RegistrationReport:
    """Held-out registration quality of a model beside the identity (no deformation).

    Attributes:
        metrics: ``{"model" | "identity": {"dice": mean over pairs of the mean foreground Dice, "dice_<class>":
            per-class Dice (mean over the pairs where the class is present), "nonpositive_jacobian_pct": % of voxels
            with det J <= 0 (0 for the identity), "image_mse": mean squared difference to the fixed image}}``.
        num_pairs: pairs evaluated.
        per_pair_dice: ``{"model" | "identity": [num_pairs] mean foreground Dice}``.
    """

    metrics: dict[str, dict[str, float]]
    num_pairs: int
    per_pair_dice: dict[str, list[float]] = field(default_factory=dict)

    @property
    def margin(self) -> float:
        """Model Dice minus identity Dice (positive: the model beats doing nothing)."""
        return self.metrics["model"]["dice"] - self.metrics["identity"]["dice"]

    @property
    def beats_identity(self) -> bool:
        return self.margin > 0

    @property
    def headline(self) -> tuple[str, float]:
        """``("dice_over_identity", margin)``: TensorBoard ``val/dice_over_identity``."""
        return "dice_over_identity", self.margin

    def summary(self) -> str:
        m = self.metrics
        verdict = (f"model beats identity by {self.margin:+.4f} Dice" if self.beats_identity
                   else f"model does NOT beat identity ({self.margin:+.4f} Dice): not learned yet")
        return (f"held-out registration Dice {m['model']['dice']:.4f} (identity {m['identity']['dice']:.4f}), "
                f"non-positive Jacobian {m['model']['nonpositive_jacobian_pct']:.3f}% | image MSE "
                f"{m['model']['image_mse']:.5f} (identity {m['identity']['image_mse']:.5f}) | {self.num_pairs} pairs: "
                f"{verdict}")

    def as_dict(self) -> dict[str, Any]:
        clean = lambda v: None if isinstance(v, float) and math.isnan(v) else v  # noqa: E731
        return {"metrics": {g: {k: clean(v) for k, v in m.items()} for g, m in self.metrics.items()},
                "num_pairs": self.num_pairs, "dice_over_identity": self.margin,
                "beats_identity": self.beats_identity, "per_pair_dice": self.per_pair_dice}


class RegistrationValidator:
    """Dice of warped labels and folding on fixed held-out pairs, beside the identity (module doc).

    Args:
        pairs: items with ``fixed``, ``moving`` ``[1, D, H, W]`` float and ``fixed_label``, ``moving_label``
            ``[1, D, H, W]`` int class maps (e.g. ``[dataset[i] for i in range(N)]`` of a
            :class:`~medgauss.data.registration.SyntheticRegistrationPairs` of the held-out region).
        class_names: names of the classes, background first (``len`` = number of classes); default
            ``class_<k>`` for the classes found in the labels.
        batch_size: pairs per forward pass.

    Raises:
        ValueError: no pairs, a pair without labels, or inconsistent shapes (naming the pair).
    """

    def __init__(self, pairs: Sequence[Mapping[str, Any]], *, class_names: Sequence[str] | None = None,
                 batch_size: int = 1) -> None:
        if len(pairs) == 0:
            raise ValueError("pairs is empty: validation needs at least one labelled pair")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        stacks: dict[str, list[Tensor]] = {k: [] for k in ("fixed", "moving", "fixed_label", "moving_label")}
        for i, pair in enumerate(pairs):
            if pair.get("has_labels") is False or "fixed_label" not in pair or "moving_label" not in pair:
                raise ValueError(f"validation pair {i} has no labels (Dice validation needs fixed_label and "
                                 "moving_label)")
            for key in stacks:
                t = torch.as_tensor(pair[key])
                if t.ndim != 4 or t.shape[0] != 1:
                    raise ValueError(f"validation pair {i}: {key} must be [1, D, H, W], got {tuple(t.shape)}")
                stacks[key].append(t)
            if len({tuple(stacks[k][-1].shape) for k in stacks}) != 1:
                raise ValueError(f"validation pair {i}: fixed, moving and labels differ in shape "
                                 f"{[tuple(stacks[k][-1].shape) for k in stacks]}")
        self.fixed = torch.stack(stacks["fixed"]).float()
        self.moving = torch.stack(stacks["moving"]).float()
        self.fixed_label = torch.stack(stacks["fixed_label"]).long()
        self.moving_label = torch.stack(stacks["moving_label"]).long()
        found = int(max(self.fixed_label.max(), self.moving_label.max())) + 1
        if class_names is None:
            class_names = ["background", *(f"class_{k}" for k in range(1, found))]
        self.class_names = list(class_names)
        if len(self.class_names) < max(found, 2):
            raise ValueError(f"class_names names {len(self.class_names)} classes but the labels hold values up to "
                             f"{found - 1}")
        self.batch_size = batch_size
        self._identity: dict[str, Any] | None = None

    @property
    def num_pairs(self) -> int:
        return int(self.fixed.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _group(self, dice: Tensor, folding_pct: Tensor, mse: Tensor) -> tuple[dict[str, float], list[float]]:
        fg = dice[:, 1:]
        per_pair = torch.nanmean(fg, dim=1)  # NaN only if a pair has no foreground class at all
        metrics = {"dice": float(torch.nanmean(per_pair)),
                   "nonpositive_jacobian_pct": float(folding_pct.mean()),
                   "image_mse": float(mse.mean())}
        for k, name in enumerate(self.class_names[1:], start=1):
            metrics[f"dice_{name}"] = float(torch.nanmean(dice[:, k])) if bool((~dice[:, k].isnan()).any()) \
                else math.nan
        return metrics, [round(float(v), 4) for v in per_pair]

    def identity(self) -> dict[str, Any]:
        """The identity's metrics (computed once)."""
        if self._identity is None:
            dice = dice_per_class(self.moving_label, self.fixed_label, self.num_classes)
            mse = ((self.moving.double() - self.fixed.double()) ** 2).flatten(1).mean(1)
            metrics, per_pair = self._group(dice, torch.zeros(self.num_pairs, dtype=torch.float64), mse)
            self._identity = {"metrics": metrics, "per_pair": per_pair}
        return self._identity

    @torch.no_grad()
    def evaluate(self, model: nn.Module, *, final: bool = True) -> RegistrationReport:
        """Score ``model`` (left in the train / eval mode it came in) on every pair. ``final`` is accepted for the
        engine's protocol (every metric is computed at every call)."""
        core = _unwrapped(model)
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        dices, folds, mses = [], [], []
        try:
            for start in range(0, self.num_pairs, self.batch_size):
                sl = slice(start, start + self.batch_size)
                fixed, moving = self.fixed[sl].to(device), self.moving[sl].to(device)
                ddf = model(fixed, moving).float()
                warped = core.warp(moving, ddf).float().cpu()
                warped_label = core.warp(self.moving_label[sl].to(device), ddf, mode="nearest").cpu()
                dices.append(dice_per_class(warped_label, self.fixed_label[sl], self.num_classes))
                folds.append(100.0 * nonpositive_jacobian_fraction(ddf.double()).cpu())
                mses.append(((warped.double() - self.fixed[sl].double()) ** 2).flatten(1).mean(1))
        finally:
            model.train(was_training)
        metrics, per_pair = self._group(torch.cat(dices), torch.cat(folds), torch.cat(mses))
        ident = self.identity()
        return RegistrationReport({"model": metrics, "identity": dict(ident["metrics"])}, self.num_pairs,
                                  {"model": per_pair, "identity": list(ident["per_pair"])})
