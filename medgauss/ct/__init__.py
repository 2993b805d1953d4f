"""CT imaging physics on voxel volumes: projectors, simulation, FDK / SART / ASD-POCS."""

from medgauss.ct.projectors import back_project, forward_project

__all__ = ["forward_project", "back_project"]
