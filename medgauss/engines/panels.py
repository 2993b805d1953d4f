"""PNG slice panels of masked pretraining: input, masked input, rendering (+ Gaussian centres), target."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: never needs a display; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

__all__ = ["save_slice_panel", "panel_from_output"]


def _check_volume(name: str, volume: Tensor) -> np.ndarray:
    if volume.ndim != 3:
        raise ValueError(f"{name} must be one volume [D, H, W], got shape {tuple(volume.shape)}")
    return volume.detach().float().cpu().numpy()


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
    """Write a 1x4 panel of the middle slice along array axis 2 (axial for RAS volumes).

    Columns: input; masked input (hidden voxels blanked); reconstruction, with the Gaussian centres lying
    within ``slab`` (normalised units) of the slice drawn as red dots; target (input where hidden, the
    region the masked loss scores; visible voxels greyed).

    Args:
        path: output PNG file (parent dirs are created).
        image: ``[D, H, W]`` input in [0, 1].
        hidden: ``[D, H, W]`` bool, True = voxel hidden from the encoder.
        reconstruction: ``[D, H, W]`` model output (dense splat / unpatchified prediction).
        centres: optional ``[N, 3]`` Gaussian means in normalised coordinates (axis order D, H, W).
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
    k = img.shape[2] // 2
    sl = lambda v: v[:, :, k].T  # rows = axis 1, columns = axis 0
    masked = np.where(mask, 0.0, img)
    target = np.where(mask, img, 0.5)
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.6))
    titles = ("input", "masked input", "rendered", "target (hidden voxels)")
    for ax, vol, name in zip(axes, (img, masked, rec, target), titles):
        ax.imshow(sl(vol), cmap="gray", vmin=0.0, vmax=1.0, origin="lower")
        ax.set_title(name)
        ax.set_axis_off()
    if centres is not None:
        c = centres.detach().float().cpu()
        if c.ndim != 2 or c.shape[1] != 3:
            raise ValueError(f"centres must be [N, 3], got shape {tuple(c.shape)}")
        z = (k + 0.5) / img.shape[2]
        near = (c[:, 2] - z).abs() <= slab
        pts = c[near].numpy()
        axes[2].scatter(
            pts[:, 0] * img.shape[0] - 0.5, pts[:, 1] * img.shape[1] - 0.5, s=4, c="red", alpha=0.7
        )
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
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
