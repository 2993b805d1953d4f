"""Shared by the X-GRM tests (test_xgrm, test_ilrm, test_xgrm_lrm_parts): a small, deliberately asymmetric
cone-beam geometry, a forward call from a geometry, and a weight perturbation."""

from __future__ import annotations

import math

import numpy as np
import torch

from medgauss.geometry import ConeBeamGeometry
from medgauss.nets import XGRM, XGRMOutput

VOL_SHAPE = (6, 7, 5)


def rotation_z(angle: float, translation=(0.0, 0.0, 0.0)) -> np.ndarray:
    """A 4x4 rigid pose: rotation by ``angle`` about world z, then ``translation`` (mm)."""
    c, s = math.cos(angle), math.sin(angle)
    pose = np.eye(4)
    pose[:2, :2] = [[c, -s], [s, c]]
    pose[:3, 3] = translation
    return pose


def cone(num_views: int, seed: int = 0, posed: bool = False, **changes) -> ConeBeamGeometry:
    """``num_views`` random angles, anisotropic voxels on ``VOL_SHAPE``, detector and volume offsets;
    ``posed=True`` adds a small rigid pose per view; ``changes`` replace constructor arguments."""
    gen = torch.Generator().manual_seed(seed)
    angles = torch.rand(num_views, generator=gen, dtype=torch.float64) * 2 * math.pi
    fields = dict(dso=300.0, dsd=450.0, det_shape=(32, 32), det_spacing=(2.0, 1.8), vol_shape=VOL_SHAPE,
                  vol_spacing=(3.0, 2.5, 2.0), angles=angles, det_offset=(0.7, -1.1), vol_offset=(1.5, -2.0, 3.0))
    if posed:
        fields["poses"] = np.stack([rotation_z(0.05 * (i + 1), (0.5 * i, -0.3, 0.2 * i)) for i in range(num_views)])
    fields.update(changes)
    return ConeBeamGeometry(**fields)


def run(model: XGRM, geometry, projections, **kwargs) -> XGRMOutput:
    """``model`` on ``projections`` with the inputs built from ``geometry``."""
    return model(projections, **model.geometry_inputs(geometry), **kwargs)


def perturb(model: torch.nn.Module, std: float = 0.02) -> None:
    """Add seeded Gaussian noise to every parameter (so zero-initialised paths act)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn(p.shape, generator=gen))
