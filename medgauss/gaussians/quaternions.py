"""Quaternion and rotation helpers. Quaternions are (w, x, y, z), Hamilton convention.

All functions are differentiable and work on arbitrary leading batch dimensions ``[..., 4]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["quat_to_rotmat", "rotmat_to_quat", "quat_multiply", "normalize_quat"]


def normalize_quat(quats: Tensor, eps: float = 1e-12) -> Tensor:
    """Scale quaternions ``[..., 4]`` to unit norm (a zero quaternion stays zero, not NaN)."""
    return quats / quats.norm(dim=-1, keepdim=True).clamp_min(eps)


def quat_to_rotmat(quats: Tensor) -> Tensor:
    """Rotation matrices ``[..., 3, 3]`` of unit quaternions ``[..., 4]`` (w, x, y, z).

    Columns of the result are the Gaussian's own axes expressed in the outer frame, so a
    covariance is ``R @ diag(s**2) @ R.T``.
    """
    w, x, y, z = quats.unbind(-1)
    xx, yy, zz = x * x, y * y, z * z
    xy, xz, yz = x * y, x * z, y * z
    wx, wy, wz = w * x, w * y, w * z
    rows = (
        torch.stack((1 - 2 * (yy + zz), 2 * (xy - wz), 2 * (xz + wy)), dim=-1),
        torch.stack((2 * (xy + wz), 1 - 2 * (xx + zz), 2 * (yz - wx)), dim=-1),
        torch.stack((2 * (xz - wy), 2 * (yz + wx), 1 - 2 * (xx + yy)), dim=-1),
    )
    return torch.stack(rows, dim=-2)


def quat_multiply(a: Tensor, b: Tensor) -> Tensor:
    """Hamilton product ``a ⊗ b`` of quaternions ``[..., 4]`` (rotation ``b`` first, then ``a``)."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack(
        (
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ),
        dim=-1,
    )


def rotmat_to_quat(rotmats: Tensor) -> Tensor:
    """Unit quaternions ``[..., 4]`` (w >= 0) of proper rotation matrices ``[..., 3, 3]``.

    Uses the numerically stable branch (largest of w, x, y, z) per matrix.
    """
    m = rotmats
    m00, m11, m22 = m[..., 0, 0], m[..., 1, 1], m[..., 2, 2]
    candidates = torch.stack(
        (
            1 + m00 + m11 + m22,  # 4 w^2
            1 + m00 - m11 - m22,  # 4 x^2
            1 - m00 + m11 - m22,  # 4 y^2
            1 - m00 - m11 + m22,  # 4 z^2
        ),
        dim=-1,
    )
    best = candidates.argmax(dim=-1, keepdim=True)
    # Each branch recovers the whole quaternion from one well-conditioned component.
    r = torch.sqrt(candidates.clamp_min(1e-12))  # 2 * |component|
    d10, d01 = m[..., 1, 0], m[..., 0, 1]
    d20, d02 = m[..., 2, 0], m[..., 0, 2]
    d21, d12 = m[..., 2, 1], m[..., 1, 2]
    from_w = torch.stack((r[..., 0] / 2, (d21 - d12) / (2 * r[..., 0]), (d02 - d20) / (2 * r[..., 0]),
                          (d10 - d01) / (2 * r[..., 0])), dim=-1)
    from_x = torch.stack(((d21 - d12) / (2 * r[..., 1]), r[..., 1] / 2, (d01 + d10) / (2 * r[..., 1]),
                          (d02 + d20) / (2 * r[..., 1])), dim=-1)
    from_y = torch.stack(((d02 - d20) / (2 * r[..., 2]), (d01 + d10) / (2 * r[..., 2]), r[..., 2] / 2,
                          (d12 + d21) / (2 * r[..., 2])), dim=-1)
    from_z = torch.stack(((d10 - d01) / (2 * r[..., 3]), (d02 + d20) / (2 * r[..., 3]),
                          (d12 + d21) / (2 * r[..., 3]), r[..., 3] / 2), dim=-1)
    all_branches = torch.stack((from_w, from_x, from_y, from_z), dim=-2)  # [..., 4 branches, 4]
    q = torch.gather(all_branches, -2, best.unsqueeze(-1).expand(*best.shape[:-1], 1, 4)).squeeze(-2)
    q = torch.where(q[..., :1] < 0, -q, q)
    return normalize_quat(q)
