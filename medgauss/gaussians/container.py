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
_LINEAR_MAP = "linear_map"


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
        linear_map: optional ``[B, N, 3, 3]`` (or ``[3, 3]``, broadcast) invertible linear map ``L`` applied
            to each Gaussian's shape: ``None`` means the identity. It is how Gaussians move through a
            map that is not a similarity (an anisotropic voxel grid, a non-cubic crop) without an
            eigen-decomposition: ``scales`` and ``quats`` stay the parameters (in the frame they were
            made in, e.g. normalised crop coordinates) and the covariance becomes ``L R S^2 R^T L^T``,
            differentiable at every input (see :func:`medgauss.gaussians.transform_gaussians`).
            :meth:`canonical` folds it back into scales and rotations for export.

    The covariance is ``L R diag(scales**2) R^T L^T`` with ``R = quat_to_rotmat(quats)`` (``L = I``
    when ``linear_map`` is ``None``). Renderers only ever read :meth:`covariance` / :meth:`precision`,
    so a ``linear_map`` is honoured everywhere.

    Construction checks ranks, matching ``B``/``N``, dtypes, devices, finiteness, positive
    scales and non-zero quaternions, and raises ``ValueError`` naming the argument. Pass
    ``validate=False`` only for tensors already known to be valid (it skips the value checks,
    which synchronise a GPU stream, but never the shape checks).
    """

    means: Tensor
    scales: Tensor
    quats: Tensor
    intensities: Tensor
    linear_map: Tensor | None = None
    validate: InitVar[bool] = True

    def __post_init__(self, validate: bool) -> None:
        _check_shapes(self.means, self.scales, self.quats, self.intensities)
        if self.linear_map is not None:
            self.linear_map = _check_linear_map(self.linear_map, self.means)
        if validate:
            _check_values(self.means, self.scales, self.quats, self.intensities)
            if self.linear_map is not None:
                _check_linear_map_values(self.linear_map)
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
        """``[B, N, 3, 3]`` covariances ``L R diag(s^2) R^T L^T`` (differentiable)."""
        r = self.rotation_matrices()
        if self.linear_map is not None:
            r = self.linear_map @ r
        return (r * self.scales.square().unsqueeze(-2)) @ r.transpose(-1, -2)

    def precision(self) -> Tensor:
        """``[B, N, 3, 3]`` inverse covariances ``L^-T R diag(1/s^2) R^T L^-1`` (differentiable; with no
        ``linear_map`` nothing is inverted)."""
        r = self.rotation_matrices()
        if self.linear_map is not None:
            r = torch.linalg.inv(self.linear_map).transpose(-1, -2) @ r  # (R^T L^-1)^T
        return (r * self.scales.square().reciprocal().unsqueeze(-2)) @ r.transpose(-1, -2)

    def canonical(self) -> Gaussians:
        """The same Gaussians with ``linear_map`` folded into ``scales`` and ``quats`` (for export).

        Uses an eigen-decomposition of the covariance, whose gradient is undefined where two axes
        have equal length: render and optimise the Gaussians with their ``linear_map`` instead, and
        call this only to hand scales and rotations to code outside medgauss (e.g. a 3DGS viewer).
        Returns ``self`` when there is no ``linear_map``.
        """
        if self.linear_map is None:
            return self
        from medgauss.gaussians.quaternions import rotmat_to_quat

        evals, evecs = torch.linalg.eigh(self.covariance())
        # eigh may return a reflection; flip the last axis (leaves the covariance unchanged).
        sign = torch.where(torch.linalg.det(evecs) < 0, -1.0, 1.0).to(evecs.dtype)
        evecs = torch.cat((evecs[..., :2], evecs[..., 2:] * sign[..., None, None]), dim=-1)
        scales = evals.clamp_min(torch.finfo(evals.dtype).tiny).sqrt()
        return Gaussians(self.means, scales, rotmat_to_quat(evecs), self.intensities, validate=False)

    # ------------------------------------------------------------------ tensor-like behaviour
    def _map(self, fn, validate: bool = False) -> Gaussians:
        linear = None if self.linear_map is None else fn(self.linear_map)
        return Gaussians(*(fn(getattr(self, f)) for f in _FIELDS), linear_map=linear, validate=validate)

    def to(self, *args: Any, **kwargs: Any) -> Gaussians:
        """Move/cast every tensor, with the arguments of ``Tensor.to``."""
        return self._map(lambda t: t.to(*args, **kwargs))

    def detach(self) -> Gaussians:
        return self._map(Tensor.detach)

    def clone(self) -> Gaussians:
        return self._map(Tensor.clone)

    def requires_grad_(self, requires_grad: bool = True) -> Gaussians:
        """Set ``requires_grad`` on every parameter tensor in place (note: ``quats`` is the normalised
        copy; a ``linear_map`` is a fixed map and is left alone)."""
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
        linear = None
        if any(g.linear_map is not None for g in items):
            linear = torch.cat([g.linear_map if g.linear_map is not None else _identity_map(g) for g in items],
                               dim=dim)
        return Gaussians(*(torch.cat([getattr(g, f) for g in items], dim=dim) for f in _FIELDS),
                         linear_map=linear, validate=False)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path, metadata: dict[str, str] | None = None) -> None:
        """Write the tensors to a ``.safetensors`` file (atomically: temp file + rename)."""
        from safetensors.torch import save_file

        path = Path(path)
        meta = {"format": _FORMAT, "format_version": _FORMAT_VERSION}
        if metadata:
            meta["user"] = json.dumps(metadata)
        tensors = {f: getattr(self, f).detach().contiguous().cpu() for f in _FIELDS}
        if self.linear_map is not None:
            tensors[_LINEAR_MAP] = self.linear_map.detach().contiguous().cpu()
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
                tensors = {k: f.get_tensor(k) for k in _FIELDS + ((_LINEAR_MAP,) if _LINEAR_MAP in keys else ())}
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


def _check_linear_map(linear: Tensor, means: Tensor) -> Tensor:
    """Shape / dtype / device checks of ``linear_map``; returns it as ``[B, N, 3, 3]`` (an expanded view)."""
    if not isinstance(linear, Tensor):
        raise ValueError(f"linear_map must be a torch.Tensor or None, got {type(linear).__name__}")
    b, n = means.shape[:2]
    if tuple(linear.shape) not in ((3, 3), (b, n, 3, 3)):
        raise ValueError(f"linear_map must have shape [3, 3] or [B={b}, N={n}, 3, 3], got {tuple(linear.shape)}")
    if linear.dtype != means.dtype:
        raise ValueError(f"linear_map has dtype {linear.dtype} but means has {means.dtype}")
    if linear.device != means.device:
        raise ValueError(f"linear_map is on {linear.device} but means is on {means.device}")
    return linear.expand(b, n, 3, 3)


def _check_linear_map_values(linear: Tensor) -> None:
    if not bool(torch.isfinite(linear).all()):
        raise ValueError("linear_map contains non-finite values (NaN or inf)")
    if linear.numel():
        det = torch.linalg.det(linear).abs()
        scale = linear.abs().flatten(-2).amax(-1).pow(3)
        if not bool((det > 1e-12 * scale).all()):
            raise ValueError("linear_map must be invertible; got a (nearly) singular matrix")


def _identity_map(g: Gaussians) -> Tensor:
    return torch.eye(3, dtype=g.dtype, device=g.device).expand(g.batch_size, g.num_gaussians, 3, 3)


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
