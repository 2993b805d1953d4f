"""MedGMAE* residual levels: children Gaussians predicted as bounded residuals of a parent.

Level 0 holds the ``N0`` Gaussians of the query heads. Level ``l >= 1`` holds ``m_l`` children per
level-0 Gaussian (``m_l * N0`` in all); child ``j`` of parent ``i`` sits at index ``i * m_l + j``
of its level and is computed from the parent's query feature ``f_i`` and parameters:

    s^l  = keep_positive(s^0 + tanh(a) * sigma_scale - delta_l)
    mu^l = mu^0 + tanh(b) * sigma_mean
    I^l  = I^0 + tanh(c) * sigma_intensity
    q^l  = normalize(q^0 + tanh(d) * sigma_rotation)

with ``(a, b, c, d)`` (3 + 3 + 1 + 4 = 11 values per child) from one linear layer per level.
All values are in normalised volume units (scales and means as fractions of the crop edge).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import Tensor, nn

from medgauss.gaussians import Gaussians

__all__ = ["ResidualLevels", "keep_positive"]

_RAW_PER_CHILD = 11  # scale 3, mean 3, intensity 1, rotation 4


def keep_positive(scales: Tensor, min_scale: float) -> Tensor:
    """Smooth floor ``min_scale + softplus(s - min_scale, beta=1/min_scale)`` (same shape as ``scales``).

    Never below ``min_scale``, equal to ``s`` (to float precision) once ``s > ~30 * min_scale``, and
    with a non-zero gradient wherever it does not underflow (``s`` far below the floor)."""
    return min_scale + F.softplus(scales - min_scale, beta=1.0 / min_scale, threshold=30.0)


class ResidualLevels(nn.Module):
    """Predicts the residual levels 1.. of MedGMAE* from level-0 Gaussians and their query features.

    Args:
        dim: query feature width.
        children_per_level: ``(m_1, m_2, ...)`` children per level-0 Gaussian at each level.
        scale_offsets: ``(delta_1, delta_2, ...)`` subtracted from children's scales (finer levels smaller).
        sigma_scale, sigma_mean, sigma_intensity, sigma_rotation: residual bounds (tanh amplitudes).
        min_scale: positivity floor of children's scales (see :func:`keep_positive`).
    """

    def __init__(self, dim: int, children_per_level: Sequence[int], scale_offsets: Sequence[float],
                 sigma_scale: float = 0.1, sigma_mean: float = 0.05, sigma_intensity: float = 0.1,
                 sigma_rotation: float = 0.1, min_scale: float = 2e-3) -> None:
        super().__init__()
        self.children_per_level = tuple(int(m) for m in children_per_level)
        self.scale_offsets = tuple(float(d) for d in scale_offsets)
        if len(self.children_per_level) != len(self.scale_offsets):
            raise ValueError(f"children_per_level {self.children_per_level} and scale_offsets "
                             f"{self.scale_offsets} must have the same length (one entry per residual level)")
        if any(m < 1 for m in self.children_per_level):
            raise ValueError(f"children_per_level entries must be >= 1, got {self.children_per_level}")
        if not min_scale > 0:
            raise ValueError(f"min_scale must be positive, got {min_scale}")
        self.sigma_scale, self.sigma_mean = float(sigma_scale), float(sigma_mean)
        self.sigma_intensity, self.sigma_rotation = float(sigma_intensity), float(sigma_rotation)
        self.min_scale = float(min_scale)
        self.heads = nn.ModuleList([nn.Linear(dim, m * _RAW_PER_CHILD) for m in self.children_per_level])
        for head in self.heads:  # small random residuals: children start near (not on) their parent
            trunc_normal_(head.weight, std=0.02)
            nn.init.zeros_(head.bias)

    def level(self, index: int, parents: Gaussians, features: Tensor) -> Gaussians:
        """Level ``index + 1``: ``[B, N0 * m]`` children of ``parents`` (``[B, N0]``) computed from
        their query ``features [B, N0, dim]``."""
        m = self.children_per_level[index]
        b, n0 = parents.batch_size, parents.num_gaussians
        raw = torch.tanh(self.heads[index](features)).reshape(b, n0, m, _RAW_PER_CHILD)
        d_scale, d_mean, d_int, d_rot = raw.split([3, 3, 1, 4], dim=-1)
        scales = keep_positive(parents.scales[:, :, None] + d_scale * self.sigma_scale
                               - self.scale_offsets[index], self.min_scale)
        means = parents.means[:, :, None] + d_mean * self.sigma_mean
        intensities = parents.intensities[:, :, None] + d_int[..., 0] * self.sigma_intensity
        quats = F.normalize(parents.quats[:, :, None] + d_rot * self.sigma_rotation, dim=-1, eps=1e-8)
        return Gaussians(means.reshape(b, n0 * m, 3), scales.reshape(b, n0 * m, 3),
                         quats.reshape(b, n0 * m, 4), intensities.reshape(b, n0 * m), validate=False)

    def forward(self, parents: Gaussians, features: Tensor) -> list[Gaussians]:
        """Every residual level, finest last (level 0 itself not included)."""
        return [self.level(i, parents, features) for i in range(len(self.heads))]
