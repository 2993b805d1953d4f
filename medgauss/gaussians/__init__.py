"""Gaussians: the container every part of medgauss passes around, and its coordinate frames."""

from medgauss.gaussians.container import Gaussians
from medgauss.gaussians.coords import (
    gaussians_to_normalized,
    gaussians_to_world,
    normalized_to_voxel_matrix,
    normalized_to_world_matrix,
    transform_gaussians,
    transform_points,
)
from medgauss.gaussians.fit import DEFAULT_FIT_LR, FitResult, fit_gaussians_to_volume, init_gaussians_from_volume
from medgauss.gaussians.quaternions import normalize_quat, quat_multiply, quat_to_rotmat, rotmat_to_quat

__all__ = [
    "Gaussians",
    "gaussians_to_normalized",
    "gaussians_to_world",
    "normalized_to_voxel_matrix",
    "normalized_to_world_matrix",
    "transform_gaussians",
    "transform_points",
    "normalize_quat",
    "quat_multiply",
    "quat_to_rotmat",
    "rotmat_to_quat",
    "DEFAULT_FIT_LR",
    "FitResult",
    "fit_gaussians_to_volume",
    "init_gaussians_from_volume",
]
