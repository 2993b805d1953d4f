"""``reconstruct_3dgr``: FDK, an initialiser, then :class:`GaussianReconstructor`, as one call and as the
``3dgr`` method of ``medgauss-reconstruct``.

The command line::

    medgauss-reconstruct --method 3dgr --case CASE --views 80 --out vol.nii.gz --out-gaussians g.safetensors \\
        --opt init=decoder --checkpoint runs/pretrain --opt iterations=1000

The inits (``--opt init=...``):
- ``fbp``: 3DGR-CT's gradient-ranked FBP voxels;
- ``r2``: R²-Gaussian's thresholded FDK samples;
- ``random``;
- ``volume_fit``: Gaussians fitted to the FDK volume by splatting;
- ``decoder``: a pretrained MedGMAE / MedGMAE* run over windows of the FDK volume. It needs ``--checkpoint``:
  a pretraining run folder, or its ``model/`` export.

Every option of :func:`reconstruct_3dgr` after ``geometry`` is an ``--opt``. The method's seconds include the
FDK and the initialiser.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from medgauss.ct import fdk
from medgauss.gaussians import Gaussians
from medgauss.geometry import CircularGeometry
from medgauss.recon.gaussian import init as inits
from medgauss.recon.gaussian.density import DensityControl
from medgauss.recon.gaussian.reconstructor import FitRecord, GaussianReconConfig, GaussianReconstructor
from medgauss.recon.registry import MethodOutput, register_method

__all__ = ["INITS", "Reconstruction3DGR", "initial_gaussians", "reconstruct_3dgr"]

INITS = ("fbp", "r2", "random", "volume_fit", "decoder")


@dataclass
class Reconstruction3DGR:
    """What :func:`reconstruct_3dgr` made.

    Attributes:
        volume: ``[1, 1, D, H, W]`` the splat of the fitted Gaussians on the geometry's grid.
        gaussians: ``[1, N]`` fitted Gaussians, world mm of the geometry.
        initial: ``[1, N0]`` the initialiser's Gaussians.
        history: the fit's :class:`FitRecord` list (iteration 0 is the initial state).
        init_seconds: FDK + initialiser wall time; fit_seconds: the fit's (evaluations excluded).
    """

    volume: Tensor
    gaussians: Gaussians
    initial: Gaussians
    history: list[FitRecord] = field(default_factory=list)
    init_seconds: float = 0.0
    fit_seconds: float = 0.0


def initial_gaussians(
    init: str,
    projections: Tensor,
    geometry: CircularGeometry,
    *,
    num_gaussians: int = 4096,
    checkpoint: str | Path | None = None,
    fbp_volume: Tensor | None = None,
    seed: int = 0,
    fbp_threshold: float = 0.05,
    volume_fit_iterations: int = 200,
    volume_hu_min: float = -1000.0,
    volume_hu_max: float = 2000.0,
    decoder_stride: int | None = None,
) -> Gaussians:
    """The ``init`` initialiser's ``[1, N]`` world-mm Gaussians for ``projections`` ``[1, V, rows, cols]``.

    ``fbp_volume`` (``[1, 1, D, H, W]``) is computed by FDK when not given. ``num_gaussians`` applies to every
    init but ``decoder``, whose count is the model's Gaussians per window times the windows kept.
    """
    from medgauss.recon.gaussian import decoder_init  # loads the network stack: only when a decoder is used

    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if init == "decoder" and checkpoint is None:
        raise ValueError("init='decoder' needs --checkpoint DIR (a MedGMAE pretraining run or its model/ export)")
    if init != "decoder" and checkpoint is not None:
        raise ValueError(f"--checkpoint is used by init='decoder' only, not init={init!r}; drop it")
    if init == "random":
        return inits.init_random(geometry, num_gaussians=num_gaussians, seed=seed,
                                 volume=fbp_volume if fbp_volume is not None else fdk(projections, geometry))
    volume = fdk(projections, geometry) if fbp_volume is None else fbp_volume
    if init in ("fbp", "r2"):
        recipe = "3dgr" if init == "fbp" else "r2"
        return inits.init_from_fbp(volume, geometry, num_gaussians=num_gaussians, recipe=recipe,
                                   threshold=fbp_threshold, seed=seed)
    if init == "volume_fit":
        return inits.init_from_volume_fit(volume, geometry, num_gaussians=num_gaussians,
                                          iterations=volume_fit_iterations, seed=seed)
    return decoder_init.init_from_decoder(volume, geometry, Path(checkpoint),  # type: ignore[arg-type]
                                          volume_hu_window=(volume_hu_min, volume_hu_max), stride=decoder_stride)


def reconstruct_3dgr(
    projections: Tensor,
    geometry: CircularGeometry,
    *,
    init: str = "fbp",
    checkpoint: str | Path | None = None,
    num_gaussians: int = 4096,
    iterations: int = 1000,
    route: str = "auto",
    views_per_step: int | None = 8,
    loss: str = "l1",
    lambda_dssim: float = 0.25,
    lambda_tv: float = 0.0,
    lr_means: float = 2e-3,
    lr_means_final: float = 2e-6,
    lr_intensities: float = 0.05,
    lr_scales: float = 0.005,
    lr_quats: float = 0.001,
    densify_every: int = 100,
    densify_from: int = 100,
    densify_until: int | None = None,
    max_gaussians: int | None = None,
    seed: int = 0,
    fbp_threshold: float = 0.05,
    volume_fit_iterations: int = 200,
    volume_hu_min: float = -1000.0,
    volume_hu_max: float = 2000.0,
    decoder_stride: int | None = None,
    progress: bool = False,
    reference: Tensor | None = None,
    data_range: float = 1.0,
    eval_every: int = 0,
    checkpoint_dir: str | Path | None = None,
) -> Reconstruction3DGR:
    """Per-case Gaussian reconstruction of ``projections`` ``[1, V, rows, cols]`` measured with ``geometry``.

    Args:
        init: initialiser, one of :data:`INITS`, with ``num_gaussians`` Gaussians (not ``decoder``) and
            ``checkpoint`` (``decoder`` only). The options ``fbp_threshold``, ``volume_fit_iterations``,
            ``volume_hu_min`` / ``volume_hu_max`` (the HU window that the volume's units [0, 1] stand for,
            ``medgauss-prepare-ct``'s default) and ``decoder_stride`` go to it.
        iterations ... lr_quats: :class:`GaussianReconConfig`.
        densify_every, densify_from, densify_until, max_gaussians: :class:`DensityControl`'s ``every``,
            ``start``, ``stop``, ``max_gaussians`` (``densify_every=0`` disables density control).
        progress: show a progress bar.
        reference, data_range, eval_every: PSNR / SSIM logging against a ground truth volume.
        checkpoint_dir: fit checkpoints there (resumed when present).

    Returns:
        :class:`Reconstruction3DGR`.
    """
    density = DensityControl(every=densify_every, start=densify_from, stop=densify_until,
                             max_gaussians=max_gaussians)
    config = GaussianReconConfig(iterations=iterations, route=route, views_per_step=views_per_step, loss=loss,
                                 lambda_dssim=lambda_dssim, lambda_tv=lambda_tv, lr_means=lr_means,
                                 lr_means_final=lr_means_final, lr_intensities=lr_intensities, lr_scales=lr_scales,
                                 lr_quats=lr_quats, density=density, eval_every=eval_every, seed=seed)
    with torch.enable_grad():  # the volume fit and the reconstructor optimise, also under run_method's no_grad
        return _reconstruct(projections, geometry, config, init=init, checkpoint=checkpoint,
                            num_gaussians=num_gaussians, seed=seed, fbp_threshold=fbp_threshold,
                            volume_fit_iterations=volume_fit_iterations, volume_hu_min=volume_hu_min,
                            volume_hu_max=volume_hu_max, decoder_stride=decoder_stride, progress=progress,
                            reference=reference, data_range=data_range, checkpoint_dir=checkpoint_dir)


def _reconstruct(projections: Tensor, geometry: CircularGeometry, config: GaussianReconConfig, *, init: str,
                 checkpoint: str | Path | None, progress: bool, reference: Tensor | None, data_range: float,
                 checkpoint_dir: str | Path | None, **init_options: Any) -> Reconstruction3DGR:
    start = time.perf_counter()
    initial = initial_gaussians(init, projections, geometry, checkpoint=checkpoint, **init_options)
    init_seconds = time.perf_counter() - start
    reconstructor = GaussianReconstructor(projections, geometry, initial, config, reference=reference,
                                          data_range=data_range)
    history = reconstructor.fit(checkpoint_dir=checkpoint_dir, progress=progress)
    return Reconstruction3DGR(reconstructor.volume(), reconstructor.gaussians, initial, history, init_seconds,
                              reconstructor.seconds)


_NOT_OPTIONS = ("checkpoint", "reference", "data_range", "eval_every", "checkpoint_dir", "progress")


@register_method("3dgr", options_from=reconstruct_3dgr, exclude=_NOT_OPTIONS, checkpoint_classes=("GaussianMAE",),
                 checkpoint_optional=True, makes_gaussians=True,
                 description="per-case Gaussian reconstruction (3DGR) from an fbp / r2 / random / volume_fit / "
                             "decoder initialisation")
def method_3dgr(projections: Tensor, geometry: CircularGeometry, options: dict[str, Any],
                checkpoint: Path | None) -> MethodOutput:
    """The ``3dgr`` method: :func:`reconstruct_3dgr` -> volume and fitted Gaussians."""
    result = reconstruct_3dgr(projections, geometry, checkpoint=checkpoint, **options)
    info = {"initial_gaussians": result.initial.num_gaussians, "gaussians": result.gaussians.num_gaussians,
            "iterations": result.history[-1].iteration if result.history else 0,
            "init_seconds": result.init_seconds, "fit_seconds": result.fit_seconds}
    return MethodOutput(result.volume, result.gaussians, info)
