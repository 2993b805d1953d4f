"""Cone- and parallel-beam CT geometry in millimetres: rays, projection matrices, Plücker embeddings.

See :mod:`medgauss.geometry.circular` for the conventions (the geometry contract).
"""

from medgauss.geometry.circular import (
    CircularGeometry,
    ConeBeamGeometry,
    ParallelBeamGeometry,
    geometry_from_json,
)

__all__ = ["CircularGeometry", "ConeBeamGeometry", "ParallelBeamGeometry", "geometry_from_json"]
