"""PNG slice panels of masked pretraining: input, masked input, rendering (+ Gaussian centres), target."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

__all__ = ["axial_display", "save_slice_panel", "panel_from_output", "save_figure"]


def _check_volume(name: str, volume: Tensor) -> np.ndarray:
    if volume.ndim != 3:
        raise ValueError(f"{name} must be one volume [D, H, W], got shape {tuple(volume.shape)}")
    return volume.detach().float().cpu().numpy()


def axial_display(volume: np.ndarray, index: int) -> np.ndarray:
    """Axial slice ``index`` of a ``[D, H, W]`` volume as displayed: ``[H, W]`` with row 0 the most
    anterior row and column 0 the patient's right-most column (radiological convention)."""
    return volume[index, ::-1, ::-1]


def save_slice_panel(
    path: str | Path,
    image: Tensor,
    hidden: Tensor,
    reconstruction: Tensor,
    *,
    centres: Tensor | None = None,
    slab: float = 0.05,
    title: str = "",
) -> Path:
    """Write a 1x4 panel of the middle axial slice (array axis 0, :mod:`medgauss.frame`).

    Shown in radiological convention: anterior at the top, the patient's right on the left of the
    image (:func:`axial_display`). Drawn on its own Agg canvas, so it never changes matplotlib's global
    backend (a notebook user's plots are left alone) and needs no display.

    Columns: input; masked input (hidden voxels blanked); reconstruction, with the Gaussian centres
    lying within ``slab`` (normalised units) of the slice drawn as red dots; target (input where
    hidden, the region the masked loss scores; visible voxels greyed).

    Args:
        path: output PNG file (parent dirs are created).
        image: ``[D, H, W]`` input in [0, 1].
        hidden: ``[D, H, W]`` bool, True = voxel hidden from the encoder.
        reconstruction: ``[D, H, W]`` model output (dense splat / unpatchified prediction).
        centres: optional ``[N, 3]`` Gaussian means in normalised coordinates (axis order D, H, W, i.e. z, y, x).
        slab: half-thickness of the slab around the slice whose centres are drawn.
        title: figure title.

    Returns:
        ``path``.
    """
    img, rec = _check_volume("image", image), _check_volume("reconstruction", reconstruction)
    mask = _check_volume("hidden", hidden.bool()) > 0.5
    if not img.shape == rec.shape == mask.shape:
        raise ValueError(
            f"image, hidden, reconstruction shapes differ: {img.shape}, {mask.shape}, {rec.shape}"
        )
    k = img.shape[0] // 2
    sl = lambda v: axial_display(v, k)
    masked = np.where(mask, 0.0, img)
    target = np.where(mask, img, 0.5)
    fig = Figure(figsize=(13, 3.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 4)
    titles = ("input", "masked input", "rendered", "target (hidden voxels)")
    for ax, vol, name in zip(axes, (img, masked, rec, target), titles):
        ax.imshow(sl(vol), cmap="gray", vmin=0.0, vmax=1.0)
        ax.set_title(name)
        ax.set_axis_off()
    if centres is not None:
        c = centres.detach().float().cpu()
        if c.ndim != 2 or c.shape[1] != 3:
            raise ValueError(f"centres must be [N, 3], got shape {tuple(c.shape)}")
        z = (k + 0.5) / img.shape[0]
        near = (c[:, 0] - z).abs() <= slab
        pts = c[near].numpy()
        _, rows, cols = img.shape
        axes[2].scatter(
            (cols - 1) - (pts[:, 2] * cols - 0.5), (rows - 1) - (pts[:, 1] * rows - 0.5), s=4, c="red", alpha=0.7
        )
    return save_figure(fig, path, title)


def save_figure(fig: Figure, path: str | Path, title: str | None = None) -> Path:
    """Title, tighten and write a panel figure to ``path`` (parent folders created), 80 dpi; returns the path."""
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    return path


def panel_from_output(model: torch.nn.Module, out, images: Tensor) -> dict[str, Tensor | None]:
    """Pieces of a panel for sample 0 of a batch, from a pretraining model's forward output.

    Uses the contract's ``model.reconstruct(out, images.shape)`` and ``model.mask_to_volume(out.mask)``;
    Gaussian centres come from ``out.gaussians.means`` when the model predicts Gaussians.

    Returns:
        ``{"image": [D,H,W], "hidden": [D,H,W] bool, "reconstruction": [D,H,W], "centres": [N,3] | None}``.
    """
    with torch.no_grad():
        rec = model.reconstruct(out, tuple(images.shape))
        hidden = model.mask_to_volume(out.mask)
    gaussians = getattr(out, "gaussians", None)
    centres = gaussians.means[0] if gaussians is not None else None
    return {"image": images[0, 0], "hidden": hidden[0, 0], "reconstruction": rec[0, 0], "centres": centres}
