"""The optimised parameters of per-case Gaussian reconstruction and their map to world-mm Gaussians.

Adam sees unconstrained tensors in a *scene frame* whose units do not depend on the scanner's millimetres
or the projections' units, so one set of learning rates (3DGR-CT's) fits every case:

* ``means``: ``(x - centre) / extent``, the reconstruction box centred and scaled to an edge of about 1
  (``extent`` = the box's longest edge in mm);
* ``log_scales``: ``log(scale / extent)`` per axis;
* ``quats``: raw quaternions (w, x, y, z), normalised by :class:`~medgauss.gaussians.Gaussians`;
* ``raw_intensities``: ``intensity = amplitude * softplus(raw)``, non-negative (attenuation is), with
  ``amplitude`` fixed per case (the largest initial intensity), so a learning rate is a relative step.

The same idea as R²-Gaussian's and 3DGS's activations (log-scales, raw quaternions, softplus densities);
the code is ours.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from medgauss.gaussians import Gaussians
from medgauss.geometry import CircularGeometry

__all__ = ["PARAM_NAMES", "SceneFrame", "GaussianParameters"]

PARAM_NAMES = ("means", "log_scales", "quats", "raw_intensities")
_RAW_FLOOR = 1e-6  # smallest intensity / amplitude mapped back through softplus^-1 (its -inf is at 0)


def _softplus_inverse(y: Tensor) -> Tensor:
    y = y.clamp_min(_RAW_FLOOR)
    return y + torch.log(-torch.expm1(-y))


@dataclass(frozen=True)
class SceneFrame:
    """World mm <-> scene units: ``x_scene = (x_world - centre) / extent``.

    Attributes:
        centre: world (x, y, z) mm of the reconstruction box's centre.
        extent: the box's longest edge, mm.
        amplitude: intensity of raw value ``softplus^-1(1)`` (volume units).
    """

    centre: tuple[float, float, float]
    extent: float
    amplitude: float

    @classmethod
    def of(cls, geometry: CircularGeometry, amplitude: float) -> SceneFrame:
        corners = geometry.volume_corners()
        lo, hi = corners.min(dim=0).values, corners.max(dim=0).values
        centre = tuple(float(v) for v in (lo + hi) / 2)
        extent = float((hi - lo).max())
        if not (math.isfinite(amplitude) and amplitude > 0):
            raise ValueError(f"intensity amplitude must be a positive finite number, got {amplitude}")
        return cls(centre, extent, float(amplitude))  # type: ignore[arg-type]

    def as_dict(self) -> dict[str, object]:
        return {"centre": list(self.centre), "extent": self.extent, "amplitude": self.amplitude}


class GaussianParameters:
    """The four leaf tensors Adam optimises (``[N, 3]``, ``[N, 3]``, ``[N, 4]``, ``[N]``) for one case."""

    def __init__(self, tensors: dict[str, Tensor], frame: SceneFrame) -> None:
        missing = set(PARAM_NAMES) - set(tensors)
        if missing:
            raise ValueError(f"parameters lack {sorted(missing)}")
        n = tensors["means"].shape[0]
        for name, width in zip(PARAM_NAMES, (3, 3, 4, None)):
            t = tensors[name]
            want = (n,) if width is None else (n, width)
            if tuple(t.shape) != want:
                raise ValueError(f"parameter {name} must have shape {want}, got {tuple(t.shape)}")
        self.tensors = {k: tensors[k].detach().clone().requires_grad_(True) for k in PARAM_NAMES}
        self.frame = frame

    @classmethod
    def from_gaussians(cls, gaussians: Gaussians, frame: SceneFrame, dtype: torch.dtype) -> GaussianParameters:
        """Scene-frame parameters of ``B = 1`` world-mm Gaussians (any ``linear_map`` folded in)."""
        if gaussians.batch_size != 1:
            raise ValueError(f"initial Gaussians must have batch size 1, got {gaussians.batch_size}")
        g = gaussians.canonical().detach().to(dtype=dtype)
        centre = torch.tensor(frame.centre, dtype=dtype, device=g.device)
        intens = g.intensities[0].clamp_min(0) / frame.amplitude
        return cls({
            "means": (g.means[0] - centre) / frame.extent,
            "log_scales": torch.log(g.scales[0] / frame.extent),
            "quats": g.quats[0],
            "raw_intensities": _softplus_inverse(intens),
        }, frame)

    @property
    def count(self) -> int:
        return int(self.tensors["means"].shape[0])

    def gaussians(self) -> Gaussians:
        """``[1, N]`` world-mm Gaussians, differentiable in every parameter."""
        t = self.tensors
        centre = torch.tensor(self.frame.centre, dtype=t["means"].dtype, device=t["means"].device)
        return Gaussians(
            (t["means"] * self.frame.extent + centre)[None],
            (torch.exp(t["log_scales"]) * self.frame.extent)[None],
            t["quats"][None],
            (self.frame.amplitude * F.softplus(t["raw_intensities"]))[None],
            validate=False,
        )

    def intensities(self) -> Tensor:
        """``[N]`` intensities (volume units), detached."""
        return (self.frame.amplitude * F.softplus(self.tensors["raw_intensities"])).detach()

    def scales_scene(self) -> Tensor:
        """``[N, 3]`` scales in scene units (fractions of the box's longest edge), detached."""
        return torch.exp(self.tensors["log_scales"]).detach()
