"""The one container type every part of medgauss passes Gaussians around in."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import InitVar, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from medgauss.gaussians.quaternions import quat_to_rotmat

__all__ = ["Gaussians"]

_FORMAT = "medgauss.gaussians"
_FORMAT_VERSION = "1"
_FIELDS = ("means", "scales", "quats", "intensities")


@dataclass
class Gaussians:
    """A batch of 3D Gaussians ``I * exp(-0.5 (x - mu)^T Sigma^{-1} (x - mu))``.

    Attributes:
        means: ``[B, N, 3]`` centres. In normalised volume coordinates (the network side)
            ``means[..., a]`` is the position along array axis ``a`` of a ``[B, C, D, H, W]``
            volume (D, H, W order), with voxel ``i`` of an axis of size ``n`` centred at
            ``(i + 0.5) / n``. In world millimetres (geometry, 3DGR) it is an (x, y, z) point.
        scales: ``[B, N, 3]`` standard deviations along the Gaussian's own axes, same units as
            ``means``; strictly positive.
        quats: ``[B, N, 4]`` rotations (w, x, y, z). Normalised here, so callers never need to.
        intensities: ``[B, N]`` peak values (attenuation or normalised HU units).

    The covariance is ``R diag(scales**2) R^T`` with ``R = quat_to_rotmat(quats)``.

    Construction checks ranks, matching ``B``/``N``, dtypes, devices, finiteness, positive
    scales and non-zero quaternions, and raises ``ValueError`` naming the argument. Pass
    ``validate=False`` only for tensors already known to be valid (it skips the value checks,
    which synchronise a GPU stream, but never the shape checks).
    """

    means: Tensor
    scales: Tensor
    quats: Tensor
    intensities: Tensor
    validate: InitVar[bool] = True

    def __post_init__(self, validate: bool) -> None:
        _check_shapes(self.means, self.scales, self.quats, self.intensities)
        if validate:
            _check_values(self.means, self.scales, self.quats, self.intensities)
        norm = self.quats.norm(dim=-1, keepdim=True)
        self.quats = self.quats / norm.clamp_min(torch.finfo(self.quats.dtype).tiny)

    # ------------------------------------------------------------------ properties
    @property
    def batch_size(self) -> int:
        return self.means.shape[0]

    @property
    def num_gaussians(self) -> int:
        return self.means.shape[1]

    @property
    def device(self) -> torch.device:
        return self.means.device

    @property
    def dtype(self) -> torch.dtype:
        return self.means.dtype

    def __len__(self) -> int:
        return self.batch_size

    def __repr__(self) -> str:
        return (f"Gaussians(batch_size={self.batch_size}, num_gaussians={self.num_gaussians}, "
                f"dtype={self.dtype}, device={self.device})")

    # ------------------------------------------------------------------ geometry
    def rotation_matrices(self) -> Tensor:
        """``[B, N, 3, 3]`` rotations whose columns are the Gaussians' own axes."""
        return quat_to_rotmat(self.quats)

    def covariance(self) -> Tensor:
        """``[B, N, 3, 3]`` covariances ``R diag(s^2) R^T`` (differentiable)."""
        r = self.rotation_matrices()
        return (r * self.scales.square().unsqueeze(-2)) @ r.transpose(-1, -2)

    def precision(self) -> Tensor:
        """``[B, N, 3, 3]`` inverse covariances ``R diag(1/s^2) R^T`` (differentiable, no inversion)."""
        r = self.rotation_matrices()
        return (r * self.scales.square().reciprocal().unsqueeze(-2)) @ r.transpose(-1, -2)

    # ------------------------------------------------------------------ tensor-like behaviour
    def _map(self, fn, validate: bool = False) -> Gaussians:
        return Gaussians(*(fn(getattr(self, f)) for f in _FIELDS), validate=validate)

    def to(self, *args: Any, **kwargs: Any) -> Gaussians:
        """Move/cast every tensor, with the arguments of ``Tensor.to``."""
        return self._map(lambda t: t.to(*args, **kwargs))

    def detach(self) -> Gaussians:
        return self._map(Tensor.detach)

    def clone(self) -> Gaussians:
        return self._map(Tensor.clone)

    def requires_grad_(self, requires_grad: bool = True) -> Gaussians:
        """Set ``requires_grad`` on every tensor in place (note: ``quats`` is the normalised copy)."""
        for f in _FIELDS:
            getattr(self, f).requires_grad_(requires_grad)
        return self

    def __getitem__(self, key: Any) -> Gaussians:
        """Index the leading ``[B, N]`` dimensions like a tensor, keeping both.

        ``g[1:3]`` selects samples, ``g[:, idx]`` / ``g[:, bool_mask]`` selects Gaussians
        (the same ones in every sample). Keys that would drop a dimension (``g[0]``) raise.
        """
        key_tuple = key if isinstance(key, tuple) else (key,)
        for k in key_tuple:
            if isinstance(k, int) or (isinstance(k, Tensor) and k.ndim == 0):
                raise IndexError("Gaussians indexing must keep the [B, N] dimensions; use g[i:i+1] "
                                 f"instead of an integer index (got {key!r})")
        out = self._map(lambda t: t[key])
        if out.means.ndim != 3:
            raise IndexError(f"index {key!r} does not keep the [B, N] dimensions of Gaussians")
        return out

    def select(self, indices: Tensor) -> Gaussians:
        """Per-sample selection: ``indices [B, K]`` (int64) picks K Gaussians in each sample."""
        if indices.ndim != 2 or indices.shape[0] != self.batch_size:
            raise ValueError(f"indices must have shape [B={self.batch_size}, K], got {tuple(indices.shape)}")
        if indices.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"indices must be an integer tensor, got dtype {indices.dtype}")
        idx = indices.long().to(self.device)

        def gather(t: Tensor) -> Tensor:
            view = idx.view(*idx.shape, *([1] * (t.ndim - 2)))
            return torch.gather(t, 1, view.expand(*idx.shape, *t.shape[2:]))

        return self._map(gather)

    @staticmethod
    def cat(items: Sequence[Gaussians], dim: int = 1) -> Gaussians:
        """Concatenate along Gaussians (``dim=1``, same B) or along the batch (``dim=0``, same N)."""
        if dim not in (0, 1):
            raise ValueError(f"dim must be 0 (batch) or 1 (Gaussians), got {dim}")
        if len(items) == 0:
            raise ValueError("items must contain at least one Gaussians")
        return Gaussians(*(torch.cat([getattr(g, f) for g in items], dim=dim) for f in _FIELDS),
                         validate=False)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path, metadata: dict[str, str] | None = None) -> None:
        """Write the tensors to a ``.safetensors`` file (atomically: temp file + rename)."""
        from safetensors.torch import save_file

        path = Path(path)
        meta = {"format": _FORMAT, "format_version": _FORMAT_VERSION}
        if metadata:
            meta["user"] = json.dumps(metadata)
        tensors = {f: getattr(self, f).detach().contiguous().cpu() for f in _FIELDS}
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> Gaussians:
        """Read Gaussians written by :meth:`save`; raises ``FileNotFoundError`` / ``ValueError`` naming the file."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Gaussians file not found: {path}")
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                meta = f.metadata() or {}
                keys = set(f.keys())
                if meta.get("format") != _FORMAT or not set(_FIELDS) <= keys:
                    raise ValueError(f"{path} is not a medgauss Gaussians file "
                                     f"(metadata {meta}, tensors {sorted(keys)})")
                tensors = {k: f.get_tensor(k) for k in _FIELDS}
        except ValueError:
            raise
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise ValueError(f"cannot read Gaussians file {path}: {exc}") from exc
        try:
            return cls(**tensors)
        except ValueError as exc:
            raise ValueError(f"invalid Gaussians in {path}: {exc}") from exc


def _check_shapes(means: Tensor, scales: Tensor, quats: Tensor, intensities: Tensor) -> None:
    for name, t in zip(_FIELDS, (means, scales, quats, intensities)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if means.ndim != 3 or means.shape[-1] != 3:
        raise ValueError(f"means must have shape [B, N, 3], got {tuple(means.shape)}")
    b, n = means.shape[:2]
    expected = {"scales": (b, n, 3), "quats": (b, n, 4), "intensities": (b, n)}
    for name, t in (("scales", scales), ("quats", quats), ("intensities", intensities)):
        if tuple(t.shape) != expected[name]:
            raise ValueError(f"{name} must have shape {list(expected[name])} to match means "
                             f"{tuple(means.shape)}, got {tuple(t.shape)}")
        if t.dtype != means.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but means has {means.dtype}")
        if t.device != means.device:
            raise ValueError(f"{name} is on {t.device} but means is on {means.device}")


def _check_values(means: Tensor, scales: Tensor, quats: Tensor, intensities: Tensor) -> None:
    for name, t in zip(_FIELDS, (means, scales, quats, intensities)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    if scales.numel() and not bool((scales > 0).all()):
        raise ValueError(f"scales must be strictly positive, got minimum {scales.min().item():.3g}")
    if quats.numel():
        min_norm = quats.norm(dim=-1).min().item()
        if not min_norm > 1e-12:
            raise ValueError(f"quats contains a zero-norm quaternion (min norm {min_norm:.3g})")
