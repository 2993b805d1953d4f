"""CT imaging physics on voxel volumes: projectors, simulation, FDK / SART / ASD-POCS.

Volumes are ``[B, 1, D, H, W]`` linear attenuation per mm on a geometry's grid (axes z, y, x);
projections are ``[B, V, rows, cols]`` line integrals (see :mod:`medgauss.geometry`).
"""

from medgauss.ct.dataset import CTReconstructionDataset, collate_cases, load_case
from medgauss.ct.fdk import WINDOWS, angular_weights, fdk, filter_projections, ramp_filter
from medgauss.ct.iterative import asd_pocs, sart, total_variation
from medgauss.ct.prepare import PrepareConfig, prepare_dataset
from medgauss.ct.projectors import back_project, forward_project
from medgauss.ct.simulate import MU_WATER, ProjectionNoise, add_noise, hu_to_attenuation, simulate_projections

__all__ = [
    "forward_project",
    "back_project",
    "MU_WATER",
    "ProjectionNoise",
    "hu_to_attenuation",
    "add_noise",
    "simulate_projections",
    "WINDOWS",
    "ramp_filter",
    "filter_projections",
    "angular_weights",
    "fdk",
    "sart",
    "asd_pocs",
    "total_variation",
    "PrepareConfig",
    "prepare_dataset",
    "CTReconstructionDataset",
    "load_case",
    "collate_cases",
]
