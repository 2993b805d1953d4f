"""Per-case Gaussian CT reconstruction (3DGR): fit 3D Gaussians in world mm to one patient's projections.

- :mod:`~medgauss.recon.gaussian.reconstructor`: :class:`GaussianReconstructor` (two render routes, Adam with
  3DGR-CT's per-parameter rates, L1/MSE + D-SSIM + TV, checkpoints and exact resume);
- :mod:`~medgauss.recon.gaussian.density`: adaptive density control (clone, split, prune, bounded count);
- :mod:`~medgauss.recon.gaussian.init`: :func:`init_from_fbp` (3DGR-CT / R²-Gaussian), :func:`init_random`,
  :func:`init_from_volume_fit`;
- :mod:`~medgauss.recon.gaussian.decoder_init`: :func:`init_from_decoder`, zero-shot Gaussians from a
  pretrained MedGMAE / MedGMAE* run over windows of the FDK volume;
- :mod:`~medgauss.recon.gaussian.method`: :func:`reconstruct_3dgr`, all of it in one call, registered as the
  ``3dgr`` method of ``medgauss-reconstruct``.

The decoder initialiser is imported from its module (``from medgauss.recon.gaussian.decoder_init import
init_from_decoder``), so that importing the reconstruction methods does not load the network stack.
"""

from medgauss.recon.gaussian.density import DensityControl, DensityReport
from medgauss.recon.gaussian.init import init_from_fbp, init_from_volume_fit, init_random
from medgauss.recon.gaussian.method import INITS, Reconstruction3DGR, initial_gaussians, reconstruct_3dgr
from medgauss.recon.gaussian.reconstructor import FitRecord, GaussianReconConfig, GaussianReconstructor, splat_world

__all__ = [
    "GaussianReconstructor",
    "GaussianReconConfig",
    "FitRecord",
    "DensityControl",
    "DensityReport",
    "splat_world",
    "init_from_fbp",
    "init_random",
    "init_from_volume_fit",
    "INITS",
    "Reconstruction3DGR",
    "initial_gaussians",
    "reconstruct_3dgr",
]
