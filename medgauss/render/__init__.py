"""Differentiable rendering of Gaussians: volumetric splatting and X-ray projection."""

from medgauss.dispatch import BACKENDS, available_backends, resolve_backend
from medgauss.render.api import splat
from medgauss.render.xray import project

__all__ = ["splat", "project", "BACKENDS", "available_backends", "resolve_backend"]
