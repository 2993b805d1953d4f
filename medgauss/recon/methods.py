"""The built-in reconstruction methods of ``medgauss-reconstruct``: FDK, SART and ASD-POCS.

Each wraps the function of :mod:`medgauss.ct` of the same name; its ``--opt`` options are that
function's keyword arguments (``initial``, a starting volume, is not an option). None takes a
checkpoint. Learned methods register the same way, in their own module, with ``checkpoint_classes``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from medgauss.ct import asd_pocs, fdk, sart
from medgauss.geometry import CircularGeometry
from medgauss.recon.registry import register_method

__all__ = ["reconstruct_fdk", "reconstruct_sart", "reconstruct_asd_pocs"]


@register_method("fdk", options_from=fdk, description="FDK (cone beam) / FBP (parallel beam), analytic")
def reconstruct_fdk(
    projections: Tensor, geometry: CircularGeometry, options: dict[str, Any], checkpoint: Path | None
) -> Tensor:
    """:func:`medgauss.ct.fdk` of ``projections`` ``[1, K, rows, cols]`` -> ``[1, 1, D, H, W]``."""
    return fdk(projections, geometry, **options)


@register_method("sart", options_from=sart, exclude=("initial",), description="ordered-subset SART")
def reconstruct_sart(
    projections: Tensor, geometry: CircularGeometry, options: dict[str, Any], checkpoint: Path | None
) -> Tensor:
    """:func:`medgauss.ct.sart` of ``projections`` ``[1, K, rows, cols]`` from zeros -> ``[1, 1, D, H, W]``."""
    return sart(projections, geometry, **options)


@register_method("asd_pocs", options_from=asd_pocs, exclude=("initial",), description="ASD-POCS (TV-regularised SART)")
def reconstruct_asd_pocs(
    projections: Tensor, geometry: CircularGeometry, options: dict[str, Any], checkpoint: Path | None
) -> Tensor:
    """:func:`medgauss.ct.asd_pocs` of ``projections`` ``[1, K, rows, cols]`` from zeros -> ``[1, 1, D, H, W]``."""
    return asd_pocs(projections, geometry, **options)
