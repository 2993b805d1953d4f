"""Simulation of measured CT projections: HU -> attenuation, line integrals, photon and electronic noise."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from medgauss.ct.projectors import forward_project
from medgauss.geometry import CircularGeometry

__all__ = ["MU_WATER", "ProjectionNoise", "hu_to_attenuation", "add_noise", "simulate_projections"]

# Linear attenuation of water at an effective energy of ~70 keV (NIST XCOM: 0.193 cm^2/g x 1 g/cm^3), per mm.
MU_WATER = 0.0193


def hu_to_attenuation(volume_hu: Tensor, mu_water: float = MU_WATER) -> Tensor:
    """Hounsfield units -> linear attenuation per mm: ``mu = mu_water (1 + HU / 1000)``, clamped at 0.

    Args:
        volume_hu: any-shape float tensor in HU (air -1000, water 0).
        mu_water: attenuation of water per mm at the simulated effective energy.
    """
    if not (math.isfinite(mu_water) and mu_water > 0):
        raise ValueError(f"mu_water must be a positive attenuation per mm, got {mu_water!r}")
    return (mu_water * (1.0 + volume_hu / 1000.0)).clamp_min(0.0)


@dataclass(frozen=True)
class ProjectionNoise:
    """Photon-counting noise model of a detector.

    Attributes:
        photons: incident photons per pixel ``I0`` (Poisson statistics); lower is noisier (1e5 is a
            typical low-noise simulation, 1e4 low-dose).
        electronic_std: standard deviation of additive Gaussian electronic noise, in photon counts.
    """

    photons: float = 1e5
    electronic_std: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.photons) and self.photons > 0):
            raise ValueError(f"photons (I0) must be positive, got {self.photons!r}")
        if not (math.isfinite(self.electronic_std) and self.electronic_std >= 0):
            raise ValueError(f"electronic_std must be >= 0 counts, got {self.electronic_std!r}")


def add_noise(
    projections: Tensor, noise: ProjectionNoise, *, seed: int | None = 0, scale: float = 1.0
) -> Tensor:
    """Noisy log-domain projections ``-log(N / I0) / scale``, ``N ~ Poisson(I0 exp(-scale p)) + N(0, s^2)``.

    Args:
        projections: ``[...]`` noiseless line integrals ``p`` (float).
        noise: the :class:`ProjectionNoise` model.
        seed: seed of a private generator (``None``: torch's global generator).
        scale: attenuation units per projection unit (use it when ``p`` is the projection of a
            normalised volume whose value 1 means ``scale`` per mm).

    Returns:
        Tensor like ``projections``; counts are clamped at 0.5 photons before the log, so fully
        absorbed rays stay finite.
    """
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be positive, got {scale!r}")
    gen = None
    if seed is not None:
        gen = torch.Generator(device=projections.device).manual_seed(int(seed))
    expected = noise.photons * torch.exp(-scale * projections.double())
    counts = torch.poisson(expected, generator=gen)
    if noise.electronic_std > 0:
        counts = counts + noise.electronic_std * torch.randn(
            counts.shape, generator=gen, dtype=counts.dtype, device=counts.device
        )
    noisy = -torch.log(counts.clamp_min(0.5) / noise.photons) / scale
    return noisy.to(projections.dtype)


def simulate_projections(
    volume_hu: Tensor,
    geometry: CircularGeometry,
    *,
    noise: ProjectionNoise | None = None,
    mu_water: float = MU_WATER,
    seed: int | None = 0,
    backend: str = "auto",
) -> Tensor:
    """Simulate log-domain CT projections of a HU volume.

    Args:
        volume_hu: ``[B, 1, D, H, W]`` Hounsfield units on ``geometry``'s volume grid (axes (z, y, x)).
        geometry: cone- or parallel-beam geometry.
        noise: ``None`` for noiseless line integrals, else a :class:`ProjectionNoise`.
        mu_water: water attenuation per mm (default :data:`MU_WATER`, ~70 keV).
        seed: noise seed (``None``: global generator).
        backend: projector backend (see :func:`medgauss.ct.forward_project`).

    Returns:
        ``[B, V, rows, cols]`` line integrals of ``mu = mu_water (1 + HU/1000)`` (dimensionless);
        ``B = 0`` gives an empty stack.
    """
    if not isinstance(volume_hu, Tensor) or not volume_hu.is_floating_point():
        raise ValueError(
            f"volume_hu must be a float tensor in HU, got {getattr(volume_hu, 'dtype', volume_hu)}"
        )
    if (
        isinstance(geometry, CircularGeometry)
        and volume_hu.dtype in (torch.float32, torch.float64)
        and tuple(volume_hu.shape) == (0, 1, *geometry.vol_shape)
    ):  # empty batch: empty projections, attached to the graph (other shapes are forward_project's to judge)
        hu_to_attenuation(volume_hu, mu_water)  # validates mu_water
        return volume_hu.reshape(0, *geometry.output_shape())
    proj = forward_project(hu_to_attenuation(volume_hu, mu_water), geometry, backend=backend)
    if noise is None:
        return proj
    return add_noise(proj, noise, seed=seed)
